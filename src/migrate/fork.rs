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
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
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
