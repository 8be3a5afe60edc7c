//! Everything a scenario can call or receive: the `Task` helper, the request table (an entry of
//! `endpoints`), and the `req` and `res` objects hooks receive.
//!
//! The request fields (SPEC, "Scenario file"): `method`, `path` | `url`, `headers`, `query`, one
//! of `json` / `body` / `form`, `name`, `weight`, `timeout`. Each field has one validator here,
//! used both when `endpoints` loads and when a hook assigns to `req`.
//!
//! `req` and `res` are userdata, not tables: each user has one of each, reused for every call,
//! so a hook call builds no table (a table per call costs ~2 µs and feeds the garbage
//! collector). Reading `req.x` reads the endpoint's prepared value; assigning records an edit;
//! after the hook the user sends the endpoint's prepared request untouched when nothing was
//! edited.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use mlua::{AnyUserData, Lua, MetaMethod, Table, UserData, UserDataMethods, Value};

use super::sandbox::Sandbox;
use crate::config::parse_duration;

/// Methods a scenario may use.
pub const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"];

/// Where a request goes: a path joined to the host, or an absolute URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Path(String),
    Url(String),
}

impl Target {
    pub fn as_str(&self) -> &str {
        match self {
            Target::Path(s) | Target::Url(s) => s,
        }
    }
}

/// A request as the scenario describes it, validated but not yet bound to a host.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub method: Method,
    pub target: Target,
    pub headers: HeaderMap,
    /// Query pairs, sorted by key so the URL is the same on every run.
    pub query: Vec<(String, String)>,
    pub body: Option<Bytes>,
    pub name: String,
    pub weight: u32,
    pub timeout: Option<Duration>,
}

const FIELDS: &[&str] = &[
    "method", "path", "url", "headers", "query", "json", "body", "form", "name", "weight", "timeout",
];

type FieldResult<T> = Result<T, String>;

/// The most headers a request of the scenario's may have (its `headers`, and what its hooks
/// set): far above real use, and far below what a header map can hold. (The few stormlight
/// adds itself, `host`, `user-agent`, `content-length`, a body's `content-type`, are not
/// counted.)
pub const MAX_REQUEST_HEADERS: usize = 1000;

fn too_many_headers() -> String {
    format!("`headers`: a request has at most {MAX_REQUEST_HEADERS} headers")
}

fn method_value(v: &Value) -> FieldResult<Method> {
    match v {
        Value::String(s) => {
            let m = s.to_string_lossy().to_ascii_uppercase();
            if !METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "unknown method {:?} (use one of {})",
                    s.to_string_lossy(),
                    METHODS.join(", ")
                ));
            }
            Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())
        }
        Value::Nil => Err("`method` is missing".into()),
        other => Err(format!("`method` must be a string, got {}", show(other))),
    }
}

fn path_value(p: String) -> Target {
    if is_absolute(&p) {
        Target::Url(p)
    } else if p.starts_with('/') {
        Target::Path(p)
    } else {
        Target::Path(format!("/{p}"))
    }
}

fn url_value(u: String) -> FieldResult<Target> {
    if is_absolute(&u) {
        Ok(Target::Url(u))
    } else {
        Err(format!(
            "`url` must be absolute (http:// or https://), got {:?}",
            crate::http::redact_input(&u)
        ))
    }
}

fn header_pair(k: &Value, v: &Value) -> FieldResult<(HeaderName, HeaderValue)> {
    // Strings straight from Lua's bytes: hooks set headers on every request.
    let name = match k {
        Value::String(s) => HeaderName::from_bytes(&s.as_bytes()),
        other => HeaderName::from_bytes(scalar(other, "headers key")?.as_bytes()),
    }
    .map_err(|_| format!("bad header name {}", show(k)))?;
    let value = match v {
        Value::String(s) => HeaderValue::from_bytes(&s.as_bytes()),
        other => HeaderValue::from_str(&scalar(other, "headers value")?),
    }
    .map_err(|_| format!("bad value for header {}", show(k)))?;
    Ok((name, value))
}

fn headers_value(t: &Table) -> FieldResult<HeaderMap> {
    let mut headers = HeaderMap::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| e.to_string())?;
        if headers.len() >= MAX_REQUEST_HEADERS {
            return Err(too_many_headers());
        }
        let (name, value) = header_pair(&k, &v)?;
        headers.try_append(name, value).map_err(|_| too_many_headers())?;
    }
    Ok(headers)
}

fn pairs_value(t: &Table, what: &str) -> FieldResult<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| e.to_string())?;
        pairs.push((
            scalar(&k, &format!("{what} key"))?,
            scalar(&v, &format!("{what} value"))?,
        ));
    }
    pairs.sort();
    Ok(pairs)
}

/// A JSON body from a table; the content type it implies. The text is held to the memory
/// limit of the table's state (see [`json_text`]).
fn json_body(v: &Value) -> FieldResult<(Bytes, &'static str)> {
    if !matches!(v, Value::Table(_)) {
        return Err(format!(
            "`json` must be a table, got {} (use `body` for text that is already JSON)",
            show(v)
        ));
    }
    let bytes = json_text(v, memory_limit_of(v)).map_err(|e| match e {
        JsonError::TooLarge(e) => format!("`json`: {e}"),
        JsonError::Invalid(e) => format!("`json` cannot be encoded: {e}"),
    })?;
    Ok((Bytes::from(bytes), "application/json"))
}

