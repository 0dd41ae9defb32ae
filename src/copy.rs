//! Copy kernels: the default CPU copy of one folio (`folio_copy`) and of a batch
//! (`folios_copy`), the user-space forms of the kernel's `folio_mc_copy()` and
//! `folios_mc_copy()`.
//!
//! They return an error instead of crashing so that a failing copy can be undone; a real
//! machine-check on a poisoned source page is delivered to user space as `SIGBUS` and is
//! not caught here.
#![allow(unsafe_code)]

use crate::sys::{self, Errno};

/// One folio's copy: `len` bytes from `src` to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyPair {
    /// Destination address.
    pub dst: usize,
    /// Source address.
    pub src: usize,
    /// Bytes to copy.
    pub len: usize,
}

/// Copies one folio.
///
/// # Errors
/// `EINVAL` for a zero-length or overlapping pair.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes, and during the copy no thread
/// may write `src` (it is write-protected) or access `dst` (pagemig owns it).
pub unsafe fn folio_copy(pair: CopyPair) -> Result<(), Errno> {
    let CopyPair { dst, src, len } = pair;
    if len == 0 || (dst < src + len && src < dst + len) {
        return Err(Errno::INVAL);
    }
    // SAFETY: the caller guarantees access to both ranges; we checked they do not overlap.
    unsafe { sys::copy_bytes(dst, src, len) };
    Ok(())
}

/// Copies a batch of folios in order, stopping at the first failure.
///
/// # Errors
/// The first failing pair's error.
///
/// # Safety
/// Every pair must satisfy [`folio_copy`]'s contract.
pub unsafe fn folios_copy(pairs: &[CopyPair]) -> Result<(), Errno> {
    for pair in pairs {
        // SAFETY: forwarded from the caller's contract for every pair.
        unsafe { folio_copy(*pair)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_refuses_overlap() {
        let src = vec![7u8; 8192];
        let mut dst = vec![0u8; 8192];
        let pair = CopyPair {
            dst: dst.as_mut_ptr() as usize,
            src: src.as_ptr() as usize,
            len: 8192,
        };
        // SAFETY: two distinct live vectors of 8192 bytes, used by this thread alone.
        unsafe { folios_copy(&[pair]).unwrap() };
        assert!(dst.iter().all(|&b| b == 7));
        let overlap = CopyPair {
            dst: pair.src + 4096,
            src: pair.src,
            len: 8192,
        };
        // SAFETY: refused before any access.
        assert_eq!(unsafe { folio_copy(overlap) }, Err(Errno::INVAL));
    }
}
