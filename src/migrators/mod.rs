//! Migrators: the batch-copy providers that can be registered with the offload registry.
//!
//! `cpu` is not here: with no migrator registered, the core's own `folios_copy` serves.

pub mod mtcopy;
