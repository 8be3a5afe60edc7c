//! The scenario: a Lua file that defines `endpoints`, optionally `host`, `options` and the hooks
//! `on_start`, `before_request`, `after_response`, `on_stop`.
//!
//! [`load`] runs the file once in a sandbox, validates everything the host needs (errors carry
//! `file:line`) and keeps the result as plain Rust data, so requests that no hook touches never
//! go near Lua again. [`UserState`] is the per-virtual-user Lua state, made only when the
//! scenario has hooks.

pub mod api;
mod arena;
pub mod feed;
pub mod host;
mod pattern;
pub mod sandbox;

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, anyhow, bail};
use mlua::{Function, Lua, Table, Value};

use crate::config::{Overrides, parse_duration};
use crate::files;
use api::{RequestSpec, TaskLines};
use sandbox::{Limits, Sandbox};

/// Which hooks the scenario defines; the user loop skips the work of the absent ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    pub on_start: bool,
    pub before_request: bool,
    pub after_response: bool,
    pub on_stop: bool,
    /// `scenario(user)`: each iteration runs it instead of picking an endpoint.
    pub scenario: bool,
    /// `setup()` before the users start, `teardown(data)` after they stop (not per user).
    pub setup: bool,
    pub teardown: bool,
}

impl Hooks {
    pub fn any(&self) -> bool {
        self.on_start || self.before_request || self.after_response || self.on_stop || self.scenario
    }

