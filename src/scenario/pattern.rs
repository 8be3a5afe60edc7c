//! `string.find`, `string.match`, `string.gmatch` and `string.gsub` of Lua 5.4, as C functions
//! in Rust that replace Lua's own in the sandbox's `string` table (strings' methods go through
//! the same table).
//!
//! They keep Lua 5.4's semantics, its results and its error messages, with one difference: their
//! work is bounded. Lua's matcher backtracks without limit, inside C code the instruction hook
//! never sees (`("a"):rep(40):find(("a?"):rep(40) .. ("a"):rep(40))` runs for hours). Here every
//! step of the matcher (an item tried at a position, a backtrack, a byte a scan or a plain
//! search goes over) is counted, and every [`WORK_EVERY`] steps the count goes to
//! [`sandbox::work`], which stops the call when its budget is spent. Plain searches are
//! linear (`memchr::memmem`).
//!
//! Lua errors are `longjmp`s: nothing here lets one jump over a Rust frame that owns a value
//! with a destructor. The matcher reports every error as a [`Fault`] (plain data), and the C
//! function raises it once the frames that produced it have returned; calls back into Lua
//! (gsub's function, a table's `__index`) go through `lua_pcall`, and their error is raised
//! again the same way. What remains on the frames a Lua error may cross (the matcher, a
//! `luaL_Buffer`) has no destructor: see the assertion below [`Matcher`].
//!
//! gsub builds its result in a `luaL_Buffer`: Lua's memory, under the state's memory limit.

use std::cell::Cell;
use std::ffi::{CStr, c_char, c_int};
use std::mem::MaybeUninit;

use memchr::memmem;
use mlua::ffi::{self, lua_State};

use super::sandbox;

/// Captures a pattern may have (Lua's `LUA_MAXCAPTURES`).
const MAXCAPTURES: usize = 32;
/// How deep the matcher may recurse (Lua's `MAXCCALLS` in lstrlib.c).
const MAXCCALLS: u32 = 200;
/// Steps between two reports to [`sandbox::work`].
const WORK_EVERY: i64 = 4096;
/// The bytes that make `find` match a pattern rather than search for plain text.
const SPECIALS: &[u8] = b"^$*+?.([%-";
/// Bytes a plain search goes over between two counts of its steps.
const SEARCH_WINDOW: usize = 1 << 16;
/// Subjects a plain search goes over without `memmem`'s set-up (at most this many bytes
/// compared at each position).
const SHORT_SEARCH: usize = 64;

/// A capture's length while it is open, and the length that marks a position capture `()`.
const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;

unsafe extern "C-unwind" {
    // Lua's own (lauxlib.c), for the argument errors Lua gives: mlua-sys does not declare it.
    fn luaL_typeerror(l: *mut lua_State, arg: c_int, tname: *const c_char) -> c_int;
}

/// Installs the four functions in the table on top of `l`'s stack (the `string` library).
///
/// # Safety
/// `l` is a Lua 5.4 state with a table on top of its stack and room for one more value.
pub(super) unsafe fn install(l: *mut lua_State) {
    let functions: [(ffi::lua_CFunction, &CStr); 4] = [
        (str_find, c"find"),
        (str_match, c"match"),
        (str_gmatch, c"gmatch"),
        (str_gsub, c"gsub"),
    ];
    for (f, name) in functions {
        unsafe {
            ffi::lua_pushcfunction(l, f);
            ffi::lua_setfield(l, -2, name.as_ptr());
        }
    }
}

// ---- Errors ----------------------------------------------------------------------------------

/// Why a function stops with an error, as plain data: raised by [`raise`] once the frames that
/// found it have returned.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Lua's message for a malformed pattern or replacement, or a limit of the matcher.
    Message(&'static CStr),
    /// `invalid capture index %N` (N as Lua prints it).
    CaptureIndex(c_int),
    /// `invalid replacement value (a TYPE)`, with the value's Lua type.
    Replacement(c_int),
    /// [`sandbox::work`] stopped the call: its message (a `Box<String>` whose owner is this
    /// value, so that the fault itself has no destructor).
    Stop(*mut String),
    /// Lua code called back raised an error: its value is on top of the stack.
    Lua,
}

const ENDS_WITH_ESCAPE: Fault = Fault::Message(c"malformed pattern (ends with '%')");
const MISSING_BRACKET: Fault = Fault::Message(c"malformed pattern (missing ']')");
const MISSING_BALANCE_ARGS: Fault = Fault::Message(c"malformed pattern (missing arguments to '%b')");
const MISSING_FRONTIER_SET: Fault = Fault::Message(c"missing '[' after '%f' in pattern");
const INVALID_PATTERN_CAPTURE: Fault = Fault::Message(c"invalid pattern capture");
const UNFINISHED_CAPTURE: Fault = Fault::Message(c"unfinished capture");
const TOO_COMPLEX: Fault = Fault::Message(c"pattern too complex");
const TOO_MANY_CAPTURES: Fault = Fault::Message(c"too many captures");
const INVALID_ESCAPE_IN_REPLACEMENT: Fault = Fault::Message(c"invalid use of '%' in replacement string");

type Found = Result<Option<usize>, Fault>;

/// Raises `fault` as a Lua error, as Lua's own functions raise it (`luaL_error`, with the
/// position of the calling Lua code).
///
/// # Safety
/// Called from the C function Lua called, with no frame between them that owns a value with
/// a destructor; for [`Fault::Lua`], the error value is on top of the stack.
unsafe fn raise(l: *mut lua_State, fault: Fault) -> ! {
    unsafe {
        match fault {
            Fault::Message(message) => {
                ffi::luaL_error(l, c"%s".as_ptr(), message.as_ptr());
            }
            Fault::CaptureIndex(index) => {
                ffi::luaL_error(l, c"invalid capture index %%%d".as_ptr(), index);
            }
            Fault::Replacement(t) => {
                ffi::luaL_error(l, c"invalid replacement value (a %s)".as_ptr(), ffi::lua_typename(l, t));
            }
            Fault::Stop(message) => {
                let message = Box::from_raw(message);
                // The message becomes a Lua string inside a protected call, so that a memory
                // error there cannot jump over the box (then the memory error is raised).
                ffi::lua_settop(l, 0);
                ffi::lua_pushcfunction(l, push_bytes);
                ffi::lua_pushlightuserdata(l, message.as_ptr().cast_mut().cast());
                ffi::lua_pushinteger(l, message.len() as ffi::lua_Integer);
                ffi::lua_pcall(l, 2, 1, 0);
                drop(message);
            }
            // (`lua_error` raises Lua's memory error again as one: status LUA_ERRMEM, which
            // the host reports as the memory limit.)
            Fault::Lua => {}
        }
        ffi::lua_error(l)
    }
}

/// Pushes the bytes at light userdata 1, integer 2 of them, as a string.
unsafe extern "C-unwind" fn push_bytes(l: *mut lua_State) -> c_int {
    unsafe {
        let p = ffi::lua_touserdata(l, 1).cast::<c_char>();
        let n = ffi::lua_tointeger(l, 2) as usize;
        ffi::lua_pushlstring(l, p, n);
        1
    }
}

// ---- Work ------------------------------------------------------------------------------------

thread_local! {
    /// Steps counted but not yet reported (fewer than [`WORK_EVERY`]): a call that does less
    /// leaves its steps to the next call on its thread, so that many small calls are charged
    /// too (a few thousand steps may go to another state's call).
    static CARRY: Cell<i64> = const { Cell::new(0) };
}

/// The steps of one call, reported to [`sandbox::work`] every [`WORK_EVERY`].
struct Fuel {
    l: *mut lua_State,
    /// Steps left before the next report (below 0: report).
    left: i64,
}

impl Fuel {
    fn new(l: *mut lua_State) -> Self {
        Self {
            l,
            left: WORK_EVERY - CARRY.get(),
        }
    }

    #[inline(always)]
    fn tick(&mut self, steps: usize) -> Result<(), Fault> {
        self.left -= steps as i64;
        if self.left < 0 { self.report() } else { Ok(()) }
    }

    #[cold]
    #[inline(never)]
    fn report(&mut self) -> Result<(), Fault> {
        let steps = (WORK_EVERY - self.left) as u64;
        self.left = WORK_EVERY;
        // SAFETY: `l` is the thread of a sandbox's state running this C function.
        unsafe { sandbox::work(self.l, steps) }.map_err(|message| Fault::Stop(Box::into_raw(Box::new(message))))
    }

    /// Leaves the steps not reported to the next call.
    fn finish(&self) {
        CARRY.set(WORK_EVERY - self.left.max(0));
    }
}

// ---- Character classes -----------------------------------------------------------------------

/// The bit of each class letter (`%a`, `%c`, ...; `%z`, deprecated, is still Lua's) in [`CTYPE`].
const fn class_bit(lower: u8) -> u16 {
    match lower {
        b'a' => 1,
        b'c' => 1 << 1,
        b'd' => 1 << 2,
        b'g' => 1 << 3,
        b'l' => 1 << 4,
        b'p' => 1 << 5,
        b's' => 1 << 6,
        b'u' => 1 << 7,
        b'w' => 1 << 8,
        b'x' => 1 << 9,
        b'z' => 1 << 10,
        _ => 0,
    }
}

