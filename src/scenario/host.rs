//! What a scenario reaches beyond its own state: `http` and `sleep` (asynchronous: a waiting
//! user holds up no other user), `check` and `log`, through the [`UserHost`] of the user the
//! state belongs to; and the helpers `json`, `uuid` and `rand`. Each global is made the first
//! time a script touches it (see the sandbox's `_G` metatable), so a state that never uses one does
//! not carry it.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::HeaderMap;
use mlua::{Lua, LuaSerdeExt, Table, Value, Variadic};
use rand::RngExt;

use super::api::{self, RequestSpec, Res, ResState};

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
    /// Waits, or less if the run stops meanwhile.
    fn sleep(&self, pause: Duration) -> LocalFuture<()>;
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
            host.sleep(pause).await;
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

/// Refuses to wait from a coroutine the script made (see [`sandbox::in_script_coroutine`]):
/// checked before anything is sent or counted.
fn may_wait(lua: &Lua, what: impl FnOnce() -> String) -> mlua::Result<()> {
    if super::sandbox::in_script_coroutine(lua) {
        return Err(mlua::Error::runtime(format!(
            "{}: cannot wait inside a coroutine the script made (coroutine.create or wrap); \
             call it from the hook or scenario() itself",
            what()
        )));
    }
    Ok(())
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
    let reply = host.request(spec).await.map_err(mlua::Error::runtime)?;
    let mut state = ResState::default();
    state.set(reply.status, reply.headers, reply.body, reply.elapsed);
    state.error = reply.error;
    Ok(Value::UserData(lua.create_userdata(Res(Rc::new(state.into())))?))
}

/// `json.encode(value)` and `json.decode(text)` (JSON null becomes nil).
fn json_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "encode",
        lua.create_function(|_, v: Value| {
            serde_json::to_string(&v).map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))
        })?,
    )?;
    t.raw_set(
        "decode",
        lua.create_function(|lua, text: mlua::LuaString| {
            decode_json(lua, &text.as_bytes()).map_err(|e| mlua::Error::runtime(format!("json.decode: {e}")))
        })?,
    )?;
    Ok(t)
}

/// JSON text as a Lua value (null as nil), for `json.decode` and `res:json()`.
pub fn decode_json(lua: &Lua, text: &[u8]) -> Result<Value, String> {
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let options = mlua::serde::SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.to_value_with(&v, options).map_err(|e| e.to_string())
}

/// `log.info(...)`, `log.warn(...)`, `log.error(...)`: a line on stderr each, at most
/// [`LOG_PER_SECOND`] a second across all users (the rest are counted, and the count is said).
fn log_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for level in ["info", "warn", "error"] {
        let f = lua.create_function(move |_, args: Variadic<Value>| {
            let text: Vec<String> = args
                .iter()
                .map(|v| v.to_string().unwrap_or_else(|_| api::show(v)))
                .collect();
            log_line(level, &text.join(" "));
            Ok(())
        })?;
        t.raw_set(level, f)?;
    }
    Ok(t)
}

const LOG_PER_SECOND: u32 = 20;

static LOG_LIMIT: Mutex<Option<(Instant, u32, u64)>> = Mutex::new(None);

/// Says how many log lines were dropped since the last line (at the end of a run).
pub fn flush_log() {
    if let Ok(mut guard) = LOG_LIMIT.lock()
        && let Some((_, _, dropped)) = guard.as_mut()
        && *dropped > 0
    {
        eprintln!("[log] {dropped} lines were dropped (more than {LOG_PER_SECOND} a second)");
        *dropped = 0;
    }
}

fn log_line(level: &str, text: &str) {
    let Ok(mut guard) = LOG_LIMIT.lock() else { return };
    let now = Instant::now();
    let (since, lines, dropped) = guard.get_or_insert((now, 0, 0));
    if now.duration_since(*since) >= Duration::from_secs(1) {
        if *dropped > 0 {
            eprintln!("[log] {dropped} lines were dropped (more than {LOG_PER_SECOND} a second)");
        }
        (*since, *lines, *dropped) = (now, 0, 0);
    }
    if *lines < LOG_PER_SECOND {
        *lines += 1;
        eprintln!("[{level}] {text}");
    } else {
        *dropped += 1;
    }
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
    fn uuids_are_version_4_and_distinct() {
        let a = uuid_v4();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert_ne!(a, uuid_v4());
    }
}
