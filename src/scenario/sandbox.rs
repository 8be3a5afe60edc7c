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
//! These few functions, and `_G`'s lazy `__index`, are C functions written in Rust rather than
//! Lua code run in each state: ten thousand users' states are smaller by ~4 KB each.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::rc::Rc;

use std::ffi::{CStr, c_int};
use std::ptr;

use mlua::ffi::{self, lua_State};
use mlua::{HookTriggers, Lua, StdLib, Variadic, VmState};

use super::api;

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
    state: *mut lua_State,
    arena: ManuallyDrop<Box<Arena>>,
    /// Host values the state's C functions reach through raw pointers: dropped after the state
    /// is closed (finalizers a script set may still run while it closes).
    anchors: std::cell::RefCell<Vec<Rc<dyn std::any::Any>>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SAFETY: the state is ours (made in `new`, mlua does not close it); every handle into
        // it lives in this struct or in the `UserState` that owns it, dropped before it. The
        // arena outlives the state, which frees its blocks into it as it closes.
        unsafe {
            ManuallyDrop::drop(&mut self.lua);
            ffi::lua_close(self.state);
            ManuallyDrop::drop(&mut self.arena);
        }
    }
}

/// The standard libraries and scenario globals `_G`'s `__index` makes on first use (bit `i` of
/// its mask stands for `LAZY[i]`): a user state whose script never touches one does not carry
/// it (ten thousand users, ~3 KB each). `print` is the host's (to stderr), made on first use too.
const LAZY: [&str; 14] = [
    "table",
    "math",
    "utf8",
    "coroutine",
    "os",
    "print",
    "http",
    "sleep",
    "check",
    "log",
    "json",
    "uuid",
    "rand",
    "data",
];

/// The budget of the state `l` belongs to: its main thread's extra space points to it, and Lua
/// copies that into every thread the state makes (coroutines included).
///
/// # Safety
/// `l` is a thread of a state made by [`Sandbox::new`], which outlives the budget's use.
unsafe fn budget_spent(l: *mut lua_State) -> bool {
    let word = unsafe { ffi::lua_getextraspace(l).cast::<usize>().read() };
    // SAFETY: see above; `Sandbox` holds the `Rc` until after the state is closed.
    unsafe { ((word & !SCRIPT_COROUTINE) as *const Budget).as_ref() }.is_some_and(Budget::spent)
}

/// The low bit of a thread's extra space (the budget's pointer, aligned, has it clear): set on
/// the coroutines the script makes.
const SCRIPT_COROUTINE: usize = 1;

/// Marks the coroutine `co` as one the script made.
///
/// # Safety
/// `co` is a thread of a state made by [`Sandbox::new`].
unsafe fn mark_script_coroutine(co: *mut lua_State) {
    unsafe {
        let slot = ffi::lua_getextraspace(co).cast::<usize>();
        slot.write(slot.read() | SCRIPT_COROUTINE);
    }
}

/// Whether Lua code is running in a coroutine the script made (`coroutine.create` or
/// `coroutine.wrap`), rather than in the thread the host runs a hook on. The host's waiting
/// functions (`http`, `sleep`) yield to the host, which they cannot do from such a coroutine:
/// their yield would go to the script's `resume` instead.
pub fn in_script_coroutine(lua: &Lua) -> bool {
    let thread = lua.current_thread();
    // SAFETY: a thread's pointer is its `lua_State`, a thread of a sandbox's state.
    unsafe {
        ffi::lua_getextraspace(thread.to_pointer().cast_mut().cast())
            .cast::<usize>()
            .read()
            & SCRIPT_COROUTINE
            != 0
    }
}

/// The string at `idx`, if it is one (numbers are not converted).
///
/// # Safety
/// The bytes borrow the Lua string, which must stay on the stack while they are used.
pub(super) unsafe fn string_at<'a>(l: *mut lua_State, idx: c_int) -> Option<&'a [u8]> {
    unsafe {
        if ffi::lua_type(l, idx) != ffi::LUA_TSTRING {
            return None;
        }
        let mut len = 0;
        let p = ffi::lua_tolstring(l, idx, &mut len);
        Some(std::slice::from_raw_parts(p.cast(), len))
    }
}

