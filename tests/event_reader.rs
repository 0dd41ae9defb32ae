//! The event reader's paths that take a range's isolated old pages and must put them
//! somewhere: the program moves memory (`mremap`) whose old pages a migration holds in a
//! graveyard, and moves it again at once, or unmaps it. The old pages follow the memory to
//! where it is when they are put back; whatever cannot be put back fails its folio. Every
//! byte is checked; each case runs under a watchdog.

mod common;

use common::node;

use std::time::Duration;

use common::changes;
use common::watchdog;
use pagemig::folio::Folio;
use pagemig::workload::pattern_word;
use pagemig::{Engine, Error, FaultInjection, MigrateOptions, Mode, Reason};

const LEN: usize = 8 << 20;
const SEED: u64 = 31;
/// The moved range: the first batch's (256 pages), isolated while its move is held back.
const MOVED: usize = 2 << 20;

fn mremap(from: usize, len: usize, to: usize) {
    // SAFETY: moves a range of the test's own mapping into its own reservation.
    let p = unsafe {
        libc::mremap(from as *mut _, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, to as *mut libc::c_void)
    };
    assert_eq!(p as usize, to, "mremap: {}", std::io::Error::last_os_error());
}

/// The folios of the `LEN` bytes of base pages at `base`.
fn base_pages(base: usize) -> Vec<Folio<'static>> {
    base_pages_of(base, LEN)
}

/// The folios of the `len` bytes of base pages at `base`.
fn base_pages_of(base: usize, len: usize) -> Vec<Folio<'static>> {
    (0..len / 4096)
        // SAFETY: each test keeps its mapping as it is except for the changes under test.
        .map(|i| unsafe { Folio::new(base + i * 4096, 4096) }.unwrap())
        .collect()
}

/// Unmaps what is left of the mapping at `base` whose first `MOVED` bytes the test moved
/// into `spare` (in the reservation `reserved`): not the hole they left, which the program
/// moved away (another test's mapping may lie there now).
fn unmap_moved(base: usize, spare: usize, reserved: usize) {
    // SAFETY: the test's own mappings, no longer used.
    unsafe {
        libc::munmap((base + MOVED) as *mut _, LEN - MOVED);
        libc::munmap(spare as *mut _, MOVED);
    }
    changes::release_reservation_around(reserved, spare, MOVED);
}

/// Words of `[at, at + len)` that do not hold the pattern's words from `first` on; each
/// 4 KiB page with a wrong word is printed once (offset, what it holds, zero or not).
fn wrong_words(what: &str, at: usize, len: usize, first: usize) -> usize {
    let mut wrong = 0;
    let mut shown = 0;
    for page in (0..len).step_by(4096) {
        let bad: Vec<usize> = (page / 8..(page + 4096) / 8)
            .filter(|&i| changes::word(at + i * 8) != pattern_word(SEED, first + i))
            .collect();
        if let Some(&i) = bad.first() {
            wrong += bad.len();
            if shown < 4 {
                shown += 1;
                let got = changes::word(at + i * 8);
                eprintln!("  {what}+{:#x}: {} wrong words, first holds {got:#x}", page, bad.len());
            }
        }
    }
    wrong
}

/// Migrates an 8 MiB mapping of base pages, every move held back by `hold`; after `delay`
/// another thread moves its first `MOVED` bytes to one place and, as soon as that returns,
/// on to a second. With `holdings`, the event reader puts the old pages home through
/// holdings of its own, without the claims lock (`FaultInjection::home_through_holdings`).
/// Returns the words wrong at their final place and the call's result.
fn moved_twice(delay: Duration, hold: Duration, holdings: bool) -> (usize, std::result::Result<u64, String>) {
    let opts = MigrateOptions::default()
        .fault(FaultInjection { delay_move: Some(hold), home_through_holdings: holdings, ..Default::default() })
        .max_batch_pages(256);
    let (wrong, outcome, _) = moved_twice_by(Engine::global().unwrap(), opts, delay, LEN);
    (wrong, outcome)
}

