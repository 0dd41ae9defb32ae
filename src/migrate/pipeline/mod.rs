//! One call's folios through the phases of a batch, as `migrate_pages_batch()` runs them:
//!
//! 1. **claim** ([`claim`]): each folio is claimed for this call, or left for the next pass
//!    when another call holds it;
//! 2. **prepare** ([`prepare`]): each run of the batch gets its destination on the target
//!    node and its graveyard, as one [`Staged`];
//! 3. **isolate** ([`isolate`]): each run (or, pipelined, each piece just before its copy)
//!    is write-protected and its old pages moved into the graveyard;
//! 4. **copy** ([`copy`]): the batch copy, through the active migrator or the CPU;
//! 5. **move** ([`moves`]): each run's copied folios replace their sources (on the mover
//!    thread where the call has one), folio by folio copies of what the batch copy did not
//!    copy, and the **undo** of each folio that fails: its old pages back, protection off.
//!
//! Every failed step ends in [`Call::fail`] (or the mover's, both [`Tally::failed`]), with
//! the meaning [`super::outcome::classify`] gives its errno. The strategy is decided once,
//! in [`Plan`].
//!
//! This module calls the copy kernels and `mremap`, the two operations that change memory
//! under the program; both happen only while the source is write-protected and the
//! destination is ours alone.
#![allow(unsafe_code)]

mod claim;
mod copy;
mod isolate;
mod moves;
mod prepare;

use std::ops::Range;
use std::time::{Duration, Instant};

use super::abort::Abort;
use super::mover::{self, Job, STOPPED};
use super::outcome::Tally;
use super::settings::Settings;
use super::staged::Staged;
use super::{Engine, Item, MigrateOptions, Mode, NR_MAX_MIGRATE_PASSES, Reason};
use crate::error::Error;
use crate::offload::{Batch, registry};
use crate::pool::{Populate, Unpopulated};
use crate::sys::{self, Errno};

/// How a call migrates: every strategy choice, made once when the call begins, from the
/// engine's settings, the call's options and what it moves.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    /// A migrator was registered when the call began: batches go to it (one that
    /// unregisters meanwhile declines, and its batches fall back to the CPU copy).
    pub offload: bool,
    /// Runs move on a mover thread while the next piece is copied (see `mover`).
    pub threaded: bool,
    /// Replaced source pages are freed on the reaper thread.
    pub deferred: bool,
    /// Folios are copied as a batch (else one by one, in the move phase).
    pub batch_copy: bool,
    /// Runs move as soon as their copy completes.
    pub pipelined: bool,
    /// Each piece is protected and isolated just before its copy, so that the first folio
    /// does not wait for the whole batch to be isolated (the pipelined batch copy).
    pub lazy: bool,
    /// Destinations of base pages are left without pages and filled by `UFFDIO_COPY`.
    pub fill_empty: bool,
    /// The mover copies base pages of mappings without a memory policy of their own
    /// straight into the source (`UFFDIO_COPY` on a thread bound to the target node),
    /// with no destination at all.
    pub copy_in: bool,
    /// How destinations are populated.
    pub populate: Populate,
    /// How long isolating and copying one piece of the pipelined CPU copy may take, at the
    /// pace of the pieces before it (`migrate/piece_budget_us`).
    pub piece_budget: Option<Duration>,
    /// Each piece of the pipelined CPU copy is read while still writable, and only what
    /// differs is copied again once it is protected (`migrate/precopy`). Its destinations
    /// are populated (the pre-copy writes them with `read`), never filled empty, and
    /// nothing is copied in.
    pub precopy: bool,
    /// Bytes of huge-page destinations a helper thread keeps populated ahead of the
    /// call's next destination (`migrate/prepare_ahead_mib`); 0: none.
    pub prepare_ahead: usize,
    /// What that helper populates at most: what the first batch does not populate itself.
    pub prepare_budget: usize,
    /// A second thread copies each piece of the pipelined CPU copy with the caller
    /// (`migrate/copy_helper`; see `helper`).
    pub copy_helper: bool,
    /// The event reader answers a thread's fault on an isolated base page of a mapping
    /// without a memory policy of its own (`migrate/answer_faults`; see `events`).
    pub answer_faults: bool,
}

