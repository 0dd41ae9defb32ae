//! pagemig's locks and condition variables: `std`'s, behind the interface the code was
//! written against (no poisoning, a guard that lets its lock go for a moment, waits given
//! a deadline), because they survive `fork()`.
//!
//! `parking_lot` keeps every thread that waits on any of its locks or condition variables
//! in one table of its own, shared by the whole process, each entry a pointer into the
//! waiting thread's thread-local storage. pagemig's threads wait most of their lives (the
//! vault, the reaper, a call's helpers), so a program that forks while it has an engine
//! hands its child a table full of entries for threads the child does not have; glibc
//! then gives their stacks, thread-local storage included, to the child's new threads.
//! A child that waits on any `parking_lot` lock whose entry shares a slot of the table
//! with a stale one (pagemig's own engine in the child, or any `parking_lot` user of the
//! program's) follows those pointers into reused memory: it crashed with `SIGSEGV` in
//! `parking_lot_core`, or waited for ever on a slot's lock, in one forked child of about
//! 40 in the two-node guest (`closing_every_descriptor_during_a_cross_node_migration_loses_no_write`,
//! `gdb` on the core), and in 34 of 40 children of a plain stress program (8 threads
//! waiting in the parent, 8 threads locking and waiting in each child).
//!
//! `std`'s lock and condition variable wait on a word of their own (`futex`) and record
//! no waiter anywhere else: a child inherits each as the words say, and a lock held at
//! the fork is dealt with as before (`process::at_fork`, `process::PerProcess`).
//!
//! A lock is never poisoned here: a panic of pagemig's own, or of caller code run under a
//! lock (none is), leaves the data as the panic left it, as `parking_lot`'s did, and the
//! code that holds these locks is written so that every state it leaves is consistent.

use std::ops::{Deref, DerefMut};
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

/// A mutual-exclusion lock ([`std::sync::Mutex`], never poisoned).
///
/// [`Mutex::try_lock_for`] waits in the kernel on a word of the lock's own (`futex`), which
/// each unlock bumps and wakes while a timed waiter is registered: the waiter sleeps until
/// the lock is let go or its time runs out, as with `parking_lot`, instead of trying again
/// and again (a waiter that woke every few microseconds to try took CPU time from the
/// program's threads: 512 MiB of 4 KiB folios, one writer, its longest wait for a CPU once
/// woken was 1075 µs against `parking_lot`'s 646, medians of 10 alternating runs; with
/// this wait 833 against 943, the same; 2-core AMD EPYC VM). Only a lock made with
/// [`Mutex::new_timed`] does that; every other unlock skips it (a fence and a load). A
/// [`Condvar`] wait that lets the lock go wakes no timed waiter: no timed lock is waited on
/// that way.
#[derive(Debug, Default)]
pub struct Mutex<T: ?Sized> {
    /// Made for timed waiters ([`Mutex::new_timed`]): its unlocks wake them.
    timed_waits: bool,
    /// Timed waiters registered now.
    timed: AtomicU32,
    /// Bumped by each unlock that has timed waiters to wake: the word they wait on.
    unlocks: AtomicU32,
    inner: std::sync::Mutex<T>,
}

/// The lock of a [`Mutex`], let go when dropped.
#[must_use = "the lock is let go at once if the guard is not kept"]
pub struct MutexGuard<'a, T: ?Sized> {
    mutex: &'a Mutex<T>,
    /// `None` only inside [`MutexGuard::unlocked`] and a [`Condvar`] wait.
    inner: Option<std::sync::MutexGuard<'a, T>>,
}

impl<T> Mutex<T> {
    /// A lock holding `value`.
    pub const fn new(value: T) -> Self {
        Self::made(value, false)
    }

    /// A lock holding `value` that [`Mutex::try_lock_for`] may wait on.
    pub const fn new_timed(value: T) -> Self {
        Self::made(value, true)
    }

