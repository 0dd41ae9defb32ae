//! The address ranges pagemig maps for itself: destination pool chunks, graveyards, the
//! copy kernels' measuring buffers, and the stacks of the threads it starts (their TLS
//! included: glibc keeps a thread's TLS block at the top of its stack mapping).
//!
//! They are private anonymous read-write memory like the program's, and nothing in
//! `/proc/self/maps` tells them apart, so whoever walks the process's mappings to migrate
//! "all of the program's memory" (the [`crate::agent`]) asks here which ranges to leave
//! alone. A range is claimed right after the `mmap` that made it and disclaimed by every
//! `munmap` pagemig makes ([`crate::sys::munmap`]), so the set holds exactly the ranges
//! still mapped for pagemig: a destination whose pages went into the program's memory is
//! unmapped, and so disclaimed, before its address can be reused.
//!
//! The set belongs to the process that claimed it: a child forked meanwhile does not have
//! the parent's pool and graveyards (they are `MADV_DONTFORK`), so it starts empty there.

use crate::lock::Mutex;

use crate::process::{MadeIn, PerProcess};

/// The claimed ranges of this process, sorted and disjoint.
struct Set {
    ranges: Mutex<Vec<(usize, usize)>>,
}

/// This process's set. A child forked while a thread of its parent held the set's lock
/// would find it held for ever, so a child makes a set of its own rather than share the
/// parent's ([`PerProcess`]).
static SET: PerProcess<Set> = PerProcess::new();

fn set() -> &'static Set {
    SET.get_or_init(|_| Set { ranges: Mutex::new(Vec::new()) })
}

/// Runs `f` on this process's set.
fn with<R>(f: impl FnOnce(&mut Vec<(usize, usize)>) -> R) -> R {
    f(&mut set().ranges.lock())
}

/// Records `[addr, addr + len)` as mapped by pagemig for itself.
pub fn claim(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    with(|ranges| {
        remove(ranges, addr, addr + len);
        let at = ranges.partition_point(|&(s, _)| s < addr);
        ranges.insert(at, (addr, addr + len));
    });
}

/// Forgets whatever part of `[addr, addr + len)` was claimed (the range was unmapped).
pub fn disclaim(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    with(|ranges| remove(ranges, addr, addr.saturating_add(len)));
}

/// The claimed ranges as `(start, end)`, sorted.
pub fn ranges() -> Vec<(usize, usize)> {
    with(|ranges| ranges.clone())
}

/// Whether any part of `[start, end)` is claimed in `claimed` (sorted and disjoint, as
/// [`ranges`] returns them).
pub fn overlaps(claimed: &[(usize, usize)], start: usize, end: usize) -> bool {
    let at = claimed.partition_point(|&(_, e)| e <= start);
    claimed.get(at).is_some_and(|&(s, _)| s < end)
}

/// The claim on the stack of a thread pagemig started, for as long as the thread runs:
/// made by [`ThreadStack::claim`] first thing on the thread, given up when the thread's
/// work ends (glibc may hand a cached stack to a thread of the program's afterwards).
///
/// While a pagemig thread runs, the program may name its stack in a `move_pages` of its
/// own memory (a program that moves every mapping it finds in `/proc/self/maps`): moved
/// in-process, the thread would fault on its own stack, protected by the very migration it
/// serves, and wait for ever. Claimed, those pages go to the kernel, which moves them
/// safely.
#[derive(Debug)]
pub struct ThreadStack {
    range: Option<(usize, usize)>,
    made: MadeIn,
}

impl ThreadStack {
    /// Claims the calling thread's stack mapping.
    pub fn claim() -> Self {
        let range = crate::sys::current_thread_stack();
        if let Some((start, end)) = range {
            claim(start, end - start);
        }
        Self { range, made: MadeIn::this_process() }
    }
}

impl Drop for ThreadStack {
    fn drop(&mut self) {
        // A forked child's set never held the parent's claim.
        if let Some((start, end)) = self.range.filter(|_| self.made.is_here()) {
            disclaim(start, end - start);
        }
    }
}

