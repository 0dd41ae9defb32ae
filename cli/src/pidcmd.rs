//! `pagemig move --pid PID`: migrate a running process's memory, through its agent
//! (pagemig's batched copy, inside the process) when it has one, else with the kernel's
//! `migrate_pages(2)` or `move_pages(2)` from here, as `migratepages` does.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use comfy_table::Table;
use pagemig::agent::{self, MoveRequest, Report};
use pagemig::{Errno, Error, numa};
use serde::Serialize;

use crate::placement;

/// The options `pagemig move` takes for another process.
#[derive(clap::Args, Debug)]
pub struct PidArgs {
    /// Migrate the memory of this running process (all its private anonymous memory, or
    /// --range) to --to-node, instead of a region of pagemig's own; with --from-node, only
    /// pages now on that node. Through the process's agent when it has one (pagemig's
    /// batched copy), else the kernel's migrate_pages(2) or move_pages(2).
    #[arg(long)]
    pub pid: Option<i32>,
    /// With --pid: only this address range, hex START-END as /proc/PID/maps prints it
    /// (0x7f00a000-0x7f10a000); every page of it moves, whatever its mapping.
    #[arg(long, requires = "pid", value_parser = parse_range)]
    pub range: Option<Range>,
    /// With --pid: the kernel's calls even if the process has an agent.
    #[arg(long, requires = "pid")]
    pub no_agent: bool,
    /// With --pid: seconds to wait for the agent's reply. The agent stops moving half-way
    /// through it (5 s short of it past 10 s) and reports the pages it had not reached,
    /// which stay where they are.
    #[arg(long, requires = "pid", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub agent_timeout: u64,
    /// With --pid: list every mapping of the process, in address order: its route (pagemig,
    /// kernel, internal: pagemig's own, left alone; none: not private anonymous memory,
    /// which the agent does not move), the pages moved to the target, and what it is.
    #[arg(long, requires = "pid")]
    pub detail: bool,
}

/// An address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range(pub usize, pub usize);

fn parse_range(s: &str) -> Result<Range, String> {
    agent::parse_range(s).map(|(a, b)| Range(a, b)).map_err(|e| e.to_string())
}

/// What `move --pid` did, whichever path it took.
#[derive(Debug, Default, Serialize)]
struct Outcome {
    pid: i32,
    /// `agent` or `kernel`.
    path: &'static str,
    /// Why that path.
    why: String,
    /// For the kernel path: `migrate_pages` or `move_pages`.
    syscall: Option<&'static str>,
    to_node: u32,
    from_nodes: Option<Vec<u32>>,
    range: Option<String>,
    pages: u64,
    moved_pagemig: u64,
    moved_kernel: u64,
    already_there: u64,
    not_selected: u64,
    absent: u64,
    failed: u64,
    internal: u64,
    /// Pages the agent had not reached at its deadline (see --agent-timeout).
    not_reached: u64,
    /// Mappings pagemig moved, the kernel moved, left alone (agent path).
    mappings: Option<BTreeMap<&'static str, u64>>,
    /// Pages the kernel's migrate_pages(2) reported it could not move.
    not_moved: Option<u64>,
    /// MiB per node before and after (migrate_pages path, from numa_maps).
    before_mib: Option<BTreeMap<u32, f64>>,
    after_mib: Option<BTreeMap<u32, f64>>,
    time_us: u64,
    first_failure: Option<String>,
    /// With --detail: one line per mapping of the process (see [`detail_line`]).
    detail: Vec<String>,
    /// The agent's routes, mapping by mapping, from which `detail` is made.
    #[serde(skip)]
    detail_routes: Vec<agent::MappingReport>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.failed == 0 && self.not_reached == 0 && self.not_moved.unwrap_or(0) == 0
    }
}

