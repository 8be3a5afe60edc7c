//! Using stormlight as a library: start the built-in target, load a scenario from a string,
//! run it for two seconds and read the numbers from the summary.
//!
//!     cargo run --release --example embedded

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stormlight::config::{LiveMode, Overrides, RunConfig};
use stormlight::runner::Plan;
use stormlight::scenario;
use stormlight::target::Target;

const SCENARIO: &str = r#"
endpoints = {
  Task("GET", "/hello"),
  Task("POST", "/api/upload", { json = { name = "test", price = 10 }, weight = 2 }),
}
"#;

fn main() -> anyhow::Result<()> {
    let target = Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let path = Path::new("embedded.lua");
    let scenario = scenario::load_source(path, SCENARIO, Default::default())?;
    let flags = Overrides {
        host: Some(target.url()),
        users: Some(4),
        duration: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let cfg = RunConfig::resolve(path.into(), &flags, &scenario.options, None, LiveMode::Off)?;
    let plan = Plan::new(Arc::new(scenario), cfg.host.clone()).expect("endpoints bind to the host");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(stormlight::runner::run(&cfg, Arc::new(plan), std::future::pending()))?;
    let s = &result.summary;
    println!(
        "{} requests ({} failed) at {:.0} req/s, p99 {:.2} ms; the target received {}",
        s.total.requests,
        s.total.failures,
        s.total.rps,
        s.total.latency_ms.map_or(0.0, |l| l.p99),
        target.counts.requests()
    );
    Ok(())
}
