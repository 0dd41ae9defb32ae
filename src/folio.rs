//! Folios: aligned chunks of 2^order base pages, the unit pagemig migrates, and the state a
//! migration records on each destination between its unmap and move phases.
//!
//! A [`Folio`] borrows the memory it names: [`crate::Region::folios`] hands out folios that
//! live no longer than the region, so safe code cannot unmap memory while a migration of it
//! runs. A folio over memory the program holds some other way is made with the `unsafe`
//! [`Folio::new`], whose caller promises the same.

#![allow(unsafe_code, reason = "a folio made from a raw address needs the caller's promise that it stays mapped")]

use std::marker::PhantomData;

use crate::error::{Error, Result};
use crate::sys::{HPAGE_SIZE, PAGE_SIZE};

/// The largest folio order pagemig handles: 9, a 2 MiB PMD-sized folio.
pub const MAX_ORDER: u8 = 9;

/// An aligned chunk of `2^order` base pages at `addr`, borrowing the memory it names for
/// `'a`.
///
/// # Invariants
/// `order <= MAX_ORDER` and `addr` is aligned to the folio's size. For `'a`, the range
/// `[addr, addr + size)` stays mapped: nothing unmaps or remaps it while a migration that
/// was handed this folio runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Folio<'a> {
    addr: usize,
    order: u8,
    memory: PhantomData<&'a [u8]>,
}

impl Folio<'static> {
    /// A folio of `size` bytes (a power of two from 4 KiB to 2 MiB) at `addr`, over memory
    /// the caller vouches for. Folios of a [`crate::Region`] come safely from
    /// [`crate::Region::folios`].
    ///
    /// # Safety
    /// `[addr, addr + size)` must be memory the caller may have migrated: the program's own
    /// private memory, not memory that something relies on staying at its physical pages
    /// (pagemig refuses what it can see: shared, file-backed, special and read-only
    /// mappings, pages pinned for DMA, its own memory). The thread that calls a migration
    /// handed this folio must not access the range during that call: an access waits for
    /// the folio's move, which that very thread performs, and the call would never end. Its
    /// signal handlers are no concern: a migration blocks every asynchronous signal on the
    /// calling thread for its length (they run once it returns, as after `move_pages(2)`);
    /// a handler of a fault signal that thread raises itself (`SIGSEGV`, `SIGBUS`, ...) must
    /// keep off the range.
    ///
    /// Every other thread may do anything to the range meanwhile — read and write it,
    /// `munmap`, `mremap` or map over it, `mprotect` it, purge it with `madvise`, `fork`:
    /// what it did stands, and the folios it touched are reported as failed (see the README's
    /// "What the program may do meanwhile"). Code pagemig runs for the caller during the
    /// call (the `progress` callback) may access the range too: it runs on a thread of its
    /// own.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad size, a misaligned or null address, or an address range
    /// that wraps.
    pub unsafe fn new(addr: usize, size: usize) -> Result<Self> {
        // SAFETY: forwarded from the caller.
        unsafe { Self::new_in(addr, size) }
    }
}

impl<'a> Folio<'a> {
    /// A folio of `size` bytes at `addr` that borrows its memory for `'a`.
    ///
    /// # Safety
    /// `[addr, addr + size)` must stay mapped for `'a` (see [`Folio::new`]).
    ///
    /// # Errors
    /// As [`Folio::new`].
    pub(crate) unsafe fn new_in(addr: usize, size: usize) -> Result<Self> {
        let order = order_of(size)?;
        if addr.checked_add(size).is_none() {
            return Err(Error::Invalid(format!(
                "folio at {addr:#x} of {size:#x} bytes wraps around the end of the address space"
            )));
        }
        if addr == 0 || addr % size != 0 {
            return Err(Error::Invalid(format!("folio address {addr:#x} is not aligned to its size {size:#x}")));
        }
        // INVARIANT: order checked by order_of, alignment just checked; the caller promises
        // the mapping for 'a.
        Ok(Self { addr, order, memory: PhantomData })
    }

    /// The same folio with its borrow forgotten, for the pipeline's own records, which live
    /// only within a call that holds the borrow.
    pub(crate) fn erased(self) -> Folio<'static> {
        Folio { addr: self.addr, order: self.order, memory: PhantomData }
    }

    /// First byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The order: the folio holds `2^order` base pages.
    pub fn order(&self) -> u8 {
        self.order
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        PAGE_SIZE << self.order
    }

    /// Number of base pages.
    pub fn nr_pages(&self) -> usize {
        1 << self.order
    }

    /// One past the last byte.
    pub fn end(&self) -> usize {
        self.addr + self.size()
    }

    /// Whether this is a PMD-sized (transparent huge page) folio.
    pub fn is_pmd(&self) -> bool {
        self.size() == HPAGE_SIZE
    }
}

/// The order of a folio of `size` bytes.
///
/// # Errors
/// [`Error::Invalid`] unless `size` is a power of two from 4 KiB to 2 MiB.
pub fn order_of(size: usize) -> Result<u8> {
    if !size.is_power_of_two() || !(PAGE_SIZE..=HPAGE_SIZE).contains(&size) {
        return Err(Error::Invalid(format!(
            "folio size {size} is not a power of two from 4096 (4KiB) to 2097152 (2MiB)"
        )));
    }
    Ok((size / PAGE_SIZE).trailing_zeros() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapping_range_is_named_as_such() {
        // SAFETY: the folio is refused before it describes anything.
        let e = unsafe { Folio::new(usize::MAX - 4095, 4096) }.unwrap_err().to_string();
        assert!(e.contains("wraps around"), "{e}");
        // SAFETY: as above.
        let e = unsafe { Folio::new(0x1000, 8192) }.unwrap_err().to_string();
        assert!(e.contains("not aligned"), "{e}");
    }

    #[test]
    fn folio_sizes_and_alignment() {
        assert_eq!(order_of(4096).unwrap(), 0);
        assert_eq!(order_of(65536).unwrap(), 4);
        assert_eq!(order_of(2 << 20).unwrap(), 9);
        for bad in [0, 1, 2048, 12288, 4 << 20] {
            assert!(order_of(bad).is_err(), "{bad}");
        }
        // SAFETY: these folios only describe addresses; nothing migrates them.
        unsafe {
            let f = Folio::new(0x20_0000, 2 << 20).unwrap();
            assert!(f.is_pmd());
            assert_eq!((f.nr_pages(), f.end()), (512, 0x40_0000));
            assert!(Folio::new(0x1000, 8192).is_err());
            assert!(Folio::new(0, 4096).is_err());
        }
    }
}
