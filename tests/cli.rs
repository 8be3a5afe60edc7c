//! End-to-end tests of the `stormlight` binary: exit codes, messages, `check`, `--help`, a normal
//! run and Ctrl-C, each against an in-process built-in target that counts what it receives.
//!
//! Every child process is bounded: each run passes a short `-t`, and the harness kills a child
//! that outlives its deadline (and any child still running when a test panics).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::process::*;
use common::target;

/// Deadline for commands that should end at once (bad input, `check`, `--help`).
const QUICK: Duration = Duration::from_secs(15);

/// Asserts that `v` is an object holding each of `keys`.
fn assert_keys(v: &serde_json::Value, keys: &[&str], what: &str) {
    let obj = v.as_object().unwrap_or_else(|| panic!("{what} is not an object: {v}"));
    for k in keys {
        assert!(obj.contains_key(*k), "{what} lacks `{k}`: {v}");
    }
}

const LATENCY_FIELDS: &[&str] = &["min", "avg", "max", "p50", "p90", "p95", "p99", "p99_9"];

/// Two endpoints of the built-in target, both answered with 200.
const GOOD_SCENARIO: &str = r#"endpoints = {
  Task("GET", "/hello"),
  Task("POST", "/api/upload", { json = { name = "test", price = 10 }, weight = 2 }),
}
"#;

// ---------------------------------------------------------------------------------------------
// 1. Bad input: exit 2, a clear message on stderr, nothing sent
// ---------------------------------------------------------------------------------------------

struct BadCase {
    name: &'static str,
    /// Scenario file contents; `None`: the file does not exist.
    script: Option<&'static str>,
    /// Flags after `run SCRIPT`; `{host}` is replaced by the target's URL.
    flags: &'static [&'static str],
    /// Phrases that must all appear in stderr (case-insensitive); `{file}` is the script's
    /// file name.
    expect: &'static [&'static str],
}

const DEFAULT_FLAGS: &[&str] = &["--host", "{host}", "-u", "2", "-t", "1s", "-q"];

