//! One measured migration of a fresh region, as `pagemig move` and `pagemig bench` run it:
//! fill, measure the same-run yardsticks (a plain copy of the same bytes, and a
//! `UFFDIO_COPY` fill of a fresh mapping on the target node), migrate while writers write,
//! verify every byte, every write and the node of every page.
//!
//! The migration is pagemig's ([`run_move`]) or the kernel's own `move_pages(2)`
//! ([`run_kernel_move`]), the baseline, which needs two memory nodes. Either way the
//! headline figure, [`MoveReport::gbps`], is end to end: the bytes over the time a caller
//! waits for the whole migration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagemig::pool::ThpAdvice;

use serde::Serialize;

use pagemig::error::Result;
use pagemig::migrate::{Engine, MigrateOptions, MigrateStats, Mode, Progress, Reason};
use pagemig::region::Region;
use pagemig::workload::{self, VerifyReport};
use pagemig::{Error, copy, numa};

/// What to move and how.
#[derive(Clone, Debug)]
pub struct MoveConfig {
    /// Bytes in the region.
    pub size: usize,
    /// Folio size (4 KiB … 2 MiB, a power of two).
    pub folio_size: usize,
    /// Node the region starts on (`None`: the kernel's choice).
    pub from_node: Option<u32>,
    /// Node to migrate to (the first of `to_nodes` when those are given).
    pub to_node: u32,
    /// Nodes to spread the folios over, round-robin as `numactl --interleave` spreads
    /// pages: folio `i` goes to `to_nodes[i % to_nodes.len()]`. Empty: every folio goes to
    /// `to_node`.
    pub to_nodes: Vec<u32>,
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
    /// Bytes of destinations to prepare on the target node ahead of the call, on the
    /// engine's reserve thread ([`Engine::reserve`]), before the call is timed; `None` for
    /// none (a cold call).
    pub reserve: Option<usize>,
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
    /// Target node (the first of `to_nodes`).
    pub to_node: u32,
    /// The nodes the folios were spread over, round-robin (one node: every folio went
    /// there).
    pub to_nodes: Vec<u32>,
    /// Bound on a batch, in base pages.
    pub batch_pages: u64,
    /// The migration reason.
    pub reason: Reason,
    /// Writer threads.
    pub writers: u64,
    /// The active migrator during the run (`cpu` when none was registered), or [`KERNEL`]
    /// for the kernel's `move_pages(2)`.
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
    /// Per writer, how long its stores waited on the migration (stores over 10 µs: how
    /// many, the longest, the 99.9th and 99th percentile); empty without writers.
    pub writer_stalls: Vec<workload::Stalls>,
    /// Whether every page is on the node its folio was sent to.
    pub placement_ok: bool,
    /// Pages not on the node their folio was sent to.
    pub misplaced_pages: u64,
    /// Pages per node after the migration (negative keys: errnos of absent pages).
    pub placement: std::collections::BTreeMap<i32, usize>,
    /// End-to-end throughput: the bytes over the time a caller waits for the whole
    /// migration (the `migrate_pages` call, destination preparation included; the
    /// `move_pages(2)` calls for the kernel), GB/s.
    pub gbps: f64,
    /// Throughput of the critical path, excluding destination preparation (the call less
    /// populating destinations: unmap + copy + move), GB/s; `None` for the kernel, whose
    /// calls cannot be split.
    pub critical_path_gbps: Option<f64>,
    /// A plain copy of the same bytes between prepared buffers, same run, GB/s (0 when not
    /// measured).
    pub memcpy_gbps: f64,
    /// `UFFDIO_COPY` of the same bytes into a fresh mapping bound to the target node, same
    /// run, GB/s: mapping, registering and filling it, each page allocated on the node and
    /// copied into without zeroing (base pages only). 0 when not measured.
    pub uffdio_copy_gbps: f64,
    /// The yardsticks' repetitions: bytes copied each time, and the median, slowest and
    /// fastest of each (`memcpy_gbps` and `uffdio_copy_gbps` are the medians).
    pub yardsticks: Yardsticks,
    /// `gbps / memcpy_gbps` (0 when memcpy was not measured).
    pub ratio: f64,
    /// `critical_path_gbps / memcpy_gbps`, where both are known.
    pub critical_path_ratio: Option<f64>,
    /// Addresses the kernel's `move_pages(2)` did not move, by outcome (an errno name, or
    /// `on node N` for a page left elsewhere); empty for pagemig's migrations.
    pub page_errors: std::collections::BTreeMap<String, u64>,
    /// Median first-folio latency over batches, µs.
    pub first_folio_us: f64,
    /// 99th percentile of first-folio latency over batches, µs.
    pub first_folio_p99_us: f64,
    /// Time per phase, µs.
    pub phases_us: Phases,
    /// Bytes of destinations prepared ahead of the call on the reserve thread (0: none).
    pub reserve_bytes: u64,
    /// How long the reserve thread took to prepare them, before the call, ms.
    pub reserve_ms: f64,
    /// The CPU copy kernels of this process ([`pagemig::copy::kernels`]).
    pub copy_kernels: pagemig::copy::Kernels,
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

impl MoveConfig {
    /// The nodes the folios go to, round-robin: `to_nodes`, or `to_node` alone.
    pub fn targets(&self) -> Vec<u32> {
        if self.to_nodes.is_empty() { vec![self.to_node] } else { self.to_nodes.clone() }
    }

