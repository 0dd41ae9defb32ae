//! The program changes memory while it migrates — `munmap`, `munmap` then a new `mmap` at
//! the same address, `mremap`, `mprotect(PROT_READ)`, `MADV_DONTNEED`, `MADV_FREE`, what
//! allocators do when they free or purge — at random moments: before a folio is copied,
//! between its copy and its move, after its move (pauses injected before every move widen
//! the middle window). Whatever the program did stands: an unmapped range stays unmapped, a
//! new mapping keeps its own data, moved memory keeps its data at its new address, a
//! read-only range stays read-only, a purged page reads as purged. Every other byte is as
//! it was, and nothing crashes. Each case runs under a watchdog.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::watchdog;
use pagemig::folio::Folio;
use pagemig::sys::{Errno, PAGE_SIZE};
use pagemig::workload::pattern_word;
use pagemig::{Engine, Error, FaultInjection, MigrateOptions, Mode, Reason, numa};

fn node() -> u32 {
    numa::memory_nodes().unwrap()[0]
}

const LEN: usize = 8 << 20;
const SEED: u64 = 99;
/// The reservation `mremap` moves into: the largest changed range and 2 MiB of alignment.
const SPARE: usize = 6 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Change {
    Munmap,
    MunmapThenMmap,
    Mremap,
    MprotectReadOnly,
    DontNeed,
    Free,
}

/// A raw private anonymous mapping of `LEN` bytes aligned to 2 MiB, filled with the pattern.
fn mapping(folio: usize) -> usize {
    // SAFETY: a fresh anonymous mapping; the test owns it.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN + (2 << 20),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    assert_ne!(raw, libc::MAP_FAILED as usize);
    let base = (raw + (2 << 20) - 1) & !((2 << 20) - 1);
    let advice = if folio == 2 << 20 { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(base as *mut _, LEN, advice) };
    for i in 0..LEN / 8 {
        // SAFETY: inside our mapping.
        unsafe { ((base + i * 8) as *mut u64).write(pattern_word(SEED, i)) };
    }
    base
}

