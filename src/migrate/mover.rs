//! The move phase: new pages into the source, old pages back where a folio did not move,
//! the waiting threads woken, the registration taken off at the end of a call.
//!
//! Every move happens under the claims lock ([`super::busy`]), so that it and the event
//! reader's handling of a purge or `mremap` of the same range exclude each other. A move
//! the kernel refuses for a moment (`EAGAIN` while an event waits to be read, `EBUSY` while
//! a huge page is held elsewhere) is tried again with the lock let go meanwhile
//! ([`Patience`]); after that the folio's old pages go back.
//!
//! Calls of base-page folios that span more than one piece and are copied by the CPU move
//! on a thread of their own: once a run is copied, its move needs neither the copy nor the
//! next batch's folios, so the caller goes on to protect, isolate and copy the next piece
//! while the mover moves the one before, and the critical path becomes the copy. Folios
//! stay claimed until the mover has dealt with them.
#![allow(unsafe_code, reason = "moves pages between the sources, their copies and their graveyards")]

use std::time::{Duration, Instant};

use crate::lock::MutexGuard;

use super::abort::Abort;
use super::busy::{Busy, Claims};
use super::fork::Empty;
use super::outcome::Tally;
use super::reaper::Grave;
use super::staged::Staged;
use super::{Engine, Progress, Span};
use crate::backoff::Backoff;
use crate::error::Error;
use crate::folio::Folio;
use crate::pool::Dest;
use crate::sys::uffd::Uffd;
use crate::sys::{self, Errno};

/// How many jobs may wait for the mover before the copying thread waits too: a bound on
/// the destinations copied but not yet moved.
pub(super) const QUEUE: usize = 4;

/// A copied run, ready to replace its source.
pub(super) struct MoveJob {
    /// First byte of the source.
    pub start: usize,
    /// The copy and the source's old pages, each as long as the source.
    pub staged: Staged,
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
    /// Copy the old pages straight from the graveyard into the source (`dest` is a
    /// placeholder, never written); the mover thread is bound to the target node.
    pub copy_in: bool,
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

/// Reports the bytes moved so far to the caller's progress callback, in increasing order.
///
/// The callback is caller code, and safe caller code may store into the very memory being
/// migrated: run on a thread that moves or copies, such a store would wait on a protection
/// only that thread can lift, for ever. So the callback runs on a thread of its own
/// ([`Reporter::serve`], `pagemig-progress`), which no migration waits on: the threads that
/// move only count the bytes and wake it, and a callback that waits on a folio of the call
/// goes on once that folio has moved or been put back. The first total is told at once,
/// then at most one every [`Reporter::EVERY`]: totals that arrive meanwhile, or while the
/// callback runs, are told as one, the latest; the last total is always told before the
/// call returns. Only where that thread could not be started does the callback run where
/// the bytes were moved (the last total, where the call ends).
///
/// Why not every total: each wakes the reporter thread on another CPU, and a thread of the
/// process running there makes every TLB flush of the moves an interrupt to it too. Told
/// once per run (a run per 2 MiB huge page at the default batch), a callback that did
/// nothing slowed a call of 1 GiB of huge pages from 92-95 ms to 104 ms (isolating and
/// moving in went from 3 to 10 ms each; 2-core AMD EPYC VM).
pub(super) struct Reporter<'p> {
    progress: Option<&'p Progress>,
    state: crate::lock::Mutex<Reported>,
    changed: crate::lock::Condvar,
}

/// What [`Reporter`] has counted and told.
#[derive(Default)]
struct Reported {
    /// Bytes moved so far.
    moved: u64,
    /// The last total told to the callback.
    told: u64,
    /// Whether a reporter thread tells the totals.
    served: bool,
    /// Whether the call has moved its last bytes.
    finished: bool,
    /// When the last total was told (none yet: the first is told at once).
    last: Option<Instant>,
    /// Whether the reporter thread waits for a total with nothing left to tell: the next
    /// one wakes it.
    idle: bool,
}

impl Reported {
    /// When the next total may be told (none yet told: at once).
    fn due(&self) -> Option<Instant> {
        self.last.map(|t| t + Reporter::EVERY)
    }

    /// Marks the total counted as told, now; returns it.
    fn take_total(&mut self) -> u64 {
        self.told = self.moved;
        self.last = Some(Instant::now());
        self.moved
    }
}

impl<'p> Reporter<'p> {
    /// The shortest time between two totals told.
    pub const EVERY: Duration = Duration::from_millis(10);

    pub fn new(progress: Option<&'p Progress>) -> Self {
        Self { progress, state: crate::lock::Mutex::new(Reported::default()), changed: crate::lock::Condvar::new() }
    }

    /// Whether there is a callback to report to.
    pub fn wanted(&self) -> bool {
        self.progress.is_some()
    }

    /// Counts `bytes` more moved: wakes the reporter thread where it waits for a total, or,
    /// without one, reports the total here unless one was told less than [`Self::EVERY`]
    /// ago (the callback runs caught: a panic in it stops the call).
    fn add(&self, bytes: u64, abort: &Abort) {
        if self.progress.is_none() {
            return;
        }
        let mut state = self.state.lock();
        state.moved += bytes;
        if state.served {
            if std::mem::take(&mut state.idle) {
                self.changed.notify_one();
            }
            return;
        }
        if state.due().is_some_and(|due| Instant::now() < due) {
            return;
        }
        self.tell_here(state, abort);
    }

