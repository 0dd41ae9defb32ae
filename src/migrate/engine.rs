//! The engine: a userfaultfd, the destination pool, the claims on folios in flight, the
//! event reader and the reaper; and one call of `migrate_pages` read top to bottom.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::busy::Busy;
use super::checks::{items_size_at, prepare_call};
use super::options::DEFAULT_REAPER_BACKLOG;
use super::outcome::Tally;
use super::settings::{Settings, SettingsCell};
use super::{
    Capabilities, MigrateOptions, MigrateStats, Mode, Reason, abort, events, mover, pipeline, reaper, zerofill,
};
use crate::error::{Error, Result};
use crate::folio::Folio;
use crate::pool::{Key, Pool, ThpAdvice};
use crate::sys::{Errno, uffd::Uffd, vault::Vault};

/// The migration engine: a userfaultfd, the destination pool and the set of folios in
/// flight. One per process is enough ([`Engine::global`]); several may coexist as long as
/// they migrate different memory.
#[derive(Debug)]
pub struct Engine {
    pub(super) uffd: Arc<Uffd>,
    pub(super) pool: Pool,
    pub(super) busy: Arc<Busy>,
    settings: SettingsCell,
    pub(super) reaper: reaper::Reaper,
    /// What `move_pages` and `move_range` did.
    pub(super) pages_counters: super::pages::Counters,
    /// Read by its own thread (stopped when the engine drops), and by a call's copying
    /// threads between chunks ([`events::Reader::serve_now`]).
    pub(super) events: events::Reader,
    /// Keeps the two userfaultfds open whatever the program does to its descriptors (see
    /// `sys::vault`); `None` where the kernel does not let it.
    vault: Option<Arc<Vault>>,
    /// Answers stray faults in the engine's own empty destinations and graveyards.
    #[expect(dead_code, reason = "held for its Drop, which stops the handler thread")]
    pub(super) zerofill: zerofill::ZeroFill,
}

impl Engine {
    /// Opens a userfaultfd and makes an empty pool.
    ///
    /// # Errors
    /// [`Error::Sys`] when userfaultfd cannot be opened (no permission, no kernel support).
    pub fn new() -> Result<Self> {
        super::fork::install();
        let uffd = Arc::new(Uffd::open().map_err(Error::sys("userfaultfd"))?);
        let graves = Arc::new(Uffd::open_for_moves().map_err(Error::sys("userfaultfd (graveyards)"))?);
        // Kept open whatever the program does to its descriptors, mid-call too (see `vault`).
        let vault = Vault::new(&[uffd.raw_fd(), graves.raw_fd()]);
        if let Some(vault) = &vault {
            uffd.entrust(vault);
            graves.entrust(vault);
        }
        let busy = Arc::new(Busy::default());
        let events = events::Reader::spawn(uffd.clone(), graves.clone(), busy.clone())
            .map_err(Error::sys("event reader thread"))?;
        let zerofill = zerofill::ZeroFill::spawn(graves.clone()).map_err(Error::sys("fault handler thread"))?;
        Ok(Self {
            reaper: reaper::Reaper::new(graves.clone(), DEFAULT_REAPER_BACKLOG),
            uffd,
            pool: Pool::with_fill_uffd(graves),
            busy,
            settings: SettingsCell::new(Settings::default()),
            pages_counters: Default::default(),
            events,
            vault,
            zerofill,
        })
    }

    /// Takes the settings (the `migrate/*` attributes an engine holds) of `from`.
    pub(crate) fn take_settings(&self, from: &Engine) {
        let theirs = from.settings();
        let _ = self.settings.update(|s| *s = theirs);
    }

    /// The engine's settings: the defaults of its calls.
    pub fn settings(&self) -> Settings {
        self.settings.get()
    }

