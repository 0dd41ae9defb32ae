//! The batch migration pipeline: `migrate_pages(folios, target node, reason, mode)`.
//!
//! A call is checked as a whole before anything is touched (shapes, node, what the memory
//! is, free memory on the target, `vm.max_map_count`), then runs in batches of at most
//! `max_batch_pages` base pages. Each batch, like the kernel's `migrate_pages_batch()`:
//!
//! 1. **isolate** its folios (a folio another call is moving is busy: `EAGAIN`, retried on a
//!    later pass, ten passes at most);
//! 2. takes **destinations** on the target node from the [`Pool`];
//! 3. **unmaps** each contiguous run with one userfaultfd write-protect call: writers, user
//!    or kernel, now sleep; readers go on. `WAS_MAPPED` / `WAS_MLOCKED` are recorded on the
//!    destinations;
//! 4. **batch-copies** the folios whose reason is batch-eligible ([`Reason::batch_eligible`])
//!    with `folios_copy`, marking them `ALREADY_COPIED`; on failure they fall back to the
//!    per-folio copy;
//! 5. **moves** each run: copies what is not yet copied, `mremap`s the destination over the
//!    source in one call, locks it again where it was locked, and wakes the writers;
//! 6. **undoes** whatever could not move: protection off, writers woken, destination given
//!    back, source untouched.

mod abort;
mod busy;
mod events;
mod fork;
mod mover;
mod pipeline;
pub mod policy;
mod reaper;
pub mod stats;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use policy::{Mode, Reason};
pub use stats::MigrateStats;

use crate::error::{Error, Result};
use crate::folio::Folio;
use crate::maps::{self, Vma};
use crate::numa;
use crate::pool::{Pool, Populate, ThpAdvice};
use crate::sys::{self, Errno, uffd::Uffd};
use busy::Busy;

/// The default bound on a batch, in base pages (the kernel's `NR_MAX_BATCHED_MIGRATION`).
pub const DEFAULT_MAX_BATCH_PAGES: usize = 512;
/// The largest accepted `max_batch_pages` (1 GiB of base pages).
pub const MAX_BATCH_PAGES_LIMIT: usize = 262_144;
/// Passes over busy folios before they fail with `EAGAIN` (`NR_MAX_MIGRATE_PAGES_RETRY`).
pub const NR_MAX_MIGRATE_PASSES: usize = 10;
/// Bytes the destination pool keeps populated ahead of use per node, at most.
pub const DEFAULT_POOL_LIMIT: usize = 64 << 20;
/// Bytes of replaced source pages that may wait for the reaper thread, at most.
pub const DEFAULT_REAPER_BACKLOG: usize = 64 << 20;
/// Free memory left untouched on the target node.
const NODE_RESERVE: u64 = 32 << 20;

/// Checks a `max_batch_pages` value.
///
/// # Errors
/// [`Error::Invalid`] unless `1 <= pages <= 262144`.
pub fn check_max_batch_pages(pages: usize) -> Result<usize> {
    if (1..=MAX_BATCH_PAGES_LIMIT).contains(&pages) {
        Ok(pages)
    } else {
        Err(Error::Invalid(format!("max_batch_pages {pages} is outside 1..={MAX_BATCH_PAGES_LIMIT}")))
    }
}

/// Failures to inject, to exercise the fallback and undo paths on real memory.
#[derive(Clone, Debug, Default)]
pub struct FaultInjection {
    /// Make the batch copy fail: its folios fall back to the per-folio copy.
    pub fail_batch_copy: bool,
    /// Make the per-folio copy of these folios fail (indices into the call's folios sorted
    /// by address): they are undone and reported as failed.
    pub fail_folio_copy: Vec<usize>,
    /// Pause for this long before the per-folio copy of the folio at this index (sorted by
    /// address), while it is write-protected: lets a test act on memory mid-migration.
    pub delay_folio_copy: Option<(usize, Duration)>,
    /// Pause for this long before every move, with the copy made and the source empty:
    /// lets a test act on memory between copy and move.
    pub delay_move: Option<Duration>,
    /// Make the move of the runs holding these folios fail as a refused move would
    /// (indices as above): their folios are undone and reported as failed.
    pub fail_move: Vec<usize>,
}

