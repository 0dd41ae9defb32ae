//! One batch through isolate → prepare → unmap → batch copy → move → undo.
//!
//! This module calls the copy kernels and `mremap`, the two operations that change memory
//! under the program; both happen only while the source is write-protected and the
//! destination is ours alone.
#![allow(unsafe_code)]

use std::ops::Range;
use std::time::{Duration, Instant};

use super::abort::Abort;
use super::busy::Claims;
use super::mover::{self, GONE, Job, MoveJob, Patience, STOPPED, overlaps, undo, unprotect};
use super::reaper::Grave;
use super::{Engine, Item, MigrateOptions, Mode, NR_MAX_MIGRATE_PASSES, Reason};
use crate::copy::{CopyPair, Dst, folios_copy_each, folios_copy_to};
use crate::error::Error;
use crate::folio::{Folio, MigrateInfo};
use crate::migrate::MigrateStats;
use crate::offload::{Batch, registry};
use crate::pool::{Dest, Key, Populate};
use crate::sys::{self, Advice, Errno, HPAGE_SIZE};
use parking_lot::MutexGuard;

/// The state of one `migrate_pages` call shared by its batches.
pub(super) struct Call<'a> {
    pub engine: &'a Engine,
    pub target: u32,
    pub reason: Reason,
    pub opts: &'a MigrateOptions,
    /// Free replaced source pages on the reaper thread.
    pub deferred: bool,
    pub stats: &'a mut MigrateStats,
    pub first_error: &'a mut Option<Error>,
    /// The mover thread, when the call has one; else runs move on this thread.
    pub mover: Option<&'a std::sync::mpsc::SyncSender<Job>>,
    /// How destinations are populated.
    pub populate: Populate,
    /// Destinations of base pages are left without pages and filled by `UFFDIO_COPY`.
    pub fill_empty: bool,
    /// The mover copies base pages of mappings without a memory policy of their own
    /// straight into the source (`UFFDIO_COPY` on a thread bound to the target node),
    /// with no destination at all. Set with a mover thread and the CPU copy.
    pub copy_in: bool,
    /// Reports progress, from whichever thread moves.
    pub reporter: &'a mover::Reporter<'a>,
    /// Raised when caller code panicked: nothing more moves.
    pub abort: &'a Abort,
    /// A migrator was registered when the call began: batches go to it.
    pub offload: bool,
    /// Folios whose pages were held elsewhere (`EBUSY`), for the next pass, and why.
    pub held: Vec<Item>,
    pub held_why: std::collections::HashMap<usize, (&'static str, Errno)>,
}

