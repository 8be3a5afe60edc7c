//! Hostile input through the binary: absurd numbers, a request with tens of thousands of
//! headers, tables shared by themselves as JSON, names of megabytes, a result file whose
//! histogram claims gigabytes, outputs over inputs or a loop of links. Each is bad input (exit 2
//! with what to fix, `file:line` for the scenario, nothing sent) or data (a failure counted
//! with its reason), never a panic, and takes bounded time and memory.
//!
//! Every child is bounded by a deadline: runs are 1 to 3 s long, refusals end at once.

use std::path::Path;
use std::time::Duration;

mod common;
use common::process::*;
use common::target;

/// Deadline for a command refused at load (a debug build, a busy machine).
const QUICK: Duration = Duration::from_secs(30);
/// Deadline for a short run and its outputs.
const RUN: Duration = Duration::from_secs(40);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Asserts that `f` exited 2 with each of `phrases` in stderr, without a panic.
fn assert_refused(f: &Finished, phrases: &[&str]) {
    assert_eq!(f.code(), Some(2), "{}", f.show());
    assert!(!f.stderr.contains("panicked"), "{}", f.show());
    for phrase in phrases {
        assert!(f.stderr.contains(phrase), "stderr lacks {phrase:?}\n{}", f.show());
    }
}

const HELLO: &str = "endpoints = { Task('GET', '/hello') }\n";

/// 40,000 headers in a table `h` (the first line of a scenario).
const MANY_HEADERS: &str = "local h = {} for i = 1, 40000 do h['x-h' .. i] = 'v' end\n";

/// A table holding the one before twice, a hundred levels deep, as `t` (one line).
const SHARED: &str = "local t = {} for i = 1, 100 do t = {t, t} end\n";

#[test]
fn absurd_rates_ports_think_times_and_headers_are_refused_before_any_traffic() {
    let target = target();
    let host = target.url();
    let cases: &[(&str, String, &[&str], &[&str])] = &[
        (
            "--rate 1e-19",
            HELLO.into(),
            &["--rate", "1e-19"],
            &["less than 1e-6 iterations per second"],
        ),
        (
            "--rate 1e-20",
            HELLO.into(),
            &["--rate", "1e-20"],
            &["less than 1e-6 iterations per second"],
        ),
        (
            "options.rate",
            format!("options = {{ rate = 1e-300 }}\n{HELLO}"),
            &[],
            &["less than 1e-6 iterations per second"],
        ),
        (
            "a rate stage",
            HELLO.into(),
            &["--stages", "5s:10/s,5s:1e-9/s"],
            &["less than 1e-6 iterations per second"],
        ),
        (
            "-r 1e-300",
            HELLO.into(),
            &["-r", "1e-300"],
            &["spawn rate 1e-300 is less than 1e-6"],
        ),
        (
            "options.spawn_rate",
            format!("options = {{ spawn_rate = 1e-320 }}\n{HELLO}"),
            &[],
            &["spawn rate", "is less than 1e-6"],
        ),
        (
            "--max-names",
            HELLO.into(),
            &["--max-names", "10001"],
            &["--max-names 10001 is more than 10000"],
        ),
        (
            "a url on port 0",
            "endpoints = { Task('GET', 'http://127.0.0.1:0/x') }\n".into(),
            &[],
            &["s.lua: endpoints[1]: bad url \"http://127.0.0.1:0/x\": port 0 is no server's port"],
        ),
        (
            "constant_pacing(1e308)",
            format!("{HELLO}\nwait_time = constant_pacing(1e308)\n"),
            &[],
            &["s.lua:3: `wait_time`: a pause is at most 365 days"],
        ),
        (
            "constant_throughput(1e-320)",
            format!("{HELLO}wait_time = constant_throughput(1e-320)\n"),
            &[],
            &["s.lua:2: `wait_time`: a pause is at most 365 days"],
        ),
        (
            "40,000 headers",
            format!("{MANY_HEADERS}\nendpoints = {{ Task('GET', '/hello', {{ headers = h }}) }}\n"),
            &[],
            &["s.lua:3: endpoints[1]: `headers`: a request has at most 1000 headers"],
        ),
        (
            "a 100k-deep expression",
            format!("local x = {}1{}\n{HELLO}", "(".repeat(100_000), ")".repeat(100_000)),
            &[],
            &["error: ", "s.lua: ", "C stack overflow"],
        ),
    ];
    for (name, script, flags, expect) in cases {
        let dir = TempDir::new("absurd");
        let file = dir.write("s.lua", script);
        let mut args = run_args(&file, &host, &["-t", "1s", "-q"]);
        args.extend(flags.iter().map(|f| f.to_string()));
        let f = run(&args, QUICK);
        assert_refused(&f, expect);
        assert_eq!(target.counts.requests(), 0, "{name}: nothing is sent\n{}", f.show());
    }
    let dir = TempDir::new("port-0");
    let file = dir.write("s.lua", HELLO);
    let f = run(&run_args(&file, "http://127.0.0.1:0", &["-t", "1s", "-q"]), QUICK);
    assert_refused(&f, &["bad host URL \"http://127.0.0.1:0\": port 0 is no server's port"]);
    // `check` says the same as `run`, without a panic.
    let many = dir.write(
        "many.lua",
        format!("{MANY_HEADERS}endpoints = {{ Task('GET', '/hello', {{ headers = h }}) }}\n"),
    );
    let f = run(&["check", &s(&many)], QUICK);
    assert_refused(
        &f,
        &["many.lua:2: endpoints[1]: `headers`: a request has at most 1000 headers"],
    );
}