    /// Changes the engine's settings with `change` (for the calls that begin from now on);
    /// returns them.
    ///
    /// ```no_run
    /// let engine = pagemig::Engine::global()?;
    /// engine.update_settings(|s| s.max_batch_pages = 4096)?;
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Invalid`] for a value out of bounds (`max_batch_pages` outside 1 ..=
    /// 262144); nothing changes then.
    pub fn update_settings(&self, change: impl Fn(&mut Settings)) -> Result<Settings> {
        self.settings.update(change)
    }

    /// Gives back the pool's prepared destinations (an engine replaced after its
    /// descriptors were lost: of no use to anyone now).
    pub(crate) fn clear_pool(&self) {
        self.pool.clear();
    }

    /// Addresses of heap objects every call of this engine touches (the engine, its
    /// userfaultfd and claims, its vault): the mappings holding them must not be migrated
    /// by pagemig itself, or a call could wait on its own state.
    pub(crate) fn heap_anchors(&self) -> Vec<usize> {
        let mut anchors =
            vec![self as *const Self as usize, Arc::as_ptr(&self.uffd) as usize, Arc::as_ptr(&self.busy) as usize];
        anchors.extend(self.vault.iter().flat_map(|v| v.anchors()));
        anchors
    }

    /// Whether this engine's descriptors are gone: the program closed one of its
    /// userfaultfds or put a file of its own at its number (`close_range`, `dup2`), and it
    /// could not be taken back from the engine's vault (`sys::vault`: where the kernel has
    /// `pidfd_getfd` of a thread, Linux 6.9, it is, at a new number, calls in progress
    /// included). Both are given up then (each descriptor is proved by its inode before
    /// every use): the engine's threads end, its calls fail with `EBADF` before touching
    /// anything (`move_pages` and `move_range` hand their pages to the kernel), and
    /// [`Engine::global`] opens a new engine in its place.
    pub fn descriptors_lost(&self) -> bool {
        let graves = self.reaper.uffd();
        if self.uffd.check().is_ok() && graves.check().is_ok() {
            return false;
        }
        self.uffd.abandon();
        graves.abandon();
        true
    }

    /// [`Engine::descriptors_lost`] as the error of a call.
    fn check_descriptors(&self) -> Result<()> {
        if self.descriptors_lost() {
            return Err(Error::Sys { op: "userfaultfd (closed or replaced by the program)", errno: Errno::BADF });
        }
        Ok(())
    }

    /// What the kernel allows this process.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities { user_mode_only: self.uffd.user_mode_only(), wp_unpopulated: self.uffd.wp_unpopulated() }
    }

    /// The destination pool (with the `internals` feature).
    #[cfg(feature = "internals")]
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Keeps `bytes` of destinations on `node` prepared ahead of use by a background thread,
    /// from now on, for folios of one size: [`ThpAdvice::Huge`] for huge pages,
    /// [`ThpAdvice::NoHuge`] (or [`ThpAdvice::Default`], the same) for base pages, whatever
    /// the advice of their mappings (a destination takes the size of the folios it
    /// receives). This is a *prepared reserve* for callers
    /// that migrate again and again, such as a tiering runtime. A call takes its
    /// destinations from the reserve first and prepares only what the reserve lacks; once
    /// it ends, the thread tops the reserve up again (never during a call: its populating
    /// would hold the memory map's lock against the call's moves). `bytes` is the memory
    /// budget: populated memory on `node` not yet handed out. A destination keeps its
    /// source's offset within a 2 MiB page, so up to 2 MiB of the reserve may be skipped
    /// ahead of a run: reserve that much more than the bytes to move. `0` ends the reserve
    /// and gives its memory back.
    ///
    /// # Examples
    /// ```no_run
    /// use pagemig::{Engine, ThpAdvice};
    /// let engine = Engine::global()?;
    /// engine.reserve(1, 256 << 20, ThpAdvice::Huge)?;
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a node without memory; [`Error::Sys`] with `EAGAIN` when
    /// the thread cannot be started.
    pub fn reserve(&self, node: u32, bytes: usize, thp: ThpAdvice) -> Result<()> {
        crate::numa::check_node(node)?;
        let thp = if thp == ThpAdvice::Huge { ThpAdvice::Huge } else { ThpAdvice::NoHuge };
        self.pool.reserve(Key { node, thp, empty: false }, bytes)
    }

    /// Waits until every prepared reserve is full or `timeout` passes; returns whether they
    /// are.
    pub fn wait_reserved(&self, timeout: std::time::Duration) -> bool {
        self.pool.wait_reserved(timeout)
    }

