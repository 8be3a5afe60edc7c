//! Everything a scenario can call or receive: the `Task` helper, the request table (an endpoint,
//! or the `req` a hook sees and may change) and the `res` table of `after_response`.
//!
//! The request table's fields (SPEC, "Scenario file"): `method`, `path` | `url`, `headers`,
//! `query`, one of `json` / `body` / `form`, `name`, `weight`, `timeout`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use mlua::{Lua, Table, Value};

use crate::config::parse_duration;

/// Methods a scenario may use.
pub const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"];

/// Where a request goes: a path joined to the host, or an absolute URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Path(String),
    Url(String),
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

impl RequestSpec {
    /// Whether `other` sends the same request (name and weight aside): a hook that changed
    /// nothing that goes on the wire reuses the prebuilt request.
    pub fn same_request(&self, other: &RequestSpec) -> bool {
        self.method == other.method
            && self.target == other.target
            && self.headers == other.headers
            && self.query == other.query
            && self.body == other.body
            && self.timeout == other.timeout
    }
}

/// Which fields a table may have, and in what role.
#[derive(Clone, Copy, PartialEq)]
pub enum Role {
    /// An entry of `endpoints`: `weight` allowed.
    Endpoint,
    /// The `req` a hook returns to the host: `weight` ignored.
    Hook,
}

const FIELDS: &[&str] = &[
    "method", "path", "url", "headers", "query", "json", "body", "form", "name", "weight", "timeout",
];

/// Reads and validates a request table. Errors name the field and what is wrong with it.
pub fn parse_request(t: &Table, role: Role) -> Result<RequestSpec, String> {
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
    let method = match t.raw_get::<Value>("method").map_err(|e| e.to_string())? {
        Value::String(s) => {
            let m = s.to_string_lossy().to_ascii_uppercase();
            if !METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "unknown method {:?} (use one of {})",
                    s.to_string_lossy(),
                    METHODS.join(", ")
                ));
            }
            Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())?
        }
        Value::Nil => return Err("`method` is missing".into()),
        other => return Err(format!("`method` must be a string, got {}", show(&other))),
    };
    let path = opt_string(t, "path")?;
    let url = opt_string(t, "url")?;
    let target = match (path, url) {
        (Some(_), Some(_)) => return Err("give `path` or `url`, not both".into()),
        (None, None) => return Err("`path` (or an absolute `url`) is missing".into()),
        (Some(p), None) if is_absolute(&p) => Target::Url(p),
        (Some(p), None) => Target::Path(if p.starts_with('/') { p } else { format!("/{p}") }),
        (None, Some(u)) if is_absolute(&u) => Target::Url(u),
        (None, Some(u)) => {
            return Err(format!("`url` must be absolute (http:// or https://), got {u:?}"));
        }
    };

    let mut headers = HeaderMap::new();
    if let Some(h) = opt_table(t, "headers")? {
        for pair in h.pairs::<Value, Value>() {
            let (k, v) = pair.map_err(|e| e.to_string())?;
            let (k, v) = (scalar(&k, "headers key")?, scalar(&v, "headers value")?);
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k:?}"))?;
            let value = HeaderValue::from_str(&v).map_err(|_| format!("bad value for header {k:?}"))?;
            headers.append(name, value);
        }
    }
    let mut query = Vec::new();
    if let Some(q) = opt_table(t, "query")? {
        for pair in q.pairs::<Value, Value>() {
            let (k, v) = pair.map_err(|e| e.to_string())?;
            query.push((scalar(&k, "query key")?, scalar(&v, "query value")?));
        }
        query.sort();
    }

    let json = t.raw_get::<Value>("json").map_err(|e| e.to_string())?;
    let body = opt_string(t, "body")?;
    let form = opt_table(t, "form")?;
    let given = [!json.is_nil(), body.is_some(), form.is_some()]
        .iter()
        .filter(|&&b| b)
        .count();
    if given > 1 {
        return Err("give at most one of `json`, `body` and `form`".into());
    }
    if !matches!(json, Value::Nil | Value::Table(_)) {
        return Err(format!(
            "`json` must be a table, got {} (use `body` for text that is already JSON)",
            show(&json)
        ));
    }
    let body = if !json.is_nil() {
        let bytes = serde_json::to_vec(&json).map_err(|e| format!("`json` cannot be encoded: {e}"))?;
        set_default_content_type(&mut headers, "application/json");
        Some(Bytes::from(bytes))
    } else if let Some(form) = form {
        let mut pairs = Vec::new();
        for pair in form.pairs::<Value, Value>() {
            let (k, v) = pair.map_err(|e| e.to_string())?;
            pairs.push((scalar(&k, "form key")?, scalar(&v, "form value")?));
        }
        pairs.sort();
        let encoded = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        set_default_content_type(&mut headers, "application/x-www-form-urlencoded");
        Some(Bytes::from(encoded))
    } else {
        body.map(Bytes::from)
    };

    let name = match opt_string(t, "name")? {
        Some(n) => n,
        None => match &target {
            Target::Path(p) | Target::Url(p) => p.clone(),
        },
    };
    let weight = match t.raw_get::<Value>("weight").map_err(|e| e.to_string())? {
        Value::Nil => 1,
        Value::Integer(w) if w >= 1 && role == Role::Endpoint => {
            u32::try_from(w).map_err(|_| "`weight` is too large")?
        }
        Value::Number(w) if w >= 1.0 && w.fract() == 0.0 && w <= u32::MAX as f64 && role == Role::Endpoint => w as u32,
        _ if role == Role::Hook => 1,
        other => {
            return Err(format!("`weight` must be a positive integer, got {}", show(&other)));
        }
    };
    let timeout = match t.raw_get::<Value>("timeout").map_err(|e| e.to_string())? {
        Value::Nil => None,
        v => Some(duration_value(&v).map_err(|e| format!("`timeout`: {e}"))?),
    };
    if timeout == Some(Duration::ZERO) {
        return Err("`timeout` must be more than 0".into());
    }
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
        Value::Integer(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
        Value::Number(n) if n.is_finite() && *n >= 0.0 => Ok(Duration::from_secs_f64(*n)),
        Value::String(s) => parse_duration(&s.to_string_lossy()).map_err(|e| e.to_string()),
        other => Err(format!(
            "expected seconds or a string like \"500ms\", got {}",
            show(other)
        )),
    }
}