impl Plan {
    /// The plan for moving `items` (sorted by address) with the call's `settings`, with
    /// `free` bytes free on the target beyond its reserve. It counts on a mover thread
    /// where it wants one: see [`Plan::without_mover`].
    pub fn new(settings: &Settings, opts: &MigrateOptions, reason: Reason, items: &[Item], free: u64) -> Self {
        let offload = registry().enabled();
        let bytes: usize = items.iter().map(|it| it.folio.size()).sum();
        let batch_bytes = settings.max_batch_pages * sys::PAGE_SIZE;
        // Huge pages, in more than one batch (a batch's destination is taken whole), and
        // touched: only where the node has ample free memory. At least the next two
        // batches ahead.
        let prepare_ahead = if settings.prepare_ahead_mib > 0
            && items.iter().all(|it| it.folio.is_pmd())
            && bytes > batch_bytes
            && free >= 2 * bytes as u64
        {
            (settings.prepare_ahead_mib << 20).max(2 * batch_bytes).min(bytes)
        } else {
            0
        };
        // Base pages, more than one piece, the CPU copy: runs move on a mover thread while
        // the next piece is copied (see `mover`). Replacing base pages costs a good part of
        // their copy; a huge page's move costs little next to its copy, and moving it on
        // another CPU than the one that populates the next destination made the kernel's
        // huge-page allocation slower, so huge pages move here. A registered migrator
        // copies on threads of its own and its moves stay here.
        let batch_copy = reason.batch_eligible() && !opts.no_batch_copy;
        let pipelined = settings.pipelined;
        let lazy = batch_copy && pipelined && !opts.faults().fail_batch_copy;
        let precopy = settings.precopy && lazy && !offload;
        // The pre-copy moves each piece here, right after its comparison: queued behind the
        // mover's earlier moves, the program's threads waited for those too (512 KiB pieces
        // of base pages, one writer: p99 937 µs against 139 µs).
        // More than one huge page's worth: more than one piece, something to overlap.
        let several_pieces = bytes > sys::HPAGE_SIZE;
        let base_pages = !items.first().is_some_and(|it| it.folio.is_pmd());
        let threaded = settings.mover && several_pieces && base_pages && !offload && !precopy;
        Self {
            offload,
            threaded,
            // Calls of one huge page's worth or less free their old pages here: nothing is
            // left to overlap with, and the hand-off to the reaper and the wait for it cost
            // two wake-ups (64 KiB of base pages: 196 against 306 µs a call, 2-core AMD EPYC
            // VM, `examples/small_calls`).
            deferred: settings.deferred_free && several_pieces,
            batch_copy,
            pipelined,
            lazy,
            // A migrator that stores into its destinations itself gets populated ones, and
            // so does the pre-copy.
            fill_empty: settings.fill_empty && !precopy && (!offload || registry().active_fills_unpopulated()),
            copy_in: threaded && settings.copy_in && !precopy,
            // With a mover, destinations are populated by touching them, which does not
            // hold up its moves, where the node has free memory for twice the call beyond
            // its reserve (see `Populate`).
            populate: if threaded && free >= 2 * bytes as u64 { Populate::Touch } else { Populate::Madvise },
            piece_budget: (settings.piece_budget_us > 0)
                .then(|| Duration::from_micros(settings.piece_budget_us as u64)),
            precopy,
            prepare_ahead,
            prepare_budget: if prepare_ahead > 0 { bytes - batch_bytes } else { 0 },
            // Folios smaller than a huge page, more than one huge page's worth, where the
            // process may run on two CPUs or more: the CPU copy of each piece is shared (see
            // `helper`). A huge page's copy runs at the memory's bandwidth on one thread
            // already: shared, 1 GiB of 2 MiB folios moved no faster (2-core AMD EPYC VM,
            // 5 alternating pairs, end to end 0.93x; two threads' memcpy 1.0x of one).
            copy_helper: settings.copy_helper
                && lazy
                && !offload
                && !precopy
                && several_pieces
                && base_pages
                && crate::sys::usable_cpus() >= 2,
            answer_faults: settings.answer_faults,
        }
    }

    /// No mover thread could be started: the moves run on the caller, and what needs the
    /// mover is off.
    pub fn without_mover(self) -> Self {
        Self { threaded: false, copy_in: false, populate: Populate::Madvise, ..self }
    }
}

/// Migration state recorded on a destination in the unmap phase and read back in the move
/// phase: the user-space form of the kernel's `dst->migrate_info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MigrateInfo(u8);