const BAD_CASES: &[BadCase] = &[
    BadCase {
        name: "missing scenario file",
        script: None,
        flags: DEFAULT_FLAGS,
        expect: &["{file}", "no such file"],
    },
    BadCase {
        name: "Lua syntax error",
        script: Some("endpoints = {\n  Task(\"GET\", \"/hello\"),\n}\nlocal x = = 1\n"),
        flags: DEFAULT_FLAGS,
        expect: &["{file}:4:"],
    },
    BadCase {
        name: "Lua runtime error while loading",
        script: Some("-- a comment\n\nerror(\"boom at load\")\nendpoints = { Task(\"GET\", \"/hello\") }\n"),
        flags: DEFAULT_FLAGS,
        expect: &["{file}:3:", "boom at load"],
    },
    BadCase {
        name: "no endpoints",
        script: Some("options = { users = 1 }\n"),
        flags: DEFAULT_FLAGS,
        expect: &["endpoints"],
    },
    BadCase {
        name: "empty endpoints",
        script: Some("-- nothing to do\nendpoints = {}\n"),
        flags: DEFAULT_FLAGS,
        expect: &["endpoints", "empty"],
    },
    BadCase {
        name: "unknown method",
        script: Some("endpoints = {\n  Task(\"FETCH\", \"/hello\"),\n}\n"),
        flags: DEFAULT_FLAGS,
        expect: &["unknown method", "fetch", "{file}:2"],
    },
    BadCase {
        name: "weight 0",
        script: Some(
            "endpoints = {\n  Task(\"GET\", \"/hello\"),\n  Task(\"GET\", \"/items/1\", { weight = 0 }),\n}\n",
        ),
        flags: DEFAULT_FLAGS,
        expect: &["weight", "{file}:3"],
    },
    BadCase {
        name: "bad host URL",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "nonsense", "-u", "2", "-t", "1s", "-q"],
        expect: &["bad host url", "nonsense"],
    },
    BadCase {
        name: "-u 0",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "0", "-t", "1s", "-q"],
        expect: &["users", "at least 1"],
    },
    BadCase {
        name: "negative spawn rate",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "2", "-r", "-1", "-t", "1s", "-q"],
        expect: &["spawn rate", "-1"],
    },
    BadCase {
        name: "bad duration",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "2", "-t", "soon", "-q"],
        expect: &["duration", "soon"],
    },
    BadCase {
        name: "unknown flag",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "2", "-t", "1s", "-q", "--bogus"],
        expect: &["--bogus"],
    },
    BadCase {
        name: "--out in a directory that does not exist",
        script: Some(GOOD_SCENARIO),
        flags: &[
            "--host",
            "{host}",
            "-u",
            "2",
            "-t",
            "1s",
            "-q",
            "--out",
            "/nonexistent-stormlight-dir/out.json",
        ],
        expect: &["--out"],
    },
    BadCase {
        name: "--out that is a directory",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "2", "-t", "1s", "-q", "--out", "/tmp"],
        expect: &["--out", "directory"],
    },
    BadCase {
        name: "--max-body 0",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "2", "-t", "1s", "-q", "--max-body", "0"],
        expect: &["--max-body", "more than 0"],
    },
    BadCase {
        name: "malformed --threshold",
        script: Some(GOOD_SCENARIO),
        flags: &[
            "--host",
            "{host}",
            "-u",
            "2",
            "-t",
            "1s",
            "-q",
            "--threshold",
            "p95 < soon",
        ],
        expect: &["threshold", "p95 < soon", "duration"],
    },
    BadCase {
        name: "unknown threshold metric in the scenario",
        script: Some("endpoints = { Task('GET', '/hello') }\nthresholds = { \"latency < 1s\" }\n"),
        flags: &["--host", "{host}", "-u", "2", "-t", "1s", "-q"],
        expect: &["{file}:2", "unknown metric", "latency"],
    },
    BadCase {
        name: "a misspelt threshold option",
        script: Some("endpoints = { Task('GET', '/hello') }\nthresholds = { { 'p95 < 1s', abort_onfail = true } }\n"),
        flags: &["--host", "{host}", "-u", "2", "-t", "1s", "-q"],
        expect: &["{file}:2", "abort_onfail"],
    },
    BadCase {
        name: "a rate without its percent sign",
        script: Some(GOOD_SCENARIO),
        flags: &[
            "--host",
            "{host}",
            "-u",
            "2",
            "-t",
            "1s",
            "-q",
            "--threshold",
            "fail_rate<1",
        ],
        expect: &["fail_rate<1", "%"],
    },
    BadCase {
        name: "--max-users without --rate",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "--max-users", "5", "-t", "1s", "-q"],
        expect: &["--max-users", "--rate"],
    },
    BadCase {
        name: "--users with --rate",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "--rate", "10", "-u", "4", "-t", "1s", "-q"],
        expect: &["--max-users", "--users"],
    },
    BadCase {
        name: "ten million hooked users (more than the machine's memory)",
        script: Some("endpoints = { Task('GET', '/hello') }\nfunction before_request(user, req) end\n"),
        flags: &["--host", "{host}", "-u", "10000000", "-t", "1s", "-q"],
        // (Or the open-files limit, whichever this machine refuses them for.)
        expect: &["10000000 users need", "--segment"],
    },
    BadCase {
        name: "a rate of 10^12 iterations a second",
        script: Some(GOOD_SCENARIO),
        flags: &[
            "--host",
            "{host}",
            "--rate",
            "1e12",
            "--max-users",
            "2",
            "-t",
            "1s",
            "-q",
        ],
        expect: &["--rate", "--segment"],
    },
    BadCase {
        name: "a duration of a hundred thousand years",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "1", "-t", "999999999h", "-q"],
        expect: &["at most 365 days"],
    },
    BadCase {
        name: "a duration past what a clock holds",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "1", "-t", "2562047788015215h", "-q"],
        expect: &["at most 365 days"],
    },
    BadCase {
        name: "a scenario duration past a year",
        script: Some("options = { duration = 1e300 }\nendpoints = { Task('GET', '/hello') }\n"),
        flags: &["--host", "{host}", "-u", "1", "-q"],
        expect: &["{file}:1", "at most 365 days"],
    },
    BadCase {
        name: "--max-names of a million",
        script: Some(GOOD_SCENARIO),
        flags: &[
            "--host",
            "{host}",
            "-u",
            "1",
            "-t",
            "1s",
            "--max-names",
            "1000000",
            "-q",
        ],
        expect: &["--max-names", "more than 10000"],
    },
    BadCase {
        name: "a script timeout of 0",
        script: Some(GOOD_SCENARIO),
        flags: &["--host", "{host}", "-u", "1", "-t", "1s", "--script-timeout", "0", "-q"],
        expect: &["--script-timeout", "more than 0"],
    },
    BadCase {
        name: "think time the wrong way round",
        script: Some("endpoints = { Task('GET', '/hello') }\nwait_time = between(3, 1)\n"),
        flags: &["--host", "{host}", "-u", "2", "-t", "1s", "-q"],
        expect: &["{file}:2", "a <= b"],
    },
];

