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

use std::cell::{Cell, RefCell};
use std::mem::ManuallyDrop;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::ffi::{CStr, c_int};
use std::ptr;

use mlua::ffi::{self, lua_State};
use mlua::{HookTriggers, Lua, StdLib, VmState};

use super::api;

pub use super::arena::set_total_limit;
use super::arena::{self, Arena};

/// Instructions between two checks of the call's limits.
const HOOK_EVERY: u32 = 1000;

/// Allocations at least this large look at the call's clock and the run's stop: the work of a
/// single instruction or library call that builds a large string or table is bounded by them.
pub(super) const LARGE_ALLOCATION: usize = 64 * 1024;

/// After this long, a call is a slow one: the hook then notes where it is, for the limit's
/// error and for the report of a user still stuck at the end of the run.
const SLOW_CALL: Duration = Duration::from_millis(200);

/// Per-state limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes a Lua state may allocate.
    pub memory: usize,
    /// Lua VM instructions one call into the script (a hook, or loading the file) may run.
    pub instructions: u64,
    /// How long one call into the script may run on its worker, not counting the time it
    /// waits (`http`, `sleep`): the wall-clock limit, for work the instruction count does not
    /// see (the string and table libraries, allocation).
    pub time: Duration,
}

/// A user state's memory limit when neither `--script-memory` nor `options.script_memory` sets
/// it.
pub const DEFAULT_SCRIPT_MEMORY: usize = 16 << 20;

/// The script time limit when neither `--script-timeout` nor `options.script_timeout` sets it.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for Limits {
    fn default() -> Self {
        // 16 MiB is far above what a scenario's state needs (~30 KB) and small enough that ten
        // thousand users cannot take the machine down. 100 M instructions is ~0.5-2 s of Lua.
        Self {
            memory: DEFAULT_SCRIPT_MEMORY,
            instructions: 100_000_000,
            time: DEFAULT_SCRIPT_TIMEOUT,
        }
    }
}

/// `now + d`, or far in the future when that does not fit in an `Instant`.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Which limit stopped a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// The instruction budget.
    Instructions,
    /// The wall-clock limit (`--script-timeout`).
    Time,
    /// The run ended (its grace period is over, or a second Ctrl-C): every script stops.
    Stop,
}

/// The limits of the call running in one state: [`Budget::start`] before each call into the
/// script. Once a limit is hit, every later check of the same call fails again, so that
/// `pcall` cannot swallow it.
pub struct Budget {
    /// Hook ticks (of [`HOOK_EVERY`] instructions) the call has used, and may use.
    used: Cell<u64>,
    /// Steps of library work (see [`work`]) not yet charged as a whole tick.
    steps: Cell<u64>,
    limit: u64,
    /// The state's memory limit, for the host functions that build what becomes its values.
    memory: usize,
    time: Duration,
    /// When the call started, and when its time is up (moved on by its waits).
    started: Cell<Instant>,
    deadline: Cell<Instant>,
    hit: Cell<Option<Hit>>,
    /// Where a slow call was last seen (`file:line`), once it has run [`SLOW_CALL`].
    at: RefCell<Option<String>>,
    /// The worker this state runs on, when it runs in a load test (see [`attach_worker`]).
    worker: Option<Rc<WorkerLink>>,
    /// The user this state belongs to (0: the scenario loading, setup, teardown).
    user: Cell<u64>,
    /// Between [`Budget::start`] and [`Budget::end`].
    active: Cell<bool>,
    /// Whether the hook notes where the call is at every check (see
    /// [`Sandbox::note_positions`]).
    noting: Cell<bool>,
    /// Where a library function of the call ran out of memory (`file:line`).
    memory_at: RefCell<Option<String>>,
    /// The state's arena (set once it is made), for what the host holds for the state.
    arena: Cell<*mut Arena>,
}

/// Bytes the host holds for a state (see [`Budget::charge`]), counted as the state's until
/// dropped.
pub struct Charge {
    arena: *mut Arena,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        // SAFETY: a charge is held by the state's values (its userdata, its user's `res`),
        // dropped before the state is closed and its arena freed; one thread at a time.
        unsafe { (*self.arena).discharge(self.bytes) }
    }
}

impl Budget {
    fn new(limits: &Limits) -> Self {
        let now = Instant::now();
        Self {
            used: Cell::new(0),
            steps: Cell::new(0),
            limit: limits.instructions.div_ceil(HOOK_EVERY as u64),
            memory: limits.memory,
            time: limits.time,
            started: Cell::new(now),
            deadline: Cell::new(later(now, limits.time)),
            hit: Cell::new(None),
            at: RefCell::new(None),
            worker: WORKER.with(|w| w.borrow().clone()),
            user: Cell::new(0),
            active: Cell::new(false),
            noting: Cell::new(false),
            memory_at: RefCell::new(None),
            arena: Cell::new(ptr::null_mut()),
        }
    }

    /// A call into the script begins (`hook` names it, for the report of stuck users).
    pub fn start(&self, hook: &'static str) {
        let now = Instant::now();
        self.used.set(0);
        self.steps.set(0);
        self.hit.set(None);
        self.active.set(true);
        self.started.set(now);
        self.deadline.set(later(now, self.time));
        if self.at.borrow().is_some() {
            *self.at.borrow_mut() = None;
        }
        if self.memory_at.borrow().is_some() {
            *self.memory_at.borrow_mut() = None;
        }
        if let Some(w) = &self.worker {
            w.activity.begin(self.user.get(), hook);
        }
    }

    /// The call has returned (or raised).
    pub fn end(&self) {
        self.active.set(false);
        if let Some(w) = &self.worker {
            w.activity.end();
        }
    }

    /// The run is stopping and the call asked to wait (`http`, `sleep`): it ends now, and no
    /// `pcall` of the script's catches that.
    pub fn stop_call(&self) {
        self.hit.set(Some(Hit::Stop));
    }

    /// The call waited (`http`, `sleep`) from `since` until now: that time is not its own.
    pub fn waited(&self, since: Instant) {
        let waited = since.elapsed();
        self.deadline.set(self.deadline.get() + waited);
        self.started.set(self.started.get() + waited);
    }

    /// Whether a limit stopped the current call, and which.
    pub fn hit(&self) -> Option<Hit> {
        self.hit.get()
    }

    /// Whether the current call has been stopped by one of its limits.
    pub fn spent(&self) -> bool {
        self.hit.get().is_some()
    }

    /// The state's memory limit (bytes).
    pub fn memory(&self) -> usize {
        self.memory
    }

