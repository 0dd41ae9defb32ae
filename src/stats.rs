//! What one migration call did and how long each phase took.

use std::time::Duration;

/// Counters and phase times of one `migrate_pages` call.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MigrateStats {
    /// Folios asked for.
    pub folios: u64,
    /// Folios that moved.
    pub succeeded_folios: u64,
    /// Folios that did not move (their memory is as it was).
    pub failed_folios: u64,
    /// Times a busy folio was put back for another pass (`EAGAIN`).
    pub retried_folios: u64,
    /// Base pages that moved.
    pub succeeded_pages: u64,
    /// Base pages that did not move.
    pub failed_pages: u64,
    /// PMD-sized folios that moved.
    pub thp_succeeded: u64,
    /// PMD-sized folios that did not move.
    pub thp_failed: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Batches run.
    pub batches: u64,
    /// Contiguous runs moved with one `mremap` each.
    pub runs: u64,
    /// Of those, the runs moved on the call's mover thread.
    pub mover_runs: u64,
    /// Folios copied by the default CPU batch copy.
    pub batch_copied_folios: u64,
    /// Folios copied by the active migrator (offloaded).
    pub offloaded_folios: u64,
    /// Batch-eligible folios whose batch copy failed or was declined, copied one by one.
    pub fallback_folios: u64,
    /// Folios copied one by one because their reason is not batch-eligible.
    pub single_copied_folios: u64,
    /// Folios of base pages copied straight from their old pages into their source by the
    /// mover, on a thread bound to the target node: written once, with no destination.
    pub copied_in_folios: u64,
    /// Bytes the copy helper copied (`migrate/copy_helper`): its share of the CPU copy.
    pub helper_copied_bytes: u64,
    /// Moved folios that could not be locked again (`mlock` failed after the move).
    pub relock_failures: u64,
    /// Bytes the event reader copied in when a thread of the program faulted on them while
    /// isolated (`migrate/answer_faults`): the move left them alone.
    pub answered_bytes: u64,
    /// Bytes read while still writable by the pre-copy (`migrate/precopy`).
    pub precopied_bytes: u64,
    /// Bytes the pre-copy copied again once their folio was protected: base pages that
    /// differed from what was read (written meanwhile, or unreadable then).
    pub recopied_bytes: u64,
    /// Time spent pre-copying, while the memory was still writable.
    pub precopy_ns: u64,
    /// Time spent populating destinations (off the critical path when prefilled).
    pub prepare_ns: u64,
    /// Bytes of destinations a helper thread populated ahead while the call copied
    /// (`migrate/prepare_ahead_mib`).
    pub prepared_ahead_bytes: u64,
    /// Time spent write-protecting sources.
    pub unmap_ns: u64,
    /// Time spent copying.
    pub copy_ns: u64,
    /// Time spent moving destinations over sources and waking writers.
    pub move_ns: u64,
    /// Wall-clock time of the whole call, validation and preparation included.
    pub total_ns: u64,
    /// Wall-clock time of the migration itself, from registering the sources until the last
    /// run moved, less the time spent preparing destinations: the critical path, in which
    /// the unmap, copy and move phases of different pieces overlap.
    pub critical_ns: u64,
    /// Per batch: from the start of its unmap phase until its first folio was writable again.
    pub first_folio_ns: Vec<u64>,
    /// Every folio that did not move, by its first byte, with the errno `move_pages(2)`
    /// would give its pages (`ENOENT`, `EFAULT`, `EBUSY`, `EACCES`, `ENOMEM`, …), in no
    /// particular order. Those folios are exactly as they were.
    pub failures: Vec<FolioFailure>,
}

/// A folio that did not move, and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct FolioFailure {
    /// The folio's first byte.
    pub addr: usize,
    /// The errno of its failure (positive).
    pub errno: i32,
}