/// Why a value has no JSON text within its cap.
#[derive(Debug)]
pub enum JsonError {
    /// The text would pass the cap.
    TooLarge(String),
    /// The value is not plain data (a function, a recursive table, ...).
    Invalid(String),
}

/// `value` as JSON text, written through a writer that refuses to grow past `cap` bytes: the
/// work and the memory stay within the cap whatever the value is (a table that holds another
/// twice, a hundred levels deep, would otherwise be written out 2^100 times).
pub fn json_text(value: &impl serde::Serialize, cap: usize) -> Result<Vec<u8>, JsonError> {
    let mut out = Capped {
        bytes: Vec::new(),
        cap,
        full: false,
    };
    match serde_json::to_writer(&mut out, value) {
        Ok(()) => Ok(out.bytes),
        Err(_) if out.full => Err(JsonError::TooLarge(format!(
            "the JSON would be larger than {} (the memory limit)",
            crate::machine::bytes(cap as u64)
        ))),
        Err(e) => Err(JsonError::Invalid(e.to_string())),
    }
}

/// A writer that refuses to grow past `cap` bytes (`full` once it refused).
struct Capped {
    bytes: Vec<u8>,
    cap: usize,
    full: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            self.full = true;
            return Err(std::io::Error::other("past the cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The memory limit of the Lua state `v` belongs to (the default one for a value of none).
fn memory_limit_of(v: &Value) -> usize {
    v.weak_lua()
        .and_then(mlua::WeakLua::try_upgrade)
        .and_then(|lua| lua.app_data_ref::<Rc<super::sandbox::Budget>>().map(|b| b.memory()))
        .unwrap_or(super::sandbox::Limits::default().memory)
}

/// A url-encoded body from a table; the content type it implies.
fn form_body(t: &Table) -> FieldResult<(Bytes, &'static str)> {
    let pairs = pairs_value(t, "form")?;
    let encoded = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    Ok((Bytes::from(encoded), "application/x-www-form-urlencoded"))
}

fn timeout_value(v: &Value) -> FieldResult<Option<Duration>> {
    match v {
        Value::Nil => Ok(None),
        v => match duration_value(v).map_err(|e| format!("`timeout`: {e}"))? {
            d if d.is_zero() => Err("`timeout` must be more than 0".into()),
            d => Ok(Some(d)),
        },
    }
}

/// Reads and validates an entry of `endpoints`. Errors name the field and what is wrong.
pub fn parse_request(t: &Table) -> FieldResult<RequestSpec> {
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair.map_err(|e| e.to_string())?;
        let key = match &k {
            Value::String(s) => s.to_string_lossy(),
            other => {
                return Err(format!(
                    "unexpected key {} (fields are named, e.g. method = \"GET\")",
                    show(other)
                ));
            }
        };
        if !FIELDS.contains(&key.as_str()) {
            return Err(format!("unknown field `{key}` (known: {})", FIELDS.join(", ")));
        }
    }
    let get = |key: &str| t.raw_get::<Value>(key).map_err(|e| e.to_string());
    let method = method_value(&get("method")?)?;
    let target = match (opt_string(t, "path")?, opt_string(t, "url")?) {
        (Some(_), Some(_)) => return Err("give `path` or `url`, not both".into()),
        (None, None) => return Err("`path` (or an absolute `url`) is missing".into()),
        (Some(p), None) => path_value(p),
        (None, Some(u)) => url_value(u)?,
    };
    let mut headers = match opt_table(t, "headers")? {
        Some(h) => headers_value(&h)?,
        None => HeaderMap::new(),
    };
    let query = match opt_table(t, "query")? {
        Some(q) => pairs_value(&q, "query")?,
        None => Vec::new(),
    };
    let (json, body, form) = (get("json")?, opt_string(t, "body")?, opt_table(t, "form")?);
    if [!json.is_nil(), body.is_some(), form.is_some()]
        .iter()
        .filter(|&&b| b)
        .count()
        > 1
    {
        return Err("give at most one of `json`, `body` and `form`".into());
    }
    let encoded = if !json.is_nil() {
        Some(json_body(&json)?)
    } else if let Some(form) = form {
        Some(form_body(&form)?)
    } else {
        None
    };
    let body = match encoded {
        Some((bytes, content_type)) => {
            set_default_content_type(&mut headers, content_type);
            Some(bytes)
        }
        None => body.map(Bytes::from),
    };
    // A URL's password never names a row (rows are printed and written everywhere), and a name
    // is cut as failure reasons are: names that differ past the cut share a row.
    let mut name = opt_string(t, "name")?.unwrap_or_else(|| crate::http::redact(target.as_str()).into_owned());
    crate::stats::shorten(&mut name);
    let weight = match get("weight")? {
        Value::Nil => 1,
        Value::Integer(w) if w >= 1 => u32::try_from(w).map_err(|_| "`weight` is too large")?,
        Value::Number(w) if w >= 1.0 && w.fract() == 0.0 && w <= u32::MAX as f64 => w as u32,
        other => return Err(format!("`weight` must be a positive integer, got {}", show(&other))),
    };
    let timeout = timeout_value(&get("timeout")?)?;
    Ok(RequestSpec {
        method,
        target,
        headers,
        query,
        body,
        name,
        weight,
        timeout,
    })
}

/// A duration given as a number of seconds or as a string like "500ms".
pub fn duration_value(v: &Value) -> Result<Duration, String> {
    match v {
        Value::Integer(n) if *n >= 0 => crate::config::secs_to_duration(*n as f64).map_err(|e| e.to_string()),
        Value::Number(n) if n.is_finite() && *n >= 0.0 => {
            crate::config::secs_to_duration(*n).map_err(|e| e.to_string())
        }
        Value::String(s) => parse_duration(&s.to_string_lossy()).map_err(|e| e.to_string()),
        other => Err(format!(
            "expected seconds or a string like \"500ms\", got {}",
            show(other)
        )),
    }
}

fn set_default_content_type(headers: &mut HeaderMap, ct: &'static str) {
    if !headers.contains_key(CONTENT_TYPE) {
        // (A map of at most MAX_REQUEST_HEADERS headers has room for one more.)
        let _ = headers.try_insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
}

pub fn is_absolute(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn string_value(v: &Value, key: &str) -> FieldResult<Option<String>> {
    match v {
        Value::Nil => Ok(None),
        Value::String(s) => Ok(Some(
            s.to_str()
                .map_err(|_| format!("`{key}` is not valid UTF-8"))?
                .to_string(),
        )),
        other => Err(format!("`{key}` must be a string, got {}", show(other))),
    }
}

fn opt_string(t: &Table, key: &str) -> FieldResult<Option<String>> {
    string_value(&t.raw_get::<Value>(key).map_err(|e| e.to_string())?, key)
}

fn opt_table(t: &Table, key: &str) -> FieldResult<Option<Table>> {
    match t.raw_get::<Value>(key).map_err(|e| e.to_string())? {
        Value::Nil => Ok(None),
        Value::Table(t) => Ok(Some(t)),
        other => Err(format!("`{key}` must be a table, got {}", show(&other))),
    }
}

/// A string, number or boolean as text (for header, query and form values).
fn scalar(v: &Value, what: &str) -> FieldResult<String> {
    match v {
        Value::String(s) => Ok(s.to_string_lossy()),
        Value::Integer(_) | Value::Number(_) | Value::Boolean(_) => Ok(v.to_string().unwrap_or_default()),
        other => Err(format!("{what} must be a string or number, got {}", show(other))),
    }
}

/// A short description of a Lua value for error messages.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => other.type_name().to_string(),
    }
}

/// Line numbers of tables made by `Task(...)`, kept only while a scenario is being loaded so
/// that validation errors can point at the call.
#[derive(Default)]
pub struct TaskLines(pub RefCell<HashMap<usize, usize>>);

/// Think time between a user's iterations (`wait_time = between(1, 3)`), with Locust's names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wait {
    /// A uniformly random pause in [min, max] seconds.
    Between(f64, f64),
    /// The same pause every time.
    Constant(f64),
    /// Iterations start every N seconds (the pause fills what the iteration left).
    Pacing(f64),
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Between(a, b) => write!(f, "between({a}, {b}): a pause of {a} to {b} s"),
            Wait::Constant(s) => write!(f, "constant({s}): a pause of {s} s"),
            Wait::Pacing(s) => write!(f, "an iteration every {s} s per user"),
        }
    }
}

