//! userfaultfd: the user-space stand-in for migration entries, page reference checks and
//! the mmap lock's view of what the program does to its memory.
//!
//! A range registered in `UFFDIO_REGISTER_MODE_WP` and then write-protected with
//! `UFFDIO_WRITEPROTECT` makes every writer — a user store or a kernel write such as
//! `read(2)` into the buffer — sleep in the kernel; registered in missing mode too, an
//! emptied range makes every access sleep. `UFFDIO_MOVE` moves pages between two
//! mappings of the process without copying, and refuses a page that is DMA-pinned or
//! shared with another process (`EBUSY`). After the new pages are moved in, `UFFDIO_WAKE`
//! wakes the sleepers and their faults retry against the new pages.
//!
//! The non-cooperative events `UFFD_EVENT_REMOVE` (`madvise` `DONTNEED`/`FREE`/`REMOVE`, sent
//! before the pages go) and `UFFD_EVENT_REMAP` (`mremap`, sent after the move) of registered
//! ranges hold the thread that caused them until they are read: [`Uffd::read_messages`].
//!
//! The descriptor is opened through `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) and, failing
//! that, through the `userfaultfd(2)` system call. Where only `UFFD_USER_MODE_ONLY` is
//! allowed (an unprivileged process with `vm.unprivileged_userfaultfd = 0`), kernel writes
//! into protected memory fail with `EFAULT` instead of sleeping; [`Uffd::user_mode_only`]
//! reports it.
//!
//! # Whose descriptor
//! A descriptor number is not an identity: a program may close every descriptor
//! (`close_range(3, ~0U, 0)`, daemonising) or `dup2` its own files over them, and its next
//! pipe or socket takes the freed number. Reading there would take the program's bytes.
//! Before every `poll`, `read` and ioctl, [`Uffd`] proves the number still names the file
//! it opened: `fstat` gives the inode of that file (each userfaultfd has an anonymous inode
//! of its own since Linux 5.12, and the kernels with `UFFDIO_MOVE` are later), and, before
//! a `poll` or `read` (a read of the program's file takes its bytes), `kcmp(KCMP_FILE)`
//! compares the number with a second, private descriptor of the same open file kept at a
//! high number (`F_DUPFD_CLOEXEC`), which the program's next `open` does not take. An ioctl
//! checks the inode alone: `kcmp` costs about 1.5 µs here, five times an `fstat`. Once the proof
//! fails, a descriptor entrusted to a [`Vault`] (a thread with a table of its own that keeps
//! the file open, [`Uffd::entrust`]) is taken back from it at a new number, and the number
//! the program took stays the program's: a migration under way goes on, its registrations and
//! protections as they were (released, they lost the data of the pages being moved). Without
//! a vault, or where taking it back fails, the descriptor is *lost* for good: every call
//! answers `EBADF` without touching the number, and the descriptors still proven to be this
//! file (the vault's copy too) are closed, so that the kernel releases the userfaultfd
//! (unregistering its ranges and waking their threads) rather than keep it half in use.
//!
//! What is left is the moment between the proof and the call: a program that closes the number and
//! opens another file there in that instant, from another thread, is not seen.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

use linux_raw_sys::general::{
    UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP, UFFD_FEATURE_MOVE, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_UNPOPULATED, UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WP, UFFD_USER_MODE_ONLY,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP, uffd_msg, uffdio_api, uffdio_copy, uffdio_move,
    uffdio_continue, uffdio_range, uffdio_register, uffdio_writeprotect,
};
use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_CONTINUE, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_WRITEPROTECT,
};

use super::vault::Vault;
use super::{Errno, last_errno};

/// `UFFD_API` from `<linux/userfaultfd.h>`.
const UFFD_API: u64 = 0xaa;
/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
const CONTINUE_MODE_DONTWAKE: u64 = 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const WRITEPROTECT_MODE_WP: u64 = 1;
/// `_IOWR(0xAA, nr, T)`: a userfaultfd ioctl number that reads and writes a `T`.
const fn iowr<T>(nr: u32) -> u32 {
    (3 << 30) | ((size_of::<T>() as u32) << 16) | (0xaa << 8) | nr
}

/// `UFFDIO_MOVE`: `_IOWR(0xAA, 0x05, struct uffdio_move)`.
const UFFDIO_MOVE: u32 = iowr::<uffdio_move>(0x05);

/// A userfaultfd ioctl tied to the structure it takes: [`Uffd::ioctl`] hands the kernel a
/// pointer to exactly that structure. Only the constants below exist.
struct Request<T> {
    number: u32,
    arg: std::marker::PhantomData<fn(&mut T)>,
}

impl<T> Request<T> {
    const fn new(number: u32) -> Self {
        Request { number, arg: std::marker::PhantomData }
    }
}

const MOVE: Request<uffdio_move> = Request::new(UFFDIO_MOVE);
const REGISTER: Request<uffdio_register> = Request::new(UFFDIO_REGISTER);
const UNREGISTER: Request<uffdio_range> = Request::new(UFFDIO_UNREGISTER);
const WRITEPROTECT: Request<uffdio_writeprotect> = Request::new(UFFDIO_WRITEPROTECT);
const COPY: Request<uffdio_copy> = Request::new(UFFDIO_COPY);
const WAKE: Request<uffdio_range> = Request::new(UFFDIO_WAKE);
const CONTINUE: Request<uffdio_continue> = Request::new(UFFDIO_CONTINUE);
/// The features pagemig needs besides write-protection: moving pages, and hearing of
/// `madvise` purges and `mremap`s of registered memory.
const FEATURES: u64 = (UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | UFFD_FEATURE_MOVE
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_UNMAP) as u64;

