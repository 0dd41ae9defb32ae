//! NUMA topology from `/sys/devices/system/node`, and where the pages of a range are.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::sys::{self, PAGE_SIZE};

const NODE_ROOT: &str = "/sys/devices/system/node";

/// One NUMA node as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Node {
    /// The node number.
    pub id: u32,
    /// CPUs on the node.
    pub cpus: Vec<u32>,
    /// Total memory in bytes (0 for a memoryless node).
    pub mem_total: u64,
    /// Free memory in bytes.
    pub mem_free: u64,
    /// Distances to every node, indexed by node number order of [`nodes`].
    pub distances: Vec<u32>,
}

/// Parses a kernel list such as `0-3,8,10-11`.
///
/// # Errors
/// [`Error::Invalid`] for malformed text.
pub fn parse_list(text: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || Error::Invalid(format!("malformed list element {part:?}"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

fn read(path: &str) -> Result<String> {
    crate::sys::read_text(path).map_err(Error::io(path))
}

/// The online nodes that have memory, in order.
///
/// # Errors
/// [`Error::Io`] when sysfs cannot be read.
pub fn memory_nodes() -> Result<Vec<u32>> {
    let path = format!("{NODE_ROOT}/has_memory");
    match crate::sys::read_kept_text(&path) {
        Ok(text) => parse_list(&text),
        // Kernels without NUMA support expose no node directory: one node, 0.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![0]),
        Err(e) => Err(Error::io(&path)(e)),
    }
}

/// Every online node with its CPUs, memory and distances.
///
/// # Errors
/// [`Error::Io`] when sysfs cannot be read.
pub fn nodes() -> Result<Vec<Node>> {
    let online = match crate::sys::read_text(format!("{NODE_ROOT}/online")) {
        Ok(text) => parse_list(&text)?,
        Err(_) => vec![0],
    };
    online.into_iter().map(node).collect()
}

/// One node's description.
///
/// # Errors
/// [`Error::Io`] when its sysfs directory cannot be read.
pub fn node(id: u32) -> Result<Node> {
    let dir = format!("{NODE_ROOT}/node{id}");
    let cpus = parse_list(&read(&format!("{dir}/cpulist"))?)?;
    let (mem_total, mem_free) = meminfo(id)?;
    let distances = read(&format!("{dir}/distance"))?.split_whitespace().filter_map(|d| d.parse().ok()).collect();
    Ok(Node { id, cpus, mem_total, mem_free, distances })
}

/// `(MemTotal, MemFree)` of a node, in bytes.
///
/// # Errors
/// [`Error::Io`] when the node's `meminfo` cannot be read.
pub fn meminfo(id: u32) -> Result<(u64, u64)> {
    // Read on every call (the target's free memory): kept open.
    let path = format!("{NODE_ROOT}/node{id}/meminfo");
    let text = crate::sys::read_kept_text(&path).map_err(Error::io(&path))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                let rest = l.split_once(name)?.1.trim_start_matches(':');
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .unwrap_or(0)
            * 1024
    };
    Ok((field("MemTotal"), field("MemFree")))
}

/// Checks that `node` is an online node with memory.
///
/// # Errors
/// [`Error::UnknownNode`] listing the nodes that can be used.
pub fn check_node(node: u32) -> Result<()> {
    let online = memory_nodes()?;
    if online.contains(&node) { Ok(()) } else { Err(Error::UnknownNode { node, online }) }
}

/// The node of every base page of `[addr, addr + len)`, from a `move_pages` status query:
/// a node number, or a negative errno (`-ENOENT` for a page not present, `-EFAULT` for an
/// unmapped one).
///
/// # Errors
/// [`Error::Invalid`] for an unaligned range, [`Error::Sys`] when the query fails as a whole.
pub fn page_nodes(addr: usize, len: usize) -> Result<Vec<i32>> {
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(Error::Invalid(format!("range {addr:#x}+{len:#x} is not page aligned")));
    }
    let pages: Vec<usize> = (addr..addr + len).step_by(PAGE_SIZE).collect();
    let mut status = vec![0i32; pages.len()];
    for (p, s) in pages.chunks(1 << 16).zip(status.chunks_mut(1 << 16)) {
        sys::move_pages(p, None, s).map_err(Error::sys("move_pages (status query)"))?;
    }
    Ok(status)
}

/// The parts of `[addr, addr + len)` whose pages are present in memory (neither never
/// touched, purged nor swapped out), in address order, found by the kernel's
/// `PAGEMAP_SCAN` (Linux 6.7), which skips empty page tables: a sparse mapping of
/// terabytes costs what its present pages cost.
///
/// # Errors
/// [`Error::Invalid`] for an unaligned range, [`Error::Sys`] when the scan fails
/// (`ENOTTY` before Linux 6.7).
pub fn present_ranges(addr: usize, len: usize) -> Result<Vec<std::ops::Range<usize>>> {
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(Error::Invalid(format!("range {addr:#x}+{len:#x} is not page aligned")));
    }
    let end = addr.checked_add(len).ok_or_else(|| Error::Invalid(format!("range {addr:#x}+{len:#x} wraps around")))?;
    let found = sys::present_ranges(addr, end).map_err(Error::sys("PAGEMAP_SCAN"))?;
    Ok(found.into_iter().map(|(s, e)| s..e).collect())
}

/// How many pages of `[addr, addr + len)` are on each node (negative keys are errnos).
///
/// # Errors
/// As [`page_nodes`].
pub fn placement(addr: usize, len: usize) -> Result<BTreeMap<i32, usize>> {
    let mut out = BTreeMap::new();
    for n in page_nodes(addr, len)? {
        *out.entry(n).or_insert(0) += 1;
    }
    Ok(out)
}

/// The page frame number of every base page of `[addr, addr + len)` from
/// `/proc/self/pagemap`: `Some(pfn)` for a present page, `None` otherwise. Without
/// `CAP_SYS_ADMIN` the kernel reports every frame as 0, so callers should treat all-zero
/// frames as "unknown".
///
/// # Errors
/// [`Error::Invalid`] for an unaligned range, [`Error::Io`] when pagemap cannot be read.
pub fn page_frames(addr: usize, len: usize) -> Result<Vec<Option<u64>>> {
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(Error::Invalid(format!("range {addr:#x}+{len:#x} is not page aligned")));
    }
    let mut raw = vec![0u8; len / PAGE_SIZE * 8];
    crate::sys::with_kept_file(c"/proc/self/pagemap", |f| f.read_exact_at(&mut raw, (addr / PAGE_SIZE * 8) as u64))
        .map_err(|errno| Error::io("/proc/self/pagemap")(std::io::Error::from_raw_os_error(errno.raw_os_error())))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            (e >> 63 == 1).then_some(e & ((1 << 55) - 1))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse() {
        assert_eq!(parse_list("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_list("").unwrap(), Vec::<u32>::new());
        assert!(parse_list("3-1").is_err());
        assert!(parse_list("a").is_err());
    }

    #[test]
    fn this_machine_has_a_memory_node() {
        let nodes = nodes().unwrap();
        assert!(!nodes.is_empty());
        assert!(nodes.iter().any(|n| n.mem_total > 0 && !n.cpus.is_empty()));
        assert!(check_node(memory_nodes().unwrap()[0]).is_ok());
        assert!(matches!(check_node(4000), Err(Error::UnknownNode { node: 4000, .. })));
    }
}
