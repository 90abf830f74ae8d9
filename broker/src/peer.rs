//! `runnel-peer/1`: how a node calls a tenant's home node (forwarded API calls), over QUIC
//! with mutual TLS. Each node gets a certificate from the cluster CA at start
//! (`spiffe://<cluster>/node/<id>`); both ends verify the chain to the CA, and each checks
//! after the handshake that the other end is a node of this cluster (and, for the caller,
//! the very node it meant to reach).
//!
//! - `server`: the listener on `--peer-listen`; it answers only with local work (a call is
//!   never forwarded twice).
//! - `client`: one cached connection per node; a dispatch, get or cancel on the
//!   connection's lane (`runnel-peer/2`), any other call on a stream of its own.

mod client;
mod server;

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use runnel_certs::{ClusterCa, Identity, PEER_SERVER_NAME, parse_cert, pem};
use runnel_protocol::{ALPN_PEER, ALPN_PEER_LANE};
use rustls_pki_types::CertificateDer;

pub(crate) use client::{Answer, PeerClient, PeerError};
pub(crate) use server::{Reply, job_answer, refused, reply_bytes, send_output, serve, serve_calls};

use crate::broker::SpawnError;

/// Idle timeout of peer connections: a cached connection to a node that died (sending
/// nothing) fails calls on it after this, instead of leaving them hanging.
const PEER_IDLE: Duration = Duration::from_secs(4);
/// Keep-alive of a cached peer connection (a handful per node: cheap).
const PEER_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Concurrent calls one peer connection carries on streams of their own (quinn keeps an
/// entry per stream it allows).
const PEER_STREAMS: u32 = 1024;
/// Calls a peer lane may have unanswered. A dispatch that waits holds its place until its
/// job ends, and one tenant may have thousands of jobs under way
/// (`--max-jobs-per-tenant`): the lane must not be the bound that one tenant's waiting
/// calls fill for every call forwarded after them. What a call holds while it waits is
/// its future (~1.6 KiB) and its job, which the tenant's own limits bound.
const PEER_LANE_CALLS: usize = 65_536;

/// The node id a verified peer certificate names, if it is a node of `cluster`.
pub(crate) fn peer_node(conn: &quinn::Connection, cluster: &str) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    match parse_cert(certs.first()?).ok()?.identity {
        Identity::Node(n) if n.cluster == cluster => Some(n.node),
        _ => None,
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(PEER_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(PEER_KEEP_ALIVE))
        // As every other runnel endpoint: one path MTU probe each way, and ACKs asked for
        // less often than every second packet (calls forwarded together share them).
        .mtu_discovery_config(Some(runnel_protocol::transport::mtu_discovery()))
        .ack_frequency_config(Some(runnel_protocol::transport::ack_frequency()));
    if let Ok(idle) = PEER_IDLE.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// This node's TLS material for `runnel-peer/1`, both directions.
pub(crate) struct PeerTls {
    pub server: quinn::ServerConfig,
    pub client: quinn::ClientConfig,
}

impl PeerTls {
    /// Issues this node's certificate from the CA and builds both configs.
    pub(crate) fn new(ca: &ClusterCa, node: &str) -> Result<Self, SpawnError> {
        Self::offering(ca, node, alpn())
    }

    /// As [`PeerTls::new`], offering `alpn` (a test plays a node of an older build).
    fn offering(ca: &ClusterCa, node: &str, alpn: Vec<Vec<u8>>) -> Result<Self, SpawnError> {
        let (cert, key_pem) = ca.issue_node_cert(node)?;
        let chain = vec![cert.cert_der.clone(), ca.cert_der().clone()];
        let key = pem::private_key_from_pem(&key_pem)?;
        let provider = runnel_certs::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone())?;
        let roots = Arc::new(roots);

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        tls.alpn_protocols = alpn.clone();
        crate::endpoint::resume_nothing(&mut tls);
        runnel_certs::tls::keep_our_order(&mut tls);
        let crypto = QuicServerConfig::try_from(tls).map_err(|_| SpawnError::NoQuicCipherSuite)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport());

        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        tls.alpn_protocols = alpn;
        // Nothing to resume (peers hand out no tickets): no ticket store either.
        tls.resumption = rustls::client::Resumption::disabled();
        let crypto = QuicClientConfig::try_from(tls).map_err(|_| SpawnError::NoQuicCipherSuite)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport());
        Ok(Self { server, client })
    }
}

/// What a node offers its peers, best first: a node of an older build agrees on
/// `runnel-peer/1` (no lane).
fn alpn() -> Vec<Vec<u8>> {
    vec![ALPN_PEER_LANE.to_vec(), ALPN_PEER.to_vec()]
}

/// The server name every peer dials (the identity check is on the URI SAN).
pub(crate) const SERVER_NAME: &str = PEER_SERVER_NAME;

#[cfg(test)]
mod tests {
    use super::*;