/// A non-cooperative event of registered memory, as [`Uffd::read_messages`] returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `[start, end)` is about to be purged (`MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`).
    Remove {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// `[start, end)` was unmapped (`munmap`, or a mapping put over it); the thread that did
    /// it waits until this is read, and moves into the range fail with `EAGAIN` meanwhile.
    Unmap {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// A thread touched the empty page at `addr` of a range registered in missing mode and
    /// waits for it to be filled (or woken).
    Missing {
        /// The faulting address.
        addr: usize,
    },
    /// A thread wrote to the write-protected page at `addr` and waits to be woken (or for
    /// the page to be replaced).
    Protected {
        /// The faulting address.
        addr: usize,
    },
    /// `len` bytes at `from` were moved to `to` by `mremap`.
    Remap {
        /// Old address.
        from: usize,
        /// New address.
        to: usize,
        /// Bytes moved.
        len: usize,
    },
}

/// An open userfaultfd descriptor set up for write-protect tracking.
///
/// # Invariants
/// `UFFDIO_API` succeeded on the file `fd` names with at least
/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`. While `lost` is false, `fd` and `keep` were opened
/// here (or fetched back from the vault, [`Uffd::entrust`]) and are closed only by `Drop`
/// or [`Uffd::abandon`]; once it is true, neither number is used again.
#[derive(Debug)]
pub struct Uffd {
    /// The number in the process's table (another one once taken back from the vault).
    fd: AtomicI32,
    identity: Identity,
    lost: AtomicBool,
    user_mode_only: bool,
    wp_unpopulated: bool,
    /// The vault that keeps the file open, and its number there ([`Uffd::entrust`]).
    vault: OnceLock<(Arc<Vault>, RawFd)>,
    /// Held while a lost number is replaced by one from the vault.
    recovering: crate::lock::Mutex<()>,
}

/// What proves that a descriptor number still names the userfaultfd opened here.
#[derive(Debug)]
struct Identity {
    /// `st_dev` and `st_ino` of the file.
    inode: (u64, u64),
    /// A private duplicate of the same open file at a high number (-1: none could be made).
    keep: AtomicI32,
    /// Whether `kcmp(KCMP_FILE)` answers in this process (the kernel may lack it, or a
    /// seccomp filter refuse it): without it the duplicate is checked by its inode too.
    kcmp: bool,
}

/// `KCMP_FILE` from `<linux/kcmp.h>`.
const KCMP_FILE: libc::c_int = 0;

impl Identity {
    /// Records who `fd` is and keeps a duplicate of it.
    ///
    /// # Errors
    /// The `fstat` errno.
    fn of(fd: RawFd) -> Result<Self, Errno> {
        let inode = inode(fd)?;
        let keep = keep_high(fd);
        let kcmp = keep.is_some_and(|k| same_file(fd, k) == Ok(true));
        Ok(Self { inode, keep: AtomicI32::new(keep.unwrap_or(-1)), kcmp })
    }

    /// Whether `fd` still names the file recorded: its inode, and (`kcmp`) the very open
    /// file the duplicate holds. `quick` stops at the inode (one `fstat`, a fraction of
    /// `kcmp`'s cost), which already tells this userfaultfd from every other open file.
    fn proves(&self, fd: RawFd, quick: bool) -> bool {
        if inode(fd) != Ok(self.inode) {
            return false;
        }
        if quick {
            return true;
        }
        // `kcmp` refused (a seccomp filter installed since): the inodes, as without it.
        match self.keep.load(Ordering::Acquire) {
            -1 => true,
            keep if self.kcmp => match same_file(fd, keep) {
                Ok(same) => same,
                Err(Errno::BADF) => false,
                Err(_) => inode(keep) == Ok(self.inode),
            },
            keep => inode(keep) == Ok(self.inode),
        }
    }
}

/// Whether `fd` names a userfaultfd (`anon_inode:[userfaultfd]` in `/proc/self/fd`; where
/// `/proc` cannot say, an anonymous inode). Async-signal-safe.
fn is_userfaultfd(fd: RawFd) -> bool {
    const ANON_INODE_FS_MAGIC: i64 = 0x0904_1934;
    const NAME: &[u8] = b"anon_inode:[userfaultfd]";
    // "/proc/self/fd/" and up to 10 digits, NUL-terminated, on the stack.
    let mut path = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0";
    let mut digits = [0u8; 10];
    let (mut n, mut k) = (fd.max(0) as u32, 0);
    loop {
        digits[k] = b'0' + (n % 10) as u8;
        k += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..k {
        path[14 + i] = digits[k - 1 - i];
    }
    let mut link = [0u8; 64];
    // SAFETY: a NUL-terminated path on the stack; writes at most `link.len()` bytes.
    let len = unsafe { libc::readlink(path.as_ptr().cast(), link.as_mut_ptr().cast(), link.len()) };
    if len < 0 {
        return super::files::fs_magic(fd) == Some(ANON_INODE_FS_MAGIC);
    }
    &link[..len as usize] == NAME
}

/// Sets `O_NONBLOCK` on `fd` (a userfaultfd of ours) where it is not set.
fn nonblocking(fd: RawFd) {
    // SAFETY: `F_GETFL`/`F_SETFL` read and change the flags of our own open file.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// `st_dev` and `st_ino` of the file `fd` names.
pub(super) fn inode(fd: RawFd) -> Result<(u64, u64), Errno> {
    // SAFETY: `stat` is plain data, overwritten by `fstat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fills the struct of ours; `fstat` reads nothing from the file itself.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(last_errno());
    }
    Ok((st.st_dev, st.st_ino))
}

/// `kcmp(pid, pid, KCMP_FILE, a, b)`: whether `a` and `b` name the same open file.
///
/// # Errors
/// `EBADF` where either is not open; `ENOSYS`/`EPERM` where `kcmp` is not available.
fn same_file(a: RawFd, b: RawFd) -> Result<bool, Errno> {
    // SAFETY: `kcmp` takes its arguments by value and only compares kernel objects.
    let pid = unsafe { libc::getpid() };
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    if rc < 0 { Err(last_errno()) } else { Ok(rc == 0) }
}

/// A close-on-exec duplicate of `fd` at a high number (three quarters of the soft
/// `RLIMIT_NOFILE`, or the lowest free one when that is refused), which a program's next
/// `open`, `pipe` or `socket` does not take after it closed its descriptors.
fn keep_high(fd: RawFd) -> Option<RawFd> {
    dup_high(fd).or_else(|| dup_from(fd, 3))
}

