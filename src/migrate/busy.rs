//! Folios under migration, and what the program did to them meanwhile.
//!
//! A second call that reaches a folio another call is moving finds it busy (`EAGAIN`) and
//! retries it later, as the kernel does with a locked folio. Each claim also records:
//!
//! - its *isolated* spans: source ranges whose old pages were moved out into a graveyard
//!   (the source is empty and every access to it waits), with where those pages are;
//! - its *dead* spans: ranges the program purged (`madvise`) or moved away (`mremap`) while
//!   they were claimed, learnt from userfaultfd's events.
//!
//! One lock covers all of it. Isolating a span, moving new pages into it, putting old pages
//! back, and consuming an event that overlaps it all happen under the lock, so they exclude
//! each other: a purge announced before a move is seen by the move, and one announced after
//! it purges the new pages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::lock::{Condvar, Mutex, MutexGuard};

use super::Span;
use super::fork::Empty;
use super::options::{FaultInjection, Handshake};

/// How long a purge the event reader read counts as dead for the claims made afterwards
/// ([`Claims::purged`]): far longer than a purging thread waits for a CPU on a busy machine
/// between its event and its zap (a thread held up longer, by a cgroup's CPU quota say, is
/// not covered).
pub(super) const PURGE_RECORD: Duration = Duration::from_secs(1);

/// One claimed range.
#[derive(Debug, Default)]
pub(super) struct Claim {
    end: usize,
    /// Purged or moved away while claimed: never to be moved into or put back.
    dead: Vec<Span>,
    /// Source start → (source end, where its old pages are).
    isolated: BTreeMap<usize, (usize, usize)>,
    /// Old pages the program moves away go home through the event reader's holdings at
    /// once (`FaultInjection::home_through_holdings`).
    through_holdings: bool,
    /// Spans of base-page folios whose isolated pages the event reader may copy in when a
    /// thread faults on them, with the node to allocate on ([`Claims::answer_faults`]).
    answer: Vec<(usize, usize, u32)>,
    /// Source start → end of what the event reader copied in: the move leaves it alone.
    answered: BTreeMap<usize, usize>,
    /// Pages of faults the event reader could not answer yet ([`Claims::add_waiting`]).
    waiting: Vec<usize>,
    /// `FaultInjection::stall_put_back`, until the first put-back takes it.
    stall_put_back: Option<Arc<Handshake>>,
    /// `FaultInjection::fail_put_back_copies`: copies back still to refuse.
    fail_put_back_copies: u32,
    /// `FaultInjection::pause_event_reader`.
    pause_reader: bool,
}

/// Every claim, by start address, and the runs of every call in progress.
#[derive(Debug, Default)]
pub(super) struct Claims {
    map: BTreeMap<usize, Claim>,
    /// The runs of each call in progress (sorted), registered with the program's
    /// userfaultfd as it began, by call number: a call that ends leaves them registered
    /// for the others.
    calls: BTreeMap<u64, Vec<Span>>,
    next_call: u64,
    /// Ranges a call that ended left registered because the kernel would not take the
    /// registration off (sorted, disjoint): see [`Claims::add_stray`].
    stray: Vec<Span>,
    /// How many claims have `pause_reader`.
    pausing: usize,
    /// The last call that ended refused every unregistration
    /// (`FaultInjection::fail_unregister`): the event reader leaves the strays to the next
    /// call's end ([`super::mover::retry_strays`]).
    refusing: bool,
    /// Ranges the program purged (`madvise`, a `REMOVE` event), with when the reader read
    /// each, oldest first, for [`PURGE_RECORD`]: a claim made there meanwhile counts them dead
    /// from the start ([`Busy::try_claim`]). The kernel sends the event, wakes the purging
    /// thread once it is read, and only then zaps the pages; a call that claimed and isolated
    /// them in between, the thread not yet back on a CPU, would move their old data back in
    /// after the zap had passed over an empty source, and the program would read old
    /// contents where it purged. Calls that follow one another claim the same memory again
    /// within a millisecond: a call's end keeps the parts whose pages are still there
    /// registered (see [`Claims::purges_to_keep`]), so that the program's unmap of them is
    /// still seen and forgets them. A page purged with `MADV_FREE` and written again
    /// meanwhile stays where it is, unmoved, keeping what was written (`ENOENT`, as a page
    /// the purge freed).
    purged: std::collections::VecDeque<(usize, usize, Instant)>,
    /// Claimed ranges whose present pages a call is making its own now, with the claims
    /// lock let go (see the isolation's `unshare`): a missing fault there on a page not
    /// isolated is answered with zeros ([`Claims::hole_while_unsharing`]).
    unsharing: Vec<Span>,
}

