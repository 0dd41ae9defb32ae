//! The files pagemig opens for itself (`/proc/self/*`, `/sys/devices/system/node/*`), in a
//! descriptor table the program shares and may change at any moment: a thread of the program
//! may close every descriptor (`close_range(3, ~0U, 0)`), or `dup2` its own files over them,
//! between pagemig's `open` and its `read`. Without care a call then fails (`EBADF`) where
//! the kernel's would not, reads a file of the program's instead of its own (consuming a
//! pipe's data, moving a shared offset) or closes the program's descriptor at the end.
//!
//! An [`OwnFile`] is proven in place (its inode is the one its path names), moved to a high
//! number right after `open` (the kernel hands the program's next `open` the lowest free
//! one), read with `pread` only (which moves no offset and refuses pipes and sockets), and
//! proven by its inode after each use; it is closed only while its number still names it,
//! and let go unclosed once found lost. [`with_file`] and [`read_text`] open again and start
//! over, a few times, where the number was lost meanwhile; [`with_kept_file`] and
//! [`read_kept_text`] keep the file open for the next use. [`OwnFile`] and [`with_file`]
//! are plain system calls on the caller's buffers: async-signal-safe; the text readers and
//! the kept files allocate.

use std::ffi::CStr;
use std::os::fd::RawFd;

use super::uffd::{dup_high, inode};
use super::{Errno, last_errno};

/// How many times a use whose number the program took is started over.
const TRIES: usize = 8;

/// A file of pagemig's, opened read-only (see the module docs).
#[derive(Debug)]
pub struct OwnFile {
    fd: RawFd,
    /// `st_dev` and `st_ino` of the file opened.
    id: (u64, u64),
}

impl OwnFile {
    /// Opens `path` read-only and close-on-exec, at a high number where one is free; again
    /// (a few times) where the program closed or replaced the number before it could be
    /// moved and proven.
    ///
    /// # Errors
    /// The errno of `open` (`ENOENT`, `EMFILE`, ...); `EBADF` where every try lost it.
    pub fn open(path: &CStr) -> Result<Self, Errno> {
        again_where_lost(|| Self::open_once(path))
    }

    fn open_once(path: &CStr) -> Result<Self, Errno> {
        // SAFETY: a NUL-terminated path; `open` makes a new descriptor of ours.
        let low = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if low < 0 {
            return Err(last_errno());
        }
        // Between `open` and the move the program may have closed the number and opened a
        // file of its own there: what pagemig opened is what the path names (its inode; a
        // `/proc/self` or `/sys` file keeps its inode while the process lives).
        let want = stat_id(path).map_err(|_| Errno::BADF)?;
        let fd = to_high(low, |fd| inode(fd) == Ok(want)).ok_or(Errno::BADF)?;
        Ok(Self { fd, id: want })
    }

    /// Reads a stream (a named pipe) to its end with `read(2)`, proven after each read.
    fn read_stream(&self) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: writes at most `chunk.len()` bytes into a buffer of ours.
            let n = unsafe { libc::read(self.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            let errno = (n < 0).then(last_errno);
            self.check()?;
            match (n, errno) {
                (0, _) => return Ok(out),
                (n, None) => out.extend_from_slice(&chunk[..n as usize]),
                (_, Some(Errno::INTR)) => {}
                (_, Some(e)) => return Err(e),
            }
        }
    }

    /// `pread` of up to `buf.len()` bytes at `offset`, not proven: a caller that reads on
    /// proves once at the end ([`OwnFile::check`]).
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
        // SAFETY: writes at most `buf.len()` bytes into the caller's buffer.
        let n = unsafe { libc::pread(self.fd, buf.as_mut_ptr().cast(), buf.len(), offset as libc::off_t) };
        if n < 0 { Err(last_errno()) } else { Ok(n as usize) }
    }

    /// The number, for a system call on the file; [`OwnFile::check`] after it proves the
    /// call reached this file.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Whether the number still names the file opened.
    ///
    /// # Errors
    /// `EBADF` where the program closed it or put another file at its number.
    pub fn check(&self) -> Result<(), Errno> {
        if inode(self.fd) == Ok(self.id) { Ok(()) } else { Err(Errno::BADF) }
    }

    /// `pread` of up to `buf.len()` bytes at `offset`, proven to have read this file.
    ///
    /// # Errors
    /// The errno of `pread`; `EBADF` as [`OwnFile::check`].
    #[cfg(test)]
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
        let read = self.pread(buf, offset);
        // Whatever `pread` answered, a number that no longer names the file makes it moot.
        self.check()?;
        read
    }

    /// Fills `buf` from `offset` on.
    ///
    /// # Errors
    /// As [`OwnFile::read_at`]; `EIO` where the file ends first.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            match self.pread(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => {
                    self.check()?;
                    return Err(e);
                }
            }
        }
        self.check()?;
        if done < buf.len() { Err(Errno::IO) } else { Ok(()) }
    }

    /// Lets go of a file whose number was found lost (a use answered `EBADF`) without
    /// closing anything: the number is the program's now, or already another file of
    /// pagemig's (a `/proc` file opened again has the same inode, so the proof cannot tell
    /// them apart, and closing it would take that one's number from under it).
    pub fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for OwnFile {
    fn drop(&mut self) {
        if self.check().is_ok() {
            close(self.fd);
        }
    }
}

