//! NUMA memory policy and page placement: `mbind`, `get_mempolicy`, `set_mempolicy`,
//! `move_pages` and `migrate_pages`, through `libc::syscall` (glibc does not wrap them).

use super::{Errno, check};

/// `MPOL_PREFERRED` from `<linux/mempolicy.h>`.
const MPOL_PREFERRED: usize = 1;
/// `MPOL_BIND` from `<linux/mempolicy.h>`.
const MPOL_BIND: usize = 2;
#[cfg(test)]
/// `MPOL_F_NODE` from `<linux/mempolicy.h>`.
const MPOL_F_NODE: usize = 1;
/// `MPOL_F_ADDR` from `<linux/mempolicy.h>`.
const MPOL_F_ADDR: usize = 2;
/// `MPOL_MF_MOVE` from `<linux/mempolicy.h>`.
const MPOL_MF_MOVE: i32 = 2;
/// Bits in the node masks pagemig passes to the kernel.
const NODEMASK_BITS: usize = 1024;

fn nodemask(node: u32) -> Result<[u64; NODEMASK_BITS / 64], Errno> {
    let node = node as usize;
    if node >= NODEMASK_BITS {
        return Err(Errno::INVAL);
    }
    let mut mask = [0u64; NODEMASK_BITS / 64];
    mask[node / 64] |= 1 << (node % 64);
    Ok(mask)
}

/// Binds a range to one node: `mbind(addr, len, MPOL_BIND, {node}, maxnode, flags)`,
/// with `MPOL_MF_MOVE` when `move_existing` is set.
///
/// See `mbind(2)`.
///
/// # Errors
/// The `mbind` errno: `EINVAL` for a node beyond the mask, an unaligned range or an
/// offline node, `EFAULT` for an unmapped range, `EIO` when existing pages could not be
/// moved.
pub fn mbind(addr: usize, len: usize, node: u32, move_existing: bool) -> Result<(), Errno> {
    let mask = nodemask(node)?;
    let flags = if move_existing { MPOL_MF_MOVE } else { 0 };
    // SAFETY: the mask outlives the call and holds NODEMASK_BITS bits; mbind changes the
    // policy of the range, never its contents.
    check(unsafe { libc::syscall(libc::SYS_mbind, addr, len, MPOL_BIND, mask.as_ptr(), NODEMASK_BITS + 1, flags) })
        .map(drop)
}

#[cfg(test)]
/// The node of the page at `addr`: `get_mempolicy(&node, NULL, 0, addr, MPOL_F_NODE |
/// MPOL_F_ADDR)`. The page is faulted in if it is not present.
///
/// # Errors
/// The `get_mempolicy` errno (`EFAULT` for an unmapped address).
pub fn get_mempolicy_node(addr: usize) -> Result<u32, Errno> {
    let mut node: libc::c_int = -1;
    // SAFETY: `node` is a valid out-pointer for the duration of the call; no node mask is
    // passed (NULL, 0).
    check(unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<u64>(),
            0usize,
            addr,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    })?;
    Ok(node as u32)
}

/// Whether the mapping at `addr` has a memory policy of its own (`get_mempolicy(2)` with
/// `MPOL_F_ADDR`: a mode other than `MPOL_DEFAULT`), set by `mbind(2)`. Without one, pages
/// allocated for it follow the policy of the thread that allocates them.
///
/// # Errors
/// The `get_mempolicy` errno (`EFAULT` for an unmapped address).
pub fn vma_has_policy(addr: usize) -> Result<bool, Errno> {
    let mut mode: libc::c_int = 0;
    // SAFETY: `mode` is a valid out-pointer for the duration of the call; no node mask is
    // passed (NULL, 0).
    check(unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            std::ptr::null_mut::<u64>(),
            0usize,
            addr,
            MPOL_F_ADDR,
        )
    })?;
    Ok(mode != 0)
}

/// `move_pages(2)` on the calling process, in one of its two forms.
///
/// With `nodes` set, asks the kernel to move each page to the node at the same index and
/// writes each page's outcome in `status` (a node number or a negative errno). Without
/// `nodes`, only queries where each page is: `status[i]` is the node of `pages[i]`, or
/// `-ENOENT` when the page is not present, `-EFAULT` when it is not mapped.
///
/// # Errors
/// The `move_pages` errno for the call as a whole (`EINVAL`, `ENODEV`, `ENOENT`, `E2BIG`
/// …). Per-page outcomes are in `status`.
pub fn move_pages(pages: &[usize], nodes: Option<&[i32]>, status: &mut [i32]) -> Result<(), Errno> {
    move_pages_counted(pages, nodes, status).map(drop)
}

/// [`move_pages`], returning what the kernel returns on success: the number of pages it
/// tried to migrate and could not (`0` when every page it took moved).
///
/// # Errors
/// As [`move_pages`].
pub fn move_pages_counted(pages: &[usize], nodes: Option<&[i32]>, status: &mut [i32]) -> Result<usize, Errno> {
    move_pages_of(0, pages, nodes, status)
}

