//! The built-in target: a small HTTP server on loopback for `stormlight demo`, for trying
//! scenarios by hand (`stormlight target`) and for the tests. It counts every request it
//! receives, so a run's totals can be checked against what actually arrived, and it can
//! misbehave on request, so that every fault a real server shows can be tried.
//!
//! | route | answer |
//! |---|---|
//! | `GET /hello` | `{"message":"Hello, World!"}` |
//! | `POST /api/upload` | echoes the JSON body (400 if it is not JSON) |
//! | `GET /items/{id}` | `{"id":..,"name":..}` |
//! | `POST /login` | `{"user": NAME}` -> `{"token":..,"user":..}` and a `session` cookie |
//! | `/account` | the user logged in (needs the session cookie and `Authorization: Bearer TOKEN` of one login; else 401) |
//! | `POST /orders` | 201 with the user and the JSON order (logged in as for `/account`) |
//! | `/slow?ms=N` | waits N ms, then 200 |
//! | `/status/N` | answers with status N |
//! | `/stall?ms=N` | sends the headers at once, the body after N ms |
//! | `/reset` | drops the connection with a TCP reset, no response |
//! | `/fault/reset-after-headers` | sends the head (Content-Length 1000), then a TCP reset |
//! | `/fault/reset-after?bytes=N` | sends the head and N body bytes of 2N, then a TCP reset |
//! | `/fault/trickle?bytes=N&ms=M` | sends N body bytes, one every M ms |
//! | `/fault/hang` | never answers |
//! | `/fault/huge?bytes=N` | a chunked body of N bytes |
//! | `/fault/endless` | a chunked body that never ends |
//! | `/fault/bad-status` | an invalid status line (must be the first request on its connection) |
//! | `/fault/wrong-length` | promises 100 bytes, sends 10, closes |
//! | `/fault/redirect?n=N` | redirects N+1 times (n=N, N-1, .., 0), ending at `/hello` |
//! | `/fault/redirect-loop` | redirects to itself |
//! | `/auth?user=U&pass=P` | 200 when the request has `Authorization: Basic` of `U:P`, else 401 |
//! | `/redirect?to=URL` | a 302 to URL (another origin, say) |
//! | `GET /__stats` | `{"requests":N,"paths":{..},"authorized":N}`: what was received (not counted itself) |
//! | `/__down?ms=N` | closes the listener and every connection for N ms (not counted) |
//! | `/__stall?ms=N` | holds every answer for N ms from now (not counted) |
//! | anything else | 404 |
//!
//! `stormlight target --idle-close 1s` closes connections idle for longer than that;
//! `--tls` serves HTTPS with a self-signed certificate made at start (its PEM is written to a
//! file, to try `--ca-cert`).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

type BoxError = Box<dyn StdError + Send + Sync>;
type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Path of the statistics endpoint; requests to it are not counted.
pub const STATS_PATH: &str = "/__stats";
/// Path of the "go down for a while" control; requests to it are not counted.
pub const DOWN_PATH: &str = "/__down";
/// Path of the "hold every answer for a while" control; not counted.
pub const STALL_PATH: &str = "/__stall";

/// What the target has received.
#[derive(Default)]
pub struct Counts {
    requests: AtomicU64,
    paths: Mutex<HashMap<String, u64>>,
    /// Requests received over HTTP/1.x and over HTTP/2.
    protocols: [AtomicU64; 2],
    connections: AtomicU64,
    /// Requests to `/auth` whose Basic credentials matched.
    authorized: AtomicU64,
}

impl Counts {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests received per path.
    pub fn paths(&self) -> HashMap<String, u64> {
        self.paths.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Requests to `/auth` that carried the Basic credentials it asked for.
    pub fn authorized(&self) -> u64 {
        self.authorized.load(Ordering::SeqCst)
    }

    /// Requests received over HTTP/2.
    pub fn http2(&self) -> u64 {
        self.protocols[1].load(Ordering::SeqCst)
    }

    fn count(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut p) = self.paths.lock() {
            *p.entry(path.to_string()).or_insert(0) += 1;
        }
    }
}

/// How the target behaves as a whole.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Close a keep-alive connection that waits longer than this for its next request.
    pub idle_close: Option<Duration>,
    /// With `idle_close`: do not say so in a `Keep-Alive: timeout=N` header.
    pub silent_close: bool,
    /// Serve HTTPS with a self-signed certificate generated at start for these names.
    pub tls: Option<&'static [&'static str]>,
    /// With TLS: require a client certificate signed by this CA (mutual TLS).
    pub client_ca: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// The names `stormlight target --tls` puts in its certificate.
