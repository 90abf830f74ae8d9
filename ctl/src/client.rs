//! The HTTP client of the broker's API: one-line errors for the CLI, raw status and body for
//! tests that check what the API answers.

use reqwest::Method;
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

/// An API client for one base URL and one API key. Cloning is cheap (the connection pool
/// is shared), and [`Client::with_key`] gives a client for another key on the same pool.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for `url` with `key` (plain HTTP; for `https://` see [`Client::pinned`]).
    pub fn new(url: &str, key: &str) -> Self {
        let http = Self::builder().build().unwrap_or_default();
        Self { url: url.trim_end_matches('/').to_owned(), key: key.to_owned(), http }
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
        Ok(Self { url: url.trim_end_matches('/').to_owned(), key: key.to_owned(), http })
    }

    fn builder() -> reqwest::ClientBuilder {
        // Below the broker's default idle keep-alive timeout (10 s), so that a pooled
        // connection is never reused just as the broker closes it.
        reqwest::Client::builder().pool_idle_timeout(std::time::Duration::from_secs(5))
    }

    /// The same broker and connection pool, another key.
    pub fn with_key(&self, key: &str) -> Self {
        Self { url: self.url.clone(), key: key.to_owned(), http: self.http.clone() }
    }

    /// The base URL (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn transport(&self, source: reqwest::Error) -> CtlError {
        CtlError::Transport { url: self.url.clone(), source }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key)
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