    /// A node with `client` connected to a node with `server`, on loopback: both
    /// endpoints (kept open), the dialling side's connection and the accepting side's.
    async fn connected(
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
    ) -> ((quinn::Endpoint, quinn::Endpoint), quinn::Connection, quinn::Connection) {
        let server =
            quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = server.local_addr().expect("addr");
        let accepted = tokio::spawn(async move {
            let conn = server.accept().await.expect("incoming").await.expect("handshake");
            (server, conn)
        });
        let dialler = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let conn =
            dialler.connect_with(client, addr, SERVER_NAME).expect("dial").await.expect("tls");
        let (server, theirs) = accepted.await.expect("accepted");
        ((server, dialler), conn, theirs)
    }

    /// Two nodes of this build agree on `runnel-peer/2` (a lane); a node of this build
    /// calling a node of an older one, which offers only `runnel-peer/1`, agrees on that and
    /// opens no lane (its calls then take a stream each, as that node expects).
    #[tokio::test]
    async fn a_node_opens_a_lane_only_to_a_node_that_offers_one() {
        let ca = ClusterCa::generate("runnel").expect("ca");
        let (a, b) = (PeerTls::new(&ca, "a").expect("a"), PeerTls::new(&ca, "b").expect("b"));
        // A node of an older build: runnel-peer/1 only.
        let old = PeerTls::offering(&ca, "old", vec![ALPN_PEER.to_vec()]).expect("old").server;
        for (server, lane) in [(a.server, true), (old, false)] {
            let (_endpoints, conn, _theirs) = connected(server, b.client.clone()).await;
            assert_eq!(client::takes_a_lane(&conn), lane);
        }
    }

    /// Calls to a node that does not answer dial it once: the calls that came meanwhile
    /// wait for that dial and fail with it, instead of each dialling in turn (3 s each).
    /// What the client keeps for the node goes when the node leaves the cluster.
    #[tokio::test]
    async fn calls_to_a_node_that_does_not_answer_share_one_dial() {
        let ca = ClusterCa::generate("runnel").expect("ca");
        let tls = PeerTls::new(&ca, "a").expect("a");
        // A port where nothing answers: each dial waits out CONNECT_TIMEOUT.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let node = crate::cluster::NodeRecord {
            id: "b".into(),
            quic: String::new(),
            http: String::new(),
            peer: silent.local_addr().expect("addr").to_string(),
            lease: 0,
            started_at: 0,
        };
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let client = Arc::new(PeerClient::new(endpoint.clone(), tls.client, "runnel"));
        let mut calls = tokio::task::JoinSet::new();
        let get_job = || runnel_protocol::PeerRequest::GetJob {
            caller: runnel_protocol::PeerCaller {
                key_id: "k".into(),
                role: "admin".into(),
                tenant: Some("acme".into()),
                owner: None,
            },
            id: "job-1".into(),
        };
        for _ in 0..5 {
            let (client, node, get) = (client.clone(), node.clone(), get_job());
            calls.spawn(async move { client.job(&node, get).await });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(endpoint.open_connections(), 1, "one dial for all five calls");
        // Serially, five dials would take 15 s.
        let all = tokio::time::timeout(client::CONNECT_TIMEOUT * 2, calls.join_all()).await;
        for call in all.expect("the waiting calls failed with the one dial") {
            assert!(matches!(call, Err(PeerError::Unreachable { .. })), "{call:?}");
        }
        // Its dial lock is kept while it is in the cluster, and let go of when it leaves
        // (seen in the watch, or missing from a scan of the nodes).
        assert_eq!(client.nodes_kept(), 1);
        client.forget_all_but(|id| id == "b");
        assert_eq!(client.nodes_kept(), 1);
        client.forget_all_but(|_| false);
        assert_eq!(client.nodes_kept(), 0);
        let _ = client.job(&node, get_job()).await;
        client.forget_all_but(|id| id != "b");
        assert_eq!(client.nodes_kept(), 0);
    }

    /// A connection between two nodes probes the path MTU once each way and asks for
    /// ACKs less often, as runner and client connections do: with quinn's defaults a peer
    /// connection sent four padded probes each way and acknowledged every second packet.
    #[tokio::test]
    async fn nodes_probe_the_path_mtu_once_and_ask_for_fewer_acks() {
        use runnel_protocol::transport::MTU_PROBE_SIZE;
        let ca = ClusterCa::generate("runnel").expect("ca");
        let (a, b) = (PeerTls::new(&ca, "a").expect("a"), PeerTls::new(&ca, "b").expect("b"));
        let (_endpoints, conn, theirs) = connected(a.server, b.client).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while conn.stats().path.current_mtu != MTU_PROBE_SIZE
            || theirs.stats().path.current_mtu != MTU_PROBE_SIZE
        {
            assert!(tokio::time::Instant::now() < deadline, "no probe: {:?}", conn.stats().path);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A search that went on would send its next probe as soon as the last was acknowledged.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (side, c) in [("dialling", &conn), ("accepting", &theirs)] {
            let s = c.stats();
            let probes = s.path.sent_plpmtud_probes - s.path.lost_plpmtud_probes;
            assert_eq!(probes, 1, "the {side} node's acknowledged probes: {:?}", s.path);
            assert!(s.frame_tx.ack_frequency >= 1, "the {side} node did not ask: {:?}", s.frame_tx);
        }
    }
}