pub const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Shared by the accept loop and every connection.
struct State {
    counts: Arc<Counts>,
    options: Options,
    /// Asks the accept loop to go down for the given time.
    down: watch::Sender<Option<Duration>>,
    /// Bumped when the target goes down: every open connection is dropped.
    generation: watch::Sender<u64>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stall: Arc<Stall>,
    /// Logged-in sessions: session cookie -> (token, user).
    sessions: Mutex<HashMap<String, (String, String)>>,
    logins: AtomicU64,
}

/// A stall of the whole target: until it ends, no answer goes out (requests that arrive wait,
/// and answers that are ready wait), as a server in a long GC pause or a blocked database.
#[derive(Default)]
pub struct Stall {
    /// From when to when answers are held.
    window: Mutex<Option<(std::time::Instant, std::time::Instant)>>,
    /// A stall to place `delay` after the next request, lasting `pause`.
    armed: Mutex<Option<(Duration, Duration)>>,
}

impl Stall {
    /// Stalls every answer from now for `pause`.
    pub fn start(&self, pause: Duration) {
        let now = std::time::Instant::now();
        if let Ok(mut window) = self.window.lock() {
            *window = Some((now, now + pause));
        }
    }

    /// Stalls every answer for `pause`, starting `delay` after the next request arrives (so a
    /// test can place a stall at a moment of a run without knowing when the run starts).
    pub fn after_first_request(&self, delay: Duration, pause: Duration) {
        if let Ok(mut armed) = self.armed.lock() {
            *armed = Some((delay, pause));
        }
    }

    /// Called for every request: places an armed stall.
    fn request_arrived(&self) {
        let Some((delay, pause)) = self.armed.lock().ok().and_then(|mut a| a.take()) else {
            return;
        };
        let from = std::time::Instant::now() + delay;
        if let Ok(mut window) = self.window.lock() {
            *window = Some((from, from + pause));
        }
    }

