//! Migration of real memory on this machine: every byte verified, placement verified.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

mod common;

use common::node;

use pagemig::workload::{self, WriteLog};
use pagemig::{Engine, Error, FaultInjection, Folio, MigrateOptions, Mode, Reason, Region, migrate_pages, numa};

fn assert_on_node(region: &Region, node: u32) {
    let placement = region.placement().unwrap();
    let pages = region.len() / 4096;
    assert_eq!(placement.get(&(node as i32)).copied(), Some(pages), "placement {placement:?}");
}

fn migrate_and_verify(size: usize, folio: usize, batch: usize) -> pagemig::MigrateStats {
    let region = Region::new(size, folio, Some(node())).unwrap();
    workload::fill(&region, 42);
    let frames_before = numa::page_frames(region.addr(), region.len()).unwrap();
    let opts = MigrateOptions::default().max_batch_pages(batch);
    let stats =
        Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
    assert_eq!(stats.succeeded_folios as usize, size / folio);
    assert_eq!(stats.failed_folios, 0);
    assert_eq!(stats.bytes as usize, size);
    let report = workload::verify(&region, 42, &WriteLog::default());
    assert!(report.ok(), "{report:?}");
    assert_on_node(&region, node());
    assert_new_frames(&frames_before, &numa::page_frames(region.addr(), region.len()).unwrap());
    stats
}

#[test]
fn migrates_4k_folios() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "migrates_4k_folios");
    let s = migrate_and_verify(16 << 20, 4096, 512);
    assert_eq!(s.batches, 8);
    assert_eq!(s.batch_copied_folios, 4096);
}

#[test]
fn migrates_64k_folios() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "migrates_64k_folios");
    migrate_and_verify(16 << 20, 64 << 10, 512);
}

#[test]
fn migrates_2m_folios_and_keeps_thp() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "migrates_2m_folios_and_keeps_thp");
    let region = Region::new(32 << 20, 2 << 20, Some(node())).unwrap();
    let thp_before = region.anon_huge_bytes().unwrap();
    workload::fill(&region, 7);
    let stats = migrate_pages(&region.folios(), node(), Reason::Demotion, Mode::Sync).unwrap();
    assert_eq!((stats.succeeded_folios, stats.thp_succeeded), (16, 16));
    assert!(workload::verify(&region, 7, &WriteLog::default()).ok());
    assert_on_node(&region, node());
    let thp_after = region.anon_huge_bytes().unwrap();
    // THP availability depends on fragmentation; whatever was huge must stay huge.
    assert!(thp_before > 0, "the region was not THP-backed to begin with");
    assert!(thp_after >= thp_before, "AnonHugePages {thp_before} -> {thp_after}");
}

/// 2 MiB folios the kernel maps with base pages (the program changed one page's protection
/// and back, which splits the mapping of each huge page) arrive mapped whole by huge pages
/// again, every byte as it was: left as base pages they would stay so for good, and
/// `khugepaged` might collapse them onto the node they left (see `mover::rejoin_huge_pages`).
/// Where this kernel cannot collapse (no `MADV_COLLAPSE`, or no huge page to be had) there
/// is nothing to check.
#[test]
fn huge_folios_mapped_with_base_pages_arrive_mapped_whole() {
    let what = "huge_folios_mapped_with_base_pages_arrive_mapped_whole";
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, what);
    const LEN: usize = 8 << 20;
    const HUGE: usize = 2 << 20;
    let region = Region::new(LEN, HUGE, Some(node())).unwrap();
    workload::fill(&region, 43);
    if region.anon_huge_bytes().unwrap() != LEN as u64 {
        eprintln!("{what}: no huge pages to split here: nothing to check");
        return;
    }
    let split_all = || assert_eq!(common::map_with_base_pages(&region), 0, "{what}: mapped with base pages");
    // Whether this kernel collapses at all: tried on the region itself, then split again.
    split_all();
    if pagemig::sys::madvise(region.addr(), LEN, pagemig::sys::Advice::Collapse).is_err()
        || region.anon_huge_bytes().unwrap() != LEN as u64
    {
        eprintln!("{what}: this kernel does not collapse the region (MADV_COLLAPSE): nothing to check");
        return;
    }
    assert!(workload::verify(&region, 43, &WriteLog::default()).ok());
    split_all();
    let opts = MigrateOptions::default().max_batch_pages(512);
    let stats =
        Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
    assert_eq!(stats.succeeded_folios as usize, LEN / HUGE, "{stats:?}");
    let report = workload::verify(&region, 43, &WriteLog::default());
    assert!(report.ok(), "{what}: {report:?}");
    assert_on_node(&region, node());
    assert_eq!(region.anon_huge_bytes().unwrap(), LEN as u64, "{what}: mapped whole after the move");
}

/// Huge folios whose mapping says `MADV_NOHUGEPAGE` (advised after they were made, as a
/// program that stops wanting huge pages does) stay huge, as the kernel's migration keeps
/// them, and the mapping keeps its advice; base pages of a mapping advised
/// `MADV_HUGEPAGE` stay base pages.
#[test]
fn folios_keep_their_size_whatever_their_mapping_advises() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "folios_keep_their_size_whatever_their_mapping_advises");
    for attempt in 1.. {
        let fallbacks = common::thp_fault_fallbacks();
        let region = Region::new(16 << 20, 2 << 20, Some(node())).unwrap();
        workload::fill(&region, 9);
        let thp_before = region.anon_huge_bytes().unwrap();
        assert!(thp_before > 0, "the region was not THP-backed to begin with");
        pagemig::sys::madvise(region.addr(), region.len(), pagemig::sys::Advice::NoHugePage).unwrap();
        let stats = migrate_pages(&region.folios(), node(), Reason::Demotion, Mode::Sync).unwrap();
        assert_eq!(stats.succeeded_folios, 8);
        assert!(workload::verify(&region, 9, &WriteLog::default()).ok());
        assert_on_node(&region, node());
        assert!(common::vm_flags(region.addr()).contains(&"nh".to_string()), "the mapping's advice changed");
        let thp_after = region.anon_huge_bytes().unwrap();
        if thp_after == thp_before {
            break;
        }
        // Where the kernel could not give a destination a huge page (the tests beside this
        // one fragment the machine's memory), the kernel's own migration splits the folio
        // too: tried again. A split while no huge-page allocation failed is pagemig's.
        let failed = common::thp_fault_fallbacks() - fallbacks;
        assert!(
            failed > 0 && attempt < 3,
            "huge pages split or lost: {thp_after} of {thp_before} bytes huge after the move (attempt {attempt}), \
             {failed} huge-page allocations failed meanwhile"
        );
        eprintln!("attempt {attempt}: {thp_after} of {thp_before} bytes huge, {failed} huge-page allocations failed");
    }

    let small = Region::new(8 << 20, 4096, Some(node())).unwrap();
    workload::fill(&small, 10);
    pagemig::sys::madvise(small.addr(), small.len(), pagemig::sys::Advice::HugePage).unwrap();
    let stats = migrate_pages(&small.folios(), node(), Reason::Demotion, Mode::Sync).unwrap();
    assert_eq!(stats.succeeded_folios, 2048);
    assert!(workload::verify(&small, 10, &WriteLog::default()).ok());
    assert_on_node(&small, node());
    assert_eq!(small.anon_huge_bytes().unwrap(), 0, "base pages made huge");
    assert!(common::vm_flags(small.addr()).contains(&"hg".to_string()), "the mapping's advice changed");
}