    /// Tells the total counted in `state` on this thread, unless the call was stopped.
    fn tell_here(&self, mut state: MutexGuard<'_, Reported>, abort: &Abort) {
        let Some(progress) = self.progress else { return };
        if abort.is_set() || state.told == state.moved {
            // Stopped (a panic of the callback's among the reasons): no more reports. Or
            // nothing new to tell.
            return;
        }
        let now = state.take_total();
        // No lock held while caller code runs (another mover thread may be counting).
        drop(state);
        abort.run_caught("the progress callback", || progress(now));
    }

    /// The reporter thread: tells the callback each new total, caught, with no lock held,
    /// at most one every [`Self::EVERY`], until [`Reporter::finish`] and the last total
    /// told, or until the call is stopped.
    pub fn serve(&self, abort: &Abort) {
        let Some(progress) = self.progress else { return };
        let mut state = self.state.lock();
        loop {
            if abort.is_set() {
                // Stopped (a panic of the callback's among the reasons): no more reports.
                return;
            }
            if state.told != state.moved {
                // Not woken by the totals that come meanwhile, only by the call's end.
                if let Some(due) = state.due().filter(|_| !state.finished)
                    && Instant::now() < due
                {
                    self.changed.wait_until(&mut state, due);
                    continue;
                }
                let now = state.take_total();
                MutexGuard::unlocked(&mut state, || {
                    abort.run_caught("the progress callback", || progress(now));
                });
            } else if state.finished {
                return;
            } else {
                state.idle = true;
                self.changed.wait(&mut state);
                state.idle = false;
            }
        }
    }

    /// Marks that a reporter thread serves the totals from now on.
    pub fn served(&self) {
        self.state.lock().served = true;
    }

    /// The call has moved its last bytes: the reporter thread tells the last total at once
    /// and returns; without one, the last total not told yet is told here.
    pub fn finish(&self, abort: &Abort) {
        let mut state = self.state.lock();
        state.finished = true;
        if state.served {
            self.changed.notify_all();
        } else {
            self.tell_here(state, abort);
        }
    }
}

/// Does one job, counting into `tally`. Once the call is stopped, a move is undone
/// instead.
pub(super) fn run(engine: &Engine, job: Job, tally: &mut Tally, reporter: &Reporter<'_>, abort: &Abort) {
    let job = match job {
        Job::Move(job) => job,
        Job::Release(starts) => {
            engine.busy.release_all(&starts);
            return;
        }
        Job::Undo(spans) => {
            for (s, e) in spans {
                undo(engine, s, e);
            }
            return;
        }
    };
    if let Some(pause) = job.delay {
        std::thread::sleep(pause);
    }
    let move_start = Instant::now();
    let (start, end) = (job.start, job.start + job.staged.len());
    let Staged { dest, grave } = job.staged;
    let (outcomes, answered) = if abort.is_set() || job.fail {
        // Undone as a failing move would be: the old pages go back. A folio the event
        // reader answered has its new page already, and counts as moved.
        restore(engine, start, end);
        let why =
            if abort.is_set() { (STOPPED, Errno::CANCELED) } else { ("userfaultfd move of the new pages", Errno::IO) };
        let mut claims = engine.busy.lock();
        let outcomes: Vec<Outcome> =
            job.folios.iter().map(|f| (!claims.is_answered(f.addr(), f.end())).then_some(why)).collect();
        let answered = job.folios.iter().zip(&outcomes).filter(|(_, o)| o.is_none()).map(|(f, _)| f.size()).sum();
        (outcomes, answered)
    } else if job.copy_in {
        bring_in(engine, start, end - start, &job.folios, Incoming::Copy(&grave))
    } else {
        bring_in(engine, start, end - start, &job.folios, Incoming::Move(&dest))
    };
    tally.stats.answered_bytes += answered as u64;
    // Every waiting thread woken: the moved folios with their new pages, the others with
    // their old ones, protection off. Where every folio moved, each page of the range is a
    // new one moved or copied in, which carries no protection: taking it off would rewrite
    // every entry of the range and flush the TLB for nothing.
    if outcomes.iter().all(Option::is_none) {
        let _ = engine.uffd.wake(start, end - start);
    } else {
        unprotect(engine, start, end);
    }
    rejoin_huge_pages(&job.folios, &outcomes, start, end, &mut tally.collapse_refused);
    if let Some(t) = job.batch_started {
        tally.stats.first_folio_ns.push(t.elapsed().as_nanos() as u64);
    }
    engine.pool.release(dest);
    let mut moved_bytes = 0;
    for (&f, outcome) in job.folios.iter().zip(&outcomes) {
        match *outcome {
            None => {
                moved_bytes += f.size() as u64;
                tally.moved(f, job.copy_in);
            }
            Some((op, errno)) => tally.failed(f, Error::sys(op)(errno)),
        }
    }
    tally.stats.runs += u64::from(moved_bytes > 0);
    tally.stats.move_ns += move_start.elapsed().as_nanos() as u64;
    // The old pages go to the reaper once the waiting threads are awake. (Freeing them here
    // on the mover thread instead made the mover fall behind the copy.)
    if job.deferred {
        engine.reaper.bury(grave);
    } else {
        engine.reaper.free_now(grave);
    }
    if moved_bytes > 0 {
        reporter.add(moved_bytes, abort);
    }
}

