//! The validated run configuration, built in one place from the command line, the scenario's
//! `options` table and the defaults (flag > scenario > default), and the duration syntax.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use url::Url;

/// Built-in defaults, used when neither a flag nor the scenario's `options` sets a value.
pub const DEFAULT_USERS: u32 = 1;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// Distinct request names that get a row of their own, by default.
pub const DEFAULT_MAX_NAMES: usize = 1000;

/// The longest duration accepted anywhere (run, stages, timeouts, think time, `sleep`): a year.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The highest open-model rate (iterations per second, the whole test's): far above what one
/// machine sends.
pub const MAX_RATE: f64 = 10_000_000.0;
/// The lowest open-model rate (`--rate`, `options.rate`, a rate stage above 0) and the lowest
/// spawn rate: one a million seconds (11.6 days). Below it an iteration or a user would be due
/// past any time the clock can hold.
pub const MIN_RATE: f64 = 1e-6;
/// The most distinct names `--max-names` may allow: each name's row keeps its own histograms
/// (about 100 KB a name, measured).
pub const MAX_NAMES: usize = 10_000;
/// The most redirects `--max-redirects` may follow within one request.
pub const MAX_REDIRECTS: u32 = 100;
/// The largest `--max-body`.
pub const MAX_BODY: u64 = 1 << 30;

/// Settings that may come from the command line or from the scenario's `options` table.
/// `None` means "not given here".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub users: Option<u32>,
    pub spawn_rate: Option<f64>,
    pub duration: Option<Duration>,
    pub timeout: Option<Duration>,
    pub grace: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub max_body: Option<u64>,
    pub max_redirects: Option<u32>,
    pub keepalive_idle: Option<Duration>,
    pub max_names: Option<usize>,
    /// How long one call into the script may run, its waits not counted.
    pub script_timeout: Option<Duration>,
    /// Bytes each user's Lua state may hold.
    pub script_memory: Option<u64>,
    /// Ramping stages (`--stages`, `options.stages`): they set the users over time.
    pub stages: Option<Vec<crate::stages::Stage>>,
    /// Open model: iterations started per second (`--rate`), by a pool of users.
    pub rate: Option<f64>,
    /// Open model with a rate that changes by stages (`--stages 30s:100/s,...`).
    pub rate_stages: Option<Vec<crate::stages::RateStage>>,
    /// The open model's pool of users (`--max-users`).
    pub max_users: Option<u32>,
    /// `--csv PREFIX`: Locust-style CSV files.
    pub csv: Option<PathBuf>,
    /// `--html FILE`: a self-contained report.
    pub html: Option<PathBuf>,
    /// `--web ADDR`: the live dashboard and /metrics.
    pub web: Option<std::net::SocketAddr>,
    /// `--linger`: keep serving `--web` after the run, until Ctrl-C.
    pub linger: bool,
    /// `--web-auth USER:PASS` (or `STORMLIGHT_WEB_AUTH`): HTTP Basic on every route of `--web`.
    pub web_auth: Option<String>,
    /// `--segment I/N`: this process's share of a test split over N processes.
    pub segment: Option<crate::segment::Segment>,
    /// `--start-at`: wait until then to start.
    pub start_at: Option<std::time::SystemTime>,
    /// `--setup-data FILE`: what `setup()` returned, from `stormlight setup`.
    pub setup_data: Option<PathBuf>,
    /// `--threshold` (repeatable): added to the scenario's own.
    pub thresholds: Vec<String>,
    /// The scenario's `thresholds` (parsed when it loaded).
    pub scenario_thresholds: Vec<crate::threshold::Threshold>,
    pub tls: crate::http::TlsOptions,
    pub protocol: Option<crate::http::Protocol>,
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub script: PathBuf,
    /// Base URL that endpoint paths are joined to; `None` if every endpoint has a full `url`.
    pub host: Option<Url>,
    pub users: u32,
    /// Users started per second.
    pub spawn_rate: f64,
    /// `None`: run until interrupted.
    pub duration: Option<Duration>,
    /// Default request timeout (an endpoint's `timeout` wins).
    pub timeout: Duration,
    /// How long in-flight requests may finish after the run ends before they count as aborted.
    pub grace: Duration,
    /// How long one call into the script may run, its waits not counted (`--script-timeout`).
    pub script_timeout: Duration,
    /// Bytes each user's Lua state may hold (`--script-memory`).
    pub script_memory: u64,
    pub out: Option<PathBuf>,
    pub live: LiveMode,
    /// Worker threads (each a current-thread runtime); defaults to the number of cores.
    pub workers: usize,
    /// Connect timeout, body cap, redirects.
    pub http: crate::http::Limits,
    /// How certificates are checked (`--insecure`, `--ca-cert`), for the run header.
    pub tls_options: crate::http::TlsOptions,
    /// The TLS configuration every connection shares, built once.
    pub tls: std::sync::Arc<rustls::ClientConfig>,
    pub protocol: crate::http::Protocol,
    /// Distinct request names with a row of their own (`--max-names`).
    pub max_names: usize,
    /// The scenario's thresholds and the command line's.
    pub thresholds: Vec<crate::threshold::Threshold>,
    /// Users over time; `users` is then their peak.
    pub stages: Option<Vec<crate::stages::Stage>>,
    /// Open model: iterations per second, started by the first free user of a pool of `users`.
    pub rate: Option<f64>,
    /// Open model with the rate changing by stages.
    pub rate_stages: Option<Vec<crate::stages::RateStage>>,
    /// Locust-style CSV files: `PREFIX_stats.csv`, `PREFIX_stats_history.csv`, `PREFIX_failures.csv`.
    pub csv: Option<PathBuf>,
    /// A self-contained HTML report.
    pub html: Option<PathBuf>,
    /// Where the live dashboard and /metrics are served.
    pub web: Option<std::net::SocketAddr>,
    /// Keep serving them after the run, until Ctrl-C.
    pub linger: bool,
    /// The credentials the dashboard asks for.
    pub web_auth: Option<crate::web::WebAuth>,
    /// This process's share of the test (`users` is then the share; `spawn_rate`, `rate`
    /// and the stages stay the whole test's, see `segment`).
    pub segment: Option<crate::segment::Segment>,
    /// The whole test's users (`users` without a segment).
    pub whole_users: u32,
    /// Wait until then to start (after the users' states are made).
    pub start_at: Option<std::time::SystemTime>,
    /// Handed to users instead of running `setup()` (which, with `teardown`, is then not run).
    pub setup_data: Option<serde_json::Value>,
}

