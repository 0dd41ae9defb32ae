//! Runs the experiments a [`BenchConfig`] asks for, one verified migration at a time.
//!
//! Every migration is a fresh region, filled with a pattern, migrated by the active
//! migrator and checked (bytes, writes, placement) — [`crate::experiment::run_move`] for
//! the throughput table and the sweep, [`crate::report::scatter::run_scattered`] for the
//! scattered folios. Migrators are switched with [`pagemig::attr::select_migrator`] and the
//! pipelined move with [`Engine::update_settings`]; the state found at the start is put back
//! at the end.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::experiment::{MoveConfig, run_kernel_move, run_move};
use crate::report::machine::Machine;
use crate::report::model::{
    BenchReport, Cell, Measurement, MigratorSpec, ScatterCase, ScatterRow, Scattered, Sweep, SweepPoint, Throughput,
    ThroughputRow, quantile,
};
use crate::report::scatter::{self, ScatterConfig, run_scattered};
use crate::report::seed::Reference;
use pagemig::error::Result;
use pagemig::migrate::{Engine, MAX_BATCH_PAGES_LIMIT, Mode, Reason};
use pagemig::migrators;
use pagemig::offload::registry;
use pagemig::sys::PAGE_SIZE;

/// Which experiments to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Experiments {
    /// Throughput by folio size and migrator.
    pub throughput: bool,
    /// Throughput and first-folio latency against `max_batch_pages`.
    pub sweep: bool,
    /// Every other folio against the whole region.
    pub scattered: bool,
}

impl Experiments {
    /// All three.
    pub const ALL: Experiments = Experiments { throughput: true, sweep: true, scattered: true };
}

/// The folio sizes of the RFC's first table: 4 KiB, 16 KiB, 64 KiB, 256 KiB, 1 MiB, 2 MiB.
pub const FOLIO_SIZES: [usize; 6] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20];

/// The DMA channel counts of the RFC's first table.
pub const DCBM_CHANNELS: [usize; 6] = [1, 2, 4, 8, 12, 16];

/// What a bench run measures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    /// Whether this is the reduced `--quick` run.
    pub quick: bool,
    /// Bytes per migration (the scattered experiment may use less: see
    /// [`scatter::region_size`]).
    pub size: usize,
    /// Repetitions of every throughput cell and scattered case.
    pub reps: usize,
    /// Node regions are allocated on.
    pub from_node: u32,
    /// Node they migrate to.
    pub to_node: u32,
    /// Writer threads storing into each region while it migrates.
    pub writers: usize,
    /// Seed of the fill pattern (plus the repetition number).
    pub seed: u64,
    /// Why the migrations happen (a batch-eligible reason, for the batch copy to run).
    pub reason: Reason,
    /// How busy folios are waited for.
    pub mode: Mode,
    /// The experiments to run.
    pub experiments: Experiments,
    /// Throughput table: folio sizes, bytes.
    pub folio_sizes: Vec<usize>,
    /// Throughput table and scattered folios: bound on a batch, base pages.
    pub batch_pages: usize,
    /// Throughput table: `mtcopy` thread counts.
    pub mtcopy_threads: Vec<usize>,
    /// Throughput table: `dcbm` channel counts.
    pub dcbm_channels: Vec<usize>,
    /// Throughput table: `[from, to]` nodes of the kernel's `move_pages(2)` row, `None`
    /// for no kernel row (one memory node: see [`kernel_nodes`]).
    pub kernel_nodes: Option<[u32; 2]>,
    /// Sweep: folio sizes, bytes.
    pub sweep_folio_sizes: Vec<usize>,
    /// Sweep: `max_batch_pages` values (those above the region's pages are left out).
    pub sweep_batch_pages: Vec<usize>,
    /// Sweep: migrators.
    pub sweep_migrators: Vec<MigratorSpec>,
    /// Sweep: repetitions of every point.
    pub sweep_reps: usize,
    /// Scattered folios: folio sizes, bytes.
    pub scatter_folio_sizes: Vec<usize>,
    /// Scattered folios: most folios one scattered migration moves.
    pub scatter_max_folios: usize,
}

