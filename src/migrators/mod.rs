//! Migrators: the batch-copy providers that can be registered with the offload registry.
//!
//! `cpu` is not here: with no migrator registered, the core's own `folios_copy` serves.

pub mod dcbm;
pub mod mtcopy;

use std::sync::{Arc, OnceLock};

/// The process-wide DMA migrator, over the process-wide soft DMA device.
pub fn dcbm() -> &'static Arc<dcbm::Dcbm> {
    dcbm::global()
}

/// The process-wide multi-threaded copy migrator, with one thread per CPU to start.
pub fn mtcopy() -> &'static Arc<mtcopy::MtCopy> {
    static MTCOPY: OnceLock<Arc<mtcopy::MtCopy>> = OnceLock::new();
    MTCOPY.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, mtcopy::MAX_THREADS);
        mtcopy::MtCopy::new(cpus).expect("a thread count within bounds")
    })
}