// The functions below replace some of the base library's, and are C functions in Rust: a
// closure of Lua code per state (its prototype, constants and upvalues) cost each state ~4 KB;
// these cost nothing, or one small closure. They hold no Rust value that needs dropping when a
// Lua error unwinds through them (`lua_error` and errors in `lua_call` jump over their frames).

/// What `pcall` and `xpcall` return once their function has returned or raised (Lua 5.4's own
/// `finishpcall`), except that an error raised because the instruction budget is spent is
/// raised again: `while true do pcall(f) end` would otherwise catch the budget's error forever,
/// since the hook fires inside `f`, where most instructions run.
unsafe extern "C-unwind" fn finish_pcall(l: *mut lua_State, status: c_int, extra: ffi::lua_KContext) -> c_int {
    unsafe {
        if status != ffi::LUA_OK && status != ffi::LUA_YIELD {
            if budget_spent(l) {
                ffi::lua_error(l);
            }
            ffi::lua_pushboolean(l, 0);
            ffi::lua_pushvalue(l, -2);
            return 2;
        }
        ffi::lua_gettop(l) - extra as c_int
    }
}

unsafe extern "C-unwind" fn pcall(l: *mut lua_State) -> c_int {
    unsafe {
        ffi::luaL_checkany(l, 1);
        ffi::lua_pushboolean(l, 1);
        ffi::lua_insert(l, 1);
        let status = ffi::lua_pcallk(l, ffi::lua_gettop(l) - 2, ffi::LUA_MULTRET, 0, 0, Some(finish_pcall));
        finish_pcall(l, status, 0)
    }
}

unsafe extern "C-unwind" fn xpcall(l: *mut lua_State) -> c_int {
    unsafe {
        let n = ffi::lua_gettop(l);
        ffi::luaL_checktype(l, 2, ffi::LUA_TFUNCTION);
        ffi::lua_pushboolean(l, 1);
        ffi::lua_pushvalue(l, 1);
        ffi::lua_rotate(l, 3, 2);
        let status = ffi::lua_pcallk(l, n - 2, ffi::LUA_MULTRET, 2, 2, Some(finish_pcall));
        finish_pcall(l, status, 2)
    }
}

/// `coroutine.resume` (upvalue 1: the library's), raising the budget's error again as `pcall`.
unsafe extern "C-unwind" fn resume(l: *mut lua_State) -> c_int {
    unsafe {
        let n = ffi::lua_gettop(l);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        ffi::lua_call(l, n, ffi::LUA_MULTRET);
        if ffi::lua_toboolean(l, 1) == 0 && budget_spent(l) {
            ffi::lua_settop(l, 2);
            ffi::lua_error(l);
        }
        ffi::lua_gettop(l)
    }
}

/// Calls upvalue 1 (the library's function) with the arguments, one result.
unsafe fn call_original(l: *mut lua_State) {
    unsafe {
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        ffi::lua_call(l, ffi::lua_gettop(l) - 1, 1);
    }
}

/// `coroutine.create`, marking the coroutine as the script's.
unsafe extern "C-unwind" fn create(l: *mut lua_State) -> c_int {
    unsafe {
        call_original(l);
        let co = ffi::lua_tothread(l, -1);
        if !co.is_null() {
            mark_script_coroutine(co);
        }
        1
    }
}

/// `coroutine.wrap`, marking the coroutine (the first upvalue of the function it returns).
unsafe extern "C-unwind" fn wrap(l: *mut lua_State) -> c_int {
    unsafe {
        call_original(l);
        if !ffi::lua_getupvalue(l, -1, 1).is_null() {
            let co = ffi::lua_tothread(l, -1);
            if !co.is_null() {
                mark_script_coroutine(co);
            }
            ffi::lua_pop(l, 1);
        }
        1
    }
}

