//! Migration through the copy-offload migrators on real memory: every byte verified, the
//! node of every page verified, counters exact. The tests share the process-wide registry,
//! so they take turns.

mod common;

use common::node;

use std::sync::{Mutex, MutexGuard};

use pagemig::dma::FaultPlan;
use pagemig::workload::{self, WriteLog};
use pagemig::{Engine, Error, MigrateOptions, Mode, Reason, Region, attr, migrators};

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    let g = TURN.lock().unwrap_or_else(|e| e.into_inner());
    attr::select_migrator("cpu", None, None).unwrap();
    for c in ["dcbm/folios_migrated", "dcbm/folios_failures", "mtcopy/folios_copied"] {
        attr::write(c, "0").unwrap();
    }
    pagemig::dma::soft_default().unwrap().set_faults(FaultPlan::default());
    g
}

/// Migrates a fresh region with two writers running and checks everything.
fn migrate(size: usize, folio: usize, batch_pages: usize, pipelined: bool) -> pagemig::MigrateStats {
    let region = Region::new(size, folio, Some(node())).unwrap();
    workload::fill(&region, 77);
    let opts = MigrateOptions::default().max_batch_pages(batch_pages).pipelined(pipelined);
    let (result, log) = workload::with_writers(&region, 2, || {
        Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Demotion, Mode::Sync, &opts)
    });
    let stats = result.unwrap();
    assert_eq!(stats.succeeded_folios as usize, size / folio);
    let report = workload::verify(&region, 77, &log);
    assert!(report.ok(), "{report:?}");
    let placement = region.placement().unwrap();
    assert_eq!(placement.get(&(node() as i32)), Some(&(size / 4096)), "{placement:?}");
    stats
}

#[test]
fn dcbm_channels_on_small_and_huge_folios() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "dcbm_channels_on_small_and_huge_folios");
    let _t = turn();
    for channels in [1, 2, 4, 8, 16] {
        attr::select_migrator("dcbm", Some(channels), None).unwrap();
        assert_eq!(attr::read("offload/active").unwrap(), "dcbm");
        for (folio, batch) in [(4096, 512), (2 << 20, 8192)] {
            attr::write("dcbm/folios_migrated", "0").unwrap();
            attr::write("dcbm/folios_failures", "x").unwrap();
            let stats = migrate(16 << 20, folio, batch, true);
            let folios = ((16 << 20) / folio) as u64;
            assert_eq!(stats.offloaded_folios, folios, "{channels} channels, folio {folio}");
            assert_eq!(stats.fallback_folios, 0);
            assert_eq!(attr::read("dcbm/folios_migrated").unwrap(), folios.to_string());
            assert_eq!(attr::read("dcbm/folios_failures").unwrap(), "0");
        }
    }
    attr::select_migrator("cpu", None, None).unwrap();
    assert_eq!(attr::read("offload/active").unwrap(), "");
}

#[test]
fn mtcopy_threads_on_small_and_huge_folios() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "mtcopy_threads_on_small_and_huge_folios");
    let _t = turn();
    for threads in [1, 2, 4] {
        attr::select_migrator("mtcopy", None, Some(threads)).unwrap();
        for (folio, batch) in [(4096, 512), (2 << 20, 512), (2 << 20, 4096)] {
            for pipelined in [true, false] {
                attr::write("mtcopy/folios_copied", "0").unwrap();
                let stats = migrate(8 << 20, folio, batch, pipelined);
                let folios = ((8 << 20) / folio) as u64;
                assert_eq!(stats.offloaded_folios, folios);
                assert_eq!(attr::read("mtcopy/folios_copied").unwrap(), folios.to_string());
            }
        }
    }
}