impl Wait {
    /// The pause after an iteration that took `took`; `draw` is uniform in [0, 1). At most
    /// [`MAX_DURATION`](crate::config::MAX_DURATION) ([`wait_value`] refuses longer ones).
    pub fn pause(&self, took: Duration, draw: f64) -> Duration {
        let secs = match *self {
            Wait::Between(min, max) => min + (max - min) * draw,
            Wait::Constant(s) => s,
            Wait::Pacing(every) => (every - took.as_secs_f64()).max(0.0),
        };
        let longest = crate::config::MAX_DURATION.as_secs_f64();
        Duration::try_from_secs_f64(secs.clamp(0.0, longest)).unwrap_or_default()
    }
}

/// Reads the `wait_time` global, made by `between`, `constant`, `constant_pacing` or
/// `constant_throughput`.
pub fn wait_value(v: &Value) -> FieldResult<Option<Wait>> {
    let t = match v {
        Value::Nil => return Ok(None),
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "`wait_time` must be made by between(a, b), constant(s), constant_pacing(s) or constant_throughput(n), got {}",
                show(other)
            ));
        }
    };
    let kind: String = t
        .raw_get("__wait")
        .map_err(|_| "`wait_time`: use between(a, b), constant(s), ...".to_string())?;
    let a: f64 = t.raw_get("a").map_err(|e| e.to_string())?;
    let b: f64 = t.raw_get("b").map_err(|e| e.to_string())?;
    let bad = |what: &str| Err(format!("`wait_time`: {what}"));
    if !a.is_finite() || !b.is_finite() || a < 0.0 || b < 0.0 {
        return bad("times must be non-negative numbers");
    }
    let wait = match kind.as_str() {
        "between" if a <= b => Wait::Between(a, b),
        "between" => return bad("between(a, b) needs a <= b"),
        "constant" => Wait::Constant(a),
        "constant_pacing" => Wait::Pacing(a),
        "constant_throughput" if a > 0.0 => Wait::Pacing(1.0 / a),
        "constant_throughput" => return bad("constant_throughput(n) needs n > 0"),
        other => return bad(&format!("unknown kind {other:?}")),
    };
    // The longest pause it can make: a pause is a duration, at most the longest one.
    let longest = match wait {
        Wait::Between(_, s) | Wait::Constant(s) | Wait::Pacing(s) => s,
    };
    if longest > crate::config::MAX_DURATION.as_secs_f64() {
        return bad(&format!(
            "a pause is at most 365 days (this one is {longest:e} s{})",
            if kind == "constant_throughput" {
                ": constant_throughput(n) pauses 1/n s"
            } else {
                ""
            }
        ));
    }
    Ok(Some(wait))
}

