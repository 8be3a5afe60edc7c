//! Scripts written to hang the run, through the binary: whatever a script does (a loop, work in
//! the string and table libraries, output without end, finalizers, memory), the run ends on
//! time, by its duration or by Ctrl-C or SIGTERM, with its summary and `--out`, the limit named,
//! and the target's count equal to stormlight's. And what the machine cannot hold (users past
//! its open files) is refused before traffic or counted during the run.
//!
//! Every child is bounded by a deadline. The tests take a lock and run one at a time, so that
//! they do not slow each other's timed runs down on a small machine.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;
use common::process::*;
use common::target;

/// One test at a time (see the module's doc).
static TIMED: Mutex<()> = Mutex::new(());

fn timed() -> std::sync::MutexGuard<'static, ()> {
    TIMED.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a bounded run of a scenario left: its exit, its result file, its peak RSS (KiB).
struct Ran {
    f: Finished,
    json: serde_json::Value,
    peak_kib: u64,
}

/// Runs `source` against `target` with `flags` and `--out`, to its end within 20 s.
fn run_source(target: &stormlight::target::Target, source: &str, flags: &[&str]) -> Ran {
    let dir = TempDir::new("run");
    let script = dir.write("s.lua", source);
    let out = dir.join("out.json");
    let mut rest = flags.to_vec();
    let out_arg = out.display().to_string();
    rest.extend(["-q", "--out", &out_arg]);
    let (f, peak_kib) = run_sampling_rss(&run_args(&script, &target.url(), &rest), Duration::from_secs(20));
    assert!(out.exists(), "no result file\n{}", f.show());
    let json = read_json(&out);
    Ran { f, json, peak_kib }
}

/// A way for a script to hold its worker: the Lua code, and where it runs.
struct Stuck {
    name: &'static str,
    code: &'static str,
    /// `scenario` (after one request each time), `before_request`, or `on_stop`.
    hook: &'static str,
}

const STUCK: &[Stuck] = &[
    Stuck {
        name: "a Lua loop",
        code: "local i = 0 while true do i = i + 1 end",
        hook: "scenario",
    },
    Stuck {
        name: "a loop under pcall",
        code: "while true do pcall(function() while true do end end) end",
        hook: "scenario",
    },
    Stuck {
        name: "a loop in a coroutine",
        code: "coroutine.wrap(function() while true do end end)()",
        hook: "scenario",
    },
    Stuck {
        name: "a loop in before_request",
        code: "while true do end",
        hook: "before_request",
    },
    Stuck {
        name: "a loop in on_stop",
        code: "while true do end",
        hook: "on_stop",
    },
    Stuck {
        name: "pattern backtracking",
        code: "while true do string.find(string.rep('a', 40), string.rep('a?', 40) .. string.rep('a', 40)) end",
        hook: "scenario",
    },
    Stuck {
        name: "a lazy pattern over 1 MiB",
        code: "local s = string.rep('a', 1 << 20) while true do s:find('.-b') end",
        hook: "scenario",
    },
    Stuck {
        name: "a loop over string.rep of 1 MiB",
        code: "while true do local s = string.rep('x', 1 << 20) end",
        hook: "scenario",
    },
    Stuck {
        name: "table.concat of megabytes",
        code: "local t = {} for i = 1, 100000 do t[i] = 'xxxxxxxxxx' end while true do local s = table.concat(t) end",
        hook: "scenario",
    },
    Stuck {
        name: "utf8.len of megabytes",
        code: "local s = string.rep('\\u{e9}', 2 << 20) while true do local n = utf8.len(s) end",
        hook: "scenario",
    },
    Stuck {
        name: "sorting a long list",
        code: "local t = {} for i = 1, 300000 do t[i] = -i end while true do table.sort(t) end",
        hook: "scenario",
    },
    Stuck {
        name: "print in a tight loop",
        code: "while true do print('x') end",
        hook: "scenario",
    },
];

