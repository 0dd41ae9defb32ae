//! Node lists on the command line, as `numactl` takes them: `1`, `0,2`, `0-3`, `all`.
//!
//! A list is a set, as numactl's node mask is: duplicates count once and the nodes are
//! taken in ascending order. Every node must be online with memory; one that is not is
//! refused as the kernel refuses it (`ENODEV`), with the nodes that can be used.

use pagemig::numa;

/// What `--help` says a node list is.
pub const HELP: &str = "a node (1), a list (0,2), a range (0-3) or all, as numactl takes them";

/// `nodes` as the kernel writes a list: `0-3,8`.
pub fn format(nodes: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < nodes.len() {
        let mut j = i;
        while j + 1 < nodes.len() && nodes[j + 1] == nodes[j] + 1 {
            j += 1;
        }
        parts.push(if j > i { format!("{}-{}", nodes[i], nodes[j]) } else { nodes[i].to_string() });
        i = j + 1;
    }
    parts.join(",")
}

/// Parses `text` against `memory`, the online nodes with memory.
fn parse_against(text: &str, memory: &[u32]) -> Result<Vec<u32>, String> {
    let t = text.trim();
    if t.starts_with(['!', '+']) {
        return Err(format!(
            "{text:?}: numactl's inverted (!) and cpuset-relative (+) lists are not taken; name the nodes ({HELP})"
        ));
    }
    let mut nodes = if t.eq_ignore_ascii_case("all") {
        memory.to_vec()
    } else {
        numa::parse_list(t).map_err(|e| format!("{text:?} is not a node list ({HELP}): {e}"))?
    };
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.is_empty() {
        return Err(format!("{text:?} names no node ({HELP})"));
    }
    if let Some(bad) = nodes.iter().find(|n| !memory.contains(n)) {
        return Err(format!(
            "node {bad} is not an online node with memory: No such device (ENODEV); nodes with memory: {}",
            format(memory)
        ));
    }
    Ok(nodes)
}

/// A parsed node list: at least one node, ascending, each online with memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List(pub Vec<u32>);

/// Parses a node list ([`HELP`]) of online nodes with memory.
pub fn parse_list(text: &str) -> Result<List, String> {
    let memory = numa::memory_nodes().map_err(|e| e.to_string())?;
    parse_against(text, &memory).map(List)
}

/// Parses a flag that takes one node (written as a list that names one node, or a number).
pub fn parse_one(text: &str) -> Result<u32, String> {
    match parse_list(text)?.0[..] {
        [node] => Ok(node),
        ref nodes => Err(format!(
            "{text:?} names {} nodes ({}); this flag takes one node, where one region is allocated or measured",
            nodes.len(),
            format(nodes)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_as_numactl_takes_them() {
        let memory = [0, 1, 2, 3, 8];
        assert_eq!(parse_against("1", &memory), Ok(vec![1]));
        assert_eq!(parse_against("0,1", &memory), Ok(vec![0, 1]));
        assert_eq!(parse_against("0-3", &memory), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse_against(" 3,0-1,1 ", &memory), Ok(vec![0, 1, 3]));
        assert_eq!(parse_against("all", &memory), Ok(memory.to_vec()));
        assert_eq!(parse_against("ALL", &[0]), Ok(vec![0]));
        let e = parse_against("0,5", &memory).unwrap_err();
        assert!(e.contains("node 5") && e.contains("ENODEV") && e.contains("0-3,8"), "{e}");
        assert!(parse_against("3-1", &memory).unwrap_err().contains("not a node list"));
        assert!(parse_against("x", &memory).unwrap_err().contains("not a node list"));
        assert!(parse_against("", &memory).unwrap_err().contains("names no node"));
        assert!(parse_against("!0", &memory).unwrap_err().contains("inverted"));
        assert_eq!(format(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }
}