/// Sends `job` to the mover, if the call has one; returns it when it must run here.
pub(super) fn send(mover: Option<&std::sync::mpsc::SyncSender<Job>>, job: Job) -> Option<Job> {
    match mover {
        Some(tx) => tx.send(job).err().map(|unsent| unsent.0),
        None => Some(job),
    }
}

/// Runs jobs from `rx` until every sender is gone, on a thread whose own allocations go to
/// `target` (pages copied in with `UFFDIO_COPY` are allocated by this thread).
pub(super) fn serve(
    engine: &Engine,
    rx: std::sync::mpsc::Receiver<Job>,
    target: u32,
    reporter: &Reporter<'_>,
    abort: &Abort,
) -> Tally {
    let mut tally = Tally::default();
    // Put back as the thread found it once every job ran.
    let mut binding = sys::PolicyBinding::new();
    binding.bind(target);
    for job in &rx {
        // A panic of pagemig's own here stops the call; the jobs still queued are undone
        // rather than lost, so nothing stays protected or claimed.
        let done =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(engine, job, &mut tally, reporter, abort)));
        if let Err(payload) = done {
            abort.raise("pagemig's mover thread", crate::offload::registry::panic_message(payload.as_ref()));
        }
    }
    drop(binding);
    tally
}

/// What a folio left as it was because the call stopped after a panic fails with.
pub(super) const STOPPED: &str = "migrate (the call stopped after a panic)";

/// What a folio that the program purged or moved away while it migrated fails with.
pub(super) const GONE: &str = "migrate (the program purged or moved the memory meanwhile)";

/// Takes the protection off `[start, end)` and wakes its writers: the source is as it was.
pub(super) fn unprotect(engine: &Engine, start: usize, end: usize) {
    let uffd = &engine.uffd;
    let _ = uffd.writeprotect(start, end - start, false);
    let _ = uffd.wake(start, end - start);
}

/// Takes the call's registration off its runs once it is done with them, except where
/// another call has claimed part of one or registered it as it began (that call's
/// registration is the same one). Under the claims lock, so no claim or call begins
/// meanwhile, once the events waiting are read. A run the program split or unmapped is unregistered folio by folio; what the
/// kernel still refuses is left registered and recorded ([`Claims::add_stray`]), and tried
/// again here by every call that ends (and, whole, by the event reader while no call is in
/// progress: [`retry_strays`]). `FaultInjection::fail_unregister`: refuse every
/// unregistration, as a kernel out of mappings would; the reader then leaves the strays to
/// the next call's end.
pub(super) fn unregister_runs(
    engine: &Engine,
    call: u64,
    folio_size: impl Fn(usize) -> usize,
    faults: &super::options::FaultInjection,
) {
    let fail = faults.fail_unregister;
    let handshake = || {
        if let Some(handshake) = &faults.end_handshake {
            handshake.meet();
        }
    };
    // The events waiting are read first: see `Reader::after_events`.
    engine.events.after_events(handshake, |claims| {
        if let Some(handshake) = &faults.end_handshake_read {
            handshake.meet();
        }
        let runs = claims.end_call(call);
        claims.refuse_unregistering(fail);
        let strays = claims.strays();
        unregister(&engine.uffd, claims, runs, strays, Some(folio_size), fail);
    });
}

/// What the event reader does while no call is in progress and no message waits: takes
/// the registration off the ranges calls that ended left registered ([`Claims::add_stray`])
/// where the kernel lets it now, above all the purged pages a call's end kept registered,
/// once their purge is no longer recorded ([`Claims::purges_to_keep`]). Otherwise they would
/// stay registered until a later call ended, for ever if none came, and there the
/// program's `madvise` and `munmap` would wait on the reader, its holes be filled with base
/// pages by it, and its own `UFFDIO_REGISTER` fail with `EBUSY`, none of which the kernel's
/// `move_pages(2)` leaves behind. Returns false where the kernel refused a range (tried
/// again later, less often: a refusal near `vm.max_map_count` lasts).
///
/// A range whose purge is still recorded is left for a later round: whether its pages are
/// still there takes a look through a descriptor (`sys::held_ranges`), and this runs on its
/// own, not while a thread of the program waits on an event, where the program may be
/// counting on the next descriptor number it opens. A range is tried whole: one piece at a
/// time, a kernel out of mappings would split the program's memory at every piece it
/// could, and the pieces are left to a call's end. With a message waiting (an unmap of a
/// range left registered not yet read, and perhaps memory of another userfaultfd's mapped
/// there since, which a kernel that does not check whose registration it is would let
/// pagemig's unregister) nothing is tried.
pub(super) fn retry_strays(uffd: &Uffd, busy: &Busy) -> bool {
    let mut claims = busy.lock();
    if claims.calls_in_progress() || claims.unregistering_refused() || !claims.has_strays() || uffd.has_messages() {
        return true;
    }
    let (purged, strays): (Vec<Span>, Vec<Span>) =
        claims.strays().into_iter().partition(|&(s, e)| claims.purge_recorded_in(s, e));
    for (s, e) in purged {
        claims.add_stray(s, e);
    }
    unregister(uffd, &mut claims, Vec::new(), strays, None::<fn(usize) -> usize>, false)
}

