//! A migration that partly fails (a copy failure injected for two folios): the call says
//! which folios did not move and why, and they are exactly as they were.
//! `cargo run --release --example partial`

use pagemig::{Engine, Error, FaultInjection, MigrateOptions, Mode, Reason, Region, numa, workload};

fn main() -> Result<(), Error> {
    let node = numa::memory_nodes()?[0];
    let region = Region::new(4 << 20, 4096, Some(node))?;
    workload::fill(&region, 9);
    let opts = MigrateOptions {
        fault: FaultInjection { fail_batch_copy: true, fail_folio_copy: vec![3, 700], ..Default::default() },
        ..Default::default()
    };
    match Engine::global()?.migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &opts) {
        Err(Error::Partial { failed, total, first, stats }) => {
            println!("{failed} of {total} folios did not move; first error: {first}");
            for f in &stats.failures {
                println!("  folio at {:#x}: errno {}", f.addr, f.errno);
            }
        }
        Ok(stats) => println!("all {} folios moved", stats.succeeded_folios),
        Err(e) => return Err(e),
    }
    assert!(workload::verify(&region, 9, &Default::default()).ok(), "every byte kept");
    println!("every byte kept");
    Ok(())
}