    /// Counts `bytes` the host holds for the state (a response body its script can read) in
    /// the state's memory, until the returned charge is dropped; `None` if they do not fit
    /// (the state's limit, or all states' together).
    pub fn charge(&self, bytes: usize) -> Option<Charge> {
        let arena = self.arena.get();
        // SAFETY: set when the sandbox was made; the arena outlives the budget's use.
        // (`then`, not `then_some`: a charge made and dropped would give its bytes back.)
        (!arena.is_null() && unsafe { (*arena).charge(bytes) }).then(|| Charge { arena, bytes })
    }

    pub fn set_user(&self, id: u64) {
        self.user.set(id);
    }

    /// Charges `ticks` to the call and looks at its clock and the run's stop: the limit that
    /// stops it, if one does (and from then on, at every check).
    fn check(&self, ticks: u64) -> Option<Hit> {
        if let Some(hit) = self.hit.get() {
            return Some(hit);
        }
        let used = self.used.get() + ticks;
        self.used.set(used);
        let hit = if used > self.limit {
            Some(Hit::Instructions)
        } else if self
            .worker
            .as_ref()
            .is_some_and(|w| self.stopped(w.stop.load(Ordering::Relaxed)))
        {
            Some(Hit::Stop)
        } else if Instant::now() > self.deadline.get() {
            Some(Hit::Time)
        } else {
            None
        };
        self.hit.set(hit);
        hit
    }

    /// Whether the run's stop level stops this state's calls: users' from [`STOP_USERS`],
    /// setup's and teardown's (user 0) from [`STOP_ALL`].
    fn stopped(&self, level: u8) -> bool {
        level >= STOP_ALL || (level >= STOP_USERS && self.user.get() != 0)
    }

    /// Instructions (and steps of library work) the current call has been charged so far.
    #[cfg(test)]
    pub fn charged(&self) -> u64 {
        self.used.get() * HOOK_EVERY as u64 + self.steps.get()
    }

    /// Whether the call has run long enough for the hook to note where it is.
    fn slow(&self) -> bool {
        self.started.get().elapsed() > SLOW_CALL.min(self.time / 2)
    }

    /// A slow call is at `at` now.
    fn note(&self, at: Option<String>) {
        let Some(at) = at else { return };
        if let Some(w) = &self.worker
            && self.slow()
        {
            w.activity.note(self.started.get(), at.clone());
        }
        *self.at.borrow_mut() = Some(at);
    }

    /// For the check of large allocations: the limit that stops the running call, if one does
    /// (none between calls: the host's own allocations always go through).
    pub(super) fn allocation_refused(&self) -> bool {
        self.active.get() && self.check(0).is_some()
    }

    /// The error of a limit, with `at` (`file:line`) or else where the call was last seen.
    pub fn message(&self, hit: Hit, at: Option<&str>) -> String {
        let last = self.at.borrow();
        let at = match at.or(last.as_deref()) {
            Some(at) => format!("{at}: "),
            None => String::new(),
        };
        match hit {
            Hit::Instructions => format!(
                "{at}instruction budget exceeded ({} instructions in one call): runaway loop?",
                self.limit * HOOK_EVERY as u64
            ),
            Hit::Time => format!(
                "{at}script time limit exceeded ({} of work in one call, waits not counted; --script-timeout): runaway loop or too much work?",
                crate::config::format_duration(self.time)
            ),
            Hit::Stop => format!("{at}stopped: the run ended while this call was still running"),
        }
    }
}

/// What the run shares with the scripts of one worker thread: the run's stop level (see
/// [`STOP_USERS`]; every script call it concerns, on every worker, stops at its next check)
/// and what the worker's scripts are doing (read by the run's control side when a worker
/// does not answer).
pub struct WorkerLink {
    pub stop: Arc<AtomicU8>,
    pub activity: Arc<Activity>,
    /// Calls whose task was cancelled while they waited (see [`Call::done`]).
    abandoned: RefCell<Vec<String>>,
}

/// The calls of this worker's states cancelled while they waited, since the last time asked.
pub fn abandoned_calls() -> Vec<String> {
    WORKER.with(|w| w.borrow().as_ref().map(|w| w.abandoned.take()).unwrap_or_default())
}

/// Stop levels: the users' grace period is over (their calls stop; setup and teardown go on)...
pub const STOP_USERS: u8 = 1;
/// ...every call stops (teardown's time is over too, or a second Ctrl-C).
pub const STOP_ALL: u8 = 2;

thread_local! {
    /// The link of the worker thread this is, for every state made on it.
    static WORKER: RefCell<Option<Rc<WorkerLink>>> = const { RefCell::new(None) };
}

/// Makes this thread a worker of a run: every sandbox made on it from now on stops at `stop`
/// and reports to `activity`.
pub fn attach_worker(stop: Arc<AtomicU8>, activity: Arc<Activity>) {
    WORKER.with(|w| {
        *w.borrow_mut() = Some(Rc::new(WorkerLink {
            stop,
            activity,
            abandoned: Default::default(),
        }))
    });
}

/// The script call a worker is running, if any: which user, which hook, since when, and
/// where it was last seen once it ran long. Written by the worker at each call (two relaxed
/// stores), read by the run's control side only when the worker does not answer in time.
#[derive(Default)]
pub struct Activity {
    user: AtomicU64,
    /// 1 + the index of the hook's name in [`CALLS`]; 0: no call.
    hook: AtomicUsize,
    /// Calls begun so far: tells a slow call's note from an earlier call's.
    calls: AtomicU64,
    /// The slow call's number, when it started, and where it was last seen.
    slow: std::sync::Mutex<Option<(u64, Instant, String)>>,
}

/// The names a call may have (see [`Budget::start`]).
pub const CALLS: [&str; 10] = [
    "the scenario file",
    "on_start",
    "before_request",
    "after_response",
    "on_stop",
    "scenario",
    "setup",
    "teardown",
    "user state",
    "a hook",
];