    /// The node folio `index` of the region goes to.
    pub fn target_of(&self, index: usize) -> u32 {
        if self.to_nodes.is_empty() { self.to_node } else { self.to_nodes[index % self.to_nodes.len()] }
    }
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
    folios: &[pagemig::Folio],
    to_node: u32,
    reason: Reason,
    mode: Mode,
    writers: usize,
    opts: &MigrateOptions,
) -> Result<(MigrateStats, Option<String>, workload::WriteLog)> {
    let (result, log) =
        workload::with_timed_writers(region, writers, || engine.migrate_pages(folios, to_node, reason, mode, opts));
    match result {
        Ok(s) => Ok((s, None, log)),
        Err(Error::Partial { stats, first, .. }) => Ok((*stats, Some(first.to_string()), log)),
        Err(e) => Err(e),
    }
}

/// Timed repetitions of each yardstick, after one untimed warm-up.
pub const YARDSTICK_REPS: usize = 5;

/// The most bytes a yardstick copies: a GB/s figure is a rate, and a buffer this far above
/// a last-level cache (tens of MiB, 96 MiB on the largest per-die caches) streams at the
/// same rate as a larger one, so a region above it is measured on its first 256 MiB. This
/// bounds the yardsticks' time and their memory (two buffers of this size at most).
pub const YARDSTICK_MAX_BYTES: usize = 256 << 20;

/// One yardstick's repetitions, GB/s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rate {
    /// The median repetition.
    pub median_gbps: f64,
    /// The slowest repetition.
    pub min_gbps: f64,
    /// The fastest repetition.
    pub max_gbps: f64,
    /// Timed repetitions (0: not measured).
    pub reps: u32,
}

impl Rate {
    /// The rates of copies of `bytes` that took `times`.
    pub fn of(bytes: u64, times: &[Duration]) -> Rate {
        let mut g: Vec<f64> = times.iter().map(|&t| pagemig::stats::gbps(bytes, t)).collect();
        g.sort_by(f64::total_cmp);
        let median = match g.len() {
            0 => 0.0,
            n if n % 2 == 1 => g[n / 2],
            n => (g[n / 2 - 1] + g[n / 2]) / 2.0,
        };
        Rate {
            median_gbps: median,
            min_gbps: g.first().copied().unwrap_or(0.0),
            max_gbps: g.last().copied().unwrap_or(0.0),
            reps: g.len() as u32,
        }
    }

    /// Half the range of the repetitions over the median, in percent: `12.3 GB/s ±4 %`.
    pub fn spread_percent(&self) -> f64 {
        if self.median_gbps > 0.0 { 50.0 * (self.max_gbps - self.min_gbps) / self.median_gbps } else { 0.0 }
    }

    /// `12.30 GB/s (median of 5, spread ±4 %)`, or `-` when not measured.
    pub fn describe(&self) -> String {
        if self.reps == 0 {
            return "-".into();
        }
        format!("{:.2} GB/s (median of {}, spread ±{:.0} %)", self.median_gbps, self.reps, self.spread_percent())
    }
}

/// The same-run yardsticks of a migration: a plain copy and a `UFFDIO_COPY` fill of the
/// region's bytes (its first [`YARDSTICK_MAX_BYTES`] at most), each the median of
/// [`YARDSTICK_REPS`] warm repetitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Yardsticks {
    /// Bytes each repetition copies.
    pub bytes: u64,
    /// [`copy::memcpy_baseline`]: a copy between two populated buffers.
    pub memcpy: Rate,
    /// [`uffdio_copy_fill`]: a fresh mapping on the target node filled by `UFFDIO_COPY`.
    pub uffdio_copy: Rate,
}

/// The bytes the yardsticks of a region of `size` bytes in `folio_size` folios copy: the
/// region, or its first [`YARDSTICK_MAX_BYTES`] (whole folios).
pub fn yardstick_bytes(size: usize, folio_size: usize) -> usize {
    if size <= YARDSTICK_MAX_BYTES { size } else { (YARDSTICK_MAX_BYTES / folio_size.max(1)).max(1) * folio_size }
}

/// Times filling a fresh mapping bound to `node` with a copy of the first `len` bytes of `region` by `UFFDIO_COPY`
/// ([`pagemig::sys::uffd::copy_into_new_mapping`]): creating the mapping, registering it and
/// the copies, the closest user-space stand-in for the kernel allocating and filling
/// migration destinations. Unmapping it afterwards is not timed.
///
/// # Errors
/// [`Error::Sys`] from the fill (`EOPNOTSUPP` without `UFFDIO_MOVE`'s kernel, `ENOMEM`).
pub fn uffdio_copy_fill(region: &Region, len: usize, node: u32) -> Result<Duration> {
    let started = Instant::now();
    let copied = pagemig::sys::uffd::copy_into_new_mapping(region.addr(), len.min(region.len()), Some(node))
        .map_err(|errno| Error::Sys { op: "UFFDIO_COPY into a fresh mapping", errno })?;
    let elapsed = started.elapsed();
    drop(copied);
    Ok(elapsed)
}

/// Measures the yardsticks of `cfg` with the bytes of `region` (filled, not yet migrating):
/// zero when `cfg.measure_memcpy` is off.
///
/// # Errors
/// [`Error::Sys`] when the buffers cannot be mapped or filled.
pub fn measure_yardsticks(region: &Region, cfg: &MoveConfig) -> Result<Yardsticks> {
    if !cfg.measure_memcpy {
        return Ok(Yardsticks::default());
    }
    let len = yardstick_bytes(cfg.size, cfg.folio_size);
    let memcpy = copy::memcpy_baseline(len, cfg.folio_size, YARDSTICK_REPS)
        .map_err(|errno| Error::Sys { op: "memcpy baseline buffers", errno })?;
    let mut uffdio = Vec::with_capacity(YARDSTICK_REPS);
    for rep in 0..=YARDSTICK_REPS {
        let t = uffdio_copy_fill(region, len, cfg.to_node)?;
        // Repetition 0 warms up and is not counted.
        if rep > 0 {
            uffdio.push(t);
        }
    }
    Ok(Yardsticks {
        bytes: len as u64,
        memcpy: Rate::of(len as u64, &memcpy),
        uffdio_copy: Rate::of(len as u64, &uffdio),
    })
}