    const fn made(value: T, timed_waits: bool) -> Self {
        Self { timed_waits, timed: AtomicU32::new(0), unlocks: AtomicU32::new(0), inner: std::sync::Mutex::new(value) }
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Takes the lock, waiting as long as it takes.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        MutexGuard { mutex: self, inner: Some(self.raw_lock()) }
    }

    /// Takes the lock if it is free now.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        let inner = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(MutexGuard { mutex: self, inner: Some(inner) })
    }

    /// Takes the lock if it comes free within `timeout`, waiting in the kernel until it is
    /// let go or the time runs out (see [`Mutex`]). For a lock made with
    /// [`Mutex::new_timed`]: another one's unlocks wake nobody, and the wait lasts its
    /// whole time.
    pub fn try_lock_for(&self, timeout: Duration) -> Option<MutexGuard<'_, T>> {
        debug_assert!(self.timed_waits, "try_lock_for on a lock not made with new_timed");
        // A deadline past what `Instant` holds: no deadline.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if let Some(g) = self.try_lock() {
                return Some(g);
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if now >= d => return None,
                Some(d) => Some(d - now),
                None => None,
            };
            self.timed.fetch_add(1, Ordering::SeqCst);
            // Pairs with the unlocker's fence (`wake_timed`): either it sees this waiter
            // registered, or the try below sees the lock let go.
            fence(Ordering::SeqCst);
            let seen = self.unlocks.load(Ordering::SeqCst);
            // Tried again once registered: an unlock before the registration woke nobody.
            let got = self.try_lock();
            if got.is_none() {
                futex(&self.unlocks, libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, seen, left);
            }
            self.timed.fetch_sub(1, Ordering::SeqCst);
            if got.is_some() {
                return got;
            }
        }
    }

    /// The data, the lock consumed.
    pub fn into_inner(self) -> T
    where
        T: Sized,
    {
        self.inner.into_inner().unwrap_or_else(PoisonError::into_inner)
    }

    fn raw_lock(&self) -> std::sync::MutexGuard<'_, T> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After the lock was let go: wakes the timed waiters, if any. The fence orders the
    /// unlock before the count's read, as a waiter's registration comes before its try.
    fn wake_timed(&self) {
        if !self.timed_waits {
            return;
        }
        fence(Ordering::SeqCst);
        if self.timed.load(Ordering::SeqCst) != 0 {
            self.unlocks.fetch_add(1, Ordering::SeqCst);
            futex(&self.unlocks, libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, i32::MAX as u32, None);
        }
    }
}

impl<'a, T: ?Sized> MutexGuard<'a, T> {
    /// Lets the lock go while `f` runs, then takes it again (also where `f` panics, as the
    /// panic goes on).
    pub fn unlocked<R>(guard: &mut Self, f: impl FnOnce() -> R) -> R {
        /// Takes the lock again on every way out of `f`.
        struct Relock<'g, 'a, T: ?Sized>(&'g mut MutexGuard<'a, T>);
        impl<T: ?Sized> Drop for Relock<'_, '_, T> {
            fn drop(&mut self) {
                self.0.inner = Some(self.0.mutex.raw_lock());
            }
        }
        drop(guard.inner.take());
        guard.mutex.wake_timed();
        let _relock = Relock(guard);
        f()
    }

    fn take(&mut self) -> std::sync::MutexGuard<'a, T> {
        self.inner.take().expect("a guard holds its lock outside `unlocked` and waits")
    }
}

impl<T: ?Sized> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        let held = self.inner.take();
        if held.is_some() {
            // Let go first, then the timed waiters woken.
            drop(held);
            self.mutex.wake_timed();
        }
    }
}

impl<T: ?Sized> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.inner.as_deref().expect("a guard holds its lock outside `unlocked` and waits")
    }
}

impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.inner.as_deref_mut().expect("a guard holds its lock outside `unlocked` and waits")
    }
}

impl<T: ?Sized + std::fmt::Debug> std::fmt::Debug for MutexGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.as_deref().fmt(f)
    }
}

