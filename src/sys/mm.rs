//! Memory mappings: anonymous mappings, unmapping, advice, locking, and the limits and
//! stacks of this process's address space.

use std::ffi::c_void;

use super::{Errno, PAGE_SIZE, check_int, last_errno};

/// Maps `len` bytes of fresh anonymous private read-write memory (`mmap(2)` with
/// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
///
/// # Errors
/// The `mmap` errno, e.g. `ENOMEM`.
#[cfg(any(test, feature = "internals"))]
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
    mmap_aligned(len, align, libc::PROT_READ | libc::PROT_WRITE)
}

/// [`mmap_anon_aligned`], inaccessible (`PROT_NONE`): address space reserved, which neither
/// `mlockall` nor a locked process's next mappings populate; [`open_reserved`] makes parts
/// of it read-write.
///
/// # Errors
/// The `mmap`/`munmap` errno.
pub fn mmap_reserve_aligned(len: usize, align: usize) -> Result<usize, Errno> {
    mmap_aligned(len, align, libc::PROT_NONE)
}

/// Unlocks `[addr, addr + len)` (`munlock(2)`): no change where it is not locked.
///
/// # Errors
/// The `munlock` errno.
pub fn munlock(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: `munlock` never changes memory contents.
    check_int(unsafe { libc::munlock(addr as *const c_void, len) })
}

/// Makes `[addr, addr + len)` of a reservation of ours read-write, unlocked first (a
/// program's `mlockall` locks every mapping, and a locked mapping made writable is
/// populated whole at once: pagemig's reservations must not be).
///
/// # Errors
/// The `munlock`/`mprotect` errno.
pub fn open_reserved(addr: usize, len: usize) -> Result<(), Errno> {
    munlock(addr, len)?;
    // SAFETY: `mprotect` changes no memory contents; the range is the caller's reservation.
    check_int(unsafe { libc::mprotect(addr as *mut c_void, len, libc::PROT_READ | libc::PROT_WRITE) })
}

fn mmap_aligned(len: usize, align: usize, prot: libc::c_int) -> Result<usize, Errno> {
    debug_assert!(align.is_power_of_two());
    if align <= PAGE_SIZE {
        return mmap_anon_prot(len, prot);
    }
    let total = len.checked_add(align).ok_or(Errno::NOMEM)?;
    let raw = mmap_anon_prot(total, prot)?;
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
    crate::sys::own::disclaim(addr, len);
    // SAFETY: the caller owns the range and promises that nothing uses it any more.
    check_int(unsafe { libc::munmap(addr as *mut c_void, len) })
}

/// Reserves `len` bytes of inaccessible address space (`PROT_NONE`), to be replaced with
/// `MREMAP_FIXED` or opened with [`open_reserved`].
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
    /// `MADV_COLLAPSE`: map the range's base pages with huge pages now, copied into huge
    /// pages allocated where most of them are (the same bytes; refused for a mapping advised
    /// `MADV_NOHUGEPAGE`, and where no huge page can be had).
    Collapse,
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
        Advice::Collapse => linux_raw_sys::general::MADV_COLLAPSE as i32,
    };
    // SAFETY: the advice values above never change the contents of memory, only how it
    // is backed (a collapse copies the pages' bytes into the huge page that replaces them); an unmapped range gets ENOMEM from the kernel.
    check_int(unsafe { libc::madvise(addr as *mut c_void, len, advice) })
}

/// Whether any mapping over `[addr, addr + len)` is locked (`VM_LOCKED`: `mlock`,
/// `mlock2`, `mlockall`, `MAP_LOCKED`), asked with `msync(MS_INVALIDATE)`, which the kernel
/// refuses with `EBUSY` over a locked mapping and which does nothing to private anonymous
/// memory otherwise: one system call, where `/proc/self/smaps` walks every page of the
/// process.
///
/// # Errors
/// `ENOMEM` when part of the range is not mapped, `EINVAL` for an unaligned address.
pub fn any_locked(addr: usize, len: usize) -> Result<bool, Errno> {
    // SAFETY: MS_INVALIDATE alone writes nothing back and changes no memory; bad ranges get
    // ENOMEM or EINVAL.
    match check_int(unsafe { libc::msync(addr as *mut c_void, len, libc::MS_INVALIDATE) }) {
        Ok(()) => Ok(false),
        Err(Errno::BUSY) => Ok(true),
        Err(errno) => Err(errno),
    }
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

/// The calling thread's stack as `(start, end)`, from `pthread_getattr_np`, asked once per
/// thread: for the main thread, glibc reads the whole of `/proc/self/maps` to answer (about
/// a microsecond and a half per mapping of the process here), and a thread's stack does
/// not move. (The main thread's answer spans the stack's growth limit, `RLIMIT_STACK` when
/// first asked; its mapping, `[stack]`, is refused as a special mapping besides.)
pub fn current_thread_stack() -> Option<(usize, usize)> {
    thread_local! {
        /// The answer, once asked.
        static STACK: std::cell::Cell<Option<Option<(usize, usize)>>> = const { std::cell::Cell::new(None) };
    }
    STACK.with(|s| {
        s.get().unwrap_or_else(|| {
            let stack = ask_thread_stack();
            s.set(Some(stack));
            stack
        })
    })
}

/// The calling thread's stack as `(start, end)`, from `pthread_getattr_np`.
fn ask_thread_stack() -> Option<(usize, usize)> {
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

/// `vm.max_map_count`: the most mappings a process may hold.
pub fn max_map_count() -> usize {
    super::read_text("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}