#[test]
fn bad_input_exits_2_with_a_message_and_sends_nothing() {
    let mut failed = Vec::new();
    for case in BAD_CASES {
        // One target per case, so a case that sends traffic is pinned on that case.
        let target = target();
        let host = target.url();
        let dir = TempDir::new("bad");
        let file = match case.script {
            Some(src) => dir.write("scenario.lua", src),
            None => dir.path().join("missing.lua"),
        };
        let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut args: Vec<String> = vec!["run".into(), file.display().to_string()];
        args.extend(case.flags.iter().map(|f| f.replace("{host}", &host)));

        let f = run(&args, QUICK);
        let stderr = f.stderr.to_lowercase();
        let mut problems = Vec::new();
        if f.code() != Some(2) {
            problems.push(format!("exit code {:?}, expected 2", f.code()));
        }
        for phrase in case.expect {
            let phrase = phrase.replace("{file}", &file_name).to_lowercase();
            if !stderr.contains(&phrase) {
                problems.push(format!("stderr lacks {phrase:?}"));
            }
        }
        let sent = target.counts.requests();
        if sent != 0 {
            problems.push(format!("the target received {sent} requests, expected 0"));
        }
        if !problems.is_empty() {
            failed.push(format!(
                "case {:?} (stormlight {}): {}\n{}",
                case.name,
                args.join(" "),
                problems.join("; "),
                f.show()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} bad-input cases failed:\n\n{}",
        failed.len(),
        BAD_CASES.len(),
        failed.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. check
// ---------------------------------------------------------------------------------------------

#[test]
fn check_prints_endpoints_and_hooks() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hooks.lua");
    let f = run(&["check".as_ref(), script.as_os_str()], QUICK);
    assert_eq!(f.code(), Some(0), "check scripts/hooks.lua\n{}", f.show());
    for want in [
        "/hello",
        "/api/upload",
        "/items/7",
        "/items/[id]",
        "GET",
        "POST",
        "on_start",
        "before_request",
        "after_response",
        "on_stop",
    ] {
        assert!(f.stdout.contains(want), "check output lacks {want:?}\n{}", f.show());
    }
}

#[test]
fn check_sends_nothing_even_with_a_host() {
    let target = target();
    let dir = TempDir::new("check-host");
    let file = dir.write("scenario.lua", format!("host = \"{}\"\n{GOOD_SCENARIO}", target.url()));
    let f = run(&["check".as_ref(), file.as_os_str()], QUICK);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(f.stdout.contains("/api/upload"), "{}", f.show());
    assert_eq!(target.counts.requests(), 0, "check sent requests");
}

#[test]
fn check_on_a_broken_file_exits_2_with_file_and_line() {
    let dir = TempDir::new("check-bad");
    let file = dir.write(
        "broken.lua",
        "endpoints = {\n  Task(\"GET\", \"/hello\"),\n  Task(\"GET\", \"/x\",\n}\n",
    );
    let f = run(&["check".as_ref(), file.as_os_str()], QUICK);
    assert_eq!(f.code(), Some(2), "{}", f.show());
    assert!(
        f.stderr.contains("broken.lua:4:"),
        "expected broken.lua:4: on stderr\n{}",
        f.show()
    );

    let missing = dir.path().join("nope.lua");
    let f = run(&["check".as_ref(), missing.as_os_str()], QUICK);
    assert_eq!(f.code(), Some(2), "{}", f.show());
    assert!(f.stderr.contains("nope.lua"), "{}", f.show());
}

// ---------------------------------------------------------------------------------------------
// 3. --help
// ---------------------------------------------------------------------------------------------

#[test]
fn help_shows_examples() {
    for args in [&["--help"][..], &["run", "--help"][..], &["help", "run"][..]] {
        let f = run(args, QUICK);
        assert_eq!(f.code(), Some(0), "stormlight {}\n{}", args.join(" "), f.show());
        assert!(
            f.stdout.contains("Example"),
            "stormlight {} shows no example\n{}",
            args.join(" "),
            f.show()
        );
    }
    let f = run(&["run", "--help"], QUICK);
    for flag in [
        "--host",
        "--users",
        "--spawn-rate",
        "--duration",
        "--out",
        "--csv",
        "--html",
        "--stages",
        "--rate",
        "--threshold",
    ] {
        assert!(f.stdout.contains(flag), "run --help lacks {flag}\n{}", f.show());
    }
    // Every command says what it does, beside its own name.
    let f = run(&["--help"], QUICK);
    for (command, says) in [
        ("run", "Run a scenario"),
        ("check", "validate"),
        ("demo", "built-in target"),
        ("report", "result files"),
        ("target", "built-in target alone"),
    ] {
        let line = f
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(command))
            .unwrap_or_default();
        assert!(
            line.contains(says),
            "`{command}` is described as {line:?}\n{}",
            f.show()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Ctrl-C
// ---------------------------------------------------------------------------------------------

#[test]
fn sigint_prints_summary_writes_json_and_exits_130() {
    let target = target();
    let dir = TempDir::new("sigint");
    let script = dir.write("scenario.lua", GOOD_SCENARIO);
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "5", "-t", "60s", "--out", &out.display().to_string(), "-q"],
    );
    let proc = Proc::spawn(&args);

    // Traffic first (so the run is really under way), then ~2 s of it.
    let start = Instant::now();
    while target.counts.requests() == 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(target.counts.requests() > 0, "no traffic within 10 s");
    std::thread::sleep(Duration::from_secs(2).saturating_sub(start.elapsed()));

    let kill = Command::new("kill")
        .args(["-INT", &proc.id().to_string()])
        .status()
        .expect("run kill -INT");
    assert!(kill.success(), "kill -INT failed");
    let interrupted_at = Instant::now();
    let f = proc.wait(Duration::from_secs(10));
    let took = interrupted_at.elapsed();

    assert_eq!(f.code(), Some(130), "exit after SIGINT (took {took:?})\n{}", f.show());
    assert!(
        f.stdout.contains("Aggregated"),
        "no summary table on stdout\n{}",
        f.show()
    );
    assert!(out.exists(), "--out file not written\n{}", f.show());
    let json = read_json(&out);
    assert_eq!(json["interrupted"], serde_json::Value::Bool(true), "{json:#}");
    let reported = json["total"]["requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("total.requests missing: {json:#}"));
    let received = target.counts.requests();
    assert_eq!(
        reported,
        received,
        "total.requests in the JSON vs requests the target received\n{}",
        f.show()
    );

    // Written atomically: no temporary file left next to it.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["out.json", "scenario.lua"], "leftover files");
}

// ---------------------------------------------------------------------------------------------
// 5. A normal run
// ---------------------------------------------------------------------------------------------

#[test]
fn short_run_exits_0_and_json_matches_target_and_schema() {
    let target = target();
    let dir = TempDir::new("run");
    let script = dir.write("scenario.lua", GOOD_SCENARIO);
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "3", "-t", "2s", "--out", &out.display().to_string(), "-q"],
    );
    let f = run(&args, Duration::from_secs(20));
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(f.stdout.contains("Aggregated"), "{}", f.show());

    let json = read_json(&out);
    assert_keys(
        &json,
        &[
            "version",
            "started_at",
            "duration_s",
            "interrupted",
            "config",
            "total",
            "endpoints",
            "failures",
        ],
        "summary",
    );
    assert_eq!(json["interrupted"], serde_json::Value::Bool(false));
    assert!(
        json["version"].is_string() && json["started_at"].is_string(),
        "{json:#}"
    );
    let secs = json["duration_s"].as_f64().expect("duration_s is a number");
    assert!((1.5..10.0).contains(&secs), "duration_s = {secs}");

    assert_keys(&json["config"], &["host", "users", "spawn_rate", "script"], "config");
    assert_eq!(json["config"]["users"], 3, "{json:#}");

    let total = &json["total"];
    assert_keys(total, &["requests", "failures", "rps", "latency_ms"], "total");
    assert_keys(&total["latency_ms"], LATENCY_FIELDS, "total.latency_ms");
    let requests = total["requests"].as_u64().expect("total.requests");
    assert!(requests > 0, "no requests in 2 s: {json:#}");
    assert_eq!(
        requests,
        target.counts.requests(),
        "total.requests vs what the target received"
    );
    assert_eq!(total["failures"], 0, "the target answers 200: {json:#}");

    let rows = json["endpoints"].as_array().expect("endpoints is an array");
    let mut seen = Vec::new();
    let mut sum = 0;
    for row in rows {
        assert_keys(
            row,
            &["method", "name", "requests", "failures", "rps", "latency_ms"],
            "endpoint row",
        );
        assert_keys(&row["latency_ms"], LATENCY_FIELDS, "endpoint latency_ms");
        sum += row["requests"].as_u64().expect("row requests");
        seen.push(format!(
            "{} {}",
            row["method"].as_str().unwrap_or("?"),
            row["name"].as_str().unwrap_or("?")
        ));
    }
    seen.sort();
    assert_eq!(seen, ["GET /hello", "POST /api/upload"], "endpoint rows");
    assert_eq!(sum, requests, "endpoint rows add up to the total");
    assert!(json["failures"].is_array(), "{json:#}");
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C with requests in flight
// ---------------------------------------------------------------------------------------------

/// Every user is waiting on a slow response when Ctrl-C arrives.
const SLOW_SCENARIO: &str = r#"endpoints = {
  Task("GET", "/slow", { query = { ms = "3000" } }),
}
"#;

#[test]
fn sigint_with_requests_in_flight_counts_each_once_after_the_grace() {
    let target = target();
    let dir = TempDir::new("sigint-inflight");
    let script = dir.write("scenario.lua", SLOW_SCENARIO);
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &[
            "-u",
            "4",
            "-t",
            "60s",
            "--grace",
            "300ms",
            "--out",
            &out.display().to_string(),
            "-q",
        ],
    );
    let proc = Proc::spawn(&args);
    wait_for_requests(&target, 4);
    std::thread::sleep(Duration::from_millis(300));
    send_sigint(proc.id());
    let interrupted_at = Instant::now();
    let f = proc.wait(Duration::from_secs(10));
    let took = interrupted_at.elapsed();

    assert_eq!(f.code(), Some(130), "{}", f.show());
    // The grace is 300 ms and the responses need 3 s: the run must not wait for them.
    assert!(
        took < Duration::from_millis(2500),
        "exit took {took:?} after Ctrl-C with --grace 300ms\n{}",
        f.show()
    );
    let json = read_json(&out);
    let received = target.counts.requests();
    assert_eq!(
        json["total"]["requests"].as_u64(),
        Some(received),
        "total.requests vs what the target received: {json:#}"
    );
    // None of them got an answer: each is a failure, listed with a reason.
    assert_eq!(json["total"]["failures"].as_u64(), Some(received), "{json:#}");
    let listed: u64 = json["failures"]
        .as_array()
        .expect("failures is an array")
        .iter()
        .map(|f| f["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(listed, received, "failure counts by reason: {json:#}");
}

#[test]
fn second_sigint_exits_at_once_and_still_writes_the_summary() {
    let target = target();
    let dir = TempDir::new("sigint-twice");
    let script = dir.write("scenario.lua", SLOW_SCENARIO);
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &[
            "-u",
            "2",
            "-t",
            "60s",
            "--grace",
            "30s",
            "-q",
            "--out",
            &out.display().to_string(),
        ],
    );
    let proc = Proc::spawn(&args);
    wait_for_requests(&target, 2);
    send_sigint(proc.id());
    std::thread::sleep(Duration::from_millis(500));
    send_sigint(proc.id());
    let second_at = Instant::now();
    // The grace (30 s) and the responses (3 s) would take longer than this.
    let f = proc.wait(Duration::from_secs(10));
    let took = second_at.elapsed();
    assert_eq!(f.code(), Some(130), "{}", f.show());
    assert!(
        took < Duration::from_millis(2000),
        "second Ctrl-C: exit took {took:?}\n{}",
        f.show()
    );
    // Nothing measured is lost: the requests in flight count as aborted, in the summary and the file.
    assert!(f.stdout.contains("Aggregated"), "{}", f.show());
    let json = read_json(&out);
    assert_eq!(json["interrupted"], serde_json::Value::Bool(true));
    assert_eq!(
        json["total"]["requests"].as_u64(),
        Some(target.counts.requests()),
        "{json:#}"
    );
    let aborted = json["failures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["reason"].as_str().unwrap().starts_with("aborted"));
    assert!(aborted, "{json:#}");
}

// ---------------------------------------------------------------------------------------------
// A dead host is not bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn dead_host_is_counted_not_rejected() {
    // A port that was free a moment ago and has nobody listening now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new("dead-host");
    let script = dir.write("scenario.lua", GOOD_SCENARIO);
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &format!("http://127.0.0.1:{port}"),
        &["-u", "2", "-t", "1s", "--out", &out.display().to_string(), "-q"],
    );
    let f = run(&args, Duration::from_secs(20));
    assert_eq!(f.code(), Some(0), "{}", f.show());
    let json = read_json(&out);
    let requests = json["total"]["requests"].as_u64().expect("total.requests");
    assert!(requests > 0, "{json:#}");
    assert_eq!(json["total"]["failures"].as_u64(), Some(requests), "{json:#}");
    assert!(!json["failures"].as_array().expect("failures").is_empty(), "{json:#}");
}

// ---------------------------------------------------------------------------------------------
// Issue 8: endless and trickled bodies end at their limits with flat memory
// ---------------------------------------------------------------------------------------------

#[test]
fn endless_and_trickled_bodies_end_at_their_limits_with_flat_memory() {
    let target = target();
    let dir = TempDir::new("endless");
    let out = dir.path().join("out.json");
    let out_arg = out.display().to_string();

    // Dropped bodies: an endless one read for as long as the cap lets it, 4 at a time.
    let script = dir.write("endless.lua", r#"endpoints = { Task("GET", "/fault/endless") }"#);
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "4", "-t", "2s", "-q", "--max-body", "200MB", "--out", &out_arg],
    );
    let (f, peak) = run_sampling_rss(&args, Duration::from_secs(20));
    assert_eq!(f.code(), Some(0), "{}", f.show());
    let json = read_json(&out);
    let failures = json["failures"].as_array().unwrap();
    assert!(failures.iter().any(|x| x["reason"] == "body too large"), "{json:#}");
    assert!(peak < 64 * 1024, "dropped bodies keep memory flat: peak {peak} KiB");

    // Kept bodies (after_response reads them): bounded by users x the cap.
    let script = dir.write(
        "kept.lua",
        r#"endpoints = { Task("GET", "/fault/endless") }
           function after_response(user, req, res) end"#,
    );
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "4", "-t", "2s", "-q", "--max-body", "8MiB", "--out", &out_arg],
    );
    let (f, peak) = run_sampling_rss(&args, Duration::from_secs(20));
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(
        peak < 4 * 16 * 1024 + 64 * 1024,
        "kept bodies stay under users x cap: peak {peak} KiB"
    );

    // A trickled body ends at the request timeout, not later.
    let script = dir.write(
        "trickle.lua",
        r#"endpoints = { Task("GET", "/fault/trickle?bytes=100&ms=200") }"#,
    );
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "2", "-t", "1s", "--timeout", "500ms", "-q", "--out", &out_arg],
    );
    let started = Instant::now();
    let (f, _) = run_sampling_rss(&args, Duration::from_secs(20));
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "ended on time: {:?}",
        started.elapsed()
    );
    let json = read_json(&out);
    assert_eq!(json["failures"][0]["reason"], "request timeout", "{json:#}");
    assert_eq!(json["total"]["failures"], json["total"]["requests"]);
}

