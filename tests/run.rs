//! In-process runs against the built-in target on an ephemeral port: the summary's counts are
//! compared with what the target actually received.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use stormlight::config::{LiveMode, Overrides};
use stormlight::scenario::sandbox::Limits;
use stormlight::stats::Summary;

mod common;
use common::{row, target};

/// Runs `source` for `secs` with `users` users against `host`, with the given sandbox limits.
fn run(source: &str, host: &str, users: u32, secs: f64, limits: Limits) -> Summary {
    let flags = Overrides {
        host: Some(host.to_string()),
        users: Some(users),
        duration: Some(Duration::from_secs_f64(secs)),
        grace: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    common::run_scenario(Path::new("test.lua"), source, limits, flags)
}

fn reasons(s: &Summary) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for f in &s.failures {
        *out.entry(format!("{} {}: {}", f.method, f.name, f.reason)).or_insert(0) += f.count;
    }
    out
}

#[test]
fn totals_equal_what_the_target_received_and_weights_hold() {
    let t = target();
    let s = run(
        r#"
        endpoints = {
          Task("GET", "/hello"),
          Task("GET", "/items/1", { name = "/items/[id]", weight = 3 }),
          Task("POST", "/api/upload", { json = { name = "x", price = 1 }, weight = 4 }),
        }
        "#,
        &t.url(),
        8,
        2.0,
        Limits::default(),
    );
    let received = t.counts.requests();
    assert!(received > 2000, "too few requests to judge weights: {received}");
    assert_eq!(s.total.requests, received, "every request sent is counted exactly once");
    assert_eq!(s.total.failures, 0, "{:?}", s.failures);
    let sum: u64 = s.endpoints.iter().map(|r| r.requests).sum();
    assert_eq!(sum, s.total.requests);
    let paths = t.counts.paths();
    for (name, path, weight) in [
        ("/hello", "/hello", 1.0),
        ("/items/[id]", "/items/1", 3.0),
        ("/api/upload", "/api/upload", 4.0),
    ] {
        let r = row(&s, name);
        assert_eq!(
            r.requests, paths[path],
            "row {name} matches the target's count for {path}"
        );
        let share = r.requests as f64 / s.total.requests as f64;
        assert!(
            (share - weight / 8.0).abs() < 0.03,
            "{name}: share {share:.3}, expected {:.3}",
            weight / 8.0
        );
    }
    // Body bytes read are counted per row: /hello always answers the same 27 bytes.
    let hello = row(&s, "/hello");
    assert_eq!(
        hello.bytes_received,
        hello.requests * r#"{"message":"Hello, World!"}"#.len() as u64
    );
    let bytes: u64 = s.endpoints.iter().map(|r| r.bytes_received).sum();
    assert_eq!(s.total.bytes_received, bytes);
    let lat = s.total.latency_ms.expect("latencies recorded");
    assert!(lat.p50 > 0.0 && lat.p50 <= lat.p99);
    assert!(s.total.rps > 0.0);
}

#[test]
fn faults_are_counted_with_distinct_reasons_and_the_run_finishes() {
    let t = target();
    // A port that was free a moment ago: nothing listens, so connecting is refused.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let s = run(
        &format!(
            r#"
            endpoints = {{
              Task("GET", "/hello"),
              Task("GET", "/status/500"),
              Task("GET", "/reset"),
              Task("GET", "/stall?ms=5000", {{ name = "/stall", timeout = "200ms" }}),
              {{ method = "GET", url = "http://{dead}/nothing", name = "refused" }},
            }}
            "#
        ),
        &t.url(),
        5,
        2.0,
        Limits::default(),
    );
    let r = reasons(&s);
    for (name, reason) in [
        ("/status/500", "HTTP 500"),
        ("/reset", "connection reset"),
        ("/stall", "request timeout"),
        ("refused", "connection refused"),
    ] {
        assert_eq!(
            r.get(&format!("GET {name}: {reason}")),
            Some(&row(&s, name).requests),
            "{r:?}"
        );
    }
    assert_eq!(row(&s, "/hello").failures, 0);
    // Everything but the refused requests reached the target, and was counted once.
    assert_eq!(s.total.requests - row(&s, "refused").requests, t.counts.requests());
    let failed: u64 = s.failures.iter().map(|f| f.count).sum();
    assert_eq!(failed, s.total.failures);
    for name in ["/status/500", "/reset", "/stall", "refused"] {
        let r = row(&s, name);
        assert!(r.requests > 0 && r.failures == r.requests, "{name}: {r:?}");
    }
}