/// The names [`constructor`] makes.
pub const CONSTRUCTORS: [&str; 5] = ["Task", "between", "constant", "constant_pacing", "constant_throughput"];

/// The scenario's constructors: `Task(method, path, opts)` and the think-time makers
/// `between`, `constant`, `constant_pacing`, `constant_throughput`. Every state reaches them
/// through `_G`'s `__index` (see the sandbox), which makes one each time it is looked up and
/// keeps it out of the globals table: in a user's state they only serve the file's top level,
/// and as globals they would grow every state's `_G` to its next size.
pub fn constructor(lua: &Lua, name: &str) -> mlua::Result<Option<mlua::Function>> {
    if let kind @ ("between" | "constant" | "constant_pacing" | "constant_throughput") = name {
        let kind: &'static str = match kind {
            "between" => "between",
            "constant" => "constant",
            "constant_pacing" => "constant_pacing",
            _ => "constant_throughput",
        };
        let maker = lua.create_function(move |lua, (a, b): (f64, Option<f64>)| {
            let t = lua.create_table()?;
            t.raw_set("__wait", kind)?;
            t.raw_set("a", a)?;
            t.raw_set("b", b.unwrap_or(a))?;
            Ok(t)
        })?;
        return Ok(Some(maker));
    }
    if name != "Task" {
        return Ok(None);
    }
    let task = lua.create_function(|lua, (method, path, opts): (Value, Value, Option<Table>)| {
        let t = match opts {
            // Copy so that one opts table can serve several Tasks.
            Some(opts) => {
                let t = lua.create_table()?;
                for pair in opts.pairs::<Value, Value>() {
                    let (k, v) = pair?;
                    t.raw_set(k, v)?;
                }
                t
            }
            None => lua.create_table()?,
        };
        t.raw_set("method", method)?;
        t.raw_set("path", path)?;
        if let Some(lines) = lua.app_data_ref::<TaskLines>()
            && let Some(line) = lua.inspect_stack(1, |d| d.current_line()).flatten()
        {
            lines.0.borrow_mut().insert(t.to_pointer() as usize, line);
        }
        Ok(t)
    })?;
    Ok(Some(task))
}

/// What a hook did to `req` this call, over the endpoint it started from.
#[derive(Default)]
pub struct ReqEdits {
    pub method: Option<Method>,
    pub target: Option<Target>,
    pub name: Option<String>,
    /// Headers replaced as a whole (`req.headers = {...}`), then single edits on top.
    pub headers: Option<HeaderMap>,
    pub header_edits: Vec<(HeaderName, Option<HeaderValue>)>,
    pub query: Option<Vec<(String, String)>>,
    /// `Some(None)`: body removed.
    pub body: Option<Option<Bytes>>,
    pub content_type: Option<&'static str>,
    pub timeout: Option<Option<Duration>>,
}

impl ReqEdits {
    /// No edits, keeping the room the last request's header edits took.
    pub fn clear(&mut self) {
        let mut header_edits = std::mem::take(&mut self.header_edits);
        header_edits.clear();
        *self = Self {
            header_edits,
            ..Self::default()
        };
    }

    /// Whether the request on the wire differs from the endpoint's (a new name alone does not).
    pub fn changes_wire(&self) -> bool {
        self.method.is_some()
            || self.target.is_some()
            || self.headers.is_some()
            || !self.header_edits.is_empty()
            || self.query.is_some()
            || self.body.is_some()
            || self.timeout.is_some()
    }

    /// The headers these edits add, when adding headers the endpoint does not send is all they
    /// do: the request is then the endpoint's bytes with lines added (no rebuild).
    pub fn only_added_headers(&self, base: &RequestSpec) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let only_headers = self.method.is_none()
            && self.target.is_none()
            && self.headers.is_none()
            && self.query.is_none()
            && self.body.is_none()
            && self.content_type.is_none()
            && self.timeout.is_none();
        if !only_headers {
            return None;
        }
        let mut added: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(self.header_edits.len());
        for (name, value) in &self.header_edits {
            let special = [HOST, USER_AGENT, CONTENT_LENGTH, COOKIE].contains(name);
            if special || base.headers.contains_key(name) || added.iter().any(|(n, _)| n == name) {
                return None;
            }
            added.push((name.clone(), value.clone()?));
        }
        Some(added)
    }

    /// The endpoint with these edits applied.
    pub fn apply(&self, base: &RequestSpec) -> RequestSpec {
        let mut spec = base.clone();
        if let Some(m) = &self.method {
            spec.method = m.clone();
        }
        if let Some(t) = &self.target {
            spec.target = t.clone();
        }
        if let Some(n) = &self.name {
            spec.name = n.clone();
        }
        if let Some(h) = &self.headers {
            spec.headers = h.clone();
        }
        // (At most MAX_REQUEST_HEADERS in all: see `ReqState::edit_header`.)
        for (name, value) in &self.header_edits {
            match value {
                Some(v) => {
                    let _ = spec.headers.try_insert(name.clone(), v.clone());
                }
                None => {
                    spec.headers.remove(name);
                }
            }
        }
        if let Some(q) = &self.query {
            spec.query = q.clone();
        }
        if let Some(b) = &self.body {
            spec.body = b.clone();
        }
        if let Some(ct) = self.content_type {
            set_default_content_type(&mut spec.headers, ct);
        }
        if let Some(t) = self.timeout {
            spec.timeout = t;
        }
        spec
    }
}