fn ratio(gbps: f64, memcpy_gbps: f64) -> f64 {
    if memcpy_gbps > 0.0 { gbps / memcpy_gbps } else { 0.0 }
}

/// What [`check`] found.
struct Checked {
    verify: VerifyReport,
    placement: std::collections::BTreeMap<i32, usize>,
    misplaced_pages: u64,
}

/// Every byte and write of a migrated region checked against what was written, and where
/// its pages are: the verification, the pages per node, and the pages that are not on the
/// node their folio was sent to.
fn check(region: &Region, cfg: &MoveConfig, log: &workload::WriteLog) -> Result<Checked> {
    let verify = workload::verify(region, cfg.seed, log);
    let nodes = numa::page_nodes(region.addr(), region.len())?;
    let pages_per_folio = cfg.folio_size / pagemig::sys::PAGE_SIZE;
    let mut placement = std::collections::BTreeMap::new();
    let mut misplaced_pages = 0;
    for (page, &node) in nodes.iter().enumerate() {
        *placement.entry(node).or_insert(0) += 1;
        if node != cfg.target_of(page / pages_per_folio) as i32 {
            misplaced_pages += 1;
        }
    }
    Ok(Checked { verify, placement, misplaced_pages })
}

/// The steps of a measured migration, in order, as [`run_move_observed`] and
/// [`run_kernel_move_observed`] announce them: a caller that shows progress can say what
/// the seconds before and after the migration itself are spent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Allocating the region and writing its pattern.
    Filling,
    /// Measuring the same-run yardsticks ([`measure_yardsticks`]).
    Yardsticks,
    /// Preparing destinations on the reserve thread ([`MoveConfig::reserve`]).
    Reserving,
    /// The migration itself (the progress callback counts its bytes).
    Migrating,
    /// Checking every byte, every write and the node of every page.
    Checking,
}

/// Runs one measured migration.
///
/// `progress`, when given, is told `0` just before the migration starts (after the
/// region is filled and the yardsticks measured), then the bytes moved so far as the
/// migration goes.
///
/// # Errors
/// Invalid configurations and failures to allocate the region; failures of the migration
/// itself are reported in the [`MoveReport`].
pub fn run_move(engine: &Engine, cfg: &MoveConfig, progress: Option<Progress>) -> Result<MoveReport> {
    run_move_observed(engine, cfg, progress, &|_| {})
}

