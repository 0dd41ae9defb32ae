//! Thin, safe wrappers over the system calls pagemig is built on.
//!
//! This module and the copy kernels are the only places with `unsafe` code. Every wrapper
//! returns an [`Errno`] on failure; the callers above attach context. The raw calls go
//! through `libc::syscall` for the NUMA calls that glibc does not wrap (`mbind`,
//! `get_mempolicy`, `move_pages`) and through `libc` for the memory-management calls;
//! constants and structures come from `linux-raw-sys`, so no C toolchain or libclang is
//! needed at build time.
#![allow(unsafe_code)]

pub mod mapping;
pub mod thread;
pub mod uffd;

pub use mapping::Mapping;

use std::ffi::c_void;

pub use rustix::io::Errno;

/// The base page size pagemig works in (x86-64).
pub const PAGE_SIZE: usize = 4096;
/// The size of a PMD-mapped transparent huge page (x86-64).
pub const HPAGE_SIZE: usize = 2 << 20;

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

pub(crate) fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

pub(crate) fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 { Err(last_errno()) } else { Ok(ret) }
}

fn check_int(ret: libc::c_int) -> Result<(), Errno> {
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

fn nodemask(node: u32) -> Result<[u64; NODEMASK_BITS / 64], Errno> {
    let node = node as usize;
    if node >= NODEMASK_BITS {
        return Err(Errno::INVAL);
    }
    let mut mask = [0u64; NODEMASK_BITS / 64];
    mask[node / 64] |= 1 << (node % 64);
    Ok(mask)
}

/// Maps `len` bytes of fresh anonymous private read-write memory (`mmap(2)` with
/// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
///
/// # Errors
/// The `mmap` errno, e.g. `ENOMEM`.
pub fn mmap_anon(len: usize) -> Result<usize, Errno> {
    mmap_anon_prot(len, libc::PROT_READ | libc::PROT_WRITE)
}

fn mmap_anon_prot(len: usize, prot: libc::c_int) -> Result<usize, Errno> {
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses cannot alias any
    // memory Rust knows about.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED { Err(last_errno()) } else { Ok(ptr as usize) }
}

/// Maps `len` bytes of anonymous memory aligned to `align` (a power of two), trimming the
/// slack around it.
///
/// # Errors
/// The `mmap`/`munmap` errno.
pub fn mmap_anon_aligned(len: usize, align: usize) -> Result<usize, Errno> {
    debug_assert!(align.is_power_of_two());
    if align <= PAGE_SIZE {
        return mmap_anon(len);
    }
    let total = len.checked_add(align).ok_or(Errno::NOMEM)?;
    let raw = mmap_anon(total)?;
    let start = (raw + align - 1) & !(align - 1);
    // SAFETY: both pieces lie inside the mapping made just above and nothing else uses them.
    unsafe {
        if start > raw {
            munmap(raw, start - raw)?;
        }
        let end = start + len;
        if raw + total > end {
            munmap(end, raw + total - end)?;
        }
    }
    Ok(start)
}

/// Unmaps `[addr, addr + len)` (`munmap(2)`).
///
/// # Errors
/// The `munmap` errno.
///
/// # Safety
/// Nothing may use the range afterwards, and it must be memory the caller owns.
pub unsafe fn munmap(addr: usize, len: usize) -> Result<(), Errno> {
    // Whatever pagemig had claimed there is no longer its own (nor anyone's) once unmapped.
    crate::own::disclaim(addr, len);
    // SAFETY: the caller owns the range and promises that nothing uses it any more.
    check_int(unsafe { libc::munmap(addr as *mut c_void, len) })
}

#[cfg(any(test, feature = "internals"))]
/// Reserves `len` bytes of inaccessible address space (`PROT_NONE`), to be replaced with
/// `MREMAP_FIXED`.
///
/// # Errors
/// The `mmap` errno.
pub fn reserve(len: usize) -> Result<usize, Errno> {
    mmap_anon_prot(len, libc::PROT_NONE)
}

/// Frees the pages of a range the caller owns without unmapping it (`MADV_DONTNEED`).
///
/// # Safety
/// Nothing may rely on the range's contents: they read as zero afterwards.
pub unsafe fn discard(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller gives up the contents of a range it owns.
    check_int(unsafe { libc::madvise(addr as *mut c_void, len, libc::MADV_DONTNEED) })
}

/// A subset of `madvise(2)` advice values that pagemig uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_HUGEPAGE`: back the range with transparent huge pages.
    HugePage,
    /// `MADV_NOHUGEPAGE`: never back the range with transparent huge pages.
    NoHugePage,
    /// `MADV_POPULATE_WRITE`: fault every page in for writing now.
    PopulateWrite,
    /// `MADV_DONTFORK`: a child forked later does not get the range; its pages stay this
    /// process's own.
    DontFork,
}

