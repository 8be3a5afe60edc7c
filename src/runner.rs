//! The runner: worker threads, the spawn schedule, the duration, the reporting tick and the
//! two-stage stop.
//!
//! Layout (chosen by the benchmark): one OS thread per core, each a current-thread tokio
//! runtime with a `LocalSet`. Users are spread round-robin over the workers and never move, so
//! a user's Lua state (mlua without `send`) stays on its thread, and a worker's recorder needs
//! no lock. The control side (this module's [`run`]) talks to workers only through channels:
//! it sends `Spawn`, asks for a `Flush` on every tick, and `Finish` at the end. It never waits
//! for a worker without a deadline: a worker busy in a script hands its counts over late, and
//! at the end the run's stop level stops every script, so that `-t`, Ctrl-C and Stop end the
//! run within the grace period and a second whatever the scripts do.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rand::RngExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use url::Url;

use crate::config::{LiveMode, RunConfig};
use crate::scenario::api::RequestSpec;
use crate::scenario::sandbox::{self, Activity, STOP_ALL, STOP_USERS};
use crate::scenario::{Scenario, UserState};
use crate::segment::Split;
use crate::stats::{Aggregate, ConfigSummary, Recorder, RowId, Snapshot, Summary, SummaryMeta};
use crate::{http, report, user};

/// How often workers hand their counts over and the live table is redrawn.
pub const TICK: Duration = Duration::from_secs(1);

/// State shared by the control side and every worker.
pub struct Shared {
    /// Set when the run ends: users finish their current iteration and stop.
    pub stopping: AtomicBool,
    /// Users whose state is ready and whose `on_start` has run.
    pub started: AtomicU64,
    /// How long after the start the last user was ready (for "did the spawn keep up").
    pub all_started_after: OnceLock<Duration>,
    users: u64,
    /// The start of the test, after the users' Lua states were prepared.
    t0: OnceLock<std::time::Instant>,
    /// Set by a second interrupt: cut the grace period short.
    hurry: tokio::sync::watch::Sender<bool>,
    /// Set with `stopping`, for users asleep in their think time to wake at once.
    pub stopped: tokio::sync::watch::Sender<bool>,
    /// What `setup()` returned: every user gets a copy as `user.setup`.
    pub setup_data: OnceLock<serde_json::Value>,
    /// Each user's lifecycle (index: user id), for stages that add and retire users.
    lives: Vec<std::sync::atomic::AtomicU8>,
    /// Open model (`--rate`): users take iterations from the schedule.
    pub open: bool,
    /// `--segment`: this process's share of the test.
    pub segment: Option<crate::segment::Segment>,
    /// The stop level every script call checks (see `sandbox::STOP_USERS`): raised when the
    /// grace period is over, so that no script holds a worker past the run's end.
    pub scripts_stop: Arc<AtomicU8>,
}

/// A user's lifecycle (see `Shared::lives`).
const NEW: u8 = 0;
const RUNNING: u8 = 1;
const RETIRING: u8 = 2;
const EXITED: u8 = 3;

impl Shared {
    /// Whether user `id` goes on with another iteration: not once stages retired it.
    /// Users running now (started, not retired).
    pub fn running(&self) -> u64 {
        self.lives
            .iter()
            .filter(|l| l.load(Ordering::Relaxed) == RUNNING)
            .count() as u64
    }

    pub fn keep(&self, id: u64) -> bool {
        let Some(life) = self.lives.get(id as usize) else {
            return true;
        };
        life.load(Ordering::Relaxed) != RETIRING
            // Reactivated in the meantime: it goes on.
            || life.compare_exchange(RETIRING, EXITED, Ordering::AcqRel, Ordering::Acquire).is_err()
    }

    /// Marks user `id` running; whether it must be spawned (it is new, or has exited).
    fn activate(&self, id: u64) -> bool {
        match self.lives.get(id as usize) {
            Some(life) => matches!(life.swap(RUNNING, Ordering::AcqRel), NEW | EXITED),
            None => true,
        }
    }

