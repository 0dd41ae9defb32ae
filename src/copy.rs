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
    unsafe { sys::copy_bytes_nt(dst, src, len) };
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
    for pair in coalesce(pairs) {
        // SAFETY: forwarded from the caller's contract: a coalesced pair is the union of
        // adjacent pairs, each of which satisfies it.
        unsafe { folio_copy(pair)? };
    }
    Ok(())
}

/// Merges pairs that continue each other in both source and destination into one copy:
/// one large `memcpy` runs faster than many small ones over the same bytes.
pub fn coalesce(pairs: &[CopyPair]) -> impl Iterator<Item = CopyPair> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let mut cur = *pairs.get(i)?;
        i += 1;
        while let Some(next) = pairs.get(i) {
            if next.src != cur.src + cur.len || next.dst != cur.dst + cur.len {
                break;
            }
            cur.len += next.len;
            i += 1;
        }
        Some(cur)
    })
}

/// Times a plain copy of `len` bytes between two populated buffers laid out like a region
/// of `folio_size` folios (2 MiB folios: THP-backed), the physical limit a migration of the
/// same bytes is measured against. Returns the time of the copy alone.
///
/// # Errors
/// The errno of mapping or populating the buffers.
pub fn memcpy_baseline(len: usize, folio_size: usize) -> Result<std::time::Duration, Errno> {
    let huge = folio_size >= sys::HPAGE_SIZE;
    let align = folio_size.max(sys::PAGE_SIZE);
    let src = sys::Mapping::new(len, align)?;
    let dst = sys::Mapping::new(len, align)?;
    for m in [&src, &dst] {
        let advice = if huge { sys::Advice::HugePage } else { sys::Advice::NoHugePage };
        sys::madvise(m.addr(), len, advice)?;
        sys::madvise(m.addr(), len, sys::Advice::PopulateWrite)?;
    }
    let started = std::time::Instant::now();
    // SAFETY: two distinct mappings of `len` bytes that only this function can reach.
    unsafe { sys::copy_bytes(dst.addr(), src.addr(), len) };
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_pairs_coalesce() {
        let p = |dst, src, len| CopyPair { dst, src, len };
        let pairs = [
            p(0x10000, 0x1000, 0x1000),
            p(0x11000, 0x2000, 0x1000),
            p(0x13000, 0x3000, 0x1000),
            p(0x14000, 0x4000, 0x1000),
        ];
        let merged: Vec<_> = coalesce(&pairs).collect();
        assert_eq!(merged, [p(0x10000, 0x1000, 0x2000), p(0x13000, 0x3000, 0x2000)]);
        assert_eq!(coalesce(&[]).count(), 0);
    }

    #[test]
    fn copies_and_refuses_overlap() {
        let src = vec![7u8; 8192];
        let mut dst = vec![0u8; 8192];
        let pair = CopyPair { dst: dst.as_mut_ptr() as usize, src: src.as_ptr() as usize, len: 8192 };
        // SAFETY: two distinct live vectors of 8192 bytes, used by this thread alone.
        unsafe { folios_copy(&[pair]).unwrap() };
        assert!(dst.iter().all(|&b| b == 7));
        let overlap = CopyPair { dst: pair.src + 4096, src: pair.src, len: 8192 };
        // SAFETY: refused before any access.
        assert_eq!(unsafe { folio_copy(overlap) }, Err(Errno::INVAL));
    }
}
