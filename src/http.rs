//! HTTP: requests prepared once at load time ([`Prepared`]), each virtual user's own
//! keep-alive connections ([`Session`]), sending, and classifying failures into [`Reason`]s.
//!
//! The engine is a small HTTP/1.1 client on tokio sockets: a request is serialized to its wire
//! bytes once, when the scenario loads, and each send is one write; the response head is
//! parsed in place by `httparse` (hyper's parser) into a stack array, and only the framing
//! headers are looked at, unless `after_response` wants the headers. Each user owns its
//! connections (one per origin) and keeps one request in flight, as wrk's connections do, so
//! there is no pool, no channel and no second task per request.
//!
//! Measured with bench/bench.py against nginx (CPU per request): reqwest 15.7 µs; hyper's
//! own HTTP/1.1 connection API 8.0 µs (a third of it building response `HeaderMap`s and
//! dispatching between tasks); this engine: see the README's "Performance".
//! TLS is rustls (ring provider) with one `ClientConfig` shared by every connection.
//!
//! Credentials in a URL (`http://user:pass@host/`) become a Basic `Authorization` header when
//! the request is prepared, as curl and k6 do; the URL on the wire never carries them, and
//! [`redact`] hides the password wherever a URL is shown.

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::Full;
use hyper::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue, USER_AGENT,
};
use hyper::{Method, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
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
    pub target: Arc<str>,
    /// The `Host` header for this origin (used unless the scenario sets its own).
    pub host_header: HeaderValue,
    /// The request as it goes on the wire: request line, headers (`Host`, `User-Agent` and
    /// `Content-Length` included) and body.
    pub wire: Bytes,
    pub timeout: Option<Duration>,
    /// The scenario's own headers (shared by the requests made from one endpoint) and those a
    /// hook added, and the body: for following a redirect and for HTTP/2.
    headers: Arc<HeaderMap>,
    added: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    /// The absolute URI HTTP/2 needs (`:scheme`, `:authority`, `:path`).
    h2_uri: Uri,
    /// The same, parsed once (without its userinfo): cookies are matched against it and
    /// redirects resolved from it.
    url: Arc<Url>,
    /// `Basic ...` from the URL's userinfo (or the host's), sent unless the scenario sets its
    /// own `Authorization`.
    credentials: Option<HeaderValue>,
}

/// `text` with the password of every URL in it hidden: `http://user:***@host/` (a user alone
/// stays `user@`). Every URL stormlight prints or writes goes through here: row names, the run
/// header, result files, `/metrics`, error messages.
///
/// A URL's authority runs from `://` to the first `/`, `\`, `?`, `#` or white space (as the URL
/// standard reads it), and its userinfo is what comes before the last `@` in it.
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains("://") || !text.contains('@') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (before, after) = rest.split_at(i + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| matches!(c, '/' | '\\' | '?' | '#') || c.is_whitespace())
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// What the user gave as a URL, for an error message about it: [`redact`]ed, also when it lacks
/// its scheme (`user:pass@host:8000` shows as `user:***@host:8000`).
pub fn redact_input(s: &str) -> String {
    if s.contains("://") {
        return redact(s).into_owned();
    }
    let with_scheme = format!("x://{s}");
    redact(&with_scheme)["x://".len()..].to_string()
}

/// Takes the userinfo out of `url` and returns it as a Basic `Authorization` value: user and
/// password percent-decoded, `Basic base64(user:password)` (`user:` without a password).
fn take_credentials(url: &mut Url) -> Option<HeaderValue> {
    use base64::Engine as _;
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let mut pair: Vec<u8> = percent_encoding::percent_decode_str(url.username()).collect();
    pair.push(b':');
    pair.extend(percent_encoding::percent_decode_str(url.password().unwrap_or("")));
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
    let mut value = HeaderValue::from_str(&value).ok()?;
    // Never shown by Debug, never indexed by HTTP/2's header compression.
    value.set_sensitive(true);
    Some(value)
}

/// Where `url` connects: scheme, host (without IPv6 brackets) and port.
fn origin_of(url: &Url) -> Result<Origin> {
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        other => bail!("unsupported scheme {other:?} in {}", redact(url.as_str())),
    };
    let host = url.host_str().context("URL without a host")?;
    let port = url.port_or_known_default().context("URL without a port")?;
    Ok(Origin {
        https,
        // `[::1]` comes back from url with brackets; sockets want the bare address.
        host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
        port,
    })
}

