//! The copy helper: a second thread that copies beside the caller.
//!
//! The caller of a call that moves base pages on a mover thread isolates and copies every
//! piece itself, while the mover and the reaper leave part of a second CPU idle. The
//! helper takes chunks of the caller's piece copy from the same cursor as the caller
//! ([`CopyHelper::share`], [`Chunks`]), the caller from the front and the helper from the
//! back: each thread takes its next chunk when it is done with its last, so a helper that
//! the scheduler puts behind the mover or the reaper takes fewer chunks instead of holding
//! the caller up, and the caller waits at most for the one chunk the helper is copying when
//! the two meet. Working from the two ends, the threads fill the two halves of a piece,
//! which the destinations that `UFFDIO_COPY` fills place in two page tables (see
//! `prepare`).
//!
//! The helper copies only between memory the call owns (graveyards and destinations); it
//! never touches the program's memory, never runs caller code, and its lock is a leaf.
#![allow(unsafe_code, reason = "lends the caller's borrowed work to the helper for as long as the caller waits")]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::lock::{Condvar, Mutex};

/// Work shared with the helper: called on both threads at once until it returns.
type Work<'w> = &'w (dyn Fn() + Sync);

/// The helper's side of a call.
#[derive(Default)]
pub(super) struct CopyHelper {
    state: Mutex<State>,
    /// The helper waits here for work or the end of the call.
    posted: Condvar,
    /// The caller waits here for the helper to leave the work it took back.
    left: Condvar,
}

#[derive(Default)]
struct State {
    /// The work on offer, and its number.
    work: Option<(u64, Work<'static>)>,
    /// The number of the last work offered.
    posted: u64,
    /// The helper is running the work on offer.
    running: bool,
    /// The call has ended: the helper returns.
    quit: bool,
}

impl CopyHelper {
    /// The helper thread's body: runs each work offered once, until [`CopyHelper::quit`].
    pub fn serve(&self) {
        let mut seen = 0;
        let mut state = self.state.lock();
        loop {
            if state.quit {
                return;
            }
            match state.work {
                Some((n, work)) if n > seen => {
                    seen = n;
                    state.running = true;
                    drop(state);
                    // A panic here (none is expected: the work only copies) must not leave
                    // the caller waiting: `running` is cleared whatever happens.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
                    state = self.state.lock();
                    state.running = false;
                    self.left.notify_all();
                }
                _ => self.posted.wait(&mut state),
            }
        }
    }

    /// Ends the helper's loop (at the end of the call).
    pub fn quit(&self) {
        self.state.lock().quit = true;
        self.posted.notify_all();
    }

    /// Runs `work` here and, at the same time, on the helper when it is free; returns once
    /// neither thread runs it any more. `work` must share its work out itself (each call
    /// takes what is left) and be safe to run on both threads at once.
    pub fn share(&self, work: Work<'_>) {
        {
            let mut state = self.state.lock();
            state.posted += 1;
            // SAFETY: only the lifetime is widened. The helper runs `work` only while it is
            // on offer, which ends before this function returns: `Retract` takes it back and
            // waits until the helper is out of it, on every way out of here (a panic of
            // `work` included).
            let work: Work<'static> = unsafe { std::mem::transmute::<Work<'_>, Work<'static>>(work) };
            state.work = Some((state.posted, work));
        }
        self.posted.notify_one();
        let _retract = Retract(self);
        work();
    }
}

/// Takes the work on offer back and waits for the helper to leave it.
struct Retract<'h>(&'h CopyHelper);

impl Drop for Retract<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.work = None;
        while state.running {
            self.0.left.wait(&mut state);
        }
    }
}

/// A cursor over `n` items handed out one at a time, from the front or from the back, to
/// whichever thread asks, and whether any failed.
pub(super) struct Chunks {
    /// The first item not taken from the front (low 32 bits) and one past the last not
    /// taken from the back (high 32 bits): the items between are left.
    ends: AtomicU64,
    failed: AtomicBool,
}

impl Chunks {
    /// A cursor over `n` items.
    ///
    /// # Panics
    /// Where `n` does not fit in 32 bits (a piece is cut in far fewer chunks).
    pub fn new(n: usize) -> Self {
        let n = u32::try_from(n).expect("fewer than 2^32 chunks");
        Self { ends: AtomicU64::new(u64::from(n) << 32), failed: AtomicBool::new(false) }
    }

