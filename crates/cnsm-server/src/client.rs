//! A small HTTP/1.1 client for this API (hyper's connection API, one connection per
//! request), with a reader for watch streams (Server-Sent Events).
//!
//! `cnsmctl --server` and the tests use it. It speaks `http://host:port`, and
//! `https://host:port` once given the certificates to trust ([`Client::with_tls`], from
//! [`crate::tls::client_config`]); system roots are not used.
//!
//! ```no_run
//! # async fn run() -> Result<(), cnsm_server::client::ClientError> {
//! let client = cnsm_server::client::Client::new("http://127.0.0.1:8080")?;
//! let response = client.get("/health/livez").await?;
//! assert_eq!(response.status, 200);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long a request (not a stream) may take before the client gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not `http(s)://host[:port]`, or it is https and no TLS configuration was
    /// given.
    #[error("invalid server URL '{url}': {reason}")]
    Url { url: String, reason: String },
    /// No TCP connection (nothing listens there).
    #[error("cannot reach the server at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The connection broke before a complete answer.
    #[error("the connection to {url} failed: {reason}")]
    Http { url: String, reason: String },
    /// No answer within [`REQUEST_TIMEOUT`].
    #[error("the server at {url} did not answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout { url: String },
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    host: String,
    port: u16,
    authority: String,
    token: Option<BearerToken>,
    https: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A bearer token that never prints.
#[derive(Clone)]
struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl Client {
    /// A client for `http://host[:port][/]` or `https://host[:port][/]` (an https client
    /// needs [`Client::with_tls`] before its first request).
    pub fn new(url: &str) -> Result<Client, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("it must start with http:// or https://"));
        };
        let scheme = if https { "https" } else { "http" };
        let default_port = if https { 443 } else { 80 };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            return Err(bad(&format!("expected {scheme}://HOST:PORT with no path")));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                match port.parse::<u16>() {
                    Ok(port) => (host, port),
                    Err(_) if authority.starts_with('[') && authority.ends_with(']') => {
                        (authority, default_port)
                    }
                    Err(_) => return Err(bad("the port is not a number")),
                }
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        Ok(Client {
            url: format!("{scheme}://{authority}"),
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            token: None,
            https,
            tls: None,
        })
    }

    /// Trusts the server certificates `config` trusts (see [`crate::tls::client_config`]);
    /// used by `https://` URLs only.
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Client {
        self.tls = Some(config);
        self
    }

    /// True for an `https://` URL.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// Sends `Authorization: Bearer <token>` with every request (unless a request sets its
    /// own `Authorization`).
    pub fn with_bearer_token(mut self, token: &str) -> Client {
        self.token = Some(BearerToken(token.to_owned()));
        self
    }

    /// The base URL, `http://host:port` or `https://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let body = Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed();
        self.open_body(method, path, headers, body).await
    }

    async fn open_body(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: RequestBody,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let http_error = |reason: String| ClientError::Http {
            url: self.url.clone(),
            reason,
        };
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ClientError::Connect {
                url: self.url.clone(),
                reason: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let mut sender = if self.https {
            let Some(config) = &self.tls else {
                return Err(ClientError::Url {
                    url: self.url.clone(),
                    reason: "https needs the certificate of the server's CA (or its \
                             self-signed certificate) to trust: pass --ca-cert FILE"
                        .into(),
                });
            };
            let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                ClientError::Url {
                    url: self.url.clone(),
                    reason: format!("the host is not a valid TLS server name: {e}"),
                }
            })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                .connect(name, stream)
                .await
                .map_err(|e| ClientError::Connect {
                    url: self.url.clone(),
                    reason: format!("TLS handshake failed: {e}"),
                })?;
            handshake(tls).await
        } else {
            handshake(stream).await
        }
        .map_err(|e| http_error(e.to_string()))?;
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.authority.as_str());
        if let Some(BearerToken(token)) = &self.token
            && !headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        {
            // The value is not echoed in the error: it would contain the token.
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| http_error("the bearer token is not valid header text".into()))?;
            request = request.header(hyper::header::AUTHORIZATION, value);
        }
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| http_error(format!("bad header name {name}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| http_error(format!("bad value of header {name}")))?;
            request = request.header(name, value);
        }
        let request = request.body(body).map_err(|e| http_error(e.to_string()))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| http_error(e.to_string()))
    }

    /// Sends a request and reads the whole answer.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<ClientResponse, ClientError> {
        let exchange = async {
            let response = self.open(method, path, headers, body).await?;
            let status = response.status().as_u16();
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| ClientError::Http {
                url: self.url.clone(),
                reason: e.to_string(),
            })?;
            Ok(ClientResponse {
                status,
                headers: parts.headers,
                body: body.to_bytes().to_vec(),
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.url.clone(),
            })?
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<ClientResponse, ClientError> {
        self.request("GET", path, &[], Vec::new()).await
    }

    /// `POST path` with a JSON body and extra headers.
    pub async fn post_json(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        headers: &[(&str, &str)],
    ) -> Result<ClientResponse, ClientError> {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Http {
            url: self.url.clone(),
            reason: format!("cannot encode the body: {e}"),
        })?;
        self.request("POST", path, &all, bytes).await
    }

    /// Opens a watch stream. A non-2xx answer comes back whole as `Err(Ok(response))`.
    pub async fn stream(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Result<EventStream, ClientResponse>, ClientError> {
        let mut all = vec![("accept", "text/event-stream")];
        all.extend_from_slice(headers);
        let response =
            tokio::time::timeout(REQUEST_TIMEOUT, self.open("GET", path, &all, Vec::new()))
                .await
                .map_err(|_| ClientError::Timeout {
                    url: self.url.clone(),
                })??;
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        if !(200..300).contains(&status) {
            let body = body.collect().await.map_err(|e| ClientError::Http {
                url: self.url.clone(),
                reason: e.to_string(),
            })?;
            return Ok(Err(ClientResponse {
                status,
                headers: parts.headers,
                body: body.to_bytes().to_vec(),
            }));
        }
        Ok(Ok(EventStream {
            url: self.url.clone(),
            body,
            buffer: Vec::new(),
            done: false,
        }))
    }
}