/// A condition variable ([`std::sync::Condvar`]) waited on with a [`MutexGuard`].
#[derive(Debug, Default)]
pub struct Condvar(std::sync::Condvar);

/// Whether a timed wait ended because its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitTimeoutResult(bool);

impl WaitTimeoutResult {
    /// True where the wait ended because its time ran out (the condition may hold all the
    /// same: check it).
    #[allow(dead_code, reason = "asked only by the waits of some features")]
    pub fn timed_out(self) -> bool {
        self.0
    }
}

impl Condvar {
    /// A condition variable nobody waits on.
    pub const fn new() -> Self {
        Self(std::sync::Condvar::new())
    }

    /// Lets `guard`'s lock go and waits for a notification (or a spurious wake-up), then
    /// takes the lock again.
    pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
        let inner = self.0.wait(guard.take()).unwrap_or_else(PoisonError::into_inner);
        guard.inner = Some(inner);
    }

    /// As [`Condvar::wait`], until `deadline` at the latest.
    pub fn wait_until<T>(&self, guard: &mut MutexGuard<'_, T>, deadline: Instant) -> WaitTimeoutResult {
        self.wait_for(guard, deadline.saturating_duration_since(Instant::now()))
    }

    /// As [`Condvar::wait`], for `timeout` at the most.
    pub fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, timeout: Duration) -> WaitTimeoutResult {
        let (inner, result) = self.0.wait_timeout(guard.take(), timeout).unwrap_or_else(PoisonError::into_inner);
        guard.inner = Some(inner);
        WaitTimeoutResult(result.timed_out())
    }

    /// Wakes one waiting thread, if any.
    pub fn notify_one(&self) {
        self.0.notify_one();
    }

    /// Wakes every waiting thread.
    pub fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// `futex(2)` on `word`, private to the process: `FUTEX_WAIT` while it holds `value`, for
