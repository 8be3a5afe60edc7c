//! What this machine lets a run have: the memory available to it (the system's, or its
//! container's cgroup limit, whichever is less) and open files. A run is refused before any
//! traffic when its users cannot fit, rather than taking the machine down or leaving users
//! silently without a connection.

use anyhow::{Result, bail};

/// Bytes this process may still take: `MemAvailable` of `/proc/meminfo`, and under a cgroup
/// memory limit (v2's `memory.max`, or v1's `memory/memory.limit_in_bytes`), what is left
/// below it. `None` where none can be read.
pub fn available_memory() -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(name).ok();
    let system = read("/proc/meminfo").and_then(|text| meminfo_available(&text));
    let cgroup = |limit: &str, usage: &str| {
        let dir = "/sys/fs/cgroup";
        let (limit, usage) = (read(&format!("{dir}/{limit}"))?, read(&format!("{dir}/{usage}"))?);
        cgroup_room(&limit, &usage)
    };
    [
        system,
        cgroup("memory.max", "memory.current"),
        cgroup("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ]
    .into_iter()
    .flatten()
    .min()
}

/// `MemAvailable` of the text of `/proc/meminfo`, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024))
}

/// A limit this large is no limit: cgroup v1 says "none" with the largest page-aligned `i64`
/// (9223372036854771712), v2 with `max`.
const NO_LIMIT: u64 = 1 << 60;

/// What is left below a cgroup's memory limit, from the text of its limit file and its usage
/// file (v2's `memory.max` and `memory.current`, or v1's `memory.limit_in_bytes` and
/// `memory.usage_in_bytes`); `None` without a limit.
fn cgroup_room(limit: &str, usage: &str) -> Option<u64> {
    let limit = limit.trim().parse::<u64>().ok().filter(|l| *l < NO_LIMIT)?;
    let usage = usage.trim().parse::<u64>().ok()?;
    Some(limit.saturating_sub(usage))
}

/// The share of the available memory that the users of a run may take: the rest is for the
/// process's own buffers, the kernel's sockets and the other programs of the machine.
pub fn users_share(available: u64) -> u64 {
    available / 4 * 3
}

/// Refuses `users` users of `per_user` bytes each when they do not fit in the memory this
/// machine has (see [`users_share`]).
pub fn check_memory(users: u64, per_user: u64, available: Option<u64>, measured: &str) -> Result<()> {
    let Some(available) = available else { return Ok(()) };
    let need = users.saturating_mul(per_user);
    if need > users_share(available) {
        bail!(
            "{users} users need about {} ({} each, {measured}), but this machine has {} available: \
             give fewer users, or split the test over several machines with --segment I/N",
            bytes(need),
            bytes(per_user),
            bytes(available)
        );
    }
    Ok(())
}

/// Open files this process may have: raises the soft limit to the hard one (as wrk and k6
/// users are told to with `ulimit -n`), and returns the limit then in force.
pub fn raise_open_files() -> u64 {
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return u64::MAX;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

/// Open files a run needs beside one connection per user: the runtime's own (event queues,
/// timers, pipes per worker thread), stdio, outputs, the dashboard's clients.
pub const OWN_FILES: u64 = 64;

/// Refuses `users` users when one connection each does not fit in `limit` open files.
pub fn check_open_files(users: u64, limit: u64) -> Result<()> {
    let need = users.saturating_add(OWN_FILES);
    if need > limit {
        bail!(
            "{users} users need at least {need} open files (a connection each), but this process may open {limit} \
             (the hard limit, `ulimit -Hn`): raise it (`ulimit -n`, LimitNOFILE in a systemd unit, or the \
             container's nofile limit), give fewer users, or split the test with --segment I/N"
        );
    }
    Ok(())
}

/// A byte count for people: `312.5 GiB`, `31.0 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_that_do_not_fit_are_refused_with_the_numbers() {
        let gib = 1u64 << 30;
        assert!(check_memory(10_000, 32 << 10, Some(8 * gib), "measured").is_ok());
        let e = check_memory(10_000_000, 32 << 10, Some(8 * gib), "measured").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("10000000 users need about 305.2 GiB (32.0 KiB each, measured)")
                && text.contains("8.0 GiB available")
                && text.contains("--segment"),
            "{text}"
        );
        assert!(check_memory(u64::MAX, u64::MAX, Some(gib), "m").is_err(), "no overflow");
        assert!(
            check_memory(u64::MAX, 1, None, "m").is_ok(),
            "unknown memory: no refusal"
        );
        assert!(check_open_files(1000, 20_000).is_ok());
        let e = check_open_files(40_000, 20_000).unwrap_err().to_string();
        assert!(
            e.contains("40000 users need at least 40064 open files") && e.contains("ulimit -n"),
            "{e}"
        );
    }

    #[test]
    fn cgroup_limits_of_v1_and_v2_are_read_and_no_limit_is_none() {
        let gib = 1u64 << 30;
        assert_eq!(cgroup_room("2147483648\n", "536870912\n"), Some(gib + gib / 2));
        // v2 without a limit; v1 without a limit (its largest page-aligned i64), or a huge one.
        assert_eq!(cgroup_room("max\n", "536870912\n"), None);
        assert_eq!(cgroup_room("9223372036854771712\n", "536870912\n"), None);
        assert_eq!(cgroup_room("18446744073709551615", "1"), None);
        // Over the limit (v1 counts the page cache): nothing left, not an underflow.
        assert_eq!(cgroup_room("1000", "5000"), Some(0));
        assert_eq!(cgroup_room("1000", ""), None);
        assert_eq!(
            meminfo_available("MemTotal:  16000000 kB\nMemAvailable:    8000000 kB\n"),
            Some(8_192_000_000)
        );
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn this_machine_is_read() {
        let available = available_memory().expect("/proc/meminfo is readable on Linux");
        assert!(available > 1 << 20);
        assert!(raise_open_files() >= 64);
    }
}