/// A close-on-exec duplicate of `fd` at three quarters of the soft `RLIMIT_NOFILE` or above;
/// `None` where none is free there. The floor is asked once per process, and again where
/// the program lowered its limit below it since.
pub(super) fn dup_high(fd: RawFd) -> Option<RawFd> {
    static FLOOR: AtomicI32 = AtomicI32::new(0);
    let floor = || {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: fills the struct of ours.
        let floor = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            (lim.rlim_cur.min(1 << 20) as RawFd / 4 * 3).max(3)
        } else {
            3
        };
        FLOOR.store(floor, Ordering::Relaxed);
        floor
    };
    match FLOOR.load(Ordering::Relaxed) {
        0 => dup_from(fd, floor()),
        // `EINVAL` past the limit: the limit changed.
        known => dup_from(fd, known).or_else(|| (last_errno() == Errno::INVAL).then(|| dup_from(fd, floor())).flatten()),
    }
}

/// A close-on-exec duplicate of `fd` at `floor` or above.
fn dup_from(fd: RawFd, floor: RawFd) -> Option<RawFd> {
    // SAFETY: `F_DUPFD_CLOEXEC` makes a new descriptor of ours and touches no memory.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
    (dup >= 0).then_some(dup)
}

impl Uffd {
    /// Opens a userfaultfd and negotiates `UFFD_FEATURE_PAGEFAULT_FLAG_WP`,
    /// `UFFD_FEATURE_MOVE`, `UFFD_FEATURE_EVENT_REMOVE`, `UFFD_FEATURE_EVENT_REMAP` and,
    /// where the kernel has it, `UFFD_FEATURE_WP_UNPOPULATED`.
    ///
    /// Tries `/dev/userfaultfd` first, then the `userfaultfd(2)` system call, then the
    /// system call with `UFFD_USER_MODE_ONLY` when the full mode is not permitted.
    ///
    /// # Errors
    /// `EPERM`/`EACCES` when no form of userfaultfd is permitted, `EOPNOTSUPP` when the
    /// kernel lacks write-protect support or `UFFDIO_MOVE` (Linux 6.8), or the errno of the
    /// failing step.
    pub fn open() -> Result<Self, Errno> {
        Self::open_again(FEATURES)
    }

    /// [`Uffd::open_with`], again (a few times) where the program took a number on the way.
    fn open_again(features: u64) -> Result<Self, Errno> {
        super::files::again_where_lost(|| Self::open_with(features))
    }

    /// Opens a second userfaultfd for mappings that only ever receive pages with
    /// [`Uffd::move_pages`] (`UFFD_FEATURE_MOVE` alone, no events). A move *into* a mapping
    /// registered here must be issued on this descriptor, so a move on the first one can
    /// never land in such a mapping, wherever it lies.
    ///
    /// # Errors
    /// As [`Uffd::open`].
    pub fn open_for_moves() -> Result<Self, Errno> {
        Self::open_again(UFFD_FEATURE_MOVE as u64)
    }

    fn open_with(features: u64) -> Result<Self, Errno> {
        let (fd, user_mode_only) = match open_dev() {
            Ok(fd) => (fd, false),
            Err(_) => match open_syscall(0) {
                Ok(fd) => (fd, false),
                Err(Errno::PERM) | Err(Errno::ACCESS) => (open_syscall(UFFD_USER_MODE_ONLY as i32)?, true),
                Err(e) => return Err(e),
            },
        };
        let want = features | UFFD_FEATURE_WP_UNPOPULATED as u64;
        let wp_unpopulated = match api(&fd, want) {
            Ok(_) => true,
            Err(Errno::INVAL) => {
                // UFFDIO_API may be called once per descriptor: open a fresh one for the
                // second attempt without WP_UNPOPULATED (kernels before 6.4).
                let fd2 = if user_mode_only {
                    open_syscall(UFFD_USER_MODE_ONLY as i32)?
                } else {
                    open_dev().or_else(|_| open_syscall(0))?
                };
                api(&fd2, features).map_err(|e| if e == Errno::INVAL { Errno::OPNOTSUPP } else { e })?;
                return Self::own(fd2, user_mode_only, false);
            }
            Err(e) => return Err(e),
        };
        Self::own(fd, user_mode_only, wp_unpopulated)
    }

    fn own(fd: OwnedFd, user_mode_only: bool, wp_unpopulated: bool) -> Result<Self, Errno> {
        let identity = Identity::of(fd.as_raw_fd())?;
        // INVARIANT: UFFDIO_API succeeded with the features asked for; the descriptor and
        // its duplicate were opened just now.
        Ok(Self {
            fd: AtomicI32::new(fd.into_raw_fd()),
            identity,
            lost: AtomicBool::new(false),
            user_mode_only,
            wp_unpopulated,
            vault: OnceLock::new(),
            recovering: crate::lock::Mutex::new(()),
        })
    }

