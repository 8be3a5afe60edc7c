//! HTTP: requests prepared once at load time ([`Prepared`]), each virtual user's own
//! keep-alive connections ([`Session`]), sending, and classifying failures into [`Reason`]s.
//!
//! The engine is hyper's low-level HTTP/1.1 client (`hyper::client::conn::http1`), one
//! connection per user and origin, with no pool: a user has one request in flight at a time, so
//! a pool's locking, its idle bookkeeping and reqwest's layers (proxy lookup, redirect policy,
//! URL re-parsing, per-request header merging) would be pure overhead on the hot path
//! (measured with bench/bench.py against nginx: reqwest 15.7 µs of CPU per request, this
//! engine 8.0 µs).
//! TLS is rustls (ring provider) with one `ClientConfig` shared by every connection.

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HOST, HeaderMap, HeaderValue, USER_AGENT};
use hyper::{Method, Uri};
use hyper_util::rt::TokioIo;
use url::Url;

use crate::scenario::api::{RequestSpec, Target};
use crate::stats::Reason;

/// Where connections go: scheme, host and port. Requests to the same origin share a user's
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

/// A request ready to send: everything that can be computed once is computed here.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub method: Method,
    pub origin: Arc<Origin>,
    /// Origin-form request target (`/path?query`).
    pub uri: Uri,
    /// Headers as sent, `Host` and `User-Agent` included.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub timeout: Option<Duration>,
}

/// The URL a request goes to: `host` + path (+ query), or its absolute `url` (+ query).
pub fn request_url(host: Option<&Url>, spec: &RequestSpec) -> Result<Url> {
    let mut url = match &spec.target {
        Target::Url(u) => Url::parse(u).with_context(|| format!("bad url {u:?}"))?,
        Target::Path(p) => {
            let host = host.context("no host: pass --host URL or set `host` in the scenario")?;
            // Join by text, as Locust does, so a host with a base path keeps it.
            let base = host.as_str().trim_end_matches('/');
            Url::parse(&format!("{base}{p}")).with_context(|| format!("bad path {p:?}"))?
        }
    };
    if !spec.query.is_empty() {
        url.query_pairs_mut().extend_pairs(&spec.query);
    }
    Ok(url)
}

static USER_AGENT_VALUE: HeaderValue = HeaderValue::from_static(concat!("stormlight/", env!("CARGO_PKG_VERSION")));

impl Prepared {
    /// Builds the request once: URL parsed, headers checked, body encoded.
    pub fn new(host: Option<&Url>, spec: &RequestSpec) -> Result<Self> {
        let url = request_url(host, spec)?;
        let https = match url.scheme() {
            "http" => false,
            "https" => true,
            other => bail!("unsupported scheme {other:?} in {url}"),
        };
        let host_str = url.host_str().context("URL without a host")?.to_string();
        let port = url.port_or_known_default().context("URL without a port")?;
        let mut target = url.path().to_string();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let uri: Uri = target
            .parse()
            .with_context(|| format!("bad request target {target:?}"))?;
        let mut headers = spec.headers.clone();
        if !headers.contains_key(HOST) {
            let authority = match url.port() {
                Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
                None => url.host_str().unwrap_or_default().to_string(),
            };
            headers.insert(HOST, HeaderValue::from_str(&authority).context("bad host header")?);
        }
        if !headers.contains_key(USER_AGENT) {
            headers.insert(USER_AGENT, USER_AGENT_VALUE.clone());
        }
        // Bare `[::1]` style hosts come back from url with brackets; sockets want them without.
        let host_str = host_str.trim_start_matches('[').trim_end_matches(']').to_string();
        Ok(Self {
            method: spec.method.clone(),
            origin: Arc::new(Origin {
                https,
                host: host_str,
                port,
            }),
            uri,
            headers,
            body: spec.body.clone().unwrap_or_default(),
            timeout: spec.timeout,
        })
    }

    fn to_request(&self) -> hyper::Request<Full<Bytes>> {
        let mut req = hyper::Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// What a worker's users share: timeouts and the TLS configuration.
#[derive(Clone)]
pub struct Client {
    timeout: Duration,
    connect_timeout: Duration,
}

impl Client {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            connect_timeout: timeout.min(Duration::from_secs(10)),
        }
    }
}

/// One TLS configuration for the whole process: rustls with ring and the system's roots.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = rustls_platform_verifier::Verifier::new(provider.clone()).map_err(|e| e.to_string())?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// A virtual user's open connections, one per origin it has talked to.
#[derive(Default)]
pub struct Session {
    conns: Vec<(Arc<Origin>, http1::SendRequest<Full<Bytes>>)>,
}