/// How the live table is shown while the run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveMode {
    /// Redrawn in place when stderr is a terminal, plain blocks otherwise.
    Auto,
    Off,
}

impl RunConfig {
    /// Merges the command line over the scenario's options over the defaults, and validates.
    pub fn resolve(
        script: PathBuf,
        cli: &Overrides,
        scenario: &Overrides,
        out: Option<PathBuf>,
        live: LiveMode,
    ) -> Result<Self> {
        let host = match cli.host.as_ref().or(scenario.host.as_ref()) {
            Some(h) => Some(parse_host(h)?),
            None => None,
        };
        let stages = cli.stages.clone().or_else(|| scenario.stages.clone());
        if let Some(s) = &stages {
            crate::stages::check(s)?;
            if cli.users.is_some() {
                bail!("give --users or --stages, not both (stages set the users over time)");
            }
        }
        let rate = cli.rate.or(scenario.rate);
        // Flags that would be ignored are refused instead.
        let open = rate.is_some() || cli.rate_stages.is_some() || scenario.rate_stages.is_some();
        if cli.max_users.is_some() && !open {
            bail!("--max-users is the open model's pool: give it with --rate (or rate stages)");
        }
        if open && cli.users.is_some() {
            bail!("in the open model (--rate) the pool is --max-users, not --users");
        }
        if cli.spawn_rate.is_some() && (open || stages.is_some()) {
            bail!("--spawn-rate does not apply with --rate or --stages (they set when users run)");
        }
        if cli.max_users == Some(0) {
            bail!("--max-users must be at least 1");
        }
        let rate_stages = cli.rate_stages.clone().or_else(|| scenario.rate_stages.clone());
        if let Some(r) = rate {
            if !r.is_finite() || r <= 0.0 {
                bail!("--rate must be a positive number of iterations per second (got {r})");
            }
            if r > MAX_RATE {
                bail!("--rate {r} is more than {MAX_RATE} iterations per second: split the test with --segment I/N");
            }
            if r < MIN_RATE {
                bail!("--rate {r:e} is less than {MIN_RATE:e} iterations per second (one every 11.6 days)");
            }
            if stages.is_some() || rate_stages.is_some() {
                bail!("give --rate or --stages, not both (rates by stage: --stages 30s:100/s,...)");
            }
        }
        if let Some(s) = &rate_stages {
            crate::stages::check_rates(s)?;
            if let Some(r) = s.iter().map(|s| s.rate).find(|r| *r > MAX_RATE) {
                bail!(
                    "stages: a rate of {r}/s is more than {MAX_RATE} iterations per second: split the test with --segment I/N"
                );
            }
            if let Some(r) = s.iter().map(|s| s.rate).find(|r| *r > 0.0 && *r < MIN_RATE) {
                bail!(
                    "stages: a rate of {r:e}/s is less than {MIN_RATE:e} iterations per second (one every 11.6 days; a stage's rate may be 0)"
                );
            }
            if stages.is_some() {
                bail!("stages are of users or of rates, not both");
            }
        }
        // The open model's highest rate, for its pool.
        let peak_rate = rate.or_else(|| {
            rate_stages
                .as_ref()
                .map(|s| s.iter().map(|s| s.rate).fold(0.0, f64::max))
        });
        let users = match (&stages, peak_rate) {
            (Some(s), _) => u32::try_from(crate::stages::peak(s)).unwrap_or(u32::MAX),
            // The pool: one second's worth of iterations unless told.
            (None, Some(r)) => cli
                .max_users
                .or(scenario.max_users)
                .unwrap_or_else(|| r.ceil().clamp(1.0, u32::MAX as f64) as u32),
            (None, None) => cli.users.or(scenario.users).unwrap_or(DEFAULT_USERS),
        };
        if users == 0 {
            bail!("users must be at least 1 (got 0)");
        }
        // A segment runs its share of the users (of the peak, with stages; of the pool, in
        // the open model), and needs one at least.
        let segment = cli.segment;
        let whole = users;
        let users = match segment {
            Some(seg) => {
                let share = seg.share(users as u64) as u32;
                if share == 0 {
                    bail!(
                        "--segment {seg}: {whole} users split {} ways leaves this segment none: give at least {} users (or fewer segments)",
                        seg.count,
                        seg.count
                    );
                }
                share
            }
            None => users,
        };
        // Without a spawn rate every user starts within the first second (k6 starts all at once;
        // Locust's one-per-second default makes large tests crawl).
        let spawn_rate = cli.spawn_rate.or(scenario.spawn_rate).unwrap_or(whole as f64);
        if !spawn_rate.is_finite() || spawn_rate <= 0.0 {
            bail!("spawn rate must be a positive number of users per second (got {spawn_rate})");
        }
        if spawn_rate < MIN_RATE {
            bail!("spawn rate {spawn_rate:e} is less than {MIN_RATE:e} users per second (one every 11.6 days)");
        }
        // Stages last as long as they add up to; a --duration too may only cut them short.
        let staged = stages
            .as_deref()
            .map(crate::stages::total)
            .or(rate_stages.as_ref().map(|s| s.iter().map(|s| s.duration).sum()));
        let duration = match (cli.duration, staged) {
            (Some(d), Some(s)) => Some(d.min(s)),
            (d, s) => d.or(s).or(scenario.duration),
        };
        if duration == Some(Duration::ZERO) {
            bail!("duration must be more than 0");
        }
        let timeout = cli.timeout.or(scenario.timeout).unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            bail!("timeout must be more than 0");
        }
        let grace = cli.grace.or(scenario.grace).unwrap_or(DEFAULT_GRACE);
        let script_timeout = cli
            .script_timeout
            .or(scenario.script_timeout)
            .unwrap_or(crate::scenario::sandbox::DEFAULT_SCRIPT_TIMEOUT);
        if script_timeout.is_zero() {
            bail!("--script-timeout must be more than 0");
        }
        let script_memory = cli
            .script_memory
            .or(scenario.script_memory)
            .unwrap_or(crate::scenario::sandbox::DEFAULT_SCRIPT_MEMORY as u64);
        check_script_memory(script_memory)?;
        let defaults = crate::http::Limits::default();
        let http = crate::http::Limits {
            connect_timeout: cli.connect_timeout.unwrap_or(defaults.connect_timeout).min(timeout),
            max_body: cli.max_body.unwrap_or(defaults.max_body),
            max_kept_body: script_memory,
            max_redirects: cli.max_redirects.unwrap_or(defaults.max_redirects),
            keepalive_idle: cli.keepalive_idle.unwrap_or(defaults.keepalive_idle),
        };
        let mut thresholds = scenario.scenario_thresholds.clone();
        for text in &cli.thresholds {
            thresholds.push(crate::threshold::parse_flag(text)?);
        }
        let max_names = cli.max_names.unwrap_or(DEFAULT_MAX_NAMES);
        if max_names == 0 {
            bail!("--max-names must be at least 1");
        }
        if max_names > MAX_NAMES {
            bail!(
                "--max-names {max_names} is more than {MAX_NAMES} (each name keeps a row of histograms, about 100 KB)"
            );
        }
        if http.max_body == 0 {
            bail!("--max-body must be more than 0 (it caps the body read; there is no unlimited)");
        }
        if http.max_body > MAX_BODY {
            bail!("--max-body is at most 1GiB (a kept body is held in memory)");
        }
        if http.max_redirects > MAX_REDIRECTS {
            bail!(
                "--max-redirects is at most {MAX_REDIRECTS} (got {})",
                http.max_redirects
            );
        }
        if http.connect_timeout.is_zero() {
            bail!("connect timeout must be more than 0");
        }
        if cli.tls.insecure && cli.tls.ca_cert.is_some() {
            bail!("give --insecure or --ca-cert, not both");
        }
        let web_auth = match &cli.web_auth {
            Some(_) if cli.web.is_none() => {
                bail!("--web-auth protects the dashboard: give it with --web")
            }
            Some(text) => Some(crate::web::WebAuth::parse(text)?),
            None => None,
        };
        let protocol = cli.protocol.unwrap_or_default();
        let tls = crate::http::tls_config(&cli.tls, protocol)?;
        if let Some(at) = cli.start_at {
            let now = std::time::SystemTime::now();
            if let Ok(ago) = now.duration_since(at)
                && ago > Duration::from_secs(1)
            {
                bail!(
                    "--start-at was {} ago: a segment that starts late is not part of the test (give a time to come)",
                    format_duration(ago)
                );
            }
            if at
                .duration_since(now)
                .is_ok_and(|d| d > Duration::from_secs(7 * 24 * 3600))
            {
                bail!("--start-at is more than 7 days away: unix seconds, not milliseconds?");
            }
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(Self {
            script,
            host,
            users,
            spawn_rate,
            duration,
            timeout,
            grace,
            script_timeout,
            script_memory,
            out,
            live,
            workers: cores.min(users as usize).max(1),
            http,
            tls_options: cli.tls.clone(),
            tls,
            protocol,
            max_names,
            thresholds,
            stages,
            rate,
            rate_stages,
            csv: cli.csv.clone(),
            html: cli.html.clone(),
            web: cli.web,
            linger: cli.linger,
            web_auth,
            segment,
            whole_users: whole,
            start_at: cli.start_at,
            // Read by `prepare`, which checks it against the scenario.
            setup_data: None,
        })
    }
}