/// Gives the kernel advice about a range (`madvise(2)`).
///
/// None of the advice values offered changes the contents of memory, so this is safe.
///
/// # Errors
/// The `madvise` errno: `ENOMEM` when populating runs out of memory, `EINVAL` when the
/// advice is not supported.
pub fn madvise(addr: usize, len: usize, advice: Advice) -> Result<(), Errno> {
    let advice = match advice {
        Advice::HugePage => libc::MADV_HUGEPAGE,
        Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
        Advice::PopulateWrite => linux_raw_sys::general::MADV_POPULATE_WRITE as i32,
        Advice::DontFork => libc::MADV_DONTFORK,
    };
    // SAFETY: the advice values above never change the contents of memory, only how it
    // is backed; an unmapped range gets ENOMEM from the kernel.
    check_int(unsafe { libc::madvise(addr as *mut c_void, len, advice) })
}

/// Locks a range in memory (`mlock(2)`).
///
/// # Errors
/// The `mlock` errno (`ENOMEM`, `EPERM`, `EAGAIN`).
pub fn mlock(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: mlock never changes memory contents; bad ranges get ENOMEM.
    check_int(unsafe { libc::mlock(addr as *const c_void, len) })
}

/// Locks a range's pages as they are faulted in (`mlock2(addr, len, MLOCK_ONFAULT)`): the
/// mapping is locked without populating it.
///
/// # Errors
/// The `mlock2` errno.
pub fn mlock_onfault(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: mlock2 never changes memory contents; bad ranges get ENOMEM.
    check_int(unsafe { libc::mlock2(addr as *const c_void, len, libc::MLOCK_ONFAULT) })
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

/// The process, user and group at the other end of a connected Unix socket, as they were
/// when it connected or listened: `getsockopt(SO_PEERCRED)` (see `unix(7)`). The user and
/// group are the peer's effective ones.
///
/// # Errors
/// The `getsockopt` errno (`ENOTSOCK`, `ENOTCONN`).
pub fn peer_cred(fd: std::os::fd::BorrowedFd<'_>) -> Result<(i32, u32, u32), Errno> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid locals of the size given; the descriptor is borrowed
    // for the call.
    check_int(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// Whether this process is dumpable (`prctl(PR_GET_DUMPABLE)`): the kernel lets only
/// holders of `CAP_SYS_PTRACE` inspect or migrate a process that is not.
pub fn dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer and only reads the process's flag.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

/// The descriptor a forked child closes (`-1`: none).
static CLOSE_IN_CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn close_in_child() {
    let fd = CLOSE_IN_CHILD.swap(-1, std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: the parent handed this descriptor over for exactly this; in the child, no
        // thread but the forking one exists, and nothing there uses it (the thread that
        // did is the parent's). `close` is async-signal-safe.
        unsafe { libc::close(fd) };
    }
}

/// Makes every child forked from now on close `fd` (one descriptor per process: a later
/// call replaces it) as it starts, with a `pthread_atfork` child handler: a listening
/// socket whose serving thread a child does not have must not stay open there, holding its
/// name for connections nobody accepts.
pub fn close_in_children(fd: std::os::fd::RawFd) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    CLOSE_IN_CHILD.store(fd, std::sync::atomic::Ordering::SeqCst);
    INSTALL.call_once(|| {
        // SAFETY: the handler is a plain function that touches only the atomic above and
        // calls `close`.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(close_in_child)) };
        debug_assert_eq!(rc, 0, "pthread_atfork");
    });
}

/// Sets the memory policy of the calling thread to `MPOL_BIND` on one node
/// (`set_mempolicy(2)`), or back to the default policy with `None`.
///
/// # Errors
/// The `set_mempolicy` errno.
pub fn set_mempolicy_bind(node: Option<u32>) -> Result<(), Errno> {
    const MPOL_DEFAULT: usize = 0;
    let ret = match node {
        Some(node) => {
            let mask = nodemask(node)?;
            // SAFETY: the mask outlives the call and holds NODEMASK_BITS bits.
            unsafe { libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, mask.as_ptr(), NODEMASK_BITS + 1) }
        }
        // SAFETY: a NULL mask with MPOL_DEFAULT is the documented way to reset the policy.
        None => unsafe { libc::syscall(libc::SYS_set_mempolicy, MPOL_DEFAULT, std::ptr::null::<u64>(), 0usize) },
    };
    check(ret).map(drop)
}

/// For each page address in `pages`, whether the page is present and mapped by another
/// process too (a `fork`'s copy-on-write sharing, `/proc/self/pagemap` bit 56 "exclusively
/// mapped" clear): the pages `move_pages(2)` refuses with `EACCES` without
/// `MPOL_MF_MOVE_ALL`. Pages not present answer `false`.
///
/// # Errors
/// The errno of opening or reading `/proc/self/pagemap`.
pub fn shared_pages(pages: &[usize]) -> Result<Vec<bool>, Errno> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const EXCLUSIVE: u64 = 1 << 56;
    /// Entries read at once, at most.
    const CHUNK: usize = 8192;
    let file = std::fs::File::open("/proc/self/pagemap").map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    let mut order: Vec<usize> = (0..pages.len()).collect();
    order.sort_unstable_by_key(|&i| pages[i] / PAGE_SIZE);
    let mut shared = vec![false; pages.len()];
    let mut buf = vec![0u8; CHUNK * 8];
    let mut k = 0;
    while k < order.len() {
        // A run of pages no more than CHUNK entries wide, read with one pread.
        let first = pages[order[k]] / PAGE_SIZE;
        let mut j = k;
        while j < order.len() && pages[order[j]] / PAGE_SIZE < first + CHUNK {
            j += 1;
        }
        let span = pages[order[j - 1]] / PAGE_SIZE - first + 1;
        let bytes = &mut buf[..span * 8];
        file.read_exact_at(bytes, (first * 8) as u64).map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        for &i in &order[k..j] {
            let at = (pages[i] / PAGE_SIZE - first) * 8;
            let entry = u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
            shared[i] = entry & PRESENT != 0 && entry & EXCLUSIVE == 0;
        }
        k = j;
    }
    Ok(shared)
}

