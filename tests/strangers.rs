//! Another thread reads every mapping of the process while it migrates, the way a profiler,
//! a crash reporter or a conservative collector scans memory with `process_vm_readv`: it
//! reads pagemig's own mappings too — the graveyards the old pages are moved into, the
//! destinations, the event reader's holdings — and its faults there are answered by the
//! engine's fault handler with pages of zeros. None of that may make a migration fail or
//! lose a byte: every folio moves, every word is as it was, every page is on a new frame.
//! Another pins pagemig's pages for a while, as io_uring's fixed buffers do: an old page
//! pinned in its graveyard cannot be moved back where it was, and is copied back instead.
//! (Alone in their binary: the strangers fault in and pin pages of whatever else the
//! process maps.)

mod common;

use common::node;
use common::strangers::{StopOnDrop, can_pin, known_mappings, pin_fresh, scan};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::watchdog;
use pagemig::sys::{Errno, PAGE_SIZE};
use pagemig::workload::{self, WriteLog};
use pagemig::{Engine, Error, FaultInjection, MigrateOptions, Mode, Reason, Region, numa};

fn migrations_while_a_scanner_reads(folio: usize, precopy: bool) {
    const ROUNDS: usize = 6;
    let known = known_mappings();
    let region: &'static Region = common::leak(Region::new(16 << 20, folio, Some(node())).unwrap());
    let seed = 31 + folio as u64;
    workload::fill(region, seed);
    let what = format!("folio {folio}, precopy {precopy}");
    let scanned: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    watchdog(Duration::from_secs(240), &what.clone(), move || {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let scanner = s.spawn(|| scan(&known, (region.addr(), region.addr() + region.len()), &stop));
            // The scanner stops however this thread leaves the scope (a failed check too).
            let _stop = StopOnDrop(&stop);
            for round in 0..ROUNDS {
                // Each batch's first piece held between its read and its isolation: the
                // graveyard is mapped and empty meanwhile, in the scanner's way.
                let fault = FaultInjection {
                    delay_after_precopy: precopy.then_some(Duration::from_millis(20)),
                    ..Default::default()
                };
                let opts = MigrateOptions::default().fault(fault).max_batch_pages(512).precopy(precopy);
                let before = numa::page_frames(region.addr(), region.len()).unwrap();
                let stats = Engine::global()
                    .unwrap()
                    .migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
                    .unwrap_or_else(|e| panic!("{what}, round {round}: {e}"));
                assert_eq!(stats.succeeded_folios as usize, region.len() / folio, "{what}: {stats:?}");
                let report = workload::verify(region, seed, &WriteLog::default());
                assert!(report.ok(), "{what}, round {round}: {report:?}");
                let placement = region.placement().unwrap();
                assert_eq!(placement.get(&(node() as i32)).copied(), Some(region.len() / PAGE_SIZE), "{what}");
                let after = numa::page_frames(region.addr(), region.len()).unwrap();
                if before.iter().chain(&after).any(|f| f.is_some_and(|pfn| pfn != 0)) {
                    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                        assert!(a.is_some() && a != b, "{what}: page {i} on frame {b:?} before and {a:?} after");
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            scanned.store(scanner.join().unwrap(), Ordering::Relaxed);
        });
    });
    // The scanner did read pagemig's mappings (there were fresh ones to read).
    assert!(scanned.load(Ordering::Relaxed) > 0, "{folio}, {precopy}: the scanner read nothing");
}

/// Held by each test: the strangers of one would read or pin the other's memory.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_thread_reading_every_mapping_fails_no_migration() {
    let _alone = ALONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "a_thread_reading_every_mapping_fails_no_migration");
    for folio in [PAGE_SIZE, 2 << 20] {
        for precopy in [false, true] {
            migrations_while_a_scanner_reads(folio, precopy);
        }
    }
}

/// Moves held 60 ms each, while a stranger pins every fresh mapping for 250 ms. With
/// `inject`, the moves of every third folio's run fail: the failing folios' old pages,
/// pinned in their graveyard, go back all the same, and every folio moves or fails with the
/// injected error. Without, every folio moves: a destination pinned by the stranger is
/// copied in instead of moved, as the kernel would move the program's page. Every word is as
/// it was either way.
fn moves_while_a_stranger_pins(folio: usize, inject: bool) {
    let known = known_mappings();
    let region: &'static Region = common::leak(Region::new(8 << 20, folio, Some(node())).unwrap());
    let seed = 77 + folio as u64;
    workload::fill(region, seed);
    let nr = region.len() / folio;
    let what = format!("folio {folio}, failures injected {inject}");
    let pinned: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let result = watchdog(Duration::from_secs(240), &what.clone(), move || {
        let stop = AtomicBool::new(false);
        let skip = (region.addr(), region.addr() + region.len());
        std::thread::scope(|s| {
            let stranger = s.spawn(|| pin_fresh(&known, skip, Duration::from_millis(250), &stop));
            let _stop = StopOnDrop(&stop);
            // Let the stranger take in what the process mapped before the call.
            std::thread::sleep(Duration::from_millis(50));
            let fault = FaultInjection {
                fail_move: if inject { (0..nr).step_by(3).collect() } else { Vec::new() },
                delay_move: Some(Duration::from_millis(60)),
                ..Default::default()
            };
            let opts = MigrateOptions::default().fault(fault).max_batch_pages(512).precopy(false);
            let result =
                Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts);
            stop.store(true, Ordering::Relaxed);
            pinned.store(stranger.join().unwrap(), Ordering::Relaxed);
            result
        })
    });
    match &result {
        Ok(stats) if inject => panic!("{what}: the injected failures did not fail ({stats:?})"),
        Ok(stats) => assert_eq!(stats.succeeded_folios as usize, nr, "{what}: {stats:?}"),
        Err(Error::Partial { stats, .. }) if inject => {
            for f in &stats.failures {
                assert_eq!(Errno::from_raw_os_error(f.errno), Errno::IO, "{what}: {f:?}");
            }
        }
        Err(e) => panic!("{what}: {e}"),
    }
    let report = workload::verify(region, seed, &WriteLog::default());
    let first = match &result {
        Err(Error::Partial { first, failed, .. }) => format!("{failed} failed, the first: {first}"),
        _ => String::new(),
    };
    assert!(report.ok(), "{what}: {report:?} ({first})");
    assert!(pinned.load(Ordering::Relaxed) > 0, "{what}: the stranger pinned nothing");
    common::assert_writable(region);
}

#[test]
fn pages_pinned_by_a_stranger_move_or_go_back() {
    let _alone = ALONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "pages_pinned_by_a_stranger_move_or_go_back");
    if !can_pin() {
        eprintln!("io_uring cannot pin pages here: nothing to test");
        return;
    }
    for folio in [PAGE_SIZE, 2 << 20] {
        for inject in [true, false] {
            moves_while_a_stranger_pins(folio, inject);
        }
    }
}