/// [`run_move`], telling `phase` as each [`Phase`] begins.
///
/// # Errors
/// As [`run_move`].
pub fn run_move_observed(
    engine: &Engine,
    cfg: &MoveConfig,
    progress: Option<Progress>,
    phase: &dyn Fn(Phase),
) -> Result<MoveReport> {
    let targets = cfg.targets();
    for &node in &targets {
        numa::check_node(node)?;
    }
    // The copy kernels measured before anything is timed.
    let _ = copy::kernels();
    phase(Phase::Filling);
    let region = Region::new(cfg.size, cfg.folio_size, cfg.from_node)?;
    workload::fill(&region, cfg.seed);
    if cfg.measure_memcpy {
        phase(Phase::Yardsticks);
    }
    let yardsticks = measure_yardsticks(&region, cfg)?;
    let thp = if cfg.folio_size >= pagemig::sys::HPAGE_SIZE { ThpAdvice::Huge } else { ThpAdvice::NoHuge };
    let reserve_started = Instant::now();
    if let Some(bytes) = cfg.reserve {
        phase(Phase::Reserving);
        // Each node gets its share; a destination keeps its source's offset in a 2 MiB
        // page: up to 2 MiB of a reserve is skipped to place the first one.
        let share = bytes.div_ceil(targets.len());
        for &node in &targets {
            engine.reserve(node, share + pagemig::sys::HPAGE_SIZE, thp)?;
        }
        if !engine.wait_reserved(Duration::from_secs(300)) {
            for &node in &targets {
                let _ = engine.reserve(node, 0, thp);
            }
            return Err(Error::Invalid(format!("the reserve of {bytes} bytes was not prepared within 300 s")));
        }
    }
    let reserve_ms = reserve_started.elapsed().as_secs_f64() * 1e3;
    let start_hook = progress.clone();
    let folios = region.folios();
    // One call per target node, with that node's folios (every folio for one node).
    let groups: Vec<(u32, Vec<pagemig::Folio<'_>>)> = targets
        .iter()
        .enumerate()
        .map(|(k, &node)| (node, folios.iter().skip(k).step_by(targets.len()).copied().collect()))
        .collect();
    phase(Phase::Migrating);
    let (result, log) = workload::with_timed_writers(&region, cfg.writers, || {
        if let Some(p) = &start_hook {
            p(0);
        }
        let mut total = MigrateStats::default();
        let mut first_error = None;
        let mut done_before = 0u64;
        for (node, group) in &groups {
            let mut opts = MigrateOptions::default().max_batch_pages(cfg.batch_pages);
            opts.progress = progress.clone().map(|p| -> Progress { Arc::new(move |done| p(done_before + done)) });
            match engine.migrate_pages(group, *node, cfg.reason, cfg.mode, &opts) {
                Ok(s) => total.merge(&s),
                Err(Error::Partial { stats, first, .. }) => {
                    total.merge(&stats);
                    first_error.get_or_insert_with(|| first.to_string());
                }
                Err(e) => return Err(e),
            }
            done_before += group.iter().map(|f| f.size() as u64).sum::<u64>();
        }
        Ok((total, first_error))
    });
    if cfg.reserve.is_some() {
        // What the calls did not take goes back.
        for &node in &targets {
            engine.reserve(node, 0, thp)?;
        }
    }
    let (stats, error) = result?;
    phase(Phase::Checking);
    let Checked { verify, placement, misplaced_pages } = check(&region, cfg, &log)?;
    let gbps = stats.gbps();
    let critical = stats.critical_path_gbps();
    Ok(MoveReport {
        bytes: cfg.size as u64,
        folio_size: cfg.folio_size as u64,
        folios: folios.len() as u64,
        to_node: cfg.to_node,
        to_nodes: cfg.targets(),
        batch_pages: cfg.batch_pages as u64,
        reason: cfg.reason,
        writers: cfg.writers as u64,
        migrator: pagemig::offload::registry().active_name().unwrap_or_else(|| "cpu".into()),
        offloaded_folios: stats.offloaded_folios,
        fallback_folios: stats.fallback_folios,
        succeeded_folios: stats.succeeded_folios,
        failed_folios: stats.failed_folios,
        error,
        mismatched_bytes: verify.mismatched_bytes,
        writes: log.writes,
        lost_writes: verify.lost_writes,
        writer_stalls: log.stalls.clone(),
        placement_ok: misplaced_pages == 0,
        misplaced_pages,
        placement,
        gbps,
        critical_path_gbps: Some(critical),
        memcpy_gbps: yardsticks.memcpy.median_gbps,
        uffdio_copy_gbps: yardsticks.uffdio_copy.median_gbps,
        yardsticks,
        ratio: ratio(gbps, yardsticks.memcpy.median_gbps),
        critical_path_ratio: (yardsticks.memcpy.median_gbps > 0.0).then(|| critical / yardsticks.memcpy.median_gbps),
        page_errors: Default::default(),
        first_folio_us: stats.first_folio_median().map_or(0.0, |d| d.as_secs_f64() * 1e6),
        first_folio_p99_us: stats.first_folio_quantile(0.99).map_or(0.0, |d| d.as_secs_f64() * 1e6),
        phases_us: Phases {
            prepare: us(stats.prepare_ns),
            unmap: us(stats.unmap_ns),
            copy: us(stats.copy_ns),
            r#move: us(stats.move_ns),
            total: us(stats.total_ns),
        },
        reserve_bytes: cfg.reserve.unwrap_or(0) as u64,
        reserve_ms: if cfg.reserve.is_some() { reserve_ms } else { 0.0 },
        copy_kernels: copy::kernels(),
        stats,
    })
}

/// The name [`MoveReport::migrator`] gives the kernel's `move_pages(2)`.
pub const KERNEL: &str = "kernel";

/// Addresses handed to one `move_pages(2)` call: the progress callback hears from each.
const KERNEL_CALL_ADDRESSES: usize = 16384;

/// The node the kernel's migration of `cfg` starts from: `cfg.from_node`, or the first
/// memory node.
///
/// # Errors
/// [`Error::Invalid`] when it is the target node: `move_pages(2)` to the node a page is
/// already on copies nothing, so there is no migration to measure.
pub fn kernel_source_node(cfg: &MoveConfig) -> Result<u32> {
    let nodes = numa::memory_nodes()?;
    let from = match cfg.from_node {
        Some(n) => n,
        None => *nodes.first().ok_or_else(|| Error::Invalid("no NUMA node with memory".into()))?,
    };
    if cfg.targets().contains(&from) {
        return Err(Error::Invalid(format!(
            "the kernel's move_pages(2) to the node a page is already on copies nothing: migrating node {from} to \
             node {from} measures no migration; the kernel migrator needs a source node other than the target \
             (this machine has {} memory node{}: {nodes:?})",
            nodes.len(),
            if nodes.len() == 1 { "" } else { "s" }
        )));
    }
    Ok(from)
}

/// A readable name for the errno `code` of a `move_pages(2)` status.
pub fn errno_name(code: i32) -> String {
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        _ => return format!("errno {code}"),
    };
    name.into()
}

/// The addresses `move_pages(2)` should be given for `region`, and the base pages each one
/// stands for: one per 2 MiB folio when the whole region is backed by transparent huge
/// pages (the kernel moves a huge page whole from its first address and reports `EBUSY`
/// for the next one, which it finds isolated), one per base page otherwise.
fn kernel_addresses(region: &Region) -> (Vec<usize>, usize) {
    let huge = region.folio_size() == pagemig::sys::HPAGE_SIZE
        && region.anon_huge_bytes().is_ok_and(|b| b == region.len() as u64);
    let step = if huge { pagemig::sys::HPAGE_SIZE } else { pagemig::sys::PAGE_SIZE };
    ((region.addr()..region.addr() + region.len()).step_by(step).collect(), step / pagemig::sys::PAGE_SIZE)
}

