//! `--web`: the live dashboard, its Stop button and `/metrics`, against the real binary and
//! the built-in target. The browser test drives Debian's Chromium through chromedriver
//! (WebDriver is plain HTTP and JSON); it is skipped with a message where they are missing,
//! and required under CI (`.ci/run` installs them).
//!
//! Every child is bounded: the runs are stopped by the test (or end by their `-t`), and a
//! child still running when its test ends is killed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_stormlight");

/// The binary running with `--web`; its stderr collected as it comes.
struct Run {
    child: Child,
    stderr: Arc<Mutex<String>>,
    web: SocketAddr,
}

impl Run {
    fn start(args: &[&str]) -> Run {
        Run::start_with_env(args, &[])
    }

    /// [`Run::start`], with variables added to the child's environment.
    fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stormlight");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, into) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = into.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut run = Run {
            child,
            stderr,
            web: "0.0.0.0:0".parse().unwrap(),
        };
        let line = run.wait_for_stderr("dashboard: http://", Duration::from_secs(20));
        let addr = line
            .split("dashboard: http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("the dashboard's address");
        run.web = addr.parse().expect("a socket address");
        run
    }

    /// `run SCRIPT` against the target for up to 60 s with `--web` on a free port, `--out`,
    /// and `extra` flags.
    fn web_run(script: &Path, t: &stormlight::target::Target, out: &Path, extra: &[&str]) -> Run {
        let (script, host, out) = (script.to_str().unwrap(), t.url(), out.to_str().unwrap());
        let mut args = vec![
            "run",
            script,
            "--host",
            &host,
            "-t",
            "60s",
            "-q",
            "--web=127.0.0.1:0",
            "--out",
            out,
        ];
        args.extend(extra);
        Run::start(&args)
    }

    /// Waits until stderr has a line containing `text`; returns that line.
    fn wait_for_stderr(&mut self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.stderr.lock().unwrap().lines().find(|l| l.contains(text)) {
                return line.to_string();
            }
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                panic!("no {text:?} on stderr:\n{}", self.stderr.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("still running after {limit:?}:\n{}", self.stderr.lock().unwrap());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; the status and the (de-chunked) body.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then the body by its length (a server may keep the connection open).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).expect("read a response");
        assert!(n > 0, "the connection closed before a response head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status");
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let have = raw.len() - head_end;
        let done = match length {
            Some(n) => have >= n,
            None if chunked => raw.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        match s.read(&mut buf).expect("read a response body") {
            0 => break,
            n => raw.extend_from_slice(&buf[..n]),
        }
    }
    let rest = String::from_utf8_lossy(&raw[head_end..]).into_owned();
    let body = if chunked {
        let (mut out, mut rest) = (String::new(), rest.as_str());
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest
    };
    (status, body)
}

fn scenario(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("web.lua");
    std::fs::write(
        &script,
        r#"endpoints = { Task("GET", "/hello"), Task("GET", "/status/503", { name = "down", weight = 1 }) }
wait_time = constant(0.01)
"#,
    )
    .unwrap();
    script
}

fn temp_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("stormlight-web-{what}-{}", std::process::id()))
}

/// The sum of a counter family's samples.
fn counter_sum(text: &str, name: &str) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a counter or gauge"),
        })
        .sum()
}