impl Activity {
    /// A call of `user` into `hook` begins (see [`Budget::start`]).
    pub fn begin(&self, user: u64, hook: &'static str) {
        let index = CALLS.iter().position(|c| *c == hook).unwrap_or(CALLS.len() - 1);
        self.user.store(user, Ordering::Relaxed);
        self.hook.store(index + 1, Ordering::Relaxed);
        // (Only this worker writes it: no read-modify-write needed.)
        self.calls
            .store(self.calls.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// The call has ended.
    pub fn end(&self) {
        self.hook.store(0, Ordering::Relaxed);
    }

    fn note(&self, started: Instant, at: String) {
        if let Ok(mut slow) = self.slow.lock() {
            *slow = Some((self.calls.load(Ordering::Relaxed), started, at));
        }
    }

    /// The hook the worker is running now, if any.
    pub fn hook(&self) -> Option<&'static str> {
        let index = self.hook.load(Ordering::Relaxed).checked_sub(1)?;
        Some(CALLS[index])
    }

    /// What the worker is running now: `user N in HOOK at FILE:LINE` (where it was last seen,
    /// if the call has run long), or `None` between calls.
    pub fn describe(&self) -> Option<String> {
        let hook = self.hook.load(Ordering::Relaxed).checked_sub(1)?;
        let user = self.user.load(Ordering::Relaxed);
        let who = match user {
            0 => String::new(),
            n => format!("user {n} "),
        };
        let mut text = format!("{who}in {}", CALLS[hook]);
        if let Ok(slow) = self.slow.lock()
            && let Some((call, since, at)) = slow.as_ref()
            && *call == self.calls.load(Ordering::Relaxed)
        {
            text.push_str(&format!(" at {at} (running for {:.1}s)", since.elapsed().as_secs_f64()));
        }
        Some(text)
    }
}

/// A call into the script, from [`Sandbox::call`] until dropped.
pub struct Call<'a> {
    budget: &'a Budget,
    name: &'static str,
    done: bool,
}

impl Call<'_> {
    /// The call has returned (or raised): dropped without this, it was abandoned (its task
    /// cancelled at the end of the run, while it waited on `http` or `sleep`).
    pub fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.budget.end();
        if !self.done
            && let Some(w) = &self.budget.worker
        {
            let at = match self.budget.at.borrow().as_deref() {
                Some(at) => format!(" (last seen at {at})"),
                None => String::new(),
            };
            let user = match self.budget.user.get() {
                0 => String::new(),
                n => format!("user {n} "),
            };
            w.abandoned.borrow_mut().push(format!(
                "{user}in {}: stopped: the run ended while this call was still waiting (http or sleep){at}",
                self.name
            ));
        }
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
    anchors: RefCell<Vec<Rc<dyn std::any::Any>>>,
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
unsafe fn budget_of<'a>(l: *mut lua_State) -> Option<&'a Budget> {
    let word = unsafe { ffi::lua_getextraspace(l).cast::<usize>().read() };
    // SAFETY: see above; `Sandbox` holds the `Rc` until after the state is closed.
    unsafe { ((word & !SCRIPT_COROUTINE) as *const Budget).as_ref() }
}

/// Whether the call running in the state of `l` has been stopped by one of its limits.
///
/// # Safety
/// As [`budget_of`].
unsafe fn budget_spent(l: *mut lua_State) -> bool {
    unsafe { budget_of(l) }.is_some_and(Budget::spent)
}

/// `file:line` of the Lua function that called the running C function, if it is the script's.
///
/// # Safety
/// `l` is a valid thread with room for one more value on its stack.
unsafe fn caller_position(l: *mut lua_State) -> Option<String> {
    unsafe {
        ffi::luaL_where(l, 1);
        let at = string_at(l, -1).map(|b| String::from_utf8_lossy(b).trim_end_matches([':', ' ']).to_string());
        ffi::lua_pop(l, 1);
        at.filter(|a| !a.is_empty() && !a.starts_with('['))
    }
}

/// For the string and table functions written in Rust (the pattern matcher): charges `steps`
/// of their work to the running call (a step is worth about one VM instruction) and looks at
/// its clock and the run's stop. `Err`: the call must stop, with this message; raise it once
/// no Rust value that needs dropping is left on the stack.
///
/// # Safety
/// `l` is a thread of a state made by [`Sandbox::new`], with room for one more value.
pub(super) unsafe fn work(l: *mut lua_State, steps: u64) -> Result<(), String> {
    let Some(budget) = (unsafe { budget_of(l) }) else {
        return Ok(());
    };
    // Steps add up to whole ticks; the limits are looked at once per tick at most.
    let steps = budget.steps.get() + steps;
    if steps < HOOK_EVERY as u64 && budget.hit().is_none() {
        budget.steps.set(steps);
        return Ok(());
    }
    budget.steps.set(steps % HOOK_EVERY as u64);
    match budget.check(steps / HOOK_EVERY as u64) {
        None => Ok(()),
        Some(hit) => Err(budget.message(hit, unsafe { caller_position(l) }.as_deref())),
    }
}

/// `table.sort` (upvalue 1: the library's) with its default order given as a comparison of
/// ours, which charges each comparison to the call: sorting a long list is then stopped on
/// time like any other work (a comparator of the script's runs under the hook already).
unsafe extern "C-unwind" fn sort(l: *mut lua_State) -> c_int {
    unsafe {
        if ffi::lua_type(l, 1) == ffi::LUA_TTABLE && ffi::lua_type(l, 2) <= ffi::LUA_TNIL {
            ffi::lua_settop(l, 1);
            ffi::lua_pushcfunction(l, less_than);
        }
        let n = ffi::lua_gettop(l);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        ffi::lua_call(l, n, 0);
        0
    }
}

/// `a < b`, as `table.sort` compares by default, one step of the call's work.
unsafe extern "C-unwind" fn less_than(l: *mut lua_State) -> c_int {
    unsafe {
        if let Err(msg) = work(l, 1) {
            raise(l, msg);
        }
        let lt = ffi::lua_compare(l, 1, 2, ffi::LUA_OPLT);
        ffi::lua_pushboolean(l, lt);
        1
    }
}

/// Raises `msg` as a Lua error; the string is dropped first (a Lua error jumps over the frames
/// of C functions written in Rust without running their destructors).
///
/// # Safety
/// `l` is a valid thread with room for one more value, running a C function.
pub(super) unsafe fn raise(l: *mut lua_State, msg: String) -> ! {
    unsafe {
        ffi::lua_pushlstring(l, msg.as_ptr().cast(), msg.len());
        drop(msg);
        ffi::lua_error(l)
    }
}

