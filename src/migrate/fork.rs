//! A `fork()` barrier: a child never inherits a range in the instant it is empty.
//!
//! Replacing a range's pages leaves it empty for a while (its old pages moved out into a
//! graveyard before the copy, its new pages not yet in); the program's threads wait on
//! userfaultfd for that to pass, but `fork()` copies page tables as they are, and a child
//! forked then would see zeros there. Every emptied page is counted open with [`open`]
//! until it is filled again ([`close`]); a `pthread_atfork` handler, installed the first
//! time, makes `fork()` wait until none is open and keeps new ones from opening until the
//! child exists.
//!
//! The gate is two counters, not a lock, so that the child (one thread, inheriting the
//! counters as they were) can reopen it without meeting a lock held by threads it does not
//! have. A page stays empty for the copy of one piece of a batch; `fork()` waits about
//! that long.
//!
//! Only forks that run the `pthread_atfork` handlers wait: glibc's `fork()`, and
//! `std::process::Command` where it forks. A raw `clone`/`fork` system call bypasses them
//! (see the README's Limits). `vfork()` and `posix_spawn()` share the parent's memory or
//! copy nothing before `exec`, and need no barrier.
#![allow(unsafe_code, reason = "installs the pthread_atfork handlers")]

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Pages empty now.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// Threads in `fork()` now, between the prepare handler and the parent's or child's.
static FORKING: AtomicUsize = AtomicUsize::new(0);

/// Installs the `pthread_atfork` handlers, once per process.
pub(super) fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: the handlers are plain functions that touch only the two atomics above,
        // which live for the whole process.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(in_child)) };
        // Without the handlers forks do not wait; `pthread_atfork` fails only on ENOMEM.
        debug_assert_eq!(rc, 0, "pthread_atfork");
    });
}

/// Counts `pages` empty from now on, first waiting for any `fork()` in progress to
/// finish. Must not be called with a lock held that [`close`]'s callers need.
pub(super) fn open(pages: usize) {
    loop {
        while FORKING.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        OPEN.fetch_add(pages, Ordering::SeqCst);
        if FORKING.load(Ordering::SeqCst) == 0 {
            return;
        }
        // A fork began meanwhile: let it go first.
        OPEN.fetch_sub(pages, Ordering::SeqCst);
    }
}

/// `pages` counted by [`open`] are filled again (or will never be).
pub(super) fn close(pages: usize) {
    OPEN.fetch_sub(pages, Ordering::SeqCst);
}

extern "C" fn prepare() {
    FORKING.fetch_add(1, Ordering::SeqCst);
    while OPEN.load(Ordering::SeqCst) > 0 {
        std::thread::yield_now();
    }
}

extern "C" fn after() {
    FORKING.fetch_sub(1, Ordering::SeqCst);
}

/// The child's handler: it has one thread, forking nothing, and no page of it is empty
/// (the parent's forks waited for none to be). The counters it inherited may count other
/// threads' forks in the parent (two threads forking at once), which never end here.
extern "C" fn in_child() {
    FORKING.store(0, Ordering::SeqCst);
    OPEN.store(0, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child forked while another thread of its parent was forking too inherits a count
    /// of two forks in progress, of which only its own ends in it: it must still be able to
    /// empty pages (migrate) rather than wait forever.
    #[test]
    fn a_child_forked_beside_another_fork_can_migrate() {
        install();
        // Another thread's fork in progress, as its prepare handler left the counters.
        prepare();
        // SAFETY: the child touches only the two atomics and calls `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            open(1);
            close(1);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        after();
        let started = std::time::Instant::now();
        let mut status = 0;
        // SAFETY: waits (without blocking) for our own child.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            if started.elapsed() > Duration::from_secs(20) {
                // SAFETY: our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("the child waited for a fork of its parent's that never ends in it");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
    }
}
