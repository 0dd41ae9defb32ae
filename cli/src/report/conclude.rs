//! What a run's numbers say: for each experiment, a few sentences computed from the medians
//! of that run.
//!
//! Each sentence is built from measured figures: the fastest migrator per folio size and
//! its margin, the share of a call spent preparing destinations, the batch size that keeps
//! throughput within 10 % of the best at the lowest first-folio latency, the cost of a run
//! of its own per scattered folio. Fixed text only names a mechanism (one page-table entry
//! per folio, destinations prepared before a batch is copied, one `mremap` per run), and
//! only where the numbers show the gap it explains. Medians, not means, so that one
//! disturbed repetition does not decide a winner; a failed cell takes no part.

use crate::report::model::{BenchReport, Cell, Measurement, MigratorSpec, ScatterCase, Scattered, Sweep, Throughput};
use crate::report::runner::short_size;
use pagemig::migrate::DEFAULT_MAX_BATCH_PAGES;

/// The sentences of each experiment that was run (empty for one that was not).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conclusions {
    /// Throughput by folio size.
    pub throughput: Vec<String>,
    /// The batch-size sweep.
    pub sweep: Vec<String>,
    /// The scattered folios.
    pub scattered: Vec<String>,
}

/// Below this ratio two figures are a tie: closer than repetitions of one configuration
/// usually are.
const TIE: f64 = 1.05;

/// A batch setting is "as fast" as the best when its throughput is within this share of it.
const NEAR_BEST: f64 = 0.9;

/// The conclusions of every experiment of `report`.
pub fn conclusions(report: &BenchReport) -> Conclusions {
    Conclusions {
        throughput: report.throughput.as_ref().map(throughput).unwrap_or_default(),
        sweep: report.sweep.as_ref().map(sweep).unwrap_or_default(),
        scattered: report.scattered.as_ref().map(scattered).unwrap_or_default(),
    }
}

/// The median end-to-end throughput of a cell that passed, GB/s.
fn median_gbps(cell: &Cell) -> Option<f64> {
    cell.gbps.filter(|_| cell.ok).map(|s| s.median).filter(|g| *g > 0.0 && g.is_finite())
}