impl MigrateStats {
    /// Adds the counters of `other`, a call made after this one: counts add up, and so do
    /// times, as the calls ran one after another.
    pub fn merge(&mut self, other: &MigrateStats) {
        let MigrateStats {
            folios,
            succeeded_folios,
            failed_folios,
            retried_folios,
            succeeded_pages,
            failed_pages,
            thp_succeeded,
            thp_failed,
            bytes,
            batches,
            runs,
            mover_runs,
            batch_copied_folios,
            offloaded_folios,
            fallback_folios,
            single_copied_folios,
            copied_in_folios,
            helper_copied_bytes,
            relock_failures,
            answered_bytes,
            precopied_bytes,
            recopied_bytes,
            precopy_ns,
            prepare_ns,
            prepared_ahead_bytes,
            unmap_ns,
            copy_ns,
            move_ns,
            total_ns,
            critical_ns,
            first_folio_ns,
            failures,
        } = other;
        self.folios += folios;
        self.succeeded_folios += succeeded_folios;
        self.failed_folios += failed_folios;
        self.retried_folios += retried_folios;
        self.succeeded_pages += succeeded_pages;
        self.failed_pages += failed_pages;
        self.thp_succeeded += thp_succeeded;
        self.thp_failed += thp_failed;
        self.bytes += bytes;
        self.batches += batches;
        self.runs += runs;
        self.mover_runs += mover_runs;
        self.batch_copied_folios += batch_copied_folios;
        self.offloaded_folios += offloaded_folios;
        self.fallback_folios += fallback_folios;
        self.single_copied_folios += single_copied_folios;
        self.copied_in_folios += copied_in_folios;
        self.helper_copied_bytes += helper_copied_bytes;
        self.relock_failures += relock_failures;
        self.answered_bytes += answered_bytes;
        self.precopied_bytes += precopied_bytes;
        self.recopied_bytes += recopied_bytes;
        self.precopy_ns += precopy_ns;
        self.prepare_ns += prepare_ns;
        self.prepared_ahead_bytes += prepared_ahead_bytes;
        self.unmap_ns += unmap_ns;
        self.copy_ns += copy_ns;
        self.move_ns += move_ns;
        self.total_ns += total_ns;
        self.critical_ns += critical_ns;
        self.first_folio_ns.extend_from_slice(first_folio_ns);
        self.failures.extend_from_slice(failures);
    }

    /// The migration's critical path: its wall-clock time less destination preparation.
    pub fn critical_path(&self) -> Duration {
        Duration::from_nanos(self.critical_ns)
    }

    /// Throughput of the whole call, destination preparation included, in GB/s (10^9
    /// bytes per second): what the caller waits for.
    pub fn gbps(&self) -> f64 {
        gbps(self.bytes, Duration::from_nanos(self.total_ns))
    }

    /// Throughput of the critical path in GB/s, which leaves out destination preparation.
    pub fn critical_path_gbps(&self) -> f64 {
        gbps(self.bytes, self.critical_path())
    }

    /// The median first-folio latency over batches.
    pub fn first_folio_median(&self) -> Option<Duration> {
        self.first_folio_quantile(0.5)
    }

    /// The `q` quantile (0..=1) of first-folio latency over batches.
    pub fn first_folio_quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.first_folio_ns.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(Duration::from_nanos(v[i]))
    }
}

/// Bytes per second in units of 10^9.
pub fn gbps(bytes: u64, t: Duration) -> f64 {
    if t.is_zero() { 0.0 } else { bytes as f64 / t.as_secs_f64() / 1e9 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_and_quantiles() {
        let s = MigrateStats {
            bytes: 2_000_000_000,
            unmap_ns: 100_000_000,
            copy_ns: 800_000_000,
            move_ns: 100_000_000,
            total_ns: 2_000_000_000,
            critical_ns: 1_000_000_000,
            first_folio_ns: vec![5, 1, 3, 2, 4],
            ..Default::default()
        };
        assert!((s.critical_path_gbps() - 2.0).abs() < 1e-9);
        assert!((s.gbps() - 1.0).abs() < 1e-9);
        assert_eq!(s.first_folio_median(), Some(Duration::from_nanos(3)));
        assert_eq!(s.first_folio_quantile(1.0), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn merged_calls_add_up() {
        let mut a = MigrateStats { folios: 2, succeeded_folios: 2, bytes: 8192, total_ns: 10, ..Default::default() };
        a.first_folio_ns = vec![1];
        let mut b = MigrateStats {
            folios: 3,
            succeeded_folios: 2,
            failed_folios: 1,
            bytes: 8192,
            total_ns: 30,
            ..Default::default()
        };
        b.first_folio_ns = vec![2, 3];
        b.failures = vec![FolioFailure { addr: 0x1000, errno: 16 }];
        a.merge(&b);
        assert_eq!((a.folios, a.succeeded_folios, a.failed_folios, a.bytes, a.total_ns), (5, 4, 1, 16384, 40));
        assert_eq!(a.first_folio_ns, [1, 2, 3]);
        assert_eq!(a.failures, b.failures);
    }
}
