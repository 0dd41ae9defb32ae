//! What a bench run measured: every migration as a [`Measurement`], grouped into the cells
//! of the three experiments, each cell summarised over the repetitions that passed every
//! check.

use std::fmt;

use serde::Serialize;

use crate::experiment::{MoveReport, Phases};
use crate::report::machine::Machine;
use crate::report::runner::BenchConfig;
use crate::report::seed::Reference;
use pagemig::migrate::MigrateStats;

/// Who copies a batch: a migrator made active with [`pagemig::attr::select_migrator`], or
/// the plain `memcpy` a migration is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum MigratorSpec {
    /// No migrator registered: the core's serial `folios_copy`.
    Cpu,
    /// The serial CPU copy with a prepared reserve ([`pagemig::Engine::reserve`]): the
    /// destinations are prepared on the reserve thread before the call, which is timed as
    /// the caller's wall clock like every other row.
    #[serde(rename = "cpu_reserved")]
    CpuReserved,
    /// The multi-threaded CPU copy with this many threads.
    Mtcopy {
        /// Copy threads.
        threads: usize,
    },
    /// The DMA migrator with this many channels.
    Dcbm {
        /// DMA channels per batch.
        channels: usize,
    },
    /// A plain copy of the same bytes between prepared buffers: not a migration, the
    /// physical limit one is measured against.
    Memcpy,
    /// The kernel's own `move_pages(2)` of the same region, from one node to another: the
    /// RFC's "vanilla" baseline, measured in the same run.
    Kernel,
    /// `UFFDIO_COPY` of the same bytes into a fresh mapping bound to the target node: not a
    /// migration, the user-space stand-in for the kernel's allocate-and-copy (base pages).
    #[serde(rename = "uffdio_copy")]
    UffdioCopy,
}

impl MigratorSpec {
    /// The migrator's name as [`pagemig::attr::select_migrator`] takes it.
    pub fn name(&self) -> &'static str {
        match self {
            MigratorSpec::Cpu => "cpu",
            MigratorSpec::CpuReserved => "cpu_reserved",
            MigratorSpec::Mtcopy { .. } => "mtcopy",
            MigratorSpec::Dcbm { .. } => "dcbm",
            MigratorSpec::Memcpy => "memcpy",
            MigratorSpec::Kernel => "kernel",
            MigratorSpec::UffdioCopy => "uffdio_copy",
        }
    }

    /// Whether this row is a yardstick measured next to a migration (`memcpy`,
    /// `UFFDIO_COPY`), not a migration.
    pub fn is_yardstick(&self) -> bool {
        matches!(self, MigratorSpec::Memcpy | MigratorSpec::UffdioCopy)
    }

    /// Makes this migrator the active one.
    ///
    /// # Errors
    /// As [`pagemig::attr::select_migrator`]; [`pagemig::Error::Invalid`] for the kernel and
    /// the yardsticks, which are not pagemig's migrators.
    pub fn select(&self) -> pagemig::Result<()> {
        match *self {
            MigratorSpec::Cpu | MigratorSpec::CpuReserved => pagemig::attr::select_migrator("cpu", None, None),
            MigratorSpec::Mtcopy { threads } => pagemig::attr::select_migrator("mtcopy", None, Some(threads)),
            MigratorSpec::Dcbm { channels } => pagemig::attr::select_migrator("dcbm", Some(channels), None),
            MigratorSpec::Memcpy | MigratorSpec::UffdioCopy | MigratorSpec::Kernel => {
                Err(pagemig::Error::Invalid(format!("{self} is a baseline, not one of pagemig's migrators")))
            }
        }
    }
}

impl fmt::Display for MigratorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigratorSpec::Cpu => write!(f, "cpu"),
            MigratorSpec::CpuReserved => write!(f, "cpu, reserved"),
            MigratorSpec::Mtcopy { threads } => write!(f, "mtcopy {threads} thr"),
            MigratorSpec::Dcbm { channels } => write!(f, "dcbm {channels} ch"),
            MigratorSpec::Memcpy => write!(f, "memcpy"),
            MigratorSpec::Kernel => write!(f, "kernel move_pages"),
            MigratorSpec::UffdioCopy => write!(f, "UFFDIO_COPY"),
        }
    }
}