impl MigrateInfo {
    /// The source was write-protected in the unmap phase: writers may be waiting, and must
    /// be woken once the folio moved or the migration was undone.
    const WAS_MAPPED: MigrateInfo = MigrateInfo(1 << 0);
    /// The source lay in an `mlock`ed mapping: lock the moved folio again.
    const WAS_MLOCKED: MigrateInfo = MigrateInfo(1 << 1);
    /// The batch copy already filled the destination: the move phase must not copy again.
    const ALREADY_COPIED: MigrateInfo = MigrateInfo(1 << 2);

    /// No state.
    const fn empty() -> Self {
        MigrateInfo(0)
    }

    /// Whether every bit of `other` is set.
    const fn contains(self, other: MigrateInfo) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the bits of `other`.
    fn insert(&mut self, other: MigrateInfo) {
        self.0 |= other.0;
    }

    /// Clears the bits of `other`.
    fn remove(&mut self, other: MigrateInfo) {
        self.0 &= !other.0;
    }
}

/// The state of one `migrate_pages` call shared by its batches.
pub(super) struct Call<'a> {
    pub engine: &'a Engine,
    /// The call's number in the claims ([`crate::migrate::busy::Claims::begin_call`]).
    pub call: u64,
    pub target: u32,
    pub opts: &'a MigrateOptions,
    pub plan: Plan,
    /// What the folios settled here came to.
    pub tally: &'a mut Tally,
    /// The mover thread, when the call has one; else runs move on this thread.
    pub mover: Option<&'a std::sync::mpsc::SyncSender<Job>>,
    /// Reports progress, from whichever thread moves.
    pub reporter: &'a mover::Reporter<'a>,
    /// Raised when caller code panicked: nothing more moves.
    pub abort: &'a Abort,
    /// The pre-copy's reader of the program's memory, where the plan pre-copies and one
    /// could be opened.
    pub procmem: Option<&'a crate::sys::ProcMem>,
    /// Folios whose pages were held elsewhere (`EBUSY`), for the next pass, with why.
    pub held: Vec<Held>,
    /// The thread that copies beside this one, where the plan has one and it started.
    pub helper: Option<&'a super::helper::CopyHelper>,
    /// How long the isolation's probes still wait on the program's changes
    /// (`mover::Patience::for_events`).
    pub probe_wait: crate::backoff::Backoff,
}

/// A folio held elsewhere for now, and what its last try failed with.
pub(super) struct Held {
    pub item: Item,
    pub op: &'static str,
    pub errno: Errno,
}

/// Contiguous folios of one batch with the same mapping state, moved in with one
/// `UFFDIO_MOVE` (or a few, when the pipelined move takes them as their copies complete).
struct Run {
    start: usize,
    end: usize,
    /// Indices into the batch's claimed items.
    items: Range<usize>,
    /// The destination and graveyard of `[cursor, end)`; `None` once the run is done, or
    /// when it got none.
    rest: Option<Staged>,
    /// Where the graveyard of `start` is (the old pages of `a` lie at
    /// `grave_base + (a - start)`).
    grave_base: usize,
    /// First address not yet moved or undone.
    cursor: usize,
    /// First item not yet moved or undone.
    next: usize,
    /// Copied by the mover straight from the graveyard into the source: its destination is
    /// only a placeholder, never written.
    copy_in: bool,
    /// The part of its destination populated piece by piece, just before each is copied
    /// (the pipelined copy; see `prepare`).
    later: Unpopulated,
}

/// One folio of a batch, with what the batch learnt of it.
struct Slot {
    item: Item,
    /// The state recorded on its destination (`WAS_MAPPED`, `WAS_MLOCKED`, `ALREADY_COPIED`).
    info: MigrateInfo,
    /// Why its protection or isolation was refused, if it was.
    refused: Option<(&'static str, Errno)>,
    /// Its run.
    run: usize,
}

/// One batch between isolation and the end of its move phase.
struct BatchState {
    /// The claimed folios, in address order.
    slots: Vec<Slot>,
    runs: Vec<Run>,
    /// Start of the unmap phase, for first-folio latency.
    started: Instant,
    first_done: bool,
}

impl BatchState {
    /// The items `items` of the batch.
    fn items(&self, items: Range<usize>) -> Vec<Item> {
        self.slots[items].iter().map(|slot| slot.item).collect()
    }

