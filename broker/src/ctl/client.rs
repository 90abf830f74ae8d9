//! A small blocking-free HTTP client for the API with one-line errors.

use serde_json::Value;

/// A failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API answered with an error object.
    #[error("{code} ({status}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The broker could not be reached.
    #[error("cannot reach {url}: {source}")]
    Transport {
        /// Base URL.
        url: String,
        /// Cause.
        source: reqwest::Error,
    },
    /// Configuration is missing or wrong.
    #[error("{0}")]
    Config(String),
}

/// An API client.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for `url` with `key`.
    pub fn new(url: &str, key: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    fn transport(&self, source: reqwest::Error) -> CtlError {
        CtlError::Transport { url: self.url.clone(), source }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, CtlError> {
        let resp = req.bearer_auth(&self.key).send().await.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.transport(e))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let err = &v["error"];
            return Err(CtlError::Api {
                status,
                code: err["code"].as_str().unwrap_or("error").to_owned(),
                message: err["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string()),
            });
        }
        Ok(v)
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Value, CtlError> {
        self.send(self.http.get(format!("{}{path}", self.url))).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, CtlError> {
        self.send(self.http.post(format!("{}{path}", self.url)).json(&body)).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<Value, CtlError> {
        self.send(self.http.delete(format!("{}{path}", self.url))).await
    }

    /// Streams a job's output to `out` until the job ends.
    pub async fn stream_output(
        &self,
        job_id: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<(), CtlError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let resp = self
            .http
            .get(format!("{}/v1/jobs/{job_id}/output", self.url))
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(CtlError::Api {
                status,
                code: v["error"]["code"].as_str().unwrap_or("error").to_owned(),
                message: v["error"]["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.transport(e))?;
            let _ = out.write_all(&chunk).await;
            let _ = out.flush().await;
        }
        Ok(())
    }
}
