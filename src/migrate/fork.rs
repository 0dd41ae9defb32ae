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
//! The gate is one atomic word, not a lock, so that the child (one thread, inheriting the
//! word as it was) can reopen it without meeting a lock held by threads it does not have.
//! A page stays empty for the copy of one piece of a batch; `fork()` waits about that
//! long. A thread that has emptied pages and empties more while a fork waits goes on (the
//! fork waits for its pages anyway, and they may wait for this very thread's copy); the
//! fork seals the gate once no page is empty, and from then until it ends nothing is
//! emptied.
//!
//! The same `fork()` then takes every process-wide lock of pagemig's and lets them go in
//! the parent and in the child (`process::at_fork`, pagemig's one set of handlers). Per-call and per-engine state (the claims, the pool) is never used by a
//! child, which opens an engine of its own, nor is `own`'s set, made again per process.
//!
//! Only forks that run the `pthread_atfork` handlers wait: glibc's `fork()`, and
//! `std::process::Command` where it forks. A raw `clone`/`fork` system call bypasses them
//! (see the README's Limits). `vfork()` and `posix_spawn()` share the parent's memory or
//! copy nothing before `exec`, and need no barrier.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The gate, one word: pages empty now ([`PAGES`]), forks in progress ([`FORKS`]), and
/// [`SEALED`]: a fork in progress saw no page empty, and none may be emptied until every
/// fork in progress has ended.
static STATE: AtomicU64 = AtomicU64::new(0);
/// The bits of [`STATE`] that count empty pages.
const PAGES: u64 = (1 << 48) - 1;
/// One fork in progress, in [`STATE`].
const FORK: u64 = 1 << 48;
/// The bits of [`STATE`] that count forks in progress.
const FORKS: u64 = ((1 << 15) - 1) << 48;
/// Set in [`STATE`] by a fork's prepare handler once no page is empty.
const SEALED: u64 = 1 << 63;

thread_local! {
    /// Whether this thread has emptied pages in the batch it runs now ([`Batch`]): those
    /// may wait for this thread's own copies to fill, so its next pages must not wait for a
    /// fork that waits for them.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// Counts `pages` empty from now on.
///
/// A thread that empties no page yet in its batch first waits for any `fork()` in
/// progress to end. One that does (its earlier pages may wait for its own copy to fill)
/// goes on while the fork still waits for pages to fill: the fork waits for these too,
/// and waiting here would wait for itself. Once a fork has seen no page empty (sealed),
/// every thread waits: none holds an empty page then, so none waits for itself.
pub(super) fn open(pages: usize) -> Empty {
    let holding = HOLDING.with(Cell::get);
    let mut backoff = crate::backoff::Backoff::kernel();
    loop {
        let s = STATE.load(Ordering::SeqCst);
        let forking = s & FORKS != 0;
        if s & SEALED != 0 || (forking && (!holding || s & PAGES == 0)) {
            backoff.pause();
            continue;
        }
        if STATE.compare_exchange(s, s + pages as u64, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            HOLDING.with(|h| h.set(true));
            return Empty(pages);
        }
    }
}

/// `pages` counted by [`open`] are filled again (or will never be).
fn close(pages: usize) {
    STATE.fetch_sub(pages as u64, Ordering::SeqCst);
}

/// Pages counted empty for the barrier ([`open`]): closed as they are filled
/// ([`Empty::close`]) and the rest when dropped, so that every page counted is closed once.
/// The claims hold the count of the pages isolated in them (`busy::Claims::add_isolated`
/// takes an `Empty`, `take_isolated` gives one back), and the event reader that of the old
/// pages it is bringing home.
#[must_use = "dropping it closes its pages at once"]
#[derive(Debug)]
pub(super) struct Empty(usize);

impl Empty {
    /// No pages.
    pub const fn none() -> Self {
        Empty(0)
    }

    /// How many pages it counts.
    pub fn pages(&self) -> usize {
        self.0
    }

    /// `n` of its pages (at most all) as a count of their own.
    pub fn split(&mut self, n: usize) -> Empty {
        let n = n.min(self.0);
        self.0 -= n;
        Empty(n)
    }

    /// Closes `n` of its pages (at most all) now: they are filled.
    pub fn close(&mut self, n: usize) {
        drop(self.split(n));
    }

    /// Adds the pages of `other`.
    pub fn merge(&mut self, other: Empty) {
        self.0 += std::mem::ManuallyDrop::new(other).0;
    }

    /// Hands the count to the claims' bookkeeping, which gives it back with
    /// [`Empty::from_claims`].
    pub fn into_claims(self) -> usize {
        std::mem::ManuallyDrop::new(self).0
    }

    /// A count the claims kept ([`Empty::into_claims`]).
    pub fn from_claims(pages: usize) -> Empty {
        Empty(pages)
    }
}

impl Default for Empty {
    fn default() -> Self {
        Empty::none()
    }
}

impl Drop for Empty {
    fn drop(&mut self) {
        close(self.0);
    }
}

/// A batch run on this thread: the pages it empties are its own to fill ([`open`]). Ends
/// when dropped.
pub(super) struct Batch(());

impl Batch {
    /// Starts a batch on this thread.
    pub(super) fn start() -> Self {
        HOLDING.with(|h| h.set(false));
        Batch(())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        HOLDING.with(|h| h.set(false));
    }
}

/// What the barrier does at a `fork()` (registered with [`install`]).
static STEP: crate::process::AtFork = crate::process::AtFork { prepare: |_| barrier(), parent: after, child: in_child };

/// Makes every `fork()` from now on wait at the barrier.
pub(super) fn install() {
    crate::process::at_fork(crate::process::ForkRank::Barrier, &STEP);
}

/// The first `fork()` handler: counts this fork in progress and waits until no page is
/// empty, then seals the gate.
fn barrier() {
    STATE.fetch_add(FORK, Ordering::SeqCst);
    loop {
        let s = STATE.load(Ordering::SeqCst);
        // Sealed by another fork in progress: no page is empty, and none will be.
        if s & SEALED != 0 {
            break;
        }
        if s & PAGES == 0 && STATE.compare_exchange(s, s | SEALED, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            break;
        }
        std::thread::yield_now();
    }
}

/// The parent's handler once the child exists: the fork has ended.
fn after() {
    let _ = STATE.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
        let s = s - FORK;
        Some(if s & FORKS == 0 { s & !SEALED } else { s })
    });
}