/// The URL a request goes to: `host` + path (+ query), or its absolute `url` (+ query).
pub fn request_url(host: Option<&Url>, spec: &RequestSpec) -> Result<Url> {
    let mut url = match &spec.target {
        Target::Url(u) => Url::parse(u).with_context(|| format!("bad url {:?}", redact_input(u)))?,
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
    // (A redirect's location is not checked here: connecting there fails and is counted.)
    if url.port() == Some(0) {
        bail!("bad url {:?}: port 0 is no server's port", redact(url.as_str()));
    }
    Ok(url)
}

static USER_AGENT_VALUE: HeaderValue = HeaderValue::from_static(concat!("stormlight/", env!("CARGO_PKG_VERSION")));

impl Prepared {
    /// Builds the request once: URL parsed, headers checked, body encoded, bytes laid out.
    /// Credentials in the URL (or in the host it is joined to) become its `Authorization`.
    pub fn new(host: Option<&Url>, spec: &RequestSpec) -> Result<Self> {
        Self::at(request_url(host, spec)?, spec.clone(), None)
    }

    /// The request `spec` describes, sent to `url`; `inherited` credentials apply when the URL
    /// carries none of its own (a redirect within the origin).
    fn at(mut url: Url, spec: RequestSpec, inherited: Option<HeaderValue>) -> Result<Self> {
        let credentials = take_credentials(&mut url).or(inherited);
        let origin = Arc::new(origin_of(&url)?);
        let host_str = url.host_str().context("URL without a host")?;
        let mut target = url.path().to_string();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        target
            .parse::<Uri>()
            .with_context(|| format!("bad request target {target:?}"))?;
        let authority = match url.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str.to_string(),
        };
        let host_header = HeaderValue::from_str(&authority).context("bad host header")?;
        let scheme = if origin.https { "https" } else { "http" };
        let h2_uri = format!("{scheme}://{authority}{target}")
            .parse()
            .context("bad URL for HTTP/2")?;
        Ok(Self::assemble(
            origin,
            Arc::from(target),
            host_header,
            (h2_uri, Arc::new(url)),
            spec,
            credentials,
        ))
    }

    /// The same destination with another method, headers, body or timeout: what a hook that
    /// changed neither the path nor the query sends, without parsing a URL again.
    pub fn with_spec(&self, spec: RequestSpec) -> Self {
        Self::assemble(
            self.origin.clone(),
            self.target.clone(),
            self.host_header.clone(),
            (self.h2_uri.clone(), self.url.clone()),
            spec,
            self.credentials.clone(),
        )
    }

    /// This request with a `Cookie` header added.
    fn with_cookie(&self, cookie: &str) -> Self {
        match HeaderValue::from_str(cookie) {
            Ok(v) => self.with_headers_added(vec![(hyper::header::COOKIE, v)]),
            Err(_) => self.with_headers_added(Vec::new()),
        }
    }

    /// This request with header lines added (headers it does not send already): its bytes
    /// with the lines spliced in before the blank line, not a rebuild.
    pub fn with_headers_added(&self, added: Vec<(HeaderName, HeaderValue)>) -> Self {
        if self.sends_credentials() && added.iter().any(|(n, _)| n == AUTHORIZATION) {
            // A hook's own `Authorization` replaces the URL's credentials: laid out again.
            let mut headers = self.scenario_headers();
            for (name, value) in added {
                let _ = headers.try_append(name, value);
            }
            return self.with_spec(RequestSpec {
                method: self.method.clone(),
                target: Target::Path(String::new()),
                headers,
                query: Vec::new(),
                body: Some(self.body.clone()),
                name: String::new(),
                weight: 1,
                timeout: self.timeout,
            });
        }
        let head_end = self.wire.len() - self.body.len() - 2;
        let extra: usize = added.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
        let mut wire = Vec::with_capacity(self.wire.len() + extra);
        wire.extend_from_slice(&self.wire[..head_end]);
        for (name, value) in &added {
            wire.extend_from_slice(name.as_str().as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(&self.wire[head_end..]);
        // (Usually nothing was added before: the list is kept as it came.)
        let all = if self.added.is_empty() {
            added
        } else {
            let mut all = self.added.clone();
            all.extend(added);
            all
        };
        Self {
            method: self.method.clone(),
            origin: self.origin.clone(),
            target: self.target.clone(),
            host_header: self.host_header.clone(),
            wire: Bytes::from(wire),
            timeout: self.timeout,
            headers: self.headers.clone(),
            added: all,
            body: self.body.clone(),
            h2_uri: self.h2_uri.clone(),
            url: self.url.clone(),
            credentials: self.credentials.clone(),
        }
    }

    /// Whether the URL's credentials go out as this request's `Authorization` (the scenario
    /// sets none of its own).
    fn sends_credentials(&self) -> bool {
        self.credentials.is_some() && !self.sets(&AUTHORIZATION)
    }

    /// The scenario's headers with those a hook added (HTTP/2 and redirects only: HTTP/1.1
    /// sends the prepared bytes).
    ///
    /// The scenario and its hooks set at most [`MAX_REQUEST_HEADERS`] in all, so the map has
    /// room for every one (and for the few stormlight adds): its fallible inserts never fail.
    ///
    /// [`MAX_REQUEST_HEADERS`]: crate::scenario::api::MAX_REQUEST_HEADERS
    fn scenario_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::clone(&self.headers);
        for (name, value) in &self.added {
            let _ = headers.try_insert(name.clone(), value.clone());
        }
        headers
    }

    /// Whether the scenario sets the header `name` itself.
    fn sets(&self, name: &HeaderName) -> bool {
        self.headers.contains_key(name) || self.added.iter().any(|(n, _)| n == name)
    }

    /// The request a redirect to `location` asks for: GET without a body after 303, and after
    /// 301/302 to a POST (as browsers do); the same method and body otherwise. Credentials (the
    /// URL's, or an `Authorization` header the scenario set) go along within the same origin
    /// only, as curl and browsers do.
    fn redirected(&self, status: u16, location: &str) -> Option<Self> {
        let there = self.url.join(location).ok()?;
        let same_origin = origin_of(&there).is_ok_and(|o| o == *self.origin);
        let to_get = status == 303 || (matches!(status, 301 | 302) && self.method == Method::POST);
        let mut headers = self.scenario_headers();
        headers.remove(HOST);
        if to_get {
            headers.remove(CONTENT_TYPE);
        }
        if !same_origin {
            headers.remove(AUTHORIZATION);
        }
        let spec = RequestSpec {
            method: if to_get { Method::GET } else { self.method.clone() },
            target: Target::Url(there.to_string()),
            headers,
            query: Vec::new(),
            body: if to_get || self.body.is_empty() {
                None
            } else {
                Some(self.body.clone())
            },
            name: String::new(),
            weight: 1,
            timeout: self.timeout,
        };
        let credentials = self.credentials.clone().filter(|_| same_origin);
        Prepared::at(there, spec, credentials).ok()
    }

    fn assemble(
        origin: Arc<Origin>,
        target: Arc<str>,
        host_header: HeaderValue,
        (h2_uri, url): (Uri, Arc<Url>),
        spec: RequestSpec,
        credentials: Option<HeaderValue>,
    ) -> Self {
        use std::io::Write as _;
        let body = spec.body.unwrap_or_default();
        let mut wire = Vec::with_capacity(64 + target.len() + body.len() + spec.headers.len() * 32);
        wire.extend_from_slice(spec.method.as_str().as_bytes());
        wire.push(b' ');
        wire.extend_from_slice(target.as_bytes());
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        let mut line = |name: &str, value: &[u8]| {
            wire.extend_from_slice(name.as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value);
            wire.extend_from_slice(b"\r\n");
        };
        if !spec.headers.contains_key(HOST) {
            line(HOST.as_str(), host_header.as_bytes());
        }
        if !spec.headers.contains_key(USER_AGENT) {
            line(USER_AGENT.as_str(), USER_AGENT_VALUE.as_bytes());
        }
        if let Some(c) = &credentials
            && !spec.headers.contains_key(AUTHORIZATION)
        {
            line(AUTHORIZATION.as_str(), c.as_bytes());
        }
        // A body, or a method that usually has one, says how long it is.
        for (name, value) in &spec.headers {
            if name != CONTENT_LENGTH {
                line(name.as_str(), value.as_bytes());
            }
        }
        if !body.is_empty() || matches!(spec.method, Method::POST | Method::PUT | Method::PATCH) {
            let _ = write!(wire, "content-length: {}\r\n", body.len());
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(&body);
        Self {
            method: spec.method,
            origin,
            target,
            host_header,
            wire: Bytes::from(wire),
            timeout: spec.timeout,
            headers: Arc::new(spec.headers),
            added: Vec::new(),
            body,
            h2_uri,
            url,
            credentials,
        }
    }
}

/// What a worker's users share: timeouts and the TLS configuration.
#[derive(Clone)]
pub struct Client {
    timeout: Duration,
    pub limits: Limits,
    /// Shared by every connection; `None` only where no https URL can occur (tests).
    tls: Option<Arc<rustls::ClientConfig>>,
    pub protocol: Protocol,
    /// Per origin, the shortest idle time after which its server was seen closing a
    /// connection; shared by the clones (the worker threads) of a run's client.
    closed_after: Arc<std::sync::Mutex<ClosedAfter>>,
}

/// Per origin, an idle time after which its server closed a connection.
type ClosedAfter = Vec<(Arc<Origin>, Duration)>;

/// Limits of every exchange, overridable from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect_timeout: Duration,
    /// Body bytes read before a response fails with "body too large".
    pub max_body: u64,
    /// The same for a body kept for a script to read (`after_response`, `http.*`): no more
    /// than the script's memory can hold.
    pub max_kept_body: u64,
    /// Redirects followed (one request, counted once); past this, "redirect limit".
    pub max_redirects: u32,
    /// A kept-alive connection idle this long is closed instead of reused.
    pub keepalive_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            max_body: 64 << 20,
            max_kept_body: 64 << 20,
            max_redirects: 10,
            keepalive_idle: Duration::from_secs(4),
        }
    }
}

impl Client {
    pub fn new(timeout: Duration) -> Self {
        Self::with_limits(timeout, Limits::default(), None)
    }

    pub fn with_limits(timeout: Duration, limits: Limits, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            timeout,
            limits,
            tls,
            protocol: Protocol::Auto,
            closed_after: Default::default(),
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Accept any certificate (the handshake's signatures are still checked).
    pub insecure: bool,
    /// Trust only the certificates in this PEM file (instead of the system's roots).
    pub ca_cert: Option<std::path::PathBuf>,
    /// A client certificate (PEM chain) and its key (PEM), for servers that ask for one.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// The TLS configuration of a run, built once and shared by every connection of every user:
/// rustls with ring; the system's roots unless `--ca-cert` or `--insecure` say otherwise.
pub fn tls_config(options: &TlsOptions, protocol: Protocol) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS setup")?;
    let builder = if options.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else if let Some(path) = &options.ca_cert {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(path, "--ca-cert")? {
            roots
                .add(cert)
                .with_context(|| format!("--ca-cert {}: unusable certificate", path.display()))?;
        }
        builder.with_root_certificates(roots)
    } else {
        let verifier = rustls_platform_verifier::Verifier::new(provider).context("loading the system's TLS roots")?;
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
    };
    let mut config = match &options.client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert, "--cert")?;
            let pem = crate::files::read(key, &format!("--key {}", key.display()), crate::files::PEM_MAX)?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
                .with_context(|| format!("--key {}: no PEM private key read", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("--cert and --key do not make a usable pair")?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::Auto | Protocol::Http2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(Arc::new(config))
}

/// The certificates of a PEM file (at least one; a file of at most [`crate::files::PEM_MAX`]
/// bytes).
fn read_certs(path: &std::path::Path, flag: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let pem = crate::files::read(path, &format!("{flag} {}", path.display()), crate::files::PEM_MAX)?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} {}: not a PEM certificate", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no certificate in the file", path.display());
    }
    Ok(certs)
}

