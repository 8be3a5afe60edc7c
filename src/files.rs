//! The files a user names, opened so that none can hang the run, exhaust memory or be
//! destroyed by it.
//!
//! - Inputs ([`read`]: the scenario, its feeds, `--setup-data`, the PEM files, `report`'s
//!   result files) are read from regular files only, opened without blocking (a FIFO with no
//!   writer would otherwise hang the open), and never past a size cap: a device such as
//!   `/dev/zero` or a FIFO is refused, and so is a file larger than its cap.
//! - Outputs ([`check_writable`] at the start, [`write`] at the end) go to regular files and new
//!   paths atomically (a temporary file beside the target, then renamed over it), and *into*
//!   character devices (`/dev/null`, a terminal) and FIFOs (`/dev/stdout` on a pipe,
//!   `--out >(jq .)`) in place, with a bounded wait for a reader that does not read, and to
//!   stdout after what it holds when they name the file stdout is redirected to. Anything else
//!   (a directory, a block device, a socket) is refused: a rename would replace it.
//!   Symbolic links are followed to decide; a loop of them is refused, and so is a path that
//!   names a file this process read as an input (any of those [`read`] read).

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

const MIB: u64 = 1 << 20;

/// The largest scenario file read.
pub const SCENARIO_MAX: u64 = 8 * MIB;
/// The largest `data.csv` feed read. Its fields are kept end to end in one string (1.3 to 4
/// times the file in memory), so this keeps a feed under about 1 GiB.
pub const CSV_FEED_MAX: u64 = 256 * MIB;
/// The largest `data.json` feed read: its items are kept parsed, and a parsed JSON value takes
/// 6 to 36 times its text in real feeds, up to ~120 times for the worst shape (nested
/// one-key objects), so this keeps a feed under about 2 GiB whatever it holds.
pub const JSON_FEED_MAX: u64 = 16 * MIB;
/// The largest `--setup-data` file read (every user gets a copy in its 16 MiB Lua state).
pub const SETUP_DATA_MAX: u64 = 16 * MIB;
/// The largest `--ca-cert`, `--cert` or `--key` PEM file read.
pub const PEM_MAX: u64 = 4 * MIB;
/// The largest result file `report` reads: its series takes about 3 KB a second of run (a
/// demo's spread of latencies), so this holds some four days.
pub const RESULT_MAX: u64 = 1024 * MIB;

/// How long a write into a FIFO or a device may make no progress (a reader that does not read)
/// before it is given up.
pub const STALL: Duration = Duration::from_secs(10);

/// What a path names, for the checks and their messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
    Other,
}

