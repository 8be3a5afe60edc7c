//! One virtual user: a loop that picks a weighted endpoint, runs the hooks the scenario has,
//! sends, and records the outcome in its worker's recorder. A user of a scenario without hooks
//! never touches Lua: it writes its endpoint's prepared request bytes and reads the answer.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mlua::Value;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::http;
use crate::runner::{Plan, Shared};
use crate::scenario::UserState;
use crate::scenario::api;
use crate::stats::{Outcome, Reason, Recorder};

/// What every user of one worker thread shares.
pub struct Worker {
    pub plan: Arc<Plan>,
    pub client: http::Client,
    pub recorder: RefCell<Recorder>,
    pub shared: Arc<Shared>,
}

/// Runs one user until the run stops. `prepared` is its Lua state, made before the test
/// started (made here if missing) when the scenario has hooks.
pub async fn run(worker: Rc<Worker>, id: u64, prepared: Option<Result<UserState, String>>) {
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut session = http::Session::default();
    let plan = worker.plan.clone();
    let mut think = Think::new(&worker);
    if !plan.scenario.hooks.any() {
        worker.shared.user_started();
        while !worker.shared.stopping.load(Ordering::Relaxed) {
            let ep = &plan.endpoints[plan.pick(&mut rng)];
            let outcome = send(&worker, &mut session, ep.row, &ep.request, false).await.1;
            worker.recorder.borrow_mut().finish(ep.row, outcome);
            think.pause(&mut rng).await;
        }
        return;
    }

    let state = match prepared.unwrap_or_else(|| UserState::new(&plan.scenario, id)) {
        Ok(state) => state,
        Err(msg) => {
            worker
                .recorder
                .borrow_mut()
                .error(&plan.hook_row("user state"), Reason::Script(msg));
            return;
        }
    };
    if let Some(f) = &state.on_start
        && let Err(e) = state.call::<()>(f, state.user.clone())
    {
        worker
            .recorder
            .borrow_mut()
            .error(&plan.hook_row("on_start"), e.reason("on_start"));
    }
    worker.shared.user_started();
    while !worker.shared.stopping.load(Ordering::Relaxed) {
        if !iteration(&worker, &state, &mut session, &mut rng).await && think.wait.is_none() {
            // Nothing was sent (skipped, or a hook failed): let the other users run.
            tokio::task::yield_now().await;
        }
        think.pause(&mut rng).await;
    }
    if let Some(f) = &state.on_stop
        && let Err(e) = state.call::<()>(f, state.user.clone())
    {
        worker
            .recorder
            .borrow_mut()
            .error(&plan.hook_row("on_stop"), e.reason("on_stop"));
    }
}

/// A user's think time between iterations (`wait_time`), cut short when the run stops.
struct Think {
    wait: Option<api::Wait>,
    started: std::time::Instant,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Think {
    fn new(worker: &Worker) -> Self {
        Self {
            wait: worker.plan.scenario.wait,
            started: std::time::Instant::now(),
            stopped: worker.shared.stopped.subscribe(),
        }
    }

    /// Waits as `wait_time` says after the iteration that began at the last call.
    async fn pause(&mut self, rng: &mut SmallRng) {
        let Some(wait) = self.wait else { return };
        let pause = wait.pause(self.started.elapsed(), rng.random::<f64>());
        if !pause.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = self.stopped.wait_for(|s| *s) => {}
            }
        }
        self.started = std::time::Instant::now();
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
    if session.resent > 0 {
        worker.recorder.borrow_mut().resent += u64::from(std::mem::take(&mut session.resent));
    }
    match sent {
        Ok(resp) => {
            worker.recorder.borrow_mut().response(row, resp.h2, resp.bytes);
            let failure = (resp.status >= 400).then_some(Reason::Status(resp.status));
            let outcome = Outcome {
                elapsed: Some(resp.elapsed),
                failure,
            };
            (Some(resp), outcome)
        }
        Err((elapsed, reason)) => (
            None,
            Outcome {
                elapsed: Some(elapsed),
                failure: Some(reason),
            },
        ),
    }
}

/// One iteration of a user whose scenario has hooks. Returns whether a request was sent.
async fn iteration(worker: &Worker, state: &UserState, session: &mut http::Session, rng: &mut SmallRng) -> bool {
    let plan = &worker.plan;
    let index = plan.pick(rng);
    let ep = &plan.endpoints[index];
    let script_failure = |row: usize, reason: Reason| {
        worker.recorder.borrow_mut().record(
            row,
            Outcome {
                elapsed: None,
                failure: Some(reason),
            },
        );
    };
    {
        let mut req = state.req.0.borrow_mut();
        req.base = index;
        req.edits = api::ReqEdits::default();
    }

    let mut row = ep.row;
    let mut edited = None;
    if let Some(f) = &state.before_request {
        match state.call::<Value>(f, (&state.user, &state.req_ud)) {
            Ok(Value::Boolean(false)) => return false,
            Ok(_) => {}
            Err(e) => {
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
        if edits.changes_wire() {
            let spec = edits.apply(&ep.spec);
            if edits.target.is_none() && edits.query.is_none() {
                edited = Some(ep.request.with_spec(spec));
            } else {
                match http::Prepared::new(plan.host.as_ref(), &spec) {
                    Ok(p) => edited = Some(p),
                    Err(e) => {
                        drop(req);
                        script_failure(row, Reason::Script(format!("before_request: req: {e:#}")));
                        return false;
                    }
                }
            }
        }
    }
    let req = edited.as_ref().unwrap_or(&ep.request);

    let keep_body = state.after_response.is_some();
    let (resp, mut outcome) = send(worker, session, row, req, keep_body).await;
    if let (Some(f), Some(resp)) = (&state.after_response, resp) {
        state
            .res
            .0
            .borrow_mut()
            .set(resp.status, resp.headers, resp.body, resp.elapsed);
        let verdict = state.call::<(Value, Option<String>)>(f, (&state.user, &state.req_ud, &state.res_ud));
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
            Err(e) => outcome.failure = Some(e.reason("after_response")),
        }
    }
    worker.recorder.borrow_mut().finish(row, outcome);
    true
}