/// A callback told the number of bytes moved so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Per-call settings.
#[derive(Clone, Default)]
pub struct MigrateOptions {
    /// Bound on a batch in base pages; `None` takes the engine's setting.
    pub max_batch_pages: Option<usize>,
    /// Copy folio by folio even where the reason allows a batch copy (for a
    /// latency-sensitive caller).
    pub no_batch_copy: bool,
    /// Move each run as soon as its copy completes (`None`: the engine's setting,
    /// `migrate/pipelined`).
    pub pipelined: Option<bool>,
    /// Free replaced source pages on a background thread (`None`: the engine's setting,
    /// `migrate/deferred_free`).
    pub deferred_free: Option<bool>,
    /// Move base-page runs on a mover thread while the next piece is copied (`None`: the
    /// engine's setting, `migrate/mover`).
    pub mover: Option<bool>,
    /// Failures to inject.
    pub fault: FaultInjection,
    /// Called after every moved run with the bytes moved so far.
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for MigrateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateOptions")
            .field("max_batch_pages", &self.max_batch_pages)
            .field("no_batch_copy", &self.no_batch_copy)
            .field("pipelined", &self.pipelined)
            .field("deferred_free", &self.deferred_free)
            .field("mover", &self.mover)
            .field("fault", &self.fault)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What this kernel and process allow.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Capabilities {
    /// Only user-mode faults wait: kernel writes into migrating memory (`read(2)` into the
    /// buffer, `O_DIRECT`, `process_vm_writev`) fail with `EFAULT` instead.
    pub user_mode_only: bool,
    /// Never-touched pages can be protected without populating them first.
    pub wp_unpopulated: bool,
}

impl Capabilities {
    /// A sentence for users about what the capabilities mean.
    pub fn describe(&self) -> &'static str {
        if self.user_mode_only {
            "userfaultfd is limited to user-mode faults: kernel writes into migrating memory fail with EFAULT"
        } else {
            "userfaultfd handles kernel-mode faults: kernel writes into migrating memory wait for the move"
        }
    }
}

/// The migration engine: a userfaultfd, the destination pool and the set of folios in
/// flight. One per process is enough ([`Engine::global`]); several may coexist as long as
/// they migrate different memory.
#[derive(Debug)]
pub struct Engine {
    uffd: Arc<Uffd>,
    pool: Pool,
    busy: Arc<Busy>,
    max_batch_pages: AtomicUsize,
    pipelined: AtomicBool,
    deferred_free: AtomicBool,
    mover: AtomicBool,
    reaper: reaper::Reaper,
    /// Read by its own thread; stopped when the engine drops.
    #[expect(dead_code, reason = "held for its Drop, which stops the reader thread")]
    events: events::Reader,
}

/// One folio of a call with the state of the mapping it lives in.
#[derive(Clone, Copy, Debug)]
struct Item {
    folio: Folio<'static>,
    /// Index in the call's folios sorted by address.
    index: usize,
    locked: bool,
    thp: ThpAdvice,
}

impl Engine {
    /// Opens a userfaultfd and makes an empty pool.
    ///
    /// # Errors
    /// [`Error::Sys`] when userfaultfd cannot be opened (no permission, no kernel support).
    pub fn new() -> Result<Self> {
        fork::install();
        let uffd = Arc::new(Uffd::open().map_err(Error::sys("userfaultfd"))?);
        let busy = Arc::new(Busy::default());
        let events = events::Reader::spawn(uffd.clone(), busy.clone()).map_err(Error::sys("event reader thread"))?;
        Ok(Self {
            reaper: reaper::Reaper::new(uffd.clone(), DEFAULT_REAPER_BACKLOG),
            uffd,
            pool: Pool::new(DEFAULT_POOL_LIMIT),
            busy,
            max_batch_pages: AtomicUsize::new(DEFAULT_MAX_BATCH_PAGES),
            pipelined: AtomicBool::new(true),
            deferred_free: AtomicBool::new(true),
            mover: AtomicBool::new(true),
            events,
        })
    }

