//! What pagemig's C entry points share (`libpagemig` in `capi/`, `libpagemig-preload` in
//! `preload/`): `errno`, a boundary no panic crosses, the caller's arrays read and written
//! the way the kernel reads and writes them, and `move_pages(2)` for the calling process
//! from C's raw arguments, served by pagemig or handed to the kernel.
//!
//! The caller's arrays are copied in and out with `process_vm_readv`/`process_vm_writev` on
//! the calling process: an array that cannot be read or written gets `EFAULT`, as from the
//! kernel, never a crash, and nothing of the caller's memory is touched while its pages
//! move (an array may lie in the very pages it names).
#![expect(unsafe_code, reason = "C callers' raw pointers, errno and the kernel's own system calls")]

use std::ffi::{c_int, c_long, c_ulong, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::migrate::Engine;
use crate::sys::Errno;

/// `MPOL_MF_MOVE`: move the pages only this process maps.
pub const MPOL_MF_MOVE: c_int = 1 << 1;
/// `MPOL_MF_MOVE_ALL`: move pages other processes map too (needs `CAP_SYS_NICE`).
pub const MPOL_MF_MOVE_ALL: c_int = 1 << 2;

/// Sets the calling thread's `errno`.
pub fn set_errno(errno: Errno) {
    // SAFETY: `__errno_location` returns the calling thread's errno, always valid.
    unsafe { *libc::__errno_location() = errno.raw_os_error() };
}

/// The calling thread's `errno`, as the last failed call left it.
pub fn last_errno() -> Errno {
    crate::sys::last_errno()
}

/// Turns a system call's return into a result: negative is the `errno` it set.
pub fn check(ret: c_long) -> Result<c_long, Errno> {
    crate::sys::check(ret)
}

/// Runs `f` at the C boundary: `Ok(n)` is `n`, `Err(errno)` is `-1` with `errno` set, and
/// a panic is `-1` with `errno` `ECANCELED`.
pub fn boundary(f: impl FnOnce() -> Result<c_long, Errno>) -> c_long {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(n)) => n,
        Ok(Err(errno)) => {
            set_errno(errno);
            -1
        }
        Err(_) => {
            set_errno(Errno::CANCELED);
            -1
        }
    }
}

/// One `process_vm_readv`/`process_vm_writev` on the calling process: `local` and
/// `remote` `len` bytes each; what it transferred.
fn vm_copy(local: *mut c_void, remote: *mut c_void, len: usize, write: bool) -> Result<usize, Errno> {
    let l = libc::iovec { iov_base: local, iov_len: len };
    let r = libc::iovec { iov_base: remote, iov_len: len };
    // SAFETY: the kernel checks `remote` against this process's mappings (EFAULT when it is
    // not mapped or not readable/writable); `local` is a buffer of ours of `len` bytes.
    let n = unsafe {
        if write {
            libc::process_vm_writev(libc::getpid(), &l, 1, &r, 1, 0)
        } else {
            libc::process_vm_readv(libc::getpid(), &l, 1, &r, 1, 0)
        }
    };
    if n < 0 { Err(last_errno()) } else { Ok(n as usize) }
}

/// Copies `count` elements at `ptr` of the calling process, as the kernel's `copy_from_user`
/// reads a caller's array.
///
/// # Errors
/// `EFAULT` when part of the array cannot be read; `ENOSYS` or `EPERM` where
/// `process_vm_readv` is not allowed (a sandbox), which callers answer by handing the call
/// to the kernel.
pub fn read_user<T: Copy + Default>(ptr: *const T, count: usize) -> Result<Vec<T>, Errno> {
    let mut out = vec![T::default(); count];
    let len = count.checked_mul(size_of::<T>()).ok_or(Errno::FAULT)?;
    let mut done = 0;
    while done < len {
        let n = vm_copy(
            out.as_mut_ptr().cast::<u8>().wrapping_add(done).cast(),
            ptr.cast::<u8>().wrapping_add(done) as *mut c_void,
            len - done,
            false,
        )?;
        if n == 0 {
            return Err(Errno::FAULT);
        }
        done += n;
    }
    Ok(out)
}

/// Writes `values` to the calling process's memory at `ptr`, as the kernel's `copy_to_user`.
///
/// # Errors
/// As [`read_user`], for memory that cannot be written.
pub fn write_user<T: Copy>(ptr: *mut T, values: &[T]) -> Result<(), Errno> {
    let len = size_of_val(values);
    let mut done = 0;
    while done < len {
        let local = values.as_ptr().cast::<u8>().wrapping_add(done).cast_mut().cast();
        let n = vm_copy(local, ptr.cast::<u8>().wrapping_add(done).cast(), len - done, true)?;
        if n == 0 {
            return Err(Errno::FAULT);
        }
        done += n;
    }
    Ok(())
}

/// The kernel's `move_pages(2)` for process `pid`, with the caller's arrays as they came.
///
/// # Errors
/// The errno the kernel returns.
///
/// # Safety
/// As `move_pages(2)`: the arrays hold `count` elements (the kernel checks they are
/// mapped); the pages move with their contents.
pub unsafe fn kernel_move_pages(
    pid: c_int,
    count: c_ulong,
    pages: *const *mut c_void,
    nodes: *const c_int,
    status: *mut c_int,
    flags: c_int,
) -> Result<c_long, Errno> {
    // SAFETY: the caller's arrays are handed on as they came; the kernel checks them.
    check(unsafe { libc::syscall(libc::SYS_move_pages, pid, count, pages, nodes, status, flags) })
}

