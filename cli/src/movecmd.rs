//! `pagemig move`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use comfy_table::Table;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use pagemig::{Engine, Mode, Reason, numa};
use pagemig_cli::experiment::{KERNEL, MoveConfig, MoveReport, Phase, run_kernel_move_observed, run_move_observed};

use crate::{JsonStyle, nodes, size};

/// Options of `pagemig move`.
#[derive(clap::Args, Debug)]
#[command(after_help = size::HELP)]
pub struct Args {
    /// Bytes to migrate (e.g. 64MiB, 1GiB). Peak memory: the size, plus the larger of
    /// the yardsticks' buffers (2 × min(size, 256MiB)) and the destinations held during the
    /// migration (the whole size again with --reserve or a batch as large as the region;
    /// with the default batch, up to 130MiB). A run that cannot fit is refused before it
    /// allocates anything.
    #[arg(long, default_value = "1GiB", value_parser = size::parse)]
    size: usize,
    /// Folio size: a power of two from 4KiB to 2MiB (2MiB folios are THP-backed).
    #[arg(long, default_value = "2MiB", value_parser = size::parse)]
    folio_size: usize,
    /// Node the region is allocated on (default: the first node with memory). One node:
    /// the region starts on one node.
    #[arg(long, value_name = "NODE", value_parser = nodes::parse_one)]
    from_node: Option<u32>,
    /// Nodes to migrate to: a node (1), a list (0,2), a range (0-3) or all, as numactl
    /// takes them. With more than one, the folios are spread over them round-robin, as
    /// `numactl --interleave` spreads pages (folio i to the i-th node of the list, modulo
    /// its length), one migration call per node, and each folio's pages are checked on the
    /// node it was sent to.
    #[arg(long, value_name = "NODES", value_parser = nodes::parse_list)]
    to_node: nodes::List,
    /// Bound on a batch, in base pages (1 … 262144; default: the attribute
    /// migrate/max_batch_pages, 512 unless the config file or PAGEMIG_ATTRS sets it).
    #[arg(long)]
    batch_pages: Option<usize>,
    /// Migration reason: compaction, syscall, demotion and numa_misplaced batch-copy;
    /// the others copy folio by folio.
    #[arg(long, default_value = "syscall", value_parser = parse_reason)]
    reason: Reason,
    /// async, sync_light or sync.
    #[arg(long, default_value = "sync", value_parser = parse_mode)]
    mode: Mode,
    /// Threads that keep writing sequence numbers into the region while it migrates (at
    /// most 4 per online CPU).
    #[arg(long, default_value_t = 0)]
    writers: usize,
    /// Copy migrator: cpu (the serial copy), mtcopy (multi-threaded CPU copy), dcbm
    /// (DMA channels of the soft DMA engine), or kernel: the kernel's own move_pages(2)
    /// instead of pagemig, as a baseline (needs --from-node to be none of --to-node's
    /// nodes). Default: the migrator the config file or PAGEMIG_ATTRS turns on
    /// (dcbm/offloading, mtcopy/offloading), else cpu.
    #[arg(long, value_parser = ["cpu", "mtcopy", "dcbm", "kernel"])]
    migrator: Option<String>,
    /// DMA channels for dcbm (1 … 16; sets dcbm/nr_dma_chan).
    #[arg(long)]
    channels: Option<usize>,
    /// Copy threads for mtcopy (1 … 4 per online CPU, at most 64; sets mtcopy/threads).
    #[arg(long)]
    threads: Option<usize>,
    /// Set an attribute before running, PATH=VALUE (repeatable; see `pagemig attr`).
    #[arg(long = "attr", value_name = "PATH=VALUE")]
    attrs: Vec<String>,
    /// Seed of the fill pattern.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Prepare the destinations ahead of the call on the engine's reserve thread (as a
    /// runtime that migrates again and again keeps them prepared), then time the call:
    /// `--reserve` (or `--reserve=0`) prepares the whole region's worth, `--reserve=SIZE` that much.
    #[arg(long, value_name = "SIZE", num_args = 0..=1, default_missing_value = "0", value_parser = size::parse)]
    reserve: Option<usize>,
    /// Print one JSON object instead of a table: `--json` (or `--json=pretty`) indented,
    /// `--json=compact` on one line.
    #[arg(long, value_name = "STYLE", num_args = 0..=1, require_equals = true, default_missing_value = "pretty")]
    json: Option<JsonStyle>,
    #[command(flatten)]
    pid: crate::pidcmd::PidArgs,
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    s.parse().map_err(|e: pagemig::Error| e.to_string())
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse().map_err(|e: pagemig::Error| e.to_string())
}

