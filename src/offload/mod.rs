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
//! [`Batch`] carries the promise that its copies are safe to make; it is the one piece of
//! `unsafe` here.
#![allow(unsafe_code)]

pub mod registry;

use std::ops::Range;

use crate::copy::{CopyPair, folios_copy};
use crate::sys::Errno;

pub use registry::{Migrator, Owner, Registration, Registry, registry};

/// The folios of one batch, as handed to a migrator.
///
/// # Invariants
/// For as long as the batch lives, every pair's source is readable and write-protected
/// and every destination is writable and referenced by nothing else, and no two pairs
/// overlap.
pub struct Batch<'a> {
    pairs: &'a [CopyPair],
    on_complete: Option<&'a (dyn Fn(Range<usize>) + Sync)>,
}

impl<'a> Batch<'a> {
    /// Wraps the copies of a batch.
    ///
    /// # Safety
    /// Every pair must satisfy [`crate::copy::folio_copy`]'s contract until the batch is
    /// dropped, and no two pairs may overlap.
    pub unsafe fn new(pairs: &'a [CopyPair], on_complete: Option<&'a (dyn Fn(Range<usize>) + Sync)>) -> Self {
        // INVARIANT: promised by the caller.
        Self { pairs, on_complete }
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

    /// Copies the pairs in `range` on the calling CPU.
    ///
    /// # Errors
    /// `EINVAL` for a range outside the batch.
    pub fn copy_range(&self, range: Range<usize>) -> Result<(), Errno> {
        let pairs = self.pairs.get(range).ok_or(Errno::INVAL)?;
        // SAFETY: the batch's invariant: every pair is valid to copy while it lives.
        unsafe { folios_copy(pairs) }
    }

    /// Reports the pairs in `range` copied: their destinations hold the complete data and
    /// the migrator will not touch them again. Called from any thread.
    pub fn complete(&self, range: Range<usize>) {
        if let Some(f) = self.on_complete {
            if !range.is_empty() {
                f(range);
            }
        }
    }
}

/// A batch-copy provider (the RFC's `offload_copy` callback).
pub trait OffloadCopy: Send + Sync {
    /// Copies the batch. Returns only when every copy it started has finished or been
    /// stopped for good.
    ///
    /// # Errors
    /// `EOPNOTSUPP` to decline the batch, any other errno for a failure; either way the
    /// parts not reported with [`Batch::complete`] are copied folio by folio by the core.
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno>;
}

/// The default CPU batch copy (`folios_mc_copy`), as a migrator.
#[derive(Debug, Default)]
pub struct CpuCopy;

impl OffloadCopy for CpuCopy {
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
        batch.copy_range(0..batch.folio_count())?;
        batch.complete(0..batch.folio_count());
        Ok(())
    }
}
