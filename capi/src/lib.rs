//! The C ABI of pagemig: `libpagemig.so` and `libpagemig.a`, declared in `pagemig.h`.
//!
//! [`pagemig_move_pages`] is `move_pages(2)` for the calling process: the same arguments
//! (less the pid), the same per-page status, the same errors. Pages pagemig moves itself go
//! through its batch pipeline; the rest (shared, file-backed and special mappings, pages
//! with `MPOL_MF_MOVE_ALL`, a process where userfaultfd is not available) go to the
//! kernel's own `move_pages(2)`, so a call never fails where the kernel would have served
//! it. Errors are returned (`-1` and `errno`), never printed, and no panic crosses the
//! boundary.
//!
//! Nothing is ever written to the program's standard error: the library's own copy of the
//! Rust runtime (a C library carries one of its own, apart from any Rust code of the
//! program's) gets a panic hook that prints nothing, set by the first call of any entry
//! point. A panic or a failed allocation of pagemig's inside `pagemig_move_pages` hands the
//! call to the kernel, and whatever `count` is, a call takes bounded memory.
#![allow(unsafe_code, reason = "the C ABI: raw pointers from C callers, errno")]

use std::ffi::{CStr, c_char, c_int, c_long, c_ulong, c_void};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use pagemig_core::Engine;
use pagemig_core::Errno;
use pagemig_core::ffi::{self, Route};

/// `MPOL_MF_MOVE`: move the pages only this process maps.
pub const PAGEMIG_MPOL_MF_MOVE: c_int = 1 << 1;
/// `MPOL_MF_MOVE_ALL`: move pages other processes map too (needs `CAP_SYS_NICE`); handed to
/// the kernel's `move_pages(2)` whole.
pub const PAGEMIG_MPOL_MF_MOVE_ALL: c_int = 1 << 2;
const _: () = assert!(PAGEMIG_MPOL_MF_MOVE == ffi::MPOL_MF_MOVE && PAGEMIG_MPOL_MF_MOVE_ALL == ffi::MPOL_MF_MOVE_ALL);

/// What the kernel and this process allow pagemig.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pagemig_capabilities {
    /// 1: userfaultfd is available and pagemig migrates itself; 0: every call goes to the
    /// kernel's `move_pages(2)`.
    pub available: c_int,
    /// 1: only user-mode faults wait, and kernel writes into migrating memory (`read(2)`
    /// into it, `O_DIRECT`) fail with `EFAULT`; 0: they wait like any other access.
    pub user_mode_only: c_int,
    /// 1: never-touched pages are protected without being populated first.
    pub wp_unpopulated: c_int,
}

/// What `pagemig_move_pages` has done in this process so far ([`pagemig_stats`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pagemig_stats {
    /// Calls that named at least one page with a target and went through pagemig.
    pub calls: u64,
    /// Pages those calls named.
    pub pages: u64,
    /// Pages of mappings pagemig moves that were on their target already: left alone.
    pub already_home: u64,
    /// Pages of mappings pagemig moves that were not there to move (`-ENOENT`).
    pub absent: u64,
    /// Pages pagemig moved itself.
    pub moved: u64,
    /// Pages handed to the kernel's `move_pages(2)` because pagemig does not move their
    /// memory: shared, file-backed or special mappings, addresses not mapped, the calling
    /// thread's stack, pages another process maps too.
    pub kernel_unmovable: u64,
    /// Pages pagemig could not move (pinned, mapped by another process) and handed to the
    /// kernel after.
    pub kernel_retried: u64,
    /// Pages that ended a call with an error.
    pub failed: u64,
    /// Calls handed to the kernel whole (`MPOL_MF_MOVE_ALL`, no userfaultfd, arrays a
    /// sandbox forbids `process_vm_readv` to read, an address-space limit that leaves
    /// pagemig too little room).
    pub kernel_calls: u64,
    /// Pages those calls named.
    pub kernel_call_pages: u64,
}

static KERNEL_CALLS: AtomicU64 = AtomicU64::new(0);
static KERNEL_CALL_PAGES: AtomicU64 = AtomicU64::new(0);

