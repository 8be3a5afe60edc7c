//! Issue 8: runs against the built-in target's faults. Every request has exactly one outcome,
//! each fault its class, and the run ends on time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use stormlight::config::Overrides;
use stormlight::scenario::sandbox::Limits;
use stormlight::stats::Summary;
use stormlight::target::Target;

mod common;
use common::{row, target};

fn run(source: &str, host: &str, flags: Overrides) -> Summary {
    let flags = Overrides {
        host: Some(host.to_string()),
        ..flags
    };
    common::run_scenario(Path::new("faults.lua"), source, Limits::default(), flags)
}

/// Reasons per row name.
fn reasons(s: &Summary) -> HashMap<String, Vec<(String, u64)>> {
    let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for f in &s.failures {
        out.entry(f.name.clone()).or_default().push((f.reason.clone(), f.count));
    }
    out
}

/// Every request of each named row failed exactly once, with the expected class (or, cut off at
/// the end of the run, as aborted).
fn each_fails_as(s: &Summary, expect: &[(&str, &str)]) {
    let r = reasons(s);
    for &(name, reason) in expect {
        let row = row(s, name);
        assert!(row.requests > 0, "{name} was never sent");
        let got = r.get(name).unwrap_or_else(|| panic!("no failures for {name}"));
        let (main, aborted): (Vec<_>, Vec<_>) = got.iter().partition(|(why, _)| why == reason);
        assert!(
            aborted.iter().all(|(why, _)| why.starts_with("aborted")),
            "{name}: expected {reason}, got {got:?}"
        );
        let total: u64 = got.iter().map(|(_, n)| n).sum();
        assert_eq!(total, row.requests, "{name}: every request failed, once: {got:?}");
        assert!(!main.is_empty(), "{name}: expected {reason}, got {got:?}");
    }
}

