//! The program changes memory while it migrates — `munmap`, `munmap` then a new `mmap` at
//! the same address, `mremap`, `mprotect(PROT_READ)`, `MADV_DONTNEED`, `MADV_FREE`, what
//! allocators do when they free or purge — at random moments: before a folio is copied,
//! between its copy and its move, after its move (pauses injected before every move widen
//! the middle window). Whatever the program did stands: an unmapped range stays unmapped, a
//! new mapping keeps its own data, moved memory keeps its data at its new address, a
//! read-only range stays read-only, a purged page reads as purged. Every other byte is as
//! it was, and nothing crashes. Each case runs under a watchdog. (`move_range` meets the
//! same changes in the two-node guest, `cli/tests/numa_guest.rs`: on one node it has
//! nothing to move.)

mod common;

use common::node;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::changes::{self, Change};
use common::watchdog;
use pagemig::folio::Folio;
use pagemig::sys::Errno;
use pagemig::{Engine, Error, FaultInjection, Handshake, MigrateOptions, Mode, Reason};

const LEN: usize = 8 << 20;
const SEED: u64 = 99;

/// Migrates the mapping while another thread applies `change` to two folios after
/// `delay`, then checks every byte.
fn case(change: Change, folio: usize, delay: Duration, round: u64) {
    // Somewhere in the middle, varying with the round; moves held back 2 ms each.
    let offset = LEN / 2 + (round as usize % 8) * (256 << 10);
    case_at(change, folio, delay, offset, Duration::from_millis(2), false);
}

/// [`case`] for the two folios at `offset` (rounded down to a folio), every move held back
/// by `hold`; with `precopy`, the pre-copy on and each batch's first piece held for 60 ms
/// between its read and its protection.
fn case_at(change: Change, folio: usize, delay: Duration, offset: usize, hold: Duration, precopy: bool) {
    let base = changes::mapping(LEN, folio, SEED);
    let (reserved, spare) = changes::spare();
    let len = 2 * folio.max(64 << 10);
    let at = base + (offset & !(folio.max(64 << 10) - 1));
    let folios: Vec<Folio<'static>> = (0..LEN / folio)
        // SAFETY: the test keeps the mapping as it is except for the change under test,
        // which pagemig must survive.
        .map(|i| unsafe { Folio::new(base + i * folio, folio) }.unwrap())
        .collect();
    let moved_to: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let what = format!("{change:?}, folio {folio}, delay {delay:?}");
    let result = watchdog(Duration::from_secs(120), &what.clone(), move || {
        let fault = FaultInjection {
            delay_move: Some(hold),
            delay_after_precopy: precopy.then_some(Duration::from_millis(60)),
            ..Default::default()
        };
        let mut opts = MigrateOptions::default().fault(fault).max_batch_pages(256);
        if precopy {
            opts = opts.precopy(true);
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(delay);
                moved_to.store(changes::apply(change, at, len, spare) as u64, Ordering::SeqCst);
            });
            Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts)
        })
    });
    let moved_to = moved_to.load(Ordering::SeqCst) as usize;
    // Whatever failed, failed for the change, with the error move_pages would give.
    match &result {
        Ok(_) => {}
        // Changed before the call began: refused up front, nothing touched.
        Err(Error::NotMovable { .. }) => {}
        Err(Error::Partial { first, stats, .. }) => {
            let errno = first.errno();
            assert!(
                [Errno::FAULT, Errno::NOENT, Errno::ACCESS].contains(&errno),
                "{what}: unexpected failure {first} ({stats:?})"
            );
            assert!(stats.failed_folios as usize <= len / folio + 2, "{what}: {first} {stats:?}");
            // Each failed folio is named, and lies at the change.
            assert_eq!(stats.failures.len() as u64, stats.failed_folios, "{what}");
            for f in &stats.failures {
                assert!(
                    at.saturating_sub(folio) <= f.addr && f.addr < at + len + folio,
                    "{what}: {f:?} ({at:#x}+{len:#x})"
                );
            }
        }
        Err(e) => panic!("{what}: {e}"),
    }
    changes::check(&what, change, base, LEN, SEED, at, len, moved_to);
    changes::release(change, base, LEN, at, len, reserved);
}

fn all_moments(change: Change) {
    let mut round = 0;
    for folio in [4096, 2 << 20] {
        for delay_us in [0, 300, 1_000, 3_000, 8_000, 20_000] {
            case(change, folio, Duration::from_micros(delay_us), round);
            round += 1;
        }
    }
}

/// Each change made while the first batch's old pages are isolated and its copy waits to
/// move (every move held back 150 ms, the change after 50 ms): the move is refused or
/// skipped, and the old pages go back — into a mapping the program made read-only, too.
#[test]
fn changes_between_copy_and_move() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "changes_between_copy_and_move");
    for change in changes::ALL {
        for folio in [4096, 2 << 20] {
            case_at(change, folio, Duration::from_millis(50), 0, Duration::from_millis(150), false);
        }
    }
}

/// Each change made while the pre-copy (`migrate/precopy`) reads the program's live memory:
/// made 20 ms into the first piece's 60 ms pause, in the middle of the mapping, which the
/// pre-copy reads later — a page purged or unmapped there would make a plain load wait for
/// ever (a fault in a range registered for the migration that nothing serves) or crash the
/// program. And made in the first piece itself, between its read and its protection. The
/// changes stand and every other byte is as it was.
#[test]
fn changes_while_the_precopy_reads() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "changes_while_the_precopy_reads");
    for change in changes::ALL {
        for folio in [4096, 2 << 20] {
            for offset in [LEN / 2, 0] {
                case_at(change, folio, Duration::from_millis(20), offset, Duration::ZERO, true);
            }
        }
    }
}

#[test]
fn munmap_during_migration() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "munmap_during_migration");
    all_moments(Change::Munmap);
}

