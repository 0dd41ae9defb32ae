//! `pagemig bench`: the RFC's experiments, measured here and written out as tables, JSON,
//! plots and one HTML page.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagemig::{Engine, numa};
use pagemig_cli::report::{self, BenchConfig, Experiments, Step};

use crate::size;

/// An experiment of `pagemig bench`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Experiment {
    /// Throughput by folio size and migrator (the RFC's first table).
    Throughput,
    /// Throughput and first-folio latency against the batch size (the RFC's second table).
    Sweep,
    /// Every other folio of a region against the whole region.
    Scattered,
}

/// Options of `pagemig bench`.
#[derive(clap::Args, Debug)]
#[command(after_help = size::HELP)]
pub struct Args {
    /// A reduced run that finishes in under a minute: 64 MiB regions, 2 repetitions, a
    /// sweep of 512 … 16384 pages, smaller scattered regions.
    #[arg(long)]
    quick: bool,
    /// Bytes per migration (default 1GiB, 64MiB with --quick). Peak memory: twice this
    /// (the reserved row prepares the whole size ahead, and the default batch covers a
    /// 1GiB region); a size that cannot fit is refused before any experiment runs.
    #[arg(long, value_parser = size::parse)]
    size: Option<usize>,
    /// Repetitions of every cell (default 5, 2 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Repetitions of every point of the batch-size sweep (default 3, 2 with --quick).
    #[arg(long)]
    sweep_reps: Option<usize>,
    /// Node regions are allocated on (default: the first node with memory). One node.
    #[arg(long, value_name = "NODE", value_parser = crate::nodes::parse_one)]
    from_node: Option<u32>,
    /// Node to migrate to (default: the first node with memory). The kernel's
    /// move_pages(2) row of the throughput table migrates from --from-node to here when
    /// they differ, else from the first memory node to the next one; with one memory node
    /// it is left out. One node: the experiments measure one pair of nodes.
    #[arg(long, value_name = "NODE", value_parser = crate::nodes::parse_one)]
    to_node: Option<u32>,
    /// Bound on a batch for the throughput table and the scattered folios, in base pages
    /// (default 262144, the RFC's test setting).
    #[arg(long)]
    batch_pages: Option<usize>,
    /// Threads that keep writing into each region while it migrates (at most 4 per
    /// online CPU).
    #[arg(long, default_value_t = 0)]
    writers: usize,
    /// Run only these experiments (repeatable, or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Experiment>,
    /// Set an attribute before running, `PATH=VALUE` (repeatable; see `pagemig attr`).
    /// What the experiments vary themselves (the active migrator, its channels or threads,
    /// `migrate/pipelined` in the sweep) is set per row and put back at the end.
    #[arg(long = "attr", value_name = "PATH=VALUE")]
    attrs: Vec<String>,
    /// Directory for report.json, the plots and report.html.
    #[arg(long, default_value = "pagemig-report")]
    out: PathBuf,
    /// Print no tables.
    #[arg(long)]
    no_tables: bool,
}

fn config(args: &Args) -> anyhow::Result<BenchConfig> {
    let first = numa::memory_nodes()?.first().copied().unwrap_or(0);
    let (from, to) = (args.from_node.unwrap_or(first), args.to_node.unwrap_or(first));
    let mut cfg = if args.quick { BenchConfig::quick(from, to) } else { BenchConfig::full(from, to) };
    if let Some(s) = args.size {
        cfg.size = s;
    }
    if let Some(r) = args.reps {
        cfg.reps = r;
    }
    if let Some(r) = args.sweep_reps {
        cfg.sweep_reps = r;
    }
    if let Some(b) = args.batch_pages {
        cfg.batch_pages = pagemig_cli::report::runner::check_batch_pages(b)?;
    }
    cfg.writers = args.writers;
    if !args.only.is_empty() {
        cfg.experiments = Experiments {
            throughput: args.only.contains(&Experiment::Throughput),
            sweep: args.only.contains(&Experiment::Sweep),
            scattered: args.only.contains(&Experiment::Scattered),
        };
    }
    anyhow::ensure!(cfg.size >= 2 << 20, "--size must be at least 2MiB (one 2 MiB folio)");
    anyhow::ensure!(cfg.size % (2 << 20) == 0, "--size must be a multiple of 2MiB, the largest folio size");
    anyhow::ensure!(cfg.reps >= 1 && cfg.sweep_reps >= 1, "--reps and --sweep-reps must be at least 1");
    Ok(cfg)
}

