//! What the in-process test files share: a target on an ephemeral loopback port, a run of a
//! scenario against it, and lookups in the summary. (Each test file uses part of it.)
#![allow(dead_code)]

pub mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use stormlight::config::{LiveMode, Overrides, RunConfig};
use stormlight::runner::Plan;
use stormlight::scenario::{self, sandbox::Limits};
use stormlight::stats::{RowSummary, Summary};
use stormlight::target::Target;

pub fn target() -> Target {
    Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0))).expect("target starts")
}

/// Loads `source` as the scenario at `path` and runs it in process with `flags` (users
/// started at 1000/s unless the flags say otherwise); the run must end by itself.
pub fn run_scenario(path: &Path, source: &str, limits: Limits, flags: Overrides) -> Summary {
    let scenario = scenario::load_source(path, source, limits).expect("scenario loads");
    // (Stages and the open model set when users run: no spawn rate there.)
    let o = &scenario.options;
    let planned = [
        flags.rate.is_some(),
        flags.stages.is_some(),
        flags.rate_stages.is_some(),
    ]
    .into_iter()
    .chain([o.rate.is_some(), o.stages.is_some(), o.rate_stages.is_some()])
    .any(|b| b);
    let flags = Overrides {
        spawn_rate: flags.spawn_rate.or((!planned).then_some(1000.0)),
        ..flags
    };
    let cfg = RunConfig::resolve(path.into(), &flags, &scenario.options, None, LiveMode::Off).expect("config");
    let plan = Plan::new(Arc::new(scenario), cfg.host.clone()).expect("endpoints bind to the host");
    let result = run_plan(&cfg, plan);
    assert!(!result.interrupted);
    result.summary
}

/// Runs a prepared plan in process until it ends by itself.
pub fn run_plan(cfg: &RunConfig, plan: Plan) -> stormlight::runner::RunResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(stormlight::runner::run(cfg, Arc::new(plan), std::future::pending()))
        .expect("run completes")
}

/// The row named `name`.
pub fn row<'a>(s: &'a Summary, name: &str) -> &'a RowSummary {
    s.endpoints
        .iter()
        .find(|r| r.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no row {name}: {:?}", s.endpoints))
}
