//! The batch migration pipeline: `migrate_pages(folios, target node, reason, mode)`.
//!
//! A call is checked as a whole before anything is touched (shapes, node, what the memory
//! is, free memory on the target, `vm.max_map_count`), its runs are registered with
//! userfaultfd in missing and write-protect mode, then it runs in batches of at most
//! `max_batch_pages` base pages. Each batch, like the kernel's `migrate_pages_batch()`:
//!
//! 1. **claims** its folios (a folio another call is moving is busy: `EAGAIN`, retried on a
//!    later pass, ten passes at most);
//! 2. takes **destinations** on the target node from the destination pool and a
//!    graveyard for the old pages. A destination is written once: from a prepared reserve
//!    ([`Engine::reserve`], populated ahead on a background thread) when there is one;
//!    else, for base pages, *empty* (no pages: the copy allocates each page on the node and
//!    fills it in one step, `UFFDIO_COPY`, never zeroed first), or, with
//!    `migrate/copy_in`, no destination at all where the mapping has no memory policy of
//!    its own and the CPU copy runs on a mover thread (step 5 copies the old pages straight
//!    into the source, on a thread bound to the target); huge pages are populated, the
//!    whole batch before its first copy;
//! 3. **unmaps** each contiguous run: one write-protect call, then `UFFDIO_MOVE` of its old
//!    pages into the graveyard, after which every access to it waits (a pinned page refuses
//!    to move: the folio is put back and retried on a later pass). `WAS_MAPPED` /
//!    `WAS_MLOCKED` are recorded on the destinations. The pipelined copy unmaps piece by
//!    piece (2 MiB, then doubling), each just before it is copied, so the first folio does
//!    not wait for the whole batch;
//! 4. **batch-copies** the folios whose reason is batch-eligible ([`Reason::batch_eligible`])
//!    from the graveyard: the active migrator gets each piece as a batch of its own, else
//!    the CPU copy runs with the copy kernel measured fastest on this machine for the kind
//!    of destination (the copy kernels measured at start-up); folios marked `ALREADY_COPIED`, failures
//!    fall back to the per-folio copy;
//! 5. **moves** each run: copies what is not yet copied, moves the copy into the source with
//!    `UFFDIO_MOVE` (or copies the old pages straight in with `UFFDIO_COPY`) under the
//!    claims lock (which the event reader takes to read a purge, `munmap` or `mremap` of
//!    the program's), and wakes the waiting threads;
//! 6. **undoes** whatever could not move: old pages back from the graveyard, protection
//!    off, waiting threads woken, destination given back.
//!
//! # Locking
//!
//! Outermost first: a lock is taken only while holding locks listed above it. Every pair
//! not nested here is never held together.
//!
//! 1. the agent's `moving` (`agent::server`): one move per agent, held across the whole
//!    migration it serves;
//! 2. the engine slot's maker (`attr::opening`, a `process::PerProcess`: one atomic word):
//!    the thread that opens or reopens the engine runs `Engine::new`, the config file's
//!    attributes (3, 4) and `Pool::clear` (5) while the others wait;
//! 3. dcbm's `registered` (`migrators::dcbm`) -> the registry's `active`;
//! 4. the registry's `active` (`offload::registry`): the active migrator. It is let go
//!    before `offload_copy` runs (readers counted instead); mtcopy's `workers` -> the
//!    pipeline's completion lock, through `on_complete` when a share is copied inline;
//! 5. the pool's `preparer`, `reserves` (alone) and `chunks` -> `sys::own` ranges;
//! 6. the soft DMA device list, a channel's `state` -> the device's fault plan;
//! 7. the fork gate (`fork`, one atomic word): taken (`fork::open`) before the claims,
//!    never with them held; a thread that has emptied pages in its batch is never made to
//!    wait for a fork (the fork waits for its pages);
//! 8. the event reader's `reading` (`events::Reader`): held by whichever thread handles the
//!    program's events (`pagemig-events`, or a call's copying thread between two chunks:
//!    the caller and `pagemig-copier`), for the whole of it, with what a copying thread
//!    left to `pagemig-events` -> the claims. A copying thread only tries it, for 200 µs;
//! 9. the claims (`busy::Busy`): claimed ranges and their isolated and dead spans. Taken by
//!    the caller, `pagemig-copier`, `pagemig-mover` and `pagemig-events`; isolating, moving
//!    in, putting back and handling an event of the program's exclude each other. A leaf
//!    among the locks; it is let go (`Patience`) around every retry and sleep of the
//!    pipeline and mover;
//! 10. the reaper's `tx` -> its `pending` count;
//! 11. the progress reporter's `state` (`mover::Reporter`) -> `Abort`'s first error;
//! 12. leaves: `Abort`'s first error, the copy helper's state (`helper`), the attributes' sources, `sys::own` ranges, mtcopy's and
//!     dcbm's completion latches, a channel's `worker`, a device's usage.
//!
//! A `fork()` takes the fork gate (its barrier), then the process-wide locks of 3 to 6 and
//! the attributes' sources in this order (`process::at_fork`, `ForkRank`), and lets them go
//! in the parent and the child: the child finds none held.
//!
//! Waits that act as locks: an isolated page blocks every access until a move into it
//! (under the claims); a write-protected page blocks writers until its protection is
//! lifted; the program's `madvise`/`munmap`/`mremap` of a registered range waits until
//! `pagemig-events` (or a copying thread) has read its event (under the claims), and until then ioctls on the
//! engine's userfaultfd answer `EAGAIN`, or `ENOENT` where the memory has just moved on
//! (waited out with the claims let go, by one `backoff::Backoff` each); empty
//! destinations and graveyards wait for `pagemig-zerofill`, which takes no lock.
//!
//! Never held across: user code (`offload_copy`, the progress callback, which runs on
//! its own thread, DMA callbacks) under any pagemig lock; an access to memory a call may
//! have isolated under the claims. The event reader keeps the claims, of the old pages of
//! memory the program moved with `mremap`, for at most a millisecond of offering them to
//! the kernel from their graveyards, then only while it copies what is left into holdings
//! of its own; it waits for the kernel to take those home without the lock (taken only to
//! read and handle the events that come meanwhile), however long
//! the program's own purges and moves keep the kernel refusing them (only where no holding
//! can be mapped does it keep the lock throughout, up to 5 s, and gives up what is left
//! then). A copying thread that reads such a move offers the old pages under the claims
//! for that millisecond too, copies what is left into holdings, and leaves it to
//! `pagemig-events` (its call does not wait on the program's purges, but where no holding
//! can be mapped). The only
//! registration with the program's userfaultfd, each call's as it begins, happens under the
//! claims, so a holding (mapped and registered elsewhere under the claims) is never
//! registered with it. Known long holds: the pool's `chunks` across populating one
//! destination; dcbm's `registered` across `unregister`'s grace period.

mod abort;
mod background;
mod busy;
mod checks;
mod engine;
mod events;
mod fork;
mod helper;
mod mover;
mod options;
mod outcome;
mod pages;
mod pipeline;
pub mod policy;
mod reaper;
mod settings;
mod staged;
mod zerofill;

pub use crate::stats::MigrateStats;
pub use background::Background;
pub use engine::{Engine, migrate_pages};
pub use options::{
    Capabilities, DEFAULT_MAX_BATCH_PAGES, DEFAULT_REAPER_BACKLOG, MAX_BATCH_PAGES_LIMIT, MigrateOptions,
    NR_MAX_MIGRATE_PASSES, Progress,
};
#[cfg(feature = "internals")]
pub use options::{FaultInjection, Handshake};
pub use pages::{PagesStats, RangeOutcome, movable_ranges};
pub use policy::{Mode, Reason};
pub use settings::Settings;
pub(crate) use settings::{SETTING_ATTRS, SettingAttr};

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
    /// Its mapping has a memory policy of its own (`mbind`): pages allocated for it go
    /// where that policy says, whichever thread allocates them.
    own_policy: bool,
}

/// An address range as `(start, end)`.
pub(crate) type Span = (usize, usize);
