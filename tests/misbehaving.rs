//! Caller code that misbehaves — migrators that lie, copy late, report nonsense, panic or
//! sleep, progress callbacks that panic — must not lose a write, touch memory that is not
//! the batch's, or leave anything protected, claimed or registered. Every test verifies
//! every byte and every write, probes every page for writability, and runs under a watchdog.

mod common;

use common::node;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::{assert_writable, leak, pages_on, watchdog};
use pagemig::offload::{Batch, Migrator, OffloadCopy, Owner, registry};
use pagemig::sys::Errno;
use pagemig::workload;
use pagemig::{Engine, Error, FaultInjection, MigrateOptions, MigrateStats, Mode, Reason, Region};

static TURN: Mutex<()> = Mutex::new(());

/// The tests share the process-wide registry: one at a time.
fn turn() -> MutexGuard<'static, ()> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(quiet_on_purpose);
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Panics made on purpose print one line, not a backtrace: printing one (with
/// `RUST_BACKTRACE` set) takes long enough to change what the test sees. Every other
/// panic prints as before.
fn quiet_on_purpose() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload().downcast_ref::<&str>().copied().unwrap_or("");
        if message.ends_with("on purpose") {
            eprintln!("(a panic on purpose: {message})");
        } else {
            default(info);
        }
    }));
}

const LIMIT: Duration = Duration::from_secs(60);

/// What a misbehaving migrator does with each batch.
#[derive(Clone, Copy, Debug)]
enum Misdeed {
    /// Returns `Ok(())` having copied and reported nothing.
    NoCopy,
    /// Copies and reports the batch, then tries to copy it again.
    CopyAfterComplete,
    /// Reports ranges outside the batch (and an inverted one), copies nothing.
    OutOfRange,
    /// Copies and reports the first half, then panics.
    PanicMidway,
    /// Copies and reports the first half, sleeps past any reasonable timeout, then fails.
    SleepThenFail,
    /// Says it copies only through the batch (so its destinations of base pages come
    /// without pages), then stores into them through the raw addresses.
    RawStores,
}

/// A migrator doing `misdeed`, recording what `Batch` answered.
struct Rogue {
    misdeed: Misdeed,
    batches: AtomicUsize,
    refusals: Mutex<Vec<Errno>>,
}

// SAFETY: copies only through `Batch::copy_range` and reports only what it copied; the
// misdeeds are attempts that `Batch` must refuse, not writes of its own.
unsafe impl OffloadCopy for Rogue {
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        let n = batch.folio_count();
        let half = n / 2;
        let refuse = |r: Result<(), Errno>| {
            if let Err(e) = r {
                self.refusals.lock().unwrap().push(e);
            }
        };
        match self.misdeed {
            Misdeed::NoCopy => Ok(()),
            Misdeed::CopyAfterComplete => {
                batch.copy_range(0..n)?;
                batch.complete(0..n)?;
                // The pipelined move may already have moved these destinations away.
                refuse(batch.copy_range(0..n));
                refuse(batch.copy_range(n - 1..n));
                refuse(batch.copy_part(0, 0, 4096));
                refuse(batch.complete(0..1));
                Ok(())
            }
            Misdeed::OutOfRange => {
                refuse(batch.complete(n..n + 4));
                refuse(batch.complete(0..n + 1));
                #[expect(clippy::reversed_empty_ranges, reason = "the inverted range is the misdeed")]
                refuse(batch.complete(2..1));
                refuse(batch.copy_range(0..n + 1));
                refuse(batch.copy_part(n, 0, 4096));
                refuse(batch.copy_part(0, 4096, batch.pairs()[0].len));
                Ok(())
            }
            Misdeed::PanicMidway => {
                batch.copy_range(0..half)?;
                batch.complete(0..half)?;
                panic!("rogue migrator panics on purpose");
            }
            Misdeed::SleepThenFail => {
                batch.copy_range(0..half)?;
                batch.complete(0..half)?;
                std::thread::sleep(Duration::from_millis(700));
                Err(Errno::TIMEDOUT)
            }
            Misdeed::RawStores => {
                if (0..n).any(|i| batch.is_unpopulated(i)) {
                    self.refusals.lock().unwrap().push(Errno::NOENT);
                }
                for p in batch.pairs() {
                    // SAFETY: a pair of the batch, not yet reported: its source is readable
                    // and its destination ours to write, and they do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(p.src as *const u8, p.dst as *mut u8, p.len) };
                }
                batch.complete(0..n)
            }
        }
    }

    fn fills_unpopulated(&self) -> bool {
        matches!(self.misdeed, Misdeed::RawStores)
    }
}