/// The bar's style while the migration runs.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} migrating [{bar:40}] {bytes}/{total_bytes} {rate}")
        .expect("valid template")
        .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}", rate(state.pos(), state.elapsed()));
        })
        .progress_chars("=> ")
}

/// The spinner's style for the steps before and after the migration.
fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg}… {elapsed}").expect("valid template")
}

/// What `pagemig move` shows on standard error while it works, on a terminal only and once
/// the command has run for a second (a quick move prints nothing but its result): a
/// spinner naming the step before and after the migration ([`phase_hook`]), and a bar
/// while the migration runs.
///
/// The bar's rate is the bytes moved over the time since the migration started (the first
/// callback, which [`run_move_observed`] makes just before the migration), in GB/s: the figure the
/// run ends with, not a rate that counts filling the region and measuring the yardsticks.
pub fn progress_bar(total: u64) -> (ProgressBar, pagemig::migrate::Progress) {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    bar.set_style(spinner_style());
    if std::io::stderr().is_terminal() {
        bar.enable_steady_tick(Duration::from_millis(100));
        let b = bar.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            if !b.is_finished() {
                b.set_draw_target(ProgressDrawTarget::stderr());
            }
        });
    }
    let started: OnceLock<()> = OnceLock::new();
    let b = bar.clone();
    let cb = Arc::new(move |done: u64| {
        started.get_or_init(|| {
            b.set_style(bar_style());
            b.reset_elapsed();
        });
        b.set_position(done);
    });
    (bar, cb)
}

/// The hook that names each step of the run on `bar` (see [`progress_bar`]).
pub fn phase_hook(bar: &ProgressBar, cfg: &MoveConfig) -> impl Fn(Phase) {
    let bar = bar.clone();
    let size = size::format(cfg.size);
    let reserve = size::format(cfg.reserve.unwrap_or(0));
    move |phase| {
        let step = match phase {
            Phase::Filling => format!("filling {size}"),
            Phase::Yardsticks => format!("measuring the yardsticks (memcpy and UFFDIO_COPY of {size})"),
            Phase::Reserving => format!("preparing {reserve} of destinations on the reserve thread"),
            // The bar takes over at the migration's first callback.
            Phase::Migrating => "migrating".into(),
            Phase::Checking => "checking every byte, every write and the node of every page".into(),
        };
        if phase != Phase::Migrating {
            bar.set_style(spinner_style());
        }
        bar.reset_elapsed();
        bar.set_message(step);
    }
}

/// `bytes` over `elapsed` as the final figures print it: GB/s, 10^9 bytes per second.
pub fn rate(bytes: u64, elapsed: Duration) -> String {
    format!("{:.2} GB/s", pagemig::stats::gbps(bytes, elapsed))
}

/// Whether option `id` (a field of [`Args`]) was given on the command line, not left at
/// its default.
fn given(matches: &clap::ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
}

/// The options among `ids` given on the command line, as the user typed their names.
fn given_options(matches: &clap::ArgMatches, ids: &[&str]) -> Vec<String> {
    let name = |id: &str| if id == "attrs" { "--attr".to_string() } else { format!("--{}", id.replace('_', "-")) };
    ids.iter().filter(|id| given(matches, id)).map(|id| name(id)).collect()
}

/// Refuses `options` (given, not applying) with `why`: `--a and --b do not apply …`.
fn refuse(options: &[String], why: &str) -> anyhow::Result<()> {
    match options {
        [] => Ok(()),
        [one] => anyhow::bail!("{one} does not apply {why}"),
        [first @ .., last] => anyhow::bail!("{} and {last} do not apply {why}", first.join(", ")),
    }
}

