//! Issue 4: multi-step flows in Lua. Every request a script makes is counted once, checks are
//! counted by name, and errors, runaways and stops inside `scenario` leave the run going.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stormlight::config::{LiveMode, Overrides, RunConfig};
use stormlight::runner::Plan;
use stormlight::scenario::{self, sandbox::Limits};
use stormlight::stats::{RowSummary, Summary};
use stormlight::target::Target;

fn target() -> Target {
    Target::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0))).expect("target starts")
}

fn run(source: &str, host: &str, users: u32, secs: f64, limits: Limits) -> Summary {
    let path = Path::new("flow.lua");
    let scenario = scenario::load_source(path, source, limits).expect("scenario loads");
    let flags = Overrides {
        host: Some(host.to_string()),
        users: Some(users),
        spawn_rate: Some(1000.0),
        duration: Some(Duration::from_secs_f64(secs)),
        grace: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let cfg = RunConfig::resolve(path.into(), &flags, &scenario.options, None, LiveMode::Off).expect("config");
    let plan = Plan::new(Arc::new(scenario), cfg.host.clone()).expect("plan");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(stormlight::runner::run(&cfg, Arc::new(plan), std::future::pending()))
        .expect("run")
        .summary
}

fn row<'a>(s: &'a Summary, name: &str) -> &'a RowSummary {
    s.endpoints
        .iter()
        .find(|r| r.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no row {name}: {:?}", s.endpoints))
}

fn check(s: &Summary, name: &str) -> (u64, u64) {
    let c = s
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {:?}", s.checks));
    (c.passes, c.fails)
}

fn failures(s: &Summary, name: &str) -> Vec<(String, u64)> {
    s.failures
        .iter()
        .filter(|f| f.name == name)
        .map(|f| (f.reason.clone(), f.count))
        .collect()
}

#[test]
fn a_multi_step_flow_counts_every_request_once_and_its_checks() {
    let t = target();
    let s = run(
        r#"
        function on_start(user)
          local r = http.post("/api/upload", { json = { user = user.id }, name = "login" })
          user.vars.token = r:json().received.user
        end
        function scenario(user)
          local hello = http.get("/hello")
          check(hello.status == 200, "hello is 200")
          check(hello:json().message == "Hello, World!", "greeting")
          local item = http.request("GET", "/items/" .. rand.int(1, 5), { name = "/items/[id]" })
          check(item.status == 200, "item is 200")
          local gone = http.get("/status/404")
          check(gone.status == 200, "this one fails")
          local up = http.post("/api/upload", { json = { id = uuid(), token = user.vars.token } })
          check(up:json().received.token == user.id, "token kept")
          sleep(0.01)
        end
        function on_stop(user)
          http.delete("/hello", { name = "logout" })
        end
        "#,
        &t.url(),
        4,
        1.5,
        Limits::default(),
    );
    assert_eq!(row(&s, "login").requests, 4);
    assert_eq!(row(&s, "logout").requests, 4, "on_stop may still send");
    let hellos = row(&s, "/hello").requests;
    assert!(hellos > 20, "{hellos}");
    assert_eq!(check(&s, "hello is 200"), (hellos, 0));
    assert_eq!(check(&s, "greeting"), (hellos, 0));
    assert_eq!(check(&s, "token kept").1, 0);
    let gone = row(&s, "/status/404");
    assert_eq!(check(&s, "this one fails"), (0, gone.requests));
    assert_eq!(gone.failures, gone.requests, "a 404 is a failed request too");
    assert_eq!(row(&s, "/items/[id]").failures, 0);
    assert_eq!(
        s.total.requests,
        t.counts.requests(),
        "every request the script made, once"
    );
}

#[test]
fn errors_and_runaways_in_scenario_count_and_the_next_iteration_starts() {
    let t = target();
    let limits = Limits {
        memory: 8 << 20,
        instructions: 2_000_000,
    };
    let s = run(
        r#"
        local n = 0
        function scenario(user)
          n = n + 1
          http.get("/hello")
          if n % 2 == 0 then error("boom " .. n) end
          if n % 5 == 0 then while true do end end
        end
        "#,
        &t.url(),
        2,
        1.0,
        limits,
    );
    let hello = row(&s, "/hello").requests;
    assert!(hello > 10, "iterations go on after errors: {hello}");
    let f = failures(&s, "scenario");
    assert!(
        f.iter()
            .any(|(r, _)| r.starts_with("script error: scenario:") && r.contains("boom")),
        "{f:?}"
    );
    assert!(f.iter().any(|(r, _)| r.starts_with("script limit: scenario:")), "{f:?}");
    assert_eq!(s.total.requests, t.counts.requests());
}

#[test]
fn sleep_and_waits_end_when_the_run_stops() {
    let t = target();
    let started = Instant::now();
    let s = run(
        r#"
        function scenario(user)
          http.get("/hello")
          sleep(30)
          http.get("/hello", { name = "never" })
        end
        "#,
        &t.url(),
        3,
        1.0,
        Limits::default(),
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(row(&s, "/hello").requests, 3);
    assert!(
        s.endpoints.iter().all(|r| r.name.as_deref() != Some("never")),
        "nothing sent after the stop"
    );
    assert!(s.failures.is_empty(), "stopping is not a failure: {:?}", s.failures);
    assert_eq!(s.total.requests, t.counts.requests());
}

#[test]
fn a_waiting_user_holds_up_no_other_user() {
    let t = target();
    // One user waits on a slow answer, the others keep going on the same thread.
    let s = run(
        r#"
        function scenario(user)
          if user.id == 1 then http.get("/slow?ms=2000", { name = "slow" }) else http.get("/hello") end
        end
        "#,
        &t.url(),
        4,
        1.0,
        Limits::default(),
    );
    assert!(row(&s, "/hello").requests > 100, "{:?}", row(&s, "/hello"));
    assert_eq!(s.total.requests, t.counts.requests());
}

#[test]
fn http_is_for_hooks_not_for_loading() {
    let err = scenario::load_source(
        Path::new("top.lua"),
        "local r = http.get('/')\nendpoints = { Task('GET', '/') }",
        Limits::default(),
    )
    .map(|_| ())
    .expect_err("no traffic while loading");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("top.lua:1") && msg.contains("only inside hooks and scenario()"),
        "{msg}"
    );
    // With `scenario`, endpoints may be left out.
    assert!(scenario::load_source(Path::new("s.lua"), "function scenario(user) end", Limits::default()).is_ok());
}
