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
    if std::env::var_os(CHILD).is_some() {
        return in_fresh_process();
    }
    common::in_fresh_process(NAME, &[(CHILD, "1".as_ref())], Duration::from_secs(240));
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
const SCATTERED_NAME: &str = "scattered_calls_leave_the_process_with_as_many_mappings";

/// Many small runs, again and again (every other page of 64 MiB, with the copy helper):
/// their destinations follow each other in pagemig's pool and go back to it whole, so the
/// process ends each call with the mappings it had, not one more per run (the map count is
/// the program's too). In a fresh process: a test beside it would map and unmap meanwhile.
#[test]
fn scattered_calls_leave_the_process_with_as_many_mappings() {
    if std::env::var_os(SCATTERED_CHILD).is_some() {
        return scattered_in_fresh_process();
    }
    common::in_fresh_process(SCATTERED_NAME, &[(SCATTERED_CHILD, "1".as_ref())], Duration::from_secs(240));
}

/// The lines of `/proc/self/maps`.
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

fn scattered_in_fresh_process() {
    let engine = Engine::global().unwrap();
    let seed = 78;
    let region = Region::new(64 << 20, 4096, Some(node())).unwrap();
    workload::fill(&region, seed);
    let scattered: Vec<Folio> = region.folios().into_iter().step_by(2).collect();
    let opts = MigrateOptions::default().copy_helper(true).mover(true);
    let migrate = || {
        let stats = engine.migrate_pages(&scattered, node(), Reason::Syscall, Mode::Sync, &opts).unwrap();
        assert_eq!(stats.succeeded_folios, scattered.len() as u64);
    };
    // The first call starts pagemig's threads (each with its stack) and its pool's chunk.
    migrate();
    let before = mappings();
    for _ in 0..4 {
        migrate();
    }
    let after = mappings();
    println!("{} runs a call, 4 calls: {before} mappings before, {after} after", scattered.len());
    assert!(after <= before + 8, "{before} mappings before four calls of {} runs, {after} after", scattered.len());
    assert!(workload::verify(&region, seed, &WriteLog::default()).ok(), "every byte as written");
    assert_eq!(common::pages_on(&region, node()), region.len() / 4096);
}
