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
use super::reaper::Grave;
use super::{Engine, MigrateStats, Progress, Span};
use crate::error::Error;
use crate::folio::Folio;
use crate::pool::Dest;
use crate::sys::Errno;

/// How many jobs may wait for the mover before the copying thread waits too: a bound on
/// the destinations copied but not yet moved.
pub(super) const QUEUE: usize = 4;

/// A copied run, ready to replace its source.
pub(super) struct MoveJob {
    /// First byte of the source.
    pub start: usize,
    /// The copy, as long as the source.
    pub dest: Dest,
    /// The source's old pages.
    pub grave: Grave,
    /// The run's folios, in address order.
    pub folios: Vec<Folio<'static>>,
    /// Free the old pages on the reaper thread.
    pub deferred: bool,
    /// Set on a batch's first run: when the batch started, for first-folio latency.
    pub batch_started: Option<Instant>,
    /// Fail the move as a failing move would (fault injection).
    pub fail: bool,
    /// Pause before the move (fault injection).
    pub delay: Option<std::time::Duration>,
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
                super::pipeline::restore(engine, s, e);
                super::pipeline::unprotect(engine, s, e);
            }
            return;
        }
    };
    if let Some(pause) = job.delay {
        std::thread::sleep(pause);
    }
    let move_start = Instant::now();
    let (start, end) = (job.start, job.start + job.dest.len());
    let outcomes = if abort.is_set() || job.fail {
        // Undone as a failing move would be: the old pages go back.
        super::pipeline::restore(engine, start, end);
        let why = if abort.is_set() {
            ("migrate (the call stopped after a panic)", Errno::CANCELED)
        } else {
            ("userfaultfd move of the new pages", Errno::IO)
        };
        vec![Some(why); job.folios.len()]
    } else {
        super::pipeline::replace(engine, start, &job.dest, &job.folios)
    };
    // Protection off, registration gone, every waiting thread woken: the moved folios
    // with their new pages, the others with their old ones.
    super::pipeline::unprotect(engine, start, end);
    if let Some(t) = job.batch_started {
        stats.first_folio_ns.push(t.elapsed().as_nanos() as u64);
    }
    engine.pool.release(job.dest);
    let mut moved_any = false;
    for (f, outcome) in job.folios.iter().zip(&outcomes) {
        match outcome {
            None => {
                moved_any = true;
                stats.bytes += f.size() as u64;
                stats.succeeded_folios += 1;
                stats.succeeded_pages += f.nr_pages() as u64;
                stats.thp_succeeded += u64::from(f.is_pmd());
            }
            Some((op, errno)) => {
                stats.failed_folios += 1;
                stats.failed_pages += f.nr_pages() as u64;
                stats.thp_failed += u64::from(f.is_pmd());
                if first_error.is_none() {
                    *first_error = Some(Error::sys(op)(*errno));
                }
            }
        }
    }
    stats.runs += u64::from(moved_any);
    stats.move_ns += move_start.elapsed().as_nanos() as u64;
    // The old pages go to the reaper once the waiting threads are awake. (Freeing them here
    // on the mover thread instead made the mover fall behind the copy.)
    if job.deferred {
        engine.reaper.bury(job.grave);
    } else {
        engine.reaper.free_now(job.grave);
    }
    if moved_any && let Some(progress) = progress {
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