#[test]
fn writers_lose_nothing_over_repeated_migrations() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "writers_lose_nothing_over_repeated_migrations");
    let region = Region::new(8 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 3);
    let opts = MigrateOptions::default().max_batch_pages(64);
    let (total, log) = workload::with_writers(&region, 2, || {
        let mut moved = 0;
        for _ in 0..10 {
            let s = Engine::global()
                .unwrap()
                .migrate_pages(&region.folios(), node(), Reason::NumaMisplaced, Mode::Sync, &opts)
                .unwrap();
            moved += s.succeeded_folios;
        }
        moved
    });
    assert_eq!(total, 10 * 2048);
    assert!(log.writes > 0);
    let report = workload::verify(&region, 3, &log);
    assert!(report.ok(), "{report:?}");
    assert_on_node(&region, node());
}

/// A piece budget (`migrate/piece_budget_us`) cuts the pipelined copy of a large batch into
/// more, smaller pieces, each moved on its own, and a timed writer loses nothing; both folio
/// sizes. 50 µs is less than any piece of 512 KiB or more takes here, so every piece is of
/// the smallest size: one 2 MiB folio, or 128 base pages.
#[test]
fn a_piece_budget_cuts_the_pipelined_copy_into_smaller_pieces() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_piece_budget_cuts_the_pipelined_copy_into_smaller_pieces");
    for folio in [4096, 2 << 20] {
        let mut runs = Vec::new();
        for budget in [0, 50] {
            let region = Region::new(32 << 20, folio, Some(node())).unwrap();
            workload::fill(&region, 9);
            let opts = MigrateOptions::default().max_batch_pages(8192).piece_budget_us(budget).precopy(false);
            let (stats, log) = workload::with_timed_writers(&region, 1, || {
                Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
            });
            let stats = stats.unwrap();
            assert_eq!((stats.succeeded_folios, stats.failed_folios), ((32 << 20) / folio as u64, 0));
            let report = workload::verify(&region, 9, &log);
            assert!(report.ok(), "folio {folio}, budget {budget} µs: {report:?}");
            assert_eq!(log.stalls.len(), 1);
            assert_on_node(&region, node());
            runs.push(stats.runs + stats.mover_runs);
        }
        eprintln!("folio {folio}: runs moved without a budget and with 50 µs: {runs:?}");
        // Without a budget: pieces of 2 MiB (base pages) or 2, 2, 4, 8, 8 and 8 MiB (huge pages).
        assert!(runs[1] >= 2 * runs[0], "folio {folio}: runs moved without a budget and with: {runs:?}");
    }
    let e = Engine::global()
        .unwrap()
        .migrate_pages(&[], node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default().piece_budget_us(10))
        .unwrap_err();
    assert!(e.to_string().contains("piece_budget_us"), "{e}");
}

/// The pre-copy (`migrate/precopy`) reads every folio while it is writable and, once the
/// folio is protected, copies again exactly what a writer stored after that read: a timed
/// writer stores into every page while the first piece of each batch waits 30 ms between
/// its read and its protection. Every byte, every store and every page's node checked;
/// both folio sizes; the same without the pre-copy reads nothing early.
#[test]
fn the_precopy_copies_again_what_was_written_after_its_read() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "the_precopy_copies_again_what_was_written_after_its_read");
    for folio in [4096, 2 << 20] {
        for precopy in [false, true] {
            let size = 16 << 20;
            let region = Region::new(size, folio, Some(node())).unwrap();
            workload::fill(&region, 17);
            let frames_before = numa::page_frames(region.addr(), region.len()).unwrap();
            let opts = MigrateOptions::default()
                .max_batch_pages(2048)
                .precopy(precopy)
                .fault(FaultInjection { delay_after_precopy: Some(Duration::from_millis(30)), ..Default::default() });
            let (stats, log) = workload::with_timed_writers(&region, 1, || {
                Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
            });
            let stats = stats.unwrap();
            let what = format!("folio {folio}, precopy {precopy}");
            assert_eq!((stats.succeeded_folios, stats.failed_folios), ((size / folio) as u64, 0), "{what}");
            let report = workload::verify(&region, 17, &log);
            assert!(report.ok(), "{what}: {report:?}");
            assert!(log.writes > 0, "{what}");
            assert_on_node(&region, node());
            assert_new_frames(&frames_before, &numa::page_frames(region.addr(), region.len()).unwrap());
            eprintln!(
                "{what}: {} bytes read early, {} copied again, {} stores",
                stats.precopied_bytes, stats.recopied_bytes, log.writes
            );
            if precopy {
                assert_eq!(stats.precopied_bytes, size as u64, "{what}: every folio read while writable");
                // The writer stored into the first piece during the 30 ms pause.
                assert!(0 < stats.recopied_bytes && stats.recopied_bytes <= size as u64, "{what}: {stats:?}");
            } else {
                assert_eq!((stats.precopied_bytes, stats.recopied_bytes), (0, 0), "{what}");
            }
        }
    }
}

