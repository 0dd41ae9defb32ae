//! A program that locks all of its memory (`mlockall`), before pagemig opens or after a
//! call: pagemig's own reservations (a gibibyte of address space per destination pool,
//! waiting to be handed out) must not be locked and populated with it. They were: 1.4 GB
//! locked and resident in the two-node guest, whose process the kernel then killed for want
//! of memory, where the kernel's `move_pages(2)` leaves a few pages locked.
//!
//! Each case runs in a forked child (locking is process-wide) under a deadline.
#![allow(unsafe_code, reason = "mlockall, munlockall: the child's own memory")]

mod common;

use std::time::Duration;

use pagemig::{Engine, Mode, Reason, Region, workload};

const SEED: u64 = 77;
const LEN: usize = 16 << 20;
/// Memory the child may have resident beyond what it had before it locked (after a call)
/// or before pagemig opened: its region (16 MiB), the stacks of pagemig's threads and of
/// the test harness's (copied from the parent, and populated once locked), what a call
/// holds. Before pagemig's reservations were kept inaccessible: 1 GiB more per pool.
const RESIDENT_MAX_KIB: u64 = 256 << 10;

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Migrates `region` (to the same node: what a process on one node can do; the guest
/// moves pages across) with every byte checked after.
fn migrate(engine: &Engine, region: &Region) -> bool {
    let moved =
        engine.migrate_pages(&region.folios(), common::node(), Reason::Syscall, Mode::Sync, &Default::default());
    let report = workload::verify(region, SEED, &Default::default());
    match moved {
        Ok(s) if s.succeeded_folios == s.folios && report.ok() => true,
        other => {
            let other = other.map(|s| (s.succeeded_folios, s.folios)).map_err(|e| e.to_string());
            eprintln!("migration: {other:?}; {report:?}");
            false
        }
    }
}

/// `flags` for `mlockall`; `before`: lock before pagemig opens (else after its first call).
/// Returns 0, or 1 (too much locked), 2 (a migration failed or lost bytes), 64 (setup).
fn child(flags: libc::c_int, before: bool) -> i32 {
    let mut base = status_kib("VmRSS:");
    // SAFETY: locks this child's own memory.
    if before && unsafe { libc::mlockall(flags) } != 0 {
        return 64;
    }
    let Ok(engine) = Engine::global() else { return 64 };
    let region = Region::new(LEN, 4096, Some(common::node())).unwrap();
    workload::fill(&region, SEED);
    let mut failed = if migrate(engine, &region) { 0 } else { 2 };
    if !before {
        base = status_kib("VmRSS:");
    }
    // SAFETY: as above.
    if !before && unsafe { libc::mlockall(flags) } != 0 {
        return 64;
    }
    if !migrate(engine, &region) {
        failed |= 2;
    }
    let grown = status_kib("VmRSS:").saturating_sub(base);
    eprintln!(
        "mlockall({flags:#x}) {}: {grown} KiB more resident ({} KiB in all), {} KiB mapped",
        if before { "before pagemig opened" } else { "after a call" },
        status_kib("VmRSS:"),
        status_kib("VmSize:")
    );
    if grown > RESIDENT_MAX_KIB {
        failed |= 1;
    }
    // SAFETY: unlocks this child's own memory.
    unsafe { libc::munlockall() };
    failed
}

fn case(flags: libc::c_int, before: bool) {
    // SAFETY: the child opens its own engine and uses only its own threads.
    let code = unsafe { common::fork_and_wait(Duration::from_secs(60), || child(flags, before)) };
    assert_eq!(code, 0, "mlockall({flags:#x}), before: {before}: 1 too much resident, 2 a migration failed, 64 setup");
}

#[test]
fn mlockall_after_a_call_locks_none_of_pagemigs_reservations() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "mlockall_after_a_call_locks_none_of_pagemigs_reservations");
    case(libc::MCL_CURRENT, false);
    case(libc::MCL_CURRENT | libc::MCL_FUTURE, false);
}

#[test]
fn mlockall_with_future_mappings_before_pagemig_opens_locks_none_of_its_reservations() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "mlockall_with_future_mappings_before_pagemig_opens_locks_none_of_its_reservations",
    );
    case(libc::MCL_CURRENT | libc::MCL_FUTURE, true);
    case(libc::MCL_FUTURE, true);
}