// ---------------------------------------------------------------------------------------------
// Failure reasons and check names made unique per request stay within --max-names
// ---------------------------------------------------------------------------------------------

#[test]
fn reasons_and_check_names_unique_per_request_keep_memory_flat_over_time() {
    let target = target();
    let dir = TempDir::new("unique");
    let out = dir.path().join("out.json");
    let out_arg = out.display().to_string();
    let script = dir.write(
        "unique.lua",
        r#"endpoints = { Task("GET", "/hello") }
           function after_response(u, req, res)
             check(false, "c " .. uuid())
             if rand.int(1, 3) == 1 then error("id " .. uuid()) end
             return false, "bad " .. uuid()
           end"#,
    );
    // The peak resident memory (VmHWM) of a run of `secs`, its requests, its file's size and
    // what it said on stderr.
    let run_for = |secs: &str| {
        let args = run_args(
            &script,
            &target.url(),
            &["-u", "50", "-t", secs, "-q", "--out", &out_arg],
        );
        let proc = Proc::spawn(&args);
        let pid = proc.id();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while let Some(kib) = status_kib(pid, "VmHWM:") {
                peak = kib;
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        let f = proc.wait(Duration::from_secs(20));
        let peak = sampler.join().unwrap();
        assert_eq!(f.code(), Some(0), "{}", f.show());
        let json = read_json(&out);
        let requests = json["total"]["requests"].as_u64().unwrap();
        assert_eq!(
            json["total"]["failures"].as_u64(),
            Some(requests),
            "every request failed"
        );
        let size = std::fs::metadata(&out).unwrap().len();
        (peak, requests, size, f)
    };
    let (short_peak, short_requests, _, _) = run_for("2s");
    let (long_peak, long_requests, long_size, long) = run_for("6s");
    assert!(
        long_requests > 2 * short_requests,
        "the long run sent more: {short_requests} then {long_requests}"
    );
    assert!(
        long_peak <= short_peak + short_peak / 10 + 1024,
        "peak RSS {short_peak} KiB after 2 s, {long_peak} KiB after 6 s ({short_requests} and {long_requests} requests)"
    );
    assert!(long_size < 1 << 20, "--out is {long_size} bytes");
    for warned in ["distinct failure reasons", "distinct check names"] {
        assert_eq!(
            long.stderr.matches(warned).count(),
            1,
            "one warning: {warned}\n{}",
            long.show()
        );
    }
}

#[test]
fn check_warns_about_a_misspelt_hook() {
    let dir = TempDir::new("typo");
    let script = dir.write(
        "typo.lua",
        "endpoints = { Task('GET', '/') }\nfunction before_requets(user, req) end\n",
    );
    let f = run(&["check".to_string(), script.display().to_string()], QUICK);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(f.stdout.contains("did you mean `before_request`"), "{}", f.show());
}

// ---------------------------------------------------------------------------------------------
// Outputs survive what happens at the end
// ---------------------------------------------------------------------------------------------

#[test]
fn an_output_that_fails_at_the_end_still_leaves_the_summary_and_exits_3() {
    let target = target();
    let dir = TempDir::new("out-gone");
    let script = dir.write("scenario.lua", r#"endpoints = { { method = "GET", path = "/hello" } }"#);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let out = sub.join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "2", "-t", "2s", "-q", "--out", &out.display().to_string()],
    );
    let proc = Proc::spawn(&args);
    wait_for_requests(&target, 10);
    // Checked writable before the run; gone by the end of it.
    std::fs::remove_dir_all(&sub).unwrap();
    let f = proc.wait(Duration::from_secs(15));
    assert_eq!(f.code(), Some(3), "{}", f.show());
    assert!(f.stdout.contains("Aggregated"), "the summary is printed: {}", f.show());
    assert!(
        f.stderr
            .contains(&format!("cannot write the summary to {}", out.display())),
        "{}",
        f.show()
    );
}

#[test]
fn two_interrupts_while_users_are_still_starting_leave_a_valid_file() {
    let target = target();
    let dir = TempDir::new("sigint-spawning");
    let script = dir.write("scenario.lua", SLOW_SCENARIO);
    let out = dir.path().join("out.json");
    // 2,000 users at 50/s: the interrupts land while users are starting, with requests in flight.
    let args = run_args(
        &script,
        &target.url(),
        &[
            "-u",
            "2000",
            "-r",
            "50",
            "-t",
            "60s",
            "-q",
            "--out",
            &out.display().to_string(),
        ],
    );
    let proc = Proc::spawn(&args);
    wait_for_requests(&target, 1);
    send_sigint(proc.id());
    send_sigint(proc.id());
    let f = proc.wait(Duration::from_secs(10));
    assert_eq!(f.code(), Some(130), "{}", f.show());
    let json = read_json(&out);
    assert_eq!(json["interrupted"], serde_json::Value::Bool(true));
    assert_eq!(json["all_users_started_s"], serde_json::Value::Null, "{json:#}");
    assert_eq!(
        json["total"]["requests"].as_u64(),
        Some(target.counts.requests()),
        "{json:#}"
    );
}

/// This process's hard limit of open files (what a run may raise its own to).
fn open_files_limit() -> u64 {
    std::process::Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn two_interrupts_before_the_first_request_leave_a_valid_file() {
    let target = target();
    let dir = TempDir::new("sigint-early");
    let script = dir.write(
        "scenario.lua",
        "endpoints = { { method = 'GET', path = '/hello' } }\nfunction before_request(user, req) end\n",
    );
    let out = dir.path().join("out.json");
    // 15,000 Lua states take a while to prepare: the interrupts land before any traffic.
    // (Fewer where the open-files limit would refuse that many users.)
    let users = open_files_limit().saturating_sub(200).min(15_000).to_string();
    let args = run_args(
        &script,
        &target.url(),
        &[
            "-u",
            &users,
            "-r",
            "10000",
            "-t",
            "60s",
            "-q",
            "--out",
            &out.display().to_string(),
        ],
    );
    let proc = Proc::spawn(&args);
    std::thread::sleep(Duration::from_millis(500));
    send_sigint(proc.id());
    send_sigint(proc.id());
    let f = proc.wait(Duration::from_secs(20));
    assert_eq!(f.code(), Some(130), "{}", f.show());
    let json = read_json(&out);
    assert_eq!(json["interrupted"], serde_json::Value::Bool(true));
    assert_eq!(
        json["total"]["requests"].as_u64(),
        Some(target.counts.requests()),
        "{json:#}"
    );
}

#[test]
fn teardown_runs_after_an_interrupt_too() {
    let target = target();
    let dir = TempDir::new("teardown");
    let script = dir.write(
        "scenario.lua",
        r#"
        function setup() return { who = "setup" } end
        function scenario(user) http.get("/hello") sleep(0.05) end
        function teardown(data) http.post("/api/upload", { json = { bye = data.who }, name = "teardown" }) end
        "#,
    );
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "2", "-t", "60s", "-q", "--out", &out.display().to_string()],
    );
    let proc = Proc::spawn(&args);
    wait_for_requests(&target, 5);
    send_sigint(proc.id());
    let f = proc.wait(Duration::from_secs(15));
    assert_eq!(f.code(), Some(130), "{}", f.show());
    let json = read_json(&out);
    let teardown = json["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "teardown")
        .unwrap_or_else(|| panic!("no teardown row: {json:#}"));
    assert_eq!(teardown["requests"], 1);
    assert_eq!(json["total"]["requests"].as_u64(), Some(target.counts.requests()));
}

#[test]
fn a_failing_setup_starts_no_user_and_exits_4_with_what_it_sent() {
    let target = target();
    let dir = TempDir::new("setup-fails");
    let script = dir.write(
        "scenario.lua",
        r#"
        function setup() http.get("/items/1", { name = "setup fetch" }) error("no items") end
        function scenario(user) http.get("/hello") end
        function on_strat(user) end
        function teardwon() end
        "#,
    );
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "2", "-t", "5s", "-q", "--out", &out.display().to_string()],
    );
    let f = run(&args, Duration::from_secs(15));
    assert_eq!(f.code(), Some(4), "{}", f.show());
    assert!(
        f.stderr.contains("setup() failed") && f.stderr.contains("no items"),
        "{}",
        f.show()
    );
    // Both misspelt hooks are named.
    assert!(
        f.stderr.contains("`on_strat`") && f.stderr.contains("`teardwon`"),
        "{}",
        f.show()
    );
    let json = read_json(&out);
    assert_eq!(json["total"]["requests"], 1, "{json:#}");
    assert_eq!(target.counts.requests(), 1, "no user was started");
}

