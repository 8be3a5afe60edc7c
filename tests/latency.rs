//! Issue 5: truthful latency. A closed model hides a stall (each user sees it once, then the
//! users wait instead of sending); `latency` corrects for that, `service` keeps what was
//! measured.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use stormlight::config::Overrides;
use stormlight::scenario::sandbox::Limits;
use stormlight::stats::Summary;
use stormlight::target::Target;

mod common;

fn run(source: &str, host: &str, flags: Overrides) -> Summary {
    let flags = Overrides {
        host: Some(host.to_string()),
        ..flags
    };
    common::run_scenario(Path::new("latency.lua"), source, Limits::default(), flags)
}

#[test]
fn a_stall_in_a_closed_model_shows_in_latency_not_just_once_per_user() {
    let t = Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0))).expect("target");
    let stall = t.stall.clone();
    let stalled = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        stall.start(Duration::from_secs(1));
    });
    let users = 10u64;
    let s = run(
        r#"endpoints = { Task("GET", "/slow?ms=10", { name = "slow" }) }"#,
        &t.url(),
        Overrides {
            users: Some(users as u32),
            duration: Some(Duration::from_secs(8)),
            ..Default::default()
        },
    );
    stalled.join().unwrap();
    let total = &s.total;
    let service = total.service_ms.expect("service times");
    let latency = total.latency_ms.expect("latencies");
    // Measured: the stall is one request per user among hundreds, so p99 does not see it.
    assert!(service.p99 < 20.0, "service p99 {} ms", service.p99);
    assert!(service.max > 900.0, "the stalled requests are there: {service:?}");

    // Corrected: each user's stalled request (~1 s) stands for the ones it would have sent
    // every `interval` meanwhile: samples at S, S - I, S - 2I, ... down to I.
    let interval = service.p50; // the users' usual cycle: no think time, ~10 ms requests
    let stalled_ms = 1000.0 + interval / 2.0;
    let synthetic_per_user = (stalled_ms / interval).floor() - 1.0;
    let samples = total.requests as f64 + users as f64 * synthetic_per_user;
    // The top 1 % of the samples, shared evenly by the users' synthetic series.
    let from_top_per_user = 0.01 * samples / users as f64;
    let expected_p99 = stalled_ms - from_top_per_user * interval;
    assert!(
        (latency.p99 - expected_p99).abs() <= expected_p99 * 0.1,
        "latency p99 {} ms, expected ~{expected_p99:.0} ms (interval {interval} ms, {} requests)",
        latency.p99,
        total.requests
    );
    assert!(latency.p50 < 20.0, "most requests were not held: p50 {}", latency.p50);
    eprintln!("service {service:?}\nlatency {latency:?}\nexpected p99 {expected_p99}");
    assert_eq!(total.requests, t.counts.requests());
}

#[test]
fn stages_ramp_users_up_and_down() {
    let t = Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0))).expect("target");
    // Up to 4 users for 1 s, 4 for 2 s, down to 0 in 1 s; each sends 10 requests a second.
    let s = run(
        r#"
        options = { stages = { { duration = "1s", users = 4 }, { duration = "2s", users = 4 }, { duration = "1s", users = 0 } } }
        wait_time = constant_pacing(0.1)
        endpoints = { Task("GET", "/hello") }
        function on_stop(user) http.get("/hello", { name = "stopped" }) end
        "#,
        &t.url(),
        Overrides::default(),
    );
    // All four users ran and were retired (each ran on_stop once), and the run lasted 4 s.
    let stopped = s
        .endpoints
        .iter()
        .find(|r| r.name.as_deref() == Some("stopped"))
        .expect("on_stop ran");
    assert_eq!(stopped.requests, 4, "{:?}", s.endpoints);
    assert!((s.duration_s - 4.0).abs() < 0.3, "{}", s.duration_s);
    // ~4 users × 10/s for 2 s at full strength, plus the ramps (~half strength for 1 s each).
    let hello = s
        .endpoints
        .iter()
        .find(|r| r.name.as_deref() == Some("/hello"))
        .unwrap()
        .requests as f64;
    assert!((hello - 120.0).abs() <= 120.0 * 0.2, "{hello} requests, expected ~120");
    assert_eq!(s.total.requests, t.counts.requests());
}