/// `--insecure`: any certificate for any name is accepted; the handshake signatures are still
/// verified, so the session is encrypted with whoever answered.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The class of a failed TLS handshake.
fn tls_reason(e: &std::io::Error) -> Reason {
    use rustls::CertificateError::*;
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return io_reason(e).unwrap_or(Reason::Tls("handshake failed"));
    };
    Reason::Tls(match tls {
        rustls::Error::InvalidCertificate(UnknownIssuer) => "unknown issuer",
        rustls::Error::InvalidCertificate(Expired | ExpiredContext { .. }) => "certificate expired",
        rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. }) => "name mismatch",
        rustls::Error::InvalidCertificate(_) => "invalid certificate",
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => "certificate required",
        rustls::Error::AlertReceived(_) => "alert from the server",
        _ => "handshake failed",
    })
}

/// A connection's byte stream: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An HTTP/1.1 connection: the byte stream and its read buffer.
struct H1 {
    stream: Stream,
    buf: BytesMut,
    /// Whether any byte of a response has arrived since the current request was written.
    answered: bool,
    /// How long the server said it keeps an idle connection (`Keep-Alive: timeout=N`).
    advertised: Option<Duration>,
}

/// What a connection speaks.
enum Link {
    H1(H1),
    /// HTTP/2 through hyper's client connection (ALPN `h2`, or prior knowledge with `--http2`).
    H2(H2),
}

/// One keep-alive connection of a user.
struct Conn {
    origin: Arc<Origin>,
    link: Link,
    /// When the last exchange ended: a connection idle for a while is checked before reuse.
    idle_since: Instant,
}

/// An HTTP/2 connection: the request handle, and why the connection's task ended (the handle
/// itself only learns that it is closed).
struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    ended: Arc<std::sync::Mutex<Option<Reason>>>,
}

/// Which HTTP versions a run may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/2 where TLS negotiates it (ALPN), HTTP/1.1 otherwise.
    #[default]
    Auto,
    /// HTTP/1.1 only (`--http1`).
    Http1,
    /// HTTP/2 also on plain http, by prior knowledge (`--http2`, h2c).
    Http2,
}

/// A connection idle for longer than this is checked for a close from the server before it
/// carries a request (one non-blocking read). Back-to-back requests skip the check.
const CHECK_AFTER_IDLE: Duration = Duration::from_millis(50);

/// Whether a kept-alive connection may carry the next request.
enum Idle {
    Usable,
    /// Idle for as long as it may be (see [`Client::keep_for`]): closed by us.
    Expired,
    /// Closed (or broken) by the server while idle, after this long.
    ClosedByServer(Duration),
}

impl Conn {
    /// Whether this connection may carry another request. One idle for `keep_for` or longer
    /// is not used again: the server may be closing it just as the request goes out, a failure
    /// the tool itself would have caused. One the server has closed is noticed before use.
    fn idle(&self, keep_for: Duration) -> Idle {
        let idle = self.idle_since.elapsed();
        if idle < CHECK_AFTER_IDLE {
            return Idle::Usable;
        }
        if idle >= keep_for {
            return Idle::Expired;
        }
        let closed = Idle::ClosedByServer(idle);
        let tcp = match (&self.link, self.tcp()) {
            (Link::H2(h2), _) if h2.sender.is_closed() => return closed,
            (_, Some(tcp)) => tcp,
            _ => return Idle::Usable,
        };
        let mut probe = [0u8; 1];
        // WouldBlock: open and quiet. 0 bytes: closed. Data or an error: unusable either way.
        match tcp.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Idle::Usable,
            _ => closed,
        }
    }

    /// Closes a connection we will not use again with a reset rather than a FIN: the closing
    /// side keeps its port in TIME_WAIT for a minute, and a run that replaces idle connections
    /// at thousands a second would run out of ports.
    fn abandon(self) {
        if let Some(tcp) = self.tcp() {
            let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        }
    }

    /// The TCP socket under an HTTP/1.1 connection (HTTP/2's belongs to its task).
    fn tcp(&self) -> Option<&TcpStream> {
        match &self.link {
            Link::H1(H1 {
                stream: Stream::Plain(tcp),
                ..
            }) => Some(tcp),
            Link::H1(H1 {
                stream: Stream::Tls(tls),
                ..
            }) => Some(tls.get_ref().0),
            Link::H2(_) => None,
        }
    }
}

/// Response heads larger than this are a protocol error.
const MAX_HEAD: usize = 64 * 1024;
/// Headers per response head that are parsed.
const MAX_HEADERS: usize = 100;

/// A virtual user's open connections, one per origin it has talked to.
#[derive(Default)]
pub struct Session {
    conns: Vec<Conn>,
    /// The user's cookies (RFC 6265 matching), made when the first one arrives.
    cookies: Option<Box<cookie_store::CookieStore>>,
}

