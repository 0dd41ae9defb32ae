//! `pagemig bench`: the RFC's experiments, measured here and written out as tables, JSON,
//! plots and one HTML page.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Bytes per migration (default 1GiB, 64MiB with --quick).
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
    /// Threads that keep writing into each region while it migrates.
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
        cfg.batch_pages = pagemig::migrate::check_max_batch_pages(b)?;
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

/// The line `pagemig bench` prints for a finished migration when its output is not a
/// terminal: `[done/total] what: GB/s end to end`, or why it failed.
pub fn progress_line(step: &Step<'_>) -> Option<String> {
    let m = step.finished?;
    let result = if m.ok {
        let critical = m.critical_path_gbps.map_or(String::new(), |g| format!(" ({g:.2} GB/s critical path)"));
        format!("{:.2} GB/s end to end{critical}", m.gbps)
    } else {
        format!("FAILED: {}", m.error.as_deref().unwrap_or("unknown"))
    };
    Some(format!("pagemig bench: [{}/{}] {}: {result}", step.done, step.total, step.what))
}
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let engine = Engine::global()?;
    for a in &args.attrs {
        pagemig::attr::apply(a)?;
    }
    let cfg = config(&args)?;
    // On a terminal, a bar; otherwise (a log, a pipe, CI) one line per finished migration.
    let bar = std::io::stderr().is_terminal().then(|| progress_bar(cfg.planned_runs()));
    let progress = |s: &Step<'_>| match &bar {
        Some(bar) => {
            bar.set_position(s.done as u64);
            if s.finished.is_none() {
                bar.set_message(s.what.to_string());
            }
        }
        None => {
            if let Some(line) = progress_line(s) {
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
    let written = report::write_all(&report, &args.out)?;
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
        assert_eq!(progress_line(&Step { done: 0, total: 4, what, finished: None }), None);
        assert_eq!(
            progress_line(&Step { done: 1, total: 4, what, finished: Some(&m) }).unwrap(),
            "pagemig bench: [1/4] throughput: cpu, 4K folios, rep 1/2: 1.50 GB/s end to end (2.25 GB/s critical path)"
        );
        let bad = Measurement::failed(1, 1 << 20, "12 bytes differ".into());
        assert_eq!(
            progress_line(&Step { done: 2, total: 4, what, finished: Some(&bad) }).unwrap(),
            "pagemig bench: [2/4] throughput: cpu, 4K folios, rep 1/2: FAILED: 12 bytes differ"
        );
    }
}