/// `timeout` at most, or `FUTEX_WAKE` of up to `value` waiters. Its answer is not needed:
/// a waiter tries the lock again whatever woke it.
#[allow(unsafe_code, reason = "the futex system call on a word of ours")]
fn futex(word: &AtomicU32, op: libc::c_int, value: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned 32-bit atomic of ours; the timespec, where given,
    // lives for the call; the kernel reads nothing else.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), op, value, ts_ptr) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;

    /// A lock let go inside `unlocked` is taken by another thread meanwhile, and taken
    /// back after, also where the closure panics.
    #[test]
    fn unlocked_lets_the_lock_go_and_takes_it_back() {
        watchdog(60, || {
            let m = Mutex::new(0u32);
            let mut g = m.lock();
            MutexGuard::unlocked(&mut g, || std::thread::scope(|s| s.spawn(|| *m.lock() += 1).join().unwrap()));
            assert_eq!(*g, 1);
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                MutexGuard::unlocked(&mut g, || panic!("inside"));
            }));
            assert!(caught.is_err());
            *g += 1;
            assert!(m.try_lock().is_none(), "held again after the panic");
            drop(g);
            assert_eq!(*m.lock(), 2);
        });
    }

    /// A panic under the lock does not poison it; a timed lock gives up on a held lock.
    #[test]
    fn no_poisoning_and_timed_tries() {
        watchdog(60, || {
            let m = Mutex::new_timed(5u32);
            let _ = std::panic::catch_unwind(|| {
                let _g = m.lock();
                panic!("under the lock");
            });
            assert_eq!(*m.lock(), 5);
            let g = m.lock();
            let t = Instant::now();
            std::thread::scope(|s| {
                assert!(s.spawn(|| m.try_lock_for(Duration::from_millis(20)).is_none()).join().unwrap())
            });
            assert!(t.elapsed() >= Duration::from_millis(20));
            drop(g);
            assert!(m.try_lock_for(Duration::from_millis(20)).is_some());
            // A timeout past what `Instant` holds waits without a deadline, not a panic.
            assert!(m.try_lock_for(Duration::MAX).is_some());
        });
    }

    /// A timed waiter takes the lock once it is let go (dropped, or let go inside
    /// `unlocked`), not when its (long) time runs out: the watchdog fails a waiter that
    /// sleeps on.
    #[test]
    fn a_timed_waiter_takes_the_lock_as_it_is_let_go() {
        watchdog(60, || {
            let m = Mutex::new_timed(0u32);
            for via_unlocked in [false, true] {
                let mut g = m.lock();
                std::thread::scope(|s| {
                    let waiter = s.spawn(|| {
                        let mut got = m.try_lock_for(Duration::from_secs(600)).expect("the lock, let go");
                        *got += 1;
                    });
                    std::thread::sleep(Duration::from_millis(20));
                    if via_unlocked {
                        MutexGuard::unlocked(&mut g, || waiter.join().unwrap());
                    } else {
                        drop(g);
                        waiter.join().unwrap();
                    }
                });
            }
            assert_eq!(*m.lock(), 2);
        });
    }

    /// Waits end with a notification or when their time runs out.
    #[test]
    fn waits_end_on_notification_or_deadline() {
        watchdog(60, || {
            let (m, cv) = (Mutex::new(false), Condvar::new());
            let mut g = m.lock();
            assert!(cv.wait_for(&mut g, Duration::from_millis(5)).timed_out());
            assert!(cv.wait_until(&mut g, Instant::now()).timed_out());
            std::thread::scope(|s| {
                s.spawn(|| {
                    *m.lock() = true;
                    cv.notify_all();
                });
                while !*g {
                    cv.wait(&mut g);
                }
            });
            assert!(*g);
        });
    }

    /// The reason for this module: a child forked while threads of the parent wait on
    /// these locks and condition variables locks and waits on its own without crashing or
    /// hanging (with `parking_lot`, 34 children of 40 died of `SIGSEGV` in this shape).
    #[test]
    #[allow(unsafe_code, reason = "fork, waitpid, kill, _exit")]
    fn children_forked_while_threads_wait_lock_and_wait_safely() {
        watchdog(120, || {
            let parked: Vec<_> = (0..8)
                .map(|_| {
                    let pair: &'static (Mutex<bool>, Condvar) =
                        Box::leak(Box::new((Mutex::new(false), Condvar::new())));
                    let handle = std::thread::spawn(move || {
                        let mut g = pair.0.lock();
                        while !*g {
                            pair.1.wait(&mut g);
                        }
                    });
                    (pair, handle)
                })
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            for _ in 0..10 {
                // SAFETY: the child only locks, waits and exits with `_exit`.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0);
                if pid == 0 {
                    let objs: &'static Vec<(Mutex<u64>, Condvar)> =
                        Box::leak(Box::new((0..64).map(|_| (Mutex::new(0), Condvar::new())).collect()));
                    let hs: Vec<_> = (0..8)
                        .map(|t| {
                            std::thread::spawn(move || {
                                let end = Instant::now() + Duration::from_millis(200);
                                let mut i = t;
                                while Instant::now() < end {
                                    let (m, cv) = &objs[i % 64];
                                    let mut g = m.lock();
                                    *g += 1;
                                    cv.notify_all();
                                    cv.wait_for(&mut g, Duration::from_micros(50));
                                    i += 7;
                                }
                            })
                        })
                        .collect();
                    let ok = hs.into_iter().all(|h| h.join().is_ok());
                    // SAFETY: ends the child without the parent's destructors.
                    unsafe { libc::_exit(i32::from(!ok)) };
                }
                let start = Instant::now();
                let mut status = 0;
                // SAFETY: waits for our own child without blocking.
                while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
                    if start.elapsed() > Duration::from_secs(20) {
                        // SAFETY: our own child, reaped right after.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                            libc::waitpid(pid, &mut status, 0);
                        }
                        panic!("a forked child hung");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
            }
            for (pair, handle) in parked {
                *pair.0.lock() = true;
                pair.1.notify_all();
                handle.join().unwrap();
            }
        });
    }
}
