//! The thread that serves the calls pagemig takes, so that `move_pages` and `mbind` stay
//! async-signal-safe for the threads that call them.
//!
//! The kernel's `move_pages(2)` and `mbind(2)` may be called from a signal handler. A
//! handler can interrupt its thread anywhere: inside `malloc` holding glibc's arena lock,
//! inside `pthread_create`, inside pagemig itself holding one of its own locks. Serving the
//! call on that thread would meet those locks again and wait for ever (pagemig reads the
//! process's mappings, allocates its arrays and batches, starts its threads). So the
//! calling thread does nothing that allocates or takes a lock: it blocks every signal for
//! the length of the call (the symbols do, first thing: a handler never runs on a thread
//! while it is inside pagemig, and a signal that arrives meanwhile is delivered when the
//! call returns, as the kernel delivers one that arrives during a system call), puts its
//! raw arguments in [`SLOT`], and waits on a futex. pagemig's worker thread,
//! `pagemig-preload`, serves the call (its locks are its own) and hands back the answer;
//! the calling thread sets `errno` and returns. Its allocations go through the program's
//! allocator: where that shares a lock with the interrupted code (an arena both threads
//! use, an allocator's process-wide lock), the worker waits on it, and so the caller; see
//! the crate's documentation.
//!
//! # The slot
//! One call at a time; [`SLOT`]'s state word is the futex every party waits on:
//! `FREE` → a caller claims it (`CLAIMED`), writes the call, posts it (`POSTED`) → the
//! worker takes it, serves it, writes the answer (`DONE`) → the caller takes the answer and
//! frees the slot (`FREE`). Each transition wakes every waiter; each waiter checks again.
//! Atomics and `futex(2)` only: async-signal-safe.
//!
//! # Starting the worker
//! The first call the library serves in a process starts the worker (a process that never
//! migrates has no such thread, as it has no engine: no thread is started before `main`,
//! where it would break a program that must stay single-threaded, to `unshare` a user
//! namespace say); a forked child starts its own, and its slot starts free (the
//! `pthread_atfork` child handler). The worker's stack is mapped by the library where none
//! of the starting call's pages lies ([`map_stack`]): the program may just have unmapped
//! them. Starting a thread allocates (glibc's `pthread_create`): the one call of a process
//! that starts the worker is the one that is not async-signal-safe, as is opening the
//! engine.
#![expect(unsafe_code, reason = "futex(2) and the slot the calling thread and the worker share")]

use std::cell::{Cell, UnsafeCell};
use std::ffi::c_long;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, Ordering};

use pagemig::Errno;
use pagemig::ffi;

/// A call the worker serves: the caller's raw arguments.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Call {
    /// `move_pages(0, count, pages, nodes, status, flags)` for the calling process.
    MovePages {
        count: std::ffi::c_ulong,
        pages: *mut *mut std::ffi::c_void,
        nodes: *const std::ffi::c_int,
        status: *mut std::ffi::c_int,
        flags: std::ffi::c_int,
    },
    /// `mbind(2)`.
    Mbind(crate::mbind::Args),
    /// `migrate_pages(2)` of the calling process.
    MigratePages(crate::migrate::Args),
}

impl Call {
    /// Serves the call, on the worker.
    fn serve(self) -> Result<c_long, Errno> {
        match self {
            Call::MovePages { count, pages, nodes, status, flags } => {
                crate::symbols::serve_move_pages(count, pages, nodes, status, flags)
            }
            Call::Mbind(args) => crate::mbind::mbind(args),
            Call::MigratePages(args) => crate::migrate::migrate_pages(args),
        }
    }

    /// The kernel's answer to the call, whole (after a panic of pagemig's).
    fn kernel(self) -> Result<c_long, Errno> {
        match self {
            // SAFETY: the caller's arguments as they came; the kernel checks them.
            Call::MovePages { count, pages, nodes, status, flags } => unsafe {
                ffi::kernel_move_pages(0, count, pages, nodes, status, flags)
            },
            Call::Mbind(args) => args.kernel(args.flags),
            Call::MigratePages(args) => args.kernel(),
        }
    }
}

const FREE: u32 = 0;
const CLAIMED: u32 = 1;
const POSTED: u32 = 2;
const DONE: u32 = 3;

/// The call being served and its answer.
struct Slot {
    state: AtomicU32,
    call: UnsafeCell<Option<Call>>,
    answer: UnsafeCell<Option<Result<c_long, Errno>>>,
}

// SAFETY: `call` and `answer` are touched only by the party the state names: the claiming
// caller between `CLAIMED` and `POSTED` and after `DONE`, the worker between `POSTED` and
// `DONE` (release stores and acquire loads of `state` order the accesses). The raw pointers
// of a call are the caller's, used by the worker while the caller waits.
unsafe impl Sync for Slot {}