/// Runs one measured migration of a fresh region by the kernel's `move_pages(2)` instead of
/// pagemig, with the same fill, yardsticks, writers and checks as [`run_move`]: the
/// kernel's own migration in the same run, the RFC's "vanilla" baseline.
///
/// The time is the caller's wall clock over the whole sequence of `move_pages` calls
/// (each of up to 16384 addresses, each told to go to the node of its folio,
/// [`MoveConfig::target_of`]); every status entry must be that node, and those that are not are counted by outcome in
/// [`MoveReport::page_errors`]. `cfg.batch_pages`, `cfg.reason` and `cfg.mode` do not
/// apply (the kernel decides); `progress` is told `0` at the start and the bytes asked
/// for so far after each call.
///
/// # Errors
/// [`Error::Invalid`] when the source node is the target ([`kernel_source_node`]),
/// [`Error::UnknownNode`] for a node without memory, and failures to allocate the region;
/// failures of the migration itself are reported in the [`MoveReport`].
pub fn run_kernel_move(cfg: &MoveConfig, progress: Option<Progress>) -> Result<MoveReport> {
    run_kernel_move_observed(cfg, progress, &|_| {})
}

/// [`run_kernel_move`], telling `phase` as each [`Phase`] begins.
///
/// # Errors
/// As [`run_kernel_move`].
pub fn run_kernel_move_observed(
    cfg: &MoveConfig,
    progress: Option<Progress>,
    phase: &dyn Fn(Phase),
) -> Result<MoveReport> {
    for node in cfg.targets() {
        numa::check_node(node)?;
    }
    let from = kernel_source_node(cfg)?;
    phase(Phase::Filling);
    let region = Region::new(cfg.size, cfg.folio_size, Some(from))?;
    workload::fill(&region, cfg.seed);
    if cfg.measure_memcpy {
        phase(Phase::Yardsticks);
    }
    let yardsticks = measure_yardsticks(&region, cfg)?;
    let (addresses, pages_per_address) = kernel_addresses(&region);
    // Each address goes to the node of its folio.
    let nodes: Vec<i32> =
        addresses.iter().map(|&a| cfg.target_of((a - region.addr()) / cfg.folio_size) as i32).collect();
    let mut status = vec![i32::MIN; addresses.len()];
    phase(Phase::Migrating);
    let ((elapsed, calls, first_error), log) = workload::with_timed_writers(&region, cfg.writers, || {
        let mut first_error = None;
        let mut calls = 0u64;
        if let Some(p) = &progress {
            p(0);
        }
        let started = Instant::now();
        for (i, (chunk, out)) in
            addresses.chunks(KERNEL_CALL_ADDRESSES).zip(status.chunks_mut(KERNEL_CALL_ADDRESSES)).enumerate()
        {
            calls += 1;
            let targets = &nodes[i * KERNEL_CALL_ADDRESSES..][..chunk.len()];
            if let Err(e) = pagemig::sys::move_pages(chunk, Some(targets), out) {
                // The call as a whole failed: none of its pages is known to have moved.
                out.fill(-e.raw_os_error());
                first_error.get_or_insert_with(|| format!("move_pages: {e}"));
            }
            if let Some(p) = &progress {
                let done = (i * KERNEL_CALL_ADDRESSES + chunk.len()) * pages_per_address * pagemig::sys::PAGE_SIZE;
                p(done as u64);
            }
        }
        (started.elapsed(), calls, first_error)
    });
    let mut page_errors = std::collections::BTreeMap::new();
    for (&s, _) in status.iter().zip(&nodes).filter(|(s, n)| s != n) {
        let outcome = if s < 0 { errno_name(-s) } else { format!("on node {s}") };
        *page_errors.entry(outcome).or_insert(0u64) += 1;
    }
    phase(Phase::Checking);
    let moved: Vec<bool> = status.iter().zip(&nodes).map(|(s, n)| s == n).collect();
    let moved_addresses = moved.iter().filter(|&&m| m).count();
    let folio_pages = cfg.folio_size / pagemig::sys::PAGE_SIZE;
    let addresses_per_folio = (folio_pages / pages_per_address).max(1);
    let folios = region.len() / cfg.folio_size;
    let succeeded_folios = moved.chunks(addresses_per_folio).filter(|folio| folio.iter().all(|&m| m)).count() as u64;
    let error = first_error.or_else(|| {
        page_errors.iter().next().map(|(what, n)| format!("move_pages left {n} addresses unmoved: {what}"))
    });
    let Checked { verify, placement, misplaced_pages } = check(&region, cfg, &log)?;
    let pages = region.len() / pagemig::sys::PAGE_SIZE;
    let moved_pages = (moved_addresses * pages_per_address) as u64;
    let huge = pages_per_address > 1;
    let mut stats = MigrateStats::default();
    stats.folios = folios as u64;
    stats.succeeded_folios = succeeded_folios;
    stats.failed_folios = folios as u64 - succeeded_folios;
    stats.succeeded_pages = moved_pages;
    stats.failed_pages = pages as u64 - moved_pages;
    stats.thp_succeeded = if huge { moved_addresses as u64 } else { 0 };
    stats.thp_failed = if huge { (addresses.len() - moved_addresses) as u64 } else { 0 };
    stats.bytes = moved_pages * pagemig::sys::PAGE_SIZE as u64;
    stats.batches = calls;
    stats.total_ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    let gbps = stats.gbps();
    Ok(MoveReport {
        bytes: cfg.size as u64,
        folio_size: cfg.folio_size as u64,
        folios: folios as u64,
        to_node: cfg.to_node,
        to_nodes: cfg.targets(),
        batch_pages: cfg.batch_pages as u64,
        reason: cfg.reason,
        writers: cfg.writers as u64,
        migrator: KERNEL.into(),
        offloaded_folios: 0,
        fallback_folios: 0,
        succeeded_folios,
        failed_folios: stats.failed_folios,
        error,
        mismatched_bytes: verify.mismatched_bytes,
        writes: log.writes,
        lost_writes: verify.lost_writes,
        writer_stalls: log.stalls.clone(),
        placement_ok: misplaced_pages == 0,
        misplaced_pages,
        placement,
        gbps,
        critical_path_gbps: None,
        memcpy_gbps: yardsticks.memcpy.median_gbps,
        uffdio_copy_gbps: yardsticks.uffdio_copy.median_gbps,
        yardsticks,
        ratio: ratio(gbps, yardsticks.memcpy.median_gbps),
        critical_path_ratio: None,
        page_errors,
        first_folio_us: 0.0,
        first_folio_p99_us: 0.0,
        phases_us: Phases { prepare: 0.0, unmap: 0.0, copy: 0.0, r#move: 0.0, total: us(stats.total_ns) },
        reserve_bytes: 0,
        reserve_ms: 0.0,
        copy_kernels: copy::kernels(),
        stats,
    })
}

/// What a measured migration holds at its peak, by part, in bytes ([`peak_memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeakMemory {
    /// The region itself.
    pub region: u64,
    /// The yardsticks' two buffers (held while they are measured, freed before the
    /// migration; the `UFFDIO_COPY` fill maps one buffer after they are freed).
    pub yardsticks: u64,
    /// Destinations and old pages held at once during the migration: the reserve prepared
    /// ahead, or a whole batch's destinations, or with small batches a batch plus the
    /// destination pool and the old pages waiting to be freed.
    pub migration: u64,
}