/// The scenario of `s`: a user sends one request, then (every second iteration, so that both
/// the requests and the stuck calls are seen) gets stuck.
fn scenario_of(s: &Stuck) -> String {
    match s.hook {
        "scenario" => format!(
            "local n = 0\nfunction scenario(user)\n  http.get('/hello')\n  n = n + 1\n  if n % 2 == 0 then\n    {}\n  end\nend\n",
            s.code
        ),
        "before_request" => format!(
            "endpoints = {{ Task('GET', '/hello') }}\nlocal n = 0\nfunction before_request(user, req)\n  n = n + 1\n  if n % 2 == 0 then\n    {}\n  end\nend\n",
            s.code
        ),
        "on_stop" => format!(
            "endpoints = {{ Task('GET', '/hello') }}\nwait_time = constant(0.05)\nfunction on_stop(user)\n  {}\nend\n",
            s.code
        ),
        other => panic!("no such hook {other}"),
    }
}

/// Checks the result file of a run stopped while scripts were stuck: valid JSON, the same count
/// as the target's, and (when `stuck`) the stopped calls listed with their hook and file.
fn check_result(out: &Path, target_count: u64, s: &Stuck, f: &Finished) -> serde_json::Value {
    let json = read_json(out);
    // A request whose before_request failed is counted, as a failure, but never sent.
    let not_sent: u64 = json["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["method"] != "HOOK" && r["reason"].as_str().is_some_and(|r| r.starts_with("script ")))
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        json["total"]["requests"].as_u64().map(|n| n - not_sent),
        Some(target_count),
        "{}: stormlight's count is the target's\n{}",
        s.name,
        f.show()
    );
    json
}

#[test]
fn stuck_scripts_end_with_the_run_on_time_with_the_limit_named() {
    let _one = timed();
    let target = target();
    for s in STUCK {
        let dir = TempDir::new("stuck");
        let script = dir.write("stuck.lua", scenario_of(s));
        let out = dir.join("out.json");
        let before = target.counts.requests();
        let args = run_args(
            &script,
            &target.url(),
            &[
                "-u",
                "2",
                "-t",
                "2s",
                "--grace",
                "1s",
                "--script-timeout",
                "500ms",
                "-q",
                "--out",
                &out.display().to_string(),
            ],
        );
        let f = Proc::spawn(&args).wait(Duration::from_secs(20));
        assert_eq!(f.code(), Some(0), "{}\n{}", s.name, f.show());
        // The duration, the grace period and a second, with room for a slow machine.
        assert!(
            f.took < Duration::from_secs(6),
            "{}: took {:?}\n{}",
            s.name,
            f.took,
            f.show()
        );
        let json = check_result(&out, target.counts.requests() - before, s, &f);
        let reasons: Vec<&str> = json["failures"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["reason"].as_str())
            .collect();
        let named = reasons.iter().any(|r| {
            r.starts_with("script limit: ")
                && r.contains(s.hook)
                && (r.contains("script time limit exceeded")
                    || r.contains("instruction budget exceeded")
                    || r.contains("stopped: the run ended"))
                && r.contains("stuck.lua:")
        });
        assert!(
            named,
            "{}: the limit and file:line are named: {reasons:?}\n{}",
            s.name,
            f.show()
        );
        if s.hook != "on_stop" {
            assert!(
                json["total"]["requests"].as_u64() > Some(0),
                "{}: the run went on",
                s.name
            );
        }
    }
}