#[test]
fn munmap_then_mmap_at_the_same_address_during_migration() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "munmap_then_mmap_at_the_same_address_during_migration");
    all_moments(Change::MunmapThenMmap);
}

#[test]
fn mremap_during_migration() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "mremap_during_migration");
    all_moments(Change::Mremap);
}

#[test]
fn mprotect_read_only_during_migration() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "mprotect_read_only_during_migration");
    all_moments(Change::MprotectReadOnly);
}

#[test]
fn madv_dontneed_during_migration() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "madv_dontneed_during_migration");
    all_moments(Change::DontNeed);
}

#[test]
fn madv_free_during_migration() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "madv_free_during_migration");
    all_moments(Change::Free);
}

/// The program moves memory (`mremap`) while the old pages of folios that will not move go
/// back, after the first page came back and the kernel refused the rest for a moment
/// (injected: `FaultInjection::stall_put_back`): every byte reaches the new address, the
/// page back already with the memory, the rest through the event reader. It once took the
/// whole span along, met the page back already at the new address, and gave the rest up:
/// the program read zeros there. An `munmap` at that moment leaves the range unmapped.
#[test]
fn mremap_while_old_pages_go_back_loses_nothing() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "mremap_while_old_pages_go_back_loses_nothing");
    for change in [Change::Mremap, Change::Munmap] {
        change_during_put_back(change);
    }
}

/// The program purges memory (`MADV_DONTNEED`) while old pages go back to it, after the
/// first page came back and the kernel refused the rest for a moment (injected:
/// `FaultInjection::stall_put_back`): the purge stands, every word reads zeros. The put-back
/// once went on after its pause and moved the old pages in behind the purge.
#[test]
fn a_purge_while_old_pages_go_back_stands() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "a_purge_while_old_pages_go_back_stands");
    change_during_put_back(Change::DontNeed);
}

/// Old pages going back while the kernel refuses them for a moment (`EAGAIN`, injected:
/// `FaultInjection::stall_put_back`) are waited for however their graveyard looks meanwhile:
/// here `/proc/self/pagemap` cannot be read (the descriptors pagemig kept of it closed, none
/// left to open it again: `RLIMIT_NOFILE` at 3), as
/// a page being migrated by the kernel or swapped out reads as not present there. The put-back
/// once gave them up on such a look, freeing the program's only copy of its data with the
/// graveyard: the program read zeros.
#[test]
fn old_pages_go_back_whatever_their_graveyard_looks_like() {
    const NAME: &str = "old_pages_go_back_whatever_their_graveyard_looks_like";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_PUT_BACK_UNSEEN", Duration::from_secs(120), || {
        const LEN: usize = 16 * 4096;
        let base = changes::mapping(LEN, 4096, SEED);
        let folios: Vec<Folio<'static>> = (0..LEN / 4096)
            // SAFETY: the test keeps the mapping as it is.
            .map(|i| unsafe { Folio::new(base + i * 4096, 4096) }.unwrap())
            .collect();
        let engine = Engine::global().unwrap();
        let result = watchdog(Duration::from_secs(60), "a put-back that cannot look at its graveyard", move || {
            let (opts, stall) = put_back_stalled();
            std::thread::scope(|s| {
                let limiter = s.spawn(|| {
                    let mut saved = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    common::while_put_back_stalled(&stall, base, || {
                        // pagemig keeps `/proc/self/pagemap` open between uses: those
                        // descriptors go (the program closes them), and no new one can be had.
                        let pagemaps: Vec<i32> = std::fs::read_dir("/proc/self/fd")
                            .unwrap()
                            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                            .filter(|fd| {
                                std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|l| l.ends_with("pagemap"))
                            })
                            .collect();
                        // SAFETY: structs of ours; descriptors 0-2 are open, so no new one can
                        // be had; the closed ones named pagemap, which pagemig opens again.
                        unsafe {
                            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut saved), 0);
                            let tight = libc::rlimit { rlim_cur: 3, rlim_max: saved.rlim_max };
                            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &tight), 0);
                            for fd in pagemaps {
                                libc::close(fd);
                            }
                        }
                    });
                    // Past the stall, while the put-back tries again.
                    std::thread::sleep(Duration::from_millis(600));
                    let unseen = pagemig::numa::page_frames(base, 4096).is_err();
                    // SAFETY: as above.
                    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) }, 0);
                    unseen
                });
                let r = engine.migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts);
                (r, limiter.join().unwrap())
            })
        });
        let (result, unseen) = result;
        assert!(unseen, "pagemap could still be opened under the limit");
        let Err(Error::Partial { stats, .. }) = &result else {
            panic!("the injected failure is not reported: {result:?}")
        };
        assert!(stats.failed_folios >= 1, "{stats:?}");
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), pagemig::workload::pattern_word(SEED, i), "word {i}");
        }
    });
}

/// Old pages going back that can no longer move home (the program made the memory
/// read-only while they were out: the kernel moves pages only between mappings alike) are
/// copied back; where their node has no page to give (`ENOMEM`, injected for the first
/// three copies: `FaultInjection::fail_put_back_copies`) the copy takes another node, and
/// where none has one it waits for memory. The put-back once gave them up on the first
/// refusal, freeing the program's only copy of its data with the graveyard: it read zeros.
#[test]
fn old_pages_go_back_when_their_node_has_no_room() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "old_pages_go_back_when_their_node_has_no_room");
    const LEN: usize = 16 * 4096;
    let base = changes::mapping(LEN, 4096, SEED);
    let folios: Vec<Folio<'static>> = (0..LEN / 4096)
        // SAFETY: the test keeps the mapping, making it read-only as the test says.
        .map(|i| unsafe { Folio::new(base + i * 4096, 4096) }.unwrap())
        .collect();
    let result = watchdog(Duration::from_secs(60), "a put-back refused memory", move || {
        let (mut opts, stall) = put_back_stalled();
        opts.fault.fail_put_back_copies = 3;
        std::thread::scope(|s| {
            s.spawn(|| {
                common::while_put_back_stalled(&stall, base, || {
                    // SAFETY: the test's own mapping.
                    assert_eq!(unsafe { libc::mprotect(base as *mut _, LEN, libc::PROT_READ) }, 0);
                })
            });
            Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts)
        })
    });
    let Err(Error::Partial { stats, .. }) = &result else { panic!("the injected failure is not reported: {result:?}") };
    assert!(stats.failed_folios >= 1, "{stats:?}");
    assert_eq!(changes::perms(base).as_deref(), Some("r--p"), "protection undone");
    for i in 0..LEN / 8 {
        assert_eq!(changes::word(base + i * 8), pagemig::workload::pattern_word(SEED, i), "word {i}");
    }
    // SAFETY: the test's own mapping, no longer used.
    unsafe { libc::munmap(base as *mut _, LEN) };
}

