//! Children that live a while after a `fork()` and use pagemig themselves: a child opens
//! its own engine, and measures its own copy kernels when its parent was measuring them.
//!
//! Kept apart from `fork.rs`'s storm (a test binary is one process): while such a child
//! lives, it shares every page of the parent's memory copy-on-write, and the storm's
//! migrations would meet those pages as mapped by another process (refused with `EBUSY`
//! once the wait for the child runs out), which is right, but not what the storm tests.

mod common;

use common::node;

use std::time::{Duration, Instant};

use common::watchdog;
use pagemig::workload;
use pagemig::{Engine, MigrateOptions, Mode, Reason, Region};

/// A child forked from a process whose engine (and mtcopy's worker threads) are running
/// opens its own engine on first use and migrates with it: the parent's threads do not
/// exist in the child, and using them would hang. Exit status 0, or what went wrong.
#[test]
fn a_forked_child_opens_its_own_engine_and_migrates() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "a_forked_child_opens_its_own_engine_and_migrates");
    watchdog(Duration::from_secs(120), "forked child's own engine", || {
        let engine = Engine::global().unwrap();
        let parent_engine = engine as *const Engine as usize;
        let mtcopy = pagemig::attr::select_migrator("mtcopy", None, Some(2)).is_ok();
        let region = Region::new(4 << 20, 4096, Some(node())).unwrap();
        workload::fill(&region, 77);
        engine
            .migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default())
            .unwrap();
        // SAFETY: the child uses only this thread's state and the engine it opens itself.
        let code = unsafe {
            common::fork_and_wait(Duration::from_secs(60), || {
                let Ok(engine) = Engine::global() else { return 2 };
                if engine as *const Engine as usize == parent_engine {
                    return 3;
                }
                let mine = match Region::new(4 << 20, 4096, Some(node())) {
                    Ok(r) => r,
                    Err(_) => return 4,
                };
                workload::fill(&mine, 78);
                let opts = MigrateOptions::default();
                if engine.migrate_pages(&mine.folios(), node(), Reason::Syscall, Mode::Sync, &opts).is_err()
                    || engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts).is_err()
                {
                    return 5;
                }
                if !workload::verify(&mine, 78, &Default::default()).ok()
                    || !workload::verify(&region, 77, &Default::default()).ok()
                {
                    return 1;
                }
                0
            })
        };
        if mtcopy {
            pagemig::attr::select_migrator("cpu", None, None).unwrap();
        }
        assert_eq!(code, 0, "child: 1 bytes wrong, 2 no engine, 3 the parent's engine, 5 failed");
        assert!(workload::verify(&region, 77, &Default::default()).ok());
    });
}

/// A child forked while its parent measures the copy kernels finds the parent's measurement
/// marked in progress, by a thread the child does not have: it must measure for itself, not
/// wait for a result that never comes (nor take a lock the parent held at the fork).
#[test]
fn a_child_forked_while_the_kernels_are_measured_measures_them_itself() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_child_forked_while_the_kernels_are_measured_measures_them_itself");
    use pagemig::copy;
    watchdog(Duration::from_secs(120), "fork while measuring the copy kernels", || {
        let started = Instant::now();
        let measurer = std::thread::spawn(|| {
            // Measure again from scratch; other tests meanwhile copy with the default.
            copy::set_kernel(None);
            copy::kernels()
        });
        while !copy::measuring() {
            assert!(started.elapsed() < Duration::from_secs(60), "the measurement never started");
            if measurer.is_finished() {
                // Another thread of this test process measured first and finished: again.
                copy::set_kernel(None);
                copy::measure_in_background();
            }
            std::thread::yield_now();
        }
        // SAFETY: the child uses only the copy module, which must not need the parent's
        // measuring thread.
        let code = unsafe {
            common::fork_and_wait(Duration::from_secs(60), || {
                if copy::measuring() {
                    return 2;
                }
                let k = copy::kernels();
                // Measured here: figures for every kernel (or the default, if measuring
                // failed: never a hang).
                if k.figures.is_empty() && (k.hot, k.cold) != (copy::Kernel::Nt, copy::Kernel::Nt) {
                    return 3;
                }
                0
            })
        };
        assert_eq!(code, 0, "child: 2 the parent's measurement seen as its own, 3 no kernels");
        let k = measurer.join().unwrap();
        assert!(!k.figures.is_empty() || k.hot == copy::Kernel::Nt);
    });
}