impl PeakMemory {
    /// The most held at once: the region, and the larger of the yardsticks' buffers and the
    /// migration's destinations (one is freed before the other is allocated).
    pub fn total(&self) -> u64 {
        self.region + self.yardsticks.max(self.migration)
    }
}

/// The peak memory a run of `cfg` needs, derived from what [`run_move`] allocates: the
/// region; then the yardsticks' two buffers of [`yardstick_bytes`] (freed before the
/// migration); then, during the migration, the reserve (`cfg.reserve`, plus up to 2 MiB
/// skipped per node), or the destinations of a batch that covers the whole region
/// (populated before its first copy), or with smaller batches one batch plus the old
/// pages waiting for the reaper ([`pagemig::migrate::DEFAULT_REAPER_BACKLOG`]) (the
/// destination pool populates only what a batch takes, or the reserve); never more than the
/// region's size, since each destination replaces a source page.
pub fn peak_memory(cfg: &MoveConfig) -> PeakMemory {
    let size = cfg.size as u64;
    let yardsticks = if cfg.measure_memcpy { 2 * yardstick_bytes(cfg.size, cfg.folio_size) as u64 } else { 0 };
    let batch = (cfg.batch_pages as u64).saturating_mul(pagemig::sys::PAGE_SIZE as u64);
    let migration = match cfg.reserve {
        Some(bytes) => bytes as u64 + (cfg.targets().len() * pagemig::sys::HPAGE_SIZE) as u64,
        None if batch >= size => size,
        None => (batch + pagemig::migrate::DEFAULT_REAPER_BACKLOG as u64).min(size),
    };
    PeakMemory { region: size, yardsticks, migration }
}

/// Memory this process may still take, in bytes, and where the figure comes from: the
/// smaller of `MemAvailable` in /proc/meminfo and what the memory cgroup leaves
/// (`memory.max - memory.current` with cgroup v2, `memory.limit_in_bytes -
/// memory.usage_in_bytes` with v1, for the process's cgroup and each one above it).
///
/// A node's own free memory is not the bound: a machine or a VM may report nodes smaller
/// than the memory a process can use.
pub fn available_memory() -> (u64, String) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let mut best = (meminfo.unwrap_or(u64::MAX), "MemAvailable in /proc/meminfo".to_string());
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let (root, limit, usage) = if id == "0" && controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes")
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(root).join(path.trim_start_matches('/'));
        loop {
            if let (Some(max), Some(current)) = (read(&dir.join(limit)), read(&dir.join(usage))) {
                let left = max.saturating_sub(current);
                if left < best.0 {
                    best = (left, format!("{} - {} of cgroup {}", limit, usage, dir.display()));
                }
            }
            if dir.as_os_str().len() <= root.len() || !dir.pop() {
                break;
            }
        }
    }
    best
}

/// Refuses a run of `cfg` whose peak memory ([`peak_memory`]) exceeds what the process may
/// take ([`available_memory`]), before anything is allocated: a run past it ends in the
/// kernel's OOM killer, after filling memory for many seconds.
///
/// `reserve_hint` tells, when the run prepares a reserve, how the command drops it.
///
/// # Errors
/// [`Error::Invalid`] naming the memory needed and available and how to make the run fit.
pub fn check_memory(cfg: &MoveConfig, reserve_hint: &str) -> Result<()> {
    let peak = peak_memory(cfg);
    let (available, source) = available_memory();
    if peak.total() <= available {
        return Ok(());
    }
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let fits = available.saturating_sub(YARDSTICK_MAX_BYTES as u64 * 2 + (128 << 20));
    Err(Error::Invalid(format!(
        "a run of --size {} needs about {} of memory at its peak (the region {}, plus {} of {}) but {} is \
         available ({source}); use a smaller --size (about {} fits here){}",
        gib(cfg.size as u64),
        gib(peak.total()),
        gib(peak.region),
        gib(peak.yardsticks.max(peak.migration)),
        if peak.migration >= peak.yardsticks { "destinations during the migration" } else { "yardstick buffers" },
        gib(available),
        gib(if cfg.reserve.is_some() || peak.migration == peak.region { fits / 2 } else { fits }),
        if cfg.reserve.is_some() { format!(", {reserve_hint}") } else { String::new() },
    )))
}

