//! A lean HTTP/1.1 load client for the HTTP rows, as `wrk` and `h2load` are lean: one
//! keep-alive connection per dispatcher, owned by it; each request's bytes made once and
//! written with one `write`; the answer read into the connection's own buffer and parsed
//! in place (`httparse`). No pool, no connection task, no per-request URL or header map.
//!
//! Why: on the 2-core machines the bench runs on, the harness shares the cores with the
//! broker, and reqwest (the product's client, `runnelctl`) spent as much CPU per request
//! as the broker did (BENCHMARKS.md), so the HTTP rows measured the two together. A
//! load generator should cost as little as it can; `--http-client reqwest` keeps the old
//! client for comparison.
//!
//! It speaks only what the load needs: answers with `Content-Length` (every JSON answer
//! the broker makes has one; those over 64 KiB are written in pieces with an exact size).
//! Anything else — a chunked answer (the streaming `/output` reads, which the load does
//! not make), a malformed status line, a closed connection — fails the request with a
//! named error kind, and the next request opens a new connection.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most header lines an answer may have.
const MAX_HEADERS: usize = 32;

/// The largest answer (head and body) read before giving up on it: above the broker's
/// largest, a job's 1 MiB of output escaped in JSON (up to 6 bytes a byte).
const MAX_ANSWER: usize = 8 << 20;

/// One request's bytes, made once: `POST {path}` with a JSON body and a bearer key.
pub(crate) fn post_request(host: &str, path: &str, key: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A dispatcher's own keep-alive connection, opened on first use and again after a failure.
pub(crate) struct Http1Conn {
    /// `host:port`, as the broker printed it.
    addr: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// An answer: its status and where its body lies in the connection's buffer.
pub(crate) struct Answer<'a> {
    pub(crate) status: u16,
    pub(crate) body: &'a [u8],
}

impl Http1Conn {
    pub(crate) fn new(addr: String) -> Self {
        Self { addr, stream: None, buf: Vec::with_capacity(8 << 10) }
    }

    /// Sends `request` (from [`post_request`]) and reads its answer. On any failure the
    /// connection is dropped (the next call opens another) and the failure's kind returned.
    pub(crate) async fn send(&mut self, request: &[u8]) -> Result<Answer<'_>, String> {
        match self.exchange(request).await {
            Ok((status, head, len)) => Ok(Answer { status, body: &self.buf[head..head + len] }),
            Err(kind) => {
                self.stream = None;
                Err(kind)
            }
        }
    }

    /// The status, the head's length and the body's.
    async fn exchange(&mut self, request: &[u8]) -> Result<(u16, usize, usize), String> {
        if self.stream.is_none() {
            let s =
                TcpStream::connect(self.addr.as_str()).await.map_err(|_| "connect".to_string())?;
            let _ = s.set_nodelay(true);
            self.stream = Some(s);
        }
        let Some(stream) = self.stream.as_mut() else { return Err("connect".to_string()) };
        stream.write_all(request).await.map_err(|_| "transport".to_string())?;
        self.buf.clear();
        let (status, head, len, close) = loop {
            if self.buf.len() >= MAX_ANSWER {
                return Err("answer_too_large".to_string());
            }
            self.buf.reserve(4096);
            if stream.read_buf(&mut self.buf).await.map_err(|_| "transport".to_string())? == 0 {
                return Err("closed".to_string());
            }
            if let Some(parsed) = parse_head(&self.buf)? {
                break parsed;
            }
        };
        if head + len > MAX_ANSWER {
            return Err("answer_too_large".to_string());
        }
        while self.buf.len() < head + len {
            self.buf.reserve(head + len - self.buf.len());
            if stream.read_buf(&mut self.buf).await.map_err(|_| "transport".to_string())? == 0 {
                return Err("closed".to_string());
            }
        }
        if self.buf.len() > head + len {
            // Nothing was asked for beyond this answer.
            return Err("unasked_bytes".to_string());
        }
        if close {
            // Served, then closed: this answer is good, the connection is not.
            self.stream = None;
        }
        Ok((status, head, len))
    }
}

/// An answer's status, head length, body length and whether the server closes after it;
/// None while the head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, usize, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let head = match answer.parse(buf) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("bad_answer".to_string()),
    };
    let status = answer.code.ok_or("bad_answer")?;
    let (mut len, mut close) = (None, false);
    for h in answer.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked_answer".to_string());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let len: usize = len.ok_or("no_content_length")?;
    Ok(Some((status, head, len, close)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;

    /// A server that reads one request and writes `answer` in two pieces.
    async fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let _ = s.read(&mut req).await.unwrap();
            let (a, b) = answer.split_at(answer.len() / 2);
            s.write_all(a).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            s.write_all(b).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        });
        addr
    }

    #[tokio::test]
    async fn reads_an_answer_that_comes_in_pieces() {
        let addr =
            serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"a\":\"bcd\"}").await;
        let mut c = Http1Conn::new(addr.to_string());
        let req = post_request("h", "/v1/jobs", "k", b"{}");
        let a = c.send(&req).await.unwrap();
        assert_eq!((a.status, a.body), (200, &b"{\"a\":\"bcd\"}"[..]));
    }

    #[tokio::test]
    async fn refuses_chunked_and_lengthless_answers_and_a_short_body() {
        for (answer, kind) in [
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"[..],
                "chunked_answer",
            ),
            (&b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n{}"[..], "no_content_length"),
            (&b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{}"[..], "closed"),
            (&b"garbage\r\n\r\n"[..], "bad_answer"),
        ] {
            let addr = serve_once(answer).await;
            let mut c = Http1Conn::new(addr.to_string());
            let req = post_request("h", "/", "k", b"{}");
            assert_eq!(c.send(&req).await.err().as_deref(), Some(kind));
        }
    }

    #[test]
    fn a_request_is_what_a_server_parses_back() {
        let req = post_request("127.0.0.1:80", "/v1/jobs", "rk_1", b"{\"x\":1}");
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Request::new(&mut headers);
        let head = match r.parse(&req).unwrap() {
            httparse::Status::Complete(h) => h,
            httparse::Status::Partial => panic!("partial"),
        };
        assert_eq!((r.method, r.path), (Some("POST"), Some("/v1/jobs")));
        assert!(r.headers.iter().any(|h| h.name == "authorization" && h.value == b"Bearer rk_1"));
        assert_eq!(&req[head..], b"{\"x\":1}");
    }
}
