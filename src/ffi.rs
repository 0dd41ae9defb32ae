//! What pagemig's C entry points share (`libpagemig` in `capi/`, `libpagemig-preload` in
//! `preload/`): `errno`, a boundary no panic crosses, the caller's arrays read and written
//! the way the kernel reads and writes them, and `move_pages(2)` for the calling process
//! from C's raw arguments, served by pagemig or handed to the kernel.
//!
//! The caller's arrays are copied in and out with `process_vm_readv`/`process_vm_writev` on
//! the calling process: an array that cannot be read or written gets `EFAULT`, as from the
//! kernel, never a crash, and nothing of the caller's memory is touched while its pages
//! move (an array may lie in the very pages it names).
//!
//! Whatever `count` a caller passes, a call takes bounded memory: the arrays are read,
//! served and written back [`CHUNK`] entries at a time, as the kernel walks them entry by
//! entry, and every allocation that depends on the caller's input is fallible
//! (`try_reserve`): one that fails, an array that ends before `count` entries, an error
//! or a panic of pagemig's hands what is left of the call to the kernel, whose answer is
//! the call's. Under a finite `RLIMIT_AS` or `RLIMIT_DATA`, pagemig serves a call only
//! when [`HEADROOM`] bytes more could still be mapped ([`headroom`]): an allocation pagemig
//! cannot make fallibly (its threads, its batches) must not meet the limit, which would
//! end the process.
#![expect(unsafe_code, reason = "C callers' raw pointers, errno and the kernel's own system calls")]

use std::ffi::{c_int, c_long, c_ulong, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::migrate::Engine;
use crate::sys::Errno;
pub use crate::sys::thread::{SignalsBlocked, spawn};

/// Entries of the caller's arrays read, served and written back at a time: 512 KiB of
/// addresses, 256 KiB each of nodes and statuses.
pub const CHUNK: usize = 1 << 16;

/// Address space pagemig wants free before it serves a call in a process with a finite
/// `RLIMIT_AS` or `RLIMIT_DATA`: its threads' stacks, its destinations, its batches.
pub const HEADROOM: usize = 128 << 20;

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
    answer(caught(f))
}

/// Runs `f`, a panic caught: `Err(ECANCELED)`. With [`answer`], [`boundary`] in two steps,
/// for an entry point that has something to do between them (restoring its signal mask
/// before `errno` is set, so that a handler run at the unblocking cannot clobber it, as a
/// handler run at the end of a system call runs before the C library sets `errno`).
pub fn caught(f: impl FnOnce() -> Result<c_long, Errno>) -> Result<c_long, Errno> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(Errno::CANCELED))
}

/// The calling thread's `errno` as a call found it, put back when the call succeeds: a
/// system call leaves `errno` alone unless it fails, and so does an entry point that stands
/// in for one, whatever the calls it made meanwhile left there (a futex wait interrupted,
/// a limit read). Taken first thing.
#[derive(Debug)]
pub struct KeptErrno(c_int);

impl KeptErrno {
    /// The calling thread's `errno` now.
    pub fn new() -> Self {
        // SAFETY: `__errno_location` returns the calling thread's errno, always valid.
        Self(unsafe { *libc::__errno_location() })
    }

    /// The C answer to `result`, as [`answer`], with `errno` as it was found where the call
    /// succeeds.
    pub fn answer(self, result: Result<c_long, Errno>) -> c_long {
        let ok = result.is_ok();
        let n = answer(result);
        if ok {
            // SAFETY: as in `new`.
            unsafe { *libc::__errno_location() = self.0 };
        }
        n
    }
}

impl Default for KeptErrno {
    fn default() -> Self {
        Self::new()
    }
}