/// The median critical-path throughput of a cell that passed, GB/s.
fn median_critical(cell: &Cell) -> Option<f64> {
    cell.critical_path_gbps.filter(|_| cell.ok).map(|s| s.median).filter(|g| *g > 0.0 && g.is_finite())
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

/// The median share of the call spent preparing destinations over the passing runs, %.
fn prepare_percent(cell: &Cell) -> Option<f64> {
    let good = cell.measurements.iter().filter(|m| m.ok && m.phases_us.total > 0.0);
    median(good.map(|m| 100.0 * m.phases_us.prepare / m.phases_us.total).collect())
}

fn gbps(g: f64) -> String {
    format!("{g:.2} GB/s")
}

fn times(r: f64) -> String {
    format!("{r:.2}×")
}

fn micros(us: f64) -> String {
    if us >= 10_000.0 { format!("{:.1} ms", us / 1e3) } else { format!("{us:.0} µs") }
}

/// `4K` or `4K–1M`.
fn size_range(sizes: &[u64]) -> String {
    match (sizes.first(), sizes.last()) {
        (Some(a), Some(b)) if a != b => format!("{}–{}", short_size(*a), short_size(*b)),
        (Some(a), _) => short_size(*a),
        _ => String::new(),
    }
}

/// `a` or `a–b` as `show` writes them, smallest first.
fn span(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (a, b) = (show(lo), show(hi));
    if a == b { a } else { format!("{}–{b}", a.trim_end_matches(|c: char| !c.is_ascii_digit())) }
}

/// The fastest migration of one folio size, and what it is compared with.
struct Win {
    folio: u64,
    winner: MigratorSpec,
    gbps: f64,
    /// `cpu` when the winner is another migrator, else the runner-up.
    against: Option<(MigratorSpec, f64)>,
    /// Whether the winner's or the compared cell is noisy
    /// ([`crate::report::model::Summary::is_noisy`]).
    noisy: bool,
}

/// The throughput experiment's conclusions: who is fastest where and by how much, why
/// end to end and the critical path differ, and what to choose.
pub fn throughput(t: &Throughput) -> Vec<String> {
    // Migrations called as a caller calls them: not the yardsticks, not the prepared reserve.
    let plain: Vec<_> =
        t.rows.iter().filter(|r| !r.migrator.is_yardstick() && r.migrator != MigratorSpec::CpuReserved).collect();
    let row = |m: MigratorSpec| t.rows.iter().find(|r| r.migrator == m);
    let at = |m: MigratorSpec, i: usize| row(m).and_then(|r| r.cells.get(i));
    let mut wins: Vec<Win> = Vec::new();
    for (i, &folio) in t.folio_sizes.iter().enumerate() {
        let mut ranked: Vec<(MigratorSpec, f64)> =
            plain.iter().filter_map(|r| Some((r.migrator, median_gbps(r.cells.get(i)?)?))).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let Some(&(winner, g)) = ranked.first() else { continue };
        let against = if winner == MigratorSpec::Cpu {
            ranked.get(1).copied()
        } else {
            ranked.iter().find(|(m, _)| *m == MigratorSpec::Cpu).copied().or_else(|| ranked.get(1).copied())
        };
        let noisy_cell = |m: MigratorSpec| at(m, i).and_then(|c| c.gbps).is_some_and(|s| s.is_noisy());
        let noisy = noisy_cell(winner) || against.is_some_and(|(m, _)| noisy_cell(m));
        wins.push(Win { folio, winner, gbps: g, against, noisy });
    }
    if wins.is_empty() {
        return vec!["No migration passed its checks, so this run supports no conclusion about throughput.".into()];
    }
    let mut out = Vec::new();

    // Who wins where.
    let mut groups: Vec<Vec<&Win>> = Vec::new();
    for w in &wins {
        match groups.last_mut() {
            Some(g) if g[0].winner == w.winner => g.push(w),
            _ => groups.push(vec![w]),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|g| {
            let sizes: Vec<u64> = g.iter().map(|w| w.folio).collect();
            let speeds: Vec<f64> = g.iter().map(|w| w.gbps).collect();
            let mut text = format!("{} at {} ({}", g[0].winner, size_range(&sizes), span(&speeds, gbps));
            let ratios: Vec<(MigratorSpec, f64)> =
                g.iter().filter_map(|w| w.against.map(|(m, a)| (m, w.gbps / a))).collect();
            if !ratios.is_empty() {
                let values: Vec<f64> = ratios.iter().map(|r| r.1).collect();
                let whom = if ratios.iter().all(|r| r.0 == ratios[0].0) {
                    ratios[0].0.to_string()
                } else {
                    "the next best".to_string()
                };
                let _ = std::fmt::Write::write_fmt(&mut text, format_args!(", {} {whom}", span(&values, times)));
                if values.iter().all(|&r| r < TIE) {
                    text.push_str(": a tie");
                }
            }
            if g.iter().any(|w| w.noisy) {
                text.push_str("; noisy cells, see ⚠");
            }
            text.push(')');
            text
        })
        .collect();
    out.push(format!("Fastest end to end (medians): {}.", parts.join("; ")));

    // Why: folio size, and the gap between end to end and the critical path.
    let (first, last) = (0, t.folio_sizes.len().saturating_sub(1));
    let mut why = Vec::new();
    if let (Some(small), Some(large)) = (
        at(MigratorSpec::Cpu, first).and_then(median_gbps),
        at(MigratorSpec::Cpu, last).and_then(median_gbps).filter(|_| last > first),
    ) {
        let (fs, fl) = (short_size(t.folio_sizes[first]), short_size(t.folio_sizes[last]));
        let r = large / small;
        why.push(if r >= 1.1 {
            format!(
                "with cpu, {fl} folios move {} faster than {fs} ones ({} → {}): a folio costs one page-table \
                 entry to write-protect and one to move whatever its size, so larger folios spread that cost over \
                 more bytes",
                times(r),
                gbps(small),
                gbps(large)
            )
        } else {
            format!(
                "with cpu, {fl} folios move at {} of the speed of {fs} ones ({} → {}): here the per-folio \
                 page-table work is not what limits throughput",
                times(r),
                gbps(small),
                gbps(large)
            )
        });
    }
    let gap = plain
        .iter()
        .filter_map(|r| {
            let c = r.cells.get(first)?;
            Some((r.migrator, median_gbps(c)?, median_critical(c)?, prepare_percent(c)))
        })
        .max_by(|a, b| (a.2 / a.1).total_cmp(&(b.2 / b.1)));
    if let Some((m, end, critical, prepare)) = gap.filter(|g| g.2 / g.1 >= 1.5) {
        let mut text = format!(
            "at {}, {m} moves {} end to end against {} on its critical path ({})",
            short_size(t.folio_sizes[first]),
            gbps(end),
            gbps(critical),
            times(critical / end)
        );
        if let Some(p) = prepare {
            let _ = std::fmt::Write::write_fmt(
                &mut text,
                format_args!(": preparing the destinations takes {p:.0} % of its call"),
            );
            if matches!(m, MigratorSpec::Dcbm { .. }) && p >= 25.0 {
                text.push_str(
                    " (a DMA channel writes to raw addresses, so its destinations are populated and zeroed before \
                     the copy, where cpu and mtcopy fill base pages with UFFDIO_COPY as they copy)",
                );
            }
        }
        why.push(text);
    }
    if !why.is_empty() {
        let mut text = why.join("; ");
        text[..1].make_ascii_uppercase();
        out.push(format!("{text}."));
    }

    // What to choose: a prepared reserve; what the batch bound costs at the largest folio.
    let mut choose = Vec::new();
    let reserve: Vec<f64> = (0..t.folio_sizes.len())
        .filter_map(|i| {
            Some(
                at(MigratorSpec::CpuReserved, i).and_then(median_gbps)?
                    / at(MigratorSpec::Cpu, i).and_then(median_gbps)?,
            )
        })
        .collect();
    if !reserve.is_empty() {
        let typical = median(reserve.clone()).unwrap_or(1.0);
        choose.push(if typical >= 1.1 {
            format!(
                "destinations prepared ahead on the reserve thread (cpu, reserved: Engine::reserve, pagemig move \
                 --reserve) make cpu {} as fast, so a program that migrates again and again should keep a reserve",
                span(&reserve, times)
            )
        } else {
            format!(
                "destinations prepared ahead (cpu, reserved) change cpu by {} only: a reserve buys little on this \
                 machine",
                span(&reserve, times)
            )
        });
    }
    if t.batch_pages as usize > DEFAULT_MAX_BATCH_PAGES {
        let mut text = format!("batches here hold up to {} pages (the RFC's setting)", t.batch_pages);
        if let Some(p) = at(MigratorSpec::Cpu, last).and_then(prepare_percent).filter(|_| last > first) {
            let _ = std::fmt::Write::write_fmt(
                &mut text,
                format_args!(
                    ", and preparing their destinations took {p:.0} % of cpu's call at {}",
                    short_size(t.folio_sizes[last])
                ),
            );
        }
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "; pagemig move and the library default to {DEFAULT_MAX_BATCH_PAGES} pages, and the batch-size sweep \
                 measures what the bound costs"
            ),
        );
        choose.push(text);
    }
    if !choose.is_empty() {
        let mut text = choose.join("; ");
        text[..1].make_ascii_uppercase();
        out.push(format!("{text}."));
    }
    out.extend(stalls(t));
    out
}