/// [`moved_twice`] by `engine`, with `opts`, of a mapping of `len` bytes; also how long
/// the first move took to return (its event read).
fn moved_twice_by(
    engine: &'static Engine,
    opts: MigrateOptions,
    delay: Duration,
    len: usize,
) -> (usize, std::result::Result<u64, String>, Duration) {
    let base = changes::mapping(len, 4096, SEED);
    let (reserved1, spare1) = changes::spare();
    let (reserved2, spare2) = changes::spare();
    let folios = base_pages_of(base, len);
    let (result, first) = watchdog(Duration::from_secs(60), "mremap twice during migration", move || {
        std::thread::scope(|s| {
            let mover = s.spawn(|| {
                std::thread::sleep(delay);
                let first = std::time::Instant::now();
                mremap(base, MOVED, spare1);
                let first = first.elapsed();
                mremap(spare1, MOVED, spare2);
                first
            });
            let result = engine.migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts);
            (result, mover.join().unwrap())
        })
    });
    let wrong = wrong_words("moved", spare2, MOVED, 0) + wrong_words("rest", base + MOVED, len - MOVED, MOVED / 8);
    let outcome = match result {
        Ok(stats) => Ok(stats.failed_folios),
        Err(Error::Partial { stats, .. }) => {
            if wrong > 0 {
                eprintln!("  base {base:#x} spare1 {spare1:#x} spare2 {spare2:#x}");
                // Which folios failed, and why: the moved range's, the rest's.
                let mut why = std::collections::BTreeMap::new();
                for f in &stats.failures {
                    let part = if f.addr < base + MOVED { "moved" } else { "rest" };
                    *why.entry((part, f.errno)).or_insert(0usize) += 1;
                }
                eprintln!("  failures (part, errno) -> folios: {why:?}");
            }
            Ok(stats.failed_folios)
        }
        Err(e) => Err(e.to_string()),
    };
    // SAFETY: the test's own mappings, no longer used; not the first MOVED bytes at `base`,
    // nor the hole at `spare1` they left on their way, which the program moved away
    // (another test's mapping may lie there now).
    unsafe {
        libc::munmap((base + MOVED) as *mut _, len - MOVED);
        libc::munmap(spare2 as *mut _, MOVED);
        libc::munmap(reserved2 as *mut _, changes::SPARE);
    }
    changes::release_reservation_around(reserved1, spare1, MOVED);
    (wrong, outcome, first)
}

/// The program moves memory whose old pages are isolated, then moves it again at once:
/// the old pages are put back where the memory is by then, not lost on the way: straight
/// from their graveyards under the claims lock (even rounds) and through the event reader's
/// holdings without it (odd rounds).
#[test]
fn isolated_pages_follow_memory_moved_twice() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "isolated_pages_follow_memory_moved_twice");
    let mut lost_rounds = Vec::new();
    for round in 0..12u64 {
        let delay = Duration::from_millis(20 + 10 * (round % 4));
        let holdings = round % 2 == 1;
        let (wrong, outcome) = moved_twice(delay, Duration::from_millis(120), holdings);
        eprintln!("round {round}: delay {delay:?}, holdings {holdings}: {wrong} words wrong, {outcome:?}");
        if wrong > 0 {
            lost_rounds.push((round, wrong));
        }
    }
    assert!(lost_rounds.is_empty(), "old pages lost (round, words wrong): {lost_rounds:?}");
}

