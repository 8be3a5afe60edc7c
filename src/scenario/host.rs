//! What a scenario reaches beyond its own state: `http` and `sleep` (asynchronous: a waiting
//! user holds up no other user), `check` and `log`, through the [`UserHost`] of the user the
//! state belongs to; and the helpers `json`, `uuid` and `rand`. Each global is made the first
//! time a script touches it (see the sandbox's `_G` metatable), so a state that never uses one does
//! not carry it.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::HeaderMap;
use mlua::{Lua, Table, Value, Variadic};
use rand::RngExt;

use super::api::{self, RequestSpec, Res, ResState};
use super::sandbox::{Budget, Running};
use crate::console::{self, SCRIPT_LINE_BYTES};

pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// What a request made from Lua brought back. `status` is 0 when no response came (`error`
/// then says why).
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
    pub error: Option<String>,
}

/// The run stopped: no new request is sent, and the Lua code that asked unwinds.
pub const STOPPING: &str = "the run is stopping";

/// The host side of one user, set as its state's app data while the user runs.
pub trait UserHost {
    /// Sends the request, records it in the stats under its name, and returns what came back;
    /// `Err` once the run is stopping.
    fn request(&self, spec: RequestSpec) -> LocalFuture<Result<Reply, String>>;
    /// Waits; `false` if the run stopped meanwhile (or had stopped), cutting the wait short.
    fn sleep(&self, pause: Duration) -> LocalFuture<bool>;
    /// Counts a check under its description.
    fn check(&self, name: &str, passed: bool);
    /// Lets this state send after the run began stopping (`on_stop`, `teardown`).
    fn allow_after_stop(&self);
}

/// The globals made on first use.
pub const NAMES: [&str; 8] = ["http", "sleep", "check", "log", "json", "uuid", "rand", "data"];

/// Makes the global `name` (one of [`NAMES`]).
pub fn open(lua: &Lua, name: &str) -> mlua::Result<Value> {
    Ok(match name {
        "http" => Value::Table(http_table(lua)?),
        "sleep" => Value::Function(lua.create_async_function(|lua, seconds: Value| async move {
            may_wait(&lua, || "sleep".into())?;
            let pause = api::duration_value(&seconds).map_err(|e| mlua::Error::runtime(format!("sleep: {e}")))?;
            let host = user_host(&lua, "sleep")?;
            let waiting = Waiting::begin(&lua);
            let slept = host.sleep(pause).await;
            drop(waiting);
            if !slept {
                return Err(stopping(&lua));
            }
            Ok(())
        })?),
        "check" => Value::Function(lua.create_function(|lua, (value, name): (Value, Option<String>)| {
            let name =
                name.ok_or_else(|| mlua::Error::runtime("check(value, \"description\"): the description is missing"))?;
            let passed = !matches!(value, Value::Nil | Value::Boolean(false));
            user_host(lua, "check")?.check(&name, passed);
            Ok(passed)
        })?),
        "log" => Value::Table(log_table(lua)?),
        "json" => Value::Table(json_table(lua)?),
        "uuid" => Value::Function(lua.create_function(|_, ()| Ok(uuid_v4()))?),
        "rand" => Value::Table(rand_table(lua)?),
        "data" => Value::Table(super::feed::data_table(lua)?),
        other => api::constructor(lua, other)?.map_or(Value::Nil, Value::Function),
    })
}

/// A wait of the running call (`http`, `sleep`), from `begin` until dropped: that time does not
/// count against the call's time limit.
struct Waiting(Option<(Rc<Budget>, Instant)>);

impl Waiting {
    fn begin(lua: &Lua) -> Self {
        Self(lua.app_data_ref::<Rc<Budget>>().map(|b| (b.clone(), Instant::now())))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some((budget, since)) = &self.0 {
            budget.waited(*since);
        }
    }
}

/// Refuses to wait from where the host cannot be waited for (see
/// [`sandbox::where_it_runs`]): checked before anything is sent or counted.
fn may_wait(lua: &Lua, what: impl FnOnce() -> String) -> mlua::Result<()> {
    let running = super::sandbox::where_it_runs(lua);
    let hosted = lua.app_data_ref::<Rc<dyn UserHost>>().is_some();
    if hosted && running == Running::Hook {
        return Ok(());
    }
    let what = what();
    // While the file loads there is no user to wait for (that error says so).
    if !hosted {
        user_host(lua, &what)?;
    }
    let why = match running {
        Running::Hook | Running::ScriptCoroutine => "inside a coroutine the script made (coroutine.create or wrap)",
        Running::CFunction => {
            "inside a function a library function calls back (table.sort's comparator, string.gsub's \
             replacement, __tostring, an xpcall message handler, load's reader)"
        }
    };
    Err(mlua::Error::runtime(format!(
        "{what}: cannot wait {why}; call it from the hook or scenario() itself"
    )))
}