// ---------------------------------------------------------------------------------------------
// Thresholds
// ---------------------------------------------------------------------------------------------

#[test]
fn thresholds_pass_with_exit_0_and_fail_with_exit_1() {
    let target = target();
    let dir = TempDir::new("thresholds");
    let script = dir.write("scenario.lua", GOOD_SCENARIO);
    let out = dir.path().join("out.json");
    let base = |extra: &[&str]| {
        let mut flags = vec!["-u", "2", "-t", "1s", "-q", "--out"];
        let o = out.display().to_string();
        flags.push(Box::leak(o.into_boxed_str()));
        flags.extend_from_slice(extra);
        run_args(&script, &target.url(), &flags)
    };
    let pass = run(
        &base(&["--threshold", "fail_rate<1%", "--threshold", "p99 < 5s"]),
        Duration::from_secs(15),
    );
    assert_eq!(pass.code(), Some(0), "{}", pass.show());
    assert!(pass.stdout.contains("pass  fail_rate<1%"), "{}", pass.show());

    let fail = run(
        &base(&["--threshold", "p50<1us", "--threshold", "GET /hello: rps > 1"]),
        Duration::from_secs(15),
    );
    assert_eq!(fail.code(), Some(1), "{}", fail.show());
    assert!(fail.stdout.contains("FAIL  p50<1us"), "{}", fail.show());
    let json = read_json(&out);
    let verdicts = json["thresholds"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2, "{json:#}");
    assert_eq!(verdicts[0]["ok"], false);
    assert_eq!(verdicts[1]["ok"], true, "{json:#}");
    assert_eq!(verdicts[1]["row"], "GET /hello");
}