#[test]
fn sigint_and_sigterm_end_stuck_runs_within_the_grace_period_and_a_second() {
    let _one = timed();
    let target = target();
    let grace = Duration::from_secs(1);
    for (i, s) in STUCK.iter().enumerate() {
        for signal in ["INT", "TERM"] {
            let dir = TempDir::new("stuck-signal");
            let script = dir.write("stuck.lua", scenario_of(s));
            let out = dir.join("out.json");
            let before = target.counts.requests();
            // A script time limit out of reach: only the stop can end these calls.
            let args = run_args(
                &script,
                &target.url(),
                &[
                    "-u",
                    "2",
                    "-t",
                    "60s",
                    "--grace",
                    "1s",
                    "--script-timeout",
                    "1h",
                    "-q",
                    "--out",
                    &out.display().to_string(),
                ],
            );
            let proc = Proc::spawn(&args);
            // Both users have sent and are stuck (on_stop: running, before the stop).
            wait_for_requests(&target, before + 2);
            std::thread::sleep(Duration::from_millis(300 + 50 * (i as u64 % 3)));
            let sent = Instant::now();
            send_signal(proc.id(), signal);
            let f = proc.wait(Duration::from_secs(20));
            let after = sent.elapsed();
            assert_eq!(f.code(), Some(130), "{} ({signal}):\n{}", s.name, f.show());
            assert!(
                after < grace + Duration::from_secs(1),
                "{} ({signal}): ended {after:?} after the signal\n{}",
                s.name,
                f.show()
            );
            let json = check_result(&out, target.counts.requests() - before, s, &f);
            assert_eq!(json["interrupted"], serde_json::Value::Bool(true));
            // The calls the end stopped are named; a Lua loop may have met its instruction
            // budget first.
            let stopped = json["stuck"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|w| w.as_str().unwrap().contains(&format!("in {}", s.hook)))
            });
            let budget = json["failures"].to_string().contains("instruction budget exceeded");
            assert!(
                (stopped && f.stdout.contains("still running when the run ended")) || budget,
                "{} ({signal}): the stopped calls are named\n{}",
                s.name,
                f.show()
            );
        }
    }
}

#[test]
fn finalizers_are_refused_and_cannot_hang_the_end() {
    let _one = timed();
    let target = target();
    // The first would loop when the collector (or the state's closing) calls it; the second
    // would send from a finalizer.
    let ran = run_source(
        &target,
        "function scenario(user)\n  http.get('/hello')\n  setmetatable({}, { __gc = function() while true do end end })\nend\nfunction on_start(user)\n  pcall(setmetatable, {}, { __gc = function() http.get('/gc') end })\nend\n",
        &["-u", "2", "-t", "1s"],
    );
    assert_eq!(ran.f.code(), Some(0), "{}", ran.f.show());
    assert_eq!(ran.json["total"]["requests"].as_u64(), Some(target.counts.requests()));
    let failures = ran.json["failures"].to_string();
    assert!(failures.contains("__gc (finalizers) is not allowed"), "{failures}");
    let rows = ran.json["endpoints"].to_string();
    assert!(!rows.contains("\"/gc\""), "nothing sent from a finalizer: {rows}");
}

#[test]
fn json_decode_stays_within_the_states_memory_and_long_log_lines_are_cut() {
    let _one = timed();
    let target = target();
    // 6 MB of `[],`: as serde_json values, 116 MiB each time, outside any limit; as Lua tables,
    // past the state's 16 MiB, refused.
    let ran = run_source(
        &target,
        "local text = '[' .. string.rep('[],', 2000000) .. '[]]'\nlocal said = false\nfunction scenario(user)\n  if not said then said = true log.info(string.rep('y', 5000000)) end\n  http.get('/hello')\n  local ok = pcall(json.decode, text)\n  check(not ok, 'refused at the limit')\nend\n",
        &["-u", "4", "-t", "3s"],
    );
    assert_eq!(ran.f.code(), Some(0), "{}", ran.f.show());
    assert_eq!(ran.json["total"]["requests"].as_u64(), Some(target.counts.requests()));
    let check = &ran.json["checks"][0];
    assert!(
        check["passes"].as_u64() > Some(0) && check["fails"].as_u64() == Some(0),
        "{check}"
    );
    // Four states of 16 MiB at most, the rest of the process, and room.
    assert!(ran.peak_kib < 150 * 1024, "peak RSS {} KiB", ran.peak_kib);
    // The 5 MB line is cut at 4 KiB, and says so.
    let line = ran
        .f
        .stderr
        .lines()
        .find(|l| l.starts_with("[info] y"))
        .expect("the log line");
    assert!(
        line.len() < 4200 && line.ends_with("more bytes cut)"),
        "{} bytes",
        line.len()
    );
}