/// The child's handler: it has one thread, forking nothing, and no page of it is empty
/// (the parent's forks waited for none to be). The gate it inherited may count other
/// threads' forks in the parent (two threads forking at once), which never end here.
fn in_child() {
    STATE.store(0, Ordering::SeqCst);
    HOLDING.with(|h| h.set(false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;
    use std::time::Duration;

    /// A thread that emptied pages in its batch and empties more while a fork waits for
    /// its first ones to fill goes on (it may be the one to fill them): before, both waited
    /// for each other for ever. A thread that holds nothing waits for the fork.
    #[test]
    fn a_thread_emptying_more_pages_while_a_fork_waits_does_not_wait_for_itself() {
        watchdog(60, || {
            install();
            let (tx, rx) = std::sync::mpsc::channel();
            let migrating = std::thread::spawn(move || {
                let batch = Batch::start();
                let first = open(1);
                let forking = std::thread::spawn(|| {
                    barrier();
                    after();
                });
                while STATE.load(Ordering::SeqCst) & FORKS == 0 {
                    std::thread::yield_now();
                }
                let second = open(1);
                let _ = tx.send(());
                drop((first, second));
                forking.join().unwrap();
                drop(batch);
            });
            assert!(
                rx.recv_timeout(Duration::from_secs(20)).is_ok(),
                "the second open waited for a fork that waits for the first"
            );
            migrating.join().unwrap();
        });
    }

    /// A child forked while another thread of its parent was forking too inherits a count
    /// of two forks in progress, of which only its own ends in it: it must still be able to
    /// empty pages (migrate) rather than wait forever.
    #[test]
    #[allow(unsafe_code, reason = "fork and _exit")]
    fn a_child_forked_beside_another_fork_can_migrate() {
        watchdog(60, || {
            install();
            // Another thread's fork in progress, past its barrier (it would take the locks next:
            // this thread's own fork then waits for them, so it is not taken here).
            barrier();
            // SAFETY: the child touches only the two atomics and calls `_exit`.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                drop(open(1));
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
            after();
            let hung = "the child waited for a fork of its parent's that never ends in it";
            assert_eq!(crate::process::wait_child(pid, Duration::from_secs(20), hung), 0);
        });
    }
}