/// Takes the registration off `runs` (a call's that ended) and off `strays` (what earlier
/// calls left registered), except where a claim or a call in progress holds it; see
/// [`unregister_runs`]. A range the kernel refuses whole is tried a folio at a time where
/// `folio_size` is given, else left whole. Returns whether nothing was left registered.
fn unregister(
    uffd: &Uffd,
    claims: &mut Claims,
    runs: Vec<Span>,
    strays: Vec<Span>,
    folio_size: Option<impl Fn(usize) -> usize>,
    fail: bool,
) -> bool {
    let mut left = Vec::new();
    // For the unprotection of kept ranges, all of them together.
    let deadline = Instant::now() + Duration::from_millis(20);
    // Of what earlier calls left registered, what is still claimed or another call's stays
    // left (memory moved onto a claimed range).
    for &(s, e) in &strays {
        let unused = claims.unused_in(s, e);
        left.extend(super::busy::subtract(&[(s, e)], &unused));
    }
    let spans: Vec<Span> = runs.into_iter().chain(strays).collect();
    for (start, end) in spans {
        for (us, ue) in claims.unused_in(start, end) {
            // Pages purged just now and still there stay registered (their zap may still
            // be coming: see `Claims::purged`), as what could not be unregistered does.
            let mut keep = claims.purges_to_keep(us, ue, || sys::held_ranges(us, ue).ok());
            // Kept only without protection: a write there would wait for a call's end (the
            // unprotect of a folio that failed as purged gives up while the kernel refuses).
            keep.retain(|&(s, e)| unprotect_kept(uffd, s, e, deadline));
            left.extend_from_slice(&keep);
            for (s, e) in super::busy::subtract(&[(us, ue)], &keep) {
                if !fail && uffd.unregister(s, e - s).is_ok() {
                    continue;
                }
                let Some(folio_size) = &folio_size else {
                    left.push((s, e));
                    continue;
                };
                let step = folio_size(s).max(sys::PAGE_SIZE);
                for a in (s..e).step_by(step) {
                    let len = step.min(e - a);
                    if fail || uffd.unregister(a, len).is_err() {
                        left.push((a, a + len));
                    }
                }
            }
        }
    }
    let unregistered = left.is_empty();
    for (s, e) in left {
        claims.add_stray(s, e);
    }
    unregistered
}