/// Options under which the first folio's run does not move and its old pages go back with
/// a stall after the first page, at the handshake returned (`fail_move`, `stall_put_back`),
/// no fault answered.
fn put_back_stalled() -> (MigrateOptions, Arc<Handshake>) {
    let stall = Handshake::new();
    let fault = FaultInjection { fail_move: vec![0], stall_put_back: Some(stall.clone()), ..Default::default() };
    (MigrateOptions::default().fault(fault).answer_faults(false), stall)
}

/// The 1 MiB of base pages a put-back test migrates (at `SEED`).
const PUT_BACK_LEN: usize = 1 << 20;

/// Migrates [`PUT_BACK_LEN`] bytes of base pages whose first run does not move and, once the
/// put-back of its old pages has stalled after the first page, lets `change` act on the
/// memory (its start, and the 2 MiB boundary of a spare reservation). Returns the call's
/// result, what `change` returned, the memory's start and the reservation.
fn during_put_back<T: Send + 'static>(
    change: impl FnOnce(usize, usize) -> T + Send + 'static,
) -> (pagemig::Result<pagemig::MigrateStats>, T, usize, (usize, usize)) {
    let base = changes::mapping(PUT_BACK_LEN, 4096, SEED);
    let (reserved, spare) = changes::spare();
    let folios: Vec<Folio<'static>> = (0..PUT_BACK_LEN / 4096)
        // SAFETY: the test keeps the mapping as it is except for the change under test.
        .map(|i| unsafe { Folio::new(base + i * 4096, 4096) }.unwrap())
        .collect();
    let (result, changed) = watchdog(Duration::from_secs(60), "a change during a put-back", move || {
        let (opts, stall) = put_back_stalled();
        std::thread::scope(|s| {
            let changer = s.spawn(move || common::while_put_back_stalled(&stall, base, || change(base, spare)));
            let r = Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts);
            (r, changer.join().unwrap())
        })
    });
    (result, changed, base, (reserved, spare))
}

fn change_during_put_back(change: Change) {
    const LEN: usize = PUT_BACK_LEN;
    let (result, moved_to, base, (reserved, spare)) =
        during_put_back(move |base, spare| changes::apply(change, base, LEN, spare));
    // The injected refusal fails its run's folios (at least the first); the memory moved
    // away fails the rest or lets them go as the program left them.
    let Err(Error::Partial { stats, .. }) = &result else { panic!("the injected failure is not reported: {result:?}") };
    assert!(stats.failed_folios >= 1, "{stats:?}");
    if change == Change::DontNeed {
        // Purged while the old pages waited (the first page back already): zeros, for good.
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), 0, "word {i}: the purge was undone");
        }
        // SAFETY: the test's own mapping and reservation, no longer used.
        unsafe {
            libc::munmap(base as *mut _, LEN);
            libc::munmap(reserved as *mut _, changes::SPARE);
        }
        return;
    }
    assert!(!changes::holds_old_data_for_good(base, SEED, 0), "{change:?}: the memory came back at its old address");
    if change == Change::Munmap {
        // SAFETY: the test's own reservation, unused.
        unsafe { libc::munmap(reserved as *mut _, changes::SPARE) };
        return;
    }
    assert_eq!(moved_to, spare);
    for i in 0..LEN / 8 {
        assert_eq!(
            changes::word(spare + i * 8),
            pagemig::workload::pattern_word(SEED, i),
            "word {i} of the moved memory"
        );
    }
    // SAFETY: the test's own reservation, the memory moved into it, no longer used.
    unsafe { libc::munmap(reserved as *mut _, changes::SPARE) };
}

/// Old pages waiting to go back (a put-back stalled after its first page: injected,
/// `FaultInjection::stall_put_back`) while the program changes their memory twice, and
/// what each program then reads. `then_mremap`: the memory is purged, then moved; the
/// event reader once took the purged old pages along to the new address, which read the
/// old data instead of zeros. Otherwise half of it is made read-only (a mapping of its
/// own, and no event): the rest of the put-back spans two mappings, which one move or
/// copy may not cross; it once gave up after 2 s and the program read zeros.
fn two_changes_during_put_back(then_mremap: bool) {
    const LEN: usize = PUT_BACK_LEN;
    let (result, (), base, (reserved, spare)) = during_put_back(move |base, spare| {
        if then_mremap {
            changes::apply(Change::DontNeed, base, LEN, spare);
            changes::apply(Change::Mremap, base, LEN, spare);
        } else {
            // SAFETY: the second half of the test's own mapping.
            assert_eq!(unsafe { libc::mprotect((base + LEN / 2) as *mut _, LEN / 2, libc::PROT_READ) }, 0);
        }
    });
    let Err(Error::Partial { stats, .. }) = &result else { panic!("the injected failure is not reported: {result:?}") };
    assert!(stats.failed_folios >= 1, "{stats:?}");
    if then_mremap {
        assert!(!changes::holds_old_data_for_good(base, SEED, 0), "the memory came back at its old address");
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(spare + i * 8), 0, "word {i} of the moved memory: the purge was undone");
        }
        // SAFETY: the test's own reservation, the memory moved into it, no longer used.
        unsafe { libc::munmap(reserved as *mut _, changes::SPARE) };
        return;
    }
    assert_eq!(changes::perms(base + LEN / 2).as_deref(), Some("r--p"), "protection undone");
    for i in 0..LEN / 8 {
        assert_eq!(changes::word(base + i * 8), pagemig::workload::pattern_word(SEED, i), "word {i}");
    }
    // SAFETY: the test's own mapping and reservation, no longer used.
    unsafe {
        libc::munmap(base as *mut _, LEN);
        libc::munmap(reserved as *mut _, changes::SPARE);
    }
}