    /// The process-wide engine, opened on first use.
    ///
    /// # Errors
    /// As [`Engine::new`], on every call once opening failed.
    pub fn global() -> Result<&'static Engine> {
        static GLOBAL: OnceLock<std::result::Result<Engine, Errno>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Engine::new().map_err(|e| e.errno()))
            .as_ref()
            .map_err(|&errno| Error::Sys { op: "userfaultfd", errno })
    }

    /// What the kernel allows this process.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities { user_mode_only: self.uffd.user_mode_only(), wp_unpopulated: self.uffd.wp_unpopulated() }
    }

    /// The destination pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The bound on a batch, in base pages.
    pub fn max_batch_pages(&self) -> usize {
        self.max_batch_pages.load(Ordering::Relaxed)
    }

    /// Whether runs move as soon as their copy completes (`migrate/pipelined`).
    pub fn pipelined(&self) -> bool {
        self.pipelined.load(Ordering::Relaxed)
    }

    /// Whether replaced source pages are freed on a background thread
    /// (`migrate/deferred_free`).
    pub fn deferred_free(&self) -> bool {
        self.deferred_free.load(Ordering::Relaxed)
    }

    /// Whether calls of base-page folios move runs on a mover thread (`migrate/mover`).
    pub fn mover(&self) -> bool {
        self.mover.load(Ordering::Relaxed)
    }

    /// Sets whether calls of base-page folios move runs on a mover thread.
    pub fn set_mover(&self, on: bool) {
        self.mover.store(on, Ordering::Relaxed);
    }

    /// Sets whether replaced source pages are freed on a background thread.
    pub fn set_deferred_free(&self, on: bool) {
        self.deferred_free.store(on, Ordering::Relaxed);
    }

    /// Sets whether runs move as soon as their copy completes.
    pub fn set_pipelined(&self, on: bool) {
        self.pipelined.store(on, Ordering::Relaxed);
    }

    /// Sets the bound on a batch.
    ///
    /// # Errors
    /// [`Error::Invalid`] unless `1 <= pages <= 262144`.
    pub fn set_max_batch_pages(&self, pages: usize) -> Result<()> {
        self.max_batch_pages.store(check_max_batch_pages(pages)?, Ordering::Relaxed);
        Ok(())
    }

    /// Migrates `folios` to `target`.
    ///
    /// Every folio must lie in private, anonymous, read-write memory of this process; the
    /// folios may be given in any order but must not overlap. Data written to the folios
    /// while they migrate, by any thread or by the kernel, is never lost.
    ///
    /// # Errors
    /// Before touching anything: [`Error::Invalid`] for no folios, overlapping folios or a
    /// bad `max_batch_pages`; [`Error::UnknownNode`]; [`Error::NotMovable`] for memory
    /// pagemig may not move; [`Error::NodeFull`] or [`Error::MapCountLimit`] (`ENOMEM`).
    /// After some folios moved: [`Error::Partial`] with the stats and the first error; the
    /// folios that did not move are exactly as they were.
    pub fn migrate_pages(
        &self,
        folios: &[Folio<'_>],
        target: u32,
        reason: Reason,
        mode: Mode,
        opts: &MigrateOptions,
    ) -> Result<MigrateStats> {
        let started = Instant::now();
        let max_batch = check_max_batch_pages(opts.max_batch_pages.unwrap_or_else(|| self.max_batch_pages()))?;
        let (items, runs, free) = self.prepare_call(folios, target)?;
        let mut stats = MigrateStats { folios: items.len() as u64, ..Default::default() };
        let register_start = Instant::now();
        // Every run registered once, up front, in missing and write-protect mode: batches
        // then only protect, and the program's mappings are not split batch by batch (an
        // `mremap` of a range inside one run still finds one mapping). A run that cannot
        // be registered here fails in its batches, with the error.
        for &(s, e) in &runs {
            let _ = self.uffd.register_missing_wp(s, e - s);
        }
        stats.unmap_ns += register_start.elapsed().as_nanos() as u64;
        let mut first_error = None;
        let deferred = opts.deferred_free.unwrap_or_else(|| self.deferred_free());
        // Base pages, more than one piece, the CPU copy: runs move on a mover thread while
        // the next piece is copied (see `mover`). Replacing base pages costs a good part of
        // their copy; a huge page's move costs little next to its copy, and moving it on
        // another CPU than the one that populates the next destination made the kernel's
        // huge-page allocation slower, so huge pages move here. A registered migrator
        // copies on threads of its own and its moves stay here.
        let bytes: usize = items.iter().map(|it| it.folio.size()).sum();
        let threaded = opts.mover.unwrap_or_else(|| self.mover())
            && bytes > sys::HPAGE_SIZE
            && !items[0].folio.is_pmd()
            && !crate::offload::registry().enabled();
        let progress = opts.progress.as_ref();
        let abort = abort::Abort::default();
        let abort = &abort;
        let tally = std::thread::scope(|s| {
            // Without a mover thread (none could be spawned) the moves run here.
            let (tx, rx) = crossbeam::channel::bounded(mover::QUEUE);
            let mover = threaded
                .then(|| {
                    std::thread::Builder::new()
                        .name("pagemig-mover".into())
                        .spawn_scoped(s, move || mover::serve(self, rx, progress, abort))
                        .ok()
                })
                .flatten();
            let tx = mover.is_some().then_some(tx);
            let mut ctx = pipeline::Call {
                engine: self,
                target,
                reason,
                opts,
                deferred,
                stats: &mut stats,
                first_error: &mut first_error,
                mover: tx.as_ref(),
                // With a mover, destinations are populated by touching them, which does not
                // hold up its moves, where the node has free memory for twice the call beyond
                // its reserve (see `Populate`).
                populate: if tx.is_some() && free >= 2 * bytes as u64 { Populate::Touch } else { Populate::Madvise },
                abort,
                held: Vec::new(),
                held_why: Default::default(),
            };
            // A panic of pagemig's own stops the call like one in caller code: the batch's
            // guard has undone what it held; the folios not reached fail.
            let passes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ctx.run_passes(items, max_batch, mode);
            }));
            if let Err(payload) = passes {
                abort.raise("pagemig", crate::offload::registry::panic_message(payload.as_ref()));
            }
            drop(tx);
            mover.and_then(|h| h.join().ok())
        });
        if let Some(tally) = tally {
            stats.accumulate(&tally.stats);
            stats.mover_runs = tally.stats.runs;
            if first_error.is_none() {
                first_error = tally.first_error;
            }
        }
        // Registration off, for the runs' every page that is not another call's now.
        let folio_at = |a: usize| items_size_at(folios, a);
        pipeline::unregister_runs(self, &runs, folio_at);
        // The migration itself ends here; what follows frees old pages off its path.
        stats.critical_ns = (register_start.elapsed().as_nanos() as u64).saturating_sub(stats.prepare_ns);
        if deferred {
            // The call ends when the old pages are freed too.
            self.reaper.drain();
        }
        stats.total_ns = started.elapsed().as_nanos() as u64;
        if let Some((what, message)) = abort.take() {
            return Err(Error::Panicked { what, message, stats: Box::new(stats) });
        }
        match first_error {
            Some(first) if stats.failed_folios > 0 => Err(Error::Partial {
                failed: stats.failed_folios,
                total: stats.folios,
                first: Box::new(first),
                stats: Box::new(stats),
            }),
            _ => Ok(stats),
        }
    }

    /// Checks a whole call before anything is touched and pairs each folio with the state
    /// of its mapping.
    /// Also returns the target's free memory beyond its reserve.
    fn prepare_call(&self, folios: &[Folio<'_>], target: u32) -> Result<(Vec<Item>, Vec<Span>, u64)> {
        if folios.is_empty() {
            return Err(Error::Invalid("no folios to migrate (zero length)".into()));
        }
        numa::check_node(target)?;
        let mut sorted: Vec<Folio<'static>> = folios.iter().map(|f| f.erased()).collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0].end() > w[1].addr()) {
            return Err(Error::Invalid(format!("folios at {:#x} and {:#x} overlap", w[0].addr(), w[1].addr())));
        }
        let (lo, hi) = (sorted[0].addr(), sorted[sorted.len() - 1].end());
        let vmas = maps::vmas_with_flags(lo, hi)?;
        let runs = contiguous_runs(sorted.iter().copied());
        let own_stack = sys::current_thread_stack();
        for &(s, e) in &runs {
            maps::check_movable(s, e, &vmas)?;
            // The migrating thread writes its own stack: protecting it would deadlock.
            if let Some((ss, se)) = own_stack.filter(|&(ss, se)| s < se && ss < e) {
                return Err(Error::NotMovable {
                    start: s.max(ss),
                    end: e.min(se),
                    why: "the calling thread's own stack".into(),
                });
            }
        }
        let limit = sys::max_map_count();
        let current = maps::vma_count()?;
        let needed = current + 2 * runs.len() + 16;
        if needed > limit {
            return Err(Error::MapCountLimit { current, needed, limit });
        }
        let bytes: u64 = sorted.iter().map(|f| f.size() as u64).sum();
        let free = self.check_free_memory(target, bytes, &runs)?;
        Ok((attach_vma_state(&sorted, &vmas), runs, free))
    }

    /// Checks that `target` can take `bytes`; returns its free memory beyond the reserve.
    fn check_free_memory(&self, target: u32, bytes: u64, runs: &[(usize, usize)]) -> Result<u64> {
        let (_, mem_free) = numa::meminfo(target)?;
        let free = mem_free.saturating_sub(NODE_RESERVE);
        if bytes <= free {
            return Ok(free);
        }
        // Pages already on the target free as much as they take.
        let mut needed = 0u64;
        for &(s, e) in runs {
            let here = numa::page_nodes(s, e - s)?.iter().filter(|&&n| n == target as i32).count();
            needed += (e - s) as u64 - (here * sys::PAGE_SIZE) as u64;
        }
        if needed <= free {
            Ok(free)
        } else {
            Err(Error::NodeFull { node: target, needed, free: mem_free, reserve: NODE_RESERVE })
        }
    }
}