/// `pieces` (sorted, disjoint) less what `runs` (sorted, disjoint; or, from one piece
/// that holds them all, sorted by start only, as the dead parts of a range may overlap)
/// cover.
pub(crate) fn subtract(pieces: &[Span], runs: &[Span]) -> Vec<Span> {
    let mut out = Vec::with_capacity(pieces.len());
    for &(s, e) in pieces {
        let mut at = s;
        let first = runs.partition_point(|&(_, re)| re <= s);
        for &(rs, re) in runs[first..].iter().take_while(|&&(rs, _)| rs < e) {
            if rs > at {
                out.push((at, rs));
            }
            at = at.max(re);
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// Adds `[start, end)` to `spans` (sorted, disjoint), merging what it overlaps or touches.
fn add_span(spans: &mut Vec<Span>, start: usize, end: usize) {
    // The spans from the first that reaches `start` to the last that begins by `end`.
    let first = spans.partition_point(|&(_, e)| e < start);
    let after = spans.partition_point(|&(s, _)| s <= end);
    if first == after {
        spans.insert(first, (start, end));
    } else {
        let merged = (spans[first].0.min(start), spans[after - 1].1.max(end));
        spans.splice(first..after, [merged]);
    }
}

/// The set of address ranges being migrated.
#[derive(Debug, Default)]
pub struct Busy {
    claims: Mutex<Claims>,
    released: Condvar,
    /// How many ranges are claimed (the claims' count, read without the lock).
    claimed: AtomicUsize,
}

impl Busy {
    /// Claims `[start, end)` unless it overlaps a claimed range, with the call's injected
    /// faults that act on claims (`FaultInjection::home_through_holdings`,
    /// `FaultInjection::stall_put_back`, `FaultInjection::pause_event_reader`).
    pub fn try_claim(&self, start: usize, end: usize, faults: &FaultInjection) -> bool {
        let mut claims = self.claims.lock();
        let overlaps = claims.map.range(..end).next_back().is_some_and(|(_, c)| c.end > start);
        if !overlaps {
            let claim = Claim {
                end,
                dead: claims.purged_in(start, end),
                through_holdings: faults.home_through_holdings,
                stall_put_back: faults.stall_put_back.clone(),
                fail_put_back_copies: faults.fail_put_back_copies,
                pause_reader: faults.pause_event_reader,
                ..Default::default()
            };
            claims.pausing += usize::from(claim.pause_reader);
            claims.map.insert(start, claim);
            self.claimed.store(claims.map.len(), Ordering::Relaxed);
        }
        !overlaps
    }

    /// Releases ranges claimed with [`Busy::try_claim`], by start address.
    pub fn release_all(&self, starts: &[usize]) {
        let mut claims = self.claims.lock();
        for start in starts {
            let released = claims.map.remove(start);
            claims.pausing -= usize::from(released.as_ref().is_some_and(|c| c.pause_reader));
            debug_assert!(released.is_none_or(|c| c.isolated.is_empty()), "a claim released with pages isolated");
        }
        self.claimed.store(claims.map.len(), Ordering::Relaxed);
        drop(claims);
        self.released.notify_all();
    }

    /// Waits up to `timeout` for any release.
    pub fn wait(&self, timeout: Duration) {
        let mut claims = self.claims.lock();
        self.released.wait_for(&mut claims, timeout);
    }

    /// Whether any range is claimed (a call is in progress), without the lock.
    pub fn any_claimed(&self) -> bool {
        self.claimed.load(Ordering::Relaxed) > 0
    }

    /// Locks every claim, for an operation that must exclude the others.
    pub(super) fn lock(&self) -> MutexGuard<'_, Claims> {
        self.claims.lock()
    }
}

impl Claims {
    fn overlapping(&mut self, start: usize, end: usize) -> impl Iterator<Item = (usize, &mut Claim)> {
        // A claim starting before `start` may reach into the range: begin with the last one.
        let first = self.map.range(..=start).next_back().map_or(start, |(&s, _)| s);
        self.map.range_mut(first..end).filter(move |(_, c)| c.end > start).map(|(&s, c)| (s, c))
    }

    /// The dead parts of `[start, end)`, in address order.
    pub fn dead_in(&mut self, start: usize, end: usize) -> Vec<Span> {
        let mut out: Vec<Span> = self
            .overlapping(start, end)
            .flat_map(|(_, c)| c.dead.iter().copied())
            .filter(|&(s, e)| s < end && start < e)
            .map(|(s, e)| (s.max(start), e.min(end)))
            .collect();
        out.sort_unstable();
        out
    }

    /// The put-back stall of the claim holding `at`, taken once
    /// (`FaultInjection::stall_put_back`).
    pub fn take_put_back_stall(&mut self, at: usize) -> Option<Arc<Handshake>> {
        self.overlapping(at, at + 1).find_map(|(_, c)| c.stall_put_back.take())
    }

    /// Whether the copy back of old pages at `at` is to be refused as by a full node
    /// (`FaultInjection::fail_put_back_copies`), counting it.
    pub fn take_put_back_copy_failure(&mut self, at: usize) -> bool {
        self.overlapping(at, at + 1).any(|(_, c)| {
            let fail = c.fail_put_back_copies > 0;
            c.fail_put_back_copies = c.fail_put_back_copies.saturating_sub(1);
            fail
        })
    }

    /// Whether a claim overlapping `[start, end)` sends its old pages home through the
    /// event reader's holdings at once.
    pub fn through_holdings(&mut self, start: usize, end: usize) -> bool {
        self.overlapping(start, end).any(|(_, c)| c.through_holdings)
    }

    /// Whether a claim asks the event reader thread to leave events unread for now
    /// (`FaultInjection::pause_event_reader`).
    pub fn reader_paused(&self) -> bool {
        self.pausing > 0
    }

    /// Marks `[start, end)` dead in every claim it overlaps; returns whether any did.
    pub fn mark_dead(&mut self, start: usize, end: usize) -> bool {
        let mut any = false;
        for (s, c) in self.overlapping(start, end) {
            c.dead.push((start.max(s), end.min(c.end)));
            any = true;
        }
        any
    }

    /// Marks `[start, end)`, claimed and not isolated, as being made this process's own
    /// by a call's thread that write-faults its present pages ([`Claims::end_unsharing`]
    /// takes it off).
    pub fn begin_unsharing(&mut self, start: usize, end: usize) {
        self.unsharing.push((start, end));
    }

    /// Takes off what [`Claims::begin_unsharing`] marked.
    pub fn end_unsharing(&mut self, start: usize, end: usize) {
        if let Some(i) = self.unsharing.iter().position(|&span| span == (start, end)) {
            self.unsharing.swap_remove(i);
        }
    }

    /// Whether a missing fault at `addr` is on a page being made the process's own
    /// ([`Claims::begin_unsharing`]) that is not isolated: a hole, whose contents are
    /// zeros (the program purged it, perhaps before the call claimed it and its purge's
    /// event was read; or never touched it), and the thread that faults may be the very one
    /// whose isolation would otherwise wake it.
    pub fn hole_while_unsharing(&mut self, addr: usize) -> bool {
        let page = addr & !(crate::sys::PAGE_SIZE - 1);
        let end = page + crate::sys::PAGE_SIZE;
        self.unsharing.iter().any(|&(s, e)| s <= page && end <= e) && self.isolated_in(page, end).is_empty()
    }

    /// The parts of `[start, end)` that no claim covers, in address order.
    fn unclaimed_in(&mut self, start: usize, end: usize) -> Vec<Span> {
        let mut at = start;
        let mut out = Vec::new();
        for (s, c) in self.overlapping(start, end) {
            if s > at {
                out.push((at, s));
            }
            at = at.max(c.end);
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Records the runs of a call that begins (registered as it begins); returns its number.
    pub fn begin_call(&mut self, mut runs: Vec<Span>) -> u64 {
        runs.sort_unstable();
        let id = self.next_call;
        self.next_call += 1;
        self.calls.insert(id, runs);
        id
    }

    /// Forgets what of every call's runs lies in `[start, end)`, which the program
    /// unmapped or moved away: the call that ends does not take the registration off what
    /// is mapped there next. Memory of another call's the program moved there (`mremap`)
    /// comes registered, its old pages on their way in through the event reader; taking
    /// the registration off would let its threads read zeros, and the old pages would find
    /// no registered mapping to go into.
    pub fn forget_runs(&mut self, start: usize, end: usize) {
        for runs in self.calls.values_mut() {
            if runs.iter().any(|&(s, e)| s < end && start < e) {
                *runs = subtract(runs, &[(start, end)]);
            }
        }
    }

    /// Whether the runs of call `id` cover `[start, end)` whole: nothing of it was
    /// unmapped or moved away since the call began ([`Claims::forget_runs`]).
    pub fn runs_cover(&self, id: u64, start: usize, end: usize) -> bool {
        let Some(runs) = self.calls.get(&id) else { return false };
        let at = runs.partition_point(|&(_, e)| e <= start);
        runs.get(at).is_some_and(|&(s, e)| s <= start && end <= e)
    }

    /// Forgets the runs of call `id`, which ends; returns them.
    pub fn end_call(&mut self, id: u64) -> Vec<Span> {
        self.calls.remove(&id).unwrap_or_default()
    }

    /// Records `[start, end)` as left registered with the program's userfaultfd after its
    /// call ended (the kernel refused to take it off: `ENOMEM` splitting a mapping near
    /// `vm.max_map_count`). A thread of the program that touches a missing page there would
    /// wait for ever, as no migration will wake it: the event reader answers such a fault as
    /// the kernel would, with a page of zeros ([`Claims::is_stray`]), and every call that
    /// ends tries the registration again ([`Claims::strays`]), as does the event reader
    /// while no call is in progress (`mover::retry_strays`).
    pub fn add_stray(&mut self, start: usize, end: usize) {
        add_span(&mut self.stray, start, end);
    }

    /// Records that the program purged `[start, end)` ([`Claims::purged`]), now.
    pub fn add_purged(&mut self, start: usize, end: usize) {
        self.forget_old_purges();
        self.purged.push_back((start, end, Instant::now()));
    }

    /// Forgets the purges read more than [`PURGE_RECORD`] ago.
    fn forget_old_purges(&mut self) {
        while self.purged.front().is_some_and(|p| p.2.elapsed() > PURGE_RECORD) {
            self.purged.pop_front();
        }
    }

    /// The purged parts of `[start, end)` ([`Claims::add_purged`]), sorted by start (they
    /// may overlap).
    fn purged_in(&mut self, start: usize, end: usize) -> Vec<Span> {
        self.forget_old_purges();
        let mut out: Vec<Span> = self
            .purged
            .iter()
            .filter(|&&(s, e, _)| s < end && start < e)
            .map(|&(s, e, _)| (s.max(start), e.min(end)))
            .collect();
        out.sort_unstable();
        out
    }

    /// As a call ends: the parts of `[start, end)`, whose registration it would take off,
    /// to leave registered instead (sorted, disjoint): those purged within [`PURGE_RECORD`]
    /// whose pages `present` (the parts of `[start, end)` holding pages, swapped out ones
    /// included, or `None` where that cannot be told) says are still there, their zap
    /// perhaps still coming. Forgets the purges of the rest: their pages are gone, or the
    /// registration goes and the program may fill the memory again unseen.
    pub fn purges_to_keep(
        &mut self,
        start: usize,
        end: usize,
        present: impl FnOnce() -> Option<Vec<Span>>,
    ) -> Vec<Span> {
        let mut purged = Vec::new();
        for (s, e) in self.purged_in(start, end) {
            add_span(&mut purged, s, e);
        }
        if purged.is_empty() {
            return purged;
        }
        let keep = match present() {
            Some(present) => subtract(&purged, &subtract(&[(start, end)], &present)),
            None => purged,
        };
        for (s, e) in subtract(&[(start, end)], &keep) {
            self.forget_purged(s, e);
        }
        keep
    }

    /// Forgets what of the purged ranges lies in `[start, end)`, which the program unmapped
    /// or moved away: what is mapped there next is other memory.
    pub fn forget_purged(&mut self, start: usize, end: usize) {
        if self.purged.iter().any(|&(s, e, _)| s < end && start < e) {
            self.purged = self
                .purged
                .iter()
                .flat_map(|&(s, e, t)| subtract(&[(s, e)], &[(start, end)]).into_iter().map(move |(a, b)| (a, b, t)))
                .collect();
        }
    }

    /// Whether `addr` lies in a range left registered ([`Claims::add_stray`]) that no
    /// call in progress registered since and no claim covers: a missing fault there is
    /// nobody's to wake.
    pub fn is_stray(&mut self, addr: usize) -> bool {
        let page = addr & !(crate::sys::PAGE_SIZE - 1);
        let at = self.stray.partition_point(|&(_, e)| e <= page);
        self.stray.get(at).is_some_and(|&(s, _)| s <= page)
            && !self.unused_in(page, page + crate::sys::PAGE_SIZE).is_empty()
    }

    /// Forgets what of the ranges left registered lies in `[start, end)`, which the
    /// program unmapped or moved away: a mapping made there later is not pagemig's to
    /// unregister. (One the program registers with a userfaultfd of its own: a kernel that
    /// checks whose registration it is refuses to unregister it through pagemig's,
    /// `EINVAL`, and it would be tried again at every call for ever; one that does not
    /// would take the program's registration off.)
    pub fn drop_strays(&mut self, start: usize, end: usize) {
        if !self.stray.is_empty() {
            self.stray = subtract(&self.stray, &[(start, end)]);
        }
    }

    /// Whether any range is left registered ([`Claims::add_stray`]).
    pub fn has_strays(&self) -> bool {
        !self.stray.is_empty()
    }

    /// Whether a purge recorded now ([`Claims::purged`]) lies in `[start, end)`.
    pub fn purge_recorded_in(&mut self, start: usize, end: usize) -> bool {
        !self.purged_in(start, end).is_empty()
    }

    /// Whether any call is in progress ([`Claims::begin_call`]).
    pub fn calls_in_progress(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Records whether the call ending now refuses every unregistration
    /// (`FaultInjection::fail_unregister`).
    pub fn refuse_unregistering(&mut self, refuse: bool) {
        self.refusing = refuse;
    }

    /// Whether the last call that ended refused every unregistration.
    pub fn unregistering_refused(&self) -> bool {
        self.refusing
    }

    /// Takes the ranges left registered, to try them again; what still fails goes back
    /// with [`Claims::add_stray`].
    pub fn strays(&mut self) -> Vec<Span> {
        std::mem::take(&mut self.stray)
    }

    /// The parts of `[start, end)` that no claim covers and no call in progress registered
    /// ([`Claims::begin_call`]): where the registration may be taken off.
    pub fn unused_in(&mut self, start: usize, end: usize) -> Vec<Span> {
        let mut out = self.unclaimed_in(start, end);
        for runs in self.calls.values() {
            out = subtract(&out, runs);
        }
        out
    }

    /// Records that the old pages of `[start, end)` now lie at `grave`.
    pub fn add_isolated(&mut self, start: usize, end: usize, grave: usize, empty: Empty) {
        // The pages are counted empty for the fork barrier until they leave the claims.
        debug_assert_eq!(empty.pages(), (end - start) / crate::sys::PAGE_SIZE);
        let _ = empty.into_claims();
        for (s, c) in self.overlapping(start, end) {
            let (from, to) = (start.max(s), end.min(c.end));
            c.isolated.insert(from, (to, grave + (from - start)));
        }
    }

    /// Lets the event reader answer a thread's fault on the isolated pages of `[start, end)`
    /// at once ([`Claims::answerable`]), copying them in on `node`, instead of keeping the
    /// thread waiting until the whole piece has moved. The caller's promise: every folio of
    /// the range is one base page, and its mapping has no memory policy of its own (a copy
    /// in allocates by the reader's policy, bound to `node`).
    pub fn answer_faults(&mut self, start: usize, end: usize, node: u32) {
        for (s, c) in self.overlapping(start, end) {
            c.answer.push((start.max(s), end.min(c.end), node));
        }
    }

    /// Where a fault at `addr` can be answered: the isolated page it touched and those that
    /// follow it, up to `max` bytes, as `(start, end, grave, node)`. Every page of it lies in
    /// one span given to [`Claims::answer_faults`] and one isolated span (so its old pages
    /// lie one after the other in a graveyard), and none was purged or moved away.
    pub fn answerable(&mut self, addr: usize, max: usize) -> Option<(usize, usize, usize, u32)> {
        let page = addr & !(crate::sys::PAGE_SIZE - 1);
        let (_, c) = self.overlapping(page, page + 1).next()?;
        let &(_, answer_end, node) = c.answer.iter().find(|&&(s, e, _)| s <= page && page < e)?;
        let (&s, &(e, g)) = c.isolated.range(..=page).next_back().filter(|&(_, &(e, _))| e > page)?;
        let mut end = e.min(answer_end).min(page.saturating_add(max));
        for &(ds, de) in &c.dead {
            if ds <= page && page < de {
                return None;
            }
            if ds > page {
                end = end.min(ds);
            }
        }
        Some((page, end, g + (page - s), node))
    }

    /// Records a fault at `addr` that the event reader could not answer
    /// ([`Claims::answerable`]), where a claim covers it: a write to a page being protected
    /// waits on the protection, and stays waiting once the page is isolated. The isolation
    /// wakes it ([`Claims::take_waiting`]), and it faults again on the empty page.
    pub fn add_waiting(&mut self, addr: usize) {
        let page = addr & !(crate::sys::PAGE_SIZE - 1);
        if let Some((_, c)) = self.overlapping(page, page + 1).next()
            && c.waiting.len() < Self::WAITING_MAX
            && !c.waiting.contains(&page)
        {
            c.waiting.push(page);
        }
    }

    /// How many unanswered faults one claim remembers: a thread waits on one page at a
    /// time, and a program has few threads storing into one piece at once.
    const WAITING_MAX: usize = 64;

    /// Takes the pages of the faults [`Claims::add_waiting`] recorded in `[start, end)`.
    pub fn take_waiting(&mut self, start: usize, end: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for (_, c) in self.overlapping(start, end) {
            c.waiting.retain(|&a| {
                let inside = start <= a && a < end;
                if inside {
                    out.push(a);
                }
                !inside
            });
        }
        out
    }

    /// Records that the event reader copied the pages of `[start, end)` in (see
    /// [`Claims::answerable`]): their old pages are garbage, and the move skips them.
    pub fn mark_answered(&mut self, start: usize, end: usize) {
        for (s, c) in self.overlapping(start, end) {
            c.answered.insert(start.max(s), end.min(c.end));
        }
        drop(self.take_isolated(start, end));
    }

    /// The end of what the event reader copied in from `at` on, up to `end` (`at` itself
    /// where it copied nothing there).
    pub fn answered_from(&mut self, at: usize, end: usize) -> usize {
        let mut to = at;
        for (_, c) in self.overlapping(at, end) {
            while let Some((_, &e)) = c.answered.range(..=to).next_back().filter(|&(_, &e)| e > to) {
                to = e.min(end);
                if to == end {
                    return to;
                }
            }
        }
        to
    }

    /// Whether the event reader copied in every page of `[start, end)` (a folio answered
    /// whole has moved, whatever its move does).
    pub fn is_answered(&mut self, start: usize, end: usize) -> bool {
        self.answered_from(start, end) == end
    }

    /// The isolated spans inside `[start, end)` as `(start, end, grave)`, clipped to it.
    pub fn isolated_in(&mut self, start: usize, end: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for (_, c) in self.overlapping(start, end) {
            for (&s, &(e, g)) in c.isolated.range(..end).filter(|&(_, &(e, _))| e > start) {
                let (from, to) = (s.max(start), e.min(end));
                out.push((from, to, g + (from - s)));
            }
        }
        out.sort_unstable();
        out
    }

    /// Forgets, and returns, the isolated spans inside `[start, end)` as
    /// `(start, end, grave)`, splitting those that reach outside it, with the count of their
    /// pages as empty for the fork barrier (closed when it drops: put back, replaced or
    /// given up, they are not empty any more).
    pub fn take_isolated(&mut self, start: usize, end: usize) -> (Vec<(usize, usize, usize)>, Empty) {
        let mut out = Vec::new();
        for (_, c) in self.overlapping(start, end) {
            let keys: Vec<usize> = c.isolated.range(..end).filter(|&(_, &(e, _))| e > start).map(|(&s, _)| s).collect();
            for s in keys {
                let (e, g) = c.isolated.remove(&s).expect("key just listed");
                let (from, to) = (s.max(start), e.min(end));
                if s < from {
                    c.isolated.insert(s, (from, g));
                }
                if to < e {
                    c.isolated.insert(to, (e, g + (to - s)));
                }
                out.push((from, to, g + (from - s)));
            }
        }
        let pages = out.iter().map(|&(s, e, _)| (e - s) / crate::sys::PAGE_SIZE).sum();
        (out, Empty::from_claims(pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What lies outside the spans taken away, touching and overlapping ones included (the
    /// dead parts of a range, from more than one purge, overlap).
    #[test]
    fn subtract_leaves_the_rest() {
        assert_eq!(subtract(&[(0, 100)], &[]), vec![(0, 100)]);
        assert_eq!(subtract(&[(0, 100)], &[(0, 100)]), vec![]);
        assert_eq!(subtract(&[(0, 100)], &[(10, 20), (15, 30), (30, 40), (90, 100)]), vec![(0, 10), (40, 90)]);
        assert_eq!(subtract(&[(0, 50), (60, 100)], &[(40, 70)]), vec![(0, 40), (70, 100)]);
    }

    /// What the program unmapped or moved away leaves every call's runs: the call that
    /// ends does not unregister it.
    #[test]
    fn unmapped_ranges_leave_the_calls_runs() {
        let mut c = Claims::default();
        let a = c.begin_call(vec![(0x10000, 0x40000), (0x50000, 0x60000)]);
        let b = c.begin_call(vec![(0x38000, 0x48000)]);
        c.forget_runs(0x20000, 0x3c000);
        assert!(c.runs_cover(a, 0x10000, 0x20000) && c.runs_cover(a, 0x3c000, 0x40000));
        assert!(!c.runs_cover(a, 0x1f000, 0x21000) && !c.runs_cover(a, 0x3b000, 0x3d000));
        assert!(!c.runs_cover(a, 0x40000, 0x41000) && !c.runs_cover(b + 1, 0x10000, 0x11000));
        assert_eq!(c.end_call(b), vec![(0x3c000, 0x48000)]);
        assert_eq!(c.unused_in(0x20000, 0x30000), vec![(0x20000, 0x30000)]);
        assert_eq!(c.end_call(a), vec![(0x10000, 0x20000), (0x3c000, 0x40000), (0x50000, 0x60000)]);
    }

    #[test]
    fn registration_stays_where_another_call_or_claim_needs_it() {
        let mut c = Claims::default();
        let a = c.begin_call(vec![(0x10000, 0x20000)]);
        let b = c.begin_call(vec![(0x18000, 0x1a000), (0x1c000, 0x30000)]);
        c.map.insert(0x11000, Claim { end: 0x12000, ..Default::default() });
        assert_eq!(c.end_call(a), [(0x10000, 0x20000)]);
        assert_eq!(c.unused_in(0x10000, 0x20000), [(0x10000, 0x11000), (0x12000, 0x18000), (0x1a000, 0x1c000)]);
        assert_eq!(c.end_call(b).len(), 2);
        assert_eq!(c.unused_in(0x1c000, 0x30000), [(0x1c000, 0x30000)]);
        assert!(c.end_call(b).is_empty());
    }

    /// Ranges left registered merge; a fault there is answered only where no call in
    /// progress registered the page and no claim covers it; what the program unmaps is
    /// forgotten.
    #[test]
    fn ranges_left_registered() {
        let mut c = Claims::default();
        c.add_stray(0x10000, 0x12000);
        c.add_stray(0x11000, 0x14000);
        c.add_stray(0x20000, 0x21000);
        assert_eq!(c.stray, [(0x10000, 0x14000), (0x20000, 0x21000)]);
        assert!(c.is_stray(0x10000) && c.is_stray(0x13fff) && c.is_stray(0x20800));
        assert!(!c.is_stray(0x14000) && !c.is_stray(0xf000) && !c.is_stray(0x21000));
        let call = c.begin_call(vec![(0x12000, 0x13000)]);
        c.map.insert(0x10000, Claim { end: 0x11000, ..Default::default() });
        assert!(!c.is_stray(0x12000) && !c.is_stray(0x10000));
        assert!(c.is_stray(0x11000) && c.is_stray(0x13000));
        c.end_call(call);
        c.drop_strays(0x11000, 0x20800);
        assert_eq!(c.stray, [(0x10000, 0x11000), (0x20800, 0x21000)]);
        assert_eq!(c.strays(), [(0x10000, 0x11000), (0x20800, 0x21000)]);
        assert!(c.stray.is_empty());
    }

    #[test]
    fn overlapping_claims_are_busy() {
        let b = Busy::default();
        assert!(b.try_claim(0x1000, 0x3000, &FaultInjection::default()));
        assert!(!b.try_claim(0x2000, 0x4000, &FaultInjection::default()));
        assert!(!b.try_claim(0x0, 0x1001, &FaultInjection::default()));
        assert!(b.try_claim(0x3000, 0x4000, &FaultInjection::default()));
        assert!(b.try_claim(0x0, 0x1000, &FaultInjection::default()));
        b.release_all(&[0x1000]);
        assert!(b.try_claim(0x2000, 0x3000, &FaultInjection::default()));
    }

    /// A fault is answerable on an isolated page of a span given to `answer_faults`, up to
    /// the end of that span, of its isolated span, of `max` or of the first dead span;
    /// what is answered is isolated no more and the move skips it; an unanswerable fault
    /// waits to be woken by the isolation of its page.
    #[test]
    fn faults_are_answered_on_isolated_pages_only() {
        let b = Busy::default();
        assert!(b.try_claim(0x10000, 0x30000, &FaultInjection::default()));
        let mut c = b.lock();
        // Not isolated yet: not answerable, and remembered (once).
        assert_eq!(c.answerable(0x10008, 0x10000), None);
        c.add_waiting(0x10008);
        c.add_waiting(0x10010);
        c.add_waiting(0x50000);
        let mut empty = super::super::fork::open(16);
        c.add_isolated(0x10000, 0x20000, 0x90000, empty.split(16));
        // Isolated, but not given to `answer_faults`.
        assert_eq!(c.answerable(0x10008, 0x10000), None);
        c.answer_faults(0x10000, 0x18000, 1);
        assert_eq!(c.take_waiting(0x10000, 0x18000), [0x10000]);
        assert!(c.take_waiting(0x10000, 0x30000).is_empty());
        assert_eq!(c.answerable(0x12345, 0x10000), Some((0x12000, 0x18000, 0x92000, 1)));
        assert_eq!(c.answerable(0x12345, 0x2000), Some((0x12000, 0x14000, 0x92000, 1)));
        assert_eq!(c.answerable(0x18000, 0x10000), None);
        assert!(c.mark_dead(0x15000, 0x16000));
        assert_eq!(c.answerable(0x12000, 0x10000), Some((0x12000, 0x15000, 0x92000, 1)));
        assert_eq!(c.answerable(0x15800, 0x10000), None);
        c.mark_answered(0x12000, 0x14000);
        assert_eq!(c.answerable(0x12000, 0x10000), None);
        assert_eq!(c.isolated_in(0x11000, 0x15000), [(0x11000, 0x12000, 0x91000), (0x14000, 0x15000, 0x94000)]);
        assert_eq!(c.answered_from(0x12000, 0x20000), 0x14000);
        assert_eq!(c.answered_from(0x12000, 0x13000), 0x13000);
        assert_eq!(c.answered_from(0x11000, 0x20000), 0x11000);
        c.mark_answered(0x14000, 0x15000);
        assert_eq!(c.answered_from(0x12000, 0x20000), 0x15000);
        drop(c.take_isolated(0x10000, 0x20000));
    }

    #[test]
    fn dead_and_isolated_spans_follow_their_claims() {
        let b = Busy::default();
        assert!(b.try_claim(0x10000, 0x20000, &FaultInjection::default()));
        assert!(b.try_claim(0x20000, 0x30000, &FaultInjection::default()));
        let mut c = b.lock();
        assert!(c.mark_dead(0x1f000, 0x21000));
        assert!(!c.mark_dead(0x40000, 0x41000));
        assert_eq!(c.dead_in(0x10000, 0x30000), [(0x1f000, 0x20000), (0x20000, 0x21000)]);
        assert_eq!(c.dead_in(0x20800, 0x30000), [(0x20800, 0x21000)]);
        let mut empty = super::super::fork::open(8);
        c.add_isolated(0x10000, 0x18000, 0x90000, empty.split(8));
        assert_eq!(empty.pages(), 0);
        let (one, one_empty) = c.take_isolated(0x12000, 0x13000);
        assert_eq!((one.as_slice(), one_empty.pages()), ([(0x12000, 0x13000, 0x92000)].as_slice(), 1));
        let (mut rest, rest_empty) = c.take_isolated(0x10000, 0x20000);
        rest.sort_unstable();
        assert_eq!(rest, [(0x10000, 0x12000, 0x90000), (0x13000, 0x18000, 0x93000)]);
        assert_eq!(rest_empty.pages(), 7);
        let (none, none_empty) = c.take_isolated(0x10000, 0x20000);
        assert!(none.is_empty() && none_empty.pages() == 0);
    }

    /// A purge recorded makes later claims dead where they meet it (overlapping purges
    /// included); what the program unmaps or moves is forgotten, and so is every purge
    /// once it is older than `PURGE_RECORD`; a call's end keeps the present parts.
    #[test]
    fn purged_ranges_are_dead_to_later_claims() {
        let b = Busy::default();
        let none = FaultInjection::default();
        {
            let mut c = b.lock();
            c.add_purged(0x12000, 0x14000);
            c.add_purged(0x13000, 0x15000);
            c.add_purged(0x30000, 0x31000);
        }
        assert!(b.try_claim(0x10000, 0x20000, &none));
        assert!(b.try_claim(0x20000, 0x40000, &none));
        assert!(b.try_claim(0x50000, 0x60000, &none));
        let mut c = b.lock();
        assert_eq!(c.dead_in(0x10000, 0x20000), [(0x12000, 0x14000), (0x13000, 0x15000)]);
        assert_eq!(c.dead_in(0x20000, 0x40000), [(0x30000, 0x31000)]);
        assert!(c.dead_in(0x50000, 0x60000).is_empty());
        c.forget_purged(0x13800, 0x30800);
        let left: Vec<Span> = c.purged.iter().map(|&(s, e, _)| (s, e)).collect();
        assert_eq!(left, [(0x12000, 0x13800), (0x13000, 0x13800), (0x30800, 0x31000)]);
        // Claims made earlier keep what they were given.
        assert_eq!(c.dead_in(0x10000, 0x20000), [(0x12000, 0x14000), (0x13000, 0x15000)]);
        drop(c);
        b.release_all(&[0x10000, 0x20000]);
        assert!(b.try_claim(0x10000, 0x40000, &none));
        let mut c = b.lock();
        assert_eq!(c.dead_in(0x10000, 0x40000), [(0x12000, 0x13800), (0x13000, 0x13800), (0x30800, 0x31000)]);
        // A call's end: the present purged parts stay (and their purges), the rest goes.
        let keep = c.purges_to_keep(0x10000, 0x40000, || Some(vec![(0x13000, 0x20000)]));
        assert_eq!(keep, [(0x13000, 0x13800)]);
        let left: Vec<Span> = c.purged.iter().map(|&(s, e, _)| (s, e)).collect();
        assert_eq!(left, [(0x13000, 0x13800), (0x13000, 0x13800)]);
        assert_eq!(c.purges_to_keep(0x10000, 0x40000, || None), [(0x13000, 0x13800)]);
        assert!(c.purges_to_keep(0x10000, 0x40000, || Some(Vec::new())).is_empty());
        assert!(c.purged.is_empty());
        // Read too long ago: forgotten.
        let old = Instant::now().checked_sub(PURGE_RECORD + Duration::from_millis(1)).unwrap();
        c.purged.push_front((0x70000, 0x71000, old));
        assert!(c.purged_in(0x70000, 0x71000).is_empty());
        assert!(c.purged.is_empty());
    }

    /// The event reader leaves what is left registered alone while a purge there is
    /// recorded, and only then.
    #[test]
    fn strays_wait_for_their_purges_to_be_forgotten() {
        let mut c = Claims::default();
        c.add_purged(0x12000, 0x13000);
        assert!(!c.purge_recorded_in(0x10000, 0x12000), "a purge beside the range");
        c.add_purged(0x11000, 0x12000);
        assert!(c.purge_recorded_in(0x10000, 0x12000));
        let old = Instant::now().checked_sub(PURGE_RECORD + Duration::from_millis(1)).unwrap();
        c.purged = [(0x11000, 0x12000, old), (0x12000, 0x13000, Instant::now())].into();
        assert!(!c.purge_recorded_in(0x10000, 0x12000), "a purge read too long ago");
    }
}