impl Client {
    /// Sends a request and writes a 2xx answer's body to `dest` as it arrives (no whole-body
    /// buffer, no overall deadline: only [`REQUEST_TIMEOUT`] of silence fails it). Returns the
    /// bytes written; a non-2xx answer comes back whole as `Err(Ok(response))`.
    pub async fn download(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        dest: &mut (dyn std::io::Write + Send),
    ) -> Result<Result<u64, ClientResponse>, ClientError> {
        use http_body_util::BodyExt as _;
        let response = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.open(method, path, headers, Vec::new()),
        )
        .await
        .map_err(|_| ClientError::Timeout {
            url: self.url.clone(),
        })??;
        let status = response.status().as_u16();
        let (parts, mut body) = response.into_parts();
        let http = |reason: String| ClientError::Http {
            url: self.url.clone(),
            reason,
        };
        if !(200..300).contains(&status) {
            let body = body.collect().await.map_err(|e| http(e.to_string()))?;
            return Ok(Err(ClientResponse {
                status,
                headers: parts.headers,
                body: body.to_bytes().to_vec(),
            }));
        }
        let mut written = 0u64;
        loop {
            let frame = tokio::time::timeout(REQUEST_TIMEOUT, body.frame())
                .await
                .map_err(|_| ClientError::Timeout {
                    url: self.url.clone(),
                })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| http(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                dest.write_all(&data)
                    .map_err(|e| http(format!("cannot write the download: {e}")))?;
                written += data.len() as u64;
            }
        }
        Ok(Ok(written))
    }
}

/// A request body: whole bytes, or chunks read from a file as they are sent.
type RequestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Bytes an upload reads per chunk.
const UPLOAD_CHUNK_LEN: usize = 256 * 1024;

impl Client {
    /// Sends a request whose body is read from `body` as it is sent (a bounded number of
    /// chunks in flight, never the whole body in memory) and reads the whole answer. Like
    /// [`Client::download`], only silence fails it: no overall deadline.
    pub async fn upload(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        mut body: impl std::io::Read + Send + 'static,
    ) -> Result<ClientResponse, ClientError> {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let reading = tokio::task::spawn_blocking(move || {
            loop {
                let mut chunk = vec![0u8; UPLOAD_CHUNK_LEN];
                let n = match body.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = sender.blocking_send(Err(e));
                        return;
                    }
                };
                chunk.truncate(n);
                if sender.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                    return;
                }
            }
        });
        let frames = futures_util::stream::poll_fn(move |cx| {
            receiver
                .poll_recv(cx)
                .map(|chunk| chunk.map(|chunk| chunk.map(hyper::body::Frame::data)))
        });
        let request_body = http_body_util::StreamBody::new(frames).boxed();
        let response = self.open_body(method, path, headers, request_body).await;
        // The reader ends on its own once the body (its receiver) is gone.
        drop(reading);
        let response = response?;
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, body.collect())
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.url.clone(),
            })?
            .map_err(|e| ClientError::Http {
                url: self.url.clone(),
                reason: e.to_string(),
            })?;
        Ok(ClientResponse {
            status,
            headers: parts.headers,
            body: body.to_bytes().to_vec(),
        })
    }
}

/// Starts HTTP/1.1 on `io`; the connection runs in its own task.
async fn handshake<T>(
    io: T,
) -> Result<hyper::client::conn::http1::SendRequest<RequestBody>, hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `message` when the server named none.
    pub event: String,
    /// The `id:` field, when the event had one.
    pub id: Option<String>,
    /// The data lines, joined by `\n`.
    pub data: String,
}

/// Reads Server-Sent Events from an open stream.
#[derive(Debug)]
pub struct EventStream {
    url: String,
    body: Incoming,
    buffer: Vec<u8>,
    done: bool,
}

impl EventStream {
    /// The next event; `None` when the server ended the stream. Comments (keep-alives) are
    /// skipped.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>, ClientError> {
        loop {
            if let Some(event) = self.take_event() {
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => {
                    return Err(ClientError::Http {
                        url: self.url.clone(),
                        reason: e.to_string(),
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer
                            .extend(data.iter().copied().filter(|&b| b != b'\r'));
                    }
                }
            }
        }
    }

    /// Parses one complete event (up to a blank line) out of the buffer.
    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut event = SseEvent::default();
            let mut data_lines = Vec::new();
            let mut any = false;
            for line in text.lines() {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event.event = value.to_owned(),
                    "id" => event.id = Some(value.to_owned()),
                    "data" => data_lines.push(value.to_owned()),
                    _ => continue,
                }
                any = true;
            }
            if any {
                if event.event.is_empty() {
                    event.event = "message".into();
                }
                event.data = data_lines.join("\n");
                return Some(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = Client::new("http://127.0.0.1:8080/").expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
        let c = Client::new("http://localhost").expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("localhost", 80));
        let c = Client::new("http://[::1]:9000").expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("::1", 9000));
        let c = Client::new("https://localhost").expect("valid");
        assert_eq!((c.host.as_str(), c.port, c.https), ("localhost", 443, true));
        assert_eq!(c.url(), "https://localhost");
        for bad in [
            "127.0.0.1:8080",
            "ftp://x:1",
            "https://",
            "http://",
            "http://h:x",
            "http://h:1/api",
        ] {
            assert!(Client::new(bad).is_err(), "{bad}");
        }
    }
}