/// `load` (upvalue 1: the library's) of text chunks only: binary chunks can break the VM's
/// safety. The mode argument is replaced; `env` is passed on only when given, as `load` tells
/// a nil `env` from none.
unsafe extern "C-unwind" fn load_text(l: *mut lua_State) -> c_int {
    unsafe {
        let n = ffi::lua_gettop(l).max(3);
        ffi::lua_settop(l, n);
        ffi::lua_pushstring(l, c"t".as_ptr());
        ffi::lua_replace(l, 3);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        ffi::lua_call(l, n, ffi::LUA_MULTRET);
        ffi::lua_gettop(l)
    }
}

/// `collectgarbage("count")` only: a scenario does not get to stop or tune the collector.
unsafe extern "C-unwind" fn collectgarbage(l: *mut lua_State) -> c_int {
    unsafe {
        if string_at(l, 1) == Some(b"count") {
            let k = ffi::lua_gc(l, ffi::LUA_GCCOUNT);
            let b = ffi::lua_gc(l, ffi::LUA_GCCOUNTB);
            ffi::lua_pushnumber(l, f64::from(k) + f64::from(b) / 1024.0);
            return 1;
        }
        ffi::luaL_error(
            l,
            c"collectgarbage: only collectgarbage('count') is allowed in a scenario".as_ptr(),
        )
    }
}

/// `_G`'s `__index`: makes a lazy global on first use (upvalue 1: the host's `open_lib`,
/// upvalue 2: the mask of those not made yet) and sets it; the scenario's constructors are made
/// each time they are looked up and never set, so they do not grow every user's `_G`.
unsafe extern "C-unwind" fn global_index(l: *mut lua_State) -> c_int {
    unsafe {
        // Only `_G` itself is served: a script cannot reach this function (the metatable is
        // protected), but nothing here may depend on that.
        ffi::lua_settop(l, 2);
        ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_GLOBALS);
        if ffi::lua_rawequal(l, 1, 3) == 0 {
            return 0;
        }
        let Some(name) = string_at(l, 2) else { return 0 };
        // Pushes the value `open_lib` makes for the name (at 4).
        let open = |l| {
            ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
            ffi::lua_pushvalue(l, 2);
            ffi::lua_call(l, 1, 1);
        };
        let mask = |l| ffi::lua_tointegerx(l, ffi::lua_upvalueindex(2), ptr::null_mut());
        if api::CONSTRUCTORS.iter().any(|c| c.as_bytes() == name) {
            open(l);
            return 1;
        }
        let Some(bit) = LAZY.iter().position(|n| n.as_bytes() == name) else {
            return 0;
        };
        if mask(l) & (1 << bit) == 0 {
            return 0;
        }
        // Made first, then marked as made: a name whose making failed (the memory limit) is
        // made on its next use.
        open(l);
        let left = mask(l) & !(1 << bit);
        ffi::lua_pushinteger(l, left);
        ffi::lua_replace(l, ffi::lua_upvalueindex(2));
        match name {
            b"coroutine" => {
                let wrapped: [(ffi::lua_CFunction, &CStr); 3] =
                    [(resume, c"resume"), (create, c"create"), (wrap, c"wrap")];
                for (f, field) in &wrapped {
                    ffi::lua_getfield(l, 4, field.as_ptr());
                    ffi::lua_pushcclosure(l, *f, 1);
                    ffi::lua_setfield(l, 4, field.as_ptr());
                }
            }
            b"os" => {
                ffi::lua_createtable(l, 0, 4);
                for f in &[c"time", c"clock", c"date", c"difftime"] {
                    ffi::lua_getfield(l, 4, f.as_ptr());
                    ffi::lua_setfield(l, 5, f.as_ptr());
                }
                ffi::lua_replace(l, 4);
            }
            _ => {}
        }
        if left & COROUTINE_BIT != 0 {
            // mlua sets the library's own `coroutine` global when it makes the first waiting
            // function (`http`, `sleep`): the script gets the narrowed one on first use instead.
            ffi::lua_pushstring(l, c"coroutine".as_ptr());
            ffi::lua_pushnil(l);
            ffi::lua_rawset(l, 3);
        }
        ffi::lua_pushvalue(l, 2);
        ffi::lua_pushvalue(l, 4);
        ffi::lua_rawset(l, 3);
        1
    }
}

