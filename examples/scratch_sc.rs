//! What a small migration costs in a process with much memory resident elsewhere: a region
//! of `[KiB]` (default 64) of 4 KiB folios migrated again and again with
//! `Engine::migrate_pages`, timed per call, while `[GiB]` (default 1) of other memory stays
//! resident; then the same with one page of that memory locked (`mlock`), which makes every
//! call read `/proc/self/smaps`, whose cost grows with the resident memory.
//! `cargo run --release --example small_calls -- [GiB] [KiB]`

use std::time::Instant;

use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, numa, workload};

/// Prints an error as a sentence (not as a debug dump) and exits 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("small_calls: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The median of `calls` timed migrations of `region`, in µs; every byte checked after.
fn median_call_us(engine: &Engine, region: &Region, node: u32, calls: usize) -> Result<f64, pagemig::Error> {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        engine.migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &MigrateOptions::default())?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert!(workload::verify(region, 7, &Default::default()).ok(), "every byte of the region as written");
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn run() -> Result<(), pagemig::Error> {
    let gib: usize = std::env::args()
        .nth(1)
        .map_or(Ok(1), |a| a.parse())
        .map_err(|e| pagemig::Error::Invalid(format!("resident GiB: {e}")))?;
    let kib: usize = std::env::args()
        .nth(2)
        .map_or(Ok(64), |a| a.parse())
        .map_err(|e| pagemig::Error::Invalid(format!("KiB to move: {e}")))?;
    let node = numa::memory_nodes()?[0];
    let engine = Engine::global()?;
    // The rest of the program: resident, never migrated.
    let resident = (gib > 0).then(|| Region::new(gib << 30, 4096, Some(node))).transpose()?;
    if let Some(resident) = &resident {
        workload::fill(resident, 3);
    }
    let region = Region::new(kib << 10, 4096, Some(node))?;
    workload::fill(&region, 7);
    let calls = 10;
    let plain = median_call_us(engine, &region, node, calls)?;
    let locked_page = Region::new(4096, 4096, Some(node))?;
    workload::fill(&locked_page, 1);
    let locked = match Err::<(), pagemig::Error>(pagemig::Error::Invalid("skipped".into())) {
        Ok(()) => format!("{:.0} µs", median_call_us(engine, &region, node, calls)?),
        Err(e) => format!("not measured ({e})"),
    };
    eprintln!("mappings: {}", std::fs::read_to_string("/proc/self/maps").unwrap().lines().count());
    println!(
        "{kib} KiB of 4 KiB folios, {gib} GiB resident elsewhere, median of {calls} calls: {plain:.0} µs a call; \
         with one page of the process locked: {locked}"
    );
    Ok(())
}
