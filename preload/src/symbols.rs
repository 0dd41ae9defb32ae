//! The symbols the library exports: libnuma's `move_pages`, `mbind` and `migrate_pages`, which it
//! interposes, and [`pagemig_preload_summary`].
#![expect(unsafe_code, reason = "the C ABI: raw pointers from C callers")]

use std::ffi::{c_char, c_int, c_long, c_uint, c_ulong, c_void};

use pagemig::ffi::{self, Route, boundary};

use crate::config;
use crate::mbind::{self, Args};
use crate::migrate;
use crate::summary::{self, Symbol, Whole};
use crate::worker::{self, Call};

/// `move_pages(2)`, as libnuma's `move_pages`: moves the `count` pages at `pages[i]` of
/// process `pid` to nodes `nodes[i]` (only reports where they are with `nodes` NULL) and
/// writes each page's node or negative errno in `status[i]`; returns the number of pages
/// not moved, or `-1` with `errno`.
///
/// pagemig serves the calling process (`pid` 0 or its own) when `PAGEMIG_PRELOAD` is set;
/// the kernel everything else, and whatever pagemig does not move itself. Async-signal-safe,
/// as the system call: the calling thread blocks every signal for the length of the call
/// and the call is served on pagemig's worker thread ([`crate::worker`]).
///
/// # Safety
/// As `move_pages(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn move_pages(
    pid: c_int,
    count: c_ulong,
    pages: *mut *mut c_void,
    nodes: *const c_int,
    status: *mut c_int,
    flags: c_int,
) -> c_long {
    let errno = ffi::KeptErrno::new();
    let blocked = ffi::SignalsBlocked::new();
    let result = ffi::caught(|| {
        summary::call(Symbol::MovePages);
        // SAFETY: the caller's arguments as they came.
        let kernel = || unsafe { ffi::kernel_move_pages(pid, count, pages, nodes, status, flags) };
        let whole = |why| {
            summary::whole(why, count);
            kernel()
        };
        if !config::enabled() {
            return whole(Whole::Disabled);
        }
        // SAFETY: getpid has no preconditions.
        if pid != 0 && pid != unsafe { libc::getpid() } {
            return whole(Whole::OtherProcess);
        }
        // A call pagemig may serve needs room for pagemig's threads and batches first; so
        // does any call the worker takes (a query too), which may start it.
        let candidate = flags & !ffi::MPOL_MF_MOVE == 0 && count != 0 && !nodes.is_null();
        if !worker::room() {
            return whole(if candidate { Whole::NoMemory } else { Whole::NotAMove });
        }
        worker::run(Call::MovePages { count, pages, nodes, status, flags })
            .unwrap_or_else(|| whole(Whole::PagemigFailed))
    });
    // Signals that arrived during the call are delivered now, before errno is set.
    drop(blocked);
    errno.answer(result)
}

/// Serves a `move_pages` call of the calling process, on the worker.
pub(crate) fn serve_move_pages(
    count: c_ulong,
    pages: *mut *mut c_void,
    nodes: *const c_int,
    status: *mut c_int,
    flags: c_int,
) -> Result<c_long, pagemig::Errno> {
    // A call pagemig may serve opens the engine (which applies PAGEMIG_ATTRS), after
    // asking the kernel which of the call's pages are mapped; the others go to the kernel
    // as they are.
    // SAFETY: the calling thread waits, signals blocked, while its pages move; the arrays
    // are as the caller promised move_pages(2).
    let (result, route) = unsafe { ffi::move_pages(count, pages, nodes, status, flags) };
    config::note_engine();
    let why = match route {
        Route::Pagemig => {
            summary::served(Symbol::MovePages);
            return result;
        }
        // The kernel served what pagemig did not, and answered: the answer is the
        // kernel's (ENODEV for a bad node, EFAULT for arrays that end early or a status it
        // cannot write).
        Route::PagemigThenKernel => Whole::PagemigFailed,
        Route::KernelMoveAll => Whole::MoveAll,
        Route::KernelNoUserfaultfd => Whole::NoUserfaultfd,
        Route::KernelUnreadable => Whole::Unreadable,
        Route::KernelNoMemory => Whole::NoMemory,
        Route::KernelPlain => Whole::NotAMove,
    };
    summary::whole(why, count);
    result
}