/// Runs `attempt` again, a few times, while it answers `EBADF` (a number pagemig was using
/// was closed or taken by the program meanwhile). Async-signal-safe.
pub(super) fn again_where_lost<T>(mut attempt: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    let mut tries = TRIES;
    loop {
        match attempt() {
            Err(Errno::BADF) if tries > 1 => tries -= 1,
            done => return done,
        }
    }
}

/// Runs `use_it` on `path` opened as an [`OwnFile`]; where the program closed or replaced
/// its number meanwhile (`EBADF`), opens it again and starts over, a few times.
///
/// # Errors
/// The errno of opening the file or of `use_it`; `EBADF` once every try lost its number.
pub fn with_file<T>(path: &CStr, use_it: impl FnMut(&OwnFile) -> Result<T, Errno>) -> Result<T, Errno> {
    open_and_use(path, use_it).map(|(done, _)| done)
}

/// [`with_file`], handing back the file `use_it` succeeded on. A file whose use answered
/// `EBADF` is let go unclosed ([`OwnFile::forget`]).
fn open_and_use<T>(path: &CStr, mut use_it: impl FnMut(&OwnFile) -> Result<T, Errno>) -> Result<(T, OwnFile), Errno> {
    again_where_lost(|| {
        let file = OwnFile::open(path)?;
        match use_it(&file) {
            Ok(done) => Ok((done, file)),
            Err(Errno::BADF) => {
                file.forget();
                Err(Errno::BADF)
            }
            Err(e) => Err(e),
        }
    })
}

/// A file kept open between uses ([`with_kept_file`]), by the process that opened it: a
/// forked child's copy names its parent's `/proc/self` files.
struct Kept {
    pid: u32,
    path: std::ffi::CString,
    file: OwnFile,
}

/// The files kept open, a handful at most (pagemig reads the same few on every call).
/// Only ever `try_lock`ed: a thread that finds it busy (or a child forked while a thread of
/// its parent held it) opens the file afresh instead of waiting.
static KEPT: std::sync::Mutex<Vec<Kept>> = std::sync::Mutex::new(Vec::new());

/// How many files are kept open at most.
const KEPT_MAX: usize = 8;

/// [`with_file`] with the file kept open for the next use by this process (one `pread` and
/// one proof a use instead of an `open`, a move to a high number and a `close`). Not
/// async-signal-safe (it allocates); [`with_file`] is.
///
/// # Errors
/// As [`with_file`].
pub fn with_kept_file<T>(path: &CStr, mut use_it: impl FnMut(&OwnFile) -> Result<T, Errno>) -> Result<T, Errno> {
    if let Some(file) = take_kept(path) {
        match use_it(&file) {
            Ok(done) => {
                put_kept(path, file);
                return Ok(done);
            }
            // Closed or replaced by the program since: opened afresh below.
            Err(Errno::BADF) => file.forget(),
            Err(e) => return Err(e),
        }
    }
    let (done, file) = open_and_use(path, use_it)?;
    put_kept(path, file);
    Ok(done)
}

/// The file at `path` kept open by this process, taken out for a use ([`put_kept`] gives it
/// back); `None` where none is kept (or another thread holds the list).
pub fn take_kept(path: &CStr) -> Option<OwnFile> {
    let pid = std::process::id();
    let mut kept = KEPT.try_lock().ok()?;
    // Copies a forked child inherited are dropped here (closed where still theirs).
    kept.retain(|k| k.pid == pid);
    let at = kept.iter().position(|k| k.path.as_c_str() == path)?;
    Some(kept.swap_remove(at).file)
}

/// Keeps `file` (opened at `path`) open for the next use by this process, where there is
/// room; else it is closed.
pub fn put_kept(path: &CStr, file: OwnFile) {
    if let Ok(mut kept) = KEPT.try_lock()
        && kept.len() < KEPT_MAX
        && !kept.iter().any(|k| k.path.as_c_str() == path)
    {
        kept.push(Kept { pid: std::process::id(), path: path.to_owned(), file });
    }
}

/// [`read_text`] of a file kept open between reads ([`with_kept_file`]): for the files
/// pagemig reads on every call.
///
/// # Errors
/// As [`read_text`].
pub fn read_kept_text(path: impl AsRef<std::path::Path>) -> std::io::Result<String> {
    read_text_with(path, true)
}

