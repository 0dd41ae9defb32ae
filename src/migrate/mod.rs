//! The batch migration pipeline: `migrate_pages(folios, target node, reason, mode)`.
//!
//! A call is checked as a whole before anything is touched (shapes, node, what the memory
//! is, free memory on the target, `vm.max_map_count`), then runs in batches of at most
//! `max_batch_pages` base pages. Each batch, like the kernel's `migrate_pages_batch()`:
//!
//! 1. **isolate** its folios (a folio another call is moving is busy: `EAGAIN`, retried on a
//!    later pass, ten passes at most);
//! 2. takes **destinations** on the target node from the [`Pool`];
//! 3. **unmaps** each contiguous run with one userfaultfd write-protect call: writers, user
//!    or kernel, now sleep; readers go on. `WAS_MAPPED` / `WAS_MLOCKED` are recorded on the
//!    destinations;
//! 4. **batch-copies** the folios whose reason is batch-eligible ([`Reason::batch_eligible`])
//!    with `folios_copy`, marking them `ALREADY_COPIED`; on failure they fall back to the
//!    per-folio copy;
//! 5. **moves** each run: copies what is not yet copied, `mremap`s the destination over the
//!    source in one call, locks it again where it was locked, and wakes the writers;
//! 6. **undoes** whatever could not move: protection off, writers woken, destination given
//!    back, source untouched.

mod abort;
mod busy;
mod checks;
mod engine;
mod events;
mod fork;
mod mover;
mod options;
mod pipeline;
pub mod policy;
mod reaper;

pub use crate::stats::MigrateStats;
pub use engine::{Engine, migrate_pages};
pub use options::{
    Capabilities, DEFAULT_MAX_BATCH_PAGES, DEFAULT_POOL_LIMIT, DEFAULT_REAPER_BACKLOG, FaultInjection,
    MAX_BATCH_PAGES_LIMIT, MigrateOptions, NR_MAX_MIGRATE_PASSES, Progress, check_max_batch_pages,
};
pub use policy::{Mode, Reason};

use crate::folio::Folio;
use crate::pool::ThpAdvice;

/// One folio of a call with the state of the mapping it lives in.
#[derive(Clone, Copy, Debug)]
struct Item {
    folio: Folio<'static>,
    /// Index in the call's folios sorted by address.
    index: usize,
    locked: bool,
    thp: ThpAdvice,
}

/// An address range as `(start, end)`.
pub(crate) type Span = (usize, usize);
