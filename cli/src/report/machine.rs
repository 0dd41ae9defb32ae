//! The machine a report was measured on: CPU, cores, NUMA nodes, kernel, huge-page mode.

use serde::Serialize;

use pagemig::migrate::{Capabilities, Engine};
use pagemig::numa::{self, Node};

/// What the numbers of a report depend on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// Logical CPUs this process may run on.
    pub cores: usize,
    /// Online NUMA nodes with their CPUs, memory and distances.
    pub nodes: Vec<Node>,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Transparent huge page mode: `always`, `madvise` or `never`.
    pub thp: String,
    /// What userfaultfd allows this process, when it can be opened.
    pub userfaultfd: Option<Capabilities>,
    /// `vm.max_map_count`.
    pub max_map_count: usize,
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The bracketed choice of a sysfs selector such as `always [madvise] never`.
pub fn selected(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(&text[start..end])
}

/// The `model name` of the first processor in `/proc/cpuinfo` text.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

impl Machine {
    /// Describes this machine; what cannot be read is `unknown` (or empty).
    pub fn probe() -> Machine {
        let unknown = || "unknown".to_string();
        let thp = read_trim("/sys/kernel/mm/transparent_hugepage/enabled");
        Machine {
            cpu_model: read_trim("/proc/cpuinfo").and_then(|t| cpu_model(&t)).unwrap_or_else(unknown),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            nodes: numa::nodes().unwrap_or_default(),
            kernel: read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(unknown),
            thp: thp.as_deref().and_then(selected).map(str::to_string).or(thp).unwrap_or_else(unknown),
            userfaultfd: Engine::global().ok().map(Engine::capabilities),
            max_map_count: pagemig::sys::max_map_count(),
        }
    }

    /// One line: `CPU, N cores, M nodes, Linux R, THP mode`.
    pub fn summary(&self) -> String {
        format!(
            "{}, {} cores, {} NUMA node{}, Linux {}, THP {}",
            self.cpu_model,
            self.cores,
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            self.kernel,
            self.thp
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selectors_and_cpuinfo() {
        assert_eq!(selected("always [madvise] never"), Some("madvise"));
        assert_eq!(selected("never"), None);
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor: 0\n"), None);
    }

    #[test]
    fn probes_this_machine() {
        let m = Machine::probe();
        assert!(m.cores >= 1);
        assert!(!m.kernel.is_empty());
        assert!(m.summary().contains(&m.kernel));
    }
}