/// Where the writers waited longest and least, when the experiment ran with writers.
fn stalls(t: &Throughput) -> Option<String> {
    let mut all: Vec<(MigratorSpec, u64, &pagemig::workload::Stalls)> = t
        .rows
        .iter()
        .filter(|r| !r.migrator.is_yardstick())
        .flat_map(|r| {
            r.cells.iter().zip(&t.folio_sizes).filter(|(c, _)| c.ok).filter_map(move |(c, &folio)| {
                c.writer_stalls.as_ref().filter(|s| s.stores > 0).map(|s| (r.migrator, folio, s))
            })
        })
        .collect();
    all.sort_by_key(|&(_, _, s)| s.max_ns);
    let (&(least_m, least_f, least), &(most_m, most_f, most)) = (all.first()?, all.last()?);
    let us = |ns: u64| micros(ns as f64 / 1e3);
    Some(format!(
        "Writers waited longest under {most_m} at {} (a store waited up to {}, p99 {}; less its wait for a CPU once \
         woken, up to {}) and least under {least_m} at {} (up to {}): a store that touches a migrating page waits \
         until its piece has moved \
         (migrate/piece_budget_us bounds a piece by time, for a part of the throughput).",
        short_size(most_f),
        us(most.max_ns),
        us(most.p99_ns),
        us(most.memory_max_ns),
        short_size(least_f),
        us(least.max_ns),
    ))
}

