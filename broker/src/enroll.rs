//! Enrollment over ALPN `runnel-enroll/1`: one request, one response.
//!
//! Order matters so that bad input loses nothing: the CSR is checked *before* the token is
//! looked at (so a bad CSR tells nothing about the token either) and before it is consumed
//! (so a malformed request leaves it usable). The token is then consumed atomically; of two
//! racing enrollments with the same token exactly one gets a certificate.
//!
//! An anonymous peer learns only "refused" for anything about the token (unknown, wrong
//! secret, expired, replayed, revoked runner, store trouble): one code, one message. Which
//! it was goes to the server log, the `runnel_enrollments_total{result}` metric and, counted
//! per window, the audit log (the tenant's when the token's secret was right).

use std::sync::Arc;
use std::time::Duration;

use runnel_certs::RunnerIdentity;
use runnel_protocol::{
    EnrollRequest, EnrollResponse, Enrolled, ErrorCode, read_frame, version, write_frame,
};

use crate::records::{AuditEvent, Consume, RunnerState, now_unix};
use crate::secret::{TOKEN_PREFIX, split};
use crate::shared::Shared;

/// Time an enrolling client has, from the end of the handshake, to send its request and
/// be answered (a real client sends it at once; a stranger holding the connection open
/// gets no more than this).
const ENROLL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the client then has to read the answer and close first.
const ENROLL_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Serves one enrollment connection.
pub(crate) async fn serve(conn: quinn::Connection, shared: Arc<Shared>) {
    let remote = conn.remote_address();
    // Before anything is read: a source enrolling too often, or a broker with every
    // enrollment slot taken, answers "try again" (the slot is held until the end).
    let admitted = shared.intake.enroll(remote.ip());
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let response = match (&admitted, read_frame::<EnrollRequest, _>(&mut recv)) {
            (Err(busy), _) => {
                metrics::counter!(crate::metrics::names::ENROLLMENTS, "result" => "busy")
                    .increment(1);
                let reason = match busy {
                    crate::endpoint::EnrollBusy::Rate(_) => "enrollment rate limited",
                    crate::endpoint::EnrollBusy::Full => "enrollment slots full",
                };
                shared.refusals.note(None, &remote.ip().to_string(), reason);
                refused(ErrorCode::Unavailable, busy.message())
            }
            (Ok(_), read) => match read.await {
                Ok(Some(req)) => enroll(&shared, req, remote).await,
                Ok(None) => return Err("no enroll request".to_string()),
                Err(e) => {
                    metrics::counter!(crate::metrics::names::ENROLLMENTS, "result" => "bad_request")
                    .increment(1);
                    refused(ErrorCode::BadRequest, format!("malformed enroll request: {e}"))
                }
            },
        };
        write_frame(&mut send, &response).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(ENROLL_TIMEOUT, exchange).await {
        Ok(Ok(())) => {
            // Let the client read the answer and close first.
            let _ = tokio::time::timeout(ENROLL_CLOSE_WAIT, conn.closed()).await;
        }
        Ok(Err(e)) => tracing::info!(%remote, error = %e, "enrollment exchange failed"),
        Err(_) => tracing::info!(%remote, "enrollment timed out"),
    }
    conn.close(ErrorCode::Ok.as_u32().into(), b"");
}

fn refused(code: ErrorCode, message: impl Into<String>) -> EnrollResponse {
    EnrollResponse::Refused { code, message: message.into() }
}

/// What an anonymous peer is told about any token refusal.
const REFUSED: &str = "enrollment refused: the token is not valid (ask your admin for a new one)";

/// What a peer is told when the store is unreachable before the token was used.
const UNAVAILABLE: &str = "enrollment unavailable: the broker cannot reach its store; try again";

/// A store failure while reading or consuming the token: "unavailable" when etcd is
/// unreachable (a retry may succeed; only a consume whose answer was lost on the way back
/// can have used the token up), else an internal refusal.
fn store_refusal(e: crate::store::StoreError) -> Refusal {
    match e {
        crate::store::StoreError::Unavailable(m) => Refusal::Unavailable(m),
        e => token_refusal("internal", None, format!("store: {e}")),
    }
}

/// Why an enrollment was refused.
#[derive(Debug)]
enum Refusal {
    /// The request itself is malformed (the peer is told why: nothing secret in it).
    BadRequest(String),
    /// No protocol version in common.
    Version(u16),
    /// The store cannot be reached before anything was used up: the peer may retry.
    Unavailable(String),
    /// Anything about the token or the runner: the peer hears only [`REFUSED`].
    Token {
        /// Metric label and log reason.
        result: &'static str,
        /// The token's tenant, when its secret was right (so the tenant is proven).
        tenant: Option<String>,
        /// Detail for the server log (never the token).
        detail: String,
    },
}

fn token_refusal(result: &'static str, tenant: Option<&str>, detail: impl Into<String>) -> Refusal {
    Refusal::Token { result, tenant: tenant.map(str::to_owned), detail: detail.into() }
}