/// `mtcopy` thread counts worth measuring on `cpus` CPUs: 1, 2, 4, … and `cpus` itself.
pub fn thread_counts(cpus: usize) -> Vec<usize> {
    let cpus = cpus.clamp(1, migrators::mtcopy::MAX_THREADS);
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2)).take_while(|&n| n < cpus).collect();
    v.push(cpus);
    v
}

/// The nodes the kernel's `move_pages(2)` row migrates between for a run from `from` to
/// `to`: those two when they differ, else from the first memory node to the next one;
/// `None` on a machine with one memory node, where `move_pages(2)` to the node a page is
/// already on copies nothing.
pub fn kernel_nodes(from: u32, to: u32) -> Option<[u32; 2]> {
    if from != to {
        return Some([from, to]);
    }
    let nodes = pagemig::numa::memory_nodes().ok()?;
    let first = *nodes.first()?;
    let other = nodes.iter().copied().find(|&n| n != first)?;
    Some([first, other])
}

/// Why the kernel row is absent from a run whose `kernel_nodes` is `None`.
pub fn kernel_absent_reason() -> String {
    let nodes = pagemig::numa::memory_nodes().unwrap_or_default();
    format!(
        "kernel move_pages row absent: it needs two NUMA nodes with memory, and this machine has {} ({nodes:?}); \
         move_pages(2) to the node a page is already on copies nothing",
        nodes.len()
    )
}

/// Powers of `base` from `from` up to `to`, and `to` itself.
pub fn powers(from: usize, to: usize, base: usize) -> Vec<usize> {
    let mut v: Vec<usize> =
        std::iter::successors(Some(from), |n| n.checked_mul(base)).take_while(|&n| n < to).collect();
    v.push(to);
    v
}

impl BenchConfig {
    /// The RFC's experiments at full size: 1 GiB regions, 5 repetitions, every folio size,
    /// `mtcopy` up to the CPU count, `dcbm` with 1 … 16 channels, batches of 512 … 262144
    /// pages (powers of 4) for 4 KiB and 2 MiB folios with `cpu`, `mtcopy` (up to 4
    /// threads) and `dcbm` 1, 4 and 16 channels, pipelined and not.
    pub fn full(from_node: u32, to_node: u32) -> BenchConfig {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        BenchConfig {
            quick: false,
            size: 1 << 30,
            reps: 5,
            from_node,
            to_node,
            writers: 0,
            seed: 0x5eed,
            reason: Reason::Syscall,
            mode: Mode::Sync,
            experiments: Experiments::ALL,
            folio_sizes: FOLIO_SIZES.to_vec(),
            // The RFC's throughput runs raise NR_MAX_BATCHED_MIGRATION to HPAGE_PUD_NR
            // (patch 7/7) so that a batch can spread over many channels.
            batch_pages: MAX_BATCH_PAGES_LIMIT,
            mtcopy_threads: thread_counts(cpus),
            dcbm_channels: DCBM_CHANNELS.to_vec(),
            kernel_nodes: kernel_nodes(from_node, to_node),
            sweep_folio_sizes: vec![4 << 10, 2 << 20],
            sweep_batch_pages: powers(512, MAX_BATCH_PAGES_LIMIT, 4),
            sweep_migrators: vec![
                MigratorSpec::Cpu,
                MigratorSpec::Mtcopy { threads: cpus.min(4) },
                MigratorSpec::Dcbm { channels: 1 },
                MigratorSpec::Dcbm { channels: 4 },
                MigratorSpec::Dcbm { channels: 16 },
            ],
            sweep_reps: 3,
            scatter_folio_sizes: FOLIO_SIZES.to_vec(),
            scatter_max_folios: 16384,
        }
    }

    /// A reduced run that finishes in well under a minute on two cores: 64 MiB regions,
    /// 2 repetitions, a sweep of three batch sizes (512 … 16384 pages), smaller scattered
    /// regions.
    pub fn quick(from_node: u32, to_node: u32) -> BenchConfig {
        BenchConfig {
            quick: true,
            size: 64 << 20,
            reps: 2,
            sweep_batch_pages: vec![512, 4096, 16384],
            sweep_reps: 2,
            scatter_max_folios: 4096,
            ..BenchConfig::full(from_node, to_node)
        }
    }

