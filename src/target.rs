//! The built-in target: a small HTTP server on loopback for `stormlight demo`, for trying
//! scenarios by hand (`stormlight target`) and for the tests. It counts every request it
//! receives, so a run's totals can be checked against what actually arrived.
//!
//! | route | answer |
//! |---|---|
//! | `GET /hello` | `{"message":"Hello, World!"}` |
//! | `POST /api/upload` | echoes the JSON body (400 if it is not JSON) |
//! | `GET /items/{id}` | `{"id":..,"name":..}` |
//! | `/slow?ms=N` | waits N ms, then 200 |
//! | `/status/N` | answers with status N |
//! | `/stall?ms=N` | sends the headers at once, the body after N ms |
//! | `/reset` | drops the connection with a TCP reset, no response |
//! | `GET /__stats` | `{"requests":N,"paths":{..}}`: what was received (not counted itself) |
//! | anything else | 404 |

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use std::future::Future;

use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Path of the statistics endpoint; requests to it are not counted.
pub const STATS_PATH: &str = "/__stats";

/// What the target has received.
#[derive(Default)]
pub struct Counts {
    requests: AtomicU64,
    paths: Mutex<HashMap<String, u64>>,
}

impl Counts {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests received per path.
    pub fn paths(&self) -> HashMap<String, u64> {
        self.paths.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn count(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut p) = self.paths.lock() {
            *p.entry(path.to_string()).or_insert(0) += 1;
        }
    }
}

/// A running target. It serves until the runtime it was started on shuts down.
pub struct Target {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
}

impl Target {
    /// Binds `addr` (use port 0 for an ephemeral port) and serves on the current runtime.
    pub async fn start(addr: SocketAddr) -> Result<Target> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let served = counts.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // Linger 0: closing a connection (as /reset does) sends a TCP reset.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                let _ = stream.set_nodelay(true);
                let counts = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, counts.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Target { addr, counts })
    }

    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts a target on a thread of its own (with its own runtime), for `demo` and for tests
    /// that want the target off the runner's threads.
    pub fn spawn_thread(addr: SocketAddr) -> Result<Target> {
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
                    let started = Target::start(addr).await;
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

#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset requested")
    }
}

impl std::error::Error for Reset {}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    if let Ok(ct) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, ct);
    }
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

fn query_ms(req: &Request<Incoming>) -> u64 {
    req.uri()
        .query()
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ms")
                .and_then(|(_, v)| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn handle(req: Request<Incoming>, counts: Arc<Counts>) -> Result<Response<Body>, Reset> {
    let path = req.uri().path().to_string();
    if path == STATS_PATH {
        let paths = counts.paths();
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({ "requests": counts.requests(), "paths": paths }),
        ));
    }
    counts.count(&path);
    let method = req.method().clone();
    let resp = match (method.as_str(), path.as_str()) {
        ("GET", "/hello") => json(StatusCode::OK, serde_json::json!({ "message": "Hello, World!" })),
        ("POST", "/api/upload") => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => json(StatusCode::OK, serde_json::json!({ "received": v })),
                Err(e) => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e.to_string() })),
            }
        }
        (_, "/slow") => {
            tokio::time::sleep(Duration::from_millis(query_ms(&req))).await;
            full(StatusCode::OK, "text/plain", "slow\n")
        }
        (_, "/stall") => {
            let sleep = Box::pin(tokio::time::sleep(Duration::from_millis(query_ms(&req))));
            let mut resp = Response::new(StallBody { sleep, done: false }.boxed());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain"),
            );
            resp
        }
        (_, "/reset") => return Err(Reset),
        (_, p) if p.starts_with("/status/") => match p["/status/".len()..]
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(code) => full(code, "text/plain", format!("status {}\n", code.as_u16())),
            None => full(StatusCode::BAD_REQUEST, "text/plain", "bad status code\n"),
        },
        ("GET", p) if p.starts_with("/items/") => {
            let id = &p["/items/".len()..];
            json(
                StatusCode::OK,
                serde_json::json!({ "id": id, "name": format!("item {id}") }),
            )
        }
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(resp)
}

/// A body that arrives when `sleep` ends, after the headers went out.
struct StallBody {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl hyper::body::Body for StallBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        match self.sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.done = true;
                std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"stalled\n")))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}
