//! A small call in a process that holds nearly every mapping `vm.max_map_count` allows: it is
//! not counted up front (that would read every mapping of the process on every call), so
//! the kernel refuses the mappings pagemig asks for. Nothing may hang or crash, the folios
//! that did not move are exactly as they were, and the drop-in's `move_pages` still gives
//! every page an answer (the kernel needs no mapping of its own).
//!
//! The test runs in a fresh process (this binary again, with `PAGEMIG_MAP_LIMIT_CHILD` set):
//! filling the map count would break any test running beside it.

mod common;

use std::time::Duration;

use common::node;
use pagemig::workload::{self, WriteLog};
use pagemig::{Engine, Error, Folio, MigrateOptions, Mode, Reason, Region};

const CHILD: &str = "PAGEMIG_MAP_LIMIT_CHILD";
const NAME: &str = "a_small_call_at_the_map_count_limit_leaves_what_it_cannot_move_untouched";

#[test]
fn a_small_call_at_the_map_count_limit_leaves_what_it_cannot_move_untouched() {
    common::fresh_process_test(NAME, CHILD, Duration::from_secs(240), in_fresh_process);
}

/// Single pages mapped until the kernel refuses one more, alternately readable and not so
/// that no two merge; then `headroom` of them unmapped again.
fn fill_the_map_count(headroom: usize) -> Vec<usize> {
    let mut maps = Vec::new();
    loop {
        let prot = if maps.len() % 2 == 0 { libc::PROT_READ } else { libc::PROT_NONE };
        // SAFETY: a fresh anonymous page of the test's own.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOMEM));
            break;
        }
        maps.push(p as usize);
        assert!(maps.len() < 1 << 20, "no map count limit met");
    }
    for _ in 0..headroom {
        let p = maps.pop().expect("mapped pages");
        // SAFETY: a page the test mapped just above and nothing uses.
        unsafe { libc::munmap(p as *mut _, 4096) };
    }
    maps
}

fn in_fresh_process() {
    let engine = Engine::global().unwrap();
    let region = Region::new(2 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, 77);
    // Every eighth folio: 64 runs, which need more mappings than are left.
    let scattered: Vec<Folio> = region.folios().into_iter().step_by(8).collect();
    // One migration first: the threads a process's first migration starts (the copy
    // kernels' measuring) start now. A Rust program's thread started at the limit aborts
    // the process (the standard library cannot map its signal stack), whoever starts it.
    engine.migrate_pages(&scattered, node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default()).unwrap();
    let _held = fill_the_map_count(8);
    let outcome = engine.migrate_pages(&scattered, node(), Reason::Syscall, Mode::Sync, &MigrateOptions::default());
    let moved = match &outcome {
        Ok(stats) => stats.succeeded_folios,
        Err(Error::Partial { stats, .. }) => {
            assert!(stats.failures.iter().all(|f| f.errno == libc::ENOMEM), "{:?}", stats.failures);
            stats.succeeded_folios
        }
        Err(e) => {
            assert_eq!(e.errno(), pagemig::sys::Errno::NOMEM, "{e}");
            0
        }
    };
    let first = outcome.as_ref().err().map(ToString::to_string);
    println!("at the map count limit: {moved} of {} folios moved; error: {first:?}", scattered.len());
    assert!(workload::verify(&region, 77, &WriteLog::default()).ok(), "every byte as written");
    // The drop-in: every page gets the kernel's answer where pagemig cannot move it.
    let pages: Vec<usize> = scattered.iter().map(|f| f.addr()).collect();
    let mut status = vec![i32::MIN; pages.len()];
    // SAFETY: this thread does not touch the region during the call.
    unsafe { engine.move_pages(&pages, Some(&vec![node() as i32; pages.len()]), &mut status) }.unwrap();
    assert!(status.iter().all(|&s| s == node() as i32), "{status:?}");
    assert!(workload::verify(&region, 77, &WriteLog::default()).ok(), "every byte as written");
    // Writable as before, and every write stays.
    for f in &scattered {
        region.word((f.addr() - region.addr()) / 8).store(1, std::sync::atomic::Ordering::Relaxed);
    }
}

