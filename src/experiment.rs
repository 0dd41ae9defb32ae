//! One measured migration of a fresh region, as `pagemig move` and `pagemig bench` run it:
//! fill, measure a plain copy of the same bytes, migrate while writers write, verify every
//! byte, every write and the node of every page.

use std::time::Duration;

use serde::Serialize;

use crate::error::Result;
use crate::migrate::{Engine, MigrateOptions, MigrateStats, Mode, Progress, Reason};
use crate::region::Region;
use crate::workload::{self, VerifyReport};
use crate::{Error, copy, numa};

/// What to move and how.
#[derive(Clone, Debug)]
pub struct MoveConfig {
    /// Bytes in the region.
    pub size: usize,
    /// Folio size (4 KiB … 2 MiB, a power of two).
    pub folio_size: usize,
    /// Node the region starts on (`None`: the kernel's choice).
    pub from_node: Option<u32>,
    /// Node to migrate to.
    pub to_node: u32,
    /// Bound on a batch, in base pages.
    pub batch_pages: usize,
    /// Why the migration happens (decides batch-copy eligibility).
    pub reason: Reason,
    /// How busy folios are waited for.
    pub mode: Mode,
    /// Writer threads storing sequence numbers during the migration.
    pub writers: usize,
    /// Seed of the fill pattern.
    pub seed: u64,
    /// Measure a plain copy of the same bytes first.
    pub measure_memcpy: bool,
}

/// Everything measured and checked.
#[derive(Clone, Debug, Serialize)]
pub struct MoveReport {
    /// Bytes in the region.
    pub bytes: u64,
    /// Folio size in bytes.
    pub folio_size: u64,
    /// Folios in the region.
    pub folios: u64,
    /// Target node.
    pub to_node: u32,
    /// Bound on a batch, in base pages.
    pub batch_pages: u64,
    /// The migration reason.
    pub reason: Reason,
    /// Writer threads.
    pub writers: u64,
    /// The active migrator during the run (`cpu` when none was registered).
    pub migrator: String,
    /// Folios copied by the active migrator.
    pub offloaded_folios: u64,
    /// Batch-eligible folios the migrator (or batch copy) did not copy, copied one by one.
    pub fallback_folios: u64,
    /// Folios migrated.
    pub succeeded_folios: u64,
    /// Folios not migrated.
    pub failed_folios: u64,
    /// The first error, if any folio failed.
    pub error: Option<String>,
    /// Bytes that differ from what was written (outside writer slots).
    pub mismatched_bytes: u64,
    /// Stores the writers made.
    pub writes: u64,
    /// Writer slots not holding the last value stored.
    pub lost_writes: u64,
    /// Whether every page is on the target node.
    pub placement_ok: bool,
    /// Pages per node after the migration (negative keys: errnos of absent pages).
    pub placement: std::collections::BTreeMap<i32, usize>,
    /// Critical-path throughput (unmap + copy + move), GB/s.
    pub gbps: f64,
    /// Throughput of the whole call, destination preparation included, GB/s.
    pub end_to_end_gbps: f64,
    /// A plain copy of the same bytes between prepared buffers, same run, GB/s.
    pub memcpy_gbps: f64,
    /// `gbps / memcpy_gbps`.
    pub ratio: f64,
    /// Median first-folio latency over batches, µs.
    pub first_folio_us: f64,
    /// 99th percentile of first-folio latency over batches, µs.
    pub first_folio_p99_us: f64,
    /// Time per phase, µs.
    pub phases_us: Phases,
    /// Every counter of the migration.
    pub stats: MigrateStats,
}

/// Time per phase in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Phases {
    /// Populating destinations.
    pub prepare: f64,
    /// Write-protecting sources.
    pub unmap: f64,
    /// Copying.
    pub copy: f64,
    /// Moving destinations over sources and waking writers.
    pub r#move: f64,
    /// The whole call.
    pub total: f64,
}