#[test]
fn pipe_read_into_migrating_memory_lands_in_new_page() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "pipe_read_into_migrating_memory_lands_in_new_page");
    let engine = Engine::global().unwrap();
    if engine.capabilities().user_mode_only {
        eprintln!("skipped: userfaultfd is user-mode only here; kernel writes get EFAULT");
        return;
    }
    for answer in [false, true] {
        let region = Region::new(1 << 20, 4096, Some(node())).unwrap();
        workload::fill(&region, 9);
        let frames_before = numa::page_frames(region.addr(), region.len()).unwrap();
        let (reader, mut writer) = std::io::pipe().unwrap();
        let page = 100;
        let target = region.addr() + 4096 * page;
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        // Folio `page` stays isolated for 300 ms before its copy; the read(2) into it starts
        // inside that window, so the kernel's write waits for the move, or, answered, for the
        // event reader's copy of the page.
        let pause = Duration::from_millis(300);
        let opts = MigrateOptions::default()
            .no_batch_copy(true)
            .answer_faults(answer)
            .fault(FaultInjection { delay_folio_copy: Some((page, pause)), ..Default::default() });
        let started = std::time::Instant::now();
        let (read_done, stats) = std::thread::scope(|s| {
            let migrating =
                s.spawn(|| engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts));
            std::thread::sleep(Duration::from_millis(100));
            writer.write_all(&payload).unwrap();
            let mut got = 0;
            while got < 4096 {
                // SAFETY: `target` lies inside the region, which outlives this call, and no
                // other thread touches this page.
                let n = unsafe { libc::read(reader.as_raw_fd(), (target + got) as *mut libc::c_void, 4096 - got) };
                assert!(n > 0, "read failed: {}", std::io::Error::last_os_error());
                got += n as usize;
            }
            let read_done = started.elapsed();
            (read_done, migrating.join().unwrap().unwrap())
        });
        if answer {
            assert!(read_done < pause, "answers on: the read finished after {read_done:?}");
            assert!(stats.answered_bytes >= 4096, "{stats:?}");
        } else {
            assert!(read_done >= pause, "the read finished after {read_done:?}, before the folio moved");
            assert_eq!(stats.answered_bytes, 0);
        }
        assert_eq!(stats.succeeded_folios, 256, "answers {answer}");
        for (i, chunk) in payload.chunks(8).enumerate() {
            let want = u64::from_ne_bytes(chunk.try_into().unwrap());
            assert_eq!(region.word(page * 512 + i).load(Ordering::Relaxed), want, "answers {answer}: word {i}");
        }
        let log = WriteLog {
            writes: 512,
            last: (0..512).map(|i| (page * 512 + i, region.word(page * 512 + i).load(Ordering::Relaxed))).collect(),
            stalls: Vec::new(),
        };
        assert!(workload::verify(&region, 9, &log).ok(), "answers {answer}");
        assert_on_node(&region, node());
        assert_new_frames(&frames_before, &numa::page_frames(region.addr(), region.len()).unwrap());
    }
}

/// Every page is backed by a different physical frame than before (when frames are
/// visible, i.e. with CAP_SYS_ADMIN).
fn assert_new_frames(before: &[Option<u64>], after: &[Option<u64>]) {
    if before.iter().chain(after).all(|f| f.is_none_or(|pfn| pfn == 0)) {
        return;
    }
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        assert!(a.is_some(), "page {i} not present after migration");
        assert_ne!(b, a, "page {i} still on frame {b:?}");
    }
}

#[test]
fn mlocked_region_stays_locked() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "mlocked_region_stays_locked");
    let region = Region::new(4 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 11);
    if let Err(e) = region.mlock() {
        eprintln!("skipped: mlock refused here ({e})");
        return;
    }
    assert_eq!(region.locked_bytes().unwrap(), 4 << 20);
    let stats = migrate_pages(&region.folios(), node(), Reason::Compaction, Mode::Sync).unwrap();
    assert_eq!(stats.relock_failures, 0);
    assert_eq!(region.locked_bytes().unwrap(), 4 << 20);
    assert!(workload::verify(&region, 11, &WriteLog::default()).ok());
    assert_on_node(&region, node());
}

#[test]
fn injected_copy_failure_is_undone() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "injected_copy_failure_is_undone");
    let region = Region::new(4 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 5);
    let failing = vec![3, 4, 700];
    // The writer's faults wait for the move: a folio answered by the event reader has its
    // new page whatever its copy does, and moves
    // (`faults_on_isolated_base_pages_are_answered_without_losing_a_write`).
    let opts = MigrateOptions::default().max_batch_pages(256).answer_faults(false).fault(FaultInjection {
        fail_batch_copy: true,
        fail_folio_copy: failing.clone(),
        ..Default::default()
    });
    let (result, log) = workload::with_writers(&region, 1, || {
        Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
    });
    match result {
        Err(Error::Partial { failed, total, stats, .. }) => {
            assert_eq!((failed, total), (3, 1024));
            assert_eq!(stats.succeeded_folios, 1021);
            assert_eq!(stats.fallback_folios, 1024);
            // Each failed folio is named, with its errno.
            let mut named: Vec<(usize, i32)> = stats.failures.iter().map(|f| (f.addr, f.errno)).collect();
            named.sort_unstable();
            let want: Vec<(usize, i32)> = failing.iter().map(|&i| (region.addr() + i * 4096, libc::EIO)).collect();
            assert_eq!(named, want);
        }
        other => panic!("expected a partial failure, got {other:?}"),
    }
    // Writers were never stuck (they kept writing) and nothing was lost.
    assert!(log.writes > 0);
    let report = workload::verify(&region, 5, &log);
    assert!(report.ok(), "{report:?}");
    // The failed folios are writable again right away.
    for i in failing {
        region.word(i * 512 + 1).store(1, Ordering::Relaxed);
    }
    assert_on_node(&region, node());
}

