//! One batch through isolate → prepare → unmap → batch copy → move → undo.
//!
//! This module calls the copy kernels and `mremap`, the two operations that change memory
//! under the program; both happen only while the source is write-protected and the
//! destination is ours alone.
#![allow(unsafe_code)]

use std::time::Instant;

use super::{Engine, Item, MigrateOptions, Reason};
use crate::copy::{CopyPair, folio_copy, folios_copy};
use crate::error::Error;
use crate::folio::MigrateInfo;
use crate::migrate::MigrateStats;
use crate::pool::{Dest, Key};
use crate::sys::{self, Advice, Errno, HPAGE_SIZE};

/// The state of one `migrate_pages` call shared by its batches.
pub(super) struct Call<'a> {
    pub engine: &'a Engine,
    pub target: u32,
    pub reason: Reason,
    pub opts: &'a MigrateOptions,
    pub stats: &'a mut MigrateStats,
    pub first_error: &'a mut Option<Error>,
}

/// Contiguous folios of one batch with the same mapping state, moved with one `mremap`.
struct Run {
    start: usize,
    end: usize,
    /// Indices into the batch's claimed items.
    items: std::ops::Range<usize>,
    dest: Option<Dest>,
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

    /// Runs one batch; returns the folios that were busy in another migration.
    pub fn run_batch(&mut self, batch: Vec<Item>) -> Vec<Item> {
        let engine = self.engine;
        // Isolate.
        let (mut claimed, mut busy) = (Vec::with_capacity(batch.len()), Vec::new());
        for item in batch {
            if engine.busy.try_claim(item.folio.addr(), item.folio.end()) {
                claimed.push(item);
            } else {
                busy.push(item);
            }
        }
        if claimed.is_empty() {
            return busy;
        }
        self.stats.batches += 1;
        let mut runs = split_runs(&claimed);
        let mut info = vec![MigrateInfo::empty(); claimed.len()];

        // Destinations.
        for run in &mut runs {
            let first = &claimed[run.items.start];
            // Keep the destination at the source's offset within a 2 MiB page whenever the
            // run spans one: huge pages stay huge, and `mremap` moves whole page tables
            // instead of one entry at a time.
            let align = if run.end - run.start >= HPAGE_SIZE {
                HPAGE_SIZE
            } else {
                claimed[run.items.clone()].iter().map(|i| i.folio.size()).max().unwrap_or(sys::PAGE_SIZE)
            };
            let key = Key { node: self.target, thp: first.thp };
            match engine.pool.take(key, run.end - run.start, align, run.start % align) {
                Ok((dest, spent)) => {
                    self.stats.prepare_ns += spent.as_nanos() as u64;
                    run.dest = Some(dest);
                }
                Err(e) => {
                    let errno = e.errno();
                    self.fail_all(&claimed[run.items.clone()], || Error::sys("destination on target node")(errno));
                }
            }
        }

        // Unmap: one write-protect call per run.
        let unmap_start = Instant::now();
        for run in runs.iter_mut().filter(|r| r.dest.is_some()) {
            if let Err((op, errno)) = self.protect(run.start, run.end) {
                engine.pool.release(run.dest.take().expect("filtered"));
                self.fail_all(&claimed[run.items.clone()], || Error::sys(op)(errno));
                continue;
            }
            for i in run.items.clone() {
                info[i].insert(MigrateInfo::WAS_MAPPED);
                if claimed[i].locked {
                    info[i].insert(MigrateInfo::WAS_MLOCKED);
                }
            }
        }
        self.stats.unmap_ns += unmap_start.elapsed().as_nanos() as u64;

        // Batch copy.
        let live: Vec<usize> = runs.iter().filter(|r| r.dest.is_some()).flat_map(|r| r.items.clone()).collect();
        if self.reason.batch_eligible() && !self.opts.no_batch_copy && !live.is_empty() {
            let copy_start = Instant::now();
            let pairs: Vec<CopyPair> = runs
                .iter()
                .filter_map(|r| r.dest.as_ref().map(|d| (r, d)))
                .flat_map(|(r, d)| {
                    claimed[r.items.clone()].iter().map(move |it| CopyPair {
                        dst: d.addr() + (it.folio.addr() - r.start),
                        src: it.folio.addr(),
                        len: it.folio.size(),
                    })
                })
                .collect();
            let result = if self.opts.fault.fail_batch_copy {
                Err(Errno::IO)
            } else {
                // SAFETY: every source is write-protected (unmap phase above) so no thread
                // writes it, every destination was handed to us by the pool and nothing else
                // refers to it, and the two never overlap (the pool's memory is its own).
                unsafe { folios_copy(&pairs) }
            };
            match result {
                Ok(()) => {
                    live.iter().for_each(|&i| info[i].insert(MigrateInfo::ALREADY_COPIED));
                    self.stats.batch_copied_folios += live.len() as u64;
                }
                Err(_) => self.stats.fallback_folios += live.len() as u64,
            }
            self.stats.copy_ns += copy_start.elapsed().as_nanos() as u64;
        } else {
            self.stats.single_copied_folios += live.len() as u64;
        }

        // Move.
        let mut first_done = false;
        for run in &mut runs {
            let Some(dest) = run.dest.take() else {
                continue;
            };
            self.move_run(run, dest, &claimed, &info, unmap_start, &mut first_done);
        }

        for item in &claimed {
            engine.busy.release(item.folio.addr());
        }
        busy
    }

