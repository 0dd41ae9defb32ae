//! One batch through isolate → prepare → unmap → batch copy → move → undo.
//!
//! This module calls the copy kernels and `mremap`, the two operations that change memory
//! under the program; both happen only while the source is write-protected and the
//! destination is ours alone.
#![allow(unsafe_code)]

use std::ops::Range;
use std::time::{Duration, Instant};

use super::abort::Abort;
use super::mover::{self, Job, MoveJob};
use super::reaper::Grave;
use super::{Engine, Item, MigrateOptions, Mode, NR_MAX_MIGRATE_PASSES, Reason};
use crate::copy::{CopyPair, folio_copy, folios_copy};
use crate::error::Error;
use crate::folio::MigrateInfo;
use crate::migrate::MigrateStats;
use crate::offload::{Batch, registry};
use crate::pool::{Dest, Key, Populate};
use crate::sys::{self, Advice, Errno, HPAGE_SIZE};

/// The state of one `migrate_pages` call shared by its batches.
pub(super) struct Call<'a> {
    pub engine: &'a Engine,
    pub target: u32,
    pub reason: Reason,
    pub opts: &'a MigrateOptions,
    /// The call's runs that were registered up front.
    pub registered: &'a [super::Span],
    /// Free replaced source pages on the reaper thread.
    pub deferred: bool,
    pub stats: &'a mut MigrateStats,
    pub first_error: &'a mut Option<Error>,
    /// The mover thread, when the call has one; else runs move on this thread.
    pub mover: Option<&'a crossbeam::channel::Sender<Job>>,
    /// How destinations are populated.
    pub populate: Populate,
    /// Raised when caller code panicked: nothing more moves.
    pub abort: &'a Abort,
}

/// Contiguous folios of one batch with the same mapping state, moved with one `mremap`
/// (or a few, when the pipelined move takes them as their copies complete).
struct Run {
    start: usize,
    end: usize,
    /// Indices into the batch's claimed items.
    items: Range<usize>,
    /// The part of the destination for `[cursor, end)`.
    rest: Option<Dest>,
    /// First address not yet moved or undone.
    cursor: usize,
    /// First item not yet moved or undone.
    next: usize,
}

