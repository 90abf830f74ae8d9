//! The API's JSON bodies as a fuzz target (feature `bench-internals`): a body is parsed
//! as its handler parses it, then put through the checks the handler runs before it
//! touches any state (`checked` on each body type: the same functions, not copies).

use super::{jobs, keys, runners, tenants};

/// Which route's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `POST /v1/jobs`.
    Job,
    /// `POST /v1/jobs/batch`.
    Jobs,
    /// `POST /v1/runners`.
    Runner,
    /// `POST /v1/tenants/{t}/keys`.
    Key,
    /// `POST /v1/operator-keys`.
    OperatorKey,
    /// `POST /v1/tenants`.
    Tenant,
}

impl Body {
    /// Every body.
    pub const ALL: [Body; 6] =
        [Body::Job, Body::Jobs, Body::Runner, Body::Key, Body::OperatorKey, Body::Tenant];
}

/// Parses `bytes` as `which` and checks it; Err is the answer the API would give: a parse
/// error (400 from the extractor), or `<status> <code>: <message>` from the checks.
pub fn check_body(which: Body, bytes: &[u8]) -> Result<(), String> {
    fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
        serde_json::from_slice(b).map_err(|e| e.to_string())
    }
    // The answer as `<status> <code>: <message>` (the fuzz target checks it is a 400).
    let msg = |e: super::ApiError| format!("{} {}: {}", e.status.as_u16(), e.code, e.message);
    match which {
        Body::Job => parse::<jobs::CreateJob>(bytes)?
            .checked(&crate::config::Config::default())
            .map(drop)
            .map_err(msg),
        Body::Jobs => parse::<jobs::CreateJobs>(bytes)?
            .checked(&crate::config::Config::default())
            .map_err(msg),
        Body::Runner => parse::<runners::CreateRunner>(bytes)?.checked().map(drop).map_err(msg),
        Body::Key => parse::<keys::CreateKey>(bytes)?.checked().map(drop).map_err(msg),
        Body::OperatorKey => {
            parse::<keys::CreateOperatorKey>(bytes)?.checked().map(drop).map_err(msg)
        }
        Body::Tenant => parse::<tenants::CreateTenant>(bytes)?.checked().map_err(msg),
    }
}