fn mode(pipelined: bool) -> &'static str {
    if pipelined { "pipelined" } else { "moved after the batch copy" }
}

/// The sweep's conclusions, per folio size: the setting to choose (the lowest first-folio
/// latency within 10 % of the best throughput), and how latency and throughput follow the
/// batch size.
pub fn sweep(s: &Sweep) -> Vec<String> {
    let mut out = Vec::new();
    let (Some(&smallest), Some(&largest)) = (s.batch_pages.first(), s.batch_pages.last()) else { return out };
    for folio in s.folio_sizes() {
        let f = short_size(folio);
        let points: Vec<_> = s
            .points
            .iter()
            .filter(|p| p.folio_size == folio)
            .filter_map(|p| Some((p, median_gbps(&p.cell)?)))
            .collect();
        let Some(&(best, best_g)) = points.iter().max_by(|a, b| a.1.total_cmp(&b.1)) else {
            out.push(format!("{f} folios: no point passed its checks."));
            continue;
        };
        let pick = points
            .iter()
            .filter(|(p, g)| *g >= NEAR_BEST * best_g && p.first_folio_us.is_some())
            .min_by(|a, b| a.0.first_folio_us.unwrap_or(f64::MAX).total_cmp(&b.0.first_folio_us.unwrap_or(f64::MAX)));
        let mut text = format!(
            "{f} folios: the most throughput is {}, {}, {} pages ({})",
            best.migrator,
            mode(best.pipelined),
            best.batch_pages,
            gbps(best_g)
        );
        match pick {
            Some(&(p, _)) if std::ptr::eq(p, best) => {
                let _ = std::fmt::Write::write_fmt(
                    &mut text,
                    format_args!(
                        ", and nothing within 10 % of it waits less for its first folio ({}): the setting to \
                         choose",
                        micros(p.first_folio_us.unwrap_or_default())
                    ),
                );
            }
            Some(&(p, g)) => {
                let _ = std::fmt::Write::write_fmt(
                    &mut text,
                    format_args!(
                        "; the shortest first-folio wait within 10 % of it is {}, {}, {} pages ({}, first folio after \
                         {} against {}): the setting to choose",
                        p.migrator,
                        mode(p.pipelined),
                        p.batch_pages,
                        gbps(g),
                        micros(p.first_folio_us.unwrap_or_default()),
                        best.first_folio_us.map_or("-".into(), micros)
                    ),
                );
            }
            None => {}
        }
        out.push(format!("{text}."));

        // How the batch moves cpu's latency and throughput (the migrator first measured when
        // cpu was not).
        let Some(m) = s.migrators().into_iter().min_by_key(|m| *m != MigratorSpec::Cpu) else { continue };
        let lat =
            |pipelined: bool, batch: u64| s.point(folio, m, pipelined, batch).filter(|p| p.cell.ok)?.first_folio_us;
        let thr = |pipelined: bool, batch: u64| median_gbps(&s.point(folio, m, pipelined, batch)?.cell);
        let mut parts = Vec::new();
        if let (Some(a), Some(b)) = (lat(false, smallest), lat(false, largest)) {
            if largest > smallest {
                let mut text = format!(
                    "moved after the batch copy, {m}'s first folio waits {} at {smallest} pages and {} at {largest} \
                     ({})",
                    micros(a),
                    micros(b),
                    times(b / a)
                );
                if b / a >= 2.0 {
                    text.push_str(", since every folio waits for the whole batch to be copied");
                }
                if let (Some(c), Some(d)) = (lat(true, smallest), lat(true, largest)) {
                    let _ = std::fmt::Write::write_fmt(
                        &mut text,
                        format_args!(", pipelined {} and {} ({})", micros(c), micros(d), times(d / c)),
                    );
                }
                parts.push(text);
            }
        }
        if let (Some(x), Some(y)) = (thr(true, smallest), thr(true, largest)) {
            if largest > smallest {
                let verdict = if x >= TIE * y {
                    ": the small batches are faster"
                } else if y >= TIE * x {
                    ": the large batches are faster, with fewer batches to start and finish"
                } else {
                    ": a tie"
                };
                parts.push(format!(
                    "pipelined, {m} moves {} with {smallest}-page batches and {} with {largest}{verdict}",
                    gbps(x),
                    gbps(y)
                ));
            }
        }
        if !parts.is_empty() {
            let mut text = parts.join("; ");
            text[..1].make_ascii_uppercase();
            out.push(format!("{text}."));
        }
    }
    out
}