#[test]
fn memory_purged_then_moved_while_old_pages_go_back_reads_zeros() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "memory_purged_then_moved_while_old_pages_go_back_reads_zeros");
    two_changes_during_put_back(true);
}

#[test]
fn old_pages_go_back_into_memory_split_while_they_wait() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "old_pages_go_back_into_memory_split_while_they_wait");
    two_changes_during_put_back(false);
}

/// Pages the program purges while a call has them registered, before it claims them, are
/// never moved by that call: the kernel zaps purged pages only after their event is read
/// and the purging thread is back on a CPU, and a call that claimed and isolated them in
/// that moment would move their old data back in behind the zap (the program would read
/// old contents where it purged). `MADV_DONTNEED`: the pages read zeros and fail with
/// `ENOENT`, as `move_pages(2)` says of purged pages. `MADV_FREE`, then written again: they
/// stay where they are with what was written, and fail likewise. The pages around them
/// move, their data whole. (A thread held between the event and its zap cannot be made to
/// happen from here; without the record of purges the `MADV_FREE` pages moved.)
#[test]
fn pages_purged_before_the_claim_are_never_moved_in() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "pages_purged_before_the_claim_are_never_moved_in");
    const PAGES: usize = 32;
    const LEN: usize = PAGES * 4096;
    let base = changes::mapping(LEN, 4096, SEED);
    let page = move |p: usize| base + p * 4096;
    let folios: Vec<Folio<'static>> = (0..PAGES)
        // SAFETY: the test keeps the mapping, purging parts of it as the test says.
        .map(|p| unsafe { Folio::new(page(p), 4096) }.unwrap())
        .collect();
    let (dontneed, free) = (8..12, 16..PAGES);
    let new_word = |i: usize| 0xf4ee_0000_0000_0000 | i as u64;
    let handshake = pagemig::Handshake::new();
    let at_claim = handshake.clone();
    let (dn, fr) = (dontneed.clone(), free.clone());
    let result = watchdog(Duration::from_secs(60), "purges before the claim", move || {
        let opts = MigrateOptions::default()
            .fault(FaultInjection { claim_handshake: Some(at_claim), ..Default::default() })
            .answer_faults(false);
        std::thread::scope(|s| {
            let call = s
                .spawn(|| Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts));
            // Registered, nothing claimed yet.
            handshake.wait();
            // SAFETY: the test's own pages; `madvise` returns once its event is read.
            unsafe {
                assert_eq!(libc::madvise(page(dn.start) as *mut _, dn.len() * 4096, libc::MADV_DONTNEED), 0);
                assert_eq!(libc::madvise(page(fr.start) as *mut _, fr.len() * 4096, libc::MADV_FREE), 0);
            }
            for i in fr.start * 512..fr.end * 512 {
                // SAFETY: inside the test's mapping, present and writable.
                unsafe { ((base + i * 8) as *mut u64).write_volatile(new_word(i)) };
            }
            handshake.wait();
            call.join().unwrap()
        })
    });
    let Err(Error::Partial { stats, .. }) = &result else { panic!("the purged pages moved: {result:?}") };
    let mut failed: Vec<usize> = stats.failures.iter().map(|f| (f.addr - base) / 4096).collect();
    failed.sort_unstable();
    assert_eq!(failed, dontneed.clone().chain(free.clone()).collect::<Vec<_>>(), "{stats:?}");
    assert!(stats.failures.iter().all(|f| f.errno == libc::ENOENT), "{stats:?}");
    for i in 0..LEN / 8 {
        let p = i / 512;
        let want = if dontneed.contains(&p) {
            0
        } else if free.contains(&p) {
            new_word(i)
        } else {
            pagemig::workload::pattern_word(SEED, i)
        };
        assert_eq!(changes::word(base + i * 8), want, "word {i} (page {p})");
    }
    // SAFETY: the test's own mapping, no longer used.
    unsafe { libc::munmap(base as *mut _, LEN) };
}