#[test]
fn sandbox_escapes_and_runaway_hooks_are_stopped_and_the_run_goes_on() {
    let t = target();
    let cases = [
        ("io", "io.open('/etc/passwd')", "global 'io'"),
        ("exec", "os.execute('touch /tmp/stormlight-pwned')", "field 'execute'"),
        ("require", "require('socket')", "global 'require'"),
        (
            "bytecode",
            r#"local f, err = load("\27Lua\84\0\25\147\13\10\26\10") assert(f, err)"#,
            "binary chunk",
        ),
        ("dump", "string.dump(function() end)", "field 'dump'"),
        ("debug", "debug.getinfo(1)", "global 'debug'"),
        ("loop", "while true do end", "instruction budget"),
        (
            "pcall_loop",
            "while true do pcall(function() while true do end end) end",
            "instruction budget",
        ),
        (
            "memory",
            "local s = 'x' while true do s = s .. string.rep('y', #s) end",
            "memory limit",
        ),
    ];
    let mut endpoints = String::from("Task('GET', '/hello', { name = 'ok' }),\n");
    let mut dispatch = String::new();
    for (name, code, _) in &cases {
        endpoints.push_str(&format!("Task('GET', '/hello', {{ name = '{name}' }}),\n"));
        dispatch.push_str(&format!("  if req.name == '{name}' then {code} end\n"));
    }
    let source = format!("endpoints = {{\n{endpoints}}}\nfunction before_request(user, req)\n{dispatch}end\n");
    let limits = Limits {
        memory: 8 << 20,
        instructions: 5_000_000,
        ..Default::default()
    };
    let s = run(&source, &t.url(), 2, 2.0, limits);

    let r = reasons(&s);
    for (name, _, expected) in &cases {
        let row = row(&s, name);
        assert!(row.requests > 0, "{name} was never picked");
        assert_eq!(row.failures, row.requests, "{name}: every attempt fails");
        assert!(row.latency_ms.is_none(), "{name}: nothing was sent, so no latency");
        let (reason, count) = r
            .iter()
            .find(|(k, _)| k.starts_with(&format!("GET {name}: ")))
            .unwrap_or_else(|| panic!("no failure for {name}: {r:?}"));
        assert_eq!(*count, row.requests, "{name}: one reason");
        // Runaways are their own class, "script limit"; escapes are plain errors.
        let class = if ["loop", "pcall_loop", "memory"].contains(name) {
            "script limit: before_request"
        } else {
            "script error: before_request"
        };
        assert!(reason.contains(class) && reason.contains(expected), "{name}: {reason}");
    }
    assert!(!Path::new("/tmp/stormlight-pwned").exists());
    let ok = row(&s, "ok");
    assert!(ok.requests > 0 && ok.failures == 0, "the run goes on: {ok:?}");
    assert_eq!(t.counts.requests(), ok.requests, "only the good requests were sent");
}

#[test]
fn hooks_change_requests_and_judge_responses() {
    let t = target();
    let s = run(
        r#"
        endpoints = { Task("GET", "/hello"), Task("POST", "/api/upload", { json = { n = 1 } }) }
        function on_start(user) user.vars.token = "t" .. user.id end
        function before_request(user, req)
          req.headers["Authorization"] = "Bearer " .. user.vars.token
          if req.method == "POST" then req.body = nil; req.json = { user = user.id } end
          if req.path == "/hello" then req.path = "/status/404"; req.name = "renamed" end
        end
        function after_response(user, req, res)
          if req.name == "renamed" then
            if res.status == 404 then return true end
            return false, "expected 404, got " .. res.status
          end
          if not res.body:find('"user":' .. user.id, 1, true) then return false, "echo lacks user id" end
        end
        "#,
        &t.url(),
        3,
        1.5,
        Limits::default(),
    );
    let paths = t.counts.paths();
    assert_eq!(row(&s, "renamed").requests, paths["/status/404"]);
    assert_eq!(
        row(&s, "renamed").failures,
        0,
        "after_response turned the 404 into a success"
    );
    assert_eq!(row(&s, "/api/upload").failures, 0, "{:?}", s.failures);
    assert_eq!(s.total.requests, t.counts.requests());
    assert!(!paths.contains_key("/hello"), "before_request rewrote every /hello");
}