fn word(addr: usize) -> u64 {
    // SAFETY: callers read only addresses of the test's own live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

/// Whether the range unmapped at `at` (its first word the pattern's word `first`) reads as
/// the region's data again. Tests run side by side, so another one's mapping may have
/// taken the freed addresses since: reading through `process_vm_readv` tells an unreadable
/// address (`EFAULT`) from a readable one without faulting.
fn holds_old_data(at: usize, first: usize) -> bool {
    (0..2).all(|i| {
        let mut got = 0u64;
        let local = libc::iovec { iov_base: (&mut got as *mut u64).cast(), iov_len: 8 };
        let remote = libc::iovec { iov_base: (at + i * 8) as *mut libc::c_void, iov_len: 8 };
        // SAFETY: reads 8 bytes of this process into a local, or fails with EFAULT.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n == 8 && got == pattern_word(SEED, first + i)
    })
}

/// Whether `addr` is mapped, and its permissions (`/proc/self/maps`).
fn perms(addr: usize) -> Option<String> {
    pagemig::maps::vmas().unwrap().into_iter().find(|v| v.start <= addr && addr < v.end).map(|v| v.perms)
}

/// Applies `change` to `[at, at + len)`; returns where the data went for `mremap`.
fn apply(change: Change, at: usize, len: usize, spare: usize) -> usize {
    // SAFETY: the range lies in the test's mapping; each change is what an allocator does.
    unsafe {
        match change {
            Change::Munmap => assert_eq!(libc::munmap(at as *mut _, len), 0),
            Change::MunmapThenMmap => {
                assert_eq!(libc::munmap(at as *mut _, len), 0);
                let p = libc::mmap(
                    at as *mut _,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                );
                assert_eq!(p as usize, at, "remapping the freed range");
                for i in 0..len / 8 {
                    ((at + i * 8) as *mut u64).write(0x5eed_0000_0000_0000 | i as u64);
                }
            }
            Change::Mremap => {
                let p = libc::mremap(
                    at as *mut _,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    spare as *mut libc::c_void,
                );
                assert_eq!(p as usize, spare, "mremap: {}", std::io::Error::last_os_error());
                return spare;
            }
            Change::MprotectReadOnly => assert_eq!(libc::mprotect(at as *mut _, len, libc::PROT_READ), 0),
            Change::DontNeed => assert_eq!(libc::madvise(at as *mut _, len, libc::MADV_DONTNEED), 0),
            Change::Free => assert_eq!(libc::madvise(at as *mut _, len, libc::MADV_FREE), 0),
        }
    }
    at
}

/// Migrates the mapping while another thread applies `change` to two folios after
/// `delay`, then checks every byte.
fn case(change: Change, folio: usize, delay: Duration, round: u64) {
    // Somewhere in the middle, varying with the round; moves held back 2 ms each.
    let offset = LEN / 2 + (round as usize % 8) * (256 << 10);
    case_at(change, folio, delay, offset, Duration::from_millis(2));
}

/// [`case`] for the two folios at `offset` (rounded down to a folio), every move held back
/// by `hold`.
fn case_at(change: Change, folio: usize, delay: Duration, offset: usize, hold: Duration) {
    let base = mapping(folio);
    // A free spot for `mremap` to move to (up to 4 MiB, 2 MiB aligned), reserved whole so
    // that the `MREMAP_FIXED` replaces nothing but the reservation.
    // SAFETY: a fresh reservation.
    let reserved = unsafe {
        libc::mmap(std::ptr::null_mut(), SPARE, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    } as usize;
    assert_ne!(reserved, libc::MAP_FAILED as usize);
    let spare = (reserved + (2 << 20) - 1) & !((2 << 20) - 1);
    let len = 2 * folio.max(64 << 10);
    let at = base + (offset & !(folio.max(64 << 10) - 1));
    let folios: Vec<Folio<'static>> = (0..LEN / folio)
        // SAFETY: the test keeps the mapping as it is except for the change under test,
        // which pagemig must survive.
        .map(|i| unsafe { Folio::new(base + i * folio, folio) }.unwrap())
        .collect();
    let moved_to: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let what = format!("{change:?}, folio {folio}, delay {delay:?}");
    let result = watchdog(Duration::from_secs(120), &what.clone(), move || {
        let opts = MigrateOptions::default()
            .fault(FaultInjection { delay_move: Some(hold), ..Default::default() })
            .max_batch_pages(256);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(delay);
                moved_to.store(apply(change, at, len, spare) as u64, Ordering::SeqCst);
            });
            Engine::global().unwrap().migrate_pages(&folios, node(), Reason::Syscall, Mode::Sync, &opts)
        })
    });
    let moved_to = moved_to.load(Ordering::SeqCst) as usize;
    // Whatever failed, failed for the change, with the error move_pages would give.
    match &result {
        Ok(_) => {}
        // Changed before the call began: refused up front, nothing touched.
        Err(Error::NotMovable { .. }) => {}
        Err(Error::Partial { first, stats, .. }) => {
            let errno = first.errno();
            assert!(
                [Errno::FAULT, Errno::NOENT, Errno::ACCESS].contains(&errno),
                "{what}: unexpected failure {first} ({stats:?})"
            );
            assert!(stats.failed_folios as usize <= len / folio + 2, "{what}: {first} {stats:?}");
            // Each failed folio is named, and lies at the change.
            assert_eq!(stats.failures.len() as u64, stats.failed_folios, "{what}");
            for f in &stats.failures {
                assert!(
                    at.saturating_sub(folio) <= f.addr && f.addr < at + len + folio,
                    "{what}: {f:?} ({at:#x}+{len:#x})"
                );
            }
        }
        Err(e) => panic!("{what}: {e}"),
    }
    // Every byte outside the changed range is as it was.
    for i in 0..LEN / 8 {
        let a = base + i * 8;
        if (at..at + len).contains(&a) {
            continue;
        }
        assert_eq!(word(a), pattern_word(SEED, i), "{what}: word at {a:#x} changed");
    }
    // The changed range is as the program left it.
    let first = (at - base) / 8;
    match change {
        Change::Munmap => assert!(!holds_old_data(at, first), "{what}: the unmapped range came back"),
        Change::MunmapThenMmap => {
            for i in 0..len / 8 {
                assert_eq!(word(at + i * 8), 0x5eed_0000_0000_0000 | i as u64, "{what}: new mapping overwritten");
            }
        }
        Change::Mremap => {
            assert!(!holds_old_data(at, first), "{what}: the moved range came back at its old address");
            for i in 0..len / 8 {
                assert_eq!(word(moved_to + i * 8), pattern_word(SEED, first + i), "{what}: moved data lost");
            }
        }
        Change::MprotectReadOnly => {
            assert_eq!(perms(at).as_deref(), Some("r--p"), "{what}: protection undone");
            for i in 0..len / 8 {
                assert_eq!(word(at + i * 8), pattern_word(SEED, first + i), "{what}: data changed");
            }
        }
        Change::DontNeed => {
            for i in 0..len / 8 {
                assert_eq!(word(at + i * 8), 0, "{what}: purged data came back at word {i}");
            }
        }
        Change::Free => {
            // Lazily freed: each page reads as before or as zeros, nothing else.
            for p in 0..len / PAGE_SIZE {
                let w = |i: usize| word(at + p * PAGE_SIZE + i * 8);
                let old = (0..PAGE_SIZE / 8).all(|i| w(i) == pattern_word(SEED, first + p * PAGE_SIZE / 8 + i));
                let zero = (0..PAGE_SIZE / 8).all(|i| w(i) == 0);
                assert!(old || zero, "{what}: page {p} is neither its old data nor zeros");
            }
        }
    }
    // Nothing is left registered or protected: every writable page takes a write.
    let writable: Vec<usize> = (0..LEN / PAGE_SIZE)
        .map(|p| base + p * PAGE_SIZE)
        .filter(|&a| {
            !(at..at + len).contains(&a) || matches!(change, Change::DontNeed | Change::Free | Change::MunmapThenMmap)
        })
        .collect();
    watchdog(Duration::from_secs(10), "probe writes", move || {
        for a in writable {
            // SAFETY: a writable page of the test's mapping; adding zero keeps its data.
            unsafe { (*(a as *const AtomicU64)).fetch_add(0, Ordering::SeqCst) };
        }
    });
    // SAFETY: the test's own mappings, no longer used.
    unsafe {
        // What is still ours: another test's mapping may lie where this one unmapped.
        if matches!(change, Change::Munmap | Change::Mremap) {
            libc::munmap(base as *mut _, at - base);
            libc::munmap((at + len) as *mut _, base + LEN - (at + len));
        } else {
            libc::munmap(base as *mut _, LEN);
        }
        // The reservation, with what `mremap` moved into it.
        libc::munmap(reserved as *mut _, SPARE);
    }
}

