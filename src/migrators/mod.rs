//! Migrators: the batch-copy providers that can be registered with the offload registry.
//!
//! `cpu` is not here: with no migrator registered, the core's own `folios_copy` serves.

#[cfg(feature = "dma")]
pub mod dcbm;
pub mod mtcopy;

use std::sync::Arc;

/// The process-wide DMA migrator, over the process-wide soft DMA device.
#[cfg(feature = "dma")]
pub fn dcbm() -> &'static Arc<dcbm::Dcbm> {
    dcbm::global()
}

/// The process-wide migrator of [`mtcopy()`] (shared with a forked child, which starts
/// workers of its own; see `offload::registry`'s `REGISTRY` for why not a `OnceLock`).
static MTCOPY: crate::process::PerProcess<Arc<mtcopy::MtCopy>> = crate::process::PerProcess::new();

/// Takes the process-wide migrators' locks for a `fork()` in progress (see
/// `migrate::fork`), in the lock order.
/// Makes every `fork()` from now on hold the migrators' locks.
pub(crate) fn hold_at_fork() {
    static STEP: crate::process::AtFork = crate::process::AtFork::holding(hold_for_fork);
    crate::process::at_fork(crate::process::ForkRank::Migrators, &STEP);
}

fn hold_for_fork(held: &mut Vec<Box<dyn std::any::Any>>) {
    #[cfg(feature = "dma")]
    dcbm::hold_for_fork(held);
    if let Some(m) = MTCOPY.latest() {
        m.hold_for_fork(held);
    }
}

/// The process-wide multi-threaded copy migrator, with one thread per CPU to start.
pub fn mtcopy() -> &'static Arc<mtcopy::MtCopy> {
    MTCOPY.get_or_init_inherited(|| {
        hold_at_fork();
        let cpus = crate::sys::usable_cpus().clamp(1, mtcopy::MAX_THREADS);
        mtcopy::MtCopy::new(cpus).expect("a thread count within bounds")
    })
}