#[test]
fn each_fault_has_its_class_and_one_outcome_per_request() {
    let t = target();
    // The invalid status line is written before hyper sees the connection, so it only works on
    // a connection's first request: a target of its own gives it its own connections.
    let raw = target();
    let started = Instant::now();
    let s = run(
        &r#"
        endpoints = {
          Task("GET", "/hello"),
          Task("GET", "/fault/reset-after-headers"),
          Task("GET", "/fault/reset-after?bytes=100", { name = "reset-after" }),
          Task("GET", "/fault/trickle?bytes=50&ms=100", { name = "trickle", timeout = "300ms" }),
          Task("GET", "/fault/hang", { timeout = "300ms" }),
          Task("GET", "/fault/huge?bytes=1000000", { name = "huge" }),
          Task("GET", "/fault/endless"),
          { method = "GET", url = "RAW/fault/bad-status", name = "/fault/bad-status" },
          Task("GET", "/fault/wrong-length"),
          Task("GET", "/status/503"),
        }
        "#
        .replace("RAW", &raw.url()),
        &t.url(),
        Overrides {
            users: Some(6),
            duration: Some(Duration::from_secs(2)),
            grace: Some(Duration::from_secs(1)),
            max_body: Some(100_000),
            ..Default::default()
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the run ended on time: {:?}",
        started.elapsed()
    );
    each_fails_as(
        &s,
        &[
            ("/fault/reset-after-headers", "connection reset"),
            ("reset-after", "connection reset"),
            ("trickle", "request timeout"),
            ("/fault/hang", "request timeout"),
            ("huge", "body too large"),
            ("/fault/endless", "body too large"),
            ("/fault/bad-status", "protocol error"),
            ("/fault/wrong-length", "connection closed before response"),
            ("/status/503", "HTTP 503"),
        ],
    );
    assert_eq!(row(&s, "/hello").failures, 0);
    // Every request sent reached a target (none was refused): the counts agree exactly.
    assert_eq!(s.total.requests, t.counts.requests() + raw.counts.requests());
    let failed: u64 = s.failures.iter().map(|f| f.count).sum();
    assert_eq!(failed, s.total.failures);
}

#[test]
fn redirects_are_followed_within_one_request_and_loops_stop_at_the_limit() {
    let t = target();
    let s = run(
        r#"
        endpoints = {
          Task("GET", "/fault/redirect?n=3", { name = "chain" }),
          Task("POST", "/fault/redirect-loop", { body = "x", name = "loop" }),
        }
        "#,
        &t.url(),
        Overrides {
            users: Some(2),
            duration: Some(Duration::from_millis(800)),
            max_redirects: Some(5),
            ..Default::default()
        },
    );
    let (chain, lp) = (row(&s, "chain"), row(&s, "loop"));
    assert_eq!(chain.failures, 0, "{:?}", s.failures);
    assert_eq!(lp.failures, lp.requests);
    assert_eq!(reasons(&s)["loop"], vec![("redirect limit".to_string(), lp.requests)]);
    let paths = t.counts.paths();
    // n=3 redirects to n=2, 1, 0, and n=0 to /hello: five requests on the wire, one counted.
    assert_eq!(paths["/hello"], chain.requests);
    // The loop: the request and 5 redirects followed, 6 on the wire.
    assert_eq!(paths["/fault/redirect-loop"], 6 * lp.requests);
    assert_eq!(paths["/fault/redirect"], 4 * chain.requests);
}

#[test]
fn a_target_down_for_a_while_gives_failures_then_recovers() {
    let t = target();
    let url = t.url();
    let control = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        let addr = url.trim_start_matches("http://").to_string();
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(addr).expect("control connection");
        sock.write_all(b"GET /__down?ms=1500 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = sock.read_to_string(&mut answer);
        assert!(answer.contains("going down"), "{answer}");
    });
    let s = run(
        r#"endpoints = { Task("GET", "/slow?ms=5", { name = "slow" }) }"#,
        &t.url(),
        Overrides {
            users: Some(2),
            duration: Some(Duration::from_millis(3500)),
            ..Default::default()
        },
    );
    control.join().unwrap();
    let row = row(&s, "slow");
    let r = reasons(&s);
    let fails = r.get("slow").cloned().unwrap_or_default();
    let refused: u64 = fails
        .iter()
        .filter(|(why, _)| why == "connection refused")
        .map(|(_, n)| n)
        .sum();
    assert!(refused > 0, "the gap shows as refused connections: {fails:?}");
    assert!(
        fails.iter().all(|(why, _)| [
            "connection refused",
            "connection reset",
            "connection closed before response"
        ]
        .contains(&why.as_str())),
        "{fails:?}"
    );
    // Before, during (nothing) and after the gap: 3.5 s minus 1.5 s down at ~5 ms a request
    // for 2 users is far more than the 0.8 s before it could give.
    let ok = row.requests - row.failures;
    assert!(
        ok > 2 * 800 / 6 + 50,
        "requests succeeded after the target came back: {ok}"
    );
    // Refused requests never reached the target. A request in flight when it went down may or
    // may not have been read by it before the connection dropped; every other one was, once.
    let lost: u64 = fails
        .iter()
        .filter(|(why, _)| why != "connection refused")
        .map(|(_, n)| n)
        .sum();
    let received = t.counts.requests();
    assert!(
        received <= s.total.requests - refused && received + lost >= s.total.requests - refused,
        "received {received}, sent {} of which refused {refused}, cut off {lost}",
        s.total.requests
    );
}