#[test]
fn a_rate_far_above_the_pool_ends_on_time_counts_its_drops_and_stops_at_sigterm() {
    let _one = timed();
    let target = target();
    let dir = TempDir::new("rate");
    let script = dir.write("rate.lua", "endpoints = { Task('GET', '/hello') }\n");
    let out = dir.join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &[
            "--rate",
            "5000000",
            "--max-users",
            "2",
            "-t",
            "2s",
            "-q",
            "--out",
            &out.display().to_string(),
        ],
    );
    let (f, peak_kib) = run_sampling_rss(&args, Duration::from_secs(20));
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(f.took < Duration::from_secs(5), "took {:?}", f.took);
    assert!(peak_kib < 100 * 1024, "peak RSS {peak_kib} KiB");
    let json = read_json(&out);
    let sent = json["total"]["requests"].as_u64().unwrap();
    assert_eq!(Some(sent), Some(target.counts.requests()));
    let dropped = json["dropped_iterations"].as_u64().unwrap();
    // Two seconds' schedule: every iteration was sent or dropped (a few due at the very end
    // may be neither).
    assert!(
        sent + dropped > 9_900_000 && sent + dropped <= 10_000_001,
        "{sent} sent + {dropped} dropped"
    );

    // The same without an end, stopped by SIGTERM.
    let args = run_args(
        &script,
        &target.url(),
        &[
            "--rate",
            "5000000",
            "--max-users",
            "2",
            "-t",
            "60s",
            "--grace",
            "1s",
            "-q",
        ],
    );
    let proc = Proc::spawn(&args);
    wait_for_requests(&target, target.counts.requests() + 10);
    let sent = Instant::now();
    send_signal(proc.id(), "TERM");
    let f = proc.wait(Duration::from_secs(10));
    assert_eq!(f.code(), Some(130), "{}", f.show());
    assert!(sent.elapsed() < Duration::from_secs(2), "{:?}", sent.elapsed());
}

/// Sets the child's open-files limit (soft and hard) to `n`.
fn open_files(n: u64) -> impl FnOnce(&mut std::process::Command) {
    move |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

#[test]
fn users_past_the_open_files_limit_are_refused_before_traffic() {
    let _one = timed();
    let target = target();
    let dir = TempDir::new("nofile");
    let script = dir.write("s.lua", "endpoints = { Task('GET', '/slow?ms=1000') }\n");
    let args = run_args(&script, &target.url(), &["-u", "2000", "-r", "2000", "-t", "2s", "-q"]);
    let f = Proc::spawn_with(&args, open_files(1000)).wait(Duration::from_secs(10));
    assert_eq!(f.code(), Some(2), "{}", f.show());
    assert!(
        f.stderr.contains("2000 users need at least 2064 open files")
            && f.stderr.contains("may open 1000")
            && f.stderr.contains("ulimit -n"),
        "{}",
        f.show()
    );
    assert_eq!(target.counts.requests(), 0);
}

#[test]
fn sockets_that_cannot_be_opened_during_the_run_are_counted_with_their_reason() {
    let _one = timed();
    let (a, b) = (target(), target());
    let dir = TempDir::new("emfile");
    // Each user holds three connections (three origins): 60 users need ~180 sockets, past the
    // limit of 160; the first 60 + 64 fit the check before the run.
    let script = dir.write(
        "s.lua",
        format!(
            "function scenario(user)\n  http.get('/hello')\n  http.get('{}/hello')\n  http.get('{}/hello')\nend\n",
            a.url(),
            b.url()
        ),
    );
    let c = target();
    let out = dir.join("out.json");
    let args = run_args(
        &script,
        &c.url(),
        &["-u", "60", "-t", "2s", "-q", "--out", &out.display().to_string()],
    );
    let f = Proc::spawn_with(&args, open_files(160)).wait(Duration::from_secs(20));
    assert_eq!(f.code(), Some(0), "{}", f.show());
    let json = read_json(&out);
    let received = a.counts.requests() + b.counts.requests() + c.counts.requests();
    let total = json["total"]["requests"].as_u64().unwrap();
    let failed = json["total"]["failures"].as_u64().unwrap();
    let no_socket: u64 = json["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reason"] == "too many open files (ulimit -n)")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(no_socket > 0, "{}", json["failures"]);
    // Every request counted once: what the targets received, and what could not be sent.
    assert_eq!(total - no_socket, received, "{} failed: {}", failed, json["failures"]);
    assert!(
        json["total"]["requests"].as_u64() > Some(no_socket),
        "the others went on"
    );
}

