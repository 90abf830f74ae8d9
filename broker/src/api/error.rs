//! API errors: `{"error":{"code","message"}}` with the right status, and a JSON extractor
//! whose rejections use the same shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, rejection::JsonRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// Any status and code.
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }
    /// The same error with `Retry-After: secs`.
    pub(crate) fn retry_after(self, secs: u64) -> Self {
        Self { retry_after: Some(secs), ..self }
    }
    /// 400.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 401.
    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// 403.
    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409.
    pub(crate) fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 503.
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    /// 500, logging the cause (the client sees only a generic message).
    pub(crate) fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "store unavailable");
                Self::unavailable(
                    "the store (etcd) cannot be reached; nothing was changed, try again later",
                )
            }
            e => Self::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s: 413 for a body over the limit, else 400
/// with the parser's reason.
///
/// axum's `Json` reads every body through `serde_path_to_error` (to name the field a bad
/// body failed at) and parses the `Content-Type` with `mime`: ~5% of an HTTP dispatch's
/// broker CPU. A body sent as exactly `application/json` that parses is taken with plain
/// `serde_json`; anything else, and every error's wording, goes through axum's `Json`, so
/// what is accepted and what an error says are the same.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let plain = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/json");
        if !plain {
            return match axum::Json::<T>::from_request(req, state).await {
                Ok(axum::Json(v)) => Ok(ApiJson(v)),
                Err(e) => Err(rejected(&e)),
            };
        }
        let bytes = match Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(e) => return Err(rejected(&JsonRejection::from(e))),
        };
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(ApiJson(v)),
            Err(_) => match axum::Json::<T>::from_bytes(&bytes) {
                Ok(axum::Json(v)) => Ok(ApiJson(v)),
                Err(e) => Err(rejected(&e)),
            },
        }
    }
}

/// The answer to a body axum's `Json` refused.
fn rejected(e: &JsonRejection) -> ApiError {
    match e {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::bad_request("expected Content-Type: application/json")
        }
        e if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is over the {} KiB limit", super::MAX_BODY / 1024),
        ),
        e => ApiError::bad_request(e.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        a: u32,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Inner {
        b: u32,
    }

    async fn extract(content_type: Option<&str>, body: &str) -> Result<Outer, ApiError> {
        let mut req = Request::builder().method("POST").uri("/");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req.body(Body::from(body.to_owned())).expect("request");
        ApiJson::<Outer>::from_request(req, &()).await.map(|ApiJson(v)| v)
    }

    #[tokio::test]
    async fn bodies_are_taken_as_axum_takes_them_whatever_the_content_type_spelling() {
        let want = Outer { a: 1, inner: Some(Inner { b: 2 }) };
        for ct in ["application/json", "application/json; charset=utf-8", "application/x+json"] {
            let got = extract(Some(ct), r#"{"a":1,"inner":{"b":2}}"#).await.expect(ct);
            assert_eq!(got, want, "{ct}");
        }
        for ct in [None, Some("text/plain"), Some("text/json")] {
            let e = extract(ct, r#"{"a":1}"#).await.expect_err("not JSON by its type");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.message, "expected Content-Type: application/json", "{ct:?}");
        }
    }

    #[tokio::test]
    async fn a_bad_body_is_refused_with_the_path_to_what_is_wrong() {
        for ct in ["application/json", "application/json; charset=utf-8"] {
            let cases = [
                (r#"{"a":1,"inner":{"b":"x"}}"#, "inner.b: invalid type"),
                (r#"{"a":1,"c":2}"#, "unknown field `c`"),
                (r#"{"inner":{"b":2}}"#, "missing field `a`"),
                (r#"{"a":1} x"#, "trailing characters"),
                (r#"{"a":"#, "EOF while parsing"),
            ];
            for (body, says) in cases {
                let e = extract(Some(ct), body).await.expect_err(body);
                assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "bad_request"), "{body}");
                assert!(e.message.contains(says), "{ct} {body}: {}", e.message);
            }
        }
    }
}
