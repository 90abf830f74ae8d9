//! The HTTP client of the broker's API: one-line errors for the CLI, raw status and body for
//! tests that check what the API answers.

use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::Value;

/// A failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API answered with an error object.
    #[error("{code} ({status}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error object's machine-readable code.
        code: String,
        /// The error object's human-readable message.
        message: String,
    },
    /// The broker could not be reached, or the connection broke mid-answer (a refused
    /// TLS certificate included: the message carries every cause).
    #[error("cannot reach {url}: {}", causes(source))]
    Transport {
        /// Base URL.
        url: String,
        /// What reqwest reported.
        source: reqwest::Error,
    },
    /// Configuration is missing or wrong.
    #[error("{0}")]
    Config(String),
}

/// An error and its sources, `: `-separated (reqwest's own message hides the TLS reason).
fn causes(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

/// One answer of the API: its status and its body (JSON, or the text as a JSON string when
/// the body is not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Value,
}

impl Answer {
    /// The answer as a result: a status of 400 or more becomes [`CtlError::Api`].
    pub fn into_result(self) -> Result<Value, CtlError> {
        if self.status < 400 {
            return Ok(self.body);
        }
        let err = &self.body["error"];
        Err(CtlError::Api {
            status: self.status,
            code: err["code"].as_str().unwrap_or("error").to_owned(),
            message: err["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| self.body.to_string()),
        })
    }
}

/// `Bearer <key>` as a sensitive header value; None for a key no header can carry (the
/// request then fails as reqwest reports it).
fn bearer(key: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// `base` with `path` (`/v1/...`, maybe with `?query`) after its own path: what parsing
/// `{base}{path}` gives, without parsing the scheme and host again.
fn joined(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut url = base.clone();
    match base.path() {
        "/" | "" => url.set_path(path),
        prefix => url.set_path(&format!("{prefix}{path}")),
    }
    url.set_query(query);
    url
}

/// An API client for one base URL and one API key. Cloning is cheap (the connection pool
/// is shared), and [`Client::with_key`] gives a client for another key on the same pool.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    /// `url` parsed once: each request's URL is this with its path set, not a whole URL
    /// parsed again (host and all: ~6% of a client's CPU per request). None when `url`
    /// does not parse; each request then fails as reqwest reports it.
    base: Option<reqwest::Url>,
    key: String,
    /// `Bearer <key>`, made once, marked sensitive (never printed).
    auth: Option<HeaderValue>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `url` with `key` (plain HTTP; for `https://` see [`Client::pinned`]).
    pub fn new(url: &str, key: &str) -> Self {
        let http = Self::builder().build().unwrap_or_default();
        Self::with_http(url, key, http)
    }

    fn with_http(url: &str, key: &str, http: reqwest::Client) -> Self {
        let url = url.trim_end_matches('/').to_owned();
        let base = reqwest::Url::parse(&url).ok().filter(|u| u.query().is_none());
        Self { url, base, key: key.to_owned(), auth: bearer(key), http }
    }

    /// A client for an `https://` broker whose certificate chains to the CA with
    /// fingerprint `ca_fingerprint` (`sha256:<hex>`, as the broker prints at start): the
    /// only CA it trusts. Another CA fails the TLS handshake.
    pub fn pinned(url: &str, key: &str, ca_fingerprint: &str) -> Result<Self, CtlError> {
        let pin = runnel_certs::parse_fingerprint(ca_fingerprint)
            .map_err(|e| CtlError::Config(format!("--ca-fingerprint: {e}")))?;
        let mut tls = runnel_certs::pin::client_config(pin)
            .map_err(|e| CtlError::Config(format!("TLS: {e}")))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http = Self::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .build()
            .map_err(|e| CtlError::Config(format!("TLS client: {e}")))?;
        Ok(Self::with_http(url, key, http))
    }

    fn builder() -> reqwest::ClientBuilder {
        // Below the broker's default idle keep-alive timeout (10 s), so that a pooled
        // connection is never reused just as the broker closes it.
        reqwest::Client::builder().pool_idle_timeout(std::time::Duration::from_secs(5))
    }

    /// The same broker and connection pool, another key.
    pub fn with_key(&self, key: &str) -> Self {
        Self { key: key.to_owned(), auth: bearer(key), ..self.clone() }
    }

    /// The base URL (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn transport(&self, source: reqwest::Error) -> CtlError {
        CtlError::Transport { url: self.url.clone(), source }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = match &self.base {
            Some(base) => self.http.request(method, joined(base, path)),
            None => self.http.request(method, format!("{}{path}", self.url)),
        };
        match &self.auth {
            Some(auth) => req.header(AUTHORIZATION, auth.clone()),
            None => req.bearer_auth(&self.key),
        }
    }