#[test]
fn a_stderr_or_stdout_no_one_reads_does_not_hold_the_run() {
    let _one = timed();
    let target = target();
    let dir = TempDir::new("blocked");
    // Lines enough to fill a pipe in a moment: 500 rows of long names in the live table each
    // second and in the summary (a name is cut at 200 characters), and the script's own output.
    let script = dir.write(
        "s.lua",
        "local name, i = string.rep('n', 150), 0\nfunction scenario(user)\n  i = i + 1\n  http.get('/hello', { name = name .. (i % 500) })\n  print(string.rep('p', 4000))\nend\n",
    );
    let out = dir.join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &[
            "-u",
            "2",
            "-t",
            "2s",
            "--grace",
            "1s",
            "--out",
            &out.display().to_string(),
        ],
    );
    // stderr into a pipe that is held open and never read.
    let (reader, writer) = std::io::pipe().expect("a pipe");
    let f = Proc::spawn_with(&args, move |cmd| {
        cmd.stderr(writer);
    })
    .wait(Duration::from_secs(20));
    drop(reader);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(f.took < Duration::from_secs(6), "took {:?}", f.took);
    let json = read_json(&out);
    assert_eq!(json["total"]["requests"].as_u64(), Some(target.counts.requests()));

    // stdout likewise (the summary): the files are written, the summary given up on, exit 3.
    let before = target.counts.requests();
    std::fs::remove_file(&out).unwrap();
    let (reader, writer) = std::io::pipe().expect("a pipe");
    let f = Proc::spawn_with(&args, move |cmd| {
        cmd.stdout(writer);
    })
    .wait(Duration::from_secs(30));
    drop(reader);
    assert_eq!(f.code(), Some(3), "{}", f.show());
    assert!(f.took < Duration::from_secs(16), "took {:?}", f.took);
    assert!(f.stderr.contains("cannot write the summary to stdout"), "{}", f.show());
    let json = read_json(&out);
    assert_eq!(
        json["total"]["requests"].as_u64(),
        Some(target.counts.requests() - before)
    );
}

#[test]
fn calls_that_wait_or_catch_the_stop_end_with_the_run_and_are_named() {
    let _one = timed();
    let target = target();
    let dir = TempDir::new("waits");
    for (name, source, stuck) in [
        // A pcall around http and sleep cannot catch the run's stop: the run ends on time.
        (
            "pcall",
            "function scenario(user)\n  while true do pcall(http.get, '/hello') pcall(sleep, 0.001) end\nend\n",
            None,
        ),
        // on_stop waiting on sleep, in a loop, past the grace period: named, with its hook.
        (
            "on_stop",
            "endpoints = { Task('GET', '/hello') }\nwait_time = constant(0.05)\nfunction on_stop(user)\n  while true do sleep(0.01) end\nend\n",
            Some("in on_stop: stopped: the run ended while this call was still waiting"),
        ),
    ] {
        let script = dir.write(&format!("{name}.lua"), source);
        let out = dir.join(&format!("{name}.json"));
        let before = target.counts.requests();
        let args = run_args(
            &script,
            &target.url(),
            &[
                "-u",
                "2",
                "-t",
                "1s",
                "--grace",
                "1s",
                "-q",
                "--out",
                &out.display().to_string(),
            ],
        );
        let f = Proc::spawn(&args).wait(Duration::from_secs(20));
        assert_eq!(f.code(), Some(0), "{name}: {}", f.show());
        assert!(f.took < Duration::from_millis(3500), "{name}: took {:?}", f.took);
        let json = read_json(&out);
        assert_eq!(
            json["total"]["requests"].as_u64(),
            Some(target.counts.requests() - before),
            "{name}"
        );
        assert!(json["total"]["requests"].as_u64() > Some(0), "{name}");
        if let Some(stuck) = stuck {
            let listed = json["stuck"].to_string();
            assert!(listed.contains(stuck), "{name}: {listed}");
        }
    }
}

