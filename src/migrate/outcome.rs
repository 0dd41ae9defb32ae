//! What a failed step of a migration means for its folio: one table, `classify`, from the
//! phase and the errno the kernel gave to the reason reported and the status `move_pages(2)`
//! would give that page.
//!
//! The same errno means different things in different phases, because the program's range
//! is the source of one `UFFDIO_MOVE` and the destination of another: moving the old pages
//! out (isolation), a hole in the source (`EFAULT`, `EAGAIN` on a swapped or never-touched
//! page) is a page not present, `-ENOENT` as the kernel reports it; moving the new pages in,
//! the range's being gone (`ENOENT`, `EEXIST`: something else mapped there; `EFAULT`) is
//! memory the program unmapped, `-EFAULT`.

use crate::error::Error;
use crate::folio::Folio;
use crate::stats::{FolioFailure, MigrateStats};
use crate::sys::Errno;

/// What a call's folios came to, counted by whichever thread settles each (the caller, the
/// mover): the counters, and the first error.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub stats: MigrateStats,
    pub first_error: Option<Error>,
    /// The kernel refused to map a huge folio that arrived as base pages whole again
    /// (`mover::rejoin_huge_pages`): no huge page to be had on the target, found at the cost
    /// of a reclaim and compaction; not asked again by this thread in this call.
    pub collapse_refused: bool,
}

impl Tally {
    /// A folio that moved; `copied_in`: its pages were copied straight into the source.
    pub fn moved(&mut self, f: Folio<'_>, copied_in: bool) {
        let s = &mut self.stats;
        s.copied_in_folios += u64::from(copied_in);
        s.bytes += f.size() as u64;
        s.succeeded_folios += 1;
        s.succeeded_pages += f.nr_pages() as u64;
        s.thp_succeeded += u64::from(f.is_pmd());
    }

    /// A folio that did not move (it is as it was), and why; the first such error is the
    /// call's.
    pub fn failed(&mut self, f: Folio<'_>, err: Error) {
        let s = &mut self.stats;
        s.failed_folios += 1;
        s.failed_pages += f.nr_pages() as u64;
        s.thp_failed += u64::from(f.is_pmd());
        s.failures.push(FolioFailure { addr: f.addr(), errno: err.errno().raw_os_error() });
        self.first_error.get_or_insert(err);
    }

