//! `pagemig placement --pid PID`: where a process's memory is, mapping by mapping and node
//! by node (the question `numastat -p` answers), from `/proc/PID/numa_maps` and
//! `/proc/PID/maps`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use comfy_table::Table;
use serde::Serialize;

/// Options of `pagemig placement`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The process to look at.
    #[arg(long)]
    pid: i32,
    /// Print one JSON object instead of tables: `--json` (or `--json=pretty`) indented,
    /// `--json=compact` on one line.
    #[arg(long, value_name = "STYLE", num_args = 0..=1, require_equals = true, default_missing_value = "pretty")]
    json: Option<crate::JsonStyle>,
    /// List every mapping, also those with no pages present.
    #[arg(long)]
    all: bool,
}

/// One mapping of the process and its pages per node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mapping {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// `heap`, `stack`, `anon`, `file`, `shared`, `huge` (hugetlbfs) or a special name.
    pub kind: String,
    /// The file or pseudo-name (`[anon:name]`), if any.
    pub path: Option<String>,
    /// The memory policy as numa_maps prints it (`default`, `bind:1`, `interleave:0-1`).
    pub policy: String,
    /// The size of the pages counted, in KiB.
    pub page_kib: u64,
    /// Pages present per node.
    pub pages: BTreeMap<u32, u64>,
}

impl Mapping {
    /// Bytes present on `node`.
    pub fn bytes_on(&self, node: u32) -> u64 {
        self.pages.get(&node).copied().unwrap_or(0) * self.page_kib * 1024
    }

    /// What the mapping is, as the tables print it: `heap`, `file /usr/lib/…`,
    /// `anon [anon:name]`.
    pub fn describe(&self) -> String {
        match (&self.path, self.kind.as_str()) {
            (Some(path), "file" | "shared" | "anon") => format!("{} {path}", self.kind),
            _ => self.kind.clone(),
        }
    }

    /// The `numastat -p` row this mapping's pages count in.
    pub fn category(&self) -> &'static str {
        match self.kind.as_str() {
            "huge" => "Huge",
            "heap" => "Heap",
            "stack" => "Stack",
            _ => "Private",
        }
    }
}

/// Where a process's memory is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Placement {
    /// The process.
    pub pid: i32,
    /// The nodes any page is on.
    pub nodes: Vec<u32>,
    /// Every mapping numa_maps lists.
    pub mappings: Vec<Mapping>,
    /// MiB per node in `numastat -p`'s rows (Huge, Heap, Stack, Private, Total).
    pub totals_mib: BTreeMap<String, BTreeMap<u32, f64>>,
}