/// The C answer to `result`: `n`, or `-1` with `errno` set.
pub fn answer(result: Result<c_long, Errno>) -> c_long {
    match result {
        Ok(n) => n,
        Err(errno) => {
            set_errno(errno);
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
/// `EFAULT` when part of the array cannot be read (or `count` elements would not fit in
/// the address space); `ENOMEM` when `count` elements cannot be allocated; `ENOSYS` or
/// `EPERM` where `process_vm_readv` is not allowed (a sandbox), which callers answer by
/// handing the call to the kernel.
pub fn read_user<T: Copy + Default>(ptr: *const T, count: usize) -> Result<Vec<T>, Errno> {
    let len = count.checked_mul(size_of::<T>()).ok_or(Errno::FAULT)?;
    let mut out: Vec<T> = zeroed_vec(count)?;
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

/// `count` default elements, or `ENOMEM` when they cannot be allocated (never an abort).
fn zeroed_vec<T: Copy + Default>(count: usize) -> Result<Vec<T>, Errno> {
    let mut out = Vec::new();
    out.try_reserve_exact(count).map_err(|_| Errno::NOMEM)?;
    out.resize(count, T::default());
    Ok(out)
}

/// Whether pagemig may serve a call now: no finite `RLIMIT_AS` or `RLIMIT_DATA`, or
/// [`HEADROOM`] bytes of private writable memory could still be mapped under them (a
/// mapping made and unmapped again at once: the limit is the kernel's to judge).
pub fn headroom() -> bool {
    let finite = |resource| {
        // SAFETY: `rlimit` is plain data, filled by `getrlimit`.
        let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: a resource constant and a struct of ours.
        unsafe { libc::getrlimit(resource, &mut limit) == 0 && limit.rlim_cur != libc::RLIM_INFINITY }
    };
    if !finite(libc::RLIMIT_AS) && !finite(libc::RLIMIT_DATA) {
        return true;
    }
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses, unmapped below
    // before anything uses it.
    let probe = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            HEADROOM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if probe == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: the mapping made just above, used by nothing.
    unsafe { libc::munmap(probe, HEADROOM) };
    true
}

/// Mappings that must be free under `vm.max_map_count` before pagemig starts in a process
/// (its engine, and the preload's worker): their threads' stacks and guards, their memory,
/// malloc's arenas. Started with fewer, an allocation pagemig cannot make fallibly met the
/// limit and ended the process (`preload/tests/map_limit.c`: 1 to 3 free aborted).
pub const START_MAPPINGS: usize = 64;

/// Whether `mappings` more mappings could still be made under `vm.max_map_count`, the limit
/// being the kernel's to judge: one page of shared anonymous memory mapped, then mapped
/// again at new addresses (`mremap` of 0 bytes, which duplicates a shared mapping) until
/// there are that many, then all unmapped at once. Each is a mapping of its own that can
/// merge with no other (none but these maps that memory, and all at one offset), so no
/// unmapping ever needs a mapping split off, which the limit could refuse. About 1.5 µs a
/// mapping here: for a one-time step such as starting pagemig in a process, not for every
/// call.
pub fn map_slack(mappings: usize) -> bool {
    let mut made: Vec<*mut c_void> = Vec::new();
    if mappings == 0 || made.try_reserve_exact(mappings).is_err() {
        return mappings == 0;
    }
    // SAFETY: a fresh shared anonymous page at an address the kernel chooses, unmapped
    // below before anything uses it.
    let first = unsafe {
        libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_NONE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
    };
    if first == libc::MAP_FAILED {
        return false;
    }
    made.push(first);
    while made.len() < mappings {
        // SAFETY: duplicates our own shared mapping at an address the kernel chooses.
        let p = unsafe { libc::mremap(first, 0, 4096, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            break;
        }
        made.push(p);
    }
    let enough = made.len() == mappings;
    for p in made {
        // SAFETY: a mapping made just above, used by nothing.
        unsafe { libc::munmap(p, 4096) };
    }
    enough
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

/// Whether a huge page, or a larger folio mapped by page entries, lies at an address
/// (async-signal-safe): what the drop-in's `mbind` asks of its range's edges.
pub use crate::sys::{huge_page_at, large_folio_at};

/// A `/proc` or `/sys` file read whole without touching a descriptor of the program's (see
/// `sys::files`).
pub use crate::sys::read_text;

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
    /// pagemig served the first part of the arrays (maybe none of it) and handed the rest
    /// to the kernel, whose answer is the call's: the arrays ended before `count` entries,
    /// a `status` that could not be written, an error or a panic of pagemig's, an
    /// allocation that failed.
    PagemigThenKernel,
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
    /// To the kernel whole: pagemig could not have the memory it needs (a finite
    /// `RLIMIT_AS` or `RLIMIT_DATA` leaves less than [`HEADROOM`], or the first part of
    /// the arrays could not be allocated).
    KernelNoMemory,
}

/// `move_pages(2)` for the calling process (pid 0) from C's raw arguments: pages pagemig
/// moves itself go through [`Engine::move_pages`], the rest to the kernel; the result and
/// which way the call went.
///
/// A status query (`nodes` NULL), `count` 0, flags other than `MPOL_MF_MOVE`,
/// `MPOL_MF_MOVE_ALL`, arrays that cannot be read, a process without userfaultfd and one
/// without [`headroom`] go to the kernel whole, which answers them as it would have.
///
/// The arrays are served [`CHUNK`] entries at a time, in order, as the kernel walks them:
/// where a chunk cannot be served (its entries cannot all be read, its statuses cannot be
/// written, a node is bad, pagemig fails, panics or cannot allocate), the kernel serves
/// the call from that chunk on and its answer is the call's ([`Route::PagemigThenKernel`]):
/// the entries before a bad one move, and the call fails with the kernel's errno
/// (`EFAULT`, `ENODEV`), exactly as from the kernel. Memory taken is bounded by [`CHUNK`]
/// whatever `count` is.
///
/// # Errors
/// As `move_pages(2)`: the kernel's own answer wherever pagemig does not serve a part.
///
/// Where this process's engine is yet to be opened ([`Engine::global_needs_opening`]), the
/// kernel is asked first where the pages are, into arrays of pagemig's own (the caller's
/// `status` is not written before the call's answer): opening the engine maps its
/// threads' stacks, and the first may land on a page the program has just unmapped. A page
/// the kernel did not find mapped then is answered as the kernel answers it, whatever
/// pagemig has mapped there since: its entry is served as an address no mapping can hold.
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
    // The kernel's move_pages from entry `from` on: the part of the call pagemig did not
    // serve.
    // SAFETY: the caller's arrays, offset by entries the call names (`from < count`); the
    // kernel checks every entry it reads or writes.
    let kernel_from = |from: usize| unsafe {
        kernel_move_pages(
            0,
            count - from as c_ulong,
            pages.wrapping_add(from),
            nodes.wrapping_add(from),
            status.wrapping_add(from),
            flags,
        )
    };
    if flags & !(MPOL_MF_MOVE | MPOL_MF_MOVE_ALL) != 0 {
        return (kernel_from(0), Route::KernelPlain);
    }
    if flags & MPOL_MF_MOVE_ALL != 0 {
        return (kernel_from(0), Route::KernelMoveAll);
    }
    if count == 0 || nodes.is_null() {
        return (kernel_from(0), Route::KernelPlain);
    }
    if !headroom() {
        return (kernel_from(0), Route::KernelNoMemory);
    }
    let opening = Engine::global_needs_opening();
    // Opening the engine maps its threads' stacks and memory: not where the kernel would
    // refuse them, and an allocation pagemig cannot make fallibly end the process.
    if opening && !map_slack(START_MAPPINGS) {
        return (kernel_from(0), Route::KernelNoMemory);
    }
    let unmapped = if opening {
        match unmapped_before(count, pages) {
            Ok(unmapped) => Some(unmapped),
            Err(_) => return (kernel_from(0), Route::KernelNoMemory),
        }
    } else {
        None
    };
    let Ok(Ok(engine)) = catch_unwind(Engine::global) else {
        return (kernel_from(0), Route::KernelNoUserfaultfd);
    };
    let mut done = 0usize;
    let mut not_moved: c_long = 0;
    while (done as c_ulong) < count {
        let n = (count - done as c_ulong).min(CHUNK as c_ulong) as usize;
        // SAFETY: as `serve_chunk` requires: the caller's arrays from entry `done`, whose
        // first `n` entries the call names.
        let served = catch_unwind(AssertUnwindSafe(|| unsafe {
            let unmapped = unmapped.as_ref().map(|u| (u, done));
            serve_chunk(
                engine,
                pages.wrapping_add(done),
                nodes.wrapping_add(done),
                status.wrapping_add(done),
                n,
                unmapped,
            )
        }));
        match served {
            // Stopped where the kernel would have: the entries after this chunk are never
            // reached either, and count as not moved.
            Ok(Ok((left, true))) => {
                return (Ok(not_moved + left as c_long + (count as c_long - (done + n) as c_long)), Route::Pagemig);
            }
            Ok(Ok((left, false))) => not_moved += left as c_long,
            // Nothing served yet: the call goes to the kernel whole, for the reason found.
            Ok(Err(Chunk::Unreadable(errno))) if done == 0 => {
                let route = match errno {
                    Errno::FAULT => Route::KernelPlain,
                    Errno::NOMEM => Route::KernelNoMemory,
                    _ => Route::KernelUnreadable,
                };
                return (kernel_from(0), route);
            }
            Ok(Err(_)) | Err(_) => {
                return (kernel_from(done).map(|left| left + not_moved), Route::PagemigThenKernel);
            }
        }
        done += n;
    }
    (Ok(not_moved), Route::Pagemig)
}

/// Why a chunk of a [`move_pages`] call was not served.
enum Chunk {
    /// Its entries could not be read, or not allocated (nothing moved).
    Unreadable(Errno),
    /// pagemig failed, or its statuses could not be written.
    Failed,
}

/// Serves `n` entries of a [`move_pages`] call through `engine`: reads them, moves the
/// pages, writes their statuses; the number of pages not moved, and whether the call
/// stopped there as the kernel's would have (a batch with a page that could not move,
/// [`Engine::move_pages_stopping`]). With `unmapped` (and the
/// chunk's first entry's index in it), the entries the kernel found unmapped before the
/// engine was opened are served as [`NEVER_MAPPED`]: the kernel's `-EFAULT`, after their
/// node is checked as the kernel checks it.
///
/// # Safety
/// As [`move_pages`], for arrays of `n` entries.
unsafe fn serve_chunk(
    engine: &Engine,
    pages: *const *mut c_void,
    nodes: *const c_int,
    status: *mut c_int,
    n: usize,
    unmapped: Option<(&Unmapped, usize)>,
) -> Result<(usize, bool), Chunk> {
    let mut addrs = read_user(pages.cast::<usize>(), n).map_err(Chunk::Unreadable)?;
    let targets = read_user(nodes, n).map_err(Chunk::Unreadable)?;
    if let Some((unmapped, first)) = unmapped {
        for (i, addr) in addrs.iter_mut().enumerate() {
            if unmapped.get(first + i) {
                *addr = NEVER_MAPPED;
            }
        }
    }
    // The caller's statuses as they are: an entry the kernel would leave unwritten keeps
    // its value. Written back unchanged before anything moves: where part of them cannot
    // be written, the kernel serves the chunk, moving the pages of its batches up to the
    // one whose statuses it fails to store, and no further (pagemig, serving the whole
    // chunk before it wrote them, moved pages past it).
    let mut out = read_user(status.cast_const(), n).map_err(|_| Chunk::Unreadable(Errno::FAULT))?;
    write_user(status, &out).map_err(|_| Chunk::Unreadable(Errno::FAULT))?;
    // SAFETY: the calling thread is inside this call and does not access the pages while
    // they move; the arrays are copies of ours.
    let left = unsafe { engine.move_pages_stopping(&addrs, &targets, &mut out) }.map_err(|_| Chunk::Failed)?;
    write_user(status, &out).map_err(|_| Chunk::Failed)?;
    Ok(left)
}

/// An address no mapping of a process can hold (the first of the kernel's half, above any
/// user address with 4- or 5-level page tables, far enough from the top that rounding it
/// up to a huge page cannot wrap): the kernel answers it `-EFAULT`.
const NEVER_MAPPED: usize = 0xffff_8000_0000_0000;

/// The entries of a call's `pages` that the kernel found unmapped, as a bitmap; entries
/// from `len` on were not asked about (the arrays ended there).
struct Unmapped {
    words: Vec<u64>,
    len: usize,
}

impl Unmapped {
    fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] >> (i % 64) & 1 == 1
    }
}

/// Asks the kernel where each page of a call is ([`CHUNK`] entries at a time, its status
/// query into arrays of ours: the caller's `status` is not touched), until the arrays end:
/// which entries no mapping held.
///
/// # Errors
/// `ENOMEM` where the arrays or the bitmap cannot be allocated.
fn unmapped_before(count: c_ulong, pages: *const *mut c_void) -> Result<Unmapped, Errno> {
    let mut out = Unmapped { words: Vec::new(), len: 0 };
    while (out.len as c_ulong) < count {
        let n = (count - out.len as c_ulong).min(CHUNK as c_ulong) as usize;
        // The arrays end here: the serving loop meets the same end and hands the rest of
        // the call to the kernel.
        let Ok(addrs) = read_user(pages.wrapping_add(out.len).cast::<usize>(), n) else { break };
        let mut status: Vec<c_int> = zeroed_vec(n)?;
        // SAFETY: a status query (nothing moves) over arrays of ours of `n` entries.
        let queried = unsafe {
            kernel_move_pages(0, n as c_ulong, addrs.as_ptr().cast(), std::ptr::null(), status.as_mut_ptr(), 0)
        };
        if queried.is_err() {
            break;
        }
        let words = (out.len + n).div_ceil(64);
        out.words.try_reserve(words.saturating_sub(out.words.len())).map_err(|_| Errno::NOMEM)?;
        out.words.resize(words, 0);
        for (i, s) in status.iter().enumerate() {
            if *s == -libc::EFAULT {
                let at = out.len + i;
                out.words[at / 64] |= 1 << (at % 64);
            }
        }
        out.len += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;

    /// An entry point leaves `errno` as it found it when it succeeds, whatever was set
    /// meanwhile, and sets it when it fails.
    #[test]
    fn errno_is_kept_on_success_and_set_on_failure() {
        watchdog(60, || {
            set_errno(Errno::from_raw_os_error(4242 % 4096));
            let kept = KeptErrno::new();
            set_errno(Errno::AGAIN);
            assert_eq!(kept.answer(Ok(3)), 3);
            assert_eq!(last_errno().raw_os_error(), 4242 % 4096);
            let kept = KeptErrno::new();
            assert_eq!(kept.answer(Err(Errno::NODEV)), -1);
            assert_eq!(last_errno(), Errno::NODEV);
        });
    }

    #[test]
    fn arrays_are_read_and_written_or_efault() {
        watchdog(60, || {
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
        });
    }

    /// `n` elements of `T` ending where an inaccessible page starts.
    fn at_end<T>(n: usize) -> *mut T {
        let base = crate::sys::mmap_anon(2 * crate::PAGE_SIZE).unwrap();
        let guard = (base + crate::PAGE_SIZE) as *mut c_void;
        // SAFETY: the second page of our own mapping, made inaccessible.
        assert_eq!(unsafe { libc::mprotect(guard, crate::PAGE_SIZE, libc::PROT_NONE) }, 0);
        (base + crate::PAGE_SIZE - n * size_of::<T>()) as *mut T
    }

    #[test]
    fn a_count_past_the_arrays_gets_the_kernels_answer_in_bounded_memory() {
        watchdog(60, || {
            let memory = crate::sys::mmap_anon(4 * crate::PAGE_SIZE).unwrap();
            let node = crate::numa::memory_nodes().unwrap()[0] as c_int;
            for count in [1 << 36, 1 << 40, 1 << 61, c_ulong::MAX] {
                let mut answers = Vec::new();
                for pagemig in [true, false] {
                    let (pages, nodes, status) = (at_end::<usize>(4), at_end::<c_int>(4), at_end::<c_int>(4));
                    for i in 0..4 {
                        // SAFETY: the four elements of each array, ours.
                        unsafe {
                            *pages.add(i) = memory + i * crate::PAGE_SIZE;
                            *nodes.add(i) = node;
                            *status.add(i) = 0x5555;
                        }
                    }
                    let (pages, status) = (pages.cast::<*mut c_void>(), status);
                    // SAFETY: arrays of ours whose first four entries are readable; nothing
                    // touches the pages meanwhile.
                    let result = unsafe {
                        if pagemig {
                            move_pages(count, pages, nodes, status, 0).0
                        } else {
                            kernel_move_pages(0, count, pages, nodes, status, 0)
                        }
                    };
                    // SAFETY: as above.
                    answers.push((result, unsafe { std::slice::from_raw_parts(status, 4) }.to_vec()));
                }
                assert_eq!(answers[0], answers[1], "count {count:#x}: pagemig's answer, then the kernel's");
                assert_eq!(answers[0].0, Err(Errno::FAULT));
            }
        });
    }

    /// In a forked child (no engine of its own yet: its first call opens one), a call about
    /// 64 MiB the child has just unmapped and 16 pages it holds: the unmapped pages are
    /// answered `-EFAULT` whatever the engine's new threads mapped in the hole.
    #[test]
    fn a_first_call_about_memory_just_unmapped_gets_efault() {
        watchdog(60, || {
            const HOLE: usize = 64 << 20;
            const KEPT: usize = 16;
            let node = crate::numa::memory_nodes().unwrap()[0] as c_int;
            // SAFETY: the child uses its own memory and the engine it opens, and ends with
            // _exit; glibc's fork leaves malloc usable in the child.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let count = HOLE / crate::PAGE_SIZE + KEPT;
                // The arrays first: made later, they could be mapped in the hole.
                let mut pages = vec![std::ptr::null_mut::<c_void>(); count];
                let nodes = vec![node; count];
                let mut status = vec![-99; count];
                let kept = crate::sys::mmap_anon(KEPT * crate::PAGE_SIZE).unwrap();
                let hole = crate::sys::mmap_anon(HOLE).unwrap();
                // SAFETY: our own mappings: touched, then the larger one unmapped.
                unsafe {
                    std::ptr::write_bytes(kept as *mut u8, 7, KEPT * crate::PAGE_SIZE);
                    std::ptr::write_bytes(hole as *mut u8, 7, HOLE);
                    crate::sys::munmap(hole, HOLE).unwrap();
                }
                for (i, p) in pages.iter_mut().enumerate() {
                    let addr =
                        if i < KEPT { kept + i * crate::PAGE_SIZE } else { hole + (i - KEPT) * crate::PAGE_SIZE };
                    *p = addr as *mut c_void;
                }
                // SAFETY: arrays of ours of `count` entries; nothing touches the pages meanwhile.
                let (result, _) = unsafe {
                    move_pages(count as c_ulong, pages.as_ptr(), nodes.as_ptr(), status.as_mut_ptr(), MPOL_MF_MOVE)
                };
                let right = result == Ok(0)
                    && status[..KEPT].iter().all(|&s| s == node)
                    && status[KEPT..].iter().all(|&s| s == -libc::EFAULT);
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(if right { 0 } else { 1 }) };
            }
            let code = crate::process::wait_child(pid, std::time::Duration::from_secs(120), "the child hung");
            assert_eq!(code, 0, "the child's answer differed");
        });
    }

    #[test]
    fn the_boundary_turns_errors_and_panics_into_errno() {
        watchdog(60, || {
            assert_eq!(boundary(|| Ok(7)), 7);
            assert_eq!(boundary(|| Err(Errno::NODEV)), -1);
            assert_eq!(last_errno(), Errno::NODEV);
            assert_eq!(boundary(|| panic!("a panic stays on this side")), -1);
            assert_eq!(last_errno(), Errno::CANCELED);
        });
    }
}
