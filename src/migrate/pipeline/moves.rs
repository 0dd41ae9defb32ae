//! The move phase of a batch: each run's copied folios handed to the mover (or moved
//! here), folio by folio copies of what the batch copy left, and the undo of each folio
//! that fails: its old pages back where they were, protection off, its reason counted.
#![allow(unsafe_code, reason = "copies isolated old pages into destinations of ours")]

use std::ops::Range;
use std::time::Instant;

use super::MigrateInfo;
use super::{BatchState, Call, Held};
use crate::copy::{CopyPair, folios_copy_to};
use crate::error::Error;
use crate::migrate::mover::{Job, MoveJob, STOPPED, undo};
use crate::migrate::staged::Staged;
use crate::sys::Errno;

impl Call<'_> {
    /// Moves, in each run, the longest prefix of its next folios whose copy is complete,
    /// undoing on the way each folio refused for good (never protected: its destination
    /// could not be populated, or the program changed its mapping), so that the folios
    /// copied after it do not wait for the batch's end.
    pub(super) fn move_copied(&mut self, st: &mut BatchState) {
        for r in 0..st.runs.len() {
            let Some(mut rest) = st.runs[r].rest.take() else { continue };
            let end = st.runs[r].items.end;
            loop {
                let next = st.runs[r].next;
                let limit = (next..end).find(|&i| !st.copied(i)).unwrap_or(end);
                if limit > next {
                    rest = self.finish_through(st, r, rest, next..limit);
                    continue;
                }
                match st.slots.get(next).filter(|_| next < end) {
                    Some(slot) if !slot.info.contains(MigrateInfo::WAS_MAPPED) => match slot.refused {
                        Some((_, errno)) => rest = self.undo_one(st, r, next, rest, errno),
                        None => break,
                    },
                    _ => break,
                }
            }
            if st.runs[r].next >= end || rest.is_empty() {
                rest.release(self.engine);
            } else {
                st.runs[r].rest = Some(rest);
            }
        }
    }

    /// Ends run `r`'s move phase: copies folio by folio what the batch copy did not, moves
    /// everything copied, and undoes each folio whose copy fails or that was never
    /// isolated (one pinned for now waits for the next pass).
    pub(super) fn copy_rest_and_move(&mut self, st: &mut BatchState, r: usize) {
        let Some(mut rest) = st.runs[r].rest.take() else { return };
        let end = st.runs[r].items.end;
        // The first of the copied folios not yet handed to the move phase.
        let mut pending: Option<usize> = None;
        for i in st.runs[r].next..end {
            if !st.copied(i) {
                let offset = st.slots[i].item.folio.addr() - st.runs[r].cursor;
                if let Err(errno) = self.copy_one(st, i, &rest, offset) {
                    if let Some(p) = pending.take() {
                        rest = self.finish_through(st, r, rest, p..i);
                    }
                    rest = self.undo_one(st, r, i, rest, errno);
                    continue;
                }
            }
            pending.get_or_insert(i);
        }
        if let Some(p) = pending {
            rest = self.finish_through(st, r, rest, p..end);
        }
        debug_assert!(rest.is_empty());
        rest.release(self.engine);
    }

    /// Copies folio `i`, which the batch copy did not, into its place in `rest` (`offset`
    /// bytes in). Refused for a folio never isolated (copying it could lose a write) and
    /// once the call is stopped.
    fn copy_one(&mut self, st: &BatchState, i: usize, rest: &Staged, offset: usize) -> Result<(), Errno> {
        let item = st.slots[i].item;
        if let Some((_, pause)) = self.opts.faults().delay_folio_copy.filter(|&(at, _)| at == item.index) {
            std::thread::sleep(pause);
        }
        let copy_start = Instant::now();
        let result = if self.abort.is_set() {
            Err(Errno::CANCELED)
        } else if !st.slots[i].info.contains(MigrateInfo::WAS_MAPPED) {
            // Never protected: copying it could lose a write. It stays as it is.
            Err(st.slots[i].refused.map_or(Errno::AGAIN, |(_, e)| e))
        } else if self.opts.faults().fail_folio_copy.contains(&item.index) {
            Err(Errno::IO)
        } else {
            let pair =
                CopyPair { dst: rest.dest.addr() + offset, src: rest.grave.addr() + offset, len: item.folio.size() };
            // SAFETY: `src` holds the folio's old pages, isolated in our graveyard since the
            // isolate phase; `dst` lies in the destination the pool handed us for this folio
            // (unpopulated or not as it says) and nothing else refers to it.
            unsafe { folios_copy_to(&[pair], self.dst(&rest.dest)) }
        };
        self.tally.stats.copy_ns += copy_start.elapsed().as_nanos() as u64;
        result
    }

    /// Undoes folio `i` of run `r`, the run's next (its part of `rest` comes first): its
    /// old pages back, protection off; then counts it failed with `errno`, or held for the
    /// next pass. Returns what is left of `rest`.
    fn undo_one(&mut self, st: &mut BatchState, r: usize, i: usize, rest: Staged, errno: Errno) -> Staged {
        let item = st.slots[i].item;
        debug_assert_eq!(st.runs[r].cursor, item.folio.addr());
        let (bad, rest) = rest.split_at(item.folio.size());
        // The old pages go back where they were before the protection comes off.
        undo(self.engine, item.folio.addr(), item.folio.end());
        bad.release(self.engine);
        st.runs[r].cursor = item.folio.end();
        st.runs[r].next = i + 1;
        // A thread faulted on it while isolated, and the event reader copied its new page
        // in already: it moved.
        let f = item.folio;
        if self.engine.busy.lock().is_answered(f.addr(), f.end()) {
            self.tally.stats.answered_bytes += f.size() as u64;
            self.tally.moved(f, false);
            return rest;
        }
        let op = match st.slots[i].refused {
            // Held elsewhere for now (pinned, or split by the kernel): another pass tries it
            // again, as the kernel retries a folio with extra references.
            Some((op, Errno::BUSY)) if !self.abort.is_set() => {
                self.held.push(Held { item, op, errno: Errno::BUSY });
                return rest;
            }
            Some((op, _)) => op,
            None if errno == Errno::CANCELED => STOPPED,
            None if !st.slots[i].info.contains(MigrateInfo::WAS_MAPPED) => "write-protect",
            None => "folio copy",
        };
        self.fail(&item, Error::sys(op)(errno));
        rest
    }

    /// Hands the copied folios `items` of run `r`, its next ones, to the move phase with the
    /// part of `rest` in front of them. Returns what is left of `rest`.
    fn finish_through(&mut self, st: &mut BatchState, r: usize, rest: Staged, items: Range<usize>) -> Staged {
        debug_assert_eq!(st.runs[r].cursor, st.slots[items.start].item.folio.addr());
        let end_addr = st.slots[items.end - 1].item.folio.end();
        let (head, rest) = rest.split_at(end_addr - st.runs[r].cursor);
        self.finish(st, items.clone(), head);
        st.runs[r].cursor = end_addr;
        st.runs[r].next = items.end;
        rest
    }

    /// Hands the copied destination of the folios `items` (contiguous) to the move phase:
    /// move the new pages into the sources, wake the waiting threads, free the old pages;
    /// undone if the move fails.
    fn finish(&mut self, st: &mut BatchState, items: Range<usize>, staged: Staged) {
        let first = &st.slots[items.start].item;
        let start = first.folio.addr();
        debug_assert_eq!(staged.len(), st.slots[items.end - 1].item.folio.end() - start);
        let slots = &st.slots[items.clone()];
        let job = MoveJob {
            start,
            staged,
            folios: slots.iter().map(|slot| slot.item.folio).collect(),
            // Freeing a huge page costs little: only base pages go to the reaper.
            deferred: self.plan.deferred && !first.folio.is_pmd(),
            batch_started: (!st.first_done).then_some(st.started),
            fail: slots.iter().any(|slot| self.opts.faults().fail_move.contains(&slot.item.index)),
            copy_in: st.runs[st.slots[items.start].run].copy_in,
            delay: self.opts.faults().delay_move,
        };
        st.first_done = true;
        self.submit(Job::Move(job));
    }
}