    /// Whether item `i`'s copy is complete.
    fn copied(&self, i: usize) -> bool {
        self.slots[i].info.contains(MigrateInfo::ALREADY_COPIED)
    }
}

impl<'a> Call<'a> {
    /// Counts a folio as failed, remembering the first error.
    pub fn fail(&mut self, item: &Item, err: Error) {
        self.tally.failed(item.folio, err);
    }

    fn fail_all(&mut self, items: &[Item], err: impl Fn() -> Error) {
        for item in items {
            self.fail(item, err());
        }
    }

    /// Runs the call's folios in batches, passing over busy ones again up to
    /// [`NR_MAX_MIGRATE_PASSES`] times.
    pub fn run_passes(&mut self, items: Vec<Item>, max_batch: usize, mode: Mode) {
        let mut queue = items;
        for pass in 0..NR_MAX_MIGRATE_PASSES {
            let mut retry = Vec::new();
            for batch in batches(&queue, max_batch) {
                retry.extend(self.run_batch(batch));
            }
            if retry.is_empty() {
                break;
            }
            if pass + 1 == NR_MAX_MIGRATE_PASSES {
                for held in retry {
                    self.fail(&held.item, Error::sys(held.op)(held.errno));
                }
                break;
            }
            self.tally.stats.retried_folios += retry.len() as u64;
            match mode {
                Mode::Async => std::thread::yield_now(),
                Mode::SyncLight => self.engine.busy.wait(Duration::from_millis(1)),
                Mode::Sync => self.engine.busy.wait(Duration::from_millis(100)),
            }
            queue = retry.into_iter().map(|held| held.item).collect();
        }
    }

    /// Runs one batch through its phases; returns the folios held elsewhere (another call's
    /// claim, a page pinned for now), for the next pass.
    pub fn run_batch(&mut self, batch: Vec<Item>) -> Vec<Held> {
        let engine = self.engine;
        // The pages this batch empties wait for its own copies: see `fork::open`.
        let _fork_batch = super::fork::Batch::start();
        if let Some(stop) = self.stop_reason() {
            self.fail_all(&batch, stop);
            return Vec::new();
        }
        // Claim.
        if let Some(handshake) = &self.opts.faults().claim_handshake {
            handshake.meet();
        }
        let (claimed, claims, mut held) = self.claim(&batch);
        if claimed.is_empty() {
            return held;
        }
        self.tally.stats.batches += 1;
        // Should pagemig itself panic below, what the batch claimed and protected is undone
        // behind the moves already queued.
        let guard = BatchGuard {
            engine,
            mover: self.mover.cloned(),
            abort: self.abort,
            claims: Some(claims),
            spans: super::checks::contiguous_runs(claimed.iter().map(|it| it.folio)),
        };
        let runs = split_runs(&claimed);
        let mut slots: Vec<Slot> =
            claimed.into_iter().map(|item| Slot { item, info: MigrateInfo::empty(), refused: None, run: 0 }).collect();
        for (r, run) in runs.iter().enumerate() {
            slots[run.items.clone()].iter_mut().for_each(|slot| slot.run = r);
        }
        let mut st = BatchState { slots, runs, started: Instant::now(), first_done: false };
        // Prepare.
        self.prepare(&mut st);
        st.started = Instant::now();
        // Isolate, unless each piece is isolated just before its copy.
        if !self.plan.lazy {
            self.unmap(&mut st);
        }
        // Copy. Items whose isolation failed are out: their graveyard part holds nothing to
        // copy.
        let live: Vec<usize> = st
            .runs
            .iter()
            .filter(|r| r.rest.is_some())
            .flat_map(|r| r.items.clone())
            .filter(|&i| self.plan.lazy || st.slots[i].info.contains(MigrateInfo::WAS_MAPPED))
            .collect();
        if self.plan.lazy && !live.is_empty() {
            self.copy_pieces(&mut st, &live);
        } else if self.plan.batch_copy && !live.is_empty() {
            self.batch_copy(&mut st, &live, true);
        } else {
            self.tally.stats.single_copied_folios += live.len() as u64;
        }
        // Move what is left, copying folio by folio what the batch copy did not; undo what
        // fails.
        for r in 0..st.runs.len() {
            self.copy_rest_and_move(&mut st, r);
        }
        // Released after the batch's moves (the mover keeps the order of its jobs).
        let claims = guard.disarm();
        self.submit(Job::Release(claims));
        held.append(&mut self.held);
        held
    }

