//! The report's tables, laid out like the RFC's: one model ([`TextTable`]) rendered for the
//! terminal (comfy-table) and for the HTML page.

use std::fmt::Write as _;

use comfy_table::{CellAlignment, Color};

use crate::report::conclude::conclusions;
use crate::report::model::{BenchReport, Cell, MigratorSpec, NOISY_SPREAD, Summary, Sweep, Throughput};
use crate::report::runner::short_size;
use crate::report::seed::Reference;

/// One cell of a [`TextTable`].
#[derive(Clone, Debug, PartialEq)]
pub struct TableCell {
    /// The text shown.
    pub text: String,
    /// Whether it reports a failed measurement (shown in red).
    pub failed: bool,
    /// Whether its runs spread too widely to be read as one figure ([`Summary::is_noisy`]):
    /// its text ends in [`NOISY_MARK`], and it is shown in yellow.
    pub noisy: bool,
}

impl TableCell {
    /// A plain cell.
    pub fn new(text: impl Into<String>) -> TableCell {
        TableCell { text: text.into(), failed: false, noisy: false }
    }

    /// A cell reporting a failure.
    pub fn failed(text: impl Into<String>) -> TableCell {
        TableCell { text: text.into(), failed: true, noisy: false }
    }

    /// A cell showing `text` for the runs `s` summarises, flagged when they are noisy.
    pub fn summarised(text: impl Into<String>, s: &Summary) -> TableCell {
        let text = text.into();
        if s.is_noisy() {
            TableCell { text: format!("{text} {NOISY_MARK}"), failed: false, noisy: true }
        } else {
            TableCell::new(text)
        }
    }
}

/// Marks a cell whose runs spread wider than [`NOISY_SPREAD`] of their mean.
pub const NOISY_MARK: &str = "⚠";

/// The legend line of [`NOISY_MARK`].
pub fn noisy_note() -> String {
    format!(
        "{NOISY_MARK} noisy: the runs' standard deviation is above {:.0} % of their mean, wider than most differences \
         between rows, so do not rank by this cell; rerun with more --reps, on a quieter machine (nothing else \
         running, fixed CPU frequency).",
        NOISY_SPREAD * 100.0
    )
}

/// A table with a title, a header row, rows and notes under it.
#[derive(Clone, Debug, Default)]
pub struct TextTable {
    /// What the table shows.
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows; the first column is the row's name.
    pub rows: Vec<Vec<TableCell>>,
    /// How to read it.
    pub notes: Vec<String>,
    /// What to conclude from it (and the tables of the same experiment before it): shown
    /// under the notes on the terminal; the HTML page shows them at the top of the
    /// experiment's section instead ([`crate::report::html`]).
    pub conclusions: Vec<String>,
}

/// Width the terminal's conclusions are wrapped at.
const WRAP: usize = 110;