fn set_default_content_type(headers: &mut HeaderMap, ct: &'static str) {
    if !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
}

fn is_absolute(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn opt_string(t: &Table, key: &str) -> Result<Option<String>, String> {
    match t.raw_get::<Value>(key).map_err(|e| e.to_string())? {
        Value::Nil => Ok(None),
        Value::String(s) => Ok(Some(
            s.to_str()
                .map_err(|_| format!("`{key}` is not valid UTF-8"))?
                .to_string(),
        )),
        other => Err(format!("`{key}` must be a string, got {}", show(&other))),
    }
}

fn opt_table(t: &Table, key: &str) -> Result<Option<Table>, String> {
    match t.raw_get::<Value>(key).map_err(|e| e.to_string())? {
        Value::Nil => Ok(None),
        Value::Table(t) => Ok(Some(t)),
        other => Err(format!("`{key}` must be a table, got {}", show(&other))),
    }
}

/// A string, number or boolean as text (for header, query and form values).
fn scalar(v: &Value, what: &str) -> Result<String, String> {
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

/// Installs the scenario globals that every state has: `Task(method, path, opts)`.
pub fn install(lua: &Lua) -> mlua::Result<()> {
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
    lua.globals().set("Task", task)
}

/// Builds the `req` table a hook receives: method, path or url, name, headers, query, body
/// (the encoded body as a string; set `json` or `form` instead to replace it), timeout.
pub fn request_table(lua: &Lua, spec: &RequestSpec) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 6)?;
    t.raw_set("method", spec.method.as_str())?;
    match &spec.target {
        Target::Path(p) => t.raw_set("path", p.as_str())?,
        Target::Url(u) => t.raw_set("url", u.as_str())?,
    }
    t.raw_set("name", spec.name.as_str())?;
    t.raw_set("headers", headers_table(lua, &spec.headers)?)?;
    if !spec.query.is_empty() {
        let q = lua.create_table()?;
        for (k, v) in &spec.query {
            q.raw_set(k.as_str(), v.as_str())?;
        }
        t.raw_set("query", q)?;
    }
    if let Some(body) = &spec.body {
        t.raw_set("body", lua.create_string(body)?)?;
    }
    if let Some(timeout) = spec.timeout {
        t.raw_set("timeout", timeout.as_secs_f64())?;
    }
    Ok(t)
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

/// The `res` table of `after_response`.
pub fn response_table(
    lua: &Lua,
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    elapsed: Duration,
) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 4)?;
    t.raw_set("status", status)?;
    t.raw_set("headers", headers_table(lua, headers)?)?;
    t.raw_set("body", lua.create_string(body)?)?;
    t.raw_set("elapsed_ms", elapsed.as_secs_f64() * 1000.0)?;
    Ok(t)
}
