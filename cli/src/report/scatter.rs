//! A verified migration of every other folio of a region: each moved folio is a run of its
//! own, so it costs one write-protect call and one `mremap`, where contiguous folios share
//! them. Run with `every_other: false` it migrates the whole region the same way, which is
//! what the scattered case is compared with.

use std::collections::HashSet;

use crate::report::model::{Measurement, check_failures, phases_of};
use pagemig::error::Result;
use pagemig::migrate::{Engine, MigrateOptions, Mode, Reason};
use pagemig::numa;
use pagemig::region::Region;
use pagemig::sys::PAGE_SIZE;
use pagemig::workload;

/// What to move.
#[derive(Clone, Debug)]
pub struct ScatterConfig {
    /// Bytes in the region.
    pub size: usize,
    /// Folio size.
    pub folio_size: usize,
    /// Node the region is allocated on.
    pub from_node: u32,
    /// Node to migrate to.
    pub to_node: u32,
    /// Migrate every other folio (the first, third, …) instead of all of them.
    pub every_other: bool,
    /// Bound on a batch, in base pages.
    pub batch_pages: usize,
    /// Why the migration happens.
    pub reason: Reason,
    /// How busy folios are waited for.
    pub mode: Mode,
    /// Writer threads storing into the region while it migrates.
    pub writers: usize,
    /// Seed of the fill pattern.
    pub seed: u64,
}

/// Mappings a process keeps free for everything else while a scattered migration splits
/// its region.
const MAP_COUNT_HEADROOM: usize = 4096;

/// The most folios one scattered migration may move here: each moved folio splits the
/// region's mapping and may add two mappings, and `vm.max_map_count` bounds them all.
pub fn max_scattered_folios() -> usize {
    let in_use = pagemig::maps::vma_count().unwrap_or(1024);
    pagemig::sys::max_map_count().saturating_sub(in_use + MAP_COUNT_HEADROOM) / 2
}

/// The region for a scattered migration of `folio_size` folios: at most `size` bytes, and
/// few enough folios that every other one is at most `max_folios`; a power-of-two multiple
/// of the folio size, at least two folios.
pub fn region_size(size: usize, folio_size: usize, max_folios: usize) -> usize {
    let folios = (size / folio_size).min(max_folios.saturating_mul(2)).max(2);
    folio_size << folios.ilog2()
}

/// Runs one verified migration.
///
/// # Errors
/// Invalid configurations and failures to allocate the region; failures of the migration
/// itself are in the [`Measurement`] (`ok: false`).
pub fn run_scattered(engine: &Engine, cfg: &ScatterConfig, rep: usize) -> Result<Measurement> {
    numa::check_node(cfg.to_node)?;
    let region = Region::new(cfg.size, cfg.folio_size, Some(cfg.from_node))?;
    workload::fill(&region, cfg.seed);
    let all = region.folios();
    let step = if cfg.every_other { 2 } else { 1 };
    let moved: Vec<_> = all.iter().step_by(step).copied().collect();
    let opts = MigrateOptions::default().max_batch_pages(cfg.batch_pages);
    let (stats, error, log) = crate::experiment::migrate_with_writers(
        engine,
        &region,
        &moved,
        cfg.to_node,
        cfg.reason,
        cfg.mode,
        cfg.writers,
        &opts,
    )?;
    let verify = workload::verify(&region, cfg.seed, &log);
    // Moved folios on the target, the others where they were allocated.
    let nodes = numa::page_nodes(region.addr(), region.len())?;
    let moved_starts: HashSet<usize> = moved.iter().map(|f| f.addr()).collect();
    let pages_per_folio = cfg.folio_size / PAGE_SIZE;
    let misplaced = nodes
        .chunks(pages_per_folio)
        .zip(&all)
        .filter(|(pages, folio)| {
            let want = if moved_starts.contains(&folio.addr()) { cfg.to_node } else { cfg.from_node } as i32;
            pages.iter().any(|&n| n != want)
        })
        .count();
    let placement_ok = misplaced == 0;
    let checks = check_failures(stats.failed_folios, verify.mismatched_bytes, verify.lost_writes, placement_ok);
    let error = match (error, checks) {
        (Some(e), Some(c)) => Some(format!("{c} (first error: {e})")),
        (e, c) => c.or(e),
    };
    let p = |q| stats.first_folio_quantile(q).map_or(0.0, |d| d.as_secs_f64() * 1e6);
    Ok(Measurement {
        rep,
        ok: error.is_none(),
        error,
        bytes: stats.bytes,
        folios: moved.len() as u64,
        gbps: stats.gbps(),
        critical_path_gbps: Some(stats.critical_path_gbps()),
        memcpy_gbps: None,
        uffdio_copy_gbps: None,
        first_folio_us: p(0.5),
        first_folio_p99_us: p(0.99),
        failed_folios: stats.failed_folios,
        mismatched_bytes: verify.mismatched_bytes,
        writes: log.writes,
        lost_writes: verify.lost_writes,
        writer_stalls: log.stalls.clone(),
        placement_ok,
        batches: stats.batches,
        runs: stats.runs,
        batch_copied_folios: stats.batch_copied_folios,
        offloaded_folios: stats.offloaded_folios,
        fallback_folios: stats.fallback_folios,
        phases_us: phases_of(&stats),
        first_folio_ns: stats.first_folio_ns.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sizes_respect_the_bound() {
        assert_eq!(region_size(1 << 30, 4096, 16384), 128 << 20);
        assert_eq!(region_size(64 << 20, 2 << 20, 16384), 64 << 20);
        assert_eq!(region_size(48 << 20, 2 << 20, 16384), 32 << 20);
        assert_eq!(region_size(4096, 4096, 16384), 8192);
        assert!(max_scattered_folios() > 1000);
    }

    #[test]
    fn every_other_folio_moves_and_is_verified() {
        let Ok(engine) = Engine::global() else { return };
        let node = numa::memory_nodes().unwrap()[0];
        let cfg = ScatterConfig {
            size: 1 << 20,
            folio_size: 4096,
            from_node: node,
            to_node: node,
            every_other: true,
            batch_pages: 512,
            reason: Reason::Syscall,
            mode: Mode::Sync,
            writers: 1,
            seed: 7,
        };
        let m = run_scattered(engine, &cfg, 0).unwrap();
        assert!(m.ok, "{:?}", m.error);
        assert_eq!(m.folios, 128);
        assert_eq!(m.runs, 128);
        assert_eq!(m.bytes, 512 << 10);
        let whole = run_scattered(engine, &ScatterConfig { every_other: false, ..cfg }, 0).unwrap();
        assert!(whole.ok, "{:?}", whole.error);
        assert_eq!(whole.folios, 256);
        assert!(whole.runs < 8, "contiguous folios share runs: {}", whole.runs);
    }
}