/// A library function whose work is proportional to its arguments without allocating (and so
/// without the allocation's check), such as `table.insert` in the middle of a long list or
/// `utf8.len` of megabytes (upvalue 1: the library's, upvalue 2: its name): charges the work
/// its arguments ask for up front (a range of elements), calls it, then looks at the call's
/// clock and the run's stop, so a loop of such calls stops on time and one call that asks for
/// more than the budget is refused before it starts.
unsafe extern "C-unwind" fn checked(l: *mut lua_State) -> c_int {
    unsafe {
        limit_reached(l);
        match up_front(l) {
            UpFront::Work(0) => {}
            UpFront::Work(steps) => {
                if let Err(msg) = work(l, steps) {
                    raise(l, msg);
                }
            }
            UpFront::Empty => {
                ffi::lua_pushstring(l, c"".as_ptr());
                return 1;
            }
        }
        let n = ffi::lua_gettop(l);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        // Protected: a large allocation refused for the limit comes back as a memory error
        // without a line, raised again here as the limit's own error with the caller's line;
        // and an argument error names the function (called from here, Lua could not tell).
        let status = ffi::lua_pcall(l, n, ffi::LUA_MULTRET, 0);
        if status != ffi::LUA_OK {
            limit_reached(l);
            if status == ffi::LUA_ERRMEM {
                // Raised again as it is, it stays a memory error; where it happened is noted.
                if let Some(budget) = budget_of(l) {
                    *budget.memory_at.borrow_mut() = caller_position(l);
                }
            } else {
                argument_error_as_called(l);
            }
            ffi::lua_error(l);
        }
        limit_reached(l);
        ffi::lua_gettop(l)
    }
}

/// What a library call asks for before it runs (see [`checked`]).
enum UpFront {
    /// Elements it goes over (steps of work).
    Work(u64),
    /// `string.rep` of nothing: an empty string, however many times (Lua's own loops that many
    /// times, copying nothing).
    Empty,
}

/// The work the arguments of the [`checked`] function on the stack ask for: the elements of the
/// range that `table.move`, `insert`, `remove`, `concat` and `unpack` go over, one at a time,
/// without allocating (a length from `__len`, or a range given, can be anything). Arguments
/// that are not what the function takes ask for nothing: it raises its own error.
///
/// # Safety
/// `l` runs [`checked`], with its arguments on the stack.
unsafe fn up_front(l: *mut lua_State) -> UpFront {
    unsafe {
        let Some(name) = string_at(l, ffi::lua_upvalueindex(2)) else {
            return UpFront::Work(0);
        };
        let int = |idx| {
            let mut ok = 0;
            let n = ffi::lua_tointegerx(l, idx, &mut ok);
            (ok != 0).then_some(n)
        };
        // The length `#t` of a table (with its `__len`, as the function takes it).
        let len = || (ffi::lua_type(l, 1) == ffi::LUA_TTABLE).then(|| ffi::luaL_len(l, 1));
        let range = |from: Option<i64>, to: Option<i64>| match (from, to) {
            (Some(f), Some(t)) if t >= f => UpFront::Work((t as i128 - f as i128 + 1).min(u64::MAX as i128) as u64),
            _ => UpFront::Work(0),
        };
        let top = ffi::lua_gettop(l);
        match name {
            b"move" => range(int(2), int(3)),
            b"insert" if top == 3 => match (len(), int(2)) {
                (Some(e), Some(pos)) => range(Some(pos), Some(e)),
                _ => UpFront::Work(0),
            },
            b"remove" => match len() {
                Some(size) => range(if top >= 2 { int(2) } else { Some(size) }, Some(size)),
                None => UpFront::Work(0),
            },
            b"concat" => {
                let first = if ffi::lua_type(l, 3) <= ffi::LUA_TNIL {
                    Some(1)
                } else {
                    int(3)
                };
                let last = if ffi::lua_type(l, 4) <= ffi::LUA_TNIL {
                    len()
                } else {
                    int(4)
                };
                range(first, last)
            }
            b"unpack" => {
                let first = if ffi::lua_type(l, 2) <= ffi::LUA_TNIL {
                    Some(1)
                } else {
                    int(2)
                };
                let last = if ffi::lua_type(l, 3) <= ffi::LUA_TNIL {
                    len()
                } else {
                    int(3)
                };
                range(first, last)
            }
            b"rep" => {
                let (mut n1, mut n3) = (0, 0);
                let (s, sep) = (
                    ffi::lua_type(l, 1) == ffi::LUA_TSTRING && {
                        ffi::lua_tolstring(l, 1, &mut n1);
                        true
                    },
                    ffi::lua_type(l, 3) <= ffi::LUA_TNIL || {
                        ffi::lua_type(l, 3) == ffi::LUA_TSTRING && {
                            ffi::lua_tolstring(l, 3, &mut n3);
                            true
                        }
                    },
                );
                match int(2) {
                    Some(times) if s && sep && times > 0 && n1 + n3 == 0 && top <= 3 => UpFront::Empty,
                    _ => UpFront::Work(0),
                }
            }
            _ => UpFront::Work(0),
        }
    }
}

/// The argument error on top of the stack, raised by the library function [`checked`] called,
/// as Lua would have given it had the script called that function itself: `bad argument #N
/// to 'NAME'`, with the name (upvalue 2), and N one less in a method call (`s:rep(x)`), where
/// argument 1 is `self`.
///
/// # Safety
/// `l` runs [`checked`], the error on top of its stack.
unsafe fn argument_error_as_called(l: *mut lua_State) {
    unsafe {
        let Some(msg) = string_at(l, -1) else { return };
        // The library's own errors carry the line of their caller, here (a C function): none.
        // Lua gives the script's.
        if !has_position(msg) {
            ffi::luaL_checkstack(l, 3, ptr::null());
            ffi::luaL_where(l, 1);
            ffi::lua_rotate(l, -2, 1);
            ffi::lua_concat(l, 2);
        }
        let Some(msg) = string_at(l, -1) else { return };
        let Some(start) = find(msg, b"bad argument #") else {
            return;
        };
        let digits = msg[start + 14..].iter().take_while(|c| c.is_ascii_digit()).count();
        let Some(n) = std::str::from_utf8(&msg[start + 14..start + 14 + digits])
            .ok()
            .and_then(|d| d.parse::<u32>().ok())
        else {
            return;
        };
        let rest = &msg[start + 14 + digits..];
        // ` to 'NAME'` then the reason.
        let Some(reason) = rest
            .strip_prefix(b" to '")
            .and_then(|r| r.iter().position(|&c| c == b'\'').map(|end| &r[end + 1..]))
        else {
            return;
        };
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        let method = ffi::lua_getstack(l, 0, &mut ar) != 0
            && ffi::lua_getinfo(l, c"n".as_ptr(), &mut ar) != 0
            && !ar.namewhat.is_null()
            && CStr::from_ptr(ar.namewhat).to_bytes() == b"method";
        let name = string_at(l, ffi::lua_upvalueindex(2)).unwrap_or(b"?");
        let text = match (method, n) {
            (true, 1) => [&msg[..start], b"calling '", name, b"' on bad self", reason].concat(),
            (true, _) => [
                &msg[..start],
                format!("bad argument #{} to '", n - 1).as_bytes(),
                name,
                b"'",
                reason,
            ]
            .concat(),
            (false, _) => [
                &msg[..start],
                format!("bad argument #{n} to '").as_bytes(),
                name,
                b"'",
                reason,
            ]
            .concat(),
        };
        ffi::luaL_checkstack(l, 2, ptr::null());
        ffi::lua_pushlstring(l, text.as_ptr().cast(), text.len());
        drop(text);
    }
}

