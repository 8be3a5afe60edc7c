//! The sandbox every scenario runs in: an explicit allow-list of standard libraries, `load` of
//! text only, no `string.dump`, a memory limit per Lua state and an instruction budget per call.
//!
//! mlua's `StdLib::ALL_SAFE` still opens `io` and `os`, so the libraries are listed one by one;
//! all but `string` open on first use.
//! The instruction budget is a *global* hook: Lua 5.4 copies it into every coroutine a script
//! creates, so a runaway loop inside a coroutine is caught too. Once the budget is spent the hook
//! keeps raising on every count, and `pcall`, `xpcall` and `coroutine.resume` re-raise the error
//! when they catch it: `while true do pcall(f) end` would otherwise catch the hook's error
//! forever, since the hook always fires inside `f`, where most instructions run.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::rc::Rc;

use mlua::{HookTriggers, Lua, LuaOptions, StdLib, Variadic, VmState};

use super::arena::{self, Arena};

/// Instructions between two checks of the budget.
const HOOK_EVERY: u32 = 1000;

/// Per-state limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes a Lua state may allocate.
    pub memory: usize,
    /// Lua VM instructions one call into the script (a hook, or loading the file) may run.
    pub instructions: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // 16 MiB is far above what a scenario's state needs (~30 KB) and small enough that ten
        // thousand users cannot take the machine down. 100 M instructions is ~0.5 s of Lua.
        Self {
            memory: 16 << 20,
            instructions: 100_000_000,
        }
    }
}

/// The instruction budget of one state; [`Budget::reset`] before each call into the script.
pub struct Budget {
    used: Cell<u64>,
    limit: u64,
}

impl Budget {
    pub fn reset(&self) {
        self.used.set(0);
    }

    /// Whether the current call has spent its budget.
    pub fn spent(&self) -> bool {
        self.used.get() > self.limit
    }
}

/// A sandboxed Lua state and its budget.
pub struct Sandbox {
    /// Dropped, then the state closed, then the arena freed: see `Drop`.
    pub lua: ManuallyDrop<Lua>,
    pub budget: Rc<Budget>,
    pub limits: Limits,
    state: *mut mlua::ffi::lua_State,
    arena: ManuallyDrop<Box<Arena>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SAFETY: the state is ours (made in `new`, mlua does not close it); every handle into
        // it lives in this struct or in the `UserState` that owns it, dropped before it. The
        // arena outlives the state, which frees its blocks into it as it closes.
        unsafe {
            ManuallyDrop::drop(&mut self.lua);
            mlua::ffi::lua_close(self.state);
            ManuallyDrop::drop(&mut self.arena);
        }
    }
}

/// Lua code run by the host (trusted) once per state, before the scenario: it narrows the
/// base library. `load` keeps text chunks only (binary chunks can break the VM's safety);
/// passing `env` through `...` keeps `load(s, name, mode)` from setting `_ENV` to nil.
const PRELUDE: &str = r#"
local budget_spent, open_lib = ...
local raw_pcall, raw_xpcall = pcall, xpcall
local rawset, select, error = rawset, select, error
local function guard(ok, ...)
  if not ok and budget_spent() then error((...), 0) end
  return ok, ...
end
pcall = function(...) return guard(raw_pcall(...)) end
xpcall = function(...) return guard(raw_xpcall(...)) end
local raw_load = load
load = function(chunk, name, _mode, ...)
  if select('#', ...) > 0 then return raw_load(chunk, name, "t", ...) end
  return raw_load(chunk, name, "t")
end
local raw_cg = collectgarbage
collectgarbage = function(opt)
  if opt == "count" then return raw_cg("count") end
  error("collectgarbage: only collectgarbage('count') is allowed in a scenario", 2)
end
dofile, loadfile, require, module = nil, nil, nil, nil
string.dump = nil
-- table, math, utf8, coroutine and os open on first use, as do the scenario API's http, sleep,
-- check, log, json, uuid and rand: a user state whose script never touches one does not carry
-- it (ten thousand users, ~3 KB each).
local lazy = { table = true, math = true, utf8 = true, coroutine = true, os = true,
  http = true, sleep = true, check = true, log = true, json = true, uuid = true, rand = true,
  data = true }
-- The scenario's constructors serve its top level: made on first use, kept here rather than
-- in _G (whose next size up would double its node array in every state).
local apart = { Task = false, between = false, constant = false, constant_pacing = false,
  constant_throughput = false }
