//! `fork()` while folios migrate: a child must see every byte of the region as it was at
//! the instant of the fork, never a range in the middle of being replaced. Every folio
//! size, deferred freeing on and off; each child checks the whole region and reports by
//! exit status.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{assert_writable, leak, pages_on, watchdog};
use pagemig::workload::{self, pattern_word};
use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, numa};

fn node() -> u32 {
    numa::memory_nodes().unwrap()[0]
}

/// Forks children in a loop while another thread migrates the region again and again;
/// each child checks every word against the pattern and exits 0, or 1 at the first word
/// that differs. Returns (forks, children that saw wrong data, migrations).
fn storm(folio: usize, deferred: bool, duration: Duration) -> (u64, u64, u64) {
    let size = 16 << 20;
    let region = leak(Region::new(size, folio, Some(node())).unwrap());
    workload::fill(region, 1234);
    let stop = leak_flag();
    let migrations = Box::leak(Box::new(AtomicU64::new(0)));
    let outcome = watchdog(duration + Duration::from_secs(60), "fork storm", move || {
        std::thread::scope(|s| {
            s.spawn(|| {
                let opts = MigrateOptions::default().deferred_free(deferred);
                while !stop.load(Ordering::Relaxed) {
                    let stats = Engine::global()
                        .unwrap()
                        .migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
                        .unwrap();
                    assert_eq!(stats.succeeded_folios as usize, size / folio);
                    migrations.fetch_add(1, Ordering::Relaxed);
                }
            });
            let (mut forks, mut bad) = (0u64, 0u64);
            let started = Instant::now();
            while started.elapsed() < duration {
                // SAFETY: the child only reads memory and computes, then calls `_exit`:
                // nothing that needs another thread of the parent.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0, "fork failed");
                if pid == 0 {
                    // The first and last word of every page: a page caught empty reads as
                    // zeros throughout. (Every word would make each child slower, and the
                    // storm's forks fewer.)
                    let base = region.as_ptr() as *const u64;
                    let per_page = 4096 / 8;
                    let mut code = 0;
                    for page in 0..region.words() / per_page {
                        for i in [page * per_page, page * per_page + per_page - 1] {
                            // SAFETY: the child's copy of the region, which it alone uses.
                            if unsafe { base.add(i).read_volatile() } != pattern_word(1234, i) {
                                code = 1;
                            }
                        }
                    }
                    // SAFETY: ends the child without running the parent's destructors.
                    unsafe { libc::_exit(code) };
                }
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
                forks += 1;
                bad += u64::from(libc::WEXITSTATUS(status) != 0);
            }
            stop.store(true, Ordering::Relaxed);
            (forks, bad, migrations.load(Ordering::Relaxed))
        })
    });
    assert!(workload::verify(region, 1234, &Default::default()).ok());
    assert_eq!(pages_on(region, node()), size / 4096);
    assert_writable(region);
    outcome
}

fn leak_flag() -> &'static AtomicBool {
    Box::leak(Box::new(AtomicBool::new(false)))
}

#[test]
fn children_forked_during_migration_see_every_byte() {
    for folio in [4096, 64 << 10, 2 << 20] {
        for deferred in [true, false] {
            let (forks, bad, migrations) = storm(folio, deferred, Duration::from_secs(3));
            println!("folio {folio}, deferred {deferred}: {forks} forks, {migrations} migrations, {bad} bad children");
            assert!(forks > 10 && migrations > 2, "too little overlap: {forks} forks, {migrations} migrations");
            assert_eq!(bad, 0, "{bad} of {forks} children saw wrong data (folio {folio}, deferred {deferred})");
        }
    }
}

/// A child forked from a process whose engine (and mtcopy's worker threads) are running
/// opens its own engine on first use and migrates with it: the parent's threads do not
/// exist in the child, and using them would hang. Exit status 0, or what went wrong.
#[test]
fn a_forked_child_opens_its_own_engine_and_migrates() {
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