/// Refuses the options of a region of pagemig's own with `--pid`, and those the migrator
/// that will run has no use for: an option given is used, or the command stops.
fn refuse_inapplicable(matches: &clap::ArgMatches, pid: bool, migrator: Option<&str>) -> anyhow::Result<()> {
    if pid {
        let region = [
            "size",
            "folio_size",
            "batch_pages",
            "reason",
            "mode",
            "writers",
            "migrator",
            "channels",
            "threads",
            "attrs",
            "seed",
            "reserve",
        ];
        refuse(
            &given_options(matches, &region),
            "with --pid, which moves another process's memory as it is (its private anonymous memory, or \
             --range) through its agent or the kernel, not a region pagemig allocates, fills and migrates itself",
        )?;
        if given(matches, "no_agent") {
            refuse(&given_options(matches, &["agent_timeout"]), "with --no-agent: no agent is asked")?;
        }
        return Ok(());
    }
    let unused: &[(&str, &str)] = match migrator {
        Some("cpu") => &[("threads", "mtcopy"), ("channels", "dcbm")],
        Some("mtcopy") => &[("channels", "dcbm")],
        Some("dcbm") => &[("threads", "mtcopy")],
        _ => &[],
    };
    let Some(migrator) = migrator else { return Ok(()) };
    let options = given_options(matches, &unused.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    let whose: Vec<String> = unused
        .iter()
        .filter(|(id, _)| given(matches, id))
        .map(|(id, owner)| format!("--{id} is {owner}'s (--migrator {owner})"))
        .collect();
    let source = match (given(matches, "migrator"), pagemig::offload::registry().active_name()) {
        (true, _) => "",
        (false, Some(_)) => " (the active migrator, as the config file or PAGEMIG_ATTRS set it)",
        (false, None) => " (the default)",
    };
    refuse(&options, &format!("to the {migrator} migrator{source}: {}", whose.join("; ")))?;
    if migrator == KERNEL {
        refuse(
            &given_options(matches, &["batch_pages", "reason", "mode"]),
            "to the kernel's move_pages(2), which decides its own batches and waits as it will",
        )?;
    }
    Ok(())
}

pub fn run(args: Args, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    refuse_inapplicable(matches, args.pid.pid.is_some(), None)?;
    if let Some(pid) = args.pid.pid {
        let [to_node] = args.to_node.0[..] else {
            anyhow::bail!("--pid moves a process's memory to one node (--to-node N), not to a list");
        };
        return crate::pidcmd::run(&args.pid, pid, to_node, args.from_node, args.json);
    }
    let engine = Engine::global()?;
    let migrator = match &args.migrator {
        Some(m) => m.clone(),
        None => pagemig::offload::registry().active_name().unwrap_or_else(|| "cpu".into()),
    };
    refuse_inapplicable(matches, false, Some(&migrator))?;
    pagemig_cli::experiment::check_copy_threads(args.threads, args.channels)?;
    let kernel = migrator == KERNEL;
    if kernel {
        anyhow::ensure!(
            args.channels.is_none() && args.threads.is_none(),
            "--channels and --threads configure pagemig's migrators, not the kernel's move_pages(2)"
        );
        anyhow::ensure!(args.reserve.is_none(), "--reserve prepares pagemig's destinations, not the kernel's");
    } else {
        pagemig::attr::select_migrator(&migrator, args.channels, args.threads)?;
    }
    for a in &args.attrs {
        pagemig::attr::apply(a)?;
    }
    for counter in ["dcbm/folios_migrated", "dcbm/folios_failures", "mtcopy/folios_copied"] {
        pagemig::attr::write(counter, "0")?;
    }
    let from_node = Some(match args.from_node {
        Some(n) => n,
        None => numa::memory_nodes()?[0],
    });
    let to_nodes = args.to_node.0;
    let cfg = MoveConfig {
        size: args.size,
        folio_size: args.folio_size,
        from_node,
        to_node: to_nodes[0],
        // One node: the single-node migration as it always was.
        to_nodes: if to_nodes.len() > 1 { to_nodes } else { Vec::new() },
        batch_pages: match args.batch_pages {
            Some(pages) => pagemig_cli::report::runner::check_batch_pages(pages)?,
            None => engine.settings().max_batch_pages,
        },
        reason: args.reason,
        mode: args.mode,
        writers: args.writers,
        seed: args.seed,
        measure_memcpy: true,
        reserve: args.reserve.map(|b| if b == 0 { args.size } else { b }),
    };
    // Before anything is allocated or a thread started.
    pagemig_cli::experiment::check_writers(cfg.writers)?;
    pagemig_cli::experiment::check_memory(&cfg, "or drop --reserve (it prepares the whole size again ahead)")?;
    let (bar, cb) = progress_bar(args.size as u64);
    let phase = phase_hook(&bar, &cfg);
    let report = if kernel {
        run_kernel_move_observed(&cfg, Some(cb), &phase)
    } else {
        run_move_observed(engine, &cfg, Some(cb), &phase)
    };
    bar.finish_and_clear();
    let report = report?;
    let counters: serde_json::Map<String, serde_json::Value> = pagemig::attr::ATTRS
        .iter()
        .filter(|a| a.path.starts_with(&format!("{}/", report.migrator)))
        .filter_map(|a| Some((a.path.replace('/', "."), pagemig::attr::read(a.path).ok()?.parse::<u64>().ok()?.into())))
        .collect();
    let channels = if report.migrator == "dcbm" { pagemig::migrators::dcbm().nr_dma_chan() } else { 0 };
    let threads = if report.migrator == "mtcopy" { pagemig::migrators::mtcopy().threads() } else { 1 };
    if let Some(style) = args.json {
        let mut v = serde_json::to_value(&report)?;
        v["channels"] = channels.into();
        v["threads"] = threads.into();
        v["counters"] = counters.into();
        crate::print_json(&v, style)?;
    } else {
        print_table(&report, &cfg);
        println!("{}", engine.capabilities().describe());
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Each writer's stalls, one line each: how many of its stores waited on memory over 10 µs,
/// the longest, the 99.9th and 99th percentile of those, the same less the time the writer
/// then waited for a CPU, and how many were only preempted.
fn stalls(per_writer: &[pagemig::workload::Stalls]) -> String {
    if per_writer.is_empty() {
        return "- (no writers)".into();
    }
    per_writer.iter().enumerate().map(|(w, s)| format!("writer {w}: {}", stall_line(s))).collect::<Vec<_>>().join("\n")
}

/// One writer's stalls in words.
fn stall_line(s: &pagemig::workload::Stalls) -> String {
    let us = |ns: u64| format!("{:.0} µs", ns as f64 / 1e3);
    format!(
        "{} of {} stores waited on memory; max {}, p99.9 {}, p99 {}; less their waits for a CPU once woken: \
         max {}, p99.9 {}, p99 {}; {} preempted (max {})",
        s.waited,
        s.stores,
        us(s.max_ns),
        us(s.p999_ns),
        us(s.p99_ns),
        us(s.memory_max_ns),
        us(s.memory_p999_ns),
        us(s.memory_p99_ns),
        s.preempted,
        us(s.preempted_max_ns)
    )
}

fn print_table(r: &MoveReport, cfg: &MoveConfig) {
    let mut t = Table::new();
    t.set_header(["", "value"]);
    let mut rows: Vec<(&str, String)> = vec![
        ("bytes", size::format(r.bytes as usize)),
        ("folio size", size::format(r.folio_size as usize)),
        ("folios", r.folios.to_string()),
        (
            if r.to_nodes.len() > 1 { "from → to nodes (round-robin)" } else { "from → to node" },
            format!("{} → {}", cfg.from_node.map_or("-".into(), |n| n.to_string()), nodes::format(&r.to_nodes)),
        ),
        ("batch pages", r.batch_pages.to_string()),
        ("reason", r.reason.to_string()),
        ("migrator", r.migrator.clone()),
        ("offloaded / fallback folios", format!("{} / {}", r.offloaded_folios, r.fallback_folios)),
        ("succeeded / failed folios", format!("{} / {}", r.succeeded_folios, r.failed_folios)),
        ("retried folios", r.stats.retried_folios.to_string()),
        ("THP folios moved", r.stats.thp_succeeded.to_string()),
        ("mismatched bytes", r.mismatched_bytes.to_string()),
        ("writes / lost writes", format!("{} / {}", r.writes, r.lost_writes)),
        ("writer stalls (stores over 10 µs)", stalls(&r.writer_stalls)),
        (
            "placement",
            match r.misplaced_pages {
                0 => format!("ok {:?}", r.placement),
                n => format!("WRONG: {n} pages not on their folio's node {:?}", r.placement),
            },
        ),
        ("throughput (end to end)", format!("{:.2} GB/s", r.gbps)),
        ("memcpy (same bytes)", r.yardsticks.memcpy.describe()),
        ("UFFDIO_COPY fill (same bytes, base pages)", r.yardsticks.uffdio_copy.describe()),
        ("end to end / memcpy", format!("{:.2}", r.ratio)),
        (
            "critical path (excl. destination preparation)",
            r.critical_path_gbps.map_or("- (one syscall sequence)".into(), |g| format!("{g:.2} GB/s")),
        ),
        ("critical path / memcpy", r.critical_path_ratio.map_or("-".into(), |x| format!("{x:.2}"))),
    ];
    if r.migrator == KERNEL {
        // The kernel's calls have no batches, phases or first-folio times of pagemig's.
        rows.retain(|(k, _)| !["batch pages", "reason", "offloaded / fallback folios", "retried folios"].contains(k));
        rows.push(("move_pages calls", r.stats.batches.to_string()));
        rows.push(("time (all calls)", format!("{:.0} µs", r.phases_us.total)));
    } else {
        if r.reserve_bytes > 0 {
            rows.push((
                "prepared reserve (before the call)",
                format!("{} in {:.0} ms", size::format(r.reserve_bytes as usize), r.reserve_ms),
            ));
        }
        let k = &r.copy_kernels;
        rows.push(("copy kernels (fresh / cold destinations)", format!("{} / {}", k.hot.name(), k.cold.name())));
        rows.extend([
            ("first folio (median / p99)", format!("{:.1} µs / {:.1} µs", r.first_folio_us, r.first_folio_p99_us)),
            (
                "phases (prepare, unmap, copy, move)",
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0} µs",
                    r.phases_us.prepare, r.phases_us.unmap, r.phases_us.copy, r.phases_us.r#move
                ),
            ),
            ("batches / runs", format!("{} / {}", r.stats.batches, r.stats.runs)),
        ]);
        if r.stats.precopied_bytes > 0 {
            rows.push((
                "pre-copy: read while writable / copied again",
                format!(
                    "{} in {:.0} µs / {}",
                    size::format(r.stats.precopied_bytes as usize),
                    r.stats.precopy_ns as f64 / 1e3,
                    size::format(r.stats.recopied_bytes as usize)
                ),
            ));
        }
    }
    for (k, v) in rows {
        t.add_row([k.to_string(), v]);
    }
    println!("{t}");
    if !r.page_errors.is_empty() {
        println!("move_pages outcomes other than the target node: {:?}", r.page_errors);
    }
    if let Some(e) = &r.error {
        println!("first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_counts_from_the_first_callback() {
        assert_eq!(rate(2_000_000_000, Duration::from_secs(1)), "2.00 GB/s");
        assert_eq!(rate(5, Duration::ZERO), "0.00 GB/s");
        let (bar, cb) = progress_bar(1 << 20);
        // Time spent before the migration starts (filling, the yardsticks) is not counted.
        std::thread::sleep(Duration::from_millis(200));
        cb(0);
        assert!(bar.elapsed() < Duration::from_millis(150), "{:?}", bar.elapsed());
        cb(1 << 20);
        assert_eq!(bar.position(), 1 << 20);
    }

    #[test]
    fn each_step_before_and_after_the_migration_is_named() {
        let (bar, _) = progress_bar(4 << 30);
        let cfg = MoveConfig {
            size: 4 << 30,
            folio_size: 2 << 20,
            from_node: None,
            to_node: 0,
            to_nodes: Vec::new(),
            batch_pages: 512,
            reason: Reason::Syscall,
            mode: Mode::Sync,
            writers: 0,
            seed: 0,
            measure_memcpy: true,
            reserve: Some(1 << 30),
        };
        let hook = phase_hook(&bar, &cfg);
        for (phase, said) in [
            (Phase::Filling, "filling 4GiB"),
            (Phase::Yardsticks, "measuring the yardsticks (memcpy and UFFDIO_COPY of 4GiB)"),
            (Phase::Reserving, "preparing 1GiB of destinations on the reserve thread"),
            (Phase::Checking, "checking every byte, every write and the node of every page"),
        ] {
            hook(phase);
            assert_eq!(bar.message(), said);
        }
    }
}
