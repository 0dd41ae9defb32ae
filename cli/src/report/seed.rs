//! The RFC's published numbers (v5 thread), embedded from `data/seed/*.csv`: the reference
//! the report's plots draw as dashed series. They were measured in the kernel, with
//! `move_pages()` between two sockets and a PTDMA engine, so they show the *shape* to
//! expect (how throughput grows with folio size and channels, how first-folio latency grows
//! with the batch), not numbers this machine should match.

use serde::Serialize;

/// Where the reference numbers come from, as the plots label them.
pub const SOURCE: &str = "AMD Zen 3 EPYC, PTDMA (RFC v5 thread)";

const THROUGHPUT_CSV: &str = include_str!("../../data/seed/throughput-v5.csv");
const FIRST_FOLIO_CSV: &str = include_str!("../../data/seed/first-folio-v5.csv");
const VANILLA_N_CSV: &str = include_str!("../../data/seed/vanilla-n-v5.csv");

/// One CSV of reference numbers.
#[derive(Clone, Debug, Serialize)]
pub struct RefSet<T> {
    /// The file under `data/seed/`.
    pub file: String,
    /// The file's comment line: what was measured, how, on what.
    pub comment: String,
    /// The rows.
    pub rows: Vec<T>,
}

/// A throughput cell of the RFC's first table: 1 GiB moved as folios of one size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ThroughputRef {
    /// `vanilla` (the unpatched kernel's serial copy) or `dma` (dcbm).
    pub path: String,
    /// DMA channels (0 for vanilla).
    pub channels: u32,
    /// Folio size, KiB.
    pub folio_kib: u64,
    /// Mean throughput, GB/s.
    pub gbps: f64,
    /// Standard deviation, GB/s.
    pub stddev: f64,
}

/// A point of the RFC's batch-size sweep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FirstFolioRef {
    /// Folio size, KiB.
    pub folio_kib: u64,
    /// `NR_MAX_BATCHED_MIGRATION`, base pages.
    pub batch_pages: u64,
    /// DMA channels.
    pub channels: u32,
    /// Throughput, GB/s.
    pub gbps: f64,
    /// First-folio latency, µs.
    pub first_us: f64,
}

/// A point of the RFC's vanilla-kernel table: `n` folios per `move_pages()` call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VanillaNRef {
    /// Folio size, KiB.
    pub folio_kib: u64,
    /// Folios per call.
    pub n_folios: u64,
    /// Throughput, GB/s.
    pub gbps: f64,
    /// First-folio latency, µs.
    pub first_us: f64,
}

/// Every reference table.
#[derive(Clone, Debug, Serialize)]
pub struct Reference {
    /// The hardware and thread the numbers come from ([`SOURCE`]).
    pub source: String,
    /// The first table: throughput by folio size and channels.
    pub throughput: RefSet<ThroughputRef>,
    /// The second table: throughput and first-folio latency by batch size.
    pub first_folio: RefSet<FirstFolioRef>,
    /// The vanilla kernel against the number of folios per call.
    pub vanilla_n: RefSet<VanillaNRef>,
}

/// Splits CSV text into its comment (lines starting with `#`), header and rows.
fn split(text: &str) -> (String, Vec<&str>, Vec<Vec<&str>>) {
    let mut comment = Vec::new();
    let mut lines = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.strip_prefix('#') {
            Some(c) => comment.push(c.trim()),
            None => lines.push(line),
        }
    }
    let mut rows = lines.into_iter().map(|l| l.split(',').map(str::trim).collect::<Vec<_>>());
    let header = rows.next().unwrap_or_default();
    (comment.join(" "), header, rows.collect())
}

fn column(header: &[&str], name: &str) -> Option<usize> {
    header.iter().position(|h| *h == name)
}

/// Parses `throughput-v5.csv`; malformed rows are skipped.
pub fn parse_throughput(text: &str) -> RefSet<ThroughputRef> {
    let (comment, header, rows) = split(text);
    let cols = ["path", "channels", "folio_kib", "gbps", "stddev"].map(|c| column(&header, c));
    let rows = rows
        .iter()
        .filter_map(|r| {
            let get = |i: usize| cols[i].and_then(|c| r.get(c)).copied();
            Some(ThroughputRef {
                path: get(0)?.to_string(),
                channels: get(1)?.parse().ok()?,
                folio_kib: get(2)?.parse().ok()?,
                gbps: get(3)?.parse().ok()?,
                stddev: get(4)?.parse().ok()?,
            })
        })
        .collect();
    RefSet { file: "throughput-v5.csv".into(), comment, rows }
}