    /// The sweep's batch bounds that fit the region: those up to its page count (or the
    /// page count alone when all are above it).
    pub fn effective_sweep_batches(&self) -> Vec<usize> {
        let pages = (self.size / PAGE_SIZE).clamp(1, MAX_BATCH_PAGES_LIMIT);
        let v: Vec<usize> = self.sweep_batch_pages.iter().copied().filter(|&b| (1..=pages).contains(&b)).collect();
        if v.is_empty() { vec![pages] } else { v }
    }

    /// The migrating rows of the throughput table: `cpu`, `mtcopy` and `dcbm`
    /// configurations (the kernel and the yardsticks come after them).
    pub fn throughput_migrators(&self) -> Vec<MigratorSpec> {
        let mut v = vec![MigratorSpec::Cpu, MigratorSpec::CpuReserved];
        v.extend(self.mtcopy_threads.iter().map(|&threads| MigratorSpec::Mtcopy { threads }));
        v.extend(self.dcbm_channels.iter().map(|&channels| MigratorSpec::Dcbm { channels }));
        v
    }

    /// Migrations the run will make.
    pub fn planned_runs(&self) -> usize {
        let mut n = 0;
        if self.experiments.throughput {
            let kernel = usize::from(self.kernel_nodes.is_some());
            n += (self.throughput_migrators().len() + kernel) * self.folio_sizes.len() * self.reps;
        }
        if self.experiments.sweep {
            n += self.sweep_folio_sizes.len()
                * self.sweep_migrators.len()
                * 2
                * self.effective_sweep_batches().len()
                * self.sweep_reps;
        }
        if self.experiments.scattered {
            n += self.scatter_folio_sizes.len() * 2 * self.reps;
        }
        n
    }
}

/// Where a run is: told before each migration starts and again when it has finished.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    /// Migrations finished.
    pub done: usize,
    /// Migrations planned.
    pub total: usize,
    /// The migration about to start, or just finished: experiment, migrator, folio size,
    /// repetition.
    pub what: &'a str,
    /// The finished migration's measurement; `None` when `what` is about to start.
    pub finished: Option<&'a Measurement>,
}

struct Ticker<'a> {
    done: usize,
    total: usize,
    progress: &'a dyn Fn(&Step<'_>),
}

impl Ticker<'_> {
    /// Runs `measure` as the migration `what`, telling the progress callback before and
    /// after.
    fn measure(&mut self, what: &str, measure: impl FnOnce() -> Measurement) -> Measurement {
        (self.progress)(&Step { done: self.done, total: self.total, what, finished: None });
        let m = measure();
        self.done += 1;
        (self.progress)(&Step { done: self.done, total: self.total, what, finished: Some(&m) });
        m
    }
}

/// A size as `4K`, `2M`, `1G`.
pub fn short_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => format!("{b}B"),
    }
}

/// The migrator state a run changes, to put back afterwards.
struct Saved {
    active: Option<String>,
    channels: usize,
    threads: usize,
    pipelined: bool,
}

impl Saved {
    fn take(engine: &Engine) -> Saved {
        Saved {
            active: registry().active_name(),
            channels: migrators::dcbm().nr_dma_chan(),
            threads: migrators::mtcopy().threads(),
            pipelined: engine.settings().pipelined,
        }
    }

    fn restore(self, engine: &Engine) {
        let name = self.active.as_deref().filter(|n| ["mtcopy", "dcbm"].contains(n)).unwrap_or("cpu");
        let _ = pagemig::attr::select_migrator(name, Some(self.channels), Some(self.threads));
        let pipelined = self.pipelined;
        let _ = engine.update_settings(|s| s.pipelined = pipelined);
    }
}

