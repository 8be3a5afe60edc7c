//! The sandbox every scenario runs in: an explicit allow-list of standard libraries, `load` of
//! text only, no `string.dump`, a memory limit per Lua state and an instruction budget per call.
//!
//! mlua's `StdLib::ALL_SAFE` still opens `io` and `os`, so the libraries are listed one by one.
//! The instruction budget is a *global* hook: Lua 5.4 copies it into every coroutine a script
//! creates, so a runaway loop inside a coroutine is caught too. Once the budget is spent the hook
//! keeps raising on every count, and `pcall`, `xpcall` and `coroutine.resume` re-raise the error
//! when they catch it: `while true do pcall(f) end` would otherwise catch the hook's error
//! forever, since the hook always fires inside `f`, where most instructions run.

use std::cell::Cell;
use std::rc::Rc;

use mlua::{HookTriggers, Lua, LuaOptions, StdLib, Variadic, VmState};

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
}

/// A sandboxed Lua state and its budget.
pub struct Sandbox {
    pub lua: Lua,
    pub budget: Rc<Budget>,
    pub limits: Limits,
}

/// Lua code run by the host (trusted) once per state, before the scenario: it narrows the
/// base library. `load` keeps text chunks only (binary chunks can break the VM's safety);
/// passing `env` through `...` keeps `load(s, name, mode)` from setting `_ENV` to nil.
const PRELUDE: &str = r#"
local budget_spent = ...
local raw_pcall, raw_xpcall, raw_resume = pcall, xpcall, coroutine.resume
local function guard(ok, ...)
  if not ok and budget_spent() then error((...), 0) end
  return ok, ...
end
pcall = function(...) return guard(raw_pcall(...)) end
xpcall = function(...) return guard(raw_xpcall(...)) end
coroutine.resume = function(...) return guard(raw_resume(...)) end
local raw_load, select, error = load, select, error
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
local raw_os = os
os = { time = raw_os.time, clock = raw_os.clock, date = raw_os.date, difftime = raw_os.difftime }
"#;

impl Sandbox {
    pub fn new(limits: Limits) -> mlua::Result<Self> {
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE | StdLib::OS;
        let lua = Lua::new_with(libs, LuaOptions::default())?;
        let budget = Rc::new(Budget {
            used: Cell::new(0),
            limit: limits.instructions.div_ceil(HOOK_EVERY as u64),
        });
        let spent = budget.clone();
        let budget_spent = lua.create_function(move |_, ()| Ok(spent.used.get() > spent.limit))?;
        lua.load(PRELUDE)
            .set_name("=stormlight-prelude")
            .call::<()>(budget_spent)?;
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
        lua.set_memory_limit(limits.memory)?;
        Ok(Self { lua, budget, limits })
    }
}

/// A one-line description of a Lua error: the message without the stack traceback, with the
/// memory limit named when that is what stopped the script.
pub fn describe(err: &mlua::Error, limits: &Limits) -> String {
    let mut err = err;
    // Errors raised inside Rust callbacks come wrapped; the cause says what happened.
    while let mlua::Error::CallbackError { cause, .. } = err {
        err = cause;
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
        let sb = Sandbox::new(limits).unwrap();
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
