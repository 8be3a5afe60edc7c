//! stormlight: a scripted HTTP load tester. Scenarios are Lua files; each virtual user runs in
//! its own sandboxed Lua state; latencies go into HdrHistograms merged for the live view.
//!
//! # Layout
//! - [`console`]: stderr without waiting (the program's lines and the scripts').
//! - [`cli`]: the command line (clap); raw flags stop there.
//! - [`config`]: [`config::RunConfig`], built once from flags > scenario `options` > defaults.
//! - [`scenario`]: loading and validating the Lua file ([`scenario::load`]), the sandbox, and
//!   the API scripts see (`Task`, `req`, `res`).
//! - [`http`]: requests built once at load time, the shared client, failure classes.
//! - [`user`]: the virtual-user loop (hooks only where the scenario defines them).
//! - [`runner`]: worker threads, spawn rate, duration, ticks, two-stage stop.
//! - [`stats`]: per-worker recorders, the merged aggregate, the summary schema.
//! - [`report`]: live table, final tables, JSON file.
//! - [`files`]: reading inputs and writing outputs safely (regular files only, size caps,
//!   devices and FIFOs written in place).
//! - [`target`]: the built-in HTTP target used by `demo`, by hand and by the tests.
//! - [`segment`]: `--segment I/N`, `--start-at`, and the checks `report` makes of a set of
//!   segment files (one test on several machines).
//! - [`web`]: `--web`, the live dashboard, its Stop button and `/metrics`.
//! - [`machine`]: the memory and open files this machine allows a run.
//!
//! This crate never exits the process: commands return an [`Exit`] or an error, and `main`
//! chooses the exit code.

#[macro_use]
pub mod console;
pub mod cli;
pub mod config;
pub mod csv_out;
pub mod files;
pub mod html;
pub mod http;
pub mod machine;
pub mod merge;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod segment;
pub mod stages;
pub mod stats;
pub mod target;
pub mod threshold;
pub mod user;
pub mod web;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};

use config::{LiveMode, Overrides, RunConfig};

/// How a command ended, when it did not fail with bad input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Finished (exit 0).
    Success,
    /// Stopped by Ctrl-C or SIGTERM after writing everything (exit 130).
    Interrupted,
    /// Finished or stopped, the summary printed, but an output file could not be written
    /// (exit 3).
    OutputFailed,
    /// `setup()` failed: no user was started; the summary and outputs hold what it sent
    /// (exit 4).
    SetupFailed,
    /// A threshold did not hold (exit 1).
    ThresholdFailed,
}

/// The scenario bundled with `demo` (also `scripts/stormlight_file.lua`).
pub const DEMO_SCENARIO: &str = include_str!("../scripts/stormlight_file.lua");

/// What `run` and `demo` need besides the scenario.
pub struct RunRequest {
    pub script: PathBuf,
    pub flags: Overrides,
    pub out: Option<PathBuf>,
    pub live: LiveMode,
}

/// Loads a scenario, resolves the configuration and checks outputs: everything that can be bad
/// input, before any traffic.
pub fn prepare(req: &RunRequest, source: Option<&str>) -> Result<(RunConfig, runner::Plan)> {
    // Loading the file is a call into the script too: the flag's time limit holds for it.
    let limits = scenario::sandbox::Limits {
        time: req
            .flags
            .script_timeout
            .unwrap_or(scenario::sandbox::DEFAULT_SCRIPT_TIMEOUT),
        memory: match req.flags.script_memory {
            Some(bytes) => {
                config::check_script_memory(bytes)?;
                bytes as usize
            }
            None => scenario::sandbox::DEFAULT_SCRIPT_MEMORY,
        },
        ..Default::default()
    };
    let mut scenario = match source {
        Some(src) => scenario::load_source(&req.script, src, limits)?,
        None => scenario::load_with(&req.script, limits)?,
    };
    for warning in &scenario.warnings {
        say!("warning: {warning}");
    }
    let mut cfg = RunConfig::resolve(
        req.script.clone(),
        &req.flags,
        &scenario.options,
        req.out.clone(),
        req.live,
    )?;
    if let Some(path) = &req.flags.setup_data {
        cfg.setup_data = Some(segment::read_setup_data(path, &scenario.fingerprint)?);
    }
    if let Some(out) = &cfg.out {
        files::check_writable(out, "--out")?;
    }
    if let Some(prefix) = &cfg.csv {
        for path in csv_out::paths(prefix) {
            files::check_writable(&path, "--csv")?;
        }
    }
    if let Some(html) = &cfg.html {
        files::check_writable(html, "--html")?;
    }
    scenario.limits.time = cfg.script_timeout;
    scenario.limits.memory = cfg.script_memory as usize;
    check_machine(&cfg, &scenario)?;
    // Binding the endpoints to the host is the last check that can fail on bad input.
    let plan = runner::Plan::new(Arc::new(scenario), cfg.host.clone())?;
    Ok((cfg, plan))
}

