//! The copy phase: the batch copy of isolated folios into their destinations, through the
//! active migrator (its parts moved as it reports them complete) or the CPU (piece by
//! piece, pipelined). What it does not copy is copied folio by folio in the move phase.
#![allow(unsafe_code, reason = "copies isolated old pages into destinations of ours")]

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::MigrateInfo;
use super::{BASE_PIECE_MAX, BatchState, CPU_PIECE_MAX, Call, PIECE_MIN, PRECOPY_PIECE, dispatch};
use crate::copy::{CopyPair, Dst, coalesce, folios_copy_each, folios_fix};
use crate::migrate::helper::Chunks;
use crate::offload::Batch;
use crate::pool::Dest;
use crate::sys::{Errno, HPAGE_SIZE, PAGE_SIZE, ProcMem};

/// The bytes the caller and the copy helper take at a time from a piece they copy together:
/// small enough that neither waits long for the other's last chunk, large enough that a
/// chunk of base pages is one `UFFDIO_COPY` worth its call.
const HELPER_CHUNK: usize = 64 << 10;

/// What the thread running a pipelined migrator tells the batch.
enum CopyEvent {
    /// These pairs are copied.
    Done(Range<usize>),
    /// The migrator returned.
    Finished(Option<Result<(), Errno>>),
}

impl<'a> Call<'a> {
    /// The pipelined copy: pieces of 2 MiB, then as large as everything copied before (so
    /// the first folio is writable after one 2 MiB piece whatever the batch size, and a
    /// batch costs O(log n) moves), each protected and isolated just before its copy and
    /// moved as soon as it is copied. The CPU copy's pieces stop growing at
    /// [`CPU_PIECE_MAX`] (huge pages) or [`BASE_PIECE_MAX`] (smaller folios): the program's
    /// threads that touch a piece wait for all of it, its moves queue on the mover thread,
    /// and the next batch's first piece must not wait behind a huge one. With a budget
    /// (`migrate/piece_budget_us`) they also stop where isolating and copying one would take longer than it at the pace
    /// of the pieces before it (down to [`PIECE_MIN`]): a thread of the program that touches
    /// a page of a piece waits for the whole piece. A migrator gets each piece as a batch of
    /// its own and reports its parts as they complete. With the pre-copy, see
    /// [`Call::copy_precopied`].
    pub(super) fn copy_pieces(&mut self, st: &mut BatchState, live: &[usize]) {
        if let Some(mem) = self.procmem {
            return self.copy_precopied(st, live, mem);
        }
        let mut at = 0;
        let mut done_bytes = 0;
        // Bytes isolated and copied by the CPU so far, and how long that took.
        let (mut paced_bytes, mut paced_ns) = (0usize, 0u64);
        let cpu_max = if st.slots[live[0]].item.folio.is_pmd() { CPU_PIECE_MAX } else { BASE_PIECE_MAX };
        while at < live.len() && !self.abort.is_set() {
            let piece = if self.plan.offload {
                HPAGE_SIZE.max(done_bytes)
            } else {
                let budget = self.plan.piece_budget.filter(|_| paced_ns > 0).map(|budget| {
                    let bytes = paced_bytes as u128 * budget.as_nanos() / u128::from(paced_ns);
                    usize::try_from(bytes).unwrap_or(usize::MAX).max(PIECE_MIN)
                });
                HPAGE_SIZE.max(done_bytes).min(cpu_max).min(budget.unwrap_or(usize::MAX))
            };
            let (end, bytes) = piece_end(st, live, at, piece);
            done_bytes += bytes;
            let ready = self.populate_piece(st, &live[at..end], at == 0);
            let piece_started = Instant::now();
            // What was refused costs nothing to copy: it does not set the pace.
            let bytes = ready.as_ref().map_or(bytes, |r| r.iter().map(|&i| st.slots[i].item.folio.size()).sum());
            self.protect_piece(st, ready.as_deref().unwrap_or(&live[at..end]));
            if self.plan.offload {
                let isolated: Vec<usize> = live[at..end]
                    .iter()
                    .copied()
                    .filter(|&i| st.slots[i].info.contains(MigrateInfo::WAS_MAPPED))
                    .collect();
                if !isolated.is_empty() {
                    self.batch_copy(st, &isolated, end == live.len());
                }
                at = end;
                continue;
            }
            self.copy_piece(st, &live[at..end], false);
            paced_bytes += bytes;
            paced_ns += piece_started.elapsed().as_nanos() as u64;
            at = end;
        }
    }

