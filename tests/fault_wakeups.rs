//! Threads of the program purge pages of a region and touch them again, in a tight loop,
//! while calls migrate the region back to back: a touch inside a call's runs waits until
//! the call's move or its end wakes it (pagemig wakes a range again once its unregistering
//! returns: the kernel's own wake in `UFFDIO_UNREGISTER` comes before it write-locks each
//! mapping). No thread may be left asleep (watchdog), no store lost, no purge undone (each
//! thread checks after each purge that the words it stored before read zeros), and the
//! pages nobody purges keep every word.

mod common;

use common::node;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::changes;
use common::watchdog;
use pagemig::folio::Folio;
use pagemig::sys::{Errno, PAGE_SIZE};
use pagemig::workload::pattern_word;
use pagemig::{Engine, Error, MigrateOptions, Mode, Reason};

const PAGES: usize = 64;
const THREADS: usize = 3;
const SEED: u64 = 57;
/// How long calls are made back to back.
/// Words after the first that each thread checks are zero after each purge, then stores into.
const UNDONE_PROBE: usize = 8;
const FOR: Duration = Duration::from_secs(4);

/// Whether page `p` is purged and touched by a thread (which one: `p % (THREADS + 1) - 1`);
/// the others keep the pattern.
fn touched(p: usize) -> Option<usize> {
    (p % (THREADS + 1)).checked_sub(1)
}

/// What a page that lost its words holds instead, said so that a failure seen once tells
/// how it came about: zeros, another page's pattern (which), a thread's store, or else its
/// first words.
fn what_page_holds(page: usize) -> String {
    let words: Vec<u64> = (0..PAGE_SIZE / 8).map(|i| changes::word(page + i * 8)).collect();
    if words.iter().all(|&w| w == 0) {
        return "zeros".into();
    }
    if let Some(q) = (0..PAGES).find(|&q| words[1] == pattern_word(SEED, q * PAGE_SIZE / 8 + 1)) {
        let whole = (0..PAGE_SIZE / 8).all(|i| words[i] == pattern_word(SEED, q * PAGE_SIZE / 8 + i));
        return format!("page {q}'s pattern ({})", if whole { "whole" } else { "in part" });
    }
    if words[1..].iter().all(|&w| w == 0) {
        return format!("zeros but a store of {} in its first word", words[0]);
    }
    format!("first words {:x?}", &words[..4])
}

#[test]
fn threads_touching_purged_pages_as_calls_end_are_woken() {
    let result = watchdog(Duration::from_secs(120), "threads_touching_purged_pages_as_calls_end_are_woken", || {
        let len = PAGES * PAGE_SIZE;
        let base = changes::mapping(len, PAGE_SIZE, SEED);
        let folios: Vec<Folio<'static>> = (0..PAGES)
            // SAFETY: the mapping lives for the rest of the process; the threads below only
            // purge and store into it, which pagemig must survive.
            .map(|p| unsafe { Folio::new(base + p * PAGE_SIZE, PAGE_SIZE) }.unwrap())
            .collect();
        let stop = AtomicBool::new(false);
        // A word a purge should have cleared, found holding what it held before.
        let undone = std::sync::Mutex::new(None);
        // Per page, the last value its thread stored into its first word.
        let last: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
        let (mut calls, mut stores) = (0u64, 0u64);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (stop, last, undone) = (&stop, &last, &undone);
                    s.spawn(move || {
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            for p in (0..PAGES).filter(|&p| touched(p) == Some(t)) {
                                let page = base + p * PAGE_SIZE;
                                // SAFETY: a page of the test's own mapping.
                                unsafe { libc::madvise(page as *mut _, PAGE_SIZE, libc::MADV_DONTNEED) };
                                n += 1;
                                // A fault on a page just purged: inside a call's runs it
                                // waits for the call to end.
                                // SAFETY: as above; only this thread stores there.
                                unsafe { std::ptr::write_volatile(page as *mut u64, n) };
                                last[p].store(n, Ordering::Relaxed);
                                // The purge stands: what the page held before it (the
                                // pattern, or the last round's stores) never comes back.
                                for w in 1..=UNDONE_PROBE {
                                    let at = page + w * 8;
                                    let held = changes::word(at);
                                    if held != 0 && undone.lock().unwrap().replace((p, w, held)).is_none() {
                                        eprintln!("page {p}: word {w} holds {held:#x} after its purge");
                                    }
                                    // SAFETY: as above.
                                    unsafe { std::ptr::write_volatile(at as *mut u64, n) };
                                }
                            }
                        }
                        n
                    })
                })
                .collect();
            let opts = MigrateOptions::default();
            let until = Instant::now() + FOR;
            while Instant::now() < until {
                match Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts) {
                    Ok(_) | Err(Error::NotMovable { .. }) => {}
                    // The pages purged meanwhile fail as the kernel's would.
                    Err(Error::Partial { first, .. }) => {
                        assert!([Errno::NOENT, Errno::FAULT].contains(&first.errno()), "{first}")
                    }
                    Err(e) => panic!("{e}"),
                }
                calls += 1;
            }
            stop.store(true, Ordering::Relaxed);
            stores = workers.into_iter().map(|w| w.join().unwrap()).sum();
        });
        assert_eq!(*undone.lock().unwrap(), None, "a purge was undone (page, word, what it held)");
        for (p, last) in last.iter().enumerate() {
            let page = base + p * PAGE_SIZE;
            match touched(p) {
                Some(_) => {
                    let last = last.load(Ordering::Relaxed);
                    for w in 0..PAGE_SIZE / 8 {
                        let want = if w <= UNDONE_PROBE { last } else { 0 };
                        if last > 0 {
                            assert_eq!(
                                changes::word(page + w * 8),
                                want,
                                "page {p} word {w}: its last store, zeros past it"
                            );
                        }
                    }
                }
                None => {
                    let bad = (0..PAGE_SIZE / 8)
                        .filter(|&i| changes::word(page + i * 8) != pattern_word(SEED, p * PAGE_SIZE / 8 + i))
                        .count();
                    assert_eq!(bad, 0, "page {p}: words changed; it holds {}", what_page_holds(page));
                }
            }
        }
        (calls, stores)
    });
    eprintln!("{} calls, {} purges and stores", result.0, result.1);
    assert!(result.0 > 100 && result.1 > 100, "{result:?}");
}