/// `pagemig move --pid PID --to-node N [--from-node L] [--range A-B]`.
pub fn run(
    args: &PidArgs,
    pid: i32,
    to_node: u32,
    from_node: Option<u32>,
    json: Option<crate::JsonStyle>,
) -> anyhow::Result<ExitCode> {
    numa::check_node(to_node)?;
    if pid <= 0 {
        bail!("--pid {pid}: a process id is positive");
    }
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process {pid}");
    }
    let from = from_node.map(|n| vec![n]);
    // The agent stops moving early enough to answer within the timeout: half of it, or
    // 5 s short of it when it is longer than 10 s.
    let timeout = Duration::from_secs(args.agent_timeout);
    let mut request =
        MoveRequest::new(to_node).detail(args.detail).deadline(timeout - (timeout / 2).min(Duration::from_secs(5)));
    if let Some(f) = &from {
        request = request.from_nodes(f.clone());
    }
    if let Some(Range(a, b)) = args.range {
        request = request.range(a, b);
    }
    let why = if args.no_agent {
        "--no-agent".to_string()
    } else {
        match agent::request_move(pid as u32, &request, Duration::from_secs(args.agent_timeout)) {
            Ok(report) => {
                let mut outcome = agent_outcome(pid, &request, report);
                if args.detail {
                    outcome.detail = agent_detail(pid, &outcome.detail_routes, args.range);
                }
                return finish(outcome, json);
            }
            Err(Error::Agent { errno, message, .. })
                if [Errno::CONNREFUSED, Errno::NOENT, Errno::ADDRINUSE].contains(&errno) =>
            {
                message
            }
            Err(Error::Agent { errno, message, .. }) if [Errno::PERM, Errno::ACCESS].contains(&errno) => {
                bail!("the agent of process {pid} refused: {message}")
            }
            Err(e) => bail!("{e}"),
        }
    };
    let outcome = match args.range {
        Some(range) => kernel_move_pages(pid, &request, range, why, args.detail)?,
        None => kernel_migrate_pages(pid, &request, why, args.detail)?,
    };
    finish(outcome, json)
}

fn agent_outcome(pid: i32, request: &MoveRequest, r: Report) -> Outcome {
    Outcome {
        pid,
        path: "agent",
        why: format!("the process's agent answered on @{}", agent::socket_name(pid as u32)),
        syscall: None,
        to_node: request.to,
        from_nodes: request.from.clone(),
        range: request.range.map(|(a, b)| format!("{a:#x}-{b:#x}")),
        pages: r.pages,
        moved_pagemig: r.moved_pagemig,
        moved_kernel: r.moved_kernel,
        already_there: r.already_there,
        not_selected: r.not_selected,
        absent: r.absent,
        failed: r.failed,
        internal: r.internal,
        not_reached: r.not_reached,
        mappings: Some(BTreeMap::from([
            ("pagemig", r.mappings[0]),
            ("kernel", r.mappings[1]),
            ("internal", r.mappings[2]),
        ])),
        time_us: r.time_us,
        first_failure: r.first_failure.map(|(a, e)| format!("{a:#x}: {}", pagemig::RangeOutcome::meaning(e))),
        detail_routes: r.detail,
        ..Default::default()
    }
}

/// One line of `--detail`: a mapping (or the part of one a route took), the route, the
/// pages it moved to the target, and what it is or why it went that way.
fn detail_line(start: usize, end: usize, route: &str, moved: u64, what: &str) -> String {
    format!("{start:x}-{end:x} {route} moved={moved} {what}")
}

fn route_name(route: agent::Route) -> &'static str {
    match route {
        agent::Route::Pagemig => "pagemig",
        agent::Route::Kernel => "kernel",
        agent::Route::Internal => "internal",
    }
}

/// Whether mapping `m` overlaps `range` (every mapping when there is none).
fn in_range(m: &placement::Mapping, range: Option<Range>) -> bool {
    range.is_none_or(|Range(a, b)| m.start < b && a < m.end)
}

/// `--detail` on the agent's path: every mapping of the process in address order, those the
/// agent took with its route, and the others (file-backed, shared, inaccessible, special:
/// not private anonymous memory, which the agent does not move) with what they are. The
/// process's mappings are read from `/proc/PID/numa_maps`; where that is refused, the
/// agent's own list, and a line that says so.
fn agent_detail(pid: i32, routes: &[agent::MappingReport], range: Option<Range>) -> Vec<String> {
    let mut lines: Vec<(usize, String)> =
        routes.iter().map(|m| (m.start, detail_line(m.start, m.end, route_name(m.route), m.moved, &m.why))).collect();
    match placement::read(pid) {
        Ok(p) => {
            for m in p.mappings.iter().filter(|m| in_range(m, range)) {
                if !routes.iter().any(|r| r.start < m.end && m.start < r.end) {
                    // The agent takes every private anonymous mapping it can read.
                    let what = match m.kind.as_str() {
                        "anon" => format!("{}: inaccessible (a guard), not moved", m.describe()),
                        _ => format!("{}: not private anonymous memory, not moved", m.describe()),
                    };
                    lines.push((m.start, detail_line(m.start, m.end, "none", 0, &what)));
                }
            }
        }
        Err(e) => lines.push((usize::MAX, format!("(the mappings the agent did not take are not listed: {e:#})"))),
    }
    lines.sort_by_key(|(start, _)| *start);
    lines.into_iter().map(|(_, line)| line).collect()
}