/// Registers a rogue migrator, migrates a fresh region under two writers with it (batches of
/// at least four folios), drops
/// the registration (which must return: the reader count stays balanced), and checks every
/// byte, every write, the placement and that every page is writable.
fn migrate_with(misdeed: Misdeed, folio: usize, pipelined: bool) -> (Result<MigrateStats, Error>, Arc<Rogue>) {
    let size = 8 << 20;
    let region = leak(Region::new(size, folio, Some(node())).unwrap());
    workload::fill(region, 41);
    let rogue = Arc::new(Rogue { misdeed, batches: AtomicUsize::new(0), refusals: Mutex::new(Vec::new()) });
    let what = format!("{misdeed:?}, folio {folio}, pipelined {pipelined}");
    let result = {
        let rogue = rogue.clone();
        watchdog(LIMIT, &what.clone(), move || {
            let reg = registry().register_scoped(Migrator::new("rogue", rogue, Owner::new("test"))).unwrap();
            let opts = MigrateOptions::default().pipelined(pipelined).max_batch_pages(512.max(4 * folio / 4096));
            let (result, log) = workload::with_writers(region, 2, || {
                Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Demotion, Mode::Sync, &opts)
            });
            drop(reg);
            let report = workload::verify(region, 41, &log);
            assert!(report.ok(), "{what}: {report:?}");
            assert!(log.writes > 0);
            (result, log)
        })
    };
    let (result, log) = result;
    assert_writable(region);
    assert_eq!(pages_on(region, node()), size / 4096);
    // Nothing stays claimed or registered: the same folios migrate again, with the CPU copy.
    let again = watchdog(LIMIT, "a second migration of the same folios", move || {
        Engine::global().unwrap().migrate_pages(
            &region.folios(),
            node(),
            Reason::Demotion,
            Mode::Sync,
            &Default::default(),
        )
    });
    assert_eq!(again.unwrap().succeeded_folios as usize, size / folio);
    let report = workload::verify(region, 41, &log);
    assert!(report.ok(), "after the second migration: {report:?}");
    (result, rogue)
}

#[test]
fn a_migrator_that_reports_nothing_is_not_trusted() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "a_migrator_that_reports_nothing_is_not_trusted");
    let _t = turn();
    for (folio, pipelined) in [(4096, true), (4096, false), (2 << 20, true), (2 << 20, false)] {
        let (result, rogue) = migrate_with(Misdeed::NoCopy, folio, pipelined);
        let stats = result.unwrap();
        let folios = ((8 << 20) / folio) as u64;
        assert!(rogue.batches.load(Ordering::SeqCst) > 0);
        assert_eq!(stats.succeeded_folios, folios);
        assert_eq!((stats.offloaded_folios, stats.fallback_folios), (0, folios), "{stats:?}");
    }
}

#[test]
fn copies_after_complete_are_refused() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "copies_after_complete_are_refused");
    let _t = turn();
    for (folio, pipelined) in [(4096, true), (4096, false), (2 << 20, true)] {
        let (result, rogue) = migrate_with(Misdeed::CopyAfterComplete, folio, pipelined);
        let stats = result.unwrap();
        assert_eq!(stats.offloaded_folios, ((8 << 20) / folio) as u64);
        let refusals = rogue.refusals.lock().unwrap();
        assert_eq!(refusals.len(), 4 * rogue.batches.load(Ordering::SeqCst));
        assert!(refusals.iter().all(|&e| e == Errno::ALREADY), "{refusals:?}");
    }
}

