//! The memory of one user's Lua state, and its memory limit.
//!
//! A state is hundreds of small objects (strings, tables, closures) that live as long as the
//! user. Through `malloc` each carries a header and is rounded up to 16 bytes: about a quarter
//! of a state's memory, times ten thousand users. Lua hands the allocator each block's size back
//! when it frees or grows it, so blocks need no header: small ones are packed back to back into
//! the state's own chunks (8-byte steps) and, once freed, kept on a free list per size for the
//! next block of that size. Larger blocks (stacks, arrays, long strings) go to the system
//! allocator as they are.
//!
//! The first chunk is sized from what earlier states of the same scenario took
//! ([`Arena::new`]'s `first`), so states sit back to back in memory with nothing unused between
//! them; later chunks grow with the state.

use std::alloc::{Layout, alloc, dealloc, realloc};
use std::ffi::c_void;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::sandbox::{Budget, LARGE_ALLOCATION};

/// Memory that several states hold together, in reservations of [`QUANTUM`] bytes, and the
/// most they may: ten thousand users each within their own limit could still take more memory
/// than the machine has.
pub struct Pool {
    reserved: AtomicUsize,
    limit: AtomicUsize,
}

impl Pool {
    pub const fn new(limit: usize) -> Self {
        Self {
            reserved: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }
}

/// The pool of every state of the process.
static ALL_STATES: Pool = Pool::new(usize::MAX);

/// A state reserves room from its pool in steps of this size, so that the shared counter is
/// touched about once per 64 KiB a state grows or shrinks, not at every allocation.
const QUANTUM: usize = 64 * 1024;

/// Caps the memory all states of the process may hold together (a run sets it from the memory
/// the machine has available when it starts).
pub fn set_total_limit(bytes: usize) {
    ALL_STATES.limit.store(bytes, Ordering::Relaxed);
}

/// Why the arena refused an allocation last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The state's own limit.
    State,
    /// The limit of all states together (the limit then).
    AllStates(usize),
}

/// Small blocks are multiples of this; Lua needs no stricter alignment (its largest scalar is
/// 8 bytes, and the userdata it lays out are only 8-aligned within their blocks anyway).
const GRAIN: usize = 8;
/// Blocks up to this size come from the chunks.
const SMALL: usize = 256;
const CLASSES: usize = SMALL / GRAIN;
/// Alignment of large blocks (as mlua's own allocator gives).
const LARGE_ALIGN: usize = 16;
/// Smallest chunk carved after the first.
const MIN_CHUNK: usize = 512;

pub struct Arena {
    /// Bytes Lua holds, against `limit`.
    used: usize,
    limit: usize,
    /// Free blocks per size class (`class - 1`), linked through their first word.
    free: [*mut u8; CLASSES],
    /// The unused rest of the current chunk.
    next: *mut u8,
    end: *mut u8,
    chunks: Vec<(NonNull<u8>, Layout)>,
    /// Bytes carved from chunks so far.
    carved: usize,
    first: usize,
    /// Bytes reserved from the pool (at least `used`).
    reserved: usize,
    pool: &'static Pool,
    /// The state's budget: large allocations look at its call's limits.
    budget: *const Budget,
    refused: Option<Refusal>,
}

fn class(size: usize) -> usize {
    size.div_ceil(GRAIN)
}

impl Arena {
    /// An arena for a state of at most `limit` bytes, whose first chunk is `first` bytes.
    pub fn new(limit: usize, first: usize) -> Box<Self> {
        Self::in_pool(limit, first, &ALL_STATES)
    }

    /// [`Arena::new`], holding its memory against `pool` (tests use pools of their own).
    pub fn in_pool(limit: usize, first: usize, pool: &'static Pool) -> Box<Self> {
        Box::new(Self {
            used: 0,
            limit,
            free: [ptr::null_mut(); CLASSES],
            next: ptr::null_mut(),
            end: ptr::null_mut(),
            chunks: Vec::new(),
            carved: 0,
            first: first.next_multiple_of(GRAIN).max(MIN_CHUNK),
            reserved: 0,
            pool,
            budget: ptr::null(),
            refused: None,
        })
    }

