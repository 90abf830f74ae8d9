//! `runnel-runner enroll`: generate a key here, trade the one-time token and a CSR for a
//! certificate, and save everything in the state dir.

use runnel_certs::{key, parse_fingerprint, pem};
use runnel_protocol::{
    EnrollRequest, EnrollResponse, Enrolled, PROTOCOL_VERSION, read_frame, write_frame,
};

use crate::RunnerError;
use crate::state::{RunnerInfo, StateDir};
use crate::tls::{broker_addrs, client_endpoint, enroll_config, resolve};

fn conn_err(e: impl Into<crate::BoxError>) -> RunnerError {
    RunnerError::connection(e)
}

/// One enrollment exchange with one node.
async fn exchange(
    broker: &str,
    pin: [u8; 32],
    req: &EnrollRequest,
) -> Result<Option<EnrollResponse>, RunnerError> {
    let (addr, server_name) = resolve(broker).await?;
    let endpoint = client_endpoint(addr)?;
    let conn = endpoint
        .connect_with(enroll_config(pin)?, addr, &server_name)
        .map_err(conn_err)?
        .await
        .map_err(conn_err)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(conn_err)?;
    write_frame(&mut send, req).await.map_err(conn_err)?;
    send.finish().map_err(conn_err)?;
    let resp = read_frame::<EnrollResponse, _>(&mut recv).await.map_err(conn_err)?;
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    Ok(resp)
}

/// Enrolls a new runner into `state`. The private key never leaves this machine.
pub async fn enroll(
    broker: &str,
    ca_fingerprint: &str,
    token: &str,
    state: &StateDir,
) -> Result<Enrolled, RunnerError> {
    if state.is_enrolled() {
        return Err(RunnerError::AlreadyEnrolled(state.path().to_owned()));
    }
    // Before the token is spent: a state dir we cannot use must not cost it.
    state.create()?;
    let pin = parse_fingerprint(ca_fingerprint)?;
    let key = key::generate_key()?;
    let csr = key::csr_pem(&key)?;
    let req =
        EnrollRequest { version: PROTOCOL_VERSION, token: token.trim().to_owned(), csr_pem: csr };
    // A cluster may be given as several addresses: the first that answers enrolls (a
    // refusal is an answer; only an unreachable node moves on to the next).
    let mut last = None;
    let mut resp = None;
    for addr in broker_addrs(broker) {
        match exchange(addr, pin, &req).await {
            Ok(r) => {
                resp = Some(r);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let resp = match (resp, last) {
        (Some(r), _) => r,
        (None, Some(e)) => return Err(e),
        (None, None) => return Err(RunnerError::Address(broker.into(), "no address".into())),
    };
    let enrolled = match resp {
        Some(EnrollResponse::Ok(e)) => e,
        Some(EnrollResponse::Refused { code, message }) => {
            return Err(RunnerError::EnrollRefused { code, message });
        }
        None => return Err(RunnerError::BrokerClosed),
    };
    // The CA the broker returns must be the one we pinned.
    let ca_der =
        pem::certs_from_pem(&enrolled.ca_pem)?.into_iter().next().ok_or(RunnerError::NoCa)?;
    if ring::digest::digest(&ring::digest::SHA256, &ca_der).as_ref() != pin {
        return Err(RunnerError::CaPinMismatch);
    }
    pem::write_private(&state.key_path(), &key.serialize_pem())?;
    pem::write_public(&state.cert_path(), &enrolled.cert_pem)?;
    pem::write_public(&state.ca_path(), &enrolled.ca_pem)?;
    state.write_info(&RunnerInfo {
        broker: broker.to_owned(),
        runner_id: enrolled.runner_id.clone(),
        tenant: enrolled.tenant.clone(),
        owner: enrolled.owner.clone(),
    })?;
    Ok(enrolled)
}