#[test]
fn out_of_range_reports_are_rejected() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "out_of_range_reports_are_rejected");
    let _t = turn();
    for pipelined in [true, false] {
        let (result, rogue) = migrate_with(Misdeed::OutOfRange, 4096, pipelined);
        let stats = result.unwrap();
        assert_eq!((stats.offloaded_folios, stats.fallback_folios), (0, 2048), "{stats:?}");
        let refusals = rogue.refusals.lock().unwrap();
        assert_eq!(refusals.len(), 6 * rogue.batches.load(Ordering::SeqCst));
        assert!(refusals.iter().all(|&e| e == Errno::INVAL), "{refusals:?}");
    }
}

#[test]
fn a_panicking_migrator_stops_the_call_and_leaves_memory_as_it_was() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_panicking_migrator_stops_the_call_and_leaves_memory_as_it_was");
    let _t = turn();
    for (folio, pipelined) in [(4096, true), (4096, false), (2 << 20, true), (2 << 20, false)] {
        let (result, rogue) = migrate_with(Misdeed::PanicMidway, folio, pipelined);
        let err = result.unwrap_err();
        let Error::Panicked { what, message, stats } = &err else { panic!("expected Panicked, got {err:?}") };
        assert_eq!(*what, "the migrator");
        assert!(message.contains("on purpose"), "{message}");
        assert_eq!(err.errno(), Errno::CANCELED);
        // The call stopped at the first batch: nothing after it was even tried.
        assert_eq!(rogue.batches.load(Ordering::SeqCst), 1);
        assert_eq!(stats.succeeded_folios + stats.failed_folios, stats.folios, "{stats:?}");
        assert!(stats.failed_folios > 0);
    }
}

#[test]
fn a_migrator_sleeping_past_its_time_then_failing_falls_back() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_migrator_sleeping_past_its_time_then_failing_falls_back");
    let _t = turn();
    for (folio, pipelined) in [(4096, true), (2 << 20, false)] {
        let (result, rogue) = migrate_with(Misdeed::SleepThenFail, folio, pipelined);
        let stats = result.unwrap();
        let batches = rogue.batches.load(Ordering::SeqCst) as u64;
        assert!(batches > 0);
        assert_eq!(stats.offloaded_folios + stats.fallback_folios, ((8 << 20) / folio) as u64, "{stats:?}");
        assert!(stats.fallback_folios > 0 && stats.offloaded_folios > 0, "{stats:?}");
    }
}

/// A progress callback that panics on its `at`-th call.
fn panicking_progress(at: usize) -> (pagemig::migrate::Progress, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let progress: pagemig::migrate::Progress = Arc::new(move |_bytes| {
        if c.fetch_add(1, Ordering::SeqCst) + 1 == at {
            panic!("progress callback panics on purpose");
        }
    });
    (progress, calls)
}

