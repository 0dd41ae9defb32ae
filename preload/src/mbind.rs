//! `mbind(addr, len, mode, nodemask, maxnode, flags)` with `MPOL_MF_MOVE`, served by
//! pagemig where the policy names one node.
//!
//! The kernel's `do_mbind()` sets the policy on the range and then migrates the pages of
//! the range that do not conform to it (pages on a node outside the mask; with
//! `MPOL_MF_MOVE`, not the pages another process maps too), and with `MPOL_MF_STRICT`
//! answers `EIO` when some could not be moved. Served here, in three steps:
//!
//! 1. the kernel's `mbind` with the same arguments less `MPOL_MF_MOVE` and
//!    `MPOL_MF_STRICT` ([`Args::set_policy`], on the calling thread before pagemig starts
//!    any thread: a new thread's stack must not fill a hole the program has just made in
//!    the range): it checks every argument as it would have (its errors are the answer,
//!    nothing moved) and sets the policy, moving nothing;
//! 2. pagemig moves the pages of the range's private anonymous mappings that are not on
//!    the policy's node ([`pagemig::movable_ranges`], [`pagemig::Engine::move_range`]),
//!    but for the part of the range in a 2 MiB block it does not cover whole (a huge page
//!    there moves whole, its pages outside the range too);
//! 3. the kernel's `mbind` with the caller's arguments, unchanged, finds the policy
//!    already set and moves what is left (shared and file-backed memory, pages pagemig
//!    could not move), and its answer, `MPOL_MF_STRICT`'s `EIO` included, is the call's.
//!    Step 3 is skipped where it has nothing to do: no `MPOL_MF_STRICT`, every page of the
//!    range in pagemig's mappings, and every present page on the node.
//!
//! Other policies (interleaving, several nodes, `MPOL_F_*` mode flags, the default and
//! local policies), `MPOL_MF_MOVE_ALL` and `mbind` without `MPOL_MF_MOVE` go to the kernel
//! whole.
#![expect(unsafe_code, reason = "the kernel's mbind on the caller's arguments")]

use std::ffi::{c_int, c_long, c_uint, c_ulong, c_void};

use pagemig::ffi::{self, check};
use pagemig::{Errno, MigrateOptions, PAGE_SIZE};

use crate::config;
use crate::summary::{self, Whole};

/// A huge page (PMD-mapped, x86-64).
const HPAGE_SIZE: usize = 2 << 20;
/// `MPOL_MF_STRICT`: `EIO` when pages do not conform to the policy after the call.
const MPOL_MF_STRICT: c_uint = 1;
/// `MPOL_MF_MOVE`.
pub(crate) const MPOL_MF_MOVE: c_uint = ffi::MPOL_MF_MOVE as c_uint;
/// `MPOL_MF_MOVE_ALL`.
pub(crate) const MPOL_MF_MOVE_ALL: c_uint = ffi::MPOL_MF_MOVE_ALL as c_uint;
/// `MPOL_PREFERRED_MANY` (Linux 5.15), missing from the `libc` crate.
const MPOL_PREFERRED_MANY: c_int = 5;
/// The mode flags `MPOL_F_STATIC_NODES`, `MPOL_F_RELATIVE_NODES`, `MPOL_F_NUMA_BALANCING`.
const MPOL_MODE_FLAGS: c_int = libc::MPOL_F_STATIC_NODES | libc::MPOL_F_RELATIVE_NODES | libc::MPOL_F_NUMA_BALANCING;
/// The most bits the kernel reads of a node mask (`get_nodes()`: a page of bits).
const MAX_MASK_BITS: c_ulong = 4096 * 8;

/// The caller's arguments, as `mbind(2)` takes them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Args {
    pub(crate) addr: *mut c_void,
    pub(crate) len: c_ulong,
    pub(crate) mode: c_int,
    pub(crate) nodemask: *const c_ulong,
    pub(crate) maxnode: c_ulong,
    pub(crate) flags: c_uint,
    /// Whether the range's first and last 2 MiB blocks, where it covers only part of them,
    /// were each mapped by one huge page before step 1 split them ([`Args::with_huge_edges`]).
    pub(crate) huge_edges: (bool, bool),
}

impl Args {
    /// The pages the range names, as the kernel rounds it.
    pub(crate) fn pages(&self) -> u64 {
        self.len.div_ceil(PAGE_SIZE as c_ulong)
    }

    /// The kernel's `mbind(2)` with these arguments and `flags`.
    pub(crate) fn kernel(&self, flags: c_uint) -> Result<c_long, Errno> {
        // SAFETY: the caller's arguments as they came; the kernel checks every pointer.
        // Moving pages with their contents is what the caller asked for.
        check(unsafe {
            libc::syscall(libc::SYS_mbind, self.addr, self.len, self.mode, self.nodemask, self.maxnode, flags)
        })
    }

