//! `fork()` while folios migrate: a child must see every byte of the region as it was at
//! the instant of the fork, never a range in the middle of being replaced. Every folio
//! size, deferred freeing on and off; each child checks the whole region and reports by
//! exit status.

mod common;

use common::node;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{assert_writable, leak, pages_on, watchdog};
use pagemig::workload::{self, pattern_word};
use pagemig::{Engine, Error, MigrateOptions, Mode, Reason, Region};

/// Forks children in a loop while another thread migrates the region again and again;
/// each child checks every word against the pattern and exits 0, or 1 at the first word
/// that differs. Returns (forks, children that saw wrong data, migration calls, whole
/// migrations, folios left busy).
fn storm(folio: usize, deferred: bool, duration: Duration) -> (u64, u64, u64, u64, u64) {
    let size = 16 << 20;
    let region = leak(Region::new(size, folio, Some(node())).unwrap());
    workload::fill(region, 1234);
    let stop = leak_flag();
    let migrations = Box::leak(Box::new(AtomicU64::new(0)));
    let busy = Box::leak(Box::new(AtomicU64::new(0)));
    let partial = Box::leak(Box::new(AtomicU64::new(0)));
    let outcome = watchdog(4 * duration + Duration::from_secs(60), "fork storm", move || {
        std::thread::scope(|s| {
            s.spawn(|| {
                let opts = MigrateOptions::default().deferred_free(deferred);
                while !stop.load(Ordering::Relaxed) {
                    let result = Engine::global().unwrap().migrate_pages(
                        &region.folios(),
                        node(),
                        Reason::Syscall,
                        Mode::Sync,
                        &opts,
                    );
                    match result {
                        Ok(stats) => {
                            assert_eq!(stats.succeeded_folios as usize, size / folio);
                            migrations.fetch_add(1, Ordering::Relaxed);
                        }
                        // A page mapped by a child too (every fork shares them all again)
                        // moves only between two forks; one that never met such a moment
                        // in every pass is left as it was and reported busy, as the
                        // kernel reports a page it cannot isolate. Its bytes are checked
                        // with every other's below.
                        Err(Error::Partial { stats, .. }) => {
                            assert!(stats.failures.iter().all(|f| f.errno == libc::EBUSY), "{stats:?}");
                            busy.fetch_add(stats.failed_folios, Ordering::Relaxed);
                            partial.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            let (mut forks, mut bad) = (0u64, 0u64);
            let started = Instant::now();
            // At least `duration`, and on until three calls have ended (up to four times as
            // long): a call that meets forks all along can take seconds (pre-copied huge
            // pages whose every pass finds them shared again).
            let calls = || migrations.load(Ordering::Relaxed) + partial.load(Ordering::Relaxed);
            while started.elapsed() < duration || (calls() < 3 && started.elapsed() < 4 * duration) {
                // SAFETY: the child only reads memory and computes, then calls `_exit`:
                // nothing that needs another thread of the parent.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0, "fork failed");
                if pid == 0 {
                    // The first and last word of every page: a page caught empty reads as
                    // zeros throughout. (Every word would make each child slower, and the
                    // storm's forks fewer.)
                    let base = region.as_ptr() as *const u64;
                    let per_page = 4096 / 8;
                    let mut code = 0;
                    for page in 0..region.words() / per_page {
                        for i in [page * per_page, page * per_page + per_page - 1] {
                            // SAFETY: the child's copy of the region, which it alone uses.
                            if unsafe { base.add(i).read_volatile() } != pattern_word(1234, i) {
                                code = 1;
                            }
                        }
                    }
                    // SAFETY: ends the child without running the parent's destructors.
                    unsafe { libc::_exit(code) };
                }
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
                forks += 1;
                bad += u64::from(libc::WEXITSTATUS(status) != 0);
            }
            stop.store(true, Ordering::Relaxed);
            (forks, bad, calls(), migrations.load(Ordering::Relaxed), busy.load(Ordering::Relaxed))
        })
    });
    assert!(workload::verify(region, 1234, &Default::default()).ok());
    assert_eq!(pages_on(region, node()), size / 4096);
    assert_writable(region);
    outcome
}

/// Whether the page at `addr` is mapped by this process alone (`/proc/self/pagemap` bit 56).
fn exclusively_mapped(addr: usize) -> bool {
    pagemap(addr) & (1 << 56) != 0
}

/// The `/proc/self/pagemap` entry of the page at `addr`.
fn pagemap(addr: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut entry = [0u8; 8];
    let pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    pagemap.read_exact_at(&mut entry, (addr / 4096 * 8) as u64).expect("a pagemap entry");
    u64::from_le_bytes(entry)
}

fn leak_flag() -> &'static AtomicBool {
    Box::leak(Box::new(AtomicBool::new(false)))
}

#[test]
fn children_forked_during_migration_see_every_byte() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "children_forked_during_migration_see_every_byte");
    for folio in [4096, 64 << 10, 2 << 20] {
        for deferred in [true, false] {
            let (forks, bad, migrations, whole, busy) = storm(folio, deferred, Duration::from_secs(3));
            println!(
                "folio {folio}, deferred {deferred}: {forks} forks, {migrations} migrations ({whole} whole), {busy} \
                 folios left busy, {bad} bad children"
            );
            assert!(forks > 10 && migrations > 2, "too little overlap: {forks} forks, {migrations} migrations");
            assert_eq!(bad, 0, "{bad} of {forks} children saw wrong data (folio {folio}, deferred {deferred})");
        }
    }
}

/// Pages shared with a child (a `fork` the child outlives the call with) are made this
/// process's own before they move, with a write fault on each present one; a page the
/// program purges meanwhile (its purge completes once the event reader has read it, before
/// the reader records it) must not hold the call: it comes back as zeros, the call ends,
/// and every other page moved with its bytes. A page the program maps afresh meanwhile is
/// left alone.
#[test]
fn a_page_purged_while_shared_pages_are_made_ours_does_not_hold_the_call() {
    // A process of its own: a fork of another test would share the pages too.
    const NAME: &str = "a_page_purged_while_shared_pages_are_made_ours_does_not_hold_the_call";
    common::fresh_process_test(NAME, "PAGEMIG_TEST_PURGED_UNSHARING", Duration::from_secs(120), || {
        const PAGES: usize = 64;
        const PURGED: usize = 5;
        /// A page the program maps afresh over its old one meanwhile.
        const REPLACED: usize = 9;
        let region = leak(Region::new(PAGES * 4096, 4096, Some(node())).unwrap());
        workload::fill(region, 4321);
        assert!(!common::vm_flags(region.addr()).contains(&"uw".to_string()), "registered before the call");
        // SAFETY: the child only sleeps and calls `_exit`; it keeps the region's pages shared.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            // SAFETY: ends the child.
            unsafe {
                libc::sleep(30);
                libc::_exit(0);
            }
        }
        // Ends and reaps the child however the test ends (a watchdog's panic included).
        struct Reap(libc::pid_t);
        impl Drop for Reap {
            fn drop(&mut self) {
                // SAFETY: ends and reaps the child forked above.
                unsafe {
                    libc::kill(self.0, libc::SIGKILL);
                    libc::waitpid(self.0, std::ptr::null_mut(), 0);
                }
            }
        }
        let _reap = Reap(child);
        let handshake = pagemig::Handshake::new();
        let theirs = handshake.clone();
        let outcome = watchdog(Duration::from_secs(60), "a page purged while shared pages are made ours", move || {
            // The call protects the region, meets the child's shares, takes the protection
            // off and lets the lock go, then waits here: the purge, the read of the purged
            // page and the fresh mapping all come while it waits. Without the event
            // reader's answer the read would wait for the call, and the call for this
            // thread: the watchdog's hang.
            let purger = std::thread::spawn(move || {
                theirs.wait();
                // Still shared with the child: the call is where it makes the pages its own.
                let shared = !exclusively_mapped(region.addr() + (PURGED + 1) * 4096);
                let page = region.addr() + PURGED * 4096;
                // SAFETY: a page of our own region, purged as a program would.
                assert_eq!(unsafe { libc::madvise(page as *mut _, 4096, libc::MADV_DONTNEED) }, 0);
                let word = region.word(PURGED * 512 + 7).load(Ordering::SeqCst);
                let page = region.addr() + REPLACED * 4096;
                // SAFETY: a fresh private page mapped over a page of our own region, as a
                // program reusing its address space would.
                let mapped = unsafe {
                    libc::mmap(
                        page as *mut _,
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                assert_eq!(mapped as usize, page);
                theirs.wait();
                (word, shared)
            });
            let opts = MigrateOptions::default()
                .fault(pagemig::FaultInjection { unshare_handshake: Some(handshake), ..Default::default() });
            let result =
                Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts);
            (result, purger.join().unwrap())
        });
        let (outcome, (read, shared)) = outcome;
        assert!(shared, "the pages were not shared with the child where the call met the test");
        // The purged page reads zeros, as a purged page does.
        assert_eq!(read, 0, "the purged page read its old contents");
        // The page mapped afresh is not the program's old memory: nothing touched it.
        let replaced = pagemig::numa::page_frames(region.addr() + REPLACED * 4096, 4096).unwrap();
        assert!(replaced[0].is_none(), "the call populated a mapping made meanwhile");
        let stats = match outcome {
            Ok(stats) => stats,
            Err(Error::Partial { stats, .. }) => *stats,
            Err(e) => panic!("the call failed: {e}"),
        };
        // The purged page failed as not present, the page mapped afresh as not present or
        // unmapped, and every other page moved.
        let (purged, replaced) = (region.addr() + PURGED * 4096, region.addr() + REPLACED * 4096);
        assert!(stats.failures.iter().any(|f| f.addr == purged && f.errno == libc::ENOENT), "{:?}", stats.failures);
        assert!(stats.failures.iter().any(|f| f.addr == replaced), "{:?}", stats.failures);
        assert!(
            stats
                .failures
                .iter()
                .all(|f| [purged, replaced].contains(&f.addr) && [libc::ENOENT, libc::EFAULT].contains(&f.errno)),
            "{:?}",
            stats.failures
        );
        assert_eq!(stats.succeeded_folios as usize, PAGES - 2, "{stats:?}");
        for i in 0..region.words() {
            let want = if [PURGED, REPLACED].contains(&(i / 512)) { 0 } else { pattern_word(4321, i) };
            assert_eq!(region.word(i).load(Ordering::Relaxed), want, "word {i}");
        }
        assert_writable(region);
    });
}
