//! Per-call settings, the bounds they are checked against, and fault injection.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

/// The default bound on a batch, in base pages (the kernel's `NR_MAX_BATCHED_MIGRATION`).
pub const DEFAULT_MAX_BATCH_PAGES: usize = 512;
/// The largest accepted `max_batch_pages` (1 GiB of base pages).
pub const MAX_BATCH_PAGES_LIMIT: usize = 262_144;
/// Passes over busy folios before they fail with `EAGAIN` (`NR_MAX_MIGRATE_PAGES_RETRY`).
pub const NR_MAX_MIGRATE_PASSES: usize = 10;
/// Bytes the destination pool keeps populated ahead of use per node, at most.
pub const DEFAULT_POOL_LIMIT: usize = 64 << 20;
/// Bytes of replaced source pages that may wait for the reaper thread, at most.
pub const DEFAULT_REAPER_BACKLOG: usize = 64 << 20;
/// Checks a `max_batch_pages` value.
///
/// # Errors
/// [`Error::Invalid`] unless `1 <= pages <= 262144`.
pub fn check_max_batch_pages(pages: usize) -> Result<usize> {
    if (1..=MAX_BATCH_PAGES_LIMIT).contains(&pages) {
        Ok(pages)
    } else {
        Err(Error::Invalid(format!("max_batch_pages {pages} is outside 1..={MAX_BATCH_PAGES_LIMIT}")))
    }
}

/// Failures to inject, to exercise the fallback and undo paths on real memory.
#[derive(Clone, Debug, Default)]
pub struct FaultInjection {
    /// Make the batch copy fail: its folios fall back to the per-folio copy.
    pub fail_batch_copy: bool,
    /// Make the per-folio copy of these folios fail (indices into the call's folios sorted
    /// by address): they are undone and reported as failed.
    pub fail_folio_copy: Vec<usize>,
    /// Pause for this long before the per-folio copy of the folio at this index (sorted by
    /// address), while it is write-protected: lets a test act on memory mid-migration.
    pub delay_folio_copy: Option<(usize, Duration)>,
    /// Pause for this long before every move, with the copy made and the source empty:
    /// lets a test act on memory between copy and move.
    pub delay_move: Option<Duration>,
    /// Make the move of the runs holding these folios fail as a refused move would
    /// (indices as above): their folios are undone and reported as failed.
    pub fail_move: Vec<usize>,
}

/// A callback told the number of bytes moved so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Per-call settings.
#[derive(Clone, Default)]
pub struct MigrateOptions {
    /// Bound on a batch in base pages; `None` takes the engine's setting.
    pub max_batch_pages: Option<usize>,
    /// Copy folio by folio even where the reason allows a batch copy (for a
    /// latency-sensitive caller).
    pub no_batch_copy: bool,
    /// Move each run as soon as its copy completes (`None`: the engine's setting,
    /// `migrate/pipelined`).
    pub pipelined: Option<bool>,
    /// Free replaced source pages on a background thread (`None`: the engine's setting,
    /// `migrate/deferred_free`).
    pub deferred_free: Option<bool>,
    /// Move base-page runs on a mover thread while the next piece is copied (`None`: the
    /// engine's setting, `migrate/mover`).
    pub mover: Option<bool>,
    /// Leave base-page destinations without pages and fill them with `UFFDIO_COPY` (`None`:
    /// the engine's setting, `migrate/fill_empty`).
    pub fill_empty: Option<bool>,
    /// Let the mover copy base pages of mappings without a memory policy of their own
    /// straight into their source (`None`: the engine's setting, `migrate/copy_in`).
    pub copy_in: Option<bool>,
    /// Failures to inject.
    pub fault: FaultInjection,
    /// Called after every moved run with the bytes moved so far.
    pub progress: Option<Progress>,
    /// Raised by the caller to stop the call: batches not begun fail with `ECANCELED` and
    /// stay as they were; the batch running finishes.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Past this instant no batch begins: the folios not reached fail with `ETIMEDOUT` and
    /// stay as they were.
    pub deadline: Option<std::time::Instant>,
}

impl std::fmt::Debug for MigrateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateOptions")
            .field("max_batch_pages", &self.max_batch_pages)
            .field("no_batch_copy", &self.no_batch_copy)
            .field("pipelined", &self.pipelined)
            .field("deferred_free", &self.deferred_free)
            .field("mover", &self.mover)
            .field("fill_empty", &self.fill_empty)
            .field("copy_in", &self.copy_in)
            .field("fault", &self.fault)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel)
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// What this kernel and process allow.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Capabilities {
    /// Only user-mode faults wait: kernel writes into migrating memory (`read(2)` into the
    /// buffer, `O_DIRECT`, `process_vm_writev`) fail with `EFAULT` instead.
    pub user_mode_only: bool,
    /// Never-touched pages can be protected without populating them first.
    pub wp_unpopulated: bool,
}

impl Capabilities {
    /// A sentence for users about what the capabilities mean.
    pub fn describe(&self) -> &'static str {
        if self.user_mode_only {
            "userfaultfd is limited to user-mode faults: kernel writes into migrating memory fail with EFAULT"
        } else {
            "userfaultfd handles kernel-mode faults: kernel writes into migrating memory wait for the move"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_bound_is_checked() {
        assert!(check_max_batch_pages(0).is_err());
        assert!(check_max_batch_pages(262_145).is_err());
        assert_eq!(check_max_batch_pages(1).unwrap(), 1);
        assert_eq!(check_max_batch_pages(262_144).unwrap(), 262_144);
    }
}
