//! pagemig: batched page migration between NUMA nodes, with pluggable copy offload, from
//! user space.
//!
//! pagemig moves the memory of a running program between NUMA nodes (DRAM, CXL and HBM
//! tiers) the way the kernel's `migrate_pages()` does, batch by batch: it write-protects
//! the folios of a batch with userfaultfd, moves their old pages aside (`UFFDIO_MOVE`, which
//! refuses pages pinned for DMA; every access now waits), copies the batch, moves the copies
//! in, and wakes the waiting threads. Nothing written
//! while a folio migrates is lost, and a folio that cannot be moved is left as it was.
//!
//! ```no_run
//! use pagemig::{migrate_pages, Mode, Reason, Region};
//!
//! let region = Region::new(64 << 20, 2 << 20, Some(0))?;
//! let stats = migrate_pages(&region.folios(), 1, Reason::Syscall, Mode::Sync)?;
//! println!("{} GB/s", stats.gbps());
//! # Ok::<(), pagemig::Error>(())
//! ```
//!
//! `unsafe` code lives in the system-call layer, the copy kernels, the pipeline that calls
//! them, the pool that owns its memory, and the `unsafe fn`s over raw addresses
//! ([`Region::adopt`], [`Engine::move_pages`], [`Folio::new`]).
#![deny(unsafe_code, missing_docs, unsafe_op_in_unsafe_fn)]

/// Declares a module that is public with the `internals` feature (for pagemig's own tests,
/// benchmarks and command; no semver promise) and private without it.
macro_rules! internal {
    ($(#[$meta:meta])* mod $name:ident;) => {
        $(#[$meta])*
        #[cfg(feature = "internals")]
        pub mod $name;
        $(#[$meta])*
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unreachable_pub)]
        mod $name;
    };
}

pub mod attr;
pub mod dma;
pub mod error;
pub mod folio;
pub mod migrate;
pub mod migrators;
pub mod numa;
pub mod offload;
pub mod region;
pub mod stats;
mod sync;

internal! { mod copy; }
internal! { mod maps; }
internal! { mod pool; }
internal! { mod sys; }
internal! { mod workload; }

pub use error::{Error, Result};
pub use folio::{Folio, MigrateInfo};
#[cfg(feature = "internals")]
pub use migrate::FaultInjection;
pub use migrate::{
    Background, Capabilities, Engine, MigrateOptions, MigrateStats, Mode, PagesStats, RangeOutcome, Reason,
    migrate_pages,
};
pub use pool::ThpAdvice;
pub use region::Region;
pub use rustix::io::Errno;
pub use sys::PAGE_SIZE;