/// Mean, spread and extremes of a set of values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Values summarised.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one value).
    pub stddev: f64,
    /// Median.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Summary {
    /// Summarises `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Some(Summary { n, mean, stddev: var.sqrt(), median, min: sorted[0], max: sorted[n - 1] })
    }
}

/// Spread above which a cell is flagged as noisy: a sample standard deviation above this
/// share of the mean. A quarter of the mean is wider than any difference between two
/// configurations the report's conclusions would rest on, and more than a quiet machine
/// shows at the default repetitions.
pub const NOISY_SPREAD: f64 = 0.25;

impl Summary {
    /// Whether the values spread too widely to be read as one figure: at least two of them,
    /// and a standard deviation above [`NOISY_SPREAD`] of the mean.
    pub fn is_noisy(&self) -> bool {
        self.n >= 2 && self.mean > 0.0 && self.stddev > NOISY_SPREAD * self.mean
    }
}

/// The `q` quantile (0..=1) of `values` by the nearest rank, as
/// [`MigrateStats::first_folio_quantile`] takes it; `None` for no values.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize])
}

/// One verified migration (or one plain copy, for the `memcpy` row).
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// Repetition number, from 0.
    pub rep: usize,
    /// Whether the migration ran and every folio moved, every byte and write survived and
    /// every page is where it should be.
    pub ok: bool,
    /// What went wrong, when not `ok`.
    pub error: Option<String>,
    /// Bytes migrated.
    pub bytes: u64,
    /// Folios migrated.
    pub folios: u64,
    /// End-to-end throughput: the whole migration a caller waits for, destination
    /// preparation included, GB/s.
    pub gbps: f64,
    /// Throughput of the critical path, excluding destination preparation, GB/s (`None`
    /// for the kernel's `move_pages(2)`, whose calls cannot be split).
    pub critical_path_gbps: Option<f64>,
    /// A plain copy of the same bytes in the same run, GB/s, where measured.
    pub memcpy_gbps: Option<f64>,
    /// `UFFDIO_COPY` of the same bytes into a fresh mapping on the target node, same run,
    /// GB/s, where measured.
    pub uffdio_copy_gbps: Option<f64>,
    /// Median first-folio latency over the call's batches, µs.
    pub first_folio_us: f64,
    /// 99th percentile of first-folio latency over the call's batches, µs.
    pub first_folio_p99_us: f64,
    /// Folios that did not migrate.
    pub failed_folios: u64,
    /// Bytes that differ from what was written.
    pub mismatched_bytes: u64,
    /// Stores made by writer threads during the migration.
    pub writes: u64,
    /// Writer slots not holding the last value stored.
    pub lost_writes: u64,
    /// Per writer, how long its stores waited on the migration (`--writers`; empty without).
    pub writer_stalls: Vec<pagemig::workload::Stalls>,
    /// Whether every page is on the node it should be on.
    pub placement_ok: bool,
    /// Batches run.
    pub batches: u64,
    /// Runs moved with one `mremap` each.
    pub runs: u64,
    /// Folios copied by the default CPU batch copy.
    pub batch_copied_folios: u64,
    /// Folios copied by the active migrator.
    pub offloaded_folios: u64,
    /// Folios whose batch copy failed or was declined, copied one by one instead.
    pub fallback_folios: u64,
    /// Time per phase, µs.
    pub phases_us: Phases,
    /// First-folio latency of every batch, ns (pooled across repetitions for the sweep's
    /// quantiles; not written out).
    #[serde(skip)]
    pub first_folio_ns: Vec<u64>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// The phase times of `stats`, µs.
pub fn phases_of(stats: &MigrateStats) -> Phases {
    Phases {
        prepare: us(stats.prepare_ns),
        unmap: us(stats.unmap_ns),
        copy: us(stats.copy_ns),
        r#move: us(stats.move_ns),
        total: us(stats.total_ns),
    }
}

/// Why checks failed, in words; `None` when all passed.
pub fn check_failures(failed_folios: u64, mismatched: u64, lost: u64, placement_ok: bool) -> Option<String> {
    let mut why = Vec::new();
    if failed_folios > 0 {
        why.push(format!("{failed_folios} folios not migrated"));
    }
    if mismatched > 0 {
        why.push(format!("{mismatched} bytes differ"));
    }
    if lost > 0 {
        why.push(format!("{lost} writes lost"));
    }
    if !placement_ok {
        why.push("pages on the wrong node".into());
    }
    (!why.is_empty()).then(|| why.join("; "))
}