/// The run is stopping: the waiting function ends the call (and no `pcall` catches it).
fn stopping(lua: &Lua) -> mlua::Error {
    if let Some(budget) = lua.app_data_ref::<Rc<Budget>>() {
        budget.stop_call();
    }
    mlua::Error::runtime(STOPPING)
}

fn user_host(lua: &Lua, what: &str) -> mlua::Result<Rc<dyn UserHost>> {
    lua.app_data_ref::<Rc<dyn UserHost>>()
        .map(|h| h.clone())
        .ok_or_else(|| {
            mlua::Error::runtime(format!(
                "{what}: only inside hooks and scenario(), not while the file loads"
            ))
        })
}

/// `http.get(path_or_url, opts)` and friends, and `http.request(method, path_or_url, opts)`.
fn http_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (name, method) in [
        ("get", "GET"),
        ("post", "POST"),
        ("put", "PUT"),
        ("patch", "PATCH"),
        ("delete", "DELETE"),
        ("head", "HEAD"),
        ("options", "OPTIONS"),
    ] {
        let f = lua.create_async_function(move |lua, (target, opts): (Value, Option<Table>)| async move {
            may_wait(&lua, || format!("http.{name}"))?;
            let spec = request_spec(&lua, name, Value::String(lua.create_string(method)?), target, opts)?;
            send(lua, spec).await
        })?;
        t.raw_set(name, f)?;
    }
    let request = lua.create_async_function(
        |lua, (method, target, opts): (Value, Value, Option<Table>)| async move {
            may_wait(&lua, || "http.request".into())?;
            let spec = request_spec(&lua, "request", method, target, opts)?;
            send(lua, spec).await
        },
    )?;
    t.raw_set("request", request)?;
    Ok(t)
}

/// What `opts` of an `http` call may hold: an endpoint's fields but method, target and weight.
const HTTP_OPTIONS: [&str; 7] = ["headers", "query", "json", "body", "form", "name", "timeout"];

/// The request `http.<what>` describes, checked as an endpoint entry is.
fn request_spec(lua: &Lua, what: &str, method: Value, target: Value, opts: Option<Table>) -> mlua::Result<RequestSpec> {
    let t = lua.create_table()?;
    if let Some(opts) = opts {
        for pair in opts.pairs::<Value, Value>() {
            let (k, v) = pair?;
            let known = matches!(&k, Value::String(s) if HTTP_OPTIONS.iter().any(|o| s.as_bytes() == o.as_bytes()));
            if !known {
                return Err(mlua::Error::runtime(format!(
                    "http.{what}: unknown option {} (options: {})",
                    api::show(&k),
                    HTTP_OPTIONS.join(", ")
                )));
            }
            t.raw_set(k, v)?;
        }
    }
    t.raw_set("method", method)?;
    let key = match &target {
        Value::String(s) if api::is_absolute(&s.to_string_lossy()) => "url",
        _ => "path",
    };
    t.raw_set(key, target)?;
    api::parse_request(&t).map_err(|e| mlua::Error::runtime(format!("http.{what}: {e}")))
}

async fn send(lua: Lua, spec: RequestSpec) -> mlua::Result<Value> {
    let host = user_host(&lua, "http")?;
    let waiting = Waiting::begin(&lua);
    let reply = host.request(spec).await;
    drop(waiting);
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) if e == STOPPING => return Err(stopping(&lua)),
        Err(e) => return Err(mlua::Error::runtime(e)),
    };
    let mut state = ResState::default();
    state.set(reply.status, reply.headers, reply.body, reply.elapsed);
    state.error = reply.error;
    // The body is the script's to hold (in a table, for as long as it likes): it counts as
    // the state's memory. (The request itself was sent and counted.)
    if let Some(budget) = lua.app_data_ref::<Rc<Budget>>()
        && !state.charge_body(&budget)
    {
        return Err(mlua::Error::MemoryError(format!(
            "a response body of {} bytes does not fit in the script's memory",
            state.body.len()
        )));
    }
    Ok(Value::UserData(lua.create_userdata(Res(Rc::new(state.into())))?))
}

/// `json.encode(value)` and `json.decode(text)` (JSON null becomes nil).
fn json_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "encode",
        lua.create_function(|lua, v: Value| {
            // The text becomes a string of the state: it may not outgrow the state's memory.
            let cap = lua.app_data_ref::<Rc<Budget>>().map_or(usize::MAX, |b| b.memory());
            match api::json_text(&v, cap) {
                Ok(text) => lua.create_string(&text),
                Err(api::JsonError::TooLarge(why)) => Err(mlua::Error::MemoryError(format!("json.encode: {why}"))),
                Err(api::JsonError::Invalid(why)) => Err(mlua::Error::runtime(format!("json.encode: {why}"))),
            }
        })?,
    )?;
    t.raw_set(
        "decode",
        lua.create_function(|lua, text: mlua::LuaString| {
            decode_json(lua, &text.as_bytes()).map_err(|e| prefixed(e, "json.decode"))
        })?,
    )?;
    Ok(t)
}