impl Session {
    /// The `Cookie` header the user sends with `req`, if its jar has any for it (and the
    /// scenario does not set its own).
    fn cookie_header(&self, req: &Prepared) -> Option<String> {
        let jar = self.cookies.as_ref()?;
        if req.sets(&hyper::header::COOKIE) {
            return None;
        }
        let pairs: Vec<String> = jar
            .get_request_values(&req.url)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    /// Keeps the cookies a response to `req` set, within the jar's caps: a cookie larger than
    /// [`COOKIE_BYTES`] is ignored (as browsers do), and so is a new one past
    /// [`JAR_COOKIES`] or [`JAR_BYTES`] (the jar keeps what it has; a cookie it holds is still
    /// updated or removed).
    fn store_cookies(&mut self, req: &Prepared, set_cookies: &[String]) {
        let jar = self.cookies.get_or_insert_with(Default::default);
        for text in set_cookies {
            let Ok(raw) = cookie_store::RawCookie::parse(text.as_str()) else {
                continue;
            };
            let size = raw.name().len() + raw.value().len();
            if size > COOKIE_BYTES {
                continue;
            }
            let Ok(cookie) = cookie_store::Cookie::try_from_raw_cookie(&raw, &req.url) else {
                continue;
            };
            if cookie.is_expired() || has_room(jar, &cookie, size) {
                let _ = jar.insert(cookie.into_owned(), &req.url);
            }
        }
    }
}

/// The most cookies a user's jar holds.
const JAR_COOKIES: usize = 200;
/// The largest cookie kept, its name and value together: browsers' 4 KiB (RFC 6265 §6.1).
const COOKIE_BYTES: usize = 4 << 10;
/// The most bytes of cookie names and values a user's jar holds: a request's `Cookie` header
/// stays within this (and its `; ` separators).
const JAR_BYTES: usize = 64 << 10;

/// Whether `jar` has room for `cookie` (`size` bytes of name and value): in place of the one
/// of the same domain, path and name it holds, or as one more. Expired cookies it still holds
/// are dropped to make room.
fn has_room(jar: &mut cookie_store::CookieStore, cookie: &cookie_store::Cookie<'_>, size: usize) -> bool {
    let domain = String::from(&cookie.domain);
    let fits = |jar: &cookie_store::CookieStore| {
        let (count, bytes) = jar
            .iter_any()
            .fold((0, 0), |(n, b), c| (n + 1, b + c.name().len() + c.value().len()));
        match jar.get_any(&domain, &cookie.path, cookie.name()) {
            Some(old) => bytes - (old.name().len() + old.value().len()) + size <= JAR_BYTES,
            None => count < JAR_COOKIES && bytes + size <= JAR_BYTES,
        }
    };
    if fits(jar) {
        return true;
    }
    let expired: Vec<(String, String, String)> = jar
        .iter_any()
        .filter(|c| c.is_expired())
        .map(|c| (String::from(&c.domain), String::from(&c.path), c.name().to_string()))
        .collect();
    for (domain, path, name) in &expired {
        jar.remove(domain, path, name);
    }
    !expired.is_empty() && fits(jar)
}

/// What came back, for the verdict and for `after_response`.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Whether it came over HTTP/2.
    pub h2: bool,
    /// Body bytes read (kept or not).
    pub bytes: u64,
    /// Filled only when the body is kept (for `after_response`).
    pub headers: HeaderMap,
    /// The body, kept only when asked for; otherwise counted and dropped.
    pub body: Bytes,
    pub elapsed: Duration,
    /// `Set-Cookie` values, for the user's cookie jar.
    pub set_cookies: Vec<String>,
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// How the body of a response is delimited.
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
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
        // The clock is read once here and once when the response is in (a read is ~100
        // instructions, a fair share of a request's own work).
        let start = Instant::now();
        let timeout = req.timeout.unwrap_or(self.timeout);
        let deadline = start
            .checked_add(timeout)
            .unwrap_or_else(|| start + Duration::from_secs(365 * 86_400));
        let mut hop = None;
        for _ in 0..=self.limits.max_redirects {
            let current = hop.as_deref().unwrap_or(req);
            // (A redirect's hop reads the clock again: its connection's idle time counts from now.)
            let now = if hop.is_none() { start } else { Instant::now() };
            let (resp, location, end) = self
                .send_once(session, current, keep_body, now, deadline)
                .await
                .map_err(|r| (start.elapsed(), r))?;
            let next = match location {
                Some(location) if self.limits.max_redirects > 0 && is_redirect(resp.status) => {
                    current.redirected(resp.status, &location)
                }
                _ => None,
            };
            match next {
                // Boxed: the pending future of every user carries this slot.
                Some(next) => hop = Some(Box::new(next)),
                None => {
                    return Ok(Response {
                        elapsed: end.saturating_duration_since(start),
                        ..resp
                    });
                }
            }
        }
        Err((start.elapsed(), Reason::RedirectLimit))
    }

    /// How long a kept-alive connection of `origin` may sit idle and still be used: the least
    /// of `--keepalive-idle`, three quarters of what the server advertised, and three quarters
    /// of the shortest idle time after which this worker saw the server close a connection.
    fn keep_for(&self, conn: &Conn) -> Duration {
        let mut keep = self.limits.keepalive_idle;
        if let Link::H1(H1 {
            advertised: Some(t), ..
        }) = &conn.link
        {
            keep = keep.min(*t * 3 / 4);
        }
        if let Ok(seen) = self.closed_after.lock()
            && let Some((_, after)) = seen.iter().find(|(o, _)| *o == conn.origin)
        {
            keep = keep.min(*after * 3 / 4);
        }
        keep
    }

    /// Remembers that the server of `origin` closed a connection idle for `idle` (or that a
    /// request on one failed before any answer): connections of that origin are then not kept
    /// idle that long again.
    fn learn(&self, origin: &Arc<Origin>, idle: Duration) {
        let Ok(mut seen) = self.closed_after.lock() else { return };
        match seen.iter_mut().find(|(o, _)| o == origin) {
            Some((_, least)) => *least = (*least).min(idle),
            None => seen.push((origin.clone(), idle)),
        }
    }

    /// One exchange on the user's connection to the request's origin (opened if needed).
    ///
    /// A request is never sent twice: a resent request would hide a real fault and make the
    /// server's count differ from ours. Instead a connection is not reused once it has been idle
    /// for as long as the server may keep it (see [`Client::keep_for`]).
    async fn send_once(
        &self,
        session: &mut Session,
        req: &Prepared,
        keep_body: bool,
        now: Instant,
        deadline: Instant,
    ) -> Result<(Response, Option<String>, Instant), Reason> {
        let deadline_at = tokio::time::Instant::from_std(deadline);
        let mut found = session.conns.iter().position(|c| c.origin == req.origin);
        let idle_for = |conn: &Conn| now.saturating_duration_since(conn.idle_since);
        // Back-to-back requests skip the checks.
        if let Some(i) = found
            && idle_for(&session.conns[i]) >= CHECK_AFTER_IDLE
        {
            match session.conns[i].idle(self.keep_for(&session.conns[i])) {
                Idle::Usable => {}
                Idle::Expired => {
                    session.conns.swap_remove(i).abandon();
                    found = None;
                }
                Idle::ClosedByServer(after) => {
                    self.learn(&req.origin, after);
                    session.conns.swap_remove(i);
                    found = None;
                }
            }
        }
        // A connection that sat idle may have been closed by the server as the request went out.
        let idle = found.map(|i| idle_for(&session.conns[i]));
        let idx = match found {
            Some(i) => i,
            // Boxed, like the HTTP/2 exchange below: every user's task holds its pending future,
            // and inline these rare paths (TLS and HTTP/2 handshakes) would make each user's
            // task several KiB larger for the whole run.
            None => match tokio::time::timeout_at(deadline_at, Box::pin(self.connect(&req.origin))).await {
                Ok(Ok(conn)) => {
                    // Most users talk to one origin: room for one connection, not Vec's four.
                    session.conns.reserve_exact(1);
                    session.conns.push(conn);
                    session.conns.len() - 1
                }
                Ok(Err(reason)) => return Err(reason),
                Err(_) => return Err(Reason::ConnectTimeout),
            },
        };
        let max_body = match keep_body {
            true => self.limits.max_body.min(self.limits.max_kept_body),
            false => self.limits.max_body,
        };
        // The user's cookies for this URL go with it (a request of its own, rarely needed).
        let with_cookies = session.cookie_header(req).map(|c| Box::new(req.with_cookie(&c)));
        let req = with_cookies.as_deref().unwrap_or(req);
        let result = match &mut session.conns[idx].link {
            Link::H1(conn) => tokio::time::timeout_at(deadline_at, exchange(conn, req, keep_body, max_body)).await,
            Link::H2(h2) => {
                tokio::time::timeout_at(deadline_at, Box::pin(exchange_h2(h2, req, keep_body, max_body))).await
            }
        };
        match result {
            Ok(Ok((resp, location, reusable))) => {
                let end = Instant::now();
                if reusable {
                    session.conns[idx].idle_since = end;
                } else {
                    session.conns.swap_remove(idx);
                }
                if !resp.set_cookies.is_empty() {
                    session.store_cookies(req, &resp.set_cookies);
                }
                Ok((resp, location, end))
            }
            Ok(Err(reason)) => {
                let conn = session.conns.swap_remove(idx);
                let unanswered = matches!(conn.link, Link::H1(H1 { answered: false, .. }));
                if let Some(idle) = idle
                    && idle >= CHECK_AFTER_IDLE
                    && unanswered
                    && matches!(reason, Reason::Closed | Reason::Reset)
                {
                    self.learn(&req.origin, idle);
                }
                Err(reason)
            }
            Err(_) => {
                // The connection may be mid-response: never reuse it.
                session.conns.swap_remove(idx);
                Err(Reason::Timeout)
            }
        }
    }

    async fn connect(&self, origin: &Arc<Origin>) -> Result<Conn, Reason> {
        let addr = resolve(origin, self.limits.connect_timeout).await?;
        let tcp = match tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(Reason::ConnectTimeout),
            Ok(Err(e)) => return Err(io_reason(&e).unwrap_or(Reason::Connect)),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let link = if origin.https || self.protocol == Protocol::Http2 {
            // Boxed again: TLS and HTTP/2 handshakes are large futures, and plain connections
            // (most of them, thousands at once at the start) should not each reserve their
            // room. Memory a burst of connects took stays with the process.
            Box::pin(self.upgrade(origin, tcp)).await?
        } else {
            // No read buffer yet: `fill` takes one once the response is there.
            Link::H1(H1 {
                stream: Stream::Plain(tcp),
                buf: BytesMut::new(),
                answered: false,
                advertised: None,
            })
        };
        Ok(Conn {
            origin: origin.clone(),
            link,
            idle_since: Instant::now(),
        })
    }
}

impl Client {
    /// TLS (and HTTP/2 when negotiated), or HTTP/2 by prior knowledge, over a new connection.
    async fn upgrade(&self, origin: &Arc<Origin>, tcp: TcpStream) -> Result<Link, Reason> {
        if !origin.https {
            return Ok(Link::H2(h2_handshake(tcp).await?));
        }
        let config = self.tls.clone().ok_or(Reason::Tls("no TLS configuration"))?;
        let name =
            rustls::pki_types::ServerName::try_from(origin.host.clone()).map_err(|_| Reason::Tls("bad server name"))?;
        let tls = tokio::time::timeout(
            self.limits.connect_timeout,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| Reason::ConnectTimeout)?
        .map_err(|e| tls_reason(&e))?;
        Ok(if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            Link::H2(h2_handshake(tls).await?)
        } else {
            Link::H1(H1 {
                stream: Stream::Tls(Box::new(tls)),
                buf: BytesMut::with_capacity(READ_BUFFER),
                answered: false,
                advertised: None,
            })
        })
    }
}

/// Opens HTTP/2 on a connected stream; the connection's task runs on this worker's runtime.
async fn h2_handshake<T>(io: T) -> Result<H2, Reason>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| h2_reason(&e))?;
    let ended = Arc::new(std::sync::Mutex::new(None));
    let record = ended.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await
            && let Ok(mut slot) = record.lock()
        {
            *slot = Some(h2_reason(&e));
        }
    });
    Ok(H2 { sender, ended })
}