/// The state behind a user's `req`: which endpoint it stands for, and the edits.
pub struct ReqState {
    pub endpoints: Arc<[RequestSpec]>,
    pub base: usize,
    pub edits: ReqEdits,
    /// Header names the hooks set, as written and parsed (a name not known to `http` is
    /// lower-cased into an allocation each time it is parsed).
    names: Vec<(Box<[u8]>, HeaderName)>,
}

impl ReqState {
    /// The header names parsed by `req.headers[name] = value` so far, as written.
    #[cfg(test)]
    pub fn cached_names(&self) -> Vec<String> {
        self.names
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    /// The header `key` names, parsed once per distinct spelling (up to 16 kept).
    fn header_name(&mut self, key: &[u8]) -> Option<HeaderName> {
        if let Some((_, name)) = self.names.iter().find(|(k, _)| **k == *key) {
            return Some(name.clone());
        }
        let name = HeaderName::from_bytes(key).ok()?;
        if self.names.len() < 16 {
            self.names.push((key.into(), name.clone()));
        }
        Some(name)
    }

    fn base(&self) -> &RequestSpec {
        &self.endpoints[self.base]
    }

    /// Records `req.headers[name] = value` (`None`: removed). A name set before in this call
    /// has its edit replaced; a new one may not take the request past
    /// [`MAX_REQUEST_HEADERS`] (counted as if every edit added one).
    fn edit_header(&mut self, name: HeaderName, value: Option<HeaderValue>) -> FieldResult<()> {
        let edits = &mut self.edits.header_edits;
        if let Some(edit) = edits.iter_mut().find(|(n, _)| *n == name) {
            edit.1 = value;
            return Ok(());
        }
        let base = match &self.edits.headers {
            Some(replaced) => replaced.len(),
            None => self.endpoints[self.base].headers.len(),
        };
        if base + edits.len() >= MAX_REQUEST_HEADERS {
            return Err(too_many_headers());
        }
        edits.push((name, value));
        Ok(())
    }

    fn header(&self, name: &HeaderName) -> Option<HeaderValue> {
        if let Some((_, v)) = self.edits.header_edits.iter().rev().find(|(n, _)| n == name) {
            return v.clone();
        }
        self.edits
            .headers
            .as_ref()
            .unwrap_or(&self.base().headers)
            .get(name)
            .cloned()
    }
}

/// A user's `req` object. Cloning shares the state. The second part is its `headers` object
/// (a handle: cheaper to hand out on every `req.headers` than a user value).
#[derive(Clone)]
pub struct Req(pub Rc<RefCell<ReqState>>, Rc<std::cell::OnceCell<AnyUserData>>);

/// The `req.headers` object of a user's `req`.
#[derive(Clone)]
struct ReqHeaders(Rc<RefCell<ReqState>>);

fn field_err(e: String) -> mlua::Error {
    mlua::Error::runtime(format!("req: {e}"))
}

impl UserData for Req {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_function(MetaMethod::Index, |lua, (ud, key): (AnyUserData, mlua::LuaString)| {
            let this = ud.borrow::<Req>()?;
            let st = this.0.borrow();
            let e = &st.edits;
            let base = st.base();
            Ok(match &*key.as_bytes() {
                b"method" => Value::String(lua.create_string(e.method.as_ref().unwrap_or(&base.method).as_str())?),
                b"path" | b"url" => {
                    let target = e.target.as_ref().unwrap_or(&base.target);
                    match (target, &*key.as_bytes()) {
                        (Target::Path(p), b"path") | (Target::Url(p), b"url") => Value::String(lua.create_string(p)?),
                        _ => Value::Nil,
                    }
                }
                b"name" => Value::String(lua.create_string(e.name.as_ref().unwrap_or(&base.name))?),
                b"headers" => this.1.get().map_or(Value::Nil, |h| Value::UserData(h.clone())),
                b"query" => {
                    let t = lua.create_table()?;
                    for (k, v) in e.query.as_ref().unwrap_or(&base.query) {
                        t.raw_set(k.as_str(), v.as_str())?;
                    }
                    Value::Table(t)
                }
                b"body" => match e.body.as_ref().unwrap_or(&base.body) {
                    Some(b) => Value::String(lua.create_string(b)?),
                    None => Value::Nil,
                },
                b"timeout" => match e.timeout.unwrap_or(base.timeout) {
                    Some(t) => Value::Number(t.as_secs_f64()),
                    None => Value::Nil,
                },
                _ => Value::Nil,
            })
        });
        methods.add_meta_function(MetaMethod::NewIndex, |_, (ud, key, value): (AnyUserData, mlua::LuaString, Value)| {
            let this = ud.borrow::<Req>()?;
            let mut st = this.0.borrow_mut();
            let e = &mut st.edits;
            match &*key.as_bytes() {
                b"method" => e.method = Some(method_value(&value).map_err(field_err)?),
                b"path" => match string_value(&value, "path").map_err(field_err)? {
                    Some(p) => e.target = Some(path_value(p)),
                    None => return Err(field_err("`path` cannot be nil".into())),
                },
                b"url" => match string_value(&value, "url").map_err(field_err)? {
                    Some(u) => e.target = Some(url_value(u).map_err(field_err)?),
                    None => return Err(field_err("`url` cannot be nil".into())),
                },
                b"name" => match string_value(&value, "name").map_err(field_err)? {
                    Some(mut n) => {
                        crate::stats::shorten(&mut n);
                        e.name = Some(n);
                    }
                    None => return Err(field_err("`name` cannot be nil".into())),
                },
                b"headers" => match &value {
                    Value::Table(t) => {
                        e.headers = Some(headers_value(t).map_err(field_err)?);
                        e.header_edits.clear();
                    }
                    other => return Err(field_err(format!("`headers` must be a table, got {}", show(other)))),
                },
                b"query" => match &value {
                    Value::Table(t) => e.query = Some(pairs_value(t, "query").map_err(field_err)?),
                    Value::Nil => e.query = Some(Vec::new()),
                    other => return Err(field_err(format!("`query` must be a table, got {}", show(other)))),
                },
                b"body" => {
                    e.body = Some(string_value(&value, "body").map_err(field_err)?.map(Bytes::from));
                    e.content_type = None;
                }
                b"json" | b"form" if value.is_nil() => e.body = Some(None),
                b"json" => {
                    let (bytes, ct) = json_body(&value).map_err(field_err)?;
                    e.body = Some(Some(bytes));
                    e.content_type = Some(ct);
                }
                b"form" => match &value {
                    Value::Table(t) => {
                        let (bytes, ct) = form_body(t).map_err(field_err)?;
                        e.body = Some(Some(bytes));
                        e.content_type = Some(ct);
                    }
                    other => return Err(field_err(format!("`form` must be a table, got {}", show(other)))),
                },
                b"timeout" => e.timeout = Some(timeout_value(&value).map_err(field_err)?),
                other => {
                    return Err(field_err(format!(
                        "no field `{}` (fields: method, path, url, name, headers, query, body, json, form, timeout)",
                        String::from_utf8_lossy(other)
                    )));
                }
            }
            Ok(())
        });
    }
}

