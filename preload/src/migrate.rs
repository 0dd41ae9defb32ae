//! `migrate_pages(pid, maxnode, old_nodes, new_nodes)` of the calling process, served by
//! pagemig where the new nodes are one node.
//!
//! The kernel's `kernel_migrate_pages()` checks both masks, the caller's right to move the
//! process's memory and the new nodes against the cpusets, then moves every page of the
//! process that is on a node of `old_nodes` to the node `new_nodes` maps it to, and answers
//! the number of pages it could not move. Served here in three steps:
//!
//! 1. on the calling thread, before pagemig starts any thread ([`Args::check`]): the old
//!    mask read as the kernel reads it (an `mbind` of no bytes), then the kernel's
//!    `migrate_pages` with the same `new_nodes` and no old node: it checks the new mask,
//!    the permissions and the cpusets as the call would, and moves nothing; its errors, in
//!    the kernel's order, are the answer;
//! 2. pagemig moves the pages of the process's private anonymous mappings that are on an
//!    old node other than the new one ([`pagemig::movable_ranges`] over the whole address
//!    space: not pagemig's own memory, thread stacks, malloc arenas or statics), a bounded
//!    chunk at a time: `PAGEMAP_SCAN` finds the present pages, the kernel says where each
//!    is, pagemig moves those on an old node;
//! 3. the kernel's `migrate_pages` with the caller's arguments, unchanged, moves what is
//!    left (shared and file-backed memory, stacks, pages pagemig could not move) and its
//!    answer is the call's.
//!
//! Several new nodes (the kernel's node-to-node remapping), an old mask naming a node past
//! the possible ones (the kernel's `EINVAL` must come before anything moves), masks that
//! cannot be read and other processes go to the kernel whole.
#![expect(unsafe_code, reason = "the kernel's migrate_pages on the caller's arguments")]

use std::ffi::{c_int, c_long, c_ulong};

use pagemig::ffi::{self, check};
use pagemig::{Errno, PAGE_SIZE};

use crate::config;
use crate::summary::{self, Symbol, Whole};

/// The top of the user address space on x86-64 (4-level page tables; 5-level kernels
/// place nothing above it unless asked).
const USER_TOP: usize = 1 << 47;
/// Pages asked about and moved at a time.
const CHUNK_PAGES: usize = 1 << 16;

/// The caller's arguments, as `migrate_pages(2)` takes them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Args {
    pub(crate) pid: c_int,
    pub(crate) maxnode: c_ulong,
    pub(crate) old_nodes: *const c_ulong,
    pub(crate) new_nodes: *const c_ulong,
}

impl Args {
    /// The kernel's `migrate_pages(2)` with these arguments.
    pub(crate) fn kernel(&self) -> Result<c_long, Errno> {
        // SAFETY: the caller's arguments as they came; the kernel checks every pointer.
        // Moving the process's pages is what the caller asked for.
        check(unsafe { libc::syscall(libc::SYS_migrate_pages, self.pid, self.maxnode, self.old_nodes, self.new_nodes) })
    }

    /// Step 1, in the kernel's order: `old_nodes` read as the kernel reads it (an `mbind`
    /// of no bytes with the same mask and `maxnode`: the kernel's `get_nodes()` then
    /// nothing), then the kernel's `migrate_pages` with no old node (`NULL`): it checks
    /// `new_nodes`, the caller's rights and the cpusets as the call would and moves nothing.
    /// Raw system calls: async-signal-safe.
    ///
    /// # Errors
    /// The kernel's, which are the call's answer.
    pub(crate) fn check(&self) -> Result<c_long, Errno> {
        // SAFETY: an mbind of no bytes at address 0 sets no policy and moves nothing; the
        // kernel reads the caller's mask as migrate_pages would.
        check(unsafe {
            libc::syscall(libc::SYS_mbind, 0usize, 0usize, libc::MPOL_DEFAULT, self.old_nodes, self.maxnode, 0u32)
        })?;
        // SAFETY: no old node: nothing moves; the caller's new mask as it came.
        check(unsafe {
            libc::syscall(libc::SYS_migrate_pages, self.pid, self.maxnode, std::ptr::null::<c_ulong>(), self.new_nodes)
        })
    }