/// What a user costs beside its Lua state: its task, its session, a connection's buffers and
/// the kernel's socket.
const USER_OVERHEAD: u64 = 8 << 10;

/// Refuses users that cannot fit in this machine's memory (a hooked user's cost measured on
/// one user's Lua state, made here) or open files (one connection each); caps the memory of
/// all users' states together at the share of the machine's available memory.
fn check_machine(cfg: &RunConfig, scenario: &scenario::Scenario) -> Result<()> {
    let users = cfg.users as u64;
    machine::check_open_files(users, machine::raise_open_files())?;
    let available = machine::available_memory();
    let (per_user, measured) = if scenario.hooks.any() {
        let state = scenario::UserState::new(scenario, 1)
            .map_err(|e| anyhow::anyhow!("{}: a user's state cannot be made: {e}", scenario.path.display()))?;
        (
            state.sandbox.used() as u64 + USER_OVERHEAD,
            "measured on one user's Lua state",
        )
    } else {
        (USER_OVERHEAD, "without hooks")
    };
    machine::check_memory(users, per_user, available, measured)?;
    if let Some(available) = available {
        scenario::sandbox::set_total_limit(machine::users_share(available) as usize);
    }
    Ok(())
}

/// Interrupts (Ctrl-C, SIGTERM) counted as they arrive: the first stops the run, the second
/// cuts its grace period short; with `--linger`, one after the run ends the process. `main`
/// feeds it from the signals; tests and embedders from their own sender.
#[derive(Clone)]
pub struct Signals(tokio::sync::watch::Receiver<u32>);

impl Signals {
    pub fn new(count: tokio::sync::watch::Receiver<u32>) -> Self {
        Self(count)
    }

    /// Interrupts that never come.
    pub fn none() -> Self {
        Self(tokio::sync::watch::channel(0).1)
    }

    /// How many have arrived.
    pub fn count(&self) -> u32 {
        *self.0.borrow()
    }