/// Which way a [`move_pages`] call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through pagemig's engine ([`Engine::move_pages`]), which hands the pages it does not
    /// move itself to the kernel page by page.
    Pagemig,
    /// To the kernel whole: `count` 0, a status query, flags the kernel refuses, arrays
    /// that cannot be read (the kernel's `EFAULT`).
    KernelPlain,
    /// To the kernel whole: `process_vm_readv` may not read the caller's arrays (a
    /// sandbox that forbids it).
    KernelUnreadable,
    /// To the kernel whole: `MPOL_MF_MOVE_ALL`.
    KernelMoveAll,
    /// To the kernel whole: userfaultfd is not available to this process.
    KernelNoUserfaultfd,
}

/// `move_pages(2)` for the calling process (pid 0) from C's raw arguments: pages pagemig
/// moves itself go through [`Engine::move_pages`], the rest to the kernel; the result and
/// which way the call went.
///
/// A status query (`nodes` NULL), `count` 0, flags other than `MPOL_MF_MOVE`,
/// `MPOL_MF_MOVE_ALL`, arrays that cannot be read and a process without userfaultfd go to
/// the kernel whole, which answers them as it would have; a `status` array that cannot be
/// written is `EFAULT` once the pages moved, as from the kernel.
///
/// # Errors
/// As `move_pages(2)`; with [`Route::Pagemig`], also the engine's errors (`ENODEV` for a
/// node without memory, checked before any page moves; the errno of reading the process's
/// mappings).
///
/// # Safety
/// The calling thread is inside this call while its pages move: nothing else on it
/// accesses them meanwhile. The arrays are as for `move_pages(2)`.
pub unsafe fn move_pages(
    count: c_ulong,
    pages: *const *mut c_void,
    nodes: *const c_int,
    status: *mut c_int,
    flags: c_int,
) -> (Result<c_long, Errno>, Route) {
    // SAFETY: forwarded from the caller's contract.
    let kernel = || unsafe { kernel_move_pages(0, count, pages, nodes, status, flags) };
    if flags & !(MPOL_MF_MOVE | MPOL_MF_MOVE_ALL) != 0 {
        return (kernel(), Route::KernelPlain);
    }
    if flags & MPOL_MF_MOVE_ALL != 0 {
        return (kernel(), Route::KernelMoveAll);
    }
    if count == 0 || nodes.is_null() {
        return (kernel(), Route::KernelPlain);
    }
    let Ok(engine) = Engine::global() else {
        return (kernel(), Route::KernelNoUserfaultfd);
    };
    let Ok(n) = usize::try_from(count) else {
        return (kernel(), Route::KernelPlain);
    };
    let (addrs, targets) = match (read_user(pages.cast::<usize>(), n), read_user(nodes, n)) {
        (Ok(a), Ok(t)) => (a, t),
        (Err(Errno::FAULT), _) | (_, Err(Errno::FAULT)) => return (kernel(), Route::KernelPlain),
        _ => return (kernel(), Route::KernelUnreadable),
    };
    let mut out = vec![0; n];
    // SAFETY: the calling thread is inside this call and does not access the pages while
    // they move; the arrays are copies of ours.
    let result = match unsafe { engine.move_pages(&addrs, Some(&targets), &mut out) } {
        Ok(left) => write_user(status, &out).map(|()| left as c_long),
        Err(e) => Err(e.errno()),
    };
    (result, Route::Pagemig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_read_and_written_or_efault() {
        let words: Vec<u64> = (0..1000).collect();
        assert_eq!(read_user(words.as_ptr(), words.len()).unwrap(), words);
        assert_eq!(read_user(std::ptr::null::<u64>(), 4), Err(Errno::FAULT));
        assert_eq!(read_user(std::ptr::null::<u64>(), 0), Ok(Vec::new()));
        let mut out = vec![0i32; 3];
        write_user(out.as_mut_ptr(), &[1, 2, 3]).unwrap();
        assert_eq!(out, [1, 2, 3]);
        let ro = crate::sys::mmap_anon(crate::PAGE_SIZE).unwrap();
        // SAFETY: the mapping is ours; read-only from now on.
        assert_eq!(unsafe { libc::mprotect(ro as *mut c_void, crate::PAGE_SIZE, libc::PROT_READ) }, 0);
        assert_eq!(write_user(ro as *mut i32, &[1]), Err(Errno::FAULT));
        // SAFETY: as above.
        unsafe { crate::sys::munmap(ro, crate::PAGE_SIZE).unwrap() };
    }

    #[test]
    fn the_boundary_turns_errors_and_panics_into_errno() {
        assert_eq!(boundary(|| Ok(7)), 7);
        assert_eq!(boundary(|| Err(Errno::NODEV)), -1);
        assert_eq!(last_errno(), Errno::NODEV);
        assert_eq!(boundary(|| panic!("a panic stays on this side")), -1);
        assert_eq!(last_errno(), Errno::CANCELED);
    }
}