#[test]
fn metrics_parse_and_their_request_counter_equals_the_summary_total() {
    let t = common::target();
    let dir = temp_dir("metrics");
    let script = scenario(&dir);
    let out = dir.join("out.json");
    let mut run = Run::web_run(&script, &t, &out, &["-u", "4", "--linger"]);
    // Past the second tick: the users all started within the first second, even on a busy
    // machine, and the numbers of a tick after that show them.
    std::thread::sleep(Duration::from_millis(2500));
    let (status, during) = http(run.web, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(during.lines().map(|l| Ok(l.to_string()))).expect("parses");
    let names: std::collections::BTreeSet<_> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in [
        "stormlight_requests_total",
        "stormlight_failures_total",
        "stormlight_failure_reasons_total",
        "stormlight_request_duration_seconds",
        "stormlight_request_latency_seconds",
        "stormlight_users",
        "stormlight_running",
    ] {
        assert!(names.contains(name), "{name} missing from\n{during}");
    }
    assert!(counter_sum(&during, "stormlight_requests_total") > 0.0, "{during}");
    // Histograms: buckets that only grow, ending at the count.
    for sample in scrape
        .samples
        .iter()
        .filter(|s| s.metric == "stormlight_request_duration_seconds")
    {
        let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
            panic!("not a histogram: {sample:?}")
        };
        assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count), "{buckets:?}");
        assert!(buckets.last().unwrap().less_than.is_infinite());
    }
    assert_eq!(counter_sum(&during, "stormlight_users"), 4.0, "{during}");
    assert_eq!(counter_sum(&during, "stormlight_running"), 1.0);
    // A page of another origin cannot stop the run: the header is required.
    assert_eq!(http(run.web, "POST", "/stop", &[], "").0, 403);
    assert_eq!(http(run.web, "GET", "/stop", &[], "").0, 405);
    assert_eq!(http(run.web, "POST", "/stop", &[("X-Stormlight", "stop")], "").0, 202);
    run.wait_for_stderr("--linger", Duration::from_secs(20));
    let (_, after) = http(run.web, "GET", "/metrics", &[], "");
    assert_eq!(counter_sum(&after, "stormlight_running"), 0.0, "{after}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let total = summary["total"]["requests"].as_u64().unwrap();
    assert_eq!(counter_sum(&after, "stormlight_requests_total"), total as f64);
    assert_eq!(
        counter_sum(&after, "stormlight_failures_total"),
        summary["total"]["failures"].as_f64().unwrap()
    );
    assert_eq!(
        total,
        t.counts.requests(),
        "every request the target received, counted once"
    );
    assert!(summary["interrupted"].as_bool().unwrap(), "Stop ends the run early");
    // --linger: still serving until Ctrl-C.
    assert_eq!(http(run.web, "GET", "/metrics", &[], "").1, after);
    Command::new("kill")
        .args(["-INT", &run.child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(run.wait(Duration::from_secs(10)), Some(130));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_web_address_is_checked_before_any_traffic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let t = common::target();
    let dir = temp_dir("addr");
    let script = scenario(&dir);
    for (addr, says) in [
        (format!("127.0.0.1:{port}"), "--web: cannot listen on"),
        ("nowhere".to_string(), "invalid value 'nowhere' for '--web"),
    ] {
        let out = Command::new(BIN)
            .args(["run", script.to_str().unwrap(), "--host", &t.url(), "-t", "5s"])
            .arg(format!("--web={addr}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    assert_eq!(t.counts.requests(), 0);
    let out = Command::new(BIN)
        .args(["run", script.to_str().unwrap(), "--linger"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--linger needs --web");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// chromedriver and Chromium, or `None` (skipped) outside CI.
fn chromedriver() -> Option<(Child, SocketAddr)> {
    let found = ["chromium", "chromedriver"].iter().all(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium and chromedriver (.ci/run installs them)"
        );
        eprintln!("skipped: no chromium or chromedriver here (CI installs them)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((child, addr))
}

/// A WebDriver session: the few commands the test needs.
struct Browser {
    driver: SocketAddr,
    session: String,
}

impl Browser {
    fn open(driver: SocketAddr) -> Browser {
        // One profile per browser: two at once may not share one.
        static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let profile = temp_dir(&format!("chromium-profile-{n}"));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--no-first-run", "--window-size=1400,1200",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let v = Self::call(driver, "POST", "/session", &caps);
        let session = v["sessionId"].as_str().expect("a session").to_string();
        Browser { driver, session }
    }

    fn call(driver: SocketAddr, method: &str, path: &str, body: &Value) -> Value {
        let (status, text) = http(
            driver,
            method,
            path,
            &[("Content-Type", "application/json")],
            &body.to_string(),
        );
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("webdriver: {status} {text}"));
        assert_eq!(status, 200, "webdriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        Self::call(self.driver, method, &format!("/session/{}{path}", self.session), &body)
    }

    fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": js, "args": []}))
    }

    /// Clicks the element `css` selects.
    fn click(&self, css: &str) {
        let found = self.cmd("POST", "/element", json!({"using": "css selector", "value": css}));
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string();
        self.cmd("POST", &format!("/element/{id}/click"), json!({}));
    }

    /// Waits until `js` returns something truthy; returns it.
    fn until(&self, js: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.script(js);
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {js}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(self.driver, "DELETE", &format!("/session/{}", self.session), &[], "");
    }
}

#[test]
fn the_dashboard_updates_in_headless_chromium_and_stop_ends_the_run_with_the_summary_written() {
    let Some((mut driver, driver_addr)) = chromedriver() else {
        return;
    };
    let t = common::target();
    let dir = temp_dir("dashboard");
    let script = scenario(&dir);
    let out = dir.join("out.json");
    let mut run = Run::web_run(&script, &t, &out, &["-u", "3"]);
    let browser = Browser::open(driver_addr);
    browser.cmd("POST", "/url", json!({"url": format!("http://{}/", run.web)}));
    // The requests card, as a number, once the page shows one.
    let requests = "const b = document.querySelector('.cards b'); return b ? Number(b.textContent) : 0;";
    let first = browser.until(requests, Duration::from_secs(15)).as_f64().unwrap();
    std::thread::sleep(Duration::from_millis(2200));
    let second = browser.script(requests).as_f64().unwrap();
    assert!(
        second > first,
        "the numbers grow between two reads: {first} then {second}"
    );
    assert_eq!(
        browser.script("return document.getElementById('phase').textContent"),
        "running"
    );
    let drawn = browser.script("return document.querySelectorAll('#live svg polyline').length");
    assert!(drawn.as_u64().unwrap() >= 6, "the charts are drawn: {drawn}");
    let rows = browser.script(
        "return [...document.querySelectorAll('table[data-table=endpoints] tbody td:nth-child(2)')].map(td => td.textContent)",
    );
    assert_eq!(rows, json!(["/hello", "down"]));

    browser.click("#stop");
    assert_eq!(
        run.wait(Duration::from_secs(20)),
        Some(130),
        "Stop ends the run like Ctrl-C"
    );
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&out).expect("the summary is written")).unwrap();
    assert_eq!(summary["total"]["requests"].as_u64().unwrap(), t.counts.requests());
    assert!(summary["interrupted"].as_bool().unwrap());
    // The page got the last event before the process ended.
    let phase = browser.until(
        "const p = document.getElementById('phase').textContent; return p === 'stopped' ? p : '';",
        Duration::from_secs(5),
    );
    assert_eq!(phase, "stopped");
    let note = browser.script("return document.getElementById('note').textContent");
    assert!(note.as_str().unwrap().contains("out.json"), "{note}");
    let shown = browser.script("return Number(document.querySelector('.cards b').textContent)");
    assert_eq!(
        shown.as_u64(),
        summary["total"]["requests"].as_u64(),
        "the page's last numbers are the summary's"
    );
    drop(browser);
    let _ = driver.kill();
    let _ = driver.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stop_or_ctrl_c_while_setup_runs_still_ends_with_the_summary_written() {
    let t = common::target();
    let dir = temp_dir("setup-stop");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("slow_setup.lua");
    std::fs::write(
        &script,
        "endpoints = { Task(\"GET\", \"/hello\") }\nfunction setup() http.get(\"/items/1\") sleep(30) return {} end\n",
    )
    .unwrap();
    for how in ["stop", "sigint"] {
        let out = dir.join(format!("{how}.json"));
        let mut run = Run::web_run(&script, &t, &out, &["-u", "2"]);
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(
            http(run.web, "GET", "/metrics", &[], "").1.trim_end().lines().last(),
            Some("stormlight_running 0")
        );
        match how {
            "stop" => assert_eq!(http(run.web, "POST", "/stop", &[("X-Stormlight", "stop")], "").0, 202),
            _ => {
                Command::new("kill")
                    .args(["-INT", &run.child.id().to_string()])
                    .status()
                    .unwrap();
            }
        }
        assert_eq!(
            run.wait(Duration::from_secs(20)),
            Some(130),
            "{how}: {}",
            run.stderr.lock().unwrap()
        );
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(&out).expect("the summary is written")).unwrap();
        assert!(summary["interrupted"].as_bool().unwrap());
        assert_eq!(summary["total"]["requests"], 1, "setup()'s request, counted");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `Basic base64(pair)`.
fn basic(pair: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
}

/// The status and head of a response (lower-case), read no further: for `/events`, whose
/// body never ends.
fn head_of(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("read a response head");
        assert!(n > 0, "the connection closed before a response head");
        raw.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status");
    (status, head)
}

/// The first event of `/events` with data in it (the raw text up to its end).
fn first_event(addr: SocketAddr, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET /events HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some(at) = raw.find("data: ")
            && raw[at..].contains("\n\n")
        {
            return raw;
        }
        let n = s.read(&mut buf).expect("read the event stream");
        assert!(n > 0, "the event stream ended:\n{raw}");
        raw.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn metrics_and_events_hide_url_creds() {
    const SECRET: &str = "s3cr3t-pw";
    let t = common::target();
    let dir = temp_dir("creds");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("creds.lua");
    std::fs::write(
        &script,
        format!(
            r#"wait_time = constant(0.02)
endpoints = {{ Task("GET", "/hello"), {{ method = "GET", url = "http://ada:{SECRET}@{}/status/503" }} }}
"#,
            t.addr
        ),
    )
    .unwrap();
    let host = format!("http://bo:{SECRET}@{}", t.addr);
    let mut run = Run::start(&[
        "run",
        script.to_str().unwrap(),
        "--host",
        &host,
        "-t",
        "60s",
        "-q",
        "--web=127.0.0.1:0",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, metrics) = http(run.web, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert!(!metrics.contains(SECRET), "{metrics}");
    let labelled = format!("name=\"http://ada:***@{}/status/503\"", t.addr);
    for family in ["stormlight_requests_total{", "stormlight_failure_reasons_total{"] {
        assert!(
            metrics.lines().any(|l| l.starts_with(family) && l.contains(&labelled)),
            "{family} has no redacted row:\n{metrics}"
        );
    }
    let event = first_event(run.web, &[]);
    assert!(!event.contains(SECRET), "{event}");
    assert!(event.contains("bo:***@") && event.contains("ada:***@"), "{event}");
    assert!(!run.stderr.lock().unwrap().contains(SECRET));
    assert_eq!(http(run.web, "POST", "/stop", &[("X-Stormlight", "stop")], "").0, 202);
    assert_eq!(run.wait(Duration::from_secs(20)), Some(130));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn web_auth_guards_every_route_and_only_its_stop_ends_the_run() {
    let t = common::target();
    let dir = temp_dir("auth");
    let script = scenario(&dir);
    let out = dir.join("out.json");
    let mut run = Run::web_run(&script, &t, &out, &["-u", "1", "--web-auth", "prom:pa:ss"]);
    let right = basic("prom:pa:ss");
    let routes = [("GET", "/"), ("GET", "/metrics"), ("GET", "/events"), ("POST", "/stop")];
    for wrong in [
        None,
        Some(basic("prom:pa")),
        Some(basic("other:pa:ss")),
        Some("Bearer x".into()),
    ] {
        for (method, path) in routes {
            let mut headers = vec![("X-Stormlight", "stop")];
            if let Some(w) = &wrong {
                headers.push(("Authorization", w));
            }
            let (status, head) = head_of(run.web, method, path, &headers);
            assert_eq!(status, 401, "{method} {path} with {wrong:?}");
            assert!(head.contains("www-authenticate: basic realm=\"stormlight\""), "{head}");
        }
    }
    let auth = [("Authorization", right.as_str())];
    assert_eq!(http(run.web, "GET", "/", &auth, "").0, 200);
    assert_eq!(head_of(run.web, "GET", "/events", &auth).0, 200);
    assert!(first_event(run.web, &auth).contains("data: {"));
    std::thread::sleep(Duration::from_millis(1200));
    let (status, metrics) = http(run.web, "GET", "/metrics", &auth, "");
    assert_eq!(status, 200);
    assert_eq!(counter_sum(&metrics, "stormlight_running"), 1.0, "{metrics}");
    // The wrong credentials' Stop (above) left the run going.
    assert!(run.child.try_wait().unwrap().is_none(), "the run is still going");
    let stop = [("Authorization", right.as_str()), ("X-Stormlight", "stop")];
    assert_eq!(http(run.web, "POST", "/stop", &stop, "").0, 202);
    assert_eq!(run.wait(Duration::from_secs(20)), Some(130), "the right Stop ends it");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(summary["interrupted"].as_bool().unwrap());

    // From the environment, and the flag wins over it.
    for (flags, env, accepted, refused) in [
        (vec![], "prom:pw", "prom:pw", "prom:px"),
        (vec!["--web-auth", "cli:pw"], "prom:pw", "cli:pw", "prom:pw"),
    ] {
        let mut args = vec!["run", script.to_str().unwrap(), "--host"];
        let host = t.url();
        args.extend([host.as_str(), "-t", "60s", "-q", "--web=127.0.0.1:0"]);
        args.extend(flags);
        let mut run = Run::start_with_env(&args, &[("STORMLIGHT_WEB_AUTH", env)]);
        let (yes, no) = (basic(accepted), basic(refused));
        assert_eq!(http(run.web, "GET", "/metrics", &[("Authorization", &no)], "").0, 401);
        assert_eq!(http(run.web, "GET", "/metrics", &[("Authorization", &yes)], "").0, 200);
        let stop = [("Authorization", yes.as_str()), ("X-Stormlight", "stop")];
        assert_eq!(http(run.web, "POST", "/stop", &stop, "").0, 202);
        assert_eq!(run.wait(Duration::from_secs(20)), Some(130));
        assert!(!run.stderr.lock().unwrap().contains(":pw"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn web_auth_is_bad_input_without_web_or_without_a_colon() {
    let t = common::target();
    let dir = temp_dir("auth-bad");
    let script = scenario(&dir);
    let run = |flags: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .args(["run", script.to_str().unwrap(), "--host", &t.url(), "-t", "1s", "-q"])
            .args(flags)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (flags, env, says) in [
        (&["--web-auth", "prom:pw"][..], &[][..], "give it with --web"),
        (&["--web=127.0.0.1:0", "--web-auth", "prompw"], &[], "USER:PASS"),
        (
            &["--web=127.0.0.1:0"],
            &[("STORMLIGHT_WEB_AUTH", "prompw")],
            "USER:PASS",
        ),
    ] {
        let (code, stderr) = run(flags, env);
        assert_eq!(code, Some(2), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(says) && !stderr.contains("prompw"),
            "{flags:?}: {stderr}"
        );
    }
    assert_eq!(t.counts.requests(), 0, "bad input sends nothing");
    // Without --web, the environment's credentials are not asked for.
    let (code, stderr) = run(&[], &[("STORMLIGHT_WEB_AUTH", "prompw")]);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_dashboard_beyond_loopback_is_warned_about_before_the_run() {
    let t = common::target();
    let dir = temp_dir("exposed");
    let script = scenario(&dir);
    for (web, auth, says) in [
        ("--web=0.0.0.0:0", None, Some("Protect it with --web-auth USER:PASS")),
        (
            "--web=0.0.0.0:0",
            Some("prom:pw"),
            Some("it is protected by --web-auth"),
        ),
        ("--web=127.0.0.1:0", None, None),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "run",
            script.to_str().unwrap(),
            "--host",
            &t.url(),
            "-t",
            "1s",
            "-q",
            web,
        ]);
        if let Some(a) = auth {
            cmd.args(["--web-auth", a]);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let warning = stderr.lines().position(|l| l.contains("listens beyond loopback"));
        match says {
            Some(text) => {
                let at = warning.unwrap_or_else(|| panic!("no warning:\n{stderr}"));
                let line = stderr.lines().nth(at).unwrap();
                assert!(line.starts_with("warning: ") && line.contains(text), "{line}");
                assert!(line.contains("press Stop") && line.contains("port "), "{line}");
                let before = stderr.lines().nth(at - 1).unwrap();
                assert!(before.starts_with("dashboard: http://0.0.0.0:"), "{stderr}");
            }
            None => assert!(warning.is_none(), "{stderr}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_dashboard_behind_web_auth_works_in_headless_chromium() {
    let Some((mut driver, driver_addr)) = chromedriver() else {
        return;
    };
    let t = common::target();
    let dir = temp_dir("dashboard-auth");
    let script = scenario(&dir);
    let out = dir.join("out.json");
    let mut run = Run::web_run(&script, &t, &out, &["-u", "2", "--web-auth", "prom:pw"]);
    let browser = Browser::open(driver_addr);
    // The credentials in the address, as a user may type them (or answer the browser's prompt).
    browser.cmd("POST", "/url", json!({"url": format!("http://prom:pw@{}/", run.web)}));
    let requests = "const b = document.querySelector('.cards b'); return b ? Number(b.textContent) : 0;";
    assert!(browser.until(requests, Duration::from_secs(15)).as_f64().unwrap() > 0.0);
    browser.click("#stop");
    assert_eq!(
        run.wait(Duration::from_secs(20)),
        Some(130),
        "the page's Stop reaches the run through --web-auth"
    );
    let phase = browser.until(
        "const p = document.getElementById('phase').textContent; return p === 'stopped' ? p : '';",
        Duration::from_secs(5),
    );
    assert_eq!(phase, "stopped");
    drop(browser);
    let _ = driver.kill();
    let _ = driver.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}
