//! One virtual user: a loop that picks a weighted endpoint, runs the hooks the scenario has,
//! sends, and records the outcome in its worker's recorder. A user of a scenario without hooks
//! never touches Lua: it writes its endpoint's prepared request bytes and reads the answer.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mlua::Value;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::http;
use crate::runner::{Plan, Shared};
use crate::scenario::host::{self, LocalFuture, Reply, UserHost};
use crate::scenario::{HookError, UserState, api};
use crate::stats::{Correction, Outcome, Reason, Recorder};

/// What every user of one worker thread shares.
pub struct Worker {
    pub plan: Arc<Plan>,
    pub client: http::Client,
    pub recorder: RefCell<Recorder>,
    pub shared: Arc<Shared>,
    /// Open model: the users of this worker waiting for an iteration, first come first served.
    pub idle: RefCell<std::collections::VecDeque<tokio::sync::oneshot::Sender<std::time::Instant>>>,
}

impl Worker {
    /// Lists the call of user `id` into `hook` that the end of the run stopped, if `e` says so.
    fn stopped_at_the_end(&self, id: u64, hook: &str, e: &HookError) {
        if e.stopped {
            self.recorder
                .borrow_mut()
                .stuck(format!("user {id} in {hook}: {}", e.message));
        }
    }

    /// Open model: hands `count` iterations, the first scheduled at `first` and the next ones
    /// `every` apart, to free users; those no free user takes are dropped and counted.
    pub fn dispatch(&self, first: std::time::Instant, every: Duration, count: u64) {
        let mut idle = self.idle.borrow_mut();
        for i in 0..count {
            let at = first + every.saturating_mul(i.min(u32::MAX as u64) as u32);
            if !hand_out(&mut idle, at) {
                self.recorder.borrow_mut().dropped += count - i;
                return;
            }
        }
    }
}

/// Gives the iteration scheduled at `at` to the first free user; `false` if none was free.
pub fn hand_out(
    idle: &mut std::collections::VecDeque<tokio::sync::oneshot::Sender<std::time::Instant>>,
    at: std::time::Instant,
) -> bool {
    while let Some(user) = idle.pop_front() {
        // A user gone (the run is stopping) does not take it.
        if user.send(at).is_ok() {
            return true;
        }
    }
    false
}