/// The whole of the small text file at `path` (a `/proc` or `/sys` file of pagemig's), as
/// [`std::fs::read_to_string`] reads it, over [`with_file`].
///
/// # Errors
/// As [`with_file`], as an I/O error; `InvalidData` for text that is not UTF-8.
pub fn read_text(path: impl AsRef<std::path::Path>) -> std::io::Result<String> {
    read_text_with(path, false)
}

/// The reader of [`read_text`] and (`kept`) [`read_kept_text`].
fn read_text_with(path: impl AsRef<std::path::Path>, kept: bool) -> std::io::Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(path.as_ref().as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let read = |f: &OwnFile| {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match f.pread(&mut chunk, out.len() as u64) {
                Ok(0) => return f.check().map(|()| out),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(Errno::INTR) => {}
                // A named pipe (a config given as `<(...)`): read as a stream; it is the
                // file the path names (proven when opened), not a number of the program's.
                Err(Errno::SPIPE) if out.is_empty() => return f.check().and_then(|()| f.read_stream()),
                Err(e) => return f.check().and(Err(e)),
            }
        }
    };
    let bytes = if kept { with_kept_file(&cpath, read) } else { with_file(&cpath, read) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
    String::from_utf8(bytes).map_err(|_| std::io::ErrorKind::InvalidData.into())
}

/// Moves `low`, a number this thread was just handed by the kernel, to a high one (where
/// one is free), so that the program's next `open` gets `low` back as it would without
/// pagemig. `ours` tells a file of pagemig's from one the program may have put at `low`
/// meanwhile (after closing pagemig's): `None` then, and the program's number is left
/// alone, never duplicated (closing a duplicate of a file drops the process's `fcntl`
/// locks on it). Only where the program swaps the number in the few instructions between
/// the proof and the duplicate is a duplicate of its file made, and closed. Async-signal-safe.
pub(super) fn to_high(low: RawFd, ours: impl Fn(RawFd) -> bool) -> Option<RawFd> {
    if !ours(low) {
        return None;
    }
    let Some(high) = dup_high(low) else {
        return Some(low);
    };
    if !ours(high) {
        close(high);
        return None;
    }
    // `low` is closed only while it still names what `high` does (else the program's now).
    if same_inode(low, high) && ours(low) {
        close(low);
    }
    Some(high)
}

/// `st_dev` and `st_ino` of what `path` names now.
fn stat_id(path: &CStr) -> Result<(u64, u64), Errno> {
    // SAFETY: plain data, overwritten by `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path; fills the struct of ours.
    if unsafe { libc::stat(path.as_ptr(), &mut st) } < 0 {
        return Err(last_errno());
    }
    Ok((st.st_dev, st.st_ino))
}

/// Whether `a` and `b` name files of one inode.
fn same_inode(a: RawFd, b: RawFd) -> bool {
    matches!((inode(a), inode(b)), (Ok(x), Ok(y)) if x == y)
}

/// The `f_type` of the file system `fd`'s file is on.
pub(super) fn fs_magic(fd: RawFd) -> Option<i64> {
    // SAFETY: plain data, overwritten by `fstatfs`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fills the struct of ours.
    (unsafe { libc::fstatfs(fd, &mut st) } == 0).then_some(st.f_type as i64)
}

fn close(fd: RawFd) {
    // SAFETY: a number the caller proved to name a file opened here.
    unsafe { libc::close(fd) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text file reads whole (more than one `pread`); a number the program took from
    /// under an open file fails its reads and is left to the program.
    #[test]
    fn own_files_read_whole_and_leave_a_taken_number_alone() {
        let maps = read_text("/proc/self/maps").unwrap();
        assert!(maps.len() > 4096 || maps.lines().count() > 3, "{maps}");
        assert!(read_text("/proc/self/no-such-file").is_err());
        let f = OwnFile::open(c"/proc/self/status").unwrap();
        assert!(f.raw_fd() > 3, "moved to a high number: {}", f.raw_fd());
        // The program replaces the number by a pipe of its own.
        let mut p = [0; 2];
        // SAFETY: fills the array of ours.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: the test plays the program: it puts its pipe at pagemig's number.
        assert_eq!(unsafe { libc::dup2(p[0], f.raw_fd()) }, f.raw_fd());
        let mut buf = [0u8; 16];
        assert_eq!(f.read_at(&mut buf, 0), Err(Errno::BADF));
        let taken = f.raw_fd();
        drop(f);
        assert!(inode(taken).is_ok(), "the program's descriptor was closed");
        // SAFETY: the test's own descriptors.
        unsafe {
            libc::close(taken);
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }
}