/// `e` with `what: ` before its message; a memory error stays one (the host reports it as the
/// memory limit).
pub fn prefixed(e: mlua::Error, what: &str) -> mlua::Error {
    match e {
        mlua::Error::MemoryError(_) => e,
        mlua::Error::RuntimeError(m) => mlua::Error::runtime(format!("{what}: {m}")),
        other => mlua::Error::runtime(format!("{what}: {other}")),
    }
}

/// JSON text as a Lua value (null as nil), for `json.decode` and `res:json()`: built in the
/// state as it is parsed, so that it is held to the state's memory limit (no copy of the
/// whole document is made outside it). A memory error stays one.
pub fn decode_json(lua: &Lua, text: &[u8]) -> mlua::Result<Value> {
    use serde::de::DeserializeSeed;
    let failed = std::cell::RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = LuaJson { lua, failed: &failed }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    match (value, failed.into_inner()) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(lua_error)) => Err(lua_error),
        (Err(e), None) => Err(mlua::Error::runtime(format!("not valid JSON: {e}"))),
    }
}

/// Builds the Lua value of a JSON document as serde_json reads it; a Lua error (memory) is
/// kept in `failed` to be returned as it is.
#[derive(Clone, Copy)]
struct LuaJson<'a> {
    lua: &'a Lua,
    failed: &'a std::cell::RefCell<Option<mlua::Error>>,
}

impl LuaJson<'_> {
    fn lua<T, E: serde::de::Error>(&self, r: mlua::Result<T>) -> Result<T, E> {
        r.map_err(|e| {
            let text = e.to_string();
            *self.failed.borrow_mut() = Some(e);
            E::custom(text)
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for LuaJson<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for LuaJson<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::Number(v as f64), Value::Integer))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.lua(self.lua.create_string(v)).map(Value::String)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let t = self.lua(self.lua.create_table())?;
        let mut i = 1i64;
        while let Some(v) = seq.next_element_seed(self)? {
            self.lua(t.raw_set(i, v))?;
            i += 1;
        }
        Ok(Value::Table(t))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let t = self.lua(self.lua.create_table())?;
        while let Some(k) = map.next_key_seed(self)? {
            let v = map.next_value_seed(self)?;
            self.lua(t.raw_set(k, v))?;
        }
        Ok(Value::Table(t))
    }
}

/// `log.info(...)`, `log.warn(...)`, `log.error(...)`: a line on stderr each, with the
/// limits of [`script_line`].
fn log_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for level in ["info", "warn", "error"] {
        let f = lua.create_function(move |_, args: Variadic<Value>| {
            script_line(&format!("[{level}] "), " ", &args);
            Ok(())
        })?;
        t.raw_set(level, f)?;
    }
    Ok(t)
}

/// `print(...)`: its values, tab-separated, as a line on stderr (never stdout, where the
/// tables go), with the limits of [`script_line`].
pub fn print(_: &Lua, args: Variadic<Value>) -> mlua::Result<()> {
    script_line("", "\t", &args);
    Ok(())
}

/// The line of `args` (after `prefix`, joined by `sep`), handed to the console: a script never
/// waits on stderr, and writes at most [`console::SCRIPT_LINES_PER_SECOND`] lines a second across all
/// users, each cut at [`SCRIPT_LINE_BYTES`]. Control characters are shown escaped (`\x1b`),
/// so that a response body printed cannot rewrite the terminal; each line of a multi-line text
/// carries the prefix.
fn script_line(prefix: &str, sep: &str, args: &[Value]) {
    if console::admit_script_line() {
        console::line(shown_line(prefix, sep, args));
    }
}

/// The text of [`script_line`].
fn shown_line(prefix: &str, sep: &str, args: &[Value]) -> String {
    let mut line = String::from(prefix);
    let (mut cut, mut left) = (0usize, 0usize);
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            line.push_str(sep);
        }
        let room = SCRIPT_LINE_BYTES.saturating_sub(line.len());
        if room == 0 {
            // The line is full: the rest is not even made into text (a `__tostring` each).
            left = args.len() - i;
            break;
        }
        match v {
            // A long string's text is not copied whole to be cut.
            Value::String(s) => {
                let bytes = s.as_bytes();
                let take = floor_char_boundary(&bytes, room);
                push_shown(&mut line, &String::from_utf8_lossy(&bytes[..take]), prefix);
                cut += bytes.len() - take;
            }
            other => {
                let text = other.to_string().unwrap_or_else(|_| api::show(other));
                let take = floor_char_boundary(text.as_bytes(), room);
                push_shown(&mut line, &text[..take], prefix);
                cut += text.len() - take;
            }
        }
    }
    match (cut, left) {
        (0, 0) => {}
        (cut, 0) => line.push_str(&format!(" ... ({cut} more bytes cut)")),
        (cut, left) => line.push_str(&format!(" ... ({cut} more bytes and {left} more values cut)")),
    }
    line
}

