//! Why a migration happens and how hard it tries: the kernel's `enum migrate_reason` and
//! `enum migrate_mode`, with the seed's batch-eligibility policy.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Why pages are migrated (the kernel's `enum migrate_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Reason {
    /// `MR_COMPACTION`: defragmenting memory.
    Compaction,
    /// `MR_MEMORY_FAILURE`: moving data off a failing page.
    MemoryFailure,
    /// `MR_MEMORY_HOTPLUG`: emptying memory about to go offline.
    MemoryHotplug,
    /// `MR_SYSCALL`: asked for explicitly (`move_pages`, `migrate_pages`).
    Syscall,
    /// `MR_MEMPOLICY_MBIND`: applying a memory policy.
    MempolicyMbind,
    /// `MR_NUMA_MISPLACED`: NUMA balancing moving pages to the CPU that uses them.
    NumaMisplaced,
    /// `MR_CONTIG_RANGE`: making room for a contiguous allocation.
    ContigRange,
    /// `MR_LONGTERM_PIN`: moving pages before a long-term pin.
    LongtermPin,
    /// `MR_DEMOTION`: moving cold pages to a slower tier.
    Demotion,
    /// `MR_DAMON`: DAMON-driven tiering.
    Damon,
}

impl Reason {
    /// Every reason, in the kernel's order.
    pub const ALL: [Reason; 10] = [
        Reason::Compaction,
        Reason::MemoryFailure,
        Reason::MemoryHotplug,
        Reason::Syscall,
        Reason::MempolicyMbind,
        Reason::NumaMisplaced,
        Reason::ContigRange,
        Reason::LongtermPin,
        Reason::Demotion,
        Reason::Damon,
    ];

    /// Whether folios migrated for this reason go through the batch copy (the seed's
    /// `migrate_offload_do_batch()`): compaction, system calls, demotion and NUMA
    /// balancing move many folios and can wait for a batch; the others are latency- or
    /// correctness-critical and copy folio by folio.
    pub fn batch_eligible(self) -> bool {
        matches!(self, Reason::Compaction | Reason::Syscall | Reason::Demotion | Reason::NumaMisplaced)
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Compaction => "compaction",
            Reason::MemoryFailure => "memory_failure",
            Reason::MemoryHotplug => "memory_hotplug",
            Reason::Syscall => "syscall",
            Reason::MempolicyMbind => "mempolicy_mbind",
            Reason::NumaMisplaced => "numa_misplaced",
            Reason::ContigRange => "contig_range",
            Reason::LongtermPin => "longterm_pin",
            Reason::Demotion => "demotion",
            Reason::Damon => "damon",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Reason {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Reason::ALL.into_iter().find(|r| r.name() == norm).ok_or_else(|| {
            let names: Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
            Error::Invalid(format!("unknown reason {s:?}; accepted: {}", names.join(", ")))
        })
    }
}

/// How hard a migration tries when a folio is busy (the kernel's `enum migrate_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Mode {
    /// `MIGRATE_ASYNC`: never sleep; a busy folio is retried on the next pass only.
    Async,
    /// `MIGRATE_SYNC_LIGHT`: sleep briefly for a busy folio between passes.
    SyncLight,
    /// `MIGRATE_SYNC`: wait for a busy folio between passes.
    Sync,
}

impl FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "async" => Ok(Mode::Async),
            "sync_light" => Ok(Mode::SyncLight),
            "sync" => Ok(Mode::Sync),
            _ => Err(Error::Invalid(format!("unknown mode {s:?}; accepted: async, sync_light, sync"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_policy_matches_the_seed() {
        let eligible: Vec<_> = Reason::ALL.into_iter().filter(|r| r.batch_eligible()).collect();
        assert_eq!(eligible, [Reason::Compaction, Reason::Syscall, Reason::NumaMisplaced, Reason::Demotion]);
    }

    #[test]
    fn names_round_trip() {
        for r in Reason::ALL {
            assert_eq!(r.name().parse::<Reason>().unwrap(), r);
        }
        assert!("bogus".parse::<Reason>().unwrap_err().to_string().contains("accepted"));
        assert_eq!("sync-light".parse::<Mode>().unwrap(), Mode::SyncLight);
    }
}