impl UserData for ReqHeaders {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |lua, this, key: mlua::LuaString| {
            let Ok(name) = HeaderName::from_bytes(&key.as_bytes()) else {
                return Ok(Value::Nil);
            };
            match this.0.borrow().header(&name) {
                Some(v) => Ok(Value::String(lua.create_string(v.as_bytes())?)),
                None => Ok(Value::Nil),
            }
        });
        methods.add_meta_method(MetaMethod::NewIndex, |_, this, (key, value): (Value, Value)| {
            let edit = if value.is_nil() {
                let name = scalar(&key, "headers key").map_err(field_err)?;
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| field_err(format!("bad header name {name:?}")))?;
                (name, None)
            } else {
                let (name, value) = header_pair(&key, &value).map_err(field_err)?;
                (name, Some(value))
            };
            this.0.borrow_mut().edit_header(edit.0, edit.1).map_err(field_err)
        });
        // pairs(req.headers): a snapshot of the headers as they would be sent.
        methods.add_meta_method(MetaMethod::Pairs, |lua, this, ()| {
            let st = this.0.borrow();
            let spec = st.edits.apply(st.base());
            let t = headers_table(lua, &spec.headers)?;
            let next: mlua::Function = lua.globals().get("next")?;
            Ok((next, t, Value::Nil))
        });
    }
}

/// Creates a user's `req` object (once per user) and the handle to its state.
pub fn new_req(sandbox: &Sandbox, endpoints: Arc<[RequestSpec]>) -> mlua::Result<(AnyUserData, Req)> {
    let lua = &*sandbox.lua;
    let state = Rc::new(RefCell::new(ReqState {
        endpoints,
        base: 0,
        edits: ReqEdits::default(),
        names: Vec::new(),
    }));
    let req = Req(state.clone(), Rc::default());
    let ud = lua.create_userdata(req.clone())?;
    let headers = lua.create_userdata(ReqHeaders(state.clone()))?;
    let state = sandbox.anchor(state);
    // SAFETY: the stack holds the two objects and the pointer; `state` lives as long as the
    // state does (anchored), and its C functions only ever read it through this pointer.
    unsafe {
        lua.exec_raw::<()>((&ud, &headers, mlua::LightUserData(state.cast_mut().cast())), |l| {
            fast::install(l)
        })?
    };
    let _ = req.1.set(headers);
    Ok((ud, req))
}

/// The two accesses a `before_request` hook makes on every request, `req.headers` and
/// `req.headers[name] = value`, as C functions in front of the objects' mlua metamethods (a
/// round trip through mlua's callback machinery costs each about 2,000 instructions; these a
/// few hundred). Anything else, and every error, goes on to the mlua metamethod.
mod fast {
    use std::cell::RefCell;
    use std::ffi::c_int;

    use hyper::header::HeaderValue;
    use mlua::ffi::{self, lua_State};

    use super::ReqState;
    use crate::scenario::sandbox::string_at;

    /// Wraps the metamethods of the `req` object at 1 and the `req.headers` object at 2, with
    /// the light userdata pointer to their state at 3. Each closure also holds the object it
    /// serves and passes any other object on (a metatable is shared by every object of its
    /// type in a state; a user's state has one of each).
    ///
    /// # Safety
    /// `l` has the three values on its stack (and room for 6 more); the pointer is valid for
    /// the state's life.
    pub unsafe fn install(l: *mut lua_State) {
        unsafe {
            // req.__index: 1 the original, 2 the headers object, 3 the state, 4 `req`.
            wrap(l, 1, c"__index", req_index, &[2, 3]);
            // req.headers.__newindex: 1 the original, 2 the state, 3 the headers object.
            wrap(l, 2, c"__newindex", headers_newindex, &[3]);
            ffi::lua_settop(l, 0);
        }
    }