/// [`move_pages_counted`] for process `pid` (`0`: the calling process): `move_pages(2)`
/// with `MPOL_MF_MOVE`. The kernel checks that the caller may do so (`ptrace_may_access`
/// with `PTRACE_MODE_READ_REALCREDS`).
///
/// # Errors
/// As [`move_pages`], and `ESRCH` (no such process), `EPERM` (not allowed).
pub fn move_pages_of(pid: i32, pages: &[usize], nodes: Option<&[i32]>, status: &mut [i32]) -> Result<usize, Errno> {
    if status.len() != pages.len() || nodes.is_some_and(|n| n.len() != pages.len()) {
        return Err(Errno::INVAL);
    }
    let nodes_ptr = nodes.map_or(std::ptr::null(), |n| n.as_ptr());
    // SAFETY: the three arrays hold `pages.len()` entries each (checked above) and outlive
    // the call; `move_pages` moves pages with their contents, which Rust cannot observe.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid,
            pages.len(),
            pages.as_ptr(),
            nodes_ptr,
            status.as_mut_ptr(),
            if nodes.is_some() { MPOL_MF_MOVE } else { 0 },
        )
    })
    .map(|n| n as usize)
}

#[cfg(any(test, feature = "internals"))]
/// Moves the pages of process `pid` that are on a node of `from` to the nodes of `to`:
/// `migrate_pages(2)`. Returns the number of pages the kernel could not move.
///
/// See <https://man7.org/linux/man-pages/man2/migrate_pages.2.html>.
///
/// # Errors
/// `EINVAL` for a node past 1023 or an empty list; the `migrate_pages` errno: `ESRCH` (no
/// such process), `EPERM` (not allowed, or a target node outside the process's cpuset
/// without `CAP_SYS_NICE`), `ENODEV`.
pub fn migrate_pages_of(pid: i32, from: &[u32], to: &[u32]) -> Result<usize, Errno> {
    let mask = |nodes: &[u32]| -> Result<[u64; NODEMASK_BITS / 64], Errno> {
        let mut mask = [0u64; NODEMASK_BITS / 64];
        for &n in nodes {
            for (word, bit) in mask.iter_mut().zip(nodemask(n)?) {
                *word |= bit;
            }
        }
        Ok(mask)
    };
    if from.is_empty() || to.is_empty() {
        return Err(Errno::INVAL);
    }
    let (old, new) = (mask(from)?, mask(to)?);
    // SAFETY: both masks hold `NODEMASK_BITS` bits and outlive the call; the kernel moves
    // another process's pages with their contents, which this process cannot observe.
    check(unsafe {
        libc::syscall(libc::SYS_migrate_pages, pid, NODEMASK_BITS + 1, old.as_ptr(), new.as_ptr())
    })
    .map(|n| n as usize)
}

/// Sets the memory policy of the calling thread to `MPOL_BIND` on one node
/// (`set_mempolicy(2)`), or back to the default policy with `None`.
///
/// # Errors
/// The `set_mempolicy` errno.
pub fn set_mempolicy_bind(node: Option<u32>) -> Result<(), Errno> {
    const MPOL_DEFAULT: usize = 0;
    match node {
        Some(node) => set_mempolicy_node(MPOL_BIND, node),
        // SAFETY: a NULL mask with MPOL_DEFAULT is the documented way to reset the policy.
        None => check(unsafe { libc::syscall(libc::SYS_set_mempolicy, MPOL_DEFAULT, std::ptr::null::<u64>(), 0usize) })
            .map(drop),
    }
}

/// Sets the memory policy of the calling thread to `MPOL_PREFERRED` on one node
/// (`set_mempolicy(2)`): pages come from that node while it has them, from the others after.
///
/// # Errors
/// The `set_mempolicy` errno.
pub fn set_mempolicy_preferred(node: u32) -> Result<(), Errno> {
    set_mempolicy_node(MPOL_PREFERRED, node)
}

/// `set_mempolicy(mode, {node})` for the calling thread.
fn set_mempolicy_node(mode: usize, node: u32) -> Result<(), Errno> {
    let mask = nodemask(node)?;
    // SAFETY: the mask outlives the call and holds NODEMASK_BITS bits.
    check(unsafe { libc::syscall(libc::SYS_set_mempolicy, mode, mask.as_ptr(), NODEMASK_BITS + 1) }).map(drop)
}

/// A thread's memory policy, as `get_mempolicy(2)` reads it: mode (with its flags) and
/// node mask.
#[derive(Clone, Copy, Debug)]
pub struct ThreadPolicy {
    mode: libc::c_int,
    mask: [u64; NODEMASK_BITS / 64],
}