/// A child forked while other threads use pagemig's process-wide state (the migrator
/// registry, the attributes, the DMA devices, dcbm and mtcopy) finds none of their locks
/// held: each fork waits until no thread is inside one. Before, a child forked while a
/// thread held one of them waited for ever on its first use.
#[test]
fn children_forked_while_threads_use_the_process_wide_state_find_it_free() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "children_forked_while_threads_use_the_process_wide_state_find_it_free",
    );
    // The process-wide state exists, and the fork handlers are installed.
    let _ = Engine::global().unwrap();
    let _ = pagemig::migrators::dcbm::global();
    let _ = pagemig::migrators::mtcopy();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let users: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = pagemig::offload::registry().active_name();
                    let _ = pagemig::offload::registry().active_fills_unpopulated();
                    let _ = pagemig::attr::read("dcbm/nr_dma_chan");
                    let _ = pagemig::dma::devices();
                }
            })
        })
        .collect();
    let mut hung = 0;
    for _ in 0..200 {
        // SAFETY: the child uses the process-wide state and ends with _exit.
        let code = unsafe {
            common::fork_and_wait_or_kill(Duration::from_secs(5), || {
                let _ = pagemig::offload::registry().active_name();
                let _ = pagemig::attr::read("dcbm/nr_dma_chan");
                let _ = pagemig::dma::devices();
                0
            })
        };
        hung += usize::from(code.is_none());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for u in users {
        u.join().unwrap();
    }
    assert_eq!(hung, 0, "children that waited for ever on a lock their parent's thread held at the fork");
}

/// Children forked while the parent migrates (its vault, mover and copy helper waiting on
/// pagemig's locks and condition variables at the fork) open their own engines and
/// migrate, with a writer, many times: none crashes or hangs, and every byte and write
/// stands. pagemig's locks were `parking_lot`'s, whose one table of waiting threads a child
/// inherits with entries for threads it does not have (pointers into stacks glibc hands to
/// the child's new threads): a child whose own waits met one of them died of `SIGSEGV` or
/// waited for ever (1 child in about 40 in the two-node guest; `gdb` on the core showed the
/// crash inside `parking_lot_core`).
#[test]
fn children_forked_while_the_parent_migrates_migrate_with_their_own_engines() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "children_forked_while_the_parent_migrates_migrate_with_their_own_engines",
    );
    let engine = Engine::global().unwrap();
    let region = Region::new(16 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 5);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut crashed, mut hung, mut failed) = (0, 0, 0);
    std::thread::scope(|s| {
        let parent = s.spawn(|| {
            let mut calls = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                engine
                    .migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default())
                    .expect("the parent's migration");
                calls += 1;
            }
            calls
        });
        for _ in 0..40 {
            // SAFETY: the child uses its own engine and threads, and ends with _exit.
            let code = unsafe {
                common::fork_and_wait_or_kill_or_crash(Duration::from_secs(30), || {
                    let Ok(engine) = Engine::global() else { return 2 };
                    let Ok(mine) = Region::new(8 << 20, 4096, Some(node())) else { return 3 };
                    workload::fill(&mine, 6);
                    for _ in 0..3 {
                        let (result, log) = workload::with_writers(&mine, 1, || {
                            engine.migrate_pages(
                                &mine.folios(),
                                node(),
                                Reason::Syscall,
                                Mode::Sync,
                                &MigrateOptions::default(),
                            )
                        });
                        if result.is_err() {
                            return 4;
                        }
                        let report = workload::verify(&mine, 6, &log);
                        if !report.ok() {
                            // Straight to the descriptor: the child's copy of the test's
                            // captured output is lost with it.
                            let mut text = format!("child: {result:?}\nchild: {report:?}\n");
                            for p in 0..mine.len() / 4096 {
                                let words = (1..512).map(|w| {
                                    (p * 512 + w, mine.word(p * 512 + w).load(std::sync::atomic::Ordering::Relaxed))
                                });
                                let bad: Vec<(usize, u64)> =
                                    words.filter(|&(i, v)| v != workload::pattern_word(6, i)).collect();
                                if !bad.is_empty() {
                                    let zeros = bad.iter().filter(|&&(_, v)| v == 0).count();
                                    // Whose data it is, where it is the pattern's.
                                    let other = (0..mine.words()).find(|&j| workload::pattern_word(6, j) == bad[0].1);
                                    text += &format!(
                                        "child: page {p}: {} words differ, {zeros} zero, first {:#x} at word {} (found at word {other:?})\n",
                                        bad.len(),
                                        bad[0].1,
                                        bad[0].0
                                    );
                                }
                            }
                            // Writes our own buffer to standard error (inside the child's
                            // `unsafe` block above).
                            libc::write(2, text.as_ptr().cast(), text.len());
                            return 5;
                        }
                    }
                    0
                })
            };
            match code {
                common::ChildEnd::Exited(0) => {}
                common::ChildEnd::Exited(code) => {
                    eprintln!("a child failed with {code}");
                    failed += 1;
                }
                common::ChildEnd::Signalled(signal) => {
                    eprintln!("a child died of signal {signal}");
                    crashed += 1;
                }
                common::ChildEnd::Hung => hung += 1,
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(parent.join().unwrap() > 0, "the parent migrated while it forked");
    });
    let report = workload::verify(&region, 5, &workload::WriteLog::default());
    assert!(report.ok(), "the parent's region: {report:?}");
    assert_eq!(
        (crashed, hung, failed),
        (0, 0, 0),
        "children (crashed, hung, failed: 2 no engine, 3 no region, 4 a call failed, 5 data lost)"
    );
}