/// Memory another call is migrating moved (`mremap`) onto a range a call still claims: the
/// registration that came with it cannot be taken off while that claim stands, and is left
/// for a call's end, as what the kernel would not unregister is. Here the call that
/// migrated the moved memory ends first: the registration once went with it, and the range
/// stayed registered after every call, where a thread touching a page never populated
/// would wait for ever. Every word of the moved memory reaches its new address.
#[test]
fn memory_moved_onto_a_claimed_range_is_unregistered_after_the_calls() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "memory_moved_onto_a_claimed_range_is_unregistered_after_the_calls");
    const LEN: usize = 16 * 4096;
    const MOVED_SEED: u64 = SEED + 1;
    let target = changes::mapping(LEN, 4096, SEED);
    let moved = changes::mapping(LEN, 4096, MOVED_SEED);
    let pages = |base: usize| -> Vec<Folio<'static>> {
        (0..LEN / 4096)
            // SAFETY: the test keeps both mappings but for the `mremap` under test.
            .map(|i| unsafe { Folio::new(base + i * 4096, 4096) }.unwrap())
            .collect()
    };
    let (at_target, at_moved) = (pages(target), pages(moved));
    let results = watchdog(Duration::from_secs(60), "memory moved onto a claimed range", move || {
        let held = |ms| {
            MigrateOptions::default()
                .answer_faults(false)
                .fault(FaultInjection { delay_move: Some(Duration::from_millis(ms)), ..Default::default() })
        };
        // The first call holds on long enough for the second to end first on a loaded machine.
        let (long, short) = (held(4_000), held(300));
        let engine = Engine::global().unwrap();
        std::thread::scope(|s| {
            let claimer = s.spawn(|| engine.migrate_pages(&at_target, node(), Reason::Syscall, Mode::Sync, &long));
            common::await_gone(target, "the first call never isolated its pages");
            let mover = s.spawn(|| engine.migrate_pages(&at_moved, node(), Reason::Syscall, Mode::Sync, &short));
            common::await_gone(moved, "the second call never isolated its pages");
            // `moved` replaces `target`.
            changes::apply(Change::Mremap, moved, LEN, target);
            let second = mover.join().unwrap();
            assert!(!claimer.is_finished(), "the claiming call ended first: the case is not made");
            (claimer.join().unwrap(), second)
        })
    });
    eprintln!("{results:?}");
    assert!(
        !common::vm_flags(target).iter().any(|f| f == "um" || f == "uw"),
        "the range is still registered: {:?}",
        common::vm_flags(target)
    );
    for i in 0..LEN / 8 {
        assert_eq!(changes::word(target + i * 8), pagemig::workload::pattern_word(MOVED_SEED, i), "word {i}");
    }
    // SAFETY: the test's own mapping (the moved memory), no longer used.
    unsafe { libc::munmap(target as *mut _, LEN) };
}

/// How many base pages [`purged_while_claimed`] migrates.
const KEPT_PAGES: usize = 32;

/// Migrates [`KEPT_PAGES`] base pages at `base` (the pattern of `SEED`) while, before the
/// call claims anything (`FaultInjection::claim_handshake`), the program purges their second
/// half with `MADV_FREE` and writes 1 into its every word: that half fails unmoved
/// (`ENOENT`), the rest moves. Returns when the purge began.
fn purged_while_claimed(base: usize) -> std::time::Instant {
    const LEN: usize = KEPT_PAGES * 4096;
    let tail = base + LEN / 2;
    let folios: Vec<Folio<'static>> = (0..KEPT_PAGES)
        // SAFETY: the test keeps the mapping, purging its second half as said.
        .map(|p| unsafe { Folio::new(base + p * 4096, 4096) }.unwrap())
        .collect();
    let handshake = pagemig::Handshake::new();
    let at_claim = handshake.clone();
    let (result, purged) = watchdog(Duration::from_secs(60), "a purge before the claim", move || {
        let opts = MigrateOptions::default()
            .fault(FaultInjection { claim_handshake: Some(at_claim), ..Default::default() })
            .answer_faults(false);
        std::thread::scope(|s| {
            let call = s
                .spawn(|| Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts));
            handshake.wait();
            let purged = std::time::Instant::now();
            // SAFETY: the test's own pages; then written again, present.
            assert_eq!(unsafe { libc::madvise(tail as *mut _, LEN / 2, libc::MADV_FREE) }, 0);
            for i in 0..LEN / 2 / 8 {
                // SAFETY: as above.
                unsafe { ((tail + i * 8) as *mut u64).write_volatile(1) };
            }
            handshake.wait();
            (call.join().unwrap(), purged)
        })
    });
    let Err(Error::Partial { stats, .. }) = &result else { panic!("the purged pages moved: {result:?}") };
    assert_eq!(stats.failed_folios as usize, KEPT_PAGES / 2, "{stats:?}");
    purged
}

/// Pages purged during a call and still there as it ends (`MADV_FREE`, written again; a
/// `MADV_DONTNEED` whose zap has yet to come) stay registered for a while, their purge
/// recorded, so that a call right after does not isolate them before the zap; the program's
/// unmap of them is then seen and forgets the purge: fresh memory mapped at the same address
/// moves whole. (Without the registration kept, no event would say the memory was replaced,
/// and the fresh pages would fail as purged.)
#[test]
fn a_purge_kept_past_its_call_ends_with_the_memory() {
    // In a process of its own: the registration is kept only where its protection comes off
    // at the first try, which another test's event waiting to be read would refuse.
    const NAME: &str = "a_purge_kept_past_its_call_ends_with_the_memory";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_KEPT_PURGE", Duration::from_secs(120), || {
        const PAGES: usize = KEPT_PAGES;
        const LEN: usize = PAGES * 4096;
        let base = changes::mapping(LEN, 4096, SEED);
        let tail = base + LEN / 2;
        let purged = purged_while_claimed(base);
        let kept = common::vm_flags(tail).iter().any(|f| f == "um");
        // The record lasts a second from when the purge was read, and then the event reader
        // takes the registration off: a look later than that (a test thread held off its CPU)
        // tells nothing.
        if purged.elapsed() < Duration::from_millis(900) {
            assert!(kept, "the purged pages were not kept registered");
        } else {
            eprintln!("looked {:?} after the purge: whether it was kept is not known", purged.elapsed());
        }
        assert!(!common::vm_flags(base).iter().any(|f| f == "um"), "the rest was left registered");
        // The program replaces the purged half with fresh memory.
        map_afresh(tail, LEN / 2, 2);
        let folios: Vec<Folio<'static>> = (0..PAGES)
            // SAFETY: the test's own mapping, its second half mapped afresh.
            .map(|p| unsafe { Folio::new(base + p * 4096, 4096) }.unwrap())
            .collect();
        let stats = Engine::global()
            .unwrap()
            .migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default())
            .unwrap_or_else(|e| panic!("the fresh memory did not move whole: {e}"));
        assert_eq!(stats.succeeded_folios as usize, PAGES);
        for i in 0..LEN / 8 {
            let want = if i < LEN / 2 / 8 { pagemig::workload::pattern_word(SEED, i) } else { 2 };
            assert_eq!(changes::word(base + i * 8), want, "word {i}");
        }
        // SAFETY: the test's own mappings, no longer used.
        unsafe { libc::munmap(base as *mut _, LEN) };
    });
}