/// Whether an error message starts with a position (`file:line:`).
fn has_position(msg: &[u8]) -> bool {
    msg.iter().position(|&c| c == b':').is_some_and(|colon| {
        let digits = msg[colon + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        digits > 0 && msg.get(colon + 1 + digits) == Some(&b':')
    })
}

/// Where `needle` first is in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Raises the running call's limit error, with the caller's line, if a limit is reached.
///
/// # Safety
/// `l` is a thread of a sandbox's state, running a C function.
unsafe fn limit_reached(l: *mut lua_State) {
    unsafe {
        if let Some(budget) = budget_of(l)
            && let Some(hit) = budget.check(0)
        {
            ffi::luaL_checkstack(l, 2, ptr::null());
            let msg = budget.message(hit, caller_position(l).as_deref());
            raise(l, msg);
        }
    }
}

/// The library functions wrapped by [`checked`], by library: those whose work is not bounded
/// by the instruction count (a long list shifted or sorted, a long string scanned, copied or
/// built). A loop of them stops on time, with its line; the check of large allocations stops
/// what is left (`..` of long strings).
const CHECKED: [(&str, &[&CStr]); 3] = [
    ("table", &[c"insert", c"remove", c"move", c"sort", c"unpack", c"concat"]),
    ("utf8", &[c"len", c"offset", c"codepoint", c"char"]),
    (
        "string",
        &[
            c"byte", c"char", c"rep", c"sub", c"upper", c"lower", c"reverse", c"format", c"pack", c"unpack",
        ],
    ),
];

/// Wraps the [`CHECKED`] functions of the library table at `idx`.
///
/// # Safety
/// `idx` is an absolute index of a table; three free stack slots.
unsafe fn wrap_checked(l: *mut lua_State, lib: &[u8], idx: c_int) {
    let Some((_, names)) = CHECKED.iter().find(|(name, _)| name.as_bytes() == lib) else {
        return;
    };
    for name in names.iter() {
        unsafe {
            if ffi::lua_getfield(l, idx, name.as_ptr()) == ffi::LUA_TFUNCTION {
                if name.to_bytes() == b"sort" {
                    ffi::lua_pushcclosure(l, sort, 1);
                }
                ffi::lua_pushstring(l, name.as_ptr());
                ffi::lua_pushcclosure(l, checked, 2);
                ffi::lua_setfield(l, idx, name.as_ptr());
            } else {
                ffi::lua_pop(l, 1);
            }
        }
    }
}

/// `setmetatable` (upvalue 1: the library's), refusing `__gc` and `__close`: a finalizer runs
/// whenever the collector gets to it, with the instruction hook off, outside any call and its
/// limits (and when the state closes, after the run); a to-be-closed variable's `__close` runs
/// while an error unwinds, where the hook is off too when the error is a limit's. Either could
/// loop forever, or send where no one counts. (Lua looks both up raw: `__index` cannot supply
/// them.)
unsafe extern "C-unwind" fn setmetatable(l: *mut lua_State) -> c_int {
    unsafe {
        ffi::luaL_checkstack(l, 2, ptr::null());
        if ffi::lua_type(l, 2) == ffi::LUA_TTABLE {
            for (field, msg) in [
                (
                    c"__gc",
                    c"setmetatable: __gc (finalizers) is not allowed in a scenario: finalizers would run outside the script's limits",
                ),
                (
                    c"__close",
                    c"setmetatable: __close (to-be-closed variables) is not allowed in a scenario: it would run outside the script's limits",
                ),
            ] {
                ffi::lua_pushstring(l, field.as_ptr());
                if ffi::lua_rawget(l, 2) != ffi::LUA_TNIL {
                    ffi::luaL_error(l, msg.as_ptr());
                }
                ffi::lua_pop(l, 1);
            }
        }
        ffi::lua_settop(l, 2);
        call_original(l);
        1
    }
}

/// The message handler `xpcall` is given (upvalue 1: the script's), run only when the error
/// is not a limit's: a limit's error (raised from the instruction hook, which is off while the
/// handler would run) passes through as it is, and `xpcall` raises it again.
unsafe extern "C-unwind" fn guarded_handler(l: *mut lua_State) -> c_int {
    unsafe {
        if budget_spent(l) {
            ffi::lua_settop(l, 1);
            return 1;
        }
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        ffi::lua_call(l, ffi::lua_gettop(l) - 1, 1);
        1
    }
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
    where_it_runs(lua) == Running::ScriptCoroutine
}

/// Where Lua code runs, for the host's waiting functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    /// On the thread the host runs a hook on, able to yield to it.
    Hook,
    /// In a coroutine the script made (see [`in_script_coroutine`]).
    ScriptCoroutine,
    /// Under a C function that called back into Lua (`table.sort`'s comparator,
    /// `string.gsub`'s replacement function, `__tostring`, a message handler): it cannot yield.
    CFunction,
}

/// Where the Lua code calling now runs.
pub fn where_it_runs(lua: &Lua) -> Running {
    // The thread running now (`Lua::current_thread` would name the thread that started a
    // hook's coroutine instead), outside any protected call of mlua's (which cannot yield).
    let l = lua.exec_raw_lua(|raw| raw.state());
    // SAFETY: the running thread of a sandbox's state.
    unsafe {
        if ffi::lua_getextraspace(l).cast::<usize>().read() & SCRIPT_COROUTINE != 0 {
            Running::ScriptCoroutine
        } else if ffi::lua_isyieldable(l) == 0 {
            Running::CFunction
        } else {
            Running::Hook
        }
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
            if let Some(budget) = budget_of(l)
                && let Some(hit) = budget.hit()
            {
                if status == ffi::LUA_ERRMEM {
                    // A large allocation refused for the limit: raise the limit's error, with
                    // the line that called pcall (Lua's memory error has none).
                    ffi::luaL_checkstack(l, 2, ptr::null());
                    let msg = budget.message(hit, caller_position(l).as_deref());
                    raise(l, msg);
                }
                ffi::lua_error(l);
            }
            host_error_as_text(l);
            ffi::lua_pushboolean(l, 0);
            ffi::lua_pushvalue(l, -2);
            return 2;
        }
        ffi::lua_gettop(l) - extra as c_int
    }
}