static SLOT: Slot = Slot { state: AtomicU32::new(FREE), call: UnsafeCell::new(None), answer: UnsafeCell::new(None) };

/// The process whose worker runs, and the process that is starting one.
static WORKER_PID: AtomicU32 = AtomicU32::new(0);
static STARTING_PID: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// Whether this thread is the worker (a call it made itself would wait on itself).
    static IS_WORKER: Cell<bool> = const { Cell::new(false) };
}

fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: `word` is a live atomic of ours; a private futex wait returns at once when
    // the word is no longer `expected`, on a wake, or on a spurious wakeup (the callers
    // check again).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: as above; waking waiters has no other effect.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, i32::MAX) };
}

/// Whether pagemig may serve a call now: room under the address-space limits
/// ([`ffi::headroom`]) and, while this process's worker is not started yet, under
/// `vm.max_map_count` ([`ffi::START_MAPPINGS`], [`ffi::map_slack`]; probed only then: a
/// running engine's small calls make no mapping they cannot do without).
pub(crate) fn room() -> bool {
    ffi::headroom() && (WORKER_PID.load(Ordering::Acquire) == pid() || ffi::map_slack(ffi::START_MAPPINGS))
}

fn pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// Serves `call` on the worker and returns its answer; `None` when no worker could be
/// started (no thread: the caller hands the call to the kernel).
///
/// The calling thread must have every signal blocked (the symbols do): a handler that
/// interrupted it here and called in again would wait on the slot it holds.
pub(crate) fn run(call: Call) -> Option<Result<c_long, Errno>> {
    if IS_WORKER.with(Cell::get) {
        return Some(call.serve());
    }
    let named = match call {
        Call::MovePages { count, pages, .. } => Some((count, pages.cast_const())),
        Call::Mbind(_) | Call::MigratePages(_) => None,
    };
    if !started(named) {
        return None;
    }
    loop {
        match SLOT.state.compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => break,
            Err(now) => futex_wait(&SLOT.state, now),
        }
    }
    // SAFETY: the slot is claimed: nobody else touches its cells until it is posted.
    unsafe { *SLOT.call.get() = Some(call) };
    SLOT.state.store(POSTED, Ordering::Release);
    futex_wake_all(&SLOT.state);
    loop {
        let now = SLOT.state.load(Ordering::Acquire);
        if now == DONE {
            break;
        }
        futex_wait(&SLOT.state, now);
    }
    // SAFETY: `DONE`: the worker is finished with the cells until the slot is posted again.
    let answer = unsafe { (*SLOT.answer.get()).take() };
    SLOT.state.store(FREE, Ordering::Release);
    futex_wake_all(&SLOT.state);
    Some(answer.unwrap_or(Err(Errno::CANCELED)))
}

/// Starts this process's worker unless it runs; whether it runs. `named` is the page array
/// of the call that starts it, whose pages its stack must not take (see [`map_stack`]).
fn started(named: Option<(std::ffi::c_ulong, *const *mut std::ffi::c_void)>) -> bool {
    let me = pid();
    loop {
        if WORKER_PID.load(Ordering::Acquire) == me {
            return true;
        }
        let starting = STARTING_PID.load(Ordering::Acquire);
        if starting == me {
            // Another thread of this process is starting it.
            std::hint::spin_loop();
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
            continue;
        }
        if STARTING_PID.compare_exchange(starting, me, Ordering::AcqRel, Ordering::Acquire).is_err() {
            continue;
        }
        let spawned = spawn_worker(named);
        if spawned {
            WORKER_PID.store(me, Ordering::Release);
        }
        STARTING_PID.store(0, Ordering::Release);
        return spawned;
    }
}

/// The worker's stack: as large as glibc's default, below an inaccessible guard page.
const STACK: usize = 8 << 20;
/// The guard page below the stack.
const GUARD: usize = 4096;
/// Stacks mapped and refused at most before the worker is started on the last one.
const STACK_TRIES: usize = 4;