/// The classes of each byte, as C's `<ctype.h>` sees them in the C locale (ASCII only).
static CTYPE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let alpha = c.is_ascii_alphabetic();
        let digit = c.is_ascii_digit();
        let graph = c.is_ascii_graphic();
        let mut bits = 0;
        let classes = [
            (b'a', alpha),
            (b'c', c < 0x20 || c == 0x7f),
            (b'd', digit),
            (b'g', graph),
            (b'l', c.is_ascii_lowercase()),
            (b'p', graph && !alpha && !digit),
            // C's isspace: space, \t \n \v \f \r (Rust's is_ascii_whitespace leaves out \v).
            (b's', c == b' ' || (c >= 0x09 && c <= 0x0d)),
            (b'u', c.is_ascii_uppercase()),
            (b'w', alpha || digit),
            (b'x', c.is_ascii_hexdigit()),
            (b'z', c == 0),
        ];
        let mut k = 0;
        while k < classes.len() {
            if classes[k].1 {
                bits |= class_bit(classes[k].0);
            }
            k += 1;
        }
        table[i] = bits;
        i += 1;
    }
    table
};

/// Whether `c` is in the class `%cl` (Lua's `match_class`): a class letter, its upper case for
/// the complement, or any other byte for itself.
#[inline]
fn match_class(c: u8, cl: u8) -> bool {
    let bit = class_bit(cl.to_ascii_lowercase());
    if bit == 0 {
        return cl == c;
    }
    let res = CTYPE[c as usize] & bit != 0;
    if cl.is_ascii_lowercase() { res } else { !res }
}

/// One single-character pattern item: `.`, a byte, `%x` or a set `[...]`.
#[derive(Clone, Copy)]
enum Single {
    Any,
    Byte(u8),
    Class(u8),
    /// The set's `[` and its closing `]` in the pattern.
    Set(usize, usize),
}

// ---- The matcher -----------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Capture {
    init: usize,
    /// Its length, or [`CAP_UNFINISHED`], [`CAP_POSITION`].
    len: isize,
}

/// One capture's value.
enum Value {
    Bytes(usize, usize),
    Position(usize),
}

/// Lua's `MatchState`: a subject, a pattern (its anchor `^` taken off) and the captures of the
/// match being tried. Positions are byte offsets; a read past either end gives 0, as Lua reads
/// the strings' terminating `\0`.
struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    /// Captures opened (finished or not).
    level: usize,
    /// Recursion left before "pattern too complex".
    depth: u32,
    caps: [Capture; MAXCAPTURES],
    fuel: Fuel,
    /// The pattern's first item when it must match one byte: where it cannot, no match starts.
    first: Option<Single>,
}

