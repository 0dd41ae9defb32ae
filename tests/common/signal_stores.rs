//! A signal handler of the program's that stores into memory while the thread it runs on
//! migrates that memory, again and again: what `tests/signals.rs` runs on one node and the
//! two-node guest's `numa_guest.rs` across nodes. A handler run in the middle of a call
//! would store into a folio its own thread is protecting or isolating and wait for good;
//! a migration blocks asynchronous signals on its thread for the call, so the handler runs
//! between calls.
#![allow(unsafe_code, reason = "sigaction, pthread_kill, pread of pagemap in a handler")]

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, workload};

/// Writes `text` to standard error with one `write(2)` (no lock a parent thread may hold).
pub fn say(text: &str) {
    // SAFETY: a buffer of ours, `text.len()` bytes.
    let _ = unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

/// Makes `handler` the action of `signal`.
///
/// # Safety
/// `handler` must be async-signal-safe.
pub unsafe fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a sigaction of ours, zeroed then filled; the caller vouches for the handler.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
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

/// A thread of its own sends the calling thread `SIGUSR2` every 100 µs while it migrates
/// `region` (filled with `seed`, 4 KiB folios, 16 MiB or less) 16 times, to each of
/// `nodes` in turn; the handler looks at the region's pages and stores into it. Once per
/// process (the handler and its counts are the process's). `Ok` with what happened when the
/// handler never ran while pages were protected or isolated, every call moved every folio,
/// every store of the handler's is there, every other byte is as filled, every page is on
/// the node of the last call, and the thread's mask was as before after each call; else
/// what failed. (Without the blocking, the call hangs: a store into a folio its own thread
/// isolates.)
pub fn migrate_under_storing_signals(
    engine: &Engine,
    region: &'static Region,
    seed: u64,
    nodes: &[u32],
) -> Result<String, Vec<String>> {
    let signal = libc::SIGUSR2;
    // SAFETY: a handler that stores into atomics only (the region's words among them).
    unsafe { install(signal, storing_handler) };
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
    let rounds = 16;
    for round in 0..rounds {
        let node = nodes[round % nodes.len()];
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
    let last = nodes[(rounds - 1) % nodes.len()];
    let placement = region.placement().unwrap();
    if placement.get(&(last as i32)).copied() != Some(pages) {
        failures.push(format!("pages not all on node {last}: {placement:?}"));
    }
    if failures.is_empty() {
        Ok(format!("{stores} stores of the handler's kept ({sent} signals sent), {rounds} migrations to {nodes:?}"))
    } else {
        Err(failures)
    }
}
