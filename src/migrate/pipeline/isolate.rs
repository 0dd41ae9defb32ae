//! The isolate phase: each run (or piece) write-protected and registered, then its old
//! pages moved into the run's graveyard, so that every access to it waits and no write can
//! land behind the copy. A folio that cannot be protected or isolated is put back as it
//! was and remembers why.
#![allow(unsafe_code, reason = "moves the old pages of protected, claimed sources into their graveyards")]

use std::ops::Range;
use std::time::Instant;

use crate::lock::MutexGuard;

use super::MigrateInfo;
use super::{BatchState, CHANGED, Call};
use crate::backoff::Backoff;
use crate::folio::Folio;
use crate::migrate::Engine;
use crate::migrate::busy::{Claims, subtract};
use crate::migrate::mover::{self, GONE, Patience, overlaps, unprotect};
use crate::migrate::outcome::{KEPT_CHANGING, Phase, classify};
use crate::sys::{self, Advice, Errno};

/// How many times one isolation empties a graveyard part that a stranger's read filled
/// before it gives up on the folio for this pass (`EBUSY`: a later pass tries again).
const GRAVE_CLEARS: u32 = 3;

impl<'a> Call<'a> {
    /// Write-protects and isolates each run with one call each, recording the state on the
    /// destinations.
    pub(super) fn unmap(&mut self, st: &mut BatchState) {
        let t = Instant::now();
        for r in 0..st.runs.len() {
            if st.runs[r].rest.is_some() {
                self.unmap_stretch(st, st.runs[r].items.clone());
            }
        }
        self.tally.stats.unmap_ns += t.elapsed().as_nanos() as u64;
    }

    /// Write-protects `[start, end)`, which the call registered as it began. Where the
    /// program unmapped, replaced or moved part of it since, the protection is refused: a
    /// mapping made there is not the program's old memory. Most are registered no more (a
    /// holding of the event reader's is never registered, see `events`), but memory the
    /// program moved there (`mremap`) comes registered, its old pages perhaps still on
    /// their way in through the event reader, so what left the call's runs (an unmap or
    /// move read by the reader, [`crate::migrate::busy::Claims::forget_runs`]) is refused
    /// first.
    fn protect(&self, start: usize, end: usize) -> Result<(), (&'static str, Errno)> {
        if !self.engine.busy.lock().runs_cover(self.call, start, end) {
            return Err((CHANGED, Errno::FAULT));
        }
        let uffd = &self.engine.uffd;
        let len = end - start;
        if !uffd.wp_unpopulated() {
            // Without WP_UNPOPULATED a never-touched page is not protected: touch it first.
            sys::madvise(start, len, Advice::PopulateWrite).map_err(|e| ("populate source", e))?;
        }
        uffd.writeprotect(start, len, true).map_err(|_| {
            // The kernel protects mapping by mapping and stops at the first it may not: the
            // protection of the ones before is taken off again (waking their writers).
            unprotect(self.engine, start, end);
            (CHANGED, Errno::FAULT)
        })
    }