    /// Sends one request and returns whatever the API answered, error statuses included.
    /// Only a transport failure is an `Err`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, CtlError> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.transport(e))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
    }

    /// The body of a GET as text, whatever the status (for `/metrics` and the like).
    pub async fn text(&self, path: &str) -> Result<String, CtlError> {
        let resp = self.request(Method::GET, path).send().await.map_err(|e| self.transport(e))?;
        resp.text().await.map_err(|e| self.transport(e))
    }

    /// GET; an error status is an `Err`.
    pub async fn get(&self, path: &str) -> Result<Value, CtlError> {
        self.call(Method::GET, path, None).await?.into_result()
    }

    /// POST with a JSON body; an error status is an `Err`.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, CtlError> {
        self.call(Method::POST, path, Some(&body)).await?.into_result()
    }

    /// DELETE; an error status is an `Err`.
    pub async fn delete(&self, path: &str) -> Result<Value, CtlError> {
        self.call(Method::DELETE, path, None).await?.into_result()
    }

    /// A job's output as it is produced, chunk by chunk, until the job ends. An error
    /// answer (unknown job, wrong key) is an `Err` before any chunk.
    pub async fn output_stream(
        &self,
        job_id: &str,
    ) -> Result<impl futures::Stream<Item = Result<bytes::Bytes, CtlError>> + use<>, CtlError> {
        use futures::StreamExt;
        let resp = self
            .request(Method::GET, &format!("/v1/jobs/{job_id}/output"))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = resp.text().await.map_err(|e| self.transport(e))?;
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            return Err(Answer { status, body }
                .into_result()
                .err()
                .unwrap_or_else(|| CtlError::Config(format!("unexpected status {status}"))));
        }
        let url = self.url.clone();
        Ok(resp
            .bytes_stream()
            .map(move |c| c.map_err(|source| CtlError::Transport { url: url.clone(), source })))
    }

    /// Streams a job's output to `out` until the job ends.
    pub async fn stream_output(
        &self,
        job_id: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<(), CtlError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut chunks = std::pin::pin!(self.output_stream(job_id).await?);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            // A closed stdout (`runnelctl jobs output … | head`) ends the stream quietly.
            if out.write_all(&chunk).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_on_the_parsed_base_is_the_url_parsing_base_and_path_gives() {
        let bases =
            ["http://127.0.0.1:7480", "https://broker.example:443", "http://[::1]:80/runnel"];
        let paths = [
            "/v1/jobs",
            "/v1/jobs?owner=alice&limit=10",
            "/v1/jobs/job-0123abcd/output",
            "/v1/runners/a b",
            "/v1/jobs/x%2Fy",
            "/v1/../v1/jobs",
            "/v1/jobs?before=job-1&owner=a%20b",
            "/v1/tenants/ünï/keys",
        ];
        for base in bases {
            let parsed = reqwest::Url::parse(base).expect("base");
            for path in paths {
                let whole = reqwest::Url::parse(&format!("{base}{path}")).expect("whole");
                assert_eq!(joined(&parsed, path), whole, "{base} + {path}");
            }
        }
    }

    #[test]
    fn the_key_header_is_sensitive_and_a_bad_url_fails_as_a_transport_error() {
        let c = Client::new("http://127.0.0.1:1/", "rnl_x_y");
        assert_eq!(c.url(), "http://127.0.0.1:1");
        let auth = c.auth.as_ref().expect("a header");
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().ok(), Some("Bearer rnl_x_y"));
        let other = c.with_key("rnl_a_b");
        assert_eq!(other.auth.as_ref().and_then(|a| a.to_str().ok()), Some("Bearer rnl_a_b"));
        assert!(other.base.is_some());

        let bad = Client::new("not a url", "k");
        assert!(bad.base.is_none());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let err = rt.block_on(bad.call(Method::GET, "/v1/jobs", None)).expect_err("no URL");
        assert!(matches!(err, CtlError::Transport { .. }), "{err}");
    }
}
