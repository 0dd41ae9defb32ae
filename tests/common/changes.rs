//! What a program does to its memory while it is migrated — `munmap`, `munmap` then a
//! new `mmap` at the same address, `mremap`, `mprotect(PROT_READ)`, `MADV_DONTNEED`,
//! `MADV_FREE` — and the checks that whatever it did stands. Shared by the host's
//! `mapping_changes` tests (the folio API) and the two-node guest's (`move_range`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pagemig::sys::PAGE_SIZE;
use pagemig::workload::pattern_word;

use super::watchdog;

/// The reservation `mremap` moves into: the largest changed range and 2 MiB of alignment.
pub const SPARE: usize = 6 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    Munmap,
    MunmapThenMmap,
    Mremap,
    MprotectReadOnly,
    DontNeed,
    Free,
}

pub const ALL: [Change; 6] =
    [Change::Munmap, Change::MunmapThenMmap, Change::Mremap, Change::MprotectReadOnly, Change::DontNeed, Change::Free];

/// A raw private anonymous mapping of `len` bytes aligned to 2 MiB (huge pages advised for
/// 2 MiB folios, refused otherwise), every word filled with `pattern_word(seed, i)`.
pub fn mapping(len: usize, folio: usize, seed: u64) -> usize {
    // SAFETY: a fresh anonymous mapping; the test owns it.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + (2 << 20),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    assert_ne!(raw, libc::MAP_FAILED as usize);
    // At least a page above `raw`: a hole lies right below `base`, so that the mapping is
    // never taken for a thread stack (a mapping right above an inaccessible one, which
    // pagemig leaves to the kernel) whatever the test binary mapped before.
    let base = (raw + 1).next_multiple_of(2 << 20);
    // Exactly `[base, base + len)` stays mapped: callers unmap that, and nothing around it
    // is theirs to unmap.
    // SAFETY: the head and tail of our own fresh mapping, outside what we hand out.
    unsafe {
        if base > raw {
            libc::munmap(raw as *mut _, base - raw);
        }
        let end = raw + len + (2 << 20);
        if end > base + len {
            libc::munmap((base + len) as *mut _, end - (base + len));
        }
    }
    let advice = if folio == 2 << 20 { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(base as *mut _, len, advice) };
    for i in 0..len / 8 {
        // SAFETY: inside our mapping.
        unsafe { ((base + i * 8) as *mut u64).write(pattern_word(seed, i)) };
    }
    base
}