impl RunConfig {
    /// Whether the run is an open model (`--rate`, or stages of rates).
    pub fn open(&self) -> bool {
        self.rate.is_some() || self.rate_stages.is_some()
    }

    /// The host as the run header and the result files show it: no trailing `/`, and its
    /// password hidden.
    pub fn shown_host(&self) -> Option<String> {
        let host = self.host.as_ref()?;
        Some(crate::http::redact(host.as_str().trim_end_matches('/')).into_owned())
    }
}

/// The load model in words, for the run's first line and the summary file: the whole test's
/// (with `--segment`, the file's `segment` and `config.users` say which share ran).
pub fn describe_load(cfg: &RunConfig) -> String {
    let users = |n: u32| format!("{n} user{}", if n == 1 { "" } else { "s" });
    let secs = |d: Duration| format_duration(d);
    let all = cfg.whole_users;
    if let Some(r) = cfg.rate {
        format!("{r} iterations/s (open model, a pool of {})", users(all))
    } else if let Some(stages) = &cfg.rate_stages {
        let list: Vec<String> = stages
            .iter()
            .map(|s| format!("{}:{}/s", secs(s.duration), s.rate))
            .collect();
        format!("rate stages {} (open model, a pool of {})", list.join(","), users(all))
    } else if let Some(stages) = &cfg.stages {
        let list: Vec<String> = stages
            .iter()
            .map(|s| format!("{}:{}", secs(s.duration), s.users))
            .collect();
        format!("stages {} (up to {})", list.join(","), users(all))
    } else {
        format!("{} at {}/s", users(all), cfg.spawn_rate)
    }
}

