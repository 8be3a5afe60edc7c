//! stderr without waiting. Every line the program and its scripts write to stderr (the start
//! line, warnings, the live table, `print` and `log`) goes through one thread, fed through a
//! bounded queue: a slow terminal, or a pipe no one reads, never holds up a run, its duration,
//! its Ctrl-C or its end. Lines that find the queue full are counted, and the count is said.
//! Scripts' lines are limited further: [`SCRIPT_LINES_PER_SECOND`], [`SCRIPT_LINE_BYTES`].

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Script output lines (`print`, `log`) written, across all users, per second; past it they
/// are counted and the count is said.
pub const SCRIPT_LINES_PER_SECOND: u32 = 100;
/// The longest script output line, in bytes; the rest is cut and its size said.
pub const SCRIPT_LINE_BYTES: usize = 4096;
/// Lines waiting for stderr; past it (stderr slower than the program) they are dropped.
const QUEUED: usize = 4096;

enum Msg {
    /// A line (a newline is added).
    Line(String),
    /// Text as it is (the live table's redraw, with its cursor movements).
    Raw(String),
    /// Every message before it is written: answer.
    Flush(std::sync::mpsc::Sender<()>),
}

struct Console {
    tx: SyncSender<Msg>,
    /// Scripts' share: this second's start, the lines written in it; and the lines dropped
    /// (over the share, or the queue full) since last said.
    limit: Mutex<(Instant, u32, u64)>,
}

fn console() -> &'static Console {
    static CONSOLE: OnceLock<Console> = OnceLock::new();
    CONSOLE.get_or_init(|| {
        let (tx, rx) = sync_channel::<Msg>(QUEUED);
        let _ = std::thread::Builder::new()
            .name("stormlight-stderr".into())
            .spawn(move || write_all(rx));
        Console {
            tx,
            limit: Mutex::new((Instant::now(), 0, 0)),
        }
    })
}

/// The thread that writes: errors (a closed stderr) are ignored, never a panic.
fn write_all(rx: Receiver<Msg>) {
    for msg in rx {
        let mut err = std::io::stderr().lock();
        match msg {
            Msg::Line(line) => {
                let _ = writeln!(err, "{line}");
            }
            Msg::Raw(text) => {
                let _ = err.write_all(text.as_bytes());
                let _ = err.flush();
            }
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn send(msg: Msg) {
    let c = console();
    if c.tx.try_send(msg).is_err()
        && let Ok(mut guard) = c.limit.lock()
    {
        guard.2 += 1;
    }
}

/// Writes `text` as a line on stderr, without waiting.
pub fn line(text: impl Into<String>) {
    send(Msg::Line(text.into()));
}

/// Writes `text` to stderr as it is, without waiting.
pub fn raw(text: String) {
    send(Msg::Raw(text));
}

/// `say!(...)`: a line on stderr, formatted as `format!` does, without waiting.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::line(format!($($arg)*))
    };
}

/// Whether a script may write one more line this second (and says what was dropped before).
pub fn admit_script_line() -> bool {
    let c = console();
    let Ok(mut guard) = c.limit.lock() else { return false };
    let (since, lines, dropped) = &mut *guard;
    let now = Instant::now();
    if now.duration_since(*since) >= Duration::from_secs(1) {
        if *dropped > 0 {
            let _ = c.tx.try_send(Msg::Line(dropped_note(*dropped)));
            *dropped = 0;
        }
        (*since, *lines) = (now, 0);
    }
    if *lines < SCRIPT_LINES_PER_SECOND {
        *lines += 1;
        true
    } else {
        *dropped += 1;
        false
    }
}

fn dropped_note(n: u64) -> String {
    format!(
        "[log] {n} lines were dropped (scripts may write {SCRIPT_LINES_PER_SECOND} a second; or stderr was too slow)"
    )
}

/// Writes what is queued, waiting `at_most` for it (stderr may be blocked), and says how many
/// lines were dropped since it last said so.
pub fn flush(at_most: Duration) {
    let c = console();
    let dropped = c.limit.lock().map(|mut g| std::mem::take(&mut g.2)).unwrap_or(0);
    if dropped > 0 {
        let _ = c.tx.try_send(Msg::Line(dropped_note(dropped)));
    }
    let (done, wait) = std::sync::mpsc::channel();
    if c.tx.try_send(Msg::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(at_most);
    }
}

/// Writes `text` to stdout, waiting `at_most` for it: `Err` if it could not be written (closed,
/// or no one read it in time). The writing goes on in a thread of its own, so the caller never
/// waits longer.
pub fn stdout(text: String, at_most: Duration) -> Result<(), String> {
    let (done, wait) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("stormlight-stdout".into())
        .spawn(move || {
            let mut out = std::io::stdout().lock();
            let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            let _ = done.send(written.map_err(|e| e.to_string()));
        });
    match wait.recv_timeout(at_most) {
        Ok(result) => result,
        Err(_) => Err(format!("nothing read stdout for {}s: gave up", at_most.as_secs())),
    }
}