#[test]
fn a_shared_table_as_a_json_body_or_as_setup_data_stops_at_the_memory_limit() {
    let dir = TempDir::new("shared-json");
    // At load: bad input, with the line, in bounded time and memory.
    let file = dir.write(
        "body.lua",
        format!("{SHARED}endpoints = {{ Task('POST', '/api/upload', {{ json = t }}) }}\n"),
    );
    let (f, peak_kib) = run_sampling_rss(&["check".to_string(), s(&file)], QUICK);
    assert_refused(
        &f,
        &["body.lua:2: endpoints[1]: `json`: the JSON would be larger than 16.0 MiB (the memory limit)"],
    );
    assert!(peak_kib < 200 << 10, "peak RSS {peak_kib} KiB");

    // As setup()'s data: setup fails, no user starts (exit 4), nothing else is sent.
    let target = target();
    let file = dir.write("setup.lua", format!("{SHARED}function setup() return t end\n{HELLO}"));
    let args = run_args(&file, &target.url(), &["-t", "1s", "-q"]);
    let (f, peak_kib) = run_sampling_rss(&args, RUN);
    assert_eq!(f.code(), Some(4), "{}", f.show());
    assert!(
        f.stderr
            .contains("what setup() returned: the JSON would be larger than 16.0 MiB (the memory limit)"),
        "{}",
        f.show()
    );
    assert!(peak_kib < 200 << 10, "peak RSS {peak_kib} KiB");
    assert_eq!(target.counts.requests(), 0);
}