/// Issue 2 regression: a scenario's own `host` is used when no --host is given.
#[test]
fn r2_scenario_host_is_used_without_a_flag() {
    let t = target();
    let source = format!("host = \"{}/\"\nendpoints = {{ Task('GET', '/hello') }}\n", t.url());
    let req = stormlight::RunRequest {
        script: "host.lua".into(),
        flags: Overrides {
            duration: Some(Duration::from_millis(500)),
            ..Default::default()
        },
        out: None,
        live: LiveMode::Off,
    };
    let (cfg, plan) = stormlight::prepare(&req, Some(&source)).expect("the scenario's host is enough");
    assert_eq!(
        cfg.host.as_ref().map(|h| h.as_str().trim_end_matches('/')),
        Some(t.url().as_str())
    );
    let result = common::run_plan(&cfg, plan);
    assert!(result.summary.total.requests > 0);
    assert_eq!(result.summary.total.requests, t.counts.requests());
}

/// Issue 4 (first step): think time. Four users with `constant(0.25)` for 2 s make about
/// 4 x 2 / 0.25 = 32 requests; `constant_pacing` starts iterations on a fixed beat.
#[test]
fn think_time_paces_each_user() {
    let t = target();
    let s = run(
        "endpoints = { Task('GET', '/hello') }\nwait_time = constant(0.5)\n",
        &t.url(),
        4,
        5.0,
        Limits::default(),
    );
    // Issue 4's numbers: 4 users, constant(0.5), 5 s.
    let n = s.total.requests as f64;
    assert!(
        (n - 40.0).abs() <= 40.0 * 0.15,
        "constant(0.5): {n} requests, expected ~40"
    );
    assert_eq!(s.total.requests, t.counts.requests());

    let t = target();
    let s = run(
        "endpoints = { Task('GET', '/slow?ms=100', { name = 'slow' }) }\nwait_time = constant_pacing(0.25)\n",
        &t.url(),
        2,
        2.0,
        Limits::default(),
    );
    // A 100 ms request and a 150 ms pause: one iteration per 0.25 s, not per 0.35 s.
    let n = s.total.requests as f64;
    assert!(
        (n - 16.0).abs() <= 16.0 * 0.15,
        "constant_pacing(0.25): {n} requests, expected ~16"
    );
}

/// `Basic base64(pair)`, as the target's `/auth` expects it.
fn basic(pair: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
}

/// Asserts that row `name` sent requests and that `failures` of them failed (all or none).
fn all_or_none(s: &Summary, name: &str, fail: bool) -> u64 {
    let r = row(s, name);
    assert!(r.requests > 0, "{name} was never sent");
    let expected = if fail { r.requests } else { 0 };
    assert_eq!(r.failures, expected, "{name}: {:?}", s.failures);
    r.requests
}