/// Contiguous folios of one batch with the same mapping state, moved in with one
/// `UFFDIO_MOVE` (or a few, when the pipelined move takes them as their copies complete).
struct Run {
    start: usize,
    end: usize,
    /// Indices into the batch's claimed items.
    items: Range<usize>,
    /// The part of the destination for `[cursor, end)`.
    rest: Option<Dest>,
    /// The part of the graveyard for `[cursor, end)`: the old pages, once isolated.
    grave: Option<Grave>,
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

enum CopyEvent {
    /// These pairs are copied.
    Done(Range<usize>),
    /// The migrator returned.
    Finished(Option<Result<(), Errno>>),
}

impl<'a> Call<'a> {
    /// Counts a folio as failed, remembering the first error.
    pub fn fail(&mut self, item: &Item, err: Error) {
        let s = &mut *self.stats;
        s.failed_folios += 1;
        s.failed_pages += item.folio.nr_pages() as u64;
        s.thp_failed += u64::from(item.folio.is_pmd());
        s.failures.push(crate::stats::FolioFailure { addr: item.folio.addr(), errno: err.errno().raw_os_error() });
        if self.first_error.is_none() {
            *self.first_error = Some(err);
        }
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
                for item in &retry {
                    let (op, errno) = self.held_why.get(&item.index).copied().unwrap_or((BUSY_ELSEWHERE, Errno::AGAIN));
                    self.fail(item, Error::sys(op)(errno));
                }
                break;
            }
            self.stats.retried_folios += retry.len() as u64;
            match mode {
                Mode::Async => std::thread::yield_now(),
                Mode::SyncLight => self.engine.busy.wait(Duration::from_millis(1)),
                Mode::Sync => self.engine.busy.wait(Duration::from_millis(100)),
            }
            queue = retry;
        }
    }

    /// Runs one batch; returns the folios that were busy in another migration.
    pub fn run_batch(&mut self, batch: Vec<Item>) -> Vec<Item> {
        let engine = self.engine;
        // The pages this batch empties wait for its own copies: see `fork::open`.
        let _fork_batch = super::fork::Batch::start();
        if self.abort.is_set() {
            self.fail_all(&batch, stopped);
            return Vec::new();
        }
        if self.opts.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            self.fail_all(&batch, || Error::sys("migrate (cancelled by the caller)")(Errno::CANCELED));
            return Vec::new();
        }
        if self.opts.deadline.is_some_and(|d| Instant::now() >= d) {
            self.fail_all(&batch, || Error::sys("migrate (the deadline passed)")(Errno::TIMEDOUT));
            return Vec::new();
        }
        // Isolate: claim each contiguous stretch at once, folio by folio where another call
        // holds part of it.
        let (mut claimed, mut busy) = (Vec::with_capacity(batch.len()), Vec::new());
        let mut claims = Vec::new();
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            while j < batch.len() && batch[j - 1].folio.end() == batch[j].folio.addr() {
                j += 1;
            }
            let (start, end) = (batch[i].folio.addr(), batch[j - 1].folio.end());
            if engine.busy.try_claim(start, end) {
                claims.push(start);
                claimed.extend_from_slice(&batch[i..j]);
            } else {
                for item in &batch[i..j] {
                    if engine.busy.try_claim(item.folio.addr(), item.folio.end()) {
                        claims.push(item.folio.addr());
                        claimed.push(*item);
                    } else {
                        busy.push(*item);
                    }
                }
            }
            i = j;
        }
        if claimed.is_empty() {
            return busy;
        }
        self.stats.batches += 1;
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

        self.take_destinations(&mut st);
        let eligible = self.reason.batch_eligible() && !self.opts.no_batch_copy;
        let pipelined = self.opts.pipelined.unwrap_or_else(|| self.engine.pipelined());
        // The pipelined copy protects and isolates each piece just before copying it, so
        // that the first folio does not wait for the whole batch to be isolated.
        let lazy = eligible && pipelined && !self.opts.faults().fail_batch_copy;
        st.started = Instant::now();
        if !lazy {
            self.unmap(&mut st);
        }
        // Items whose isolation failed are out: their graveyard part holds nothing to copy.
        let live: Vec<usize> = st
            .runs
            .iter()
            .filter(|r| r.rest.is_some())
            .flat_map(|r| r.items.clone())
            .filter(|&i| lazy || st.slots[i].info.contains(MigrateInfo::WAS_MAPPED))
            .collect();
        if lazy && !live.is_empty() {
            self.copy_pieces(&mut st, &live);
        } else if eligible && !live.is_empty() {
            self.batch_copy(&mut st, &live, pipelined);
        } else {
            self.stats.single_copied_folios += live.len() as u64;
        }
        // Move what is left, copying folio by folio what the batch copy did not.
        for r in 0..st.runs.len() {
            let end = st.runs[r].items.end;
            self.advance(&mut st, r, end, true);
        }
        // Released after the batch's moves (the mover keeps the order of its jobs).
        let claims = guard.disarm();
        self.submit(Job::Release(claims));
        busy.append(&mut self.held);
        busy
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
        let copy_in = matches!(&job, Job::Move(m) if m.copy_in);
        let saved = copy_in.then(sys::ThreadPolicy::current).and_then(Result::ok);
        let bound = saved.is_some() && sys::set_mempolicy_bind(Some(self.target)).is_ok();
        mover::run(self.engine, job, self.stats, self.first_error, self.reporter, self.abort);
        if bound && let Some(saved) = saved {
            let _ = saved.restore();
        }
    }

    fn take_destinations(&mut self, st: &mut BatchState) {
        for r in 0..st.runs.len() {
            let (start, end) = (st.runs[r].start, st.runs[r].end);
            let items: Vec<Item> = st.slots[st.runs[r].items.clone()].iter().map(|slot| slot.item).collect();
            // Keep the destination at the source's offset within a 2 MiB page whenever the
            // run spans one: huge pages stay huge, and `mremap` moves whole page tables
            // instead of one entry at a time.
            let align = if end - start >= HPAGE_SIZE {
                HPAGE_SIZE
            } else {
                items.iter().map(|i| i.folio.size()).max().unwrap_or(sys::PAGE_SIZE)
            };
            // Base pages only: `UFFDIO_COPY` cannot make a huge page.
            let len = end - start;
            let empty = self.fill_empty && items.iter().all(|i| i.folio.size() < HPAGE_SIZE);
            // Destinations a prepared reserve populated ahead cost nothing now: taken first.
            let populated = Key { node: self.target, thp: items[0].thp, empty: false };
            let empty = empty && self.engine.pool.ready(populated) < len;
            // Where nothing better is prepared, pages whose mapping has no policy of its own
            // are copied in by the mover thread, bound to the target: written once, where
            // they belong, with no destination to move them from.
            st.runs[r].copy_in = empty && self.copy_in && !items[0].own_policy;
            let key = Key { empty, ..populated };
            let locked = items[0].locked;
            let dest = match self.engine.pool.take(key, len, align, start % align, self.populate) {
                Ok((dest, spent)) => {
                    self.stats.prepare_ns += spent.as_nanos() as u64;
                    // Pages move only between mappings locked alike.
                    if locked && sys::mlock_onfault(dest.addr(), len).is_err() {
                        self.stats.relock_failures += items.len() as u64;
                    }
                    Ok(dest)
                }
                Err(e) => Err(("destination on target node", e.errno())),
            };
            let grave = self.engine.reaper.reserve(len, start, locked);
            match (dest, grave) {
                (Ok(dest), Ok(grave)) => {
                    st.runs[r].grave_base = grave.addr();
                    st.runs[r].rest = Some(dest);
                    st.runs[r].grave = Some(grave);
                }
                (dest, grave) => {
                    let (op, errno) = match (&dest, &grave) {
                        (Err(e), _) => *e,
                        (_, Err(e)) => ("graveyard for the old pages", *e),
                        _ => unreachable!("one of the two failed"),
                    };
                    if let Ok(dest) = dest {
                        self.engine.pool.release(dest);
                    }
                    if let Ok(grave) = grave {
                        self.engine.reaper.free_now(grave);
                    }
                    let range = st.runs[r].items.clone();
                    let items: Vec<Item> = st.slots[range].iter().map(|slot| slot.item).collect();
                    self.fail_all(&items, || Error::sys(op)(errno));
                }
            }
        }
    }

    /// Write-protects and isolates each run with one call each, recording the state on the
    /// destinations.
    fn unmap(&mut self, st: &mut BatchState) {
        let t = Instant::now();
        for r in 0..st.runs.len() {
            if st.runs[r].rest.is_some() {
                self.unmap_stretch(st, st.runs[r].items.clone());
            }
        }
        self.stats.unmap_ns += t.elapsed().as_nanos() as u64;
    }

    /// The pipelined copy: pieces of 2 MiB, then as large as everything copied before (so
    /// the first folio is writable after one 2 MiB piece whatever the batch size, and a
    /// batch costs O(log n) moves), each protected and isolated just before its copy and
    /// moved as soon as it is copied. The CPU copy's pieces stop growing at
    /// [`CPU_PIECE_MAX`]: its moves queue on the mover thread, and the next batch's first
    /// piece must not wait behind a huge one. A migrator gets each piece as a batch of its
    /// own and reports its parts as they complete.
    fn copy_pieces(&mut self, st: &mut BatchState, live: &[usize]) {
        let mut at = 0;
        let mut done_bytes = 0;
        while at < live.len() && !self.abort.is_set() {
            let piece =
                if self.offload { HPAGE_SIZE.max(done_bytes) } else { HPAGE_SIZE.max(done_bytes).min(CPU_PIECE_MAX) };
            let size = |k: usize| st.slots[live[k]].item.folio.size();
            let mut end = at + 1;
            let mut bytes = size(at);
            while end < live.len() && bytes + size(end) <= piece {
                bytes += size(end);
                end += 1;
            }
            done_bytes += bytes;
            // Protect each contiguous stretch of the piece with one call.
            let t = Instant::now();
            let mut s = at;
            while s < end {
                let mut e = s + 1;
                while e < end
                    && st.slots[live[e - 1]].item.folio.end() == st.slots[live[e]].item.folio.addr()
                    && st.slots[live[e - 1]].run == st.slots[live[e]].run
                {
                    e += 1;
                }
                self.unmap_stretch(st, live[s]..live[e - 1] + 1);
                s = e;
            }
            self.stats.unmap_ns += t.elapsed().as_nanos() as u64;
            if self.offload {
                let isolated: Vec<usize> = live[at..end]
                    .iter()
                    .copied()
                    .filter(|&i| st.slots[i].info.contains(MigrateInfo::WAS_MAPPED))
                    .collect();
                if !isolated.is_empty() {
                    self.batch_copy(st, &isolated, true);
                }
                at = end;
                continue;
            }
            // Copy the protected folios, adjacent ones in one go. Their pairs are made piece
            // by piece: the first folio must not wait for the whole batch's.
            let t = Instant::now();
            let copied: Vec<usize> = live[at..end]
                .iter()
                .copied()
                .filter(|&i| st.slots[i].info.contains(MigrateInfo::WAS_MAPPED))
                .filter(|&i| !st.runs[st.slots[i].run].copy_in)
                .collect();
            let (protected, kinds) = self.pairs(st, &copied);
            // SAFETY: every pair copied reads old pages isolated in our graveyard just above
            // (no thread can write them) and writes a destination the pool handed us that
            // nothing else refers to; the two never overlap.
            let ok = unsafe { folios_copy_each(&protected, &kinds) }.is_ok();
            self.stats.copy_ns += t.elapsed().as_nanos() as u64;
            if ok {
                self.stats.batch_copied_folios += protected.len() as u64;
                for &i in &live[at..end] {
                    if st.slots[i].info.contains(MigrateInfo::WAS_MAPPED) {
                        st.slots[i].info.insert(MigrateInfo::ALREADY_COPIED);
                    }
                }
                self.move_copied(st);
            } else {
                self.stats.fallback_folios += protected.len() as u64;
            }
            at = end;
        }
    }

    /// The copy of each live item into its destination, in order, and what that
    /// destination is. The items must not have moved yet: each lies in the part
    /// of its run's destination that is left, which starts at the run's cursor.
    fn pairs(&self, st: &BatchState, live: &[usize]) -> (Vec<CopyPair>, Vec<Dst<'a>>) {
        live.iter()
            .map(|&i| {
                let run = &st.runs[st.slots[i].run];
                let dest = run.rest.as_ref().expect("a live item's run has a destination");
                let f = st.slots[i].item.folio;
                debug_assert!(f.addr() >= run.cursor);
                let pair = CopyPair {
                    dst: dest.addr() + (f.addr() - run.cursor),
                    src: run.grave_base + (f.addr() - run.start),
                    len: f.size(),
                };
                (pair, self.dst(dest))
            })
            .unzip()
    }

    /// How a copy reaches `dest`.
    fn dst(&self, dest: &Dest) -> Dst<'a> {
        match self.engine.pool.fill_uffd() {
            Some(uffd) if dest.unpopulated() => Dst::Empty(uffd),
            _ if dest.fresh() => Dst::Fresh,
            _ => Dst::Mapped,
        }
    }

    /// The batch copy through the active migrator when one is registered (pipelined: runs
    /// move as the migrator reports parts copied), else the default CPU `folios_copy` of the
    /// whole batch. The pipelined CPU copy is [`Call::copy_pieces`].
    fn batch_copy(&mut self, st: &mut BatchState, live: &[usize], pipelined: bool) {
        let (pairs, dsts) = self.pairs(st, live);
        if self.opts.faults().fail_batch_copy {
            self.stats.fallback_folios += live.len() as u64;
            return;
        }
        let copied_before = self.stats.offloaded_folios;
        if self.offload {
            let result = if pipelined {
                self.offload_pipelined(st, live, &pairs, &dsts)
            } else {
                let t = Instant::now();
                let done = parking_lot::Mutex::new(Vec::new());
                let on_complete = |r: Range<usize>| done.lock().push(r);
                // SAFETY: every source is an old page isolated in our graveyard (unmap phase),
                // which no thread writes, every destination was handed to us by the pool and
                // nothing else refers to it, and sources and destinations never overlap.
                let batch = unsafe { Batch::with_dsts(&pairs, Some(&on_complete), &dsts) };
                let result = dispatch(self.abort, &batch);
                self.stats.copy_ns += t.elapsed().as_nanos() as u64;
                for r in done.into_inner() {
                    self.mark_copied(st, live, r);
                }
                result
            };
            if result.is_some() {
                // Only what the migrator reported complete is trusted, whatever it returned:
                // the rest is copied folio by folio in the move phase.
                let offloaded = self.stats.offloaded_folios - copied_before;
                self.stats.fallback_folios += live.len() as u64 - offloaded;
                return;
            }
            // Unregistered meanwhile: the default copy below.
        }
        // The default CPU batch copy (unpipelined, or a migrator that went away).
        let t = Instant::now();
        // SAFETY: as for the offloaded copy above.
        let ok = unsafe { folios_copy_each(&pairs, &dsts) }.is_ok();
        self.stats.copy_ns += t.elapsed().as_nanos() as u64;
        if ok {
            self.stats.batch_copied_folios += live.len() as u64;
            live.iter().for_each(|&i| st.slots[i].info.insert(MigrateInfo::ALREADY_COPIED));
        } else {
            self.stats.fallback_folios += live.len() as u64;
        }
    }

    /// Runs the migrator on another thread and moves runs as its parts complete.
    fn offload_pipelined(
        &mut self,
        st: &mut BatchState,
        live: &[usize],
        pairs: &[CopyPair],
        dsts: &[Dst<'a>],
    ) -> Option<Result<(), Errno>> {
        let (tx, rx) = std::sync::mpsc::channel::<CopyEvent>();
        let abort = self.abort;
        let t = Instant::now();
        let move_before = self.stats.move_ns;
        let result = std::thread::scope(|s| {
            let done_tx = tx.clone();
            let on_complete = move |r: Range<usize>| {
                let _ = done_tx.send(CopyEvent::Done(r));
            };
            s.spawn(move || {
                // SAFETY: every source is an old page isolated in our graveyard (unmap phase),
                // which no thread writes, every destination was handed to us by the pool and
                // nothing else refers to it, and sources and destinations never overlap; the
                // scope keeps them alive until this thread ends.
                let batch = unsafe { Batch::with_dsts(pairs, Some(&on_complete), dsts) };
                let result = dispatch(abort, &batch);
                let _ = tx.send(CopyEvent::Finished(result));
            });
            let mut result = None;
            for event in &rx {
                match event {
                    CopyEvent::Done(r) => {
                        self.mark_copied(st, live, r);
                        self.move_copied(st);
                    }
                    CopyEvent::Finished(r) => {
                        result = r;
                        break;
                    }
                }
            }
            // Completions sent before the migrator returned.
            for event in rx.try_iter() {
                if let CopyEvent::Done(r) = event {
                    self.mark_copied(st, live, r);
                }
            }
            result
        });
        let moving = self.stats.move_ns - move_before;
        self.stats.copy_ns += (t.elapsed().as_nanos() as u64).saturating_sub(moving);
        result
    }

    fn mark_copied(&mut self, st: &mut BatchState, live: &[usize], r: Range<usize>) {
        for &i in live.get(r).unwrap_or(&[]) {
            if !st.slots[i].info.contains(MigrateInfo::ALREADY_COPIED) {
                st.slots[i].info.insert(MigrateInfo::ALREADY_COPIED);
                self.stats.offloaded_folios += 1;
            }
        }
    }

    /// Moves, in each run, the longest prefix of folios whose copy is complete.
    fn move_copied(&mut self, st: &mut BatchState) {
        for r in 0..st.runs.len() {
            let run = &st.runs[r];
            if run.rest.is_none() {
                continue;
            }
            let limit = (run.next..run.items.end)
                .find(|&i| !st.slots[i].info.contains(MigrateInfo::ALREADY_COPIED))
                .unwrap_or(run.items.end);
            if limit > run.next {
                self.advance(st, r, limit, false);
            }
        }
    }

    /// Registers and write-protects `[start, end)`.
    fn protect(&self, start: usize, end: usize) -> Result<(), (&'static str, Errno)> {
        let uffd = &self.engine.uffd;
        let len = end - start;
        if !uffd.wp_unpopulated() {
            // Without WP_UNPOPULATED a never-touched page is not protected: touch it first.
            sys::madvise(start, len, Advice::PopulateWrite).map_err(|e| ("populate source", e))?;
        }
        // Registered with the call (then this changes nothing), missing mode too: once its
        // old pages are isolated, every access to it waits. The call checked the memory
        // before it began: a refusal now means the program unmapped or changed it meanwhile.
        uffd.register_missing_wp(start, len).map_err(|_| (CHANGED, Errno::FAULT))?;
        if uffd.writeprotect(start, len, true).is_err() {
            let _ = uffd.unregister(start, len);
            return Err((CHANGED, Errno::FAULT));
        }
        Ok(())
    }

    /// Protects and isolates the contiguous items `items` of one run; where the stretch
    /// cannot be protected as a whole (the program changed part of it), folio by folio.
    fn unmap_stretch(&mut self, st: &mut BatchState, items: Range<usize>) {
        let (start, end) = (st.slots[items.start].item.folio.addr(), st.slots[items.end - 1].item.folio.end());
        if self.protect(start, end).is_ok() {
            mark_mapped(st, items.clone());
            self.isolate(st, items);
            return;
        }
        for i in items {
            let f = st.slots[i].item.folio;
            match self.protect(f.addr(), f.end()) {
                Ok(()) => {
                    mark_mapped(st, i..i + 1);
                    self.isolate(st, i..i + 1);
                }
                Err(err) => st.slots[i].refused = Some(err),
            }
        }
    }

    /// Moves the old pages of the protected items `items` (contiguous, one run) into the
    /// run's graveyard: from here every access to them waits, and no write the kernel
    /// started before the protection (through a page it pinned) can land after the copy,
    /// since a pinned page does not move. A folio whose pages will not move (pinned, shared
    /// with a child, not present, or a mapping the program changed meanwhile) is put back
    /// as it was, unprotected, and fails with the reason.
    fn isolate(&mut self, st: &mut BatchState, items: Range<usize>) {
        let engine = self.engine;
        let t = Instant::now();
        let (start, end) = (st.slots[items.start].item.folio.addr(), st.slots[items.end - 1].item.folio.end());
        // Counted empty before the lock: a fork waiting for empty pages to fill needs it.
        super::fork::open((end - start) / sys::PAGE_SIZE);
        let mut isolated = 0;
        let mut failed: Vec<(usize, &'static str, Errno)> = Vec::new();
        {
            let mut claims = engine.busy.lock();
            let run = &st.runs[st.slots[items.start].run];
            let grave = |a: usize| run.grave_base + (a - run.start);
            let folios: Vec<Folio<'static>> = st.slots[items.clone()].iter().map(|slot| slot.item.folio).collect();
            let mut patience = Patience::new();
            let mut unshared_to = start;
            let mut one_by_one = start;
            let mut at = start;
            while at < end {
                // Read again at every step: the lock may have been let go meanwhile.
                let dead = claims.dead_in(at, end);
                let k = folios.partition_point(|f| f.end() <= at);
                if overlaps(&dead, folios[k]) {
                    failed.push((items.start + k, GONE, Errno::NOENT));
                    at = folios[k].end();
                    continue;
                }
                // The longest stretch of folios none of which the program purged or moved.
                let j = k + folios[k..].iter().take_while(|f| !overlaps(&dead, **f)).count();
                // One folio at a time after a refusal that may come from a mapping split
                // across the stretch (a move stays within one mapping).
                let stretch_end = if at < one_by_one { folios[k].end() } else { folios[j - 1].end() };
                // SAFETY: `[at, stretch_end)` is claimed by this call, write-protected and
                // registered in missing mode, so with its pages moved out every access to
                // it waits until they or their copy come back; the graveyard part is ours
                // and empty.
                let result = unsafe { engine.reaper.uffd().move_pages(grave(at), at, stretch_end - at) };
                let (moved, errno) = match result {
                    Ok(()) => (stretch_end - at, None),
                    Err((moved, errno)) => (moved, Some(errno)),
                };
                let bad = at + moved;
                let Some(errno) = errno else {
                    claims.add_isolated(at, stretch_end, grave(at));
                    isolated += stretch_end - at;
                    at = stretch_end;
                    continue;
                };
                // A folio goes whole or not at all: keep the folios that moved whole, put
                // back the moved part of the one that stopped the move.
                let fk = folios[folios.partition_point(|f| f.end() <= bad)];
                if fk.addr() > at {
                    claims.add_isolated(at, fk.addr(), grave(at));
                    isolated += fk.addr() - at;
                }
                if bad > fk.addr() {
                    // The moved part of this folio goes back, as any isolated span does
                    // (waiting out EAGAIN while an event is read, copying back where the
                    // mapping changed): recorded first, so that an event meanwhile finds
                    // its old pages in the graveyard.
                    // They stay counted empty for the fork barrier until the stretch is
                    // done, as everything this stretch did not isolate.
                    claims.add_isolated(fk.addr(), bad, grave(fk.addr()));
                    super::mover::put_back_counted(engine, &mut claims, fk.addr(), bad, false);
                }
                at = fk.addr();
                if patience.wait(&mut claims, errno, bad) {
                    continue;
                }
                if errno == Errno::INVAL && stretch_end > fk.end() {
                    one_by_one = folios[j - 1].end();
                    continue;
                }
                if errno == Errno::BUSY && at >= unshared_to {
                    // Shared with a child since a `fork` (or not written since one): such a
                    // page is never pinned. Taking the write fault now gives this process a
                    // page of its own (the same page where nobody else maps it any more); a
                    // pinned page is its own already and is refused again.
                    if unshare(engine, &mut claims, at, stretch_end) {
                        unshared_to = stretch_end;
                        continue;
                    }
                    // An event waits for the lock: let it be read, then try again.
                    if patience.wait_busy(&mut claims) {
                        continue;
                    }
                }
                // A huge page the write faults left mapped in pieces is split by the move,
                // which fails while the kernel still holds it elsewhere for a moment.
                if errno == Errno::BUSY && patience.wait_busy(&mut claims) {
                    continue;
                }
                let k = folios.partition_point(|f| f.end() <= at);
                let (op, errno) = super::outcome::classify(super::outcome::Phase::Isolate, errno);
                failed.push((items.start + k, op, errno));
                at = fk.end();
            }
        }
        super::fork::close((end - start - isolated) / sys::PAGE_SIZE);
        for (i, op, errno) in failed {
            let f = st.slots[i].item.folio;
            unprotect(engine, f.addr(), f.end());
            st.slots[i].info.remove(MigrateInfo::WAS_MAPPED);
            st.slots[i].refused = Some((op, errno));
        }
        self.stats.unmap_ns += t.elapsed().as_nanos() as u64;
    }

    /// Moves the items of run `r` from its next unmoved one up to `limit`; with
    /// `copy_missing`, copies folio by folio those the batch copy did not, undoing any whose
    /// copy fails.
    fn advance(&mut self, st: &mut BatchState, r: usize, limit: usize, copy_missing: bool) {
        let Some(mut rest) = st.runs[r].rest.take() else { return };
        let mut grave = st.runs[r].grave.take().expect("a run with a destination has a graveyard");
        let mut cursor = st.runs[r].cursor;
        let mut pending: Option<usize> = None;
        let from = st.runs[r].next;
        for i in from..limit {
            let item = st.slots[i].item;
            if st.slots[i].info.contains(MigrateInfo::ALREADY_COPIED) {
                pending.get_or_insert(i);
                continue;
            }
            if !copy_missing {
                break;
            }
            if let Some((_, pause)) = self.opts.faults().delay_folio_copy.filter(|&(at, _)| at == item.index) {
                std::thread::sleep(pause);
            }
            let copy_start = Instant::now();
            let dst = rest.addr() + (item.folio.addr() - cursor);
            let src = grave.addr() + (item.folio.addr() - cursor);
            let result = if self.abort.is_set() {
                Err(Errno::CANCELED)
            } else if !st.slots[i].info.contains(MigrateInfo::WAS_MAPPED) {
                // Never protected: copying it could lose a write. It stays as it is.
                Err(st.slots[i].refused.map_or(Errno::AGAIN, |(_, e)| e))
            } else if self.opts.faults().fail_folio_copy.contains(&item.index) {
                Err(Errno::IO)
            } else {
                // SAFETY: `src` holds the folio's old pages, isolated in our graveyard since the
                // unmap phase; `dst` lies in the destination the pool handed us for this folio
                // (unpopulated or not as it says) and nothing else refers to it.
                unsafe { folios_copy_to(&[CopyPair { dst, src, len: item.folio.size() }], self.dst(&rest)) }
            };
            self.stats.copy_ns += copy_start.elapsed().as_nanos() as u64;
            match result {
                Ok(()) => {
                    pending.get_or_insert(i);
                }
                Err(errno) => {
                    let (head, tail) = rest.split_at(item.folio.addr() - cursor);
                    let (ghead, gtail) = grave.split_at(item.folio.addr() - cursor);
                    match pending.take() {
                        Some(p) => self.finish(st, p..i, head, ghead),
                        None => {
                            self.engine.pool.release(head);
                            self.engine.reaper.free_now(ghead);
                        }
                    }
                    let (bad, tail) = tail.split_at(item.folio.size());
                    let (gbad, gtail) = gtail.split_at(item.folio.size());
                    // The old pages go back where they were before the protection comes off.
                    undo(self.engine, item.folio.addr(), item.folio.end());
                    self.engine.pool.release(bad);
                    self.engine.reaper.free_now(gbad);
                    rest = tail;
                    grave = gtail;
                    cursor = item.folio.end();
                    let op = match st.slots[i].refused {
                        // Held elsewhere for now (pinned, or split by the kernel): another
                        // pass tries it again, as the kernel retries a folio with extra
                        // references.
                        Some((op, Errno::BUSY)) if !self.abort.is_set() => {
                            self.held_why.insert(item.index, (op, Errno::BUSY));
                            self.held.push(item);
                            continue;
                        }
                        Some((op, _)) => op,
                        None if errno == Errno::CANCELED => STOPPED,
                        None if !st.slots[i].info.contains(MigrateInfo::WAS_MAPPED) => "write-protect",
                        None => "folio copy",
                    };
                    self.fail(&item, Error::sys(op)(errno));
                }
            }
        }
        let upto = match pending {
            Some(p) => {
                let end =
                    (p..limit).find(|&i| !st.slots[i].info.contains(MigrateInfo::ALREADY_COPIED)).unwrap_or(limit);
                let end = if copy_missing { limit } else { end };
                let end_addr = st.slots[end - 1].item.folio.end();
                let (head, tail) = rest.split_at(end_addr - cursor);
                let (ghead, gtail) = grave.split_at(end_addr - cursor);
                self.finish(st, p..end, head, ghead);
                rest = tail;
                grave = gtail;
                cursor = end_addr;
                end
            }
            None if copy_missing => limit,
            None => from,
        };
        let run = &mut st.runs[r];
        run.next = upto;
        run.cursor = cursor;
        if run.next >= run.items.end || rest.is_empty() {
            self.engine.pool.release(rest);
            self.engine.reaper.free_now(grave);
        } else {
            run.rest = Some(rest);
            run.grave = Some(grave);
        }
    }

    /// Hands the copied destination of the folios `items` (contiguous) to the move phase:
    /// move the new pages into the sources, wake the waiting threads, free the old pages;
    /// undone if the move fails.
    fn finish(&mut self, st: &mut BatchState, items: Range<usize>, dest: Dest, grave: Grave) {
        let first = &st.slots[items.start].item;
        let start = first.folio.addr();
        debug_assert_eq!(dest.len(), st.slots[items.end - 1].item.folio.end() - start);
        debug_assert_eq!(grave.len(), dest.len());
        let slots = &st.slots[items.clone()];
        let job = MoveJob {
            start,
            dest,
            grave,
            folios: slots.iter().map(|slot| slot.item.folio).collect(),
            // Freeing a huge page costs little: only base pages go to the reaper.
            deferred: self.deferred && !first.folio.is_pmd(),
            batch_started: (!st.first_done).then_some(st.started),
            fail: slots.iter().any(|slot| self.opts.faults().fail_move.contains(&slot.item.index)),
            copy_in: st.runs[st.slots[items.start].run].copy_in,
            delay: self.opts.faults().delay_move,
        };
        st.first_done = true;
        self.submit(Job::Move(job));
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
            let (mut stats, mut first) = (MigrateStats::default(), None);
            mover::run(self.engine, job, &mut stats, &mut first, &mover::Reporter::new(None), self.abort);
        }
    }
}

