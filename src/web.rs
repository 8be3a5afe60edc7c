//! `--web [ADDR]`: the live dashboard, its Stop button, and `/metrics` in Prometheus' text
//! format, served with hyper on the control thread's runtime (the workers never see it).
//!
//! The runner publishes to a [`Board`] once a tick (a second) and once at the end; the server
//! only reads what was published, so a slow browser or scraper costs the run nothing:
//! - `GET /`: the page (embedded here; no network needed). It shows the same cards, charts and
//!   tables as the `--html` report ([`crate::html::sections`]), rendered here each tick and
//!   pushed to the page as server-sent events.
//! - `GET /events`: those events (`text/event-stream`), one JSON object each.
//! - `GET /metrics`: counters of requests and failures, latency histograms, users.
//! - `POST /stop` (with the header `X-Stormlight: stop`, which a page of another origin cannot
//!   send without a preflight we never grant): ends the run as Ctrl-C does.
//!
//! With `--web-auth USER:PASS` ([`WebAuth`]) every route asks for HTTP Basic first (`401` and
//! `WWW-Authenticate: Basic realm="stormlight"` otherwise); the browser then sends the
//! credentials with the page's own requests (events, Stop) by itself.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, channel::Channel, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::stats::{Aggregate, RowStats, Summary};

/// `--web-auth USER:PASS`: the credentials every route of the dashboard asks for.
#[derive(Clone)]
pub struct WebAuth {
    user: String,
    /// `user:password`, as a Basic `Authorization` header carries it (base64-decoded).
    pair: Vec<u8>,
}

impl WebAuth {
    /// Reads `USER:PASS` (the first `:` splits; the password may hold more). Errors never
    /// repeat the value: it holds a password.
    pub fn parse(text: &str) -> Result<Self> {
        let Some((user, password)) = text.split_once(':') else {
            anyhow::bail!("--web-auth (or STORMLIGHT_WEB_AUTH): expected USER:PASS (the user, a colon, the password)");
        };
        if password.is_empty() {
            anyhow::bail!("--web-auth (or STORMLIGHT_WEB_AUTH): the password is empty (expected USER:PASS)");
        }
        Ok(Self {
            user: user.to_string(),
            pair: text.as_bytes().to_vec(),
        })
    }

    /// The user name (the password is never shown).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether `headers` carry these credentials as HTTP Basic; compared in constant time.
    fn admits(&self, headers: &hyper::HeaderMap) -> bool {
        use base64::Engine as _;
        let Some(value) = headers.get(hyper::header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let Some((scheme, encoded)) = value.split_at_checked(6) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"basic ") {
            return false;
        }
        let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()) else {
            return false;
        };
        pair.ct_eq(&self.pair).into()
    }
}

impl std::fmt::Debug for WebAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebAuth({}:***)", self.user)
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Users are being spawned or running.
    Running,
    /// The run has ended; requests in flight are finishing (the grace period).
    Stopping,
    /// Over, after its full duration (or its stages).
    Finished,
    /// Over, ended early: Ctrl-C, the Stop button, or a threshold's `abort_on_fail`.
    Stopped,
}

/// The run's state besides its counts, for the page's header.
pub struct Status {
    pub phase: Phase,
    pub elapsed: Duration,
    pub duration: Option<Duration>,
    /// Users running now.
    pub users: u64,
    /// Requests and failures per second over the last tick.
    pub rps_now: f64,
    pub fails_now: f64,
}

/// One server-sent event: the header's numbers and the sections as HTML.
#[derive(Serialize)]
struct Event<'a> {
    phase: Phase,
    elapsed_s: f64,
    duration_s: Option<f64>,
    users: u64,
    rps_now: f64,
    fails_now: f64,
    requests: u64,
    failures: u64,
    title: &'a str,
    run: String,
    /// Where the outputs went, once written (see [`Board::add_note`]).
    note: &'a str,
    html: String,
}