/// One request and its response over HTTP/2.
async fn exchange_h2(
    h2: &mut H2,
    req: &Prepared,
    keep_body: bool,
    max_body: u64,
) -> Result<(Response, Option<String>, bool), Reason> {
    let ended = h2.ended.clone();
    exchange_h2_inner(&mut h2.sender, req, keep_body, max_body)
        .await
        .map_err(|reason| match reason {
            // The connection's own task knows better why it closed (a TLS alert, a reset).
            Reason::Closed => ended
                .lock()
                .ok()
                .and_then(|slot| slot.clone())
                .unwrap_or(Reason::Closed),
            other => other,
        })
}

async fn exchange_h2_inner(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: &Prepared,
    keep_body: bool,
    max_body: u64,
) -> Result<(Response, Option<String>, bool), Reason> {
    use http_body_util::BodyExt;
    sender.ready().await.map_err(|e| h2_reason(&e))?;
    let mut request = hyper::Request::new(Full::new(req.body.clone()));
    *request.method_mut() = req.method.clone();
    *request.uri_mut() = req.h2_uri.clone();
    let headers = request.headers_mut();
    *headers = req.scenario_headers();
    headers.remove(HOST);
    if !headers.contains_key(USER_AGENT) {
        let _ = headers.try_insert(USER_AGENT, USER_AGENT_VALUE.clone());
    }
    if let Some(c) = &req.credentials
        && !headers.contains_key(AUTHORIZATION)
    {
        let _ = headers.try_insert(AUTHORIZATION, c.clone());
    }
    let resp = sender.send_request(request).await.map_err(|e| h2_reason(&e))?;
    let status = valid_status(resp.status().as_u16())?;
    let location = resp
        .headers()
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (parts, mut body) = resp.into_parts();
    let mut kept = BytesMut::new();
    let mut read: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| h2_reason(&e))?;
        if let Some(data) = frame.data_ref() {
            read += data.len() as u64;
            if read > max_body {
                return Err(Reason::BodyTooLarge);
            }
            if keep_body {
                kept.extend_from_slice(data);
            }
        }
    }
    let set_cookies = parts
        .headers
        .get_all(hyper::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let headers = if keep_body { parts.headers } else { HeaderMap::new() };
    Ok((
        Response {
            status,
            h2: true,
            bytes: read,
            headers,
            body: kept.freeze(),
            elapsed: Duration::ZERO,
            set_cookies,
        },
        location,
        true,
    ))
}

fn h2_reason(e: &hyper::Error) -> Reason {
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        // h2 passes I/O errors on as text (a TLS alert becomes "received fatal alert: ...").
        let text = inner.to_string();
        if text.contains("CertificateRequired") {
            return Reason::Tls("certificate required");
        } else if text.contains("received fatal alert") {
            return Reason::Tls("alert from the server");
        }
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            return io_failure(io, Reason::Closed);
        }
        // RST_STREAM from the server: HTTP/2's reset of one request. (One it sends when the
        // client resets a stream, for a malformed response, is a protocol error.)
        if let Some(h2) = inner.downcast_ref::<h2::Error>()
            && h2.is_reset()
            && h2.is_remote()
        {
            return Reason::StreamReset;
        }
        source = inner.source();
    }
    if e.is_closed() || e.is_canceled() || e.is_incomplete_message() {
        Reason::Closed
    } else {
        Reason::Protocol
    }
}

/// Size of a new read buffer: most response heads fit.
const READ_BUFFER: usize = 1024;

thread_local! {
    /// Read buffers of this worker's plain connections, kept between their responses. A plain
    /// connection waits for its response with no buffer and takes one when bytes arrive, so
    /// ten thousand users waiting on a slow server hold none, and a worker needs about as many
    /// as it reads responses at once. (TLS connections keep their own: decrypted bytes can be
    /// waiting in the TLS layer while the socket has none.)
    static SPARE_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Spare buffers a worker keeps at most.
const SPARE_BUFFERS_MAX: usize = 64;

/// Gives a plain connection's emptied read buffer back to its worker (once a response was read
/// into it: it has its allocation, even when read to its very end leaves no capacity).
fn return_buffer(conn: &mut H1) {
    if !matches!(conn.stream, Stream::Plain(_)) || !conn.buf.is_empty() {
        return;
    }
    let mut buf = std::mem::take(&mut conn.buf);
    // Room the buffer advanced past comes back without a copy (it holds nothing).
    buf.reserve(READ_BUFFER);
    SPARE_BUFFERS.with_borrow_mut(|spare| {
        if spare.len() < SPARE_BUFFERS_MAX {
            spare.push(buf);
        }
    });
}

/// Reads more bytes into the connection's buffer; end of stream is an error here.
async fn fill(conn: &mut H1) -> Result<(), Reason> {
    if conn.buf.capacity() == 0 {
        if let Stream::Plain(tcp) = &conn.stream {
            tcp.readable().await.map_err(|e| io_failure(&e, Reason::Body))?;
        }
        conn.buf = SPARE_BUFFERS
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| BytesMut::with_capacity(READ_BUFFER));
    }
    // Never read into zero spare room: that returns 0, which would look like end of stream.
    if conn.buf.capacity() - conn.buf.len() < 256 {
        conn.buf.reserve(conn.buf.len().max(READ_BUFFER));
    }
    match conn.stream.read_buf(&mut conn.buf).await {
        Ok(0) => Err(Reason::Closed),
        Ok(_) => {
            conn.answered = true;
            Ok(())
        }
        Err(e) => Err(io_failure(&e, Reason::Body)),
    }
}

/// An I/O error's class: TLS errors (which can surface on the first read: a TLS 1.3 server
/// that refuses the client's certificate says so after the handshake), then the socket's.
fn io_failure(e: &std::io::Error, otherwise: Reason) -> Reason {
    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        return tls_reason(e);
    }
    io_reason(e).unwrap_or(otherwise)
}