/// Parses `/proc/PID/numa_maps` with the ends and paths `/proc/PID/maps` gives.
pub fn parse(pid: i32, numa_maps: &str, maps: &str) -> anyhow::Result<Placement> {
    let mut ends: BTreeMap<usize, (usize, String)> = BTreeMap::new();
    for line in maps.lines() {
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(_perms)) = (it.next(), it.next()) else { continue };
        let path = it.nth(3).unwrap_or("").trim().to_string();
        if let Some((s, e)) = range.split_once('-')
            && let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
        {
            ends.insert(s, (e, path));
        }
    }
    let mut mappings = Vec::new();
    for line in numa_maps.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split(' ');
        let start = words.next().and_then(|a| usize::from_str_radix(a, 16).ok());
        let start = start.with_context(|| format!("numa_maps line {line:?}: no address"))?;
        let rest: Vec<&str> = words.collect();
        // The policy may hold spaces (`prefer (many):0-1`): it runs up to the first field.
        let policy_words = rest.iter().take_while(|w| !w.contains('=') && !["heap", "stack", "huge"].contains(w));
        let policy = policy_words.copied().collect::<Vec<_>>().join(" ");
        let mut m = Mapping {
            start,
            end: ends.get(&start).map_or(start, |(e, _)| *e),
            kind: "anon".into(),
            path: ends.get(&start).map(|(_, p)| p.clone()).filter(|p| !p.is_empty()),
            policy,
            page_kib: 4,
            pages: BTreeMap::new(),
        };
        let mut file = false;
        for w in &rest {
            match w.split_once('=') {
                Some(("file", path)) => {
                    file = true;
                    m.path = Some(path.to_string());
                }
                Some(("kernelpagesize_kB", k)) => m.page_kib = k.parse().unwrap_or(4),
                Some((n, count)) if n.starts_with('N') => {
                    if let (Ok(node), Ok(count)) = (n[1..].parse::<u32>(), count.parse::<u64>()) {
                        m.pages.insert(node, count);
                    }
                }
                None if ["heap", "stack", "huge"].contains(w) => m.kind = (*w).to_string(),
                _ => {}
            }
        }
        if m.kind == "anon" {
            let special = m.path.as_deref().filter(|p| p.starts_with('[') && !p.starts_with("[anon:"));
            m.kind = match special {
                Some(p) => p.trim_matches(['[', ']']).to_string(),
                None if file
                    && m.path.as_deref().is_some_and(|p| p.starts_with("/SYSV") || p.starts_with("/dev/shm")) =>
                {
                    "shared".into()
                }
                None if file => "file".into(),
                None => "anon".into(),
            };
        }
        mappings.push(m);
    }
    let nodes: Vec<u32> = {
        let mut n: Vec<u32> = mappings.iter().flat_map(|m| m.pages.keys().copied()).collect();
        n.sort_unstable();
        n.dedup();
        n
    };
    let mut totals_mib: BTreeMap<String, BTreeMap<u32, f64>> = BTreeMap::new();
    for row in ["Huge", "Heap", "Stack", "Private", "Total"] {
        totals_mib.insert(row.into(), nodes.iter().map(|&n| (n, 0.0)).collect());
    }
    for m in &mappings {
        for &n in &nodes {
            let mib = m.bytes_on(n) as f64 / (1 << 20) as f64;
            *totals_mib.get_mut(m.category()).expect("row").get_mut(&n).expect("node") += mib;
            *totals_mib.get_mut("Total").expect("row").get_mut(&n).expect("node") += mib;
        }
    }
    Ok(Placement { pid, nodes, mappings, totals_mib })
}

/// Reads process `pid`'s placement.
pub fn read(pid: i32) -> anyhow::Result<Placement> {
    let file = |name: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{name}")).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!("no process {pid}"),
            std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                "not permitted to read /proc/{pid}/{name}: the kernel shows a process's placement to its own \
                 user (real ids) or to CAP_SYS_PTRACE"
            ),
            _ => anyhow::anyhow!("reading /proc/{pid}/{name}: {e}"),
        })
    };
    let numa_maps = file("numa_maps")?;
    let maps = file("maps")?;
    parse(pid, &numa_maps, &maps)
}