    /// Large allocations of the state look at the limits of `budget`'s running call, which
    /// must outlive the arena's use.
    pub fn watch(&mut self, budget: *const Budget) {
        self.budget = budget;
    }

    /// Why the last refused allocation was refused.
    pub fn refused(&self) -> Option<Refusal> {
        self.refused
    }

    /// Reserves room from the process's total for `used` to reach `want` bytes.
    fn reserve(&mut self, want: usize) -> bool {
        if want <= self.reserved {
            return true;
        }
        let more = (want - self.reserved).next_multiple_of(QUANTUM);
        let limit = self.pool.limit.load(Ordering::Relaxed);
        let before = self.pool.reserved.fetch_add(more, Ordering::Relaxed);
        if before.saturating_add(more) > limit {
            self.pool.reserved.fetch_sub(more, Ordering::Relaxed);
            self.refused = Some(Refusal::AllStates(limit));
            return false;
        }
        self.reserved += more;
        true
    }

    /// Counts `bytes` the host holds for the state (a response body its script can read) as
    /// the state's: `false` if they do not fit in its limits.
    pub fn charge(&mut self, bytes: usize) -> bool {
        let want = self.used.saturating_add(bytes);
        if want > self.limit {
            self.refused = Some(Refusal::State);
            return false;
        }
        if !self.reserve(want) {
            return false;
        }
        self.used = want;
        true
    }

    /// The host no longer holds `bytes` of [`Arena::charge`].
    pub fn discharge(&mut self, bytes: usize) {
        self.used -= bytes;
        self.unreserve();
    }

    /// Gives back what the state reserved beyond its needs (keeping one step in hand).
    fn unreserve(&mut self) {
        if self.reserved - self.used > 2 * QUANTUM {
            let back = (self.reserved - self.used - QUANTUM) / QUANTUM * QUANTUM;
            self.reserved -= back;
            self.pool.reserved.fetch_sub(back, Ordering::Relaxed);
        }
    }

    /// Bytes Lua holds now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Bytes of small blocks carved so far, freed or not: what the next state's first chunk
    /// should hold.
    pub fn carved(&self) -> usize {
        self.carved
    }