#[test]
fn http_where_it_cannot_wait_is_refused_before_anything_is_counted() {
    let _one = timed();
    let target = target();
    // From a table.sort comparator, a gsub replacement, __tostring, an xpcall handler and load's
    // reader: each refused with its reason; only the plain request is sent, and counted.
    let ran = run_source(
        &target,
        r#"local function refused(f)
  local ok, e = pcall(f)
  check(not ok and e:find("cannot wait inside a function a library function calls back", 1, true), "refused")
end
function scenario(user)
  refused(function() table.sort({3, 1, 2}, function(a, b) http.get("/hello") return a < b end) end)
  refused(function() string.gsub("abc", "%w", function() http.get("/hello") end) end)
  refused(function() tostring(setmetatable({}, { __tostring = function() http.get("/hello") return "" end })) end)
  refused(function()
    local _, e = xpcall(error, function() local _, e = pcall(http.get, "/hello") return e end)
    error(e, 0)
  end)
  refused(function() local _, e = load(function() http.get("/hello") end) error(e, 0) end)
  http.get("/hello")
end
"#,
        &["-u", "2", "-t", "1s"],
    );
    assert_eq!(ran.f.code(), Some(0), "{}", ran.f.show());
    let sent = ran.json["total"]["requests"].as_u64().unwrap();
    assert_eq!(Some(sent), Some(target.counts.requests()));
    assert_eq!(
        ran.json["total"]["failures"].as_u64(),
        Some(0),
        "{}",
        ran.json["failures"]
    );
    let check = &ran.json["checks"][0];
    assert!(
        check["fails"].as_u64() == Some(0) && check["passes"].as_u64() >= Some(4 * sent),
        "{check}"
    );
}

#[test]
fn response_bodies_a_script_holds_count_as_its_memory() {
    let _one = timed();
    let target = target();
    // Each body is 2 MB outside the Lua state; kept in a table, they would grow without end.
    let ran = run_source(
        &target,
        "keep = {}\nfunction scenario(user)\n  local ok, e = pcall(function() keep[#keep + 1] = http.get('/fault/huge?bytes=2000000') end)\n  if not ok then check(tostring(e):find('memory'), 'refused at the memory limit') keep = {} end\nend\n",
        &["-u", "4", "-t", "3s"],
    );
    assert_eq!(ran.f.code(), Some(0), "{}", ran.f.show());
    assert_eq!(ran.json["total"]["requests"].as_u64(), Some(target.counts.requests()));
    let check = &ran.json["checks"][0];
    assert!(check["passes"].as_u64() > Some(0) && check["fails"] == 0, "{check}");
    // Four states of 16 MiB at most, the bodies in flight, and the rest of the process.
    assert!(ran.peak_kib < 200 * 1024, "peak RSS {} KiB", ran.peak_kib);
}

#[test]
fn a_run_stopped_during_setup_says_so_with_sane_numbers() {
    let _one = timed();
    let target = target();
    let dir = TempDir::new("setup");
    let script = dir.write(
        "s.lua",
        "endpoints = { Task('GET', '/hello') }\nfunction setup()\n  while true do http.get('/slow?ms=100') end\nend\n",
    );
    let out = dir.join("out.json");
    let args = run_args(
        &script,
        &target.url(),
        &[
            "-u",
            "2",
            "-t",
            "30s",
            "--grace",
            "1s",
            "-q",
            "--out",
            &out.display().to_string(),
        ],
    );
    let proc = Proc::spawn(&args);
    wait_for_requests(&target, 3);
    let sent = Instant::now();
    send_signal(proc.id(), "TERM");
    let f = proc.wait(Duration::from_secs(20));
    assert!(sent.elapsed() < Duration::from_secs(2), "{:?}", sent.elapsed());
    assert_eq!(f.code(), Some(130), "{}", f.show());
    let json = read_json(&out);
    assert_eq!(json["total"]["requests"].as_u64(), Some(target.counts.requests()));
    // setup()'s requests over setup()'s time: ten a second, not a division by nothing.
    let rps = json["total"]["rps"].as_f64().unwrap();
    assert!(rps > 0.0 && rps < 50.0, "{rps} requests a second");
    assert!(
        json["stuck"].to_string().contains("in setup: stopped"),
        "{}",
        json["stuck"]
    );
}