#[test]
fn url_creds_go_out_as_basic_auth_and_an_explicit_header_wins() {
    let t = target();
    let addr = t.addr;
    let xy = basic("x:y");
    let s = run(
        &format!(
            r#"
            wait_time = constant(0.01)
            endpoints = {{
              -- percent-encoded: the user is "us@er", the password "p:ss"
              {{ method = "GET", url = "http://us%40er:p%3Ass@{addr}/auth?user=us%40er&pass=p%3Ass" }},
              {{ method = "GET", url = "http://u:p@{addr}/auth", query = {{ user = "x", pass = "y" }},
                 headers = {{ Authorization = "{xy}" }}, name = "explicit" }},
              {{ method = "GET", url = "http://u:p@{addr}/auth", query = {{ user = "u", pass = "p" }},
                 headers = {{ Authorization = "{xy}" }}, name = "explicit, not the url's" }},
              {{ method = "GET", url = "http://u:p@{addr}/auth", query = {{ user = "v", pass = "w" }},
                 name = "hook's header" }},
              Task("GET", "/auth", {{ query = {{ user = "k", pass = "v" }}, name = "hook's url" }}),
            }}
            function before_request(user, req)
              if req.name == "hook's url" then req.url = "http://k:v@{addr}/auth?user=k&pass=v" end
              if req.name == "hook's header" then req.headers.authorization = "{vw}" end
            end
            "#,
            vw = basic("v:w"),
        ),
        &t.url(),
        2,
        1.0,
        Limits::default(),
    );
    // The default name is the URL, its password hidden.
    let by_url = format!("http://us%40er:***@{addr}/auth?user=us%40er&pass=p%3Ass");
    let mut authorized = 0;
    for name in [by_url.as_str(), "explicit", "hook's url", "hook's header"] {
        authorized += all_or_none(&s, name, false);
    }
    all_or_none(&s, "explicit, not the url's", true);
    assert_eq!(
        s.failures.iter().map(|f| f.reason.as_str()).collect::<Vec<_>>(),
        ["HTTP 401"]
    );
    assert_eq!(
        t.counts.authorized(),
        authorized,
        "every request that should be, was authorized"
    );
    assert_eq!(s.total.requests, t.counts.requests());

    // `http.get` of such a URL, in a scenario (over the user's own calls).
    let t = target();
    let s = run(
        &format!(
            r#"
            wait_time = constant(0.01)
            function scenario(user) http.get("http://s:t@{}/auth?user=s&pass=t", {{ name = "get" }}) end
            "#,
            t.addr
        ),
        &t.url(),
        2,
        1.0,
        Limits::default(),
    );
    let sent = all_or_none(&s, "get", false);
    assert_eq!(t.counts.authorized(), sent);
}

#[test]
fn host_creds_go_with_every_path_over_http1_and_http2() {
    for protocol in [None, Some(stormlight::http::Protocol::Http2)] {
        let t = target();
        let host = format!("http://h:pw@{}", t.addr);
        let flags = Overrides {
            host: Some(host),
            users: Some(2),
            duration: Some(Duration::from_secs(1)),
            protocol,
            ..Default::default()
        };
        let s = common::run_scenario(
            Path::new("host.lua"),
            r#"
            wait_time = constant(0.01)
            endpoints = {
              Task("GET", "/auth?user=h&pass=pw", { name = "get" }),
              Task("POST", "/auth?user=h&pass=pw", { json = { a = 1 }, name = "post" }),
            }
            "#,
            Limits::default(),
            flags,
        );
        let sent = all_or_none(&s, "get", false) + all_or_none(&s, "post", false);
        assert_eq!(t.counts.authorized(), sent, "{protocol:?}");
        assert_eq!(s.total.requests, t.counts.requests());
        if protocol.is_some() {
            assert_eq!(t.counts.http2(), sent, "over HTTP/2");
        }
        assert_eq!(s.config.host, Some(format!("http://h:***@{}", t.addr)));
    }
}

#[test]
fn redirects_carry_creds_to_the_same_origin_only() {
    let (here, there) = (target(), target());
    let s = run(
        &format!(
            r#"
            wait_time = constant(0.01)
            endpoints = {{
              {{ method = "GET", url = "http://u:p@{a}/redirect", query = {{ to = "/auth?user=u&pass=p" }},
                 name = "same origin" }},
              {{ method = "GET", url = "http://u:p@{a}/redirect", query = {{ to = "http://{b}/auth?user=u&pass=p" }},
                 name = "other origin" }},
              {{ method = "GET", url = "http://{a}/redirect", query = {{ to = "http://{b}/auth?user=u&pass=p" }},
                 headers = {{ Authorization = "{up}" }}, name = "other origin, explicit header" }},
            }}
            "#,
            a = here.addr,
            b = there.addr,
            up = basic("u:p"),
        ),
        &here.url(),
        2,
        1.0,
        Limits::default(),
    );
    let same = all_or_none(&s, "same origin", false);
    let other = all_or_none(&s, "other origin", true) + all_or_none(&s, "other origin, explicit header", true);
    assert_eq!(here.counts.authorized(), same);
    assert_eq!(there.counts.authorized(), 0, "no credentials crossed to another origin");
    assert_eq!(
        there.counts.paths()["/auth"],
        other,
        "every cross-origin redirect arrived"
    );
    assert!(s.failures.iter().all(|f| f.reason == "HTTP 401"), "{:?}", s.failures);
}