#[test]
fn abort_on_fail_stops_the_run_early_and_still_writes_the_summary() {
    let target = target();
    let dir = TempDir::new("abort");
    let script = dir.write(
        "scenario.lua",
        r#"
        endpoints = { Task("GET", "/status/500") }
        thresholds = { { "fail_rate < 10%", abort_on_fail = true } }
        "#,
    );
    let out = dir.path().join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &["-u", "2", "-t", "60s", "-q", "--out", &out.display().to_string()],
    );
    let started = Instant::now();
    let f = run(&args, Duration::from_secs(20));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped at the first tick: {:?}",
        started.elapsed()
    );
    assert_eq!(f.code(), Some(1), "{}", f.show());
    assert!(f.stderr.contains("stopped early"), "{}", f.show());
    let json = read_json(&out);
    assert_eq!(json["thresholds"][0]["ok"], false, "{json:#}");
    assert_eq!(json["total"]["requests"].as_u64(), Some(target.counts.requests()));
}

#[test]
fn the_live_view_shows_progress_without_colour_off_a_terminal() {
    let target = target();
    let dir = TempDir::new("live");
    let script = dir.write("scenario.lua", GOOD_SCENARIO);
    let f = run(
        &run_args(&script, &target.url(), &["-u", "1", "-t", "2500ms"]),
        Duration::from_secs(15),
    );
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(
        f.stderr.contains("s elapsed, ") && f.stderr.contains("[########"),
        "{}",
        f.show()
    );
    assert!(
        !f.stderr.contains('\x1b'),
        "no escape codes when stderr is not a terminal:\n{}",
        f.show()
    );
}