#[test]
fn failed_move_is_undone_on_the_mover_thread_and_on_the_caller() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "failed_move_is_undone_on_the_mover_thread_and_on_the_caller");
    for mover in [true, false] {
        let region = Region::new(4 << 20, 4096, Some(node())).unwrap();
        workload::fill(&region, 6);
        let opts = MigrateOptions::default()
            .max_batch_pages(256)
            .mover(mover)
            .precopy(false)
            // The writer's faults wait for the move (answered, a folio moves whatever the
            // run's move does: `faults_on_isolated_base_pages_are_answered_without_losing_a_write`).
            .answer_faults(false)
            .fault(FaultInjection { fail_move: vec![700], ..Default::default() });
        let (result, log) = workload::with_writers(&region, 1, || {
            Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
        });
        match result {
            Err(Error::Partial { failed, total, stats, first }) => {
                // The run holding folio 700 is its batch, folios 512 to 767.
                assert_eq!((failed, total), (256, 1024), "mover {mover}");
                assert_eq!(stats.succeeded_folios, 768);
                assert!(first.to_string().contains("move of the new pages"), "{first}");
                let mut named: Vec<usize> = stats.failures.iter().map(|f| f.addr).collect();
                named.sort_unstable();
                let want: Vec<usize> = (512..768).map(|i| region.addr() + i * 4096).collect();
                assert_eq!(named, want, "mover {mover}");
                assert!(stats.failures.iter().all(|f| f.errno == libc::EIO), "{:?}", stats.failures);
                if mover {
                    assert_eq!(stats.mover_runs, stats.runs);
                    assert!(stats.mover_runs >= 3, "{stats:?}");
                } else {
                    assert_eq!(stats.mover_runs, 0);
                }
            }
            other => panic!("expected a partial failure, got {other:?}"),
        }
        assert!(log.writes > 0);
        let report = workload::verify(&region, 6, &log);
        assert!(report.ok(), "mover {mover}: {report:?}");
        // The failed folios are writable again right away.
        for i in 512..768 {
            region.word(i * 512 + 1).store(1, Ordering::Relaxed);
        }
        assert_on_node(&region, node());
    }
}

#[test]
fn bad_input_is_refused_and_memory_unchanged() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "bad_input_is_refused_and_memory_unchanged");
    let engine = Engine::global().unwrap();
    let region = Region::new(1 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 13);
    let folios = region.folios();
    let check = |e: Error, errno: pagemig::sys::Errno| {
        assert_eq!(e.errno(), errno, "{e}");
        assert!(workload::verify(&region, 13, &WriteLog::default()).ok());
    };
    let default = MigrateOptions::default();
    // Zero length.
    check(
        engine.migrate_pages(&[], node(), Reason::Syscall, Mode::Sync, &default).unwrap_err(),
        pagemig::sys::Errno::INVAL,
    );
    // Unknown node.
    let e = engine.migrate_pages(&folios, 999, Reason::Syscall, Mode::Sync, &default).unwrap_err();
    assert!(e.to_string().contains("999"));
    check(e, pagemig::sys::Errno::NODEV);
    // Bad batch bounds.
    for bad in [0, 262_145] {
        let opts = MigrateOptions::default().max_batch_pages(bad);
        check(
            engine.migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts).unwrap_err(),
            pagemig::sys::Errno::INVAL,
        );
        let before = engine.settings();
        assert!(engine.update_settings(|s| s.max_batch_pages = bad).is_err());
        assert_eq!(engine.settings(), before, "a rejected setting changed nothing");
    }
    // Overlapping folios.
    let overlap = [folios[0], folios[0]];
    check(
        engine.migrate_pages(&overlap, node(), Reason::Syscall, Mode::Sync, &default).unwrap_err(),
        pagemig::sys::Errno::INVAL,
    );
    // Unaligned folios and bad sizes.
    assert!(raw_folio(region.addr() | 4096, 8192).is_err());
    assert!(raw_folio(region.addr(), 3 * 4096).is_err());
    assert!(raw_folio(region.addr(), 4 << 20).is_err());
    // Unaligned or empty regions.
    // SAFETY: refused before the range is used.
    unsafe {
        assert!(matches!(Region::adopt(region.addr() + 1, 4096, 4096), Err(Error::Invalid(_))));
        assert!(matches!(Region::adopt(region.addr(), 0, 4096), Err(Error::Invalid(_))));
    }
    assert!(workload::verify(&region, 13, &WriteLog::default()).ok());
}

#[test]
fn memory_pagemig_may_not_move_is_refused() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "memory_pagemig_may_not_move_is_refused");
    let engine = Engine::global().unwrap();
    let default = MigrateOptions::default();
    // A shared anonymous mapping.
    // SAFETY: a fresh mapping, unmapped at the end of the test.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    // SAFETY: the mapping is ours.
    unsafe { std::ptr::write_bytes(shared as *mut u8, 0x5a, 65536) };
    let folios: Vec<Folio> = (0..16).map(|i| raw_folio(shared + i * 4096, 4096).unwrap()).collect();
    let e = engine.migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &default).unwrap_err();
    assert_eq!(e.errno(), pagemig::sys::Errno::FAULT);
    assert!(e.to_string().contains("shared"), "{e}");
    // SAFETY: read back our own mapping.
    assert!(unsafe { std::slice::from_raw_parts(shared as *const u8, 65536) }.iter().all(|&b| b == 0x5a));
    // SAFETY: adopting is refused before any use.
    assert!(matches!(unsafe { Region::adopt(shared, 65536, 4096) }, Err(Error::NotMovable { .. })));

    // A file-backed mapping: this test binary.
    let exe = std::fs::File::open("/proc/self/exe").unwrap();
    // SAFETY: a fresh read-only private mapping of a file, unmapped below.
    let file = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_PRIVATE, exe.as_raw_fd(), 0) }
        as usize;
    let e = engine
        .migrate_pages(&[raw_folio(file, 4096).unwrap()], node(), Reason::Syscall, Mode::Sync, &default)
        .unwrap_err();
    assert!(e.to_string().contains("file-backed"), "{e}");

    // The calling thread's own stack.
    let on_stack = std::hint::black_box([0u8; 16]);
    let page = on_stack.as_ptr() as usize & !4095;
    let e = engine
        .migrate_pages(&[raw_folio(page, 4096).unwrap()], node(), Reason::Syscall, Mode::Sync, &default)
        .unwrap_err();
    assert!(e.to_string().contains("stack"), "{e}");
    assert_eq!(e.errno(), pagemig::sys::Errno::FAULT);

    // The heap of the main thread: a special mapping.
    if let Some(heap) = pagemig::maps::vmas().unwrap().into_iter().find(|v| v.path == "[heap]") {
        let e = engine
            .migrate_pages(&[raw_folio(heap.start, 4096).unwrap()], node(), Reason::Syscall, Mode::Sync, &default)
            .unwrap_err();
        assert!(e.to_string().contains("[heap]"), "{e}");
    }

    // Unmapped memory.
    let addr = common::unmapped_page();
    let e = engine
        .migrate_pages(&[raw_folio(addr, 4096).unwrap()], node(), Reason::Syscall, Mode::Sync, &default)
        .unwrap_err();
    assert!(e.to_string().contains("not mapped"), "{e}");

    // SAFETY: both mappings are ours and unused from here on.
    unsafe {
        libc::munmap(shared as *mut libc::c_void, 65536);
        libc::munmap(file as *mut libc::c_void, 4096);
    }
}

