//! Copy kernels: the default CPU copy of one folio (`folio_copy`) and of a batch
//! (`folios_copy`), the user-space forms of the kernel's `folio_mc_copy()` and
//! `folios_mc_copy()`.
//!
//! They return an error instead of crashing so that a failing copy can be undone; a real
//! machine-check on a poisoned source page is delivered to user space as `SIGBUS` and is
//! not caught here.
#![allow(unsafe_code)]

use crate::sys::uffd::Uffd;
use crate::sys::{self, Errno};

/// What a destination is when its copy starts.
#[derive(Clone, Copy, Debug)]
pub enum Dst<'a> {
    /// Populated memory: the copy stores into it.
    Mapped,
    /// No pages yet, registered in missing mode with this userfaultfd: the copy allocates
    /// each page and fills it in one step (`UFFDIO_COPY`), so the kernel never zeroes it
    /// first and every destination byte is written once.
    Empty(&'a Uffd),
}

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

/// Copies a batch of folios in order into destinations that are all `dst`, stopping at the
/// first failure.
///
/// Into [`Dst::Empty`] destinations each coalesced pair is one `UFFDIO_COPY`; a page that
/// is there already (a part copied before) is stored into instead.
///
/// # Errors
/// The first failing pair's error; `ENOMEM` when the kernel cannot allocate a page.
///
/// # Safety
/// Every pair must satisfy [`folio_copy`]'s contract, and an `Empty` destination must be
/// registered with its userfaultfd and not be read by anyone before the copy into it ends.
pub unsafe fn folios_copy_to(pairs: &[CopyPair], dst: Dst<'_>) -> Result<(), Errno> {
    let Dst::Empty(uffd) = dst else {
        // SAFETY: forwarded from the caller's contract.
        return unsafe { folios_copy(pairs) };
    };
    for pair in coalesce(pairs) {
        if pair.len == 0 || (pair.dst < pair.src + pair.len && pair.src < pair.dst + pair.len) {
            return Err(Errno::INVAL);
        }
        let page = sys::PAGE_SIZE;
        if pair.dst % page != 0 || pair.src % page != 0 || pair.len % page != 0 {
            // Not whole pages: stored into; a missing page is filled with zeros by the
            // engine's fault handler first.
            // SAFETY: forwarded from the caller's contract.
            unsafe { folio_copy(pair)? };
            continue;
        }
        let mut done = 0;
        let mut again = 0;
        while done < pair.len {
            // SAFETY: the caller promises the destination is ours alone and nobody reads it
            // before the copy ends: filling it surprises nobody.
            match unsafe { uffd.copy(pair.dst + done, pair.src + done, pair.len - done) } {
                Ok(()) => done = pair.len,
                Err((n, Errno::EXIST)) => {
                    // A page already there (a part copied before): stored into.
                    let at = done + n;
                    // SAFETY: inside the caller's pair; the page is mapped (EEXIST).
                    unsafe { sys::copy_bytes_nt(pair.dst + at, pair.src + at, page) };
                    done = at + page;
                }
                Err((n, Errno::AGAIN)) if again < 1000 => {
                    done += n;
                    again += 1;
                    std::thread::yield_now();
                }
                Err((_, errno)) => return Err(errno),
            }
        }
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