    /// Why no more folios of the call may start: a panic, the caller's cancel, the deadline.
    fn stop_reason(&self) -> Option<fn() -> Error> {
        if self.abort.is_set() {
            return Some(stopped);
        }
        if self.opts.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            return Some(|| Error::sys("migrate (cancelled by the caller)")(Errno::CANCELED));
        }
        if self.opts.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(|| Error::sys("migrate (the deadline passed)")(Errno::TIMEDOUT));
        }
        None
    }

    /// Hands a job to the mover thread, or does it here when the call has none.
    ///
    /// A copy-in job the mover has no room for is done here, so that both threads copy:
    /// copying in is most of the work, and the order of moves matters only to the claims'
    /// release, which goes to the mover after the batch's every move.
    fn submit(&mut self, job: Job) {
        let job = match (job, self.mover) {
            (Job::Move(m), Some(tx)) if m.copy_in => match tx.try_send(Job::Move(m)) {
                Ok(()) => return,
                Err(std::sync::mpsc::TrySendError::Full(job) | std::sync::mpsc::TrySendError::Disconnected(job)) => job,
            },
            (job, _) => match mover::send(self.mover, job) {
                Some(job) => job,
                None => return,
            },
        };
        // A page copied in here is allocated by this thread: bound to the target meanwhile.
        let _binding = matches!(&job, Job::Move(m) if m.copy_in).then(|| {
            let mut binding = sys::PolicyBinding::new();
            binding.bind(self.target);
            binding
        });
        mover::run(self.engine, job, self.tally, self.reporter, self.abort);
    }
}

/// Hands `batch` to the active migrator under `catch_unwind`: a panic stops the call
/// (`ECANCELED` here) and whatever the migrator did not report complete is undone.
fn dispatch(abort: &Abort, batch: &Batch<'_>) -> Option<Result<(), Errno>> {
    match registry().dispatch_caught(batch)? {
        Ok(result) => Some(result),
        Err(message) => {
            abort.raise("the migrator", message);
            Some(Err(Errno::CANCELED))
        }
    }
}

/// The error of a folio left as it was because the call stopped after a panic.
fn stopped() -> Error {
    Error::sys(STOPPED)(Errno::CANCELED)
}

/// What a batch claimed and protected, undone if pagemig panics before the batch ends.
struct BatchGuard<'a> {
    engine: &'a Engine,
    mover: Option<std::sync::mpsc::SyncSender<Job>>,
    abort: &'a Abort,
    /// `None` once the batch ended normally.
    claims: Option<Vec<usize>>,
    spans: Vec<super::Span>,
}

impl BatchGuard<'_> {
    /// The batch ended normally: hands back its claims to be released in order.
    fn disarm(mut self) -> Vec<usize> {
        self.claims.take().unwrap_or_default()
    }
}

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        let Some(claims) = self.claims.take() else { return };
        self.abort.raise("pagemig", "a panic in the migration pipeline".into());
        let jobs = [Job::Undo(std::mem::take(&mut self.spans)), Job::Release(claims)];
        for job in jobs {
            let Some(job) = mover::send(self.mover.as_ref(), job) else { continue };
            mover::run(self.engine, job, &mut Tally::default(), &mover::Reporter::new(None), self.abort);
        }
    }
}

/// The largest piece of the pipelined CPU copy of huge pages. A thread of the program that
/// touches a piece waits for all of it (its isolation, copy and move). 512 MiB of 2 MiB
/// folios in one batch (262144 pages), one writer storing into every page: its longest wait
/// on memory median 430 µs with pieces of 8 MiB against 1275 with 16 MiB, 10 alternating
/// pairs, end to end 1.05x pairwise; without writers, 1 GiB in one batch, the critical path
/// 1.03x (8 pairs; 2-core AMD EPYC VM). Batches of 16 MiB or less are cut the same either way.
const CPU_PIECE_MAX: usize = 8 << 20;

/// The largest piece of the pipelined CPU copy of folios smaller than a huge page. A thread
/// of the program that touches a page of a piece being protected waits until the whole
/// stretch is isolated, and a piece of base pages takes long to isolate, fill and move in.
/// 512 MiB of 4 KiB folios in one batch, one writer: its longest store took 1.7-5.5 ms
/// (median 2.9) with pieces of 4 MiB, 5.1-8.5 ms (median 6.3) with pieces of 16 MiB, 6 runs
/// each; with the copying threads answering faults, its longest wait on memory median 535
/// µs with pieces of 2 MiB against 1138 with 4 MiB, 6 alternating pairs, throughput 1.0x
/// pairwise. Without writers, 1 GiB in one batch: 0.95x (median of 11 pairs, both orders) for
/// 2 MiB pieces against 4 MiB (2-core AMD EPYC VM), the price of a stall half as long. The
/// default batch (2 MiB) is one piece either way.
const BASE_PIECE_MAX: usize = 2 << 20;