    /// The one node of the policy pagemig serves, or `None` for a policy it does not.
    fn single_node(&self) -> Option<u32> {
        let base = self.mode & !MPOL_MODE_FLAGS;
        if self.mode & MPOL_MODE_FLAGS != 0
            || ![libc::MPOL_BIND, libc::MPOL_PREFERRED, MPOL_PREFERRED_MANY].contains(&base)
        {
            return None;
        }
        // As the kernel's get_nodes(): `maxnode - 1` bits (a mask it would refuse is left
        // to it; so is one that cannot be read).
        let bits = self.maxnode.checked_sub(1).filter(|&b| b > 0 && b <= MAX_MASK_BITS && !self.nodemask.is_null())?;
        let words = ffi::read_user(self.nodemask, bits.div_ceil(c_ulong::BITS as c_ulong) as usize).ok()?;
        let mut nodes = words.iter().enumerate().flat_map(|(w, &word)| {
            (0..c_ulong::BITS)
                .filter(move |b| word >> b & 1 == 1)
                .map(move |b| w as u64 * u64::from(c_ulong::BITS) + u64::from(b))
        });
        let node = nodes.next().filter(|&n| n < bits)?;
        if nodes.any(|n| n < bits) {
            return None;
        }
        u32::try_from(node).ok()
    }
}

impl Args {
    /// Records which of the range's partly covered 2 MiB blocks hold a huge page or a larger
    /// folio across the range's edge: before step 1, whose policy splits them.
    /// Async-signal-safe ([`ffi::huge_page_at`], [`ffi::large_folio_at`]).
    pub(crate) fn with_huge_edges(mut self) -> Self {
        let (addr, len) = (self.addr as usize, self.len as usize);
        let Some(end) = addr.checked_add(len).filter(|_| len > 0) else { return self };
        let (first, last) = (addr & !(HPAGE_SIZE - 1), (end - 1) & !(HPAGE_SIZE - 1));
        let partial_first = addr != first || end < first + HPAGE_SIZE;
        let partial_last = end != last + HPAGE_SIZE;
        // A huge page mapped whole, or (where `/proc/kpageflags` can be read) a larger folio
        // mapped by page entries through the range's first or last page: one that straddles
        // the range's edge holds the page on its inner side.
        let large = |block: usize, page: usize| ffi::huge_page_at(block) || ffi::large_folio_at(page);
        let first_huge = partial_first && large(first, addr & !(PAGE_SIZE - 1));
        let last_huge = if last == first {
            first_huge || (partial_last && ffi::large_folio_at((end - 1) & !(PAGE_SIZE - 1)))
        } else {
            partial_last && large(last, (end - 1) & !(PAGE_SIZE - 1))
        };
        self.huge_edges = (first_huge, last_huge);
        self
    }

    /// Step 1: the kernel's `mbind` less `MPOL_MF_MOVE` and `MPOL_MF_STRICT`: it checks
    /// every argument as it would have and sets the policy, moving nothing. Raw system
    /// call: async-signal-safe.
    ///
    /// # Errors
    /// The kernel's, which are the call's answer.
    pub(crate) fn set_policy(&self) -> Result<c_long, Errno> {
        self.kernel(self.flags & !(MPOL_MF_MOVE | MPOL_MF_STRICT))
    }
}

/// Serves an `mbind(2)` with `MPOL_MF_MOVE` (not `MPOL_MF_MOVE_ALL`) for the calling
/// process once [`Args::set_policy`] has set its policy: steps 2 and 3 of the module's
/// description. A policy pagemig does not serve goes to the kernel whole, which finds it
/// set already and answers as it would have.
pub(crate) fn mbind(args: Args) -> Result<c_long, Errno> {
    let whole = |why| {
        summary::whole(why, args.pages());
        args.kernel(args.flags)
    };
    let Some(node) = args.single_node() else {
        return whole(Whole::PolicyNotSingleNode);
    };
    let Ok(engine) = config::engine() else {
        return whole(Whole::NoUserfaultfd);
    };
    summary::served(summary::Symbol::Mbind);
    if args.len == 0 {
        return Ok(0);
    }
    // 2. pagemig moves its mappings' pages.
    let (addr, len) = (args.addr as usize, args.len as usize);
    let Ok(parts) = pagemig::movable_ranges(addr, len) else {
        summary::whole(Whole::PagemigFailed, args.pages());
        return args.kernel(args.flags);
    };
    // A huge page the range covers only part of: the kernel moves it whole (its pages
    // outside the range too, in a mapping of their own once step 1 split it), pagemig would
    // move only the range's. The part of the range in such a huge page (found before step
    // 1, [`Args::huge_edges`]) is left to step 3, which moves it as the kernel does.
    let (start_block, end_block) = (addr & !(HPAGE_SIZE - 1), (addr + len) & !(HPAGE_SIZE - 1));
    let inner_start = if args.huge_edges.0 { start_block + HPAGE_SIZE } else { addr };
    let inner_end = if args.huge_edges.1 { end_block } else { addr + len };
    let parts: Vec<_> =
        parts.into_iter().map(|r| r.start.max(inner_start)..r.end.min(inner_end)).filter(|r| r.start < r.end).collect();
    let movable: usize = parts.iter().map(|r| r.len() / PAGE_SIZE).sum();
    let mut left_over = movable as u64 != args.pages();
    summary::mbind_not_movable(args.pages() - movable as u64);
    for part in parts {
        // SAFETY: the calling thread is inside mbind while its pages move.
        match unsafe { engine.move_range(part.start, part.len(), node, &MigrateOptions::default()) } {
            Ok(outcome) => {
                left_over |= outcome.status.iter().any(|&s| s >= 0 && s as u32 != node);
                left_over |= outcome.errors().any(|(_, errno)| errno != libc::ENOENT);
            }
            Err(_) => left_over = true,
        }
    }
    // 3. The kernel moves the rest and answers.
    if left_over || args.flags & MPOL_MF_STRICT != 0 { args.kernel(args.flags) } else { Ok(0) }
}
