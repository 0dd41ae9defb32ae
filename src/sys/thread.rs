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
    Builder::new().name(name.into()).spawn(move || {
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
    Builder::new().name(name.into()).spawn_scoped(scope, move || {
        let _stack = crate::sys::own::ThreadStack::claim();
        f()
    })
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