/// Parses `first-folio-v5.csv`, whose columns come in pairs `dmaN_gbps`, `dmaN_first_us`;
/// malformed rows are skipped.
pub fn parse_first_folio(text: &str) -> RefSet<FirstFolioRef> {
    let (comment, header, rows) = split(text);
    let (folio, batch) = (column(&header, "folio_kib"), column(&header, "batch_pages"));
    let channels: Vec<(u32, usize, usize)> = header
        .iter()
        .filter_map(|h| {
            let n: u32 = h.strip_prefix("dma")?.strip_suffix("_gbps")?.parse().ok()?;
            Some((n, column(&header, h)?, column(&header, &format!("dma{n}_first_us"))?))
        })
        .collect();
    let mut out = Vec::new();
    for r in &rows {
        let num = |c: Option<usize>| c.and_then(|c| r.get(c)).and_then(|v| v.parse::<f64>().ok());
        let (Some(folio_kib), Some(batch_pages)) = (num(folio), num(batch)) else { continue };
        for &(n, g, f) in &channels {
            if let (Some(gbps), Some(first_us)) = (num(Some(g)), num(Some(f))) {
                out.push(FirstFolioRef {
                    folio_kib: folio_kib as u64,
                    batch_pages: batch_pages as u64,
                    channels: n,
                    gbps,
                    first_us,
                });
            }
        }
    }
    RefSet { file: "first-folio-v5.csv".into(), comment, rows: out }
}

/// Parses `vanilla-n-v5.csv`; malformed rows are skipped.
pub fn parse_vanilla_n(text: &str) -> RefSet<VanillaNRef> {
    let (comment, header, rows) = split(text);
    let cols = ["folio_kib", "n_folios", "gbps", "first_us"].map(|c| column(&header, c));
    let rows = rows
        .iter()
        .filter_map(|r| {
            let get = |i: usize| cols[i].and_then(|c| r.get(c)).copied();
            Some(VanillaNRef {
                folio_kib: get(0)?.parse().ok()?,
                n_folios: get(1)?.parse().ok()?,
                gbps: get(2)?.parse().ok()?,
                first_us: get(3)?.parse().ok()?,
            })
        })
        .collect();
    RefSet { file: "vanilla-n-v5.csv".into(), comment, rows }
}

impl Reference {
    /// The embedded reference tables.
    pub fn embedded() -> Reference {
        Reference {
            source: SOURCE.into(),
            throughput: parse_throughput(THROUGHPUT_CSV),
            first_folio: parse_first_folio(FIRST_FOLIO_CSV),
            vanilla_n: parse_vanilla_n(VANILLA_N_CSV),
        }
    }

    /// The reference throughput for `path` (`vanilla` or `dma`) with `channels`, by folio
    /// size in KiB.
    pub fn throughput_series(&self, path: &str, channels: u32) -> Vec<(u64, f64)> {
        let mut v: Vec<(u64, f64)> = self
            .throughput
            .rows
            .iter()
            .filter(|r| r.path == path && r.channels == channels)
            .map(|r| (r.folio_kib, r.gbps))
            .collect();
        v.sort_by_key(|p| p.0);
        v
    }

    /// The reference sweep for `channels` at `folio_kib`: `(batch pages, GB/s, first µs)`.
    pub fn sweep_series(&self, folio_kib: u64, channels: u32) -> Vec<(u64, f64, f64)> {
        let mut v: Vec<(u64, f64, f64)> = self
            .first_folio
            .rows
            .iter()
            .filter(|r| r.folio_kib == folio_kib && r.channels == channels)
            .map(|r| (r.batch_pages, r.gbps, r.first_us))
            .collect();
        v.sort_by_key(|p| p.0);
        v
    }

    /// The channel counts of the reference sweep.
    pub fn sweep_channels(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.first_folio.rows.iter().map(|r| r.channels).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_tables_parse_whole() {
        let r = Reference::embedded();
        assert_eq!(r.throughput.rows.len(), 42);
        assert_eq!(r.first_folio.rows.len(), 60);
        assert_eq!(r.vanilla_n.rows.len(), 19);
        assert!(r.throughput.comment.contains("PTDMA"));
        assert!(r.first_folio.comment.contains("first-folio"));
        assert_eq!(r.throughput_series("vanilla", 0)[0], (4, 3.31));
        assert_eq!(r.throughput_series("dma", 16).last(), Some(&(2048, 65.23)));
        assert_eq!(r.sweep_series(2048, 16)[4], (8192, 58.72, 470.0));
        assert_eq!(r.sweep_channels(), [1, 4, 16]);
    }

    #[test]
    fn malformed_rows_are_skipped() {
        let t = parse_throughput("# c\npath,channels,folio_kib,gbps,stddev\ndma,1,4,2.1,0.1\ndma,x,4,2,0\n\n");
        assert_eq!(t.rows.len(), 1);
        assert_eq!(t.comment, "c");
        assert!(parse_first_folio("").rows.is_empty());
    }
}