/// `--detail` on the kernel's path: every mapping in `after` (those overlapping `range`
/// when there is one), with the pages the kernel moved there and the pages per node before
/// and after.
fn kernel_detail(
    before: Option<&placement::Placement>,
    after: &placement::Placement,
    to: u32,
    range: Option<Range>,
) -> Vec<String> {
    after
        .mappings
        .iter()
        .filter(|m| in_range(m, range))
        .map(|m| {
            let was = before.and_then(|b| b.mappings.iter().find(|o| o.start == m.start));
            let on = |m: &placement::Mapping| m.pages.get(&to).copied().unwrap_or(0);
            let moved = on(m).saturating_sub(was.map_or(on(m), on));
            let nodes = |m: &placement::Mapping| {
                let v: Vec<String> = m.pages.iter().map(|(n, c)| format!("N{n}={c}")).collect();
                if v.is_empty() { "none present".to_string() } else { v.join(" ") }
            };
            let pages = match was {
                Some(w) => format!("pages {} -> {}", nodes(w), nodes(m)),
                None => format!("pages {}", nodes(m)),
            };
            detail_line(m.start, m.end, "kernel", moved, &format!("{} ({pages})", m.describe()))
        })
        .collect()
}

/// Explains a kernel refusal of the whole call.
fn refused(pid: i32, call: &str, errno: Errno) -> anyhow::Error {
    match errno {
        Errno::SRCH => anyhow::anyhow!("{call}: no process {pid} (ESRCH)"),
        Errno::PERM | Errno::ACCESS => anyhow::anyhow!(
            "{call}: not permitted to migrate process {pid}'s memory ({errno}): the kernel requires this user's \
             real uid and gid to be the process's, or CAP_SYS_PTRACE (and CAP_SYS_NICE for nodes outside its cpuset)"
        ),
        _ => anyhow::anyhow!("{call} of process {pid}: {errno}"),
    }
}

/// Every page of the range, with `move_pages(PID, …)`.
fn kernel_move_pages(
    pid: i32,
    request: &MoveRequest,
    Range(start, end): Range,
    why: String,
    detail: bool,
) -> anyhow::Result<Outcome> {
    let before = if detail { placement::read(pid).ok() } else { None };
    const STEP: usize = 1 << 16;
    let started = Instant::now();
    let target = request.to as i32;
    let mut o = Outcome {
        pid,
        path: "kernel",
        why,
        syscall: Some("move_pages"),
        to_node: request.to,
        from_nodes: request.from.clone(),
        range: Some(format!("{start:#x}-{end:#x}")),
        ..Default::default()
    };
    let all: Vec<usize> = (start..end).step_by(pagemig::PAGE_SIZE).collect();
    for pages in all.chunks(STEP) {
        o.pages += pages.len() as u64;
        let mut now = vec![0i32; pages.len()];
        pagemig::sys::move_pages_of(pid, pages, None, &mut now).map_err(|e| refused(pid, "move_pages", e))?;
        let mut todo = Vec::new();
        for (k, &node) in now.iter().enumerate() {
            if node < 0 {
                o.absent += 1;
            } else if node == target {
                o.already_there += 1;
            } else if request.from.as_ref().is_some_and(|f| !f.contains(&(node as u32))) {
                o.not_selected += 1;
            } else {
                todo.push(pages[k]);
            }
        }
        if todo.is_empty() {
            continue;
        }
        let mut status = vec![0i32; todo.len()];
        pagemig::sys::move_pages_of(pid, &todo, Some(&vec![target; todo.len()]), &mut status)
            .map_err(|e| refused(pid, "move_pages", e))?;
        for (&page, &s) in todo.iter().zip(&status) {
            if s == target {
                o.moved_kernel += 1;
            } else {
                o.failed += 1;
                if o.first_failure.is_none() {
                    let what =
                        if s < 0 { pagemig::RangeOutcome::meaning(-s).to_string() } else { format!("on node {s}") };
                    o.first_failure = Some(format!("{page:#x}: {what}"));
                }
            }
        }
    }
    o.time_us = started.elapsed().as_micros() as u64;
    if detail {
        o.detail = match placement::read(pid) {
            Ok(after) => kernel_detail(before.as_ref(), &after, request.to, Some(Range(start, end))),
            Err(e) => vec![format!("(no mapping is listed: {e:#})")],
        };
    }
    Ok(o)
}

/// How many more times `migrate_pages(PID, …)` is called while pages are left.
const KERNEL_RETRIES: usize = 3;