    fn names(&self) -> Vec<&'static str> {
        [
            (self.setup, "setup"),
            (self.teardown, "teardown"),
            (self.scenario, "scenario"),
            (self.on_start, "on_start"),
            (self.before_request, "before_request"),
            (self.after_response, "after_response"),
            (self.on_stop, "on_stop"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// A loaded, validated scenario.
#[derive(Debug)]
pub struct Scenario {
    pub path: PathBuf,
    /// The source compiled once by the host (trusted bytecode; scripts cannot load any).
    pub bytecode: Arc<[u8]>,
    /// The `options` table and `host`, to be merged under the command-line flags.
    pub options: Overrides,
    pub endpoints: Arc<[RequestSpec]>,
    pub hooks: Hooks,
    /// Think time between a user's iterations (`wait_time`); none: back to back.
    pub wait: Option<api::Wait>,
    pub limits: Limits,
    /// Things that load but look like mistakes (a misspelt hook), for `check` and `run`.
    pub warnings: Vec<String>,
    /// Whether hooks may wait (the script uses `http` or `sleep`, or defines `scenario`): they
    /// are then called as coroutines on the user's task; otherwise as plain calls, cheaper.
    pub waits: bool,
    /// `data.csv` / `data.json` files, read while the scenario loaded, shared by every user.
    pub feeds: Arc<feed::Feeds>,
    /// Memory a user's state of this scenario takes, learnt from the states made so far: each
    /// new one starts with that much room (see `arena`).
    pub state_bytes: std::sync::atomic::AtomicUsize,
    /// A fingerprint of the source (see `segment::fingerprint`), recorded in result files.
    pub fingerprint: String,
}

/// Loads and validates a scenario file (a regular file of at most [`files::SCENARIO_MAX`]
/// bytes). Nothing is sent.
pub fn load(path: &Path) -> Result<Scenario> {
    load_with(path, Limits::default())
}

/// [`load`], the scenario's states held to `limits`.
pub fn load_with(path: &Path, limits: Limits) -> Result<Scenario> {
    let label = format!("scenario {}", path.display());
    let source = String::from_utf8(files::read(path, &label, files::SCENARIO_MAX)?)
        .map_err(|_| anyhow!("cannot read {label}: it is not UTF-8 text"))?;
    load_source(path, &source, limits)
}

/// Globals whose assignment line is remembered, for messages about them.
pub const WATCHED: [&str; 5] = ["endpoints", "options", "host", "wait_time", "thresholds"];

/// Like [`load`], from source text already in memory (`path` names it in messages).
pub fn load_source(path: &Path, source: &str, limits: Limits) -> Result<Scenario> {
    let file = path.display().to_string();
    let sb = Sandbox::new(limits, 0).map_err(|e| anyhow!("cannot create the Lua sandbox: {e}"))?;
    sb.note_positions();
    let lua = &sb.lua;
    lua.set_app_data(TaskLines::default());
    let feeds = Arc::new(feed::Feeds::beside(path));
    lua.set_app_data(feeds.clone());
    let assigned = watch_globals(lua).map_err(|e| anyhow!("{e}"))?;

    let chunk = {
        let _call = sb.call("the scenario file");
        lua.load(source)
            .set_name(format!("@{file}"))
            .into_function()
            .map_err(|e| anyhow!("{}", script_error(path, &sb, &e)))?
    };
    // Users load this compiled form (debug info kept, so errors still say file:line): ten
    // thousand users spawned in a second must not parse the file ten thousand times.
    let bytecode: Arc<[u8]> = chunk.dump(false).into();
    {
        let _call = sb.call("the scenario file");
        chunk
            .call::<()>(())
            .map_err(|e| anyhow!("{}", script_error(path, &sb, &e)))?;
    }
    feeds.seal();
    if let Some(mt) = lua.globals().metatable() {
        let _ = mt.raw_set("__newindex", Value::Nil);
    }
    let assigned = assigned.take();
    let line_of = |name: &str| assigned.iter().find(|(n, _)| *n == name).map(|(_, l)| *l);
    let at = |line: Option<usize>| match line {
        Some(l) => format!("{file}:{l}"),
        None => file.clone(),
    };
    let globals = lua.globals();

    let host = match globals.get::<Value>("host").map_err(|e| anyhow!("{e}"))? {
        Value::Nil => None,
        Value::String(s) => {
            let h = s.to_string_lossy();
            crate::config::parse_host(&h).with_context(|| format!("{}: `host`", at(line_of("host"))))?;
            Some(h)
        }
        other => bail!(
            "{}: `host` must be a string like \"http://127.0.0.1:8000\", got {}",
            at(line_of("host")),
            api::show(&other)
        ),
    };
    let mut options = match globals.get::<Value>("options").map_err(|e| anyhow!("{e}"))? {
        Value::Nil => Overrides::default(),
        Value::Table(t) => parse_options(&t).map_err(|e| anyhow!("{}: options: {e}", at(line_of("options"))))?,
        other => bail!(
            "{}: `options` must be a table, got {}",
            at(line_of("options")),
            api::show(&other)
        ),
    };
    // The scenario's host is one more option under the --host flag.
    options.host = host;

    let endpoints_line = line_of("endpoints");
    let has_scenario = hook_defined(&globals, "scenario", &file)?;
    let table = match globals.get::<Value>("endpoints").map_err(|e| anyhow!("{e}"))? {
        Value::Table(t) => t,
        // With `scenario(user)`, endpoints are optional.
        Value::Nil if has_scenario => lua.create_table().map_err(|e| anyhow!("{e}"))?,
        Value::Nil => {
            let hint = match near_misses(&globals, &["endpoints", "scenario"]).first() {
                Some((found, meant)) => format!(" (found `{found}`: did you mean `{meant}`?)"),
                None => String::new(),
            };
            bail!(
                "{file}: no `endpoints` table{hint}: define endpoints = {{ Task(\"GET\", \"/\") }}, or function scenario(user)"
            )
        }
        other => bail!(
            "{}: `endpoints` must be a table, got {}",
            at(endpoints_line),
            api::show(&other)
        ),
    };
    let lines = lua.remove_app_data::<TaskLines>().unwrap_or_default().0.into_inner();
    let len = table.raw_len();
    if len == 0 && !has_scenario {
        bail!(
            "{}: `endpoints` is empty: list at least one request",
            at(endpoints_line)
        );
    }
    // A plain-table entry has no call to take a line from: find where it starts in the text.
    let entry_line = |i: usize| endpoints_line.and_then(|l| entry_line(source, l, i)).or(endpoints_line);
    let mut endpoints = Vec::with_capacity(len);
    for i in 1..=len {
        let entry = table.raw_get::<Value>(i).map_err(|e| anyhow!("{e}"))?;
        let t = match entry {
            Value::Table(t) => t,
            other => bail!(
                "{}: endpoints[{i}] must be a table or Task(...), got {}",
                at(entry_line(i)),
                api::show(&other)
            ),
        };
        let line = lines.get(&(t.to_pointer() as usize)).copied().or_else(|| entry_line(i));
        let spec = api::parse_request(&t).map_err(|e| anyhow!("{}: endpoints[{i}]: {e}", at(line)))?;
        endpoints.push(spec);
    }
    if table.pairs::<Value, Value>().count() != len {
        bail!(
            "{}: `endpoints` must be a list (no named keys, no gaps)",
            at(endpoints_line)
        );
    }

    let wait = api::wait_value(&globals.get::<Value>("wait_time").map_err(|e| anyhow!("{e}"))?)
        .map_err(|e| anyhow!("{}: {e}", at(line_of("wait_time"))))?;
    // Pass/fail criteria: with the options, under the command line's own.
    options.scenario_thresholds = thresholds_value(&globals.get::<Value>("thresholds").map_err(|e| anyhow!("{e}"))?)
        .map_err(|e| anyhow!("{}: {e:#}", at(line_of("thresholds"))))?;
    let hooks = Hooks {
        on_start: hook_defined(&globals, "on_start", &file)?,
        before_request: hook_defined(&globals, "before_request", &file)?,
        after_response: hook_defined(&globals, "after_response", &file)?,
        on_stop: hook_defined(&globals, "on_stop", &file)?,
        scenario: has_scenario,
        setup: hook_defined(&globals, "setup", &file)?,
        teardown: hook_defined(&globals, "teardown", &file)?,
    };
    let mut warnings = Vec::new();
    for (found, meant) in near_misses(&globals, &["endpoints", "options", "wait_time", "thresholds"]) {
        warnings.push(format!(
            "{file}: `{found}` is not a setting; did you mean `{meant}`? (it is ignored)"
        ));
    }
    for (found, meant) in near_misses(&globals, &HOOK_NAMES) {
        warnings.push(format!(
            "{file}: `{found}` is not a hook; did you mean `{meant}`? (it will never be called)"
        ));
    }

    Ok(Scenario {
        path: path.to_path_buf(),
        bytecode,
        options,
        endpoints: endpoints.into(),
        hooks,
        wait,
        limits,
        warnings,
        waits: has_scenario || may_wait(source),
        feeds,
        state_bytes: Default::default(),
        fingerprint: crate::segment::fingerprint(source),
    })
}

pub const HOOK_NAMES: [&str; 7] = [
    "on_start",
    "before_request",
    "after_response",
    "on_stop",
    "scenario",
    "setup",
    "teardown",
];

/// Reads `thresholds`: a list of `"metric op value"` strings (or `{ "…", abort_on_fail = true,
/// delay = "10s" }`), and per row, `["GET /hello"] = { … }`.
fn thresholds_value(v: &Value) -> Result<Vec<crate::threshold::Threshold>> {
    use crate::threshold::{Threshold, parse};
    let t = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Table(t) => t,
        other => bail!(
            "`thresholds` must be a table of strings like \"p95 < 200ms\", got {}",
            api::show(other)
        ),
    };
    let entry = |v: &Value| -> Result<Threshold> {
        match v {
            Value::String(s) => parse(&s.to_string_lossy()),
            Value::Table(e) => {
                for pair in e.pairs::<Value, Value>() {
                    let (k, _) = pair.map_err(|e| anyhow!("{e}"))?;
                    let known = matches!(&k, Value::Integer(1))
                        || matches!(&k, Value::String(s) if ["abort_on_fail", "delay"].iter().any(|o| s.as_bytes() == o.as_bytes()));
                    if !known {
                        bail!(
                            "`thresholds`: in {{ \"…\", abort_on_fail = true, delay = \"10s\" }}, unexpected {} (one text per table; list more in the outer table)",
                            api::show(&k)
                        );
                    }
                }
                let text: String = e.raw_get(1).map_err(|_| {
                    anyhow!(
                        "`thresholds`: a table entry starts with its text: {{ \"p95 < 200ms\", abort_on_fail = true }}"
                    )
                })?;
                let mut th = parse(&text)?;
                th.abort_on_fail = e
                    .raw_get::<Option<bool>>("abort_on_fail")
                    .map_err(|e| anyhow!("`abort_on_fail`: {e}"))?
                    .unwrap_or(false);
                if let Some(d) = e.raw_get::<Option<Value>>("delay").map_err(|e| anyhow!("{e}"))? {
                    th.delay = api::duration_value(&d).map_err(|e| anyhow!("`delay`: {e}"))?;
                }
                Ok(th)
            }
            other => bail!(
                "`thresholds`: expected a string like \"p95 < 200ms\", got {}",
                api::show(other)
            ),
        }
    };
    let mut out = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| anyhow!("{e}"))?;
        match (&k, &v) {
            (Value::Integer(_), _) => out.push(entry(&v)?),
            (Value::String(row), Value::Table(list)) => {
                let row = row.to_string_lossy();
                for item in list.sequence_values::<Value>() {
                    let item = item.map_err(|e| anyhow!("{e}"))?;
                    out.push(entry(&item)?.on_row(&row)?);
                }
            }
            (Value::String(row), other) => {
                bail!(
                    "`thresholds[{row:?}]` must be a list like {{ \"p99 < 50ms\" }}, got {}",
                    api::show(other)
                )
            }
            (other, _) => bail!("`thresholds`: unexpected key {}", api::show(other)),
        }
    }
    Ok(out)
}

/// Whether the source calls `http` or `sleep` (conservatively: any `http.`, `http[` or
/// `sleep(` outside a longer name, in code, strings or comments alike).
fn may_wait(source: &str) -> bool {
    let b = source.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let used = |word: &str, next: &[u8]| {
        source.match_indices(word).any(|(i, _)| {
            let before = i.checked_sub(1).map(|j| b[j]);
            let after = b[i + word.len()..].iter().find(|c| !c.is_ascii_whitespace());
            !before.is_some_and(ident) && after.is_some_and(|c| next.contains(c))
        })
    };
    used("http", b".[") || used("sleep", b"(\"'[{")
}

