//! Reads of this process's own memory through `/proc/self/mem`: a read that meets a page
//! the kernel would have to fault in for a userfaultfd (memory the program purged or never
//! touched, in a range registered in missing mode) fails with `EIO` at once instead of
//! waiting for the fault to be served, and one that meets memory unmapped or replaced
//! meanwhile fails the same way instead of raising `SIGSEGV`. The pre-copy reads the
//! program's live memory so (see `migrate::pipeline`): a plain load there could wait for a
//! fault only this call's own progress would serve, or crash the program.
//!
//! What is read is only data for a comparison (the pre-copy checks every byte again once the
//! memory is protected), so reading memory that is no longer the program's migrating
//! memory costs nothing but time: with one exception, a device mapping whose driver lets
//! such reads through (`vm_ops->access`, as `/dev/mem` does), mapped by another thread in
//! the very place the program unmapped during the read, would have its registers read.
//!
//! The descriptor is opened for one call and closed at its end. A program may close every
//! descriptor and reuse the number meanwhile: each read first proves the number still
//! names `/proc/self/mem` (its inode), and the close leaves a number that names another
//! file alone.

use std::os::fd::RawFd;

use super::uffd::inode;
use super::{Errno, PAGE_SIZE, last_errno};

/// An open `/proc/self/mem`, read only.
#[derive(Debug)]
pub struct ProcMem {
    fd: RawFd,
    /// `st_dev` and `st_ino` of the file opened.
    inode: (u64, u64),
}

impl ProcMem {
    /// Opens `/proc/self/mem` for reading.
    ///
    /// # Errors
    /// The `open` errno (`EMFILE` at the program's descriptor limit, `ENOENT` without
    /// `/proc`), or the `fstat` errno.
    pub fn open() -> Result<Self, Errno> {
        // SAFETY: a NUL-terminated path of ours; `open` makes a new descriptor.
        let fd = unsafe { libc::open(c"/proc/self/mem".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(last_errno());
        }
        match inode(fd) {
            Ok(inode) => Ok(Self { fd, inode }),
            Err(e) => {
                // SAFETY: the descriptor was opened just above and is ours alone.
                unsafe { libc::close(fd) };
                Err(e)
            }
        }
    }

    /// Reads `len` bytes of this process's memory at `src` into `dst`, skipping each base
    /// page that cannot be read now (`dst` keeps what it held there); returns the bytes
    /// read. Never waits for a fault and never faults on `src`.
    ///
    /// # Safety
    /// `[dst, dst + len)` is memory of the caller's that nothing else reads or writes
    /// meanwhile, and present or fillable without a userfaultfd (a write there must not
    /// wait on one).
    pub unsafe fn read_into(&self, src: usize, dst: usize, len: usize) -> usize {
        let mut done = 0;
        let mut read = 0;
        while done < len {
            if inode(self.fd) != Ok(self.inode) {
                // The program closed the number and opened something else there.
                break;
            }
            // SAFETY: writes at most `len - done` bytes into the caller's `dst` (contract);
            // the offset is an address of this process.
            let n = unsafe {
                libc::pread64(self.fd, (dst + done) as *mut libc::c_void, len - done, (src + done) as libc::off64_t)
            };
            match n {
                n if n > 0 => {
                    done += n as usize;
                    read += n as usize;
                }
                0 => break,
                _ => match last_errno() {
                    Errno::INTR => {}
                    // A page that would fault (EIO) or lies outside every mapping (EFAULT,
                    // EIO): on to the next page.
                    Errno::IO | Errno::FAULT => done = (src + done + PAGE_SIZE) / PAGE_SIZE * PAGE_SIZE - src,
                    _ => break,
                },
            }
        }
        read
    }
}

impl Drop for ProcMem {
    fn drop(&mut self) {
        if inode(self.fd) == Ok(self.inode) {
            // SAFETY: the number still names the file opened here (its inode): ours.
            unsafe { libc::close(self.fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{mmap_anon, munmap};

    #[test]
    fn reads_what_is_there_and_skips_what_is_not() {
        let len = 4 * PAGE_SIZE;
        let (src, dst) = (mmap_anon(len).unwrap(), mmap_anon(len).unwrap());
        // SAFETY: both mappings were just made here and are ours.
        unsafe {
            std::ptr::write_bytes(src as *mut u8, 0xA5, len);
            std::ptr::write_bytes(dst as *mut u8, 0x11, len);
        }
        // The third page unmapped: skipped, the rest read.
        // SAFETY: a page of a mapping of ours that nothing refers to.
        unsafe { munmap(src + 2 * PAGE_SIZE, PAGE_SIZE) }.unwrap();
        let mem = ProcMem::open().unwrap();
        // SAFETY: `dst` is ours, populated, and nothing else touches it.
        let read = unsafe { mem.read_into(src, dst, len) };
        assert_eq!(read, 3 * PAGE_SIZE);
        // SAFETY: `dst` is ours and mapped.
        let got = unsafe { std::slice::from_raw_parts(dst as *const u8, len) };
        for (page, bytes) in got.chunks(PAGE_SIZE).enumerate() {
            let want = if page == 2 { 0x11 } else { 0xA5 };
            assert!(bytes.iter().all(|&b| b == want), "page {page}");
        }
        // SAFETY: ours, nothing refers to them any more.
        unsafe {
            munmap(src, 2 * PAGE_SIZE).unwrap();
            munmap(src + 3 * PAGE_SIZE, PAGE_SIZE).unwrap();
            munmap(dst, len).unwrap();
        }
    }
}