#[test]
fn dma_faults_fall_back_and_lose_nothing() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "dma_faults_fall_back_and_lose_nothing");
    let _t = turn();
    let dev = pagemig::dma::soft_default().unwrap();
    attr::select_migrator("dcbm", Some(4), None).unwrap();
    migrators::dcbm().set_timeout(std::time::Duration::from_millis(300)).unwrap();
    let folios = 2048u64; // 8 MiB of 4 KiB folios, 4 batches of 512
    for (plan, expect_fallback) in [
        // The first descriptor of the next batch fails: its channel's share falls back.
        (|base| FaultPlan { fail_descriptor: Some(base), ..Default::default() }, true),
        // A descriptor that never completes: timeout, terminate, fall back.
        (|base| FaultPlan { never_complete: Some(base + 1), ..Default::default() }, true),
        // Out-of-order completion: nothing falls back.
        (|_| FaultPlan { out_of_order: true, ..Default::default() }, false),
    ] as [(fn(u64) -> FaultPlan, bool); 3]
    {
        attr::write("dcbm/folios_migrated", "0").unwrap();
        attr::write("dcbm/folios_failures", "0").unwrap();
        dev.set_faults(plan(dev.descriptors_submitted()));
        let stats = migrate(8 << 20, 4096, 512, true);
        dev.set_faults(FaultPlan::default());
        let migrated: u64 = attr::read("dcbm/folios_migrated").unwrap().parse().unwrap();
        let failures: u64 = attr::read("dcbm/folios_failures").unwrap().parse().unwrap();
        assert_eq!(migrated + failures, folios, "counters cover every folio exactly once");
        assert_eq!(stats.offloaded_folios, migrated);
        assert_eq!(stats.fallback_folios, failures);
        if expect_fallback {
            // One channel's share of one batch: 512 / 4 folios.
            assert_eq!(failures, 128, "{stats:?}");
        } else {
            assert_eq!(failures, 0);
        }
    }
    migrators::dcbm().set_timeout(pagemig::migrators::dcbm::DEFAULT_TIMEOUT).unwrap();
}

#[test]
fn injected_batch_failure_with_a_migrator_falls_back() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "injected_batch_failure_with_a_migrator_falls_back");
    let _t = turn();
    attr::select_migrator("mtcopy", None, Some(2)).unwrap();
    let region = Region::new(4 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 5);
    let opts = MigrateOptions::default().fault(pagemig::FaultInjection { fail_batch_copy: true, ..Default::default() });
    let stats =
        Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
    assert_eq!((stats.offloaded_folios, stats.fallback_folios), (0, 1024));
    assert!(workload::verify(&region, 5, &WriteLog::default()).ok());
}

#[test]
fn ineligible_reasons_and_the_latency_hint_bypass_the_migrator() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "ineligible_reasons_and_the_latency_hint_bypass_the_migrator");
    let _t = turn();
    attr::select_migrator("mtcopy", None, Some(2)).unwrap();
    let region = Region::new(4 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 6);
    let engine = Engine::global().unwrap();
    let stats = engine
        .migrate_pages(&region.folios(), node(), Reason::MemoryFailure, Mode::Sync, &MigrateOptions::default())
        .unwrap();
    assert_eq!((stats.offloaded_folios, stats.single_copied_folios), (0, 1024));
    let hint = MigrateOptions::default().no_batch_copy(true);
    let stats = engine.migrate_pages(&region.folios(), node(), Reason::Demotion, Mode::Sync, &hint).unwrap();
    assert_eq!((stats.offloaded_folios, stats.single_copied_folios), (0, 1024));
    assert!(workload::verify(&region, 6, &WriteLog::default()).ok());
    assert_eq!(attr::read("mtcopy/folios_copied").unwrap(), "0");
}

