//! Issue 4: multi-step flows in Lua. Every request a script makes is counted once, checks are
//! counted by name, and errors, runaways and stops inside `scenario` leave the run going.

use std::path::Path;
use std::time::{Duration, Instant};

use stormlight::config::Overrides;
use stormlight::scenario::{self, sandbox::Limits};
use stormlight::stats::Summary;

mod common;
use common::{row, target};

fn run(source: &str, host: &str, users: u32, secs: f64, limits: Limits) -> Summary {
    run_at(
        Path::new("flow.lua"),
        source,
        host,
        users,
        secs,
        limits,
        Overrides::default(),
    )
}

fn run_at(path: &Path, source: &str, host: &str, users: u32, secs: f64, limits: Limits, more: Overrides) -> Summary {
    let flags = Overrides {
        host: Some(host.to_string()),
        users: Some(users),
        duration: Some(Duration::from_secs_f64(secs)),
        grace: Some(Duration::from_secs(2)),
        ..more
    };
    common::run_scenario(path, source, limits, flags)
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
        ..Default::default()
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
    let listed: u64 = f.iter().map(|(_, n)| n).sum();
    assert_eq!(s.script_errors, listed, "script errors are counted apart from requests");
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
fn waiting_inside_a_coroutine_the_script_made_is_refused_and_nothing_is_sent() {
    let t = target();
    let s = run(
        r#"
        function scenario(user)
          http.get("/hello")  -- made before the script first touches `coroutine`
          local ok, err = pcall(coroutine.wrap(function() return http.get("/hello", { name = "inside" }) end))
          check(not ok and tostring(err):find("inside a coroutine the script made", 1, true) ~= nil, "http refused")
          local co = coroutine.create(function() sleep(5) end)
          local resumed = coroutine.resume(co)
          check(not resumed and coroutine.status(co) == "dead", "sleep refused")
        end
        "#,
        &t.url(),
        2,
        1.0,
        Limits::default(),
    );
    let (passes, fails) = check(&s, "http refused");
    assert!(passes > 10 && fails == 0, "{passes} {fails}");
    assert_eq!(check(&s, "sleep refused").1, 0);
    assert!(s.endpoints.iter().all(|r| r.name.as_deref() != Some("inside")));
    assert!(s.failures.is_empty(), "{:?}", s.failures);
    assert_eq!(s.total.requests, t.counts.requests());
    // (A user stopped between its request and its checks checks no more.)
    assert!(
        row(&s, "/hello").requests - passes <= 2,
        "{passes} {:?}",
        row(&s, "/hello")
    );

    // A scenario() that fails at once, every time, without waiting: the run still stops (the
    // worker's other tasks, its per-second report among them, were starved and it never did).
    let started = Instant::now();
    // (Spawned at 1/s, as the command line does: the spawner shares the user's thread.)
    let s = run_at(
        Path::new("flow.lua"),
        "function scenario(user) coroutine.wrap(function() sleep(0.1) end)() end",
        &t.url(),
        1,
        2.5,
        Limits::default(),
        Overrides {
            spawn_rate: Some(1.0),
            ..Overrides::default()
        },
    );
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    let (reason, count) = &failures(&s, "scenario")[0];
    assert!(
        reason.contains("sleep: cannot wait inside a coroutine") && *count > 100,
        "{reason} {count}"
    );
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
    let t = target();
    let s = run(
        "function scenario(user) http.get('/hello', { header = { x = '1' } }) end",
        &t.url(),
        1,
        0.3,
        Limits::default(),
    );
    let f = failures(&s, "scenario");
    assert!(
        f.iter()
            .any(|(r, _)| r.contains("unknown option \"header\"") && r.contains("headers")),
        "{f:?}"
    );
    assert_eq!(t.counts.requests(), 0);
    // With `scenario`, endpoints may be left out.
    assert!(scenario::load_source(Path::new("s.lua"), "function scenario(user) end", Limits::default()).is_ok());
}

#[test]
fn cookies_and_tokens_stay_with_their_user() {
    let t = target();
    let s = run(
        r#"
        function on_start(user)
          local r = http.post("/login", { json = { user = "user-" .. user.id } })
          user.vars.token = r:json().token
        end
        function scenario(user)
          local auth = { Authorization = "Bearer " .. user.vars.token }
          local me = http.get("/account", { headers = auth })
          check(me.status == 200, "logged in")
          check(me.status == 200 and me:json().user == "user-" .. user.id, "own session")
          local order = http.post("/orders", { headers = auth, json = { item = 1 } })
          check(order.status == 201, "order placed")
          -- Without the cookie jar's session cookie, the token alone is refused.
          local bare = http.get("/account", { headers = { Authorization = auth.Authorization, Cookie = "session=none" }, name = "wrong cookie" })
          check(bare.status == 401, "a wrong cookie is refused")
        end
        "#,
        &t.url(),
        10,
        1.5,
        Limits::default(),
    );
    assert_eq!(row(&s, "/login").requests, 10);
    for name in ["logged in", "own session", "order placed", "a wrong cookie is refused"] {
        let (passes, fails) = check(&s, name);
        assert!(passes > 20 && fails == 0, "{name}: {passes} passes, {fails} fails");
    }
    assert_eq!(row(&s, "/account").failures, 0);
    assert_eq!(s.total.requests, t.counts.requests());
}

#[test]
fn setup_data_reaches_every_user_and_teardown_runs_at_the_end() {
    let t = target();
    let s = run(
        r#"
        function setup()
          local r = http.post("/login", { json = { user = "admin" }, name = "setup login" })
          return { token = r:json().token, items = { 10, 20, 30 } }
        end
        function scenario(user)
          check(user.setup.items[3] == 30 and #user.setup.token > 0, "setup data")
          http.get("/hello")
          sleep(0.05)
        end
        function on_stop(user)
          http.get("/items/999", { name = "logout" })
        end
        function teardown(setup_data)
          -- Every user has stopped, its logout included.
          local seen = http.get("/__stats", { name = "stats" }):json().paths["/items/999"]
          check(seen == 4, "teardown comes after every on_stop")
          http.post("/api/upload", { json = { bye = setup_data.token }, name = "teardown" })
        end
        "#,
        &t.url(),
        4,
        1.0,
        Limits::default(),
    );
    assert_eq!(row(&s, "setup login").requests, 1);
    assert_eq!(row(&s, "teardown").requests, 1);
    assert_eq!(row(&s, "teardown").failures, 0);
    let (passes, fails) = check(&s, "setup data");
    assert!(passes >= 4 && fails == 0, "{passes} {fails}");
    assert_eq!(check(&s, "teardown comes after every on_stop"), (1, 0));
    // The target does not count what /__stats is asked.
    assert_eq!(s.total.requests, t.counts.requests() + 1);
}

#[test]
fn feeds_give_each_user_its_own_row_and_stay_in_their_folder() {
    let t = target();
    let dir = std::env::temp_dir().join(format!("stormlight-feed-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut csv = String::from("name,password\n");
    for i in 1..=6 {
        csv.push_str(&format!("u{i},p{i}\n"));
    }
    std::fs::write(dir.join("users.csv"), csv).unwrap();
    std::fs::write(dir.join("items.json"), r#"[{"id": 1}, {"id": 2}, {"id": 3}]"#).unwrap();
    let source = r#"
        local users = data.csv("users.csv")
        local items = data.json("items.json")
        function scenario(user)
          local me = users:for_user(user)
          check(me.name == "u" .. user.id and me.password == "p" .. user.id, "a row of its own")
          check(users:len() == 6 and users:row(6).name == "u6", "rows in order")
          local item = items:random()
          check(item.id >= 1 and item.id <= 3, "json rows")
          http.post("/login", { json = { user = me.name } })
          sleep(0.1)
        end
    "#;
    let s = run_at(
        &dir.join("feed.lua"),
        source,
        &t.url(),
        6,
        1.0,
        Limits::default(),
        Overrides::default(),
    );
    for name in ["a row of its own", "rows in order", "json rows"] {
        let (passes, fails) = check(&s, name);
        assert!(passes >= 6 && fails == 0, "{name}: {passes} passes, {fails} fails");
    }
    assert_eq!(s.total.requests, t.counts.requests());

    let outside = scenario::load_source(
        &dir.join("bad.lua"),
        "local f = data.csv('/etc/passwd')\nfunction scenario(u) end",
        Limits::default(),
    );
    let msg = format!("{:#}", outside.map(|_| ()).expect_err("outside the folder"));
    assert!(
        msg.contains("bad.lua:1") && msg.contains("outside the scenario's folder"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn past_the_name_cap_new_names_share_one_row() {
    let t = target();
    let s = run_at(
        Path::new("names.lua"),
        r#"
        local n = 0
        function scenario(user)
          n = n + 1
          http.get("/items/" .. n)
        end
        "#,
        &t.url(),
        1,
        0.5,
        Limits::default(),
        Overrides {
            max_names: Some(5),
            ..Default::default()
        },
    );
    let overflow = row(&s, stormlight::stats::OVERFLOW_NAME);
    assert!(overflow.requests > 10, "{overflow:?}");
    assert_eq!(
        s.endpoints.len(),
        6,
        "five names and the overflow row: {:?}",
        s.endpoints
    );
    assert_eq!(s.total.requests, t.counts.requests());
}

#[test]
fn reasons_and_check_names_made_unique_per_request_stay_within_the_name_cap() {
    let t = target();
    let s = run_at(
        Path::new("unique.lua"),
        r#"
        endpoints = { Task("GET", "/hello") }
        local n = 0
        function after_response(u, req, res)
          n = n + 1
          check(false, "c " .. uuid())
          if n % 3 == 0 then error("id " .. uuid()) end
          return false, "bad " .. uuid()
        end
        "#,
        &t.url(),
        4,
        3.0,
        Limits::default(),
        Overrides {
            max_names: Some(50),
            ..Default::default()
        },
    );
    let overflow = stormlight::stats::OVERFLOW_REASON;
    let own: Vec<_> = s.failures.iter().filter(|f| !f.reason.contains(overflow)).collect();
    assert!(own.len() <= 50, "{} reasons of their own", own.len());
    let over: Vec<_> = s.failures.iter().filter(|f| f.reason.contains(overflow)).collect();
    let classes: Vec<&str> = over.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(
        classes.len(),
        2,
        "one overflow reason per class: {classes:?} (and {} more rows)",
        own.len()
    );
    assert!(classes.contains(&overflow), "{classes:?}");
    assert!(
        classes.contains(&format!("script error: {overflow}").as_str()),
        "{classes:?}"
    );
    assert!(s.checks.len() <= 51, "{} check names", s.checks.len());
    let past = s
        .checks
        .iter()
        .find(|c| c.name == stormlight::stats::OVERFLOW_CHECK)
        .expect("an overflow check");
    assert!(past.fails > 50, "{past:?}");

    // Every request failed once, counted under one reason; every call to check is counted.
    let requests = t.counts.requests();
    assert!(requests > 200, "{requests} requests");
    assert_eq!(s.total.requests, requests);
    assert_eq!(s.total.failures, requests);
    assert_eq!(s.failures.iter().map(|f| f.count).sum::<u64>(), requests);
    assert_eq!(s.checks.iter().map(|c| c.passes + c.fails).sum::<u64>(), requests);
    assert_eq!(s.checks.iter().map(|c| c.passes).sum::<u64>(), 0);
    let json = serde_json::to_vec(&s).unwrap();
    assert!(json.len() < 1 << 20, "the result is {} bytes", json.len());
}

#[test]
fn the_luals_definitions_cover_every_global_the_host_defines() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/types/stormlight.meta.lua");
    let meta = std::fs::read_to_string(&path).expect("scripts/types/stormlight.meta.lua");
    // It is Lua: the language server reads it as such.
    mlua::Lua::new()
        .load(meta.as_str())
        .into_function()
        .expect("the definitions parse");
    let defined: Vec<&str> = meta
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("function ").unwrap_or(l);
            let name: &str = l.split(|c: char| !(c.is_alphanumeric() || c == '_')).next()?;
            (!name.is_empty() && (l[name.len()..].starts_with(" = ") || l[name.len()..].starts_with('(')))
                .then_some(name)
        })
        .collect();

    // What a user's state has beyond Lua's own libraries, what opens on first use, the hooks
    // and the settings a scenario may define.
    let sandbox = scenario::sandbox::Sandbox::new(Limits::default(), 0).unwrap();
    for name in scenario::api::CONSTRUCTORS {
        let kind: String = sandbox.lua.load(format!("return type({name})")).eval().unwrap();
        assert_eq!(kind, "function", "{name} resolves in every state");
    }
    let plain = mlua::Lua::new();
    let mut host: Vec<String> = sandbox
        .lua
        .globals()
        .pairs::<String, mlua::Value>()
        .filter_map(|p| p.ok().map(|(k, _)| k))
        .filter(|k| !plain.globals().contains_key(k.as_str()).unwrap())
        .collect();
    host.extend(scenario::host::NAMES.iter().map(|s| s.to_string()));
    host.extend(scenario::api::CONSTRUCTORS.iter().map(|s| s.to_string()));
    host.extend(scenario::HOOK_NAMES.iter().map(|s| s.to_string()));
    host.extend(scenario::WATCHED.iter().map(|s| s.to_string()));
    assert!(
        host.iter().any(|n| n == "Task") && host.iter().any(|n| n == "http"),
        "{host:?}"
    );
    let missing: Vec<&String> = host.iter().filter(|n| !defined.contains(&n.as_str())).collect();
    assert!(
        missing.is_empty(),
        "missing from scripts/types/stormlight.meta.lua: {missing:?}"
    );
}

#[test]
fn every_script_in_scripts_runs_against_the_built_in_target_without_failures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut ran = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".lua") {
            continue;
        }
        let t = target();
        let source = std::fs::read_to_string(&path).unwrap();
        let s = run_at(
            &path,
            &source,
            &t.url(),
            3,
            1.5,
            Limits::default(),
            Overrides::default(),
        );
        assert!(s.total.requests > 0, "{name} sent nothing");
        assert!(s.failures.is_empty(), "{name}: {:?}", s.failures);
        assert!(s.checks.iter().all(|c| c.fails == 0), "{name}: {:?}", s.checks);
        assert_eq!(s.total.requests, t.counts.requests(), "{name}");
        ran.push(name);
    }
    assert!(ran.len() >= 4, "{ran:?}");
}