    /// The number the descriptor has now, for a [`Vault`] to keep (its number in the
    /// vault's table is this one).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.load(Ordering::Acquire)
    }

    /// From now on, a number of the descriptor the program closes or takes is replaced by
    /// one fetched from `vault`, which holds the file at the number it has now
    /// ([`Vault::new`] was given it), instead of the descriptor being given up; giving it up
    /// releases the vault's copy too.
    pub fn entrust(&self, vault: &Arc<Vault>) {
        let _ = self.vault.set((vault.clone(), self.raw_fd()));
    }

    /// Whether the descriptor is still the userfaultfd opened here (see the module docs).
    /// Once it is not, it is given up ([`Uffd::abandon`]) and this keeps answering `EBADF`.
    ///
    /// # Errors
    /// `EBADF` when the program closed the descriptor or put another file at its number.
    pub fn check(&self) -> Result<(), Errno> {
        self.check_with(false)
    }

    fn check_with(&self, quick: bool) -> Result<(), Errno> {
        self.proven(quick).map(drop)
    }

    /// The number to use, proven (see [`Uffd::check`]); where the program took or closed
    /// the one in hand, a new one from the vault, or `EBADF` (given up) where there is none.
    fn proven(&self, quick: bool) -> Result<RawFd, Errno> {
        if self.lost.load(Ordering::Acquire) {
            return Err(Errno::BADF);
        }
        let fd = self.fd.load(Ordering::Acquire);
        if self.identity.proves(fd, quick) {
            return Ok(fd);
        }
        self.recover().ok_or_else(|| {
            self.abandon();
            Errno::BADF
        })
    }

    /// Replaces the number the program took or closed by the kept duplicate, or by one
    /// fetched from the vault, moved to a high number (the kernel hands out the lowest free
    /// one, which a program that closed its descriptors expects its next `open` to get);
    /// makes a new kept duplicate where that one went. A number still naming this file is
    /// kept (it would be left open, untracked, and hold the userfaultfd open for ever); the
    /// numbers the program took are its own and left alone. Out of descriptors, it tries
    /// again for up to a second (the program may close some) before giving up.
    fn recover(&self) -> Option<RawFd> {
        let _one = self.recovering.lock();
        if self.lost.load(Ordering::Acquire) {
            return None;
        }
        // Another thread may have done it meanwhile.
        let fd = self.fd.load(Ordering::Acquire);
        if self.identity.proves(fd, false) {
            return Some(fd);
        }
        // The number in use still names this userfaultfd (its inode is its own): only the
        // kept duplicate went. A new one, no vault needed.
        if inode(fd) == Ok(self.identity.inode) {
            self.identity.keep.store(dup_high(fd).unwrap_or(-1), Ordering::Release);
            return Some(fd);
        }
        let (vault, at) = self.vault.get()?;
        let mut backoff = crate::backoff::Backoff::kernel().within(std::time::Duration::from_secs(1));
        // A number handed out on the way that the program took meanwhile: again, a few times.
        let mut taken = 8;
        let fetched = loop {
            match vault.fetch(*at, self.identity.inode) {
                Ok(fetched) => break fetched,
                Err(Errno::MFILE | Errno::NFILE) if backoff.pause() => {}
                Err(Errno::BADF) if taken > 0 => taken -= 1,
                Err(_) => return None,
            }
        };
        let close = |n: RawFd| {
            // SAFETY: a descriptor made here and not handed out, ours alone.
            unsafe { libc::close(n) };
        };
        // Which of the numbers held still name this very file (the vault's); not the one
        // just fetched, which may have the number of one the program closed.
        let names = |n: RawFd| {
            n >= 0 && n != fetched && same_file(n, fetched).unwrap_or_else(|_| inode(n) == Ok(self.identity.inode))
        };
        let keep = self.identity.keep.load(Ordering::Acquire);
        let (fd_ok, keep_ok) = (names(fd), names(keep));
        // The fetched number is a high one already where one was free.
        let primary = if fd_ok {
            fd
        } else if keep_ok {
            keep
        } else {
            fetched
        };
        let new_keep = if keep_ok && keep != primary { keep } else { dup_high(fetched).unwrap_or(-1) };
        if primary != fetched {
            close(fetched);
        }
        self.identity.keep.store(new_keep, Ordering::Release);
        self.fd.store(primary, Ordering::Release);
        Some(primary)
    }

    /// Whether the descriptor was given up ([`Uffd::check`] failed, or
    /// [`Uffd::abandon`]); cheaper than [`Uffd::check`], and proves nothing.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Gives the descriptor up: no call uses it again (they answer `EBADF`), and its numbers
    /// that still name this userfaultfd are closed, so that once no descriptor of it is
    /// left the kernel releases it, unregistering its ranges and waking the threads waiting
    /// on them. A number that names another file now is the program's and is left alone.
    pub fn abandon(&self) {
        if self.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        let _one = self.recovering.lock();
        for fd in [self.fd.load(Ordering::Acquire), self.identity.keep.load(Ordering::Acquire)] {
            if fd >= 0 && inode(fd) == Ok(self.identity.inode) {
                // SAFETY: the number names this userfaultfd's file (its inode), and `lost`
                // keeps every other use of it away from now on.
                unsafe { libc::close(fd) };
            }
        }
        if let Some((vault, at)) = self.vault.get() {
            vault.release(*at);
        }
    }

    /// Whether only user-mode faults are handled: kernel writes into protected memory
    /// (`read(2)` into the buffer, `O_DIRECT`, `process_vm_writev`) fail with `EFAULT`
    /// instead of waiting for the migration to finish.
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// Whether never-touched pages are protected too (`UFFD_FEATURE_WP_UNPOPULATED`).
    /// Without it, callers must populate a range before protecting it.
    pub fn wp_unpopulated(&self) -> bool {
        self.wp_unpopulated
    }

    #[cfg(test)]
    /// Registers `[start, start + len)` in write-protect mode (`UFFDIO_REGISTER` with
    /// `UFFDIO_REGISTER_MODE_WP`). Registering a range already registered here is a no-op.
    ///
    /// # Errors
    /// `EBUSY` when another userfaultfd has the range, `EINVAL` for memory that cannot be
    /// registered (not anonymous, unaligned), `ENOMEM` for unmapped holes or past
    /// `vm.max_map_count`.
    pub fn register_wp(&self, start: usize, len: usize) -> Result<(), Errno> {
        self.register(start, len, UFFDIO_REGISTER_MODE_WP as u64)
    }

    /// Registers `[start, start + len)` in missing *and* write-protect mode: besides writes
    /// to protected pages, any access to a page that is not mapped waits (until
    /// [`Uffd::wake`]).
    ///
    /// # Errors
    /// As [`Uffd::register_wp`].
    pub fn register_missing_wp(&self, start: usize, len: usize) -> Result<(), Errno> {
        self.register(start, len, (UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MISSING) as u64)
    }

    /// Registers `[start, start + len)` in missing mode alone: a mapping that only receives
    /// pages with [`Uffd::move_pages`].
    ///
    /// # Errors
    /// As [`Uffd::register_wp`].
    pub fn register_missing(&self, start: usize, len: usize) -> Result<(), Errno> {
        self.register(start, len, UFFDIO_REGISTER_MODE_MISSING as u64)
    }

    /// Moves the pages of `[src, src + len)` to `[dst, dst + len)` without copying them
    /// (`UFFDIO_MOVE`); `dst` must be registered here and empty. Threads waiting on the
    /// destination range are woken.
    ///
    /// # Errors
    /// `(bytes moved before the failure, errno)`: `EBUSY` for a page that is DMA-pinned or
    /// shared with another process (copy-on-write after `fork`), `EINVAL` when the two
    /// mappings differ in access, protection or locking or `dst` is not registered here,
    /// `ENOENT` where either range is not mapped, `EEXIST` where `dst` is not empty,
    /// `EAGAIN`/`EFAULT` for a page that is not present.
    ///
    /// # Safety
    /// Moving pages changes what both ranges hold: nothing may rely on the contents of
    /// `[src, src + len)` afterwards, and `[dst, dst + len)` must be a range whose new
    /// contents nobody is surprised by (memory of ours, or a source whose accesses wait).
    pub unsafe fn move_pages(&self, dst: usize, src: usize, len: usize) -> Result<(), (usize, Errno)> {
        resumable(len, |done| {
            let mut mv = uffdio_move {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: 0,
                move_: 0,
            };
            // SAFETY: a valid uffdio_move; what the move does to memory is the caller's promise.
            let result = self.ioctl(MOVE, &mut mv);
            (usize::try_from(mv.move_).unwrap_or(0), result)
        })
    }

    /// Reads every message waiting on the descriptor without blocking, and returns the
    /// events and the missing-page and write-protect faults among them (minor faults are
    /// dropped). Reading an event releases the thread that caused it; a fault's thread
    /// sleeps until its page is filled or it is woken.
    ///
    /// # Errors
    /// The `read` errno, other than `EAGAIN` (nothing waiting), when nothing was read: the
    /// events read before a failing `read` are returned (they released their threads and
    /// must be handled), and the next call meets the error. `EBADF` once the descriptor is
    /// not the one opened here ([`Uffd::check`]): nothing is read then.
    pub fn read_messages(&self) -> Result<Vec<Event>, Errno> {
        const N: usize = 64;
        let size = std::mem::size_of::<uffd_msg>();
        let mut events = Vec::new();
        loop {
            let mut buf = [0u8; N * 32];
            debug_assert_eq!(size, 32);
            // Proven before each read: a read from another file takes the program's bytes.
            let fd = match self.proven(false) {
                Ok(fd) => fd,
                Err(e) => return if events.is_empty() { Err(e) } else { Ok(events) },
            };
            // A read must not block (with the claims lock held): `O_NONBLOCK` set again where
            // the program cleared it on a number of ours.
            nonblocking(fd);
            // Proven again right before the read, with no system call between the two: a
            // program that puts its own file at the number exactly then (after the proof,
            // before the read) would still lose bytes to it; only a thread with a table of
            // its own could close that window.
            if !self.identity.proves(fd, false) {
                continue;
            }
            // SAFETY: reads into a buffer of ours of the length given, from the userfaultfd
            // just proven to be ours.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = last_errno();
                return if e == Errno::AGAIN || !events.is_empty() { Ok(events) } else { Err(e) };
            }
            let n = n as usize / size;
            for chunk in buf.chunks_exact(size).take(n) {
                // SAFETY: the kernel wrote whole `uffd_msg`s; an unaligned read copies one.
                let msg: uffd_msg = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
                let event = u32::from(msg.event);
                // SAFETY: the union member read is the one the event type says is filled.
                unsafe {
                    if event == UFFD_EVENT_REMOVE {
                        let r = msg.arg.remove;
                        events.push(Event::Remove { start: r.start as usize, end: r.end as usize });
                    } else if event == UFFD_EVENT_PAGEFAULT {
                        let f = msg.arg.pagefault;
                        if f.flags & u64::from(UFFD_PAGEFAULT_FLAG_WP) != 0 {
                            events.push(Event::Protected { addr: f.address as usize });
                        } else if f.flags & u64::from(UFFD_PAGEFAULT_FLAG_MINOR) == 0 {
                            events.push(Event::Missing { addr: f.address as usize });
                        }
                    } else if event == UFFD_EVENT_UNMAP {
                        let r = msg.arg.remove;
                        events.push(Event::Unmap { start: r.start as usize, end: r.end as usize });
                    } else if event == UFFD_EVENT_REMAP {
                        let r = msg.arg.remap;
                        events.push(Event::Remap { from: r.from as usize, to: r.to as usize, len: r.len as usize });
                    }
                }
            }
            if n < N {
                return Ok(events);
            }
        }
    }

    /// Waits up to `timeout_ms` for a message; returns whether one is waiting.
    ///
    /// # Errors
    /// `EBADF` once the descriptor is not the one opened here ([`Uffd::check`]), also when
    /// that shows during the wait (`POLLNVAL`, `POLLERR`, `POLLHUP`): a caller stops then
    /// rather than poll again at once.
    pub fn poll(&self, timeout_ms: i32) -> Result<bool, Errno> {
        let fd = self.proven(false)?;
        let revents = self.poll_events(fd, timeout_ms);
        if revents & (libc::POLLNVAL | libc::POLLERR | libc::POLLHUP) != 0 {
            // A userfaultfd reports none of these but `POLLERR` without `O_NONBLOCK` (the
            // program cleared it on a number of ours): the number named something else as
            // it was polled, taken back from the vault where it can be (perhaps at the same
            // number), or the flag is set again; polled again next time (not at once: were
            // it to persist, the reader would spin); else given up.
            let now = self.proven(false)?;
            nonblocking(now);
            std::thread::sleep(std::time::Duration::from_millis(timeout_ms.clamp(0, 10) as u64));
            return Ok(false);
        }
        Ok(revents & libc::POLLIN != 0)
    }

    /// One `poll` of `fd` for `POLLIN`: what it reports (none after `timeout_ms`).
    fn poll_events(&self, fd: RawFd, timeout_ms: i32) -> libc::c_short {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd of ours, live for the call; `poll` reads nothing from the file.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n > 0 { pfd.revents } else { 0 }
    }

    /// Whether a change of the program's to memory registered here (an unmap, a move, a
    /// purge) is under way, its event not read yet, as the kernel tells from its own
    /// count; without changing anything. `page`: any address (the count is the
    /// userfaultfd's, for all its ranges, and read first); a page registered here tells
    /// a refusal apart from the other answers below. Unlike
    /// [`Uffd::has_messages`] it also sees an unmap that is done but whose event is not
    /// queued yet. `UFFDIO_CONTINUE`, which the kernel refuses with `EAGAIN` while such a
    /// change is under way before it looks at anything else, and then, on anonymous
    /// memory, with `EINVAL` (`ENOENT` where `page` is not registered).
    pub fn changes_unread(&self, page: usize) -> bool {
        self.continue_probe(page) == Err(Errno::AGAIN)
    }

    /// `UFFDIO_CONTINUE` of the page at `page`, which never maps anything in anonymous
    /// memory ([`Uffd::changes_unread`]).
    fn continue_probe(&self, page: usize) -> Result<(), Errno> {
        let mut cont =
            uffdio_continue { range: range(page, super::PAGE_SIZE), mode: CONTINUE_MODE_DONTWAKE, mapped: 0 };
        self.ioctl(CONTINUE, &mut cont)
    }

    /// Whether a message waits to be read now (`poll` with no timeout): one system call,
    /// without [`Uffd::check`]'s proof of the descriptor (a `poll` takes nothing from the
    /// file it names), for a thread that asks often; [`Uffd::read_messages`] proves it
    /// before it reads. False once the descriptor was given up.
    pub fn has_messages(&self) -> bool {
        !self.is_lost() && self.poll_events(self.fd.load(Ordering::Acquire), 0) & libc::POLLIN != 0
    }

    fn register(&self, start: usize, len: usize, mode: u64) -> Result<(), Errno> {
        let mut reg = uffdio_register { range: range(start, len), mode, ioctls: 0 };
        // SAFETY: `reg` is a valid uffdio_register the kernel reads and updates in place.
        self.ioctl(REGISTER, &mut reg)
    }

    /// Unregisters `[start, start + len)` (`UFFDIO_UNREGISTER`), which also clears any write
    /// protection left on it, then wakes every thread still waiting on a fault there
    /// (`UFFDIO_WAKE`).
    ///
    /// The kernel wakes the range's waiters itself, but before it write-locks each mapping:
    /// a fault taken under the mapping's own lock (not the mmap lock) that saw the range
    /// registered and queued itself just after that wake would sleep for ever, as nothing
    /// wakes a fault of a range no longer registered. Such a fault is queued by the time
    /// the unregistering returns (it held the mapping's lock until then), so the wake after
    /// it finds it.
    ///
    /// # Errors
    /// The `UFFDIO_UNREGISTER` errno (the wake is made in any case).
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), Errno> {
        let mut r = range(start, len);
        let result = self.ioctl(UNREGISTER, &mut r);
        let _ = self.wake(start, len);
        result
    }

    /// Write-protects (`protect = true`) or unprotects `[start, start + len)`
    /// (`UFFDIO_WRITEPROTECT`). Unprotecting wakes the writers waiting on the range. While
    /// an event of the program is being read the kernel answers `EAGAIN`; the call is made
    /// again until it goes through (for a few seconds at most).
    ///
    /// # Errors
    /// `ENOENT` when part of the range is not registered, `EAGAIN` when the mapping kept
    /// changing, or the ioctl's errno.
    pub fn writeprotect(&self, start: usize, len: usize, protect: bool) -> Result<(), Errno> {
        let mut backoff = crate::backoff::Backoff::kernel().within(std::time::Duration::from_secs(5));
        loop {
            match self.writeprotect_once(start, len, protect) {
                Err(Errno::AGAIN) if backoff.pause() => {}
                other => return other,
            }
        }
    }

    /// [`Uffd::writeprotect`] without trying again: `EAGAIN` while an event waits to be
    /// read. For a caller that holds what the event's reader needs.
    ///
    /// # Errors
    /// As [`Uffd::writeprotect`].
    pub fn writeprotect_once(&self, start: usize, len: usize, protect: bool) -> Result<(), Errno> {
        let mode = if protect { WRITEPROTECT_MODE_WP } else { 0 };
        let mut wp = uffdio_writeprotect { range: range(start, len), mode };
        self.ioctl(WRITEPROTECT, &mut wp)
    }

    /// Fills the empty, registered `[dst, dst + len)` with new pages holding a copy of
    /// `[src, src + len)` (`UFFDIO_COPY`), waking the threads waiting there.
    ///
    /// # Errors
    /// `(bytes copied before the failure, errno)`: `EEXIST` where `dst` is not empty,
    /// `ENOENT`/`EINVAL` where it is not registered here, `EAGAIN` while an event is being
    /// read, `ENOMEM`.
    ///
    /// # Safety
    /// `[dst, dst + len)` must be a range whose new contents nobody is surprised by (a range
    /// whose accesses wait for exactly this data).
    pub unsafe fn copy(&self, dst: usize, src: usize, len: usize) -> Result<(), (usize, Errno)> {
        resumable(len, |done| {
            let mut cp = uffdio_copy {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: a valid uffdio_copy; what the copy fills is the caller's promise.
            let result = self.ioctl(COPY, &mut cp);
            (usize::try_from(cp.copy).unwrap_or(0), result)
        })
    }

    /// Wakes every thread waiting on a fault in `[start, start + len)` (`UFFDIO_WAKE`); it
    /// works after the range was replaced by `mremap`, when it is no longer registered.
    ///
    /// # Errors
    /// The `UFFDIO_WAKE` errno.
    pub fn wake(&self, start: usize, len: usize) -> Result<(), Errno> {
        let mut r = range(start, len);
        self.ioctl(WAKE, &mut r)
    }

    fn ioctl<T>(&self, request: Request<T>, arg: &mut T) -> Result<(), Errno> {
        // An ioctl of userfaultfd's numbers on the program's file could mean anything there.
        let mut fd = self.proven(true)?;
        let mut tries = 8;
        loop {
            // SAFETY: `arg` is the structure `request` takes (a `Request` exists only for
            // the pairs above), live for the call; the descriptor was just proven to be this
            // userfaultfd. What a move or copy does to memory is its caller's promise (those
            // are unsafe fns); the other ioctls change registration and protection and wake
            // threads, never memory contents.
            let ret = unsafe { libc::ioctl(fd, request.number as libc::c_ulong, arg as *mut T) };
            if ret >= 0 {
                return Ok(());
            }
            let errno = last_errno();
            // The program closed or took the number between its proof and the ioctl (which
            // then did nothing: `EBADF`, or `ENOTTY` on a file of another kind): the call
            // goes on with the number taken back, as a proof that failed before it would.
            // Any other errno is the ioctl's own answer, maybe after part of the work
            // (a move that did some pages): issued again, it would be answered otherwise.
            if !matches!(errno, Errno::BADF | Errno::NOTTY) || tries == 0 || self.identity.proves(fd, true) {
                return Err(errno);
            }
            tries -= 1;
            fd = self.proven(false)?;
        }
    }
}