/// The most writer threads a run takes: four per online CPU. Writers are busy loops; past a
/// few per CPU they only take turns on the CPUs (the migration with them), and a count in
/// the thousands takes minutes to start and stalls the machine.
pub fn max_writers() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Refuses more than [`max_writers`] writers.
///
/// # Errors
/// [`Error::Invalid`] naming the bound.
pub fn check_writers(writers: usize) -> Result<()> {
    let max = max_writers();
    if writers > max {
        return Err(Error::Invalid(format!(
            "--writers {writers} is more than this machine runs usefully: at most {max} (4 per online CPU, {} \
             CPUs); writers are busy threads, more only take turns with the migration",
            max / 4
        )));
    }
    Ok(())
}

/// The most `mtcopy` threads a run takes: 4 per online CPU, and the migrator's own 64. A
/// copy is bound by memory bandwidth; threads beyond the CPUs only take turns.
pub fn max_copy_threads() -> usize {
    max_writers().min(pagemig::migrators::mtcopy::MAX_THREADS)
}

/// The most `dcbm` channels a batch takes: 16, the bound of the migrator's algorithm
/// (`min(nr_dma_chan, folios, 16)`); the channels are the DMA device's, made once.
pub const MAX_CHANNELS: usize = 16;

/// Refuses `--threads` and `--channels` outside 1 ..= [`max_copy_threads`] and
/// 1 ..= [`MAX_CHANNELS`].
///
/// # Errors
/// [`Error::Invalid`] naming the bound and why.
pub fn check_copy_threads(threads: Option<usize>, channels: Option<usize>) -> Result<()> {
    let max = max_copy_threads();
    if let Some(t) = threads.filter(|&t| !(1..=max).contains(&t)) {
        return Err(Error::Invalid(format!(
            "--threads {t} is outside 1 … {max} (4 per online CPU, at most {}): a copy is bound by memory \
             bandwidth, and threads beyond the CPUs only take turns",
            pagemig::migrators::mtcopy::MAX_THREADS
        )));
    }
    if let Some(c) = channels.filter(|&c| !(1..=MAX_CHANNELS).contains(&c)) {
        return Err(Error::Invalid(format!(
            "--channels {c} is outside 1 … {MAX_CHANNELS}: dcbm spreads a batch over at most {MAX_CHANNELS} DMA \
             channels"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use pagemig::sys::{Errno, PAGE_SIZE};

    fn node() -> u32 {
        numa::memory_nodes().unwrap()[0]
    }

    fn config(size: usize, folio_size: usize, to_node: u32) -> MoveConfig {
        MoveConfig {
            size,
            folio_size,
            from_node: Some(node()),
            to_node,
            to_nodes: Vec::new(),
            batch_pages: 512,
            reason: Reason::Syscall,
            mode: Mode::Sync,
            writers: 0,
            seed: 7,
            measure_memcpy: true,
            reserve: None,
        }
    }

    #[test]
    fn uffdio_copy_fills_a_fresh_mapping_with_the_same_bytes_on_the_node() {
        let target = node();
        let region = Region::new(4 << 20, PAGE_SIZE, Some(target)).unwrap();
        workload::fill(&region, 42);
        let copied = match pagemig::sys::uffd::copy_into_new_mapping(region.addr(), region.len(), Some(target)) {
            // Kernels without UFFDIO_MOVE (before 6.8) cannot run pagemig at all.
            Err(Errno::OPNOTSUPP) | Err(Errno::PERM) => return,
            r => r.unwrap(),
        };
        let m = &copied.mapping;
        assert_ne!(m.addr(), region.addr());
        assert_eq!(m.len(), region.len());
        for i in 0..region.words() {
            let (got, want) = (m.word(i).unwrap().load(Ordering::Relaxed), workload::pattern_word(42, i));
            assert_eq!(got, want, "word {i} of the copy");
        }
        // The source is as it was, and every page of the copy is present on the node.
        assert!(workload::verify(&region, 42, &Default::default()).ok());
        let placement = numa::placement(m.addr(), m.len()).unwrap();
        assert_eq!(placement.get(&(target as i32)), Some(&(region.len() / PAGE_SIZE)), "{placement:?}");
    }

    #[test]
    #[expect(unsafe_code, reason = "unmapping the test's own reservation")]
    fn uffdio_copy_refuses_bad_lengths_and_unmapped_sources() {
        use pagemig::sys::uffd::copy_into_new_mapping;
        let region = Region::new(64 << 10, PAGE_SIZE, None).unwrap();
        assert_eq!(copy_into_new_mapping(region.addr(), 0, None).unwrap_err(), Errno::INVAL);
        assert_eq!(copy_into_new_mapping(region.addr(), 100, None).unwrap_err(), Errno::INVAL);
        let hole = pagemig::sys::reserve(64 << 10).unwrap();
        match copy_into_new_mapping(hole, 64 << 10, None) {
            Err(Errno::OPNOTSUPP) | Err(Errno::PERM) => {}
            r => assert_eq!(r.unwrap_err(), Errno::FAULT),
        }
        // SAFETY: the reservation is ours and nothing uses it.
        unsafe { pagemig::sys::munmap(hole, 64 << 10).unwrap() };
    }

    #[test]
    fn placement_is_checked_against_each_folios_node() {
        let n = node();
        let region = Region::new(1 << 20, 64 << 10, Some(n)).unwrap();
        workload::fill(&region, 7);
        let log = workload::WriteLog::default();
        // Left where it is, the region is right for its node, and half wrong for a list
        // that sends every other folio elsewhere.
        let cfg = MoveConfig { to_nodes: vec![n], ..config(1 << 20, 64 << 10, n) };
        assert_eq!(check(&region, &cfg, &log).unwrap().misplaced_pages, 0);
        let elsewhere = MoveConfig { to_nodes: vec![n, n + 1], ..cfg.clone() };
        assert_eq!(elsewhere.target_of(0), n);
        assert_eq!(elsewhere.target_of(3), n + 1);
        assert_eq!(check(&region, &elsewhere, &log).unwrap().misplaced_pages, (1 << 20) / PAGE_SIZE as u64 / 2);
        let checked = check(&region, &elsewhere, &log).unwrap();
        assert_eq!(checked.placement.get(&(n as i32)), Some(&((1 << 20) / PAGE_SIZE)));
        assert!(checked.verify.ok());
    }

    #[test]
    fn yardsticks_are_measured_only_when_asked_for() {
        let cfg = config(2 << 20, PAGE_SIZE, node());
        let region = Region::new(cfg.size, cfg.folio_size, cfg.from_node).unwrap();
        workload::fill(&region, cfg.seed);
        let none = measure_yardsticks(&region, &MoveConfig { measure_memcpy: false, ..cfg.clone() }).unwrap();
        assert_eq!(none, Yardsticks::default());
        match measure_yardsticks(&region, &cfg) {
            Err(e) if matches!(e.errno(), Errno::OPNOTSUPP | Errno::PERM) => {}
            r => {
                let y = r.unwrap();
                assert!(y.memcpy.median_gbps > 0.0 && y.uffdio_copy.median_gbps > 0.0, "{y:?}");
                assert_eq!((y.memcpy.reps, y.uffdio_copy.reps), (YARDSTICK_REPS as u32, YARDSTICK_REPS as u32));
                assert!(y.memcpy.min_gbps <= y.memcpy.median_gbps && y.memcpy.median_gbps <= y.memcpy.max_gbps);
            }
        }
    }

    #[test]
    fn the_kernel_refuses_a_move_to_the_node_pages_are_on() {
        let n = node();
        let err = run_kernel_move(&config(2 << 20, PAGE_SIZE, n), None).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
        assert!(err.to_string().contains("copies nothing"), "{err}");
        let err = kernel_source_node(&MoveConfig { from_node: None, ..config(2 << 20, PAGE_SIZE, n) });
        if numa::memory_nodes().unwrap().len() == 1 {
            assert!(err.unwrap_err().to_string().contains("1 memory node"));
        }
        assert_eq!(errno_name(libc::EBUSY), "EBUSY");
        assert_eq!(errno_name(9999), "errno 9999");
    }

    #[test]
    fn the_peak_is_the_region_plus_the_larger_of_the_yardsticks_and_the_destinations() {
        const GIB: usize = 1 << 30;
        const MIB: u64 = 1 << 20;
        let cfg = config(GIB, PAGE_SIZE, 0);
        // Default batch: the capped yardstick buffers are the larger part.
        let peak = peak_memory(&cfg);
        assert_eq!(peak, PeakMemory { region: GIB as u64, yardsticks: 512 * MIB, migration: 2 * MIB + 64 * MIB });
        assert_eq!(peak.total(), GIB as u64 + 512 * MIB);
        // A batch as large as the region, or a reserve of it: the whole size again.
        let whole = MoveConfig { batch_pages: GIB / PAGE_SIZE, ..cfg.clone() };
        assert_eq!(peak_memory(&whole).total(), 2 * GIB as u64);
        let reserved = MoveConfig { reserve: Some(GIB), ..cfg.clone() };
        assert_eq!(peak_memory(&reserved).total(), 2 * GIB as u64 + 2 * MIB);
        // A small region: everything is the region's size at most.
        let small = config(16 << 20, PAGE_SIZE, 0);
        assert_eq!(peak_memory(&small).total(), 3 * (16 << 20));
        assert_eq!(yardstick_bytes(16 << 20, PAGE_SIZE), 16 << 20);
        assert_eq!(yardstick_bytes(GIB, 2 << 20), YARDSTICK_MAX_BYTES);
        // Refused before allocating, with both figures named.
        let err = check_memory(&config(1 << 50, PAGE_SIZE, 0), "").unwrap_err().to_string();
        assert!(err.contains("needs about 1048576.50 GiB") && err.contains("is available"), "{err}");
        assert!(check_memory(&small, "").is_ok());
        assert!(check_writers(max_writers()).is_ok());
        assert!(check_writers(100_000).unwrap_err().to_string().contains("at most"));
        assert!(check_copy_threads(Some(max_copy_threads()), Some(MAX_CHANNELS)).is_ok());
        assert!(check_copy_threads(Some(100_000), None).unwrap_err().to_string().contains("outside 1 …"));
        assert!(check_copy_threads(None, Some(17)).unwrap_err().to_string().contains("at most 16 DMA"));
        assert!(check_copy_threads(Some(0), None).is_err());
    }

    #[test]
    fn a_rate_is_the_median_of_its_repetitions_with_its_spread() {
        let ms = Duration::from_millis;
        let r = Rate::of(1_000_000_000, &[ms(500), ms(1000), ms(250), ms(400), ms(1000)]);
        assert_eq!((r.median_gbps, r.min_gbps, r.max_gbps, r.reps), (2.0, 1.0, 4.0, 5));
        assert_eq!(r.describe(), "2.00 GB/s (median of 5, spread ±75 %)");
        assert_eq!(Rate::default().describe(), "-");
    }
}
