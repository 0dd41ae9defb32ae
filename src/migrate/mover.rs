//! The move phase, on a thread of its own for calls of base-page folios that span more than
//! one piece and are copied by the CPU.
//!
//! Once a run is copied, what is left of its migration — `mremap` of the destination over
//! the source, `mlock` again, `UFFDIO_WAKE` — needs neither the copy nor the next batch's
//! folios. Such a call hands its runs to a mover thread in address order
//! and goes on to write-protect and copy the next piece meanwhile: the copy of one piece and
//! the move of the one before overlap, and the critical path becomes the copy. The copying
//! thread touches only memory that is already mapped (protected sources, populated
//! destinations), so it does not wait on the mmap lock that `mremap` takes. Folios stay
//! claimed ([`super::busy::Busy`]) until the mover has dealt with them.

use std::time::Instant;

use super::abort::Abort;
use super::{Engine, MigrateStats, Progress, Span};
use crate::error::Error;
use crate::pool::Dest;

/// How many jobs may wait for the mover before the copying thread waits too: a bound on
/// the destinations copied but not yet moved.
pub(super) const QUEUE: usize = 4;

/// A copied run, ready to replace its source.
pub(super) struct MoveJob {
    /// First byte of the source.
    pub start: usize,
    /// The copy, as long as the source.
    pub dest: Dest,
    /// Folios, base pages and PMD-sized folios in the run.
    pub folios: u64,
    pub pages: u64,
    pub thp: u64,
    /// Lock the run again after the move.
    pub relock: bool,
    /// Free the replaced pages on the reaper thread.
    pub deferred: bool,
    /// Set on a batch's first run: when the batch started, for first-folio latency.
    pub batch_started: Option<Instant>,
    /// Fail the move as a failing `mremap` would (fault injection).
    pub fail: bool,
}

/// Work for the mover, done in the order it was sent.
pub(super) enum Job {
    /// Replace a source with its copy.
    Move(MoveJob),
    /// Release the claims on folios (by start address) once everything before is done.
    Release(Vec<usize>),
    /// Take the protection off these ranges and wake their writers, once everything before
    /// is done: what a batch that stopped midway left protected. A range that moved meanwhile
    /// is no longer registered, and is left alone.
    Undo(Vec<Span>),
}

/// What the mover did: counters and the first error.
#[derive(Default)]
pub(super) struct Tally {
    pub stats: MigrateStats,
    pub first_error: Option<Error>,
}

/// Does one job, counting into `stats` and `first_error`. Once the call is stopped, a
/// move is undone instead.
pub(super) fn run(
    engine: &Engine,
    job: Job,
    stats: &mut MigrateStats,
    first_error: &mut Option<Error>,
    progress: Option<&Progress>,
    abort: &Abort,
) {
    let job = match job {
        Job::Move(job) => job,
        Job::Release(starts) => {
            engine.busy.release_all(&starts);
            return;
        }
        Job::Undo(spans) => {
            for (s, e) in spans {
                super::pipeline::unprotect(engine, s, e);
            }
            return;
        }
    };
    let move_start = Instant::now();
    let (start, len) = (job.start, job.dest.len());
    let replaced = if abort.is_set() {
        Err((crate::sys::Errno::CANCELED, "the call stopped after a panic"))
    } else if job.fail {
        Err((crate::sys::Errno::IO, "mremap of the destination over the source"))
    } else {
        super::pipeline::replace(engine, start, len, &job.dest, job.deferred)
            .map_err(|e| (e, "mremap of the destination over the source"))
    };
    let grave = match replaced {
        Ok(grave) => grave,
        Err((errno, op)) => {
            engine.pool.release(job.dest);
            super::pipeline::unprotect(engine, start, start + len);
            stats.failed_folios += job.folios;
            stats.failed_pages += job.pages;
            stats.thp_failed += job.thp;
            if first_error.is_none() {
                *first_error = Some(Error::sys(op)(errno));
            }
            stats.move_ns += move_start.elapsed().as_nanos() as u64;
            return;
        }
    };
    job.dest.forget();
    if job.relock && crate::sys::mlock(start, len).is_err() {
        stats.relock_failures += job.folios;
    }
    let _ = engine.uffd.wake(start, len);
    if let Some(t) = job.batch_started {
        stats.first_folio_ns.push(t.elapsed().as_nanos() as u64);
    }
    stats.runs += 1;
    stats.bytes += len as u64;
    stats.succeeded_folios += job.folios;
    stats.succeeded_pages += job.pages;
    stats.thp_succeeded += job.thp;
    stats.move_ns += move_start.elapsed().as_nanos() as u64;
    // The old pages go to the reaper once the writers are awake. (Freeing them here on
    // the mover thread instead made the mover fall behind the copy.)
    if let Some(g) = grave {
        engine.reaper.bury(g.raw, g.total);
    }
    if let Some(progress) = progress {
        let bytes = stats.bytes;
        abort.run_caught("the progress callback", || progress(bytes));
    }
}

/// Sends `job` to the mover, if the call has one; returns it when it must run here.
pub(super) fn send(mover: Option<&crossbeam::channel::Sender<Job>>, job: Job) -> Option<Job> {
    match mover {
        Some(tx) => tx.send(job).err().map(|unsent| unsent.into_inner()),
        None => Some(job),
    }
}

/// Runs jobs from `rx` until every sender is gone.
pub(super) fn serve(
    engine: &Engine,
    rx: crossbeam::channel::Receiver<Job>,
    progress: Option<&Progress>,
    abort: &Abort,
) -> Tally {
    let mut tally = Tally::default();
    for job in &rx {
        // A panic of pagemig's own here stops the call; the jobs still queued are undone
        // rather than lost, so nothing stays protected or claimed.
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(engine, job, &mut tally.stats, &mut tally.first_error, progress, abort)
        }));
        if let Err(payload) = done {
            abort.raise("pagemig's mover thread", crate::offload::registry::panic_message(payload.as_ref()));
        }
    }
    tally
}