    /// The pipelined CPU copy with the pre-copy ([`super::Plan::precopy`]): each piece,
    /// [`PRECOPY_PIECE`] or one folio, is read into its destinations while still writable,
    /// then protected and isolated, and only the base pages that differ from what was read
    /// are copied again ([`folios_fix`]): the program's threads wait for that comparison of
    /// data the read just brought into the cache, not for a copy from memory. Then it
    /// moves.
    ///
    /// The reads run here, each just before its piece is protected. (On a thread of their
    /// own, a piece or two ahead, they made the 2-core AMD EPYC VM slower: critical path
    /// 0.73× at 4 KiB and at 2 MiB, batch 512, median of 5 alternating pairs; both threads
    /// take the process's mmap lock page by page, and the moves' unmaps write-lock it.)
    fn copy_precopied(&mut self, st: &mut BatchState, live: &[usize], mem: &ProcMem) {
        let mut at = 0;
        while at < live.len() && !self.abort.is_set() {
            let (end, _) = piece_end(st, live, at, PRECOPY_PIECE);
            let ready = self.populate_piece(st, &live[at..end], at == 0);
            let piece = ready.as_deref().unwrap_or(&live[at..end]);
            let (bytes, ns) = read_piece(mem, &self.precopy_reads(st, piece));
            self.tally.stats.precopied_bytes += bytes;
            self.tally.stats.precopy_ns += ns;
            if let Some(pause) = self.opts.faults().delay_after_precopy.filter(|_| at == 0) {
                std::thread::sleep(pause);
            }
            self.protect_piece(st, piece);
            self.copy_piece(st, &live[at..end], true);
            at = end;
        }
    }

    /// Populates the destinations of the folios `piece` where their runs left them to be
    /// populated piece by piece (see `prepare`), just before they are protected and copied;
    /// the batch's first folio counts its wait from the end of the `first` piece's. A folio
    /// whose destination cannot be populated (`ENOMEM`) is refused and stays as it was.
    /// Returns the folios left to protect where some were refused.
    fn populate_piece(&mut self, st: &mut BatchState, piece: &[usize], first: bool) -> Option<Vec<usize>> {
        let mut refused = false;
        let mut k = 0;
        while k < piece.len() {
            let r = st.slots[piece[k]].run;
            let e = k + piece[k..].iter().take_while(|&&i| st.slots[i].run == r).count();
            let end = st.slots[piece[e - 1]].item.folio.end();
            let run = &mut st.runs[r];
            if let Some(rest) = run.rest.as_ref() {
                let left = !run.later.is_done();
                let (spent, populated) = run.later.populate_to(rest.dest.addr() + (end - run.cursor));
                self.tally.stats.prepare_ns += spent.as_nanos() as u64;
                // Refused after the populate, as a node that ran out part way would.
                let fail = &self.opts.faults().fail_populate;
                let injected = left && piece[k..e].iter().any(|&i| fail.contains(&st.slots[i].item.index));
                if let Err(errno) = if injected { Err(Errno::NOMEM) } else { populated } {
                    refused = true;
                    for &i in &piece[k..e] {
                        st.slots[i].refused = Some(("destination on target node", errno));
                    }
                }
            }
            k = e;
        }
        if first {
            st.started = Instant::now();
        }
        refused.then(|| piece.iter().copied().filter(|&i| st.slots[i].refused.is_none()).collect())
    }

    /// Protects and isolates the folios `piece` of the batch, each contiguous stretch of
    /// one run with one call.
    fn protect_piece(&mut self, st: &mut BatchState, piece: &[usize]) {
        let t = Instant::now();
        let mut s = 0;
        while s < piece.len() {
            let mut e = s + 1;
            while e < piece.len()
                && st.slots[piece[e - 1]].item.folio.end() == st.slots[piece[e]].item.folio.addr()
                && st.slots[piece[e - 1]].run == st.slots[piece[e]].run
            {
                e += 1;
            }
            self.unmap_stretch(st, piece[s]..piece[e - 1] + 1);
            s = e;
        }
        self.tally.stats.unmap_ns += t.elapsed().as_nanos() as u64;
    }