/// Purged pages a call's end kept registered ([`a_purge_kept_past_its_call_ends_with_the_memory`])
/// lose the registration once their purge is no longer recorded, with no other call to end
/// (here, in a process of its own, none): the event reader takes it off. It once stayed
/// until a later call ended, for ever if none came; meanwhile the program's own
/// `UFFDIO_REGISTER` there failed with `EBUSY`, which the kernel's `move_pages(2)` never
/// leaves behind. Every word stays as the program left it.
#[test]
fn a_purge_kept_past_its_call_is_unregistered_without_another_call() {
    const NAME: &str = "a_purge_kept_past_its_call_is_unregistered_without_another_call";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_KEPT_PURGE_GOES", Duration::from_secs(120), || {
        const LEN: usize = KEPT_PAGES * 4096;
        let base = changes::mapping(LEN, 4096, SEED);
        let tail = base + LEN / 2;
        let purged = purged_while_claimed(base);
        let registered = || common::vm_flags(tail).iter().any(|f| f == "um");
        let kept = registered();
        if purged.elapsed() < Duration::from_millis(900) {
            assert!(kept, "the purged pages were not kept registered");
        }
        while registered() {
            assert!(purged.elapsed() < Duration::from_secs(20), "the purged pages are still registered");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not before the record (a second from when the purge was read) has gone.
        let after = purged.elapsed();
        eprintln!("unregistered {after:?} after the purge");
        assert!(after >= Duration::from_secs(1), "unregistered {after:?} after the purge, while it is recorded");
        let own = pagemig::sys::uffd::Uffd::open().expect("a userfaultfd of the program's");
        own.register_missing(tail, LEN / 2).expect("the program's own registration of the purged pages");
        own.unregister(tail, LEN / 2).expect("the program's own unregistration");
        for i in 0..LEN / 8 {
            let want = if i < LEN / 2 / 8 { pagemig::workload::pattern_word(SEED, i) } else { 1 };
            assert_eq!(changes::word(base + i * 8), want, "word {i}");
        }
        // SAFETY: the test's own mapping, no longer used.
        unsafe { libc::munmap(base as *mut _, LEN) };
    });
}

/// Memory the program purges as its call ends, the purge's event read only once the call
/// has taken its registration off (injected: `FaultInjection::end_handshake`), then
/// unmaps and maps afresh at the same address: the fresh memory moves whole. The purge's
/// record once outlived the memory unseen (an unmap of memory no longer registered raises
/// no event), and for a second the fresh pages failed with `ENOENT` where the kernel moves
/// them.
#[test]
fn memory_purged_as_its_call_ends_then_replaced_moves_whole() {
    // In a process of its own: while it holds the events unread, every other call of the
    // process would wait on them.
    const NAME: &str = "memory_purged_as_its_call_ends_then_replaced_moves_whole";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_PURGED_AT_THE_END", Duration::from_secs(120), || {
        purged_as_the_call_ends_then_replaced(false);
    });
}

/// [`memory_purged_as_its_call_ends_then_replaced_moves_whole`], the purge made once the
/// call's end has read the events waiting, just before it takes its registration off
/// (injected: `FaultInjection::end_handshake_read`): its event is read only after the
/// registration went. Its record once stayed for a second with no unmap to be seen, and the
/// fresh memory failed with `ENOENT` (met under the suite's load: a test's fresh mapping
/// at the address of another's purged one).
#[test]
#[ignore = "a known limitation (README, Limits): a purge begun as its call takes the registration off is read after it, and its record makes fresh memory there fail with ENOENT for a second; the remedy tried (no unregistration while the kernel counts a change under way) was taken out after fork_child saw data change in children under load with it"]
fn memory_purged_as_its_call_unregisters_then_replaced_moves_whole() {
    // In a process of its own: while it holds the claims, every other call of the process
    // would wait on them.
    const NAME: &str = "memory_purged_as_its_call_unregisters_then_replaced_moves_whole";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_PURGED_AS_IT_UNREGISTERS", Duration::from_secs(120), || {
        purged_as_the_call_ends_then_replaced(true);
    });
}

/// The program purges memory just as its call takes the registration off (injected:
/// `FaultInjection::end_handshake_read`) and, the moment its `madvise` returns, unmaps it
/// and maps fresh memory in its place, on the same thread: the fresh memory is left
/// unregistered and moves whole. (The purged range stays registered past the call so that
/// the unmap is seen; registering it again once the purge was read, as a first remedy did,
/// registered whatever the program had mapped there meanwhile.)
#[test]
#[ignore = "a known limitation (README, Limits): a purge begun as its call takes the registration off is read after it, and its record makes fresh memory there fail with ENOENT for a second; the remedy tried (no unregistration while the kernel counts a change under way) was taken out after fork_child saw data change in children under load with it"]
fn memory_purged_and_replaced_at_once_as_its_call_unregisters_is_left_alone() {
    // In a process of its own: while it holds the claims, every other call of the process
    // would wait on them.
    const NAME: &str = "memory_purged_and_replaced_at_once_as_its_call_unregisters_is_left_alone";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_PURGED_AND_REPLACED", Duration::from_secs(120), || {
        const LEN: usize = SMALL_PAGES * 4096;
        let (base, folios) = small_mapping();
        let handshake = Handshake::new();
        let at_end = handshake.clone();
        let result = watchdog(Duration::from_secs(60), "a purge and a new mapping as the call ends", move || {
            let opts = MigrateOptions::default()
                .fault(FaultInjection { end_handshake_read: Some(at_end), ..Default::default() });
            let folios = folios();
            std::thread::scope(|s| {
                let call = s.spawn(|| {
                    Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts)
                });
                handshake.wait();
                let (tid_tx, tid_rx) = std::sync::mpsc::channel();
                let program = s.spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tid_tx.send(unsafe { libc::gettid() }).unwrap();
                    // SAFETY: the test's own pages, purged; then unmapped and mapped afresh
                    // at once, as an allocator that returns and takes memory does.
                    assert_eq!(unsafe { libc::madvise(base as *mut _, LEN, libc::MADV_DONTNEED) }, 0);
                    map_afresh(base, LEN, 5);
                });
                common::await_in_syscall(tid_rx.recv().unwrap(), libc::SYS_madvise, "the purge");
                handshake.wait();
                program.join().unwrap();
                call.join().unwrap()
            })
        });
        let stats = result.unwrap_or_else(|e| panic!("the call: {e}"));
        assert_eq!(stats.succeeded_folios as usize, SMALL_PAGES);
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), 5, "word {i} of the fresh memory");
        }
        // The unmap's event is read by then (the unmap waited for it), and drops what was
        // left registered there.
        assert!(!common::vm_flags(base).iter().any(|f| f == "um" || f == "uw"), "the fresh memory was registered");
        let stats = Engine::global()
            .unwrap()
            .migrate_pages(&folios(), node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default())
            .unwrap_or_else(|e| panic!("the fresh memory did not move whole: {e}"));
        assert_eq!(stats.succeeded_folios as usize, SMALL_PAGES);
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), 5, "word {i} of the fresh memory, moved");
        }
        assert!(!common::vm_flags(base).iter().any(|f| f == "um" || f == "uw"), "left registered");
        // SAFETY: the test's own mapping, no longer used.
        unsafe { libc::munmap(base as *mut _, LEN) };
    });
}

