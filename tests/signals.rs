//! A signal the program blocks in every thread of its own never runs its handler on a
//! thread pagemig started: it stays pending for the program to take (`sigwait`,
//! `sigpending`), as it would without pagemig.
//!
//! Runs in a forked child (its signal handler and masks are process-wide) under a
//! watchdog. pagemig's threads start while the program blocks nothing yet (a thread
//! inherits its creator's mask, so only threads started before the program blocks the
//! signal, or from a thread of the program's that does not block it, show the difference):
//! events, zero-fill, reaper, reserve preparer, mtcopy workers, dcbm's soft DMA channels,
//! the agent; then every program thread blocks the signal and the child sends it to itself
//! again and again, while migrations (mover, background thread) go on.
#![allow(unsafe_code, reason = "sigaction, pthread_sigmask, kill: the test's own signal setup")]

mod common;

use common::signal_stores::{install, say};

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, ThpAdvice, numa, workload};

/// How many times the handler ran, and on which thread last.
static HANDLED: AtomicU32 = AtomicU32::new(0);
static HANDLER_TID: AtomicI32 = AtomicI32::new(0);

extern "C" fn handler(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: gettid has no preconditions and is async-signal-safe.
    HANDLER_TID.store(unsafe { libc::gettid() }, Ordering::SeqCst);
}

/// The name of thread `tid` of this process.
fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).map_or_else(|_| "?".into(), |s| s.trim().into())
}

/// The threads of this process that do not block `signal` (from `/proc/self/task/*/status`).
fn threads_not_blocking(signal: i32) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0);
        if blocked >> (signal - 1) & 1 == 0 {
            let tid = task.file_name().to_string_lossy().parse().unwrap_or(0);
            out.push(format!("{} ({tid})", thread_name(tid)));
        }
    }
    out
}

fn pending(signal: i32) -> bool {
    // SAFETY: a set of ours, filled by sigpending.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set);
        libc::sigismember(&set, signal) == 1
    }
}

/// The child: blocks `SIGUSR1` in its threads, starts every pagemig thread, sends itself
/// the signal again and again; 0 when the handler never ran, 1 otherwise.
fn child() -> i32 {
    let signal = libc::SIGUSR1;
    // SAFETY: a handler that only stores into atomics.
    unsafe { install(signal, handler) };
    let node = numa::memory_nodes().unwrap()[0];
    let Ok(engine) = Engine::global() else {
        say("no userfaultfd here: nothing to test\n");
        return 0;
    };
    // pagemig's threads start while the program blocks nothing (the program decides what
    // to block later, as a program that opens a library first and sets up its signal
    // handling after may); only then does every program thread block the signal.
    let _ = engine.reserve(node, 4 << 20, ThpAdvice::Default);
    let _agent = pagemig::agent::start();
    let region = common::leak(Region::new(8 << 20, 4096, Some(node)).unwrap());
    workload::fill(region, 3);
    let with_mover = MigrateOptions::default().mover(true);
    for migrator in ["cpu", "mtcopy", "dcbm"] {
        let _ = pagemig::attr::select_migrator(migrator, Some(2), Some(2));
        let _ = engine.migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &with_mover);
    }
    let _ = pagemig::attr::select_migrator("cpu", None, None);
    // SAFETY: a set of ours; the mask is this thread's (the only program thread so far).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // A program thread of its own, which inherits the mask.
    let stop = &*Box::leak(Box::new(AtomicBool::new(false)));
    let program = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    // Migrations going on (mover, background thread) while the signals arrive.
    let busy = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(500) {
            let job =
                engine.migrate_in_background(region.folios(), node, Reason::Syscall, Mode::Sync, with_mover.clone());
            let _ = job.map(|j| j.wait());
        }
    });
    let deadline = Instant::now() + Duration::from_millis(600);
    let mut sent = 0;
    while Instant::now() < deadline {
        // SAFETY: a signal to this process, whose handler is the one above.
        unsafe { libc::kill(libc::getpid(), signal) };
        sent += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = busy.join();
    std::thread::sleep(Duration::from_millis(50));
    let unblocked = threads_not_blocking(signal);
    let (handled, tid) = (HANDLED.load(Ordering::SeqCst), HANDLER_TID.load(Ordering::SeqCst));
    stop.store(true, Ordering::Relaxed);
    let _ = program.join();
    if handled != 0 {
        say(&format!(
            "SIGUSR1, blocked in every program thread, ran its handler {handled} times of {sent} sent, \
             last on thread {tid} {:?}; threads not blocking it: {unblocked:?}\n",
            thread_name(tid)
        ));
        return 1;
    }
    if !pending(signal) || !unblocked.is_empty() {
        say(&format!("not pending ({}) or threads not blocking it: {unblocked:?}\n", pending(signal)));
        return 1;
    }
    0
}

#[test]
fn a_signal_every_program_thread_blocks_never_runs_on_a_pagemig_thread() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "a_signal_every_program_thread_blocks_never_runs_on_a_pagemig_thread",
    );
    // SAFETY: the child uses its own engine (a forked child opens its own) and this
    // thread's state only.
    let code = unsafe { common::fork_and_wait(Duration::from_secs(120), child) };
    assert_eq!(code, 0, "a pagemig thread took a signal the program blocks (see the child's message above)");
}

/// The child of the test below: [`common::signal_stores`] on one node (pagemig moves every
/// page to new frames there too).
fn storing_child() -> i32 {
    let node = numa::memory_nodes().unwrap()[0];
    let Ok(engine) = Engine::global() else {
        say("no userfaultfd here: nothing to test\n");
        return 0;
    };
    let seed = 11;
    let region = common::leak(Region::new(16 << 20, 4096, Some(node)).unwrap());
    workload::fill(region, seed);
    match common::signal_stores::migrate_under_storing_signals(engine, region, seed, &[node]) {
        Ok(what) => {
            say(&format!("{what}\n"));
            0
        }
        Err(failures) => {
            say(&format!("{failures:?}\n"));
            1
        }
    }
}

#[test]
fn a_handler_that_stores_into_memory_under_migration_on_the_migrating_thread_waits_for_the_call() {
    let what = "a_handler_that_stores_into_memory_under_migration_on_the_migrating_thread_waits_for_the_call";
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, what);
    // SAFETY: as in the test above.
    let code = unsafe { common::fork_and_wait(Duration::from_secs(120), storing_child) };
    assert_eq!(code, 0, "see the child's message above");
}