/// Runs one user until the run stops. `prepared` is its Lua state, made before the test
/// started (made here if missing) when the scenario has hooks.
///
/// The state is boxed: every user's task holds it for the whole run, and inline it would take
/// its room twice in the task (the argument's slot and the local's) for ten thousand users.
pub async fn run(worker: Rc<Worker>, id: u64, prepared: Option<Result<Box<UserState>, String>>) {
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut session = http::Session::default();
    let plan = worker.plan.clone();
    let mut think = Think::new(&worker);
    if !plan.scenario.hooks.any() {
        worker.shared.user_started();
        while !worker.shared.stopping.load(Ordering::Relaxed) && worker.shared.keep(id) {
            if !think.begin(&worker).await {
                break;
            }
            let ep = &plan.endpoints[plan.pick(&mut rng)];
            let mut outcome = send(&worker, &mut session, ep.row, &ep.request, false).await.1;
            outcome.correction = think.correction();
            worker.recorder.borrow_mut().finish(ep.row, outcome);
            think.pause(&mut rng).await;
        }
        return;
    }

    let made = || UserState::new(&plan.scenario, worker.shared.global_id(id)).map(Box::new);
    let state = match prepared.unwrap_or_else(made) {
        Ok(state) => state,
        Err(msg) => {
            worker
                .recorder
                .borrow_mut()
                .error(&plan.hook_row("user state"), Reason::Script(msg));
            return;
        }
    };
    // `http`, `sleep` and `check` in the user's Lua reach the host through this.
    let host = LuaHost::attach(&worker, &state, session);
    if let Some(data) = worker.shared.setup_data.get()
        && let Err(e) = set_setup_data(&state, data)
    {
        worker
            .recorder
            .borrow_mut()
            .error(&plan.hook_row("setup"), Reason::Script(format!("user.setup: {e}")));
    }
    let session = &host.session;
    let user_id = worker.shared.global_id(id);
    // Whether the hook failed (a failure that waited on nothing lets the other users run).
    let hook = |name: &str, result: Result<(), HookError>| {
        let Err(e) = result else { return false };
        if !e.message.contains(host::STOPPING) {
            worker.stopped_at_the_end(user_id, name, &e);
            worker.recorder.borrow_mut().error(&plan.hook_row(name), e.reason(name));
        }
        true
    };
    if let Some(f) = &state.on_start {
        hook("on_start", state.run::<()>("on_start", f, state.user.clone()).await);
    }
    worker.shared.user_started();
    while !worker.shared.stopping.load(Ordering::Relaxed) && worker.shared.keep(id) {
        if !think.begin(&worker).await {
            break;
        }
        let sent = match &state.scenario {
            Some(f) => {
                // A scenario() that waits on nothing (or fails at once, every time) must still
                // let the worker's other tasks run: the run's stop among them.
                if hook("scenario", state.run::<()>("scenario", f, state.user.clone()).await) {
                    tokio::task::yield_now().await;
                } else {
                    tokio::task::consume_budget().await;
                }
                true
            }
            None => iteration(&worker, user_id, &state, session, &mut rng, think.correction()).await,
        };
        if !sent && think.wait.is_none() {
            // Nothing was sent (skipped, or a hook failed): let the other users run.
            tokio::task::yield_now().await;
        }
        think.pause(&mut rng).await;
    }
    if let Some(f) = &state.on_stop {
        // `on_stop` may still send (a logout), within the grace period.
        host.allow_after_stop();
        hook("on_stop", state.run::<()>("on_stop", f, state.user.clone()).await);
    }
}

/// `user.setup`: what `setup()` returned, a copy in this user's state.
fn set_setup_data(state: &UserState, data: &serde_json::Value) -> mlua::Result<()> {
    use mlua::LuaSerdeExt;
    let lua = &state.sandbox.lua;
    let options = mlua::serde::SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    state.user.raw_set("setup", lua.to_value_with(data, options)?)
}

/// Runs the scenario's `setup()` (if it has one) in a state of its own, before any user
/// starts: what it returns, as plain data, and the state, kept for `teardown`.
///
/// The value becomes JSON text first, held to the state's memory limit, and that text is
/// parsed: a value built of shared tables (one table held twice, a hundred levels deep) would
/// otherwise be copied out without end.
pub async fn setup(worker: &Rc<Worker>) -> Result<Option<(UserState, serde_json::Value)>, String> {
    if !worker.plan.scenario.hooks.setup && !worker.plan.scenario.hooks.teardown {
        return Ok(None);
    }
    let state = run_state(worker)?;
    let data = match state.setup.as_ref() {
        Some(f) => {
            let value = state
                .run::<Value>("setup", f, ())
                .await
                .map_err(|e| e.reason("setup").to_string())?;
            let text = api::json_text(&value, state.sandbox.budget.memory()).map_err(|e| match e {
                api::JsonError::TooLarge(e) => format!("what setup() returned: {e}"),
                api::JsonError::Invalid(e) => {
                    format!("setup() must return plain data (tables, strings, numbers, booleans): {e}")
                }
            })?;
            serde_json::from_slice(&text).map_err(|e| format!("what setup() returned: {e}"))?
        }
        None => serde_json::Value::Null,
    };
    Ok(Some((state, data)))
}

/// The state `setup` and `teardown` run in: user 0, apart from every user.
pub fn run_state(worker: &Rc<Worker>) -> Result<UserState, String> {
    let state = UserState::new(&worker.plan.scenario, 0)?;
    LuaHost::attach(worker, &state, http::Session::default());
    Ok(state)
}

