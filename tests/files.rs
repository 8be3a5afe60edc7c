//! Inputs and outputs that are not regular files, through the binary: FIFOs and devices given
//! as inputs are refused at once (exit 2), inputs past their size cap too; outputs go into
//! `/dev/null` and FIFOs in place, never replace them, and a directory or a socket is refused
//! before any traffic.
//!
//! Every child is bounded: runs are 1 s long, and the harness kills a child that outlives its
//! deadline (a hang fails the test instead of holding it).

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::process::*;
use common::target;

/// Deadline for commands refused at load: a few seconds at most, even on a busy machine.
const QUICK: Duration = Duration::from_secs(5);
/// Deadline for a 1 s run and its outputs.
const RUN: Duration = Duration::from_secs(20);

/// [`run`], with stdout going to `stdout` (`Finished::stdout` is empty unless it is piped).
fn run_to<S: AsRef<std::ffi::OsStr>>(args: &[S], limit: Duration, stdout: Stdio) -> Finished {
    Proc::spawn_with(args, |cmd| {
        cmd.stdout(stdout);
    })
    .wait(limit)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

const SCENARIO: &str = "endpoints = { Task(\"GET\", \"/hello\") }\n";

/// Asserts exit 2 with each of `phrases` in stderr.
fn assert_refused(f: &Finished, phrases: &[&str]) {
    assert_eq!(f.code(), Some(2), "{}", f.show());
    for phrase in phrases {
        assert!(f.stderr.contains(phrase), "stderr lacks {phrase:?}\n{}", f.show());
    }
}

#[test]
fn a_fifo_given_as_any_input_is_refused_at_once() {
    let dir = TempDir::new("fifo-in");
    let fifo = dir.fifo("s.lua");
    let fifo_s = s(&fifo);
    for cmd in ["check", "run"] {
        let f = run(&[cmd, &fifo_s], QUICK);
        assert_refused(&f, &[&format!("scenario {fifo_s} is not a regular file (a FIFO)")]);
    }

    // A feed: the load stops there, at the scenario's line.
    dir.fifo("rows.csv");
    let feed = dir.write(
        "feed.lua",
        b"-- rows\nlocal rows = data.csv(\"rows.csv\")\nendpoints = { Task(\"GET\", \"/hello\") }\n",
    );
    let f = run(&["check", &s(&feed)], QUICK);
    assert_refused(
        &f,
        &["feed.lua:2:", "data.csv: \"rows.csv\" is not a regular file (a FIFO)"],
    );

    // The inputs given by flags, before any traffic.
    let target = target();
    let ok = dir.write("ok.lua", SCENARIO.as_bytes());
    let host = target.url();
    for flag in ["--setup-data", "--ca-cert"] {
        let args = ["run", &s(&ok), "--host", &host, "-t", "1s", "-q", flag, &fifo_s];
        let f = run(&args, QUICK);
        assert_refused(&f, &[&format!("{flag} {fifo_s} is not a regular file (a FIFO)")]);
    }
    let f = run(&["report", &fifo_s], QUICK);
    assert_refused(&f, &[&format!("{fifo_s} is not a regular file (a FIFO)")]);
    assert_eq!(target.counts.requests(), 0, "nothing was sent");
}

#[test]
fn dev_zero_as_the_scenario_is_refused_without_reading_it() {
    for cmd in ["check", "run"] {
        let f = run(&[cmd, "/dev/zero"], QUICK);
        assert_refused(&f, &["scenario /dev/zero is not a regular file (a character device)"]);
        assert!(f.took < Duration::from_secs(2), "{}", f.show());
    }
}

#[test]
fn inputs_past_their_size_cap_are_refused() {
    let dir = TempDir::new("caps");
    // Exactly 8 MiB loads; one byte more is refused.
    let mut source = SCENARIO.as_bytes().to_vec();
    source.resize(8 << 20, b' ');
    let at_cap = dir.write("at_cap.lua", &source);
    let f = run(&["check", &s(&at_cap)], QUICK);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    source.push(b'\n');
    let past = dir.write("past.lua", &source);
    let f = run(&["check", &s(&past)], QUICK);
    assert_refused(&f, &[&format!("scenario {} is larger than 8 MiB", s(&past))]);

    // A JSON feed past 16 MiB (a sparse file: refused before anything is read).
    let big = std::fs::File::create(dir.join("items.json")).unwrap();
    big.set_len((16 << 20) + 1).unwrap();
    let feed = dir.write(
        "feed.lua",
        b"local items = data.json(\"items.json\")\nendpoints = { Task(\"GET\", \"/hello\") }\n",
    );
    let f = run(&["check", &s(&feed)], QUICK);
    assert_refused(&f, &["feed.lua:1:", "\"items.json\" is larger than 16 MiB"]);
}

/// Asserts that `path` is still a character device.
fn assert_char_device(path: &Path) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        meta.file_type().is_char_device(),
        "{} is no longer a character device",
        path.display()
    );
}