/// One batch between isolation and the end of its move phase.
struct BatchState {
    claimed: Vec<Item>,
    info: Vec<MigrateInfo>,
    runs: Vec<Run>,
    /// Start of the unmap phase, for first-folio latency.
    started: Instant,
    first_done: bool,
    /// Items whose protection failed (pipelined CPU copy protects piece by piece).
    unprotected: Vec<Option<(&'static str, Errno)>>,
}

enum CopyEvent {
    /// These pairs are copied.
    Done(Range<usize>),
    /// The migrator returned.
    Finished(Option<Result<(), Errno>>),
}

impl Call<'_> {
    /// Counts a folio as failed, remembering the first error.
    pub fn fail(&mut self, item: &Item, err: Error) {
        let s = &mut *self.stats;
        s.failed_folios += 1;
        s.failed_pages += item.folio.nr_pages() as u64;
        s.thp_failed += u64::from(item.folio.is_pmd());
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
            for batch in super::batches(&queue, max_batch) {
                retry.extend(self.run_batch(batch));
            }
            if retry.is_empty() {
                break;
            }
            if pass + 1 == NR_MAX_MIGRATE_PASSES {
                for item in &retry {
                    self.fail(item, Error::sys("migrate (folio busy in another migration)")(Errno::AGAIN));
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
        if self.abort.is_set() {
            self.fail_all(&batch, stopped);
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
            spans: super::contiguous_runs(claimed.iter().map(|it| it.folio)),
        };
        let runs = split_runs(&claimed);
        let info = vec![MigrateInfo::empty(); claimed.len()];
        let unprotected = vec![None; claimed.len()];
        let mut st = BatchState { claimed, info, runs, started: Instant::now(), first_done: false, unprotected };

        self.take_destinations(&mut st);
        let eligible = self.reason.batch_eligible() && !self.opts.no_batch_copy;
        let pipelined = self.opts.pipelined.unwrap_or_else(|| self.engine.pipelined());
        // The pipelined CPU copy protects each piece just before copying it, so that the
        // first folio does not wait for the whole batch to be write-protected.
        let lazy = eligible && pipelined && !self.opts.fault.fail_batch_copy && !registry().enabled();
        st.started = Instant::now();
        if !lazy {
            self.unmap(&mut st);
        }
        let live: Vec<usize> = st.runs.iter().filter(|r| r.rest.is_some()).flat_map(|r| r.items.clone()).collect();
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
        busy
    }

    /// Hands a job to the mover thread, or does it here when the call has none.
    fn submit(&mut self, job: Job) {
        let Some(job) = mover::send(self.mover, job) else { return };
        mover::run(self.engine, job, self.stats, self.first_error, self.opts.progress.as_ref(), self.abort);
    }

    fn take_destinations(&mut self, st: &mut BatchState) {
        for r in 0..st.runs.len() {
            let run = &st.runs[r];
            let items = &st.claimed[run.items.clone()];
            // Keep the destination at the source's offset within a 2 MiB page whenever the
            // run spans one: huge pages stay huge, and `mremap` moves whole page tables
            // instead of one entry at a time.
            let align = if run.end - run.start >= HPAGE_SIZE {
                HPAGE_SIZE
            } else {
                items.iter().map(|i| i.folio.size()).max().unwrap_or(sys::PAGE_SIZE)
            };
            let key = Key { node: self.target, thp: items[0].thp };
            match self.engine.pool.take(key, run.end - run.start, align, run.start % align, self.populate) {
                Ok((dest, spent)) => {
                    self.stats.prepare_ns += spent.as_nanos() as u64;
                    st.runs[r].rest = Some(dest);
                }
                Err(e) => {
                    let errno = e.errno();
                    let range = st.runs[r].items.clone();
                    self.fail_all(&st.claimed[range], || Error::sys("destination on target node")(errno));
                }
            }
        }
    }

    /// Write-protects each run with one call, recording the state on the destinations.
    fn unmap(&mut self, st: &mut BatchState) {
        let t = Instant::now();
        for r in 0..st.runs.len() {
            let (start, end, items) = (st.runs[r].start, st.runs[r].end, st.runs[r].items.clone());
            let Some(dest) = st.runs[r].rest.take() else { continue };
            if let Err((op, errno)) = self.protect(start, end) {
                self.engine.pool.release(dest);
                self.fail_all(&st.claimed[items], || Error::sys(op)(errno));
                continue;
            }
            st.runs[r].rest = Some(dest);
            mark_mapped(st, items);
        }
        self.stats.unmap_ns += t.elapsed().as_nanos() as u64;
    }

    /// The pipelined default CPU copy: pieces of 2 MiB, then as large as everything copied
    /// before (so the first folio is writable after one 2 MiB piece whatever the batch size,
    /// and a batch costs O(log n) moves), each write-protected just before its copy and
    /// moved right after it.
    fn copy_pieces(&mut self, st: &mut BatchState, live: &[usize]) {
        let pairs = self.pairs(st, live);
        let mut at = 0;
        let mut done_bytes = 0;
        while at < live.len() && !self.abort.is_set() {
            let piece = HPAGE_SIZE.max(done_bytes);
            let mut end = at + 1;
            let mut bytes = pairs[at].len;
            while end < live.len() && bytes + pairs[end].len <= piece {
                bytes += pairs[end].len;
                end += 1;
            }
            done_bytes += bytes;
            // Protect each contiguous stretch of the piece with one call.
            let t = Instant::now();
            let mut s = at;
            while s < end {
                let mut e = s + 1;
                while e < end && st.claimed[live[e - 1]].folio.end() == st.claimed[live[e]].folio.addr() {
                    e += 1;
                }
                let (start, stop) = (st.claimed[live[s]].folio.addr(), st.claimed[live[e - 1]].folio.end());
                match self.protect(start, stop) {
                    Ok(()) => mark_mapped(st, live[s]..live[e - 1] + 1),
                    Err(err) => live[s..e].iter().for_each(|&i| st.unprotected[i] = Some(err)),
                }
                s = e;
            }
            self.stats.unmap_ns += t.elapsed().as_nanos() as u64;
            // Copy the protected folios, adjacent ones in one go.
            let t = Instant::now();
            let protected: Vec<CopyPair> =
                (at..end).filter(|&k| st.info[live[k]].contains(MigrateInfo::WAS_MAPPED)).map(|k| pairs[k]).collect();
            // SAFETY: every pair copied is write-protected (just above) so no thread writes
            // its source, its destination was handed to us by the pool and nothing else
            // refers to it, and sources and destinations never overlap.
            let ok = unsafe { folios_copy(&protected) }.is_ok();
            self.stats.copy_ns += t.elapsed().as_nanos() as u64;
            if ok {
                self.stats.batch_copied_folios += protected.len() as u64;
                for &i in &live[at..end] {
                    if st.info[i].contains(MigrateInfo::WAS_MAPPED) {
                        st.info[i].insert(MigrateInfo::ALREADY_COPIED);
                    }
                }
                self.move_copied(st);
            } else {
                self.stats.fallback_folios += protected.len() as u64;
            }
            at = end;
        }
    }

    /// The copy of each live item into its destination, in order.
    fn pairs(&self, st: &BatchState, live: &[usize]) -> Vec<CopyPair> {
        let mut pairs = Vec::with_capacity(live.len());
        for run in st.runs.iter() {
            let Some(dest) = run.rest.as_ref() else { continue };
            for i in run.items.clone() {
                let f = st.claimed[i].folio;
                pairs.push(CopyPair { dst: dest.addr() + (f.addr() - run.start), src: f.addr(), len: f.size() });
            }
        }
        debug_assert_eq!(pairs.len(), live.len());
        pairs
    }

    /// The batch copy through the active migrator when one is registered (pipelined: runs
    /// move as the migrator reports parts copied), else the default CPU `folios_copy` of the
    /// whole batch. The pipelined CPU copy is [`Call::copy_pieces`].
    fn batch_copy(&mut self, st: &mut BatchState, live: &[usize], pipelined: bool) {
        let pairs = self.pairs(st, live);
        if self.opts.fault.fail_batch_copy {
            self.stats.fallback_folios += live.len() as u64;
            return;
        }
        let copied_before = self.stats.offloaded_folios;
        if registry().enabled() {
            let result = if pipelined {
                self.offload_pipelined(st, live, &pairs)
            } else {
                let t = Instant::now();
                let done = parking_lot::Mutex::new(Vec::new());
                let on_complete = |r: Range<usize>| done.lock().push(r);
                // SAFETY: every source is write-protected (unmap phase) so no thread writes
                // it, every destination was handed to us by the pool and nothing else refers
                // to it, and sources and destinations never overlap.
                let batch = unsafe { Batch::new(&pairs, Some(&on_complete)) };
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
        let ok = unsafe { folios_copy(&pairs) }.is_ok();
        self.stats.copy_ns += t.elapsed().as_nanos() as u64;
        if ok {
            self.stats.batch_copied_folios += live.len() as u64;
            live.iter().for_each(|&i| st.info[i].insert(MigrateInfo::ALREADY_COPIED));
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
    ) -> Option<Result<(), Errno>> {
        let (tx, rx) = crossbeam::channel::unbounded::<CopyEvent>();
        let abort = self.abort;
        let t = Instant::now();
        let move_before = self.stats.move_ns;
        let result = std::thread::scope(|s| {
            let done_tx = tx.clone();
            let on_complete = move |r: Range<usize>| {
                let _ = done_tx.send(CopyEvent::Done(r));
            };
            s.spawn(move || {
                // SAFETY: every source is write-protected (unmap phase) so no thread writes
                // it, every destination was handed to us by the pool and nothing else refers
                // to it, and sources and destinations never overlap; the scope keeps them
                // alive until this thread ends.
                let batch = unsafe { Batch::new(pairs, Some(&on_complete)) };
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
            if !st.info[i].contains(MigrateInfo::ALREADY_COPIED) {
                st.info[i].insert(MigrateInfo::ALREADY_COPIED);
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
                .find(|&i| !st.info[i].contains(MigrateInfo::ALREADY_COPIED))
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
        // Registered up front with the call, the range needs only its protection; the
        // registration is made again if it was lost meanwhile (an undo in a concurrent call).
        let covered = self.registered.iter().any(|&(s, e)| s <= start && end <= e);
        if covered && uffd.writeprotect(start, len, true).is_ok() {
            return Ok(());
        }
        uffd.register_wp(start, len).map_err(|e| ("userfaultfd register", e))?;
        if let Err(e) = uffd.writeprotect(start, len, true) {
            let _ = uffd.unregister(start, len);
            return Err(("userfaultfd write-protect", e));
        }
        Ok(())
    }

    /// Moves the items of run `r` from its next unmoved one up to `limit`; with
    /// `copy_missing`, copies folio by folio those the batch copy did not, undoing any whose
    /// copy fails.
    fn advance(&mut self, st: &mut BatchState, r: usize, limit: usize, copy_missing: bool) {
        let Some(mut rest) = st.runs[r].rest.take() else { return };
        let mut cursor = st.runs[r].cursor;
        let mut pending: Option<usize> = None;
        let from = st.runs[r].next;
        for i in from..limit {
            let item = st.claimed[i];
            if st.info[i].contains(MigrateInfo::ALREADY_COPIED) {
                pending.get_or_insert(i);
                continue;
            }
            if !copy_missing {
                break;
            }
            if let Some((_, pause)) = self.opts.fault.delay_folio_copy.filter(|&(at, _)| at == item.index) {
                std::thread::sleep(pause);
            }
            let copy_start = Instant::now();
            let dst = rest.addr() + (item.folio.addr() - cursor);
            let result = if self.abort.is_set() {
                Err(Errno::CANCELED)
            } else if !st.info[i].contains(MigrateInfo::WAS_MAPPED) {
                // Never protected: copying it could lose a write. It stays as it is.
                Err(st.unprotected[i].map_or(Errno::AGAIN, |(_, e)| e))
            } else if self.opts.fault.fail_folio_copy.contains(&item.index) {
                Err(Errno::IO)
            } else {
                // SAFETY: the source is write-protected since the unmap phase; `dst` lies in
                // the destination the pool handed us for this folio and nothing else refers
                // to it.
                unsafe { folio_copy(CopyPair { dst, src: item.folio.addr(), len: item.folio.size() }) }
            };
            self.stats.copy_ns += copy_start.elapsed().as_nanos() as u64;
            match result {
                Ok(()) => {
                    pending.get_or_insert(i);
                }
                Err(errno) => {
                    let (head, tail) = rest.split_at(item.folio.addr() - cursor);
                    match pending.take() {
                        Some(p) => self.finish(st, p..i, head),
                        None => self.engine.pool.release(head),
                    }
                    let (bad, tail) = tail.split_at(item.folio.size());
                    self.engine.pool.release(bad);
                    rest = tail;
                    cursor = item.folio.end();
                    unprotect(self.engine, item.folio.addr(), item.folio.end());
                    let op = match st.unprotected[i] {
                        Some((op, _)) => op,
                        None if errno == Errno::CANCELED => STOPPED,
                        None if !st.info[i].contains(MigrateInfo::WAS_MAPPED) => "write-protect",
                        None => "folio copy",
                    };
                    self.fail(&item, Error::sys(op)(errno));
                }
            }
        }
        let upto = match pending {
            Some(p) => {
                let end = (p..limit).find(|&i| !st.info[i].contains(MigrateInfo::ALREADY_COPIED)).unwrap_or(limit);
                let end = if copy_missing { limit } else { end };
                let end_addr = st.claimed[end - 1].folio.end();
                let (head, tail) = rest.split_at(end_addr - cursor);
                self.finish(st, p..end, head);
                rest = tail;
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
        } else {
            run.rest = Some(rest);
        }
    }

    /// Hands the copied destination of the folios `items` (contiguous) to the move phase:
    /// `mremap` over the sources, lock again where needed, wake the writers; undone if the
    /// move fails.
    fn finish(&mut self, st: &mut BatchState, items: Range<usize>, dest: Dest) {
        let first = &st.claimed[items.start];
        let start = first.folio.addr();
        debug_assert_eq!(dest.len(), st.claimed[items.end - 1].folio.end() - start);
        let claimed = &st.claimed[items.clone()];
        let job = MoveJob {
            start,
            dest,
            folios: claimed.len() as u64,
            pages: claimed.iter().map(|it| it.folio.nr_pages() as u64).sum(),
            thp: claimed.iter().filter(|it| it.folio.is_pmd()).count() as u64,
            relock: st.info[items.start].contains(MigrateInfo::WAS_MLOCKED),
            // Freeing a huge page costs little: only base pages go to the reaper.
            deferred: self.deferred && !first.folio.is_pmd(),
            batch_started: (!st.first_done).then_some(st.started),
            fail: claimed.iter().any(|it| self.opts.fault.fail_move.contains(&it.index)),
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

/// What a folio left as it was because the call stopped was doing.
const STOPPED: &str = "migrate (the call stopped after a panic)";

/// What a batch claimed and protected, undone if pagemig panics before the batch ends.
struct BatchGuard<'a> {
    engine: &'a Engine,
    mover: Option<crossbeam::channel::Sender<Job>>,
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
            mover::run(self.engine, job, &mut stats, &mut first, None, self.abort);
        }
    }
}

/// Takes the protection off `[start, end)` and wakes its writers: the source is as it was.
pub(super) fn unprotect(engine: &Engine, start: usize, end: usize) {
    let uffd = &engine.uffd;
    let _ = uffd.writeprotect(start, end - start, false);
    let _ = uffd.unregister(start, end - start);
    let _ = uffd.wake(start, end - start);
}

/// Replaces the write-protected source `[start, start + len)` with its copy `dest`.
/// Deferred: the range is registered in missing mode too (every access now waits, not only
/// writes), its old pages go aside into a graveyard, returned to be freed once the writers
/// are awake, the new pages come in; else one `mremap` that frees the old pages on the way.
pub(super) fn replace(
    engine: &Engine,
    start: usize,
    len: usize,
    dest: &Dest,
    deferred: bool,
) -> Result<Option<Grave>, Errno> {
    let plain = || {
        // SAFETY: `[start, start + len)` is write-protected source memory of this call (no
        // writer can change it), `dest` holds a complete copy of it and is ours alone;
        // moving it over the source keeps every byte the program can observe.
        unsafe { sys::mremap_fixed(dest.addr(), len, start) }.map(|()| None)
    };
    let reaper = &engine.reaper;
    if !deferred || engine.uffd.register_missing_wp(start, len).is_err() {
        return plain();
    }
    let Ok((raw, total, g)) = reaper.reserve(len, start) else { return plain() };
    // From the first move to the second the source is empty: no child may be forked then.
    let _window = super::fork::window();
    // SAFETY: the source is write-protected and registered in missing mode, so from here
    // until the wake every access to it waits; `g` lies in a reservation of ours.
    if unsafe { sys::mremap_dontunmap(start, len, g) }.is_err() {
        reaper.release(raw, total);
        return plain();
    }
    // SAFETY: the source is empty (its pages are at `g`) and every access to it waits;
    // `dest` holds a complete copy of those pages and is ours alone.
    if let Err(errno) = unsafe { sys::mremap_fixed(dest.addr(), len, start) } {
        // Put the old pages back: the source is as it was.
        // SAFETY: `g` holds exactly the source's pages, moved out just above.
        let _ = unsafe { sys::mremap_fixed(g, len, start) };
        reaper.release(raw, total);
        return Err(errno);
    }
    Ok(Some(Grave { raw, total }))
}

/// Records that the items were write-protected, and locked where their mapping was.
fn mark_mapped(st: &mut BatchState, items: Range<usize>) {
    for i in items {
        st.info[i].insert(MigrateInfo::WAS_MAPPED);
        if st.claimed[i].locked {
            st.info[i].insert(MigrateInfo::WAS_MLOCKED);
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
                    && claimed[r.items.start].thp == item.thp =>
            {
                r.end = item.folio.end();
                r.items.end = i + 1;
            }
            _ => runs.push(Run {
                start: item.folio.addr(),
                end: item.folio.end(),
                items: i..i + 1,
                rest: None,
                cursor: item.folio.addr(),
                next: i,
            }),
        }
    }
    runs
}
