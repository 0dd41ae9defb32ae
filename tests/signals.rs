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

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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

/// Writes `text` to standard error with one `write(2)` (no lock a parent thread may hold).
fn say(text: &str) {
    // SAFETY: a buffer of ours, `text.len()` bytes.
    let _ = unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
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

/// Makes `handler` the action of `signal`.
///
/// # Safety
/// `handler` must be async-signal-safe.
unsafe fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a sigaction of ours, zeroed then filled; the caller vouches for the handler.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut());
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

/// Where the storing handler writes: the region's first word, and its length in words.
static STORE_BASE: AtomicUsize = AtomicUsize::new(0);
static STORE_WORDS: AtomicUsize = AtomicUsize::new(0);
/// How many times the storing handler ran.
static STORES: AtomicU64 = AtomicU64::new(0);
/// `/proc/self/pagemap`, opened before the first signal.
static PAGEMAP: AtomicI32 = AtomicI32::new(-1);
/// How many times the handler found pages of the region not present or write-protected: it
/// ran while they were protected or isolated, in the middle of a migration on its own
/// thread.
static RAN_MID_CALL: AtomicU64 = AtomicU64::new(0);
/// What the storing handler writes: its run's number, marked.
const MARK: u64 = 0x5160_0000_0000_0000;

/// The word the handler's `n`-th run writes: a page of its own for each run up to the
/// region's page count, then the next word of each page, so no two runs share a word.
fn store_index(n: usize, words: usize) -> usize {
    let pages = words / 512;
    (n % pages) * 512 + (n / pages) % 512
}

/// A handler that stores into the memory being migrated, as a program's handler that
/// updates a buffer or a counter of its own may.
extern "C" fn storing_handler(_: libc::c_int) {
    let n = STORES.fetch_add(1, Ordering::SeqCst) as usize;
    let words = STORE_WORDS.load(Ordering::SeqCst);
    // Every page of the region present (bit 63 of its pagemap entry) and not
    // write-protected (bit 57, userfaultfd's protection), or the handler runs while a
    // migration of its own thread has pages of it protected or isolated. `pread` is
    // async-signal-safe; 4096 entries, 32 KiB on this thread's stack.
    let mut entries = [0u64; 4096];
    let pages = (words / 512).min(entries.len());
    let offset = (STORE_BASE.load(Ordering::SeqCst) / 4096 * 8) as libc::off_t;
    // SAFETY: reads into a buffer of ours, at most its size.
    let read = unsafe { libc::pread(PAGEMAP.load(Ordering::SeqCst), entries.as_mut_ptr().cast(), pages * 8, offset) };
    if read != (pages * 8) as isize || entries[..pages].iter().any(|e| e >> 63 == 0 || e >> 57 & 1 == 1) {
        RAN_MID_CALL.fetch_add(1, Ordering::SeqCst);
    }
    let index = store_index(n, words);
    // SAFETY: the region is leaked (it lives as long as the process) and `index` is below
    // its length in words; its words are only ever accessed atomically.
    let word = unsafe { &*(STORE_BASE.load(Ordering::SeqCst) as *const AtomicU64).add(index) };
    word.store(MARK | n as u64, Ordering::SeqCst);
}

/// The calling thread's signal mask, as bits.
fn own_mask() -> Vec<bool> {
    // SAFETY: a set of ours; a NULL new set only reads the mask into it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
        (1..65).map(|s| libc::sigismember(&set, s) == 1).collect()
    }
}

/// The child: a thread of its own sends the migrating thread `SIGUSR2` every 100 µs while
/// it migrates a region again and again; the handler looks at the region's pages and
/// stores into it. 0 when the handler never ran while pages were isolated, every call
/// moved every folio, every store of the handler's is there, every other byte is as
/// filled, every page is on the node, and the thread's mask is as it was after each call.
/// (Without the blocking, the child hangs: a store into a folio its own thread isolates.)
fn storing_child() -> i32 {
    let signal = libc::SIGUSR2;
    // SAFETY: a handler that stores into atomics only (the region's words among them).
    unsafe { install(signal, storing_handler) };
    let node = numa::memory_nodes().unwrap()[0];
    let Ok(engine) = Engine::global() else {
        say("no userfaultfd here: nothing to test\n");
        return 0;
    };
    let seed = 11;
    let region = common::leak(Region::new(16 << 20, 4096, Some(node)).unwrap());
    workload::fill(region, seed);
    STORE_BASE.store(region.addr(), Ordering::SeqCst);
    STORE_WORDS.store(region.words(), Ordering::SeqCst);
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    PAGEMAP.store(std::os::fd::AsRawFd::as_raw_fd(&pagemap), Ordering::SeqCst);
    let mask = own_mask();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let stop = &*Box::leak(Box::new(AtomicBool::new(false)));
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: the migrating thread, which outlives this one (it joins it).
            unsafe { libc::pthread_kill(me, signal) };
            sent += 1;
            std::thread::sleep(Duration::from_micros(100));
        }
        sent
    });
    // `move_pages` and the C entries come here too (on one node `move_pages` leaves pages
    // already home, so it is not the call tested).
    let opts = MigrateOptions::default().mover(true);
    let pages = region.len() / 4096;
    let mut failures = Vec::new();
    for round in 0..16 {
        let moved = engine
            .migrate_pages(&region.folios(), node, Reason::Syscall, Mode::Sync, &opts)
            .map(|s| s.succeeded_folios as usize);
        match moved {
            Ok(n) if n == pages => {}
            other => failures.push(format!("round {round}: {other:?} of {pages} folios")),
        }
        if own_mask() != mask {
            failures.push(format!("round {round}: the thread's signal mask changed"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    // The last signal sent may still be on its way: the handler runs once more at most.
    std::thread::sleep(Duration::from_millis(10));
    let stores = STORES.load(Ordering::SeqCst) as usize;
    let words = region.words();
    let mut expected: Vec<u64> = (0..words).map(|i| workload::pattern_word(seed, i)).collect();
    for n in 0..stores {
        expected[store_index(n, words)] = MARK | n as u64;
    }
    let wrong = (0..words).filter(|&i| region.word(i).load(Ordering::SeqCst) != expected[i]).count();
    if stores == 0 || wrong != 0 {
        failures.push(format!("{stores} stores of the handler's ({sent} signals sent): {wrong} words wrong"));
    }
    let mid_call = RAN_MID_CALL.load(Ordering::SeqCst);
    if mid_call != 0 {
        failures.push(format!("the handler ran {mid_call} times while pages of the region were protected or isolated"));
    }
    let placement = region.placement().unwrap();
    if placement.get(&(node as i32)).copied() != Some(pages) {
        failures.push(format!("pages not all on node {node}: {placement:?}"));
    }
    if failures.is_empty() {
        say(&format!("{stores} stores of the handler's kept ({sent} signals sent), 16 migrations\n"));
        0
    } else {
        say(&format!("{failures:?}\n"));
        1
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