#[test]
fn dev_null_as_every_output_is_written_into_not_replaced() {
    // Through a link first: on a build that replaces outputs, this replaces the link (in the
    // temp dir) and fails here, before /dev/null itself is given.
    let dir = TempDir::new("devnull");
    let link = dir.join("null.json");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let f = run(&["demo", "-t", "1s", "-u", "1", "-q", "--out", &s(&link)], RUN);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink(), "the link to /dev/null was replaced");
    assert_char_device(Path::new("/dev/null"));

    let f = run(
        &[
            "demo",
            "-t",
            "1s",
            "-u",
            "1",
            "-q",
            "--out",
            "/dev/null",
            "--html",
            "/dev/null",
        ],
        RUN,
    );
    assert_eq!(f.code(), Some(0), "{}", f.show());
    assert!(f.stderr.contains("summary written to /dev/null"), "{}", f.show());
    assert_char_device(Path::new("/dev/null"));
    let leftovers: Vec<_> = std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".null") || n.starts_with(".stormlight-probe"))
        .collect();
    assert!(leftovers.is_empty(), "left in /dev: {leftovers:?}");
}

#[test]
fn a_fifo_with_a_reader_receives_the_summary_as_json() {
    let dir = TempDir::new("fifo-out");
    let fifo = dir.fifo("out.json");
    // Opened for reading before the run (non-blocking: the open does not wait for a writer),
    // read until the writer closes it.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let received = std::thread::spawn(move || {
        let mut reader = reader;
        let (mut got, mut buf) = (Vec::new(), [0u8; 65536]);
        let deadline = Instant::now() + RUN;
        while Instant::now() < deadline {
            match reader.read(&mut buf) {
                // End of file once the writer has been and gone.
                Ok(0) if !got.is_empty() => break,
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        got
    });
    let f = run(&["demo", "-t", "1s", "-u", "1", "-q", "--out", &s(&fifo)], RUN);
    assert_eq!(f.code(), Some(0), "{}", f.show());
    let got = received.join().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&got)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}\n{}", String::from_utf8_lossy(&got), f.show()));
    assert!(json["total"]["requests"].as_u64().unwrap() > 0, "{json}");
    assert!(
        std::fs::metadata(&fifo).unwrap().file_type().is_fifo(),
        "the FIFO was replaced"
    );
}

#[test]
fn a_fifo_with_no_reader_fails_the_output_with_exit_3_and_keeps_the_summary() {
    let dir = TempDir::new("fifo-noreader");
    let fifo = dir.fifo("out.json");
    let f = run(&["demo", "-t", "1s", "-u", "1", "-q", "--out", &s(&fifo)], RUN);
    assert_eq!(f.code(), Some(3), "{}", f.show());
    assert!(
        f.stderr.contains(&format!(
            "cannot write the summary to {}: it is a FIFO with nothing reading it",
            s(&fifo)
        )),
        "{}",
        f.show()
    );
    assert!(
        f.stdout.contains("Aggregated"),
        "the summary is on stdout: {}",
        f.show()
    );
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn a_directory_or_a_socket_as_an_output_is_refused_before_any_traffic() {
    let dir = TempDir::new("not-files");
    let target = target();
    let script = dir.write("s.lua", SCENARIO.as_bytes());
    let sock = dir.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let host = target.url();
    for (flag, path, kind) in [
        ("--out", &sock, "a socket"),
        ("--html", &sock, "a socket"),
        ("--out", &sub, "a directory"),
    ] {
        let args = ["run", &s(&script), "--host", &host, "-t", "1s", "-q", flag, &s(path)];
        let f = run(&args, QUICK);
        assert_refused(&f, &[&format!("cannot write {flag} {}: it is {kind}", s(path))]);
    }
    // `--csv` names files by a prefix.
    let stats = dir.join("x_stats.csv");
    let _stats = std::os::unix::net::UnixListener::bind(&stats).unwrap();
    let prefix = s(&dir.join("x"));
    let f = run(
        &["run", &s(&script), "--host", &host, "-t", "1s", "-q", "--csv", &prefix],
        QUICK,
    );
    assert_refused(&f, &[&format!("cannot write --csv {}: it is a socket", s(&stats))]);
    // `report`'s outputs are checked before its inputs are read.
    let f = run(&["report", "missing.json", "--out", &s(&sock)], QUICK);
    assert_refused(&f, &[&format!("cannot write --out {}: it is a socket", s(&sock))]);
    assert_eq!(target.counts.requests(), 0, "nothing was sent");
    assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
}

#[test]
fn an_output_naming_stdout_redirected_to_a_file_goes_after_the_summary() {
    // `--out /proc/self/fd/1` is `--out /dev/stdout` without a link in /dev.
    let dir = TempDir::new("stdout-file");
    let log = dir.join("log.txt");
    let file = std::fs::File::create(&log).unwrap();
    let f = run_to(
        &["demo", "-t", "1s", "-u", "1", "-q", "--out", "/proc/self/fd/1"],
        RUN,
        Stdio::from(file),
    );
    assert_eq!(f.code(), Some(0), "{}", f.show());
    let text = std::fs::read_to_string(&log).unwrap();
    let json_at = text.find("\n{").unwrap_or_else(|| panic!("no JSON in stdout:\n{text}"));
    assert!(
        text[..json_at].contains("Aggregated"),
        "the summary comes first:\n{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&text[json_at..]).expect("the rest is the JSON");
    assert!(json["total"]["requests"].as_u64().unwrap() > 0, "{json}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["log.txt"], "no temporary file left");
}