/// `coroutine`'s bit in `global_index`'s mask.
const COROUTINE_BIT: i64 = 1 << 3;
const _: () = assert!(matches!(LAZY[3].as_bytes(), b"coroutine"));

fn print(_: &Lua, args: Variadic<mlua::Value>) -> mlua::Result<()> {
    let parts: Vec<String> = args
        .iter()
        .map(|v| v.to_string().unwrap_or_else(|_| "?".into()))
        .collect();
    eprintln!("{}", parts.join("\t"));
    Ok(())
}

/// Narrows the base library of the state `l` (its globals table, made by `luaopen_base`, on
/// top of its stack) and gives `_G` its lazy `__index`, whose `open_lib` is on top of that.
///
/// # Safety
/// `l` is a fresh state's main thread with the two values on its stack and room for 4 more.
unsafe fn narrow_globals(l: *mut lua_State) {
    unsafe {
        // Stack: _G, open_lib.
        ffi::lua_createtable(l, 0, 2);
        ffi::lua_rotate(l, -2, 1);
        ffi::lua_pushinteger(l, (1 << LAZY.len()) - 1);
        ffi::lua_pushcclosure(l, global_index, 2);
        ffi::lua_setfield(l, -2, c"__index".as_ptr());
        // Scripts can neither read nor replace it (`getmetatable(_G)` is false).
        ffi::lua_pushboolean(l, 0);
        ffi::lua_setfield(l, -2, c"__metatable".as_ptr());
        ffi::lua_setmetatable(l, -2);
        ffi::lua_pushcfunction(l, pcall);
        ffi::lua_setfield(l, -2, c"pcall".as_ptr());
        ffi::lua_pushcfunction(l, xpcall);
        ffi::lua_setfield(l, -2, c"xpcall".as_ptr());
        ffi::lua_pushcfunction(l, collectgarbage);
        ffi::lua_setfield(l, -2, c"collectgarbage".as_ptr());
        ffi::lua_getfield(l, -1, c"load".as_ptr());
        ffi::lua_pushcclosure(l, load_text, 1);
        ffi::lua_setfield(l, -2, c"load".as_ptr());
        for name in &[c"dofile", c"loadfile", c"require", c"module", c"print"] {
            ffi::lua_pushnil(l);
            ffi::lua_setfield(l, -2, name.as_ptr());
        }
        ffi::lua_getfield(l, -1, c"string".as_ptr());
        ffi::lua_pushnil(l);
        ffi::lua_setfield(l, -2, c"dump".as_ptr());
        // find, match, gmatch and gsub whose work is counted (see `pattern`).
        super::pattern::install(l);
        ffi::lua_settop(l, 0);
    }
}

impl Sandbox {
    /// A sandbox whose memory starts with room for `expect` bytes (what a state of this
    /// scenario takes: see [`Sandbox::carved`]).
    pub fn new(limits: Limits, expect: usize) -> mlua::Result<Self> {
        // The state lives in an arena of its own (see `arena`), which also holds it to the
        // memory limit. Only `string` is opened up front (strings' methods need it); `_G`'s
        // `__index` opens the others lazily.
        let mut arena = Arena::new(limits.memory, expect);
        let budget = Rc::new(Budget {
            used: Cell::new(0),
            limit: limits.instructions.div_ceil(HOOK_EVERY as u64),
        });
        // SAFETY: the arena is boxed (it does not move) and outlives the state (see `Drop`), as
        // does the budget the state's extra space points to. Opening the two libraries cannot
        // fail for memory in a new state far from its limit.
        let (state, lua) = unsafe {
            let state = ffi::lua_newstate(arena::lua_alloc, (&mut *arena as *mut Arena).cast());
            if state.is_null() {
                return Err(mlua::Error::MemoryError("cannot create a Lua state".into()));
            }
            ffi::lua_getextraspace(state)
                .cast::<*const Budget>()
                .write(Rc::as_ptr(&budget));
            ffi::luaL_requiref(state, c"_G".as_ptr(), ffi::luaopen_base, 1);
            ffi::luaL_requiref(state, c"string".as_ptr(), ffi::luaopen_string, 1);
            ffi::lua_settop(state, 0);
            (state, Lua::get_or_init_from_ptr(state).clone())
        };
        let sandbox = Self {
            lua: ManuallyDrop::new(lua),
            budget,
            limits,
            state,
            arena: ManuallyDrop::new(arena),
            anchors: Default::default(),
        };
        sandbox.init()?;
        Ok(sandbox)
    }

