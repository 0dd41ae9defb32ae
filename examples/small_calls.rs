//! What a small migration costs in a process with much memory resident elsewhere: a region
//! of `[KiB]` (default 64) of 4 KiB folios migrated again and again with
//! `Engine::migrate_pages`, timed per call, while `[GiB]` (default 1) of other memory stays
//! resident; then the same with one page of that memory locked (`mlock`: a locked mapping is
//! locked again where it lands, so a call must know which are).
//! `cargo run --release --example small_calls -- [GiB] [KiB]`

use std::sync::atomic::Ordering;
use std::time::Instant;

use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, numa};

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

/// Writes a word derived from `seed` into every word of `region`.
fn fill(region: &Region, seed: u64) {
    for i in 0..region.words() {
        region.word(i).store(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), Ordering::Relaxed);
    }
}

/// Whether every word of `region` is as [`fill`] wrote it.
fn holds(region: &Region, seed: u64) -> bool {
    (0..region.words())
        .all(|i| region.word(i).load(Ordering::Relaxed) == seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The median of `calls` timed migrations of `region`, in µs; every word checked after.
fn median_call_us(engine: &Engine, region: &Region, node: u32, calls: usize) -> Result<f64, pagemig::Error> {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        engine.migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &MigrateOptions::default())?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert!(holds(region, 7), "every word of the region as written");
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
        fill(resident, 3);
    }
    let region = Region::new(kib << 10, 4096, Some(node))?;
    fill(&region, 7);
    let calls = 200;
    let plain = median_call_us(engine, &region, node, calls)?;
    let locked_page = Region::new(4096, 4096, Some(node))?;
    fill(&locked_page, 1);
    let locked = match locked_page.mlock() {
        Ok(()) => format!("{:.0} µs", median_call_us(engine, &region, node, calls)?),
        Err(e) => format!("not measured ({e})"),
    };
    println!(
        "{kib} KiB of 4 KiB folios, {gib} GiB resident elsewhere, median of {calls} calls: {plain:.0} µs a call; \
         with one page of the process locked: {locked}"
    );
    Ok(())
}