/// Cuts `[start, end)` out of the sorted, disjoint `ranges`.
fn remove(ranges: &mut Vec<(usize, usize)>, start: usize, end: usize) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(s, e) in ranges.iter() {
        if e <= start || s >= end {
            out.push((s, e));
            continue;
        }
        if s < start {
            out.push((s, start));
        }
        if e > end {
            out.push((end, e));
        }
    }
    *ranges = out;
}

/// The parts of `[start, end)` not claimed, and the bytes that were.
pub fn unclaimed(start: usize, end: usize, claimed: &[(usize, usize)]) -> (Vec<(usize, usize)>, usize) {
    let mut pieces = vec![(start, end)];
    let mut skipped = 0;
    for &(s, e) in claimed.iter().filter(|&&(s, e)| e > start && s < end) {
        skipped += e.min(end) - s.max(start);
        remove(&mut pieces, s, e);
    }
    (pieces, skipped)
}

#[cfg(test)]
mod tests {
    use crate::testing::watchdog;
    use super::*;

    #[test]
    fn overlaps_finds_any_claimed_byte() {
        watchdog(60, || {
        let r = [(0x2000, 0x3000), (0x5000, 0x8000)];
        assert!(!overlaps(&r, 0x1000, 0x2000));
        assert!(overlaps(&r, 0x1000, 0x2001));
        assert!(!overlaps(&r, 0x3000, 0x5000));
        assert!(overlaps(&r, 0x7fff, 0x9000));
        assert!(!overlaps(&r, 0x8000, 0x9000));
        assert!(!overlaps(&[], 0, usize::MAX));
        });
    }

    #[test]
    fn a_thread_stack_is_claimed_while_the_thread_runs() {
        watchdog(60, || {
        let (inside, after) = std::thread::spawn(|| {
            let probe = 0u64;
            let at = &probe as *const u64 as usize;
            let claim = ThreadStack::claim();
            let inside = overlaps(&ranges(), at, at + 8);
            drop(claim);
            (inside, overlaps(&ranges(), at, at + 8))
        })
        .join()
        .unwrap();
        assert!(inside, "the running thread's stack is pagemig's");
        assert!(!after, "given up when its work ends");
        });
    }

    #[test]
    fn claims_split_and_merge_as_ranges_are_unmapped() {
        watchdog(60, || {
        let mut r = vec![(0x1000, 0x9000)];
        remove(&mut r, 0x3000, 0x4000);
        assert_eq!(r, vec![(0x1000, 0x3000), (0x4000, 0x9000)]);
        remove(&mut r, 0, 0x2000);
        assert_eq!(r, vec![(0x2000, 0x3000), (0x4000, 0x9000)]);
        remove(&mut r, 0x8000, 0x10000);
        assert_eq!(r, vec![(0x2000, 0x3000), (0x4000, 0x8000)]);
        let (pieces, skipped) = unclaimed(0x1000, 0x9000, &r);
        assert_eq!(pieces, vec![(0x1000, 0x2000), (0x3000, 0x4000), (0x8000, 0x9000)]);
        assert_eq!(skipped, 0x1000 + 0x4000);
        });
    }

    #[test]
    fn the_pool_and_graveyards_are_claimed_while_mapped() {
        watchdog(60, || {
        let pool = crate::pool::Pool::populated_only();
        let node = crate::numa::memory_nodes().unwrap()[0];
        let key = crate::pool::Key { node, thp: crate::pool::ThpAdvice::Default, empty: false };
        let (dest, _) = pool.take(key, 1 << 20, 4096, 0, crate::pool::Populate::Madvise).unwrap();
        let (a, len) = (dest.addr(), dest.len());
        let inside = |a: usize, e: usize| ranges().iter().any(|&(s, end)| s <= a && e <= end);
        assert!(inside(a, a + len), "a destination handed out is pagemig's until released");
        pool.release(dest);
        assert!(!ranges().iter().any(|&(s, e)| s < a + len && a < e), "an unmapped destination is not claimed");
        pool.clear();
        // A buffer of the program's own is never claimed.
        let region = crate::Region::new(1 << 20, 4096, None).unwrap();
        let base = region.folios()[0].addr();
        assert!(!ranges().iter().any(|&(s, e)| s < base + (1 << 20) && base < e));
        });
    }
}