/// A mapping as `PROCMAP_QUERY` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueriedVma {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// `PROCMAP_QUERY_VMA_*` bits: readable 1, writable 2, executable 4, shared 8.
    pub flags: u64,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[anon:name]`), empty for plain anonymous memory.
    pub name: String,
}

/// The mapping of this process that holds `addr`, or (with `or_next`) the first one above
/// it: `ioctl(fd, PROCMAP_QUERY)` on an open `/proc/self/maps` (Linux 6.11), one lookup
/// in the kernel's tree instead of a walk of every mapping.
///
/// # Errors
/// `ENOENT` when there is none, `ENOTTY` before Linux 6.11, or the ioctl's errno.
pub fn procmap_query(fd: &std::fs::File, addr: usize, or_next: bool) -> Result<QueriedVma, Errno> {
    use linux_raw_sys::general::{procmap_query, procmap_query_flags};
    use std::os::fd::AsRawFd;
    // _IOWR('f', 17, struct procmap_query)
    const PROCMAP_QUERY: libc::c_ulong =
        (3 << 30) | ((std::mem::size_of::<procmap_query>() as libc::c_ulong) << 16) | (0x66 << 8) | 17;
    let mut name = [0u8; 4096];
    let mut q = procmap_query {
        size: std::mem::size_of::<procmap_query>() as u64,
        query_flags: if or_next { procmap_query_flags::PROCMAP_QUERY_COVERING_OR_NEXT_VMA as u64 } else { 0 },
        query_addr: addr as u64,
        vma_start: 0,
        vma_end: 0,
        vma_flags: 0,
        vma_page_size: 0,
        vma_offset: 0,
        inode: 0,
        dev_major: 0,
        dev_minor: 0,
        vma_name_size: name.len() as u32,
        build_id_size: 0,
        vma_name_addr: name.as_mut_ptr() as u64,
        build_id_addr: 0,
    };
    // SAFETY: `q` is a valid `procmap_query` of its own size, and its name buffer is
    // `name`, writable for `vma_name_size` bytes for the duration of the call.
    check_int(unsafe { libc::ioctl(fd.as_raw_fd(), PROCMAP_QUERY, &mut q) })?;
    let len = (q.vma_name_size as usize).min(name.len());
    let text = &name[..len];
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(len)];
    Ok(QueriedVma {
        start: q.vma_start as usize,
        end: q.vma_end as usize,
        flags: q.vma_flags,
        inode: q.inode,
        name: String::from_utf8_lossy(text).into_owned(),
    })
}

/// The ranges of `[start, end)` mapped by huge pages in this process (a transparent huge
/// page mapped whole by one page-table entry), from the `PAGEMAP_SCAN` ioctl on
/// `/proc/self/pagemap` (Linux 6.7), as `(start, end)` in address order.
///
/// # Errors
/// The errno of opening `/proc/self/pagemap` or of the ioctl (`EINVAL` for an unaligned or
/// wrapping range, `ENOTTY` before Linux 6.7).
pub fn huge_ranges(start: usize, end: usize) -> Result<Vec<(usize, usize)>, Errno> {
    scan_ranges(start, end, linux_raw_sys::general::PAGE_IS_HUGE)
}

/// The ranges of `[start, end)` whose pages are present in memory (not swapped out, never
/// touched or purged), as [`huge_ranges`] finds them: the kernel skips empty page tables,
/// so a sparse mapping of terabytes costs what its present pages cost.
///
/// # Errors
/// As [`huge_ranges`].
pub fn present_ranges(start: usize, end: usize) -> Result<Vec<(usize, usize)>, Errno> {
    scan_ranges(start, end, linux_raw_sys::general::PAGE_IS_PRESENT)
}

/// The ranges of `[start, end)` whose pages are all in `category` (a `PAGE_IS_*` bit), by
/// the `PAGEMAP_SCAN` ioctl, adjacent ranges merged.
fn scan_ranges(start: usize, end: usize, category: u32) -> Result<Vec<(usize, usize)>, Errno> {
    use linux_raw_sys::general::{page_region, pm_scan_arg};
    use std::os::fd::AsRawFd;
    // _IOWR('f', 16, struct pm_scan_arg)
    const PAGEMAP_SCAN: libc::c_ulong =
        (3 << 30) | ((std::mem::size_of::<pm_scan_arg>() as libc::c_ulong) << 16) | (0x66 << 8) | 16;
    let file = std::fs::File::open("/proc/self/pagemap").map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut regions = vec![page_region { start: 0, end: 0, categories: 0 }; 256];
    let mut at = start;
    while at < end {
        let mut arg = pm_scan_arg {
            size: std::mem::size_of::<pm_scan_arg>() as u64,
            flags: 0,
            start: at as u64,
            end: end as u64,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: u64::from(category),
            category_anyof_mask: 0,
            return_mask: u64::from(category),
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `regions`, which holds
        // `vec_len` entries and outlives the call; the ioctl only reads page tables.
        let n = unsafe { libc::ioctl(file.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut pm_scan_arg) };
        if n < 0 {
            return Err(last_errno());
        }
        for r in &regions[..n as usize] {
            match out.last_mut() {
                Some(last) if last.1 == r.start as usize => last.1 = r.end as usize,
                _ => out.push((r.start as usize, r.end as usize)),
            }
        }
        let walked = arg.walk_end as usize;
        if walked <= at {
            break;
        }
        at = walked;
    }
    Ok(out)
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

/// Copies `len` bytes from `src` to `dst`.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes, the ranges must not overlap,
/// and no thread may write `src` or access `dst` during the copy.
#[inline]
pub unsafe fn copy_bytes(dst: usize, src: usize, len: usize) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) }
}

/// Copies `len` bytes from `src` to `dst` with non-temporal stores, which write whole
/// cache lines straight to memory instead of first reading the destination into the cache:
/// the right copy for migration, whose destination is not read again soon. Falls back to
/// [`copy_bytes`] for unaligned or short copies. Ends with a store fence.
///
/// # Safety
/// As [`copy_bytes`].
pub unsafe fn copy_bytes_nt(dst: usize, src: usize, len: usize) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { copy_bytes_nt_streams(dst, src, len, true) }
}

/// [`copy_bytes_nt`], reading one stream only (`two_streams == false`) or, for large
/// copies, the two halves side by side.
///
/// # Safety
/// As [`copy_bytes`].
pub unsafe fn copy_bytes_nt_streams(dst: usize, src: usize, len: usize, two_streams: bool) {
    #[cfg(target_arch = "x86_64")]
    if dst % 64 == 0 && src % 32 == 0 && len % 128 == 0 && len >= 4096 && std::is_x86_feature_detected!("avx2") {
        if two_streams && len >= TWO_STREAMS_MIN {
            // SAFETY: as below; `len` is a multiple of 128, so each half is a multiple of
            // 64 and the second half starts 64-byte aligned in `dst` and 32-byte in `src`.
            unsafe { copy_nt_avx2_two_streams(dst, src, len) };
        } else {
            // SAFETY: AVX2 was just detected; the alignment and length checks above are the
            // contract of `copy_nt_avx2`, and the caller's contract covers the ranges.
            unsafe { copy_nt_avx2(dst, src, len) };
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if dst % 64 == 0 && src % 16 == 0 && len % 64 == 0 && len >= 4096 {
        use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_sfence, _mm_stream_si128};
        let (mut s, mut d) = (src as *const __m128i, dst as *mut __m128i);
        let end = (src + len) as *const __m128i;
        // SAFETY: both ranges are valid for `len` bytes (caller's contract), 16-byte
        // aligned (checked above) and `len` is a multiple of 64, so every 16-byte access
        // below stays inside them. SSE2 is part of the x86-64 baseline.
        unsafe {
            while s < end {
                let a = _mm_load_si128(s);
                let b = _mm_load_si128(s.add(1));
                let c = _mm_load_si128(s.add(2));
                let e = _mm_load_si128(s.add(3));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
                s = s.add(4);
                d = d.add(4);
            }
            _mm_sfence();
        }
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe { copy_bytes(dst, src, len) }
}

/// Writes back and drops from every cache level the lines of `[addr, addr + len)`
/// (`clflush` on each 64-byte line, then a fence): the next access goes to memory, as after
/// a long time unused. Returns `false`, having done nothing, where the architecture offers
/// no such instruction here.
///
/// # Safety
/// The range must be mapped and readable for the whole call (a flush is a read access: an
/// unpopulated page of it is faulted in).
pub unsafe fn flush_cache(addr: usize, len: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_clflush, _mm_mfence};
        let end = addr + len;
        let mut line = addr & !63;
        // SAFETY: every line flushed lies in the caller's mapped, readable range; CLFLUSH is
        // part of the x86-64 baseline (SSE2).
        unsafe {
            while line < end {
                _mm_clflush(line as *const u8);
                line += 64;
            }
            _mm_mfence();
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (addr, len);
        false
    }
}

/// The calling thread's stack as `(start, end)`, from `pthread_getattr_np`.
pub fn current_thread_stack() -> Option<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_getattr_np initialises `attr` for the calling thread on success.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return None;
    }
    let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: `attr` was initialised just above; the out-pointers are valid locals.
    let ok = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) } == 0;
    // SAFETY: `attr` was initialised by pthread_getattr_np and is destroyed once.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    ok.then(|| (addr as usize, addr as usize + size))
}

/// The AVX2 form of the non-temporal copy: two cache lines per iteration.
///
/// # Safety
/// AVX2 must be available; `dst` 64-byte and `src` 32-byte aligned, `len` a multiple of
/// 128; otherwise as [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_nt_avx2(dst: usize, src: usize, len: usize) {
    use std::arch::x86_64::{__m256i, _mm_sfence, _mm256_load_si256, _mm256_stream_si256};
    let (mut s, mut d) = (src as *const __m256i, dst as *mut __m256i);
    let end = (src + len) as *const __m256i;
    // SAFETY: both ranges are valid for `len` bytes (caller's contract), 32-byte aligned
    // and `len` is a multiple of 128, so every 32-byte access stays inside them.
    unsafe {
        while s < end {
            let a = _mm256_load_si256(s);
            let b = _mm256_load_si256(s.add(1));
            let c = _mm256_load_si256(s.add(2));
            let e = _mm256_load_si256(s.add(3));
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            _mm256_stream_si256(d.add(2), c);
            _mm256_stream_si256(d.add(3), e);
            s = s.add(4);
            d = d.add(4);
        }
        _mm_sfence();
    }
}

/// Copies of at least this many bytes read two streams at once (see
/// [`copy_nt_avx2_two_streams`]); below it one stream is faster.
#[cfg(target_arch = "x86_64")]
const TWO_STREAMS_MIN: usize = 64 << 10;

/// The AVX2 non-temporal copy of large ranges: the two halves are copied side by side, one
/// cache line of each per iteration. A single thread keeps more reads in flight from two
/// sequential streams than from one (on a 2-core AMD EPYC VM, 1 GiB in 2 MiB pieces: 1.2 to
/// 1.3 times the throughput of one stream and of `memcpy`), while the stores still fill
/// whole lines.
///
/// # Safety
/// AVX2 must be available; `dst` 64-byte and `src` 32-byte aligned, `len` a multiple of
/// 128; otherwise as [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_nt_avx2_two_streams(dst: usize, src: usize, len: usize) {
    use std::arch::x86_64::{__m256i, _mm_sfence, _mm256_load_si256, _mm256_stream_si256};
    let half = len / 2;
    let (s0, d0) = (src as *const __m256i, dst as *mut __m256i);
    let (s1, d1) = ((src + half) as *const __m256i, (dst + half) as *mut __m256i);
    // SAFETY: both ranges are valid for `len` bytes (caller's contract); `half` is a
    // multiple of 64, so both halves keep the alignment of the whole and every 32-byte
    // access at `k < half / 32` (two per line, `k` even) stays inside its half.
    unsafe {
        let mut k = 0;
        while k < half / 32 {
            let a = _mm256_load_si256(s0.add(k));
            let b = _mm256_load_si256(s0.add(k + 1));
            let c = _mm256_load_si256(s1.add(k));
            let e = _mm256_load_si256(s1.add(k + 1));
            _mm256_stream_si256(d0.add(k), a);
            _mm256_stream_si256(d0.add(k + 1), b);
            _mm256_stream_si256(d1.add(k), c);
            _mm256_stream_si256(d1.add(k + 1), e);
            k += 2;
        }
        _mm_sfence();
    }
}

/// `vm.max_map_count`: the most mappings a process may hold.
pub fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

/// The CPUs the calling thread may run on, in order (empty if the kernel does not say).
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread to `cpu`.
///
/// # Errors
/// The errno of `sched_setaffinity(2)` (`EINVAL` for a CPU the thread may not use).
pub fn pin_to_cpu(cpu: usize) -> Result<(), Errno> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush writes dirty lines back: every byte reads as written after it, unaligned
    /// ends included.
    #[test]
    fn flushed_lines_keep_their_data() {
        let buf: Vec<u8> = (0..(1 << 20) + 77).map(|i| (i * 7 + 3) as u8).collect();
        // SAFETY: `buf` is ours and readable throughout.
        let flushed = unsafe { flush_cache(buf.as_ptr() as usize + 5, buf.len() - 5) };
        assert_eq!(flushed, cfg!(target_arch = "x86_64"));
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i * 7 + 3) as u8));
    }

    #[test]
    fn aligned_mapping_is_aligned_and_usable() {
        let addr = mmap_anon_aligned(HPAGE_SIZE, HPAGE_SIZE).unwrap();
        assert_eq!(addr % HPAGE_SIZE, 0);
        madvise(addr, HPAGE_SIZE, Advice::PopulateWrite).unwrap();
        // SAFETY: the mapping is ours and populated.
        unsafe {
            *(addr as *mut u64) = 7;
            assert_eq!(*(addr as *const u64), 7);
            munmap(addr, HPAGE_SIZE).unwrap();
        }
    }

    #[test]
    fn non_temporal_copy_copies_every_byte_on_each_path() {
        let src = Mapping::new(1 << 20, HPAGE_SIZE).unwrap();
        let dst = Mapping::new(1 << 20, HPAGE_SIZE).unwrap();
        for i in 0..src.len() / 8 {
            src.word(i)
                .unwrap()
                .store((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), std::sync::atomic::Ordering::Relaxed);
        }
        // (offset, len): the two-stream AVX2 path (whole, and with halves of an odd number
        // of lines), the one-stream AVX2 path, the SSE path (len not a multiple of 128), the
        // plain path (short or unaligned). Bytes around the range must stay as they were.
        let cases =
            [(0, 1 << 19), (128, (64 << 10) + 128), (8192, 8192), (4096, 4096 + 64), (64, 192), (8, 4096), (0, 100)];
        for (off, len) in cases {
            // SAFETY: both ranges lie inside our two private mappings.
            unsafe {
                std::ptr::write_bytes(dst.addr() as *mut u8, 0xaa, dst.len());
                copy_bytes_nt(dst.addr() + off, src.addr() + off, len);
            }
            for b in off.saturating_sub(64)..(off + len + 64) {
                // SAFETY: reading our own mappings, no other thread touches them.
                let (x, y) = unsafe { (*((src.addr() + b) as *const u8), *((dst.addr() + b) as *const u8)) };
                if (off..off + len).contains(&b) {
                    assert_eq!(x, y, "byte {b} of ({off}, {len})");
                } else {
                    assert_eq!(y, 0xaa, "byte {b} outside ({off}, {len}) was written");
                }
            }
        }
    }

    #[test]
    fn move_pages_query_reports_a_node() {
        let addr = mmap_anon(PAGE_SIZE).unwrap();
        madvise(addr, PAGE_SIZE, Advice::PopulateWrite).unwrap();
        let mut status = [-1];
        move_pages(&[addr], None, &mut status).unwrap();
        assert!(status[0] >= 0, "status {}", status[0]);
        assert_eq!(get_mempolicy_node(addr).unwrap(), status[0] as u32);
        // SAFETY: the mapping is ours.
        unsafe { munmap(addr, PAGE_SIZE).unwrap() };
    }

    #[test]
    fn huge_ranges_find_huge_pages_and_only_them() {
        let len = 4 * HPAGE_SIZE;
        let huge = crate::region::Region::new(len, HPAGE_SIZE, None).unwrap();
        let small = crate::region::Region::new(len, PAGE_SIZE, None).unwrap();
        assert!(huge_ranges(small.addr(), small.addr() + len).unwrap().is_empty());
        let found = huge_ranges(huge.addr(), huge.addr() + len).unwrap();
        // The kernel may not find a huge page for every 2 MiB; what it reports lies inside,
        // 2 MiB aligned, and matches smaps.
        for &(s, e) in &found {
            assert!(huge.addr() <= s && e <= huge.addr() + len && s % HPAGE_SIZE == 0 && e % HPAGE_SIZE == 0);
        }
        let bytes: usize = found.iter().map(|(s, e)| e - s).sum();
        assert_eq!(bytes as u64, huge.anon_huge_bytes().unwrap(), "{found:x?}");
        // Part of a huge page: reported clipped to the range asked.
        if let Some(&(s, _)) = found.first() {
            assert_eq!(huge_ranges(s + PAGE_SIZE, s + 2 * PAGE_SIZE).unwrap(), [(s + PAGE_SIZE, s + 2 * PAGE_SIZE)]);
        }
    }

    #[test]
    fn mbind_rejects_nodes_beyond_the_mask() {
        let addr = mmap_anon(PAGE_SIZE).unwrap();
        assert_eq!(mbind(addr, PAGE_SIZE, 5000, false), Err(Errno::INVAL));
        // SAFETY: the mapping is ours.
        unsafe { munmap(addr, PAGE_SIZE).unwrap() };
    }
}