/// Runs `teardown(data)` after the users stopped (it may still send).
pub async fn teardown(worker: &Rc<Worker>, state: &UserState, data: &serde_json::Value) {
    use mlua::LuaSerdeExt;
    let Some(f) = &state.teardown else { return };
    if let Some(host) = state.sandbox.lua.app_data_ref::<Rc<dyn UserHost>>() {
        host.allow_after_stop();
    }
    let arg = match state.sandbox.lua.to_value(data) {
        Ok(v) => v,
        Err(_) => Value::Nil,
    };
    if let Err(e) = state.run::<()>("teardown", f, arg).await {
        worker
            .recorder
            .borrow_mut()
            .error(&worker.plan.hook_row("teardown"), e.reason("teardown"));
    }
}

/// The host side of a user with Lua: its requests share the user's connections and count in
/// its worker's stats.
struct LuaHost {
    worker: Rc<Worker>,
    session: Rc<RefCell<http::Session>>,
    /// Set for `on_stop` and `teardown`, which may send after the run began stopping.
    after_stop: Cell<bool>,
}

impl LuaHost {
    /// Makes the host side of `state` and sets it as the state's app data.
    fn attach(worker: &Rc<Worker>, state: &UserState, session: http::Session) -> Rc<Self> {
        let host = Rc::new(LuaHost {
            worker: worker.clone(),
            session: Rc::new(RefCell::new(session)),
            after_stop: Cell::new(false),
        });
        state.sandbox.lua.set_app_data::<Rc<dyn UserHost>>(host.clone());
        host
    }
}

impl UserHost for LuaHost {
    fn allow_after_stop(&self) {
        self.after_stop.set(true);
    }

    fn request(&self, spec: api::RequestSpec) -> LocalFuture<Result<Reply, String>> {
        let worker = self.worker.clone();
        let session = self.session.clone();
        let refuse = worker.shared.stopping.load(Ordering::Relaxed) && !self.after_stop.get();
        Box::pin(async move {
            if refuse {
                return Err(host::STOPPING.to_string());
            }
            let prepared = http::Prepared::new(worker.plan.host.as_ref(), &spec).map_err(|e| format!("{e:#}"))?;
            let row = worker
                .recorder
                .borrow_mut()
                .row_by_name(spec.method.as_str(), &spec.name);
            // Taken out for the exchange (a RefCell borrow may not be held across an await).
            let mut s = session.take();
            let (resp, outcome) = send(&worker, &mut s, row, &prepared, true).await;
            session.replace(s);
            let reply = match resp {
                Some(r) => Reply {
                    status: r.status,
                    headers: r.headers,
                    body: r.body,
                    elapsed: r.elapsed,
                    error: None,
                },
                None => Reply {
                    status: 0,
                    headers: Default::default(),
                    body: Default::default(),
                    elapsed: outcome.elapsed.unwrap_or_default(),
                    error: outcome.failure.as_ref().map(|f| f.to_string()),
                },
            };
            worker.recorder.borrow_mut().finish(row, outcome);
            Ok(reply)
        })
    }

    fn sleep(&self, pause: Duration) -> LocalFuture<bool> {
        let mut stopped = self.worker.shared.stopped.subscribe();
        let cut_short = !self.after_stop.get();
        Box::pin(async move {
            tokio::select! {
                () = tokio::time::sleep(pause) => true,
                _ = stopped.wait_for(|s| *s && cut_short) => false,
            }
        })
    }

    fn check(&self, name: &str, passed: bool) {
        self.worker.recorder.borrow_mut().check(name, passed);
    }
}

