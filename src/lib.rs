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
//! # Memory the program already has
//!
//! Any private anonymous memory — a `Vec`, a buffer from any allocator — moves by address
//! and length with [`Engine::move_range`] (or page by page with [`Engine::move_pages`], the
//! form of `move_pages(2)`), in folios of the size its pages really are, with an outcome for
//! every page:
//!
//! ```
//! use pagemig::{Engine, MigrateOptions, numa};
//!
//! let node = numa::memory_nodes()?[0];
//! let mut table: Vec<u64> = (0..(4 << 20) / 8).collect();
//! let engine = Engine::global()?;
//! // SAFETY: this thread does not touch `table` during the call.
//! let outcome = unsafe { engine.move_range(table.as_ptr() as usize, table.len() * 8, node, &MigrateOptions::default())? };
//! assert_eq!(outcome.errors().count(), 0);
//! assert_eq!(outcome.pages_on(node), outcome.status.len());
//! table[0] = 1; // the program's memory, as it was, wherever it is now
//! assert!(table[1..].iter().enumerate().all(|(i, &w)| w == i as u64 + 1));
//! # Ok::<(), pagemig::Error>(())
//! ```
//!
//! # When part of a call fails
//!
//! Folios that could not move (pinned, changed under the call, a migrator that failed
//! them) are exactly as they were; the rest moved. [`Error::Partial`] says which and why:
//!
//! ```
//! use pagemig::{Engine, Error, MigrateOptions, Mode, Reason, Region, numa};
//!
//! let node = numa::memory_nodes()?[0];
//! let region = Region::new(4 << 20, 64 << 10, Some(node))?;
//! match Engine::global()?.migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &MigrateOptions::default()) {
//!     Ok(stats) => assert_eq!(stats.succeeded_folios, 64),
//!     Err(Error::Partial { failed, stats, .. }) => {
//!         eprintln!("{failed} folios stayed");
//!         for f in &stats.failures {
//!             eprintln!("  {:#x}: {}", f.addr, std::io::Error::from_raw_os_error(f.errno));
//!         }
//!     }
//!     Err(e) => return Err(e),
//! }
//! # Ok::<(), pagemig::Error>(())
//! ```
//!
//! # Writing a migrator
//!
//! A migrator copies the batches of every migration while it is registered ([`offload`]).
//! It copies through the [`offload::Batch`] it is handed and reports what it copied; what
//! it does not report, the CPU copies:
//!
//! ```
//! use std::sync::Arc;
//! use pagemig::offload::{registry, Batch, Migrator, OffloadCopy, Owner};
//! use pagemig::{Errno, Engine, MigrateOptions, Mode, Reason, Region, numa};
//!
//! struct Halves;
//!
//! // SAFETY: copies only through the batch and reports only what it copied.
//! unsafe impl OffloadCopy for Halves {
//!     fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
//!         let n = batch.folio_count();
//!         for range in [0..n / 2, n / 2..n] {
//!             batch.copy_range(range.clone())?;
//!             batch.complete(range)?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let node = numa::memory_nodes()?[0];
//! let region = Region::new(4 << 20, 64 << 10, Some(node))?;
//! let scope = registry()
//!     .register_scoped(Migrator::new("halves", Arc::new(Halves), Owner::new("doc")))?;
//! let stats = Engine::global()?.migrate_pages(&region.folios(), node, Reason::Demotion, Mode::Sync, &MigrateOptions::default())?;
//! drop(scope);
//! assert_eq!(stats.succeeded_folios, 64);
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
        #[allow(unreachable_pub)]
        mod $name;
    };
}

pub mod agent;
pub mod attr;
mod backoff;
#[cfg(feature = "dma")]
pub mod dma;
pub mod error;
#[cfg(feature = "ffi")]
pub mod ffi;
pub mod folio;
mod lock;
pub mod migrate;
pub mod migrators;
pub mod numa;
pub mod offload;
mod process;
pub mod region;
pub mod stats;
mod sync;
#[cfg(test)]
mod testing;

internal! { mod copy; }
internal! { mod maps; }
internal! { mod pool; }
internal! { mod sys; }
/// The write workload of pagemig's own tests, benches and command (`internals` only).
#[cfg(feature = "internals")]
pub mod workload;

pub use error::{Error, Result};
pub use folio::Folio;
pub use migrate::{
    Background, Capabilities, Engine, MigrateOptions, MigrateStats, Mode, PagesStats, RangeOutcome, Reason, Settings,
    migrate_pages, movable_ranges,
};
#[cfg(feature = "internals")]
pub use migrate::{FaultInjection, Handshake};
pub use pool::ThpAdvice;
pub use region::Region;
pub use rustix::io::Errno;
pub use sys::PAGE_SIZE;

/// The README's Rust examples, compiled as doc tests: an example that no longer builds
/// fails `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;
