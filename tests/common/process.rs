//! The binary under test as a child process: started with its output drained, bounded by a
//! deadline (killed, and the test failed, past it), and a temp dir of its own per test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stormlight::target::Target;

pub const BIN: &str = env!("CARGO_BIN_EXE_stormlight");

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("stormlight-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `name` with `contents` and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write a file");
        p
    }

    /// Makes a FIFO `name` and returns its path.
    pub fn fifo(&self, name: &str) -> PathBuf {
        let p = self.join(name);
        let status = Command::new("mkfifo").arg(&p).status().expect("run mkfifo");
        assert!(status.success(), "mkfifo {}", p.display());
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished child left behind.
pub struct Finished {
    pub status: ExitStatus,
    /// From its start to its exit.
    pub took: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn show(&self) -> String {
        format!(
            "status: {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.took, self.stdout, self.stderr
        )
    }
}

/// A running child with its output drained by two threads; killed on drop if still running
/// (a test that panics leaves nothing behind).
pub struct Proc {
    child: Child,
    started: Instant,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    what: String,
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

impl Proc {
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Proc {
        Self::spawn_with(args, |_| {})
    }

    /// [`Proc::spawn`], the command set up further by `setup` (its stdout, its limits).
    pub fn spawn_with<S: AsRef<std::ffi::OsStr>>(args: &[S], setup: impl FnOnce(&mut Command)) -> Proc {
        let what = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        Proc {
            child,
            started: Instant::now(),
            out,
            err,
            what: format!("stormlight {what}"),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn collect(&mut self, status: ExitStatus) -> Finished {
        let took = self.started.elapsed();
        let join = |h: Option<JoinHandle<String>>| h.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        Finished {
            status,
            took,
            stdout: join(self.out.take()),
            stderr: join(self.err.take()),
        }
    }

    /// Waits for the child to exit; after `limit`, kills it and panics with what it printed.
    pub fn wait(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return self.collect(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let status = self.child.wait().expect("wait after kill");
                    let f = self.collect(status);
                    panic!("`{}` did not exit within {limit:?}; killed it\n{}", self.what, f.show());
                }
                Err(e) => panic!("waiting for `{}`: {e}", self.what),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary to completion within `limit`.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S], limit: Duration) -> Finished {
    Proc::spawn(args).wait(limit)
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid JSON ({e}):\n{text}", path.display()))
}

/// Sends the signal `sig` (`INT`, `TERM`) to `pid`.
pub fn send_signal(pid: u32, sig: &str) {
    let kill = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -{sig} {pid} failed");
}

pub fn send_sigint(pid: u32) {
    send_signal(pid, "INT");
}

/// Waits until the target has received at least `n` requests (at most 10 s).
pub fn wait_for_requests(target: &Target, n: u64) {
    let start = Instant::now();
    while target.counts.requests() < n && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        target.counts.requests() >= n,
        "the target received {} requests within 10 s, expected {n}",
        target.counts.requests()
    );
}

/// The process's resident memory in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A field of `/proc/PID/status` given in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `args` and returns its exit and the highest RSS seen (sampled every 50 ms).
pub fn run_sampling_rss(args: &[String], limit: Duration) -> (Finished, u64) {
    let proc = Proc::spawn(args);
    let pid = proc.id();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while let Some(kib) = rss_kib(pid) {
            peak = peak.max(kib);
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    });
    let f = proc.wait(limit);
    (f, sampler.join().unwrap())
}

/// `run SCRIPT --host HOST` and then `rest`.
pub fn run_args(script: &Path, host: &str, rest: &[&str]) -> Vec<String> {
    let mut v = vec![
        "run".to_string(),
        script.display().to_string(),
        "--host".to_string(),
        host.to_string(),
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}
