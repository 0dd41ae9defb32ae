//! The threads pagemig starts, each with every signal blocked, and its stack claimed as
//! pagemig's own while it runs ([`crate::sys::own::ThreadStack`]: no in-process migration
//! protects it against the thread).
//!
//! A signal sent to the process (`kill(2)`, a timer's `SIGALRM`, a terminal's `SIGINT`)
//! goes to any one of its threads that does not block it. A program that blocks a signal
//! in every thread of its own (to take it with `sigwait`, or to keep its handler off
//! threads that hold locks) must not find that handler running on a thread of pagemig's,
//! nor the signal consumed there. pagemig handles no signal itself, so its threads block
//! them all: they are started from [`spawn`] (or [`spawn_scoped`]), which blocks every
//! signal in the spawning thread for the instant of `pthread_create` (a new thread inherits
//! its creator's mask) and restores the caller's mask right after, so nothing of the
//! caller's signal handling changes.
//!
//! glibc keeps the two signals it uses itself (`SIGCANCEL` for `pthread_cancel`,
//! `SIGSETXID` for `setuid` and friends across threads) out of any mask a program sets, so
//! those still work on pagemig's threads. A fault of a pagemig thread's own (a machine
//! check while copying a poisoned page) is not a signal the program could make sense of on
//! a thread it does not know: with the signal blocked, the kernel ends the process with the
//! signal's default action.
//!
//! # References
//! [`pthread_sigmask(3)`](https://man7.org/linux/man-pages/man3/pthread_sigmask.3.html),
//! [`signal(7)`](https://man7.org/linux/man-pages/man7/signal.7.html) ("Signal mask and
//! pending signals").

