//! One test on several machines (#7): `--segment`, `--start-at`, `stormlight setup` /
//! `teardown` / `--setup-data`, and `stormlight report` merging segment files exactly,
//! refusing incomplete sets and judging thresholds on the whole.
//!
//! The three-segment test runs each segment in a network namespace of its own (`ip netns`,
//! a bridge to the target; made and removed by the test) where the machine allows it, else as
//! three local processes; it prints which. Every child is bounded by its `-t` and killed after
//! a limit.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use stormlight::stats::decode_histogram;
use stormlight::target::Target;

const BIN: &str = env!("CARGO_BIN_EXE_stormlight");

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stormlight-seg-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for a child, killing it after `limit`.
fn finish(mut child: std::process::Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a stormlight process ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn spawn(prefix: &[String], args: &[String]) -> std::process::Child {
    let (program, rest) = match prefix.split_first() {
        Some((p, rest)) => (
            p.as_str(),
            rest.iter().map(String::as_str).chain([BIN]).collect::<Vec<_>>(),
        ),
        None => (BIN, vec![]),
    };
    Command::new(program)
        .args(rest)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stormlight")
}

fn stormlight(args: &[String]) -> Output {
    finish(spawn(&[], args), Duration::from_secs(60))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `t` as unix seconds, as `--start-at` takes them.
fn unix_secs(t: std::time::SystemTime) -> String {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        .to_string()
}

/// Runs stormlight with `args` and expects exit 2 with `says` in its error.
fn assert_refused(args: &[String], says: &str) {
    let out = stormlight(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(says), "expected {says:?} in {stderr}");
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hist(v: &Value) -> Histogram<u64> {
    decode_histogram(v.as_str().expect("a histogram")).unwrap()
}

/// Three network namespaces, each with a veth into one bridge that carries the target's
/// address; removed on drop.
struct Lab {
    tag: String,
    subnet: String,
}

impl Lab {
    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `None` where namespaces cannot be made (not root, no `ip`, no bridge module).
    fn new() -> Option<Lab> {
        let id = std::process::id() % 10000;
        let lab = Lab {
            tag: format!("sl{id}"),
            subnet: format!("10.231.{}", id % 250),
        };
        let (br, net) = (format!("{}b", lab.tag), &lab.subnet);
        let mut ok = Self::ip(&["link", "add", "name", &br, "type", "bridge"])
            && Self::ip(&["addr", "add", &format!("{net}.1/24"), "dev", &br])
            && Self::ip(&["link", "set", &br, "up"]);
        for i in 0..3 {
            let (ns, host, inner) = (lab.ns(i), format!("{}h{i}", lab.tag), format!("{}n{i}", lab.tag));
            let addr = format!("{net}.{}/24", 10 + i);
            ok = ok
                && Self::ip(&["netns", "add", &ns])
                && Self::ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])
                && Self::ip(&["link", "set", &inner, "netns", &ns])
                && Self::ip(&["link", "set", &host, "master", &br])
                && Self::ip(&["link", "set", &host, "up"])
                && Self::ip(&["netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &inner])
                && Self::ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"])
                && Self::ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        ok.then_some(lab)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}ns{i}", self.tag)
    }

    fn server(&self) -> SocketAddr {
        format!("{}.1:0", self.subnet).parse().unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..3 {
            Self::ip(&["netns", "del", &self.ns(i)]);
        }
        Self::ip(&["link", "del", &format!("{}b", self.tag)]);
    }
}

/// Each user asks for `/items/<user.id>` once an iteration, then thinks.
const SCENARIO: &str = r#"
endpoints = { Task("GET", "/items/0", { name = "/items/[id]" }) }
function before_request(user, req) req.path = "/items/" .. user.id end
wait_time = constant(0.05)
"#;

#[test]
fn three_segments_merge_into_the_whole_test() {
    let dir = temp_dir("three");
    let script = dir.join("s.lua");
    std::fs::write(&script, SCENARIO).unwrap();
    let lab = Lab::new();
    let target = match &lab {
        Some(lab) => Target::spawn_thread(lab.server()).expect("target on the bridge"),
        None => common::target(),
    };
    eprintln!(
        "{}",
        match &lab {
            Some(_) => "segments ran in three network namespaces (ip netns), through a bridge to the target",
            None => "no network namespaces here: segments ran as three local processes",
        }
    );
    let start_at = unix_secs(std::time::SystemTime::now() + Duration::from_secs(2));
    let children: Vec<_> = (0..3)
        .map(|i| {
            let prefix = match &lab {
                Some(lab) => strings(&["ip", "netns", "exec", &lab.ns(i)]),
                None => Vec::new(),
            };
            let out = dir.join(format!("seg-{i}.json"));
            let args = strings(&[
                "run",
                script.to_str().unwrap(),
                "--host",
                &target.url(),
                "-u",
                "10",
                "-r",
                "20",
                "-t",
                "3s",
                "-q",
                "--segment",
                &format!("{i}/3"),
                "--start-at",
                &start_at,
                "--out",
                out.to_str().unwrap(),
            ]);
            spawn(&prefix, &args)
        })
        .collect();
    for child in children {
        let out = finish(child, Duration::from_secs(60));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let segs: Vec<Value> = (0..3).map(|i| read(&dir.join(format!("seg-{i}.json")))).collect();
    // They started together, at --start-at.
    let want_ms = (start_at.parse::<f64>().unwrap() * 1000.0) as u64;
    for s in &segs {
        let at = s["started_at_ms"].as_u64().unwrap();
        assert!(at >= want_ms && at < want_ms + 500, "started at {at}, asked {want_ms}");
    }
    assert_eq!(
        segs.iter()
            .map(|s| s["config"]["users"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 3, 3],
        "10 users dealt out over 3 segments"
    );

    let merged = dir.join("merged.json");
    let report = stormlight(&strings(&[
        "report",
        dir.join("seg-0.json").to_str().unwrap(),
        dir.join("seg-1.json").to_str().unwrap(),
        dir.join("seg-2.json").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let m = read(&merged);
    let total = m["total"]["requests"].as_u64().unwrap();
    assert_eq!(
        total,
        target.counts.requests(),
        "the merged total is what the target received"
    );
    assert_eq!(m["config"]["users"], 10, "the merged users are the requested users");
    assert_eq!(m["config"]["spawn_rate"].as_f64().unwrap(), 20.0);
    // Every user id from 1 to 10 sent, once each across the machines' users.
    let paths = target.counts.paths();
    let mut ids: Vec<u64> = paths
        .keys()
        .filter_map(|p| p.strip_prefix("/items/")?.parse().ok())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        (1..=10).collect::<Vec<_>>(),
        "user ids unique across segments: {paths:?}"
    );
    // The merged histogram is the three added.
    let mut sum = hist(&segs[0]["total"]["latency_hist"]);
    for s in &segs[1..] {
        sum.add(hist(&s["total"]["latency_hist"])).unwrap();
    }
    assert_eq!(hist(&m["total"]["latency_hist"]), sum);
    assert_eq!(sum.len(), total, "one latency per request");
    // Series aligned by wall-clock second: each second's requests are the segments' added.
    let per_second: u64 = m["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(per_second, total);
    assert_eq!(
        m["series"].as_array().unwrap().len(),
        segs[0]["series"].as_array().unwrap().len()
    );
    drop(lab);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `--rate 30 -t 2s` whole and in three segments; the files of the segments.
fn open_model_segments(dir: &Path, target: &Target, threshold: &str) -> (u64, Vec<PathBuf>) {
    let script = dir.join("open.lua");
    std::fs::write(&script, r#"endpoints = { Task("GET", "/hello") }"#).unwrap();
    let run = |extra: &[&str], out: &Path| {
        let mut args = strings(&[
            "run",
            script.to_str().unwrap(),
            "--host",
            &target.url(),
            "--rate",
            "30",
            "--max-users",
            "6",
            "-t",
            "2s",
            "-q",
            "--threshold",
            threshold,
            "--out",
            out.to_str().unwrap(),
        ]);
        args.extend(strings(extra));
        spawn(&[], &args)
    };
    let whole = dir.join("whole.json");
    let _ = finish(run(&[], &whole), Duration::from_secs(60));
    let w = read(&whole);
    let iterations = w["total"]["requests"].as_u64().unwrap() + w["dropped_iterations"].as_u64().unwrap();
    let files: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("open-{i}.json"))).collect();
    let children: Vec<_> = (0..3)
        .map(|i| run(&["--segment", &format!("{i}/3")], &files[i]))
        .collect();
    for c in children {
        let _ = finish(c, Duration::from_secs(60));
    }
    (iterations, files)
}

#[test]
fn an_arrival_rate_split_in_three_schedules_the_iterations_of_one_process() {
    let dir = temp_dir("rate");
    let target = common::target();
    // Each segment passes `requests < 30` alone (20 each); the whole test does not (60).
    let (iterations, files) = open_model_segments(&dir, &target, "requests < 30");
    assert_eq!(iterations, 60, "30/s for 2 s, one process");
    let mut sum = 0;
    for (i, f) in files.iter().enumerate() {
        let s = read(f);
        let n = s["total"]["requests"].as_u64().unwrap() + s["dropped_iterations"].as_u64().unwrap();
        assert_eq!(n, 20, "segment {i}: its third of the schedule");
        assert_eq!(s["config"]["users"], 2, "a pool of 6 split in 3");
        assert!(s["thresholds"][0]["ok"].as_bool().unwrap(), "each segment alone passes");
        sum += n;
    }
    assert_eq!(sum, iterations, "the segments together schedule what one process does");
    assert_eq!(target.counts.requests(), 2 * iterations);

    // The verdict of the merge is on the whole: it fails, exit 1.
    let args = |extra: &[&Path]| -> Vec<String> {
        let mut a = vec!["report".to_string()];
        a.extend(extra.iter().map(|p| p.to_str().unwrap().to_string()));
        a
    };
    let out = stormlight(&args(&[&files[0], &files[1], &files[2]]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL") && stdout.contains("requests < 30"), "{stdout}");

    // A segment that its own abort_on_fail threshold stopped: the whole test fails.
    let aborted = dir.join("aborted.json");
    let mut v = read(&files[1]);
    v["aborted_by"] = "fail_rate < 1%".into();
    std::fs::write(&aborted, v.to_string()).unwrap();
    let out = stormlight(&args(&[&files[0], &aborted, &files[2]]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fail_rate < 1% (segment 1/3)"));

    // A set that is not one whole test is refused, with why.
    let other = dir.join("other.json");
    let mut v = read(&files[2]);
    v["scenario_fingerprint"] = "0123456789abcdef".into();
    std::fs::write(&other, v.to_string()).unwrap();
    // A segment of another run (another duration), and one that missed the common start.
    let longer = dir.join("longer.json");
    let mut v = read(&files[2]);
    v["config"]["duration_s"] = 5.0.into();
    std::fs::write(&longer, v.to_string()).unwrap();
    let start = read(&files[0])["started_at_ms"].clone();
    let timed: Vec<PathBuf> = (0..3)
        .map(|i| {
            let mut v = read(&files[i]);
            v["config"]["start_at_ms"] = start.clone();
            v["started_at_ms"] = (start.as_u64().unwrap() + if i == 2 { 3000 } else { 0 }).into();
            let path = dir.join(format!("timed-{i}.json"));
            std::fs::write(&path, v.to_string()).unwrap();
            path
        })
        .collect();
    let bogus = dir.join("bogus.json");
    let mut v = read(&files[2]);
    v["segment"]["index"] = 5.into();
    std::fs::write(&bogus, v.to_string()).unwrap();
    for (set, says) in [
        (vec![&files[0], &files[1], &bogus], "is not a segment (the index runs"),
        (vec![&files[0], &files[1], &longer], "segments of different runs"),
        (vec![&timed[0], &timed[1], &timed[2]], "missed the --start-at"),
        (vec![&files[0], &files[1]], "segment 2/3 is missing"),
        (
            vec![&files[0], &files[1], &files[1], &files[2]],
            "segment 1/3 is given twice",
        ),
        (vec![&files[0], &files[1], &other], "ran a different scenario"),
        (
            vec![&files[0], &files[1], &files[2], &dir.join("whole.json")],
            "is not a segment",
        ),
    ] {
        let set: Vec<&Path> = set.iter().map(|p| p.as_path()).collect();
        assert_refused(&args(&set), says);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn setup_runs_once_for_every_segment_and_teardown_once_after() {
    let dir = temp_dir("setup");
    let target = common::target();
    let script = dir.join("s.lua");
    std::fs::write(
        &script,
        r#"
endpoints = { Task("GET", "/hello") }
wait_time = constant(0.1)
function setup()
  local res = http.post("/login", { json = { user = "setup" } })
  return { token = res:json().token, n = 7 }
end
function before_request(user, req) check(user.setup.n == 7 and user.setup.token ~= nil, "setup data") end
function teardown(data) http.get("/items/" .. data.n) end
"#,
    )
    .unwrap();
    let setup = dir.join("setup.json");
    let out = stormlight(&strings(&[
        "setup",
        script.to_str().unwrap(),
        "--host",
        &target.url(),
        "--out",
        setup.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read(&setup)["setup_data"]["n"], 7);
    let children: Vec<_> = (0..2)
        .map(|i| {
            let out = dir.join(format!("seg-{i}.json"));
            let args = strings(&[
                "run",
                script.to_str().unwrap(),
                "--host",
                &target.url(),
                "-u",
                "4",
                "-t",
                "1s",
                "-q",
                "--segment",
                &format!("{i}/2"),
                "--setup-data",
                setup.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]);
            spawn(&[], &args)
        })
        .collect();
    for c in children {
        let out = finish(c, Duration::from_secs(60));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for i in 0..2 {
        let s = read(&dir.join(format!("seg-{i}.json")));
        assert_eq!(s["checks"][0]["fails"], 0, "every user got the data: {}", s["checks"]);
        assert!(s["checks"][0]["passes"].as_u64().unwrap() > 0);
    }
    let paths = target.counts.paths();
    assert_eq!(paths.get("/login"), Some(&1), "setup() ran once: {paths:?}");
    assert_eq!(paths.get("/items/7"), None, "the segments did not run teardown");
    let out = stormlight(&strings(&[
        "teardown",
        script.to_str().unwrap(),
        "--host",
        &target.url(),
        "--setup-data",
        setup.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        target.counts.paths().get("/items/7"),
        Some(&1),
        "teardown(data) ran once"
    );
    // A teardown that outlives its time fails the command (exit 4), it is not "done".
    let slow = dir.join("slow.lua");
    let text = std::fs::read_to_string(&script).unwrap().replace(
        "function teardown(data) http.get(\"/items/\" .. data.n) end",
        "function teardown(data) sleep(5) end",
    );
    assert!(text.contains("sleep(5)"));
    std::fs::write(&slow, text).unwrap();
    let slow_setup = dir.join("slow-setup.json");
    let (slow, slow_setup_path) = (slow.to_str().unwrap(), slow_setup.to_str().unwrap());
    let out = stormlight(&strings(&[
        "setup",
        slow,
        "--host",
        &target.url(),
        "--out",
        slow_setup_path,
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = stormlight(&strings(&[
        "teardown",
        slow,
        "--host",
        &target.url(),
        "--timeout",
        "1s",
        "--setup-data",
        slow_setup_path,
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(stdout.contains("still running after 1s"), "{stdout}");

    // Setup data of another scenario, and bad segment flags, are refused before any traffic.
    let before = target.counts.requests();
    let other = dir.join("other.lua");
    std::fs::write(&other, "endpoints = { Task(\"GET\", \"/hello\") }\n").unwrap();
    let (other, setup, host) = (other.to_str().unwrap(), setup.to_str().unwrap(), target.url());
    let ago = unix_secs(std::time::SystemTime::now() - Duration::from_secs(10));
    for (args, says) in [
        (
            vec!["run", other, "--host", &host, "-t", "1s", "--setup-data", setup],
            "another scenario",
        ),
        (
            vec!["run", other, "--host", &host, "-t", "1s", "--segment", "3/3"],
            "expected I/N",
        ),
        (
            vec!["run", other, "--host", &host, "-u", "2", "--segment", "2/3"],
            "leaves this segment none",
        ),
        (
            vec!["run", other, "--host", &host, "-t", "1s", "--start-at", "soon"],
            "RFC 3339",
        ),
        (
            vec!["run", other, "--host", &host, "-t", "1s", "--start-at", &ago],
            "ago",
        ),
        (
            vec!["run", other, "--host", &host, "-t", "1s", "--start-at", "99999999999"],
            "7 days",
        ),
        (
            vec!["setup", other, "--host", &host, "--out", "x.json"],
            "defines no setup()",
        ),
    ] {
        assert_refused(&strings(&args), says);
    }
    assert_eq!(target.counts.requests(), before, "nothing sent");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stage_targets_split_so_the_segments_add_up_to_the_whole() {
    let dir = temp_dir("stages");
    let target = common::target();
    let script = dir.join("s.lua");
    std::fs::write(
        &script,
        "endpoints = { Task(\"GET\", \"/hello\") }\nwait_time = constant(0.1)\n",
    )
    .unwrap();
    let start_at = unix_secs(std::time::SystemTime::now() + Duration::from_secs(2));
    let files: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("st-{i}.json"))).collect();
    let children: Vec<_> = (0..3)
        .map(|i| {
            let args = strings(&[
                "run",
                script.to_str().unwrap(),
                "--host",
                &target.url(),
                "--stages",
                "1s:7,2s:7",
                "-q",
                "--segment",
                &format!("{i}/3"),
                "--start-at",
                &start_at,
                "--out",
                files[i].to_str().unwrap(),
            ]);
            spawn(&[], &args)
        })
        .collect();
    for c in children {
        let out = finish(c, Duration::from_secs(60));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // 7 users at the plateau: 3, 2 and 2.
    let peaks: Vec<u64> = files
        .iter()
        .map(|f| {
            let s = read(f);
            s["series"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["users"].as_u64().unwrap())
                .max()
                .unwrap()
        })
        .collect();
    assert_eq!(peaks, [3, 2, 2]);
    let merged = dir.join("merged.json");
    let mut args = vec!["report".to_string()];
    args.extend(files.iter().map(|f| f.to_str().unwrap().to_string()));
    args.extend(strings(&["--out", merged.to_str().unwrap()]));
    let out = stormlight(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = read(&merged);
    let users: Vec<u64> = m["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["users"].as_u64().unwrap())
        .collect();
    assert_eq!(users[1], 7, "the whole test's plateau, second by second: {users:?}");
    assert_eq!(m["config"]["users"], 7);
    assert_eq!(m["total"]["requests"].as_u64(), Some(target.counts.requests()));
    std::fs::remove_dir_all(&dir).unwrap();
}
