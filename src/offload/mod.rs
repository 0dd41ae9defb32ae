//! Copy offload: the batch copy of a migration handed to the active *migrator* (a DMA
//! engine, multi-threaded CPU copy, …), the user-space form of the RFC's
//! `struct migrator` and `migrate_offload_register()`.
//!
//! A migrator implements [`OffloadCopy`]. It receives a [`Batch`]: the (destination,
//! source, length) of every folio, valid for the duration of the call. It may copy
//! everything, decline the batch with `EOPNOTSUPP` (too small to pay off, say), or fail;
//! whatever it did not report complete falls back to the per-folio CPU copy in the move
//! phase. A migrator that finishes parts of a batch at different times (a DMA channel, a
//! copy thread's share) reports each with [`Batch::complete`], and the pipelined move
//! moves those folios right away.
//!
//! # The migrator contract
//!
//! Only what a migrator reports with [`Batch::complete`] is trusted: a migrator that
//! returns `Ok(())` without reporting anything has its whole batch copied again by the CPU.
//! A folio reported complete may be moved over its source at once, so from that instant its
//! destination belongs to the program again. [`Batch`] enforces this for the copies it makes
//! itself ([`Batch::copy_range`], [`Batch::copy_part`] refuse folios already reported, and
//! a report refuses folios whose copy is still running or that lie outside the batch).
//! What it cannot check — that a folio reported complete really holds the data, and that
//! nothing else (a DMA engine, raw pointers) writes its destination afterwards — is the
//! promise of the `unsafe trait` [`OffloadCopy`].
//!
//! Destinations of base pages may come *without pages* (from the destination pool):
//! [`Batch::copy_range`] and [`Batch::copy_part`] then allocate and fill each page in one
//! step (`UFFDIO_COPY`), writing each destination byte once. A migrator that copies only
//! through them says so with [`OffloadCopy::fills_unpopulated`] and gets such batches; one
//! that stores through raw addresses, or hands them to a device, gets populated ones.
//!
//! A migrator that panics is caught: the call it served stops, undoes every folio that did
//! not move, and returns [`crate::Error::Panicked`].
//!
//! [`Batch`] carries the promise that its copies are safe to make; it is the one piece of
//! `unsafe` here.
#![allow(unsafe_code)]

pub mod registry;

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::copy::{Dst, folios_copy_each, folios_copy_to};
use crate::sys::Errno;

/// One folio's copy in a [`Batch`]: destination, source, length (what [`Batch::pairs`]
/// gives a migrator and [`Batch::new`] takes).
pub use crate::copy::CopyPair;
pub use registry::{Migrator, Owner, Registration, Registry, registry};

/// Set in a folio's state once it is reported complete; the low bits count copies running.
const DONE: u32 = 1 << 31;

/// The folios of one batch, as handed to a migrator.
///
/// # Invariants
/// For as long as the batch lives, every pair's source is readable and write-protected,
/// every destination whose folio is not yet reported complete is writable and referenced
/// by nothing else, and no two pairs overlap. A folio's state has its `DONE` bit set once it was
/// reported complete and never loses it; its low bits count the copies into it running now.
pub struct Batch<'a> {
    pairs: &'a [CopyPair],
    state: Box<[AtomicU32]>,
    on_complete: Option<&'a (dyn Fn(Range<usize>) + Sync)>,
    /// Per pair, what its destination is (all populated long ago when `None`).
    dsts: Option<&'a [Dst<'a>]>,
}

impl<'a> Batch<'a> {
    /// Wraps the copies of a batch.
    ///
    /// # Safety
    /// Every pair must satisfy the contract of the per-folio copy until the batch is
    /// dropped or the pair reported complete, and no two pairs may overlap.
    pub unsafe fn new(pairs: &'a [CopyPair], on_complete: Option<&'a (dyn Fn(Range<usize>) + Sync)>) -> Self {
        // INVARIANT: promised by the caller; every folio starts not reported, no copy running.
        Self { pairs, state: pairs.iter().map(|_| AtomicU32::new(0)).collect(), on_complete, dsts: None }
    }