    /// The graveyards this engine keeps for its next pieces now, of base pages and of huge
    /// pages, and how many pieces took a kept one so far (pagemig's own tests).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn kept_graveyards(&self) -> (usize, usize, u64) {
        self.reaper.kept()
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
    /// pagemig may not move; [`Error::NodeFull`] or [`Error::MapCountLimit`] (`ENOMEM`);
    /// [`Error::Sys`] with `EBADF` once the program closed or replaced the engine's
    /// descriptors ([`Engine::descriptors_lost`]). After some folios moved: [`Error::Partial`] with the stats and the first error; the
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
        // Every asynchronous signal waits for the call's end on this thread, as one that
        // arrives during `move_pages(2)` waits for the system call to return: a handler run
        // here meanwhile would be this thread touching memory it is migrating (a store to a
        // folio being isolated waits for the isolation, which is this thread's) or take a
        // lock of the program's that another thread holds while it waits on a migration.
        let _signals = crate::sys::thread::SignalsBlocked::asynchronous();
        // The copy kernels are measured once per process, on a thread of their own, from
        // the first migration on: an engine that moves nothing (a call handed to the kernel
        // whole) never spends the measuring's copies and buffers.
        crate::copy::measure_in_background();
        // Descriptors the program closed or replaced: nothing is touched, the caller (or
        // `move_pages`, which hands the pages to the kernel) decides.
        self.check_descriptors()?;
        // The reserve thread tops up between calls, not during one.
        let _running = self.pool.call_started();
        let settings = self.settings().with_overrides(opts);
        settings.check()?;
        let (items, runs, free) = prepare_call(folios, target, self.pool.ready_on(target) as u64)?;
        let mut stats = MigrateStats { folios: items.len() as u64, ..Default::default() };
        let register_start = Instant::now();
        // Every run registered once, up front, in missing and write-protect mode: batches
        // then only protect, and the program's mappings are not split batch by batch (an
        // `mremap` of a range inside one run still finds one mapping). A run that spans a
        // mapping that cannot be registered (another userfaultfd's, say) is registered
        // folio by folio; a folio that cannot be fails here with the registration's errno
        // (`EBUSY` for another userfaultfd's, `ENOMEM` where no mapping could be split off
        // at `vm.max_map_count`), untouched, and one whose mapping the program replaces
        // later fails in its batch: its protection is refused.
        // Under the claims lock: this is the only registration with the program's
        // userfaultfd, and the event reader maps its holdings under the lock (see
        // `events`): a holding registered here would raise an event the reader itself
        // must read when it is unmapped.
        // Registered while no unmap or move of the program's waits unread: one read later
        // takes what it names out of the runs of every call in progress, this one's too,
        // and memory the program mapped in place of the old (which this call registered)
        // would stay registered after the call, a thread touching it waiting for ever. So
        // the events waiting are read here, as a copying thread reads them, and the
        // registration made again, for up to 20 ms: the kernel's count of changes under way
        // covers purges too, and stays up until each purging thread runs again (threads
        // purging without a pause keep it so for seconds). Where another thread is reading
        // them (the reader's lock held elsewhere), up to 2 s.
        let mut unregistered: Vec<(usize, Errno)> = Vec::new();
        let steady = || crate::backoff::Backoff::new(Duration::from_micros(100), Duration::from_micros(100));
        let (mut queued, mut settling) =
            (steady().within(Duration::from_secs(2)), steady().within(Duration::from_millis(20)));
        let call = {
            let mut claims = self.busy.lock();
            loop {
                unregistered.clear();
                for &(s, e) in &runs {
                    if self.uffd.register_missing_wp(s, e - s).is_err() {
                        let first = items.partition_point(|it| it.folio.end() <= s);
                        for (k, it) in items[first..].iter().enumerate().take_while(|(_, it)| it.folio.addr() < e) {
                            if let Err(errno) = self.uffd.register_missing_wp(it.folio.addr(), it.folio.size()) {
                                unregistered.push((first + k, errno));
                            }
                        }
                    }
                }
                // The first folio registered (`unregistered` is in index order).
                let mut refused = unregistered.iter().map(|&(i, _)| i).peekable();
                let first = (0..items.len()).find(|&i| {
                    while refused.next_if(|&r| r < i).is_some() {}
                    refused.peek() != Some(&i)
                });
                if !first.is_some_and(|i| self.uffd.changes_unread(items[i].folio.addr())) {
                    break;
                }
                let served = crate::lock::MutexGuard::unlocked(&mut claims, || self.events.serve_now());
                let pause = if served { settling.next_pause() } else { queued.next_pause() };
                let Some(pause) = pause else { break };
                crate::lock::MutexGuard::unlocked(&mut claims, || std::thread::sleep(pause));
            }
            // Kept registered for this call when another ends.
            claims.begin_call(runs.clone())
        };
        stats.unmap_ns += register_start.elapsed().as_nanos() as u64;
        let mut tally = Tally { stats, first_error: None, collapse_refused: false };
        let items = if unregistered.is_empty() {
            items
        } else {
            let mut refused = vec![None; items.len()];
            for (i, errno) in unregistered {
                refused[i] = Some(errno);
            }
            let mut kept = Vec::with_capacity(items.len());
            for (it, refused) in items.into_iter().zip(refused) {
                match refused {
                    Some(errno) => tally.failed(it.folio, Error::sys("userfaultfd register")(errno)),
                    None => kept.push(it),
                }
            }
            kept
        };
        let plan = pipeline::Plan::new(&settings, opts, reason, &items, free);
        let reporter = mover::Reporter::new(opts.progress.as_ref());
        let reporter = &reporter;
        let abort = abort::Abort::default();
        let abort = &abort;
        let preparing = std::sync::atomic::AtomicBool::new(plan.prepare_ahead > 0);
        let preparing = &preparing;
        let copy_helper = super::helper::CopyHelper::default();
        let copy_helper = &copy_helper;
        let moved_there = std::thread::scope(|s| {
            // The progress callback's own thread (see `mover::Reporter`).
            let progress = reporter
                .wanted()
                .then(|| crate::sys::thread::spawn_scoped(s, "pagemig-progress", move || reporter.serve(abort)).ok())
                .flatten();
            if progress.is_some() {
                reporter.served();
            }
            // Without a mover thread (none could be spawned) the moves run here.
            let (tx, rx) = std::sync::mpsc::sync_channel(mover::QUEUE);
            let mover = plan
                .threaded
                .then(|| {
                    crate::sys::thread::spawn_scoped(s, "pagemig-mover", move || {
                        mover::serve(self, rx, target, reporter, abort)
                    })
                    .ok()
                })
                .flatten();
            let tx = mover.is_some().then_some(tx);
            // The thread that copies beside this one (see `helper`).
            let copier = plan
                .copy_helper
                .then(|| crate::sys::thread::spawn_scoped(s, "pagemig-copier", move || copy_helper.serve()).ok())
                .flatten();
            // The helper that populates the next huge-page destinations meanwhile.
            let thp = items.first().map_or(ThpAdvice::Huge, |it| it.thp);
            let key = crate::pool::Key { node: target, thp, empty: false };
            let helper = (plan.prepare_ahead > 0)
                .then(|| {
                    crate::sys::thread::spawn_scoped(s, "pagemig-prepare", move || {
                        self.pool.populate_ahead_while(key, plan.prepare_ahead, plan.prepare_budget, preparing)
                    })
                    .ok()
                })
                .flatten();
            // The pre-copy's reader, for the whole call; without one (the program's
            // descriptor limit reached) pieces are copied once protected, as without it.
            let procmem = plan.precopy.then(crate::sys::ProcMem::open).and_then(Result::ok);
            let mut ctx = pipeline::Call {
                engine: self,
                call,
                target,
                opts,
                plan: if tx.is_some() { plan } else { plan.without_mover() },
                tally: &mut tally,
                mover: tx.as_ref(),
                reporter,
                abort,
                procmem: procmem.as_ref(),
                held: Vec::new(),
                helper: copier.is_some().then_some(copy_helper),
                probe_wait: mover::Patience::for_events(),
            };
            // A panic of pagemig's own stops the call like one in caller code: the batch's
            // guard has undone what it held; the folios not reached fail.
            let passes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ctx.run_passes(items, settings.max_batch_pages, mode);
            }));
            if let Err(payload) = passes {
                abort.raise("pagemig", crate::offload::registry::panic_message(payload.as_ref()));
            }
            drop(tx);
            copy_helper.quit();
            if let Some(h) = copier {
                let _ = h.join();
            }
            preparing.store(false, std::sync::atomic::Ordering::Relaxed);
            if let Some(h) = helper {
                self.pool.wake_helpers();
                tally.stats.prepared_ahead_bytes += h.join().unwrap_or(0);
            }
            let moved_there = mover.and_then(|h| h.join().ok());
            // Every folio has moved or been put back: a callback waiting on one goes on.
            reporter.finish(abort);
            if let Some(h) = progress {
                let _ = h.join();
            }
            moved_there
        });
        if let Some(moved_there) = moved_there {
            tally.stats.mover_runs = moved_there.stats.runs;
            tally.absorb(moved_there);
        }
        let Tally { mut stats, first_error, .. } = tally;
        // Registration off, for the runs' every page that is not another call's now.
        let folio_at = |a: usize| items_size_at(folios, a);
        mover::unregister_runs(self, call, folio_at, opts.faults());
        // The migration itself ends here; what follows frees old pages off its path.
        stats.critical_ns = (register_start.elapsed().as_nanos() as u64).saturating_sub(stats.prepare_ns);
        if plan.deferred {
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
}

/// Migrates `folios` to `target` with the process-wide [`Engine`] and default options.
///
/// # Errors
/// As [`Engine::migrate_pages`], or [`Error::Sys`] when no userfaultfd can be opened.
pub fn migrate_pages(folios: &[Folio<'_>], target: u32, reason: Reason, mode: Mode) -> Result<MigrateStats> {
    Engine::global()?.migrate_pages(folios, target, reason, mode, &MigrateOptions::default())
}