    /// Waits out the stall in progress, if any.
    async fn wait(&self) {
        let window = self.window.lock().ok().and_then(|w| *w);
        let now = std::time::Instant::now();
        if let Some((from, until)) = window
            && from <= now
            && now < until
        {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// A running target. It serves until the runtime it was started on shuts down.
pub struct Target {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    /// Holds every answer for a while (`Stall::start`, or `/__stall?ms=N`).
    pub stall: Arc<Stall>,
    /// With TLS: the self-signed certificate (PEM), to trust with `--ca-cert`.
    pub cert_pem: Option<String>,
}

impl Target {
    /// Binds `addr` (use port 0 for an ephemeral port) and serves on the current runtime.
    pub async fn start_with(addr: SocketAddr, options: Options) -> Result<Target> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let stall = Arc::new(Stall::default());
        let (down, mut down_rx) = watch::channel(None);
        let (generation, _) = watch::channel(0u64);
        let (tls, cert_pem) = match options.tls {
            Some(names) => {
                let (acceptor, pem) = self_signed(names, options.client_ca.clone())?;
                (Some(acceptor), Some(pem))
            }
            None => (None, None),
        };
        let state = Arc::new(State {
            counts: counts.clone(),
            options,
            down,
            generation,
            tls,
            sessions: Mutex::new(HashMap::new()),
            logins: AtomicU64::new(0),
            stall: stall.clone(),
        });
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let accepted = match &listener {
                    Some(l) => tokio::select! {
                        a = l.accept() => Some(a),
                        _ = down_rx.changed() => None,
                    },
                    None => None,
                };
                match accepted {
                    Some(Ok((stream, _))) => {
                        state.counts.connections.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(serve(stream, state.clone()));
                    }
                    Some(Err(_)) => continue,
                    None => {
                        // Down: no listener (connections are refused), every connection dropped.
                        let Some(pause) = *down_rx.borrow_and_update() else {
                            continue;
                        };
                        listener = None;
                        state.generation.send_modify(|g| *g += 1);
                        tokio::time::sleep(pause).await;
                        while listener.is_none() {
                            match TcpListener::bind(addr).await {
                                Ok(l) => listener = Some(l),
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    }
                }
            }
        });
        Ok(Target {
            addr,
            counts,
            cert_pem,
            stall,
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:41234` (https with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.cert_pem.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Starts a target on a thread of its own (with its own runtime), for `demo` and for tests
    /// that want the target off the runner's threads.
    pub fn spawn_thread(addr: SocketAddr) -> Result<Target> {
        Self::spawn_thread_with(addr, Options::default())
    }

    pub fn spawn_thread_with(addr: SocketAddr, options: Options) -> Result<Target> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("stormlight-target".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let started = Target::start_with(addr, options).await;
                    let ok = started.is_ok();
                    let _ = tx.send(started);
                    if ok {
                        std::future::pending::<()>().await;
                    }
                });
            })?;
        rx.recv().context("the target thread ended before it started")?
    }
}

/// One connection: TLS if the target has it, a raw look at the first request (for the faults
/// hyper cannot produce), then hyper, until the peer closes or the target goes down.
async fn serve(stream: TcpStream, state: Arc<State>) {
    let _ = stream.set_nodelay(true);
    // A second handle on the socket outlives hyper's: when a route asked for a reset, linger 0
    // on it before the last close turns the close into a TCP reset; otherwise a plain FIN.
    let last_handle = socket2::SockRef::from(&stream).try_clone().ok();
    let reset = Arc::new(AtomicBool::new(false));
    let mut generation = state.generation.subscribe();
    let work = async {
        match &state.tls {
            Some(acceptor) => {
                if let Ok(tls) = acceptor.accept(stream).await {
                    serve_http(tls, &state, &reset).await;
                }
            }
            None => serve_http(stream, &state, &reset).await,
        }
    };
    let went_down = tokio::select! {
        () = work => false,
        _ = generation.changed() => true,
    };
    if let Some(socket) = last_handle
        && (went_down || reset.load(Ordering::SeqCst))
    {
        let _ = socket.set_linger(Some(Duration::ZERO));
    }
}

async fn serve_http<S>(mut stream: S, state: &Arc<State>, reset: &Arc<AtomicBool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Read until the first request line is complete (or the peer goes away).
    while !head.contains(&b'\n') && head.len() < 8192 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.windows(17).any(|w| w == b"/fault/bad-status") {
        state.counts.count("/fault/bad-status");
        let _ = stream
            .write_all(b"HTTP/1.1 2x0 NOT-A-STATUS\r\nno colon here\r\n\r\n")
            .await;
        let _ = stream.shutdown().await;
        return;
    }
    let io = Rewind {
        prefix: Bytes::from(head),
        stream,
    };
    let (handler, reset) = (state.clone(), reset.clone());
    // Like Node and Apache, say how long an idle connection is kept (whole seconds).
    let advertised = match state.options.idle_close {
        Some(idle) if !state.options.silent_close && idle.as_secs() >= 1 => {
            HeaderValue::from_str(&format!("timeout={}", idle.as_secs())).ok()
        }
        _ => None,
    };
    let service = service_fn(move |req| {
        let answer = handle(req, handler.clone(), reset.clone());
        let advertised = advertised.clone();
        async move {
            let mut resp = answer.await?;
            if let Some(v) = advertised {
                resp.headers_mut().insert("keep-alive", v);
            }
            Ok::<_, Reset>(resp)
        }
    });
    // HTTP/1.1, or HTTP/2 (by ALPN over TLS, or by its preface on plain connections).
    let mut http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    http.http1().keep_alive(true);
    if let Some(idle) = state.options.idle_close {
        http.http1().timer(TokioTimer::new()).header_read_timeout(idle);
    }
    let _ = http.serve_connection(TokioIo::new(io), service).await;
}

/// A TLS acceptor with a certificate made now for `names`, and that certificate as PEM.
fn self_signed(
    names: &[&str],
    client_ca: Option<rustls::pki_types::CertificateDer<'static>>,
) -> Result<(tokio_rustls::TlsAcceptor, String)> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names).context("generating the target's certificate")?;
    let pem = certified.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS setup")?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).context("client CA")?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .context("TLS certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), pem))
}

/// A stream whose first bytes were already read: they are handed out again first.
struct Rewind<S> {
    prefix: Bytes,
    stream: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset requested")
    }
}

impl StdError for Reset {}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    if let Ok(ct) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, ct);
    }
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

/// A query parameter, decoded.
fn query_text(req: &Request<Incoming>, key: &str) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Whether the request carries `Authorization: Basic` of the `user` and `pass` it names.
fn basic_matches(req: &Request<Incoming>) -> bool {
    use base64::Engine as _;
    let (Some(user), Some(pass)) = (query_text(req, "user"), query_text(req, "pass")) else {
        return false;
    };
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes())
}

/// A numeric query parameter, or `default`.
fn query_num(req: &Request<Incoming>, key: &str, default: u64) -> u64 {
    req.uri()
        .query()
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.parse().ok())
        })
        .unwrap_or(default)
}

/// A response whose body is `body`, with `length` announced (or chunked when `None`).
fn streamed(length: Option<u64>, body: FaultBody) -> Response<Body> {
    let mut resp = Response::new(body.boxed());
    if let Some(n) = length {
        resp.headers_mut().insert(hyper::header::CONTENT_LENGTH, n.into());
    }
    resp
}

/// The user a request is logged in as: its `session` cookie and its bearer token must come
/// from the same login.
fn logged_in(req: &Request<Incoming>, state: &State) -> Option<String> {
    let cookies = req.headers().get_all(hyper::header::COOKIE);
    let session = cookies.iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';')
            .find_map(|pair| pair.trim().strip_prefix("session=").map(str::to_string))
    })?;
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .to_string();
    let sessions = state.sessions.lock().ok()?;
    let (expected, user) = sessions.get(&session)?;
    (*expected == token).then(|| user.clone())
}

/// A request's whole body (empty if it cannot be read).
async fn body_of(req: Request<Incoming>) -> Bytes {
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

fn redirect(to: &str) -> Response<Body> {
    let mut resp = full(StatusCode::FOUND, "text/plain", "");
    if let Ok(location) = to.parse() {
        resp.headers_mut().insert(hyper::header::LOCATION, location);
    }
    resp
}

async fn handle(req: Request<Incoming>, state: Arc<State>, reset: Arc<AtomicBool>) -> Result<Response<Body>, Reset> {
    let counts = &state.counts;
    let path = req.uri().path().to_string();
    if path == STATS_PATH {
        let paths = counts.paths();
        let protocols = serde_json::json!({ "HTTP/1.1": counts.requests() - counts.http2(), "HTTP/2": counts.http2() });
        let stats = serde_json::json!({
            "requests": counts.requests(),
            "paths": paths,
            "protocols": protocols,
            "authorized": counts.authorized(),
        });
        return Ok(json(StatusCode::OK, stats));
    }
    if path == STALL_PATH {
        state.stall.start(Duration::from_millis(query_num(&req, "ms", 1000)));
        return Ok(full(StatusCode::OK, "text/plain", "stalling\n"));
    }
    if path == DOWN_PATH {
        let pause = Duration::from_millis(query_num(&req, "ms", 1000));
        let down = state.down.clone();
        tokio::spawn(async move {
            // Let this answer go out first.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = down.send(Some(pause));
        });
        return Ok(full(StatusCode::OK, "text/plain", "going down\n"));
    }
    counts.count(&path);
    counts.protocols[usize::from(req.version() == hyper::Version::HTTP_2)].fetch_add(1, Ordering::SeqCst);
    // A request that arrives during a stall waits for its end; so does an answer ready during it.
    state.stall.request_arrived();
    state.stall.wait().await;
    let method = req.method().clone();
    let resp = match (method.as_str(), path.as_str()) {
        ("GET", "/hello") => json(StatusCode::OK, serde_json::json!({ "message": "Hello, World!" })),
        ("POST", "/login") => {
            let body = body_of(req).await;
            let user = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("user").and_then(|u| u.as_str().map(str::to_string)));
            match user {
                Some(user) => {
                    let n = state.logins.fetch_add(1, Ordering::SeqCst) + 1;
                    let (session, token) = (
                        format!("s{n}-{:x}", rand::random::<u32>()),
                        format!("t{n}-{:x}", rand::random::<u32>()),
                    );
                    if let Ok(mut sessions) = state.sessions.lock() {
                        sessions.insert(session.clone(), (token.clone(), user.clone()));
                    }
                    let mut resp = json(StatusCode::OK, serde_json::json!({ "token": token, "user": user }));
                    if let Ok(cookie) = format!("session={session}; Path=/; HttpOnly").parse() {
                        resp.headers_mut().insert(hyper::header::SET_COOKIE, cookie);
                    }
                    resp
                }
                None => json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": "send {\"user\": \"name\"}" }),
                ),
            }
        }
        (_, "/account") | ("POST", "/orders") => match logged_in(&req, &state) {
            None => json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({ "error": "log in first: the session cookie and the bearer token of one login" }),
            ),
            Some(user) if path == "/account" => json(StatusCode::OK, serde_json::json!({ "user": user })),
            Some(user) => {
                let body = body_of(req).await;
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(order) => json(StatusCode::CREATED, serde_json::json!({ "user": user, "order": order })),
                    Err(_) => json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({ "error": "the order is not JSON" }),
                    ),
                }
            }
        },
        ("POST", "/api/upload") => {
            let body = body_of(req).await;
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => json(StatusCode::OK, serde_json::json!({ "received": v })),
                Err(e) => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e.to_string() })),
            }
        }
        (_, "/slow") => {
            tokio::time::sleep(Duration::from_millis(query_num(&req, "ms", 0))).await;
            full(StatusCode::OK, "text/plain", "slow\n")
        }
        (_, "/stall") => {
            let ms = query_num(&req, "ms", 0);
            streamed(None, FaultBody::new(8, 8, Some(Duration::from_millis(ms)), false))
        }
        (_, "/reset") => {
            reset.store(true, Ordering::SeqCst);
            return Err(Reset);
        }
        (_, "/fault/reset-after-headers") => {
            reset.store(true, Ordering::SeqCst);
            streamed(Some(1000), FaultBody::new(0, 0, None, true))
        }
        (_, "/fault/reset-after") => {
            reset.store(true, Ordering::SeqCst);
            let n = query_num(&req, "bytes", 100);
            streamed(Some(2 * n.max(1)), FaultBody::new(n, 16 * 1024, None, true))
        }
        (_, "/fault/trickle") => {
            let n = query_num(&req, "bytes", 10);
            streamed(
                Some(n),
                FaultBody::new(n, 1, Some(Duration::from_millis(query_num(&req, "ms", 100))), false),
            )
        }
        (_, "/fault/hang") => {
            std::future::pending::<()>().await;
            unreachable!("pending never resolves")
        }
        (_, "/fault/huge") => streamed(
            None,
            FaultBody::new(query_num(&req, "bytes", 1 << 20), 16 * 1024, None, false),
        ),
        (_, "/fault/endless") => streamed(None, FaultBody::new(u64::MAX, 16 * 1024, None, false)),
        (_, "/fault/wrong-length") => streamed(Some(100), FaultBody::new(10, 10, None, false)),
        (_, "/fault/redirect") => match query_num(&req, "n", 3) {
            0 => redirect("/hello"),
            n => redirect(&format!("/fault/redirect?n={}", n - 1)),
        },
        (_, "/fault/redirect-loop") => redirect("/fault/redirect-loop"),
        (_, "/auth") if basic_matches(&req) => {
            counts.authorized.fetch_add(1, Ordering::SeqCst);
            full(StatusCode::OK, "text/plain", "authorized\n")
        }
        (_, "/auth") => full(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "wrong or no Basic credentials\n",
        ),
        (_, "/redirect") => match query_text(&req, "to") {
            Some(to) => redirect(&to),
            None => full(StatusCode::BAD_REQUEST, "text/plain", "give ?to=URL\n"),
        },
        (_, "/fault/bad-status") => {
            // Only reachable when it was not the first request on its connection.
            full(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "bad-status must open a connection\n",
            )
        }
        (_, p) if p.starts_with("/status/") => {
            match p["/status/".len()..]
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(code) => full(code, "text/plain", format!("status {}\n", code.as_u16())),
                None => full(StatusCode::BAD_REQUEST, "text/plain", "bad status code\n"),
            }
        }
        ("GET", p) if p.starts_with("/items/") => {
            let id = &p["/items/".len()..];
            // A number when it is one, as an API would give it.
            let value = id
                .parse::<i64>()
                .map(serde_json::Value::from)
                .unwrap_or_else(|_| id.into());
            json(
                StatusCode::OK,
                serde_json::json!({ "id": value, "name": format!("item {id}") }),
            )
        }
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    state.stall.wait().await;
    Ok(resp)
}

/// A body of `left` bytes of `x`, in chunks of `chunk` bytes, with an optional pause before
/// each chunk, that fails at the end (aborting the connection: a reset) when `fail` is set.
struct FaultBody {
    left: u64,
    chunk: usize,
    pause: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    fail: bool,
}

impl FaultBody {
    fn new(left: u64, chunk: usize, pause: Option<Duration>, fail: bool) -> Self {
        Self {
            left,
            chunk: chunk.max(1),
            pause,
            sleep: None,
            fail,
        }
    }
}

static FILL: [u8; 16 * 1024] = [b'x'; 16 * 1024];

impl hyper::body::Body for FaultBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(if self.fail { Some(Err(Box::new(Reset))) } else { None });
        }
        if let Some(pause) = self.pause {
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let n = (self.left.min(self.chunk as u64) as usize).min(FILL.len());
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&FILL[..n])))))
    }
}