/// A progress bar over the planned migrations, on a terminal only.
fn progress_bar(total: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} (eta {eta}) {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A duration as a person reads it: `45s`, `4m05s`, `1h02m`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// The line `pagemig bench` prints for a finished migration when its output is not a
/// terminal: `[done/total, elapsed, about … left] what: GB/s end to end`, or why it
/// failed. The estimate assumes the migrations left take as long as those done, on
/// average.
pub fn progress_line(step: &Step<'_>, elapsed: Duration) -> Option<String> {
    let m = step.finished?;
    let result = if m.ok {
        let critical = m.critical_path_gbps.map_or(String::new(), |g| format!(" ({g:.2} GB/s critical path)"));
        format!("{:.2} GB/s end to end{critical}", m.gbps)
    } else {
        format!("FAILED: {}", m.error.as_deref().unwrap_or("unknown"))
    };
    let left = elapsed.mul_f64(step.total.saturating_sub(step.done) as f64 / step.done.max(1) as f64);
    Some(format!(
        "pagemig bench: [{}/{}, {} elapsed, about {} left] {}: {result}",
        step.done,
        step.total,
        short_duration(elapsed),
        short_duration(left),
        step.what
    ))
}

/// Makes `dir` (if missing) and proves a file can be written in it, before any experiment
/// runs: a run of many minutes must not end in an error about where to write.
fn check_out_dir(dir: &Path) -> anyhow::Result<()> {
    let fail = |what: &str, e: std::io::Error| anyhow::anyhow!("--out {}: {what}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| fail("cannot make the directory", e))?;
    let probe = dir.join(format!(".pagemig-bench-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| fail("cannot write a file there", e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Refuses the options given that the experiments chosen by `--only` have no use for.
fn refuse_inapplicable(args: &Args, cfg: &BenchConfig) -> anyhow::Result<()> {
    let e = cfg.experiments;
    let name = |x: &Experiment| x.to_possible_value().map_or(String::new(), |v| v.get_name().to_string());
    let only = args.only.iter().map(name).collect::<Vec<_>>().join(",");
    anyhow::ensure!(
        args.reps.is_none() || e.throughput || e.scattered,
        "--reps does not apply with --only {only}: the sweep repeats each point --sweep-reps times"
    );
    anyhow::ensure!(
        args.sweep_reps.is_none() || e.sweep,
        "--sweep-reps does not apply with --only {only}: it repeats the batch-size sweep's points"
    );
    anyhow::ensure!(
        args.batch_pages.is_none() || e.throughput || e.scattered,
        "--batch-pages does not apply with --only {only}: the sweep varies the batch size itself"
    );
    Ok(())
}

/// Refuses, before any experiment runs, writers past the machine's bound and a size whose
/// largest migration cannot fit: the throughput table's reserved row (the whole size
/// prepared ahead) or its batch, as [`pagemig_cli::experiment::peak_memory`] counts them.
fn preflight(cfg: &BenchConfig) -> anyhow::Result<()> {
    use pagemig_cli::experiment::{MoveConfig, check_memory, check_writers};
    check_writers(cfg.writers)?;
    let largest = MoveConfig {
        size: cfg.size,
        folio_size: 4 << 10,
        from_node: Some(cfg.from_node),
        to_node: cfg.to_node,
        to_nodes: Vec::new(),
        // The largest batch of any experiment run: one covering the region holds all its
        // destinations at once.
        batch_pages: cfg
            .effective_sweep_batches()
            .into_iter()
            .filter(|_| cfg.experiments.sweep)
            .fold(cfg.batch_pages, usize::max),
        reason: cfg.reason,
        mode: cfg.mode,
        writers: cfg.writers,
        seed: cfg.seed,
        measure_memcpy: true,
        reserve: cfg.experiments.throughput.then_some(cfg.size),
    };
    check_memory(
        &largest,
        "or leave out the throughput table (--only sweep,scattered), whose reserved row prepares the whole size again ahead",
    )?;
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let engine = Engine::global()?;
    for a in &args.attrs {
        pagemig::attr::apply(a)?;
    }
    let cfg = config(&args)?;
    refuse_inapplicable(&args, &cfg)?;
    preflight(&cfg)?;
    check_out_dir(&args.out)?;
    // On a terminal, a bar; otherwise (a log, a pipe, CI) one line per finished migration.
    let bar = std::io::stderr().is_terminal().then(|| progress_bar(cfg.planned_runs()));
    let started = Instant::now();
    let progress = |s: &Step<'_>| match &bar {
        Some(bar) => {
            bar.set_position(s.done as u64);
            if s.finished.is_none() {
                bar.set_message(s.what.to_string());
            }
        }
        None => {
            if let Some(line) = progress_line(s, started.elapsed()) {
                eprintln!("{line}");
            }
        }
    };
    let report = report::run(engine, &cfg, &progress)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if !args.no_tables {
        for t in report::table::tables(&report) {
            println!("{}", t.to_terminal());
        }
    }
    // The error's own text names its cause: anyhow's chain would print it twice.
    let written = report::write_all(&report, &args.out).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", report.machine.summary());
    println!(
        "{} migrations in {:.1} s; wrote {} files to {}:",
        report.measurements().count(),
        report.wall_s,
        written.len(),
        args.out.display()
    );
    for p in &written {
        println!("  {}", p.display());
    }
    if report.failed_measurements > 0 {
        eprintln!(
            "pagemig: {} measurements failed their checks (marked FAILED in the report)",
            report.failed_measurements
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagemig_cli::report::Measurement;

    #[test]
    fn one_line_per_finished_migration() {
        let mut m = Measurement::failed(0, 1 << 20, String::new());
        (m.ok, m.error, m.gbps, m.critical_path_gbps) = (true, None, 1.5, Some(2.25));
        let what = "throughput: cpu, 4K folios, rep 1/2";
        let secs = Duration::from_secs;
        assert_eq!(progress_line(&Step { done: 0, total: 4, what, finished: None }, secs(1)), None);
        assert_eq!(
            progress_line(&Step { done: 1, total: 4, what, finished: Some(&m) }, secs(20)).unwrap(),
            "pagemig bench: [1/4, 20s elapsed, about 1m00s left] throughput: cpu, 4K folios, rep 1/2: 1.50 GB/s \
             end to end (2.25 GB/s critical path)"
        );
        let bad = Measurement::failed(1, 1 << 20, "12 bytes differ".into());
        assert_eq!(
            progress_line(&Step { done: 2, total: 4, what, finished: Some(&bad) }, secs(3725)).unwrap(),
            "pagemig bench: [2/4, 1h02m elapsed, about 1h02m left] throughput: cpu, 4K folios, rep 1/2: FAILED: 12 \
             bytes differ"
        );
        assert!(
            progress_line(&Step { done: 4, total: 4, what, finished: Some(&m) }, secs(9))
                .unwrap()
                .contains("[4/4, 9s elapsed, about 0s left]")
        );
    }

    #[test]
    fn an_unusable_out_directory_is_refused_before_anything_runs() {
        let file = std::env::temp_dir().join(format!("pagemig-bench-out-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let err = check_out_dir(&file.join("report")).unwrap_err().to_string();
        assert!(err.starts_with(&format!("--out {}/report: cannot make the directory: ", file.display())), "{err}");
        std::fs::remove_file(&file).unwrap();
        let dir = std::env::temp_dir().join(format!("pagemig-bench-out-dir-{}", std::process::id()));
        check_out_dir(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the probe is left behind");
        std::fs::remove_dir(&dir).unwrap();
    }
}
