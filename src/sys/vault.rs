//! A thread that keeps pagemig's userfaultfds open whatever the program does to its
//! descriptors, so that they can be taken back.
//!
//! A program may close every descriptor (`close_range(3, ~0U, 0)`) or `dup2` its own files
//! over them at any moment, also while a migration is under way on another of its threads.
//! Were that the last descriptor of a userfaultfd, the kernel would release it at once:
//! every range registered with it unregistered, its protection taken off, the threads
//! waiting on it woken. Mid-migration that loses data: a page whose old copy waits in a
//! graveyard is a hole again, which the program's next touch fills with zeros, and a write
//! to a protected page lands in the old page after its copy was taken.
//!
//! The vault is a thread with a descriptor table of its own (`close_range` with
//! `CLOSE_RANGE_UNSHARE`), in which it keeps the userfaultfds at the numbers they had and
//! closes everything else the copy of the program's table brought (within microseconds,
//! touching nothing: only a copy's reference goes). No call of the program on its own table
//! reaches those. When a number of the process's table no longer names its userfaultfd,
//! [`Vault::fetch`] makes a new one from the vault's copy (`pidfd_getfd` on the vault
//! thread's pidfd, `PIDFD_THREAD`: Linux 6.9), at a number the kernel picks, and the number
//! the program took stays the program's.
//!
//! Where that cannot be done (an older kernel, a seccomp filter, no descriptor left), there
//! is no vault (or a fetch fails), and a userfaultfd whose number is lost is given up: its
//! vault copy is closed too ([`Vault::release`]), so the kernel releases it as it would
//! without a vault, never keeping the program's threads waiting on a descriptor nobody reads.
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::lock::{Condvar, Mutex};

use super::{Errno, last_errno};

/// `PIDFD_THREAD` (`O_EXCL`): a pidfd for the thread `pidfd_open` names, not its process.
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// What the vault thread is asked to do.
#[derive(Debug, Default)]
struct Orders {
    /// Numbers of its table to close.
    close: Vec<RawFd>,
    /// End the thread (its table, and every copy in it, goes with it).
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    orders: Mutex<Orders>,
    changed: Condvar,
}

