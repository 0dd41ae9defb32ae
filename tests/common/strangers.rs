//! Strangers: what another thread or process does to every mapping of the process, pagemig's
//! own among them, while it migrates — a profiler, crash reporter or conservative collector
//! reading them with `process_vm_readv`, io_uring pinning them as fixed buffers.

use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pagemig::sys::PAGE_SIZE;

/// The mappings of the process now, by start and end: what a stranger leaves alone.
pub fn known_mappings() -> HashSet<(usize, usize)> {
    pagemig::maps::vmas().unwrap().into_iter().map(|v| (v.start, v.end)).collect()
}

/// Whether `v` is a mapping a stranger goes for: not there when the test began (`known`),
/// at most `max` bytes, with permissions starting `perms`, and outside `skip`.
pub fn fresh(
    v: &pagemig::maps::Vma,
    known: &HashSet<(usize, usize)>,
    skip: (usize, usize),
    max: usize,
    perms: &str,
) -> bool {
    !known.contains(&(v.start, v.end))
        && v.end - v.start <= max
        && v.perms.starts_with(perms)
        && (v.end <= skip.0 || skip.1 <= v.start)
}

/// Reads every page of `[start, end)` with `process_vm_readv`, one page per call (a page
/// that cannot be read fails alone); returns the pages read.
pub fn read_pages(start: usize, end: usize, buf: &mut [u8]) -> u64 {
    let mut read = 0;
    for page in (start..end).step_by(PAGE_SIZE) {
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: PAGE_SIZE };
        let remote = libc::iovec { iov_base: page as *mut libc::c_void, iov_len: PAGE_SIZE };
        // SAFETY: reads one page of this process into `buf`, or fails (EFAULT): the kernel
        // checks the remote address, and the local buffer is ours.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        read += u64::from(n == PAGE_SIZE as isize);
    }
    read
}

/// Until `stop`, reads every readable mapping of the process that was not there when it
/// began (`known`), except `skip` (the region under test: a read there waits for its
/// move): pagemig's graveyards, destinations and holdings among them. Returns the pages
/// read.
pub fn scan(known: &HashSet<(usize, usize)>, skip: (usize, usize), stop: &AtomicBool) -> u64 {
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut read = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(vmas) = pagemig::maps::vmas() else { continue };
        for v in vmas {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if fresh(&v, known, skip, 256 << 20, "r") {
                read += read_pages(v.start, v.end, &mut buf);
            }
        }
    }
    read
}

/// Sets its flag when dropped.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Pins `[addr, addr + len)` as io_uring's fixed buffers do (`FOLL_LONGTERM`) until
/// dropped; `None` where the kernel refuses (no io_uring, a mapping that cannot be pinned).
pub fn pin(addr: usize, len: usize) -> Option<OwnedFd> {
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) with a zeroed struct io_uring_params (120 bytes) it fills.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor io_uring_setup just returned, owned here alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let iov = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: IORING_REGISTER_BUFFERS (0) of one iovec: the kernel pins the pages (faulting
    // them in) or fails; it never writes them.
    let r =
        unsafe { libc::syscall(libc::SYS_io_uring_register, std::os::fd::AsRawFd::as_raw_fd(&fd), 0u32, &iov, 1u32) };
    (r == 0).then_some(fd)
}

/// Whether io_uring can pin pages here ([`pin`] of a page of a fresh region, kept mapped:
/// a pin's release may come after the region would be unmapped).
#[allow(dead_code, reason = "used by some test binaries only")]
pub fn can_pin() -> bool {
    let region = Box::leak(Box::new(pagemig::Region::new(2 << 20, PAGE_SIZE, None).unwrap()));
    pin(region.addr(), PAGE_SIZE).is_some()
}

/// Until `stop`, pins each fresh private mapping of the process (not in `known`, not
/// `skip`) for `hold` as soon as it appears: pagemig's graveyards, destinations and
/// holdings. Of a fresh mapping too large to pin whole (pagemig's destination pool), the
/// parts that have pages (destinations filled for a move) are pinned as they appear.
/// Returns how many ranges it pinned.
pub fn pin_fresh(known: &HashSet<(usize, usize)>, skip: (usize, usize), hold: Duration, stop: &AtomicBool) -> u64 {
    const WHOLE: usize = 64 << 20;
    let mut pins: Vec<(Instant, OwnedFd)> = Vec::new();
    let mut seen: HashSet<(usize, usize)> = HashSet::new();
    let mut pinned = 0;
    while !stop.load(Ordering::Relaxed) {
        pins.retain(|(at, _)| at.elapsed() < hold);
        for v in pagemig::maps::vmas().unwrap_or_default() {
            if !fresh(&v, known, skip, usize::MAX, "rw") {
                continue;
            }
            let ranges: Vec<std::ops::Range<usize>> = if v.end - v.start <= WHOLE {
                std::iter::once(v.start..v.end).collect()
            } else {
                pagemig::numa::present_ranges(v.start, v.end - v.start).unwrap_or_default()
            };
            for r in ranges {
                if seen.insert((r.start, r.end))
                    && let Some(fd) = pin(r.start, r.end - r.start)
                {
                    pins.push((Instant::now(), fd));
                    pinned += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    pinned
}