/// Decides one enrollment request, counting the result.
pub(crate) async fn enroll(
    shared: &Shared,
    req: EnrollRequest,
    remote: std::net::SocketAddr,
) -> EnrollResponse {
    let refusal = match decide(shared, req).await {
        Ok(enrolled) => {
            metrics::counter!(crate::metrics::names::ENROLLMENTS, "result" => "ok").increment(1);
            return EnrollResponse::Ok(enrolled);
        }
        Err(r) => r,
    };
    let (result, response) = match &refusal {
        Refusal::BadRequest(m) => ("bad_request", refused(ErrorCode::BadRequest, m.clone())),
        Refusal::Version(v) => (
            "bad_request",
            refused(ErrorCode::UnsupportedVersion, format!("protocol version {v} not supported")),
        ),
        Refusal::Unavailable(detail) => {
            tracing::warn!(%remote, %detail, "enrollment refused: store unavailable");
            ("unavailable", refused(ErrorCode::Unavailable, UNAVAILABLE))
        }
        Refusal::Token { result, tenant, detail } => {
            tracing::info!(%remote, result, %detail, "enrollment refused");
            // Per source host: a client picks a new port for every attempt.
            shared.refusals.note(tenant.as_deref(), &remote.ip().to_string(), result);
            (*result, refused(ErrorCode::Unauthenticated, REFUSED))
        }
    };
    metrics::counter!(crate::metrics::names::ENROLLMENTS, "result" => result).increment(1);
    response
}

async fn decide(shared: &Shared, req: EnrollRequest) -> Result<Enrolled, Refusal> {
    let reg = &shared.registry;
    if version::negotiate(req.version, req.version).is_none() {
        return Err(Refusal::Version(req.version));
    }
    // The CSR first, alone: its answer must not depend on the token.
    match runnel_certs::csr_public_key(&req.csr_pem) {
        Ok(k) if k.len() == 32 => {}
        Ok(_) => return Err(Refusal::BadRequest("bad CSR: runner keys must be ed25519".into())),
        Err(e) => return Err(Refusal::BadRequest(format!("bad CSR: {e}"))),
    }
    let Some((token_id, random)) = split(TOKEN_PREFIX, req.token.trim()) else {
        return Err(token_refusal("unknown", None, "malformed token"));
    };
    // Find which runner the token is for without consuming it.
    let peek = match reg.token(token_id).await {
        Ok(Some(t)) => t,
        Ok(None) => return Err(token_refusal("unknown", None, "unknown token id")),
        Err(e) => return Err(store_refusal(e)),
    };
    let identity =
        RunnerIdentity::new(shared.ca.cluster(), &peek.tenant, &peek.owner, &peek.runner_id)
            .map_err(|e| token_refusal("internal", None, format!("identity: {e}")))?;
    let lifetime = shared.config.runner_cert_validity;
    let issued = shared
        .ca
        .issue_runner_cert(&req.csr_pem, &identity, lifetime)
        .map_err(|e| Refusal::BadRequest(format!("bad CSR: {e}")))?;
    let tenant = Some(peek.tenant.as_str());
    match reg.consume_token(token_id, random).await {
        Ok(Consume::Ok(_)) => {}
        Ok(Consume::Unknown) => return Err(token_refusal("unknown", None, "wrong token secret")),
        Ok(Consume::Expired) => return Err(token_refusal("expired", tenant, "expired token")),
        Ok(Consume::Replayed) => return Err(token_refusal("replayed", tenant, "token replayed")),
        Err(e) => return Err(store_refusal(e)),
    }
    let now = now_unix();
    let not_after = issued.validity.not_after.unix_timestamp();
    let updated = reg
        .update_runner(&identity.tenant, &identity.runner, |r| {
            if r.state != RunnerState::Pending {
                return false;
            }
            r.state = RunnerState::Paired;
            r.enrolled_at = Some(now);
            r.last_seen = Some(now);
            r.cert_serial = Some(issued.serial_hex.clone());
            r.cert_not_after = Some(not_after);
            true
        })
        .await;
    let record = match updated {
        Ok(Some(r)) => r,
        Ok(None) => return Err(token_refusal("revoked", tenant, "runner no longer pending")),
        Err(e) => return Err(token_refusal("internal", None, format!("store: {e}"))),
    };
    shared.index.apply(&record);
    let digest = runnel_certs::digest(&issued.cert_der);
    shared.index.set_current_cert(&record.id, &issued.serial_hex, digest);
    let detail = format!("certificate serial {}", issued.serial_hex);
    let actor = format!("runner:{}", record.id);
    let ev = AuditEvent::now("enrolled", actor, Some(&record.tenant), Some(&record.id), detail);
    reg.audit_best_effort(ev).await;
    tracing::info!(tenant = %record.tenant, owner = %record.owner, runner = %record.id, "runner enrolled");
    Ok(Enrolled {
        cert_pem: issued.cert_pem,
        ca_pem: shared.ca.cert_pem().to_owned(),
        runner_id: record.id,
        tenant: record.tenant,
        owner: record.owner,
    })
}