    /// Wraps the copies of a batch whose destinations are as `dsts` says, pair by pair:
    /// some may be freshly populated, some have no pages yet ([`Dst::Empty`]).
    ///
    /// # Safety
    /// As [`Batch::new`], and every empty destination must be registered with its
    /// userfaultfd and read by nobody before the copy into it ends.
    pub(crate) unsafe fn with_dsts(
        pairs: &'a [CopyPair],
        on_complete: Option<&'a (dyn Fn(Range<usize>) + Sync)>,
        dsts: &'a [Dst<'a>],
    ) -> Self {
        debug_assert_eq!(pairs.len(), dsts.len());
        // SAFETY: forwarded from the caller's contract.
        let batch = unsafe { Self::new(pairs, on_complete) };
        Self { dsts: Some(dsts), ..batch }
    }

    /// How the copy into pair `i` reaches its destination.
    fn dst(&self, i: usize) -> Dst<'a> {
        self.dsts.and_then(|d| d.get(i).copied()).unwrap_or(Dst::Mapped)
    }

    /// Whether pair `index`'s destination has no pages yet (filled by the batch's own
    /// copies with `UFFDIO_COPY`; a store through the raw address would first make the
    /// engine fault in a page of zeros).
    pub fn is_unpopulated(&self, index: usize) -> bool {
        matches!(self.dst(index), Dst::Empty(_))
    }

    /// The copies, one per folio, in address order of the sources.
    pub fn pairs(&self) -> &[CopyPair] {
        self.pairs
    }

    /// The number of folios (the RFC's `folio_cnt`).
    pub fn folio_count(&self) -> usize {
        self.pairs.len()
    }

    /// Bytes in the batch.
    pub fn bytes(&self) -> usize {
        self.pairs.iter().map(|p| p.len).sum()
    }

    /// Whether the folio at `index` was reported complete.
    pub fn is_complete(&self, index: usize) -> bool {
        self.state.get(index).is_some_and(|s| s.load(Ordering::Acquire) & DONE != 0)
    }

    /// Marks a copy running into each folio of `range`, none of which may be reported.
    fn enter(&self, range: Range<usize>) -> Result<CopyGuard<'_, 'a>, Errno> {
        if range.start > range.end || range.end > self.pairs.len() {
            return Err(Errno::INVAL);
        }
        let mut guard = CopyGuard { batch: self, range: range.start..range.start };
        for i in range {
            let s = &self.state[i];
            let mut cur = s.load(Ordering::Acquire);
            loop {
                if cur & DONE != 0 {
                    // Already reported: its destination may be the program's memory now.
                    return Err(Errno::ALREADY);
                }
                match s.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
            guard.range.end = i + 1;
        }
        Ok(guard)
    }

    /// Copies the pairs in `range` on the calling CPU.
    ///
    /// # Errors
    /// `EINVAL` for a range outside the batch; `EALREADY` when a folio in it was already
    /// reported complete (nothing is copied).
    pub fn copy_range(&self, range: Range<usize>) -> Result<(), Errno> {
        let guard = self.enter(range.clone())?;
        let pairs = &self.pairs[range.clone()];
        // SAFETY: the batch's invariant makes every pair valid to copy while it is not
        // reported complete, the guard keeps these from being reported until it drops, and
        // the destinations are what the constructor was told of them.
        let result = unsafe {
            match self.dsts {
                Some(dsts) => folios_copy_each(pairs, &dsts[range]),
                None => folios_copy_to(pairs, Dst::Mapped),
            }
        };
        drop(guard);
        result
    }

    /// Copies `len` bytes at `offset` of the folio at `index` on the calling CPU, for
    /// migrators that split a large folio between threads; each part may be copied
    /// concurrently with the others.
    ///
    /// # Errors
    /// `EINVAL` for a folio outside the batch or a part outside the folio; `EALREADY` when
    /// the folio was already reported complete.
    pub fn copy_part(&self, index: usize, offset: usize, len: usize) -> Result<(), Errno> {
        let p = *self.pairs.get(index).ok_or(Errno::INVAL)?;
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > p.len) {
            return Err(Errno::INVAL);
        }
        let guard = self.enter(index..index + 1)?;
        let part = CopyPair { dst: p.dst + offset, src: p.src + offset, len };
        // SAFETY: a sub-range of a pair that is valid to copy (the batch's invariant, and the
        // guard keeps it from being reported meanwhile); bounds checked just above; the
        // destination is what the constructor was told.
        let result = unsafe { folios_copy_to(&[part], self.dst(index)) };
        drop(guard);
        result
    }

    /// Reports the pairs in `range` copied: their destinations hold the complete data and
    /// the migrator will not touch them again. Called from any thread.
    ///
    /// # Errors
    /// `EINVAL` for a range outside the batch (nothing is reported); `EBUSY` when a copy
    /// into one of its folios is still running, `EALREADY` when one was reported before:
    /// those folios are left out and the rest of the range is reported.
    pub fn complete(&self, range: Range<usize>) -> Result<(), Errno> {
        if range.start > range.end || range.end > self.pairs.len() {
            return Err(Errno::INVAL);
        }
        let mut outcome = Ok(());
        let mut start = None;
        for i in range.clone() {
            match self.state[i].compare_exchange(0, DONE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    start.get_or_insert(i);
                }
                Err(now) => {
                    outcome = Err(if now & DONE != 0 { Errno::ALREADY } else { Errno::BUSY });
                    if let Some(s) = start.take() {
                        self.report(s..i);
                    }
                }
            }
        }
        if let Some(s) = start {
            self.report(s..range.end);
        }
        outcome
    }

    fn report(&self, range: Range<usize>) {
        if let Some(f) = self.on_complete {
            f(range);
        }
    }
}