/// One request and its response on an open connection. Returns the response and whether the
/// connection can carry another request.
async fn exchange(
    conn: &mut H1,
    req: &Prepared,
    keep_body: bool,
    max_body: u64,
) -> Result<(Response, Option<String>, bool), Reason> {
    conn.buf.clear();
    conn.answered = false;
    let written = async {
        conn.stream.write_all(&req.wire).await?;
        conn.stream.flush().await
    };
    written.await.map_err(|e| io_failure(&e, Reason::Closed))?;

    // The head: parsed in place; 1xx interim responses are skipped.
    let Head {
        status,
        framing,
        keep_alive: mut reusable,
        idle_timeout,
        headers,
        location,
        set_cookies,
        ..
    } = loop {
        // Parsed in a function of its own: nothing of the parse is held while waiting for bytes
        // (every user's pending future would carry it).
        if let Some(head) = parse_head(conn, &req.method, keep_body)? {
            break head;
        }
        fill(conn).await?;
    };

    if idle_timeout.is_some() {
        conn.advertised = idle_timeout;
    }
    let mut body = BytesMut::new();
    let mut read: u64 = 0;
    // Body bytes are counted against the cap whether they are kept or dropped.
    let mut take = |conn: &mut H1, n: usize| {
        read += n as u64;
        if read > max_body {
            return Err(Reason::BodyTooLarge);
        }
        // Copy or drop in place: `split_to` would turn the buffer into a shared one for a chunk
        // that is gone a moment later.
        if keep_body {
            body.extend_from_slice(&conn.buf[..n]);
        }
        conn.buf.advance(n);
        Ok(())
    };
    match framing {
        Framing::None => {}
        Framing::Length(mut left) => {
            while left > 0 {
                if conn.buf.is_empty() {
                    fill(conn).await?;
                }
                let n = (conn.buf.len() as u64).min(left) as usize;
                take(conn, n)?;
                left -= n as u64;
            }
        }
        Framing::UntilClose => {
            reusable = false;
            loop {
                let n = conn.buf.len();
                take(conn, n)?;
                match fill(conn).await {
                    Ok(()) => {}
                    Err(Reason::Closed) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Framing::Chunked => loop {
            let (len, size) = loop {
                match httparse::parse_chunk_size(&conn.buf) {
                    Ok(httparse::Status::Complete(found)) => break found,
                    Ok(httparse::Status::Partial) if conn.buf.len() > MAX_HEAD => return Err(Reason::Protocol),
                    Ok(httparse::Status::Partial) => fill(conn).await?,
                    Err(_) => return Err(Reason::Protocol),
                }
            };
            conn.buf.advance(len);
            if size == 0 {
                // Trailers (rarely any) end with an empty line.
                loop {
                    if let Some(end) = conn.buf.windows(2).position(|w| w == b"\r\n") {
                        conn.buf.advance(end + 2);
                        if end == 0 {
                            break;
                        }
                    } else {
                        fill(conn).await?;
                    }
                }
                break;
            }
            let mut left = size;
            while left > 0 {
                if conn.buf.is_empty() {
                    fill(conn).await?;
                }
                let n = (conn.buf.len() as u64).min(left) as usize;
                take(conn, n)?;
                left -= n as u64;
            }
            while conn.buf.len() < 2 {
                fill(conn).await?;
            }
            if &conn.buf[..2] != b"\r\n" {
                return Err(Reason::Protocol);
            }
            conn.buf.advance(2);
        },
    }
    // Bytes beyond the response mean the framing was off: do not reuse.
    let reusable = reusable && conn.buf.is_empty();
    if reusable {
        return_buffer(conn);
    }
    let resp = Response {
        status,
        h2: false,
        bytes: read,
        headers,
        body: body.freeze(),
        elapsed: Duration::ZERO,
        set_cookies,
    };
    Ok((resp, location, reusable))
}

/// The response head at the start of the buffer, once it is all there (`None`: read more);
/// 1xx interim responses are skipped.
fn parse_head(conn: &mut H1, method: &Method, keep_body: bool) -> Result<Option<Head>, Reason> {
    loop {
        // Slots left uninitialised: httparse writes those it fills (100 empty headers cost more
        // to write than a short head does to parse).
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut []);
        let parsed = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut head, &conn.buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => read_head(&head, len, method, keep_body)?,
            Ok(httparse::Status::Partial) if conn.buf.len() > MAX_HEAD => return Err(Reason::Protocol),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(Reason::Protocol),
        };
        conn.buf.advance(parsed.len);
        if !(100..200).contains(&parsed.status) || parsed.status == 101 {
            return Ok(Some(parsed));
        }
    }
}

/// The parts of a response head the engine needs.
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
    /// `Keep-Alive: timeout=N`: how long the server keeps the connection idle.
    idle_timeout: Option<Duration>,
    set_cookies: Vec<String>,
    /// Filled only when asked for (for `after_response`).
    headers: HeaderMap,
    location: Option<String>,
}

/// Reads a parsed head: its status, framing, whether the connection stays open, where it
/// redirects to, and (only if asked) the headers.
fn read_head(
    head: &httparse::Response<'_, '_>,
    len: usize,
    method: &Method,
    want_headers: bool,
) -> Result<Head, Reason> {
    let status = valid_status(head.code.ok_or(Reason::Protocol)?)?;
    let mut keep_alive = head.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    let mut location = None;
    let mut idle_timeout = None;
    let mut set_cookies = Vec::new();
    let mut headers = HeaderMap::new();
    for h in head.headers.iter() {
        // Most headers are none of these: their length rules them out at once.
        let is = |name: &str| h.name.eq_ignore_ascii_case(name);
        match h.name.len() {
            14 if is("content-length") => {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(Reason::Protocol)?;
                // Lengths that differ leave the body's end unknown (RFC 9112 §6.3: an error);
                // the same one repeated is that length.
                if length.is_some_and(|l| l != v) {
                    return Err(Reason::Protocol);
                }
                length = Some(v);
            }
            17 if is("transfer-encoding") => {
                chunked = h.value.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
            }
            10 if is("connection") => {
                if h.value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close")) {
                    keep_alive = false;
                } else if h.value.windows(10).any(|w| w.eq_ignore_ascii_case(b"keep-alive")) {
                    keep_alive = true;
                }
            }
            8 if is("location") => location = std::str::from_utf8(h.value).ok().map(str::to_string),
            10 if is("keep-alive") => idle_timeout = keep_alive_timeout(h.value),
            10 if is("set-cookie") => {
                if let Ok(v) = std::str::from_utf8(h.value) {
                    set_cookies.push(v.to_string());
                }
            }
            _ => {}
        }
        if want_headers
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            )
        {
            // (At most MAX_HEADERS of them.)
            let _ = headers.try_append(name, value);
        }
    }
    let framing = if *method == Method::HEAD || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Head {
        len,
        status,
        framing,
        keep_alive,
        idle_timeout,
        set_cookies,
        headers,
        location,
    })
}

/// `status` if it is an HTTP status code: 100 to 599 (RFC 9110 §15). The parsers take any
/// three digits (`000`, `999`).
fn valid_status(status: u16) -> Result<u16, Reason> {
    match status {
        100..=599 => Ok(status),
        _ => Err(Reason::Protocol),
    }
}

/// The `timeout=N` (seconds) of a `Keep-Alive` header, as Node, Apache and others send it.
fn keep_alive_timeout(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?;
    text.split(',').find_map(|part| {
        let (key, n) = part.split_once('=')?;
        let n: u64 = n.trim().parse().ok()?;
        key.trim()
            .eq_ignore_ascii_case("timeout")
            .then(|| Duration::from_secs(n))
    })
}

async fn resolve(origin: &Origin, within: Duration) -> Result<SocketAddr, Reason> {
    if let Ok(ip) = origin.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, origin.port));
    }
    first_address(tokio::net::lookup_host((origin.host.as_str(), origin.port)), within).await
}

/// The first address a lookup gives. "dns timeout" when it takes longer than `within`, or when
/// the system's resolver gave up waiting for its name servers (EAI_AGAIN, "Temporary failure
/// in name resolution"); "dns error" when the name does not resolve.
async fn first_address<I: Iterator<Item = SocketAddr>>(
    lookup: impl Future<Output = std::io::Result<I>>,
    within: Duration,
) -> Result<SocketAddr, Reason> {
    match tokio::time::timeout(within, lookup).await {
        Err(_) => Err(Reason::DnsTimeout),
        Ok(Ok(mut addrs)) => addrs.next().ok_or(Reason::Dns),
        Ok(Err(e)) if e.to_string().contains("Temporary failure in name resolution") => Err(Reason::DnsTimeout),
        Ok(Err(_)) => Err(Reason::Dns),
    }
}