/// Migrates a small mapping, whose pages the program purges as the call ends (before its
/// end reads the events waiting, or, with `read`, after); then maps fresh memory in its
/// place within the purge's second, which must move whole.
fn purged_as_the_call_ends_then_replaced(read: bool) {
    {
        const PAGES: usize = SMALL_PAGES;
        const LEN: usize = PAGES * 4096;
        let (base, folios) = small_mapping();
        let handshake = Handshake::new();
        let at_end = handshake.clone();
        let (result, purged_at) = watchdog(Duration::from_secs(60), "a purge as the call ends", move || {
            let fault = if read {
                FaultInjection { end_handshake_read: Some(at_end), ..Default::default() }
            } else {
                FaultInjection { end_handshake: Some(at_end), ..Default::default() }
            };
            let opts = MigrateOptions::default().fault(fault);
            let folios = folios();
            let purged = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                let call = s.spawn(|| {
                    Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts)
                });
                handshake.wait();
                let purged_at = std::time::Instant::now();
                let (tid_tx, tid_rx) = std::sync::mpsc::channel();
                let purged = &purged;
                let purger = s.spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tid_tx.send(unsafe { libc::gettid() }).unwrap();
                    // SAFETY: the test's own pages, purged.
                    assert_eq!(unsafe { libc::madvise(base as *mut _, LEN, libc::MADV_DONTNEED) }, 0);
                    purged.store(true, Ordering::SeqCst);
                });
                // In `madvise`, its event sent (a moment after it enters), waiting to be read.
                common::await_in_syscall(tid_rx.recv().unwrap(), libc::SYS_madvise, "the purge");
                std::thread::sleep(Duration::from_millis(20));
                let waited = !purged.load(Ordering::SeqCst);
                handshake.wait();
                purger.join().unwrap();
                assert!(waited, "the purge did not wait for its event: the memory was not registered");
                (call.join().unwrap(), purged_at)
            })
        });
        let stats = result.unwrap_or_else(|e| panic!("the call: {e}"));
        assert_eq!(stats.succeeded_folios as usize, PAGES);
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), 0, "word {i}: the purge was undone");
        }
        // The program replaces the purged memory with fresh memory, within the purge's second.
        map_afresh(base, LEN, 3);
        let result = Engine::global().unwrap().migrate_pages(
            &folios(),
            node(),
            Reason::Syscall,
            Mode::Sync,
            &MigrateOptions::default(),
        );
        let within = purged_at.elapsed() < Duration::from_millis(900);
        match result {
            Ok(stats) => assert_eq!(stats.succeeded_folios as usize, PAGES),
            Err(e) if within => panic!("the fresh memory did not move whole: {e}"),
            Err(e) => eprintln!("{e}, but {:?} after the purge, its record gone: not known", purged_at.elapsed()),
        }
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), 3, "word {i}");
        }
        assert!(!common::vm_flags(base).iter().any(|f| f == "um" || f == "uw"), "the fresh memory left registered");
        // SAFETY: the test's own mapping, no longer used.
        unsafe { libc::munmap(base as *mut _, LEN) };
    }
}

/// The program unmaps memory a call has protected and is about to isolate, and maps fresh
/// memory of its own at the same address and writes it, all before the unmap's event is
/// read (injected: `FaultInjection::isolate_handshake`, `pause_event_reader`): the call
/// must leave the fresh memory's pages alone. Its move out checks only that the graveyard
/// is registered, not the source: it once took the fresh pages, and dropped them once the
/// unmap was read, and the program read zeros where it had written.
#[test]
fn memory_mapped_in_place_of_memory_being_isolated_keeps_its_data() {
    // In a process of its own: while it holds the events unread, every other call of the
    // process would wait on them.
    const NAME: &str = "memory_mapped_in_place_of_memory_being_isolated_keeps_its_data";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_MAPPED_IN_PLACE", Duration::from_secs(120), || {
        const LEN: usize = SMALL_PAGES * 4096;
        let (base, folios) = small_mapping();
        let folios = folios();
        let handshake = Handshake::new();
        let at_isolation = handshake.clone();
        let result = watchdog(Duration::from_secs(60), "memory mapped in place of memory being isolated", move || {
            let fault = FaultInjection {
                isolate_handshake: Some(at_isolation),
                pause_event_reader: true,
                ..Default::default()
            };
            let opts = MigrateOptions::default().answer_faults(false).fault(fault);
            std::thread::scope(|s| {
                let call = s.spawn(|| {
                    Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts)
                });
                handshake.wait();
                let unmapper = replace_in_place(s, base, LEN, 7);
                handshake.wait();
                unmapper.join().unwrap();
                call.join().unwrap()
            })
        });
        eprintln!("{result:?}");
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), 7, "word {i} of the fresh memory");
        }
        // SAFETY: the test's own mapping, no longer used.
        unsafe { libc::munmap(base as *mut _, LEN) };
    });
}