/// Migrates `folios` to `target` with the process-wide [`Engine`] and default options.
///
/// # Errors
/// As [`Engine::migrate_pages`], or [`Error::Sys`] when no userfaultfd can be opened.
pub fn migrate_pages(folios: &[Folio<'_>], target: u32, reason: Reason, mode: Mode) -> Result<MigrateStats> {
    Engine::global()?.migrate_pages(folios, target, reason, mode, &MigrateOptions::default())
}

/// The size of the folio of `folios` at `addr` (base pages where none starts there).
fn items_size_at(folios: &[Folio<'_>], addr: usize) -> usize {
    folios.iter().find(|f| f.addr() <= addr && addr < f.end()).map_or(sys::PAGE_SIZE, |f| f.size())
}

/// An address range as `(start, end)`.
pub(crate) type Span = (usize, usize);

/// Maximal runs of contiguous folios, as `(start, end)`.
fn contiguous_runs<'a>(sorted: impl IntoIterator<Item = Folio<'a>>) -> Vec<Span> {
    let mut runs: Vec<Span> = Vec::new();
    for f in sorted {
        match runs.last_mut() {
            Some(last) if last.1 == f.addr() => last.1 = f.end(),
            _ => runs.push((f.addr(), f.end())),
        }
    }
    runs
}

fn attach_vma_state(sorted: &[Folio<'static>], vmas: &[Vma]) -> Vec<Item> {
    let mut v = 0;
    sorted
        .iter()
        .enumerate()
        .map(|(index, &folio)| {
            while v + 1 < vmas.len() && vmas[v].end <= folio.addr() {
                v += 1;
            }
            let vma = vmas.get(v).filter(|m| m.start <= folio.addr() && folio.addr() < m.end);
            let flag = |f: &str| vma.is_some_and(|m| m.has_flag(f));
            let thp = if flag("hg") {
                ThpAdvice::Huge
            } else if flag("nh") {
                ThpAdvice::NoHuge
            } else {
                ThpAdvice::Default
            };
            Item { folio, index, locked: flag("lo"), thp }
        })
        .collect()
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

    fn item(addr: usize, size: usize) -> Item {
        // SAFETY: describes an address only; nothing migrates it.
        Item { folio: unsafe { Folio::new(addr, size) }.unwrap(), index: 0, locked: false, thp: ThpAdvice::Default }
    }

    #[test]
    fn batches_respect_the_bound() {
        let items: Vec<_> = (1..=10).map(|i| item(i * 4096, 4096)).collect();
        let b = batches(&items, 4);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let big = [item(2 << 20, 2 << 20), item(4 << 20, 2 << 20)];
        assert_eq!(batches(&big, 1).len(), 2);
        assert_eq!(batches(&big, 1024).len(), 1);
    }

    #[test]
    fn runs_merge_contiguous_folios() {
        // SAFETY: these folios describe addresses only; nothing migrates them.
        let f: Vec<_> = [0x1000, 0x2000, 0x4000].iter().map(|&a| unsafe { Folio::new(a, 4096) }.unwrap()).collect();
        assert_eq!(contiguous_runs(f), [(0x1000, 0x3000), (0x4000, 0x5000)]);
    }

    #[test]
    fn batch_bound_is_checked() {
        assert!(check_max_batch_pages(0).is_err());
        assert!(check_max_batch_pages(262_145).is_err());
        assert_eq!(check_max_batch_pages(1).unwrap(), 1);
        assert_eq!(check_max_batch_pages(262_144).unwrap(), 262_144);
    }
}