impl Measurement {
    /// The measurement of one [`crate::experiment::run_move`].
    pub fn from_move(rep: usize, r: &MoveReport) -> Measurement {
        let checks = check_failures(r.failed_folios, r.mismatched_bytes, r.lost_writes, r.placement_ok);
        let error = match (&r.error, checks) {
            (Some(e), Some(c)) => Some(format!("{c} (first error: {e})")),
            (None, Some(c)) => Some(c),
            (Some(e), None) => Some(e.clone()),
            (None, None) => None,
        };
        Measurement {
            rep,
            ok: r.ok() && error.is_none(),
            error,
            bytes: r.stats.bytes,
            folios: r.folios,
            gbps: r.gbps,
            critical_path_gbps: r.critical_path_gbps,
            memcpy_gbps: (r.memcpy_gbps > 0.0).then_some(r.memcpy_gbps),
            uffdio_copy_gbps: (r.uffdio_copy_gbps > 0.0).then_some(r.uffdio_copy_gbps),
            first_folio_us: r.first_folio_us,
            first_folio_p99_us: r.first_folio_p99_us,
            failed_folios: r.failed_folios,
            mismatched_bytes: r.mismatched_bytes,
            writes: r.writes,
            lost_writes: r.lost_writes,
            writer_stalls: r.writer_stalls.clone(),
            placement_ok: r.placement_ok,
            batches: r.stats.batches,
            runs: r.stats.runs,
            batch_copied_folios: r.stats.batch_copied_folios,
            offloaded_folios: r.stats.offloaded_folios,
            fallback_folios: r.stats.fallback_folios,
            phases_us: r.phases_us.clone(),
            first_folio_ns: r.stats.first_folio_ns.clone(),
        }
    }

    /// A migration that could not run at all.
    pub fn failed(rep: usize, bytes: u64, error: String) -> Measurement {
        Measurement {
            rep,
            ok: false,
            error: Some(error),
            bytes,
            folios: 0,
            gbps: 0.0,
            critical_path_gbps: None,
            memcpy_gbps: None,
            uffdio_copy_gbps: None,
            first_folio_us: 0.0,
            first_folio_p99_us: 0.0,
            failed_folios: 0,
            mismatched_bytes: 0,
            writes: 0,
            lost_writes: 0,
            writer_stalls: Vec::new(),
            placement_ok: false,
            batches: 0,
            runs: 0,
            batch_copied_folios: 0,
            offloaded_folios: 0,
            fallback_folios: 0,
            phases_us: Phases { prepare: 0.0, unmap: 0.0, copy: 0.0, r#move: 0.0, total: 0.0 },
            first_folio_ns: Vec::new(),
        }
    }

    /// The `memcpy` row's measurement taken in the same run as `m`.
    pub fn memcpy_of(m: &Measurement) -> Option<Measurement> {
        Some(Measurement::yardstick(m, m.memcpy_gbps?))
    }

    /// The `UFFDIO_COPY` row's measurement taken in the same run as `m`.
    pub fn uffdio_copy_of(m: &Measurement) -> Option<Measurement> {
        Some(Measurement::yardstick(m, m.uffdio_copy_gbps?))
    }

    /// A yardstick measured next to `m`: nothing to prepare, so its critical path is the
    /// whole of it.
    fn yardstick(m: &Measurement, gbps: f64) -> Measurement {
        let mut copy = Measurement::failed(m.rep, m.bytes, String::new());
        copy.ok = true;
        copy.error = None;
        copy.folios = m.folios;
        copy.gbps = gbps;
        copy.critical_path_gbps = Some(gbps);
        copy.placement_ok = true;
        copy
    }
}

/// The repetitions of one configuration and their summary.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// Whether every repetition passed.
    pub ok: bool,
    /// Repetitions that failed.
    pub failed_reps: usize,
    /// End-to-end throughput over the repetitions that passed (the whole migration,
    /// destination preparation included), GB/s.
    pub gbps: Option<Summary>,
    /// Critical-path throughput, excluding destination preparation, over the repetitions
    /// that passed, GB/s (`None` for the kernel).
    pub critical_path_gbps: Option<Summary>,
    /// Folios the active migrator copied, over all repetitions that passed.
    pub offloaded_folios: u64,
    /// Folios that fell back to the per-folio CPU copy, over all repetitions that passed.
    pub fallback_folios: u64,
    /// The writers' stalls over every repetition that passed, the worst of each figure
    /// ([`pagemig::workload::Stalls::worst`]); `None` without writers.
    pub writer_stalls: Option<pagemig::workload::Stalls>,
    /// Every repetition.
    pub measurements: Vec<Measurement>,
}