/// Reads one phase's time out of a measurement, µs.
type PhaseOf = fn(&Measurement) -> f64;

/// Median time per folio of one phase over the passing runs of a case, µs.
fn phase_per_folio(case: &ScatterCase, phase: impl Fn(&Measurement) -> f64) -> Option<f64> {
    let good = case.cell.measurements.iter().filter(|m| m.ok && m.folios > 0);
    median(good.map(|m| phase(m) / m.folios as f64).collect())
}

/// The scattered folios' conclusions: what a run of its own costs per folio, where that
/// matters, and any size where every other folio came out ahead (with the phase that
/// differs, and whether the difference is within the runs' spread).
pub fn scattered(s: &Scattered) -> Vec<String> {
    struct Row {
        folio: u64,
        all_us: f64,
        half_us: f64,
        per_run_us: Option<f64>,
    }
    let rows: Vec<Row> = s
        .rows
        .iter()
        .filter(|r| r.contiguous.cell.ok && r.scattered.cell.ok)
        .filter_map(|r| {
            Some(Row {
                folio: r.folio_size,
                all_us: r.contiguous.us_per_folio?.median,
                half_us: r.scattered.us_per_folio?.median,
                per_run_us: r.scattered.move_us_per_run.map(|s| s.median),
            })
        })
        .filter(|r| r.all_us > 0.0)
        .collect();
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return vec!["No scattered case passed its checks, so this run supports no conclusion about them.".into()];
    };
    let mut out = Vec::new();
    let per_run: Vec<f64> = rows.iter().filter_map(|r| r.per_run_us).collect();
    let ratio = |r: &Row| r.half_us / r.all_us;
    let mut text = String::from("Every other folio is a run of its own, with its own write-protect call and mremap");
    if !per_run.is_empty() {
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(" ({} µs per run, move phase, medians)", span(&per_run, |v| format!("{v:.1}"))),
        );
    }
    let _ = std::fmt::Write::write_fmt(
        &mut text,
        format_args!(
            ": at {} that makes a folio cost {} what it costs in the whole region ({:.2} against {:.2} µs on the \
             critical path)",
            short_size(first.folio),
            times(ratio(first)),
            first.half_us,
            first.all_us
        ),
    );
    if last.folio != first.folio {
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                ", at {} {} ({:.2} against {:.2} µs)",
                short_size(last.folio),
                times(ratio(last)),
                last.half_us,
                last.all_us
            ),
        );
    }
    out.push(format!("{text}."));

    let costly: Vec<u64> = rows.iter().filter(|r| ratio(r) >= 1.25).map(|r| r.folio).collect();
    let mut choose = if costly.is_empty() {
        "Scattering costs less than 25 % per folio at every size measured: coalescing matters little here".to_string()
    } else {
        let sizes: Vec<String> = costly.iter().map(|&f| short_size(f)).collect();
        format!(
            "Scattering costs 25 % or more per folio at {}: keep folios that migrate together contiguous (or \
             migrate whole ranges) so that they share runs",
            sizes.join(", ")
        )
    };
    // Sizes where every other folio came out ahead end to end: not coalescing's doing.
    for r in s.rows.iter().filter(|r| r.contiguous.cell.ok && r.scattered.cell.ok) {
        let (Some(all), Some(half)) = (r.contiguous.cell.gbps, r.scattered.cell.gbps) else { continue };
        if half.median < TIE * all.median {
            continue;
        }
        let phases: [(&str, PhaseOf); 4] = [
            ("prepare", |m| m.phases_us.prepare),
            ("unmap", |m| m.phases_us.unmap),
            ("copy", |m| m.phases_us.copy),
            ("move", |m| m.phases_us.r#move),
        ];
        let differs = phases
            .iter()
            .filter_map(|(name, f)| {
                Some((*name, phase_per_folio(&r.contiguous, f)?, phase_per_folio(&r.scattered, f)?))
            })
            .max_by(|a, b| (a.1 - a.2).total_cmp(&(b.1 - b.2)));
        let within = (half.mean - all.mean).abs() <= half.stddev + all.stddev;
        let _ = std::fmt::Write::write_fmt(
            &mut choose,
            format_args!(
                "; at {} every other folio came out ahead ({} against {} end to end), which one run per folio \
                 cannot explain",
                short_size(r.folio_size),
                gbps(half.median),
                gbps(all.median)
            ),
        );
        if let Some((name, a, h)) = differs {
            let _ = std::fmt::Write::write_fmt(
                &mut choose,
                format_args!(": the {name} phase took {h:.1} against {a:.1} µs per folio"),
            );
        }
        choose.push_str(if within {
            ", within the runs' spread (run-to-run variation; more --reps tells)"
        } else {
            ", beyond the runs' spread (every other folio moves half the bytes, a smaller working set)"
        });
    }
    out.push(format!("{choose}."));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::model::sample::{cell, report, throughput as sample_throughput};
    use crate::report::model::{ScatterRow, SweepPoint};

    const SIZES: [u64; 3] = [4 << 10, 64 << 10, 2 << 20];

    fn rows(cpu: [f64; 3], dcbm: [f64; 3], reserved: [f64; 3]) -> Vec<(MigratorSpec, Vec<f64>)> {
        vec![
            (MigratorSpec::Cpu, cpu.to_vec()),
            (MigratorSpec::CpuReserved, reserved.to_vec()),
            (MigratorSpec::Dcbm { channels: 4 }, dcbm.to_vec()),
            (MigratorSpec::Memcpy, vec![50.0; 3]),
        ]
    }

    #[test]
    fn names_the_winner_and_its_margin() {
        let t = sample_throughput(&SIZES, &rows([2.0, 2.0, 5.0], [1.0, 1.0, 10.0], [4.0, 4.0, 12.0]));
        let c = throughput(&t);
        // cpu wins the small folios, dcbm 4 ch the 2 MiB ones at twice cpu; memcpy and the
        // reserve are not contenders.
        assert_eq!(
            c[0],
            "Fastest end to end (medians): cpu at 4K–64K (2.00 GB/s, 2.00× dcbm 4 ch); dcbm 4 ch at 2M (10.00 GB/s, \
             2.00× cpu)."
        );
        assert!(
            c[1].starts_with("With cpu, 2M folios move 2.50× faster than 4K ones (2.00 GB/s → 5.00 GB/s)"),
            "{}",
            c[1]
        );
        // dcbm's critical path is 3× its end-to-end figure, with 60 % preparing.
        assert!(c[1].contains("at 4K, dcbm 4 ch moves 1.00 GB/s end to end against 3.00 GB/s on its critical path"));
        assert!(c[1].contains("preparing the destinations takes 60 % of its call (a DMA channel"), "{}", c[1]);
        assert!(c[2].contains("make cpu 2.00–2.40× as fast, so a program that migrates again and again"), "{}", c[2]);
        assert!(c[2].contains("batches here hold up to 262144 pages (the RFC's setting), and preparing their destinations took 5 % of cpu's call at 2M"), "{}", c[2]);
    }

    #[test]
    fn names_where_writers_waited() {
        use pagemig::workload::Stalls;
        let mut t = sample_throughput(&SIZES[..2], &rows([2.0, 3.0, 0.0], [1.0, 1.5, 0.0], [2.0, 3.0, 0.0]));
        assert_eq!(throughput(&t).iter().filter(|c| c.starts_with("Writers")).count(), 0);
        for (r, row) in t.rows.iter_mut().enumerate() {
            for (i, cell) in row.cells.iter_mut().enumerate() {
                let worst = 100_000 * (r as u64 + 1) * (i as u64 + 1);
                // The worst store waited 40 µs of it for a CPU once woken.
                cell.writer_stalls = Some(Stalls::split(1000, vec![(20_000, 0), (worst, 40_000)], &[]));
            }
        }
        let c = throughput(&t);
        // The memcpy yardstick (row 3) is no migration; dcbm (row 2) at 64K waits longest.
        assert!(
            c.last().unwrap().starts_with(
                "Writers waited longest under dcbm 4 ch at 64K (a store waited up to 600 µs, p99 600 µs; less its wait \
                 for a CPU once woken, up to 560 µs) and least under cpu at 4K (up to 100 µs)"
            ),
            "{c:?}"
        );
    }

    #[test]
    fn follows_the_numbers() {
        // The same experiment with cpu ahead everywhere: the sentence changes with it.
        let t = sample_throughput(&SIZES, &rows([2.0, 2.0, 12.0], [1.0, 1.0, 10.0], [2.05, 2.0, 12.1]));
        let c = throughput(&t);
        assert_eq!(c[0], "Fastest end to end (medians): cpu at 4K–2M (2.00–12.00 GB/s, 1.20–2.00× dcbm 4 ch).");
        assert!(c[2].contains("change cpu by 1.00–1.02× only: a reserve buys little"), "{}", c[2]);
        // A tie is called one.
        let t = sample_throughput(&SIZES[..1], &rows([2.0, 0.0, 0.0], [1.98, 0.0, 0.0], [2.0, 0.0, 0.0]));
        assert!(throughput(&t)[0].ends_with("cpu at 4K (2.00 GB/s, 1.01× dcbm 4 ch: a tie)."), "{:?}", throughput(&t));
        // A noisy winner is called noisy.
        let mut t = sample_throughput(&SIZES[..1], &rows([2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]));
        t.rows[0].cells[0] = cell(&[0.5, 2.0, 3.5], 1.1, 0.05);
        assert!(throughput(&t)[0].ends_with("cpu at 4K (2.00 GB/s, 2.00× dcbm 4 ch; noisy cells, see ⚠)."));
        // Nothing passed: no conclusion.
        let mut t = sample_throughput(&SIZES[..1], &rows([2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]));
        t.rows.iter_mut().flat_map(|r| r.cells.iter_mut()).for_each(|c| c.ok = false);
        assert!(throughput(&t)[0].starts_with("No migration passed"));
    }

    fn point(folio: u64, pipelined: bool, batch: u64, gbps: f64, first_us: f64) -> SweepPoint {
        SweepPoint {
            folio_size: folio,
            migrator: MigratorSpec::Cpu,
            pipelined,
            batch_pages: batch,
            first_folio_us: Some(first_us),
            first_folio_p99_us: Some(first_us * 2.0),
            cell: cell(&[gbps * 0.98, gbps, gbps * 1.02], 1.2, 0.1),
        }
    }

    #[test]
    fn sweep_picks_the_lowest_latency_near_the_best() {
        let s = Sweep {
            wall_s: 1.0,
            bytes: 1 << 30,
            batch_pages: vec![512, 4096, 32768],
            points: vec![
                point(2 << 20, true, 512, 9.2, 100.0),
                point(2 << 20, true, 4096, 9.5, 120.0),
                point(2 << 20, true, 32768, 6.0, 400.0),
                point(2 << 20, false, 512, 8.0, 90.0),
                point(2 << 20, false, 4096, 10.0, 700.0),
                point(2 << 20, false, 32768, 7.0, 6000.0),
            ],
        };
        let c = sweep(&s);
        assert_eq!(
            c[0],
            "2M folios: the most throughput is cpu, moved after the batch copy, 4096 pages (10.00 GB/s); the \
             shortest first-folio wait within 10 % of it is cpu, pipelined, 512 pages (9.20 GB/s, first folio after \
             100 µs against 700 µs): the setting to choose."
        );
        assert_eq!(
            c[1],
            "Moved after the batch copy, cpu's first folio waits 90 µs at 512 pages and 6000 µs at 32768 (66.67×), \
             since every folio waits for the whole batch to be copied, pipelined 100 µs and 400 µs (4.00×); \
             pipelined, cpu moves 9.20 GB/s with 512-page batches and 6.00 GB/s with 32768: the small batches are \
             faster."
        );
        // When the big batch is the fastest and its latency the lowest too, it is the pick.
        let mut s = s;
        s.points[2] = point(2 << 20, true, 32768, 20.0, 50.0);
        let c = sweep(&s);
        assert!(
            c[0].starts_with("2M folios: the most throughput is cpu, pipelined, 32768 pages (20.00 GB/s), and nothing"),
            "{}",
            c[0]
        );
        assert!(
            c[1].ends_with(
                "20.00 GB/s with 32768: the large batches are faster, with fewer batches to start and finish."
            )
        );
    }

    fn case(folios: u64, us_per_folio: f64, gbps: f64, per_run: f64) -> ScatterCase {
        let ms = [0.97, 1.0, 1.03]
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut m = crate::report::model::sample::measurement(i, gbps * k, gbps * k, 0.1);
                m.folios = folios;
                m.runs = folios;
                // unmap + copy + move = us_per_folio per folio; the move phase per_run per run.
                m.phases_us.r#move = per_run * folios as f64;
                m.phases_us.unmap = 0.0;
                m.phases_us.copy = us_per_folio * folios as f64 * k - m.phases_us.r#move;
                m
            })
            .collect();
        ScatterCase::of(folios, folios * 4096, ms)
    }

    #[test]
    fn scattered_costs_and_anomalies() {
        let s = Scattered {
            wall_s: 1.0,
            migrator: MigratorSpec::Cpu,
            batch_pages: 512,
            rows: vec![
                ScatterRow {
                    folio_size: 4 << 10,
                    region_bytes: 32 << 20,
                    contiguous: case(8192, 2.0, 2.0, 0.01),
                    scattered: case(4096, 14.0, 0.3, 12.0),
                },
                ScatterRow {
                    folio_size: 2 << 20,
                    region_bytes: 32 << 20,
                    contiguous: case(16, 200.0, 6.0, 10.0),
                    scattered: case(8, 190.0, 6.6, 12.0),
                },
            ],
        };
        let c = scattered(&s);
        assert!(
            c[0].starts_with(
                "Every other folio is a run of its own, with its own write-protect call and mremap (12.0 µs per run"
            ),
            "{}",
            c[0]
        );
        assert!(
            c[0].contains(
                "at 4K that makes a folio cost 7.00× what it costs in the whole region (14.00 against 2.00 µs"
            ),
            "{}",
            c[0]
        );
        assert!(c[0].contains("at 2M 0.95× (190.00 against 200.00 µs)"), "{}", c[0]);
        assert!(c[1].starts_with("Scattering costs 25 % or more per folio at 4K: keep folios"), "{}", c[1]);
        assert!(
            c[1].contains("at 2M every other folio came out ahead (6.60 GB/s against 6.00 GB/s end to end)"),
            "{}",
            c[1]
        );
        assert!(c[1].contains("the copy phase took"), "{}", c[1]);
    }

    #[test]
    fn every_experiment_of_a_report() {
        let r = report(
            Some(sample_throughput(&SIZES, &rows([2.0, 2.0, 5.0], [1.0, 1.0, 10.0], [4.0, 4.0, 12.0]))),
            None,
            None,
        );
        let c = conclusions(&r);
        assert_eq!(c.throughput.len(), 3);
        assert!(c.sweep.is_empty() && c.scattered.is_empty());
    }
}
