//! Writing a migrator: a batch copy that copies through the batch's own copies and reports
//! what it copied, registered for the duration of one migration.
//! `cargo run --release --example migrator`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pagemig::Errno;
use pagemig::offload::{Batch, Migrator, OffloadCopy, Owner, registry};
use pagemig::{Engine, Mode, Reason, Region, numa};

/// Copies each batch in two halves and counts the folios.
#[derive(Default)]
struct Halves {
    folios: AtomicUsize,
}

// SAFETY: copies only through `Batch::copy_range` and reports only what it copied.
unsafe impl OffloadCopy for Halves {
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
        let n = batch.folio_count();
        for range in [0..n / 2, n / 2..n] {
            batch.copy_range(range.clone())?;
            batch.complete(range)?;
        }
        self.folios.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn fills_unpopulated(&self) -> bool {
        true
    }
}

/// Prints an error as a sentence (not as a debug dump) and exits 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), pagemig::Error> {
    let node = numa::memory_nodes()?[0];
    let mut region = Region::new(16 << 20, 64 << 10, Some(node))?;
    for (i, b) in region.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let halves = Arc::new(Halves::default());
    let registration = registry().register_scoped(Migrator::new("halves", halves.clone(), Owner::new("example")))?;
    let stats =
        Engine::global()?.migrate_pages(&region.folios(), node, Reason::Demotion, Mode::Sync, &Default::default())?;
    drop(registration);
    println!(
        "{} folios moved, {} copied by the migrator",
        stats.succeeded_folios,
        halves.folios.load(Ordering::Relaxed)
    );
    assert!(region.as_mut_slice().iter().enumerate().all(|(i, &b)| b == (i % 253) as u8), "every byte kept");
    Ok(())
}