// ---------------------------------------------------------------------------------------------
// Credentials in URLs: sent as Basic auth, never printed or written
// ---------------------------------------------------------------------------------------------

/// The password the next tests put in URLs; it must appear in no output.
const SECRET: &str = "s3cr3t-pw";

/// Asserts that `text` (an output called `what`) shows `***` and never [`SECRET`].
fn hides_the_secret(text: &str, what: &str) {
    assert!(!text.contains(SECRET), "{what} shows the password:\n{text}");
    assert!(text.contains(":***@"), "{what} shows no redacted URL:\n{text}");
}

#[test]
fn url_creds_never_reach_an_output_or_the_terminal() {
    let target = target();
    let addr = target.addr;
    let dir = TempDir::new("creds");
    let script = dir.write(
        "creds.lua",
        format!(
            r#"wait_time = constant(0.02)
endpoints = {{
  Task("GET", "/hello"),
  {{ method = "GET", url = "http://ada:{SECRET}@{addr}/items/1" }},
  {{ method = "GET", url = "http://ada:{SECRET}@{addr}/status/500" }},
  Task("GET", "/hello", {{ name = "rewritten" }}),
}}
function before_request(user, req)
  -- a URL the request cannot go to: its failure reason quotes it
  if req.name == "rewritten" then req.url = "http://ada:{SECRET}@127.0.0.1:99999/" end
end
"#
        ),
    );
    let host = format!("http://ada:{SECRET}@{addr}");
    let (out, csv, html) = (
        dir.path().join("out.json"),
        dir.path().join("run"),
        dir.path().join("run.html"),
    );
    let f = run(
        &run_args(
            &script,
            &host,
            &[
                "-u",
                "2",
                "-t",
                "2500ms",
                "--out",
                out.to_str().unwrap(),
                "--csv",
                csv.to_str().unwrap(),
                "--html",
                html.to_str().unwrap(),
            ],
        ),
        Duration::from_secs(20),
    );
    assert_eq!(f.code(), Some(0), "{}", f.show());
    // Stdout: the summary's tables. Stderr: the start line, the live table, the failures.
    hides_the_secret(&f.stdout, "stdout");
    hides_the_secret(&f.stderr, "stderr");
    assert!(
        f.stderr.contains(&format!("against http://ada:***@{addr} ")),
        "{}",
        f.show()
    );
    let json = read_json(&out);
    assert_eq!(json["config"]["host"], format!("http://ada:***@{addr}"));
    hides_the_secret(&json.to_string(), "--out");
    let reasons: Vec<&str> = json["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("http://ada:***@127.0.0.1:99999/")),
        "a failure reason quotes the URL, redacted: {reasons:?}"
    );
    for suffix in ["_stats.csv", "_failures.csv"] {
        let path = dir.path().join(format!("run{suffix}"));
        hides_the_secret(&std::fs::read_to_string(&path).unwrap(), suffix);
    }
    let history = std::fs::read_to_string(dir.path().join("run_stats_history.csv")).unwrap();
    assert!(!history.contains(SECRET));
    hides_the_secret(&std::fs::read_to_string(&html).unwrap(), "--html");
    // The requests went out with the credentials, the URLs without them.
    let rows = json["endpoints"].as_array().unwrap();
    let named = |name: String| rows.iter().find(|r| r["name"] == name.as_str()).cloned();
    let items = named(format!("http://ada:***@{addr}/items/1")).expect("the URL names its row");
    assert_eq!(items["failures"], 0);
    let unsent = named("rewritten".into()).unwrap()["requests"].as_u64().unwrap();
    assert_eq!(
        json["total"]["requests"].as_u64().unwrap() - unsent,
        target.counts.requests()
    );

    // `check` shows the scenario's URLs and host the same way.
    let with_host = dir.write(
        "check.lua",
        format!("host = \"{host}\"\nendpoints = {{ {{ method = \"GET\", url = \"http://bo:{SECRET}@{addr}/x\" }} }}\n"),
    );
    let f = run(&["check".to_string(), with_host.display().to_string()], QUICK);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    hides_the_secret(&f.stdout, "check");
    assert!(
        f.stdout.contains("bo:***@") && f.stdout.contains("ada:***@"),
        "{}",
        f.show()
    );
}