    /// The nodes a mask names, as the kernel's `get_nodes()` reads it (`maxnode - 1` bits);
    /// `None` where it cannot be read.
    fn nodes(&self, mask: *const c_ulong) -> Option<Vec<u32>> {
        let bits = self.maxnode.saturating_sub(1);
        if bits == 0 || mask.is_null() {
            return Some(Vec::new());
        }
        let words = ffi::read_user(mask, bits.div_ceil(c_ulong::BITS as c_ulong) as usize).ok()?;
        Some(
            words
                .iter()
                .enumerate()
                .flat_map(|(w, &word)| {
                    (0..c_ulong::BITS).filter(move |b| word >> b & 1 == 1).map(move |b| w as u32 * c_ulong::BITS + b)
                })
                .filter(|&n| c_ulong::from(n) < bits)
                .collect(),
        )
    }
}

/// The nodes that may exist on this machine (`/sys/devices/system/node/possible`).
fn possible_nodes() -> Option<u32> {
    let text = pagemig::ffi::read_text("/sys/devices/system/node/possible").ok()?;
    pagemig::numa::parse_list(&text).ok()?.into_iter().max().map(|n| n + 1)
}

/// Serves a `migrate_pages(2)` of the calling process once [`Args::check`] passed:
/// steps 2 and 3 of the module's description.
pub(crate) fn migrate_pages(args: Args) -> Result<c_long, Errno> {
    let whole = |why| {
        summary::whole(why, 0);
        args.kernel()
    };
    let (Some(old), Some(new)) = (args.nodes(args.old_nodes), args.nodes(args.new_nodes)) else {
        return whole(Whole::NotAMove);
    };
    let [target] = new[..] else {
        return whole(Whole::PolicyNotSingleNode);
    };
    if possible_nodes().is_none_or(|possible| old.iter().any(|&n| n >= possible)) {
        return whole(Whole::NotAMove);
    }
    let from: Vec<i32> = old.iter().filter(|&&n| n != target).map(|&n| n as i32).collect();
    if from.is_empty() {
        return whole(Whole::NotAMove);
    }
    let Ok(engine) = config::engine() else {
        return whole(Whole::NoUserfaultfd);
    };
    summary::served(Symbol::MigratePages);
    // 2. pagemig moves the pages of its mappings that are on an old node. Errors are left
    // to the kernel's call below, which moves whatever is still on an old node.
    if let Ok(parts) = pagemig::movable_ranges(0, USER_TOP) {
        for part in parts {
            for start in (part.start..part.end).step_by(CHUNK_PAGES * PAGE_SIZE) {
                let len = (part.end - start).min(CHUNK_PAGES * PAGE_SIZE);
                // Only the present pages (a sparse mapping of terabytes costs what its
                // present pages cost), and of those, the ones on an old node.
                let Ok(present) = pagemig::numa::present_ranges(start, len) else { continue };
                let mut pages = Vec::new();
                for run in present {
                    let Ok(nodes) = pagemig::numa::page_nodes(run.start, run.len()) else { continue };
                    let on_old = nodes.iter().enumerate().filter(|(_, n)| from.contains(n));
                    pages.extend(on_old.map(|(i, _)| run.start + i * PAGE_SIZE));
                }
                if pages.is_empty() {
                    continue;
                }
                let targets = vec![target as c_int; pages.len()];
                let mut status = vec![0; pages.len()];
                // SAFETY: the calling thread waits inside migrate_pages while its pages
                // move; the arrays are ours.
                let _ = unsafe { engine.move_pages(&pages, Some(&targets), &mut status) };
            }
        }
    }
    // 3. The kernel moves the rest and answers.
    args.kernel()
}