/// Takes the protection off `[start, end)`, purged pages a call's end keeps registered.
/// With the claims lock held no event is read, and the kernel refuses (`EAGAIN`) while one
/// waits, and while the thread whose purge was just read has not run again (it lowers the
/// refusal itself): that one is waited for, in pauses of 50 us, until `deadline` (20 ms for
/// every kept range of a call's end together), not where an event waits unread (its count
/// cannot come down while the locks are held). False where it still refuses: the range
/// is then unregistered (its purge stays recorded, and memory mapped
/// there within the second after an unmap fails as purged). (Taking the registration off
/// and making it again in missing mode alone, as this once did, registered whatever the
/// program had mapped there meanwhile, and an unmap read later forgot it: a thread touching
/// it would wait for ever.)
fn unprotect_kept(uffd: &Uffd, start: usize, end: usize, deadline: Instant) -> bool {
    loop {
        match uffd.writeprotect_once(start, end - start, false) {
            Ok(()) => return true,
            Err(Errno::AGAIN) if Instant::now() < deadline && !uffd.has_messages() => {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(_) => return false,
        }
    }
}

/// Whether any of the spans overlaps the folio.
pub(super) fn overlaps(spans: &[super::Span], f: Folio<'_>) -> bool {
    spans.iter().any(|&(s, e)| s < f.end() && f.addr() < e)
}

/// How long a move refused with `EAGAIN` is tried again. The kernel refuses moves while an
/// event of the program waits to be read (the event reader needs the claims lock, so it is
/// let go meanwhile) and for a moment after; a page that is not present refuses for good.
pub(super) struct Patience {
    /// For refusals that pass once an event is read (`EAGAIN`, a mapping gone).
    again: Backoff,
    /// For `EBUSY`.
    busy: Backoff,
    /// For `EAGAIN` where the pages waiting are the program's only copy of its data (old
    /// pages going back): no deadline ([`Patience::restoring`]).
    again_restoring: Option<Backoff>,
    /// After no page could be had (`ENOMEM`) for old pages going back: pauses that grow to
    /// 10 ms, for ever.
    memory: Backoff,
}

impl Patience {
    const LIMIT: Duration = Duration::from_secs(2);
    /// A pinned page is refused for good: `EBUSY` is tried again only this long.
    const BUSY_LIMIT: Duration = Duration::from_millis(20);

    pub fn new() -> Self {
        // Steady pauses: a page shared with children that a program forks again and again
        // moves only in the moment between two forks, and fewer tries meet it less often.
        Self {
            again: Backoff::new(Duration::from_micros(100), Duration::from_micros(100)).within(Self::LIMIT),
            busy: Backoff::new(Duration::from_micros(200), Duration::from_micros(200)).within(Self::BUSY_LIMIT),
            again_restoring: None,
            memory: Backoff::new(Duration::from_micros(100), Duration::from_millis(10)),
        }
    }

    /// For old pages going back into the program's memory: `EAGAIN` is waited out however
    /// long it lasts. The kernel refuses every move while an event of the program's is
    /// unread or its thread not yet back from it, and threads that purge or move memory
    /// without a pause keep that so for as long as they go on (three such threads kept a
    /// put-back refused past [`Patience::LIMIT`], after which the old pages were left in
    /// the graveyard and the program read zeros). The claims lock is let go at every
    /// pause, so the event reader reads those events meanwhile.
    pub fn restoring() -> Self {
        Self {
            again_restoring: Some(Backoff::new(Duration::from_micros(100), Duration::from_micros(100))),
            ..Self::new()
        }
    }

    /// Sleeps for `backoff`'s next pause with the claims lock let go; false, at once, once
    /// past its deadline.
    fn pause(backoff: &mut Backoff, claims: &mut MutexGuard<'_, Claims>) -> bool {
        let Some(pause) = backoff.next_pause() else { return false };
        MutexGuard::unlocked(claims, || std::thread::sleep(pause));
        true
    }

    /// The patience of a call's isolation probes ([`Patience::wait_events`]): [`Patience::LIMIT`]
    /// for the whole call, counted again from each move of pages.
    pub fn for_events() -> Backoff {
        Backoff::new(Duration::from_micros(100), Duration::from_micros(100)).within(Self::LIMIT)
    }

    /// After the isolation's probe was refused (`EAGAIN`: an event of the program's waits
    /// to be read, see `isolate::probe`): whether to try again, having let the lock go so
    /// that the reader reads it. Whatever the pages look like (one swapped out moves all the
    /// same), while `events` ([`Patience::for_events`]) lasts: a program whose threads purge
    /// registered memory without a pause refuses the probe again and again; each move
    /// between two refusals counts it again, and once it has run out, every refusal fails
    /// its folio at once, pass after pass.
    pub fn wait_events(events: &mut Backoff, claims: &mut MutexGuard<'_, Claims>, errno: Errno) -> bool {
        errno == Errno::AGAIN && Self::pause(events, claims)
    }

    /// After an `EBUSY` that may pass: whether to try again, having let the lock go.
    pub fn wait_busy(&mut self, claims: &mut MutexGuard<'_, Claims>) -> bool {
        Self::pause(&mut self.busy, claims)
    }

    /// After a move or copy into the program's memory at `at` found no mapping there
    /// (`ENOENT`, `EFAULT`): whether to try again, having let the claims lock go for a
    /// moment. The program unmapped the memory or moved it elsewhere (`mremap`), and the
    /// kernel looks the mapping up before it checks for changes in progress, so this comes
    /// before the event that says which. Until the event reader has read it (marking `at`
    /// dead), the old pages stay recorded as isolated: had the program moved the memory,
    /// the reader takes them along to its new place. Given up after [`Patience::LIMIT`].
    pub fn wait_event(&mut self, claims: &mut MutexGuard<'_, Claims>, errno: Errno, at: usize) -> bool {
        if !matches!(errno, Errno::NOENT | Errno::FAULT) || !claims.dead_in(at, at + 1).is_empty() {
            return false;
        }
        Self::pause(&mut self.again, claims)
    }

    /// After a move stopped at `at` with `errno`: whether to try again, having let the
    /// claims lock go for a moment. A page that is not present refuses for good; but old
    /// pages going back ([`Patience::restoring`]) are waited for whatever `pagemap` says of
    /// them: one the kernel is migrating (compaction: a migration entry) or has swapped out
    /// reads as not present there, and `pagemap` may not open at all (no descriptor left),
    /// while the graveyard still holds the program's only copy of its data. Given up on
    /// those, they were freed with the graveyard and the program read zeros.
    pub fn wait(&mut self, claims: &mut MutexGuard<'_, Claims>, errno: Errno, at: usize) -> bool {
        if errno != Errno::AGAIN {
            return false;
        }
        if let Some(backoff) = self.again_restoring.as_mut() {
            return Self::pause(backoff, claims);
        }
        let present = crate::numa::page_frames(at & !(sys::PAGE_SIZE - 1), sys::PAGE_SIZE)
            .is_ok_and(|f| f.first().is_some_and(Option::is_some));
        present && Self::pause(&mut self.again, claims)
    }

    /// After old pages going back could not be copied for want of memory (`ENOMEM` on
    /// every node their mapping allows): whether to try again, having let the claims lock
    /// go for a moment. Always, however long it takes: the graveyard holds the program's
    /// only copy of its data, and memory comes back as the reaper frees replaced pages and
    /// other programs theirs. Given up, the program read zeros.
    pub fn wait_memory(&mut self, claims: &mut MutexGuard<'_, Claims>, errno: Errno) -> bool {
        errno == Errno::NOMEM && Self::pause(&mut self.memory, claims)
    }
}

/// Puts the isolated old pages of `[start, end)` back where they were (the folio did not
/// move). Where the program unmapped the range meanwhile they stay in the graveyard and go
/// with it.
fn restore(engine: &Engine, start: usize, end: usize) {
    put_back(engine, &mut engine.busy.lock(), start, end);
}

/// Undoes `[start, end)` of a folio that will not move: its old pages back, protection
/// off, waiting threads woken. The source is as it was.
pub(super) fn undo(engine: &Engine, start: usize, end: usize) {
    restore(engine, start, end);
    unprotect(engine, start, end);
}

/// [`restore`] with the claims lock held. Each span stays recorded as isolated until its
/// pages are back, so that an event read while the lock is let go finds it; then its pages
/// count as filled for the fork barrier.
fn put_back(engine: &Engine, claims: &mut MutexGuard<'_, Claims>, start: usize, end: usize) {
    drop(put_back_counted(engine, claims, start, end));
}

/// [`put_back`], returning the count of the pages that left the claims as empty for the
/// fork barrier instead of closing it (isolation keeps a whole stretch counted until it has
/// finished, as it may isolate those pages again).
pub(super) fn put_back_counted(
    engine: &Engine,
    claims: &mut MutexGuard<'_, Claims>,
    start: usize,
    end: usize,
) -> Empty {
    let mut empty = Empty::none();
    let mut patience = Patience::restoring();
    // Set once the node of the old pages had no room for their copy: from then on the
    // copies prefer that node and take another where it has none.
    let mut anywhere = false;
    // Below this address the old pages go back one page at a time: the range the program
    // split meanwhile (an `mprotect` of part of it makes a mapping of its own, and raises
    // no event), which a move or copy may not cross.
    let mut single_until = 0;
    loop {
        // Old pages of memory the program purged or unmapped while the lock was let go (at
        // a wait below, or before) are garbage: put back, they would undo the purge.
        for (ds, de) in claims.dead_in(start, end) {
            forget_isolated(claims, ds, de);
        }
        let Some((s, span_end, g)) = claims.isolated_in(start, end).first().copied() else { break };
        let e = if s < single_until { span_end.min(s + sys::PAGE_SIZE) } else { span_end };
        let stall = if e - s > sys::PAGE_SIZE { claims.take_put_back_stall(s) } else { None };
        let len = if stall.is_some() { sys::PAGE_SIZE } else { e - s };
        // SAFETY: `g` holds exactly the old pages of `[s, e)`, moved out by this call; the
        // source is empty and every access to it waits.
        let (moved, errno) = match unsafe { engine.uffd.move_pages(s, g, len) } {
            // The injected stall: the kernel refused the rest for a moment.
            Ok(()) if stall.is_some() => (len, Some(Errno::AGAIN)),
            Ok(()) => (len, None),
            Err((moved, errno)) => (moved, Some(errno)),
        };
        // What came back leaves the record before any wait lets the lock go: an event read
        // meanwhile (the program moving the memory on) takes along only what is still in
        // the graveyard. Taking the whole span, the reader met the pages already back at
        // its first page (`EEXIST`) and gave the rest up, the program's data with it.
        empty.merge(claims.take_isolated(s, s + moved).1);
        if let Some(stall) = stall {
            MutexGuard::unlocked(claims, || stall.meet());
        }
        let done = match errno {
            None => e,
            Some(errno) if patience.wait(claims, errno, g + moved) || patience.wait_event(claims, errno, s + moved) => {
                s + moved
            }
            // The old pages will not move back: the program changed the mapping's
            // protection or locking meanwhile, and pages move only between mappings alike
            // (`EINVAL`); a stranger pinned one in the graveyard, reading pagemig's memory
            // (`EBUSY`); no page table could be had (`ENOMEM`). Copied back instead (new
            // pages, same data; the mapping may be read-only now, a copy fills it all the
            // same, on the node of the old ones, or, where that node has no room, on another
            // one): never dropped while the source is there to take them.
            Some(Errno::INVAL | Errno::BUSY | Errno::NOMEM) => {
                let at = s + moved;
                let copied = if claims.take_put_back_copy_failure(at) {
                    Err((0, Errno::NOMEM))
                } else {
                    let placement = if anywhere { Placement::Prefer } else { Placement::Bind };
                    // SAFETY: the rest of `[s, e)` is empty and every access to it waits for
                    // exactly this data, which the graveyard holds.
                    unsafe { copy_back_placed(&engine.uffd, at, g + moved, e - at, placement) }
                };
                match copied {
                    Err((copied, errno)) => {
                        // Replaced by its copy: forgotten before a wait, as above.
                        empty.merge(claims.take_isolated(at, at + copied).1);
                        let again = if errno == Errno::NOMEM && !anywhere {
                            anywhere = true;
                            true
                        } else if matches!(errno, Errno::NOENT | Errno::INVAL) && e - (at + copied) > sys::PAGE_SIZE {
                            // Perhaps across two mappings: page by page from here.
                            single_until = span_end;
                            true
                        } else {
                            patience.wait(claims, errno, g + moved + copied)
                                || patience.wait_event(claims, errno, at + copied)
                                || patience.wait_memory(claims, errno)
                        };
                        // Or unmapped by the program meanwhile.
                        if again { at + copied } else { e }
                    }
                    Ok(()) => {
                        // The next span tries its own node first again.
                        anywhere = false;
                        e
                    }
                }
            }
            // Unmapped by the program (the event read): the pages go with the graveyard.
            Some(_) => e,
        };
        empty.merge(claims.take_isolated(s, done).1);
    }
    empty
}

/// Copies `[from, from + len)` into the empty, registered `[to, to + len)` (`UFFDIO_COPY`),
/// each new page allocated on the node of the page it copies: the calling thread's memory
/// policy bound to that node meanwhile (the mover's is bound to the target, the event
/// reader's is the default, local). Old pages copied back stay on their node, so memory
/// that does not move stays where it was; a destination copied in puts the new pages where
/// the destination is. A mapping with a memory policy of its own allocates by that policy;
/// pages whose node cannot be told are copied by the thread's own policy. Returns what
/// [`Uffd::copy`](crate::sys::uffd::Uffd::copy) returns.
///
/// # Safety
/// As [`Uffd::copy`](crate::sys::uffd::Uffd::copy): `[to, to + len)` is a range whose new
/// contents nobody is surprised by (its accesses wait for exactly this data).
pub(super) unsafe fn copy_back(
    uffd: &crate::sys::uffd::Uffd,
    to: usize,
    from: usize,
    len: usize,
) -> Result<(), (usize, Errno)> {
    // SAFETY: this function's contract.
    unsafe { copy_back_placed(uffd, to, from, len, Placement::Bind) }
}

/// Where [`copy_back_placed`] allocates the new pages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// On the node of the page each copies, or nowhere (`MPOL_BIND`); pages whose node
    /// cannot be told by the thread's own policy.
    Bind,
    /// On that node while it has room, on another after (`MPOL_PREFERRED`); pages whose
    /// node cannot be told on any node.
    Prefer,
}

