//! Graveyards of huge pages are kept from piece to piece and call to call where the kernel
//! frees the page tables a discard empties, as those of base pages are. Ones that took base
//! pages (2 MiB folios the kernel had mapped with base pages, which give a graveyard a page
//! table) then take the huge pages of a call whose moves all fail: those come back whole
//! (still huge pages, every byte as it was; a huge page moved into a range with a page
//! table is split), and the next call moves them whole.
//!
//! The test runs in a fresh process (this binary again, with `PAGEMIG_GRAVEYARDS_CHILD`
//! set): the engine's kept graveyards are process-wide, and a test beside it would take them
//! or make them stale (a fault answered with zeros anywhere in pagemig's mappings).

mod common;

use std::time::Duration;

use common::node;
use pagemig::workload::{self, WriteLog};
use pagemig::{Engine, Error, FaultInjection, MigrateOptions, Mode, Reason, Region};

const CHILD: &str = "PAGEMIG_GRAVEYARDS_CHILD";
const NAME: &str = "huge_pages_put_back_from_graveyards_that_held_base_pages_stay_huge";
const LEN: usize = 16 << 20;
const HUGE: usize = 2 << 20;

#[test]
fn huge_pages_put_back_from_graveyards_that_held_base_pages_stay_huge() {
    common::fresh_process_test(NAME, CHILD, Duration::from_secs(120), in_fresh_process);
}

fn in_fresh_process() {
    let split = Region::new(LEN, HUGE, Some(node())).unwrap();
    workload::fill(&split, 41);
    if split.anon_huge_bytes().unwrap() != LEN as u64 {
        eprintln!("skipped: no huge pages to split");
        return;
    }
    // Each huge page mapped with base pages: one page's protection changed and back.
    assert_eq!(common::map_with_base_pages(&split), 0, "mapped with base pages");
    let engine = Engine::global().unwrap();
    let opts = MigrateOptions::default().max_batch_pages(512);
    let stats = engine.migrate_pages(&split.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
    assert_eq!(stats.succeeded_folios as usize, LEN / HUGE);
    assert!(workload::verify(&split, 41, &WriteLog::default()).ok());
    let (_, huge_kept, reused_before) = engine.kept_graveyards();
    if huge_kept == 0 {
        eprintln!("skipped: this kernel leaves the page tables a discard empties (no CONFIG_PT_RECLAIM)");
        return;
    }
    let huge = Region::new(LEN, HUGE, Some(node())).unwrap();
    workload::fill(&huge, 42);
    assert_eq!(huge.anon_huge_bytes().unwrap(), LEN as u64);
    let failing = MigrateOptions::default()
        .max_batch_pages(512)
        .fault(FaultInjection { fail_move: (0..LEN / HUGE).collect(), ..Default::default() });
    let err = engine.migrate_pages(&huge.folios(), node(), Reason::Syscall, Mode::Sync, &failing).unwrap_err();
    let Error::Partial { stats, .. } = &err else { panic!("expected a partial migration, got {err:?}") };
    assert_eq!(stats.failed_folios as usize, LEN / HUGE, "{stats:?}");
    let (_, _, reused) = engine.kept_graveyards();
    assert!(reused >= reused_before + (LEN / HUGE) as u64 - 1, "graveyards taken again: {reused_before} -> {reused}");
    assert!(workload::verify(&huge, 42, &WriteLog::default()).ok());
    assert_eq!(huge.anon_huge_bytes().unwrap(), LEN as u64, "put back whole");
    let stats = engine.migrate_pages(&huge.folios(), node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
    assert_eq!(stats.succeeded_folios as usize, LEN / HUGE);
    assert!(workload::verify(&huge, 42, &WriteLog::default()).ok());
    assert_eq!(huge.anon_huge_bytes().unwrap(), LEN as u64, "moved whole");
    assert_eq!(huge.placement().unwrap().get(&(node() as i32)).copied(), Some(LEN / 4096));
}