impl Cell {
    /// Summarises `measurements`.
    pub fn of(measurements: Vec<Measurement>) -> Cell {
        let good: Vec<&Measurement> = measurements.iter().filter(|m| m.ok).collect();
        let failed_reps = measurements.len() - good.len();
        Cell {
            ok: failed_reps == 0 && !measurements.is_empty(),
            failed_reps,
            gbps: Summary::of(&good.iter().map(|m| m.gbps).collect::<Vec<_>>()),
            critical_path_gbps: Summary::of(&good.iter().filter_map(|m| m.critical_path_gbps).collect::<Vec<_>>()),
            offloaded_folios: good.iter().map(|m| m.offloaded_folios).sum(),
            fallback_folios: good.iter().map(|m| m.fallback_folios).sum(),
            writer_stalls: {
                let all: Vec<_> = good.iter().flat_map(|m| m.writer_stalls.iter().cloned()).collect();
                (!all.is_empty()).then(|| pagemig::workload::Stalls::worst(&all))
            },
            measurements,
        }
    }

    /// First-folio latency of every batch of every repetition that passed, µs.
    pub fn first_folio_us(&self) -> Vec<f64> {
        self.measurements
            .iter()
            .filter(|m| m.ok)
            .flat_map(|m| m.first_folio_ns.iter().map(|&ns| ns as f64 / 1e3))
            .collect()
    }
}

/// One row of the throughput table: a migrator, the kernel or a yardstick across folio
/// sizes.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRow {
    /// Who copied.
    pub migrator: MigratorSpec,
    /// One cell per folio size, in the order of [`Throughput::folio_sizes`].
    pub cells: Vec<Cell>,
}

/// Experiment 1: throughput by folio size.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// How long the experiment took, s.
    pub wall_s: f64,
    /// Bytes moved per migration.
    pub bytes: u64,
    /// Bound on a batch, in base pages.
    pub batch_pages: u64,
    /// Whether runs moved as their copies completed.
    pub pipelined: bool,
    /// The folio sizes of the columns, bytes.
    pub folio_sizes: Vec<u64>,
    /// One row per migrator, then the kernel's `move_pages(2)` where measured, then the
    /// yardsticks `memcpy` and `UFFDIO_COPY`.
    pub rows: Vec<ThroughputRow>,
    /// `[from, to]` nodes of the kernel row, when it was measured.
    pub kernel_nodes: Option<[u32; 2]>,
    /// Why the kernel row is absent, when it is.
    pub kernel_absent_reason: Option<String>,
}

/// One point of the batch-size sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    /// Folio size, bytes.
    pub folio_size: u64,
    /// Who copied.
    pub migrator: MigratorSpec,
    /// Whether runs moved as their copies completed.
    pub pipelined: bool,
    /// `max_batch_pages`.
    pub batch_pages: u64,
    /// Median first-folio latency over every batch of every passing repetition, µs.
    pub first_folio_us: Option<f64>,
    /// 99th percentile of the same, µs.
    pub first_folio_p99_us: Option<f64>,
    /// The repetitions.
    #[serde(flatten)]
    pub cell: Cell,
}

/// Experiment 2: throughput and first-folio latency against `max_batch_pages`.
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    /// How long the experiment took, s.
    pub wall_s: f64,
    /// Bytes moved per migration.
    pub bytes: u64,
    /// The batch bounds measured, in base pages.
    pub batch_pages: Vec<u64>,
    /// Every point.
    pub points: Vec<SweepPoint>,
}

impl Sweep {
    /// The point for this configuration, if measured.
    pub fn point(&self, folio_size: u64, migrator: MigratorSpec, pipelined: bool, batch: u64) -> Option<&SweepPoint> {
        self.points.iter().find(|p| {
            p.folio_size == folio_size && p.migrator == migrator && p.pipelined == pipelined && p.batch_pages == batch
        })
    }