#[test]
fn bad_urls_with_creds_are_refused_without_showing_the_password() {
    let target = target();
    let dir = TempDir::new("creds-bad");
    let good = dir.write("good.lua", "endpoints = { Task('GET', '/hello') }\n");
    let ftp = dir.write(
        "ftp.lua",
        format!("endpoints = {{ {{ method = 'GET', url = 'ftp://ada:{SECRET}@127.0.0.1/x' }} }}\n"),
    );
    let port = dir.write(
        "port.lua",
        format!("endpoints = {{ {{ method = 'GET', url = 'http://ada:{SECRET}@127.0.0.1:99999/x' }} }}\n"),
    );
    let host_bad = format!("http://ada:{SECRET}@127.0.0.1:99999");
    let no_scheme = format!("ada:{SECRET}@{}", target.addr);
    for (script, host, says) in [
        (&good, host_bad.as_str(), "bad host URL"),
        (&good, no_scheme.as_str(), "needs a scheme"),
        (&ftp, target.url().as_str(), "must be absolute"),
        (&port, target.url().as_str(), "bad url"),
    ] {
        let f = run(&run_args(script, host, &["-t", "1s", "-q"]), QUICK);
        assert_eq!(f.code(), Some(2), "{}", f.show());
        assert!(f.stderr.contains(says), "{}", f.show());
        hides_the_secret(&f.stderr, says);
    }
    assert_eq!(target.counts.requests(), 0);
}