/// `pagemig placement`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let p = read(args.pid)?;
    if let Some(style) = args.json {
        crate::print_json(&serde_json::to_value(&p)?, style)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    let mut header = vec!["range".to_string(), "kind".into(), "policy".into()];
    header.extend(p.nodes.iter().map(|n| format!("node {n} (pages)")));
    header.push("page".into());
    t.set_header(header);
    for m in p.mappings.iter().filter(|m| args.all || !m.pages.is_empty()) {
        let mut row = vec![format!("{:x}-{:x}", m.start, m.end), m.describe(), m.policy.clone()];
        row.extend(p.nodes.iter().map(|n| m.pages.get(n).map_or("".into(), u64::to_string)));
        row.push(format!("{}K", m.page_kib));
        t.add_row(row);
    }
    if p.mappings.is_empty() {
        // A kernel thread, or a process on its way out.
        println!("process {} has no user-space mappings", p.pid);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{t}");
    let mut totals = Table::new();
    let mut header = vec![format!("Per-node process memory usage (in MiB) for PID {}", p.pid)];
    header.extend(p.nodes.iter().map(|n| format!("Node {n}")));
    header.push("Total".into());
    totals.set_header(header);
    for cells in totals_rows(&p) {
        totals.add_row(cells);
    }
    println!("{totals}");
    Ok(ExitCode::SUCCESS)
}

/// The rows of the per-node totals, as `numastat -p` prints them: MiB per node, then the
/// total.
fn totals_rows(p: &Placement) -> Vec<Vec<String>> {
    ["Huge", "Heap", "Stack", "Private", "Total"]
        .iter()
        .map(|row| {
            let per = &p.totals_mib[*row];
            let mut cells = vec![row.to_string()];
            cells.extend(p.nodes.iter().map(|n| format!("{:.2}", per[n])));
            // Summed from +0.0: `Iterator::sum` of no floats is -0.0, printed `-0.00`.
            cells.push(format!("{:.2}", per.values().fold(0.0, |a, b| a + b)));
            cells
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NUMA_MAPS: &str = "\
559c127de000 default file=/usr/bin/cat mapped=2 N0=2 kernelpagesize_kB=4
559c44d83000 default heap anon=4 dirty=4 active=0 N0=4 kernelpagesize_kB=4
7f5e317cd000 bind:1 anon=768 dirty=768 N0=256 N1=512 kernelpagesize_kB=4
7f5e318cd000 prefer (many):0-1 anon=1 dirty=1 N1=1 kernelpagesize_kB=4
7f5e400000 default file=/anon_hugepage\\040(deleted) huge anon=2 dirty=2 N1=2 kernelpagesize_kB=2048
7ffd1a2b3000 default stack anon=33 dirty=33 N0=33 kernelpagesize_kB=4
7ffd1a3f0000 default
";
    const MAPS: &str = "\
559c127de000-559c127e0000 r--p 00000000 08:01 1234 /usr/bin/cat
559c44d83000-559c44da4000 rw-p 00000000 00:00 0 [heap]
7f5e317cd000-7f5e318cd000 rw-p 00000000 00:00 0
7f5e318cd000-7f5e318ce000 rw-p 00000000 00:00 0 [anon:buffers]
7f5e400000-7f5ec00000 rw-p 00000000 00:0f 99 /anon_hugepage (deleted)
7ffd1a2b3000-7ffd1a2d4000 rw-p 00000000 00:00 0 [stack]
7ffd1a3f0000-7ffd1a3f2000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn numa_maps_read_as_numastat_counts_them() {
        let p = parse(42, NUMA_MAPS, MAPS).unwrap();
        assert_eq!(p.nodes, vec![0, 1]);
        assert_eq!(p.mappings.len(), 7);
        let anon = &p.mappings[2];
        assert_eq!((anon.start, anon.end, anon.kind.as_str()), (0x7f5e317cd000, 0x7f5e318cd000, "anon"));
        assert_eq!(anon.policy, "bind:1");
        assert_eq!(anon.pages, BTreeMap::from([(0, 256), (1, 512)]));
        assert_eq!(p.mappings[3].policy, "prefer (many):0-1");
        assert_eq!(p.mappings[3].path.as_deref(), Some("[anon:buffers]"));
        assert_eq!(p.mappings[0].kind, "file");
        assert_eq!(p.mappings[1].kind, "heap");
        assert_eq!(p.mappings[4].kind, "huge");
        assert_eq!(p.mappings[5].kind, "stack");
        assert_eq!(p.mappings[6].kind, "vdso");
        assert!(p.mappings[6].pages.is_empty());
        let t = &p.totals_mib;
        assert_eq!(t["Huge"][&1], 4.0);
        assert_eq!(t["Heap"][&0], 4.0 * 4096.0 / (1 << 20) as f64);
        assert_eq!(t["Private"][&1], (512.0 + 1.0) * 4096.0 / (1 << 20) as f64);
        let total: f64 = ["Huge", "Heap", "Stack", "Private"].iter().map(|r| t[*r][&0]).sum();
        assert_eq!(t["Total"][&0], total);
    }

    #[test]
    fn a_process_without_mappings_totals_zero_not_minus_zero() {
        // A kernel thread's numa_maps and maps are empty.
        let p = parse(2, "", "").unwrap();
        assert!(p.mappings.is_empty() && p.nodes.is_empty());
        let rows = totals_rows(&p);
        assert_eq!(rows.len(), 5);
        assert!(rows.iter().all(|r| r[1] == "0.00"), "{rows:?}");
        let one = parse(42, NUMA_MAPS, MAPS).unwrap();
        assert!(totals_rows(&one).iter().flatten().all(|c| !c.starts_with('-')), "{:?}", totals_rows(&one));
    }

    #[test]
    fn this_process_reads_its_own_placement() {
        let p = read(std::process::id() as i32).unwrap();
        assert!(p.mappings.iter().any(|m| m.kind == "stack" && !m.pages.is_empty()));
        assert!(read(i32::MAX).unwrap_err().to_string().contains("no process"));
    }
}