    /// Keeps `value` alive until after the state is closed, and returns a pointer to it that
    /// C functions of the state may hold.
    pub fn anchor<T: 'static>(&self, value: Rc<T>) -> *const T {
        let ptr = Rc::as_ptr(&value);
        self.anchors.borrow_mut().push(value);
        ptr
    }

    /// Bytes of small blocks the state has taken so far: room the next state of the same
    /// scenario should start with.
    pub fn carved(&self) -> usize {
        self.arena.carved()
    }

    fn init(&self) -> mlua::Result<()> {
        let lua = &*self.lua;
        let open_lib = lua.create_function(|lua, name: mlua::LuaString| {
            let lib = match &*name.as_bytes() {
                b"table" => StdLib::TABLE,
                b"math" => StdLib::MATH,
                b"utf8" => StdLib::UTF8,
                b"coroutine" => StdLib::COROUTINE,
                b"os" => StdLib::OS,
                // print goes to stderr so that it never breaks the tables on stdout.
                b"print" => return lua.create_function(print).map(mlua::Value::Function),
                other => {
                    let value = super::host::open(lua, &String::from_utf8_lossy(other))?;
                    return Ok(value);
                }
            };
            lua.load_std_libs(lib)?;
            // Opening a library sets its global; `global_index` decides what the script sees.
            let value: mlua::Value = lua.globals().raw_get(name.clone())?;
            lua.globals().raw_set(name, mlua::Value::Nil)?;
            Ok(value)
        })?;
        // SAFETY: the stack holds `_G` and `open_lib` (and room for more: `exec_raw` checks).
        unsafe { lua.exec_raw::<()>((lua.globals(), open_lib), |l| narrow_globals(l)) }?;

        let hook_budget = self.budget.clone();
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, debug| {
                let used = hook_budget.used.get() + 1;
                hook_budget.used.set(used);
                if used > hook_budget.limit {
                    // Where the loop is: the line running when the budget ran out.
                    let at = match (debug.source().short_src, debug.current_line()) {
                        (Some(file), Some(line)) if !file.starts_with('[') => format!("{file}:{line}: "),
                        _ => String::new(),
                    };
                    return Err(mlua::Error::runtime(format!(
                        "{at}instruction budget exceeded ({} instructions in one call): runaway loop?",
                        hook_budget.limit * HOOK_EVERY as u64
                    )));
                }
                Ok(VmState::Continue)
            },
        )?;
        Ok(())
    }
}

// ---- Native work ----------------------------------------------------------------------------
//
// Work that C functions do without running Lua instructions (the pattern matcher's steps) is
// charged through `work`. This version counts the steps of each thread and stops a call only
// past a limit a test sets; it charges nothing to the call's instruction budget and reads no
// clock.