/// Maps a stack for the worker (guard page and stack) where none of the pages `named`
/// lies: a call's first call starts the worker, and a new mapping goes where the kernel
/// finds room, which may be exactly the memory the program has just unmapped and now asks
/// about (the kernel would answer `-EFAULT` for it; pagemig, finding its own stack there,
/// something else). A mapping that holds a named page is kept while the next is mapped
/// (so that the next goes elsewhere) and given back after. Raw system calls only: the page
/// array is read with `process_vm_readv` into a buffer on this stack.
fn map_stack(named: Option<(std::ffi::c_ulong, *const *mut std::ffi::c_void)>) -> Option<usize> {
    let mut refused = [0usize; STACK_TRIES];
    let mut chosen = None;
    for slot in &mut refused {
        // SAFETY: a fresh private anonymous mapping of ours; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUARD + STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            break;
        }
        let base = base as usize;
        if named.is_some_and(|(count, pages)| names_any(count, pages, base, base + GUARD + STACK)) {
            *slot = base;
            continue;
        }
        chosen = Some(base);
        break;
    }
    for &base in refused.iter().filter(|&&b| b != 0) {
        // SAFETY: a mapping of ours, mapped above and never used.
        unsafe { libc::munmap(base as *mut libc::c_void, GUARD + STACK) };
    }
    let base = chosen?;
    // SAFETY: the first page of our own mapping becomes the guard.
    unsafe { libc::mprotect(base as *mut libc::c_void, GUARD, libc::PROT_NONE) };
    Some(base)
}

/// Whether any of the `count` pages of the array at `pages` lies in `[start, end)`, as far
/// as the array can be read (the kernel stops where it cannot read it too).
fn names_any(count: std::ffi::c_ulong, pages: *const *mut std::ffi::c_void, start: usize, end: usize) -> bool {
    const AT_ONCE: usize = 64;
    let mut buf = [0usize; AT_ONCE];
    let mut done: std::ffi::c_ulong = 0;
    while done < count {
        let n = (count - done).min(AT_ONCE as std::ffi::c_ulong) as usize;
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: n * size_of::<usize>() };
        let remote = libc::iovec {
            iov_base: pages.wrapping_add(done as usize) as *mut libc::c_void,
            iov_len: n * size_of::<usize>(),
        };
        // SAFETY: reads this process's own memory into our buffer, which holds `n` words;
        // an unreadable array is an error, not a fault.
        let read = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if read <= 0 {
            return false;
        }
        let got = read as usize / size_of::<usize>();
        if buf[..got].iter().any(|&a| (start..end).contains(&a)) {
            return true;
        }
        if got < n {
            return false;
        }
        done += n as std::ffi::c_ulong;
    }
    false
}

/// Starts the worker on a stack of [`map_stack`]'s, detached, with every signal blocked
/// (the calling thread has them blocked, and the worker inherits its mask); whether it
/// started.
fn spawn_worker(named: Option<(std::ffi::c_ulong, *const *mut std::ffi::c_void)>) -> bool {
    extern "C" fn worker(_: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: names this thread; the name is NUL-terminated and within 16 bytes.
        unsafe { libc::pthread_setname_np(libc::pthread_self(), c"pagemig-preload".as_ptr()) };
        let _ = catch_unwind(serve);
        std::ptr::null_mut()
    }
    let Some(base) = map_stack(named) else { return false };
    // SAFETY: `attr` is initialised before use and destroyed after; the stack is ours,
    // mapped above, and stays mapped for the life of the process (the worker never ends).
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_attr_init(&mut attr) != 0 {
            libc::munmap(base as *mut libc::c_void, GUARD + STACK);
            return false;
        }
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        libc::pthread_attr_setstack(&mut attr, (base + GUARD) as *mut libc::c_void, STACK);
        let mut thread: libc::pthread_t = std::mem::zeroed();
        let created = libc::pthread_create(&mut thread, &attr, worker, std::ptr::null_mut()) == 0;
        libc::pthread_attr_destroy(&mut attr);
        if !created {
            libc::munmap(base as *mut libc::c_void, GUARD + STACK);
        }
        created
    }
}

/// The worker: serves each call posted, for the life of the process.
fn serve() {
    IS_WORKER.with(|w| w.set(true));
    loop {
        let now = SLOT.state.load(Ordering::Acquire);
        if now != POSTED {
            futex_wait(&SLOT.state, now);
            continue;
        }
        // SAFETY: `POSTED`: the caller wrote the call and waits for `DONE`.
        let call = unsafe { (*SLOT.call.get()).take() };
        let answer = call.map(|call| catch_unwind(AssertUnwindSafe(|| call.serve())).unwrap_or_else(|_| call.kernel()));
        // SAFETY: as above, until `DONE` is stored.
        unsafe { *SLOT.answer.get() = answer };
        SLOT.state.store(DONE, Ordering::Release);
        futex_wake_all(&SLOT.state);
    }
}

/// The `pthread_atfork` child handler: the child has no worker (its first call starts
/// one), and a slot its parent's threads held is free.
pub(crate) extern "C" fn forked() {
    // SAFETY: the child runs only the forking thread now: nobody else uses the cells.
    unsafe {
        *SLOT.call.get() = None;
        *SLOT.answer.get() = None;
    }
    SLOT.state.store(FREE, Ordering::Release);
    STARTING_PID.store(0, Ordering::Release);
}