use std::io;
use std::thread::{Builder, JoinHandle, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crate::lock::{Condvar, Mutex, MutexGuard};

/// Every signal blocked on the calling thread for as long as it lives; the thread's mask
/// as it was is restored when it is dropped.
///
/// Signals that arrive meanwhile stay pending and are delivered once the mask is restored,
/// as the kernel delivers a signal that arrives during a system call when the call
/// returns.
#[derive(Debug)]
#[must_use = "the signals are unblocked again when this is dropped"]
pub struct SignalsBlocked {
    old: libc::sigset_t,
    /// Not `Send`: the mask is the creating thread's.
    _thread: std::marker::PhantomData<*const ()>,
}

impl SignalsBlocked {
    /// Blocks every signal on the calling thread (`pthread_sigmask(SIG_BLOCK)` with a full
    /// set). Async-signal-safe: two system calls, nothing allocated.
    pub fn new() -> Self {
        Self::all_but(&[])
    }

    /// Blocks every signal on the calling thread but those its own faults raise
    /// (`SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGTRAP`, `SIGSYS`): a blocked fault signal
    /// ends the process without its handler (Rust's report of a stack overflow, say), so
    /// those stay as the program set them. Async-signal-safe, as [`SignalsBlocked::new`].
    pub fn asynchronous() -> Self {
        Self::all_but(&FAULT_SIGNALS)
    }

    /// Adds every signal but `kept` to the calling thread's mask.
    fn all_but(kept: &[libc::c_int]) -> Self {
        // SAFETY: `sigset_t` is plain data; an all-zero one is a valid (empty) set, filled
        // by `sigfillset` and overwritten by `pthread_sigmask` below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both sets are ours and valid for the calls; `sigfillset`, `sigdelset` (of
        // signals that exist) and `pthread_sigmask` fail only for bad arguments (EINVAL),
        // which these are not.
        unsafe {
            libc::sigfillset(&mut set);
            for &signal in kept {
                libc::sigdelset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        }
        Self { old, _thread: std::marker::PhantomData }
    }
}

/// The signals a thread's own faults raise.
const FAULT_SIGNALS: [libc::c_int; 6] =
    [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP, libc::SIGSYS];

impl Default for SignalsBlocked {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: the mask saved by `new` on this same thread (the guard is not `Send`).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Starts a thread named `name` running `f`, with every signal blocked
/// (`std::thread::Builder::spawn`); the calling thread's mask is left as it was.
///
/// # Errors
/// As `std::thread::Builder::spawn`: the thread could not be started (`EAGAIN`).
pub fn spawn<F, T>(name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let _blocked = SignalsBlocked::new();
    let starting = Starting::new();
    Builder::new().name(name.into()).spawn(move || {
        let _exit = starting.started();
        let _stack = crate::sys::own::ThreadStack::claim();
        f()
    })
}

/// As [`spawn`], for a thread of `scope` (`std::thread::Builder::spawn_scoped`).
///
/// # Errors
/// As [`spawn`].
pub fn spawn_scoped<'scope, 'env, F, T>(
    scope: &'scope Scope<'scope, 'env>,
    name: impl Into<String>,
    f: F,
) -> io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    let _blocked = SignalsBlocked::new();
    let starting = Starting::new();
    Builder::new().name(name.into()).spawn_scoped(scope, move || {
        let _exit = starting.started();
        let _stack = crate::sys::own::ThreadStack::claim();
        f()
    })
}

/// Threads of pagemig's between their creation and the start of their work, or between
/// the end of their work and their end, and whether a `fork()` is being prepared.
///
/// `std` starts and ends each of its threads under one process-wide lock of its own (its
/// table of thread stacks' guard pages, for its stack-overflow report): a `fork()` made
/// while a thread of the process held it gives a child that finds it held for ever, and
/// every thread the child starts then waits for good before its first instruction (a child
/// forked while its parent migrated hung making its engine: its vault thread never began,
/// `fork_child::children_forked_while_the_parent_migrates_migrate_with_their_own_engines`,
/// about 1 run in 20 on a 2-core VM). pagemig starts and ends threads at every call (its
/// mover, copy helper, progress reporter), so a program that forks while it migrates met
/// that often. A `fork()`'s prepare handler ([`hold_at_fork`]) now waits until no thread of
/// pagemig's is starting or ending, and none starts or ends until the child exists. It does
/// so last, holding pagemig's process-wide locks already: a thread held from ending may be
/// one that another, holding such a lock, waits to join (mtcopy's workers are joined
/// under the lock the fork takes for them), and the fork then takes none after it.
#[derive(Debug, Default)]
struct Gate {
    /// How many `fork()`s are being prepared (two may be at once): no thread of pagemig's
    /// starts or ends meanwhile.
    forking: u32,
    /// Threads created and not yet at their work.
    starting: usize,
    /// Thread ids of threads whose work is done and which may not have ended yet, with
    /// when: one listed for longer than [`ENDING_FOR`] has ended (its id may be another
    /// thread's since).
    ending: Vec<(libc::pid_t, Instant)>,
}

static GATE: Mutex<Gate> = Mutex::new(Gate { forking: 0, starting: 0, ending: Vec::new() });
static GATE_CHANGED: Condvar = Condvar::new();

/// How long a `fork()`'s prepare handler waits for pagemig's threads to be done starting
/// or ending: far longer than either takes (microseconds), and a bound should a thread be
/// held there (the fork then goes on as it did before).
const GATE_WAIT: Duration = Duration::from_secs(2);

/// How long a thread whose work is done counts as ending at most: its end takes
/// microseconds; past this it has ended, and its id may have been given to another thread.
const ENDING_FOR: Duration = Duration::from_secs(1);

/// Waits while a `fork()` is being prepared.
fn open_gate() -> MutexGuard<'static, Gate> {
    let mut gate = GATE.lock();
    while gate.forking > 0 {
        GATE_CHANGED.wait(&mut gate);
    }
    gate
}

/// A thread being started, counted from before its creation ([`Starting::new`]) until it
/// is at its work ([`Starting::started`]).
struct Starting {
    counted: bool,
}

impl Starting {
    /// Counts a thread about to be created, once no `fork()` is being prepared.
    fn new() -> Self {
        hold_at_fork();
        open_gate().starting += 1;
        Self { counted: true }
    }

    /// On the new thread, before its work: counted started; the returned guard counts it
    /// ending once its work is done (returned or unwound).
    fn started(mut self) -> Ending {
        self.uncount();
        Ending
    }

    fn uncount(&mut self) {
        // The prepare step looks again every 50 us: nothing to wake.
        if std::mem::take(&mut self.counted) {
            GATE.lock().starting -= 1;
        }
    }
}

impl Drop for Starting {
    /// The thread could not be created (or never ran its closure).
    fn drop(&mut self) {
        self.uncount();
    }
}

/// Dropped when a thread's work is done: the thread waits while a `fork()` is being
/// prepared, then counts itself ending until its id is gone.
struct Ending;

impl Drop for Ending {
    fn drop(&mut self) {
        // SAFETY: `gettid` takes no arguments.
        let tid = unsafe { libc::gettid() };
        let mut gate = open_gate();
        let now = Instant::now();
        gate.ending.retain(|&(_, since)| now.duration_since(since) < ENDING_FOR);
        gate.ending.push((tid, now));
    }
}

/// Whether the thread `tid` of process `pid`, listed ending `since`, may not have ended.
fn alive(pid: libc::pid_t, tid: libc::pid_t, since: Instant) -> bool {
    if since.elapsed() >= ENDING_FOR {
        return false;
    }
    // SAFETY: signal 0 only checks that the thread exists; nothing is sent.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, 0) };
    rc == 0 || crate::sys::last_errno() != crate::sys::Errno::SRCH
}

/// Makes every `fork()` from now on wait until no thread of pagemig's is starting or ending,
/// and keep them from it until the child exists ([`Gate`]).
/// Made at every start (a store, once the handlers are installed): a `Once` here, caught
/// running by a fork, would leave the child's first thread waiting for it for good.
fn hold_at_fork() {
    static STEP: crate::process::AtFork =
        crate::process::AtFork { prepare: prepare_fork, parent: crate::process::nothing, child: after_fork_in_child };
    crate::process::at_fork(crate::process::ForkRank::Threads, &STEP);
}

/// A `fork()`'s prepare step, the last: closes the gate, waits (up to [`GATE_WAIT`]) until
/// no thread of pagemig's is starting or ending, and holds the gate's lock across the fork
/// (dropped in the parent and the child, which reopens the gate). A thread counted here is
/// inside `std` (its start before its work, or its end after it), which takes none of
/// pagemig's locks: none waits for the locks the fork holds.
fn prepare_fork(held: &mut Vec<Box<dyn std::any::Any>>) {
    let deadline = Instant::now() + GATE_WAIT;
    // SAFETY: `getpid` takes no arguments.
    let pid = unsafe { libc::getpid() };
    let mut gate = GATE.lock();
    gate.forking += 1;
    loop {
        gate.ending.retain(|&(tid, since)| alive(pid, tid, since));
        if (gate.starting == 0 && gate.ending.is_empty()) || Instant::now() >= deadline {
            break;
        }
        MutexGuard::unlocked(&mut gate, || std::thread::sleep(Duration::from_micros(50)));
    }
    held.push(Box::new(Reopen(gate)));
}

/// The gate's lock held across a `fork()`: reopens the gate when dropped.
struct Reopen(MutexGuard<'static, Gate>);

impl Drop for Reopen {
    fn drop(&mut self) {
        self.0.forking -= 1;
        GATE_CHANGED.notify_all();
    }
}

/// In the child: the threads the parent was starting or ending are not there, nor another
/// fork the parent was preparing meanwhile.
fn after_fork_in_child() {
    let mut gate = GATE.lock();
    gate.forking = 0;
    gate.starting = 0;
    gate.ending.clear();
}

#[cfg(test)]
/// The calling thread's signal mask.
pub fn current_mask() -> libc::sigset_t {
    // SAFETY: `sigset_t` is plain data, overwritten by `pthread_sigmask`.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a NULL new set only reads the mask into ours.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
    mask
}

#[cfg(test)]
/// Whether `signal` is in `set`.
pub fn contains(set: &libc::sigset_t, signal: libc::c_int) -> bool {
    // SAFETY: `set` is a valid set; `sigismember` only reads it.
    unsafe { libc::sigismember(set, signal) == 1 }
}

#[cfg(test)]
mod tests {
    use crate::testing::watchdog;
    use super::*;

    #[test]
    fn a_spawned_thread_blocks_every_signal_and_the_caller_keeps_its_mask() {
        watchdog(60, || {
        let before = current_mask();
        let inside = spawn("pagemig-test", current_mask).unwrap().join().unwrap();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGALRM, libc::SIGCHLD, libc::SIGRTMIN() + 2] {
            assert!(contains(&inside, sig), "signal {sig} not blocked on a pagemig thread");
            assert_eq!(contains(&current_mask(), sig), contains(&before, sig), "the caller's mask changed");
        }
        let scoped = std::thread::scope(|s| spawn_scoped(s, "pagemig-test", current_mask).unwrap().join().unwrap());
        assert!(contains(&scoped, libc::SIGUSR2));
        });
    }

    #[test]
    fn blocking_is_undone_on_drop() {
        watchdog(60, || {
        let before = contains(&current_mask(), libc::SIGUSR2);
        {
            let _blocked = SignalsBlocked::new();
            assert!(contains(&current_mask(), libc::SIGUSR2));
        }
        assert_eq!(contains(&current_mask(), libc::SIGUSR2), before);
        });
    }
}