/// The same, the moves read by the call's copying threads between two chunks (the event
/// reader thread leaves them unread: `FaultInjection::pause_event_reader`), a 32 MiB
/// mapping one batch whose copy is under way as the program moves memory whose old pages
/// are isolated: the thread that reads the first move takes those pages, copies them into
/// holdings of the reader's (`FaultInjection::home_through_holdings`) and leaves them to
/// the reader thread, which reads the second move before any other thread handles an event
/// and puts them where the memory is by then. An engine of its own: the injection acts on
/// its reader while the call lasts. (The reader thread leaves a move of the call's memory
/// unread for 2 s, where it has nothing left to carry on: a first move that returns
/// within a second was read by a copying thread; at least one round of eight must see
/// that.)
#[test]
fn isolated_pages_follow_memory_moved_twice_as_the_copy_reads_the_moves() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "isolated_pages_follow_memory_moved_twice_as_the_copy_reads_the_moves",
    );
    let engine: &'static Engine = Box::leak(Box::new(Engine::new().unwrap()));
    let mut lost_rounds = Vec::new();
    let mut read_by_the_copy = 0;
    for round in 0..8u64 {
        let delay = Duration::from_millis(1 + round % 4);
        let fault = FaultInjection {
            delay_move: Some(Duration::from_millis(30)),
            home_through_holdings: true,
            pause_event_reader: true,
            ..Default::default()
        };
        let len = 32 << 20;
        let opts = MigrateOptions::default().fault(fault).max_batch_pages(len / 4096).precopy(false);
        let (wrong, outcome, first) = moved_twice_by(engine, opts, delay, len);
        eprintln!("round {round}: delay {delay:?}: {wrong} words wrong, {outcome:?}, first move read after {first:?}");
        if wrong > 0 {
            lost_rounds.push((round, wrong));
        }
        read_by_the_copy += usize::from(first < Duration::from_secs(1));
    }
    assert!(lost_rounds.is_empty(), "old pages lost (round, words wrong): {lost_rounds:?}");
    assert!(read_by_the_copy > 0, "no round's move was read by the copy");
}

/// After `wait`, purges the page at `page` (the test's own, given up) again and again
/// without a pause for `churn`; how many times. Each purge of registered memory holds its
/// thread until the event reader has read it, and the kernel refuses every move and copy
/// of pagemig's while one is unread.
fn purge_without_a_pause(page: usize, wait: Duration, churn: Duration) -> u64 {
    std::thread::sleep(wait);
    let started = std::time::Instant::now();
    let mut purges = 0u64;
    while started.elapsed() < churn {
        // SAFETY: the test's own page, which it gives up (not checked after).
        let r = unsafe { libc::madvise(page as *mut libc::c_void, 4096, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "MADV_DONTNEED: {}", std::io::Error::last_os_error());
        purges += 1;
    }
    purges
}

/// An engine of its own for a test whose threads purge without a pause: while they do,
/// the kernel refuses every move through the engine's userfaultfd for most of the time,
/// and the other tests' migrations through the global engine would meet that for seconds.
fn storm_engine() -> &'static Engine {
    Box::leak(Box::new(Engine::new().unwrap()))
}

/// Whether any mapping of `[start, end)` is still registered for missing faults (`um` in
/// its smaps `VmFlags`).
fn registered_missing(start: usize, end: usize) -> bool {
    pagemig::maps::vmas_with_flags(start, end).unwrap().iter().any(|v| v.flags.iter().any(|f| f == "um"))
}