    /// Protects and isolates the contiguous items `items` of one run; where the stretch
    /// cannot be protected as a whole (the program changed part of it), folio by folio.
    pub(super) fn unmap_stretch(&mut self, st: &mut BatchState, items: Range<usize>) {
        let (start, end) = (st.slots[items.start].item.folio.addr(), st.slots[items.end - 1].item.folio.end());
        if self.protect(start, end).is_ok() {
            if let Some(handshake) = &self.opts.faults().isolate_handshake {
                handshake.meet();
            }
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
        let (start, end) = (st.slots[items.start].item.folio.addr(), st.slots[items.end - 1].item.folio.end());
        // Counted empty before the lock: a fork waiting for empty pages to fill needs it.
        // What is isolated takes its part of the count into the claims; what goes back
        // returns it here; the rest closes at the end.
        let mut empty = crate::migrate::fork::open((end - start) / sys::PAGE_SIZE);
        let count = |s: usize, e: usize| (e - s) / sys::PAGE_SIZE;
        let mut failed: Vec<(usize, &'static str, Errno)> = Vec::new();
        // A thread's fault on these pages may be answered at once by the event reader: base
        // pages whose mapping has no memory policy of its own (a page copied in is
        // allocated by the reader's policy, bound to the target).
        let answer = (self.plan.answer_faults
            && !st.slots[items.start].item.own_policy
            && st.slots[items.clone()].iter().all(|slot| slot.item.folio.size() == sys::PAGE_SIZE))
        .then_some(self.target);
        {
            let mut claims = engine.busy.lock();
            let run = &st.runs[st.slots[items.start].run];
            let grave = |a: usize| run.grave_base + (a - run.start);
            let folios: Vec<Folio<'static>> = st.slots[items.clone()].iter().map(|slot| slot.item.folio).collect();
            let mut patience = Patience::new();
            let mut unshared_to = start;
            let mut one_by_one = start;
            let mut cleared = 0;
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
                let probed = probe(engine, at, folios[k].end());
                if let Err(errno) = probed {
                    if Patience::wait_events(&mut self.probe_wait, &mut claims, errno) {
                        continue;
                    }
                    if errno == Errno::AGAIN {
                        // Refused for as long as the patience lasts: tried again on a
                        // later pass, as a busy page is.
                        failed.push((items.start + k, KEPT_CHANGING, Errno::BUSY));
                        at = folios[k].end();
                        continue;
                    }
                }
                let result = match probed {
                    // SAFETY: `[at, stretch_end)` is claimed by this call, write-protected
                    // and registered in missing mode (the probe just said so, and that no
                    // change of the program's waits unread), so with its pages moved out
                    // every access to it waits until they or their copy come back; the
                    // graveyard part is ours and empty.
                    Ok(()) => unsafe { engine.reaper.uffd().move_pages(grave(at), at, stretch_end - at) },
                    Err(errno) => Err((0, errno)),
                };
                let (moved, errno) = match result {
                    Ok(()) => (stretch_end - at, None),
                    Err((moved, errno)) => (moved, Some(errno)),
                };
                let bad = at + moved;
                if moved > 0 {
                    self.probe_wait.reset();
                }
                let Some(errno) = errno else {
                    claims.add_isolated(at, stretch_end, grave(at), empty.split(count(at, stretch_end)));
                    if let Some(node) = answer {
                        answer_from_now(engine, &mut claims, at, stretch_end, node);
                    }
                    at = stretch_end;
                    continue;
                };
                // A folio goes whole or not at all: keep the folios that moved whole, put
                // back the moved part of the one that stopped the move.
                let fk = folios[folios.partition_point(|f| f.end() <= bad)];
                if fk.addr() > at {
                    claims.add_isolated(at, fk.addr(), grave(at), empty.split(count(at, fk.addr())));
                    if let Some(node) = answer {
                        answer_from_now(engine, &mut claims, at, fk.addr(), node);
                    }
                }
                if bad > fk.addr() {
                    // The moved part of this folio goes back, as any isolated span does
                    // (waiting out EAGAIN while an event is read, copying back where the
                    // mapping changed): recorded first, so that an event meanwhile finds
                    // its old pages in the graveyard.
                    // Their count comes back to this stretch, which may isolate them again.
                    claims.add_isolated(fk.addr(), bad, grave(fk.addr()), empty.split(count(fk.addr(), bad)));
                    empty.merge(mover::put_back_counted(engine, &mut claims, fk.addr(), bad));
                }
                at = fk.addr();
                if errno == Errno::EXIST && cleared < GRAVE_CLEARS {
                    // The graveyard was empty when mapped and took nothing but this run's
                    // old pages, and the part from `at` on went back above: a page there
                    // is one the engine's fault handler gave a stranger that read this
                    // address space (another thread or process, `process_vm_readv`).
                    // Emptied, and the move tried again.
                    cleared += 1;
                    // SAFETY: `[grave(at), grave(stretch_end))` is this run's graveyard
                    // part for folios not isolated (their moved pages went back): it holds
                    // nothing of anyone's.
                    let _ = unsafe { sys::discard(grave(at), stretch_end - at) };
                    continue;
                }
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
                    if unshare(engine, &mut claims, at, stretch_end, self.opts.faults().unshare_handshake.as_deref()) {
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
                // A hole where the mapping still is: a page never touched, or purged before
                // the call registered it (a purge read since is dead from the claim, see
                // `Claims::add_purged`). Not present, as `move_pages(2)` says of a purged
                // page; a hole where nothing is mapped any more is memory unmapped meanwhile.
                let page = bad & !(sys::PAGE_SIZE - 1);
                let hole = errno == Errno::NOENT && sys::any_locked(page, sys::PAGE_SIZE).is_ok();
                let (op, errno) = classify(Phase::Isolate, if hole { Errno::FAULT } else { errno });
                failed.push((items.start + k, op, errno));
                at = fk.end();
            }
        }
        // What was not isolated is not empty.
        drop(empty);
        for (i, op, errno) in failed {
            let f = st.slots[i].item.folio;
            unprotect(engine, f.addr(), f.end());
            st.slots[i].info.remove(MigrateInfo::WAS_MAPPED);
            st.slots[i].refused = Some((op, errno));
        }
    }
}

/// Whether `[start, end)` (a folio, protected) may be moved out now: still the mapping
/// the call registered, and no unmap, move or purge of the program's waiting to be read.
/// The move out is made through the graveyards' userfaultfd, and the kernel checks only
/// that the graveyard is registered with it: where the program unmapped the memory and
/// mapped its own in its place before the unmap's event was read (the event is sent once
/// the unmap is done, and nothing here is dead before it is read), the move would take the
/// new memory's pages, and drop them once the unmap was read: the program would read zeros
/// where it wrote. The folio is protected again through the program's userfaultfd (its
/// pages are already: nothing changes, no TLB flush), which the kernel refuses with
/// `EAGAIN` while any event of the program's waits unread, and with `ENOENT` where the
/// memory is not registered. Made under the claims lock right before the move: only the
/// moment between the two system calls is left.
fn probe(engine: &Engine, start: usize, end: usize) -> Result<(), Errno> {
    engine.uffd.writeprotect_once(start, end - start, true)
}

/// Lets the event reader answer faults on the isolated base pages of `[start, end)`, to be
/// allocated on `node` ([`Claims::answer_faults`]), and wakes the threads whose fault it
/// could not answer before (a write to a page being protected): each faults again on its
/// now empty page, and that fault is answered.
fn answer_from_now(engine: &Engine, claims: &mut Claims, start: usize, end: usize, node: u32) {
    claims.answer_faults(start, end, node);
    for page in claims.take_waiting(start, end) {
        let _ = engine.uffd.wake(page, sys::PAGE_SIZE);
    }
}

/// Makes the present pages of the protected, claimed `[start, end)` this process's own:
/// protection off for a moment, a write fault taken on each present page without writing
/// it (`MADV_POPULATE_WRITE`), protection on again. Never-touched pages are left alone: a
/// write fault there would wait for a migration that is this thread.
///
/// The faults are taken with the claims lock let go (`handshake`: a test's thread met
/// there first, `FaultInjection::unshare_handshake`). A purge of the program's goes on as
/// soon as the event reader has read its event, and may empty its pages a while later:
/// one that came just before the call claimed the memory empties a page found present here
/// by the time it is faulted, and that fault waits for the reader, which waits for the
/// lock. With the lock held, the call, and every thread of the program that touched its
/// memory, waited for good (the soak's 4 KiB region purged, forked and migrated at once,
/// on a loaded machine). The reader answers such a fault with zeros, the page's contents
/// after the purge ([`Claims::hole_while_unsharing`]).
///
/// With the lock let go, the program may also unmap part of the range and map something
/// else there. Each stretch of present pages is faulted without what the events read by
/// then say the program purged, unmapped or moved away; a mapping made after that (the
/// kernel maps it before its unmap's event is even sent) may still be write-faulted:
/// never written to, but populated (its private pages made, a file's pages dirtied). No
/// operation of the kernel's both takes a write fault and refuses a mapping not
/// registered with pagemig's userfaultfd, which is what would close that window.
///
/// Returns false when the kernel refuses for now (an event of the program waits to be
/// read, which needs the lock) or part of the range is no longer the call's registered
/// memory; what it took the protection off is protected again.
fn unshare(
    engine: &Engine,
    claims: &mut MutexGuard<'_, Claims>,
    start: usize,
    end: usize,
    handshake: Option<&crate::migrate::options::Handshake>,
) -> bool {
    let Ok(frames) = crate::numa::page_frames(start, end - start) else { return false };
    match engine.uffd.writeprotect_once(start, end - start, false) {
        Ok(()) => {}
        // Refused at once: nothing changed.
        Err(Errno::AGAIN) => return false,
        // The kernel stops at the first mapping it may not change.
        Err(_) => {
            protect_again(engine, claims, start, end);
            return false;
        }
    }
    claims.begin_unsharing(start, end);
    if let Some(handshake) = handshake {
        MutexGuard::unlocked(claims, || handshake.meet());
    }
    let page = |i: usize| start + i * sys::PAGE_SIZE;
    let mut i = 0;
    while i < frames.len() {
        if frames[i].is_none() {
            i += 1;
            continue;
        }
        let j = i + frames[i..].iter().take_while(|f| f.is_some()).count();
        let live = subtract(&[(page(i), page(j))], &claims.dead_in(page(i), page(j)));
        MutexGuard::unlocked(claims, || {
            for (s, e) in live {
                let _ = sys::madvise(s, e - s, Advice::PopulateWrite);
            }
        });
        i = j;
    }
    // (Nothing above panics: the mark comes off.)
    claims.end_unsharing(start, end);
    protect_again(engine, claims, start, end);
    true
}

/// Write-protects again the parts of `[start, end)` the events read so far do not say the
/// program purged, unmapped or moved away, each part with a call of its own (the kernel
/// stops at the first mapping it may not change). An event the program raised meanwhile
/// waits for the lock to be read: it is let go until the protection is back on (the pages
/// are not isolated yet: writes meanwhile are kept); not given up, since the pages must not
/// stay writable once isolated. A part refused otherwise is memory the program changed:
/// its folios fail in the isolation.
fn protect_again(engine: &Engine, claims: &mut MutexGuard<'_, Claims>, start: usize, end: usize) {
    for (s, e) in subtract(&[(start, end)], &claims.dead_in(start, end)) {
        let mut backoff = Backoff::kernel();
        while engine.uffd.writeprotect_once(s, e - s, true) == Err(Errno::AGAIN) {
            let pause = backoff.next_pause().unwrap_or_default();
            MutexGuard::unlocked(claims, || std::thread::sleep(pause));
        }
    }
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
