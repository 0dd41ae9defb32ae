//! A mapped range and race-tolerant word access to it.

use std::sync::atomic::AtomicU64;

use super::{Errno, munmap};

/// A range of mapped memory, unmapped on drop when owned.
///
/// # Invariants
/// `[addr, addr + len)` is mapped, page aligned, and stays mapped for the life of the value
/// (migration replaces its pages but never leaves it unmapped).
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
    owned: bool,
}

impl Mapping {
    /// Maps `len` bytes of fresh anonymous private memory aligned to `align`.
    ///
    /// # Errors
    /// The `mmap` errno.
    pub fn new(len: usize, align: usize) -> Result<Self, Errno> {
        let addr = super::mmap_anon_aligned(len, align)?;
        // INVARIANT: freshly mapped by us; unmapped only on drop.
        Ok(Self { addr, len, owned: true })
    }

    /// [`Mapping::new`] for pagemig's own use (measuring buffers): recorded as pagemig's, so
    /// that an agent migrating the program's memory leaves it alone.
    ///
    /// # Errors
    /// The `mmap` errno.
    pub fn new_own(len: usize, align: usize) -> Result<Self, Errno> {
        let map = Self::new(len, align)?;
        crate::sys::own::claim(map.addr, map.len);
        Ok(map)
    }

    /// Refers to a range the caller owns, without unmapping it on drop.
    ///
    /// # Safety
    /// The range must be mapped, page aligned, and stay mapped for as long as the returned
    /// value lives.
    pub unsafe fn borrowed(addr: usize, len: usize) -> Self {
        // INVARIANT: promised by the caller.
        Self { addr, len, owned: false }
    }

    /// First byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    #[cfg(any(test, feature = "internals"))]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 64-bit word at `index`, or `None` past the end.
    pub fn word(&self, index: usize) -> Option<&AtomicU64> {
        if index >= self.len / 8 {
            return None;
        }
        // SAFETY: we checked that the word lies inside the range, which is mapped for the
        // life of `self` (type invariant) and 8-byte aligned (page aligned start). Other
        // threads and migration may change the memory at any time, hence an atomic.
        Some(unsafe { &*((self.addr + index * 8) as *const AtomicU64) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: an owned range was mapped by `Mapping::new` and nothing outlives us
            // that refers to it (words borrow `self`).
            let _ = unsafe { munmap(self.addr, self.len) };
        }
    }
}