#[test]
fn adopted_memory_migrates() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "adopted_memory_migrates");
    let mut buf = vec![0u8; (4 << 20) + 4096];
    let base = (buf.as_mut_ptr() as usize + 4095) & !4095;
    // A large Vec is its own anonymous mapping (glibc mmaps big allocations).
    // SAFETY: the vector outlives the region.
    let region = unsafe { Region::adopt(base, 4 << 20, 4096) }.unwrap();
    workload::fill(&region, 21);
    migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Async).unwrap();
    assert!(workload::verify(&region, 21, &WriteLog::default()).ok());
    assert_on_node(&region, node());
    drop(region);
    drop(buf);
}

#[test]
fn concurrent_calls_on_the_same_folios_never_lose_them() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "concurrent_calls_on_the_same_folios_never_lose_them");
    let region = Region::new(8 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 31);
    let folios = region.folios();
    let engine = Engine::global().unwrap();
    let opts = MigrateOptions::default().max_batch_pages(32);
    let results: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| engine.migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts));
        let b = s.spawn(|| engine.migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for r in results {
        let s = r.unwrap();
        assert_eq!(s.succeeded_folios, 2048);
    }
    assert!(workload::verify(&region, 31, &WriteLog::default()).ok());
    assert_on_node(&region, node());
}

#[test]
fn migration_past_the_map_count_limit_is_refused_up_front() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "migration_past_the_map_count_limit_is_refused_up_front");
    // Every other 4 KiB folio of 512 MiB: 65536 separate runs, each its own mapping once
    // moved — more than vm.max_map_count allows.
    let limit = pagemig::sys::max_map_count();
    let pages = (limit + 100) * 2;
    let region = Region::new(pages * 4096, 4096, Some(node())).unwrap();
    for p in (0..pages).step_by(512) {
        region.word(p * 512).store(p as u64, Ordering::Relaxed);
    }
    let scattered: Vec<Folio> = region.folios().into_iter().step_by(2).collect();
    // Mappings over the region (the whole process's count moves with the tests running
    // beside this one).
    let region_maps = || {
        let (lo, hi) = (region.addr(), region.addr() + region.len());
        pagemig::maps::vmas().unwrap().iter().filter(|m| m.start < hi && lo < m.end).count()
    };
    let maps_before = region_maps();
    let e = migrate_pages(&scattered, node(), Reason::Syscall, Mode::Sync).unwrap_err();
    assert_eq!(e.errno(), pagemig::sys::Errno::NOMEM, "{e}");
    assert!(matches!(e, Error::MapCountLimit { .. }), "{e}");
    assert!(e.to_string().contains("max_map_count"), "{e}");
    // Nothing was touched: no mapping split, every word as written.
    assert_eq!(region_maps(), maps_before);
    for p in (0..pages).step_by(512) {
        assert_eq!(region.word(p * 512).load(Ordering::Relaxed), p as u64);
    }
}

#[test]
fn scattered_folios_migrate_and_keep_their_neighbours() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "scattered_folios_migrate_and_keep_their_neighbours");
    let region = Region::new(8 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 44);
    let scattered: Vec<Folio> = region.folios().into_iter().step_by(2).collect();
    let stats = migrate_pages(&scattered, node(), Reason::Syscall, Mode::Sync).unwrap();
    assert_eq!((stats.succeeded_folios, stats.runs), (1024, 1024));
    assert!(workload::verify(&region, 44, &WriteLog::default()).ok());
    assert_on_node(&region, node());
}

#[test]
fn readers_never_see_a_moving_folio_empty() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "readers_never_see_a_moving_folio_empty");
    // With deferred freeing a source is briefly empty between its old pages moving out and
    // its new pages moving in; readers must wait through that, never read zeros.
    let region = Region::new(8 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 55);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let engine = Engine::global().unwrap();
    for deferred in [true, false] {
        let opts = MigrateOptions::default().max_batch_pages(64).deferred_free(deferred);
        let bad = std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|r| {
                    let (region, stop) = (&region, &stop);
                    s.spawn(move || {
                        let mut bad = 0u64;
                        let mut i = r * 7;
                        while !stop.load(Ordering::Relaxed) {
                            i = (i + 4099) % region.words();
                            if region.word(i).load(Ordering::Relaxed) != workload::pattern_word(55, i) {
                                bad += 1;
                            }
                        }
                        bad
                    })
                })
                .collect();
            for _ in 0..5 {
                engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            readers.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
        });
        stop.store(false, Ordering::Relaxed);
        assert_eq!(bad, 0, "deferred {deferred}: readers saw wrong words");
        assert!(workload::verify(&region, 55, &WriteLog::default()).ok());
        assert_on_node(&region, node());
    }
}

/// A folio over a raw address, for calls that pagemig refuses before touching the memory.
fn raw_folio(addr: usize, size: usize) -> pagemig::Result<Folio<'static>> {
    // SAFETY: each such call is refused by the up-front checks, or names a mapping that the
    // test keeps mapped while the call runs.
    unsafe { Folio::new(addr, size) }
}