/// Parses and checks a host URL: http or https, with a host name. Messages show it with its
/// password hidden.
pub fn parse_host(s: &str) -> Result<Url> {
    let shown = crate::http::redact_input(s);
    if !s.contains("://") {
        bail!("bad host URL {shown:?}: it needs a scheme, e.g. http://{shown}");
    }
    let url = Url::parse(s).with_context(|| format!("bad host URL {shown:?}: expected e.g. http://127.0.0.1:8080"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("bad host URL {shown:?}: the scheme must be http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("bad host URL {shown:?}: it has no host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("bad host URL {shown:?}: put queries in the endpoints, not the host");
    }
    if url.port() == Some(0) {
        bail!("bad host URL {shown:?}: port 0 is no server's port");
    }
    Ok(url)
}

/// Parses a duration: `30` (seconds), `30s`, `2m`, `1h30m`, `500ms`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let bad = || format!("bad duration {s:?}: use e.g. 30 (seconds), 1.5s, 30s, 2m, 1h30m or 500ms");
    if s.is_empty() {
        bail!(bad());
    }
    let out_of_range = |e: anyhow::Error| anyhow::anyhow!("bad duration {s:?}: {e}");
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_duration(secs).map_err(out_of_range);
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = num.parse().map_err(|_| anyhow::anyhow!(bad()))?;
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => bail!(bad()),
        };
        total += value * scale;
        rest = tail;
    }
    secs_to_duration(total).map_err(out_of_range)
}