    unsafe fn small(&mut self, c: usize) -> *mut u8 {
        let head = self.free[c - 1];
        if !head.is_null() {
            // SAFETY: a free block's first word links to the next free block of its class.
            self.free[c - 1] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        let size = c * GRAIN;
        if (self.end as usize) - (self.next as usize) < size && !unsafe { self.grow() } {
            return ptr::null_mut();
        }
        let p = self.next;
        // SAFETY: `size` bytes are left in the chunk.
        self.next = unsafe { p.add(size) };
        self.carved += size;
        p
    }

    /// Starts a new chunk; what is left of the current one goes on a free list.
    unsafe fn grow(&mut self) -> bool {
        let tail = (self.end as usize) - (self.next as usize);
        if tail >= GRAIN {
            unsafe { self.release_small(self.next, tail / GRAIN) };
        }
        let size = if self.chunks.is_empty() {
            self.first
        } else {
            (self.carved / 16).clamp(MIN_CHUNK, 64 * 1024).next_multiple_of(GRAIN)
        };
        let Ok(layout) = Layout::from_size_align(size, GRAIN) else {
            return false;
        };
        // SAFETY: `layout` has a non-zero size.
        let Some(p) = NonNull::new(unsafe { alloc(layout) }) else {
            return false;
        };
        self.chunks.push((p, layout));
        self.next = p.as_ptr();
        // SAFETY: the chunk is `size` bytes long.
        self.end = unsafe { p.as_ptr().add(size) };
        true
    }

    unsafe fn release_small(&mut self, p: *mut u8, c: usize) {
        // SAFETY: the block is at least one word and 8-aligned, and no longer in use.
        unsafe { p.cast::<*mut u8>().write(self.free[c - 1]) };
        self.free[c - 1] = p;
    }

    unsafe fn take(&mut self, size: usize) -> *mut u8 {
        if size <= SMALL {
            unsafe { self.small(class(size)) }
        } else {
            match Layout::from_size_align(size, LARGE_ALIGN) {
                // SAFETY: the size is not zero.
                Ok(layout) => unsafe { alloc(layout) },
                Err(_) => ptr::null_mut(),
            }
        }
    }

    unsafe fn release(&mut self, p: *mut u8, size: usize) {
        if size <= SMALL {
            unsafe { self.release_small(p, class(size)) }
        } else {
            // SAFETY: large blocks were allocated with this layout (Lua gives their size back).
            unsafe { dealloc(p, Layout::from_size_align_unchecked(size, LARGE_ALIGN)) }
        }
    }

    unsafe fn resize(&mut self, p: *mut u8, old: usize, new: usize) -> *mut u8 {
        if old <= SMALL && new <= SMALL && class(old) == class(new) {
            return p;
        }
        if old > SMALL && new > SMALL {
            // SAFETY: as in `release`.
            return unsafe { realloc(p, Layout::from_size_align_unchecked(old, LARGE_ALIGN), new) };
        }
        let q = unsafe { self.take(new) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least `min(old, new)` bytes and do not overlap.
            unsafe {
                ptr::copy_nonoverlapping(p, q, old.min(new));
                self.release(p, old);
            }
        }
        q
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        self.pool.reserved.fetch_sub(self.reserved, Ordering::Relaxed);
        for (p, layout) in self.chunks.drain(..) {
            // SAFETY: allocated in `grow` with this layout.
            unsafe { dealloc(p.as_ptr(), layout) };
        }
    }
}

/// The `lua_Alloc` function of states made on an [`Arena`] (`ud` points to it).
///
/// # Safety
/// Called by Lua only, with `ud` the arena the state was created with, which outlives it.
pub unsafe extern "C" fn lua_alloc(ud: *mut c_void, ptr: *mut c_void, osize: usize, nsize: usize) -> *mut c_void {
    // SAFETY: see above; Lua calls its allocator from one thread at a time.
    let arena = unsafe { &mut *ud.cast::<Arena>() };
    let p = ptr.cast::<u8>();
    // With no block, `osize` tells what kind of object is coming, not a size.
    let old = if p.is_null() { 0 } else { osize };
    if nsize == 0 {
        if !p.is_null() {
            unsafe { arena.release(p, old) };
            arena.used -= old;
            arena.unreserve();
        }
        return ptr::null_mut();
    }
    // Growing past a limit fails: Lua collects garbage and tries again, then raises a memory
    // error. Shrinking always goes through.
    if nsize > old {
        let want = arena.used + (nsize - old);
        if want > arena.limit {
            arena.refused = Some(Refusal::State);
            return ptr::null_mut();
        }
        // A large block ends work that one instruction or library call does (a long string
        // built, a table grown): it fails once the running call is over its time or the run
        // has ended (the call's error then says which).
        // SAFETY: the budget outlives the arena's use (see `Sandbox`).
        if nsize >= LARGE_ALLOCATION && unsafe { arena.budget.as_ref() }.is_some_and(Budget::allocation_refused) {
            return ptr::null_mut();
        }
        if !arena.reserve(want) {
            return ptr::null_mut();
        }
    }
    let q = if p.is_null() {
        unsafe { arena.take(nsize) }
    } else {
        unsafe { arena.resize(p, old, nsize) }
    };
    if !q.is_null() {
        arena.used = arena.used - old + nsize;
    }
    if nsize < old {
        arena.unreserve();
    }
    q.cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(a: &mut Arena, p: *mut u8, old: usize, new: usize) -> *mut u8 {
        unsafe { lua_alloc((a as *mut Arena).cast(), p.cast(), old, new).cast() }
    }

    #[test]
    fn small_blocks_are_packed_reused_by_size_and_limited() {
        let mut a = Arena::new(10_000, 1024);
        let x = call(&mut a, ptr::null_mut(), 4, 24);
        let y = call(&mut a, ptr::null_mut(), 4, 20);
        assert_eq!(y as usize - x as usize, 24, "no header between blocks");
        unsafe { x.write_bytes(7, 24) };
        // Same class: grows in place. Another class: moves, keeping the bytes.
        assert_eq!(call(&mut a, x, 24, 22), x);
        let z = call(&mut a, x, 22, 100);
        assert_ne!(z, x);
        assert_eq!(unsafe { *z.add(21) }, 7);
        // The freed 24-byte block serves the next block of that size.
        assert_eq!(call(&mut a, ptr::null_mut(), 0, 17), x);
        assert_eq!(a.used(), 20 + 100 + 17, "what Lua holds, not what was carved");
        // Large blocks, and the limit.
        let big = call(&mut a, ptr::null_mut(), 0, 5000);
        assert!(!big.is_null());
        assert!(call(&mut a, ptr::null_mut(), 0, 6000).is_null(), "past the limit");
        assert!(call(&mut a, big, 5000, 0).is_null());
        assert!(!call(&mut a, ptr::null_mut(), 0, 6000).is_null(), "room again");
    }

    #[test]
    fn states_together_are_held_to_their_pool() {
        // Three states of 1 MiB each may hold 2 MiB together: the third is refused, and says
        // which limit; freeing one lets it in.
        static POOL: Pool = Pool::new(2 << 20);
        let mut states: Vec<Box<Arena>> = (0..3).map(|_| Arena::in_pool(1 << 20, 1024, &POOL)).collect();
        let big = 900 << 10;
        let a = call(&mut states[0], ptr::null_mut(), 0, big);
        let b = call(&mut states[1], ptr::null_mut(), 0, big);
        assert!(!a.is_null() && !b.is_null());
        assert!(call(&mut states[2], ptr::null_mut(), 0, big).is_null(), "past the pool");
        assert_eq!(states[2].refused(), Some(Refusal::AllStates(2 << 20)));
        // A state's own limit is told apart.
        assert!(call(&mut states[0], ptr::null_mut(), 0, 200 << 10).is_null());
        assert_eq!(states[0].refused(), Some(Refusal::State));
        call(&mut states[1], b, big, 0);
        assert!(!call(&mut states[2], ptr::null_mut(), 0, big).is_null(), "room again");
        drop(states);
        assert_eq!(POOL.reserved.load(Ordering::Relaxed), 0, "every reservation given back");
    }

    #[test]
    fn what_the_host_holds_for_a_state_counts_against_its_limits() {
        static POOL: Pool = Pool::new(1 << 20);
        let mut a = Arena::in_pool(600 << 10, 1024, &POOL);
        let p = call(&mut a, ptr::null_mut(), 0, 100 << 10);
        assert!(a.charge(400 << 10), "within the state's limit");
        assert!(!a.charge(200 << 10), "past the state's limit");
        assert_eq!(a.refused(), Some(Refusal::State));
        assert!(
            call(&mut a, ptr::null_mut(), 0, 200 << 10).is_null(),
            "the charge holds room"
        );
        a.discharge(400 << 10);
        assert_eq!(a.used(), 100 << 10);
        assert!(!call(&mut a, ptr::null_mut(), 0, 200 << 10).is_null(), "given back");
        // And the pool of all states.
        let mut b = Arena::in_pool(1 << 20, 1024, &POOL);
        assert!(!b.charge(900 << 10));
        assert_eq!(b.refused(), Some(Refusal::AllStates(1 << 20)));
        call(&mut a, p, 100 << 10, 0);
    }

    #[test]
    fn chunks_grow_and_their_tails_are_not_lost() {
        let mut a = Arena::new(usize::MAX, 1024);
        let blocks: Vec<*mut u8> = (0..200).map(|_| call(&mut a, ptr::null_mut(), 0, 200)).collect();
        assert!(blocks.iter().all(|p| !p.is_null()));
        assert!(a.chunks.len() > 1);
        // 1024 = 5 * 200 + 24: the first chunk's tail is a free 24-byte block.
        assert!(!a.free[class(24) - 1].is_null());
        for p in blocks {
            call(&mut a, p, 200, 0);
        }
        assert_eq!(a.used(), 0);
    }
}