/// [`copy_back`], the new pages allocated as `placement` says.
///
/// # Safety
/// As [`copy_back`].
unsafe fn copy_back_placed(
    uffd: &crate::sys::uffd::Uffd,
    to: usize,
    from: usize,
    len: usize,
    placement: Placement,
) -> Result<(), (usize, Errno)> {
    let nodes = crate::numa::page_nodes(from, len).unwrap_or_default();
    let mut binding = sys::PolicyBinding::new();
    let mut done = 0;
    while done < len {
        let first = done / sys::PAGE_SIZE;
        // The run of pages on one node from here; all the rest where the nodes are unknown.
        let (node, part) = match nodes.get(first..) {
            Some(rest @ [node, ..]) => {
                let pages = rest.iter().take_while(|&n| n == node).count();
                (*node, (pages * sys::PAGE_SIZE).min(len - done))
            }
            _ => (-1, len - done),
        };
        match placement {
            Placement::Bind if node >= 0 => binding.bind(node as u32),
            Placement::Prefer if node >= 0 => binding.prefer(node as u32),
            Placement::Bind => {
                binding.unbind();
                true
            }
            // Not the thread's own policy (the mover's is bound to the target).
            Placement::Prefer => binding.anywhere(),
        };
        // SAFETY: as this function's contract, for a part of its range.
        unsafe { uffd.copy(to + done, from + done, part) }.map_err(|(copied, errno)| (done + copied, errno))?;
        done += part;
    }
    Ok(())
}

