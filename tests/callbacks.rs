//! Caller code that pagemig runs during a call, written in safe Rust, cannot make the call
//! wait for ever: a progress callback that stores into the very memory being migrated goes
//! on once its folio has moved (it runs on a thread no migration waits on).
// The tests below are safe code (the shared helpers in `common` are not all).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, numa};

const LEN: usize = 16 << 20;

/// Each report stores into the first word of every folio of the region (some still to
/// move, some protected, some moved), with the mover on and off: the call ends, the last
/// report's stores are there, and every other word kept its value.
fn progress_that_stores_into_the_region(folio: usize, mover: bool) {
    let node = numa::memory_nodes().unwrap()[0];
    let region = Arc::new(Region::new(LEN, folio, Some(node)).unwrap());
    for (i, w) in region.atomic_words().iter().enumerate() {
        w.store(i as u64, Ordering::Relaxed);
    }
    let what = format!("a progress callback storing into the region, folio {folio}, mover {mover}");
    let watched = region.clone();
    let label = what.clone();
    let reports = common::watchdog(Duration::from_secs(120), &what, move || {
        let reports = Arc::new(AtomicU64::new(0));
        let (r, words) = (reports.clone(), watched.clone());
        let opts = MigrateOptions::default().max_batch_pages(64).mover(mover).progress(move |bytes| {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            for f in 0..LEN / folio {
                words.word(f * folio / 8).store(u64::MAX - n, Ordering::SeqCst);
            }
            assert!(bytes <= LEN as u64);
        });
        let stats = Engine::global()
            .unwrap()
            .migrate_pages(&watched.folios(), node, Reason::Syscall, Mode::Sync, &opts)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(stats.succeeded_folios as usize, LEN / folio, "{label}");
        reports.load(Ordering::SeqCst)
    });
    assert!(reports > 0, "{what}: the callback ran");
    for (i, w) in region.atomic_words().iter().enumerate() {
        let expected = if i % (folio / 8) == 0 { u64::MAX - reports } else { i as u64 };
        assert_eq!(w.load(Ordering::Relaxed), expected, "{what}: word {i}");
    }
}

#[test]
fn a_progress_callback_storing_into_base_pages_with_the_mover() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_progress_callback_storing_into_base_pages_with_the_mover");
    progress_that_stores_into_the_region(4096, true);
}

#[test]
fn a_progress_callback_storing_into_base_pages_without_the_mover() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_progress_callback_storing_into_base_pages_without_the_mover");
    progress_that_stores_into_the_region(4096, false);
}

#[test]
fn a_progress_callback_storing_into_huge_pages() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "a_progress_callback_storing_into_huge_pages");
    progress_that_stores_into_the_region(2 << 20, true);
}

/// A call told its progress at every run woke the callback's thread as often (512 times a
/// GiB at the default batch) and slowed the call it reported on: the totals are told at
/// most one every 10 ms, the first at once, the last (every byte) before the call returns,
/// never going back. Base pages (told from the mover thread) and huge pages (from the
/// caller's), both with runs far shorter than 10 ms.
#[test]
fn progress_is_told_at_most_every_10_ms_and_ends_with_every_byte() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "progress_is_told_at_most_every_10_ms_and_ends_with_every_byte");
    let node = numa::memory_nodes().unwrap()[0];
    for (folio, len) in [(4096, 128 << 20), (2 << 20, 256 << 20)] {
        let region = Region::new(len, folio, Some(node)).unwrap();
        for (i, w) in region.atomic_words().iter().enumerate() {
            w.store(i as u64, Ordering::Relaxed);
        }
        let told = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
        let record = told.clone();
        let opts =
            MigrateOptions::default().progress(move |bytes| record.lock().unwrap().push((Instant::now(), bytes)));
        let began = Instant::now();
        let stats = Engine::global()
            .unwrap()
            .migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &opts)
            .unwrap();
        let took = began.elapsed();
        assert_eq!(stats.succeeded_folios as usize, len / folio);
        assert!(region.atomic_words().iter().enumerate().all(|(i, w)| w.load(Ordering::Relaxed) == i as u64));
        let told = told.lock().unwrap();
        let what = format!("folio {folio}: {} totals told in {took:?}", told.len());
        assert_eq!(told.last().map(|t| t.1), Some(len as u64), "{what}: the last total is every byte");
        assert!(told.windows(2).all(|w| w[0].1 < w[1].1), "{what}: each total more than the one before");
        // At most one total every 10 ms, the last (told as the call ends) aside: counted
        // over the call, and the gaps between them, as the callback sees them (its clock is
        // read after the reporter's, later where that thread was preempted in between).
        let mut gaps: Vec<Duration> = told[..told.len() - 1].windows(2).map(|w| w[1].0 - w[0].0).collect();
        gaps.sort_unstable();
        if let Some(median) = gaps.get(gaps.len() / 2) {
            assert!(*median >= Duration::from_millis(9), "{what}: totals told less than 10 ms apart: {gaps:?}");
        }
        assert!(told.len() <= 2 + (took.as_millis() / 10) as usize, "{what}");
    }
}