fn all_moments(change: Change) {
    let mut round = 0;
    for folio in [4096, 2 << 20] {
        for delay_us in [0, 300, 1_000, 3_000, 8_000, 20_000] {
            case(change, folio, Duration::from_micros(delay_us), round);
            round += 1;
        }
    }
}

/// Each change made while the first batch's old pages are isolated and its copy waits to
/// move (every move held back 150 ms, the change after 50 ms): the move is refused or
/// skipped, and the old pages go back — into a mapping the program made read-only, too.
#[test]
fn changes_between_copy_and_move() {
    for change in [
        Change::Munmap,
        Change::MunmapThenMmap,
        Change::Mremap,
        Change::MprotectReadOnly,
        Change::DontNeed,
        Change::Free,
    ] {
        for folio in [4096, 2 << 20] {
            case_at(change, folio, Duration::from_millis(50), 0, Duration::from_millis(150));
        }
    }
}

#[test]
fn munmap_during_migration() {
    all_moments(Change::Munmap);
}

#[test]
fn munmap_then_mmap_at_the_same_address_during_migration() {
    all_moments(Change::MunmapThenMmap);
}

#[test]
fn mremap_during_migration() {
    all_moments(Change::Mremap);
}

#[test]
fn mprotect_read_only_during_migration() {
    all_moments(Change::MprotectReadOnly);
}

#[test]
fn madv_dontneed_during_migration() {
    all_moments(Change::DontNeed);
}

#[test]
fn madv_free_during_migration() {
    all_moments(Change::Free);
}