/// All the process's pages on the source nodes, with `migrate_pages(PID, …)`; what moved is
/// read from numa_maps before and after.
fn kernel_migrate_pages(pid: i32, request: &MoveRequest, why: String, detail: bool) -> anyhow::Result<Outcome> {
    let from = match &request.from {
        Some(f) => f.clone(),
        None => numa::memory_nodes()?,
    };
    // The kernel's answer comes first: a sender it refuses may not read numa_maps either.
    let before = placement::read(pid);
    let started = Instant::now();
    let call =
        || pagemig::sys::migrate_pages_of(pid, &from, &[request.to]).map_err(|e| refused(pid, "migrate_pages", e));
    let mut not_moved = call()?;
    // The kernel leaves the pages it found busy just then (a process that keeps changing its
    // memory: 6 of 16800 in one run of the guest's --pid proof); what is left on the source
    // nodes is asked for again, a few times, as the kernel's own passes do within a call.
    for _ in 0..KERNEL_RETRIES {
        if not_moved == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        not_moved = call()?;
    }
    let time_us = started.elapsed().as_micros() as u64;
    let before = before?;
    let after = placement::read(pid)?;
    let on = |p: &placement::Placement, node: u32| -> u64 {
        p.mappings.iter().map(|m| m.bytes_on(node) / pagemig::PAGE_SIZE as u64).sum()
    };
    let moved = on(&after, request.to).saturating_sub(on(&before, request.to));
    Ok(Outcome {
        pid,
        path: "kernel",
        why,
        syscall: Some("migrate_pages"),
        to_node: request.to,
        from_nodes: request.from.clone(),
        moved_kernel: moved,
        already_there: on(&before, request.to),
        not_moved: Some(not_moved as u64),
        before_mib: Some(before.totals_mib["Total"].clone()),
        after_mib: Some(after.totals_mib["Total"].clone()),
        time_us,
        detail: if detail { kernel_detail(Some(&before), &after, request.to, None) } else { Vec::new() },
        ..Default::default()
    })
}

fn finish(o: Outcome, json: Option<crate::JsonStyle>) -> anyhow::Result<ExitCode> {
    if let Some(style) = json {
        crate::print_json(&serde_json::to_value(&o)?, style)?;
    } else {
        let mut t = Table::new();
        t.set_header(["", "value"]);
        let mut rows: Vec<(&str, String)> = vec![
            ("process", o.pid.to_string()),
            ("path", format!("{} ({})", o.path, o.why)),
            (
                "to node (from)",
                format!("{} ({})", o.to_node, o.from_nodes.as_ref().map_or("any node".into(), |f| format!("{f:?}"))),
            ),
            ("range", o.range.clone().unwrap_or_else(|| "all private anonymous memory".into())),
        ];
        if let Some(call) = o.syscall {
            rows.push(("system call", call.into()));
        }
        if o.syscall == Some("migrate_pages") {
            rows.push(("pages on the target before", o.already_there.to_string()));
            rows.push(("pages moved there (numa_maps)", o.moved_kernel.to_string()));
            rows.push(("pages the kernel could not move", o.not_moved.unwrap_or(0).to_string()));
            rows.push(("MiB per node before", format!("{:?}", o.before_mib.clone().unwrap_or_default())));
            rows.push(("MiB per node after", format!("{:?}", o.after_mib.clone().unwrap_or_default())));
        } else {
            rows.extend([
                ("pages looked at", o.pages.to_string()),
                ("moved by pagemig / by the kernel", format!("{} / {}", o.moved_pagemig, o.moved_kernel)),
                ("already there", o.already_there.to_string()),
                ("on other nodes than --from-node", o.not_selected.to_string()),
                ("not present", o.absent.to_string()),
                ("pagemig's own, left alone", o.internal.to_string()),
                ("failed", o.failed.to_string()),
            ]);
            if o.not_reached > 0 {
                rows.push(("not reached before the deadline (left as they were)", o.not_reached.to_string()));
            }
            if let Some(m) = &o.mappings {
                rows.push((
                    "mappings (pagemig / kernel / left alone)",
                    format!("{} / {} / {}", m["pagemig"], m["kernel"], m["internal"]),
                ));
            }
        }
        rows.push(("time", format!("{:.1} ms", o.time_us as f64 / 1000.0)));
        if let Some(f) = &o.first_failure {
            rows.push(("first failure", f.clone()));
        }
        for (k, v) in rows {
            t.add_row([k.to_string(), v]);
        }
        println!("{t}");
        for line in &o.detail {
            println!("  {line}");
        }
    }
    Ok(if o.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