#[test]
fn attribute_writes() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "attribute_writes");
    let _t = turn();
    let errno = |r: pagemig::Result<()>| r.unwrap_err().errno();
    // Valid.
    attr::write("dcbm/nr_dma_chan", "16").unwrap();
    assert_eq!(attr::read("dcbm/nr_dma_chan").unwrap(), "16");
    attr::apply("dcbm/nr_dma_chan=3").unwrap();
    assert_eq!(attr::read("/dcbm/nr_dma_chan").unwrap(), "3");
    attr::write("migrate/max_batch_pages", "1024").unwrap();
    assert_eq!(attr::read("migrate/max_batch_pages").unwrap(), "1024");
    attr::write("migrate/max_batch_pages", "512").unwrap();
    attr::write("migrate/pipelined", "0").unwrap();
    assert_eq!(attr::read("migrate/pipelined").unwrap(), "0");
    attr::write("migrate/pipelined", "1").unwrap();
    attr::write("mtcopy/threads", "4").unwrap();
    assert_eq!(attr::read("mtcopy/threads").unwrap(), "4");
    // Out of range.
    for (path, bad) in [
        ("dcbm/nr_dma_chan", "0"),
        ("dcbm/nr_dma_chan", "17"),
        ("mtcopy/threads", "0"),
        ("mtcopy/threads", "65"),
        ("migrate/max_batch_pages", "0"),
        ("migrate/max_batch_pages", "262145"),
    ] {
        let e = attr::write(path, bad).unwrap_err();
        assert_eq!(e.errno(), pagemig::sys::Errno::INVAL, "{path}={bad}");
        let msg = e.to_string();
        assert!(msg.contains(path) && msg.contains("accepted"), "{msg}");
    }
    assert_eq!(attr::read("dcbm/nr_dma_chan").unwrap(), "3", "a rejected write changes nothing");
    // Malformed.
    for (path, bad) in
        [("dcbm/offloading", "2"), ("dcbm/nr_dma_chan", "four"), ("migrate/pipelined", ""), ("mtcopy/threads", "-1")]
    {
        assert_eq!(errno(attr::write(path, bad)), pagemig::sys::Errno::INVAL, "{path}={bad:?}");
    }
    assert!(matches!(attr::apply("dcbm/nr_dma_chan"), Err(Error::Invalid(_))));
    // Unknown path and read-only.
    assert_eq!(errno(attr::write("dcbm/bogus", "1")), pagemig::sys::Errno::NOENT);
    assert!(attr::read("nope").unwrap_err().to_string().contains("dcbm/nr_dma_chan"));
    assert_eq!(errno(attr::write("offload/active", "dcbm")), pagemig::sys::Errno::ACCESS);
    // Registering one migrator while another is active is refused.
    attr::write("mtcopy/offloading", "1").unwrap();
    assert_eq!(errno(attr::write("dcbm/offloading", "1")), pagemig::sys::Errno::BUSY);
    assert_eq!(attr::read("offload/active").unwrap(), "mtcopy");
    attr::write("mtcopy/offloading", "0").unwrap();
    attr::write("dcbm/offloading", "1").unwrap();
    attr::write("dcbm/offloading", "1").unwrap();
    assert_eq!(attr::read("offload/active").unwrap(), "dcbm");
    attr::write("dcbm/offloading", "0").unwrap();
    assert_eq!(attr::list().len(), attr::ATTRS.len());
    assert!(attr::list().iter().all(|(_, v)| v.is_ok()));
}

#[test]
fn pipelined_move_moves_pieces_as_they_are_copied() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "pipelined_move_moves_pieces_as_they_are_copied");
    let _t = turn();
    // 32 MiB of 2 MiB folios in one batch with the default CPU copy: pipelined, it copies
    // pieces of 2, 2, 4, 8, 8 and 8 MiB (pieces of huge pages stop growing at 8 MiB) and
    // moves each at once (6 moves, the first after 2 MiB); unpipelined, it moves the whole
    // run after the whole copy (one move). Both move every byte.
    let piped = migrate(32 << 20, 2 << 20, 16384, true);
    let whole = migrate(32 << 20, 2 << 20, 16384, false);
    assert_eq!((piped.batches, whole.batches), (1, 1));
    assert_eq!((piped.runs, whole.runs), (6, 1));
    assert_eq!((piped.first_folio_ns.len(), whole.first_folio_ns.len()), (1, 1));
}
