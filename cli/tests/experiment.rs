//! One measured migration as `pagemig move` runs it: the progress it reports and the
//! figures it ends with.

use std::sync::{Arc, Mutex};

use pagemig::sys::PAGE_SIZE;
use pagemig::{Engine, Mode, Reason};
use pagemig_cli::experiment::{MoveConfig, run_move};

fn node() -> u32 {
    pagemig::numa::memory_nodes().unwrap()[0]
}

#[test]
fn progress_starts_at_the_migration_and_ends_at_the_region() {
    let Ok(engine) = Engine::global() else { return };
    let size = 8 << 20;
    let cfg = MoveConfig {
        size,
        folio_size: PAGE_SIZE,
        from_node: Some(node()),
        to_node: node(),
        to_nodes: Vec::new(),
        batch_pages: 512,
        reason: Reason::Syscall,
        mode: Mode::Sync,
        writers: 1,
        seed: 3,
        measure_memcpy: true,
        reserve: None,
    };
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let report = run_move(engine, &cfg, Some(Arc::new(move |done| seen.lock().unwrap().push(done)))).unwrap();
    assert!(report.ok(), "{report:?}");
    let calls = calls.lock().unwrap();
    // The first call marks the start of the migration itself (after filling and the
    // yardsticks), so that a rate counted from it matches the end-to-end figure.
    assert_eq!(calls.first(), Some(&0), "{calls:?}");
    assert!(calls.windows(2).all(|w| w[0] <= w[1]), "{calls:?}");
    assert_eq!(calls.last(), Some(&(size as u64)), "{calls:?}");
    assert!(report.gbps > 0.0 && report.uffdio_copy_gbps > 0.0 && report.memcpy_gbps > 0.0);
    assert!(report.critical_path_gbps.is_some_and(|c| c >= report.gbps), "{report:?}");
    assert_eq!(report.ratio, report.gbps / report.memcpy_gbps);
}