/// A global whose name is a near miss (a typo) of one of `names`: (found, meant).
/// Globals whose names are near misses (typos) of one of `names`: (found, meant), sorted.
fn near_misses(globals: &Table, names: &[&'static str]) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    for pair in globals.pairs::<Value, Value>() {
        let Ok((Value::String(k), _)) = pair else { continue };
        let k = k.to_string_lossy();
        if names.contains(&k.as_str()) {
            continue;
        }
        if let Some(name) = names
            .iter()
            .find(|name| edit_distance(&k, name) <= 2 || (k.len() > 4 && name.starts_with(k.as_str())))
        {
            found.push((k, *name));
        }
    }
    found.sort();
    found
}

/// Levenshtein distance (names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The line where entry `index` (1-based) of the `endpoints = { ... }` table starts, by
/// scanning the source from the last `endpoints = {` at or before `assigned_line` (Lua
/// reports an assignment at its last line). Strings and comments are skipped.
fn entry_line(source: &str, assigned_line: usize, index: usize) -> Option<usize> {
    let b = source.as_bytes();
    let line_at = |pos: usize| source[..pos].bytes().filter(|&c| c == b'\n').count() + 1;
    // Start of the table: the last `endpoints` ... `{` that begins on or before the line.
    let mut start = None;
    let mut from = 0;
    while let Some(off) = source[from..].find("endpoints") {
        let pos = from + off;
        if line_at(pos) > assigned_line {
            break;
        }
        let rest = source[pos + "endpoints".len()..].trim_start();
        if let Some(rest) = rest.strip_prefix('=')
            && rest.trim_start().starts_with('{')
        {
            start = Some(source.len() - rest.trim_start().len());
        }
        from = pos + 1;
    }
    let mut i = start? + 1;
    let (mut depth, mut entry, mut at_entry_start) = (0usize, 1usize, true);
    while i < b.len() {
        let c = b[i];
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            // A comment: long (--[[ ]]) or to the end of the line.
            if source[i + 2..].starts_with("[[") {
                i = source[i..].find("]]").map_or(b.len(), |e| i + e + 2);
            } else {
                i = source[i..].find('\n').map_or(b.len(), |e| i + e);
            }
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if at_entry_start && depth == 0 {
            if c == b'}' {
                return None;
            }
            if entry == index {
                return Some(line_at(i));
            }
            at_entry_start = false;
        }
        match c {
            b'"' | b'\'' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' if source[i..].starts_with("[[") => {
                i = source[i..].find("]]").map_or(b.len(), |e| i + e + 1);
            }
            b'{' | b'(' | b'[' => depth += 1,
            b'}' | b')' | b']' if depth == 0 => return None,
            b'}' | b')' | b']' => depth -= 1,
            b',' | b';' if depth == 0 => {
                entry += 1;
                at_entry_start = true;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Records the line at which each watched global is first assigned.
/// (global, line of its first assignment), filled while the file runs.
type AssignedLines = Rc<RefCell<Vec<(&'static str, usize)>>>;

fn watch_globals(lua: &Lua) -> mlua::Result<AssignedLines> {
    let lines = Rc::new(RefCell::new(Vec::new()));
    let seen = lines.clone();
    // Added to the sandbox's own metatable of _G (which opens libraries lazily).
    let mt = match lua.globals().metatable() {
        Some(mt) => mt,
        None => lua.create_table()?,
    };
    mt.set(
        "__newindex",
        lua.create_function(move |lua, (t, k, v): (Table, Value, Value)| {
            if let Some(name) = k
                .as_string()
                .and_then(|s| WATCHED.into_iter().find(|w| s.as_bytes() == w.as_bytes()))
                && !seen.borrow().iter().any(|(n, _)| *n == name)
                && let Some(line) = lua.inspect_stack(1, |d| d.current_line()).flatten()
            {
                seen.borrow_mut().push((name, line));
            }
            t.raw_set(k, v)
        })?,
    )?;
    lua.globals().set_metatable(Some(mt))?;
    Ok(lines)
}

fn hook_defined(globals: &Table, name: &str, file: &str) -> Result<bool> {
    match globals.get::<Value>(name).map_err(|e| anyhow!("{e}"))? {
        Value::Nil => Ok(false),
        Value::Function(_) => Ok(true),
        other => bail!("{file}: `{name}` must be a function, got {}", api::show(&other)),
    }
}

const OPTIONS: &[&str] = &[
    "users",
    "spawn_rate",
    "duration",
    "timeout",
    "grace",
    "script_timeout",
    "script_memory",
    "stages",
    "rate",
    "max_users",
];

fn parse_options(t: &Table) -> Result<Overrides, String> {
    let mut o = Overrides::default();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| e.to_string())?;
        let key = k
            .as_string()
            .map(|s| s.to_string_lossy())
            .unwrap_or_else(|| api::show(&k));
        match key.as_str() {
            "users" => match v {
                Value::Integer(n) if n >= 1 && n <= u32::MAX as i64 => o.users = Some(n as u32),
                other => {
                    return Err(format!("`users` must be a positive integer, got {}", api::show(&other)));
                }
            },
            "spawn_rate" => match v {
                Value::Integer(n) if n > 0 => o.spawn_rate = Some(n as f64),
                Value::Number(n) if n.is_finite() && n > 0.0 => o.spawn_rate = Some(n),
                other => {
                    return Err(format!(
                        "`spawn_rate` must be a positive number, got {}",
                        api::show(&other)
                    ));
                }
            },
            "duration" => {
                let d = match &v {
                    Value::String(s) => parse_duration(&s.to_string_lossy()).map_err(|e| e.to_string())?,
                    other => api::duration_value(other).map_err(|e| format!("`duration`: {e}"))?,
                };
                if d.is_zero() {
                    return Err("`duration` must be more than 0".into());
                }
                o.duration = Some(d);
            }
            "timeout" => o.timeout = Some(api::duration_value(&v).map_err(|e| format!("`timeout`: {e}"))?),
            "grace" => o.grace = Some(api::duration_value(&v).map_err(|e| format!("`grace`: {e}"))?),
            "script_timeout" => {
                let d = api::duration_value(&v).map_err(|e| format!("`script_timeout`: {e}"))?;
                if d.is_zero() {
                    return Err("`script_timeout` must be more than 0".into());
                }
                o.script_timeout = Some(d);
            }
            "script_memory" => {
                let bytes = match &v {
                    Value::Integer(n) if *n > 0 => *n as u64,
                    Value::String(s) => {
                        crate::config::parse_bytes(&s.to_string_lossy()).map_err(|e| format!("`script_memory`: {e}"))?
                    }
                    other => {
                        return Err(format!(
                            "`script_memory` must be a size like \"64MiB\" or a number of bytes, got {}",
                            api::show(other)
                        ));
                    }
                };
                crate::config::check_script_memory(bytes).map_err(|e| format!("`script_memory`: {e}"))?;
                o.script_memory = Some(bytes);
            }
            "stages" => match stages_value(&v)? {
                Ok(users) => o.stages = Some(users),
                Err(rates) => o.rate_stages = Some(rates),
            },
            "rate" => match v {
                Value::Integer(n) if n > 0 => o.rate = Some(n as f64),
                Value::Number(n) if n.is_finite() && n > 0.0 => o.rate = Some(n),
                other => return Err(format!("`rate` must be a positive number, got {}", api::show(&other))),
            },
            "max_users" => match v {
                Value::Integer(n) if n >= 1 && n <= u32::MAX as i64 => o.max_users = Some(n as u32),
                other => {
                    return Err(format!(
                        "`max_users` must be a positive integer, got {}",
                        api::show(&other)
                    ));
                }
            },
            other => {
                return Err(format!("unknown option `{other}` (known: {})", OPTIONS.join(", ")));
            }
        }
    }
    Ok(o)
}

/// `options.stages = { { duration = "30s", users = 100 }, ... }` (`Ok`), or of rates,
/// `{ { duration = "1m", rate = 200 }, ... }` (`Err`).
type StagesOf = Result<Vec<crate::stages::Stage>, Vec<crate::stages::RateStage>>;

fn stages_value(v: &Value) -> Result<StagesOf, String> {
    let Value::Table(list) = v else {
        return Err(format!(
            "`stages` must be a list like {{ {{ duration = \"30s\", users = 100 }} }}, got {}",
            api::show(v)
        ));
    };
    let mut stages = Vec::new();
    let mut rates = Vec::new();
    for (i, item) in list.sequence_values::<Value>().enumerate() {
        let item = item.map_err(|e| e.to_string())?;
        let Value::Table(t) = item else {
            return Err(format!(
                "`stages[{}]` must be a table {{ duration = ..., users = ... }} (or rate = ...)",
                i + 1
            ));
        };
        let duration = api::duration_value(&t.raw_get::<Value>("duration").map_err(|e| e.to_string())?)
            .map_err(|e| format!("`stages[{}].duration`: {e}", i + 1))?;
        let bad = |what: &str, other: &Value| {
            format!(
                "`stages[{}].{what}` must be a whole number, got {}",
                i + 1,
                api::show(other)
            )
        };
        match (
            t.raw_get::<Value>("users").map_err(|e| e.to_string())?,
            t.raw_get::<Value>("rate").map_err(|e| e.to_string())?,
        ) {
            (Value::Integer(n), Value::Nil) if n >= 0 => stages.push(crate::stages::Stage {
                duration,
                users: n as u64,
            }),
            (Value::Nil, Value::Integer(n)) if n >= 0 => rates.push(crate::stages::RateStage {
                duration,
                rate: n as f64,
            }),
            (Value::Nil, Value::Number(n)) if n.is_finite() && n >= 0.0 => {
                rates.push(crate::stages::RateStage { duration, rate: n })
            }
            (Value::Nil, Value::Nil) => {
                return Err(format!("`stages[{}]` needs `users` (or an open model's `rate`)", i + 1));
            }
            (users, Value::Nil) => return Err(bad("users", &users)),
            (Value::Nil, rate) => return Err(bad("rate", &rate)),
            _ => return Err(format!("`stages[{}]`: give `users` or `rate`, not both", i + 1)),
        }
    }
    match (stages.is_empty(), rates.is_empty()) {
        (false, false) => Err("`stages` are of users or of rates, not both".into()),
        (true, false) => {
            crate::stages::check_rates(&rates).map_err(|e| format!("{e:#}"))?;
            Ok(Err(rates))
        }
        _ => {
            crate::stages::check(&stages).map_err(|e| format!("{e:#}"))?;
            Ok(Ok(stages))
        }
    }
}

/// A Lua error from loading the file, as `file:line: message`.
fn script_error(path: &Path, sb: &Sandbox, err: &mlua::Error) -> String {
    // Lua already prefixes syntax and runtime errors with `file:line:` (the chunk is named
    // `@file`), and a limit's error with the line it stopped; a memory error carries no
    // position: the line the script last reached says where.
    let msg = sb.describe(err);
    let file = path.display();
    let limit = sb.budget.spent() || sandbox::is_memory_error(err);
    match msg
        .strip_prefix(&format!("{file}:"))
        .and_then(|rest| rest.split_once(": "))
    {
        Some((line, what)) if limit => format!("{file}:{line}: scenario stopped while loading: {what}"),
        None if limit => format!("{file}: scenario stopped while loading: {msg}"),
        Some(_) => msg,
        // An error Lua gives no position (`C stack overflow` from the parser): the file at least.
        None => format!("{file}: {msg}"),
    }
}

impl Scenario {
    /// What `stormlight check` prints: what the scenario defines.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "scenario {}: ok", self.path.display());
        let _ = writeln!(
            s,
            "  host: {}",
            self.options
                .host
                .as_deref()
                .map_or("(none: pass --host)".into(), crate::http::redact)
        );
        let o = &self.options;
        let mut opts = Vec::new();
        if let Some(u) = o.users {
            opts.push(format!("users={u}"));
        }
        if let Some(r) = o.spawn_rate {
            opts.push(format!("spawn_rate={r}"));
        }
        if let Some(d) = o.duration {
            opts.push(format!("duration={}", crate::config::format_duration(d)));
        }
        if let Some(t) = o.timeout {
            opts.push(format!("timeout={}", crate::config::format_duration(t)));
        }
        if let Some(g) = o.grace {
            opts.push(format!("grace={}", crate::config::format_duration(g)));
        }
        if let Some(t) = o.script_timeout {
            opts.push(format!("script_timeout={}", crate::config::format_duration(t)));
        }
        if let Some(m) = o.script_memory {
            match m.is_multiple_of(1 << 20) {
                true => opts.push(format!("script_memory={}MiB", m >> 20)),
                false => opts.push(format!("script_memory={m}")),
            }
        }
        if let Some(r) = o.rate {
            opts.push(format!("rate={r}/s"));
        }
        if let Some(m) = o.max_users {
            opts.push(format!("max_users={m}"));
        }
        let fmt = crate::config::format_duration;
        if let Some(st) = &o.stages {
            let list: Vec<String> = st.iter().map(|s| format!("{}:{}", fmt(s.duration), s.users)).collect();
            opts.push(format!("stages={}", list.join(",")));
        }
        if let Some(st) = &o.rate_stages {
            let list: Vec<String> = st.iter().map(|s| format!("{}:{}/s", fmt(s.duration), s.rate)).collect();
            opts.push(format!("stages={}", list.join(",")));
        }
        let _ = writeln!(
            s,
            "  options: {}",
            if opts.is_empty() {
                "(none)".into()
            } else {
                opts.join(" ")
            }
        );
        let total: u64 = self.endpoints.iter().map(|e| e.weight as u64).sum();
        let _ = writeln!(s, "  endpoints ({}):", self.endpoints.len());
        for e in self.endpoints.iter() {
            let target = crate::http::redact(e.target.as_str());
            let mut extra = Vec::new();
            if e.name != target {
                extra.push(format!("name {}", e.name));
            }
            if !e.query.is_empty() {
                let keys: Vec<&str> = e.query.iter().map(|(k, _)| k.as_str()).collect();
                extra.push(format!("query {}", keys.join(",")));
            }
            if !e.headers.is_empty() {
                let names: Vec<&str> = e.headers.keys().map(|k| k.as_str()).collect();
                extra.push(format!("headers {}", names.join(",")));
            }
            if let Some(b) = &e.body {
                extra.push(format!("body {} bytes", b.len()));
            }
            if let Some(t) = e.timeout {
                extra.push(format!("timeout {}", crate::config::format_duration(t)));
            }
            let line = format!(
                "    {:<7} {:<30} weight {} ({:.0}%)  {}",
                e.method.as_str(),
                target,
                e.weight,
                100.0 * e.weight as f64 / total as f64,
                extra.join("; ")
            );
            let _ = writeln!(s, "{}", line.trim_end());
        }
        let names = self.hooks.names();
        let _ = writeln!(
            s,
            "  hooks: {}",
            if names.is_empty() {
                "(none)".into()
            } else {
                names.join(", ")
            }
        );
        if let Some(w) = self.wait {
            let open = o.rate.is_some() || o.rate_stages.is_some();
            let note = if open { " (not used in the open model)" } else { "" };
            let _ = writeln!(s, "  wait_time: {w}{note}");
        }
        for t in &o.scenario_thresholds {
            let on = t.row.as_ref().map_or(String::new(), |(m, n)| format!("{m} {n}: "));
            let abort = if t.abort_on_fail { " (abort_on_fail)" } else { "" };
            let _ = writeln!(s, "  threshold: {on}{}{abort}", t.text);
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        s
    }
}

/// One virtual user's own Lua state: the scenario run again in a fresh sandbox (its
/// `endpoints`, `options` and `host` globals then removed), plus the
/// `user` table and the `req` and `res` objects that every hook call reuses.
pub struct UserState {
    pub user: Table,
    pub req_ud: mlua::AnyUserData,
    pub req: api::Req,
    pub res_ud: mlua::AnyUserData,
    pub res: api::Res,
    pub on_start: Option<Function>,
    pub before_request: Option<Function>,
    pub after_response: Option<Function>,
    pub on_stop: Option<Function>,
    pub scenario: Option<Function>,
    pub setup: Option<Function>,
    pub teardown: Option<Function>,
    /// See [`Scenario::waits`].
    pub waits: bool,
    /// Last: every handle above is dropped before the state is closed.
    pub sandbox: Sandbox,
}

impl UserState {
    pub fn new(scenario: &Scenario, id: u64) -> Result<Self, String> {
        let learnt = &scenario.state_bytes;
        let sandbox = Sandbox::new(scenario.limits, learnt.load(Ordering::Relaxed)).map_err(|e| e.to_string())?;
        sandbox.budget.set_user(id);
        let lua = &sandbox.lua;
        lua.set_app_data(scenario.feeds.clone());
        let call = sandbox.call("user state");
        let loaded = lua
            .load(&*scenario.bytecode)
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .exec();
        call.done();
        loaded.map_err(|e| sandbox.describe(&e))?;
        let setup = || -> mlua::Result<_> {
            let user = lua.create_table()?;
            user.raw_set("id", id)?;
            user.raw_set("vars", lua.create_table()?)?;
            let (req_ud, req) = api::new_req(&sandbox, scenario.endpoints.clone())?;
            let (res_ud, res) = api::new_res(&sandbox)?;
            // What loading left behind (the parser's garbage) is freed now, not by the first
            // hook calls: thousands of users would otherwise each carry it.
            // The host holds endpoints, options and host as Rust data: the user's copies are
            // dead weight in every state.
            for name in ["endpoints", "options", "host", "wait_time", "thresholds"] {
                lua.globals().raw_set(name, Value::Nil)?;
            }
            lua.gc_collect()?;
            Ok((user, req_ud, req, res_ud, res))
        };
        let (user, req_ud, req, res_ud, res) = setup().map_err(|e| e.to_string())?;
        learnt.fetch_max(sandbox.carved(), Ordering::Relaxed);
        let g = lua.globals();
        let hook = |name: &str, on: bool| if on { g.get::<Function>(name).ok() } else { None };
        let h = scenario.hooks;
        Ok(Self {
            on_start: hook("on_start", h.on_start),
            before_request: hook("before_request", h.before_request),
            after_response: hook("after_response", h.after_response),
            on_stop: hook("on_stop", h.on_stop),
            scenario: hook("scenario", h.scenario),
            setup: hook("setup", h.setup),
            teardown: hook("teardown", h.teardown),
            waits: scenario.waits,
            user,
            req_ud,
            req,
            res_ud,
            res,
            sandbox,
        })
    }

    /// Calls the hook `name` (one of [`sandbox::CALLS`]) within the call's limits; errors are
    /// described in one line.
    pub fn call<R: mlua::FromLuaMulti>(
        &self,
        name: &'static str,
        f: &Function,
        args: impl mlua::IntoLuaMulti,
    ) -> Result<R, HookError> {
        let call = self.sandbox.call(name);
        let result = f.call(args).map_err(|e| self.hook_error(&e));
        call.done();
        result
    }

    /// Like [`UserState::call`], as a coroutine that may wait on `http` and `sleep` when the
    /// scenario uses them (a waiting user holds up no other user of its thread).
    pub async fn run<R: mlua::FromLuaMulti>(
        &self,
        name: &'static str,
        f: &Function,
        args: impl mlua::IntoLuaMulti,
    ) -> Result<R, HookError> {
        if !self.waits {
            return self.call(name, f, args);
        }
        let call = self.sandbox.call(name);
        let result = f.call_async(args).await.map_err(|e| self.hook_error(&e));
        call.done();
        result
    }

    fn hook_error(&self, e: &mlua::Error) -> HookError {
        let memory = sandbox::is_memory_error(e);
        if memory {
            // What filled the state is garbage now, but Lua collects it in an emergency only when
            // an object cannot be allocated, not when a stack cannot grow: the next call, a
            // little deeper, would fail again and again.
            let _ = self.sandbox.lua.gc_collect();
        }
        HookError {
            limit: self.sandbox.budget.spent() || memory,
            stopped: self.sandbox.budget.hit() == Some(sandbox::Hit::Stop),
            message: self.sandbox.describe(e),
        }
    }
}

/// Why a hook failed: its error, or the sandbox stopping it (CPU, time or memory limit).
#[derive(Debug)]
pub struct HookError {
    pub limit: bool,
    /// The end of the run stopped it (it was still running after the grace period).
    pub stopped: bool,
    pub message: String,
}

impl HookError {
    /// The failure class: "script limit" or "script error", with the hook's name.
    pub fn reason(self, hook: &str) -> crate::stats::Reason {
        let why = format!("{hook}: {}", self.message);
        if self.limit {
            crate::stats::Reason::ScriptLimit(why)
        } else {
            crate::stats::Reason::Script(why)
        }
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(src: &str) -> Result<Scenario> {
        load_source(Path::new("t.lua"), src, Limits::default())
    }

    fn err(src: &str) -> String {
        format!("{:#}", load_str(src).expect_err(src))
    }

    #[test]
    fn loads_tasks_plain_tables_options_and_hooks() {
        let s = load_str(
            r#"
            host = "http://127.0.0.1:8000"
            options = { users = 10, spawn_rate = 2, duration = "30s" }
            endpoints = {
              Task("GET", "/hello", { headers = { ["Content-Type"] = "application/json" } }),
              Task("post", "/api/upload", { json = { name = "test", price = 10 }, weight = 2 }),
              { method = "GET", path = "/items/7", name = "/items/[id]", query = { b = 2, a = "x y" } },
              { method = "POST", url = "http://127.0.0.1:9/x", form = { k = "v&w" }, timeout = "2s" },
            }
            function before_request(user, req) end
            "#,
        )
        .unwrap();
        assert_eq!(s.options.host.as_deref(), Some("http://127.0.0.1:8000"));
        assert_eq!(s.options.users, Some(10));
        assert_eq!(s.options.duration, Some(std::time::Duration::from_secs(30)));
        assert_eq!(s.endpoints.len(), 4);
        assert_eq!(s.endpoints[1].method, hyper::Method::POST);
        assert_eq!(s.endpoints[1].weight, 2);
        let body: serde_json::Value = serde_json::from_slice(s.endpoints[1].body.as_ref().unwrap()).unwrap();
        assert_eq!(body, serde_json::json!({"name": "test", "price": 10}));
        assert_eq!(s.endpoints[1].headers["content-type"], "application/json");
        assert_eq!(s.endpoints[2].name, "/items/[id]");
        assert_eq!(
            s.endpoints[2].query,
            vec![("a".into(), "x y".into()), ("b".into(), "2".into())]
        );
        assert_eq!(s.endpoints[3].body.as_deref(), Some(&b"k=v%26w"[..]));
        assert_eq!(
            s.hooks,
            Hooks {
                before_request: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err("endpoints = {\n Task('GET', '/a'),\n Task('GET', '/b', { weight = 0 }),\n}");
        assert!(
            e.contains("t.lua:3") && e.contains("endpoints[2]") && e.contains("weight"),
            "{e}"
        );
        let e = err("\n\nendpoints = { { method = 'FETCH', path = '/' } }");
        assert!(e.contains("t.lua:3") && e.contains("unknown method"), "{e}");
        let e = err("x = 1\nendpoints = {\n");
        assert!(e.contains("t.lua:") && e.contains("expected"), "{e}");
        assert!(err("host = 'x'\nendpoints = { Task('GET', '/') }").contains("bad host URL"));
        assert!(err("x = 1").contains("no `endpoints`"));
        assert!(err("endpoints = {}").contains("empty"));
        assert!(err("endpoints = { { method = 'GET' } }").contains("path"));
        assert!(err("endpoints = { { method = 'GET', path = '/', heders = {} } }").contains("unknown field `heders`"));
        assert!(err("endpoints = { Task('GET', '/') }\nhost = 'ftp://x'").contains("host"));
        assert!(err("endpoints = { Task('GET', '/') }\noptions = { users = 0 }").contains("users"));
        assert!(err("endpoints = { Task('GET', '/') }\noptions = { duration = 'soon' }").contains("duration"));
        assert!(err("endpoints = { Task('GET', '/') }\non_start = 5").contains("on_start"));
        assert!(err("endpoints = { Task('GET', '/', { json = {}, body = 'x' }) }").contains("at most one"));
        assert!(err("error('boom')").contains("t.lua:1: boom"));
        assert!(err("endpoints = { Task('GET', '/') }\nwait_time = between(3, 1)").contains("a <= b"));
        let warned = load_str("endpoints = { Task('GET', '/') }\nthreshold = { 'p95 < 1ms' }").unwrap();
        assert!(
            warned
                .warnings
                .iter()
                .any(|w| w.contains("`threshold`") && w.contains("`thresholds`")),
            "{:?}",
            warned.warnings
        );
        assert!(err("endpoints = { Task('GET', '/') }\nwait_time = 5").contains("wait_time"));
        assert!(err("endpoints = { Task('GET', '/') }\nwait_time = constant_throughput(0)").contains("n > 0"));
        // A plain table's error points at the entry, not at the end of `endpoints`.
        let e = err(
            "endpoints = {\n  Task('GET', '/a'),\n  -- a comment, with a comma\n  { method = 'GET', path = \"/b,{\" },\n  { method = 'GET', path = '/c', wieght = 2 },\n}",
        );
        assert!(e.contains("t.lua:5: endpoints[3]: unknown field `wieght`"), "{e}");
        let e = err("options = {\n  user = 5,\n}\nendpoints = { Task('GET', '/') }");
        assert!(e.contains("t.lua:3: options: unknown option `user`"), "{e}");
        assert!(err("endpoint = { Task('GET', '/') }").contains("did you mean `endpoints`"));
        assert!(err("endpoints = { Task('POST', '/', { json = '{}' }) }").contains("`json` must be a table"));
        assert!(err("while true do end").contains("instruction budget"));
        // Memory limits while the file loads name the line too.
        let e = err("x = 1\nlocal t = {} for i = 1, 1e8 do t[i] = ('x'):rep(100) .. i end");
        assert!(
            e.starts_with("t.lua:2: scenario stopped while loading: memory limit of 16 MiB reached"),
            "{e}"
        );
        let e = err("\n\nlocal s = string.rep('x', 1 << 30)");
        assert!(
            e.starts_with("t.lua:3: scenario stopped while loading: memory limit of 16 MiB reached"),
            "{e}"
        );
        let e = err("\nlocal s = ('x'):rep(1000)\nlocal t = {}\nwhile true do t[#t + 1] = s .. #t end");
        assert!(
            e.starts_with("t.lua:4: scenario stopped while loading: memory limit"),
            "{e}"
        );
    }

    #[test]
    fn user_state_runs_hooks_in_its_own_sandbox() {
        let s = load_str(
            "endpoints = { Task('GET', '/', { weight = math.max(1, 2) }) }\n\
             counter = 0\n\
             function on_start(user) counter = counter + 1; user.vars.token = 'tok-' .. user.id end",
        )
        .unwrap();
        let a = UserState::new(&s, 1).unwrap();
        let b = UserState::new(&s, 2).unwrap();
        let f = a.on_start.clone().unwrap();
        a.call::<()>("on_start", &f, a.user.clone()).unwrap();
        a.call::<()>("on_start", &f, a.user.clone()).unwrap();
        let vars: Table = a.user.get("vars").unwrap();
        assert_eq!(vars.get::<String>("token").unwrap(), "tok-1");
        assert_eq!(a.sandbox.lua.globals().get::<i64>("counter").unwrap(), 2);
        assert_eq!(
            b.sandbox.lua.globals().get::<i64>("counter").unwrap(),
            0,
            "states are separate"
        );
    }

    #[test]
    fn a_hook_that_hit_the_memory_limit_works_again_on_the_next_call() {
        // A new user's script: after its memory error the state's garbage waited for an
        // emergency collection, which Lua does not run when a stack must grow, and every later
        // call failed at `req.name`. (It prints one line.)
        let s = load_str(
            r#"
            endpoints = { Task("GET", "/") }
            local n = 0
            local bomb = function() local t = {} for i = 1, 1e8 do t[i] = ("x"):rep(100) .. i end end
            function before_request(user, req)
              n = n + 1
              local name = req.name
              if n == 1 then
                local ok, err = pcall(bomb)
                print(string.format("%s: %.2fs, ok=%s err=%s", name, os.clock(), tostring(ok), tostring(err)))
                bomb()
              end
            end
            "#,
        )
        .unwrap();
        let u = UserState::new(&s, 1).unwrap();
        let call = || {
            u.call::<()>(
                "before_request",
                u.before_request.as_ref().unwrap(),
                (&u.user, &u.req_ud),
            )
        };
        let first = call().unwrap_err();
        assert!(
            first.limit && first.message.contains("memory limit"),
            "{}",
            first.message
        );
        for _ in 0..3 {
            call().unwrap();
        }
    }

    #[test]
    fn header_edits_take_the_fast_path_and_the_rest_the_full_one() {
        let s = load_str(
            r#"
            endpoints = { Task("GET", "/") }
            function before_request(user, req)
              req.headers["X-Id"] = user.id             -- fast: an integer
              req.headers["X-Token"] = "t" .. user.id   -- fast: a string
              req.headers["X-Ratio"] = 1.5              -- full: a float
              req.headers["X-Gone"] = "x"
              req.headers["X-Gone"] = nil               -- full: a removal
              req.name = string.rep("\u{e9}", 150)      -- read back the full way (300 bytes)
              req.path = "/edited"
              seen = { req.headers["x-token"], req.method, type(req.headers), #req.name, req.path }
            end
            function after_response(user, req, res)
              req.headers["bad name"] = "x"
            end
            "#,
        )
        .unwrap();
        let u = UserState::new(&s, 3).unwrap();
        u.call::<()>(
            "before_request",
            u.before_request.as_ref().unwrap(),
            (&u.user, &u.req_ud),
        )
        .unwrap();
        let spec = u.req.0.borrow().edits.apply(&s.endpoints[0]);
        assert_eq!(spec.headers["x-id"], "3");
        assert_eq!(spec.headers["x-token"], "t3");
        assert_eq!(spec.headers["x-ratio"], "1.5");
        assert!(!spec.headers.contains_key("x-gone"));
        let seen: Vec<String> = u.sandbox.lua.globals().get::<Vec<String>>("seen").unwrap();
        assert_eq!(seen, ["t3", "GET", "userdata", "300", "/edited"]);
        // The names set with strings and integers were parsed by the fast path (which keeps
        // them); the float and the removal went the full way.
        assert_eq!(u.req.0.borrow().cached_names(), ["X-Id", "X-Token", "X-Gone"]);
        // Errors are the full path's, with the script's line.
        let err = u
            .call::<()>(
                "after_response",
                u.after_response.as_ref().unwrap(),
                (&u.user, &u.req_ud, &u.res_ud),
            )
            .unwrap_err();
        assert!(err.message.contains("bad header name \"bad name\""), "{}", err.message);
        assert!(err.message.starts_with("t.lua:14: req: "), "{}", err.message);
    }

    #[test]
    fn req_and_res_objects_read_the_endpoint_and_record_edits() {
        let s = load_str(
            r#"
            endpoints = { Task("POST", "/items", { headers = { Accept = "text/plain" }, query = { a = 1 }, json = { x = 1 } }) }
            function before_request(user, req)
              seen = { req.method, req.path, req.name, req.headers.accept, req.headers["ACCEPT"], req.query.a, req.body, req.url }
              listed = {}
              for k, v in pairs(req.headers) do listed[#listed + 1] = k .. "=" .. v end
              table.sort(listed)
              req.query.a = 2            -- a copy: no effect
              req.headers["X-User"] = user.id
              req.headers.accept = nil
              req.json = { y = 2 }
              req.name = "renamed"
            end
            function after_response(user, req, res)
              got = { res.status, res.body, res.headers["content-type"], req.name, res.elapsed_ms > 0 }
            end
            "#,
        )
        .unwrap();
        let u = UserState::new(&s, 7).unwrap();
        let g = u.sandbox.lua.globals();
        u.call::<()>(
            "before_request",
            u.before_request.as_ref().unwrap(),
            (&u.user, &u.req_ud),
        )
        .unwrap();
        let seen: Vec<Value> = g
            .get::<Table>("seen")
            .unwrap()
            .sequence_values()
            .map(|v| v.unwrap())
            .collect();
        let text: Vec<String> = seen.iter().map(|v| v.to_string().unwrap_or_default()).collect();
        assert_eq!(
            text,
            ["POST", "/items", "/items", "text/plain", "text/plain", "1", "{\"x\":1}"],
            "{text:?}"
        );
        let listed: Vec<String> = g
            .get::<Table>("listed")
            .unwrap()
            .sequence_values()
            .map(|v| v.unwrap())
            .collect();
        assert_eq!(listed, ["accept=text/plain", "content-type=application/json"]);

        let spec = {
            let req = u.req.0.borrow();
            assert!(req.edits.changes_wire());
            assert!(req.edits.query.is_none(), "req.query is a copy");
            req.edits.apply(&s.endpoints[0])
        };
        assert_eq!(spec.name, "renamed");
        assert_eq!(spec.headers["x-user"], "7");
        assert!(!spec.headers.contains_key("accept"));
        assert_eq!(spec.body.as_deref(), Some(&b"{\"y\":2}"[..]));
        assert_eq!(spec.query, vec![("a".to_string(), "1".to_string())]);

        let mut headers = hyper::HeaderMap::new();
        headers.insert("content-type", "text/plain".parse().unwrap());
        u.res.0.borrow_mut().set(
            201,
            headers,
            bytes::Bytes::from_static(b"ok"),
            std::time::Duration::from_millis(3),
        );
        u.call::<()>(
            "after_response",
            u.after_response.as_ref().unwrap(),
            (&u.user, &u.req_ud, &u.res_ud),
        )
        .unwrap();
        let got: Vec<String> = g
            .get::<Table>("got")
            .unwrap()
            .sequence_values::<Value>()
            .map(|v| v.unwrap().to_string().unwrap())
            .collect();
        assert_eq!(got, ["201", "ok", "text/plain", "renamed", "true"]);

        let bad = load_str("endpoints = { Task('GET', '/') }\nfunction before_request(user, req) req.header = {} end")
            .unwrap();
        let u = UserState::new(&bad, 1).unwrap();
        let err = u
            .call::<()>(
                "before_request",
                u.before_request.as_ref().unwrap(),
                (&u.user, &u.req_ud),
            )
            .unwrap_err();
        assert!(err.message.contains("req: no field `header`"), "{err}");
        assert!(!err.limit);
    }

    #[test]
    fn absurd_headers_json_and_think_times_are_refused_at_load_with_the_line() {
        let with_headers = |n: usize| {
            format!(
                "local h = {{}} for i = 1, {n} do h['x-h' .. i] = 'v' end\n\nendpoints = {{ Task('GET', '/hello', {{ headers = h }}) }}"
            )
        };
        for n in [1001, 40_000] {
            let e = err(&with_headers(n));
            assert_eq!(
                e, "t.lua:3: endpoints[1]: `headers`: a request has at most 1000 headers",
                "{n} headers"
            );
        }
        assert_eq!(load_str(&with_headers(1000)).unwrap().endpoints[0].headers.len(), 1000);

        // The text is held to the state's memory limit: one string of 1 MiB held 17 times.
        let e = err(
            "local s, t = string.rep('x', 1 << 20), {}\nfor i = 1, 17 do t[i] = s end\nendpoints = { Task('POST', '/x', { json = t }) }",
        );
        assert_eq!(
            e,
            "t.lua:3: endpoints[1]: `json`: the JSON would be larger than 16.0 MiB (the memory limit)"
        );
        // A table that holds another twice, a hundred levels deep: 2^100 leaves as JSON. The
        // work stops with the text, at the limit (a state of 1 MiB here, to be quick).
        let e = load_source(
            Path::new("t.lua"),
            "local t = {} for i = 1, 100 do t = {t, t} end\nendpoints = { Task('POST', '/x', { json = t }) }",
            SMALL,
        )
        .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "t.lua:2: endpoints[1]: `json`: the JSON would be larger than 1.0 MiB (the memory limit)"
        );

        for wait in [
            "constant_pacing(1e308)",
            "constant_throughput(1e-320)",
            "constant_throughput(1e-9)",
            "constant(31536001)",
            "between(0, 1e300)",
        ] {
            let e = err(&format!("endpoints = {{ Task('GET', '/') }}\n\nwait_time = {wait}"));
            assert!(
                e.starts_with("t.lua:3: `wait_time`: a pause is at most 365 days"),
                "{wait}: {e}"
            );
        }
        let year = load_str("endpoints = { Task('GET', '/') }\nwait_time = constant_pacing(31536000)").unwrap();
        let pause = year.wait.unwrap().pause(std::time::Duration::ZERO, 0.5);
        assert_eq!(pause, crate::config::MAX_DURATION);
        // The pause itself cannot panic, whatever it is given.
        for w in [
            api::Wait::Pacing(f64::INFINITY),
            api::Wait::Constant(1e308),
            api::Wait::Between(0.0, f64::NAN),
        ] {
            assert!(w.pause(std::time::Duration::ZERO, 0.5) <= crate::config::MAX_DURATION);
        }
    }

    /// A state of 1 MiB: work bounded by the memory limit is quick to reach there.
    const SMALL: Limits = Limits {
        memory: 1 << 20,
        instructions: 100_000_000,
        time: sandbox::DEFAULT_SCRIPT_TIMEOUT,
    };

    #[test]
    fn hooks_past_the_header_cap_or_with_json_past_the_memory_fail_as_script_errors() {
        let s = load_source(
            Path::new("t.lua"),
            r#"
            endpoints = { Task("GET", "/", { headers = { A = "1", B = "2" } }) }
            function before_request(user, req)
              for i = 1, 10000 do req.headers["X-Same"] = i end   -- one edit, replaced
              for i = 1, 997 do req.headers["x-h" .. i] = "v" end -- 2 + 1 + 997: the cap
              if user.id == 2 then req.headers["one-more"] = "v" end
              if user.id == 3 then req.headers["one-more"] = 1.5 end
              if user.id == 4 then req.headers = { A = "1", B = "2" } req.headers["x-h1"] = "v" end
            end
            function after_response(user, req, res)
              local t = {} for i = 1, 100 do t = {t, t} end
              req.json = t
            end
            "#,
            SMALL,
        )
        .unwrap();
        let before = |id| {
            let u = UserState::new(&s, id).unwrap();
            let r = u.call::<()>(
                "before_request",
                u.before_request.as_ref().unwrap(),
                (&u.user, &u.req_ud),
            );
            (u, r)
        };
        let (u, ok) = before(1);
        ok.unwrap();
        let spec = u.req.0.borrow().edits.apply(&s.endpoints[0]);
        assert_eq!(spec.headers.len(), 1000);
        assert_eq!(spec.headers["x-same"], "10000");
        assert_eq!(u.req.0.borrow().edits.header_edits.len(), 998, "an edit per name");
        for id in [2, 3] {
            let e = before(id).1.unwrap_err();
            assert!(
                e.message
                    .starts_with("t.lua:6: req: `headers`: a request has at most 1000 headers")
                    || e.message
                        .starts_with("t.lua:7: req: `headers`: a request has at most 1000 headers"),
                "user {id}: {}",
                e.message
            );
            assert!(!e.limit, "a script error, not a limit");
        }
        before(4).1.unwrap();
        let e = u
            .call::<()>(
                "after_response",
                u.after_response.as_ref().unwrap(),
                (&u.user, &u.req_ud, &u.res_ud),
            )
            .unwrap_err();
        assert!(
            e.message
                .ends_with("req: `json`: the JSON would be larger than 1.0 MiB (the memory limit)"),
            "{}",
            e.message
        );
        assert!(!e.limit);
    }

    #[test]
    fn long_request_names_are_cut_as_reasons_are_and_share_a_row() {
        let long = "a".repeat(4000);
        let s = load_str(&format!(
            "endpoints = {{\n  Task('GET', '/a', {{ name = '{long}1' }}),\n  Task('GET', '/b', {{ name = '{long}2' }}),\n  Task('GET', '/{long}'),\n}}\nfunction before_request(user, req) req.name = string.rep('\\u{{e9}}', 1000) .. user.id end"
        ))
        .unwrap();
        let cut = format!("{}…", "a".repeat(200));
        assert_eq!(s.endpoints[0].name, cut);
        assert_eq!(s.endpoints[1].name, cut, "names that differ past the cut are one");
        assert_eq!(
            s.endpoints[2].name,
            format!("/{}…", "a".repeat(199)),
            "a path naming its row too"
        );
        let u = UserState::new(&s, 1).unwrap();
        u.call::<()>(
            "before_request",
            u.before_request.as_ref().unwrap(),
            (&u.user, &u.req_ud),
        )
        .unwrap();
        assert_eq!(
            u.req.0.borrow().edits.name.as_deref(),
            Some(format!("{}…", "\u{e9}".repeat(200)).as_str())
        );
    }

    #[test]
    fn a_load_error_without_a_position_names_the_file() {
        let deep = format!(
            "local x = {}1{}\nendpoints = {{ Task('GET', '/') }}",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        let e = err(&deep);
        assert!(e.starts_with("t.lua: ") && e.contains("C stack overflow"), "{e}");
        // One that has a position keeps it as it is.
        assert_eq!(err("\nerror('boom')"), "t.lua:2: boom");
    }

    #[test]
    fn check_shows_every_option_the_scenario_sets() {
        let s = load_str(
            "options = { users = 2, spawn_rate = 3, duration = '1m', timeout = '2s', grace = '1s', script_timeout = '1s', script_memory = '64MiB' }\nendpoints = { Task('GET', '/') }",
        )
        .unwrap();
        let text = s.describe();
        assert!(
            text.contains(
                "  options: users=2 spawn_rate=3 duration=1m timeout=2s grace=1s script_timeout=1s script_memory=64MiB\n"
            ),
            "{text}"
        );
        let only = load_str("options = { script_timeout = '1s' }\nendpoints = { Task('GET', '/') }").unwrap();
        assert!(
            only.describe().contains("  options: script_timeout=1s\n"),
            "{}",
            only.describe()
        );
    }
}