/// The largest piece of the pipelined CPU copy.
const CPU_PIECE_MAX: usize = 16 << 20;

/// What a folio whose mapping the program unmapped or changed after the call began fails
/// with.
const CHANGED: &str = "migrate (the memory was unmapped or changed meanwhile)";

/// What a folio another call held through every pass fails with.
const BUSY_ELSEWHERE: &str = "migrate (folio busy in another migration)";

/// Makes the present pages of the protected, claimed `[start, end)` this process's own:
/// protection off for a moment, a write fault taken on each present page without writing
/// it (`MADV_POPULATE_WRITE`), protection on again. Called with the claims lock held, so
/// the program cannot purge a page between the look at its pages and the write faults (its
/// purge waits for the event reader, which waits for the lock): never-touched pages are
/// left alone, since a write fault there would wait for a migration that is this thread.
///
/// Returns false, having changed nothing, when the kernel refuses for now (an event of the
/// program waits to be read, which needs the lock).
fn unshare(engine: &Engine, claims: &mut MutexGuard<'_, Claims>, start: usize, end: usize) -> bool {
    let Ok(frames) = crate::numa::page_frames(start, end - start) else { return false };
    if engine.uffd.writeprotect_once(start, end - start, false).is_err() {
        return false;
    }
    let mut i = 0;
    while i < frames.len() {
        if frames[i].is_none() {
            i += 1;
            continue;
        }
        let j = i + frames[i..].iter().take_while(|f| f.is_some()).count();
        let _ = sys::madvise(start + i * sys::PAGE_SIZE, (j - i) * sys::PAGE_SIZE, Advice::PopulateWrite);
        i = j;
    }
    // An event the program raised meanwhile waits for the lock to be read: let it go until
    // the protection is back on (the pages are not isolated yet: writes meanwhile are kept).
    while engine.uffd.writeprotect_once(start, end - start, true) == Err(Errno::AGAIN) {
        MutexGuard::unlocked(claims, || std::thread::sleep(Duration::from_micros(50)));
    }
    true
}

/// Records that the items were write-protected, and locked where their mapping was.
fn mark_mapped(st: &mut BatchState, items: Range<usize>) {
    for i in items {
        st.slots[i].info.insert(MigrateInfo::WAS_MAPPED);
        if st.slots[i].item.locked {
            st.slots[i].info.insert(MigrateInfo::WAS_MLOCKED);
        }
    }
}

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
                grave: None,
                grave_base: 0,
                cursor: item.folio.addr(),
                next: i,
                copy_in: false,
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

    fn item(addr: usize, size: usize) -> Item {
        // SAFETY: describes an address only; nothing migrates it.
        let folio = unsafe { Folio::new(addr, size) }.unwrap();
        Item { folio, index: 0, locked: false, thp: ThpAdvice::Default, own_policy: false }
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
}