    /// Copies the protected folios of `piece` (adjacent ones in one go) and moves them;
    /// with `fix`, after their pre-copy, only the base pages that differ. Their pairs are
    /// made piece by piece: the first folio must not wait for the whole batch's.
    fn copy_piece(&mut self, st: &mut BatchState, piece: &[usize], fix: bool) {
        let t = Instant::now();
        let copied: Vec<usize> = piece
            .iter()
            .copied()
            .filter(|&i| st.slots[i].info.contains(MigrateInfo::WAS_MAPPED))
            .filter(|&i| !st.runs[st.slots[i].run].copy_in)
            .collect();
        let (protected, kinds) = self.pairs(st, &copied);
        let ok = if fix && kinds.iter().all(|d| !matches!(d, Dst::Empty(_))) {
            // SAFETY: as below; the destinations are populated (none is `Empty`).
            let fixed = unsafe { folios_fix(&protected) };
            self.tally.stats.recopied_bytes += *fixed.as_ref().unwrap_or(&0) as u64;
            fixed.is_ok()
        } else {
            self.copy_shared(&protected, &kinds)
        };
        self.tally.stats.copy_ns += t.elapsed().as_nanos() as u64;
        if ok {
            self.tally.stats.batch_copied_folios += protected.len() as u64;
            for &i in piece {
                if st.slots[i].info.contains(MigrateInfo::WAS_MAPPED) {
                    st.slots[i].info.insert(MigrateInfo::ALREADY_COPIED);
                }
            }
            self.move_copied(st);
        } else {
            self.tally.stats.fallback_folios += protected.len() as u64;
        }
    }