/// The latencies an open model at `rate` for `secs` should show against a `base` ms endpoint
/// with a stall of `pause` s starting `at` s after the first request: a request scheduled
/// during the stall waits for its end; one in flight when it began is held to its end.
fn expected_open_latencies(rate: f64, secs: f64, base: f64, at: f64, pause: f64) -> Vec<f64> {
    let n = (rate * secs).round() as usize;
    (0..n)
        .map(|k| {
            let t = k as f64 / rate;
            let end = at + pause;
            if (at..end).contains(&t) {
                (end - t) * 1000.0 + base
            } else if t < at && t + base / 1000.0 > at {
                (end - t) * 1000.0
            } else {
                base
            }
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    // HdrHistogram's value at a quantile: the smallest value with at least p of the samples at
    // or below it.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[test]
fn an_open_model_measures_a_stall_from_the_schedule_and_counts_drops() {
    // Issue 5's numbers: 100/s for 10 s, a 1 s stall at 3 s.
    let (rate, secs) = (100.0, 10.0);
    let run_open = |pool: u32| {
        let t = Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0))).expect("target");
        t.stall
            .after_first_request(Duration::from_secs(3), Duration::from_secs(1));
        let s = run(
            r#"endpoints = { Task("GET", "/slow?ms=10", { name = "slow" }) }"#,
            &t.url(),
            Overrides {
                rate: Some(rate),
                max_users: Some(pool),
                duration: Some(Duration::from_secs_f64(secs)),
                ..Default::default()
            },
        );
        (s, t)
    };

    // A pool large enough that nothing is dropped.
    let (s, t) = run_open(300);
    assert_eq!(s.dropped_iterations, 0);
    assert_eq!(s.total.requests, (rate * secs) as u64, "every scheduled iteration ran");
    assert_eq!(s.total.requests, t.counts.requests());
    let latency = s.total.latency_ms.expect("latencies");
    let base = latency.p50;
    eprintln!("open model, pool 300: {latency:?}");
    let mut expected = expected_open_latencies(rate, secs, base, 3.0, 1.0);
    expected.sort_by(f64::total_cmp);
    for (p, got) in [(0.5, latency.p50), (0.95, latency.p95), (0.99, latency.p99)] {
        let want = percentile(&expected, p);
        assert!(
            (got - want).abs() <= (want * 0.05).max(2.0),
            "p{}: {got} ms, expected {want:.1} ms ({latency:?})",
            p * 100.0
        );
    }

    // A pool of 20: during the stall the users are soon all held, and what is scheduled after
    // that finds nobody free until the stall ends and the held requests come back.
    let pool = 20.0;
    let (s, t) = run_open(pool as u32);
    let base_s = s.total.latency_ms.expect("latencies").p50 / 1000.0;
    let in_flight = rate * base_s; // users already busy when the stall begins
    let used_up_at = (pool - in_flight) / rate; // into the stall
    let free_again_at = 1.0 + base_s;
    let want = ((free_again_at - used_up_at) * rate).round();
    eprintln!(
        "open model, pool 20: {} dropped (computed {want})",
        s.dropped_iterations
    );
    assert!(
        (s.dropped_iterations as f64 - want).abs() <= 2.0,
        "{} dropped, expected {want}",
        s.dropped_iterations
    );
    assert_eq!(s.total.requests + s.dropped_iterations, (rate * secs) as u64);
    assert_eq!(s.total.requests, t.counts.requests());
}

#[test]
fn rates_ramp_by_stages_in_the_open_model() {
    let t = Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0))).expect("target");
    // 0 -> 50/s over 1 s (25 iterations), then 50/s for 1 s (50 more).
    let s = run(
        r#"
        options = { stages = { { duration = "1s", rate = 50 }, { duration = "1s", rate = 50 } }, max_users = 20 }
        endpoints = { Task("GET", "/hello") }
        "#,
        &t.url(),
        Overrides::default(),
    );
    assert_eq!(s.dropped_iterations, 0);
    assert_eq!(s.total.requests, 75);
    assert_eq!(s.total.requests, t.counts.requests());
}