/// The vault thread (see the module docs). Dropping it ends the thread.
#[derive(Debug)]
pub struct Vault {
    tid: libc::pid_t,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Vault {
    /// Starts a vault holding the files `fds` name (each at the same number in its table),
    /// and checks that a file can be fetched back from it. `None` where the kernel or the
    /// process does not let it.
    pub fn new(fds: &[RawFd]) -> Option<Arc<Self>> {
        let mut keep: Vec<RawFd> = fds.to_vec();
        keep.sort_unstable();
        keep.dedup();
        let highest = *keep.last()?;
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = super::thread::spawn("pagemig-vault", move || {
            let Some(tid) = private_table(&keep) else {
                let _ = tx.send(None);
                return;
            };
            let _ = tx.send(Some(tid));
            let mut held = keep.len();
            let mut orders = theirs.orders.lock();
            loop {
                for fd in orders.close.drain(..) {
                    // SAFETY: a number of this thread's own table, one of `keep`: closing it
                    // touches no descriptor of the program's.
                    held -= usize::from(unsafe { libc::close(fd) } == 0);
                }
                // Nothing left to keep (each given up): the thread is done.
                if orders.stop || held == 0 {
                    return;
                }
                theirs.changed.wait(&mut orders);
            }
        })
        .ok()?;
        let tid = rx.recv().ok().flatten();
        let vault = Self { tid: tid.unwrap_or(0), shared, handle: Some(handle) };
        // The kernel lets a file be fetched back from it: else no vault (dropped, its thread
        // ends and its table goes).
        let works = tid.is_some()
            && super::uffd::inode(highest).is_ok_and(|file| vault.fetch(highest, file).map(close).is_ok());
        works.then(|| Arc::new(vault))
    }

    /// A new descriptor, in the calling thread's table and close-on-exec, of the file the
    /// vault holds at `fd`, whose `st_dev` and `st_ino` are `file`: at a high number where
    /// one is free (see `files::to_high`). The numbers the kernel hands out on the way (the
    /// pidfd's, the fetched file's) are the lowest free ones, which a thread of the program
    /// may close or take meanwhile: what it put there is left alone, and the fetch answers
    /// `EBADF` (try again).
    ///
    /// # Errors
    /// The errno of `pidfd_open` or `pidfd_getfd`: `EMFILE` with no descriptor free,
    /// `EBADF` where the vault does not hold `fd` (released) or a number was taken.
    pub fn fetch(&self, fd: RawFd, file: (u64, u64)) -> Result<RawFd, Errno> {
        // SAFETY: `pidfd_open` takes its arguments by value and makes a descriptor of ours.
        let low = unsafe { libc::syscall(libc::SYS_pidfd_open, self.tid, PIDFD_THREAD) };
        if low < 0 {
            return Err(last_errno());
        }
        let pidfd = super::files::to_high(low as RawFd, is_pidfd).ok_or(Errno::BADF)?;
        // SAFETY: as above; the new descriptor is ours.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
        let result = if got < 0 { Err(last_errno()) } else { Ok(got as RawFd) };
        close(pidfd);
        let got = result?;
        super::files::to_high(got, |n| super::uffd::inode(n) == Ok(file)).ok_or(Errno::BADF)
    }

    /// Addresses of the vault's heap objects, which a fetch and a release touch: the
    /// mappings holding them are not pagemig's to migrate.
    pub fn anchors(&self) -> [usize; 2] {
        [self as *const Self as usize, Arc::as_ptr(&self.shared) as usize]
    }

    /// Closes the vault's copy of `fd`: once no other descriptor of its file is left, the
    /// kernel releases it.
    pub fn release(&self, fd: RawFd) {
        self.shared.orders.lock().close.push(fd);
        self.shared.changed.notify_all();
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        self.shared.orders.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Gives the calling thread a table of its own holding only `keep` (sorted), at their
/// numbers; returns its thread id. `None` where the kernel refuses (before Linux 5.9, or a
/// seccomp filter): the thread's table is then still the process's, untouched.
fn private_table(keep: &[RawFd]) -> Option<libc::pid_t> {
    let highest = *keep.last()?;
    // Unshared without copying what lies above the highest kept number.
    // SAFETY: `close_range` takes its arguments by value; with `CLOSE_RANGE_UNSHARE` it
    // closes only in the new table, which is this thread's alone.
    let rc = unsafe {
        libc::syscall(libc::SYS_close_range, highest as libc::c_uint + 1, libc::c_uint::MAX, libc::CLOSE_RANGE_UNSHARE)
    };
    if rc != 0 {
        return None;
    }
    let mut from = 0;
    for &k in keep {
        if k > from {
            // SAFETY: the table is this thread's own now: the program's files keep every
            // descriptor of theirs.
            unsafe { libc::syscall(libc::SYS_close_range, from as libc::c_uint, (k - 1) as libc::c_uint, 0u32) };
        }
        from = k + 1;
    }
    // SAFETY: `gettid` takes no arguments.
    Some(unsafe { libc::gettid() })
}

/// Whether `fd` is a pidfd: on pidfs, as every pidfd is from Linux 6.9, which
/// `PIDFD_THREAD` needs anyway (an epoll, eventfd or other anonymous-inode file the
/// program put at the number is not).
fn is_pidfd(fd: RawFd) -> bool {
    const PID_FS_MAGIC: i64 = 0x5049_4446;
    super::files::fs_magic(fd) == Some(PID_FS_MAGIC)
}

fn close(fd: RawFd) {
    // SAFETY: a descriptor the caller made just now and owns.
    unsafe { libc::close(fd) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inode of what `fd` names.
    fn inode(fd: RawFd) -> Option<u64> {
        // SAFETY: plain data, overwritten by `fstat`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fills the struct of ours.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
    }

    /// A file kept in the vault comes back after its number was closed and taken by
    /// another file, which is left as it was; a released one does not.
    #[test]
    fn a_file_comes_back_from_the_vault_after_its_number_was_taken() {
        let mut p = [0; 2];
        // SAFETY: fills the array of ours.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        let want = crate::sys::uffd::inode(p[0]).unwrap();
        let vault = Vault::new(&[p[0]]).expect("a vault (pidfd_open of a thread: Linux 6.9)");
        let mut q = [0; 2];
        // SAFETY: as above; then the program's own pipe over the kept number.
        unsafe {
            assert_eq!(libc::pipe(q.as_mut_ptr()), 0);
            assert_eq!(libc::dup2(q[0], p[0]), p[0]);
        }
        let back = vault.fetch(p[0], want).expect("fetched back");
        assert_ne!(back, p[0]);
        assert_eq!(inode(back), Some(want.1));
        assert_eq!(inode(p[0]), inode(q[0]), "the program's number was left alone");
        // Bytes written to the first pipe are read from the fetched descriptor.
        // SAFETY: one byte through descriptors of ours.
        unsafe {
            assert_eq!(libc::write(p[1], b"x".as_ptr().cast(), 1), 1);
            let mut b = [0u8; 1];
            assert_eq!(libc::read(back, b.as_mut_ptr().cast(), 1), 1);
            assert_eq!(&b, b"x");
        }
        vault.release(p[0]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while vault.fetch(p[0], want).map(close).is_ok() {
            assert!(std::time::Instant::now() < deadline, "the vault never let the file go");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for fd in [back, p[1], q[0], q[1], p[0]] {
            close(fd);
        }
    }
}
