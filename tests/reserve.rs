//! The prepared reserve: destinations populated ahead of use on a background thread, taken
//! by a call at no preparation cost, topped up again after it; every migration verified
//! byte by byte, write by write and page by page.

mod common;

use common::node;

use std::time::Duration;

use common::{assert_writable, leak, pages_on, watchdog};
use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, ThpAdvice, workload};

const LIMIT: Duration = Duration::from_secs(120);

/// Reserves `reserve` bytes for `thp`, migrates a fresh region of `size` bytes in `folio`
/// folios under two writers twice (the reserve is topped up between), and returns the
/// preparation time of each call.
fn migrate_from_reserve(folio: usize, thp: ThpAdvice, size: usize, reserve: usize) -> Vec<u64> {
    let what = format!("reserve for {folio}-byte folios");
    watchdog(LIMIT, &what.clone(), move || {
        let engine = Engine::new().unwrap();
        engine.reserve(node(), reserve, thp).unwrap();
        let mut prepare = Vec::new();
        for round in 0..2 {
            assert!(engine.wait_reserved(Duration::from_secs(60)), "{what}: the reserve never filled");
            let region = leak(Region::new(size, folio, Some(node())).unwrap());
            workload::fill(region, round);
            let (result, log) = workload::with_writers(region, 2, || {
                // Populated destinations (not filled empty ones, which cost no preparing either),
                // so that only a reserve makes the preparation time zero.
                let opts = MigrateOptions::default().fill_empty(false);
                engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts)
            });
            let stats = result.unwrap();
            assert_eq!(stats.succeeded_folios as usize, size / folio, "{what}");
            let report = workload::verify(region, round, &log);
            assert!(report.ok(), "{what}: {report:?}");
            assert_writable(region);
            assert_eq!(pages_on(region, node()), size / 4096);
            prepare.push(stats.prepare_ns);
        }
        // Ended: the thread gives back what nobody took.
        engine.reserve(node(), 0, thp).unwrap();
        assert!(engine.wait_reserved(Duration::from_secs(1)));
        prepare
    })
}

#[test]
fn without_a_reserve_the_call_prepares_its_destinations() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "without_a_reserve_the_call_prepares_its_destinations");
    let engine = Engine::new().unwrap();
    let region = leak(Region::new(8 << 20, 4096, Some(node())).unwrap());
    let opts = MigrateOptions::default().fill_empty(false);
    let stats = engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
    assert!(stats.prepare_ns > 0);
}

#[test]
fn base_page_destinations_come_from_the_reserve() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "base_page_destinations_come_from_the_reserve");
    let prepare = migrate_from_reserve(4096, ThpAdvice::NoHuge, 16 << 20, 32 << 20);
    assert_eq!(prepare, [0, 0], "destinations populated by the call itself");
}

#[test]
fn huge_page_destinations_come_from_the_reserve() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "huge_page_destinations_come_from_the_reserve");
    let prepare = migrate_from_reserve(2 << 20, ThpAdvice::Huge, 16 << 20, 32 << 20);
    assert_eq!(prepare, [0, 0], "destinations populated by the call itself");
}

#[test]
fn a_reserve_smaller_than_the_call_still_moves_every_folio() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_reserve_smaller_than_the_call_still_moves_every_folio");
    // The call takes what the reserve has and populates the rest itself, while the thread
    // tops the reserve up between its batches; every byte, write and page is checked inside.
    migrate_from_reserve(2 << 20, ThpAdvice::Huge, 32 << 20, 4 << 20);
}

#[test]
fn reserves_on_unknown_nodes_are_refused() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "reserves_on_unknown_nodes_are_refused");
    let engine = Engine::new().unwrap();
    let err = engine.reserve(4095, 1 << 20, ThpAdvice::Default).unwrap_err();
    assert!(matches!(err, pagemig::Error::UnknownNode { .. }), "{err}");
}