impl Drop for Uffd {
    fn drop(&mut self) {
        // Closes the numbers still proven to be this file; the program's are left alone.
        self.abandon();
    }
}

/// Drives an ioctl that may do part of `len` bytes per call (`UFFDIO_MOVE`, `UFFDIO_COPY`):
/// `step(done)` does what it can from `done` and returns the bytes it did and its result.
/// Goes on after a partial `EAGAIN` (interrupted by a contended lock); stops at any other
/// error, or an `EAGAIN` without progress, with the bytes done before it.
fn resumable(len: usize, mut step: impl FnMut(usize) -> (usize, Result<(), Errno>)) -> Result<(), (usize, Errno)> {
    let mut done = 0;
    while done < len {
        let (did, result) = step(done);
        done += did;
        match result {
            Ok(()) if did == 0 => return Err((done, Errno::AGAIN)),
            Ok(()) => {}
            Err(Errno::AGAIN) if did > 0 => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

fn range(start: usize, len: usize) -> uffdio_range {
    uffdio_range { start: start as u64, len: len as u64 }
}

fn open_dev() -> Result<OwnedFd, Errno> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::NOENT))?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new descriptor.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(last_errno());
    }
    high_uffd(fd)
}

fn open_syscall(extra: i32) -> Result<OwnedFd, Errno> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | extra;
    // SAFETY: userfaultfd(2) takes its flags by value and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(last_errno());
    }
    high_uffd(fd as RawFd)
}