const SCATTERED_CHILD: &str = "PAGEMIG_MAP_LIMIT_SCATTERED_CHILD";
const SCATTERED_NAME: &str = "calls_of_every_shape_leave_the_process_with_as_many_mappings";

/// Calls of every shape, again and again, one after the other: many small runs (every
/// other folio: 4 KiB with the copy helper, 64 KiB, 2 MiB), whole regions at the default
/// batch and in one batch, one piece without the helper, copied in, with the pre-copy, with
/// prepared destinations. pagemig's mappings (pool
/// chunks, graveyards, holdings) are reused or given back whole, so the process ends each
/// call with the mappings it had, not one more per run or per call (the map count is the
/// program's too). In a fresh process: a test beside it would map and unmap meanwhile.
#[test]
fn calls_of_every_shape_leave_the_process_with_as_many_mappings() {
    common::fresh_process_test(SCATTERED_NAME, SCATTERED_CHILD, Duration::from_secs(240), shapes_in_fresh_process);
}

/// The lines of `/proc/self/maps`.
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

fn shapes_in_fresh_process() {
    let engine = Engine::global().unwrap();
    let seed = 78;
    let base = MigrateOptions::default().copy_helper(true).mover(true);
    // (what, folio size, every n-th folio, bytes at most, options)
    let all = usize::MAX;
    let shapes: Vec<(&str, usize, usize, usize, MigrateOptions)> = vec![
        ("4 KiB, every other", 4096, 2, all, base.clone()),
        ("64 KiB, every other", 64 << 10, 2, all, base.clone()),
        ("2 MiB, every other", 2 << 20, 2, all, base.clone()),
        ("4 KiB, whole", 4096, 1, all, base.clone()),
        // One piece: no helper, filled by the caller alone.
        ("4 KiB, 2 MiB of it", 4096, 1, 2 << 20, base.clone()),
        ("4 KiB, whole, one batch", 4096, 1, all, base.clone().max_batch_pages(262144)),
        ("4 KiB, whole, copied in", 4096, 1, all, base.clone().copy_in(true)),
        ("4 KiB, every third, pre-copy", 4096, 3, all, base.clone().precopy(true)),
        ("2 MiB, whole, prepared ahead", 2 << 20, 1, all, base.clone().prepare_ahead_mib(8)),
    ];
    // Every region first: their own mappings are not the calls'.
    let regions: Vec<Region> = shapes
        .iter()
        .map(|&(_, folio, ..)| {
            let region = Region::new(64 << 20, folio, Some(node())).unwrap();
            workload::fill(&region, seed);
            region
        })
        .collect();
    let migrate = |k: usize| {
        let (what, folio, step, bytes, ref opts) = shapes[k];
        let folios: Vec<Folio> = regions[k].folios().into_iter().take(bytes / folio).step_by(step).collect();
        let stats = engine.migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, opts).unwrap();
        assert_eq!(stats.succeeded_folios, folios.len() as u64, "{what}");
    };
    // The first call of each shape starts what it needs once (pagemig's threads with their
    // stacks, a pool chunk of each kind).
    (0..shapes.len()).for_each(migrate);
    let before = mappings();
    for round in 0..3 {
        for (k, (what, ..)) in shapes.iter().enumerate() {
            migrate(k);
            let now = mappings();
            println!("round {round}, {what}: {now} mappings ({before} after the first calls)");
            // Slack for the C library's cache of thread stacks (two mappings each); one
            // mapping left per call would reach 27 by the end.
            assert!(now <= before + 8, "{what}: {before} mappings after the first calls, {now} after round {round}");
        }
    }
    for (region, (what, ..)) in regions.iter().zip(&shapes) {
        assert!(workload::verify(region, seed, &WriteLog::default()).ok(), "{what}: every byte as written");
        assert_eq!(common::pages_on(region, node()), region.len() / 4096, "{what}");
    }
}