setmetatable(_G, { __index = function(g, k)
  local kept = apart[k]
  if kept then return kept end
  if kept == false then
    kept = open_lib(k)
    apart[k] = kept
    return kept
  end
  if not lazy[k] then return nil end
  lazy[k] = nil
  local lib = open_lib(k)
  if k == "coroutine" then
    local raw_resume = lib.resume
    lib.resume = function(...) return guard(raw_resume(...)) end
  elseif k == "os" then
    lib = { time = lib.time, clock = lib.clock, date = lib.date, difftime = lib.difftime }
  end
  rawset(g, k, lib)
  return lib
end })
"#;

/// The prelude compiled once per process and stripped of debug information: every state
/// loads these bytes (trusted, from the host) instead of parsing the text again, and its
/// functions carry no line tables. Scripts never get to load binary chunks.
fn prelude_bytecode() -> mlua::Result<&'static [u8]> {
    static CODE: std::sync::OnceLock<Result<Vec<u8>, String>> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        let lua = Lua::new_with(StdLib::NONE, LuaOptions::default()).map_err(|e| e.to_string())?;
        let f = lua
            .load(PRELUDE)
            .set_name("=stormlight-prelude")
            .into_function()
            .map_err(|e| e.to_string())?;
        Ok(f.dump(true))
    })
    .as_deref()
    .map_err(|e| mlua::Error::runtime(e.clone()))
}

impl Sandbox {
    /// A sandbox whose memory starts with room for `expect` bytes (what a state of this
    /// scenario takes: see [`Sandbox::carved`]).
    pub fn new(limits: Limits, expect: usize) -> mlua::Result<Self> {
        // The state lives in an arena of its own (see `arena`), which also holds it to the
        // memory limit. Only `string` is opened up front (strings' methods need it); the
        // prelude opens the others lazily.
        let mut arena = Arena::new(limits.memory, expect);
        // SAFETY: the arena is boxed (it does not move) and outlives the state (see `Drop`).
        // Opening the two libraries cannot fail for memory in a new state far from its limit.
        let (state, lua) = unsafe {
            let state = mlua::ffi::lua_newstate(arena::lua_alloc, (&mut *arena as *mut Arena).cast());
            if state.is_null() {
                return Err(mlua::Error::MemoryError("cannot create a Lua state".into()));
            }
            mlua::ffi::luaL_requiref(state, c"_G".as_ptr(), mlua::ffi::luaopen_base, 1);
            mlua::ffi::luaL_requiref(state, c"string".as_ptr(), mlua::ffi::luaopen_string, 1);
            mlua::ffi::lua_settop(state, 0);
            (state, Lua::get_or_init_from_ptr(state).clone())
        };
        let sandbox = Self {
            lua: ManuallyDrop::new(lua),
            budget: Rc::new(Budget {
                used: Cell::new(0),
                limit: limits.instructions.div_ceil(HOOK_EVERY as u64),
            }),
            limits,
            state,
            arena: ManuallyDrop::new(arena),
        };
        sandbox.init()?;
        Ok(sandbox)
    }

    /// Bytes of small blocks the state has taken so far: room the next state of the same
    /// scenario should start with.
    pub fn carved(&self) -> usize {
        self.arena.carved()
    }

    fn init(&self) -> mlua::Result<()> {
        let lua = &*self.lua;
        let budget = self.budget.clone();
        let spent = budget.clone();
        let budget_spent = lua.create_function(move |_, ()| Ok(spent.spent()))?;
        let open_lib = lua.create_function(|lua, name: mlua::LuaString| {
            let lib = match &*name.as_bytes() {
                b"table" => StdLib::TABLE,
                b"math" => StdLib::MATH,
                b"utf8" => StdLib::UTF8,
                b"coroutine" => StdLib::COROUTINE,
                b"os" => StdLib::OS,
                other => {
                    let value = super::host::open(lua, &String::from_utf8_lossy(other))?;
                    return Ok(value);
                }
            };
            lua.load_std_libs(lib)?;
            // Opening a library sets its global; the prelude decides what the script sees.
            let value: mlua::Value = lua.globals().raw_get(name.clone())?;
            lua.globals().raw_set(name, mlua::Value::Nil)?;
            Ok(value)
        })?;
        lua.load(prelude_bytecode()?)
            .set_name("=stormlight-prelude")
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .call::<()>((budget_spent, open_lib))?;
        // print goes to stderr so that it never breaks the tables on stdout.
        let print = lua.create_function(|_, args: Variadic<mlua::Value>| {
            let parts: Vec<String> = args
                .iter()
                .map(|v| v.to_string().unwrap_or_else(|_| "?".into()))
                .collect();
            eprintln!("{}", parts.join("\t"));
            Ok(())
        })?;
        lua.globals().set("print", print)?;

        let hook_budget = budget.clone();
        lua.set_global_hook(HookTriggers::new().every_nth_instruction(HOOK_EVERY), move |_, _| {
            let used = hook_budget.used.get() + 1;
            hook_budget.used.set(used);
            if used > hook_budget.limit {
                return Err(mlua::Error::runtime(format!(
                    "instruction budget exceeded ({} instructions in one call): runaway loop?",
                    hook_budget.limit * HOOK_EVERY as u64
                )));
            }
            Ok(VmState::Continue)
        })?;
        Ok(())
    }
}