/// The userfaultfd the kernel just handed out at `fd`, moved to a high number at once,
/// before anything uses it: a thread of the program that closes its low numbers and opens
/// files (which land on the lowest free ones) never meets it between pagemig's proof that a
/// number is its own and the read or ioctl that follows. `EBADF` where the program closed
/// the number and put a file of its own there first (left alone).
fn high_uffd(fd: RawFd) -> Result<OwnedFd, Errno> {
    let fd = super::files::to_high(fd, is_userfaultfd).ok_or(Errno::BADF)?;
    // SAFETY: `to_high` proved the number to name a userfaultfd, the one just made here:
    // ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api(fd: &OwnedFd, features: u64) -> Result<u64, Errno> {
    let mut api = uffdio_api { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: `api` is a valid uffdio_api the kernel reads and updates in place.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as libc::c_ulong, &mut api) };
    if ret < 0 { Err(last_errno()) } else { Ok(api.features) }
}

#[cfg(any(test, feature = "internals"))]
/// A fresh anonymous mapping filled by [`copy_into_new_mapping`], with the userfaultfd it
/// is registered with. The mapping is unmapped before the descriptor is closed.
#[derive(Debug)]
pub struct CopiedMapping {
    /// The filled mapping.
    pub mapping: super::Mapping,
    /// The descriptor the mapping is registered with, in missing mode.
    pub uffd: Uffd,
}