/// `text` in lines of at most `width` characters (a longer word stands alone), each after
/// `indent`.
pub fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            let _ = writeln!(out, "{indent}{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "{indent}{line}");
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl TextTable {
    /// The table as comfy-table lays it out (failures in red on a terminal), title above
    /// and notes below.
    pub fn to_terminal(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.set_header(self.header.iter().map(|h| comfy_table::Cell::new(h).set_alignment(CellAlignment::Center)));
        for row in &self.rows {
            t.add_row(row.iter().enumerate().map(|(i, c)| {
                let cell = comfy_table::Cell::new(&c.text).set_alignment(if i == 0 {
                    CellAlignment::Left
                } else {
                    CellAlignment::Right
                });
                match (c.failed, c.noisy) {
                    (true, _) => cell.fg(Color::Red),
                    (false, true) => cell.fg(Color::Yellow),
                    (false, false) => cell,
                }
            }));
        }
        let mut out = format!("{}\n{t}\n", self.title);
        for n in &self.notes {
            let _ = writeln!(out, "  {n}");
        }
        if !self.conclusions.is_empty() {
            out.push_str("What to conclude:\n");
            for c in &self.conclusions {
                out.push_str(&wrap(c, WRAP, "  "));
            }
        }
        out
    }

    /// The table as an HTML `<table>` with a caption, failures in class `failed`.
    pub fn to_html(&self) -> String {
        let mut out = format!("<table>\n<caption>{}</caption>\n<thead><tr>", escape(&self.title));
        for h in &self.header {
            let _ = write!(out, "<th>{}</th>", escape(h));
        }
        out.push_str("</tr></thead>\n<tbody>\n");
        for row in &self.rows {
            out.push_str("<tr>");
            for (i, c) in row.iter().enumerate() {
                let tag = if i == 0 { "th" } else { "td" };
                let class = match (c.failed, c.noisy) {
                    (true, _) => " class=\"failed\"",
                    (false, true) => " class=\"noisy\" title=\"noisy: see the note under the table\"",
                    (false, false) => "",
                };
                let _ = write!(out, "<{tag}{class}>{}</{tag}>", escape(&c.text));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody>\n</table>\n");
        for n in &self.notes {
            let _ = writeln!(out, "<p class=\"note\">{}</p>", escape(n));
        }
        out
    }
}

/// `mean±stddev` with two decimals.
pub fn mean_sd(s: &Summary) -> String {
    format!("{:.2}±{:.2}", s.mean, s.stddev)
}

/// Microseconds with sensible precision.
pub fn micros(us: f64) -> String {
    if us >= 100.0 { format!("{us:.0}") } else { format!("{us:.1}") }
}

/// A folio size as the RFC's tables write it: `4K`, `2M`.
pub fn folio_label(bytes: u64) -> String {
    short_size(bytes)
}

/// `1 run`, `5 runs`.
pub fn runs(n: usize) -> String {
    if n == 1 { "1 run".into() } else { format!("{n} runs") }
}

/// Marks a throughput cell whose migrator did not copy everything itself.
const FALLBACK_MARK: &str = "†";

/// The cell of a measurement whose repetitions failed a check: `FAILED k/n`.
fn failed_cell(cell: &Cell) -> TableCell {
    TableCell::failed(format!("FAILED {}/{}", cell.failed_reps, cell.measurements.len()))
}

fn summary_cell(cell: &Cell, pick: impl Fn(&Cell) -> Option<Summary>, migrator: MigratorSpec) -> TableCell {
    if !cell.ok {
        return failed_cell(cell);
    }
    let Some(s) = pick(cell) else { return TableCell::new("-") };
    let offloads = matches!(migrator, MigratorSpec::Mtcopy { .. } | MigratorSpec::Dcbm { .. });
    let mark = if offloads && cell.fallback_folios > 0 { FALLBACK_MARK } else { "" };
    TableCell::summarised(format!("{}{mark}", mean_sd(&s)), &s)
}

/// Whether any cell of `rows` is flagged noisy.
fn any_noisy(rows: &[Vec<TableCell>]) -> bool {
    rows.iter().flatten().any(|c| c.noisy)
}

fn throughput_table(t: &Throughput, end_to_end: bool, report: &BenchReport) -> TextTable {
    let cfg = &report.config;
    let reps = cfg.reps;
    let what = if end_to_end {
        "Throughput, end to end (GB/s: the whole migration a caller waits for, destination preparation included)"
    } else {
        "Critical-path throughput (GB/s, excluding destination preparation: the call less populating destinations)"
    };
    let title = format!(
        "{what}, mean±stddev over {}; {} moved node {} → {}, batch ≤ {} pages, {}",
        runs(reps),
        short_size(t.bytes),
        cfg.from_node,
        cfg.to_node,
        t.batch_pages,
        if t.pipelined { "pipelined move" } else { "move after each batch copy" }
    );
    let mut header = vec!["migrator".to_string()];
    header.extend(t.folio_sizes.iter().map(|&f| folio_label(f)));
    let rows: Vec<Vec<TableCell>> =
        t.rows
            .iter()
            .map(|row| {
                let mut cells = vec![TableCell::new(row.migrator.to_string())];
                cells.extend(row.cells.iter().map(|c| {
                    summary_cell(c, |c| if end_to_end { c.gbps } else { c.critical_path_gbps }, row.migrator)
                }));
                cells
            })
            .collect();
    let mut notes = Vec::new();
    match (t.kernel_nodes, &t.kernel_absent_reason) {
        (Some([from, to]), _) => notes.push(format!(
            "kernel move_pages: the kernel's own migration of the same region with move_pages(2), node {from} → \
             {to}, timed as the caller's wall clock over its calls (the RFC's vanilla baseline, same run).{}",
            if end_to_end { "" } else { " Its calls cannot be split, so it has no critical-path figure." }
        )),
        (None, Some(why)) => notes.push(format!("{why}.")),
        (None, None) => {}
    }
    notes.push(
        "memcpy: a plain memcpy of the same bytes between two prepared buffers, in the same run as the cpu row. \
         The migrations copy with non-temporal stores, which can beat it on large copies."
            .to_string(),
    );
    if t.rows.iter().any(|r| r.migrator == MigratorSpec::UffdioCopy) {
        notes.push(
            "UFFDIO_COPY: the same bytes copied by UFFDIO_COPY into a fresh mapping bound to the target node \
             (mapping, registering and filling it), in the same run as the cpu row: each page allocated on the \
             node and copied into without zeroing, the user-space stand-in for the kernel's allocate-and-copy. It \
             installs 4 KiB base pages whatever the folio size."
                .to_string(),
        );
    }
    if !end_to_end {
        notes.push(
            "The RFC's published numbers time move_pages(), destination allocation included: compare them with \
             the end-to-end table."
                .to_string(),
        );
    }
    let fell_back = t.rows.iter().any(|r| {
        matches!(r.migrator, MigratorSpec::Mtcopy { .. } | MigratorSpec::Dcbm { .. })
            && r.cells.iter().any(|c| c.ok && c.fallback_folios > 0)
    });
    if fell_back {
        notes.push(format!("{FALLBACK_MARK}: some folios fell back to the per-folio CPU copy (see report.json)."));
    }
    if t.rows.iter().any(|r| r.cells.iter().any(|c| !c.ok)) {
        notes.push("FAILED k/n: k of n runs failed a check (bytes, writes, placement) and are left out.".into());
    }
    if any_noisy(&rows) {
        notes.push(noisy_note());
    }
    TextTable { title, header, rows, notes, conclusions: Vec::new() }
}

/// A cell of writer stalls: the longest / 99.9th / 99th percentile store that waited on
/// memory, µs, how many of the stores did, and the same three figures less the time each
/// of those stores then waited for a CPU.
fn stall_cell(cell: &Cell) -> TableCell {
    if !cell.ok {
        return failed_cell(cell);
    }
    match &cell.writer_stalls {
        None => TableCell::new("-"),
        Some(s) => TableCell::new(format!(
            "{} / {} / {} ({} of {}); less CPU waits {} / {} / {}",
            micros(s.max_ns as f64 / 1e3),
            micros(s.p999_ns as f64 / 1e3),
            micros(s.p99_ns as f64 / 1e3),
            s.waited,
            s.stores,
            micros(s.memory_max_ns as f64 / 1e3),
            micros(s.memory_p999_ns as f64 / 1e3),
            micros(s.memory_p99_ns as f64 / 1e3),
        )),
    }
}

/// What the stall figures mean, for the notes of a table that shows them.
fn stall_note(writers: usize) -> String {
    format!(
        "Writer stall: {writers} writer thread(s) store into every page of the region in a loop while it \
        migrates; a store that took over 10 µs waiting on memory (the migration's protection or isolation) \
        stalled. Shown: the longest / 99.9th / 99th percentile of those, µs, and how many of all stores \
        stalled, the worst of each figure over the writers and repetitions; then the same three figures with \
        each store's wait for a CPU once woken taken off (its thread's run_delay: on a machine with fewer \
        CPUs than busy threads, the wake-up can take milliseconds). Stores during which a writer was only \
        preempted (its CPU taken by another thread) are left out and counted in report.json (preempted)."
    )
}

/// Experiment 1's writer stalls, when it ran with writers: one cell per migrator and folio
/// size.
fn stall_table(t: &Throughput, report: &BenchReport) -> Option<TextTable> {
    let writers = report.config.writers;
    let rows: Vec<Vec<TableCell>> = t
        .rows
        .iter()
        .filter(|row| row.cells.iter().any(|c| c.writer_stalls.is_some()))
        .map(|row| {
            let mut cells = vec![TableCell::new(row.migrator.to_string())];
            cells.extend(row.cells.iter().map(stall_cell));
            cells
        })
        .collect();
    if writers == 0 || rows.is_empty() {
        return None;
    }
    let mut header = vec!["migrator".to_string()];
    header.extend(t.folio_sizes.iter().map(|&f| folio_label(f)));
    Some(TextTable {
        title: format!(
            "Writer stall (µs: max / p99.9 / p99 of the stores that waited, and how many did), {} moved, batch ≤ \
            {} pages, {writers} writer(s)",
            short_size(t.bytes),
            t.batch_pages
        ),
        header,
        rows,
        notes: vec![stall_note(writers)],
        conclusions: Vec::new(),
    })
}

fn sweep_tables(s: &Sweep, report: &BenchReport) -> Vec<TextTable> {
    let mut out = Vec::new();
    for folio in s.folio_sizes() {
        for pipelined in [true, false] {
            let migrators = s.migrators();
            let title = format!(
                "Batch-size sweep, {} folios, {}: GB/s (end to end, mean) | first-folio latency µs (median / p99 \
                 over batches); {} moved, {} per point",
                folio_label(folio),
                if pipelined { "pipelined move" } else { "move after the whole batch is copied" },
                short_size(s.bytes),
                runs(report.config.sweep_reps)
            );
            let stalls = report.config.writers > 0;
            let mut header = vec!["N (pages)".to_string()];
            for m in &migrators {
                header.push(format!("{m} GB/s"));
                header.push(format!("{m} first µs"));
                if stalls {
                    header.push(format!("{m} stall µs"));
                }
            }
            let mut rows = Vec::new();
            for &batch in &s.batch_pages {
                let mut row = vec![TableCell::new(batch.to_string())];
                for &m in &migrators {
                    match s.point(folio, m, pipelined, batch) {
                        Some(p) if !p.cell.ok => {
                            row.push(failed_cell(&p.cell));
                            row.push(TableCell::failed("-"));
                            if stalls {
                                row.push(TableCell::failed("-"));
                            }
                        }
                        Some(p) => {
                            row.push(
                                p.cell.gbps.map_or(TableCell::new("-"), |g| {
                                    TableCell::summarised(format!("{:.2}", g.mean), &g)
                                }),
                            );
                            row.push(TableCell::new(match (p.first_folio_us, p.first_folio_p99_us) {
                                (Some(a), Some(b)) => format!("{} / {}", micros(a), micros(b)),
                                _ => "-".into(),
                            }));
                            if stalls {
                                row.push(stall_cell(&p.cell));
                            }
                        }
                        None => {
                            row.push(TableCell::new("-"));
                            row.push(TableCell::new("-"));
                            if stalls {
                                row.push(TableCell::new("-"));
                            }
                        }
                    }
                }
                rows.push(row);
            }
            out.push(TextTable { title, header, rows, notes: Vec::new(), conclusions: Vec::new() });
        }
    }
    let noisy = out.iter().any(|t| any_noisy(&t.rows));
    if let Some(last) = out.last_mut() {
        last.notes.push(
            "First-folio latency: from the start of a batch's unmap phase until its first folio is writable again."
                .into(),
        );
        if report.config.writers > 0 {
            last.notes.push(stall_note(report.config.writers));
        }
        if noisy {
            last.notes.push(noisy_note());
        }
    }
    out
}

fn scatter_table(report: &BenchReport) -> Option<TextTable> {
    let s = report.scattered.as_ref()?;
    let title = format!(
        "Scattered folios ({}, batch ≤ {} pages): every other folio of a region against the whole region; mean over \
         {}",
        s.migrator,
        s.batch_pages,
        runs(report.config.reps)
    );
    let header = [
        "folio",
        "region",
        "all: folios",
        "all: runs",
        "all: GB/s",
        "all: critical-path µs/folio",
        "every other: folios",
        "every other: runs",
        "every other: GB/s",
        "every other: critical-path µs/folio",
        "µs per run (move)",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<TableCell>> = s
        .rows
        .iter()
        .map(|r| {
            let mut row = vec![TableCell::new(folio_label(r.folio_size)), TableCell::new(short_size(r.region_bytes))];
            for case in [&r.contiguous, &r.scattered] {
                row.push(TableCell::new(case.folios.to_string()));
                if case.cell.ok {
                    row.push(TableCell::new(case.runs.map_or("-".into(), |v| format!("{v:.0}"))));
                    row.push(case.cell.gbps.map_or(TableCell::new("-"), |g| TableCell::summarised(mean_sd(&g), &g)));
                    row.push(
                        case.us_per_folio
                            .map_or(TableCell::new("-"), |u| TableCell::summarised(format!("{:.2}", u.mean), &u)),
                    );
                } else {
                    row.push(failed_cell(&case.cell));
                    row.push(TableCell::failed("-"));
                    row.push(TableCell::failed("-"));
                }
            }
            let per_run = r.scattered.move_us_per_run.filter(|_| r.scattered.cell.ok);
            row.push(TableCell::new(per_run.map_or("-".into(), |u| format!("{:.1}", u.mean))));
            row
        })
        .collect();
    let mut notes = vec![
        "A run is a stretch of contiguous folios write-protected with one call and moved with one mremap (the \
         pipelined move may move it in pieces as its copy completes); every other folio makes each folio a run of \
         its own. GB/s: end to end (the whole call); µs/folio: the critical path (unmap + copy + move) per folio. The \
         region is capped so that the scattered case stays within vm.max_map_count."
            .into(),
    ];
    if any_noisy(&rows) {
        notes.push(noisy_note());
    }
    Some(TextTable { title, header, rows, notes, conclusions: Vec::new() })
}

/// Every table of `report`, in order: throughput (end to end, then the critical path), the
/// sweep, the scattered folios; the last table of each experiment carries its
/// [`conclusions`].
pub fn tables(report: &BenchReport) -> Vec<TextTable> {
    let concluded = conclusions(report);
    let mut out = Vec::new();
    let with = |mut tables: Vec<TextTable>, sentences: Vec<String>| {
        if let Some(last) = tables.last_mut() {
            last.conclusions = sentences;
        }
        tables
    };
    if let Some(t) = &report.throughput {
        let mut both = vec![throughput_table(t, true, report), throughput_table(t, false, report)];
        both.extend(stall_table(t, report));
        out.extend(with(both, concluded.throughput));
    }
    if let Some(s) = &report.sweep {
        out.extend(with(sweep_tables(s, report), concluded.sweep));
    }
    out.extend(with(scatter_table(report).into_iter().collect(), concluded.scattered));
    out
}

/// The RFC's published numbers as tables (for the HTML page).
pub fn reference_tables(r: &Reference) -> Vec<TextTable> {
    let mut out = Vec::new();
    let mut folios: Vec<u64> = r.throughput.rows.iter().map(|x| x.folio_kib).collect();
    folios.sort_unstable();
    folios.dedup();
    let mut paths: Vec<(String, u32)> = r.throughput.rows.iter().map(|x| (x.path.clone(), x.channels)).collect();
    paths.dedup();
    let mut header = vec!["path".to_string()];
    header.extend(folios.iter().map(|&k| folio_label(k << 10)));
    let rows = paths
        .iter()
        .map(|(path, ch)| {
            let mut row = vec![TableCell::new(if *ch == 0 { path.clone() } else { format!("{path} {ch} ch") })];
            for &k in &folios {
                let v = r.throughput.rows.iter().find(|x| &x.path == path && x.channels == *ch && x.folio_kib == k);
                row.push(TableCell::new(v.map_or("-".into(), |v| format!("{:.2}±{:.2}", v.gbps, v.stddev))));
            }
            row
        })
        .collect();
    out.push(TextTable {
        title: format!("Reference, {}: {}", r.source, r.throughput.comment),
        header,
        rows,
        notes: Vec::new(),
        conclusions: Vec::new(),
    });
    let channels = r.sweep_channels();
    let mut batch: Vec<(u64, u64)> = r.first_folio.rows.iter().map(|x| (x.folio_kib, x.batch_pages)).collect();
    batch.sort_unstable();
    batch.dedup();
    let mut header = vec!["folio".to_string(), "N (pages)".to_string()];
    for c in &channels {
        header.push(format!("dma{c} GB/s"));
        header.push(format!("dma{c} first µs"));
    }
    let rows = batch
        .iter()
        .map(|&(k, n)| {
            let mut row = vec![TableCell::new(folio_label(k << 10)), TableCell::new(n.to_string())];
            for &c in &channels {
                let v = r.first_folio.rows.iter().find(|x| x.folio_kib == k && x.batch_pages == n && x.channels == c);
                row.push(TableCell::new(v.map_or("-".into(), |v| format!("{:.2}", v.gbps))));
                row.push(TableCell::new(v.map_or("-".into(), |v| micros(v.first_us))));
            }
            row
        })
        .collect();
    out.push(TextTable {
        title: format!("Reference: {}", r.first_folio.comment),
        header,
        rows,
        notes: Vec::new(),
        conclusions: Vec::new(),
    });
    let rows = r
        .vanilla_n
        .rows
        .iter()
        .map(|x| {
            vec![
                TableCell::new(folio_label(x.folio_kib << 10)),
                TableCell::new(x.n_folios.to_string()),
                TableCell::new(format!("{:.2}", x.gbps)),
                TableCell::new(micros(x.first_us)),
            ]
        })
        .collect();
    out.push(TextTable {
        title: format!("Reference: {}", r.vanilla_n.comment),
        header: ["folio", "n (folios per call)", "GB/s", "first µs"].map(String::from).to_vec(),
        rows,
        notes: Vec::new(),
        conclusions: Vec::new(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_ways() {
        let t = TextTable {
            title: "T <1>".into(),
            header: vec!["a".into(), "b".into()],
            rows: vec![vec![TableCell::new("x"), TableCell::failed("FAILED 1/2")]],
            notes: vec!["n".into()],
            conclusions: Vec::new(),
        };
        let term = t.to_terminal();
        assert!(term.starts_with("T <1>\n") && term.contains("FAILED 1/2") && term.ends_with("  n\n"));
        let html = t.to_html();
        assert!(html.contains("<caption>T &lt;1&gt;</caption>"));
        assert!(html.contains("<td class=\"failed\">FAILED 1/2</td>"));
        let t = TextTable { conclusions: vec!["one two three four".into()], ..t };
        assert!(t.to_terminal().ends_with("  n\nWhat to conclude:\n  one two three four\n"));
        assert!(!t.to_html().contains("one two"), "the page shows conclusions at the top of the section");
        assert_eq!(wrap("one two three four", 9, "> "), "> one two\n> three\n> four\n");
        assert_eq!(micros(253.4), "253");
        assert_eq!(micros(12.34), "12.3");
    }

    /// With writers, experiment 1 gets a table of their stalls, each cell the worst figures
    /// over its repetitions; without, none.
    #[test]
    fn writer_stalls_get_a_table_of_their_own() {
        use crate::report::model::sample::{report, throughput};
        use pagemig::workload::Stalls;

        let mut t = throughput(&[4096, 2 << 20], &[(MigratorSpec::Cpu, vec![2.0, 8.0])]);
        assert!(tables(&report(Some(t.clone()), None, None)).iter().all(|t| !t.title.starts_with("Writer stall")));
        for (k, cell) in t.rows[0].cells.iter_mut().enumerate() {
            let mut ms = cell.measurements.clone();
            for (rep, m) in ms.iter_mut().enumerate() {
                let worst = 100_000 * (k as u64 + 1) * (rep as u64 + 1);
                // The worst store waited 50 µs of it for a CPU.
                m.writer_stalls = vec![
                    Stalls::split(1000, vec![(20_000, 0), (worst, 50_000)], &[5_000_000]),
                    Stalls::of(500, vec![30_000], &[]),
                ];
            }
            *cell = Cell::of(ms);
        }
        let mut r = report(Some(t), None, None);
        r.config.writers = 2;
        let all = tables(&r);
        let stall = all.iter().find(|t| t.title.starts_with("Writer stall")).expect("a stall table");
        assert_eq!(stall.header, ["migrator", "4K", "2M"]);
        // Three repetitions of two writers: 3 × (1000 + 500) stores, 3 × 3 waited; the worst
        // store 300 µs at 4 KiB, 600 µs at 2 MiB; the preempted 5 ms store left out.
        assert_eq!(stall.rows[0][1].text, "300 / 300 / 300 (9 of 4500); less CPU waits 250 / 250 / 250");
        assert_eq!(stall.rows[0][2].text, "600 / 600 / 600 (9 of 4500); less CPU waits 550 / 550 / 550");
        assert!(stall.notes[0].starts_with("Writer stall: 2 writer thread(s)"));
        // Words one space apart, however the source breaks its lines.
        assert!(!stall.title.contains("  ") && !stall.notes[0].contains("  "), "{stall:?}");
    }

    #[test]
    fn failed_runs_are_reported_as_failed() {
        use crate::report::model::{Measurement, Throughput, ThroughputRow};
        use crate::report::{BenchConfig, Machine};

        let good = |gbps| {
            let mut m = Measurement::failed(0, 1 << 20, String::new());
            (m.ok, m.error, m.gbps, m.critical_path_gbps) = (true, None, gbps, Some(gbps * 2.0));
            m
        };
        let bad = Measurement::failed(1, 1 << 20, "12 bytes differ".into());
        let report = BenchReport {
            pagemig_version: "0".into(),
            started_unix_s: 0,
            wall_s: 0.0,
            machine: Machine::probe(),
            config: BenchConfig::quick(0, 0),
            attributes: Default::default(),
            throughput: Some(Throughput {
                wall_s: 0.0,
                bytes: 1 << 20,
                batch_pages: 512,
                pipelined: true,
                folio_sizes: vec![4096, 2 << 20],
                rows: vec![ThroughputRow {
                    migrator: MigratorSpec::Cpu,
                    cells: vec![Cell::of(vec![good(2.0), bad]), Cell::of(vec![good(3.0), good(5.0)])],
                }],
                kernel_nodes: None,
                kernel_absent_reason: Some("kernel move_pages row absent: one node".into()),
            }),
            sweep: None,
            scattered: None,
            failed_measurements: 1,
            reference: Reference::embedded(),
        };
        let all = tables(&report);
        let t = &all[0];
        assert!(t.title.starts_with("Throughput, end to end"), "{}", t.title);
        assert_eq!(t.rows[0][1], TableCell::failed("FAILED 1/2"));
        // 3 and 5: a standard deviation of 35 % of the mean, flagged, with the legend.
        assert_eq!(t.rows[0][2], TableCell { text: "4.00±1.41 ⚠".into(), failed: false, noisy: true });
        assert!(t.notes.iter().any(|n| n.starts_with("⚠ noisy: the runs' standard deviation is above 25 % of")));
        assert!(
            t.to_html().contains("<td class=\"noisy\" title=\"noisy: see the note under the table\">4.00±1.41 ⚠</td>")
        );
        assert!(t.notes.iter().any(|n| n.starts_with("FAILED k/n")));
        assert!(t.notes.iter().any(|n| n.starts_with("kernel move_pages row absent: one node")));
        // The critical-path table comes second and reads the secondary figure.
        assert!(all[1].title.starts_with("Critical-path throughput"), "{}", all[1].title);
        assert_eq!(all[1].rows[0][2].text, "8.00±2.83 ⚠");
        // The conclusions follow the experiment's last table.
        assert!(all[0].conclusions.is_empty());
        assert_eq!(all[1].conclusions[0], "Fastest end to end (medians): cpu at 2M (4.00 GB/s; noisy cells, see ⚠).");
        // The plot leaves the failed cell out instead of drawing a partial mean.
        let fig = crate::report::plot::throughput_figure(&report).unwrap();
        assert_eq!(fig.panels[0].series[0].points, [(2048.0, 4.0, 2f64.sqrt())]);
    }

    #[test]
    fn reference_tables_hold_every_number() {
        let r = Reference::embedded();
        let t = reference_tables(&r);
        assert_eq!(t[0].rows.len(), 7);
        assert_eq!(t[0].rows[0][1].text, "3.31±0.18");
        assert_eq!(t[1].rows.len(), 20);
        assert_eq!(t[2].rows.len(), 19);
    }
}