/// Purges `pages` pages of `region` from its `first`, then reads and writes each on another
/// thread under a watchdog: none may wait for ever. Each reads as zeros, as the kernel's
/// fresh pages do, and keeps what is written.
fn purge_and_touch(region: &'static pagemig::Region, first: usize, pages: usize, what: &str) {
    let at = region.addr() + first * 4096;
    // SAFETY: purges pages of the test's own region; nothing else uses them.
    assert_eq!(unsafe { libc::madvise(at as *mut _, pages * 4096, libc::MADV_DONTNEED) }, 0);
    watchdog(Duration::from_secs(10), &format!("{what}: touching purged pages"), move || {
        for p in 0..pages {
            let word = region.word((first + p) * 512);
            assert_eq!(word.load(std::sync::atomic::Ordering::Relaxed), 0, "page {p} after the purge");
            word.store(0x1234 + p as u64, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(word.load(std::sync::atomic::Ordering::Relaxed), 0x1234 + p as u64);
        }
    });
}

/// A call whose registration the kernel will not take off as it ends (as near
/// `vm.max_map_count`, where the split an unregistration needs fails) leaves its runs
/// registered: a thread of the program that purges a page there and touches it must not
/// wait for ever (the event reader answers with zeros, as the kernel would). The next call
/// that ends takes the registration off.
#[test]
fn memory_left_registered_after_a_call_never_hangs() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "memory_left_registered_after_a_call_never_hangs");
    for folio in [4096, 2 << 20] {
        let what = format!("folio {folio}");
        let region = common::leak(pagemig::Region::new(8 << 20, folio, Some(node())).unwrap());
        pagemig::workload::fill(region, 5);
        let left = MigrateOptions::default().fault(FaultInjection { fail_unregister: true, ..Default::default() });
        let engine = Engine::global().unwrap();
        let stats = engine
            .migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &left)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(stats.succeeded_folios as usize, region.len() / folio, "{what}");
        let report = pagemig::workload::verify(region, 5, &pagemig::workload::WriteLog::default());
        assert!(report.ok(), "{what}: {report:?}");
        assert!(registered_missing(region.addr(), region.addr() + region.len()), "{what}: nothing was left registered");
        purge_and_touch(region, 3, 4, &format!("{what}, left registered"));
        // The program unmaps the region's last 2 MiB and maps memory of its own there,
        // registered with a userfaultfd of its own: not pagemig's to unregister (the
        // unmap's event drops it from what is left registered; a kernel that checks whose
        // registration it is would refuse an unregistration through pagemig's userfaultfd
        // anyway).
        let tail = region.addr() + region.len() - (2 << 20);
        // SAFETY: the test's own region's last 2 MiB, no longer used as such, replaced by a
        // fresh anonymous mapping in place.
        let p = unsafe {
            libc::munmap(tail as *mut _, 2 << 20);
            libc::mmap(
                tail as *mut _,
                2 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p as usize, tail, "{what}: mapping the tail again");
        let own = pagemig::sys::uffd::Uffd::open().expect("a userfaultfd of the program's");
        own.register_missing(tail, 2 << 20).expect("registering the program's own memory");
        // A call that ends tries the registration again, and takes it off.
        let other = common::leak(pagemig::Region::new(2 << 20, 4096, Some(node())).unwrap());
        engine
            .migrate_pages(&other.folios(), node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default())
            .unwrap_or_else(|e| panic!("{what}: the next call: {e}"));
        assert!(!registered_missing(region.addr(), tail), "{what}: still registered");
        assert!(registered_missing(tail, tail + (2 << 20)), "{what}: the program's own registration was taken off");
        purge_and_touch(region, 20, 4, &format!("{what}, unregistered"));
        own.unregister(tail, 2 << 20).expect("the program's own unregistration");
    }
}

/// The program moves memory whose old pages are isolated while another of its threads
/// purges a page of the same migration without a pause for seconds (each purge holds its
/// thread until the event reader has read it, and the kernel refuses the reader's copies
/// while one is unread): the old pages still go home, not a word lost.
#[test]
fn isolated_pages_go_home_while_the_program_purges_without_a_pause() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "isolated_pages_go_home_while_the_program_purges");
    let churn = Duration::from_secs(7);
    let base = changes::mapping(LEN, 4096, SEED);
    let (reserved, spare) = changes::spare();
    let folios = base_pages(base);
    let purged = base + LEN - 4096;
    let (result, purges) = watchdog(Duration::from_secs(120), "mremap beside a purge loop", move || {
        let opts = MigrateOptions::default()
            .fault(FaultInjection { delay_move: Some(Duration::from_millis(1000)), ..Default::default() })
            .max_batch_pages(256);
        std::thread::scope(|s| {
            let purge = || purge_without_a_pause(purged, Duration::ZERO, churn);
            let purgers = [s.spawn(purge), s.spawn(purge), s.spawn(purge)];
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                mremap(base, MOVED, spare);
            });
            let result = storm_engine().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts);
            (result, purgers.map(|p| p.join().unwrap()).iter().sum::<u64>())
        })
    });
    let wrong =
        wrong_words("moved", spare, MOVED, 0) + wrong_words("rest", base + MOVED, LEN - MOVED - 4096, MOVED / 8);
    eprintln!(
        "{purges} purges: {wrong} words wrong, {:?}",
        result.as_ref().map(|s| s.failed_folios).map_err(|e| e.to_string())
    );
    unmap_moved(base, spare, reserved);
    assert_eq!(wrong, 0, "words lost");
}