    /// Resolves once `n` interrupts in all have arrived (never, if no more can come).
    pub async fn nth(&self, n: u32) {
        let mut rx = self.0.clone();
        if rx.wait_for(|count| *count >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// `stormlight run` (and `demo`): runs, prints the summary to stdout, writes the outputs.
pub async fn run(cfg: RunConfig, plan: runner::Plan, signals: Signals) -> Result<Exit> {
    // The dashboard's address is checked (bound) before anything else happens.
    let web = match cfg.web {
        Some(addr) => {
            let board = web::Board::new();
            let bound = web::serve(addr, board.clone(), cfg.web_auth.clone()).await?;
            Some((board, bound))
        }
        None => None,
    };
    let board = web.as_ref().map(|(b, _)| b.as_ref());
    let host = cfg.shown_host().unwrap_or_else(|| "(urls in scenario)".into());
    let duration = cfg
        .duration
        .map(config::format_duration)
        .unwrap_or_else(|| "until Ctrl-C".into());
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut load = config::describe_load(&cfg);
    if let Some(seg) = cfg.segment {
        load.push_str(&format!("; segment {seg}: {}", plural(cfg.users as usize, "user")));
    }
    say!(
        "stormlight {}: {load} for {duration} against {host} ({}; {})",
        env!("CARGO_PKG_VERSION"),
        cfg.script.display(),
        plural(cfg.workers, "worker thread"),
    );
    if cfg.tls_options.insecure {
        say!("--insecure: TLS certificates are NOT verified");
    }
    if cfg.host.is_none() && plan.scenario.waits {
        say!(
            "warning: no host (--host, or `host` in the scenario): http calls given a path rather than a full URL will fail"
        );
    }
    if let Some((_, bound)) = &web {
        say!("dashboard: http://{bound}/ (Prometheus metrics: http://{bound}/metrics)");
        if let Some(warning) = exposed_dashboard(*bound, cfg.web_auth.as_ref()) {
            say!("{warning}");
        }
    }
    // How many interrupts had come when the run was stopped: the next one hurries (the second
    // after a Ctrl-C, the first after the Stop button or the end of the duration).
    let stopped_at = std::cell::Cell::new(None::<u32>);
    let shutdown = async {
        tokio::select! {
            () = signals.nth(1) => {
                stopped_at.set(Some(1));
                say!("\ninterrupted (Ctrl-C or SIGTERM): stopping users, finishing requests in flight (another Ctrl-C or SIGTERM skips that)...");
            }
            () = web::Board::stop_requested(board) => {
                stopped_at.set(Some(signals.count()));
                say!(
                    "\nStop pressed on the dashboard: stopping users, finishing requests in flight (Ctrl-C to skip)..."
                );
            }
        }
    };
    let hurry = async {
        // First polled once the run has ended (the duration's end: the count then).
        let seen = stopped_at.get().unwrap_or_else(|| signals.count());
        signals.nth(seen + 1).await;
        say!("\ninterrupted again: counting what is in flight as aborted, writing the summary now");
    };
    let result = runner::run_with(&cfg, Arc::new(plan), shutdown, hurry, board).await?;
    // Written off the runtime's thread: an output that takes its time (a FIFO read slowly, a
    // stdout no one reads) leaves Ctrl-C working (a third ends the process).
    let (out_cfg, out_board) = (cfg.clone(), web.as_ref().map(|(b, _)| b.clone()));
    let exit = tokio::task::spawn_blocking(move || write_outputs(&out_cfg, &result, out_board.as_deref()))
        .await
        .unwrap_or(Exit::OutputFailed);
    if let Some((_, bound)) = &web {
        if cfg.linger {
            say!("--linger: the dashboard stays up at http://{bound}/ until Ctrl-C");
            let seen = signals.count();
            signals.nth(seen + 1).await;
        } else {
            // A moment for open pages to receive the last event.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    Ok(exit)
}

/// The warning for a dashboard served beyond loopback: who can reach it, and how it is (or can
/// be) protected. `None` on loopback.
fn exposed_dashboard(bound: SocketAddr, auth: Option<&web::WebAuth>) -> Option<String> {
    if bound.ip().to_canonical().is_loopback() {
        return None;
    }
    let who = match bound.ip().is_unspecified() {
        true => format!("this machine on port {}", bound.port()),
        false => bound.to_string(),
    };
    let at = format!("warning: the dashboard at http://{bound}/ listens beyond loopback");
    Some(match auth {
        Some(a) => format!(
            "{at} ({who}); it is protected by --web-auth: only user {:?} with its password can read the numbers and press Stop (HTTP Basic sends the password in clear: use a trusted network or a tunnel)",
            a.user()
        ),
        None => format!(
            "{at}: anyone who can reach {who} can read the numbers and press Stop. Protect it with --web-auth USER:PASS (or STORMLIGHT_WEB_AUTH=USER:PASS), or serve it on 127.0.0.1 and reach it through an SSH tunnel"
        ),
    })
}

/// Prints the summary, writes every requested output, and says how the run ended.
fn write_outputs(cfg: &RunConfig, result: &runner::RunResult, board: Option<&web::Board>) -> Exit {
    let mut written = Vec::new();
    let exit = write_files(cfg, result, &mut written);
    if let Some(board) = board {
        let note = match exit {
            Exit::OutputFailed => "an output could not be written: see the terminal".to_string(),
            _ if written.is_empty() => "the summary is on the terminal (no --out, --csv or --html)".to_string(),
            _ => format!("written: {}", written.join(", ")),
        };
        board.add_note(&note);
    }
    exit
}

/// How long the summary may wait for stdout to take it.
const STDOUT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn write_files(cfg: &RunConfig, result: &runner::RunResult, written: &mut Vec<String>) -> Exit {
    console::flush(std::time::Duration::from_secs(1));
    let mut text = Vec::new();
    let _ = report::write_summary(&mut text, &result.summary);
    // Every output is tried, whichever fails.
    let mut failed = false;
    if let Err(e) = console::stdout(String::from_utf8_lossy(&text).into_owned(), STDOUT_WAIT) {
        say!("error: cannot write the summary to stdout: {e}");
        failed = true;
    }
    let mut write = |what: String, done: String, wrote: Result<()>| match wrote {
        Ok(()) => {
            say!("{done}");
            written.push(what);
        }
        Err(e) => {
            say!("error: {e:#}");
            failed = true;
        }
    };
    if let Some(out) = &cfg.out {
        write(
            out.display().to_string(),
            format!("summary written to {}", out.display()),
            report::write_json(out, &result.summary),
        );
    }
    if let Some(prefix) = &cfg.csv {
        write(
            format!("{}_*.csv", prefix.display()),
            format!("CSV written to {}_*.csv", prefix.display()),
            csv_out::write(prefix, &result.summary),
        );
    }
    if let Some(path) = &cfg.html {
        write(
            path.display().to_string(),
            format!("HTML report written to {}", path.display()),
            report::write_file(path, html::render(&result.summary).as_bytes()),
        );
    }
    if failed {
        return Exit::OutputFailed;
    }
    if let Some(why) = &result.setup_failed {
        say!("error: setup() failed, so no user was started: {why}");
        return Exit::SetupFailed;
    }
    if let Some(t) = &result.aborted_by {
        say!("the run was stopped early: threshold {t:?} failed (abort_on_fail)");
    }
    let failed = result.aborted_by.is_some() || result.summary.thresholds.iter().any(|v| !v.ok);
    if result.interrupted {
        // Cut short by hand: its thresholds were judged on part of a run (they are in the
        // summary), and the exit code says it was interrupted.
        Exit::Interrupted
    } else if failed && cfg.segment.is_some() {
        say!(
            "note: thresholds failed on this segment's own numbers; the test's verdict is `stormlight report` on all its segments"
        );
        Exit::Success
    } else if failed {
        Exit::ThresholdFailed
    } else {
        Exit::Success
    }
}

/// What `setup` and `teardown` start from: the scenario (which must define `what`) and its
/// configuration, checked as a run's are.
fn prepare_alone(
    script: PathBuf,
    flags: Overrides,
    what: &str,
    defines: impl Fn(&scenario::Hooks) -> bool,
) -> Result<(RunRequest, RunConfig, runner::Plan)> {
    let req = RunRequest {
        script,
        flags,
        out: None,
        live: LiveMode::Off,
    };
    let (cfg, plan) = prepare(&req, None)?;
    if !defines(&plan.scenario.hooks) {
        bail!("{} defines no {what}: there is nothing to run", req.script.display());
    }
    Ok((req, cfg, plan))
}

/// The summary of `setup` or `teardown` run alone, when they sent something or failed.
fn print_if_it_sent(summary: &stats::Summary) {
    if summary.total.requests > 0 || !summary.failures.is_empty() {
        let _ = report::write_summary(&mut std::io::stdout().lock(), summary);
    }
}

/// `stormlight setup`: runs the scenario's `setup()` alone and writes what it returned to
/// `out`, for `run --setup-data` (setup once for every segment of a test).
pub async fn setup(script: PathBuf, flags: Overrides, out: PathBuf) -> Result<Exit> {
    let (req, cfg, plan) = prepare_alone(script, flags, "setup()", |h| h.setup)?;
    files::check_writable(&out, "--out")?;
    let fingerprint = plan.scenario.fingerprint.clone();
    let (ran, summary) = runner::run_alone(&cfg, Arc::new(plan), runner::Alone::Setup).await?;
    print_if_it_sent(&summary);
    match ran {
        Ok(data) => {
            let file = segment::SetupFile {
                setup_data: data.unwrap_or_default(),
                script: req.script.display().to_string(),
                scenario_fingerprint: fingerprint,
            };
            let json = serde_json::to_vec_pretty(&file)?;
            if let Err(e) = report::write_file(&out, &json) {
                say!("error: {e:#}");
                return Ok(Exit::OutputFailed);
            }
            say!(
                "setup() data written to {} (give it to run --setup-data)",
                out.display()
            );
            Ok(Exit::Success)
        }
        Err(why) => {
            say!("error: setup() failed: {why}");
            Ok(Exit::SetupFailed)
        }
    }
}

/// `stormlight teardown`: runs the scenario's `teardown(data)` alone, with the data that
/// `stormlight setup` wrote.
pub async fn teardown(script: PathBuf, flags: Overrides) -> Result<Exit> {
    let (_, cfg, plan) = prepare_alone(script, flags, "teardown()", |h| h.teardown)?;
    let data = cfg.setup_data.clone().unwrap_or_default();
    let (ran, summary) = runner::run_alone(&cfg, Arc::new(plan), runner::Alone::Teardown(data)).await?;
    print_if_it_sent(&summary);
    if let Err(why) = ran {
        say!("error: teardown() could not run: {why}");
        return Ok(Exit::SetupFailed);
    }
    if summary.script_errors > 0 {
        say!("error: teardown() failed (see the failures above)");
        return Ok(Exit::SetupFailed);
    }
    say!("teardown() done");
    Ok(Exit::Success)
}

/// `stormlight check`: what the scenario defines.
pub fn check(path: &Path) -> Result<String> {
    Ok(scenario::load(path)?.describe())
}

/// `stormlight demo`: the built-in target on an ephemeral loopback port, and the bundled
/// scenario against it (10 users, spawn rate 5, 10 s unless flags say otherwise).
pub async fn demo(mut flags: Overrides, out: Option<PathBuf>, live: LiveMode, signals: Signals) -> Result<Exit> {
    let target = target::Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    say!("built-in target listening on {}", target.url());
    flags.host = Some(target.url());
    flags.users = flags.users.or(Some(10));
    flags.spawn_rate = flags.spawn_rate.or(Some(5.0));
    flags.duration = flags.duration.or(Some(std::time::Duration::from_secs(10)));
    let req = RunRequest {
        script: PathBuf::from("scripts/stormlight_file.lua"),
        flags,
        out,
        live,
    };
    let (cfg, plan) = prepare(&req, Some(DEMO_SCENARIO))?;
    let exit = run(cfg, plan, signals).await?;
    say!("the target received {} requests", target.counts.requests());
    Ok(exit)
}