/// Children forked while threads of pagemig's start and end all the time (as they do at
/// every call: its mover, copy helper and progress reporter) start a thread of pagemig's
/// themselves: none waits for good. `std` starts and ends every thread under one lock of its
/// own, and a child forked while a thread held it found it held for ever: its first thread
/// never began (a child making its engine hung, its vault thread waiting in `std`'s
/// `set_current_info`). A `fork()` now waits until no thread of pagemig's is starting or
/// ending.
#[test]
#[ignore = "a known hang (README, Limits): the gate that held forks off while pagemig's threads start or end was taken out after children in children_forked_while_the_parent_migrates_migrate_with_their_own_engines saw data change with it under load; 3 of 400 children hang without it"]
fn children_forked_while_pagemig_threads_start_and_end_can_start_threads() {
    // In a process of its own: the test harness starts and ends threads of its own for
    // the other tests, under the same lock, and those are not pagemig's to hold off.
    const NAME: &str = "children_forked_while_pagemig_threads_start_and_end_can_start_threads";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_FORK_THREAD_CHURN", Duration::from_secs(240), || {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        const CHILDREN: usize = 400;
        // Memory of the process's own, so that each fork takes a while (its page tables are
        // copied), as a program's does: a thread that starts or ends meanwhile waits in
        // `malloc` for the arenas the fork holds, with `std`'s lock held.
        let ballast = vec![1u8; 256 << 20];
        let stop = AtomicBool::new(false);
        let started = AtomicU64::new(0);
        let mut ends = Vec::new();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let t = pagemig::sys::thread::spawn("pagemig-churn", || 1u8).expect("a thread");
                        assert_eq!(t.join().unwrap(), 1);
                        started.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            // The churning threads are started before the first fork (they are not
            // pagemig's) and end after the last.
            while started.load(Ordering::Relaxed) < 100 {
                std::thread::yield_now();
            }
            for _ in 0..CHILDREN {
                // SAFETY: the child starts one thread of pagemig's and ends with _exit.
                ends.push(unsafe {
                    common::fork_and_wait_or_kill_or_crash(Duration::from_secs(10), || {
                        match pagemig::sys::thread::spawn("pagemig-child", || 7u8).map(|t| t.join()) {
                            Ok(Ok(7)) => 0,
                            _ => 2,
                        }
                    })
                });
            }
            stop.store(true, Ordering::Relaxed);
        });
        drop(ballast);
        let bad: Vec<_> = ends.iter().enumerate().filter(|(_, e)| **e != common::ChildEnd::Exited(0)).collect();
        println!(
            "{CHILDREN} children forked while {} threads of pagemig's started and ended",
            started.load(Ordering::Relaxed)
        );
        assert!(bad.is_empty(), "children that did not end well (exit 2: no thread): {bad:?}");
    });
}