/// Appends `text` to `line` with control characters escaped (tab and newline kept; each new
/// line starts with `prefix`).
fn push_shown(line: &mut String, text: &str, prefix: &str) {
    for c in text.chars() {
        match c {
            '\t' => line.push(c),
            '\n' => {
                line.push('\n');
                line.push_str(prefix);
            }
            c if c.is_control() => line.push_str(&format!("\\x{:02x}", c as u32)),
            c => line.push(c),
        }
    }
}

/// The largest `n <= max` at which `bytes` can be cut without splitting a UTF-8 character
/// (bytes that are not UTF-8 are cut anywhere).
fn floor_char_boundary(bytes: &[u8], max: usize) -> usize {
    if bytes.len() <= max {
        return bytes.len();
    }
    let mut n = max;
    while n > 0 && n > max.saturating_sub(3) && (bytes[n] & 0xC0) == 0x80 {
        n -= 1;
    }
    n
}

/// `rand.int(a, b)` (both included) and `rand.pick(list)`.
fn rand_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "int",
        lua.create_function(|_, (a, b): (i64, i64)| {
            if a > b {
                return Err(mlua::Error::runtime(format!("rand.int({a}, {b}): the first is larger")));
            }
            Ok(rand::rng().random_range(a..=b))
        })?,
    )?;
    t.raw_set(
        "pick",
        lua.create_function(|_, list: Table| {
            let n = list.raw_len();
            if n == 0 {
                return Ok(Value::Nil);
            }
            list.raw_get::<Value>(rand::rng().random_range(1..=n))
        })?,
    )?;
    Ok(t)
}

/// A random (version 4) UUID.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_lines_are_cut_escaped_and_made_of_what_fits() {
        let lua = Lua::new();
        let s = |t: &str| Value::String(lua.create_string(t).unwrap());
        assert_eq!(shown_line("[info] ", " ", &[s("a"), Value::Integer(2)]), "[info] a 2");
        // Control characters cannot rewrite the terminal; each line carries the prefix.
        assert_eq!(
            shown_line("[info] ", " ", &[s("red \u{1b}[31m bell \u{7} cr \r two\nlines\t.")]),
            "[info] red \\x1b[31m bell \\x07 cr \\x0d two\n[info] lines\t."
        );
        // Cut at 4 KiB, on a character boundary, with the size of the rest.
        let long = shown_line("", "\t", &[s(&"\u{e9}".repeat(3000))]);
        assert!(
            long.len() <= SCRIPT_LINE_BYTES + 40 && long.ends_with(" ... (1904 more bytes cut)"),
            "{}",
            &long[long.len() - 40..]
        );
        // Past a full line, the values are not even made into text.
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let seen = calls.clone();
        let mt = lua.create_table().unwrap();
        mt.set(
            "__tostring",
            lua.create_function(move |_, ()| {
                seen.set(seen.get() + 1);
                Ok("x".repeat(5000))
            })
            .unwrap(),
        )
        .unwrap();
        let t = lua.create_table().unwrap();
        t.set_metatable(Some(mt)).unwrap();
        let many: Vec<Value> = (0..1000).map(|_| Value::Table(t.clone())).collect();
        let line = shown_line("", "\t", &many);
        assert_eq!(calls.get(), 1, "one value filled the line");
        assert!(
            line.ends_with(" ... (904 more bytes and 999 more values cut)"),
            "{}",
            &line[line.len() - 50..]
        );
    }

    #[test]
    fn json_encode_of_a_table_that_holds_another_twice_stops_at_the_memory_limit() {
        let limits = super::super::sandbox::Limits {
            memory: 1 << 20,
            ..Default::default()
        };
        let sb = super::super::sandbox::Sandbox::new(limits, 0).unwrap();
        let _call = sb.call("the scenario file");
        let started = Instant::now();
        let err = sb
            .lua
            .load("local t = {} for i = 1, 100 do t = {t, t} end return json.encode(t)")
            .set_name("@t.lua")
            .exec()
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(super::super::sandbox::is_memory_error(&err), "{err}");
        assert!(
            sb.describe(&err).starts_with("memory limit of 1 MiB reached"),
            "{}",
            sb.describe(&err)
        );
    }

    #[test]
    fn uuids_are_version_4_and_distinct() {
        let a = uuid_v4();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert_ne!(a, uuid_v4());
    }
}