/// Gives up `[at, f.end())` of a folio the program purged or moved away (`dead`) while it
/// migrated: the purged old pages are garbage and dropped, the folio's other pages keep
/// their data and go back. Returns the folio's outcome.
fn give_up_gone(
    engine: &Engine,
    claims: &mut MutexGuard<'_, Claims>,
    dead: &[Span],
    f: Folio<'_>,
    at: usize,
) -> Outcome {
    for &(s, e) in dead.iter().filter(|&&(s, e)| s < f.end() && f.addr() < e) {
        forget_isolated(claims, s.max(at), e.min(f.end()));
    }
    put_back(engine, claims, at, f.end());
    Some((GONE, Errno::NOENT))
}

/// Forgets the old pages isolated from `[start, end)`: replaced, or garbage.
fn forget_isolated(claims: &mut Claims, start: usize, end: usize) {
    // Replaced or garbage: not empty any more.
    drop(claims.take_isolated(start, end));
}

/// What one step of [`bring_in`] moves or copies with the claims lock held, at most: an
/// event of the program waits no longer than one step.
const STEP: usize = 2 << 20;

/// Per folio of a move: `None` if it moved, else why not.
pub(super) type Outcome = Option<(&'static str, Errno)>;

/// Maps with a huge page again each huge folio in `folios` (of `[start, end)`) that moved
/// (`outcomes`) but arrived as base pages, collapsed where its pages now are (the target).
/// A huge folio arrives so where its source was left mapped with base pages: split on its
/// way out by a move that met a page in its graveyard (a stranger's read had faulted one
/// there), or by the program (an `mprotect` of part of it), in this call or an earlier one;
/// the destination's huge page moved into it is split too. Left so, the folio would stay
/// base pages for good, and `khugepaged`, which collapses such ranges of a mapping advised
/// `MADV_HUGEPAGE`, may have scanned it before it moved: it then allocates the huge page on
/// the node the scan found, the old one, and copies the moved pages there, every byte
/// kept and the folio back where it came from (seen in the two-node guest: a call that
/// moved every folio, and 512 pages of one on the old node at its end). Collapsed here,
/// the range is mapped whole and `khugepaged` leaves it alone. Where the kernel refuses
/// (a mapping advised `MADV_NOHUGEPAGE`, or no huge page to be had), the folio stays base
/// pages, as it arrived; after a refusal for want of memory (which the kernel reaches only
/// after reclaim and compaction: a folio the caller called huge over memory never backed
/// by huge pages would pay that at every move) no other folio is tried in the call
/// (`refused`, the settling thread's).
fn rejoin_huge_pages(folios: &[Folio<'_>], outcomes: &[Outcome], start: usize, end: usize, refused: &mut bool) {
    let moved_huge = |(f, o): (&Folio<'_>, &Outcome)| f.is_pmd() && o.is_none();
    if *refused || !folios.iter().zip(outcomes).any(moved_huge) {
        return;
    }
    let Ok(huge) = sys::huge_ranges_kept(start, end) else { return };
    for (f, _) in folios.iter().zip(outcomes).filter(|&pair| moved_huge(pair)) {
        if !huge.iter().any(|&(s, e)| s <= f.addr() && f.end() <= e)
            && matches!(sys::madvise(f.addr(), f.size(), sys::Advice::Collapse), Err(Errno::NOMEM))
        {
            *refused = true;
            return;
        }
    }
}

/// Where the new pages of an isolated source come from.
#[derive(Clone, Copy)]
pub(super) enum Incoming<'j> {
    /// Moved in from the filled destination (`UFFDIO_MOVE`).
    Move(&'j Dest),
    /// Copied in from the old pages in the graveyard (`UFFDIO_COPY`), allocated by the
    /// calling thread's memory policy: the mover's, bound to the target.
    Copy(&'j Grave),
}

impl Incoming<'_> {
    /// Where the new data of the source's byte `at` is, for a source starting at `start`.
    fn from(self, start: usize, at: usize) -> usize {
        match self {
            Incoming::Move(d) => d.addr() + (at - start),
            Incoming::Copy(g) => g.addr() + (at - start),
        }
    }
}

/// Brings the new pages of the isolated source `[start, start + len)`, whose folios are
/// `folios`, in from `incoming`, and returns each folio's outcome. Under the claims lock
/// (let go between steps of [`STEP`]), so that a purge, `munmap` or `mremap` the program
/// announces excludes it: a folio the program purged or moved away meanwhile is not
/// brought in (its purged old pages are dropped, the others put back), and fails with
/// `ENOENT`. One the kernel refuses (the program unmapped or changed the mapping
/// meanwhile, or a page could not be allocated) gets its old pages back; a copy refused
/// midway keeps what it copied into the folio already (the same data). Pages the event
/// reader copied in already (a thread faulted on them) are left alone, and their bytes
/// returned beside the outcomes. Nothing is woken here.
pub(super) fn bring_in(
    engine: &Engine,
    start: usize,
    len: usize,
    folios: &[Folio<'_>],
    incoming: Incoming<'_>,
) -> (Vec<Outcome>, usize) {
    let end = start + len;
    let mut out = vec![None; folios.len()];
    let mut skipped = 0;
    let mut one_by_one = start;
    let mut at = start;
    while at < end {
        let mut claims = engine.busy.lock();
        let mut patience = Patience::new();
        let step_end = (at + STEP).min(end);
        while at < step_end {
            // Read again at every step: the lock may have been let go meanwhile.
            let dead = claims.dead_in(at, end);
            let k = folios.partition_point(|f| f.end() <= at);
            if overlaps(&dead, folios[k]) {
                out[k] = give_up_gone(engine, &mut claims, &dead, folios[k], at);
                at = folios[k].end();
                continue;
            }
            let j = k + folios[k..].iter().take_while(|f| !overlaps(&dead, **f) && f.end() <= step_end).count();
            // One folio at a time after a refusal that may come from a mapping split across
            // the stretch: a move or copy stays within one mapping, or fails whole.
            let e = if j > k && at >= one_by_one { folios[j - 1].end() } else { folios[k].end() };
            let from = incoming.from(start, at);
            // SAFETY: `[at, e)` is claimed by this call and isolated (empty, every access
            // waits for exactly this data); `from` holds a complete copy of its old pages
            // (the filled destination, ours alone, or the old pages themselves).
            let result = unsafe {
                match incoming {
                    Incoming::Move(_) => engine.uffd.move_pages(at, from, e - at),
                    Incoming::Copy(_) => engine.uffd.copy(at, from, e - at),
                }
            };
            let (done, errno) = match result {
                Ok(()) => (e - at, None),
                Err((done, errno)) => (done, Some(errno)),
            };
            // The old pages of what came in are garbage now.
            forget_isolated(&mut claims, at, at + done);
            at += done;
            let Some(errno) = errno else { continue };
            // Pages the event reader copied in when a thread faulted on them: they are the
            // folios' new pages already, and the move goes on after them.
            if errno == Errno::EXIST {
                let answered = claims.answered_from(at, e);
                if answered > at {
                    skipped += answered - at;
                    at = answered;
                    continue;
                }
            }
            if patience.wait(&mut claims, errno, incoming.from(start, at)) {
                continue;
            }
            // A huge page that must be split to move (the source's page table is no longer
            // a huge one) cannot be while the kernel holds it elsewhere for a moment.
            if errno == Errno::BUSY && patience.wait_busy(&mut claims) {
                continue;
            }
            let k = folios.partition_point(|f| f.end() <= at);
            // A page of the destination held by somebody else (a stranger pinning or
            // reading pagemig's memory): the kernel would move the program's page all the
            // same. Copied in from the destination instead: new pages on the destination's
            // node, the same data (a huge page arrives as base pages).
            if errno == Errno::BUSY && matches!(incoming, Incoming::Move(_)) {
                let from = incoming.from(start, at);
                let end = folios[k].end();
                // SAFETY: as the move's above: `[at, end)` is claimed, isolated and empty,
                // every access waits for exactly this data, which the destination holds.
                let done = match unsafe { copy_back(&engine.uffd, at, from, end - at) } {
                    Ok(()) => end - at,
                    Err((done, _)) => done,
                };
                forget_isolated(&mut claims, at, at + done);
                at += done;
                if at == end {
                    continue;
                }
            }
            if matches!(errno, Errno::INVAL | Errno::NOENT | Errno::FAULT) && e > folios[k].end() {
                one_by_one = e;
                continue;
            }
            let phase = match incoming {
                Incoming::Move(_) => super::outcome::Phase::MoveIn,
                Incoming::Copy(_) => super::outcome::Phase::CopyIn,
            };
            let (op, errno) = super::outcome::classify(phase, errno);
            // The folio the move stopped at fails; the move goes on after it.
            out[k] = Some((op, errno));
            put_back(engine, &mut claims, at, folios[k].end());
            at = folios[k].end();
        }
    }
    (out, skipped)
}