/// The most `--script-memory` may give each user's state.
pub const MAX_SCRIPT_MEMORY: u64 = 1 << 30;

/// A user state's memory limit this program accepts: 1 MiB to [`MAX_SCRIPT_MEMORY`].
pub fn check_script_memory(bytes: u64) -> Result<()> {
    if !(1 << 20..=MAX_SCRIPT_MEMORY).contains(&bytes) {
        bail!("--script-memory must be from 1MiB to 1GiB (got {bytes} bytes)");
    }
    Ok(())
}

/// `secs` seconds as a duration, if it is one this program accepts (at most [`MAX_DURATION`]).
pub fn secs_to_duration(secs: f64) -> Result<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        bail!("a duration must be a non-negative number");
    }
    if secs > MAX_DURATION.as_secs_f64() {
        bail!("a duration is at most 365 days (got {secs} seconds)");
    }
    Duration::try_from_secs_f64(secs).context("duration out of range")
}

/// Parses a size: `1048576`, `512KiB`, `10MB`, `1MiB`, `2GB` (KB/MB/GB are powers of 1000).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bad size {s:?}: use e.g. 1048576, 512KiB or 10MB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => bail!("bad size {s:?}: use e.g. 1048576, 512KiB or 10MB"),
    };
    n.checked_mul(scale).context("size too large")
}

