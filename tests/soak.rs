//! A soak: writers, forks and purges at once over at least 10^4 migrations of one region.
//! Zero lost writes, zero wrong bytes in any child, zero crashes. The CI-sized run is
//! `soak_ten_thousand_migrations`; a longer one is ignored by default
//! (`cargo test --release --test soak -- --ignored`).
//!
//! The region's 4 KiB folios are split in three: pages written by two writer threads
//! (sequence numbers; the last write to each slot must be there at the end), pages a
//! purger thread `MADV_DONTNEED`s and then fills with a marker (each must hold its last
//! marker), and pages that never change, which forked children check byte for byte.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{leak, watchdog};
use pagemig::sys::{Errno, PAGE_SIZE};
use pagemig::workload::pattern_word;
use pagemig::{Engine, Error, MigrateOptions, Mode, Reason, Region, numa};

const PAGES: usize = 128;
const WRITTEN: std::ops::Range<usize> = 0..32;
const PURGED: std::ops::Range<usize> = 32..64;
const STATIC: std::ops::Range<usize> = 64..128;
const WORDS: usize = PAGE_SIZE / 8;
const SEED: u64 = 4242;

#[derive(Debug, Default)]
struct Tally {
    migrations: u64,
    partial: u64,
    forks: u64,
    bad_children: u64,
    purges: u64,
    writes: u64,
    lost: u64,
}

fn soak(target: u64, limit: Duration) -> Tally {
    let node = numa::memory_nodes().unwrap()[0];
    let region = leak(Region::new(PAGES * PAGE_SIZE, PAGE_SIZE, Some(node)).unwrap());
    for i in 0..region.words() {
        region.word(i).store(pattern_word(SEED, i), Ordering::Relaxed);
    }
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let migrations: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    watchdog(limit + Duration::from_secs(120), "soak", move || {
        std::thread::scope(|s| {
            let migrator = s.spawn(|| {
                let mut partial = 0;
                while migrations.load(Ordering::Relaxed) < target && !stop.load(Ordering::Relaxed) {
                    let opts = MigrateOptions::default();
                    match Engine::global().unwrap().migrate_pages(
                        &region.folios(),
                        node,
                        Reason::Syscall,
                        Mode::Sync,
                        &opts,
                    ) {
                        Ok(_) => {}
                        // A purged folio fails with ENOENT, a pinned or shared one with EBUSY.
                        Err(Error::Partial { first, .. }) => {
                            assert!([Errno::NOENT, Errno::BUSY, Errno::AGAIN].contains(&first.errno()), "{first}");
                            partial += 1;
                        }
                        Err(e) => panic!("migration failed: {e}"),
                    }
                    migrations.fetch_add(1, Ordering::Relaxed);
                }
                stop.store(true, Ordering::Relaxed);
                partial
            });
            let writers: Vec<_> = (0..2u64)
                .map(|w| {
                    s.spawn(move || {
                        let mut last = vec![0u64; WRITTEN.len()];
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            for (k, page) in WRITTEN.enumerate().filter(|(k, _)| *k as u64 % 2 == w) {
                                n += 1;
                                let v = ((w + 1) << 56) | n;
                                region.word(page * WORDS + 1).store(v, Ordering::Release);
                                last[k] = v;
                            }
                            // Two cores are shared with the migrations: leave them some.
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        (n, last)
                    })
                })
                .collect();
            let purger = s.spawn(|| {
                let mut last = vec![None::<u64>; PURGED.len()];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = (n as usize * 7) % PURGED.len();
                    let addr = region.as_ptr() as usize + (PURGED.start + k) * PAGE_SIZE;
                    // SAFETY: a page of the region that only this thread uses.
                    assert_eq!(unsafe { libc::madvise(addr as *mut _, PAGE_SIZE, libc::MADV_DONTNEED) }, 0);
                    // Purged: zeros until the marker goes in.
                    let first = region.word((PURGED.start + k) * WORDS).load(Ordering::Acquire);
                    assert!(first == 0 || Some(first) == last[k], "purged page {k} holds {first:#x}");
                    n += 1;
                    let marker = (0xabu64 << 56) | n;
                    for i in 0..WORDS {
                        region.word((PURGED.start + k) * WORDS + i).store(marker, Ordering::Release);
                    }
                    last[k] = Some(marker);
                    std::thread::sleep(Duration::from_micros(50));
                }
                (n, last)
            });
            let mut tally = Tally::default();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if started.elapsed() > limit {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                // SAFETY: the child only reads memory and calls `_exit`.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0);
                if pid == 0 {
                    let base = region.as_ptr() as *const u64;
                    let mut code = 0;
                    for i in STATIC.start * WORDS..STATIC.end * WORDS {
                        // SAFETY: the child's copy of the region.
                        if unsafe { base.add(i).read_volatile() } != pattern_word(SEED, i) {
                            code = 1;
                        }
                    }
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(code) };
                }
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                assert!(libc::WIFEXITED(status), "child died: {status:#x}");
                tally.forks += 1;
                tally.bad_children += u64::from(libc::WEXITSTATUS(status) != 0);
                std::thread::sleep(Duration::from_millis(2));
            }
            tally.partial = migrator.join().unwrap();
            tally.migrations = migrations.load(Ordering::Relaxed);
            for (w, h) in writers.into_iter().enumerate() {
                let (n, last) = h.join().unwrap();
                tally.writes += n;
                for (k, &v) in last.iter().enumerate().filter(|(k, _)| *k % 2 == w) {
                    if v != 0 && region.word(WRITTEN.start * WORDS + k * WORDS + 1).load(Ordering::Acquire) != v {
                        tally.lost += 1;
                    }
                }
            }
            let (purges, last) = purger.join().unwrap();
            tally.purges = purges;
            for (k, marker) in last.iter().enumerate() {
                let want = marker.unwrap_or(0);
                let page = PURGED.start + k;
                let got = (0..WORDS).filter(|&i| region.word(page * WORDS + i).load(Ordering::Acquire) != want).count();
                // A page never purged keeps its pattern.
                if marker.is_none() {
                    continue;
                }
                tally.lost += u64::from(got != 0);
            }
            for i in STATIC.start * WORDS..STATIC.end * WORDS {
                assert_eq!(region.word(i).load(Ordering::Relaxed), pattern_word(SEED, i), "static word {i} changed");
            }
            tally
        })
    })
}

#[test]
fn soak_ten_thousand_migrations() {
    let _watchdog = common::Watchdog::new(Duration::from_secs(900), "soak_ten_thousand_migrations");
    let t = soak(10_000, Duration::from_secs(240));
    println!("{t:?}");
    assert!(t.migrations >= 10_000, "only {} migrations in time: {t:?}", t.migrations);
    assert!(t.forks > 100 && t.purges > 1000 && t.writes > 10_000, "too little going on: {t:?}");
    assert_eq!((t.lost, t.bad_children), (0, 0), "{t:?}");
}

#[test]
#[ignore = "a long soak (10^5 migrations, minutes): cargo test --release --test soak -- --ignored"]
fn soak_long() {
    let _watchdog = common::Watchdog::new(Duration::from_secs(3600), "soak_long");
    let t = soak(100_000, Duration::from_secs(1200));
    println!("{t:?}");
    assert!(t.migrations >= 100_000, "{t:?}");
    assert_eq!((t.lost, t.bad_children), (0, 0), "{t:?}");
}