    /// Wraps the `__index` of the user's `res` object at 1, with the light userdata pointer to
    /// its state at 2 (`after_response` reads `res.status` and `res.body` on every response).
    ///
    /// # Safety
    /// As [`install`]; the state is only replaced by the host, between calls into the script.
    pub unsafe fn install_res(l: *mut lua_State) {
        unsafe {
            // res.__index: 1 the original, 2 the state, 3 `res`.
            wrap(l, 1, c"__index", res_index, &[2]);
            ffi::lua_settop(l, 0);
        }
    }

    /// Replaces the metamethod `event` of the object at `obj` by `f`, a closure of the old one,
    /// the values at `extra` and the object (left as it is when it is not a function).
    unsafe fn wrap(l: *mut lua_State, obj: c_int, event: &std::ffi::CStr, f: ffi::lua_CFunction, extra: &[c_int]) {
        unsafe {
            let top = ffi::lua_gettop(l);
            if ffi::lua_getmetatable(l, obj) != 0 && ffi::lua_getfield(l, -1, event.as_ptr()) == ffi::LUA_TFUNCTION {
                for &i in extra {
                    ffi::lua_pushvalue(l, i);
                }
                ffi::lua_pushvalue(l, obj);
                ffi::lua_pushcclosure(l, f, 2 + extra.len() as c_int);
                ffi::lua_setfield(l, -2, event.as_ptr());
            }
            ffi::lua_settop(l, top);
        }
    }

    /// Calls the wrapped metamethod (upvalue 1) with the arguments, `results` results.
    unsafe fn fall_through(l: *mut lua_State, results: c_int) -> c_int {
        unsafe {
            ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
            ffi::lua_insert(l, 1);
            ffi::lua_call(l, ffi::lua_gettop(l) - 1, results);
            results
        }
    }

    /// `req.<key>`: `headers` is the object in upvalue 2.
    unsafe extern "C-unwind" fn req_index(l: *mut lua_State) -> c_int {
        unsafe {
            if ffi::lua_rawequal(l, 1, ffi::lua_upvalueindex(4)) != 0 {
                match string_at(l, 2) {
                    Some(b"headers") => {
                        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(2));
                        return 1;
                    }
                    Some(key @ (b"method" | b"path" | b"name")) => {
                        let state = ffi::lua_touserdata(l, ffi::lua_upvalueindex(3)).cast::<RefCell<ReqState>>();
                        let mut text = [0u8; TEXT_MAX];
                        if !state.is_null()
                            && let Some(n) = req_text(&*state, key, &mut text)
                        {
                            ffi::lua_pushlstring(l, text.as_ptr().cast(), n);
                            return 1;
                        }
                    }
                    _ => {}
                }
            }
            fall_through(l, 1)
        }
    }

    /// Longest `req.method`, `req.path` or `req.name` the fast path copies (longer ones go the
    /// full way).
    const TEXT_MAX: usize = 256;

    /// Copies `req.<key>` into `out` and returns its length. The copy is taken under the
    /// borrow, which is over before Lua copies it in turn: a Lua error may then jump over the
    /// caller's frame, and code the allocation runs (a finalizer) may edit the request.
    fn req_text(state: &RefCell<ReqState>, key: &[u8], out: &mut [u8; TEXT_MAX]) -> Option<usize> {
        let st = state.try_borrow().ok()?;
        let (e, base) = (&st.edits, st.base());
        let text: &str = match key {
            b"method" => e.method.as_ref().unwrap_or(&base.method).as_str(),
            b"path" => match e.target.as_ref().unwrap_or(&base.target) {
                super::Target::Path(p) => p,
                super::Target::Url(_) => return None,
            },
            _ => e.name.as_ref().unwrap_or(&base.name),
        };
        let dest = out.get_mut(..text.len())?;
        dest.copy_from_slice(text.as_bytes());
        Some(text.len())
    }

    /// `res.<key>`: `status` and `body` of the user's `res` (the state in upvalue 2).
    unsafe extern "C-unwind" fn res_index(l: *mut lua_State) -> c_int {
        unsafe {
            let state = ffi::lua_touserdata(l, ffi::lua_upvalueindex(2)).cast::<RefCell<super::ResState>>();
            if ffi::lua_rawequal(l, 1, ffi::lua_upvalueindex(3)) != 0 && !state.is_null() {
                match string_at(l, 2) {
                    Some(b"status") => {
                        if let Ok(st) = (*state).try_borrow() {
                            let status = st.status;
                            drop(st);
                            ffi::lua_pushinteger(l, status.into());
                            return 1;
                        }
                    }
                    Some(b"body") => {
                        // Only the host replaces the response, between calls into the script: the
                        // bytes stay where they are while Lua copies them.
                        if let Ok(st) = (*state).try_borrow() {
                            let (p, n) = (st.body.as_ptr(), st.body.len());
                            drop(st);
                            ffi::lua_pushlstring(l, p.cast(), n);
                            return 1;
                        }
                    }
                    _ => {}
                }
            }
            fall_through(l, 1)
        }
    }

    /// `req.headers[name] = value`, for a string name and a string or integer value.
    unsafe extern "C-unwind" fn headers_newindex(l: *mut lua_State) -> c_int {
        unsafe {
            let state = ffi::lua_touserdata(l, ffi::lua_upvalueindex(2)).cast::<RefCell<ReqState>>();
            if ffi::lua_rawequal(l, 1, ffi::lua_upvalueindex(3)) != 0 && !state.is_null() && set_header(l, &*state) {
                return 0;
            }
            fall_through(l, 0)
        }
    }

    /// Records the edit the arguments ask for, if it is the common kind and valid (false: the
    /// mlua metamethod handles it, and says what is wrong). Holds nothing when it returns.
    unsafe fn set_header(l: *mut lua_State, state: &RefCell<ReqState>) -> bool {
        unsafe {
            let Some(key) = string_at(l, 2) else { return false };
            let value = match ffi::lua_type(l, 3) {
                ffi::LUA_TSTRING => string_at(l, 3).and_then(|v| HeaderValue::from_bytes(v).ok()),
                ffi::LUA_TNUMBER if ffi::lua_isinteger(l, 3) != 0 => Some(HeaderValue::from(ffi::lua_tointeger(l, 3))),
                _ => None,
            };
            let (Some(value), Ok(mut st)) = (value, state.try_borrow_mut()) else {
                return false;
            };
            let Some(name) = st.header_name(key) else { return false };
            // Past the cap, the full path raises the error.
            st.edit_header(name, Some(value)).is_ok()
        }
    }
}