/// `mbind(2)`, as libnuma's `mbind`: sets the memory policy `mode` (with its `MPOL_F_*`
/// flags) over the nodes of `nodemask` (`maxnode` bits of it, as the kernel counts them)
/// on `len` bytes from `addr`; with `MPOL_MF_MOVE` in `flags`, moves the pages of the
/// range that do not conform, and with `MPOL_MF_STRICT` fails with `EIO` when some could
/// not be moved. Returns `0`, or `-1` with `errno`.
///
/// pagemig moves the private anonymous pages when `PAGEMIG_PRELOAD` is set and the policy
/// names one node; the kernel sets the policy and does everything else. Async-signal-safe,
/// as [`move_pages`].
///
/// # Safety
/// As `mbind(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mbind(
    addr: *mut c_void,
    len: c_ulong,
    mode: c_int,
    nodemask: *const c_ulong,
    maxnode: c_ulong,
    flags: c_uint,
) -> c_long {
    let errno = ffi::KeptErrno::new();
    let blocked = ffi::SignalsBlocked::new();
    let result = ffi::caught(|| {
        summary::call(Symbol::Mbind);
        let args = Args { addr, len, mode, nodemask, maxnode, flags, huge_edges: (false, false) };
        let whole = |why| {
            summary::whole(why, args.pages());
            args.kernel(args.flags)
        };
        if !config::enabled() {
            return whole(Whole::Disabled);
        }
        if flags & mbind::MPOL_MF_MOVE_ALL != 0 {
            return whole(Whole::MoveAll);
        }
        if flags & mbind::MPOL_MF_MOVE == 0 {
            return whole(Whole::NotAMove);
        }
        if !worker::room() {
            return whole(Whole::NoMemory);
        }
        // 1. The kernel checks the arguments and sets the policy, moving nothing (see
        // `mbind`), here on the calling thread, before the worker or the engine is started:
        // their stacks must not land on a page the program has just unmapped and make a
        // range the kernel refuses (EFAULT) look mapped. A raw system call:
        // async-signal-safe.
        let args = args.with_huge_edges();
        if let Err(errno) = args.set_policy() {
            summary::whole(Whole::NotAMove, args.pages());
            return Err(errno);
        }
        worker::run(Call::Mbind(args)).unwrap_or_else(|| whole(Whole::PagemigFailed))
    });
    // As in move_pages.
    drop(blocked);
    errno.answer(result)
}

/// `migrate_pages(2)`, as libnuma's `migrate_pages`: moves every page of process `pid` that
/// is on a node of `old_nodes` to the node of `new_nodes` the kernel maps it to (`maxnode`
/// bits of each mask, as the kernel counts them); returns the number of pages that could
/// not be moved, or `-1` with `errno`.
///
/// pagemig moves the calling process's private anonymous pages when `PAGEMIG_PRELOAD` is
/// set and `new_nodes` names one node (see `migrate`); the kernel checks the arguments
/// first and moves everything else. Async-signal-safe, as [`move_pages`].
///
/// # Safety
/// As `migrate_pages(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn migrate_pages(
    pid: c_int,
    maxnode: c_ulong,
    old_nodes: *const c_ulong,
    new_nodes: *const c_ulong,
) -> c_long {
    let errno = ffi::KeptErrno::new();
    let blocked = ffi::SignalsBlocked::new();
    let result = ffi::caught(|| {
        summary::call(Symbol::MigratePages);
        let args = migrate::Args { pid, maxnode, old_nodes, new_nodes };
        let whole = |why| {
            summary::whole(why, 0);
            args.kernel()
        };
        if !config::enabled() {
            return whole(Whole::Disabled);
        }
        // SAFETY: getpid has no preconditions.
        if pid != 0 && pid != unsafe { libc::getpid() } {
            return whole(Whole::OtherProcess);
        }
        if !worker::room() {
            return whole(Whole::NoMemory);
        }
        // 1. The kernel checks the arguments, moving nothing, here on the calling thread
        // before the worker or the engine is started (as mbind's first step).
        if let Err(errno) = args.check() {
            summary::whole(Whole::NotAMove, 0);
            return Err(errno);
        }
        worker::run(Call::MigratePages(args)).unwrap_or_else(|| whole(Whole::PagemigFailed))
    });
    // As in move_pages.
    drop(blocked);
    errno.answer(result)
}

/// Writes the summary of what the library did in this process so far (the text
/// `PAGEMIG_SUMMARY` writes at exit: one `label: value` a line) into `buf` as a
/// NUL-terminated string, truncated to `len` bytes. Returns the length of the whole text,
/// as `snprintf` does (a return of `len` or more means it was truncated), or `-1` with
/// `errno` `EFAULT` for a NULL `buf` with a non-zero `len`.
///
/// # Safety
/// `buf` must be writable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagemig_preload_summary(buf: *mut c_char, len: usize) -> c_long {
    boundary(|| {
        let text = summary::text();
        if len > 0 {
            if buf.is_null() {
                return Err(pagemig::Errno::FAULT);
            }
            let n = text.len().min(len - 1);
            // SAFETY: `buf` holds `len` bytes (the caller's promise); `n + 1` is at most that.
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, n);
                *buf.add(n) = 0;
            }
        }
        Ok(text.len() as c_long)
    })
}