/// What the runner published last; read by the server's handlers.
pub struct Board {
    published: Mutex<Published>,
    /// Bumped on each publication: the event streams wait on it.
    version: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

#[derive(Default)]
struct Published {
    /// The last event's JSON (without the note) and the note, kept apart so that the note
    /// can be added after the outputs are written.
    event: Arc<str>,
    metrics: Arc<str>,
}

impl Board {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            published: Mutex::new(Published {
                // Until the test starts (users being prepared, --start-at): nothing counted yet.
                event: Arc::from(r#"{"phase":"starting","elapsed_s":0,"users":0,"rps_now":0,"fails_now":0,"html":""}"#),
                metrics: Arc::from(
                    "# HELP stormlight_running 1 while users are running, 0 before and after.\n# TYPE stormlight_running gauge\nstormlight_running 0\n",
                ),
            }),
            version: watch::channel(0).0,
            stop: watch::channel(false).0,
        })
    }

    /// Publishes the counts so far: `summary` for the page (its light form will do, see
    /// [`Aggregate::summary_light`]), `agg` for the metrics' histograms.
    pub fn publish(&self, summary: &Summary, agg: &Aggregate, status: &Status) {
        let event = Event {
            phase: status.phase,
            elapsed_s: (status.elapsed.as_secs_f64() * 10.0).round() / 10.0,
            duration_s: status.duration.map(|d| d.as_secs_f64()),
            users: status.users,
            rps_now: (status.rps_now * 10.0).round() / 10.0,
            fails_now: (status.fails_now * 10.0).round() / 10.0,
            requests: summary.total.requests,
            failures: summary.total.failures,
            title: &summary.config.script,
            run: format!(
                "{} · {} · host {}",
                summary.started_at,
                summary.config.load,
                summary.config.host.as_deref().unwrap_or("(urls in the scenario)")
            ),
            note: "",
            html: crate::html::sections(summary),
        };
        let event = serde_json::to_string(&event).unwrap_or_default();
        let metrics = metrics(summary, agg, status);
        {
            let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
            p.event = Arc::from(event);
            p.metrics = Arc::from(metrics);
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Adds a line under the page's header to the last event (where the outputs went).
    pub fn add_note(&self, note: &str) {
        {
            let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
            let Ok(mut event) = serde_json::from_str::<serde_json::Value>(&p.event) else {
                return;
            };
            event["note"] = note.into();
            p.event = Arc::from(event.to_string());
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Resolves when Stop is pressed on the page (never without a board).
    pub async fn stop_requested(board: Option<&Self>) {
        match board {
            Some(b) => {
                let mut rx = b.stop.subscribe();
                if rx.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    fn event(&self) -> Arc<str> {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).event.clone()
    }

    fn metrics_text(&self) -> Arc<str> {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).metrics.clone()
    }
}

/// Binds `addr` and serves the board there until the process ends, to clients with `auth`'s
/// credentials when given; returns the bound address (the port, when `addr` asked for port 0).
pub async fn serve(addr: SocketAddr, board: Arc<Board>, auth: Option<WebAuth>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--web: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: the dashboard waits rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (board, auth) = (board.clone(), auth.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let board = board.clone();
                    let allowed = auth.as_ref().is_none_or(|a| a.admits(req.headers()));
                    async move { Ok::<_, Infallible>(if allowed { handle(req, &board) } else { unauthorized() }) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("a valid content type"),
    );
    res.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    res
}

/// The answer to a request without the `--web-auth` credentials.
fn unauthorized() -> Response<Body> {
    let mut res = full(
        StatusCode::UNAUTHORIZED,
        "text/plain; charset=utf-8",
        "this dashboard needs the user and password of --web-auth\n",
    );
    res.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static(r#"Basic realm="stormlight""#),
    );
    res
}

fn handle(req: Request<Incoming>, board: &Arc<Board>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => full(StatusCode::OK, "text/html; charset=utf-8", page()),
        (&Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            board.metrics_text().to_string(),
        ),
        (&Method::GET, "/events") => events(board.clone()),
        (&Method::POST, "/stop") => {
            if req.headers().get("x-stormlight").is_none_or(|v| v != "stop") {
                return full(
                    StatusCode::FORBIDDEN,
                    "text/plain; charset=utf-8",
                    "POST /stop needs the header `X-Stormlight: stop`\n",
                );
            }
            board.stop.send_replace(true);
            full(StatusCode::ACCEPTED, "application/json", r#"{"stopping":true}"#)
        }
        (_, "/" | "/metrics" | "/events" | "/stop") => full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        ),
        _ => full(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
    }
}

/// The event stream: the last event at once, then each new one. A task per page, ending when
/// the page goes away (the next send fails) or the process ends.
fn events(board: Arc<Board>) -> Response<Body> {
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(2);
    let mut version = board.version.subscribe();
    tokio::spawn(async move {
        if tx.send_data(Bytes::from_static(b"retry: 1000\n\n")).await.is_err() {
            return;
        }
        loop {
            let event = board.event();
            if tx.send_data(Bytes::from(format!("data: {event}\n\n"))).await.is_err() {
                return;
            }
            if version.changed().await.is_err() {
                return;
            }
        }
    });
    let mut res = Response::new(body.boxed());
    let headers = res.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    res
}

/// Upper bounds of the latency histograms' buckets, in seconds (Prometheus' `le`).
const BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

/// A label value as Prometheus' text format wants it.
fn label(s: &str) -> String {
    s.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

/// A histogram family with a series per row.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    agg: &Aggregate,
    of: impl Fn(&RowStats) -> &hdrhistogram::Histogram<u64>,
) {
    family(out, name, "histogram", help);
    for (id, s) in agg.rows() {
        let h = of(s);
        let mut counts = [0u64; BUCKETS.len()];
        for v in h.iter_recorded() {
            // Each recorded value stands for a range of equal values (0.1 % wide): its middle.
            let secs = h.median_equivalent(v.value_iterated_to()) as f64 / 1e6;
            if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
                counts[i] += v.count_at_value();
            }
        }
        let labels = format!("method=\"{}\",name=\"{}\"", label(&id.method), label(&id.name));
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {}\n{name}_sum{{{labels}}} {:.6}\n{name}_count{{{labels}}} {}",
            h.len(),
            h.mean() * h.len() as f64 / 1e6,
            h.len()
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Prometheus' text exposition format (version 0.0.4). Counters are totals since the start;
/// the sum of `stormlight_requests_total` is the summary's total.
pub fn metrics(summary: &Summary, agg: &Aggregate, status: &Status) -> String {
    let mut out = String::new();
    type Count = fn(&RowStats) -> u64;
    let per_row: [(&str, &str, Count); 2] = [
        (
            "stormlight_requests_total",
            "Requests sent, successes and failures, by request name.",
            |s| s.requests,
        ),
        ("stormlight_failures_total", "Failed requests, by request name.", |s| {
            s.failures
        }),
    ];
    for (name, help, value) in per_row {
        family(&mut out, name, "counter", help);
        for (id, s) in agg.rows() {
            let _ = writeln!(
                out,
                "{name}{{method=\"{}\",name=\"{}\"}} {}",
                label(&id.method),
                label(&id.name),
                value(s)
            );
        }
    }
    family(
        &mut out,
        "stormlight_failure_reasons_total",
        "counter",
        "Failures by request name and reason (script errors under HOOK rows included).",
    );
    for f in &summary.failures {
        let _ = writeln!(
            out,
            "stormlight_failure_reasons_total{{method=\"{}\",name=\"{}\",reason=\"{}\"}} {}",
            label(&f.method),
            label(&f.name),
            label(&f.reason),
            f.count
        );
    }
    let service = "Response times as measured from each request's send, one observation per response, by request name.";
    histogram(&mut out, "stormlight_request_duration_seconds", service, agg, |s| {
        &s.service_us
    });
    let latency = "Latency as the summary's tables show it: corrected for coordinated omission (sends a stalled \
                   target held back are added as the observations they would have been), by request name.";
    histogram(&mut out, "stormlight_request_latency_seconds", latency, agg, |s| {
        &s.latency_us
    });
    family(
        &mut out,
        "stormlight_checks_total",
        "counter",
        "check() results by name.",
    );
    for c in &summary.checks {
        for (result, n) in [("pass", c.passes), ("fail", c.fails)] {
            let _ = writeln!(
                out,
                "stormlight_checks_total{{check=\"{}\",result=\"{result}\"}} {n}",
                label(&c.name)
            );
        }
    }
    let plain = [
        (
            "stormlight_script_errors_total",
            "counter",
            "Script errors outside any request.",
            summary.script_errors as f64,
        ),
        (
            "stormlight_dropped_iterations_total",
            "counter",
            "Open model: scheduled iterations that found no free user.",
            summary.dropped_iterations as f64,
        ),
        ("stormlight_users", "gauge", "Users running.", status.users as f64),
        (
            "stormlight_elapsed_seconds",
            "gauge",
            "Time since the run started.",
            status.elapsed.as_secs_f64(),
        ),
        (
            "stormlight_running",
            "gauge",
            "1 while users are running, 0 before and after (the counters are then final).",
            if status.phase == Phase::Running { 1.0 } else { 0.0 },
        ),
    ];
    for (name, kind, help, value) in plain {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    out
}

/// The dashboard page: the report's style, a header with the run's state and the Stop button,
/// and a little script that swaps in each event's sections.
fn page() -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>stormlight (live)</title><style>{}{DASH_STYLE}</style></head><body><main>
<header class="top"><div><h1 id="title">stormlight</h1><p class="run" id="run">connecting…</p></div>
<div class="state"><span id="phase" class="phase">connecting</span><button id="stop" type="button" disabled>Stop</button></div></header>
<section class="now"><div><b id="clock">0:00</b>elapsed</div><div><b id="users">0</b>users</div><div><b id="rps">0</b>requests/s now</div><div><b id="fails">0</b>failures/s now</div></section>
<div class="progress"><div id="progress"></div></div>
<p id="note" class="note"></p>
<div id="live"></div>
</main><script>{DASH_SCRIPT}</script></body></html>
"#,
        crate::html::STYLE
    )
}

const DASH_STYLE: &str = ".top{display:flex;justify-content:space-between;align-items:flex-start;gap:16px}\
.state{display:flex;gap:12px;align-items:center}.phase{padding:4px 10px;border-radius:999px;background:#e5e7eb;font-weight:600}\
.phase.running{background:#dcfce7;color:#166534}.phase.stopping{background:#fef3c7;color:#92400e}\
.phase.finished,.phase.stopped{background:#e0e7ff;color:#3730a3}.phase.starting{background:#fef9c3;color:#854d0e}.phase.disconnected{background:#fee2e2;color:#991b1b}\
button{font:inherit;font-weight:600;padding:8px 18px;border-radius:8px;border:1px solid #b91c1c;background:#dc2626;color:#fff;cursor:pointer}\
button:disabled{background:#e5e7eb;border-color:#d1d5db;color:#6b7280;cursor:default}\
.now{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:10px}.now div{background:#111827;color:#d1d5db;border-radius:8px;padding:8px 16px}\
.now b{display:block;font-size:20px;color:#fff}.now div.bad{background:#7f1d1d}.progress{height:6px;background:#e5e7eb;border-radius:3px;overflow:hidden;margin:4px 0 12px}\
.progress div{height:100%;width:0;background:#2563eb}.note{color:#374151;min-height:1em}";

const DASH_SCRIPT: &str = r#"
const $ = (id) => document.getElementById(id);
const clock = (s) => { s = Math.floor(s); return Math.floor(s / 60) + ':' + String(s % 60).padStart(2, '0'); };
let over = false;
// The page's own address without a user and password: a page opened as
// http://user:pass@host/ may not fetch a URL that carries them (the browser sends the
// credentials it was given by itself).
const base = location.origin + location.pathname.replace(/[^/]*$/, '');
const events = new EventSource(base + 'events');
events.onmessage = (e) => {
  const d = JSON.parse(e.data);
  if (d.title) { $('title').textContent = 'stormlight: ' + d.title; document.title = 'stormlight (' + d.phase + '): ' + d.title; }
  if (d.run) $('run').textContent = d.run;
  $('phase').textContent = d.phase;
  $('phase').className = 'phase ' + d.phase;
  $('clock').textContent = clock(d.elapsed_s) + (d.duration_s ? ' / ' + clock(d.duration_s) : '');
  const ended = d.phase === 'finished' || d.phase === 'stopped';
  $('users').textContent = ended ? '–' : d.users;
  $('rps').textContent = ended ? '–' : d.rps_now;
  $('fails').textContent = ended ? '–' : d.fails_now;
  $('fails').parentElement.className = !ended && d.fails_now > 0 ? 'bad' : '';
  $('progress').style.width = d.phase === 'finished' ? '100%' : (d.duration_s ? Math.min(100, 100 * d.elapsed_s / d.duration_s) + '%' : '0');
  $('note').textContent = d.note || '';
  $('live').innerHTML = d.html;
  $('stop').disabled = d.phase !== 'running';
  if (d.phase === 'finished' || d.phase === 'stopped') { over = true; if (d.note) events.close(); }
};
events.onerror = () => {
  if (over) { events.close(); return; }
  $('phase').textContent = 'disconnected';
  $('phase').className = 'phase disconnected';
};
$('stop').onclick = () => {
  $('stop').disabled = true;
  $('phase').textContent = 'stopping';
  $('phase').className = 'phase stopping';
  fetch(base + 'stop', { method: 'POST', headers: { 'X-Stormlight': 'stop' } });
};
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(value: &str) -> hyper::HeaderMap {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(hyper::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn web_auth_admits_its_own_basic_creds_only() {
        use base64::Engine as _;
        let auth = WebAuth::parse("prom:s3cr:et").unwrap();
        assert_eq!(auth.user(), "prom");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert!(auth.admits(&basic(&format!("Basic {}", b64("prom:s3cr:et")))));
        assert!(auth.admits(&basic(&format!("basic  {} ", b64("prom:s3cr:et")))));
        for wrong in [
            format!("Basic {}", b64("prom:s3cr")),
            format!("Basic {}", b64("prom:s3cr:etc")),
            format!("Basic {}", b64("other:s3cr:et")),
            format!("Bearer {}", b64("prom:s3cr:et")),
            "Basic !!!".to_string(),
            "Basic".to_string(),
        ] {
            assert!(!auth.admits(&basic(&wrong)), "{wrong}");
        }
        assert!(!auth.admits(&hyper::HeaderMap::new()));
        assert!(!format!("{auth:?}").contains("s3cr"));
        for bad in ["prom", "prom:", ""] {
            let e = WebAuth::parse(bad).unwrap_err().to_string();
            assert!(e.contains("USER:PASS"), "{e}");
        }
    }
}