/// The program moves memory whose old pages are isolated while the kernel refuses them
/// their home (threads purging without a pause), then splits it (`mprotect` of a page in
/// the middle: no event says so, and the kernel copies into one mapping at a time): the old
/// pages still go home, each part into its own mapping, and the memory reads back whole;
/// reading it never waits for ever.
#[test]
fn isolated_pages_go_home_into_memory_split_after_it_moved() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "isolated_pages_go_home_into_memory_split");
    let churn = Duration::from_millis(1500);
    let base = changes::mapping(LEN, 4096, SEED);
    let (reserved, spare) = changes::spare();
    let folios = base_pages(base);
    let purged = base + LEN - 4096;
    let wrong = watchdog(Duration::from_secs(120), "mremap and mprotect beside a purge loop", move || {
        let opts = MigrateOptions::default()
            .fault(FaultInjection { delay_move: Some(Duration::from_millis(1000)), ..Default::default() })
            .max_batch_pages(256);
        std::thread::scope(|s| {
            let purge = || purge_without_a_pause(purged, Duration::ZERO, churn);
            let purgers = [s.spawn(purge), s.spawn(purge)];
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                mremap(base, MOVED, spare);
                // SAFETY: a page of the test's own mapping made read-only; only read after.
                let r = unsafe { libc::mprotect((spare + MOVED / 2) as *mut libc::c_void, 4096, libc::PROT_READ) };
                assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
            });
            let result = storm_engine().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts);
            eprintln!("call: {:?}", result.as_ref().map(|s| s.failed_folios).map_err(|e| e.to_string()));
            for p in purgers {
                p.join().unwrap();
            }
        });
        // Read (under this watchdog) once the purges have stopped.
        wrong_words("moved", spare, MOVED, 0) + wrong_words("rest", base + MOVED, LEN - MOVED - 4096, MOVED / 8)
    });
    unmap_moved(base, spare, reserved);
    assert_eq!(wrong, 0, "words lost");
}

/// Folios that will not move go back (their moves fail) while other threads of the program
/// purge a page of the same memory without a pause, from when the first batch is isolated,
/// for longer than the put-back used to wait (each purge holds its thread until the event
/// reader has read it, and the kernel refuses every move meanwhile): the old pages still go
/// back, not a word lost.
#[test]
fn old_pages_go_back_while_the_program_purges_without_a_pause() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "old_pages_go_back_while_the_program_purges");
    let churn = Duration::from_secs(4);
    let base = changes::mapping(LEN, 4096, SEED);
    let folios = base_pages(base);
    let purged = base + LEN - 4096;
    let (result, purges) = watchdog(Duration::from_secs(120), "failed moves beside a purge loop", move || {
        let opts = MigrateOptions::default()
            .fault(FaultInjection {
                fail_move: (0..LEN / 4096).collect(),
                delay_move: Some(Duration::from_millis(300)),
                ..Default::default()
            })
            .max_batch_pages(256);
        std::thread::scope(|s| {
            // From when the first batch is isolated and waits to move.
            let purge = || purge_without_a_pause(purged, Duration::from_millis(100), churn);
            let purgers: Vec<_> = (0..6).map(|_| s.spawn(purge)).collect();
            let result = storm_engine().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts);
            (result, purgers.into_iter().map(|p| p.join().unwrap()).sum::<u64>())
        })
    });
    let wrong = wrong_words("all", base, LEN - 4096, 0);
    eprintln!(
        "{purges} purges: {wrong} words wrong, {:?}",
        result.as_ref().map(|s| s.failed_folios).map_err(|e| e.to_string())
    );
    // SAFETY: the test's own mapping, no longer used.
    unsafe { libc::munmap(base as *mut _, LEN) };
    assert_eq!(wrong, 0, "words lost");
}