/// A `PROT_NONE` reservation for `mremap` to move into; returns it and its first 2 MiB
/// boundary.
pub fn spare() -> (usize, usize) {
    // SAFETY: a fresh reservation.
    let reserved = unsafe {
        libc::mmap(std::ptr::null_mut(), SPARE, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    } as usize;
    assert_ne!(reserved, libc::MAP_FAILED as usize);
    (reserved, (reserved + (2 << 20) - 1) & !((2 << 20) - 1))
}

/// Unmaps the reservation at `reserved` ([`spare`]) but `[hole, hole + len)`, where memory
/// moved into it was moved away again: another thread's mapping (a buffer malloc mapped, a
/// thread's stack) may lie in that hole now.
pub fn release_reservation_around(reserved: usize, hole: usize, len: usize) {
    // SAFETY: the reservation's parts on either side of the hole are the test's own, and
    // nothing uses them any more.
    unsafe {
        libc::munmap(reserved as *mut _, hole - reserved);
        libc::munmap((hole + len) as *mut _, reserved + SPARE - (hole + len));
    }
}

pub fn word(addr: usize) -> u64 {
    // SAFETY: callers read only addresses of the test's own live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

/// Whether the range unmapped at `at` (its first word the pattern's word `first`) reads as
/// the region's data again. Tests run side by side, so another one's mapping may have
/// taken the freed addresses since: reading through `process_vm_readv` tells an unreadable
/// address (`EFAULT`) from a readable one without faulting.
pub fn holds_old_data(at: usize, seed: u64, first: usize) -> bool {
    (0..2).all(|i| {
        let mut got = 0u64;
        let local = libc::iovec { iov_base: (&mut got as *mut u64).cast(), iov_len: 8 };
        let remote = libc::iovec { iov_base: (at + i * 8) as *mut libc::c_void, iov_len: 8 };
        // SAFETY: reads 8 bytes of this process into a local, or fails with EFAULT.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n == 8 && got == pattern_word(seed, first + i)
    })
}

/// Whether the range unmapped at `at` still reads as the region's data after 5 s
/// ([`holds_old_data`] every 10 ms until it does not). For a while after the program moved
/// or unmapped memory whose old pages a migration held, pagemig's own memory may lie at
/// the freed addresses with a copy of them: the event reader's holding on the pages' way
/// home, a graveyard the reaper has not freed yet (a mapping pagemig makes may land
/// anywhere the program left free). That is gone once the reader and the reaper are done;
/// the program's range coming back would stay.
pub fn holds_old_data_for_good(at: usize, seed: u64, first: usize) -> bool {
    let start = std::time::Instant::now();
    let mapping = pagemig::maps::vmas().unwrap_or_default().into_iter().find(|v| v.start <= at && at < v.end);
    let mut seen = false;
    while holds_old_data(at, seed, first) {
        if start.elapsed() > std::time::Duration::from_secs(5) {
            return true;
        }
        seen = true;
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if seen {
        eprintln!("{at:#x}: the old data read there for {:?} (a mapping {mapping:?}), then no more", start.elapsed());
    }
    false
}

/// Whether `addr` is mapped, and its permissions (`/proc/self/maps`).
pub fn perms(addr: usize) -> Option<String> {
    pagemig::maps::vmas().unwrap().into_iter().find(|v| v.start <= addr && addr < v.end).map(|v| v.perms)
}

/// Applies `change` to `[at, at + len)`; returns where the data went for `mremap`.
pub fn apply(change: Change, at: usize, len: usize, spare: usize) -> usize {
    // SAFETY: the range lies in the test's mapping; each change is what an allocator does.
    unsafe {
        match change {
            Change::Munmap => assert_eq!(libc::munmap(at as *mut _, len), 0),
            Change::MunmapThenMmap => {
                // The old mapping unmapped and a new one mapped in its place in one call
                // (`MAP_FIXED` unmaps what is there first, as `munmap` does, userfaultfd's
                // unmap event included): with a `munmap` and a second `mmap`, another thread
                // of the test binary could map into the hole in between.
                let p = libc::mmap(
                    at as *mut _,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
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

/// The mapping at `base` (`total` bytes of `pattern_word(seed, ·)`) after `change` was
/// applied to `[at, at + len)` during a migration, its data moved to `moved_to` by an
/// `mremap`: every byte outside the changed range is as it was, the changed range is as the
/// program left it, and every page that should take a write takes one (nothing is left
/// registered or protected with nobody to lift it).
#[allow(clippy::too_many_arguments, reason = "the whole description of one case")]
pub fn check(what: &str, change: Change, base: usize, total: usize, seed: u64, at: usize, len: usize, moved_to: usize) {
    for i in 0..total / 8 {
        let a = base + i * 8;
        if (at..at + len).contains(&a) {
            continue;
        }
        assert_eq!(word(a), pattern_word(seed, i), "{what}: word at {a:#x} changed");
    }
    let first = (at - base) / 8;
    match change {
        Change::Munmap => assert!(!holds_old_data_for_good(at, seed, first), "{what}: the unmapped range came back"),
        Change::MunmapThenMmap => {
            for i in 0..len / 8 {
                assert_eq!(word(at + i * 8), 0x5eed_0000_0000_0000 | i as u64, "{what}: new mapping overwritten");
            }
        }
        Change::Mremap => {
            assert!(!holds_old_data_for_good(at, seed, first), "{what}: the moved range came back at its old address");
            for i in 0..len / 8 {
                assert_eq!(word(moved_to + i * 8), pattern_word(seed, first + i), "{what}: moved data lost");
            }
        }
        Change::MprotectReadOnly => {
            assert_eq!(perms(at).as_deref(), Some("r--p"), "{what}: protection undone");
            for i in 0..len / 8 {
                assert_eq!(word(at + i * 8), pattern_word(seed, first + i), "{what}: data changed");
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
                let old = (0..PAGE_SIZE / 8).all(|i| w(i) == pattern_word(seed, first + p * PAGE_SIZE / 8 + i));
                let zero = (0..PAGE_SIZE / 8).all(|i| w(i) == 0);
                assert!(old || zero, "{what}: page {p} is neither its old data nor zeros");
            }
        }
    }
    let writable: Vec<usize> = (0..total / PAGE_SIZE)
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
}

/// Unmaps what is still the test's: the mapping at `base` (not the changed range where it
/// was unmapped or moved away: another test's mapping may lie there now) and the `mremap`
/// reservation with what moved into it.
pub fn release(change: Change, base: usize, total: usize, at: usize, len: usize, reserved: usize) {
    // SAFETY: the test's own mappings, no longer used.
    unsafe {
        if matches!(change, Change::Munmap | Change::Mremap) {
            libc::munmap(base as *mut _, at - base);
            libc::munmap((at + len) as *mut _, base + total - (at + len));
        } else {
            libc::munmap(base as *mut _, total);
        }
        libc::munmap(reserved as *mut _, SPARE);
    }
}