/// Headers as a Lua table keyed by lower-case name (repeated headers joined with ", ").
pub fn headers_table(lua: &Lua, headers: &HeaderMap) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, headers.keys_len())?;
    for name in headers.keys() {
        let mut joined = Vec::new();
        for (i, v) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(v.as_bytes());
        }
        t.raw_set(name.as_str(), lua.create_string(&joined)?)?;
    }
    Ok(t)
}

/// The response behind a user's `res` object, replaced on every call.
#[derive(Default)]
pub struct ResState {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
    /// Why no response came (requests made with `http`; status is then 0).
    pub error: Option<String>,
    /// `res.headers` as a table, made on first use in a call.
    headers_table: Option<Table>,
    /// The body counted as the state's memory (see `sandbox::Budget::charge`).
    charge: Option<super::sandbox::Charge>,
}

impl ResState {
    pub fn set(&mut self, status: u16, headers: HeaderMap, body: Bytes, elapsed: Duration) {
        *self = ResState {
            status,
            headers,
            body,
            elapsed,
            error: None,
            headers_table: None,
            charge: None,
        };
    }

    /// Counts the body as the state's memory: `false` if it does not fit (the script cannot
    /// hold it).
    pub fn charge_body(&mut self, budget: &super::sandbox::Budget) -> bool {
        self.charge = budget.charge(self.body.len());
        self.charge.is_some() || self.body.is_empty()
    }
}

/// A user's `res` object: `status`, `headers`, `body`, `elapsed_ms`.
#[derive(Clone)]
pub struct Res(pub Rc<RefCell<ResState>>);

impl UserData for Res {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |lua, this, key: mlua::LuaString| {
            let mut st = this.0.borrow_mut();
            Ok(match &*key.as_bytes() {
                b"status" => Value::Integer(st.status.into()),
                b"body" => Value::String(lua.create_string(&st.body)?),
                b"elapsed_ms" => Value::Number(st.elapsed.as_secs_f64() * 1000.0),
                // Not a registered method: with one, mlua builds an index wrapper in every state.
                b"json" => Value::Function(res_json(lua)?),
                b"error" => match &st.error {
                    Some(e) => Value::String(lua.create_string(e)?),
                    None => Value::Nil,
                },
                b"headers" => {
                    if st.headers_table.is_none() {
                        st.headers_table = Some(headers_table(lua, &st.headers)?);
                    }
                    Value::Table(st.headers_table.clone().expect("set just above"))
                }
                _ => Value::Nil,
            })
        });
    }
}

/// `res:json()`, made once per state, on first use.
fn res_json(lua: &Lua) -> mlua::Result<mlua::Function> {
    const KEY: &str = "stormlight.res_json";
    if let Ok(f) = lua.named_registry_value::<mlua::Function>(KEY) {
        return Ok(f);
    }
    let f = lua.create_function(|lua, ud: AnyUserData| {
        let (body, error) = {
            let res = ud.borrow::<Res>()?;
            let st = res.0.borrow();
            (st.body.clone(), st.error.clone())
        };
        if let Some(error) = error {
            return Err(mlua::Error::runtime(format!("res:json(): no response ({error})")));
        }
        super::host::decode_json(lua, &body).map_err(|e| super::host::prefixed(e, "res:json()"))
    })?;
    lua.set_named_registry_value(KEY, &f)?;
    Ok(f)
}

/// Creates a user's `res` object (once per user) and the handle to its state.
pub fn new_res(sandbox: &Sandbox) -> mlua::Result<(AnyUserData, Res)> {
    let lua = &*sandbox.lua;
    let res = Res(Rc::new(RefCell::new(ResState::default())));
    let ud = lua.create_userdata(res.clone())?;
    let state = sandbox.anchor(res.0.clone());
    // SAFETY: as in `new_req`.
    unsafe {
        lua.exec_raw::<()>((&ud, mlua::LightUserData(state.cast_mut().cast())), |l| {
            fast::install_res(l)
        })?
    };
    Ok((ud, res))
}