/// Every way base pages reach their new home, under two writers: copied straight into the
/// source (`migrate/copy_in`, memory without a policy of its own), filled into empty
/// destinations and moved in (the default), copied into populated destinations, and memory bound by
/// `mbind` (whose pages must not be copied straight in). Every byte, write and frame
/// checked.
#[test]
fn every_destination_path_moves_every_byte_and_write() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "every_destination_path_moves_every_byte_and_write");
    struct Path {
        name: &'static str,
        opts: MigrateOptions,
        mbind: bool,
        copied_in: bool,
    }
    let paths = [
        Path {
            name: "copy in",
            opts: MigrateOptions::default().copy_in(true).precopy(false),
            mbind: false,
            copied_in: true,
        },
        Path {
            name: "filled destination",
            opts: MigrateOptions::default().precopy(false),
            mbind: false,
            copied_in: false,
        },
        Path {
            name: "populated destination",
            opts: MigrateOptions::default().copy_in(false).fill_empty(false).precopy(false),
            mbind: false,
            copied_in: false,
        },
        Path {
            name: "mbind-bound memory",
            opts: MigrateOptions::default().copy_in(true).precopy(false),
            mbind: true,
            copied_in: false,
        },
        Path {
            name: "pre-copied destination",
            opts: MigrateOptions::default().copy_in(true).precopy(true),
            mbind: false,
            copied_in: false,
        },
    ];
    for folio in [4096, 64 << 10] {
        for path in &paths {
            let what = format!("{}, {folio}-byte folios", path.name);
            let size = 16 << 20;
            let region = Region::new(size, folio, Some(node())).unwrap();
            if path.mbind {
                pagemig::sys::mbind(region.addr(), size, node(), false).unwrap();
            }
            workload::fill(&region, 7);
            let frames_before = numa::page_frames(region.addr(), size).unwrap();
            let (result, log) = workload::with_writers(&region, 2, || {
                Engine::global().unwrap().migrate_pages(
                    &region.folios(),
                    node(),
                    Reason::Syscall,
                    Mode::Sync,
                    &path.opts,
                )
            });
            let stats = result.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(stats.succeeded_folios as usize, size / folio, "{what}");
            assert_eq!(stats.copied_in_folios > 0, path.copied_in, "{what}: {stats:?}");
            let report = workload::verify(&region, 7, &log);
            assert!(report.ok(), "{what}: {report:?}");
            assert!(log.writes > 0, "{what}");
            assert_on_node(&region, node());
            assert_new_frames(&frames_before, &numa::page_frames(region.addr(), size).unwrap());
        }
    }
}

/// Migrates all of `region` (filled with `seed`) to the test's node while two threads
/// write into it, and checks the call in full ([`moved_under_writers`]) and that as many
/// bytes are in huge pages as `thp_before`. Returns the call's statistics.
fn moved_with_two_writers(
    region: &Region,
    seed: u64,
    opts: &MigrateOptions,
    thp_before: u64,
    what: &str,
) -> pagemig::MigrateStats {
    let stats = moved_under_writers(Engine::global().unwrap(), region, seed, opts, (2, false), what);
    assert_eq!(region.anon_huge_bytes().unwrap(), thp_before, "{what}: huge pages split or made");
    stats
}

/// Migrates all of `region` (filled with `seed`) to the test's node through `engine` with
/// `opts` while `writers.0` threads write into it (timed ones with `writers.1`), and checks
/// the call in full: every folio moved, every byte and write kept, every page on the node
/// and on a new frame (`what` names the case). Returns the call's statistics.
fn moved_under_writers(
    engine: &Engine,
    region: &Region,
    seed: u64,
    opts: &MigrateOptions,
    (writers, timed): (usize, bool),
    what: &str,
) -> pagemig::MigrateStats {
    let size = region.len();
    let frames_before = numa::page_frames(region.addr(), size).unwrap();
    let call = || engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, opts);
    let (result, log) = if timed {
        workload::with_timed_writers(region, writers, call)
    } else {
        workload::with_writers(region, writers, call)
    };
    let stats = result.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!((stats.succeeded_folios, stats.failed_folios), ((size / region.folio_size()) as u64, 0), "{what}");
    let report = workload::verify(region, seed, &log);
    assert!(report.ok(), "{what}: {report:?}");
    assert!(log.writes > 0, "{what}");
    assert_on_node(region, node());
    assert_new_frames(&frames_before, &numa::page_frames(region.addr(), size).unwrap());
    stats
}

/// The copy helper (`migrate/copy_helper`): a second thread copies chunks of each piece with
/// the caller, base pages into empty and into populated destinations, 1 MiB folios in
/// 64 KiB chunks, at the default batch and at 4096 pages, two threads writing all along:
/// every byte and write kept, every page on the node, on a new frame and as huge as it was;
/// the helper did copy within a few calls, never more than the call moved, and nothing at
/// all when it is off or the folios are huge pages.
#[test]
fn base_pages_copied_with_the_copy_helper() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "base_pages_copied_with_the_copy_helper");
    let size = 32 << 20;
    for (folio, batch, fill_empty, helper) in [
        (4096, 512, true, true),
        (4096, 4096, true, true),
        (4096, 512, false, true),
        (64 << 10, 512, true, true),
        (1 << 20, 512, true, true),
        (2 << 20, 4096, true, true),
        (4096, 512, true, false),
    ] {
        // Huge pages are never shared: their copy runs at the memory's bandwidth already.
        let shared = helper && folio < 2 << 20;
        let what = format!("{folio}-byte folios, batch {batch}, fill_empty {fill_empty}, helper {helper}");
        let region = Region::new(size, folio, Some(node())).unwrap();
        workload::fill(&region, 13);
        let thp_before = region.anon_huge_bytes().unwrap();
        let opts = MigrateOptions::default()
            .max_batch_pages(batch)
            .fill_empty(fill_empty)
            .copy_helper(helper)
            .copy_in(false)
            .precopy(false);
        // The helper competes for the CPUs with the writers and the call: on a busy machine
        // a call may end before it takes a chunk. It must have copied within a few calls;
        // every call is checked in full.
        let mut helped = 0;
        for attempt in 0..5 {
            let what = format!("{what}, call {attempt}");
            let stats = moved_with_two_writers(&region, 13, &opts, thp_before, &what);
            assert!(stats.helper_copied_bytes as usize <= size, "{what}: {stats:?}");
            if !shared {
                assert_eq!(stats.helper_copied_bytes, 0, "{what}");
            }
            helped += stats.helper_copied_bytes;
            // The writers' writes are all in; the next call starts from what is there now.
            workload::fill(&region, 13);
            if helped > 0 || !shared {
                break;
            }
        }
        assert_eq!(helped > 0, shared, "{what}: the helper copied {helped} bytes in 5 calls");
    }
}