/// A duration for people: `500ms`, `1.5s`, `30s`, `2m 30s`.
pub fn format_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() != 0 && d < Duration::from_secs(60) {
        format!("{}s", (d.as_secs_f64() * 1000.0).round() / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_documented_form() {
        let d = |s| parse_duration(s).unwrap();
        assert_eq!(d("30"), Duration::from_secs(30));
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("2m"), Duration::from_secs(120));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(format_duration(d("1.5s")), "1.5s");
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_bytes("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        assert!(parse_bytes("10 parsecs").is_err() && parse_bytes("").is_err());
        assert_eq!(format_duration(d("500ms")), "500ms");
        assert_eq!(format_duration(d("1m30s")), "1m 30s");
        for bad in ["", "abc", "10x", "-5", "5 s", "s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn flags_win_over_scenario_options_over_defaults() {
        let cli = Overrides {
            users: Some(7),
            ..Default::default()
        };
        let script = Overrides {
            users: Some(3),
            spawn_rate: Some(2.0),
            ..Default::default()
        };
        let cfg = RunConfig::resolve("x.lua".into(), &cli, &script, None, LiveMode::Off).unwrap();
        assert_eq!(cfg.users, 7);
        assert_eq!(cfg.spawn_rate, 2.0);
        assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        assert_eq!(cfg.duration, None);
    }

    #[test]
    fn nonsense_numbers_and_hosts_are_refused() {
        let none = Overrides::default();
        let with = |o: Overrides| RunConfig::resolve("x.lua".into(), &o, &none, None, LiveMode::Off);
        assert!(
            with(Overrides {
                users: Some(0),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            with(Overrides {
                spawn_rate: Some(-1.0),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            with(Overrides {
                duration: Some(Duration::ZERO),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            format!(
                "{:#}",
                with(Overrides {
                    host: Some("localhost:8000".into()),
                    ..Default::default()
                })
                .unwrap_err()
            )
            .contains("http://localhost:8000")
        );
        for host in [
            "nonsense",
            "ftp://x",
            "http://",
            "http://h/?q=1",
            "127.0.0.1:80",
            "http://127.0.0.1:0",
        ] {
            assert!(
                with(Overrides {
                    host: Some(host.into()),
                    ..Default::default()
                })
                .is_err(),
                "{host}"
            );
        }
        assert!(
            with(Overrides {
                host: Some("http://127.0.0.1:8000/api".into()),
                ..Default::default()
            })
            .is_ok()
        );
    }

    #[test]
    fn rates_below_the_least_are_refused_from_flags_options_and_stages() {
        let resolve = |cli: Overrides, scenario: Overrides| {
            RunConfig::resolve("x.lua".into(), &cli, &scenario, None, LiveMode::Off).map_err(|e| format!("{e:#}"))
        };
        let rate = |r| Overrides {
            rate: Some(r),
            ..Default::default()
        };
        let spawn = |r| Overrides {
            spawn_rate: Some(r),
            ..Default::default()
        };
        let stage = |r| Overrides {
            rate_stages: Some(vec![
                crate::stages::RateStage {
                    duration: Duration::from_secs(10),
                    rate: 5.0,
                },
                crate::stages::RateStage {
                    duration: Duration::from_secs(10),
                    rate: r,
                },
            ]),
            ..Default::default()
        };
        let none = Overrides::default;
        for tiny in [1e-19, 1e-20, 1e-300, 1e-320, 9.9e-7] {
            for (what, cli, scenario) in [
                ("--rate", rate(tiny), none()),
                ("options.rate", none(), rate(tiny)),
                ("-r", spawn(tiny), none()),
                ("options.spawn_rate", none(), spawn(tiny)),
                ("--stages", stage(tiny), none()),
                ("options.stages", none(), stage(tiny)),
            ] {
                let e = resolve(cli, scenario).expect_err(what);
                assert!(e.contains("is less than 1e-6"), "{what} {tiny}: {e}");
            }
        }
        assert_eq!(resolve(rate(MIN_RATE), none()).unwrap().rate, Some(MIN_RATE));
        assert_eq!(resolve(spawn(MIN_RATE), none()).unwrap().spawn_rate, MIN_RATE);
        // A stage's rate may be 0 (a pause), not a tiny positive.
        assert!(resolve(stage(0.0), none()).is_ok());
    }

    #[test]
    fn host_creds_are_hidden_in_errors_and_in_the_shown_host() {
        for host in [
            "ada:s3cret@127.0.0.1:8000",
            "ftp://ada:s3cret@x",
            "http://ada:s3cret@h/?q=1",
            "http://ada:s3cret@h:99999",
        ] {
            let e = format!("{:#}", parse_host(host).unwrap_err());
            assert!(e.contains("ada:***@") && !e.contains("s3cret"), "{e}");
        }
        let cli = Overrides {
            host: Some("http://ada:s3cret@127.0.0.1:8000/api/".into()),
            ..Default::default()
        };
        let cfg = RunConfig::resolve("x.lua".into(), &cli, &Overrides::default(), None, LiveMode::Off).unwrap();
        assert_eq!(cfg.shown_host().as_deref(), Some("http://ada:***@127.0.0.1:8000/api"));
    }

    #[test]
    fn web_auth_needs_web_and_a_user_colon_password() {
        let web = Some("127.0.0.1:0".parse().unwrap());
        let with = |web, auth: &str| {
            let cli = Overrides {
                web,
                web_auth: Some(auth.into()),
                ..Default::default()
            };
            RunConfig::resolve("x.lua".into(), &cli, &Overrides::default(), None, LiveMode::Off)
        };
        assert_eq!(with(web, "prom:pw").unwrap().web_auth.unwrap().user(), "prom");
        let e = format!("{:#}", with(None, "prom:pw").unwrap_err());
        assert!(e.contains("--web-auth") && e.contains("--web"), "{e}");
        for bad in ["prompw", "prom:"] {
            let e = format!("{:#}", with(web, bad).unwrap_err());
            assert!(e.contains("USER:PASS") && !e.contains("prompw"), "{e}");
        }
    }
}