#[test]
fn too_many_headers_and_port_0_at_run_time_are_script_errors_of_their_call() {
    let target = target();
    let dir = TempDir::new("headers-run");
    let file = dir.write(
        "s.lua",
        format!(
            "{MANY_HEADERS}endpoints = {{ Task('GET', '/hello') }}\n\
             function before_request(user, req)\n  for k, v in pairs(h) do req.headers[k] = v end\nend\n\
             function on_start(user)\n  http.get('/hello', {{ headers = h }})\nend\n\
             function on_stop(user)\n  http.get('http://127.0.0.1:0/x')\nend\n"
        ),
    );
    let out = dir.join("out.json");
    let args = run_args(&file, &target.url(), &["-u", "1", "-t", "1s", "-q", "--out", &s(&out)]);
    let f = run(&args, RUN);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(!f.stderr.contains("panicked"), "{}", f.show());
    let json = read_json(&out);
    let reason = |method: &str, name: &str| {
        json["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["method"] == method && r["name"] == name)
            .map(|r| (r["reason"].as_str().unwrap().to_string(), r["count"].as_u64().unwrap()))
            .unwrap_or_else(|| panic!("no failure of {method} {name}: {json}"))
    };
    let (why, _) = reason("HOOK", "on_start");
    assert!(
        why.starts_with("script error: on_start: ") && why.ends_with("a request has at most 1000 headers"),
        "{why}"
    );
    let (why, n) = reason("GET", "/hello");
    assert!(
        why.starts_with("script error: before_request: ")
            && why.ends_with("s.lua:4: req: `headers`: a request has at most 1000 headers"),
        "{why}"
    );
    // Every iteration failed in its hook, none was sent: counted as requests that failed.
    assert_eq!(json["total"]["requests"].as_u64(), Some(n));
    assert_eq!(target.counts.requests(), 0);
    let (why, _) = reason("HOOK", "on_stop");
    assert!(why.contains("port 0 is no server's port"), "{why}");
}

#[test]
fn names_of_megabytes_are_cut_and_share_a_row_in_bounded_memory_and_output() {
    let target = target();
    let dir = TempDir::new("long-names");
    let file = dir.write(
        "s.lua",
        "local n = 0\nfunction scenario(user)\n  n = n + 1\n  if n <= 200 then\n    http.get('/hello', { name = string.rep('a', 4e6) .. n })\n  else\n    sleep(0.01)\n  end\nend\n",
    );
    let out = dir.join("out.json");
    let args = run_args(&file, &target.url(), &["-u", "1", "-t", "3s", "-q", "--out", &s(&out)]);
    let (f, peak_kib) = run_sampling_rss(&args, RUN);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(peak_kib < 200 << 10, "peak RSS {peak_kib} KiB");
    assert!(f.stdout.len() < 64 << 10, "{} bytes of summary", f.stdout.len());
    let json = read_json(&out);
    let rows = json["endpoints"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "one row for the 200 names: {rows:?}");
    assert_eq!(rows[0]["name"].as_str(), Some(format!("{}…", "a".repeat(200)).as_str()));
    // (Two hundred strings of 4 MB take a while on a busy machine: most of them are sent.)
    let sent = rows[0]["requests"].as_u64().unwrap();
    assert!((20..=200).contains(&sent), "{sent} requests");
    assert_eq!(target.counts.requests(), sent);
}

#[test]
fn a_result_file_whose_histogram_claims_gigabytes_is_refused_in_bounded_memory() {
    use base64::Engine as _;
    let target = target();
    let dir = TempDir::new("report-bomb");
    let file = dir.write("s.lua", HELLO);
    let good = dir.join("good.json");
    let f = run(
        &run_args(&file, &target.url(), &["-u", "1", "-t", "1s", "-q", "--out", &s(&good)]),
        RUN,
    );
    assert_eq!(f.code(), Some(0), "{}", f.show());
    // A V2 histogram header claiming 2 GiB of counts, with one byte of them, deflated and
    // framed as HdrHistogram's interchange encoding has it.
    let mut plain = Vec::new();
    for word in [0x1c84_9313u32, 0x8000_0000, 0, 3] {
        plain.extend_from_slice(&word.to_be_bytes());
    }
    for word in [1u64, 2, 1.0f64.to_bits()] {
        plain.extend_from_slice(&word.to_be_bytes());
    }
    plain.push(2);
    let deflated = zlib_stored(&plain);
    let mut framed = 0x1c84_9314u32.to_be_bytes().to_vec();
    framed.extend_from_slice(&(deflated.len() as u32).to_be_bytes());
    framed.extend_from_slice(&deflated);
    let mut json = read_json(&good);
    json["total"]["latency_hist"] = base64::engine::general_purpose::STANDARD.encode(framed).into();
    let bomb = dir.write("bomb.json", serde_json::to_vec(&json).unwrap());
    let (f, peak_kib) = run_sampling_rss(&["report".to_string(), s(&bomb)], QUICK);
    assert_refused(&f, &["claims 2147483648 bytes of counts, and it holds 1"]);
    assert!(peak_kib < 100 << 10, "peak RSS {peak_kib} KiB");
}

/// `bytes` as a zlib stream of one stored (uncompressed) block.
fn zlib_stored(bytes: &[u8]) -> Vec<u8> {
    let len = bytes.len() as u16;
    let mut z = vec![0x78, 0x01, 0x01];
    z.extend_from_slice(&len.to_le_bytes());
    z.extend_from_slice(&(!len).to_le_bytes());
    z.extend_from_slice(bytes);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in bytes {
        a = (a + byte as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    z
}

#[test]
fn an_output_over_an_input_or_a_loop_of_links_is_refused_before_any_traffic() {
    let target = target();
    let host = target.url();
    let dir = TempDir::new("out-over-in");
    let script = format!("local rows = data.csv('rows.csv')\n{HELLO}");
    let file = dir.write("s.lua", &script);
    let feed = dir.write("rows.csv", "name\nada\n");
    std::os::unix::fs::symlink("loop-b.json", dir.join("loop-a.json")).unwrap();
    std::os::unix::fs::symlink("loop-a.json", dir.join("loop-b.json")).unwrap();
    std::os::unix::fs::symlink("s.lua", dir.join("link.lua")).unwrap();
    let cases: &[(&str, String, &str)] = &[
        (
            "--out",
            s(&file),
            "it would replace an input of this command (scenario ",
        ),
        (
            "--out",
            s(&dir.join("link.lua")),
            "it would replace an input of this command (scenario ",
        ),
        (
            "--html",
            s(&feed),
            "it would replace an input of this command (\"rows.csv\")",
        ),
        ("--out", s(&dir.join("loop-a.json")), "it is a symbolic link loop"),
    ];
    for (flag, path, why) in cases {
        let f = run(&run_args(&file, &host, &["-t", "1s", "-q", flag, path]), QUICK);
        assert_refused(&f, &[&format!("cannot write {flag} {path}: {why}")]);
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), script);
    assert_eq!(std::fs::read_to_string(&feed).unwrap(), "name\nada\n");
    assert!(
        std::fs::symlink_metadata(dir.join("loop-a.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(target.counts.requests(), 0);

    // `report` and `setup` neither write over what they read.
    let good = dir.join("good.json");
    let f = run(&run_args(&file, &host, &["-t", "1s", "-q", "--out", &s(&good)]), RUN);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    let before = std::fs::read(&good).unwrap();
    let f = run(&["report", &s(&good), "--out", &s(&good)], QUICK);
    assert_refused(&f, &["it would replace an input of this command"]);
    assert_eq!(std::fs::read(&good).unwrap(), before);
    let with_setup = dir.write("setup.lua", format!("function setup() return {{}} end\n{HELLO}"));
    let f = run(
        &["setup", &s(&with_setup), "--host", &host, "--out", &s(&with_setup)],
        QUICK,
    );
    assert_refused(
        &f,
        &[
            "cannot write --out",
            "it would replace an input of this command (scenario ",
        ],
    );
}