/// A one-line description of a Lua error: the message without the stack traceback, with the
/// memory limit named when that is what stopped the script.
pub fn describe(err: &mlua::Error, limits: &Limits) -> String {
    let mut err = err;
    // Errors raised inside Rust callbacks come wrapped; the cause says what happened, and the
    // traceback where (the script's line that called the host function).
    let mut at = None;
    while let mlua::Error::CallbackError { cause, traceback } = err {
        at = at.or_else(|| script_position(traceback));
        err = cause;
    }
    if let Some(at) = at
        && !matches!(err, mlua::Error::MemoryError(_))
    {
        return format!("{at}: {}", describe(err, limits));
    }
    match err {
        mlua::Error::MemoryError(_) => {
            format!("memory limit of {} MiB reached", limits.memory >> 20)
        }
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(message) => first_line(message),
        other => first_line(&other.to_string()),
    }
}

/// `file:line` of the innermost frame of a traceback that is the script's (not the host's).
fn script_position(traceback: &str) -> Option<String> {
    traceback.lines().skip(1).map(str::trim).find_map(|frame| {
        let mut parts = frame.splitn(3, ':');
        let (file, line) = (parts.next()?, parts.next()?);
        (!file.starts_with('[')
            && !file.starts_with("stormlight-")
            && !file.starts_with("__mlua")
            && line.parse::<u32>().is_ok())
        .then(|| format!("{file}:{line}"))
    })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &str) -> Result<mlua::Value, String> {
        let limits = Limits {
            memory: 4 << 20,
            instructions: 2_000_000,
        };
        let sb = Sandbox::new(limits, 0).unwrap();
        sb.budget.reset();
        sb.lua
            .load(code)
            .set_name("@t.lua")
            .eval()
            .map_err(|e| describe(&e, &limits))
    }

    #[test]
    fn dangerous_globals_are_gone() {
        for code in [
            "return io.open('/etc/passwd')",
            "return os.execute('true')",
            "return require('os')",
            "return dofile('/etc/passwd')",
            "return loadfile('/etc/passwd')",
            "return debug.getinfo(1)",
            "return string.dump(function() end)",
            "return (''):dump()",
            "return os.getenv('HOME')",
            "return collectgarbage('stop')",
        ] {
            let err = run(code).expect_err(code);
            assert!(!err.is_empty(), "{code}");
        }
        assert!(run("return os.time() + os.clock() + #os.date('%Y')").is_ok());
        assert!(run("return collectgarbage('count')").is_ok());
    }

    #[test]
    fn load_accepts_text_and_refuses_bytecode() {
        assert!(matches!(
            run("return load('return 1 + 1')()"),
            Ok(mlua::Value::Integer(2))
        ));
        let err = run("return load('\\27Lua\\84\\0 junk')").unwrap();
        // load returns nil plus a message instead of raising.
        assert!(matches!(err, mlua::Value::Nil), "{err:?}");
        assert!(matches!(
            run("local env = {x = 5}; return load('return x', 'c', 'b', env)()"),
            Ok(mlua::Value::Integer(5))
        ));
    }

    #[test]
    fn runaway_loops_are_stopped_even_under_pcall_and_in_coroutines() {
        for code in [
            "while true do end",
            "while true do pcall(function() while true do end end) end",
            "coroutine.wrap(function() while true do end end)()",
            "while true do xpcall(function() while true do end end, function(e) return e end) end",
            "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
            "local function f() pcall(f) end while true do pcall(f) end",
        ] {
            let err = run(code).expect_err(code);
            assert!(err.contains("instruction budget"), "{code}: {err}");
        }
    }

    #[test]
    fn memory_growth_hits_the_limit() {
        let err = run("local s = 'x' while true do s = s .. string.rep('y', #s) end").unwrap_err();
        assert!(err.contains("memory limit"), "{err}");
        let err = run("return string.rep('x', 1 << 40)").unwrap_err();
        assert!(err.contains("memory limit") || err.contains("too large"), "{err}");
    }
}