/// Huge-page destinations populated ahead by a helper thread (`migrate/prepare_ahead_mib`)
/// while the call copies, two threads writing all along, with and without the pre-copy, at
/// the default batch and at 4096 pages: every byte and write kept, every page on the node,
/// on a new frame and still huge; the helper did populate, and nothing without it.
#[test]
fn huge_pages_with_their_destinations_prepared_ahead() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "huge_pages_with_their_destinations_prepared_ahead");
    let size = 64 << 20;
    for (batch, precopy, ahead) in [(512, false, 8), (4096, false, 8), (512, true, 8), (512, false, 0)] {
        let what = format!("batch {batch}, pre-copy {precopy}, {ahead} MiB ahead");
        let region = Region::new(size, 2 << 20, Some(node())).unwrap();
        workload::fill(&region, 11);
        let thp_before = region.anon_huge_bytes().unwrap();
        let opts = MigrateOptions::default().max_batch_pages(batch).precopy(precopy).prepare_ahead_mib(ahead);
        // The helper competes for the CPUs with the writers and the call: on a busy machine
        // a call may end before it gets one. It must have populated something within a few
        // calls; every call is checked in full.
        let mut prepared = 0;
        for attempt in 0..5 {
            let what = format!("{what}, call {attempt}");
            let stats = moved_with_two_writers(&region, 11, &opts, thp_before, &what);
            assert!(stats.prepared_ahead_bytes as usize <= size - batch * 4096, "{what}: {stats:?}");
            if ahead == 0 {
                assert_eq!(stats.prepared_ahead_bytes, 0, "{what}");
            }
            prepared += stats.prepared_ahead_bytes;
            // The writers' writes are all in; the next call starts from what is there now.
            workload::fill(&region, 11);
            if ahead == 0 || prepared > 0 {
                break;
            }
        }
        // The helper runs only where the node has free memory for twice the call.
        let free = numa::meminfo(node()).map_or(0, |m| m.1);
        if ahead > 0 && free >= 4 * size as u64 {
            assert!(prepared > 0, "{what}: the helper populated nothing in 5 calls");
        }
    }
}

/// On one thread (no mover, no helper, old pages freed on the reaper), the unmap, copy and
/// move phases run one after another inside the critical path: their times add up to no
/// more than it. (A small over-count fits in the batches' other work: the isolation,
/// once counted twice in `unmap_ns`, did.)
#[test]
fn phase_times_add_up_within_the_critical_path() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "phase_times_add_up_within_the_critical_path");
    for (folio, batch) in [(4096, 512), (4096, 16384), (2 << 20, 512)] {
        let what = format!("folio {folio}, batch {batch}");
        let region = Region::new(64 << 20, folio, Some(node())).unwrap();
        workload::fill(&region, 13);
        let opts = MigrateOptions::default()
            .max_batch_pages(batch)
            .mover(false)
            .copy_helper(false)
            .precopy(false)
            .prepare_ahead_mib(0)
            .deferred_free(true);
        let stats = Engine::global()
            .unwrap()
            .migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
            .unwrap();
        assert!(workload::verify(&region, 13, &WriteLog::default()).ok(), "{what}");
        assert_eq!(stats.succeeded_folios as usize, (64 << 20) / folio, "{what}");
        let phases = stats.unmap_ns + stats.copy_ns + stats.move_ns;
        assert!(stats.unmap_ns > 0 && stats.copy_ns > 0 && stats.move_ns > 0, "{what}: {stats:?}");
        assert!(
            phases <= stats.critical_ns,
            "{what}: unmap {} + copy {} + move {} = {phases} ns, more than the critical path's {} ns",
            stats.unmap_ns,
            stats.copy_ns,
            stats.move_ns,
            stats.critical_ns
        );
        assert!(stats.critical_ns + stats.prepare_ns <= stats.total_ns, "{what}: {stats:?}");
    }
}

/// A page pinned as io_uring pins fixed buffers is refused at isolation, after the kernel's
/// answer was waited out there for a while, pass after pass: almost all of such a call is
/// isolation, which `unmap_ns` must count once (it was counted twice, and came to more than
/// the whole call). Every folio is checked: the pinned one left as it was, the rest moved.
#[test]
fn isolation_waited_out_on_a_pinned_page_is_counted_once() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "isolation_waited_out_on_a_pinned_page_is_counted_once");
    let region = Region::new(64 << 10, 4096, Some(node())).unwrap();
    workload::fill(&region, 17);
    let _pin = common::strangers::pin(region.addr() + 5 * 4096, 4096).expect("io_uring pins a page (fixed buffers)");
    let opts = MigrateOptions::default().precopy(false);
    let result = Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Async, &opts);
    let Err(Error::Partial { failed, stats, .. }) = result else { panic!("the pinned folio moved: {result:?}") };
    assert_eq!(failed, 1, "{stats:?}");
    assert!(workload::verify(&region, 17, &WriteLog::default()).ok());
    assert!(
        stats.unmap_ns + stats.copy_ns + stats.move_ns <= stats.critical_ns,
        "unmap {} + copy {} + move {} ns, more than the call's critical path of {} ns",
        stats.unmap_ns,
        stats.copy_ns,
        stats.move_ns,
        stats.critical_ns
    );
}

/// Pages write-protected by uffd among `[addr, addr + len)`: bit 57 of their
/// `/proc/self/pagemap` entries.
fn uffd_protected_pages(addr: usize, len: usize) -> usize {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut raw = vec![0u8; len / 4096 * 8];
    file.read_exact_at(&mut raw, (addr / 4096 * 8) as u64).unwrap();
    raw.chunks_exact(8).filter(|c| u64::from_le_bytes((*c).try_into().unwrap()) >> 57 & 1 == 1).count()
}

