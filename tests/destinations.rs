//! Destinations of the pipelined copy are populated piece by piece, each just before it is
//! copied: a batch holds little more memory than its source while it migrates, whatever
//! its size, and a piece whose destination the node cannot supply fails alone, its folios
//! left as they were.

mod common;

use std::time::Duration;

use common::node;
use pagemig::workload;
use pagemig::{Engine, Error, FaultInjection, MigrateOptions, Mode, Reason, Region};

const HUGE: usize = 2 << 20;
const CHILD: &str = "PAGEMIG_DESTINATIONS_CHILD";
const PEAK: &str = "a_batch_of_huge_pages_holds_little_more_than_its_source";

/// A figure of this process's `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// 256 MiB of 2 MiB folios in one batch, one writer storing meanwhile: the process's peak
/// resident memory during the call stays within 48 MiB of what it held before (the source's
/// old pages are freed piece by piece as the destinations of the next pieces are
/// populated). With every destination populated before the first copy, the peak is the
/// region's size again. Runs in a fresh process: its peak is its own.
#[test]
fn a_batch_of_huge_pages_holds_little_more_than_its_source() {
    common::fresh_process_test(PEAK, CHILD, Duration::from_secs(120), || {
        const LEN: usize = 256 << 20;
        let engine = Engine::global().unwrap();
        // The engine's threads and first pools, before the peak is measured.
        let warm = Region::new(4 * HUGE, HUGE, Some(node())).unwrap();
        workload::fill(&warm, 1);
        engine.migrate_pages(&warm.folios(), node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default()).unwrap();
        drop(warm);
        let region = Region::new(LEN, HUGE, Some(node())).unwrap();
        workload::fill(&region, 47);
        let huge = region.anon_huge_bytes().unwrap();
        let before = status_bytes("VmRSS:");
        // The peak starts again from what is resident now.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let opts = MigrateOptions::default().max_batch_pages(LEN / 4096);
        let (stats, log) = workload::with_writers(&region, 1, || {
            engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
        });
        let peak = status_bytes("VmHWM:");
        let stats = stats.unwrap();
        assert_eq!(stats.succeeded_folios as usize, LEN / HUGE, "{stats:?}");
        assert_eq!(stats.batches, 1);
        let report = workload::verify(&region, 47, &log);
        assert!(report.ok(), "{report:?}");
        assert_eq!(region.anon_huge_bytes().unwrap(), huge, "huge pages stay huge");
        let grew = peak.saturating_sub(before);
        println!("resident {} MiB before, peak {} MiB during the call (+{} MiB)", before >> 20, peak >> 20, grew >> 20);
        assert!(grew <= 48 << 20, "the call held {} MiB more than the process before it", grew >> 20);
    });
}

/// 32 MiB of 2 MiB folios in one batch, two writers storing meanwhile; the node refuses the
/// destination of the piece holding folio 5. That piece's folios fail with `ENOMEM` and
/// stay as they were (huge, every byte and write kept), every other folio moves, and a
/// later call moves the rest. With the first piece refused, the later ones still move as
/// they are copied.
#[test]
fn a_piece_whose_destination_cannot_be_populated_fails_alone() {
    common::watchdog(Duration::from_secs(120), "a_piece_whose_destination_cannot_be_populated_fails_alone", || {
        const LEN: usize = 32 << 20;
        let engine = Engine::global().unwrap();
        let region = common::leak(Region::new(LEN, HUGE, Some(node())).unwrap());
        workload::fill(region, 53);
        let huge = region.anon_huge_bytes().unwrap();
        // The region in one batch, two writers storing, the piece holding `folio` refused:
        // the partial migration's figures, and the writes made.
        let refused = |folio: usize| {
            let opts = MigrateOptions::default()
                .max_batch_pages(LEN / 4096)
                .fault(FaultInjection { fail_populate: vec![folio], ..Default::default() });
            let (result, log) = workload::with_writers(region, 2, || {
                engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
            });
            match result {
                Err(Error::Partial { stats, .. }) => (stats, log),
                other => panic!("expected a partial migration, got {other:?}"),
            }
        };
        let (stats, log) = refused(5);
        let folio = |addr: usize| (addr - region.addr()) / HUGE;
        let failed: Vec<usize> = stats.failures.iter().map(|f| folio(f.addr)).collect();
        assert!(stats.failures.iter().all(|f| f.errno == libc::ENOMEM), "{:?}", stats.failures);
        assert!(failed.contains(&5), "folio 5 did not fail: {failed:?}");
        // One piece: a stretch of folios, fewer than the batch.
        assert!(failed.windows(2).all(|w| w[1] == w[0] + 1), "{failed:?}");
        assert!(failed.len() < LEN / HUGE / 2, "{failed:?}");
        assert_eq!(stats.succeeded_folios as usize + failed.len(), LEN / HUGE, "{stats:?}");
        let report = workload::verify(region, 53, &log);
        assert!(report.ok(), "{report:?}");
        assert_eq!(region.anon_huge_bytes().unwrap(), huge, "huge pages stay huge");
        common::assert_writable(region);
        // A later call moves the rest (and again what moved).
        let (stats, log) = workload::with_writers(region, 2, || {
            engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default())
        });
        assert_eq!(stats.unwrap().succeeded_folios as usize, LEN / HUGE);
        let report = workload::verify(region, 53, &log);
        assert!(report.ok(), "{report:?}");
        // The first piece refused: the pieces after it still move one by one as they are
        // copied (a move each), not all at once at the batch's end.
        let (stats, log) = refused(0);
        assert_eq!(stats.failures.iter().map(|f| f.addr).collect::<Vec<_>>(), [region.addr()], "{stats:?}");
        assert!(stats.runs >= 3, "the folios after the refused piece moved in {} moves", stats.runs);
        let report = workload::verify(region, 53, &log);
        assert!(report.ok(), "{report:?}");
    });
}
