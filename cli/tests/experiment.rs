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

#[test]
fn folios_spread_round_robin_each_call_to_its_node() {
    let Ok(engine) = Engine::global() else { return };
    let nodes = pagemig::numa::memory_nodes().unwrap();
    // Every memory node, and the first one again where there is only one: round-robin
    // over the list still makes one call per entry, each with its share of the folios.
    let to_nodes = if nodes.len() > 1 { nodes.clone() } else { vec![nodes[0], nodes[0]] };
    let size = 8 << 20;
    let cfg = MoveConfig {
        size,
        folio_size: 64 << 10,
        from_node: Some(node()),
        to_node: to_nodes[0],
        to_nodes: to_nodes.clone(),
        batch_pages: 512,
        reason: Reason::Syscall,
        mode: Mode::Sync,
        writers: 2,
        seed: 5,
        measure_memcpy: false,
        reserve: Some(size),
    };
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let report = run_move(engine, &cfg, Some(Arc::new(move |done| seen.lock().unwrap().push(done)))).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.to_nodes, to_nodes);
    assert_eq!(report.misplaced_pages, 0);
    assert_eq!(report.succeeded_folios, (size / (64 << 10)) as u64);
    // The calls' statistics add up, and progress runs on across them to the whole region.
    assert_eq!(report.stats.folios, report.folios);
    assert_eq!(report.stats.bytes, size as u64);
    let calls = calls.lock().unwrap();
    assert!(calls.windows(2).all(|w| w[0] <= w[1]), "{calls:?}");
    assert_eq!(calls.last(), Some(&(size as u64)), "{calls:?}");
    for &n in &nodes {
        let share = to_nodes.iter().filter(|&&t| t == n).count() * (size / PAGE_SIZE) / to_nodes.len();
        assert_eq!(report.placement.get(&(n as i32)).copied().unwrap_or(0), share, "{report:?}");
    }
}

#[test]
fn each_step_is_announced_in_order_and_the_progress_starts_with_the_migration() {
    use pagemig_cli::experiment::{Phase, run_move_observed};
    let Ok(engine) = Engine::global() else { return };
    let cfg = MoveConfig {
        size: 4 << 20,
        folio_size: PAGE_SIZE,
        from_node: Some(node()),
        to_node: node(),
        to_nodes: Vec::new(),
        batch_pages: 512,
        reason: Reason::Syscall,
        mode: Mode::Sync,
        writers: 0,
        seed: 5,
        measure_memcpy: true,
        reserve: Some(4 << 20),
    };
    // Phases and progress calls in one log: the progress comes between Migrating and
    // Checking.
    #[derive(Debug, PartialEq)]
    enum Event {
        Step(Phase),
        Moved,
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let progress_log = log.clone();
    let progress: pagemig::migrate::Progress = Arc::new(move |_| progress_log.lock().unwrap().push(Event::Moved));
    let report =
        run_move_observed(engine, &cfg, Some(progress), &|p| log.lock().unwrap().push(Event::Step(p))).unwrap();
    assert!(report.ok(), "{report:?}");
    let mut log = std::mem::take(&mut *log.lock().unwrap());
    log.dedup();
    let want = [
        Event::Step(Phase::Filling),
        Event::Step(Phase::Yardsticks),
        Event::Step(Phase::Reserving),
        Event::Step(Phase::Migrating),
        Event::Moved,
        Event::Step(Phase::Checking),
    ];
    assert_eq!(log, want);
    // No yardsticks to measure: that step is not announced.
    let quiet = MoveConfig { measure_memcpy: false, reserve: None, ..cfg };
    let phases = Mutex::new(Vec::new());
    run_move_observed(engine, &quiet, None, &|p| phases.lock().unwrap().push(p)).unwrap();
    assert_eq!(*phases.lock().unwrap(), [Phase::Filling, Phase::Migrating, Phase::Checking]);
}