/// While a call runs, the folios it already moved carry no write protection: their pages
/// are new ones, and a move job that moved every folio only wakes their waiters. A page
/// left protected would make the program's next store wait until the call ends. Read from
/// the progress callback, which runs while the call goes on; the moves come in address
/// order (one run), so the first `moved` bytes are the moved folios.
#[test]
fn moved_folios_carry_no_protection_while_the_call_goes_on() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "moved_folios_carry_no_protection_while_the_call_goes_on");
    for folio in [4096, 2 << 20] {
        let region = Region::new(64 << 20, folio, Some(node())).unwrap();
        workload::fill(&region, 19);
        let addr = region.addr();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, usize)>::new()));
        let record = seen.clone();
        let opts = MigrateOptions::default().max_batch_pages(512).progress(move |moved| {
            let moved = moved as usize;
            record.lock().unwrap().push((moved as u64, uffd_protected_pages(addr, moved)));
        });
        let stats = Engine::global()
            .unwrap()
            .migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
            .unwrap();
        assert_eq!(stats.succeeded_folios as usize, (64 << 20) / folio);
        assert!(workload::verify(&region, 19, &WriteLog::default()).ok(), "folio {folio}");
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter().any(|&(moved, _)| (moved as usize) < region.len()),
            "folio {folio}: no report before the end: {seen:?}"
        );
        let protected: Vec<_> = seen.iter().filter(|&&(_, p)| p > 0).collect();
        assert!(protected.is_empty(), "folio {folio}: (moved bytes, protected pages among them): {protected:?}");
    }
}

/// A thread that faults on an isolated base page is answered at once by the event reader
/// (`migrate/answer_faults`): the page's old contents are copied in on the target node and
/// the move leaves that page alone. Each move waits 20 ms (every piece stays isolated that
/// long), while a timed writer stores into every page in a loop: with answers on, some bytes
/// are answered, and every byte, every store and every page's node is right, with every
/// page replaced; with answers off, or for huge pages, nothing is answered. A folio answered
/// counts as moved.
#[test]
fn faults_on_isolated_base_pages_are_answered_without_losing_a_write() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "faults_on_isolated_base_pages_are_answered_without_losing_a_write");
    for (folio, answer) in [(4096, true), (4096, false), (2 << 20, true)] {
        let size = 8 << 20;
        let region = Region::new(size, folio, Some(node())).unwrap();
        let opts = MigrateOptions::default()
            .max_batch_pages(512)
            .answer_faults(answer)
            .precopy(false)
            .fault(FaultInjection { delay_move: Some(Duration::from_millis(20)), ..Default::default() });
        let what = format!("folio {folio}, answers {answer}");
        let stats = moved_under_a_timed_writer(Engine::global().unwrap(), &region, 23, &opts, &what);
        if answer && folio == 4096 {
            assert_some_answered(&stats, size, &what);
        } else {
            assert_eq!(stats.answered_bytes, 0, "{what}");
        }
    }
}

/// Fills `region` with the pattern for `seed` and migrates it through `engine` with
/// `opts` while one timed writer stores into every page in a loop, checked in full
/// ([`moved_under_writers`]). Returns the call's statistics.
fn moved_under_a_timed_writer(
    engine: &Engine,
    region: &Region,
    seed: u64,
    opts: &MigrateOptions,
    what: &str,
) -> pagemig::MigrateStats {
    workload::fill(region, seed);
    let stats = moved_under_writers(engine, region, seed, opts, (1, true), what);
    eprintln!("{what}: {} bytes answered", stats.answered_bytes);
    stats
}

/// Some of the `size` bytes were answered, in whole pages.
fn assert_some_answered(stats: &pagemig::MigrateStats, size: usize, what: &str) {
    assert!(0 < stats.answered_bytes && stats.answered_bytes <= size as u64, "{what}: {stats:?}");
    assert_eq!(stats.answered_bytes % 4096, 0, "{what}");
}

/// The threads that copy a piece of base pages answer the program's faults on isolated
/// pages between chunks, as the event reader would: with the reader thread leaving events
/// unread (`FaultInjection::pause_event_reader`) and every move held 20 ms, a timed writer
/// storing into every page in a loop is still answered (it faults on a piece waiting for
/// its move while the next piece is copied), and every byte, every store and every page's
/// node is right, with every page replaced. (Before the copying threads answered, nothing
/// was: the writer waited for each move.) An engine of its own: the injection acts on the
/// engine's reader while the call lasts.
#[test]
fn the_copying_threads_answer_faults_between_chunks() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "the_copying_threads_answer_faults_between_chunks");
    let engine = Engine::new().unwrap();
    for helper in [true, false] {
        let size = 16 << 20;
        let region = Region::new(size, 4096, Some(node())).unwrap();
        let fault = FaultInjection {
            delay_move: Some(Duration::from_millis(20)),
            pause_event_reader: true,
            ..Default::default()
        };
        let opts = MigrateOptions::default()
            .max_batch_pages(512)
            .answer_faults(true)
            .precopy(false)
            .copy_helper(helper)
            .fault(fault);
        let what = format!("copy helper {helper}");
        let stats = moved_under_a_timed_writer(&engine, &region, 31, &opts, &what);
        assert_some_answered(&stats, size, &what);
    }
}

/// Graveyards freed of base pages are kept for the next piece, with the page tables those
/// pages had: one handed to a huge page would split it (a huge page moves whole only into a
/// range without a page table). Base pages migrate first, in 2 MiB pieces, then huge pages
/// in pieces of the same length and phase: every byte that was huge stays huge. (A kernel
/// that frees empty page tables on `MADV_DONTNEED`, x86-64 from Linux 6.14 with
/// `CONFIG_PT_RECLAIM`, leaves no table to split on: there this passes either way, and the
/// two-node guest's round trips of huge pages, on an older kernel, are what catch it.)
#[test]
fn graveyards_kept_from_base_pages_never_split_huge_pages() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "graveyards_kept_from_base_pages_never_split_huge_pages");
    let engine = Engine::global().unwrap();
    let opts = MigrateOptions::default().max_batch_pages(512);
    for round in 0..3 {
        let base = Region::new(8 << 20, 4096, Some(node())).unwrap();
        workload::fill(&base, 29);
        engine.migrate_pages(&base.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
        assert!(workload::verify(&base, 29, &WriteLog::default()).ok());
        drop(base);
        let huge = Region::new(8 << 20, 2 << 20, Some(node())).unwrap();
        workload::fill(&huge, 31);
        let thp_before = huge.anon_huge_bytes().unwrap();
        assert!(thp_before > 0, "the region was not THP-backed to begin with");
        let stats = engine.migrate_pages(&huge.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
        assert_eq!(stats.thp_succeeded, 4);
        assert!(workload::verify(&huge, 31, &WriteLog::default()).ok());
        let thp_after = huge.anon_huge_bytes().unwrap();
        assert!(thp_after >= thp_before, "round {round}: AnonHugePages {thp_before} -> {thp_after}");
    }
}