/// A user's think time between iterations (`wait_time`), cut short when the run stops.
struct Think {
    wait: Option<api::Wait>,
    started: std::time::Instant,
    stopped: tokio::sync::watch::Receiver<bool>,
    /// The user's recent average time from one iteration's start to the next (an
    /// exponentially weighted mean), for the coordinated-omission correction.
    every: Option<Duration>,
    /// Open model: iterations come from the schedule, not from the user's own loop.
    open: bool,
    /// Open model: how long after its scheduled time the current iteration began.
    late: Duration,
}

impl Think {
    fn new(worker: &Worker) -> Self {
        Self {
            wait: worker.plan.scenario.wait,
            started: std::time::Instant::now(),
            stopped: worker.shared.stopped.subscribe(),
            every: None,
            open: worker.shared.open,
            late: Duration::ZERO,
        }
    }

    /// Waits for the next iteration: at once in the closed model; in the open model, until the
    /// schedule hands this user one. `false`: the run stopped meanwhile.
    async fn begin(&mut self, worker: &Worker) -> bool {
        if !self.open {
            return true;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        worker.idle.borrow_mut().push_back(tx);
        tokio::select! {
            at = rx => match at {
                Ok(at) => {
                    self.late = at.elapsed();
                    true
                }
                Err(_) => false,
            },
            _ = self.stopped.wait_for(|s| *s) => false,
        }
    }

    /// Waits as `wait_time` says after the iteration that began at the last call.
    async fn pause(&mut self, rng: &mut SmallRng) {
        if self.open {
            return;
        }
        if let Some(wait) = self.wait {
            let pause = wait.pause(self.started.elapsed(), rng.random::<f64>());
            if !pause.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = self.stopped.wait_for(|s| *s) => {}
                }
            }
        }
        let now = std::time::Instant::now();
        let cycle = now - self.started;
        self.every = Some(match self.every {
            None => cycle,
            // In integers: float conversions cost more than the rest of this.
            Some(every) => every * 9 / 10 + cycle / 10,
        });
        self.started = now;
    }

    /// How this user's request latencies are corrected: the user meant to send one every
    /// pacing interval if it has one, else every (recent average) iteration.
    fn correction(&self) -> Correction {
        if self.open {
            return Correction::Queued(self.late);
        }
        match (self.wait, self.every) {
            (Some(api::Wait::Pacing(every)), _) => Correction::Interval(Duration::from_secs_f64(every)),
            (_, Some(every)) => Correction::Interval(every),
            _ => Correction::None,
        }
    }
}

/// Sends `req`, counting it in flight under `row`, and turns the result into an outcome.
async fn send(
    worker: &Worker,
    session: &mut http::Session,
    row: usize,
    req: &http::Prepared,
    keep_body: bool,
) -> (Option<http::Response>, Outcome) {
    worker.recorder.borrow_mut().begin(row);
    let sent = worker.client.send(session, req, keep_body).await;
    match sent {
        Ok(resp) => {
            worker.recorder.borrow_mut().response(row, resp.h2, resp.bytes);
            let failure = (resp.status >= 400).then_some(Reason::Status(resp.status));
            let outcome = Outcome {
                elapsed: Some(resp.elapsed),
                failure,
                correction: Correction::None,
            };
            (Some(resp), outcome)
        }
        Err((elapsed, reason)) => (
            None,
            Outcome {
                elapsed: Some(elapsed),
                failure: Some(reason),
                correction: Correction::None,
            },
        ),
    }
}