fn io_reason(io: &std::io::Error) -> Option<Reason> {
    use std::io::ErrorKind::*;
    if matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
        return Some(Reason::OpenFiles);
    }
    match io.kind() {
        ConnectionRefused => Some(Reason::Refused),
        ConnectionReset | ConnectionAborted | BrokenPipe => Some(Reason::Reset),
        TimedOut => Some(Reason::Timeout),
        UnexpectedEof => Some(Reason::Closed),
        _ => None,
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
    fn added_headers_are_spliced_as_a_rebuild_would_send_them() {
        let host = Url::parse("http://127.0.0.1:8000").unwrap();
        let mut base = spec(Target::Path("/api".into()), &[]);
        base.method = Method::POST;
        base.body = Some(Bytes::from_static(b"{\"a\":1}"));
        base.headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let added = [(HeaderName::from_static("x-token"), HeaderValue::from_static("abc"))];
        let spliced = Prepared::new(Some(&host), &base)
            .unwrap()
            .with_headers_added(added.to_vec());
        let mut rebuilt_spec = base.clone();
        rebuilt_spec.headers.insert("x-token", HeaderValue::from_static("abc"));
        let rebuilt = Prepared::new(Some(&host), &rebuilt_spec).unwrap();
        let lines = |p: &Prepared| {
            let text = String::from_utf8(p.wire.to_vec()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let mut lines: Vec<String> = head.lines().map(str::to_string).collect();
            lines[1..].sort();
            (lines, body.to_string())
        };
        assert_eq!(lines(&spliced), lines(&rebuilt));
        assert_eq!(spliced.scenario_headers(), *rebuilt.headers);
    }

    #[test]
    fn keep_alive_headers_give_the_servers_idle_timeout() {
        assert_eq!(keep_alive_timeout(b"timeout=5, max=100"), Some(Duration::from_secs(5)));
        assert_eq!(keep_alive_timeout(b"max=100,Timeout = 2"), Some(Duration::from_secs(2)));
        assert_eq!(keep_alive_timeout(b"max=100"), None);
        assert_eq!(keep_alive_timeout(b"timeout=soon"), None);
    }

    #[test]
    fn name_lookups_fail_as_dns_error_or_dns_timeout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let within = Duration::from_millis(50);
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let found = async { Ok(vec![addr].into_iter()) };
        assert_eq!(rt.block_on(first_address(found, within)), Ok(addr));
        let none = async { Ok(Vec::new().into_iter()) };
        assert_eq!(rt.block_on(first_address(none, within)), Err(Reason::Dns));
        let unknown =
            async { Err::<std::vec::IntoIter<SocketAddr>, _>(std::io::Error::other("Name or service not known")) };
        assert_eq!(rt.block_on(first_address(unknown, within)), Err(Reason::Dns));
        let again = async {
            Err::<std::vec::IntoIter<SocketAddr>, _>(std::io::Error::other(
                "failed to lookup address information: Temporary failure in name resolution",
            ))
        };
        assert_eq!(rt.block_on(first_address(again, within)), Err(Reason::DnsTimeout));
        let stalled = std::future::pending::<std::io::Result<std::vec::IntoIter<SocketAddr>>>();
        assert_eq!(rt.block_on(first_address(stalled, within)), Err(Reason::DnsTimeout));
        assert_eq!(Reason::DnsTimeout.to_string(), "dns timeout");
    }

    #[test]
    fn paths_join_the_host_and_keep_its_base_path() {
        let host = Url::parse("http://127.0.0.1:8000/api/").unwrap();
        let u = request_url(Some(&host), &spec(Target::Path("/items/7".into()), &[("q", "a b")])).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:8000/api/items/7?q=a+b");
        let u = request_url(Some(&host), &spec(Target::Url("http://[::1]:9/z".into()), &[])).unwrap();
        assert_eq!(u.as_str(), "http://[::1]:9/z");
        assert!(request_url(None, &spec(Target::Path("/x".into()), &[])).is_err());
        let e = Prepared::new(None, &spec(Target::Url("http://u:pw@127.0.0.1:0/x".into()), &[])).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "bad url \"http://u:***@127.0.0.1:0/x\": port 0 is no server's port"
        );
    }

    #[test]
    fn prepared_requests_are_laid_out_once_on_the_wire() {
        let host = Url::parse("http://127.0.0.1:8000").unwrap();
        let p = Prepared::new(Some(&host), &spec(Target::Path("/a b".into()), &[("k", "v")])).unwrap();
        let agent = concat!("user-agent: stormlight/", env!("CARGO_PKG_VERSION"));
        assert_eq!(
            p.wire,
            format!("GET /a%20b?k=v HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n{agent}\r\n\r\n")
        );
        assert_eq!(
            *p.origin,
            Origin {
                https: false,
                host: "127.0.0.1".into(),
                port: 8000
            }
        );
        let mut post = spec(Target::Url("https://[::1]/x".into()), &[]);
        post.method = Method::POST;
        post.body = Some(Bytes::from_static(b"{}"));
        let p = Prepared::new(None, &post).unwrap();
        assert_eq!(
            *p.origin,
            Origin {
                https: true,
                host: "::1".into(),
                port: 443
            }
        );
        let text = String::from_utf8(p.wire.to_vec()).unwrap();
        assert!(text.starts_with("POST /x HTTP/1.1\r\nhost: [::1]\r\n"), "{text}");
        assert!(text.ends_with("content-length: 2\r\n\r\n{}"), "{text}");
    }

    fn wire_text(p: &Prepared) -> String {
        String::from_utf8(p.wire.to_vec()).unwrap()
    }

    fn basic(pair: &str) -> String {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
    }

    #[test]
    fn url_creds_are_hidden_in_every_url_of_a_text() {
        for (text, shown) in [
            ("http://u:secret@h:8/x?y=1", "http://u:***@h:8/x?y=1"),
            ("http://u@h/x", "http://u@h/x"),
            ("https://:pw@h", "https://:***@h"),
            ("http://u:p@ss@h/", "http://u:***@h/"),
            ("http://u:p@h?q=a@b", "http://u:***@h?q=a@b"),
            ("http://h/a@b:c", "http://h/a@b:c"),
            (
                "bad url \"http://a:b@h\" and http://c:d@i/x",
                "bad url \"http://a:***@h\" and http://c:***@i/x",
            ),
            ("GET /users/@me", "GET /users/@me"),
        ] {
            assert_eq!(redact(text), shown, "{text}");
        }
        assert!(matches!(redact("http://h/x"), Cow::Borrowed(_)));
        assert_eq!(redact_input("u:secret@h:8000"), "u:***@h:8000");
        assert_eq!(redact_input("ftp://u:secret@h"), "ftp://u:***@h");
    }

    #[test]
    fn url_creds_become_a_basic_header_and_leave_the_url() {
        let p = Prepared::new(
            None,
            &spec(Target::Url("http://us%40er:p%3Ass@127.0.0.1:9/x".into()), &[]),
        )
        .unwrap();
        let text = wire_text(&p);
        assert!(text.starts_with("GET /x HTTP/1.1\r\nhost: 127.0.0.1:9\r\n"), "{text}");
        assert!(
            text.contains(&format!("\r\nauthorization: {}\r\n", basic("us@er:p:ss"))),
            "{text}"
        );
        assert!(!text.contains("p%3Ass") && !text.contains("us%40er"), "{text}");
        assert_eq!(p.url.as_str(), "http://127.0.0.1:9/x");
        assert_eq!(p.h2_uri, "http://127.0.0.1:9/x");

        // A user alone is `user:`; the host's credentials go with the paths joined to it.
        let host = Url::parse("http://ada@127.0.0.1:9/api").unwrap();
        let p = Prepared::new(Some(&host), &spec(Target::Path("/items".into()), &[])).unwrap();
        assert!(wire_text(&p).contains(&format!("authorization: {}\r\n", basic("ada:"))));

        // The scenario's own header wins, also when a hook adds it.
        let mut own = spec(Target::Url("http://u:p@127.0.0.1:9/".into()), &[]);
        own.headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let text = wire_text(&Prepared::new(None, &own).unwrap());
        assert_eq!(text.matches("authorization").count(), 1, "{text}");
        assert!(text.contains("authorization: Bearer t\r\n"), "{text}");
        let p = Prepared::new(None, &spec(Target::Url("http://u:p@127.0.0.1:9/".into()), &[])).unwrap();
        let hooked = p.with_headers_added(vec![(AUTHORIZATION, HeaderValue::from_static("Bearer h"))]);
        let text = wire_text(&hooked);
        assert_eq!(text.matches("authorization").count(), 1, "{text}");
        assert!(text.contains("authorization: Bearer h\r\n"), "{text}");
        // Other added headers (and a rebuild with another method) keep the URL's.
        let added = p.with_headers_added(vec![(HeaderName::from_static("x-a"), HeaderValue::from_static("1"))]);
        assert!(wire_text(&added).contains(&format!("authorization: {}\r\n", basic("u:p"))));
        let mut post = spec(Target::Url("http://u:p@127.0.0.1:9/".into()), &[]);
        post.method = Method::POST;
        assert!(wire_text(&p.with_spec(post)).contains(&format!("authorization: {}\r\n", basic("u:p"))));
    }

    #[test]
    fn redirects_carry_creds_within_the_origin_only() {
        let auth = |p: &Prepared| {
            let text = wire_text(p);
            text.lines()
                .find_map(|l| l.strip_prefix("authorization: "))
                .map(str::to_string)
        };
        let from_url = Prepared::new(None, &spec(Target::Url("http://u:p@127.0.0.1:9/x".into()), &[])).unwrap();
        let mut own = spec(Target::Url("http://127.0.0.1:9/x".into()), &[]);
        own.headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let explicit = Prepared::new(None, &own).unwrap();
        for (p, sent) in [(&from_url, basic("u:p")), (&explicit, "Bearer t".to_string())] {
            for location in ["/y", "http://127.0.0.1:9/z"] {
                let next = p.redirected(302, location).unwrap();
                assert_eq!(auth(&next), Some(sent.clone()), "{location}");
            }
            for location in ["http://127.0.0.1:10/z", "https://127.0.0.1:9/z", "http://localhost:9/z"] {
                let next = p.redirected(302, location).unwrap();
                assert_eq!(auth(&next), None, "{location}: {}", wire_text(&next));
                assert!(!next.scenario_headers().contains_key(AUTHORIZATION));
            }
        }
        // A location with credentials of its own sends those.
        let next = from_url.redirected(302, "http://v:q@127.0.0.1:10/").unwrap();
        assert_eq!(auth(&next), Some(basic("v:q")));
        assert_eq!(next.url.as_str(), "http://127.0.0.1:10/");
    }

    /// Serves canned responses, one per request read, on a fresh loopback port; returns the
    /// port and a counter of connections accepted.
    async fn canned(responses: Vec<&'static [u8]>) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut responses = responses.into_iter();
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf).await
                    && n > 0
                {
                    let Some(resp) = responses.next() else { return };
                    let _ = sock.write_all(resp).await;
                    if resp.ends_with(b"CLOSE") || std::str::from_utf8(resp).is_ok_and(|r| r.contains("close")) {
                        break;
                    }
                }
            }
        });
        (port, accepted)
    }

    /// A GET / to the loopback server on `port`, a client and a user's empty session.
    fn get_root(port: u16) -> (Prepared, Client, Session) {
        let host = Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let req = Prepared::new(Some(&host), &spec(Target::Path("/".into()), &[])).unwrap();
        (req, Client::new(Duration::from_secs(5)), Session::default())
    }

    #[tokio::test]
    async fn framings_bodies_and_keep_alive() {
        let (port, accepted) = canned(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nConnection: close\r\n\r\nnop",
            b"HTTP/1.0 200 OK\r\n\r\nuntil close",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
            b"garbage\r\n\r\n",
        ])
        .await;
        let (req, client, mut session) = get_root(port);
        let mut send = async |keep: bool| client.send(&mut session, &req, keep).await.map_err(|(_, r)| r);

        let r = send(true).await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]));
        let r = send(true).await.unwrap();
        assert_eq!(
            (r.status, &r.body[..]),
            (201, &b"abcde"[..]),
            "1xx skipped, chunks joined, trailers read"
        );
        assert_eq!(r.headers["x-a"], "1");
        let r = send(false).await.unwrap();
        assert!(
            r.body.is_empty() && r.headers.is_empty(),
            "no body for 204; headers only when asked"
        );
        assert_eq!(send(true).await.unwrap().status, 404);
        // Connection: close was honoured: a new connection for the next request.
        let r = send(true).await.unwrap();
        assert_eq!(&r.body[..], b"until close", "HTTP/1.0 without length reads to the end");
        let r = send(true).await.unwrap();
        assert_eq!(&r.body[..], b"ok", "bytes past the length are not the body");
        // ...and the connection carrying them is not reused.
        assert_eq!(send(false).await.unwrap().status, 200);
        assert_eq!(send(false).await.unwrap_err(), Reason::Protocol);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn idle_plain_connections_hold_no_read_buffer() {
        let (port, _) = canned(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye",
        ])
        .await;
        let (req, client, mut session) = get_root(port);
        let spare = || SPARE_BUFFERS.with_borrow(|s| s.iter().map(|b| b.as_ptr()).collect::<Vec<_>>());
        let held = |session: &Session| match &session.conns[0].link {
            Link::H1(h1) => h1.buf.capacity(),
            Link::H2(_) => unreachable!(),
        };
        assert_eq!(&client.send(&mut session, &req, true).await.unwrap().body[..], b"hello");
        assert_eq!(held(&session), 0, "the kept connection gave its buffer back");
        let first = spare();
        assert_eq!(first.len(), 1);
        assert_eq!(&client.send(&mut session, &req, true).await.unwrap().body[..], b"bye");
        assert_eq!(
            (held(&session), spare()),
            (0, first),
            "the same buffer served the next response"
        );
    }

    #[tokio::test]
    async fn transport_failures_have_their_class() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(Duration::from_millis(300));
        let mut session = Session::default();
        let at = |port: u16| {
            let host = Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
            Prepared::new(Some(&host), &spec(Target::Path("/".into()), &[])).unwrap()
        };
        let err = |r: Result<Response, (Duration, Reason)>| r.err().map(|(_, reason)| reason);
        assert_eq!(
            err(client.send(&mut session, &at(dead), false).await),
            Some(Reason::Refused)
        );
        for (response, reason) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort CLOSE"[..],
                Reason::Closed,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nslow", Reason::Timeout),
            (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", Reason::Protocol),
        ] {
            let (port, _) = canned(vec![response]).await;
            assert_eq!(err(client.send(&mut session, &at(port), false).await), Some(reason));
        }
        // (No DNS failure here: resolving a name that does not exist would ask a resolver
        // off this machine.)
    }

    /// Heads whose framing or status is not HTTP's are protocol errors, not successes: two
    /// `Content-Length`s that differ (RFC 9112 §6.3), a status outside 100-599.
    #[tokio::test]
    async fn lengths_that_differ_and_statuses_out_of_range_are_protocol_errors() {
        let client = Client::new(Duration::from_secs(5));
        for (response, expected) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
                Err(Reason::Protocol),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-A: 1\r\ncontent-length: 5\r\n\r\nhello!",
                Err(Reason::Protocol),
            ),
            (b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", Err(Reason::Protocol)),
            (b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", Err(Reason::Protocol)),
            (b"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n", Err(Reason::Protocol)),
            (b"HTTP/1.1 999 High\r\nContent-Length: 0\r\n\r\n", Err(Reason::Protocol)),
            // The same length twice is that length; the range's ends are statuses.
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                Ok((200, 5)),
            ),
            (b"HTTP/1.1 599 Odd\r\nContent-Length: 2\r\n\r\nok", Ok((599, 2))),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                Ok((204, 0)),
            ),
        ] {
            let (port, _) = canned(vec![response]).await;
            let (req, _, mut session) = get_root(port);
            let got = client
                .send(&mut session, &req, false)
                .await
                .map(|r| (r.status, r.bytes))
                .map_err(|(_, reason)| reason);
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(response));
        }
        assert_eq!(Reason::Protocol.to_string(), "protocol error");
    }

    /// A server that sets a new cookie on every response fills a user's jar to its caps, no
    /// further: the first cookies stay (new ones are ignored), those it holds are still updated
    /// and removed, and the `Cookie` header stays within the jar's bytes.
    #[test]
    fn a_users_cookie_jar_keeps_at_most_its_caps() {
        let (req, _, mut session) = get_root(9);
        let header = |s: &Session| s.cookie_header(&req).unwrap_or_default();
        let pairs = |s: &Session| header(s).split("; ").map(str::to_string).collect::<Vec<_>>();
        let set: Vec<String> = (0..300).map(|i| format!("c{i}=v")).collect();
        session.store_cookies(&req, &set);
        let kept = pairs(&session);
        assert_eq!(kept.len(), JAR_COOKIES);
        assert!(kept.contains(&"c0=v".into()) && kept.contains(&"c199=v".into()));
        assert!(!kept.contains(&"c200=v".into()), "new ones past the cap are ignored");
        session.store_cookies(&req, &["c5=new".into(), "c6=; Max-Age=0".into(), "c300=v".into()]);
        let kept = pairs(&session);
        assert!(kept.contains(&"c5=new".into()), "a cookie it holds is updated");
        assert!(!kept.iter().any(|p| p.starts_with("c6=")), "and removed");
        assert!(kept.contains(&"c300=v".into()), "the room a removed one left is taken");
        assert_eq!(kept.len(), JAR_COOKIES);

        // 4 KB cookies, a new one on each of 1000 responses: the header stops growing.
        let mut big = Session::default();
        for i in 0..1000 {
            big.store_cookies(&req, &[format!("big{i}={}", "x".repeat(4000))]);
        }
        let h = header(&big);
        assert!(h.len() <= JAR_BYTES + 2 * JAR_COOKIES, "{} bytes", h.len());
        assert_eq!(pairs(&big).len(), JAR_BYTES / 4005, "{} bytes", h.len());
        let names: Vec<String> = pairs(&big)
            .iter()
            .map(|p| p[..p.find('=').unwrap()].to_string())
            .collect();
        assert!(
            names.contains(&"big0".into()) && !names.contains(&"big999".into()),
            "the first ones are kept"
        );
        // A cookie larger than 4 KiB is not kept at all.
        let mut one = Session::default();
        one.store_cookies(&req, &[format!("huge={}", "x".repeat(COOKIE_BYTES))]);
        assert_eq!(one.cookie_header(&req), None);
    }
}