// A Lua error may jump over a frame holding a matcher (a memory error while results are
// pushed): it must have nothing to drop.
const _: () = assert!(!std::mem::needs_drop::<Matcher<'static>>());
const _: () = assert!(!std::mem::needs_drop::<Fault>());

impl<'a> Matcher<'a> {
    /// A matcher of `pat` in `src`; `unanchored` when matches are tried at every position (then
    /// [`Matcher::skip`] looks for the next one that may start a match).
    fn new(l: *mut lua_State, src: &'a [u8], pat: &'a [u8], unanchored: bool) -> Self {
        let mut m = Self {
            src,
            pat,
            level: 0,
            depth: MAXCCALLS,
            caps: [Capture::default(); MAXCAPTURES],
            fuel: Fuel::new(l),
            first: None,
        };
        if unanchored {
            m.first = m.first_single();
        }
        m
    }

    /// Lua's `reprepstate`, before each attempt.
    #[inline]
    fn reset(&mut self) {
        self.level = 0;
        self.depth = MAXCCALLS;
    }

    #[inline(always)]
    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    /// The first item, when it is a single-character item that must match once (no `*`, `?`,
    /// `-`): a match can only start where it matches. None when the first attempt would raise
    /// an error at it (that attempt raises it).
    fn first_single(&self) -> Option<Single> {
        match (self.pat.first()?, self.pat.get(1)) {
            (b'(' | b')', _) | (b'$', None) | (b'%', Some(b'b' | b'f' | b'0'..=b'9')) => return None,
            _ => {}
        }
        let ep = self.class_end(0).ok()?;
        if matches!(self.p(ep), b'*' | b'?' | b'-') {
            return None;
        }
        Some(self.single(0, ep))
    }

    /// The first position from `at` (at most the subject's end) where a match may start.
    fn skip(&mut self, at: usize) -> Result<usize, Fault> {
        let Some(first) = self.first else { return Ok(at) };
        let rest = &self.src[at..];
        let n = match first {
            Single::Any => 0,
            Single::Byte(c) => memchr::memchr(c, rest).unwrap_or(rest.len()),
            _ => rest.iter().position(|&c| self.matches(first, c)).unwrap_or(rest.len()),
        };
        self.fuel.tick(n)?;
        Ok(at + n)
    }

    /// Where the single-character item at `p` ends (Lua's `classend`).
    #[inline]
    fn class_end(&self, p: usize) -> Result<usize, Fault> {
        let len = self.pat.len();
        let c = self.pat[p];
        let mut p = p + 1;
        match c {
            b'%' => {
                if p == len {
                    return Err(ENDS_WITH_ESCAPE);
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                // The first byte of a set is in it, even `]`.
                loop {
                    if p >= len {
                        return Err(MISSING_BRACKET);
                    }
                    let c = self.pat[p];
                    p += 1;
                    if c == b'%' && p < len {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    #[inline(always)]
    fn single(&self, p: usize, ep: usize) -> Single {
        match self.pat[p] {
            b'.' => Single::Any,
            b'%' => Single::Class(self.pat[p + 1]),
            b'[' => Single::Set(p, ep - 1),
            c => Single::Byte(c),
        }
    }

    #[inline(always)]
    fn matches(&self, item: Single, c: u8) -> bool {
        match item {
            Single::Any => true,
            Single::Byte(b) => b == c,
            Single::Class(cl) => match_class(c, cl),
            Single::Set(p, ec) => self.in_set(c, p, ec),
        }
    }

    /// Whether `c` is in the set from `[` at `p` to `]` at `ec` (Lua's `matchbracketclass`).
    fn in_set(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let pat = self.pat;
        let mut sig = true;
        if pat[p + 1] == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            if pat[p] == b'%' {
                p += 1;
                if match_class(c, pat[p]) {
                    return sig;
                }
            } else if pat[p + 1] == b'-' && p + 2 < ec {
                p += 2;
                if pat[p - 2] <= c && c <= pat[p] {
                    return sig;
                }
            } else if pat[p] == c {
                return sig;
            }
        }
    }

    #[inline(always)]
    fn single_match(&self, s: usize, p: usize, ep: usize) -> bool {
        s < self.src.len() && self.matches(self.single(p, ep), self.src[s])
    }

    /// How many times in a row from `s` the item at `p` matches.
    fn repeats(&mut self, s: usize, p: usize, ep: usize) -> Result<usize, Fault> {
        let rest = &self.src[s..];
        let item = self.single(p, ep);
        let n = match item {
            Single::Any => rest.len(),
            Single::Byte(b) => rest.iter().take_while(|&&c| c == b).count(),
            _ => rest.iter().take_while(|&&c| self.matches(item, c)).count(),
        };
        self.fuel.tick(n)?;
        Ok(n)
    }

    /// The byte the item at `p` must match, when it is a plain byte that must match once (not
    /// special, no `*`, `?`, `-`): `match` there fails at once on any other byte (or the end).
    fn next_byte(&self, p: usize) -> Option<u8> {
        let c = *self.pat.get(p)?;
        if matches!(c, b'(' | b')' | b'%' | b'[' | b'.') || (c == b'$' && p + 1 == self.pat.len()) {
            return None;
        }
        if matches!(self.p(p + 1), b'*' | b'?' | b'-') {
            return None;
        }
        Some(c)
    }

    /// Whether matching the rest of the pattern at `s` would fail at its first item, a
    /// [`Matcher::next_byte`]. (Only while there is depth left: without, `match` raises "pattern
    /// too complex" first.)
    #[inline]
    fn fails_at(&self, next: Option<u8>, s: usize) -> bool {
        next.is_some_and(|c| self.depth > 0 && (s >= self.src.len() || self.src[s] != c))
    }

    /// Lua's `match`: the end of a match of `pat[p..]` at `s`.
    fn do_match(&mut self, s: usize, p: usize) -> Found {
        if self.depth == 0 {
            return Err(TOO_COMPLEX);
        }
        self.depth -= 1;
        let found = self.match_items(s, p);
        self.depth += 1;
        found
    }

    fn match_items(&mut self, mut s: usize, mut p: usize) -> Found {
        let len = self.pat.len();
        loop {
            self.fuel.tick(1)?;
            if p == len {
                return Ok(Some(s));
            }
            match self.pat[p] {
                b'(' => {
                    return if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                b'$' if p + 1 == len => return Ok((s == self.src.len()).then_some(s)),
                b'%' if self.p(p + 1) == b'b' => match self.balance(s, p + 2)? {
                    Some(end) => {
                        s = end;
                        p += 4;
                        continue;
                    }
                    None => return Ok(None),
                },
                b'%' if self.p(p + 1) == b'f' => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return Err(MISSING_FRONTIER_SET);
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    if !self.in_set(previous, p, ep - 1) && self.in_set(self.s(s), p, ep - 1) {
                        p = ep;
                        continue;
                    }
                    return Ok(None);
                }
                b'%' if self.p(p + 1).is_ascii_digit() => match self.back_reference(s, self.p(p + 1))? {
                    Some(end) => {
                        s = end;
                        p += 2;
                        continue;
                    }
                    None => return Ok(None),
                },
                _ => {}
            }
            // A single-character item and its suffix.
            let ep = self.class_end(p)?;
            let suffix = self.p(ep);
            if !self.single_match(s, p, ep) {
                if matches!(suffix, b'*' | b'?' | b'-') {
                    p = ep + 1;
                    continue;
                }
                return Ok(None);
            }
            match suffix {
                b'?' => {
                    if let Some(end) = self.do_match(s + 1, ep + 1)? {
                        return Ok(Some(end));
                    }
                    p = ep + 1;
                }
                b'+' => return self.max_expand(s + 1, p, ep),
                b'*' => return self.max_expand(s, p, ep),
                b'-' => return self.min_expand(s, p, ep),
                _ => {
                    s += 1;
                    p = ep;
                }
            }
        }
    }

    /// The item at `p` as many times as it matches from `s`, then fewer, until the rest matches.
    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Found {
        let mut i = self.repeats(s, p, ep)?;
        let next = self.next_byte(ep + 1);
        loop {
            if self.fails_at(next, s + i) {
                self.fuel.tick(1)?;
            } else if let Some(end) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(end));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    /// The item at `p` as few times as it can from `s`, until the rest matches.
    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Found {
        let next = self.next_byte(ep + 1);
        loop {
            if self.fails_at(next, s) {
                self.fuel.tick(1)?;
            } else if let Some(end) = self.do_match(s, ep + 1)? {
                return Ok(Some(end));
            }
            if !self.single_match(s, p, ep) {
                return Ok(None);
            }
            s += 1;
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Found {
        if self.level >= MAXCAPTURES {
            return Err(TOO_MANY_CAPTURES);
        }
        self.caps[self.level] = Capture { init: s, len: what };
        self.level += 1;
        let found = self.do_match(s, p)?;
        if found.is_none() {
            self.level -= 1;
        }
        Ok(found)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Found {
        let Some(l) = (0..self.level).rev().find(|&i| self.caps[i].len == CAP_UNFINISHED) else {
            return Err(INVALID_PATTERN_CAPTURE);
        };
        self.caps[l].len = (s - self.caps[l].init) as isize;
        let found = self.do_match(s, p)?;
        if found.is_none() {
            self.caps[l].len = CAP_UNFINISHED;
        }
        Ok(found)
    }

    /// `%bxy` at `s`, `x` at `p`.
    fn balance(&mut self, s: usize, p: usize) -> Found {
        if p + 1 >= self.pat.len() {
            return Err(MISSING_BALANCE_ARGS);
        }
        let (open, close) = (self.pat[p], self.pat[p + 1]);
        if s >= self.src.len() || self.src[s] != open {
            return Ok(None);
        }
        let mut depth = 1;
        for (i, &c) in self.src.iter().enumerate().skip(s + 1) {
            if c == close {
                depth -= 1;
                if depth == 0 {
                    self.fuel.tick(i - s)?;
                    return Ok(Some(i + 1));
                }
            } else if c == open {
                depth += 1;
            }
        }
        self.fuel.tick(self.src.len() - s)?;
        Ok(None)
    }

    /// `%1`-`%9` at `s` (`digit` is the byte after `%`).
    fn back_reference(&mut self, s: usize, digit: u8) -> Found {
        let l = c_int::from(digit) - c_int::from(b'1');
        if l < 0 || l as usize >= self.level || self.caps[l as usize].len == CAP_UNFINISHED {
            return Err(Fault::CaptureIndex(l + 1));
        }
        let cap = self.caps[l as usize];
        // A position capture has no text: it never matches (Lua compares its length, unsigned).
        let Ok(n) = usize::try_from(cap.len) else {
            return Ok(None);
        };
        self.fuel.tick(n)?;
        let matched = self.src.len() - s >= n && self.src[cap.init..cap.init + n] == self.src[s..s + n];
        Ok(matched.then_some(s + n))
    }

    /// Capture `i`'s value, the whole match `s..e` standing for capture 0 of a pattern without
    /// captures (Lua's `get_onecapture`).
    fn capture(&self, i: usize, s: usize, e: usize) -> Result<Value, Fault> {
        if i >= self.level {
            if i != 0 {
                return Err(Fault::CaptureIndex(i as c_int + 1));
            }
            return Ok(Value::Bytes(s, e - s));
        }
        let cap = self.caps[i];
        match cap.len {
            CAP_UNFINISHED => Err(UNFINISHED_CAPTURE),
            CAP_POSITION => Ok(Value::Position(cap.init + 1)),
            n => Ok(Value::Bytes(cap.init, n as usize)),
        }
    }

    /// Pushes capture `i` (see [`Matcher::capture`]).
    unsafe fn push_capture(&self, l: *mut lua_State, i: usize, s: usize, e: usize) -> Result<(), Fault> {
        match self.capture(i, s, e)? {
            Value::Bytes(at, n) => unsafe {
                ffi::lua_pushlstring(l, self.src.as_ptr().add(at).cast(), n);
            },
            Value::Position(at) => unsafe { ffi::lua_pushinteger(l, at as ffi::lua_Integer) },
        }
        Ok(())
    }

    /// Pushes every capture, or the whole match `s..e` when the pattern has none and it is
    /// given (Lua's `push_captures`); how many.
    unsafe fn push_captures(&self, l: *mut lua_State, whole: Option<(usize, usize)>) -> Result<c_int, Fault> {
        let n = if self.level == 0 && whole.is_some() {
            1
        } else {
            self.level
        };
        let (s, e) = whole.unwrap_or((0, 0));
        unsafe {
            ffi::luaL_checkstack(l, n as c_int, c"too many captures".as_ptr());
            for i in 0..n {
                self.push_capture(l, i, s, e)?;
            }
        }
        Ok(n as c_int)
    }
}

/// `haystack`'s first occurrence of `needle`, in linear time, counting the bytes gone over.
fn plain_find(fuel: &mut Fuel, haystack: &[u8], needle: &[u8]) -> Result<Option<usize>, Fault> {
    if needle.len() > haystack.len() {
        return Ok(None);
    }
    if needle.len() <= 1 || haystack.len() <= SEARCH_WINDOW {
        let found = match needle {
            [] => Some(0),
            [c] => memchr::memchr(*c, haystack),
            // (Short subjects, such as header values: setting up a `Finder` would take longer
            // than the search.)
            [c, rest @ ..] if haystack.len() <= SHORT_SEARCH => {
                let last = haystack.len() - needle.len();
                let mut at = 0;
                loop {
                    match memchr::memchr(*c, &haystack[at..=last]) {
                        Some(i) if haystack[at + i + 1..].starts_with(rest) => break Some(at + i),
                        Some(i) => at += i + 1,
                        None => break None,
                    }
                    if at > last {
                        break None;
                    }
                }
            }
            _ => memmem::find(haystack, needle),
        };
        fuel.tick(found.map_or(haystack.len(), |i| i + needle.len()))?;
        return Ok(found);
    }
    // Window by window (each overlapping the next by the needle's length less one), so that the
    // count of steps follows a long search.
    let finder = memmem::Finder::new(needle);
    let window = SEARCH_WINDOW.max(needle.len());
    let mut at = 0;
    loop {
        let end = (at + window + needle.len() - 1).min(haystack.len());
        if let Some(i) = finder.find(&haystack[at..end]) {
            fuel.tick(i + needle.len())?;
            return Ok(Some(at + i));
        }
        fuel.tick(end - at)?;
        if end == haystack.len() {
            return Ok(None);
        }
        at += window;
    }
}

// ---- The functions ---------------------------------------------------------------------------

/// The string argument `arg` (a number is converted in place, as Lua does), or Lua's argument
/// error.
///
/// # Safety
/// The bytes borrow the stack slot's string: valid while the C function runs.
unsafe fn check_bytes<'a>(l: *mut lua_State, arg: c_int) -> &'a [u8] {
    unsafe {
        let mut len = 0;
        let p = ffi::luaL_checklstring(l, arg, &mut len);
        std::slice::from_raw_parts(p.cast(), len)
    }
}

/// The bytes of the string at `idx`.
///
/// # Safety
/// The value at `idx` is a string (or a number, converted in place); the bytes borrow it.
unsafe fn bytes_at<'a>(l: *mut lua_State, idx: c_int) -> &'a [u8] {
    unsafe {
        let mut len = 0;
        let p = ffi::lua_tolstring(l, idx, &mut len);
        std::slice::from_raw_parts(p.cast(), len)
    }
}

/// An initial position (negative counts from the end) as a 0-based offset, clipped at 0
/// (Lua's `posrelatI` less one); may be past the end.
fn start_offset(pos: ffi::lua_Integer, len: usize) -> usize {
    if pos > 0 {
        pos as usize - 1
    } else if pos == 0 || pos < -(len as ffi::lua_Integer) {
        0
    } else {
        (len as ffi::lua_Integer + pos) as usize
    }
}

/// The pattern without its anchor `^`, and whether it had one.
fn anchored(pat: &[u8]) -> (&[u8], bool) {
    match pat.strip_prefix(b"^") {
        Some(rest) => (rest, true),
        None => (pat, false),
    }
}

unsafe extern "C-unwind" fn str_find(l: *mut lua_State) -> c_int {
    match unsafe { find_aux(l, true) } {
        Ok(n) => n,
        Err(fault) => unsafe { raise(l, fault) },
    }
}

unsafe extern "C-unwind" fn str_match(l: *mut lua_State) -> c_int {
    match unsafe { find_aux(l, false) } {
        Ok(n) => n,
        Err(fault) => unsafe { raise(l, fault) },
    }
}

/// `string.find` (`find`) or `string.match`: what they push, how many.
unsafe fn find_aux(l: *mut lua_State, find: bool) -> Result<c_int, Fault> {
    unsafe {
        let src = check_bytes(l, 1);
        let pat = check_bytes(l, 2);
        let init = start_offset(ffi::luaL_optinteger(l, 3, 1), src.len());
        if init > src.len() {
            ffi::lua_pushnil(l);
            return Ok(1);
        }
        if find && (ffi::lua_toboolean(l, 4) != 0 || !pat.iter().any(|c| SPECIALS.contains(c))) {
            let mut fuel = Fuel::new(l);
            let found = plain_find(&mut fuel, &src[init..], pat)?;
            fuel.finish();
            if let Some(i) = found {
                ffi::lua_pushinteger(l, (init + i + 1) as ffi::lua_Integer);
                ffi::lua_pushinteger(l, (init + i + pat.len()) as ffi::lua_Integer);
                return Ok(2);
            }
        } else {
            let (pat, anchor) = anchored(pat);
            let mut m = Matcher::new(l, src, pat, !anchor);
            let mut s1 = init;
            let found = loop {
                s1 = m.skip(s1)?;
                m.reset();
                if let Some(e) = m.do_match(s1, 0)? {
                    break Some(e);
                }
                if anchor || s1 >= src.len() {
                    break None;
                }
                s1 += 1;
            };
            m.fuel.finish();
            if let Some(e) = found {
                if find {
                    ffi::lua_pushinteger(l, (s1 + 1) as ffi::lua_Integer);
                    ffi::lua_pushinteger(l, e as ffi::lua_Integer);
                    return Ok(m.push_captures(l, None)? + 2);
                }
                return m.push_captures(l, Some((s1, e)));
            }
        }
        ffi::lua_pushnil(l);
        Ok(1)
    }
}

/// `string.gmatch(s, pattern [, init])`: an iterator whose upvalues are the subject, the pattern,
/// the position to go on from and the end of the last match (-1: none yet).
unsafe extern "C-unwind" fn str_gmatch(l: *mut lua_State) -> c_int {
    unsafe {
        let len = check_bytes(l, 1).len();
        check_bytes(l, 2);
        let init = start_offset(ffi::luaL_optinteger(l, 3, 1), len);
        // Past the end: nothing to find.
        let init = init.min(len + 1);
        ffi::lua_settop(l, 2);
        ffi::lua_pushinteger(l, init as ffi::lua_Integer);
        ffi::lua_pushinteger(l, -1);
        ffi::lua_pushcclosure(l, gmatch_step, 4);
        1
    }
}

unsafe extern "C-unwind" fn gmatch_step(l: *mut lua_State) -> c_int {
    match unsafe { gmatch_next(l) } {
        Ok(n) => n,
        Err(fault) => unsafe { raise(l, fault) },
    }
}

unsafe fn gmatch_next(l: *mut lua_State) -> Result<c_int, Fault> {
    unsafe {
        let src = bytes_at(l, ffi::lua_upvalueindex(1));
        let pat = bytes_at(l, ffi::lua_upvalueindex(2));
        let mut at = ffi::lua_tointeger(l, ffi::lua_upvalueindex(3)) as usize;
        let last = ffi::lua_tointeger(l, ffi::lua_upvalueindex(4));
        let mut m = Matcher::new(l, src, pat, true);
        let mut found = None;
        while at <= src.len() {
            at = m.skip(at)?;
            m.reset();
            // An empty match where the last one ended is not one.
            if let Some(e) = m.do_match(at, 0)?
                && e as ffi::lua_Integer != last
            {
                found = Some(e);
                break;
            }
            at += 1;
        }
        m.fuel.finish();
        let Some(e) = found else { return Ok(0) };
        ffi::lua_pushinteger(l, e as ffi::lua_Integer);
        ffi::lua_pushvalue(l, -1);
        ffi::lua_replace(l, ffi::lua_upvalueindex(3));
        ffi::lua_replace(l, ffi::lua_upvalueindex(4));
        m.push_captures(l, Some((at, e)))
    }
}

unsafe extern "C-unwind" fn str_gsub(l: *mut lua_State) -> c_int {
    let mut buffer = MaybeUninit::<ffi::luaL_Buffer>::uninit();
    match unsafe { gsub(l, buffer.as_mut_ptr()) } {
        Ok(n) => n,
        Err(fault) => unsafe { raise(l, fault) },
    }
}

/// `__index` of a table replacement, called protected: `t[k]` with `t`, `k` its arguments.
unsafe extern "C-unwind" fn index_table(l: *mut lua_State) -> c_int {
    unsafe {
        ffi::lua_gettable(l, 1);
        1
    }
}

/// What gsub replaces a match with.
#[derive(Clone, Copy, PartialEq)]
enum Replacement<'a> {
    Template(&'a [u8]),
    Function,
    /// A table; whether it has a metatable (then it is indexed in a protected call).
    Table(bool),
}

/// `string.gsub(s, pattern, repl [, n])`, its result built in `b` (uninitialised memory that
/// stays in place while the call runs).
unsafe fn gsub(l: *mut lua_State, b: *mut ffi::luaL_Buffer) -> Result<c_int, Fault> {
    unsafe {
        let src = check_bytes(l, 1);
        let pat = check_bytes(l, 2);
        let tr = ffi::lua_type(l, 3);
        let max = ffi::luaL_optinteger(l, 4, src.len() as ffi::lua_Integer + 1);
        let repl = match tr {
            ffi::LUA_TNUMBER | ffi::LUA_TSTRING => Replacement::Template(bytes_at(l, 3)),
            ffi::LUA_TFUNCTION => Replacement::Function,
            ffi::LUA_TTABLE => {
                let meta = ffi::lua_getmetatable(l, 3) != 0;
                if meta {
                    ffi::lua_pop(l, 1);
                }
                Replacement::Table(meta)
            }
            _ => {
                luaL_typeerror(l, 3, c"string/function/table".as_ptr());
                unreachable!("luaL_typeerror raises")
            }
        };
        let (pat, anchor) = anchored(pat);
        ffi::luaL_buffinit(l, b);
        // Subject bytes not added to the buffer yet start at `copied`: runs left as they are go
        // in with one copy.
        let add = |from: usize, to: usize| {
            if to > from {
                ffi::luaL_addlstring(b, src.as_ptr().add(from).cast(), to - from);
            }
        };
        let mut m = Matcher::new(l, src, pat, !anchor);
        let (mut at, mut copied, mut n, mut changed) = (0, 0, 0, false);
        let mut last = None;
        while n < max {
            at = m.skip(at)?;
            m.reset();
            match m.do_match(at, 0)? {
                Some(e) if Some(e) != last => {
                    n += 1;
                    m.fuel.tick(1)?;
                    add(copied, at);
                    copied = at;
                    if add_value(l, b, &m, repl, at, e)? {
                        copied = e;
                        changed = true;
                    }
                    at = e;
                    last = Some(e);
                }
                _ if at < src.len() => at += 1,
                _ => break,
            }
            if anchor {
                break;
            }
        }
        m.fuel.finish();
        if changed {
            add(copied, src.len());
            ffi::luaL_pushresult(b);
        } else {
            ffi::lua_pushvalue(l, 1);
        }
        ffi::lua_pushinteger(l, n);
        Ok(2)
    }
}

/// Adds the replacement of the match `s..e` to `b`; false when the match stays as it is (a
/// function or table gave nil or false), which the caller then keeps.
unsafe fn add_value(
    l: *mut lua_State,
    b: *mut ffi::luaL_Buffer,
    m: &Matcher,
    repl: Replacement,
    s: usize,
    e: usize,
) -> Result<bool, Fault> {
    unsafe {
        match repl {
            Replacement::Template(template) => {
                add_template(b, m, template, s, e)?;
                return Ok(true);
            }
            Replacement::Function => {
                ffi::lua_pushvalue(l, 3);
                let n = m.push_captures(l, Some((s, e)))?;
                if ffi::lua_pcall(l, n, 1, 0) != ffi::LUA_OK {
                    return Err(Fault::Lua);
                }
            }
            Replacement::Table(false) => {
                m.push_capture(l, 0, s, e)?;
                ffi::lua_rawget(l, 3);
            }
            Replacement::Table(true) => {
                ffi::lua_pushcfunction(l, index_table);
                ffi::lua_pushvalue(l, 3);
                m.push_capture(l, 0, s, e)?;
                if ffi::lua_pcall(l, 2, 1, 0) != ffi::LUA_OK {
                    return Err(Fault::Lua);
                }
            }
        }
        if ffi::lua_toboolean(l, -1) == 0 {
            ffi::lua_pop(l, 1);
            return Ok(false);
        }
        if ffi::lua_isstring(l, -1) == 0 {
            return Err(Fault::Replacement(ffi::lua_type(l, -1)));
        }
        ffi::luaL_addvalue(b);
        Ok(true)
    }
}

/// Adds a replacement string, its `%0`-`%9` and `%%` expanded, for the match `s..e`.
unsafe fn add_template(
    b: *mut ffi::luaL_Buffer,
    m: &Matcher,
    template: &[u8],
    s: usize,
    e: usize,
) -> Result<(), Fault> {
    let add = |bytes: &[u8]| unsafe { ffi::luaL_addlstring(b, bytes.as_ptr().cast(), bytes.len()) };
    let mut rest = template;
    while let Some(i) = memchr::memchr(b'%', rest) {
        add(&rest[..i]);
        match rest.get(i + 1).copied().unwrap_or(0) {
            b'%' => add(b"%"),
            b'0' => add(&m.src[s..e]),
            d @ b'1'..=b'9' => match m.capture(usize::from(d - b'1'), s, e)? {
                Value::Bytes(at, n) => add(&m.src[at..at + n]),
                Value::Position(at) => {
                    let mut digits = [0u8; 20];
                    add(decimal(at, &mut digits));
                }
            },
            _ => return Err(INVALID_ESCAPE_IN_REPLACEMENT),
        }
        rest = &rest[i + 2..];
    }
    add(rest);
    Ok(())
}

/// `n` in decimal, written at the end of `digits`.
fn decimal(mut n: usize, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::sandbox::{self, Limits, Sandbox};
    use mlua::{Lua, Value};

    /// A value as text, to compare results across states (tables by their keys, sorted).
    fn render(v: &Value) -> String {
        match v {
            Value::Nil => "nil".into(),
            Value::Boolean(b) => b.to_string(),
            Value::Integer(i) => format!("{i}"),
            Value::Number(n) => format!("{n:?}"),
            Value::String(s) => format!("{:?}", s.as_bytes().escape_ascii().to_string()),
            Value::Table(t) => {
                let mut items: Vec<String> = t
                    .pairs::<Value, Value>()
                    .map(|kv| {
                        let (k, v) = kv.unwrap();
                        format!("{}={}", render(&k), render(&v))
                    })
                    .collect();
                items.sort();
                format!("{{{}}}", items.join(","))
            }
            other => other.type_name().into(),
        }
    }

    /// What `code` returns in `lua`, as text; an error as `error: message` (its traceback left
    /// out).
    fn eval(lua: &Lua, code: &str) -> String {
        match lua.load(code).set_name("@t.lua").eval::<mlua::MultiValue>() {
            Ok(values) => values.iter().map(render).collect::<Vec<_>>().join(", "),
            Err(e) => {
                let mut e = &e;
                while let mlua::Error::CallbackError { cause, .. } = e {
                    e = cause;
                }
                let text = match e {
                    mlua::Error::MemoryError(m) => format!("memory error: {m}"),
                    other => other.to_string(),
                };
                let text = text.split("\nstack traceback:").next().unwrap_or("").to_string();
                format!("error: {text}")
            }
        }
    }

    /// The two states the differential tests compare: Lua's own functions and the sandbox's.
    struct Pair {
        stock: Lua,
        sandbox: Sandbox,
    }

    impl Pair {
        fn new() -> Self {
            Self {
                stock: Lua::new(),
                sandbox: Sandbox::new(Limits::default(), 0).unwrap(),
            }
        }

        /// Runs `code` in both; panics when they differ. Returns the result.
        fn same(&self, code: &str) -> String {
            let _call = self.sandbox.call("the scenario file");
            let ours = eval(&self.sandbox.lua, code);
            let lua = eval(&self.stock, code);
            assert_eq!(ours, lua, "\n  code: {code}");
            ours
        }
    }

    /// A Lua string literal of `bytes` (every byte escaped as `\ddd`).
    fn literal(bytes: &[u8]) -> String {
        let mut s = String::from("\"");
        for b in bytes {
            s.push_str(&format!("\\{b:03}"));
        }
        s.push('"');
        s
    }

    /// Asserts that the sandbox's `string` table holds this module's functions.
    fn assert_installed(sb: &Sandbox) {
        let string: mlua::Table = sb.lua.globals().get("string").unwrap();
        let ours: [(&str, ffi::lua_CFunction); 4] = [
            ("find", str_find),
            ("match", str_match),
            ("gmatch", str_gmatch),
            ("gsub", str_gsub),
        ];
        for (name, f) in ours {
            let value: mlua::Function = string.get(name).unwrap();
            // SAFETY: the function is on the stack while its C function is read.
            let installed = unsafe {
                sb.lua
                    .exec_raw::<usize>(value, |l| {
                        let c = ffi::lua_tocfunction(l, -1);
                        ffi::lua_settop(l, 0);
                        ffi::lua_pushinteger(l, c.map_or(0, |c| c as usize as ffi::lua_Integer));
                    })
                    .unwrap()
            };
            assert_eq!(installed, f as usize, "string.{name} is not the sandbox's");
        }
    }

    #[test]
    fn pattern_functions_are_installed_in_the_sandbox() {
        let sb = Sandbox::new(Limits::default(), 0).unwrap();
        assert_installed(&sb);
        // Strings' methods are the same functions.
        assert_eq!(
            eval(
                &sb.lua,
                "return ('x').find == string.find and ('x').gsub == string.gsub"
            ),
            "true"
        );
    }

    #[test]
    fn pattern_results_and_errors_match_luas_on_written_cases() {
        let pair = Pair::new();
        let cases: &[&str] = &[
            // find: plain text, patterns, init, plain flag.
            "return string.find('hello world', 'wor')",
            "return string.find('hello world', 'o', 6)",
            "return string.find('hello', 'l', -2)",
            "return string.find('hello', 'l', -100)",
            "return string.find('hello', 'h', 0)",
            "return string.find('hello', '', 6)",
            "return string.find('hello', '', 7)",
            "return string.find('hello', '', 100)",
            "return string.find('', '')",
            "return string.find('', '', 1)",
            "return string.find('', '', 2)",
            "return string.find('a.b', '.', 1, true)",
            "return string.find('a.b', '.', 2, 1)",
            "return string.find('a+b', '+', 1, false)",
            "return string.find('a+b', 'a+', 1, nil)",
            "return string.find('abc', '[', 10)",
            "return string.find('x', 'x[')",
            "return string.find('abc', 'x[')",
            "return string.find('a\\0b', '\\0')",
            "return string.find('a\\0b', '%z')",
            "return string.find('a\\0b', '[\\0]')",
            "return string.find('a\\0b', '.\\0.')",
            "return string.find(12345, 34)",
            "return string.find(1.5, '.', 1, true)",
            "return string.find('abcabc', 'b', '3')",
            "return string.find('abcabc', 'b', 3.0)",
            "return string.find('abcabc', 'b', 2.5)",
            "return string.find('abc', 'b', 'x')",
            "return string.find('abc')",
            "return string.find()",
            "return string.find({}, 'a')",
            "return string.find('a', {})",
            "return ('x'):find()",
            "return ('x'):find(nil)",
            "return pcall(string.find)",
            "return pcall(string.find, 'a', setmetatable({}, {__name = 'Thing'}))",
            "local f = string.find return f('a', nil)",
            "return string.find('abc', 'b', math.mininteger)",
            // Plain searches of short, medium and windowed subjects, across their boundaries.
            "local s = string.rep('a', 60) .. 'bcd' return s:find('abcd', 1, true)",
            "local s = string.rep('a', 61) .. 'bcd' return s:find('abcd', 1, true)",
            "local s = string.rep('a', 62) .. 'bcd' return s:find('bcd', 1, true)",
            "local s = string.rep('a', 63) .. 'bc' return s:find('bcd', 1, true)",
            "local s = string.rep('ab', 100) return s:find('bb', 1, true)",
            "local s = string.rep('ab', 100) .. 'bb' return s:find('bb', 1, true)",
            "local s = string.rep('a', 65534) .. 'bcd' .. string.rep('a', 70000) return s:find('abcda', 1, true)",
            "local s = string.rep('a', 65535) .. 'bcd' .. string.rep('a', 70000) return s:find('bcd', 1, true)",
            "local s = string.rep('a', 65536) .. 'bcd' return s:find('abcd', 1, true)",
            "local s = string.rep('a', 65536 * 3 - 2) .. 'bcd' return s:find('abc', 1, true)",
            "local s = string.rep('a', 65536 * 3 - 2) .. 'bc' return s:find('abcd', 1, true)",
            "local s = string.rep('a', 200000) return s:find('aab', 1, true)",
            "local n = string.rep('ab', 40000) local s = string.rep('x', 100000) .. n .. 'x' return s:find(n, 1, true)",
            "local n = string.rep('ab', 40000) local s = string.rep('x', 100000) .. n:sub(2) return s:find(n, 1, true)",
            "local s = string.rep('a', 70000) .. 'b' return s:find('ab', 69990, true)",
            "local s = string.rep('a', 70000) .. 'b' return s:find('b', -1, true)",
            "return string.find('abc', 'b', math.maxinteger)",
            // Classes and their complements, sets, ranges.
            "return string.find('  x12_ab', '%a+')",
            "return string.find('abc\\1\\127', '%c+')",
            "return string.find('ab12c', '%d+')",
            "return string.find(' \\t\\v\\f\\r\\n x', '%s+')",
            "return string.find('  !~x', '%g+')",
            "return string.find('ABcdEF', '%l+')",
            "return string.find('ab,.;!c', '%p+')",
            "return string.find('abCDe', '%u+')",
            "return string.find('  ab1_c', '%w+')",
            "return string.find('xyzDEADbeefg', '%x+')",
            "return string.find('abc12', '%A+')",
            "return string.find('12ab', '%D+')",
            "return string.find('  ab', '%S+')",
            "return string.find('ab  ', '%W+')",
            "return string.find('x%y', '%%')",
            "return string.find('x.y', '%.')",
            "return string.find('x]y', '%]')",
            "return string.find('xQy', '%Q')",
            "return string.find('\\200\\255abc', '%a')",
            "return string.find('\\200\\255abc', '[\\200-\\255]+')",
            "return string.find('\\200\\255abc', '%W+')",
            "return string.find('abc-def', '[%-]')",
            "return string.find('abc]def', '[]]')",
            "return string.find('abc]def', '[^]]+')",
            "return string.find('a^b', '[%^]')",
            "return string.find('a^b', '[b^]')",
            "return string.find('abcdef', '[c-e]+')",
            "return string.find('abc-', '[a-]+')",
            "return string.find('a-z', '[-z]+')",
            "return string.find('abc', '[%a-z]+')",
            "return string.find('ab%c', '[%%]')",
            "return string.find('abc', '[^%a]')",
            "return string.find('ab1', '[^%a]')",
            "return string.find('abc', '[a')",
            "return string.find('abc', '[a%')",
            "return string.find('abc', '[a%]')",
            "return string.find('abc', '[^')",
            "return string.find('abc', '[^]')",
            "return string.find('abc', '[]')",
            "return string.find('abc', '%')",
            "return string.find('abc', 'a%')",
            // Quantifiers, anchors.
            "return string.find('aaab', 'a*')",
            "return string.find('aaab', 'a*b')",
            "return string.find('aaab', 'a+b')",
            "return string.find('aaab', 'a-b')",
            "return string.find('aaab', 'a?b')",
            "return string.find('b', 'a?b')",
            "return string.find('xaaab', '^a+')",
            "return string.find('aaab', '^a+')",
            "return string.find('aaab', 'b$')",
            "return string.find('aaab', 'a$')",
            "return string.find('a$b', '$b')",
            "return string.find('a$b', 'a$b')",
            "return string.find('ab', '^$')",
            "return string.find('', '^$')",
            "return string.find('a^b', 'a^b')",
            "return string.find('aaa', '^a', 2)",
            "return string.find('a*b', 'a**')",
            "return string.find('a', '*')",
            "return string.find('a+', '+')",
            "return string.find('a-', '-')",
            "return string.find('a?', '?')",
            "return string.find('-x', '^-x')",
            // Captures: strings, positions, unfinished, back-references.
            "return string.find('hello world', '(o)(r)')",
            "return string.find('hello world', '()o()')",
            "return string.match('hello world', '(h)(e)(l)(l)(o)')",
            "return string.match('key = value', '(%w+)%s*=%s*(%w+)')",
            "return string.match('hello', '()ll()')",
            "return string.match('hello', '(h(e(l)))')",
            "return string.match('hello', 'l+')",
            "return string.match('hello', 'xyz')",
            "return string.match('hello', '(')",
            "return string.match('hello', '(h')",
            "return string.find('hello', '(h')",
            "return string.match('hello', 'h)')",
            "return string.match('hello', '())')",
            "return string.match('hello', '%1')",
            "return string.match('hello', '(l)%1')",
            "return string.match('hello', '(l)%2')",
            "return string.match('hello', '(l%1)')",
            "return string.match('hello', '%0')",
            "return string.match('hello', '()%1')",
            "return string.match('say \"hi\" and \"bye\"', '([\"\\'])(.-)%1')",
            "return string.match('abab', '^(ab)%1$')",
            "return string.match(string.rep('a', 10), string.rep('(a)', 10))",
            "return string.match(string.rep('a', 40), string.rep('(a)', 32))",
            "return string.match(string.rep('a', 40), string.rep('(a)', 33))",
            "return string.match(string.rep('a', 40), string.rep('()', 33))",
            "return string.find('a', string.rep('(', 1000) .. 'a' .. string.rep(')', 1000))",
            "return string.find(string.rep('a', 300), string.rep('a?', 300))",
            "return string.find(string.rep('a', 199), string.rep('a?', 199))",
            "return string.find(string.rep('a', 198), string.rep('a?', 198))",
            "return string.find(string.rep('a', 250), string.rep('.-', 250) .. '$')",
            "return string.find(string.rep('a', 30), string.rep('(.)', 30) .. '%30')",
            "return string.match('x', '()')",
            "return string.match('', '()')",
            "return string.match('abc', '()', 4)",
            "return string.match('abc', '()', 5)",
            // %b and %f.
            "return string.find('f(a(b)c) d', '%b()')",
            "return string.find('f(a(b c) d', '%b()')",
            "return string.match('[[x]] [y]', '%b[]')",
            "return string.match('abba', '%baa')",
            "return string.match('x', '%b')",
            "return string.match('x', '%bx')",
            "return string.match('(x', '%b(')",
            "return string.match('THE (quick) fox', '%f[%a]%a+')",
            "return string.match('THE (quick) fox', '%f[%l]%a+')",
            "return string.match('hello', '%f[%z]')",
            "return string.find('hello', '%f[%z]')",
            "return string.find('hello', '%f[^%z]')",
            "return string.find('hello', '%f[%a]', 2)",
            "return string.find('hello', '%f[^%a]')",
            "return string.match('x', '%f')",
            "return string.match('x', '%fx')",
            "return string.match('x', '%f[x')",
            "return string.gsub('THE (quick) fox', '%f[%a]%a+', 'W')",
            // match with init.
            "return string.match('hello', 'l', -2)",
            "return string.match('hello', '.', 6)",
            "return string.match('hello', '.', 7)",
            "return string.match('hello', '^(h)', 2)",
            "return string.match(123, '%d')",
            "return string.match('a', 1)",
            "return string.match()",
            "return ('x'):match()",
            // gmatch: captures, init, empty matches, anchors are plain.
            "local t = {} for w in string.gmatch('one two  three', '%a+') do t[#t+1] = w end return t",
            "local t = {} for k, v in string.gmatch('a=1, b=2', '(%w+)=(%w+)') do t[#t+1] = k .. v end return t",
            "local t = {} for p in string.gmatch('abc', '()') do t[#t+1] = p end return t",
            "local t = {} for w in string.gmatch('abc', '') do t[#t+1] = w end return #t",
            "local t = {} for w in string.gmatch('abc', 'x*') do t[#t+1] = w end return #t",
            "local t = {} for w in string.gmatch('aaa', 'a-') do t[#t+1] = w end return #t",
            "local t = {} for w in string.gmatch('aaa', 'a*') do t[#t+1] = w end return t",
            "local t = {} for w in string.gmatch('a^b^', '^.') do t[#t+1] = w end return t",
            "local t = {} for w in string.gmatch('hello world', '%a+', 3) do t[#t+1] = w end return t",
            "local t = {} for w in string.gmatch('hello world', '%a+', -3) do t[#t+1] = w end return t",
            "local t = {} for w in string.gmatch('hello', '.', 10) do t[#t+1] = w end return #t",
            "local t = {} for w in string.gmatch('hello', '.', 0) do t[#t+1] = w end return #t",
            "local t = {} for a, b in string.gmatch('abcd', '(.)(.)') do t[#t+1] = a .. b end return t",
            "local t = {} for w in string.gmatch(12345, '%d%d') do t[#t+1] = w end return t",
            "for w in string.gmatch('abc', '[') do end",
            "for w in string.gmatch('abc', '(') do end",
            "local it = string.gmatch('ab', '.') return it(), it(), it(), it()",
            "local it = string.gmatch('abc', '(') return 1",
            "return string.gmatch()",
            "return string.gmatch('x')",
            "return string.gmatch('x', '.', 'y')",
            "local t = {} for w in ('a,b,,c'):gmatch('([^,]*)') do t[#t+1] = '<' .. w .. '>' end return table.concat(t)",
            // gsub with strings, %0-%9, %%, n, anchors.
            "return string.gsub('hello world', 'o', '0')",
            "return string.gsub('hello world', '(o)', '[%1]')",
            "return string.gsub('hello world', 'o', '[%0]')",
            "return string.gsub('hello world', 'o', '%%')",
            "return string.gsub('hello world', 'o', '%')",
            "return string.gsub('hello world', 'o', '%x')",
            "return string.gsub('hello world', 'o', '%2')",
            "return string.gsub('hello world', '(o)', '%2')",
            "return string.gsub('hello world', 'o', '%1')",
            "return string.gsub('hello world', '()o', '%1')",
            "return string.gsub('hello world', '(h)(e)', '%2%1')",
            "return string.gsub('hello world', 'l', 'L', 2)",
            "return string.gsub('hello world', 'l', 'L', 0)",
            "return string.gsub('hello world', 'l', 'L', -1)",
            "return string.gsub('hello world', 'l', 'L', 2.0)",
            "return string.gsub('hello world', 'l', 'L', 2.5)",
            "return string.gsub('hello world', 'l', 'L', '1')",
            "return string.gsub('hello world', 'l', 'L', 'x')",
            "return string.gsub('hello', '', '-')",
            "return string.gsub('hello', 'x*', '-')",
            "return string.gsub('hello', 'l*', '-')",
            "return string.gsub('', '', '-')",
            "return string.gsub('', 'x*', '-')",
            "return string.gsub('hello', '^h', 'H')",
            "return string.gsub('hello', '^', '>')",
            "return string.gsub('hello', '$', '<')",
            "return string.gsub('hello', '^l', 'L')",
            "return string.gsub('hello', '.', '%0%0')",
            "return string.gsub('abc', '%w', '%0\\0')",
            "return string.gsub('abc', '%w', 5)",
            "return string.gsub('abc', '%w', 1.5)",
            "return string.gsub(123, 2, 9)",
            "return string.gsub('abc', '(', 'x')",
            "return string.gsub('abc', 'x(', 'x')",
            "return string.gsub('abc', '(b', '%1')",
            "return string.gsub('abc', 'b', true)",
            "return string.gsub('abc', 'b')",
            "return string.gsub('abc')",
            "return string.gsub('abc', 'b', nil, 'x')",
            "return string.gsub('abc', 'b', true, 'x')",
            "return ('abc'):gsub('b', {})",
            // gsub with tables and functions.
            "return string.gsub('$name is $age', '%$(%w+)', {name = 'Ann', age = 7})",
            "return string.gsub('$name is $x', '%$(%w+)', {name = 'Ann'})",
            "return string.gsub('$name', '%$(%w+)', {name = false})",
            "return string.gsub('$name', '%$(%w+)', {name = true})",
            "return string.gsub('$name', '%$(%w+)', {name = {}})",
            "return string.gsub('abc', '%w', {a = 1, b = 2.5})",
            "return string.gsub('abc', '()', {[1] = 'one', [3] = 'three'})",
            "return string.gsub('abc', '(', {})",
            "return string.gsub('abc', '(b', {})",
            "return string.gsub('abc', '%w', setmetatable({}, {__index = function(t, k) return k:upper() end}))",
            "return string.gsub('abc', '%w', setmetatable({}, {__index = function(t, k) error('no ' .. k) end}))",
            "local ok, e = pcall(string.gsub, 'abc', '%w', setmetatable({}, {__index = function(t, k) error({k}) end})) return ok, e[1]",
            "return string.gsub('abc', '%w', setmetatable({b = 'B'}, {__index = {a = 'A'}}))",
            "return string.gsub('abc', '%w', setmetatable({}, {}))",
            "return string.gsub('hello world', '%w+', function(w) return w:upper() end)",
            "return string.gsub('hello world', '%w+', function(w) return nil end)",
            "return string.gsub('hello world', '%w+', function(w) return false end)",
            "return string.gsub('hello world', '%w+', function(w) return 42 end)",
            "return string.gsub('hello world', '%w+', function(w) return {} end)",
            "return string.gsub('hello world', '%w+', function(w) return true end)",
            "return string.gsub('hello world', '%w+', function(w) return print end)",
            "return string.gsub('hello world', '(%w)(%w*)', function(a, b) return b .. a end)",
            "return string.gsub('hello world', '()%w+()', function(a, b) return a .. '-' .. b end)",
            "return string.gsub('hello', '', function(...) return select('#', ...) end)",
            "local n = 0 return string.gsub('abcd', '%w', function(c) n = n + 1 if n % 2 == 0 then return c:upper() end end)",
            "return string.gsub('abc', '%w', function(c) error('boom ' .. c) end)",
            "return string.gsub('abc', '%w', function(c) error('boom', 0) end)",
            "return pcall(string.gsub, 'abc', '%w', function(c) error({code = 7}) end)",
            "local ok, e = pcall(string.gsub, 'abc', '%w', function(c) error({code = 7}) end) return e.code",
            "return string.gsub('abc', '(', function() end)",
            "return string.gsub('abc', '%w', function(c) return string.gsub(c, '.', '%0%0') end)",
            "return coroutine.wrap(function() return string.gsub('abc', '%w', function(c) coroutine.yield(c) end) end)()",
            "return coroutine.resume(coroutine.create(function() return string.gsub('abc', '%w', function(c) coroutine.yield(c) end) end))",
            "return coroutine.wrap(function() return string.gsub('abc', '%w', function(c) return (coroutine.wrap(function() coroutine.yield(c .. c) end))() end) end)()",
            "return coroutine.wrap(function() return string.gsub('abc', '%w', setmetatable({}, {__index = function(t, k) coroutine.yield(k) end})) end)()",
            "return pcall(string.gsub, 'abc', '%w', function(c) return string.rep(c, 10) end)",
            "return ('x = 1, y = 2'):gsub('(%w+) = (%w+)', '%2 = %1')",
            "return string.gsub('hello world', 'o', '%0', 1)",
            "return string.gsub('abc', '.-', '-')",
            "return string.gsub('abc', '.?', '-')",
            "return string.gsub('a,b,,c', ',', ';')",
            "return string.gsub('aaa', 'a', 'b', math.maxinteger)",
            "return string.gsub('aaa', 'a', 'b', math.mininteger)",
        ];
        for code in cases {
            pair.same(code);
        }
        // A few results spelled out, so that both states giving the same wrong answer fails.
        let sb = &pair.sandbox.lua;
        assert_eq!(
            eval(sb, "return string.find('hello world', '(o)(r)')"),
            "8, 9, \"o\", \"r\""
        );
        assert_eq!(eval(sb, "return string.gsub('hello', '', '-')"), "\"-h-e-l-l-o-\", 6");
        assert_eq!(
            eval(sb, "return string.find(string.rep('a', 300), string.rep('a?', 300))"),
            "error: runtime error: t.lua:1: pattern too complex"
        );
        assert_eq!(
            eval(sb, "return string.match('hello', '(h')"),
            "error: runtime error: t.lua:1: unfinished capture"
        );
        assert_eq!(
            eval(sb, "return ('x'):find()"),
            "error: runtime error: t.lua:1: bad argument #1 to 'find' (string expected, got no value)"
        );
    }

    /// A deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
            items[self.below(items.len())]
        }
    }

    /// Pattern pieces: items, classes, sets, quantifiers, anchors, captures, and broken pieces.
    const PIECES: &[&str] = &[
        "a", "b", "x", "(", ")", "()", ".", "%a", "%d", "%s", "%w", "%p", "%l", "%u", "%x", "%c", "%g", "%z", "%A",
        "%D", "%S", "%W", "%%", "%.", "%(", "%]", "%-", "[ab]", "[^ab]", "[a-c]", "[%d_]", "[%a-]", "[]a]", "[^]b]",
        "[a", "[^", "[%", "]", "^", "$", "*", "+", "-", "?", "*", "+", "-", "?", "%", "%1", "%2", "%0", "%b()", "%bab",
        "%b", "%b(", "%f[%w]", "%f[^a]", "%f", "%fa", "%f[", "\\0", "1", " ",
    ];
    /// Subject bytes.
    const SUBJECT: &[u8] = b"aaabbx()[]%.-_ 1Z\n\0";
    /// Replacement strings for gsub.
    const TEMPLATES: &[&str] = &[
        "", "-", "%0", "%1", "<%1>", "%2%1", "%%", "%", "%x", "%9", "a%0b", "%1%1%1",
    ];
    /// Other replacements: functions and tables (a function keeps its own count).
    const REPLACERS: &[&str] = &[
        "function(...) return table.concat({...}, '|') end",
        "function(a) return a end",
        "(function() local n = 0 return function(a) n = n + 1 if n % 2 == 0 then return nil end return n end end)()",
        "function() return false end",
        "function(a) if a == 'b' then return {} end return 'B' end",
        "{a = 'A', b = false, x = 1.5}",
        "{[1] = 'one', [2] = 'two'}",
        "setmetatable({}, {__index = function(t, k) return type(k) end})",
        "{a = true}",
    ];
    const INITS: &[&str] = &["", "-100", "-3", "-1", "0", "1", "2", "5", "30", "'2'", "2.0"];

    #[test]
    fn pattern_results_and_errors_match_luas_on_generated_cases() {
        let pair = Pair::new();
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let (mut errors, mut matched, mut cases) = (0, 0, 0);
        for _ in 0..3000 {
            let pattern: String = (0..1 + rng.below(7)).map(|_| rng.pick(PIECES)).collect();
            let pattern = literal(pattern.replace("\\0", "\0").as_bytes());
            let subject: Vec<u8> = (0..rng.below(13)).map(|_| SUBJECT[rng.below(SUBJECT.len())]).collect();
            let subject = literal(&subject);
            let init = rng.pick(INITS);
            let init = if init.is_empty() {
                String::new()
            } else {
                format!(", {init}")
            };
            let plain = [", nil", ", true", ", false"][rng.below(3)];
            let template = literal(rng.pick(TEMPLATES).as_bytes());
            let replacer = rng.pick(REPLACERS);
            let limit = ["", ", 1", ", 2", ", 0", ", -1"][rng.below(5)];
            let find_init = if init.is_empty() { ", 1" } else { &init };
            for code in [
                format!("return string.find({subject}, {pattern}{init})"),
                format!("return string.find({subject}, {pattern}{find_init}{plain})"),
                format!("return string.match({subject}, {pattern}{init})"),
                format!(
                    "local out, it = {{}}, string.gmatch({subject}, {pattern}{init})
                     for _ = 1, 100 do local r = table.pack(it()) if r[1] == nil then break end out[#out + 1] = r end
                     return out"
                ),
                format!("return string.gsub({subject}, {pattern}, {template}{limit})"),
                format!("return string.gsub({subject}, {pattern}, {replacer}{limit})"),
            ] {
                let result = pair.same(&code);
                cases += 1;
                if result.starts_with("error:") {
                    errors += 1;
                } else if !result.starts_with("nil") {
                    matched += 1;
                }
            }
        }
        // The generator reaches both sides: malformed patterns and matches.
        assert!(
            errors > cases / 10 && matched > cases / 4,
            "{errors} errors, {matched} matches of {cases}"
        );
    }

    const LIMIT: u64 = 2_000_000;

    #[test]
    fn catastrophic_patterns_stop_at_the_work_limit() {
        let sb = Sandbox::new(
            Limits {
                instructions: LIMIT,
                ..Limits::default()
            },
            0,
        )
        .unwrap();
        // (Lua's own functions would run these for hours.)
        assert_installed(&sb);
        for code in [
            // Exponential backtracking (hours in Lua's own matcher).
            "return string.find(string.rep('a', 40), string.rep('a?', 40) .. string.rep('a', 40))",
            "return string.find(string.rep('a', 30), string.rep('(a?)', 30) .. string.rep('a', 30))",
            // Quadratic scans of a 1 MiB subject (10^12 steps).
            "return string.find(string.rep('a', 1 << 20), '.-b')",
            "return string.find(string.rep('a', 1 << 20), 'a*b')",
            "return string.match(string.rep('a', 1 << 20), '(.-)%f[b]')",
            "return string.find(string.rep('(', 1 << 20), '%b()')",
            "return string.match(string.rep('ab', 1 << 19), '(a.-)%1%1%1x')",
            "for w in string.gmatch(string.rep('a', 1 << 20), '.-b') do end",
            "return string.gsub(string.rep('a', 1 << 20), '.-b', '')",
            // An empty match at every position of a large subject.
            "return string.gsub(string.rep('x', 4 << 20), '', '')",
            // A plain search over 4 MiB (Lua's own compares up to 4 KiB at each position).
            "return string.find(string.rep('a', 4 << 20), string.rep('a', 4096) .. 'b', 1, true)",
        ] {
            let call = sb.call("the scenario file");
            let result = eval(&sb.lua, code);
            let done = sb.budget.charged();
            drop(call);
            assert!(
                result.starts_with(
                    "error: runtime error: t.lua:1: instruction budget exceeded (2000000 instructions in one call)"
                ),
                "{code}: {result}"
            );
            // Steps are reported every WORK_EVERY, and a scan of the subject is counted at
            // its end: the count stops a little past the limit.
            assert!(done > LIMIT && done < LIMIT + (1 << 20), "{code}: {done} steps");
        }
        // The state goes on.
        assert_eq!(eval(&sb.lua, "return ('abc'):gsub('b', 'B')"), "\"aBc\", 1");
    }

    #[test]
    fn pattern_work_is_counted_and_ordinary_calls_succeed_without_a_limit() {
        let sb = Sandbox::new(Limits::default(), 0).unwrap();
        for (code, expect) in [
            ("return (string.gsub(string.rep('x', 1 << 20), '', '-'))", None),
            (
                "return select(2, string.gsub(string.rep('x', 1 << 20), '', '-'))",
                Some("1048577"),
            ),
            (
                "return string.find(string.rep('a', 1 << 20) .. 'b', '.-b')",
                Some("1, 1048577"),
            ),
            (
                "return string.find(string.rep('a', 20), string.rep('a?', 20) .. string.rep('a', 20))",
                Some("1, 20"),
            ),
            (
                "return string.match(string.rep('x', 1 << 20) .. '=1', '=(%d)')",
                Some("\"1\""),
            ),
        ] {
            let _call = sb.call("the scenario file");
            let result = eval(&sb.lua, code);
            assert!(!result.starts_with("error"), "{code}: {result}");
            if let Some(expect) = expect {
                assert_eq!(result, expect, "{code}");
            }
        }
        // The 2^20 ways to match `a?` twenty times are all tried, and counted.
        let call = sb.call("the scenario file");
        eval(
            &sb.lua,
            "return string.find(string.rep('a', 20), string.rep('a?', 20) .. string.rep('a', 20))",
        );
        assert!(sb.budget.charged() > 1 << 20, "{}", sb.budget.charged());
        drop(call);
        // Many small calls are charged too (their steps add up across calls).
        let _call = sb.call("the scenario file");
        let result = eval(
            &sb.lua,
            "local n = 0 for i = 1, 20000 do if ('key=value'):match('(%w+)=(%w+)') then n = n + 1 end end return n",
        );
        assert_eq!(result, "20000");
        let done = sb.budget.charged();
        assert!(done > 20000 * 10, "{done}");
    }

    #[test]
    fn pattern_callbacks_that_fail_yield_or_run_out_of_memory_behave_as_in_lua() {
        let limits = Limits {
            memory: 1 << 20,
            ..Limits::default()
        };
        let sb = Sandbox::new(limits, 0).unwrap();
        let stock = Lua::new();
        stock.set_memory_limit(1 << 20).unwrap();
        let memory = "error: memory error: not enough memory";
        for (code, expect) in [
            (
                "return string.gsub('abc', '%w', function(c) error('boom ' .. c) end)",
                "error: runtime error: t.lua:1: boom a",
            ),
            (
                "return coroutine.wrap(function() return string.gsub('abc', '%w', function(c) coroutine.yield(c) end) end)()",
                "error: runtime error: t.lua:1: attempt to yield across a C-call boundary",
            ),
            // A callback whose result does not fit, the result itself, and a capture.
            (
                "return string.gsub('abc', '%w', function(c) return string.rep(c, 2 << 20) end)",
                memory,
            ),
            (
                "return string.gsub('abc', '%w', setmetatable({}, {__index = function(t, c) return string.rep(c, 2 << 20) end}))",
                memory,
            ),
            (
                "return string.gsub(string.rep('x', 100000), 'x', string.rep('y', 20))",
                memory,
            ),
            (
                "return string.gsub(string.rep('x', 100000), 'x', function() return string.rep('y', 20) end)",
                memory,
            ),
            ("return string.match(string.rep('x', 600000), '(.*)')", memory),
            // Caught by pcall, as Lua's.
            (
                "return pcall(string.gsub, string.rep('x', 100000), 'x', string.rep('y', 20))",
                "false, \"not enough memory\"",
            ),
            (
                "return pcall(string.gsub, 'abc', '%w', function(c) return string.rep(c, 2 << 20) end)",
                "false, \"not enough memory\"",
            ),
        ] {
            let _call = sb.call("the scenario file");
            let ours = eval(&sb.lua, code);
            assert_eq!(ours, expect, "{code}");
            assert_eq!(eval(&stock, code), expect, "Lua's own: {code}");
            // The state works on after it.
            sb.lua.gc_collect().unwrap();
            assert_eq!(eval(&sb.lua, "return ('abc'):gsub('%w', {b = 'B'})"), "\"aBc\", 3");
        }
        // The host sees the memory limit.
        let err = sb
            .lua
            .load("return string.gsub('abc', '%w', function(c) return string.rep(c, 2 << 20) end)")
            .exec()
            .unwrap_err();
        assert_eq!(sandbox::describe(&err, &limits), "memory limit of 1 MiB reached");
    }

    /// Lua's functions against these on calls a scenario's hooks make, in one state (Lua's own
    /// `string` table and a table of these), the same loop for both:
    /// `cargo test --release --lib pattern_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn pattern_speed_against_luas() {
        let lua = Lua::new();
        let ours = lua.create_table().unwrap();
        let functions: [(&str, ffi::lua_CFunction); 4] = [
            ("find", str_find),
            ("match", str_match),
            ("gmatch", str_gmatch),
            ("gsub", str_gsub),
        ];
        for (name, f) in functions {
            // SAFETY: the functions are C functions of a Lua 5.4 state.
            ours.set(name, unsafe { lua.create_c_function(f) }.unwrap()).unwrap();
        }
        lua.globals().set("ours", ours).unwrap();
        lua.load(
            r#"
            ct = "application/json; charset=utf-8"
            auth = "Bearer eyJhbGciOi.eyJzdWIiOi.SflKxwRJSM"
            local items = {}
            for i = 1, 60 do
              items[i] = string.format('{"id": %d, "name": "item %d", "price": %d.5}', i, i, i * 3)
            end
            body = '{"items": [' .. table.concat(items, ", ") .. '], "token": "abc123def456"}'
            template = "Hello {name}, your order {id} ships on {when}."
            vars = { name = "Ann", id = "A-1042", when = "Tuesday" }
            function count(gmatch, s, p) local n = 0 for _ in gmatch(s, p) do n = n + 1 end return n end
            "#,
        )
        .exec()
        .unwrap();
        // PATTERN_PROFILE=CALL runs only that call, many times (for a profiler).
        if let Ok(only) = std::env::var("PATTERN_PROFILE") {
            lua.load(format!("for _ = 1, 3e7 do {only} end")).exec().unwrap();
            return;
        }
        let body_len: usize = lua.load("return #body").eval().unwrap();
        println!("body: {body_len} bytes; ns per call, Lua's / these");
        for case in [
            "find(ct, 'json', 1, true)",
            "find(ct, 'json')",
            "match(ct, 'charset=([%w%-]+)')",
            "match('id: 12345', '%d+')",
            "match(auth, '^Bearer%s+(.+)$')",
            "find(body, '\"token\"', 1, true)",
            "match(body, '\"token\":%s*\"([^\"]+)\"')",
            "match(body, '\"price\": (%d+%.%d+)}], ')",
            "count(S.gmatch, body, '\"id\": (%d+)')",
            "gsub(template, '{(%w+)}', vars)",
            "gsub(template, '%s+', ' ')",
            "gsub('x-request-id', '%-(%w)', string.upper)",
            "gsub(body, '\"(%w+)\":', '%1=')",
        ] {
            let mut results = Vec::new();
            for lib in ["string", "ours"] {
                let call = if case.starts_with("count") {
                    case.replace("S.", &format!("{lib}."))
                } else {
                    format!("{lib}.{case}")
                };
                let code = format!(
                    "local t, n = os.clock(), 0
                     while os.clock() - t < 0.05 do n = n + 1 {call} end
                     local reps = math.max(1, n * 6) t = os.clock()
                     for _ = 1, reps do {call} end
                     return (os.clock() - t) / reps * 1e9, select('#', {call})"
                );
                let (ns, _): (f64, i64) = lua.load(&code).eval().unwrap();
                results.push(ns);
                // The same results from both.
                let same: bool = lua
                    .load(format!(
                        "local a, b = table.pack(string.{c}), table.pack(ours.{c})
                         for i = 1, math.max(a.n, b.n) do if a[i] ~= b[i] then return false end end
                         return true",
                        c = case.replace("S.gmatch", "string.gmatch")
                    ))
                    .eval()
                    .unwrap_or(true);
                assert!(same, "{case}");
            }
            println!(
                "{:>8.0} {:>8.0}  {:>5.2}x  {case}",
                results[0],
                results[1],
                results[1] / results[0]
            );
        }
    }
}