/// An error of the host's (a function in Rust: `http.get` with a bad option, ...) on top of the
/// stack comes as mlua's error object, whose text carries the library's own frames: it is
/// replaced by the text a script expects from `pcall`, `FILE:LINE: message`, with the script's
/// line. (Built from the object's text on the Lua stack: no Rust value is alive if pushing
/// fails for memory.)
///
/// # Safety
/// `l` is a thread of a sandbox's state with the error on top of its stack.
unsafe fn host_error_as_text(l: *mut lua_State) {
    unsafe {
        if ffi::lua_type(l, -1) != ffi::LUA_TUSERDATA {
            return;
        }
        ffi::luaL_checkstack(l, 4, ptr::null());
        ffi::luaL_tolstring(l, -1, ptr::null_mut());
        let Some(text) = string_at(l, -1) else {
            ffi::lua_pop(l, 1);
            return;
        };
        let (head, trace) = match find(text, b"\nstack traceback:") {
            Some(at) => (&text[..at], &text[at..]),
            None => (text, &text[text.len()..]),
        };
        // The cause, after mlua's own words.
        let cause = match find(trace, b"caused by: ") {
            Some(at) => &trace[at + 11..],
            None => head,
        };
        let cause = cause.strip_prefix(b"runtime error: ").unwrap_or(cause);
        let cause = &cause[..cause.iter().position(|&c| c == b'\n').unwrap_or(cause.len())];
        let at = trace
            .split(|&c| c == b'\n')
            .map(|frame| frame.trim_ascii())
            .find_map(|frame| {
                let colon = frame.iter().position(|&c| c == b':')?;
                let digits = frame[colon + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                let file = &frame[..colon];
                (digits > 0 && !file.starts_with(b"[") && !file.starts_with(b"__mlua"))
                    .then(|| &frame[..colon + 1 + digits])
            });
        let parts = match at {
            Some(at) if !cause.starts_with(at) => 3,
            _ => 1,
        };
        if parts == 3 {
            let at = at.unwrap_or_default();
            ffi::lua_pushlstring(l, at.as_ptr().cast(), at.len());
            ffi::lua_pushstring(l, c": ".as_ptr());
        }
        ffi::lua_pushlstring(l, cause.as_ptr().cast(), cause.len());
        ffi::lua_concat(l, parts);
        // [error, its text, the new text]: the new one in the error's place.
        ffi::lua_replace(l, -3);
        ffi::lua_pop(l, 1);
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
        ffi::lua_pushvalue(l, 2);
        ffi::lua_pushcclosure(l, guarded_handler, 1);
        ffi::lua_replace(l, 2);
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
            b"table" | b"utf8" => wrap_checked(l, name, 4),
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

/// Narrows the base library of the state `l` (its globals table, made by `luaopen_base`, on
/// top of its stack) and gives `_G` its lazy `__index`, whose `open_lib` is on top of that.
///
/// # Safety
/// `l` is a fresh state's main thread with the two values on its stack and room for 6 more.
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
        ffi::lua_getfield(l, -1, c"setmetatable".as_ptr());
        ffi::lua_pushcclosure(l, setmetatable, 1);
        ffi::lua_setfield(l, -2, c"setmetatable".as_ptr());
        for name in &[c"dofile", c"loadfile", c"require", c"module", c"print"] {
            ffi::lua_pushnil(l);
            ffi::lua_setfield(l, -2, name.as_ptr());
        }
        ffi::lua_getfield(l, -1, c"string".as_ptr());
        ffi::lua_pushnil(l);
        ffi::lua_setfield(l, -2, c"dump".as_ptr());
        wrap_checked(l, b"string", ffi::lua_gettop(l));
        // find, match, gmatch and gsub whose work is counted (see `pattern`).
        super::pattern::install(l);
        // Strings' metatable is the host's: a script that could add `__close` (or `__index`)
        // to it would reach every string.
        ffi::lua_pushstring(l, c"".as_ptr());
        if ffi::lua_getmetatable(l, -1) != 0 {
            ffi::lua_pushboolean(l, 0);
            ffi::lua_setfield(l, -2, c"__metatable".as_ptr());
        }
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
        let budget = Rc::new(Budget::new(&limits));
        arena.watch(Rc::as_ptr(&budget));
        budget.arena.set(&mut *arena);
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
        // For the host's waiting functions (`http`, `sleep`): their waits are not the call's.
        sandbox.lua.set_app_data(sandbox.budget.clone());
        Ok(sandbox)
    }

    /// A call into the script named `name` (one of [`CALLS`]) begins: its limits start now and
    /// hold until the returned guard is dropped.
    pub fn call(&self, name: &'static str) -> Call<'_> {
        self.budget.start(name);
        Call {
            budget: &self.budget,
            name,
            done: false,
        }
    }

    /// Keeps `value` alive until after the state is closed, and returns a pointer to it that
    /// C functions of the state may hold.
    pub fn anchor<T: 'static>(&self, value: Rc<T>) -> *const T {
        let ptr = Rc::as_ptr(&value);
        self.anchors.borrow_mut().push(value);
        ptr
    }

    /// Bytes the state holds now.
    pub fn used(&self) -> usize {
        self.arena.used()
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
                b"print" => return lua.create_function(super::host::print).map(mlua::Value::Function),
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

        self.install_hook()
    }

    /// The hook that enforces the call's limits every [`HOOK_EVERY`] instructions.
    fn install_hook(&self) -> mlua::Result<()> {
        let budget = self.budget.clone();
        let triggers = HookTriggers::new().every_nth_instruction(HOOK_EVERY);
        self.lua.set_global_hook(triggers, move |_, debug| {
            // Where the script is: the line running now.
            let here = || match (debug.source().short_src, debug.current_line()) {
                (Some(file), Some(line)) if !file.starts_with('[') => Some(format!("{file}:{line}")),
                _ => None,
            };
            match budget.check(1) {
                None => {
                    // Where a long call is: at its first check (for a limit's error raised
                    // where no line is known), then every 16 once it is slow.
                    let first = budget.at.borrow().is_none();
                    if first || budget.noting.get() || (budget.used.get().is_multiple_of(16) && budget.slow()) {
                        budget.note(here());
                    }
                    Ok(VmState::Continue)
                }
                Some(hit) => Err(mlua::Error::runtime(budget.message(hit, here().as_deref()))),
            }
        })
    }

    /// Notes where the script is at every check (not only in slow calls), for errors that
    /// carry no position (the memory limit): the scenario's one run at load time uses it.
    pub fn note_positions(&self) {
        self.budget.noting.set(true);
    }

    /// Where the script was last seen (`file:line`) in the current or last call.
    pub fn last_position(&self) -> Option<String> {
        self.budget.at.borrow().clone()
    }

    /// A one-line description of an error the script raised or met: the message without the
    /// stack traceback, with the limit named when a limit is what stopped it.
    pub fn describe(&self, err: &mlua::Error) -> String {
        let memory = match self.arena.refused() {
            Some(arena::Refusal::AllStates(limit)) => format!(
                "the memory limit of all users' states together ({} MiB) reached",
                limit >> 20
            ),
            _ => format!(
                "memory limit of {} MiB reached (--script-memory)",
                self.limits.memory >> 20
            ),
        };
        // A large allocation refused because the call's time was up is raised as a memory
        // error: say which limit it was.
        let memory = match self.budget.hit() {
            Some(hit) if is_memory_error(err) => self.budget.message(hit, None),
            _ => memory,
        };
        // Lua's memory error carries no position: the library function that ran out says
        // where, or, when the file loads, where the script was last seen. (In hooks, without
        // one of those, the line is not known.)
        let known = self
            .budget
            .memory_at
            .borrow()
            .clone()
            .or_else(|| self.budget.noting.get().then(|| self.last_position()).flatten());
        let memory = match (self.budget.hit(), known) {
            (None, Some(at)) if is_memory_error(err) => format!("{at}: {memory}"),
            _ => memory,
        };
        describe_as(err, &memory)
    }
}

/// Whether `err` (or what it wraps) is Lua's memory error.
pub fn is_memory_error(mut err: &mlua::Error) -> bool {
    while let mlua::Error::CallbackError { cause, .. } = err {
        err = cause;
    }
    matches!(err, mlua::Error::MemoryError(_))
}

/// A one-line description of a Lua error of a state with these limits (see
/// [`Sandbox::describe`], which also knows which limit stopped a call).
pub fn describe(err: &mlua::Error, limits: &Limits) -> String {
    describe_as(err, &format!("memory limit of {} MiB reached", limits.memory >> 20))
}

/// The message without the stack traceback, `memory` standing for a memory error.
fn describe_as(err: &mlua::Error, memory: &str) -> String {
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
        let inner = describe_as(err, memory);
        // (A limit's error already says where it stopped.)
        if inner.starts_with(&format!("{at}: ")) {
            return inner;
        }
        return format!("{at}: {inner}");
    }
    match err {
        mlua::Error::MemoryError(_) => memory.to_string(),
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
        run_with(
            code,
            Limits {
                memory: 4 << 20,
                instructions: 2_000_000,
                time: Duration::from_secs(5),
            },
        )
    }

    fn run_with(code: &str, limits: Limits) -> Result<mlua::Value, String> {
        let sb = Sandbox::new(limits, 0).unwrap();
        let _call = sb.call("the scenario file");
        sb.lua.load(code).set_name("@t.lua").eval().map_err(|e| sb.describe(&e))
    }

    /// Limits whose instruction budget is out of reach: the clock stops the call.
    fn timed(ms: u64) -> Limits {
        Limits {
            memory: 64 << 20,
            instructions: u64::MAX / 2,
            time: Duration::from_millis(ms),
        }
    }

    #[test]
    fn work_in_the_libraries_is_stopped_by_the_clock() {
        // Each is a few instructions a turn around work the instruction count does not see (a
        // string copied, a list shifted, a long string scanned or sorted): more than a second
        // of it between two of the hook's checks. Each stops within its time limit and a
        // little, under pcall too, with the limit and the line named.
        for code in [
            "local s = string.rep('x', 16 << 20) while true do local y = s .. 'y' end",
            "local s = string.rep('x', 16 << 20) while true do pcall(function() local y = s .. 'y' end) end",
            "local s = string.rep('x', 16 << 20) while true do local y = s:upper() end",
            "local t = {} for i = 1, 2000000 do t[i] = i end while true do table.insert(t, 1, 0) table.remove(t, 1) end",
            "local s = string.rep('\u{e9}', 8 << 20) while true do local n = utf8.len(s) end",
            "local t = {} for i = 1, 1000000 do t[i] = 1000000 - i end while true do table.sort(t) end",
            "local s = string.rep('x', 1 << 20) while true do local n = select('#', s:byte(1, 900000)) end",
            "local t = {} for i = 1, 900000 do t[i] = i end while true do local n = select('#', table.unpack(t)) end",
            // The pattern matcher's backtracking (hours in Lua's own), and a quadratic scan.
            "return string.find(string.rep('a', 40), string.rep('a?', 40) .. string.rep('a', 40))",
            "local s = string.rep('a', 1 << 20) while true do local i = s:find('.-b') end",
        ] {
            let started = Instant::now();
            let err = run_with(code, timed(300)).expect_err(code);
            let took = started.elapsed();
            // (`..` is an instruction, stopped by its allocation: its line is known when the
            // hook has seen the call before, which depends on the machine's speed.)
            let err = match code.contains(" .. 'y' end") && !code.contains("pcall") {
                true => err.trim_start_matches("t.lua:1: ").to_string(),
                false => err.strip_prefix("t.lua:1: ").unwrap_or("(no line)").to_string(),
            };
            assert!(
                err.starts_with("script time limit exceeded (300ms of work in one call"),
                "{code}: {err}"
            );
            assert!(took < Duration::from_millis(800), "{code}: stopped after {took:?}");
        }
    }

    #[test]
    fn library_calls_that_ask_for_more_than_the_budget_are_refused_before_they_start() {
        // Each would loop (nearly) forever in Lua's own library without allocating anything.
        for code in [
            "table.move({}, 1, math.maxinteger - 1, 1, {})",
            "local t = setmetatable({}, { __len = function() return math.maxinteger end }) table.insert(t, 1, 'x')",
            "local t = setmetatable({}, { __len = function() return math.maxinteger end }) table.remove(t, 1)",
            "table.concat(setmetatable({}, { __index = function() return '' end }), '', 1, math.maxinteger)",
            "table.unpack({}, 1, math.maxinteger)",
        ] {
            let started = Instant::now();
            let err = run(code).expect_err(code);
            assert!(err.contains("t.lua:1: instruction budget exceeded"), "{code}: {err}");
            assert!(started.elapsed() < Duration::from_secs(1), "{code}");
        }
        // `string.rep` of nothing is nothing, at once.
        let ok = |code: &str| run(code).unwrap_or_else(|e| panic!("{code}: {e}"));
        ok("assert(string.rep('', math.maxinteger) == '' and ('').rep('', math.maxinteger, '') == '')");
        // The same functions on ordinary ranges.
        ok("local t = table.move({1, 2, 3}, 1, 3, 2) assert(t[1] == 1 and t[4] == 3)");
        ok("local t = {1, 2} table.insert(t, 1, 0) assert(table.remove(t, 1) == 0 and #t == 2)");
        ok("assert(table.concat({1, 2, 3}, '-', 2, 3) == '2-3' and select('#', table.unpack({1, 2}, 1, 3)) == 3)");
        ok("local ok, e = pcall(table.insert, {}, 5, 1) assert(not ok and e:find('position out of bounds'), e)");
    }

    #[test]
    fn the_time_of_a_call_does_not_count_its_waits() {
        let sb = Sandbox::new(timed(200), 0).unwrap();
        let call = sb.call("scenario");
        std::thread::sleep(Duration::from_millis(150));
        // A wait (as http and sleep report theirs) moves the deadline on by its length.
        let waited_from = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        sb.budget.waited(waited_from);
        assert!(sb.budget.check(0).is_none(), "300 ms waited, 150 ms worked");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(sb.budget.check(0), Some(Hit::Time), "250 ms worked");
        drop(call);
        let _again = sb.call("scenario");
        assert!(sb.budget.check(0).is_none(), "each call has its own time");
    }

    #[test]
    fn the_runs_stop_level_stops_users_then_everything() {
        // Made on a worker thread of a run: the states stop at the run's stop level.
        std::thread::spawn(|| {
            let stop = Arc::new(AtomicU8::new(0));
            let activity = Arc::new(Activity::default());
            attach_worker(stop.clone(), activity.clone());
            let user = Sandbox::new(timed(60_000), 0).unwrap();
            user.budget.set_user(7);
            let setup = Sandbox::new(timed(60_000), 0).unwrap();
            let raiser = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    stop.store(STOP_USERS, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(300));
                    stop.store(STOP_ALL, Ordering::Relaxed);
                })
            };
            let started = Instant::now();
            let run = |sb: &Sandbox, name| {
                let _call = sb.call(name);
                let err = sb.lua.load("while true do end").set_name("@t.lua").exec().unwrap_err();
                (sb.describe(&err), started.elapsed())
            };
            let (err, at) = run(&user, "scenario");
            assert!(
                err.starts_with("t.lua:1: stopped: the run ended while this call was still running"),
                "{err}"
            );
            assert!(
                at >= Duration::from_millis(290) && at < Duration::from_millis(550),
                "{at:?}"
            );
            assert_eq!(activity.describe(), None, "between calls");
            // Teardown's state (user 0) goes on until everything stops.
            let (err, at) = run(&setup, "teardown");
            assert!(err.contains("stopped: the run ended"), "{err}");
            assert!(at >= Duration::from_millis(590), "{at:?}");
            raiser.join().unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_worker_tells_what_its_slow_call_is_doing() {
        std::thread::spawn(|| {
            let stop = Arc::new(AtomicU8::new(0));
            let activity = Arc::new(Activity::default());
            attach_worker(stop.clone(), activity.clone());
            let sb = Sandbox::new(timed(60_000), 0).unwrap();
            sb.budget.set_user(3);
            let watcher = {
                let (stop, activity) = (stop.clone(), activity.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(600));
                    let seen = activity.describe();
                    stop.store(STOP_ALL, Ordering::Relaxed);
                    seen
                })
            };
            let _call = sb.call("on_start");
            let _ = sb
                .lua
                .load("local i = 0\nwhile true do\n  i = i + 1\nend")
                .set_name("@t.lua")
                .exec();
            let seen = watcher.join().unwrap().expect("a call is running");
            assert!(seen.starts_with("user 3 in on_start at t.lua:"), "{seen}");
            assert!(seen.contains("(running for"), "{seen}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn finalizers_are_refused() {
        for code in [
            "setmetatable({}, { __gc = function() while true do end end })",
            "setmetatable({}, { __gc = true })",
            "local t = {} local mt = setmetatable({}, { __index = { __gc = print } }) setmetatable(t, { __gc = 1 })",
        ] {
            let err = run(code).expect_err(code);
            assert!(err.contains("__gc (finalizers) is not allowed"), "{code}: {err}");
        }
        // To-be-closed variables' __close would run while a limit's error unwinds, hook off.
        for code in [
            "local x <close> = setmetatable({}, { __close = function() while true do end end }) while true do end",
            "getmetatable('').__close = function() while true do end end",
            "local mt = getmetatable('') rawset(mt, '__close', print)",
        ] {
            let err = run(code).expect_err(code);
            assert!(
                err.contains("__close (to-be-closed variables) is not allowed") || err.contains("boolean"),
                "{code}: {err}"
            );
        }
        assert!(run("local x <close> = nil return ('abc'):upper() == 'ABC' and getmetatable('') == false").is_ok());
        // A metatable's own fields are looked at, not what its __index would give.
        assert!(run("setmetatable({}, setmetatable({}, { __index = { __gc = print } }))").is_ok());
        assert!(run("return getmetatable(setmetatable({}, { __index = {} })) ~= nil").is_ok());
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
            // A message handler that loops would run with the hook off for a limit's error.
            "while true do xpcall(function() while true do end end, function(e) while true do end end) end",
            "xpcall(function() while true do end end, function(e) while true do end end)",
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
            // The library functions the sandbox checks give Lua's results and errors.
            "assert(table.concat({1, 2, 3}, ',') == '1,2,3' and select('#', table.unpack({1, 2, 3})) == 3)",
            "local t = {3, 1, 2} table.sort(t, function(a, b) return a > b end) assert(t[1] == 3 and t[3] == 1)",
            "assert(('%d-%s'):format(4, 'x') == '4-x' and ('abc'):upper() == 'ABC' and ('ab'):rep(2, ',') == 'ab,ab')",
            "assert(utf8.len('h\u{e9}') == 2 and ('xyz'):byte(2) == 121 and string.char(65) == 'A')",
            "local ok, e = pcall(table.insert, 1, 2) assert(e:find(\"bad argument #1 to 'insert'\"), e)",
            "local ok, e = pcall(function() return ('x'):rep({}) end) assert(e:find(\"t.lua:1: bad argument #1 to 'rep'\"), e)",
            "local ok, e = pcall(table.sort, {3, 2, 1}, function() error({code = 7}) end) assert(e.code == 7)",
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