/// Runs `f` at the C boundary ([`boundary`]), the library's panics silenced first: this
/// copy of the Rust runtime serves only pagemig's entry points and threads, so its panic
/// hook prints nothing, whoever panics (a panic is caught and becomes an answer).
fn entry(f: impl FnOnce() -> Result<c_long, Errno>) -> c_long {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    // errno as the caller had it where the call succeeds, as a system call leaves it.
    let kept = ffi::KeptErrno::new();
    kept.answer(ffi::caught(f))
}

/// Moves the `count` pages at `pages[i]` of the calling process to nodes `nodes[i]`, and
/// writes each page's outcome in `status[i]`: the node it is on, or a negative errno
/// (`-ENOENT` not present, `-EFAULT` not mapped, `-EBUSY` a folio named again while the
/// call had it queued, as the second 4 KiB page of a huge page, `-EACCES` mapped by another
/// process, `-ENOMEM` no room on the node), exactly as the kernel answers: where a page
/// cannot move (pinned), the call stops as the kernel's does, the statuses of its batch
/// and of every entry after it as the caller left them. With `nodes` NULL, only writes
/// where each page is. `flags` is `0`, `MPOL_MF_MOVE` or `MPOL_MF_MOVE_ALL`, as for
/// `move_pages(2)`.
///
/// Returns `0` when every page is on its node, the number of pages that are not, or `-1`
/// with `errno`: `EINVAL` for other flags, `ENODEV` for a node out of range or without
/// memory, `EFAULT` for arrays that cannot be read or written (as the kernel, the entries
/// before the first bad node or the first entry that cannot be read are served first),
/// `EPERM` for `MPOL_MF_MOVE_ALL` without `CAP_SYS_NICE`. Any `count` takes bounded
/// memory: the arrays are served a chunk at a time.
///
/// Not async-signal-safe: pagemig allocates and takes locks on the calling thread; a signal
/// handler calls `move_pages(2)` (or libnuma's `move_pages`, which `libpagemig-preload.so`
/// serves async-signal-safely).
///
/// # Safety
/// `pages` and `status` (and `nodes`, unless NULL) must point to `count` elements. The
/// calling thread is inside this call while its pages move: nothing else on it accesses
/// them meanwhile, which is what pagemig needs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagemig_move_pages(
    count: c_ulong,
    pages: *const *mut c_void,
    nodes: *const c_int,
    status: *mut c_int,
    flags: c_int,
) -> c_long {
    entry(|| {
        // SAFETY: forwarded from the caller's contract.
        let (result, route) = unsafe { ffi::move_pages(count, pages, nodes, status, flags) };
        if matches!(
            route,
            Route::KernelMoveAll | Route::KernelNoUserfaultfd | Route::KernelUnreadable | Route::KernelNoMemory
        ) {
            KERNEL_CALLS.fetch_add(1, Ordering::Relaxed);
            KERNEL_CALL_PAGES.fetch_add(count, Ordering::Relaxed);
        }
        result
    })
}

/// Reads the attribute `path` (`migrate/max_batch_pages`, `dcbm/nr_dma_chan`, …; see
/// `pagemig attr`) into `buf` as a NUL-terminated string.
///
/// The first call of a process opens its engine, which applies the settings kept in the
/// config file and `PAGEMIG_ATTRS` (see `pagemig attr --help`): the value read is the one
/// the process runs with.
///
/// Returns the length of the value, or `-1` with `errno`: `ENOENT` for an unknown path,
/// `ERANGE` when `len` bytes cannot hold the value and its NUL, `EFAULT` for NULL pointers.
///
/// # Safety
/// `path` must be a NUL-terminated string and `buf` writable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagemig_attr_read(path: *const c_char, buf: *mut c_char, len: usize) -> c_long {
    entry(|| {
        if path.is_null() || buf.is_null() {
            return Err(Errno::FAULT);
        }
        // SAFETY: the caller promises a NUL-terminated string.
        let path = unsafe { CStr::from_ptr(path) }.to_str().map_err(|_| Errno::INVAL)?;
        let value = pagemig_core::attr::read(path).map_err(|e| e.errno())?;
        if value.len() + 1 > len {
            return Err(Errno::RANGE);
        }
        // SAFETY: `buf` holds `len` bytes, more than the value and its NUL (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(value.as_ptr().cast::<c_char>(), buf, value.len());
            *buf.add(value.len()) = 0;
        }
        Ok(value.len() as c_long)
    })
}