    /// Runs `f` over the items not yet taken, from the front or (`from_back`) from the
    /// back, until none is left; one that fails is remembered.
    pub fn run<E>(&self, from_back: bool, f: impl Fn(usize) -> Result<(), E>) {
        while let Some(i) = self.take(from_back) {
            if f(i).is_err() {
                self.failed.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Takes the item at the front or the back, if any is left.
    fn take(&self, from_back: bool) -> Option<usize> {
        let mut ends = self.ends.load(Ordering::Relaxed);
        loop {
            let (front, back) = (ends & u64::from(u32::MAX), ends >> 32);
            if front >= back {
                return None;
            }
            let (taken, rest) = if from_back { (back - 1, ends - (1 << 32)) } else { (front, ends + 1) };
            match self.ends.compare_exchange_weak(ends, rest, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(taken as usize),
                Err(now) => ends = now,
            }
        }
    }

    /// Whether every item run so far succeeded.
    pub fn ok(&self) -> bool {
        !self.failed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;
    use std::sync::atomic::AtomicUsize;

    /// Runs `body` with a helper serving on a thread of its own, under a watchdog.
    fn with_helper(body: impl FnOnce(&CopyHelper) + Send + 'static) {
        watchdog(60, || {
            let helper = CopyHelper::default();
            std::thread::scope(|s| {
                s.spawn(|| helper.serve());
                body(&helper);
                helper.quit();
            });
        });
    }

    /// Every item runs exactly once, on one thread or the other, and the helper takes part.
    #[test]
    fn every_chunk_runs_once_on_either_thread() {
        with_helper(|helper| {
            let mut helped = 0;
            for round in 0..200 {
                let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
                let here = std::thread::current().id();
                let elsewhere = AtomicUsize::new(0);
                // Items of 7 counts each, as the pipeline's chunks group parts.
                let chunks = Chunks::new(counts.len().div_ceil(7));
                helper.share(&|| {
                    let helping = std::thread::current().id() != here;
                    chunks.run(helping, |c| {
                        if helping {
                            elsewhere.fetch_add(1, Ordering::Relaxed);
                        }
                        for count in counts.iter().skip(c * 7).take(7) {
                            count.fetch_add(1, Ordering::Relaxed);
                            std::hint::spin_loop();
                        }
                        if round % 50 == 0 { Err(()) } else { Ok(()) }
                    })
                });
                // Nothing runs after `share` returns: counts are final.
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "round {round}");
                assert_eq!(chunks.ok(), round % 50 != 0);
                helped += usize::from(elsewhere.load(Ordering::Relaxed) > 0);
            }
            assert!(helped > 0, "the helper never took a chunk in 200 rounds");
        });
    }

    /// The front hands out items in order from the first, the back from the last, and the
    /// two never hand out the same item: every item once, each end's items contiguous.
    #[test]
    fn the_two_ends_meet_without_overlap() {
        watchdog(60, || {
            for n in [0, 1, 2, 7, 64] {
                for pattern in [0b0u32, 0b1, 0b10, 0b1101, u32::MAX] {
                    let chunks = Chunks::new(n);
                    let (mut front, mut back) = (Vec::new(), Vec::new());
                    let mut k = 0;
                    loop {
                        let from_back = pattern >> (k % 32) & 1 == 1;
                        k += 1;
                        match chunks.take(from_back) {
                            Some(i) if from_back => back.push(i),
                            Some(i) => front.push(i),
                            None => break,
                        }
                    }
                    assert_eq!(front, (0..front.len()).collect::<Vec<_>>(), "n {n}, pattern {pattern:b}");
                    assert_eq!(back, (front.len()..n).rev().collect::<Vec<_>>(), "n {n}, pattern {pattern:b}");
                    assert!(chunks.take(false).is_none() && chunks.take(true).is_none());
                }
            }
        });
    }

    /// A panic in the work on the caller's side still waits for the helper to leave it
    /// before the work's borrows end.
    #[test]
    fn a_panicking_share_waits_for_the_helper() {
        with_helper(|helper| {
            let inside = AtomicUsize::new(0);
            let here = std::thread::current().id();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                helper.share(&|| {
                    if std::thread::current().id() == here {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        panic!("caller side");
                    }
                    inside.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            }));
            assert!(result.is_err());
            assert_eq!(inside.load(Ordering::SeqCst), 0, "the helper still ran the work after share returned");
        });
    }
}