impl ThreadPolicy {
    /// The calling thread's policy.
    ///
    /// # Errors
    /// The `get_mempolicy` errno.
    pub fn current() -> Result<Self, Errno> {
        let mut p = ThreadPolicy { mode: 0, mask: [0; NODEMASK_BITS / 64] };
        // SAFETY: valid out-pointers; the mask holds NODEMASK_BITS bits, as `maxnode` says.
        check(unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &mut p.mode as *mut libc::c_int,
                p.mask.as_mut_ptr(),
                NODEMASK_BITS,
                0usize,
                0usize,
            )
        })?;
        Ok(p)
    }

    /// Makes this the calling thread's policy again (`set_mempolicy(2)`).
    ///
    /// # Errors
    /// The `set_mempolicy` errno.
    pub fn restore(&self) -> Result<(), Errno> {
        // SAFETY: the mask outlives the call and holds NODEMASK_BITS bits.
        check(unsafe { libc::syscall(libc::SYS_set_mempolicy, self.mode, self.mask.as_ptr(), NODEMASK_BITS + 1) })
            .map(drop)
    }
}

/// The calling thread's memory policy, bound to one node at a time for the allocations the
/// thread makes meanwhile ([`PolicyBinding::bind`]), and put back as it was when dropped.
/// Nothing is bound where the thread's own policy cannot be read back first.
#[derive(Debug)]
pub struct PolicyBinding {
    saved: Option<ThreadPolicy>,
    /// The policy set on the thread, while one is.
    bound: Option<Pointed>,
}

/// A policy [`PolicyBinding`] sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pointed {
    /// `MPOL_BIND` to one node.
    Bind(u32),
    /// `MPOL_PREFERRED` for one node.
    Prefer(u32),
    /// `MPOL_DEFAULT`: the node the thread runs on, the others after.
    Anywhere,
}

impl PolicyBinding {
    /// Reads the calling thread's policy, to put back later; binds nothing yet.
    pub fn new() -> Self {
        Self { saved: ThreadPolicy::current().ok(), bound: None }
    }

    /// Binds the calling thread to `node` (`MPOL_BIND`), and returns whether it is bound
    /// there (without a system call where it is already). Where that fails, the thread
    /// stays as it was: its own policy, or the node bound before.
    pub fn bind(&mut self, node: u32) -> bool {
        self.set(Pointed::Bind(node))
    }

    /// Points the calling thread's allocations at `node` while it has pages, at the other
    /// nodes after (`MPOL_PREFERRED`); returns whether it does. Where that fails, the
    /// thread stays as it was.
    pub fn prefer(&mut self, node: u32) -> bool {
        self.set(Pointed::Prefer(node))
    }

    /// Lets the calling thread's allocations take any node, the one it runs on first
    /// (`MPOL_DEFAULT`), whatever its own policy; returns whether it does.
    pub fn anywhere(&mut self) -> bool {
        self.set(Pointed::Anywhere)
    }

    fn set(&mut self, policy: Pointed) -> bool {
        if self.bound == Some(policy) {
            return true;
        }
        // Nothing is set that could not be put back.
        if self.saved.is_none() {
            return false;
        }
        let set = match policy {
            Pointed::Bind(node) => set_mempolicy_bind(Some(node)),
            Pointed::Prefer(node) => set_mempolicy_preferred(node),
            Pointed::Anywhere => set_mempolicy_bind(None),
        };
        if set.is_ok() {
            self.bound = Some(policy);
        }
        set.is_ok()
    }

    /// Puts the thread's own policy back.
    pub fn unbind(&mut self) {
        if self.bound.is_some()
            && let Some(saved) = self.saved
            && saved.restore().is_ok()
        {
            self.bound = None;
        }
    }
}

impl Default for PolicyBinding {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PolicyBinding {
    fn drop(&mut self) {
        self.unbind();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding binds the thread (or points it at a node it prefers), again without harm to
    /// the node it is bound to, and puts the thread's own policy back when it drops.
    #[test]
    fn a_binding_binds_or_prefers_once_per_node_and_puts_the_policy_back() {
        std::thread::spawn(|| {
            let own = ThreadPolicy::current().unwrap();
            {
                let mut binding = PolicyBinding::new();
                assert!(binding.bind(0));
                assert_eq!(ThreadPolicy::current().unwrap().mode, libc::MPOL_BIND);
                assert!(binding.bind(0));
                assert_eq!(ThreadPolicy::current().unwrap().mode, libc::MPOL_BIND);
                binding.unbind();
                let now = ThreadPolicy::current().unwrap();
                assert_eq!((now.mode, now.mask), (own.mode, own.mask));
                assert!(binding.bind(0));
                assert_eq!(ThreadPolicy::current().unwrap().mode, libc::MPOL_BIND);
                assert!(binding.prefer(0));
                let now = ThreadPolicy::current().unwrap();
                assert_eq!((now.mode, now.mask[0]), (libc::MPOL_PREFERRED, 1));
                assert!(binding.bind(0));
                assert_eq!(ThreadPolicy::current().unwrap().mode, libc::MPOL_BIND);
                assert!(binding.anywhere());
                assert_eq!(ThreadPolicy::current().unwrap().mode, libc::MPOL_DEFAULT);
                assert!(binding.prefer(0));
            }
            let now = ThreadPolicy::current().unwrap();
            assert_eq!((now.mode, now.mask), (own.mode, own.mask));
        })
        .join()
        .unwrap();
    }
}