#[test]
fn a_panicking_progress_callback_stops_the_call_and_leaves_memory_as_it_was() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "a_panicking_progress_callback_stops_the_call_and_leaves_memory_as_it_was",
    );
    let _t = turn();
    // 4 KiB folios over 2 MiB move on the mover thread; 2 MiB folios on the caller.
    for (folio, mover, at) in [(4096, true, 3), (4096, false, 3), (2 << 20, false, 2), (4096, true, 1)] {
        let size = 16 << 20;
        let region = leak(Region::new(size, folio, Some(node())).unwrap());
        workload::fill(region, 9);
        let (progress, calls) = panicking_progress(at);
        let result = watchdog(LIMIT, "migration with a panicking progress callback", move || {
            // The callback runs on its own thread, which the migration does not wait for:
            // a pause before each move keeps the call going well past the panic, so that
            // the stop is seen mid-call (without it, 8 folios of 2 MiB can all move while
            // the panic is still being printed).
            let hold = FaultInjection { delay_move: Some(Duration::from_millis(40)), ..Default::default() };
            let mut opts = MigrateOptions::default().mover(mover).fault(hold);
            opts.progress = Some(progress);
            let (result, log) = workload::with_writers(region, 2, || {
                Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
            });
            let report = workload::verify(region, 9, &log);
            assert!(report.ok(), "{report:?}");
            result
        });
        let err = result.unwrap_err();
        let Error::Panicked { what, stats, .. } = &err else { panic!("expected Panicked, got {err:?}") };
        assert_eq!(*what, "the progress callback");
        assert_eq!(calls.load(Ordering::SeqCst), at, "no progress after the panic");
        assert_eq!(stats.succeeded_folios + stats.failed_folios, stats.folios, "{stats:?}");
        assert!(stats.failed_folios > 0, "the call stopped early: {stats:?}");
        assert_writable(region);
        assert_eq!(pages_on(region, node()), size / 4096);
        let again = watchdog(LIMIT, "a second migration", move || {
            Engine::global().unwrap().migrate_pages(
                &region.folios(),
                node(),
                Reason::Syscall,
                Mode::Sync,
                &Default::default(),
            )
        });
        assert_eq!(again.unwrap().succeeded_folios as usize, size / folio);
    }
}

#[test]
fn batch_refuses_reports_and_copies_it_cannot_trust() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "batch_refuses_reports_and_copies_it_cannot_trust");
    let src = vec![3u8; 4 * 4096];
    let mut dst = vec![0u8; 4 * 4096];
    let pairs: Vec<_> = (0..4)
        .map(|i| pagemig::copy::CopyPair {
            dst: dst.as_mut_ptr() as usize + i * 4096,
            src: src.as_ptr() as usize + i * 4096,
            len: 4096,
        })
        .collect();
    let reported = Mutex::new(Vec::<Range<usize>>::new());
    let on_complete = |r: Range<usize>| reported.lock().unwrap().push(r);
    // SAFETY: two live vectors of distinct memory, used by this thread alone while the
    // batch lives.
    let batch = unsafe { Batch::new(&pairs, Some(&on_complete)) };
    assert_eq!(batch.complete(0..5), Err(Errno::INVAL));
    assert_eq!(batch.copy_range(3..5), Err(Errno::INVAL));
    assert_eq!(batch.copy_part(1, 4000, 200), Err(Errno::INVAL));
    assert_eq!(batch.copy_part(1, 0, 0), Err(Errno::INVAL));
    batch.copy_range(0..2).unwrap();
    batch.copy_part(2, 0, 2048).unwrap();
    batch.copy_part(2, 2048, 2048).unwrap();
    batch.complete(1..3).unwrap();
    assert!(batch.is_complete(1) && !batch.is_complete(0));
    assert_eq!(batch.copy_range(0..2), Err(Errno::ALREADY));
    assert_eq!(batch.copy_part(2, 0, 8), Err(Errno::ALREADY));
    // 1..3 were reported already: only 0 and 3 are reported now, in two ranges.
    assert_eq!(batch.complete(0..4), Err(Errno::ALREADY));
    assert_eq!(*reported.lock().unwrap(), [1..3, 0..1, 3..4]);
    drop(batch);
    assert!(dst[..3 * 4096].iter().all(|&b| b == 3));
}

#[test]
fn raw_stores_into_unpopulated_destinations_are_filled_not_hung() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "raw_stores_into_unpopulated_destinations_are_filled_not_hung");
    let _t = turn();
    for folio in [4096, 64 << 10] {
        let (result, rogue) = migrate_with(Misdeed::RawStores, folio, true);
        let stats = result.unwrap();
        assert_eq!(stats.failed_folios, 0);
        assert_eq!(stats.offloaded_folios, stats.folios, "every folio copied by the migrator");
        // It was handed destinations without pages: the engine's fault handler gave each
        // store a page of zeros to land in.
        assert!(rogue.refusals.lock().unwrap().contains(&Errno::NOENT), "folio {folio}: no unpopulated destination");
    }
}