/// The smallest piece [`Plan::piece_budget`] may ask for: below it, each piece's own
/// system calls cost more than the wait they save.
const PIECE_MIN: usize = 512 << 10;

/// The piece of the pre-copy ([`Plan::precopy`]), or one folio where a folio is larger:
/// the program's threads wait for the protection, isolation, comparison and move of one
/// piece, and its comparison reads what the read just brought into the cache. Measured
/// with one writer storing into 512 MiB of base pages at batch 262144 (2-core AMD EPYC):
/// 64 KiB pieces, 0.39 GB/s critical path; 128 KiB, 0.58 (longest store 385 µs, p99
/// 122 µs); 256 KiB, 0.91 (522 µs, 182 µs); 512 KiB, 0.95 (662 µs, 139 µs).
const PRECOPY_PIECE: usize = 256 << 10;

/// What a folio whose mapping the program unmapped or changed after the call began fails
/// with.
const CHANGED: &str = "migrate (the memory was unmapped or changed meanwhile)";

/// What a folio another call held through every pass fails with.
const BUSY_ELSEWHERE: &str = "migrate (folio busy in another migration)";

/// Groups claimed items (sorted by address) into contiguous runs of equal mapping state.
fn split_runs(claimed: &[Item]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, item) in claimed.iter().enumerate() {
        match runs.last_mut() {
            Some(r)
                if r.end == item.folio.addr()
                    && claimed[r.items.start].locked == item.locked
                    && claimed[r.items.start].thp == item.thp
                    && claimed[r.items.start].own_policy == item.own_policy =>
            {
                r.end = item.folio.end();
                r.items.end = i + 1;
            }
            _ => runs.push(Run {
                start: item.folio.addr(),
                end: item.folio.end(),
                items: i..i + 1,
                rest: None,
                grave_base: 0,
                cursor: item.folio.addr(),
                next: i,
                copy_in: false,
                later: Unpopulated::NONE,
            }),
        }
    }
    runs
}

/// Splits the queue into batches of at most `max_pages` base pages (a folio larger than
/// the bound forms a batch of its own).
fn batches(items: &[Item], max_pages: usize) -> Vec<Vec<Item>> {
    let mut out: Vec<Vec<Item>> = Vec::new();
    let mut pages = 0;
    for item in items {
        let n = item.folio.nr_pages();
        match out.last_mut() {
            Some(b) if pages + n <= max_pages => {
                b.push(*item);
                pages += n;
            }
            _ => {
                out.push(vec![*item]);
                pages = n;
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(unsafe_code, reason = "folios made from plain addresses to test the bookkeeping")]
mod tests {
    use super::*;
    use crate::folio::Folio;
    use crate::pool::ThpAdvice;
    use crate::testing::watchdog;

    fn item(addr: usize, size: usize) -> Item {
        // SAFETY: describes an address only; nothing migrates it.
        let folio = unsafe { Folio::new(addr, size) }.unwrap();
        Item { folio, index: 0, locked: false, thp: ThpAdvice::Default, own_policy: false }
    }

    #[test]
    fn batches_respect_the_bound() {
        watchdog(60, || {
            let items: Vec<_> = (1..=10).map(|i| item(i * 4096, 4096)).collect();
            let b = batches(&items, 4);
            assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
            let big = [item(2 << 20, 2 << 20), item(4 << 20, 2 << 20)];
            assert_eq!(batches(&big, 1).len(), 2);
            assert_eq!(batches(&big, 1024).len(), 1);
        });
    }

    #[test]
    fn migrate_info_flags() {
        watchdog(60, || {
            let mut i = MigrateInfo::empty();
            i.insert(MigrateInfo::WAS_MAPPED);
            i.insert(MigrateInfo::ALREADY_COPIED);
            assert!(i.contains(MigrateInfo::WAS_MAPPED) && !i.contains(MigrateInfo::WAS_MLOCKED));
            i.remove(MigrateInfo::ALREADY_COPIED);
            assert!(!i.contains(MigrateInfo::ALREADY_COPIED));
        });
    }
}