#[cfg(any(test, feature = "internals"))]
/// Copies `[src, src + len)` into a fresh anonymous mapping bound to `node` with
/// `UFFDIO_COPY`: `mmap(2)`, `mbind(2)` (`MPOL_BIND`), a new userfaultfd
/// ([`Uffd::open_for_moves`]), `UFFDIO_REGISTER` in missing mode, and `UFFDIO_COPY` of the
/// whole range, which allocates every destination page under the mapping's policy, copies
/// into it and maps it, without zeroing it first: the closest user-space stand-in for the
/// allocate-and-copy of the kernel's migration. It installs base pages only, whatever
/// the source is backed by.
///
/// The kernel reads the source as `read(2)` reads a buffer (`copy_from_user`): nothing in
/// it changes, and an unmapped source fails with `EFAULT`.
///
/// See `ioctl_userfaultfd(2)`.
///
/// # Errors
/// `EINVAL` for a zero length or one that is not a multiple of [`super::PAGE_SIZE`]; the
/// errno of the failing step otherwise (`mmap`/`mbind`, opening the descriptor, the
/// registration, or the copy: `EFAULT` for an unmapped source, `ENOMEM`).
pub fn copy_into_new_mapping(src: usize, len: usize, node: Option<u32>) -> Result<CopiedMapping, Errno> {
    if len == 0 || len % super::PAGE_SIZE != 0 {
        return Err(Errno::INVAL);
    }
    let mapping = super::Mapping::new(len, super::PAGE_SIZE)?;
    if let Some(node) = node {
        super::mbind(mapping.addr(), len, node, false)?;
    }
    let uffd = Uffd::open_for_moves()?;
    uffd.register_missing(mapping.addr(), len)?;
    // SAFETY: the destination is the mapping made just above, which nothing else knows of and
    // nothing has touched, so no access waits for or reads other contents; the kernel reads
    // the source itself and fails with EFAULT where it is not mapped.
    unsafe { uffd.copy(mapping.addr(), src, len) }.map_err(|(_, errno)| errno)?;
    Ok(CopiedMapping { mapping, uffd })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl numbers computed here are the kernel's.
    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(iowr::<uffdio_copy>(0x03), UFFDIO_COPY);
        assert_eq!(iowr::<uffdio_register>(0x00), UFFDIO_REGISTER);
        assert_eq!(iowr::<uffdio_writeprotect>(0x06), UFFDIO_WRITEPROTECT);
    }
    use crate::sys::{PAGE_SIZE, mmap_anon, munmap};

    /// The probe of [`Uffd::changes_unread`] maps nothing, is refused with `EINVAL` on
    /// registered anonymous memory, `ENOENT` elsewhere, and `EAGAIN` while a purge's event
    /// waits to be read.
    #[test]
    fn the_continue_probe_tells_unread_changes_and_changes_nothing() {
        let uffd = Uffd::open().expect("userfaultfd");
        let addr = mmap_anon(4 * PAGE_SIZE).unwrap();
        // SAFETY: anonymous memory of ours; its second page is left never touched.
        unsafe { *(addr as *mut u8) = 1 };
        uffd.register_missing_wp(addr, 2 * PAGE_SIZE).unwrap();
        assert_eq!(uffd.continue_probe(addr), Err(Errno::INVAL));
        assert_eq!(uffd.continue_probe(addr + PAGE_SIZE), Err(Errno::INVAL));
        assert_eq!(uffd.continue_probe(addr + 2 * PAGE_SIZE), Err(Errno::NOENT));
        let frames = crate::numa::page_frames(addr, 2 * PAGE_SIZE).unwrap();
        assert!(frames[0].is_some() && frames[1].is_none(), "{frames:?}");
        assert!(!uffd.changes_unread(addr));
        std::thread::scope(|s| {
            // SAFETY: purges the first page of ours; its event holds the thread until read.
            let purge = s.spawn(|| assert_eq!(unsafe { libc::madvise(addr as *mut _, PAGE_SIZE, libc::MADV_DONTNEED) }, 0));
            let started = std::time::Instant::now();
            while !uffd.changes_unread(addr + PAGE_SIZE) {
                assert!(started.elapsed() < std::time::Duration::from_secs(10), "the purge was never seen");
                std::thread::yield_now();
            }
            // Counted before it is queued: read until it is there.
            while !uffd.read_messages().unwrap().iter().any(|e| matches!(e, Event::Remove { .. })) {
                assert!(started.elapsed() < std::time::Duration::from_secs(10), "the purge's event never came");
                std::thread::yield_now();
            }
            purge.join().unwrap();
        });
        uffd.unregister(addr, 2 * PAGE_SIZE).unwrap();
        // SAFETY: the mapping is ours.
        unsafe { munmap(addr, 4 * PAGE_SIZE).unwrap() };
    }

    #[test]
    fn protect_then_unprotect_a_range() {
        let uffd = Uffd::open().expect("userfaultfd");
        let addr = mmap_anon(4 * PAGE_SIZE).unwrap();
        uffd.register_wp(addr, 4 * PAGE_SIZE).unwrap();
        uffd.writeprotect(addr, 4 * PAGE_SIZE, true).unwrap();
        uffd.writeprotect(addr, 4 * PAGE_SIZE, false).unwrap();
        // SAFETY: unprotected anonymous memory of ours.
        unsafe { *(addr as *mut u8) = 1 };
        uffd.unregister(addr, 4 * PAGE_SIZE).unwrap();
        uffd.wake(addr, 4 * PAGE_SIZE).unwrap();
        // SAFETY: the mapping is ours.
        unsafe { munmap(addr, 4 * PAGE_SIZE).unwrap() };
    }

    #[test]
    fn resumable_goes_on_after_partial_progress_and_stops_at_errors() {
        let mut calls = [(4096, Err(Errno::AGAIN)), (8192, Ok(()))].into_iter();
        assert_eq!(resumable(12288, |_| calls.next().unwrap()), Ok(()));
        let mut calls = [(4096, Ok(())), (0, Err(Errno::BUSY))].into_iter();
        assert_eq!(resumable(12288, |_| calls.next().unwrap()), Err((4096, Errno::BUSY)));
        let mut calls = [(0, Err(Errno::AGAIN))].into_iter();
        assert_eq!(resumable(4096, |_| calls.next().unwrap()), Err((0, Errno::AGAIN)));
    }

    /// The identity check rests on each userfaultfd having an inode of its own.
    #[test]
    fn each_userfaultfd_has_an_inode_of_its_own() {
        let a = Uffd::open().expect("userfaultfd");
        let b = Uffd::open_for_moves().expect("userfaultfd");
        assert_ne!(a.identity.inode, b.identity.inode);
        assert_eq!(inode(a.raw_fd()), Ok(a.identity.inode));
        assert!(a.check().is_ok() && b.check().is_ok());
    }

    /// `O_NONBLOCK` cleared on the descriptor (a program normalising every descriptor it
    /// has): `poll` reports `POLLERR` then, and a `read` would block. Both set it again and
    /// go on; nothing blocks.
    #[test]
    fn a_cleared_o_nonblock_is_set_again() {
        crate::testing::watchdog(30, || {
            let uffd = Uffd::open().expect("userfaultfd");
            let fd = uffd.raw_fd();
            // SAFETY: the flags of this test's own userfaultfd.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK) };
            assert_eq!(uffd.read_messages(), Ok(Vec::new()), "a read that does not block");
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK) };
            assert_eq!(uffd.poll(5), Ok(false));
            // SAFETY: as above.
            assert_ne!(unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK, 0);
            assert_eq!(uffd.poll(5), Ok(false));
            assert!(!uffd.is_lost());
        });
    }

    /// A pipe `dup2`ed over the descriptor: every use answers `EBADF` at once (no spin on
    /// `poll`), nothing is read from the pipe, and the pipe stays open for its owner.
    #[test]
    fn a_file_put_at_the_number_is_never_used() {
        let uffd = Uffd::open().expect("userfaultfd");
        let mut p = [0; 2];
        // SAFETY: fills the array of ours.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
        let at = uffd.raw_fd();
        // SAFETY: the number is this test's own userfaultfd, replaced by its own pipe.
        assert_eq!(unsafe { libc::dup2(p[0], at) }, at);
        let bytes = [7u8; 96];
        // SAFETY: writes from a buffer of ours.
        assert_eq!(unsafe { libc::write(p[1], bytes.as_ptr().cast(), bytes.len()) }, 96);
        let started = std::time::Instant::now();
        assert_eq!(uffd.poll(1000), Err(Errno::BADF));
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        assert_eq!(uffd.read_messages(), Err(Errno::BADF));
        assert_eq!(uffd.wake(0x10000, PAGE_SIZE), Err(Errno::BADF));
        assert!(uffd.is_lost());
        // The kept duplicate is closed (it was ours); the pipe at the number is not. (Its
        // number no longer names this userfaultfd; another test of this process may have
        // opened a file that took the number since.)
        let keep = uffd.identity.keep.load(Ordering::Acquire);
        assert!(keep >= 0);
        assert_ne!(inode(keep), Ok(uffd.identity.inode));
        let mut back = [0u8; 128];
        // SAFETY: reads into a buffer of ours, from the number the pipe now has.
        assert_eq!(unsafe { libc::read(at, back.as_mut_ptr().cast(), back.len()) }, 96);
        // SAFETY: the pipe's descriptors are ours.
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
            libc::close(at);
        }
    }

    #[test]
    fn writeprotect_of_unregistered_memory_fails() {
        let uffd = Uffd::open().expect("userfaultfd");
        let addr = mmap_anon(PAGE_SIZE).unwrap();
        assert!(uffd.writeprotect(addr, PAGE_SIZE, true).is_err());
        // SAFETY: the mapping is ours.
        unsafe { munmap(addr, PAGE_SIZE).unwrap() };
    }
}
