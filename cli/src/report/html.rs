//! `report.html`: one self-contained page with the machine, what to conclude, the tables,
//! the plots (SVG, inline) and the RFC's published numbers.
//!
//! Each experiment's section opens with its conclusions ([`crate::report::conclude`]),
//! computed from the run's medians, before the tables they rest on.

use std::fmt::Write as _;

use crate::report::Error;
use crate::report::conclude::conclusions;
use crate::report::model::BenchReport;
use crate::report::plot::PlotFiles;
use crate::report::runner::short_size;
use crate::report::table::{reference_tables, tables};

const STYLE: &str = "
body { font-family: 'DejaVu Sans', Verdana, sans-serif; margin: 2em auto; max-width: 1560px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0 0.3em 0; font-size: 0.85em; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.4em; max-width: 1200px; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f2f2f2; }
tbody th { text-align: left; font-weight: normal; white-space: nowrap; }
td.failed { color: #b00; font-weight: bold; background: #fee; }
td.noisy { background: #fff4cc; }
div.conclusion { background: #eef5ee; border-left: 4px solid #4a8a4a; padding: 0.5em 1em; margin: 1em 0; max-width: 1200px; }
div.conclusion p { margin: 0.3em 0; }
p.note { font-size: 0.85em; color: #555; margin: 0.2em 0; }
figure { margin: 1.5em 0; } figure svg { max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; } dd { margin: 0; }
.bad { color: #b00; font-weight: bold; }
";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn figure(out: &mut String, plots: &[PlotFiles], name: &str, caption: &str) {
    if let Some(p) = plots.iter().find(|p| p.name == name) {
        // The SVG document starts with an XML declaration, which cannot appear inline.
        let svg = p.svg_text.find("<svg").map_or(p.svg_text.as_str(), |i| &p.svg_text[i..]);
        let png = p.png.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = write!(
            out,
            "<figure>\n{svg}\n<figcaption>{} (also <a href=\"{}\">{}</a>)</figcaption>\n</figure>\n",
            escape(caption),
            escape(&png),
            escape(&png)
        );
    }
}

/// The conclusions of one experiment as a box; nothing when there are none.
fn conclusion(out: &mut String, sentences: &[String]) {
    if sentences.is_empty() {
        return;
    }
    out.push_str(
        "<div class=\"conclusion\">\n<p><strong>What to conclude</strong> (computed from this run's medians):</p>\n",
    );
    for s in sentences {
        let _ = writeln!(out, "<p>{}</p>", escape(s));
    }
    out.push_str("</div>\n");
}

fn wall_time(report: &BenchReport) -> String {
    let parts: Vec<String> = [
        ("throughput", report.throughput.as_ref().map(|t| t.wall_s)),
        ("sweep", report.sweep.as_ref().map(|s| s.wall_s)),
        ("scattered", report.scattered.as_ref().map(|s| s.wall_s)),
    ]
    .iter()
    .filter_map(|(name, s)| s.map(|s| format!("{name} {s:.1} s")))
    .collect();
    format!("{:.1} s ({})", report.wall_s, parts.join(", "))
}

/// The page.
///
/// # Errors
/// None today; the signature leaves room for embedding failures.
pub fn render(report: &BenchReport, plots: &[PlotFiles]) -> Result<String, Error> {
    let m = &report.machine;
    let c = &report.config;
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>pagemig bench</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<h1>pagemig bench: batched page migration with copy offload</h1>\n"
    );
    let _ = writeln!(
        out,
        "<p>The experiments of the RFC “Accelerate page migration with batch copying and hardware offload” (v5), \
         run with pagemig on this machine. Every number is a real migration of a freshly filled region, checked \
         byte for byte, write for write and page by page; a run that fails a check is marked FAILED and left out \
         of every mean. Dashed lines are the RFC's published numbers ({}), measured in the kernel on other \
         hardware: compare shapes, not values.</p>",
        escape(&report.reference.source)
    );
    out.push_str("<h2>Machine and run</h2>\n<dl>\n");
    let uffd = m.userfaultfd.map_or("unavailable".to_string(), |u| {
        if u.user_mode_only { "user-mode faults only".into() } else { "kernel and user faults".into() }
    });
    let nodes = m
        .nodes
        .iter()
        .map(|n| format!("node {}: {} CPUs, {:.1} GiB", n.id, n.cpus.len(), n.mem_total as f64 / (1u64 << 30) as f64))
        .collect::<Vec<_>>()
        .join("; ");
    let failed = if report.failed_measurements > 0 {
        format!("<span class=\"bad\">{} failed</span>", report.failed_measurements)
    } else {
        "none failed".to_string()
    };
    let rows: Vec<(&str, String)> = vec![
        ("CPU", escape(&m.cpu_model)),
        ("cores", m.cores.to_string()),
        ("NUMA nodes", escape(&nodes)),
        ("kernel", escape(&m.kernel)),
        ("transparent huge pages", escape(&m.thp)),
        ("userfaultfd", uffd),
        ("vm.max_map_count", m.max_map_count.to_string()),
        ("pagemig", escape(&report.pagemig_version)),
        (
            "run",
            format!(
                "{}{} moved node {} → {}",
                if c.quick { "quick, " } else { "" },
                short_size(c.size as u64),
                c.from_node,
                c.to_node
            ),
        ),
        ("repetitions", format!("{} (sweep: {})", c.reps, c.sweep_reps)),
        ("writers during each migration", c.writers.to_string()),
        ("reason / mode", format!("{} / {:?}", c.reason, c.mode)),
        ("measurements", format!("{} ({failed})", report.measurements().count())),
        ("wall time", wall_time(report)),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "<dt>{k}</dt><dd>{v}</dd>");
    }
    out.push_str("</dl>\n");
    if !report.attributes.is_empty() {
        out.push_str("<p class=\"note\">Attributes at the start: ");
        let attrs: Vec<String> = report.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&escape(&attrs.join(", ")));
        out.push_str("</p>\n");
    }

    let all = tables(report);
    let concluded = conclusions(report);
    let mut rest = all.iter();
    if report.throughput.is_some() {
        out.push_str("<h2>1. Throughput by folio size</h2>\n");
        conclusion(&mut out, &concluded.throughput);
        out.push_str(
            "<p>The RFC's first table: the same bytes moved as folios of 4 KiB … 2 MiB, by the serial CPU copy \
             (<code>cpu</code>), the multi-threaded copy (<code>mtcopy</code>) and the DMA migrator \
             (<code>dcbm</code>), and by the kernel's own <code>move_pages(2)</code> (<code>kernel \
             move_pages</code>, the RFC's vanilla baseline, measured in the same run where the machine has two \
             memory nodes). The headline figure is <em>end to end</em>: the bytes over the whole migration a \
             caller waits for, destination preparation included. The RFC timed whole <code>move_pages()</code> \
             calls, which allocate the destinations, so its numbers (dashed) are drawn in the end-to-end panel \
             only. The second table and panel show pagemig's critical path, excluding destination preparation \
             (unmap, copy and move, overlapping where a mover thread runs). Two yardsticks are measured in the \
             same run as the <code>cpu</code> row: a plain <code>memcpy</code> between prepared buffers, and \
             <code>UFFDIO_COPY</code> of the same bytes into a fresh mapping bound to the target node, which \
             allocates and fills each page without zeroing it (4 KiB pages whatever the folio size), the \
             closest user-space stand-in for the kernel's allocate-and-copy.</p>\n",
        );
        if let Some(why) = report.throughput.as_ref().and_then(|t| t.kernel_absent_reason.as_ref()) {
            let _ = writeln!(out, "<p class=\"note\"><strong>{}.</strong></p>", escape(why));
        }
        for t in rest.by_ref().take(2) {
            out.push_str(&t.to_html());
        }
        figure(&mut out, plots, "throughput", "Throughput by folio size, log axes.");
    }
    if let Some(s) = &report.sweep {
        out.push_str("<h2>2. Batch size: throughput against first-folio latency</h2>\n");
        conclusion(&mut out, &concluded.sweep);
        out.push_str(
            "<p>The review's question: what does a larger batch (<code>max_batch_pages</code>, the kernel's \
             <code>NR_MAX_BATCHED_MIGRATION</code>) buy in throughput, and what does it cost the first folio of \
             each batch, from the start of the batch's unmap until that folio is writable again? Without \
             pipelining, every folio waits for the whole batch copy, so latency grows with the batch, as in the \
             RFC's numbers; the pipelined move moves each part as soon as it is copied.</p>\n",
        );
        let n = s.folio_sizes().len() * 2;
        for t in rest.by_ref().take(n) {
            out.push_str(&t.to_html());
        }
        figure(&mut out, plots, "first-folio", "First-folio latency against batch size, log axes.");
        figure(&mut out, plots, "batch-throughput", "Throughput against batch size, log axes.");
    }
    if report.scattered.is_some() {
        out.push_str("<h2>3. Scattered folios</h2>\n");
        conclusion(&mut out, &concluded.scattered);
        out.push_str(
            "<p>Every other folio of a region, so that no two migrated folios are adjacent: each one is a run of \
             its own, with its own write-protect call and <code>mremap</code>, where the whole region moves as a \
             few runs. The difference is the per-run cost, which dominates for small folios.</p>\n",
        );
        for t in rest.by_ref() {
            out.push_str(&t.to_html());
        }
        figure(&mut out, plots, "scattered", "Scattered against contiguous folios, log axes.");
    }
    out.push_str("<h2>Reference: the RFC's published numbers</h2>\n");
    let _ = writeln!(
        out,
        "<p>From the RFC v5 thread, measured on {} with <code>move_pages()</code> between two sockets \
         (embedded from <code>data/seed/</code>).</p>",
        escape(&report.reference.source)
    );
    for t in reference_tables(&report.reference) {
        out.push_str(&t.to_html());
    }
    out.push_str("</body>\n</html>\n");
    Ok(out)
}