    /// The folio sizes measured, in order.
    pub fn folio_sizes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.points.iter().map(|p| p.folio_size).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The migrators measured, in order.
    pub fn migrators(&self) -> Vec<MigratorSpec> {
        let mut v: Vec<MigratorSpec> = self.points.iter().map(|p| p.migrator).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One way of moving the folios of a scattered-folio row.
#[derive(Clone, Debug, Serialize)]
pub struct ScatterCase {
    /// Folios migrated per call.
    pub folios: u64,
    /// Bytes migrated per call.
    pub bytes: u64,
    /// Runs (one `mremap` each) per call, median over passing repetitions.
    pub runs: Option<f64>,
    /// Critical-path time per folio migrated, µs.
    pub us_per_folio: Option<Summary>,
    /// Move-phase time per run, µs: what one `mremap` and its wake cost.
    pub move_us_per_run: Option<Summary>,
    /// The repetitions.
    #[serde(flatten)]
    pub cell: Cell,
}

impl ScatterCase {
    /// Summarises the repetitions of one case.
    pub fn of(folios: u64, bytes: u64, measurements: Vec<Measurement>) -> ScatterCase {
        let good: Vec<&Measurement> = measurements.iter().filter(|m| m.ok).collect();
        let per_folio: Vec<f64> = good
            .iter()
            .filter(|m| m.folios > 0)
            .map(|m| (m.phases_us.unmap + m.phases_us.copy + m.phases_us.r#move) / m.folios as f64)
            .collect();
        let per_run: Vec<f64> =
            good.iter().filter(|m| m.runs > 0).map(|m| m.phases_us.r#move / m.runs as f64).collect();
        let runs: Vec<f64> = good.iter().map(|m| m.runs as f64).collect();
        ScatterCase {
            folios,
            bytes,
            runs: Summary::of(&runs).map(|s| s.median),
            us_per_folio: Summary::of(&per_folio),
            move_us_per_run: Summary::of(&per_run),
            cell: Cell::of(measurements),
        }
    }
}

/// One folio size of the scattered-folio experiment.
#[derive(Clone, Debug, Serialize)]
pub struct ScatterRow {
    /// Folio size, bytes.
    pub folio_size: u64,
    /// Bytes in the region.
    pub region_bytes: u64,
    /// Every folio of the region, contiguous.
    pub contiguous: ScatterCase,
    /// Every other folio of the region.
    pub scattered: ScatterCase,
}

/// Experiment 3: every other folio against the whole region.
#[derive(Clone, Debug, Serialize)]
pub struct Scattered {
    /// How long the experiment took, s.
    pub wall_s: f64,
    /// Who copied.
    pub migrator: MigratorSpec,
    /// Bound on a batch, in base pages.
    pub batch_pages: u64,
    /// One row per folio size.
    pub rows: Vec<ScatterRow>,
}

/// Everything a bench run measured, and where.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// pagemig's version.
    pub pagemig_version: String,
    /// When the run started, seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// How long the run took, s.
    pub wall_s: f64,
    /// The machine.
    pub machine: Machine,
    /// What was run.
    pub config: BenchConfig,
    /// Every attribute's value when the run started.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Experiment 1, if run.
    pub throughput: Option<Throughput>,
    /// Experiment 2, if run.
    pub sweep: Option<Sweep>,
    /// Experiment 3, if run.
    pub scattered: Option<Scattered>,
    /// Measurements that failed, over all experiments.
    pub failed_measurements: usize,
    /// The RFC's published numbers the plots compare with.
    pub reference: Reference,
}

impl BenchReport {
    /// Every migration measured, in every experiment: the yardstick rows of the throughput
    /// table (`memcpy`, `UFFDIO_COPY`), taken in the same runs as the `cpu` row's
    /// migrations, are not counted again.
    pub fn measurements(&self) -> impl Iterator<Item = &Measurement> {
        let rows = self.throughput.iter().flat_map(|t| t.rows.iter().filter(|r| !r.migrator.is_yardstick()));
        let t = rows.flat_map(|r| r.cells.iter());
        let s = self.sweep.iter().flat_map(|s| s.points.iter().map(|p| &p.cell));
        let c = self.scattered.iter().flat_map(|s| s.rows.iter().flat_map(|r| [&r.contiguous.cell, &r.scattered.cell]));
        t.chain(s).chain(c).flat_map(|cell| cell.measurements.iter())
    }
}

/// Synthetic reports for the report's unit tests: cells of chosen throughputs, with no
/// migration behind them.
#[cfg(test)]
pub(crate) mod sample {
    use super::*;
    use crate::report::seed::Reference;
    use crate::report::{BenchConfig, Machine};

    /// A passing measurement of `gbps` end to end and `critical` on the critical path, whose
    /// call spent `prepare_share` of its time preparing destinations.
    pub fn measurement(rep: usize, gbps: f64, critical: f64, prepare_share: f64) -> Measurement {
        let mut m = Measurement::failed(rep, 1 << 20, String::new());
        (m.ok, m.error, m.gbps, m.critical_path_gbps, m.placement_ok) = (true, None, gbps, Some(critical), true);
        m.folios = 256;
        m.phases_us = Phases { prepare: 100.0 * prepare_share, unmap: 10.0, copy: 50.0, r#move: 10.0, total: 100.0 };
        m
    }

    /// A cell of one passing measurement per value, critical path `critical_factor` times the
    /// end-to-end figure.
    pub fn cell(values: &[f64], critical_factor: f64, prepare_share: f64) -> Cell {
        Cell::of(
            values.iter().enumerate().map(|(i, &g)| measurement(i, g, g * critical_factor, prepare_share)).collect(),
        )
    }

    /// A throughput experiment over `folio_sizes` with one row per `(migrator, medians)`:
    /// three runs per cell at 0.95, 1 and 1.05 times the median.
    pub fn throughput(folio_sizes: &[u64], rows: &[(MigratorSpec, Vec<f64>)]) -> Throughput {
        let rows = rows
            .iter()
            .map(|(m, medians)| ThroughputRow {
                migrator: *m,
                cells: medians
                    .iter()
                    .map(|&g| {
                        let (critical, prepare) = match m {
                            MigratorSpec::Dcbm { .. } => (3.0, 0.6),
                            _ => (1.1, 0.05),
                        };
                        cell(&[g * 0.95, g, g * 1.05], critical, prepare)
                    })
                    .collect(),
            })
            .collect();
        Throughput {
            wall_s: 1.0,
            bytes: 1 << 30,
            batch_pages: 262_144,
            pipelined: true,
            folio_sizes: folio_sizes.to_vec(),
            rows,
            kernel_nodes: None,
            kernel_absent_reason: Some("kernel move_pages row absent: one node".into()),
        }
    }

    /// A report of whichever experiments are given.
    pub fn report(throughput: Option<Throughput>, sweep: Option<Sweep>, scattered: Option<Scattered>) -> BenchReport {
        BenchReport {
            pagemig_version: "0".into(),
            started_unix_s: 0,
            wall_s: 0.0,
            machine: Machine::probe(),
            config: BenchConfig::quick(0, 0),
            attributes: Default::default(),
            throughput,
            sweep,
            scattered,
            failed_measurements: 0,
            reference: Reference::embedded(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_values() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!((s.n, s.mean, s.median, s.min, s.max), (4, 2.5, 2.5, 1.0, 4.0));
        assert!((s.stddev - 1.290_994_448_735_805_6).abs() < 1e-12);
        assert_eq!(Summary::of(&[7.0]).unwrap().stddev, 0.0);
        assert!(Summary::of(&[]).is_none());
        // 4.68 ± 3.64 is noisy, 4.00 ± 0.50 is not, and one value never is.
        assert!(Summary { n: 2, mean: 4.68, stddev: 3.64, median: 4.68, min: 2.1, max: 7.3 }.is_noisy());
        assert!(!Summary::of(&[3.5, 4.5]).unwrap().is_noisy());
        assert!(!Summary::of(&[7.0]).unwrap().is_noisy());
        assert_eq!(quantile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.99), Some(5.0));
        assert_eq!(quantile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.5), Some(3.0));
    }

    #[test]
    fn failed_measurements_stay_out_of_the_summary() {
        let mut good = Measurement::failed(0, 1 << 20, String::new());
        good.ok = true;
        good.gbps = 4.0;
        let bad = Measurement::failed(1, 1 << 20, "12 bytes differ".into());
        let cell = Cell::of(vec![good, bad]);
        assert!(!cell.ok);
        assert_eq!(cell.failed_reps, 1);
        assert_eq!(cell.gbps.unwrap().n, 1);
        assert_eq!(cell.gbps.unwrap().mean, 4.0);
        assert_eq!(check_failures(0, 0, 0, true), None);
        assert_eq!(
            check_failures(2, 0, 1, false).unwrap(),
            "2 folios not migrated; 1 writes lost; pages on the wrong node"
        );
    }
}