    /// Copies `pairs` into their destinations (`dsts`), the piece shared with the copy
    /// helper where the call has one and the piece is more than one chunk
    /// ([`HELPER_CHUNK`]; a folio larger than a chunk is copied in chunks), each thread
    /// reading the events waiting after each chunk where the piece is of base pages.
    /// Returns whether every pair was copied.
    fn copy_shared(&mut self, pairs: &[CopyPair], dsts: &[Dst<'a>]) -> bool {
        let bytes: usize = pairs.iter().map(|p| p.len).sum();
        // The events waiting are read between chunks by the threads that copy (see
        // `events::Reader::serve_now`), where faults on the piece's isolated pages may be
        // answered: base pages. The piece is then cut in chunks even without a helper.
        let serve = self.plan.answer_faults && pairs.iter().all(|p| p.len == PAGE_SIZE);
        if bytes <= HELPER_CHUNK || (self.helper.is_none() && !serve) {
            // SAFETY: every pair copied reads old pages isolated in our graveyard just
            // before (no thread can write them) and writes a destination the pool handed us
            // that nothing else refers to; the two never overlap.
            return unsafe { folios_copy_each(pairs, dsts) }.is_ok();
        }
        let (parts, kinds, starts) = chunked(pairs, dsts);
        let cursor = Chunks::new(starts.len() - 1);
        let here = std::thread::current().id();
        let helped = AtomicU64::new(0);
        let events = &self.engine.events;
        let work = || {
            // The caller from the front, the helper from the back: see `helper`.
            let helping = std::thread::current().id() != here;
            cursor.run(helping, |c| {
                let r = starts[c]..starts[c + 1];
                if helping {
                    helped.fetch_add(parts[r.clone()].iter().map(|p| p.len as u64).sum(), Ordering::Relaxed);
                }
                // SAFETY: as above, for each chunk: its parts lie inside the pairs; the
                // chunks are disjoint, so the two threads never write the same bytes.
                unsafe { folios_copy_each(&parts[r.clone()], &kinds[r]) }?;
                // Only after a chunk copied whole: a panic there (none is expected; the
                // helper's own are swallowed) cannot hide a failed copy.
                if serve {
                    events.serve_now();
                }
                Ok::<(), Errno>(())
            });
        };
        match self.helper {
            Some(helper) => helper.share(&work),
            None => work(),
        }
        self.tally.stats.helper_copied_bytes += helped.into_inner();
        cursor.ok()
    }

    /// The pre-copy's reads of the folios `items` of a piece: each from the folio's live
    /// memory to its place in its destination (the plan copies nothing in with the
    /// pre-copy: every run has one).
    fn precopy_reads(&self, st: &BatchState, items: &[usize]) -> Vec<CopyPair> {
        let reads: Vec<CopyPair> = self
            .pairs(st, items)
            .0
            .into_iter()
            .zip(items)
            .map(|(pair, &i)| CopyPair { src: st.slots[i].item.folio.addr(), ..pair })
            .collect();
        coalesce(&reads).collect()
    }

    /// The copy of each live item into its destination, in order, and what that
    /// destination is. The items must not have moved yet: each lies in the part
    /// of its run's destination that is left, which starts at the run's cursor.
    fn pairs(&self, st: &BatchState, live: &[usize]) -> (Vec<CopyPair>, Vec<Dst<'a>>) {
        live.iter()
            .map(|&i| {
                let run = &st.runs[st.slots[i].run];
                let dest = &run.rest.as_ref().expect("a live item's run has a destination").dest;
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
    pub(super) fn dst(&self, dest: &Dest) -> Dst<'a> {
        match self.engine.pool.fill_uffd() {
            Some(uffd) if dest.unpopulated() => Dst::Empty(uffd),
            _ if dest.fresh() => Dst::Fresh,
            _ => Dst::Mapped,
        }
    }

    /// The batch copy through the active migrator when one is registered (pipelined: runs
    /// move as the migrator reports parts copied), else the default CPU `folios_copy` of the
    /// whole batch. The pipelined CPU copy is [`Call::copy_pieces`].
    ///
    /// `last`: nothing of the batch is copied after `live`. One folio, or the batch's last
    /// piece of one huge page or less, goes to the migrator on this thread and moves once
    /// copied: moving a part while the rest is copied gains little there, and the thread
    /// started for it cost more (2-core AMD EPYC, mtcopy, batch 512, 5 alternating pairs:
    /// critical path 1.41x at 2 MiB, 1.19x at 4 KiB).
    pub(super) fn batch_copy(&mut self, st: &mut BatchState, live: &[usize], last: bool) {
        let (pairs, dsts) = self.pairs(st, live);
        if self.opts.faults().fail_batch_copy {
            self.tally.stats.fallback_folios += live.len() as u64;
            return;
        }
        let copied_before = self.tally.stats.offloaded_folios;
        if self.plan.offload {
            let bytes: usize = pairs.iter().map(|p| p.len).sum();
            let here = pairs.len() == 1 || (last && bytes <= HPAGE_SIZE);
            let result = if self.plan.pipelined && !here {
                self.offload_pipelined(st, live, &pairs, &dsts)
            } else {
                let t = Instant::now();
                let done = crate::lock::Mutex::new(Vec::new());
                let on_complete = |r: Range<usize>| done.lock().push(r);
                // SAFETY: every source is an old page isolated in our graveyard (unmap phase),
                // which no thread writes, every destination was handed to us by the pool and
                // nothing else refers to it, and sources and destinations never overlap.
                let batch = unsafe { Batch::with_dsts(&pairs, Some(&on_complete), &dsts) };
                let result = dispatch(self.abort, &batch);
                self.tally.stats.copy_ns += t.elapsed().as_nanos() as u64;
                for r in done.into_inner() {
                    self.mark_copied(st, live, r);
                }
                if self.plan.pipelined {
                    self.move_copied(st);
                }
                result
            };
            if result.is_some() {
                // Only what the migrator reported complete is trusted, whatever it returned:
                // the rest is copied folio by folio in the move phase.
                let offloaded = self.tally.stats.offloaded_folios - copied_before;
                self.tally.stats.fallback_folios += live.len() as u64 - offloaded;
                return;
            }
            // Unregistered meanwhile: the default copy below.
        }
        // The default CPU batch copy (unpipelined, or a migrator that went away).
        let t = Instant::now();
        // SAFETY: as for the offloaded copy above.
        let ok = unsafe { folios_copy_each(&pairs, &dsts) }.is_ok();
        self.tally.stats.copy_ns += t.elapsed().as_nanos() as u64;
        if ok {
            self.tally.stats.batch_copied_folios += live.len() as u64;
            live.iter().for_each(|&i| st.slots[i].info.insert(MigrateInfo::ALREADY_COPIED));
        } else {
            self.tally.stats.fallback_folios += live.len() as u64;
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
        let move_before = self.tally.stats.move_ns;
        let result = std::thread::scope(|s| {
            let done_tx = tx.clone();
            let on_complete = move |r: Range<usize>| {
                let _ = done_tx.send(CopyEvent::Done(r));
            };
            // With every signal blocked, as every thread of pagemig's. Should none start, the
            // senders are gone with the closure and the default copy below does the batch.
            let _ = crate::sys::thread::spawn_scoped(s, "pagemig-offload", move || {
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
        let moving = self.tally.stats.move_ns - move_before;
        self.tally.stats.copy_ns += (t.elapsed().as_nanos() as u64).saturating_sub(moving);
        result
    }

    fn mark_copied(&mut self, st: &mut BatchState, live: &[usize], r: Range<usize>) {
        for &i in live.get(r).unwrap_or(&[]) {
            if !st.slots[i].info.contains(MigrateInfo::ALREADY_COPIED) {
                st.slots[i].info.insert(MigrateInfo::ALREADY_COPIED);
                self.tally.stats.offloaded_folios += 1;
            }
        }
    }
}

/// `pairs` (with their destinations' kinds) cut into parts of at most [`HELPER_CHUNK`]
/// bytes (a pair of whole pages is cut at page boundaries), and where each chunk of parts
/// begins: consecutive parts up to [`HELPER_CHUNK`] bytes together, so that adjacent base
/// pages are still copied with one call. The last entry is the number of parts.
fn chunked<'d>(pairs: &[CopyPair], dsts: &[Dst<'d>]) -> (Vec<CopyPair>, Vec<Dst<'d>>, Vec<usize>) {
    let (mut parts, mut kinds) = (Vec::new(), Vec::new());
    for (pair, &kind) in pairs.iter().zip(dsts) {
        let mut at = 0;
        while at < pair.len {
            let len = (pair.len - at).min(HELPER_CHUNK);
            parts.push(CopyPair { dst: pair.dst + at, src: pair.src + at, len });
            kinds.push(kind);
            at += len;
        }
    }
    let mut starts = vec![0];
    let mut bytes = 0;
    for (i, part) in parts.iter().enumerate() {
        if bytes + part.len > HELPER_CHUNK && bytes > 0 {
            starts.push(i);
            bytes = 0;
        }
        bytes += part.len;
    }
    starts.push(parts.len());
    (parts, kinds, starts)
}

/// The end of the piece of `live` that starts at `at` (folios while they fit in `bytes`,
/// at least one), and its bytes.
fn piece_end(st: &BatchState, live: &[usize], at: usize, bytes: usize) -> (usize, usize) {
    let size = |k: usize| st.slots[live[k]].item.folio.size();
    let mut end = at + 1;
    let mut total = size(at);
    while end < live.len() && total + size(end) <= bytes {
        total += size(end);
        end += 1;
    }
    (end, total)
}

/// Reads one piece of the pre-copy (`reads`, from [`Call::precopy_reads`]) through `mem`;
/// returns the bytes read and how long it took, ns. A page that cannot be read now is
/// left, and copied once protected.
fn read_piece(mem: &ProcMem, reads: &[CopyPair]) -> (u64, u64) {
    let t = Instant::now();
    let mut bytes = 0;
    for pair in reads {
        // SAFETY: the destination is a populated one the pool handed this call (the plan
        // fills none empty with the pre-copy), which nothing else refers to until it is
        // moved, after this read; the source is only read, by the kernel.
        bytes += unsafe { mem.read_into(pair.src, pair.dst, pair.len) } as u64;
    }
    (bytes, t.elapsed().as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dst: usize, src: usize, len: usize) -> CopyPair {
        CopyPair { dst, src, len }
    }

    /// Every byte of the pairs is in exactly one part, in order, each part at most a chunk
    /// and inside its pair; chunks of base pages hold a chunk's worth of pages, a huge
    /// page is cut into chunk-sized parts, and no chunk is more than [`HELPER_CHUNK`].
    #[test]
    fn chunked_cuts_and_groups_every_byte_once() {
        let page = 4096;
        let base: Vec<CopyPair> = (0..40).map(|i| pair((1 << 30) + i * page, (1 << 31) + i * page, page)).collect();
        let huge = vec![pair(1 << 30, 1 << 31, 2 << 20), pair((1 << 30) + (2 << 20), (1 << 31) + (2 << 20), 2 << 20)];
        let mixed =
            vec![pair(1 << 30, 1 << 31, page), pair(1 << 32, 1 << 33, 2 << 20), pair(1 << 34, 1 << 35, 3 * page)];
        for (what, pairs, want_chunks) in
            [("base", base, 3), ("huge", huge, 2 * (2 << 20) / HELPER_CHUNK), ("mixed", mixed, 1 + 32 + 1)]
        {
            let dsts = vec![Dst::Fresh; pairs.len()];
            let (parts, kinds, starts) = chunked(&pairs, &dsts);
            assert_eq!(parts.len(), kinds.len(), "{what}");
            assert_eq!(starts.len() - 1, want_chunks, "{what}: {starts:?}");
            assert_eq!((starts[0], *starts.last().unwrap()), (0, parts.len()), "{what}");
            for w in starts.windows(2) {
                assert!(w[0] < w[1], "{what}: an empty chunk");
                assert!(parts[w[0]..w[1]].iter().map(|p| p.len).sum::<usize>() <= HELPER_CHUNK, "{what}");
            }
            // The parts, in order, are the pairs again.
            let mut at = parts.iter();
            for p in &pairs {
                let mut done = 0;
                while done < p.len {
                    let part = at.next().unwrap_or_else(|| panic!("{what}: bytes missing"));
                    assert_eq!((part.dst, part.src), (p.dst + done, p.src + done), "{what}");
                    assert!(part.len <= HELPER_CHUNK && part.len % page == 0, "{what}");
                    done += part.len;
                }
                assert_eq!(done, p.len, "{what}");
            }
            assert!(at.next().is_none(), "{what}: parts beyond the pairs");
        }
    }
}