    fn retire(&self, id: u64) {
        if let Some(life) = self.lives.get(id as usize) {
            let _ = life.compare_exchange(RUNNING, RETIRING, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn new(cfg: &RunConfig) -> Arc<Self> {
        Arc::new(Shared {
            stopping: AtomicBool::new(false),
            started: AtomicU64::new(0),
            all_started_after: OnceLock::new(),
            users: cfg.users as u64,
            t0: OnceLock::new(),
            hurry: tokio::sync::watch::channel(false).0,
            stopped: tokio::sync::watch::channel(false).0,
            setup_data: OnceLock::new(),
            lives: (0..=cfg.users as usize)
                .map(|_| std::sync::atomic::AtomicU8::new(NEW))
                .collect(),
            open: cfg.open(),
            segment: cfg.segment,
            scripts_stop: Arc::new(AtomicU8::new(0)),
        })
    }

    /// The id the scenario sees for this process's user `id` (both from 1): unique across
    /// the segments of a test.
    pub fn global_id(&self, id: u64) -> u64 {
        self.segment.global(id - 1) + 1
    }

    /// Called by each user once it is ready to send.
    pub fn user_started(&self) {
        if self.started.fetch_add(1, Ordering::Relaxed) + 1 == self.users
            && let Some(t0) = self.t0.get()
        {
            let _ = self.all_started_after.set(t0.elapsed());
        }
    }
}

/// An endpoint bound to the host: its request is built once, here.
pub struct Endpoint {
    pub spec: RequestSpec,
    pub request: http::Prepared,
    /// Its row in every worker's recorder (rows are registered in this order).
    pub row: usize,
}

/// What all workers share, read-only: the scenario, the bound endpoints, the weights.
pub struct Plan {
    pub scenario: Arc<Scenario>,
    pub host: Option<Url>,
    pub endpoints: Vec<Endpoint>,
    pub rows: Vec<Arc<RowId>>,
    /// Cumulative weights: endpoint i is picked when a draw in 0..total falls below cum[i].
    cumulative: Vec<u64>,
}

impl Plan {
    /// Binds every endpoint to the host. Errors here are bad input (a path without a host).
    pub fn new(scenario: Arc<Scenario>, host: Option<Url>) -> Result<Self> {
        let mut rows: Vec<Arc<RowId>> = Vec::new();
        let mut endpoints = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0u64;
        for (i, spec) in scenario.endpoints.iter().enumerate() {
            let request = http::Prepared::new(host.as_ref(), spec)
                .with_context(|| format!("{}: endpoints[{}]", scenario.path.display(), i + 1))?;
            let id = RowId::new(spec.method.as_str(), spec.name.clone());
            let row = match rows.iter().position(|r| **r == id) {
                Some(row) => row,
                None => {
                    rows.push(Arc::new(id));
                    rows.len() - 1
                }
            };
            total += spec.weight as u64;
            cumulative.push(total);
            endpoints.push(Endpoint {
                spec: spec.clone(),
                request,
                row,
            });
        }
        Ok(Self {
            scenario,
            host,
            endpoints,
            rows,
            cumulative,
        })
    }

    /// A weighted random endpoint index.
    pub fn pick(&self, rng: &mut impl RngExt) -> usize {
        if self.cumulative.len() == 1 {
            return 0;
        }
        let total = *self.cumulative.last().expect("a scenario has at least one endpoint");
        let draw = rng.random_range(0..total);
        self.cumulative.partition_point(|&c| c <= draw)
    }

    /// The row under which a hook's errors outside any request are listed.
    pub fn hook_row(&self, hook: &str) -> Arc<RowId> {
        Arc::new(RowId::new("HOOK", hook))
    }
}

enum Cmd {
    /// Create the Lua states of these users now, before the test starts (as k6 initializes
    /// its VUs first): spawning is then only starting their loops, and keeps up with any
    /// spawn rate. Replies when done.
    Prepare(Vec<u64>, oneshot::Sender<()>),
    Spawn(u64),
    /// Open model: `count` iterations for free users of this worker, the first scheduled at
    /// `first` and the next ones `every` apart; those no free user takes are dropped.
    Iterate {
        first: std::time::Instant,
        every: Duration,
        count: u64,
    },
    Flush(oneshot::Sender<Snapshot>),
    /// Run the scenario's `setup()` (the first worker, before any user starts); reply with
    /// its data.
    Setup(oneshot::Sender<Result<Option<serde_json::Value>, String>>),
    /// Wait for the users to finish (their `on_stop` included) until the deadline; reply when
    /// they have, or when the deadline or a second interrupt came.
    Drain(Instant, oneshot::Sender<()>),
    /// Run `teardown` (the worker that ran `setup`), once every worker has drained.
    Teardown(Duration, oneshot::Sender<()>),
    /// `stormlight teardown`: take this as what `setup()` returned, for `Teardown`.
    Adopt(serde_json::Value, oneshot::Sender<Result<(), String>>),
    /// Count what is still in flight as aborted, reply with the last counts and end the thread.
    Finish(oneshot::Sender<Snapshot>),
}

/// The result of a run.
pub struct RunResult {
    pub summary: Summary,
    pub interrupted: bool,
    /// `setup()` failed (why): no user was started; the summary holds what it sent.
    pub setup_failed: Option<String>,
    /// A threshold with `abort_on_fail` failed during the run and stopped it.
    pub aborted_by: Option<String>,
}

/// How long after its deadline a worker may take to answer at the end of a run before the run
/// ends without it (what it recorded since its last answer is then missing, and said so);
/// the last answers (the final counts) come by [`LAST_ANSWER`] after it: the run's end is
/// never more than a second past its grace period.
const ANSWER: Duration = Duration::from_millis(700);
const LAST_ANSWER: Duration = Duration::from_millis(900);

/// How long a tick waits for the workers' counts; a worker busy in a script for longer hands
/// its counts over at a later tick.
const FLUSH_WAIT: Duration = Duration::from_millis(50);

/// Runs the load test until the duration ends or `shutdown` resolves (then `interrupted`).
/// `plan` comes from [`Plan::new`] with the same host as `cfg`.
pub async fn run(cfg: &RunConfig, plan: Arc<Plan>, shutdown: impl Future<Output = ()>) -> Result<RunResult> {
    run_with(cfg, plan, shutdown, std::future::pending(), None).await
}

/// [`run`], where `hurry` resolving (a second Ctrl-C) during the final grace period ends it at
/// once: what is still in flight counts as aborted, and the summary is made as usual; and
/// the numbers are published to `board` (`--web`) each tick and at the end.
pub async fn run_with(
    cfg: &RunConfig,
    plan: Arc<Plan>,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
    board: Option<&crate::web::Board>,
) -> Result<RunResult> {
    let shared = Shared::new(cfg);
    let began = Instant::now();
    let mut workers = Workers::start(cfg, &plan, &shared, cfg.workers)?;

    // Sticky: once the stop has come (during setup(), say), every later wait sees it at once
    // rather than polling a finished future.
    let shutdown = Sticky::new(shutdown);
    tokio::pin!(shutdown);
    let mut setup_failed = None;
    let mut aborted_by = None;
    // Stopped while setup() still ran: it gets the grace period to end, as users would.
    let mut setup_cut = false;
    let (tx, rx) = oneshot::channel();
    if let Some(data) = &cfg.setup_data {
        // From `stormlight setup`: setup() ran once for every segment.
        let _ = shared.setup_data.set(data.clone());
    } else if workers.send(0, Cmd::Setup(tx)) {
        let ran = tokio::select! {
            () = &mut shutdown => {
                setup_cut = true;
                Ok(None)
            }
            ran = rx => ran.unwrap_or(Ok(None)),
        };
        match ran {
            Ok(Some(data)) => {
                let _ = shared.setup_data.set(data);
            }
            Ok(None) => {}
            Err(e) => setup_failed = Some(e),
        }
    }
    let preparing = std::time::Instant::now();
    let interrupted_early = setup_failed.is_none()
        && tokio::select! {
            () = &mut shutdown => {
                // Nothing was sent yet: the states being made are not waited for.
                shared.scripts_stop.fetch_max(STOP_USERS, Ordering::Relaxed);
                true
            }
            () = workers.prepare(cfg.users as u64) => false,
        };
    if plan.scenario.hooks.any() && preparing.elapsed() > Duration::from_millis(500) {
        say!(
            "prepared {} user states in {:.1}s",
            cfg.users,
            preparing.elapsed().as_secs_f64()
        );
    }

    // The open model's pool is up and waiting before the schedule starts: an iteration due at
    // the start must find its users ready.
    let mut spawned: u64 = 0;
    let interrupted_early = interrupted_early
        || (cfg.open() && setup_failed.is_none() && {
            set_users(&workers, &shared, &mut spawned, cfg.users as u64);
            let ready_by = Instant::now() + Duration::from_secs(30);
            let ready = async {
                while shared.started.load(Ordering::Relaxed) < cfg.users as u64 && Instant::now() < ready_by {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            tokio::select! {
                () = &mut shutdown => true,
                () = ready => false,
            }
        });
    // --start-at: every segment starts at the same instant, its users ready.
    let interrupted_early = interrupted_early
        || match cfg.start_at.map(|at| at.duration_since(SystemTime::now())) {
            Some(Ok(wait)) if setup_failed.is_none() => {
                say!(
                    "waiting until {} to start (--start-at, in {:.1}s)",
                    humantime::format_rfc3339_seconds(cfg.start_at.unwrap_or(SystemTime::now())),
                    wait.as_secs_f64()
                );
                tokio::select! {
                    () = &mut shutdown => true,
                    () = tokio::time::sleep(wait) => false,
                }
            }
            Some(Err(late)) if late.duration() > Duration::from_secs(1) => {
                say!(
                    "warning: --start-at passed {:.1}s ago while the users were prepared: this segment starts late, and `report` will refuse to merge it with the others",
                    late.duration().as_secs_f64()
                );
                false
            }
            _ => false,
        };
    let started_at = SystemTime::now();
    let start = Instant::now();
    let _ = shared.t0.set(start.into_std());
    if shared.started.load(Ordering::Relaxed) >= cfg.users as u64 {
        // The open model's pool was up before the start.
        let _ = shared.all_started_after.set(Duration::ZERO);
    }
    let deadline = cfg.duration.map(|d| start + d);
    let mut agg = Aggregate::with_rows(&plan.rows);
    let mut live = report::Live::new(cfg.live == LiveMode::Auto);
    let mut ticker = tokio::time::interval_at(start + TICK, TICK);
    // The live dashboard's view: the counts so far, each tick.
    let publish = |agg: &Aggregate, phase: crate::web::Phase, summary: Option<&crate::stats::Summary>| {
        let Some(board) = board else { return };
        let elapsed = start.elapsed();
        // Once over, nothing runs: the numbers "now" are zero and the counters final.
        let over = summary.is_some();
        let (rps_now, fails_now) = if over { (0.0, 0.0) } else { agg.last_tick_rates() };
        let status = crate::web::Status {
            phase,
            elapsed: summary.map_or(elapsed, |s| Duration::from_secs_f64(s.duration_s)),
            duration: cfg.duration,
            users: if over { 0 } else { shared.running() },
            rps_now,
            fails_now,
        };
        match summary {
            Some(s) => board.publish(s, agg, &status),
            None => {
                let light = agg.summary_light(SummaryMeta {
                    started_at,
                    duration: elapsed,
                    interrupted: false,
                    all_users_started: shared.all_started_after.get().copied(),
                    config: config_summary(cfg),
                    segment: cfg.segment,
                    fingerprint: String::new(),
                });
                board.publish(&light, agg, &status);
            }
        }
    };
    publish(&agg, crate::web::Phase::Running, None);

    // When user number `n` (0-based) is due (the open model's pool: all at once); with
    // stages, when to look at the ramp again.
    // (A segment's user `n` is user `segment.global(n)` of the whole test, due when that one
    // would be.)
    let due = |n: u64| match cfg.open() {
        true => start,
        false => start + Duration::from_secs_f64(cfg.segment.global(n) as f64 / cfg.spawn_rate),
    };
    let mut ramp_step = 0u32;
    // Open model: iteration `k` is scheduled at start + k / rate; a segment fires its own
    // iterations of that one schedule.
    let schedule = Schedule::new(cfg, start);
    let mut scheduled: u64 = cfg.segment.first();
    let stopped_before_start = setup_failed.is_some() || interrupted_early;
    let interrupted = setup_failed.is_none()
        && (interrupted_early
            || loop {
                let next_spawn = match &cfg.stages {
                    Some(_) => Some(start + RAMP_STEP * ramp_step),
                    None => (spawned < cfg.users as u64).then(|| due(spawned)),
                };
                tokio::select! {
                    biased;
                    () = &mut shutdown => break true,
                    () = sleep_until_opt(deadline) => break false,
                    _ = ticker.tick() => {
                        workers.flush(&mut agg, Instant::now() + FLUSH_WAIT).await;
                        agg.end_tick(start.elapsed(), shared.running());
                        live.draw(&agg, start.elapsed(), spawned, cfg);
                        publish(&agg, crate::web::Phase::Running, None);
                        let elapsed = start.elapsed();
                        if let Some(t) = cfg
                            .thresholds
                            .iter()
                            .find(|t| t.abort_on_fail && elapsed >= t.delay && !t.judge(&agg, elapsed).ok)
                        {
                            aborted_by = Some(t.text.clone());
                            break false;
                        }
                    }
                    () = sleep_until_opt(schedule.at(scheduled)) => {
                        // Every iteration that is due (a late timer tick may cover many), in
                        // one message per worker, each iteration with its own scheduled time.
                        scheduled = schedule.dispatch(&workers, scheduled, cfg.segment);
                    }
                    () = sleep_until_opt(next_spawn) => {
                        let want = match &cfg.stages {
                            Some(stages) => {
                                ramp_step += 1;
                                cfg.segment.share(crate::stages::users_at(stages, start.elapsed()))
                            }
                            // Everyone who is due: at high rates several users fall in one timer tick.
                            None => {
                                let (now, mut want) = (Instant::now(), spawned);
                                while want < cfg.users as u64 && due(want) <= now {
                                    want += 1;
                                }
                                want
                            }
                        };
                        set_users(&workers, &shared, &mut spawned, want);
                    }
                }
            });
    // A run stopped before its start (in setup(), while preparing) measures what it did then.
    let measured = match stopped_before_start {
        true => began.elapsed(),
        false => start.elapsed(),
    };

    // Stop: no new iterations; in-flight requests get `grace` to finish, then count as aborted.
    shared.stopping.store(true, Ordering::Relaxed);
    shared.stopped.send_replace(true);
    publish(&agg, crate::web::Phase::Stopping, None);
    let stuck = workers.finish(&shared, cfg.grace, setup_cut, hurry, &mut agg).await;
    for what in &stuck {
        say!("warning: {what}");
    }
    live.clear();
    // The last, partial tick (and what the grace period finished) closes the series.
    agg.end_tick(measured, shared.running());

    let mut summary = agg.summary(SummaryMeta {
        started_at,
        duration: measured,
        interrupted,
        all_users_started: shared.all_started_after.get().copied(),
        config: config_summary(cfg),
        segment: cfg.segment,
        fingerprint: plan.scenario.fingerprint.clone(),
    });
    summary.thresholds = cfg.thresholds.iter().map(|t| t.judge(&agg, measured)).collect();
    summary.aborted_by = aborted_by.clone();
    summary.stuck.extend(stuck);
    let phase = match interrupted || aborted_by.is_some() {
        true => crate::web::Phase::Stopped,
        false => crate::web::Phase::Finished,
    };
    publish(&agg, phase, Some(&summary));
    Ok(RunResult {
        summary,
        interrupted,
        setup_failed,
        aborted_by,
    })
}

/// A future that, once it has completed, is ready again every time it is polled.
struct Sticky<F> {
    inner: Option<std::pin::Pin<Box<F>>>,
}

impl<F: Future<Output = ()>> Sticky<F> {
    fn new(inner: F) -> Self {
        Self {
            inner: Some(Box::pin(inner)),
        }
    }
}

impl<F: Future<Output = ()>> Future for Sticky<F> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(());
        };
        match inner.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.inner = None;
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// The control side's view of the worker threads: their command channels, what their scripts
/// are doing, and the counts they were asked for and have not handed over yet. Every wait for
/// an answer has a deadline: a worker busy in a script (or stuck in one) never holds up the
/// run.
struct Workers {
    tx: Vec<mpsc::UnboundedSender<Cmd>>,
    activity: Vec<Arc<Activity>>,
    /// A flush asked for at an earlier tick and not answered yet, per worker.
    pending: Vec<Option<oneshot::Receiver<Snapshot>>>,
}

impl Workers {
    /// Starts `n` worker threads.
    fn start(cfg: &RunConfig, plan: &Arc<Plan>, shared: &Arc<Shared>, n: usize) -> Result<Self> {
        let mut workers = Workers {
            tx: Vec::with_capacity(n),
            activity: Vec::with_capacity(n),
            pending: Vec::with_capacity(n),
        };
        let names = crate::stats::NameCap::new(cfg.max_names);
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut client = http::Client::with_limits(cfg.timeout, cfg.http, Some(cfg.tls.clone()));
            client.protocol = cfg.protocol;
            let activity = Arc::new(Activity::default());
            let (plan, shared, names, seen) = (plan.clone(), shared.clone(), names.clone(), activity.clone());
            std::thread::Builder::new()
                .name(format!("stormlight-worker-{i}"))
                .spawn(move || worker_thread(plan, client, shared, names, seen, rx))
                .context("cannot start a worker thread")?;
            workers.tx.push(tx);
            workers.activity.push(activity);
            workers.pending.push(None);
        }
        Ok(workers)
    }

    fn len(&self) -> usize {
        self.tx.len()
    }

    /// Sends `cmd` to worker `w`; `false` if the worker is gone.
    fn send(&self, w: usize, cmd: Cmd) -> bool {
        self.tx[w].send(cmd).is_ok()
    }

    /// Sends every worker the command `make` builds around a reply channel, and waits for the
    /// replies until `until`: `None` for a worker that did not answer in time (or is gone).
    async fn ask_all<T>(
        &self,
        until: Option<Instant>,
        mut make: impl FnMut(usize, oneshot::Sender<T>) -> Cmd,
    ) -> Vec<Option<T>> {
        let asked: Vec<_> = (0..self.len())
            .map(|w| {
                let (tx, rx) = oneshot::channel();
                self.send(w, make(w, tx)).then_some(rx)
            })
            .collect();
        let mut replies = Vec::with_capacity(asked.len());
        for rx in asked {
            replies.push(match (rx, until) {
                (Some(rx), Some(until)) => tokio::time::timeout_at(until, rx).await.ok().and_then(Result::ok),
                (Some(rx), None) => rx.await.ok(),
                (None, _) => None,
            });
        }
        replies
    }

    /// Has every worker create its users' Lua states; user `u` lives on worker (u - 1) % workers.
    async fn prepare(&self, users: u64) {
        let n = self.len();
        self.ask_all(None, |w, reply| {
            Cmd::Prepare((w as u64 + 1..=users).step_by(n).collect(), reply)
        })
        .await;
    }

    /// Asks every worker for its counts since it last handed them over and merges those that
    /// come by `until`; a worker that is busy hands its counts over at a later call.
    async fn flush(&mut self, agg: &mut Aggregate, until: Instant) {
        for w in 0..self.len() {
            if self.pending[w].is_none() {
                let (tx, rx) = oneshot::channel();
                if self.send(w, Cmd::Flush(tx)) {
                    self.pending[w] = Some(rx);
                }
            }
        }
        for pending in &mut self.pending {
            let Some(rx) = pending else { continue };
            match tokio::time::timeout_at(until, &mut *rx).await {
                Ok(Ok(snap)) => {
                    agg.add(snap);
                    *pending = None;
                }
                Ok(Err(_)) => *pending = None,
                Err(_) => {}
            }
        }
    }

    /// Ends every worker: users finish until the grace period is over (then their scripts are
    /// stopped), `teardown` runs (for as long again), and what is still in flight counts as
    /// aborted; the last counts are merged into `agg`. `hurry` resolving (a second Ctrl-C)
    /// stops everything at once. Returns what the workers that never answered were doing:
    /// the run ends without their last counts, at most [`LAST_ANSWER`] after its deadline.
    async fn finish(
        &mut self,
        shared: &Shared,
        grace: Duration,
        setup_cut: bool,
        hurry: impl Future<Output = ()>,
        agg: &mut Aggregate,
    ) -> Vec<String> {
        let stop = &shared.scripts_stop;
        let hurried = std::cell::Cell::new(false);
        let mut hurry = Sticky::new(async {
            hurry.await;
            hurried.set(true);
            // The workers stop waiting and still hand over their counts.
            shared.hurry.send_replace(true);
            stop.fetch_max(STOP_ALL, Ordering::Relaxed);
        });
        // The users (and a setup() that was still running) have the grace period.
        let users_until = Instant::now() + grace;
        let level = if setup_cut { STOP_ALL } else { STOP_USERS };
        let mut answered = vec![true; self.len()];
        {
            let drained = self.ask_all(Some(users_until + ANSWER), |_, tx| Cmd::Drain(users_until, tx));
            tokio::select! {
                replies = drained => {
                    for (w, r) in replies.iter().enumerate() {
                        answered[w] = r.is_some();
                    }
                }
                () = stop_scripts_at(stop, users_until, level, &mut hurry) => {}
            }
        }
        stop.fetch_max(STOP_USERS, Ordering::Relaxed);
        // Every user has stopped (or its grace is over): `teardown` sees what they left.
        let mut last = users_until;
        if answered[0] && !hurried.get() {
            let until = Instant::now() + grace;
            last = until;
            let (tx, rx) = oneshot::channel();
            if self.send(0, Cmd::Teardown(grace, tx)) {
                tokio::select! {
                    done = tokio::time::timeout_at(until + ANSWER, rx) => answered[0] = done.is_ok(),
                    () = stop_scripts_at(stop, until, STOP_ALL, &mut hurry) => {}
                }
            }
        }
        // Nothing of the scripts runs from here on.
        stop.fetch_max(STOP_ALL, Ordering::Relaxed);
        let until = (last + LAST_ANSWER).max(Instant::now() + Duration::from_millis(50));
        let pending: Vec<_> = self.pending.iter_mut().map(Option::take).collect();
        let finals = self.ask_all(Some(until), |_, tx| Cmd::Finish(tx)).await;
        let mut stuck = Vec::new();
        for (w, (flushed, last)) in pending.into_iter().zip(finals).enumerate() {
            // A flush asked for earlier was answered before the final counts, if at all.
            if let Some(rx) = flushed
                && let Ok(Ok(snap)) = tokio::time::timeout_at(until, rx).await
            {
                agg.add(snap);
            }
            if let Some(snap) = last {
                agg.add(snap);
                continue;
            }
            let what = match self.activity[w].describe() {
                Some(what) => format!(
                    "worker {w} did not stop: {what}; the run ended without its counts since it last handed them over"
                ),
                None => format!(
                    "worker {w} did not answer at the end of the run; the run ended without its counts since it last handed them over"
                ),
            };
            // Counted as a script error too, under the hook it was in: a run that lost counts
            // does not look clean to a gate on `script_errors`.
            let hook = self.activity[w].hook().unwrap_or("a hook");
            agg.add(Snapshot {
                failures: vec![(
                    Arc::new(RowId::new("HOOK", hook)),
                    crate::stats::Reason::ScriptLimit(format!("{hook}: {what}")),
                    1,
                )],
                errors: 1,
                ..Default::default()
            });
            stuck.push(what);
        }
        stuck
    }
}

/// Waits until `at` (or the hurry), then raises the scripts' stop level to `level`; then
/// waits forever (it is raced against the answers it cuts short).
async fn stop_scripts_at(stop: &AtomicU8, at: Instant, level: u8, hurry: &mut (impl Future<Output = ()> + Unpin)) {
    tokio::select! {
        () = tokio::time::sleep_until(at) => {}
        () = hurry => {}
    }
    stop.fetch_max(level, Ordering::Relaxed);
    std::future::pending::<()>().await
}

/// The open model's schedule: when iteration `k` of the whole test is due, and how many are
/// due by a given time.
struct Schedule {
    start: Instant,
    /// The run's end: no iteration is due from then on.
    end: Option<Instant>,
    rate: Option<f64>,
    stages: Option<Vec<crate::stages::RateStage>>,
}

impl Schedule {
    fn new(cfg: &RunConfig, start: Instant) -> Self {
        Self {
            start,
            end: cfg.duration.map(|d| start + d),
            rate: cfg.rate,
            stages: cfg.rate_stages.clone(),
        }
    }

    /// When iteration `k` (0-based) is due; `None` past the last one (or without a schedule).
    fn at(&self, k: u64) -> Option<Instant> {
        match (&self.stages, self.rate) {
            (Some(stages), _) => crate::stages::iteration_time(stages, 0.0, k).map(|d| self.start + d),
            (None, Some(r)) => Some(iteration_time(self.start, r, k)),
            (None, None) => None,
        }
    }

    /// How many iterations (0, 1, ...) are due at `now`.
    fn due(&self, now: Instant) -> u64 {
        let t = now.saturating_duration_since(self.start);
        match (&self.stages, self.rate) {
            (Some(stages), _) => crate::stages::iterations_due(stages, 0.0, t),
            (None, Some(r)) => (t.as_secs_f64() * r).floor() as u64 + 1,
            (None, None) => 0,
        }
    }

    /// Hands the iterations due now, from `next` on (this segment's: every `step`-th), to the
    /// workers in turn, one message per worker; returns the next one to schedule.
    fn dispatch(&self, workers: &Workers, next: u64, segment: Option<crate::segment::Segment>) -> u64 {
        // (Just before the end at most: the end may have come since the wake.)
        let now = match self.end {
            Some(end) => Instant::now().min(end - Duration::from_nanos(1)),
            None => Instant::now(),
        };
        let step = segment.step();
        let due = self.due(now);
        if next >= due {
            return next;
        }
        let n = workers.len() as u64;
        // This process's iterations from `next` (its `nth` ones) go round-robin to the workers.
        let (first_nth, count) = (next / step, (due - next).div_ceil(step));
        let first_at = self.at(next).unwrap_or(now).min(now);
        let last_at = self.at(next + (count - 1) * step).unwrap_or(now).min(now);
        // The instants in between, evenly spread (exact for a constant rate).
        let gap = match count {
            0 | 1 => Duration::ZERO,
            _ => (last_at - first_at).div_f64((count - 1) as f64),
        };
        for i in 0..n.min(count) {
            let w = ((first_nth + i) % n) as usize;
            let mine = (count - i).div_ceil(n);
            let _ = workers.send(
                w,
                Cmd::Iterate {
                    first: (first_at + gap * i as u32).into_std(),
                    every: gap * n as u32,
                    count: mine,
                },
            );
        }
        next + count * step
    }
}

/// What `stormlight setup` or `stormlight teardown` runs, alone.
pub enum Alone {
    Setup,
    /// `teardown(data)`, with what `setup` returned.
    Teardown(serde_json::Value),
}

/// Runs the scenario's `setup()` or `teardown(data)` alone, in a worker of its own: what
/// setup returned (or why it failed), and a summary of the requests it sent.
pub async fn run_alone(
    cfg: &RunConfig,
    plan: Arc<Plan>,
    job: Alone,
) -> Result<(Result<Option<serde_json::Value>, String>, Summary)> {
    let shared = Shared::new(cfg);
    let workers = Workers::start(cfg, &plan, &shared, 1)?;
    let started_at = SystemTime::now();
    let start = Instant::now();
    let gone = || anyhow::anyhow!("the worker thread ended early");
    let setup = matches!(job, Alone::Setup);
    let ran = match job {
        Alone::Setup => {
            let (tx, rx) = oneshot::channel();
            workers.send(0, Cmd::Setup(tx)).then_some(()).ok_or_else(gone)?;
            rx.await.map_err(|_| gone())?
        }
        Alone::Teardown(data) => {
            let (tx, rx) = oneshot::channel();
            workers.send(0, Cmd::Adopt(data, tx)).then_some(()).ok_or_else(gone)?;
            match rx.await.map_err(|_| gone())? {
                Ok(()) => {
                    let (tx, rx) = oneshot::channel();
                    let limit = cfg.timeout;
                    workers
                        .send(0, Cmd::Teardown(limit, tx))
                        .then_some(())
                        .ok_or_else(gone)?;
                    let _ = rx.await;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        }
    };
    let mut agg = Aggregate::with_rows(&plan.rows);
    let (tx, rx) = oneshot::channel();
    if workers.send(0, Cmd::Finish(tx))
        && let Ok(snap) = rx.await
    {
        agg.add(snap);
    }
    agg.end_tick(start.elapsed(), 0);
    let mut summary = agg.summary(SummaryMeta {
        started_at,
        duration: start.elapsed(),
        interrupted: false,
        all_users_started: None,
        config: config_summary(cfg),
        segment: None,
        fingerprint: plan.scenario.fingerprint.clone(),
    });
    summary.config.users = 0;
    summary.config.load = format!("{} alone", if setup { "setup()" } else { "teardown()" });
    Ok((ran, summary))
}

/// The run's configuration as the summary records it.
fn config_summary(cfg: &RunConfig) -> ConfigSummary {
    ConfigSummary {
        host: cfg.shown_host(),
        users: cfg.users,
        // A segment's users start at its share of the rate (the shares add up to it).
        spawn_rate: cfg.spawn_rate / cfg.segment.step() as f64,
        script: cfg.script.display().to_string(),
        load: crate::config::describe_load(cfg),
        duration_s: cfg.duration.map(|d| d.as_secs_f64()),
        start_at_ms: cfg
            .start_at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64),
    }
}

/// When the open model's iteration `k` (0-based) is due: `k / rate` after the start. One due
/// past what a duration or the clock can hold (a rate near 0, which the configuration refuses)
/// is due twice the longest run after the start: never, for the run.
pub fn iteration_time(start: Instant, rate: f64, k: u64) -> Instant {
    let never = crate::config::MAX_DURATION * 2;
    let after = Duration::try_from_secs_f64(k as f64 / rate).map_or(never, |d| d.min(never));
    start
        .checked_add(after)
        .or_else(|| start.checked_add(crate::config::MAX_DURATION))
        .unwrap_or(start)
}

/// How often stages are looked at to add or retire users.
const RAMP_STEP: Duration = Duration::from_millis(50);

/// Brings the running users to ids `1..=want`: new ones are spawned (or, if still finishing
/// after being retired, kept), the highest ones above `want` are retired (they finish their
/// current iteration, then stop).
fn set_users(workers: &Workers, shared: &Shared, active: &mut u64, want: u64) {
    while *active < want {
        *active += 1;
        let id = *active;
        if shared.activate(id) {
            workers.send(((id - 1) % workers.len() as u64) as usize, Cmd::Spawn(id));
        }
    }
    while *active > want {
        shared.retire(*active);
        *active -= 1;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn worker_thread(
    plan: Arc<Plan>,
    client: http::Client,
    shared: Arc<Shared>,
    names: Arc<crate::stats::NameCap>,
    activity: Arc<Activity>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
) {
    // Every Lua state made on this thread stops at the run's stop level and says what it runs.
    sandbox::attach_worker(shared.scripts_stop.clone(), activity);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say!("error: cannot start a worker runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let recorder = std::cell::RefCell::new(Recorder::with_cap(&plan.rows, names));
        let worker = Rc::new(user::Worker {
            plan,
            client,
            recorder,
            shared,
            idle: Default::default(),
        });
        let mut users = tokio::task::JoinSet::new();
        let mut prepared = std::collections::HashMap::new();
        let mut setup = None;
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Cmd::Prepare(ids, reply) => {
                    if worker.plan.scenario.hooks.any() {
                        prepared.reserve(ids.len());
                        for id in ids {
                            if worker.shared.scripts_stop.load(Ordering::Relaxed) >= STOP_USERS {
                                // Interrupted before the start: the others are not made.
                                break;
                            }
                            let global = worker.shared.global_id(id);
                            prepared.insert(id, UserState::new(&worker.plan.scenario, global).map(Box::new));
                        }
                    }
                    let _ = reply.send(());
                }
                Cmd::Spawn(id) => {
                    users.spawn_local(user::run(worker.clone(), id, prepared.remove(&id)));
                    if prepared.is_empty() && prepared.capacity() > 0 {
                        // Every prepared state has gone to its user: the table's room goes too.
                        prepared = std::collections::HashMap::new();
                    }
                }
                Cmd::Iterate { first, every, count } => worker.dispatch(first, every, count),
                Cmd::Flush(reply) => {
                    let _ = reply.send(worker.recorder.borrow_mut().take());
                }
                Cmd::Setup(reply) => {
                    let ran = user::setup(&worker).await.map(|ran| {
                        ran.map(|(state, data)| {
                            let copy = data.clone();
                            setup = Some((state, data));
                            copy
                        })
                    });
                    if let Err(why) = &ran
                        && worker.shared.stopping.load(Ordering::Relaxed)
                    {
                        // The run was stopped while setup() ran: no one waits for this answer.
                        worker.recorder.borrow_mut().stuck(format!("in setup: stopped by the end of the run: {why}"));
                    }
                    let _ = reply.send(ran);
                }
                Cmd::Adopt(data, reply) => {
                    let made = user::run_state(&worker).map(|state| setup = Some((state, data)));
                    let _ = reply.send(made);
                }
                Cmd::Drain(deadline, reply) => {
                    let mut hurry = worker.shared.hurry.subscribe();
                    let drain = tokio::time::timeout_at(deadline, async { while users.join_next().await.is_some() {} });
                    tokio::select! {
                        _ = drain => {}
                        _ = hurry.wait_for(|h| *h) => {}
                    }
                    let _ = reply.send(());
                }
                Cmd::Teardown(grace, reply) => {
                    // Also after Ctrl-C; a second one cuts it short.
                    let mut hurry = worker.shared.hurry.subscribe();
                    if let Some((state, data)) = &setup
                        && !*hurry.borrow()
                    {
                        let teardown = tokio::time::timeout(grace, user::teardown(&worker, state, data));
                        tokio::select! {
                            ran = teardown => if ran.is_err() {
                                // Its time (the grace period again) is over: the call is cut
                                // (and listed as such when the worker finishes).
                                let why = format!(
                                    "teardown: stopped: still running after {} (its time, the grace period, is over)",
                                    crate::config::format_duration(grace)
                                );
                                worker.recorder.borrow_mut().error(&worker.plan.hook_row("teardown"), crate::stats::Reason::ScriptLimit(why));
                            },
                            _ = hurry.wait_for(|h| *h) => {}
                        }
                    }
                    let _ = reply.send(());
                }
                Cmd::Finish(reply) => {
                    // Every user is cancelled and gone (their calls still waiting say so) before
                    // the last counts are taken: no user can record after.
                    users.shutdown().await;
                    let mut rec = worker.recorder.borrow_mut();
                    for call in sandbox::abandoned_calls() {
                        rec.stuck(call);
                    }
                    rec.abort_inflight();
                    let _ = reply.send(rec.take());
                    break;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that never answers (its channel is never read: a thread stuck where no limit
    /// reaches) does not hold the end of the run: it ends the grace period and a second after
    /// the stop, names what the worker was running, and has every script stop.
    #[tokio::test]
    async fn a_worker_that_never_answers_is_named_and_the_run_ends_without_it() {
        let none = crate::config::Overrides::default();
        let cfg = RunConfig::resolve("t.lua".into(), &none, &none, None, LiveMode::Off).unwrap();
        let shared = Shared::new(&cfg);
        let (tx, rx) = mpsc::unbounded_channel();
        let activity = Arc::new(Activity::default());
        activity.begin(5, "scenario");
        let mut workers = Workers {
            tx: vec![tx],
            activity: vec![activity],
            pending: vec![None],
        };
        let grace = Duration::from_millis(300);
        let started = Instant::now();
        let mut agg = Aggregate::default();
        let stuck = workers
            .finish(&shared, grace, false, std::future::pending(), &mut agg)
            .await;
        let took = started.elapsed();
        assert!(took >= grace && took < grace + Duration::from_secs(1), "{took:?}");
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert!(
            stuck[0].starts_with("worker 0 did not stop: user 5 in scenario;"),
            "{}",
            stuck[0]
        );
        assert_eq!(shared.scripts_stop.load(Ordering::Relaxed), STOP_ALL);
        // It counts as a script error of its hook: a gate on script errors sees it.
        let failures = agg.failures();
        assert_eq!((failures.len(), failures[0].count), (1, 1), "{failures:?}");
        assert_eq!(
            (failures[0].method.as_str(), failures[0].name.as_str()),
            ("HOOK", "scenario")
        );
        assert!(
            failures[0]
                .reason
                .starts_with("script limit: scenario: worker 0 did not stop")
        );
        drop(rx);
    }

    /// The open model's schedule under virtual time: a rate of 10/s for 950 ms schedules
    /// iterations at 0, 100, .., 900 ms; with the pool blocked every one is dropped, with three
    /// users free three are taken.
    #[tokio::test(start_paused = true)]
    async fn the_schedule_drops_what_no_free_user_takes() {
        for free in [0usize, 3] {
            let start = Instant::now();
            let end = start + Duration::from_millis(950);
            let mut idle = std::collections::VecDeque::new();
            let mut waiting = Vec::new();
            for _ in 0..free {
                let (tx, rx) = oneshot::channel();
                idle.push_back(tx);
                waiting.push(rx);
            }
            let (mut k, mut dropped, mut taken) = (0u64, 0u64, 0u64);
            loop {
                let at = iteration_time(start, 10.0, k);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                if user::hand_out(&mut idle, at.into_std()) {
                    taken += 1;
                } else {
                    dropped += 1;
                }
                k += 1;
            }
            assert_eq!(k, 10, "iterations at 0, 100, .., 900 ms");
            assert_eq!((taken, dropped), (free as u64, 10 - free as u64));
            for rx in waiting {
                assert!(rx.await.is_ok(), "each free user got an iteration");
            }
        }
    }

    /// An iteration due past what the clock holds (a rate near 0) is due far off, never
    /// before: no overflow of the instant, no duration out of range.
    #[test]
    fn iteration_times_of_absurd_rates_are_far_off_not_a_panic() {
        let start = Instant::now();
        for rate in [1e-19, 1e-20, 1e-300, 0.0, f64::MIN_POSITIVE] {
            for k in [1, 1000, u64::MAX] {
                let at = iteration_time(start, rate, k);
                assert!(at >= start + crate::config::MAX_DURATION, "rate {rate}, k {k}");
            }
        }
        assert_eq!(iteration_time(start, 10.0, 5), start + Duration::from_millis(500));
        assert_eq!(iteration_time(start, 1e-19, 0), start);
    }
}