#[test]
fn idle_connections_the_server_closed_are_not_reused() {
    // The first target closes connections idle for 200 ms; while a user waits 300 ms on the
    // second, its connection to the first goes idle long enough to be closed under it.
    let closing = stormlight::target::Options {
        idle_close: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let a = Target::spawn_thread_with(SocketAddr::from(([127, 0, 0, 1], 0)), closing).expect("target");
    let b = target();
    let s = run(
        &format!(
            r#"endpoints = {{
                {{ method = "GET", url = "{}/hello", name = "closing" }},
                {{ method = "GET", url = "{}/slow?ms=300", name = "slow" }},
            }}"#,
            a.url(),
            b.url()
        ),
        &a.url(),
        Overrides {
            users: Some(3),
            duration: Some(Duration::from_secs(3)),
            ..Default::default()
        },
    );
    assert!(row(&s, "closing").requests > 10 && row(&s, "slow").requests > 10);
    assert_eq!(
        s.total.failures, 0,
        "the tool made no errors of its own: {:?}",
        s.failures
    );
    assert_eq!(s.total.requests, a.counts.requests() + b.counts.requests());
}

#[test]
fn tls_is_verified_by_default_and_insecure_or_ca_cert_let_it_through() {
    let names: &'static [&'static str] = &["127.0.0.1"];
    let options = stormlight::target::Options {
        tls: Some(names),
        ..Default::default()
    };
    let t = Target::spawn_thread_with(SocketAddr::from(([127, 0, 0, 1], 0)), options).expect("tls target");
    assert!(t.url().starts_with("https://"));
    let scenario = r#"endpoints = { Task("GET", "/hello") }"#;
    let short = || Overrides {
        users: Some(2),
        duration: Some(Duration::from_millis(500)),
        ..Default::default()
    };

    // The system's roots do not know a certificate made a moment ago.
    let s = run(scenario, &t.url(), short());
    assert!(s.total.requests > 0 && s.total.failures == s.total.requests);
    assert_eq!(reasons(&s)["/hello"][0].0, "tls error: unknown issuer");
    assert_eq!(t.counts.requests(), 0, "no request got past the handshake");

    let s = run(
        scenario,
        &t.url(),
        Overrides {
            tls: insecure(),
            ..short()
        },
    );
    assert!(s.total.requests > 0 && s.total.failures == 0, "{:?}", s.failures);
    assert_eq!(t.counts.requests(), s.total.requests);

    let dir = std::env::temp_dir().join(format!("stormlight-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = dir.join("target.pem");
    std::fs::write(&pem, t.cert_pem.as_ref().unwrap()).unwrap();
    let before = t.counts.requests();
    let ca = stormlight::http::TlsOptions {
        ca_cert: Some(pem.clone()),
        ..Default::default()
    };
    let s = run(
        scenario,
        &t.url(),
        Overrides {
            tls: ca.clone(),
            ..short()
        },
    );
    assert!(s.total.requests > 0 && s.total.failures == 0, "{:?}", s.failures);
    assert_eq!(t.counts.requests() - before, s.total.requests);

    // Trusted, but for another name: the certificate names 127.0.0.1 only.
    let s = run(
        scenario,
        &t.url().replace("127.0.0.1", "localhost"),
        Overrides { tls: ca, ..short() },
    );
    let r = reasons(&s);
    let why = &r["/hello"][0].0;
    // localhost may resolve to ::1 first, where nothing listens: refused is then the honest answer.
    assert!(
        why == "tls error: name mismatch" || why == "connection refused",
        "{why}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn insecure() -> stormlight::http::TlsOptions {
    stormlight::http::TlsOptions {
        insecure: true,
        ..Default::default()
    }
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    // A CA, and a client certificate it signs.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["stormlight-client".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();

    let names: &'static [&'static str] = &["127.0.0.1"];
    let options = stormlight::target::Options {
        tls: Some(names),
        client_ca: Some(ca.der().clone()),
        ..Default::default()
    };
    let t = Target::spawn_thread_with(SocketAddr::from(([127, 0, 0, 1], 0)), options).expect("mtls target");
    let dir = std::env::temp_dir().join(format!("stormlight-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let server_ca = write("server.pem", t.cert_pem.clone().unwrap());
    let cert = write("client.pem", client.pem());
    let key = write("client.key", client_key.serialize_pem());
    let scenario = r#"endpoints = { Task("GET", "/hello") }"#;
    let tls = |client_cert| stormlight::http::TlsOptions {
        ca_cert: Some(server_ca.clone()),
        client_cert,
        insecure: false,
    };
    let short = |tls| Overrides {
        users: Some(2),
        duration: Some(Duration::from_millis(500)),
        tls,
        ..Default::default()
    };

    let s = run(scenario, &t.url(), short(tls(None)));
    assert!(s.total.requests > 0 && s.total.failures == s.total.requests);
    let why = &reasons(&s)["/hello"][0].0;
    assert!(why.starts_with("tls error"), "{why}");
    assert_eq!(t.counts.requests(), 0, "nothing got past the server's check");

    let s = run(scenario, &t.url(), short(tls(Some((cert, key)))));
    assert!(s.total.requests > 0 && s.total.failures == 0, "{:?}", s.failures);
    assert_eq!(t.counts.requests(), s.total.requests);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn http2_by_alpn_on_https_by_prior_knowledge_on_http_and_http1_on_request() {
    let names: &'static [&'static str] = &["127.0.0.1"];
    let tls = Target::spawn_thread_with(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        stormlight::target::Options {
            tls: Some(names),
            ..Default::default()
        },
    )
    .expect("tls target");
    let scenario = r#"endpoints = { Task("GET", "/hello"), Task("POST", "/api/upload", { json = { a = 1 } }) }"#;
    let short = |protocol| Overrides {
        users: Some(2),
        duration: Some(Duration::from_millis(500)),
        tls: insecure(),
        protocol,
        ..Default::default()
    };
    let s = run(scenario, &tls.url(), short(None));
    assert!(s.total.requests > 0 && s.total.failures == 0, "{:?}", s.failures);
    assert_eq!(
        s.protocols.get("HTTP/2"),
        Some(&s.total.requests),
        "negotiated by ALPN: {:?}",
        s.protocols
    );
    assert_eq!(tls.counts.http2(), s.total.requests, "the target saw HTTP/2 too");

    let before = tls.counts.requests();
    let s = run(scenario, &tls.url(), short(Some(stormlight::http::Protocol::Http1)));
    assert!(s.total.failures == 0, "{:?}", s.failures);
    assert_eq!(
        s.protocols.get("HTTP/1.1"),
        Some(&s.total.requests),
        "{:?}",
        s.protocols
    );
    assert_eq!(tls.counts.requests() - before, s.total.requests);

    let plain = target();
    let s = run(scenario, &plain.url(), short(Some(stormlight::http::Protocol::Http2)));
    assert!(s.total.requests > 0 && s.total.failures == 0, "{:?}", s.failures);
    assert_eq!(
        s.protocols.get("HTTP/2"),
        Some(&s.total.requests),
        "h2c: {:?}",
        s.protocols
    );
    assert_eq!(plain.counts.http2(), s.total.requests);
}

#[test]
fn think_time_as_long_as_the_servers_keep_alive_makes_no_errors() {
    // Issue 8: the target closes connections idle for 1 s and users think for 1 s between
    // requests, so the server's close and the next request meet on the wire.
    let closing = stormlight::target::Options {
        idle_close: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let t = Target::spawn_thread_with(SocketAddr::from(([127, 0, 0, 1], 0)), closing).expect("target");
    let s = run(
        r#"
        wait_time = constant(1)
        endpoints = { { method = "GET", path = "/hello" } }
        "#,
        &t.url(),
        Overrides {
            users: Some(20),
            duration: Some(Duration::from_millis(4500)),
            ..Default::default()
        },
    );
    assert!(s.total.requests >= 80, "{} requests", s.total.requests);
    assert_eq!(
        s.total.failures, 0,
        "the tool made no errors of its own: {:?}",
        s.failures
    );
    assert_eq!(s.total.requests, t.counts.requests());
}

#[test]
fn a_server_that_closes_idle_connections_silently_is_learnt() {
    // No Keep-Alive header: the first reuse after 1 s may meet the server's close; from then
    // on this origin's connections are not kept idle that long.
    let closing = stormlight::target::Options {
        idle_close: Some(Duration::from_secs(1)),
        silent_close: true,
        ..Default::default()
    };
    let t = Target::spawn_thread_with(SocketAddr::from(([127, 0, 0, 1], 0)), closing).expect("target");
    let s = run(
        r#"
        local n = 0
        function scenario(user)
          n = n + 1
          http.get("/hello", { name = n <= 2 and "learning" or "learnt" })
          sleep(1)
        end
        "#,
        &t.url(),
        Overrides {
            users: Some(20),
            duration: Some(Duration::from_millis(6500)),
            ..Default::default()
        },
    );
    let learnt = row(&s, "learnt");
    assert!(learnt.requests >= 60, "{learnt:?}");
    assert_eq!(learnt.failures, 0, "{:?}", s.failures);
    // A request that met the close was sent but never read by the server; every other one
    // reached it exactly once (nothing is ever sent twice).
    assert_eq!(
        s.total.requests - s.total.failures,
        t.counts.requests(),
        "{:?}",
        s.failures
    );
}

#[test]
fn connections_idle_past_keepalive_idle_are_replaced() {
    let t = target();
    let scenario = r#"
        wait_time = constant(0.2)
        endpoints = { { method = "GET", path = "/hello" } }
    "#;
    let flags = |idle: u64| Overrides {
        users: Some(2),
        duration: Some(Duration::from_millis(1100)),
        keepalive_idle: Some(Duration::from_millis(idle)),
        ..Default::default()
    };
    // Idle 200 ms between requests: kept under a 1 s cap, replaced under a 100 ms one.
    let kept = run(scenario, &t.url(), flags(1000));
    assert_eq!(t.counts.connections(), 2, "one connection per user");
    let replaced = run(scenario, &t.url(), flags(100));
    assert_eq!(replaced.total.failures + kept.total.failures, 0);
    assert_eq!(
        t.counts.connections() - 2,
        replaced.total.requests,
        "a new connection per request"
    );
}

#[test]
fn faults_over_http2_have_their_class_and_one_outcome_per_request() {
    let t = target();
    let started = Instant::now();
    let s = run(
        r#"
        endpoints = {
          Task("GET", "/hello"),
          Task("GET", "/fault/reset-after-headers"),
          Task("GET", "/fault/trickle?bytes=50&ms=100", { name = "trickle", timeout = "300ms" }),
          Task("GET", "/fault/hang", { timeout = "300ms" }),
          Task("GET", "/fault/huge?bytes=1000000", { name = "huge" }),
          Task("GET", "/fault/endless"),
          Task("GET", "/fault/wrong-length"),
          Task("GET", "/status/503"),
        }
        "#,
        &t.url(),
        Overrides {
            users: Some(6),
            duration: Some(Duration::from_secs(2)),
            grace: Some(Duration::from_secs(1)),
            max_body: Some(100_000),
            protocol: Some(stormlight::http::Protocol::Http2),
            ..Default::default()
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "ended on time: {:?}",
        started.elapsed()
    );
    each_fails_as(
        &s,
        &[
            ("/fault/reset-after-headers", "stream reset"),
            ("trickle", "request timeout"),
            ("/fault/hang", "request timeout"),
            ("huge", "body too large"),
            ("/fault/endless", "body too large"),
            // HTTP/2 checks the length a response promised: a short body is malformed.
            ("/fault/wrong-length", "protocol error"),
            ("/status/503", "HTTP 503"),
        ],
    );
    assert_eq!(row(&s, "/hello").failures, 0);
    assert!(s.protocols.get("HTTP/2").is_some_and(|n| *n > 0), "{:?}", s.protocols);
    assert_eq!(s.total.requests, t.counts.requests());
    assert_eq!(t.counts.http2(), t.counts.requests(), "all over HTTP/2");
}