/// Checks a bound on a batch (`--batch-pages`) as the engine's settings check it.
///
/// # Errors
/// [`pagemig::Error::Invalid`] outside 1 ..= 262144, naming the bounds.
pub fn check_batch_pages(pages: usize) -> Result<usize> {
    let mut settings = pagemig::Settings::default();
    settings.max_batch_pages = pages;
    settings.check().map(|()| pages)
}

/// Runs the experiments of `cfg`, telling `progress` before each migration.
///
/// # Errors
/// [`pagemig::Error::UnknownNode`] for a node that is not an online node with memory, and
/// [`pagemig::Error::Invalid`] for a configuration that cannot run (no repetitions, a batch
/// bound out of range); a migration that fails is recorded as failed in the report.
pub fn run(engine: &Engine, cfg: &BenchConfig, progress: &dyn Fn(&Step<'_>)) -> Result<BenchReport> {
    pagemig::numa::check_node(cfg.from_node)?;
    pagemig::numa::check_node(cfg.to_node)?;
    check_batch_pages(cfg.batch_pages)?;
    // The copy kernels measured before anything is timed.
    let _ = pagemig::copy::kernels();
    if cfg.reps == 0 || cfg.sweep_reps == 0 {
        return Err(pagemig::Error::Invalid("repetitions must be at least 1".into()));
    }
    let started = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let attributes: BTreeMap<String, String> = pagemig::attr::list()
        .into_iter()
        .map(|(path, value)| (path.to_string(), value.unwrap_or_else(|e| format!("<{e}>"))))
        .collect();
    let machine = Machine::probe();
    let mut ticker = Ticker { done: 0, total: cfg.planned_runs(), progress };
    let saved = Saved::take(engine);
    let throughput = cfg.experiments.throughput.then(|| run_throughput(engine, cfg, &mut ticker));
    let sweep = cfg.experiments.sweep.then(|| run_sweep(engine, cfg, &mut ticker));
    let scattered = cfg.experiments.scattered.then(|| run_scatter(engine, cfg, &mut ticker));
    saved.restore(engine);
    let mut report = BenchReport {
        pagemig_version: env!("CARGO_PKG_VERSION").into(),
        started_unix_s,
        wall_s: 0.0,
        machine,
        config: cfg.clone(),
        attributes,
        throughput,
        sweep,
        scattered,
        failed_measurements: 0,
        reference: Reference::embedded(),
    };
    report.failed_measurements = report.measurements().filter(|m| !m.ok).count();
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}

fn move_config(cfg: &BenchConfig, folio_size: usize, batch_pages: usize, rep: usize, memcpy: bool) -> MoveConfig {
    MoveConfig {
        size: cfg.size,
        folio_size,
        from_node: Some(cfg.from_node),
        to_node: cfg.to_node,
        to_nodes: Vec::new(),
        batch_pages,
        reason: cfg.reason,
        mode: cfg.mode,
        writers: cfg.writers,
        seed: cfg.seed.wrapping_add(rep as u64),
        measure_memcpy: memcpy,
        reserve: None,
    }
}

/// One repetition of `run_move`, as a measurement whatever happens.
fn measure_move(engine: &Engine, mc: &MoveConfig, rep: usize, selected: &Result<()>) -> Measurement {
    if let Err(e) = selected {
        return Measurement::failed(rep, mc.size as u64, format!("selecting the migrator: {e}"));
    }
    match run_move(engine, mc, None) {
        Ok(r) => Measurement::from_move(rep, &r),
        Err(e) => Measurement::failed(rep, mc.size as u64, e.to_string()),
    }
}

fn run_throughput(engine: &Engine, cfg: &BenchConfig, ticker: &mut Ticker<'_>) -> Throughput {
    let started = Instant::now();
    let mut rows = Vec::new();
    for spec in cfg.throughput_migrators() {
        let selected = spec.select();
        let mut cells = Vec::new();
        for &folio in &cfg.folio_sizes {
            let mut ms = Vec::new();
            for rep in 0..cfg.reps {
                let what =
                    format!("throughput: {spec}, {} folios, rep {}/{}", short_size(folio as u64), rep + 1, cfg.reps);
                // The yardsticks are measured with the serial CPU migration, in the same run.
                let mut mc = move_config(cfg, folio, cfg.batch_pages, rep, spec == MigratorSpec::Cpu);
                if spec == MigratorSpec::CpuReserved {
                    mc.reserve = Some(cfg.size);
                }
                ms.push(ticker.measure(&what, || measure_move(engine, &mc, rep, &selected)));
            }
            cells.push(Cell::of(ms));
        }
        rows.push(ThroughputRow { migrator: spec, cells });
    }
    if let Some([from, to]) = cfg.kernel_nodes {
        let spec = MigratorSpec::Kernel;
        let mut cells = Vec::new();
        for &folio in &cfg.folio_sizes {
            let mut ms = Vec::new();
            for rep in 0..cfg.reps {
                let what = format!(
                    "throughput: {spec} node {from} → {to}, {} folios, rep {}/{}",
                    short_size(folio as u64),
                    rep + 1,
                    cfg.reps
                );
                let mc = MoveConfig {
                    from_node: Some(from),
                    to_node: to,
                    ..move_config(cfg, folio, cfg.batch_pages, rep, false)
                };
                ms.push(ticker.measure(&what, || match run_kernel_move(&mc, None) {
                    Ok(r) => Measurement::from_move(rep, &r),
                    Err(e) => Measurement::failed(rep, mc.size as u64, e.to_string()),
                }));
            }
            cells.push(Cell::of(ms));
        }
        rows.push(ThroughputRow { migrator: spec, cells });
    }
    if let Some(cpu) = rows.iter().find(|r| r.migrator == MigratorSpec::Cpu).cloned() {
        for (spec, of) in [
            (MigratorSpec::Memcpy, Measurement::memcpy_of as fn(&Measurement) -> Option<Measurement>),
            (MigratorSpec::UffdioCopy, Measurement::uffdio_copy_of),
        ] {
            let cells = cpu.cells.iter().map(|c| Cell::of(c.measurements.iter().filter_map(of).collect())).collect();
            rows.push(ThroughputRow { migrator: spec, cells });
        }
    }
    Throughput {
        wall_s: started.elapsed().as_secs_f64(),
        bytes: cfg.size as u64,
        batch_pages: cfg.batch_pages as u64,
        pipelined: engine.settings().pipelined,
        folio_sizes: cfg.folio_sizes.iter().map(|&f| f as u64).collect(),
        rows,
        kernel_nodes: cfg.kernel_nodes,
        kernel_absent_reason: cfg.kernel_nodes.is_none().then(kernel_absent_reason),
    }
}

fn run_sweep(engine: &Engine, cfg: &BenchConfig, ticker: &mut Ticker<'_>) -> Sweep {
    let started = Instant::now();
    let batches = cfg.effective_sweep_batches();
    let mut points = Vec::new();
    for &folio in &cfg.sweep_folio_sizes {
        for &spec in &cfg.sweep_migrators {
            let selected = spec.select();
            for pipelined in [true, false] {
                let _ = engine.update_settings(|s| s.pipelined = pipelined);
                for &batch in &batches {
                    let mut ms = Vec::new();
                    for rep in 0..cfg.sweep_reps {
                        let what = format!(
                            "sweep: {spec}, {} folios, {batch} pages{}, rep {}/{}",
                            short_size(folio as u64),
                            if pipelined { ", pipelined" } else { "" },
                            rep + 1,
                            cfg.sweep_reps
                        );
                        let mc = move_config(cfg, folio, batch, rep, false);
                        ms.push(ticker.measure(&what, || measure_move(engine, &mc, rep, &selected)));
                    }
                    let cell = Cell::of(ms);
                    let first = cell.first_folio_us();
                    points.push(SweepPoint {
                        folio_size: folio as u64,
                        migrator: spec,
                        pipelined,
                        batch_pages: batch as u64,
                        first_folio_us: quantile(&first, 0.5),
                        first_folio_p99_us: quantile(&first, 0.99),
                        cell,
                    });
                }
            }
        }
    }
    Sweep {
        wall_s: started.elapsed().as_secs_f64(),
        bytes: cfg.size as u64,
        batch_pages: batches.iter().map(|&b| b as u64).collect(),
        points,
    }
}

fn run_scatter(engine: &Engine, cfg: &BenchConfig, ticker: &mut Ticker<'_>) -> Scattered {
    let started = Instant::now();
    let spec = MigratorSpec::Cpu;
    let selected = spec.select();
    let max_folios = cfg.scatter_max_folios.min(scatter::max_scattered_folios()).max(1);
    let mut rows = Vec::new();
    for &folio in &cfg.scatter_folio_sizes {
        let size = scatter::region_size(cfg.size, folio, max_folios);
        let mut cases = [Vec::new(), Vec::new()];
        for rep in 0..cfg.reps {
            for (i, every_other) in [false, true].into_iter().enumerate() {
                let what = format!(
                    "scattered: {spec}, {} folios, {}, rep {}/{}",
                    short_size(folio as u64),
                    if every_other { "every other" } else { "all" },
                    rep + 1,
                    cfg.reps
                );
                let sc = ScatterConfig {
                    size,
                    folio_size: folio,
                    from_node: cfg.from_node,
                    to_node: cfg.to_node,
                    every_other,
                    batch_pages: cfg.batch_pages,
                    reason: cfg.reason,
                    mode: cfg.mode,
                    writers: cfg.writers,
                    seed: cfg.seed.wrapping_add(rep as u64),
                };
                let m = ticker.measure(&what, || match &selected {
                    Err(e) => Measurement::failed(rep, size as u64, format!("selecting the migrator: {e}")),
                    Ok(()) => run_scattered(engine, &sc, rep)
                        .unwrap_or_else(|e| Measurement::failed(rep, size as u64, e.to_string())),
                });
                cases[i].push(m);
            }
        }
        let [all, half] = cases;
        let folios = (size / folio) as u64;
        rows.push(ScatterRow {
            folio_size: folio as u64,
            region_bytes: size as u64,
            contiguous: ScatterCase::of(folios, size as u64, all),
            scattered: ScatterCase::of(folios.div_ceil(2), (folios.div_ceil(2)) * folio as u64, half),
        });
    }
    Scattered { wall_s: started.elapsed().as_secs_f64(), migrator: spec, batch_pages: cfg.batch_pages as u64, rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences() {
        assert_eq!(thread_counts(1), [1]);
        assert_eq!(thread_counts(2), [1, 2]);
        assert_eq!(thread_counts(6), [1, 2, 4, 6]);
        assert_eq!(thread_counts(8), [1, 2, 4, 8]);
        assert_eq!(powers(512, 262_144, 4), [512, 2048, 8192, 32768, 131_072, 262_144]);
        assert_eq!(powers(512, 2048, 2), [512, 1024, 2048]);
        assert_eq!(short_size(4096), "4K");
        assert_eq!(short_size(2 << 20), "2M");
        assert_eq!(short_size(1 << 30), "1G");
    }

    #[test]
    fn plans_count_every_migration() {
        let mut c = BenchConfig::quick(0, 0);
        c.mtcopy_threads = vec![1, 2];
        c.kernel_nodes = None;
        // cpu, cpu reserved, 2 mtcopy and 6 dcbm rows, 6 folio sizes, 2 reps.
        let throughput = 10 * 6 * 2;
        // 2 folio sizes, 5 migrators, pipelined or not, 3 batch sizes, 2 reps.
        let sweep = 2 * 5 * 2 * 3 * 2;
        let scattered = 6 * 2 * 2;
        assert_eq!(c.planned_runs(), throughput + sweep + scattered);
        // A kernel row: 6 folio sizes, 2 reps more.
        c.kernel_nodes = Some([0, 1]);
        assert_eq!(c.planned_runs(), throughput + 6 * 2 + sweep + scattered);
        c.kernel_nodes = None;
        c.size = 4 << 20;
        assert_eq!(c.effective_sweep_batches(), [512]);
        c.size = 1 << 20;
        assert_eq!(c.effective_sweep_batches(), [256]);
    }
}