/// A call registers memory the program mapped in place of memory another call migrates,
/// whose unmap's event is not read yet (held: the other call's end waits at
/// `FaultInjection::end_handshake` with the events unread): once read, that unmap takes its
/// range out of the runs of every call in progress. Registered before the read, the new
/// call's memory was taken out of its own runs and marked dead: its folios failed with
/// `ENOENT`, and, had the other call not ended, it would have stayed registered after the
/// call. The call now registers once the unmap is read, and moves the fresh memory whole.
#[test]
fn memory_mapped_in_place_of_another_calls_moves_whole() {
    // In a process of its own: while it holds the events unread, every other call of the
    // process would wait on them.
    const NAME: &str = "memory_mapped_in_place_of_another_calls_moves_whole";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_MAPPED_FOR_ANOTHER_CALL", Duration::from_secs(120), || {
        const PAGES: usize = SMALL_PAGES;
        const LEN: usize = PAGES * 4096;
        let (base, folios) = small_mapping();
        let handshake = Handshake::new();
        let at_end = handshake.clone();
        let (first, second) =
            watchdog(Duration::from_secs(60), "memory mapped in place of another call's", move || {
                let opts = MigrateOptions::default()
                    .fault(FaultInjection { end_handshake: Some(at_end), ..Default::default() });
                let (old, fresh) = (folios(), folios());
                std::thread::scope(|s| {
                    let first = s.spawn(|| {
                        Engine::global().unwrap().migrate_pages(&old, node(), Reason::Syscall, Mode::Sync, &opts)
                    });
                    handshake.wait();
                    // The first call ends with the events held unread: the program unmaps its
                    // memory (the unmap waits for its event to be read) and maps fresh memory there.
                    let unmapper = replace_in_place(s, base, LEN, 9);
                    let second = s.spawn(|| {
                        Engine::global().unwrap().migrate_pages(
                            &fresh,
                            node(),
                            Reason::Syscall,
                            Mode::Sync,
                            &MigrateOptions::default(),
                        )
                    });
                    // The second call registers meanwhile; then the first goes on and reads.
                    std::thread::sleep(Duration::from_millis(200));
                    handshake.wait();
                    unmapper.join().unwrap();
                    (first.join().unwrap(), second.join().unwrap())
                })
            });
        eprintln!("first call: {first:?}");
        let stats = second.unwrap_or_else(|e| panic!("the fresh memory did not move whole: {e}"));
        assert_eq!(stats.succeeded_folios as usize, PAGES);
        for i in 0..LEN / 8 {
            assert_eq!(changes::word(base + i * 8), 9, "word {i} of the fresh memory");
        }
        assert!(!common::vm_flags(base).iter().any(|f| f == "um" || f == "uw"), "left registered");
        // SAFETY: the test's own mapping, no longer used.
        unsafe { libc::munmap(base as *mut _, LEN) };
    });
}

/// On a thread of `s`, the program unmaps `[base, base + len)`, which waits for its event
/// to be read; once that thread is in `munmap`, this one maps fresh memory at the same
/// address and stores `word` into its every word. Returns the unmapping thread.
fn replace_in_place<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    base: usize,
    len: usize,
    word: u64,
) -> std::thread::ScopedJoinHandle<'s, ()> {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let unmapper = s.spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        // SAFETY: the test's own memory, unmapped as the program may.
        assert_eq!(unsafe { libc::munmap(base as *mut _, len) }, 0);
    });
    // Unmapped, its event waiting to be read.
    common::await_in_syscall(tid_rx.recv().unwrap(), libc::SYS_munmap, "the unmap");
    let started = std::time::Instant::now();
    loop {
        // SAFETY: fresh memory of the test's at an address now free, or nothing.
        let p = unsafe {
            libc::mmap(
                base as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize == base {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the address never came free");
        if p != libc::MAP_FAILED {
            // SAFETY: a mapping this loop just made elsewhere.
            unsafe { libc::munmap(p, len) };
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    for i in 0..len / 8 {
        // SAFETY: the fresh mapping.
        unsafe { ((base + i * 8) as *mut u64).write_volatile(word) };
    }
    unmapper
}

/// How many base pages [`small_mapping`] maps.
const SMALL_PAGES: usize = 16;

/// The program unmaps `[base, base + len)`, of the test's own, maps fresh memory at the
/// same address and stores `word` into its every word.
fn map_afresh(base: usize, len: usize, word: u64) {
    // SAFETY: the test's own pages, replaced in place; the fresh mapping is written only.
    unsafe {
        assert_eq!(libc::munmap(base as *mut _, len), 0);
        let p = libc::mmap(
            base as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        assert_eq!(p as usize, base, "mapping again: {}", std::io::Error::last_os_error());
        for i in 0..len / 8 {
            ((base + i * 8) as *mut u64).write_volatile(word);
        }
    }
}

/// [`SMALL_PAGES`] base pages of the test's (the pattern of `SEED`), and a maker of their
/// folios (made again after the test replaced the memory).
fn small_mapping() -> (usize, impl Fn() -> Vec<Folio<'static>> + Copy + Send) {
    let base = changes::mapping(SMALL_PAGES * 4096, 4096, SEED);
    let folios = move || {
        (0..SMALL_PAGES)
            // SAFETY: the test changes the mapping only as the program may (purges,
            // unmaps, maps in place), which pagemig must survive.
            .map(|p| unsafe { Folio::new(base + p * 4096, 4096) }.unwrap())
            .collect()
    };
    (base, folios)
}