/// What came back, for the verdict and for `after_response`.
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    /// The body, kept only when asked for; otherwise read and dropped frame by frame.
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Client {
    /// Sends a request on the user's connection to its origin (opening one if needed) and reads
    /// the whole body. `Err` carries the elapsed time and the failure's class.
    pub async fn send(
        &self,
        session: &mut Session,
        req: &Prepared,
        keep_body: bool,
    ) -> Result<Response, (Duration, Reason)> {
        let start = Instant::now();
        let timeout = req.timeout.unwrap_or(self.timeout);
        match tokio::time::timeout(timeout, self.exchange(session, req, keep_body)).await {
            Ok(Ok((status, headers, body))) => Ok(Response {
                status,
                headers,
                body,
                elapsed: start.elapsed(),
            }),
            Ok(Err(reason)) => Err((start.elapsed(), reason)),
            Err(_) => {
                // The connection may be mid-response: never reuse it.
                session.conns.retain(|(o, _)| *o != req.origin);
                Err((start.elapsed(), Reason::Timeout))
            }
        }
    }

    async fn exchange(
        &self,
        session: &mut Session,
        req: &Prepared,
        keep_body: bool,
    ) -> Result<(u16, HeaderMap, Bytes), Reason> {
        let idx = match session.conns.iter().position(|(o, _)| *o == req.origin) {
            Some(i) if !session.conns[i].1.is_closed() => i,
            found => {
                if let Some(i) = found {
                    session.conns.swap_remove(i);
                }
                let sender = self.connect(&req.origin).await?;
                session.conns.push((req.origin.clone(), sender));
                session.conns.len() - 1
            }
        };
        let sender = &mut session.conns[idx].1;
        let result = async {
            sender.ready().await.map_err(|e| classify(&e))?;
            let resp = sender.send_request(req.to_request()).await.map_err(|e| classify(&e))?;
            let status = resp.status().as_u16();
            let (parts, mut body) = resp.into_parts();
            if keep_body {
                let bytes = body.collect().await.map_err(|e| classify(&e))?.to_bytes();
                Ok((status, parts.headers, bytes))
            } else {
                while let Some(frame) = body.frame().await {
                    frame.map_err(|e| classify(&e))?;
                }
                Ok((status, HeaderMap::new(), Bytes::new()))
            }
        }
        .await;
        if result.is_err() {
            session.conns.swap_remove(idx);
        }
        result
    }

    async fn connect(&self, origin: &Origin) -> Result<http1::SendRequest<Full<Bytes>>, Reason> {
        let addr = resolve(origin).await?;
        let tcp = match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => return Err(Reason::ConnectTimeout),
            Ok(Err(e)) => return Err(io_reason(&e).unwrap_or(Reason::Connect)),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        if origin.https {
            let config = tls_config().map_err(|_| Reason::Tls)?;
            let name = rustls::pki_types::ServerName::try_from(origin.host.clone()).map_err(|_| Reason::Tls)?;
            let tls = tokio::time::timeout(
                self.connect_timeout,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| Reason::ConnectTimeout)?
            .map_err(|e| io_reason(&e).unwrap_or(Reason::Tls))?;
            handshake(tls).await
        } else {
            handshake(tcp).await
        }
    }
}

async fn handshake<T>(io: T) -> Result<http1::SendRequest<Full<Bytes>>, Reason>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| classify(&e))?;
    // The connection is driven by a task of its own on this worker's LocalSet; it ends when the
    // user drops its sender or the peer closes.
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn resolve(origin: &Origin) -> Result<SocketAddr, Reason> {
    if let Ok(ip) = origin.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, origin.port));
    }
    match tokio::net::lookup_host((origin.host.as_str(), origin.port)).await {
        Ok(mut addrs) => addrs.next().ok_or(Reason::Dns),
        Err(_) => Err(Reason::Dns),
    }
}

fn io_reason(io: &std::io::Error) -> Option<Reason> {
    use std::io::ErrorKind::*;
    match io.kind() {
        ConnectionRefused => Some(Reason::Refused),
        ConnectionReset | ConnectionAborted | BrokenPipe => Some(Reason::Reset),
        TimedOut => Some(Reason::Timeout),
        UnexpectedEof => Some(Reason::Closed),
        _ => None,
    }
}

/// Puts a hyper error into its class by walking its causes.
pub fn classify(err: &hyper::Error) -> Reason {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(r) = io_reason(io) {
                return r;
            }
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return Reason::Tls;
            }
        }
        source = e.source();
    }
    if err.is_incomplete_message() || err.is_canceled() || err.is_closed() {
        Reason::Closed
    } else if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        Reason::Protocol
    } else if err.is_timeout() {
        Reason::Timeout
    } else if err.is_body_write_aborted() || err.is_user() {
        Reason::Other(err.to_string())
    } else {
        Reason::Body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::api::RequestSpec;

    fn spec(target: Target, query: &[(&str, &str)]) -> RequestSpec {
        RequestSpec {
            method: Method::GET,
            target,
            headers: HeaderMap::new(),
            query: query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: None,
            name: "x".into(),
            weight: 1,
            timeout: None,
        }
    }

    #[test]
    fn paths_join_the_host_and_keep_its_base_path() {
        let host = Url::parse("http://127.0.0.1:8000/api/").unwrap();
        let u = request_url(Some(&host), &spec(Target::Path("/items/7".into()), &[("q", "a b")])).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:8000/api/items/7?q=a+b");
        let u = request_url(Some(&host), &spec(Target::Url("http://[::1]:9/z".into()), &[])).unwrap();
        assert_eq!(u.as_str(), "http://[::1]:9/z");
        assert!(request_url(None, &spec(Target::Path("/x".into()), &[])).is_err());
    }

    #[test]
    fn prepared_requests_carry_origin_form_target_host_and_agent() {
        let host = Url::parse("http://127.0.0.1:8000").unwrap();
        let p = Prepared::new(Some(&host), &spec(Target::Path("/a b".into()), &[("k", "v")])).unwrap();
        assert_eq!(p.uri.to_string(), "/a%20b?k=v");
        assert_eq!(p.headers[HOST], "127.0.0.1:8000");
        assert!(p.headers[USER_AGENT].to_str().unwrap().starts_with("stormlight/"));
        assert_eq!(
            *p.origin,
            Origin {
                https: false,
                host: "127.0.0.1".into(),
                port: 8000
            }
        );
        let p = Prepared::new(None, &spec(Target::Url("https://[::1]/x".into()), &[])).unwrap();
        assert_eq!(
            *p.origin,
            Origin {
                https: true,
                host: "::1".into(),
                port: 443
            }
        );
        assert_eq!(p.headers[HOST], "[::1]");
    }
}