thread_local! {
    static WORK_DONE: Cell<u64> = const { Cell::new(0) };
    static WORK_LIMIT: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// Charges `steps` of native work to the call running on `l`. `Err` holds the message to raise
/// when the call must stop.
pub fn work(_l: *mut lua_State, steps: u64) -> Result<(), String> {
    let done = WORK_DONE.get().saturating_add(steps);
    WORK_DONE.set(done);
    let limit = WORK_LIMIT.get();
    if done > limit {
        return Err(format!("work limit of {limit} steps reached"));
    }
    Ok(())
}

/// Sets this thread's limit of native work (`None`: none) and starts its count from 0.
#[cfg(test)]
pub fn limit_work(limit: Option<u64>) {
    WORK_DONE.set(0);
    WORK_LIMIT.set(limit.unwrap_or(u64::MAX));
}

/// Steps of native work this thread charged since [`limit_work`].
#[cfg(test)]
pub fn work_done() -> u64 {
    WORK_DONE.get()
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
        let inner = describe(err, limits);
        // (The instruction budget's error already says where it stopped.)
        if inner.starts_with(&format!("{at}: ")) {
            return inner;
        }
        return format!("{at}: {inner}");
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
    fn the_narrowed_base_functions_behave_as_luas_own() {
        let ok = |code: &str| run(code).unwrap_or_else(|e| panic!("{code}: {e}"));
        for code in [
            // pcall and xpcall: results, errors, message handlers, yields across them.
            "local ok, a, b = pcall(function(x) return x, 2 end, 1) assert(ok and a == 1 and b == 2)",
            "local ok, e = pcall(error, {code = 7}) assert(not ok and e.code == 7)",
            "local ok, e = xpcall(function() error('x', 0) end, function(m) return m .. '!' end) assert(e == 'x!')",
            "local ok, e = pcall(pcall) assert(not ok and e:find('value expected'))",
            "local co = coroutine.wrap(function() local ok, v = pcall(coroutine.yield, 5) return ok, v end)
             assert(co() == 5) local ok, v = co(6) assert(ok and v == 6)",
            "local ok, e = coroutine.resume(coroutine.create(function() error('boom', 0) end))
             assert(not ok and e == 'boom')",
            // load: text only, with or without an environment (a nil one is one).
            "assert(load('return 1 + 1')() == 2)",
            "assert(load('return 3', 'c', 'b')() == 3)",
            "assert(not pcall(load('return x', 'c', 't', nil)))",
            "assert(load('return x', 'c', 't', {x = 4})() == 4)",
            // The lazy globals: made once, then plain globals; unknown names stay nil.
            "assert(type(print) == 'function' and rawget(_G, 'print') == print)",
            "assert(math.max(1, 2) == 2 and rawget(_G, 'math') == math)",
            "assert(os.time() > 0 and os.execute == nil and os.getenv == nil)",
            "assert(nosuchglobal == nil and _G[1] == nil)",
            "assert(type(Task) == 'function' and rawget(_G, 'Task') == nil)",
            "local n = collectgarbage('count') assert(type(n) == 'number' and n > 1)",
            // _G's metatable is the host's: hidden, and not replaceable.
            "assert(getmetatable(_G) == false and not pcall(setmetatable, _G, {}))",
        ] {
            ok(code);
        }
        // Its __index serves `_G` only, whatever it is called with (it rawsets what it makes).
        let sb = Sandbox::new(Limits::default(), 0).unwrap();
        let index: mlua::Function = sb.lua.globals().metatable().unwrap().raw_get("__index").unwrap();
        for wrong in [
            mlua::Value::Integer(0x4141_4141),
            mlua::Value::Table(sb.lua.create_table().unwrap()),
        ] {
            let got: mlua::Value = index.call((wrong, "math")).unwrap();
            assert!(got.is_nil());
        }
        let math: mlua::Table = sb.lua.globals().get("math").unwrap();
        assert!(
            math.contains_key("floor").unwrap(),
            "math is still made on its first use"
        );
        let err = run("collectgarbage('collect')").unwrap_err();
        assert!(err.starts_with("t.lua:1: collectgarbage: only"), "{err}");
    }

    #[test]
    fn a_fresh_state_is_small() {
        // What ten thousand users multiply: the state before the scenario runs in it (17.0 KB
        // when the base library was narrowed by Lua code run in each state, 12.3 KB now).
        let sb = Sandbox::new(Limits::default(), 0).unwrap();
        sb.lua.gc_collect().unwrap();
        let used = sb.lua.used_memory();
        assert!(used < 14 * 1024, "{used} bytes");
    }

    #[test]
    fn memory_growth_hits_the_limit() {
        let err = run("local s = 'x' while true do s = s .. string.rep('y', #s) end").unwrap_err();
        assert!(err.contains("memory limit"), "{err}");
        let err = run("return string.rep('x', 1 << 40)").unwrap_err();
        assert!(err.contains("memory limit") || err.contains("too large"), "{err}");
    }
}