    /// Registers and write-protects `[start, end)`.
    fn protect(&self, start: usize, end: usize) -> Result<(), (&'static str, Errno)> {
        let uffd = &self.engine.uffd;
        let len = end - start;
        if !uffd.wp_unpopulated() {
            // Without WP_UNPOPULATED a never-touched page is not protected: touch it first.
            sys::madvise(start, len, Advice::PopulateWrite).map_err(|e| ("populate source", e))?;
        }
        uffd.register_wp(start, len).map_err(|e| ("userfaultfd register", e))?;
        if let Err(e) = uffd.writeprotect(start, len, true) {
            let _ = uffd.unregister(start, len);
            return Err(("userfaultfd write-protect", e));
        }
        Ok(())
    }

    /// Takes the protection off `[start, end)` and wakes its writers: the source is as it was.
    fn unprotect(&self, start: usize, end: usize) {
        let uffd = &self.engine.uffd;
        let _ = uffd.writeprotect(start, end - start, false);
        let _ = uffd.unregister(start, end - start);
        let _ = uffd.wake(start, end - start);
    }

    /// Copies what the batch copy did not, then moves the run, splitting it around folios
    /// whose copy fails.
    fn move_run(
        &mut self,
        run: &Run,
        dest: Dest,
        claimed: &[Item],
        info: &[MigrateInfo],
        batch_start: Instant,
        first_done: &mut bool,
    ) {
        // `rest` is the part of the destination for `[cursor, run.end)`.
        let mut rest = dest;
        let mut cursor = run.start;
        let mut pending: Option<usize> = None;
        for i in run.items.clone() {
            let item = &claimed[i];
            if info[i].contains(MigrateInfo::ALREADY_COPIED) {
                pending.get_or_insert(item.folio.addr());
                continue;
            }
            if let Some((_, pause)) = self.opts.fault.delay_folio_copy.filter(|&(at, _)| at == item.index) {
                std::thread::sleep(pause);
            }
            let copy_start = Instant::now();
            let dst = rest.addr() + (item.folio.addr() - cursor);
            let result = if self.opts.fault.fail_folio_copy.contains(&item.index) {
                Err(Errno::IO)
            } else {
                // SAFETY: the source is write-protected since the unmap phase; `dst` lies in
                // the destination the pool handed us for this folio and nothing else refers
                // to it.
                unsafe { folio_copy(CopyPair { dst, src: item.folio.addr(), len: item.folio.size() }) }
            };
            self.stats.copy_ns += copy_start.elapsed().as_nanos() as u64;
            if let Err(errno) = result {
                if let Some(start) = pending.take() {
                    let (head, tail) = rest.split_at(item.folio.addr() - cursor);
                    self.finish(start, item.folio.addr(), head, claimed, run, batch_start, first_done);
                    rest = tail;
                } else {
                    let (gap, tail) = rest.split_at(item.folio.addr() - cursor);
                    self.engine.pool.release(gap);
                    rest = tail;
                }
                let (bad, tail) = rest.split_at(item.folio.size());
                self.engine.pool.release(bad);
                rest = tail;
                cursor = item.folio.end();
                self.unprotect(item.folio.addr(), item.folio.end());
                self.fail(item, Error::sys("folio copy")(errno));
                continue;
            }
            pending.get_or_insert(item.folio.addr());
        }
        match pending {
            Some(start) => {
                debug_assert_eq!(start, cursor);
                self.finish(start, run.end, rest, claimed, run, batch_start, first_done);
            }
            None => self.engine.pool.release(rest),
        }
    }

    /// Moves the copied destination over `[start, end)`, locks it again where needed and
    /// wakes the writers; undoes the range if the move fails.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        start: usize,
        end: usize,
        dest: Dest,
        claimed: &[Item],
        run: &Run,
        batch_start: Instant,
        first_done: &mut bool,
    ) {
        let move_start = Instant::now();
        let len = end - start;
        debug_assert_eq!(dest.len(), len);
        let items: Vec<&Item> =
            claimed[run.items.clone()].iter().filter(|it| it.folio.addr() >= start && it.folio.end() <= end).collect();
        // SAFETY: `[start, end)` is write-protected source memory of this call (no writer
        // can change it), `dest` holds a complete copy of it and is ours alone; moving it
        // over the source keeps every byte the program can observe.
        if let Err(errno) = unsafe { sys::mremap_fixed(dest.addr(), len, start) } {
            self.engine.pool.release(dest);
            self.unprotect(start, end);
            for it in items {
                self.fail(it, Error::sys("mremap of the destination over the source")(errno));
            }
            self.stats.move_ns += move_start.elapsed().as_nanos() as u64;
            return;
        }
        dest.forget();
        if items.first().is_some_and(|it| it.locked) && sys::mlock(start, len).is_err() {
            self.stats.relock_failures += items.len() as u64;
        }
        let _ = self.engine.uffd.wake(start, len);
        if !*first_done {
            *first_done = true;
            self.stats.first_folio_ns.push(batch_start.elapsed().as_nanos() as u64);
        }
        let s = &mut *self.stats;
        s.runs += 1;
        s.bytes += len as u64;
        for it in &items {
            s.succeeded_folios += 1;
            s.succeeded_pages += it.folio.nr_pages() as u64;
            s.thp_succeeded += u64::from(it.folio.is_pmd());
        }
        s.move_ns += move_start.elapsed().as_nanos() as u64;
        if let Some(progress) = &self.opts.progress {
            progress(s.bytes);
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
            _ => runs.push(Run { start: item.folio.addr(), end: item.folio.end(), items: i..i + 1, dest: None }),
        }
    }
    runs
}
