//! Enrollment over ALPN `runnel-enroll/1`: one request, one response.
//!
//! Order matters so that bad input loses nothing: the CSR is checked (by issuing the
//! certificate) *before* the token is consumed, so a malformed request leaves the token
//! usable. The token is then consumed atomically; of two racing enrollments with the same
//! token exactly one gets a certificate.

use std::sync::Arc;
use std::time::Duration;

use runnel_certs::RunnerIdentity;
use runnel_protocol::{
    EnrollRequest, EnrollResponse, Enrolled, ErrorCode, read_frame, version, write_frame,
};

use crate::records::{AuditEvent, Consume, Registry, RunnerState, now_unix};
use crate::secret::{TOKEN_PREFIX, split};
use crate::shared::Shared;

/// Time an enrolling client has to send its request.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one enrollment connection.
pub(crate) async fn serve(conn: quinn::Connection, shared: Arc<Shared>) {
    let remote = conn.remote_address();
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let response = match read_frame::<EnrollRequest, _>(&mut recv).await {
            Ok(Some(req)) => enroll(&shared, req).await,
            Ok(None) => return Err("no enroll request".to_string()),
            Err(e) => {
                metrics::counter!(crate::metrics::names::ENROLLMENTS, "result" => "bad_request")
                    .increment(1);
                refused(ErrorCode::BadRequest, format!("malformed enroll request: {e}"))
            }
        };
        write_frame(&mut send, &response).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(ENROLL_TIMEOUT, exchange).await {
        Ok(Ok(())) => {
            // Let the client read the answer and close first.
            let _ = tokio::time::timeout(ENROLL_TIMEOUT, conn.closed()).await;
        }
        Ok(Err(e)) => tracing::info!(%remote, error = %e, "enrollment exchange failed"),
        Err(_) => tracing::info!(%remote, "enrollment timed out"),
    }
    conn.close(ErrorCode::Ok.as_u32().into(), b"");
}

fn refused(code: ErrorCode, message: impl Into<String>) -> EnrollResponse {
    EnrollResponse::Refused { code, message: message.into() }
}

async fn audit_denied(reg: &Registry, tenant: Option<&str>, runner: Option<&str>, why: &str) {
    let detail = format!("enrollment refused: {why}");
    reg.audit_best_effort(AuditEvent::now("denied", "anonymous", tenant, runner, detail)).await;
}

/// Decides one enrollment request, counting the result.
pub(crate) async fn enroll(shared: &Shared, req: EnrollRequest) -> EnrollResponse {
    let resp = decide(shared, req).await;
    let result = match &resp {
        EnrollResponse::Ok(_) => "ok",
        EnrollResponse::Refused { code, .. } => match code {
            ErrorCode::TokenUnknown => "unknown",
            ErrorCode::TokenExpired => "expired",
            ErrorCode::TokenConsumed => "replayed",
            ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => "bad_request",
            ErrorCode::Revoked => "revoked",
            _ => "internal",
        },
    };
    metrics::counter!(crate::metrics::names::ENROLLMENTS, "result" => result).increment(1);
    resp
}

async fn decide(shared: &Shared, req: EnrollRequest) -> EnrollResponse {
    let reg = &shared.registry;
    if version::negotiate(req.version, req.version).is_none() {
        return refused(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {} not supported", req.version),
        );
    }
    let Some((token_id, random)) = split(TOKEN_PREFIX, req.token.trim()) else {
        audit_denied(reg, None, None, "malformed token").await;
        return refused(ErrorCode::TokenUnknown, "malformed enrollment token");
    };
    // Find which runner the token is for without consuming it, to check the CSR first.
    let peek = match reg.token(token_id).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            audit_denied(reg, None, None, "unknown token").await;
            return refused(ErrorCode::TokenUnknown, "unknown enrollment token");
        }
        Err(e) => return refused(ErrorCode::Internal, e.to_string()),
    };
    let identity = match RunnerIdentity::new(
        shared.ca.cluster(),
        &peek.tenant,
        &peek.owner,
        &peek.runner_id,
    ) {
        Ok(i) => i,
        Err(e) => return refused(ErrorCode::Internal, e.to_string()),
    };
    let lifetime = shared.config.runner_cert_validity;
    let issued = match shared.ca.issue_runner_cert(&req.csr_pem, &identity, lifetime) {
        Ok(i) => i,
        Err(e) => return refused(ErrorCode::BadRequest, format!("bad CSR: {e}")),
    };
    let (tenant, runner) = (Some(peek.tenant.as_str()), Some(peek.runner_id.as_str()));
    match reg.consume_token(token_id, random).await {
        Ok(Consume::Ok(_)) => {}
        Ok(Consume::Unknown) => {
            audit_denied(reg, None, None, "unknown token").await;
            return refused(ErrorCode::TokenUnknown, "unknown enrollment token");
        }
        Ok(Consume::Expired) => {
            audit_denied(reg, tenant, runner, "expired token").await;
            return refused(ErrorCode::TokenExpired, "enrollment token expired; create a new one");
        }
        Ok(Consume::Replayed) => {
            audit_denied(reg, tenant, runner, "token replayed").await;
            return refused(ErrorCode::TokenConsumed, "enrollment token was already used");
        }
        Err(e) => return refused(ErrorCode::Internal, e.to_string()),
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
        Ok(None) => {
            audit_denied(reg, tenant, runner, "runner no longer pending").await;
            return refused(ErrorCode::Revoked, "runner was revoked or already enrolled");
        }
        Err(e) => return refused(ErrorCode::Internal, e.to_string()),
    };
    shared.index.apply(&record);
    let detail = format!("certificate serial {}", issued.serial_hex);
    let actor = format!("runner:{}", record.id);
    let ev = AuditEvent::now("enrolled", actor, Some(&record.tenant), Some(&record.id), detail);
    reg.audit_best_effort(ev).await;
    tracing::info!(tenant = %record.tenant, owner = %record.owner, runner = %record.id, "runner enrolled");
    EnrollResponse::Ok(Enrolled {
        cert_pem: issued.cert_pem,
        ca_pem: shared.ca.cert_pem().to_owned(),
        runner_id: record.id,
        tenant: record.tenant,
        owner: record.owner,
    })
}