    /// Adds what another thread of the same call counted: its counters, and its first
    /// error where this one has none.
    pub fn absorb(&mut self, other: Tally) {
        self.stats.merge(&other.stats);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The step of a folio's migration that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Moving the old pages out of the program's range into the graveyard.
    Isolate,
    /// Moving the filled destination into the program's range (`UFFDIO_MOVE`).
    MoveIn,
    /// Copying the old pages from the graveyard into the program's range (`UFFDIO_COPY`).
    CopyIn,
}

/// What a folio fails with whose move the program's changes kept refusing.
pub(super) const KEPT_CHANGING: &str = "migrate (the memory kept changing meanwhile)";

/// The folio's failure for `errno` in `phase`: what failed, and the status `move_pages(2)`
/// gives such a page.
pub(super) fn classify(phase: Phase, errno: Errno) -> (&'static str, Errno) {
    match (phase, errno) {
        (Phase::Isolate, Errno::BUSY) => {
            ("migrate (a page is pinned, e.g. for DMA, or shared with another process)", Errno::BUSY)
        }
        (Phase::Isolate, Errno::AGAIN | Errno::FAULT) => ("migrate (a page is not present)", Errno::NOENT),
        (Phase::Isolate, Errno::NOENT) => ("migrate (the memory was unmapped meanwhile)", Errno::FAULT),
        // A page in the graveyard the old pages go to: another reader of this memory
        // faulted there again and again. Tried again on a later pass.
        (Phase::Isolate, Errno::EXIST) => {
            ("migrate (another reader of this memory kept touching pagemig's graveyard)", Errno::BUSY)
        }
        (Phase::Isolate, Errno::INVAL) => {
            ("migrate (the mapping's protection or locking changed meanwhile)", Errno::ACCESS)
        }
        (Phase::Isolate, e) => ("userfaultfd move of the old pages", e),
        // Something else is mapped there now, or nothing.
        (Phase::MoveIn | Phase::CopyIn, Errno::NOENT | Errno::EXIST | Errno::FAULT) => {
            ("migrate (the memory was unmapped meanwhile)", Errno::FAULT)
        }
        (Phase::MoveIn | Phase::CopyIn, Errno::INVAL) => ("migrate (the mapping changed meanwhile)", Errno::ACCESS),
        (Phase::MoveIn | Phase::CopyIn, Errno::NOMEM) => ("allocating a page on the target node", Errno::NOMEM),
        // Events of the program's kept coming (each holds every move and copy while it is
        // read) past the patience: the page was busy.
        (Phase::MoveIn | Phase::CopyIn, Errno::AGAIN) => (KEPT_CHANGING, Errno::BUSY),
        (Phase::MoveIn, e) => ("userfaultfd move of the new pages", e),
        (Phase::CopyIn, e) => ("userfaultfd copy of the pages into their source", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statuses, phase by phase, as `move_pages(2)` reports such pages.
    #[test]
    fn every_phase_reports_what_move_pages_would() {
        let status = |phase, errno| classify(phase, errno).1;
        // Moving out: a pinned page is busy; a hole is a page not present; a range gone is
        // unmapped; a changed mapping is refused as the kernel refuses a VMA it cannot
        // migrate.
        assert_eq!(status(Phase::Isolate, Errno::BUSY), Errno::BUSY);
        assert_eq!(status(Phase::Isolate, Errno::FAULT), Errno::NOENT);
        assert_eq!(status(Phase::Isolate, Errno::AGAIN), Errno::NOENT);
        assert_eq!(status(Phase::Isolate, Errno::NOENT), Errno::FAULT);
        assert_eq!(status(Phase::Isolate, Errno::INVAL), Errno::ACCESS);
        assert_eq!(status(Phase::Isolate, Errno::EXIST), Errno::BUSY);
        assert_eq!(status(Phase::Isolate, Errno::IO), Errno::IO);
        // Moving or copying in: the range gone (whatever the kernel calls it) is unmapped.
        for phase in [Phase::MoveIn, Phase::CopyIn] {
            for errno in [Errno::NOENT, Errno::EXIST, Errno::FAULT] {
                assert_eq!(status(phase, errno), Errno::FAULT, "{phase:?} {errno:?}");
            }
            assert_eq!(status(phase, Errno::INVAL), Errno::ACCESS);
            assert_eq!(status(phase, Errno::NOMEM), Errno::NOMEM);
            assert_eq!(status(phase, Errno::AGAIN), Errno::BUSY);
            assert_eq!(status(phase, Errno::IO), Errno::IO);
        }
        assert!(classify(Phase::CopyIn, Errno::IO).0.contains("copy"));
        assert!(classify(Phase::MoveIn, Errno::IO).0.contains("move"));
    }

    /// Every status a phase gives a page, for every errno the kernel's calls return there,
    /// is told in words of its own (`RangeOutcome::meaning`), never the catch-all.
    #[test]
    fn every_status_has_its_meaning() {
        let catch_all = crate::RangeOutcome::meaning(0);
        let raw = [Errno::BUSY, Errno::AGAIN, Errno::FAULT, Errno::NOENT, Errno::EXIST, Errno::INVAL, Errno::NOMEM];
        for phase in [Phase::Isolate, Phase::MoveIn, Phase::CopyIn] {
            for errno in raw {
                let status = classify(phase, errno).1.raw_os_error();
                let meaning = crate::RangeOutcome::meaning(status);
                assert_ne!(meaning, catch_all, "{phase:?} {errno:?}");
            }
        }
        // And the statuses a call stopped or timed out gives the pages it did not reach.
        for errno in [libc::ECANCELED, libc::ETIMEDOUT, libc::EIO] {
            assert_ne!(crate::RangeOutcome::meaning(errno), catch_all);
        }
        assert!(crate::RangeOutcome::meaning(libc::ENOENT).contains("not present"));
    }
}