/// One iteration of a user whose scenario has hooks. Returns whether a request was sent.
async fn iteration(
    worker: &Worker,
    user_id: u64,
    state: &UserState,
    session: &RefCell<http::Session>,
    rng: &mut SmallRng,
    correction: Correction,
) -> bool {
    let plan = &worker.plan;
    let index = plan.pick(rng);
    let ep = &plan.endpoints[index];
    let script_failure = |row: usize, reason: Reason| {
        worker.recorder.borrow_mut().record(
            row,
            Outcome {
                elapsed: None,
                failure: Some(reason),
                correction: Correction::None,
            },
        );
    };
    {
        let mut req = state.req.0.borrow_mut();
        req.base = index;
        req.edits.clear();
    }

    let mut row = ep.row;
    // Boxed: held while the request is out, inline it would grow every user's task by its size.
    let mut edited: Option<Box<http::Prepared>> = None;
    if let Some(f) = &state.before_request {
        match state
            .run::<Value>("before_request", f, (&state.user, &state.req_ud))
            .await
        {
            Ok(Value::Boolean(false)) => return false,
            Ok(_) => {}
            // The run is stopping: nothing is sent, nothing counted.
            Err(e) if e.message.contains(host::STOPPING) => return false,
            Err(e) => {
                worker.stopped_at_the_end(user_id, "before_request", &e);
                script_failure(row, e.reason("before_request"));
                return false;
            }
        }
        let req = state.req.0.borrow();
        let edits = &req.edits;
        if edits.method.is_some() || edits.name.is_some() {
            let method = edits.method.as_ref().unwrap_or(&ep.spec.method);
            let name = edits.name.as_ref().unwrap_or(&ep.spec.name);
            row = worker.recorder.borrow_mut().row_by_name(method.as_str(), name);
        }
        if !edits.changes_wire() {
            // Sent from the endpoint's own bytes.
        } else if let Some(added) = edits.only_added_headers(&ep.spec) {
            // The common edit (a token header): the endpoint's bytes with lines added.
            edited = Some(Box::new(ep.request.with_headers_added(added)));
        } else {
            let spec = edits.apply(&ep.spec);
            if edits.target.is_none() && edits.query.is_none() {
                edited = Some(Box::new(ep.request.with_spec(spec)));
            } else {
                match http::Prepared::new(plan.host.as_ref(), &spec) {
                    Ok(p) => edited = Some(Box::new(p)),
                    Err(e) => {
                        drop(req);
                        script_failure(row, Reason::Script(format!("before_request: req: {e:#}")));
                        return false;
                    }
                }
            }
        }
    }
    let req = edited.as_deref().unwrap_or(&ep.request);

    let keep_body = state.after_response.is_some();
    let mut s = session.take();
    let (resp, mut outcome) = send(worker, &mut s, row, req, keep_body).await;
    outcome.correction = correction;
    session.replace(s);
    if let (Some(f), Some(resp)) = (&state.after_response, resp) {
        let fits = {
            let mut res = state.res.0.borrow_mut();
            res.set(resp.status, resp.headers, resp.body, resp.elapsed);
            // The body is the hook's to read: it counts as the state's memory meanwhile.
            res.charge_body(&state.sandbox.budget)
        };
        let verdict = if fits {
            state
                .run::<(Value, Option<String>)>("after_response", f, (&state.user, &state.req_ud, &state.res_ud))
                .await
        } else {
            let len = state.res.0.borrow().body.len();
            Err(HookError {
                limit: true,
                stopped: false,
                message: format!(
                    "memory limit of {} MiB reached (--script-memory): the response body of {len} bytes does not fit",
                    state.sandbox.limits.memory >> 20
                ),
            })
        };
        // Ten thousand idle users should not each hold their last response.
        *state.res.0.borrow_mut() = api::ResState::default();
        match verdict {
            Ok((Value::Boolean(false), why)) => {
                outcome.failure = Some(Reason::Rejected(
                    why.unwrap_or_else(|| "rejected by after_response".into()),
                ))
            }
            Ok((Value::Boolean(true), _)) => outcome.failure = None,
            Ok(_) => {}
            // The run is stopping: the response stands as it came.
            Err(e) if e.message.contains(host::STOPPING) => {}
            Err(e) => {
                worker.stopped_at_the_end(user_id, "after_response", &e);
                outcome.failure = Some(e.reason("after_response"));
            }
        }
    }
    worker.recorder.borrow_mut().finish(row, outcome);
    true
}
