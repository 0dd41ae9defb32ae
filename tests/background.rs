//! Migrations on a thread of their own: progress, cancel, a deadline, and a handle dropped
//! early. Every byte and write verified, every page probed, under a watchdog.

mod common;

use common::node;

use std::time::{Duration, Instant};

use common::{assert_writable, leak, watchdog};
use pagemig::sys::Errno;
use pagemig::{Engine, Error, FaultInjection, MigrateOptions, Mode, Reason, Region, workload};

const LIMIT: Duration = Duration::from_secs(120);

/// Options that make a migration of 4 KiB folios slow enough to be stopped midway.
fn slow(extra: MigrateOptions) -> MigrateOptions {
    extra.max_batch_pages(64).fault(FaultInjection { delay_move: Some(Duration::from_millis(5)), ..Default::default() })
}

#[test]
fn reports_progress_and_finishes_with_every_byte() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "reports_progress_and_finishes_with_every_byte");
    watchdog(LIMIT, "background migration", || {
        let region = leak(Region::new(16 << 20, 4096, Some(node())).unwrap());
        workload::fill(region, 1);
        let (result, log) = workload::with_writers(region, 2, || {
            let job = Engine::global()
                .unwrap()
                .migrate_in_background(region.folios(), node(), Reason::Syscall, Mode::Sync, Default::default())
                .unwrap();
            let mut seen = Vec::new();
            while !job.is_finished() {
                seen.push(job.progress().0);
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress went back: {seen:?}");
            assert_eq!(job.progress(), (16 << 20, 16 << 20));
            job.wait()
        });
        let stats = result.unwrap();
        assert_eq!(stats.succeeded_folios, 4096);
        assert!(workload::verify(region, 1, &log).ok());
        assert_writable(region);
    });
}

/// Starts a slow migration, stops it with `stop` after a moment, and checks that the
/// folios not reached failed with `errno`, were left exactly as they were, and that the
/// others moved.
fn stopped_midway(
    errno: Errno,
    deadline_after: Option<Duration>,
    stop: impl FnOnce(&pagemig::Background) + Send + 'static,
) {
    watchdog(LIMIT, &format!("stopped with {errno}"), move || {
        let region = leak(Region::new(16 << 20, 4096, Some(node())).unwrap());
        workload::fill(region, 2);
        let (result, log) = workload::with_writers(region, 1, || {
            let engine = Engine::global().unwrap();
            let deadline = deadline_after.map(|d| Instant::now() + d);
            let opts = slow({
                let mut opts = MigrateOptions::default();
                opts.deadline = deadline;
                opts
            });
            let job = engine.migrate_in_background(region.folios(), node(), Reason::Syscall, Mode::Sync, opts).unwrap();
            // Stopped once something moved (or, for the deadline, after it passed).
            let began = Instant::now();
            while job.progress().0 == 0 && !job.is_finished() && began.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(1));
            }
            stop(&job);
            job.wait()
        });
        match result {
            Err(Error::Partial { stats, first, .. }) => {
                assert_eq!(first.errno(), errno, "{first}");
                let (moved, failed) = (stats.succeeded_folios, stats.failed_folios);
                // A cancel comes after the first move; a deadline may pass before it.
                assert!(failed > 0 && (moved > 0 || errno == Errno::TIMEDOUT), "moved {moved}, failed {failed}");
                assert_eq!(stats.succeeded_folios + stats.failed_folios, 4096);
                assert!(stats.failures.iter().all(|f| f.errno == errno.raw_os_error()), "{:?}", &stats.failures[..3]);
            }
            other => panic!("expected a partial migration, got {other:?}"),
        }
        assert!(workload::verify(region, 2, &log).ok());
        assert_writable(region);
    });
}

#[test]
fn cancel_stops_before_the_next_batch() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "cancel_stops_before_the_next_batch");
    stopped_midway(Errno::CANCELED, None, |job| job.cancel());
}

#[test]
fn a_deadline_stops_the_migration() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "a_deadline_stops_the_migration");
    stopped_midway(Errno::TIMEDOUT, Some(Duration::from_millis(150)), |_| {});
}

#[test]
fn dropping_the_handle_cancels_and_waits() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "dropping_the_handle_cancels_and_waits");
    watchdog(LIMIT, "dropped handle", || {
        let region = leak(Region::new(16 << 20, 4096, Some(node())).unwrap());
        workload::fill(region, 3);
        let job = Engine::global()
            .unwrap()
            .migrate_in_background(region.folios(), node(), Reason::Syscall, Mode::Sync, slow(Default::default()))
            .unwrap();
        std::thread::sleep(Duration::from_millis(10));
        drop(job);
        // The thread is gone: the memory is the program's alone, as it was or moved.
        assert!(workload::verify(region, 3, &Default::default()).ok());
        assert_writable(region);
    });
}