/// Copies running into a range of a batch's folios; dropping it ends them.
struct CopyGuard<'b, 'a> {
    batch: &'b Batch<'a>,
    range: Range<usize>,
}

impl Drop for CopyGuard<'_, '_> {
    fn drop(&mut self) {
        for i in self.range.clone() {
            self.batch.state[i].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A batch-copy provider (the RFC's `offload_copy` callback).
///
/// # Safety
/// An implementation promises, for every batch it is handed:
/// - every folio it reports with [`Batch::complete`] holds, at that instant, a complete
///   copy of its source in its destination;
/// - after reporting a folio, and after `offload_copy` returns, nothing it started (a
///   thread, a DMA descriptor, a pointer it kept) writes that folio's destination;
/// - it writes no memory outside the batch's destinations.
///
/// Copies made through [`Batch::copy_range`] and [`Batch::copy_part`] keep the first two by
/// construction; a migrator that hands raw addresses to hardware or writes through them
/// must keep them itself.
pub unsafe trait OffloadCopy: Send + Sync {
    /// Copies the batch. Returns only when every copy it started has finished or been
    /// stopped for good.
    ///
    /// # Errors
    /// `EOPNOTSUPP` to decline the batch, any other errno for a failure; either way the
    /// parts not reported with [`Batch::complete`] are copied folio by folio by the core.
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno>;

    /// Whether this migrator copies only through [`Batch::copy_range`] and
    /// [`Batch::copy_part`], and so may be handed destinations of base pages that have no
    /// pages yet (filled in one step, never zeroed first). The default, `false`, hands it
    /// populated destinations only, as a device writing physical memory needs.
    fn fills_unpopulated(&self) -> bool {
        false
    }
}

/// The default CPU batch copy (`folios_mc_copy`), as a migrator.
#[derive(Debug, Default)]
pub struct CpuCopy;

// SAFETY: copies only through `Batch::copy_range` and reports only what it copied.
unsafe impl OffloadCopy for CpuCopy {
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
        batch.copy_range(0..batch.folio_count())?;
        batch.complete(0..batch.folio_count())
    }

    fn fills_unpopulated(&self) -> bool {
        true
    }
}