impl MoveReport {
    /// Whether every byte, every write, every folio and every page's placement is right.
    pub fn ok(&self) -> bool {
        self.failed_folios == 0 && self.mismatched_bytes == 0 && self.lost_writes == 0 && self.placement_ok
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// Migrates `folios` of `region` to `to_node` while `writers` threads keep writing into
/// the region; a partial failure comes back as its statistics and first error, next to
/// what the writers wrote.
///
/// # Errors
/// Errors raised before anything moved (invalid input, `ENOMEM` up front).
#[allow(clippy::too_many_arguments)]
pub fn migrate_with_writers(
    engine: &Engine,
    region: &Region,
    folios: &[crate::Folio],
    to_node: u32,
    reason: Reason,
    mode: Mode,
    writers: usize,
    opts: &MigrateOptions,
) -> Result<(MigrateStats, Option<String>, workload::WriteLog)> {
    let (result, log) =
        workload::with_writers(region, writers, || engine.migrate_pages(folios, to_node, reason, mode, opts));
    match result {
        Ok(s) => Ok((s, None, log)),
        Err(Error::Partial { stats, first, .. }) => Ok((*stats, Some(first.to_string()), log)),
        Err(e) => Err(e),
    }
}

/// Runs one measured migration.
///
/// # Errors
/// Invalid configurations and failures to allocate the region; failures of the migration
/// itself are reported in the [`MoveReport`].
pub fn run_move(engine: &Engine, cfg: &MoveConfig, progress: Option<Progress>) -> Result<MoveReport> {
    numa::check_node(cfg.to_node)?;
    let region = Region::new(cfg.size, cfg.folio_size, cfg.from_node)?;
    workload::fill(&region, cfg.seed);
    let memcpy = if cfg.measure_memcpy {
        copy::memcpy_baseline(cfg.size, cfg.folio_size).map_err(Error::sys("memcpy baseline buffers"))?
    } else {
        Duration::ZERO
    };
    let opts = MigrateOptions { max_batch_pages: Some(cfg.batch_pages), progress, ..Default::default() };
    let folios = region.folios();
    let (stats, error, log) =
        migrate_with_writers(engine, &region, &folios, cfg.to_node, cfg.reason, cfg.mode, cfg.writers, &opts)?;
    let verify: VerifyReport = workload::verify(&region, cfg.seed, &log);
    let placement = region.placement()?;
    let pages = region.len() / crate::sys::PAGE_SIZE;
    let placement_ok = placement.get(&(cfg.to_node as i32)) == Some(&pages);
    let memcpy_gbps = crate::stats::gbps(cfg.size as u64, memcpy);
    let gbps = stats.gbps();
    Ok(MoveReport {
        bytes: cfg.size as u64,
        folio_size: cfg.folio_size as u64,
        folios: folios.len() as u64,
        to_node: cfg.to_node,
        batch_pages: cfg.batch_pages as u64,
        reason: cfg.reason,
        writers: cfg.writers as u64,
        migrator: crate::offload::registry().active_name().unwrap_or_else(|| "cpu".into()),
        offloaded_folios: stats.offloaded_folios,
        fallback_folios: stats.fallback_folios,
        succeeded_folios: stats.succeeded_folios,
        failed_folios: stats.failed_folios,
        error,
        mismatched_bytes: verify.mismatched_bytes,
        writes: log.writes,
        lost_writes: verify.lost_writes,
        placement_ok,
        placement,
        gbps,
        end_to_end_gbps: stats.end_to_end_gbps(),
        memcpy_gbps,
        ratio: if memcpy_gbps > 0.0 { gbps / memcpy_gbps } else { 0.0 },
        first_folio_us: stats.first_folio_median().map_or(0.0, |d| d.as_secs_f64() * 1e6),
        first_folio_p99_us: stats.first_folio_quantile(0.99).map_or(0.0, |d| d.as_secs_f64() * 1e6),
        phases_us: Phases {
            prepare: us(stats.prepare_ns),
            unmap: us(stats.unmap_ns),
            copy: us(stats.copy_ns),
            r#move: us(stats.move_ns),
            total: us(stats.total_ns),
        },
        stats,
    })
}