/// Writes the attribute `path` from the string `value`, in this process only (after the
/// config file and `PAGEMIG_ATTRS` were applied, so they do not overwrite it); `pagemig
/// attr PATH=VALUE` keeps a setting for every process.
///
/// Returns `0`, or `-1` with `errno`: `ENOENT` for an unknown path, `EACCES` for a
/// read-only one, `EINVAL` for a value it does not accept, `EFAULT` for NULL pointers.
///
/// # Safety
/// `path` and `value` must be NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagemig_attr_write(path: *const c_char, value: *const c_char) -> c_int {
    entry(|| {
        if path.is_null() || value.is_null() {
            return Err(Errno::FAULT);
        }
        // SAFETY: the caller promises NUL-terminated strings.
        let (path, value) = unsafe { (CStr::from_ptr(path), CStr::from_ptr(value)) };
        let (path, value) = (path.to_str().map_err(|_| Errno::INVAL)?, value.to_str().map_err(|_| Errno::INVAL)?);
        pagemig_core::attr::write(path, value).map_err(|e| e.errno())?;
        Ok(0)
    }) as c_int
}

/// Starts this process's agent: a thread that migrates the process's own memory when
/// `pagemig move --pid PID` asks (pagemig's batched copy from inside the process), on the
/// abstract socket `@pagemig-agent.<pid>`, for senders the kernel would let migrate it.
/// Once per process: later calls return `0` at once; a forked child starts its own.
///
/// Returns `0`, or `-1` with `errno`: `EADDRINUSE` when another process holds the socket
/// name, or the errno of binding it or starting the thread.
#[unsafe(no_mangle)]
pub extern "C" fn pagemig_agent_start() -> c_int {
    entry(|| pagemig_core::agent::start().map(|_| 0).map_err(|e| e.errno())) as c_int
}

/// Fills `out` with what the kernel and this process allow pagemig. Returns `0`, or `-1`
/// with `errno` `EFAULT` for a NULL pointer.
///
/// # Safety
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagemig_capabilities(out: *mut pagemig_capabilities) -> c_int {
    entry(|| {
        if out.is_null() {
            return Err(Errno::FAULT);
        }
        let caps = match Engine::global() {
            Ok(e) => {
                let c = e.capabilities();
                pagemig_capabilities {
                    available: 1,
                    user_mode_only: c_int::from(c.user_mode_only),
                    wp_unpopulated: c_int::from(c.wp_unpopulated),
                }
            }
            Err(_) => pagemig_capabilities::default(),
        };
        // SAFETY: the caller promises `out` is writable.
        unsafe { *out = caps };
        Ok(0)
    }) as c_int
}

/// Writes what `pagemig_move_pages` has done in this process so far into `out`: pages
/// pagemig moved, pages handed to the kernel and why, pages left alone. `size` is
/// `sizeof(struct pagemig_stats)` as the caller was built with; the first `size` bytes are
/// written, so a program built against an older header keeps working.
///
/// Returns `0`, or `-1` with `errno` `EFAULT` for a NULL pointer.
///
/// # Safety
/// `out` must be writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagemig_stats(out: *mut pagemig_stats, size: usize) -> c_int {
    entry(|| {
        if out.is_null() {
            return Err(Errno::FAULT);
        }
        let mut stats = pagemig_stats {
            kernel_calls: KERNEL_CALLS.load(Ordering::Relaxed),
            kernel_call_pages: KERNEL_CALL_PAGES.load(Ordering::Relaxed),
            ..Default::default()
        };
        if let Ok(engine) = Engine::global() {
            let p = engine.pages_stats();
            stats.calls = p.calls;
            stats.pages = p.pages;
            stats.already_home = p.already_home;
            stats.absent = p.absent;
            stats.moved = p.moved;
            stats.kernel_unmovable = p.kernel_unmovable;
            stats.kernel_retried = p.kernel_retried;
            stats.failed = p.failed;
        }
        let n = size.min(std::mem::size_of::<pagemig_stats>());
        // SAFETY: the caller promises `out` is writable for `size` bytes; `n` is no more
        // than that nor than the struct read from.
        unsafe { std::ptr::copy_nonoverlapping((&raw const stats).cast::<u8>(), out.cast::<u8>(), n) };
        Ok(0)
    }) as c_int
}