impl Kind {
    fn of(t: FileType) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if t.is_fifo() {
                return Kind::Fifo;
            }
            if t.is_char_device() {
                return Kind::CharDevice;
            }
            if t.is_block_device() {
                return Kind::BlockDevice;
            }
            if t.is_socket() {
                return Kind::Socket;
            }
        }
        if t.is_file() {
            Kind::Regular
        } else if t.is_dir() {
            Kind::Directory
        } else {
            Kind::Other
        }
    }

    /// The kind of what `path` names, its symbolic links followed; `None` if nothing is there
    /// (or it cannot be looked at: the open or the write says why).
    pub fn at(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Kind::of(m.file_type()))
    }

    /// "a FIFO", "a directory", ...
    pub fn name(self) -> &'static str {
        match self {
            Kind::Regular => "a regular file",
            Kind::Directory => "a directory",
            Kind::Fifo => "a FIFO",
            Kind::CharDevice => "a character device",
            Kind::BlockDevice => "a block device",
            Kind::Socket => "a socket",
            Kind::Other => "not a file",
        }
    }

    /// Written into in place rather than replaced.
    fn in_place(self) -> bool {
        matches!(self, Kind::Fifo | Kind::CharDevice)
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1024 * MIB && bytes.is_multiple_of(1024 * MIB) {
        format!("{} GiB", bytes / (1024 * MIB))
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Opens with `O_NONBLOCK` (a FIFO's open does not wait for its other end) and `O_NOCTTY` (a
/// terminal does not become the process's controlling terminal).
fn options(opts: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
    }
    #[cfg(not(unix))]
    {
        opts
    }
}

/// Reads the regular file at `path`, at most `cap` bytes. `label` names it in messages
/// (`scenario s.lua`, `--ca-cert ca.pem`): "cannot read LABEL: ...", "LABEL is not a regular
/// file (a FIFO)", "LABEL is larger than 8 MiB".
pub fn read(path: &Path, label: &str, cap: u64) -> Result<Vec<u8>> {
    let cannot = |e: std::io::Error| anyhow!("cannot read {label}: {e}");
    let regular = |m: &Metadata| match Kind::of(m.file_type()) {
        Kind::Regular => Ok(()),
        kind => Err(anyhow!("{label} is not a regular file ({})", kind.name())),
    };
    let too_large = || anyhow!("{label} is larger than {}", size(cap));
    // Looked at before it is opened: a socket cannot be opened, and a device is not touched.
    regular(&std::fs::metadata(path).map_err(cannot)?)?;
    let file = options(OpenOptions::new().read(true)).open(path).map_err(cannot)?;
    // Again on what was opened, which may not be what was looked at.
    let meta = file.metadata().map_err(cannot)?;
    regular(&meta)?;
    if meta.len() > cap {
        return Err(too_large());
    }
    let bytes = read_at_most(file, cap).map_err(cannot)?.ok_or_else(too_large)?;
    remember_input(path, &meta, label);
    Ok(bytes)
}

/// A file this process read as an input: where, which file (device and inode), what it was.
struct Input {
    path: PathBuf,
    id: (u64, u64),
    label: String,
}

/// The inputs read so far (see [`read`]): no output may replace one.
static INPUTS: std::sync::Mutex<Vec<Input>> = std::sync::Mutex::new(Vec::new());

/// The device and inode of a file (`None` where there are none).
fn identity(meta: &Metadata) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

fn remember_input(path: &Path, meta: &Metadata, label: &str) {
    let (Some(id), Ok(mut inputs)) = (identity(meta), INPUTS.lock()) else {
        return;
    };
    if !inputs.iter().any(|i| i.id == id && i.path == path) {
        inputs.push(Input {
            path: path.to_path_buf(),
            id,
            label: label.to_string(),
        });
    }
}

/// What `path` names among the inputs this process read, if it names one: the same file
/// (through a link, or another name for it), which the input's own path still names (a file
/// made since in the place of one removed may have its inode).
fn input_at(path: &Path) -> Option<String> {
    let id = identity(&std::fs::metadata(path).ok()?)?;
    let inputs = INPUTS.lock().ok()?;
    inputs
        .iter()
        .find(|i| i.id == id && std::fs::metadata(&i.path).ok().and_then(|m| identity(&m)) == Some(id))
        .map(|i| i.label.clone())
}

/// Whether `path` is a loop of symbolic links (or a chain too long to follow).
fn is_link_loop(path: &Path) -> bool {
    #[cfg(unix)]
    {
        std::fs::metadata(path).is_err_and(|e| e.raw_os_error() == Some(libc::ELOOP))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// Why `path` may not be written at all, whatever it names: a loop of links (the atomic write
/// would replace one of them), or an input of this process.
fn refused(path: &Path) -> Option<String> {
    if is_link_loop(path) {
        return Some("it is a symbolic link loop".into());
    }
    input_at(path).map(|label| format!("it would replace an input of this command ({label})"))
}

/// Up to `cap` bytes of `r`, or `None` if it holds more (a file that grew since it was
/// looked at); never reads more than `cap + 1` bytes.
fn read_at_most(r: impl Read, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    r.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= cap).then_some(bytes))
}

/// Fails early if `path` cannot be written as `flag`, so a long run does not end with nowhere
/// to write. Touches nothing at `path` itself: a regular file or a new path is checked by
/// writing a probe file beside it, a device or a FIFO by its permissions alone (opening a FIFO
/// would show its reader an end of file).
pub fn check_writable(path: &Path, flag: &str) -> Result<()> {
    let shown = path.display();
    if let Some(why) = refused(path) {
        bail!("cannot write {flag} {shown}: {why}");
    }
    match Kind::at(path) {
        None | Some(Kind::Regular) => {}
        Some(kind) if kind.in_place() => {
            return may_write(path).with_context(|| format!("cannot write {flag} {shown} ({})", kind.name()));
        }
        Some(Kind::Directory) => bail!("cannot write {flag} {shown}: it is a directory (give a file name)"),
        Some(kind) => bail!(
            "cannot write {flag} {shown}: it is {} (give a regular file, a new path, a character device such as /dev/null, or a FIFO)",
            kind.name()
        ),
    }
    let target = resolve(path);
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let probe = dir.join(format!(".stormlight-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("cannot write {flag} {shown}"))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Whether this process may write `path` (`access(2)`, which opens nothing).
fn may_write(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let _ = path;
    Ok(())
}

/// `path` with the symbolic links of its last component followed, as far as they lead: the
/// atomic write replaces the file a link points to, not the link. (A dangling link gives the
/// path it points to, which the write creates.)
fn resolve(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::read_link(&p) {
            Ok(target) => {
                p = match p.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                }
            }
            Err(_) => break,
        }
    }
    p
}

/// Writes `bytes` to `path`: atomically to a regular file or a new path, in place into a
/// character device or a FIFO (giving up after [`STALL`] without progress), and never to
/// anything else. Decided again here, as what `path` names may have changed since
/// [`check_writable`]. Errors do not name the path: callers say what they were writing.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, bytes, STALL)
}

fn write_with(path: &Path, bytes: &[u8], stall: Duration) -> Result<()> {
    if let Some(why) = refused(path) {
        bail!(why);
    }
    match Kind::at(path) {
        Some(Kind::Regular) if is_stdout(path) => {
            // `--out /dev/stdout > file`: after what the run printed there, not over it.
            let mut out = std::io::stdout().lock();
            Ok(out.write_all(bytes).and_then(|()| out.flush())?)
        }
        None | Some(Kind::Regular) => atomic(&resolve(path), bytes),
        Some(kind) if kind.in_place() => into(path, kind, bytes, stall),
        Some(kind) => bail!("it is {}, not a regular file", kind.name()),
    }
}

/// Whether `path` names the file this process's stdout writes to (`/dev/stdout`, or the file
/// itself, when stdout is redirected to a file).
fn is_stdout(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let stdout = std::io::stdout().as_fd().try_clone_to_owned().map(File::from);
        match (std::fs::metadata(path), stdout.and_then(|f| f.metadata())) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// To a temporary file beside `path`, then renamed over it.
fn atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(written?)
}

/// Into the device or FIFO at `path`, in place: no temporary file, no truncation.
fn into(path: &Path, kind: Kind, bytes: &[u8], stall: Duration) -> Result<()> {
    let file = match options(OpenOptions::new().write(true)).open(path) {
        Ok(f) => f,
        #[cfg(unix)]
        Err(e) if kind == Kind::Fifo && e.raw_os_error() == Some(libc::ENXIO) => {
            bail!("it is a FIFO with nothing reading it")
        }
        Err(e) => return Err(e.into()),
    };
    match Kind::of(file.metadata()?.file_type()) {
        k if k.in_place() => write_all_bounded(&file, bytes, stall),
        // Replaced by a regular file since it was looked at: opened without truncating, so
        // nothing was changed; written the regular way.
        Kind::Regular => {
            drop(file);
            atomic(&resolve(path), bytes)
        }
        k => bail!("it is {}, not a regular file", k.name()),
    }
}

/// Writes all of `bytes` to a non-blocking `file`, waiting for room at most `stall` at a time.
fn write_all_bounded(mut file: &File, bytes: &[u8], stall: Duration) -> Result<()> {
    let total = bytes.len();
    let mut rest = bytes;
    let mut deadline = Instant::now() + stall;
    while !rest.is_empty() {
        match file.write(rest) {
            Ok(0) => bail!("no byte could be written ({} of {total} written)", total - rest.len()),
            Ok(n) => {
                rest = &rest[n..];
                deadline = Instant::now() + stall;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !wait_writable(file, left)? {
                    bail!(
                        "nothing read it for {}s: gave up ({} of {total} bytes written)",
                        stall.as_secs_f64(),
                        total - rest.len()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                bail!("its reader closed it ({} of {total} bytes written)", total - rest.len())
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits up to `limit` for `file` to take more bytes; `false` if it did not.
fn wait_writable(file: &File, limit: Duration) -> Result<bool> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = limit.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, for a descriptor `file` keeps open during the call.
        let ready = unsafe { libc::poll(&mut fd, 1, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            // A signal: the caller tries again, within the same deadline.
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(true)
            } else {
                Err(e.into())
            };
        }
        // Ready to write, or an error or hang-up that the next write reports.
        Ok(ready > 0)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::thread::sleep(limit.min(Duration::from_millis(10)));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("stormlight-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
        assert!(status.success(), "mkfifo {}", path.display());
    }

    #[test]
    fn reads_stop_one_byte_past_the_cap() {
        // A reader that never ends: only cap + 1 bytes are taken from it.
        let endless = std::io::repeat(b'x');
        assert_eq!(read_at_most(endless, 10).unwrap(), None);
        assert_eq!(read_at_most(&b"0123456789"[..], 10).unwrap().unwrap().len(), 10);
        let mut counted = std::io::repeat(b'x').take(1 << 30);
        assert_eq!(read_at_most(&mut counted, 1000).unwrap(), None);
        assert_eq!(counted.limit(), (1 << 30) - 1001, "read cap + 1 bytes, no more");
    }

    #[test]
    fn inputs_are_regular_files_within_their_cap() {
        let dir = TempDir::new("read");
        let ok = dir.0.join("ok.txt");
        std::fs::write(&ok, b"hello").unwrap();
        assert_eq!(read(&ok, "input ok.txt", 5).unwrap(), b"hello");
        let err = read(&ok, "input ok.txt", 4).unwrap_err().to_string();
        assert_eq!(err, "input ok.txt is larger than 4 bytes");
        let err = read(&dir.0, "input dir", 100).unwrap_err().to_string();
        assert_eq!(err, "input dir is not a regular file (a directory)");
        let fifo = dir.0.join("fifo");
        mkfifo(&fifo);
        let err = read(&fifo, "input fifo", 100).unwrap_err().to_string();
        assert_eq!(err, "input fifo is not a regular file (a FIFO)");
        let err = read(Path::new("/dev/zero"), "input zero", 100).unwrap_err().to_string();
        assert_eq!(err, "input zero is not a regular file (a character device)");
        let err = read(&dir.0.join("missing"), "input missing", 100)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read input missing: "), "{err}");
        // A link is followed.
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(read(&link, "link", 100).unwrap_err().to_string().contains("(a FIFO)"));
    }

    #[test]
    fn a_write_into_a_fifo_nobody_reads_gives_up_after_the_stall() {
        let dir = TempDir::new("stall");
        let fifo = dir.0.join("fifo");
        mkfifo(&fifo);
        // No reader at all: refused at once.
        let err = write_with(&fifo, b"{}", Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "it is a FIFO with nothing reading it");
        // A reader that holds it open and never reads: the pipe fills, then the wait ends.
        let reader = options(OpenOptions::new().read(true)).open(&fifo).unwrap();
        let started = Instant::now();
        let big = vec![b'x'; 4 << 20];
        let err = write_with(&fifo, &big, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        let took = started.elapsed();
        assert!(err.starts_with("nothing read it for 0.3s: gave up ("), "{err}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        drop(reader);
        assert!(fifo.exists() && Kind::at(&fifo) == Some(Kind::Fifo), "still a FIFO");
    }

    #[test]
    fn a_fifo_with_a_reader_receives_everything() {
        let dir = TempDir::new("fifo");
        let fifo = dir.0.join("fifo");
        mkfifo(&fifo);
        let reader = options(OpenOptions::new().read(true)).open(&fifo).unwrap();
        let drain = std::thread::spawn(move || {
            let mut reader = reader;
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = [0u8; 65536];
            // Non-blocking: EOF comes only once the writer closed it.
            while Instant::now() < deadline {
                match reader.read(&mut buf) {
                    Ok(0) if !got.is_empty() => break,
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            got
        });
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        write(&fifo, &big).unwrap();
        assert_eq!(drain.join().unwrap(), big);
        assert_eq!(Kind::at(&fifo), Some(Kind::Fifo));
    }

    #[test]
    fn outputs_replace_regular_files_only() {
        let dir = TempDir::new("write");
        let file = dir.0.join("out.json");
        write(&file, b"one").unwrap();
        write(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        // Through a link: the file it points to is replaced, the link stays.
        let link = dir.0.join("link.json");
        std::os::unix::fs::symlink("out.json", &link).unwrap();
        write(&link, b"three").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&file).unwrap(), b"three");
        check_writable(&link, "--out").unwrap();
        // A directory is neither replaced nor written into.
        let sub = dir.0.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(
            write(&sub, b"x").unwrap_err().to_string(),
            "it is a directory, not a regular file"
        );
        let err = check_writable(&sub, "--html").unwrap_err().to_string();
        assert!(err.contains("--html") && err.contains("directory"), "{err}");
        // A socket neither.
        let sock = dir.0.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(
            write(&sock, b"x").unwrap_err().to_string(),
            "it is a socket, not a regular file"
        );
        let err = check_writable(&sock, "--out").unwrap_err().to_string();
        assert!(err.contains("--out") && err.contains("a socket"), "{err}");
        // /dev/null: written into, and still a character device.
        check_writable(Path::new("/dev/null"), "--out").unwrap();
        write(Path::new("/dev/null"), b"{}").unwrap();
        assert_eq!(Kind::at(Path::new("/dev/null")), Some(Kind::CharDevice));
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("tmp") || n.contains("probe")),
            "{names:?}"
        );
    }

    #[test]
    fn a_link_loop_and_an_input_are_never_written_over() {
        let dir = TempDir::new("refused");
        let (a, b) = (dir.0.join("a.json"), dir.0.join("b.json"));
        std::os::unix::fs::symlink("b.json", &a).unwrap();
        std::os::unix::fs::symlink("a.json", &b).unwrap();
        let e = check_writable(&a, "--out").unwrap_err().to_string();
        assert_eq!(
            e,
            format!("cannot write --out {}: it is a symbolic link loop", a.display())
        );
        assert_eq!(write(&a, b"{}").unwrap_err().to_string(), "it is a symbolic link loop");
        for link in [&a, &b] {
            assert!(std::fs::symlink_metadata(link).unwrap().file_type().is_symlink());
        }

        // An input read by this process, by its own name, through a link, by a hard link.
        let input = dir.0.join("s.lua");
        std::fs::write(&input, b"endpoints = {}").unwrap();
        let (link, hard) = (dir.0.join("link.lua"), dir.0.join("hard.lua"));
        std::os::unix::fs::symlink("s.lua", &link).unwrap();
        std::fs::hard_link(&input, &hard).unwrap();
        check_writable(&input, "--out").unwrap();
        read(&input, &format!("scenario {}", input.display()), 100).unwrap();
        for path in [&input, &link, &hard] {
            let e = check_writable(path, "--html").unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "cannot write --html {}: it would replace an input of this command (scenario {})",
                    path.display(),
                    input.display()
                )
            );
            assert!(
                write(path, b"x")
                    .unwrap_err()
                    .to_string()
                    .starts_with("it would replace an input")
            );
        }
        assert_eq!(std::fs::read(&input).unwrap(), b"endpoints = {}");
        // Once the input is gone, its inode may serve another file: that one is written.
        std::fs::remove_file(&input).unwrap();
        std::fs::remove_file(&hard).unwrap();
        let other = dir.0.join("other.json");
        std::fs::write(&other, b"old").unwrap();
        write(&other, b"new").unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"new");
    }
}
