//! Memory pagemig migrates: anonymous private ranges carved into folios of one size.
//!
//! [`Region::new`] maps fresh memory on a chosen node; [`Region::adopt`] takes a range the
//! program already has, after checking `/proc/self/maps` that pagemig may move it. The
//! region's address never changes: migration replaces the pages under it.

use std::sync::atomic::AtomicU64;

use crate::error::{Error, Result};
use crate::folio::{Folio, order_of};
use crate::maps;
use crate::numa;
use crate::sys::{self, Advice, HPAGE_SIZE, Mapping};

/// An anonymous private range of `len` bytes carved into folios of `folio_size`.
///
/// # Invariants
/// The mapping's address is aligned to `folio_size`, its length is a non-zero multiple of
/// it, and the range was
/// mapped private, anonymous and read-write when the region was made. An owned region is
/// unmapped on drop.
#[derive(Debug)]
pub struct Region {
    map: Mapping,
    folio_size: usize,
}

fn check_shape(addr: usize, len: usize, folio_size: usize) -> Result<()> {
    order_of(folio_size)?;
    if len == 0 {
        return Err(Error::Invalid("length is zero".into()));
    }
    if len % folio_size != 0 {
        return Err(Error::Invalid(format!("length {len} is not a multiple of the folio size {folio_size}")));
    }
    if addr % folio_size != 0 {
        return Err(Error::Invalid(format!("address {addr:#x} is not aligned to the folio size {folio_size:#x}")));
    }
    if addr.checked_add(len).is_none() {
        return Err(Error::Invalid(format!("range {addr:#x}+{len:#x} wraps around")));
    }
    Ok(())
}

impl Region {
    /// Maps `len` bytes of fresh memory, carved into folios of `folio_size`, populated on
    /// `node` (or wherever the kernel's policy puts it with `None`).
    ///
    /// The pages are placed as most programs' are: by the policy of the thread that first
    /// touches them (the calling thread's, bound to `node` while it populates the region and
    /// restored after), so the mapping has no memory policy of its own. `mbind(2)` gives
    /// it one.
    ///
    /// 2 MiB folios are 2 MiB aligned and backed by transparent huge pages
    /// (`MADV_HUGEPAGE`); smaller folios use base pages (`MADV_NOHUGEPAGE`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero length or a bad folio size, [`Error::UnknownNode`],
    /// or [`Error::Sys`] when mapping or populating fails.
    pub fn new(len: usize, folio_size: usize, node: Option<u32>) -> Result<Self> {
        check_shape(0, len, folio_size)?;
        if let Some(n) = node {
            numa::check_node(n)?;
        }
        let map = Mapping::new(len, folio_size).map_err(Error::sys("mmap"))?;
        let addr = map.addr();
        // INVARIANT: a fresh aligned private anonymous mapping of `len` bytes.
        let region = Self { map, folio_size };
        let advice = if folio_size == HPAGE_SIZE { Advice::HugePage } else { Advice::NoHugePage };
        sys::madvise(addr, len, advice).map_err(Error::sys("madvise (huge page advice)"))?;
        let saved = match node {
            Some(n) => {
                let saved = sys::ThreadPolicy::current().map_err(Error::sys("get_mempolicy"))?;
                sys::set_mempolicy_bind(Some(n)).map_err(Error::sys("set_mempolicy"))?;
                Some(saved)
            }
            None => None,
        };
        let populated = sys::madvise(addr, len, Advice::PopulateWrite);
        if let Some(saved) = saved {
            saved.restore().map_err(Error::sys("set_mempolicy (restoring the thread's policy)"))?;
        }
        populated.map_err(Error::sys("madvise(MADV_POPULATE_WRITE)"))?;
        Ok(region)
    }

    /// Takes over an existing range of this process for migration, without owning it: it is
    /// not unmapped on drop.
    ///
    /// # Safety
    /// The range must stay mapped for as long as the region lives, and nothing but the
    /// region may reach it through Rust references meanwhile (the region reads and writes
    /// it through [`Region::word`], [`Region::atomic_words`] and [`Region::as_mut_slice`]).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero, unaligned or wrapping range or a bad folio size;
    /// [`Error::NotMovable`] when part of the range is unmapped, shared, file-backed,
    /// special (`[heap]`, `[stack]`, `[vdso]`…), not read-write, or executable.
    #[allow(unsafe_code, reason = "adopting memory needs the caller's promise that it stays mapped")]
    pub unsafe fn adopt(addr: usize, len: usize, folio_size: usize) -> Result<Self> {
        check_shape(addr, len, folio_size)?;
        maps::check_movable(addr, addr + len, &maps::vmas()?)?;
        // SAFETY: /proc/self/maps shows the range mapped and page aligned (checked just
        // above); the caller promises it stays mapped while the region lives.
        let map = unsafe { Mapping::borrowed(addr, len) };
        // INVARIANT: shape checked above, mappings checked against /proc/self/maps.
        Ok(Self { map, folio_size })
    }

    /// First byte.
    pub fn addr(&self) -> usize {
        self.map.addr()
    }

    /// A raw pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr() as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a region is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The size of each folio.
    pub fn folio_size(&self) -> usize {
        self.folio_size
    }

    /// The region's folios, in address order. They borrow the region: it cannot be
    /// dropped while a migration of them runs.
    ///
    /// ```compile_fail
    /// # use pagemig::{Region, migrate_pages, Mode, Reason};
    /// let region = Region::new(4 << 20, 4096, None)?;
    /// let folios = region.folios();
    /// let migrating = std::thread::spawn(move || migrate_pages(&folios, 0, Reason::Syscall, Mode::Sync));
    /// drop(region); // error: `region` is borrowed by its folios
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    ///
    /// ```
    /// # use pagemig::{Region, migrate_pages, Mode, Reason};
    /// let region = Region::new(4 << 20, 4096, None)?;
    /// std::thread::scope(|s| {
    ///     s.spawn(|| migrate_pages(&region.folios(), 0, Reason::Syscall, Mode::Sync));
    /// });
    /// drop(region); // after the migrating thread is done with it
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    #[allow(unsafe_code, reason = "the region vouches for its own mapping")]
    pub fn folios(&self) -> Vec<Folio<'_>> {
        (self.addr()..self.addr() + self.len())
            .step_by(self.folio_size)
            // SAFETY: the region keeps its mapping for as long as it lives (type invariant),
            // and the folios borrow it.
            .map(|a| unsafe { Folio::new_in(a, self.folio_size) }.expect("region invariant: aligned folios"))
            .collect()
    }

    /// The 64-bit word at `index` (byte offset `8 * index`), for access that may race with
    /// other threads and with migration.
    ///
    /// # Panics
    /// When `index` is past the region's end.
    pub fn word(&self, index: usize) -> &AtomicU64 {
        self.map.word(index).unwrap_or_else(|| panic!("word {index} outside a region of {} bytes", self.len()))
    }

    /// The region's bytes, for a caller that has the region to itself: while this borrow
    /// lasts no folio of it can be migrating and no word can be in use elsewhere.
    ///
    /// ```
    /// # use pagemig::Region;
    /// let mut region = Region::new(1 << 20, 4096, None)?;
    /// region.as_mut_slice().fill(0xa5);
    /// assert!(region.as_mut_slice().iter().all(|&b| b == 0xa5));
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    #[allow(unsafe_code, reason = "a slice over the region's own mapping")]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is readable and writable for `len` bytes for as long as the
        // region lives (type invariant), and `&mut self` excludes every other borrow of the
        // region (folios, words) for as long as the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len()) }
    }

    /// The region's 64-bit words, for access that may race with other threads and with
    /// migration ([`Region::word`] for all of them).
    #[allow(unsafe_code, reason = "a slice over the region's own mapping")]
    pub fn atomic_words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page aligned, readable and writable, and lives as long as
        // `self` (type invariant); atomics may alias other atomic access, and migration
        // copies a folio only while every access to it waits.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast::<AtomicU64>(), self.words()) }
    }

    /// The number of 64-bit words.
    pub fn words(&self) -> usize {
        self.len() / 8
    }

    /// How many pages of the region are on each node (a `move_pages` status query).
    ///
    /// # Errors
    /// As [`numa::placement`].
    pub fn placement(&self) -> Result<std::collections::BTreeMap<i32, usize>> {
        numa::placement(self.addr(), self.len())
    }

    /// Bytes of the region backed by transparent huge pages (`AnonHugePages` in smaps).
    ///
    /// # Errors
    /// [`Error::Io`] when smaps cannot be read.
    pub fn anon_huge_bytes(&self) -> Result<u64> {
        self.smaps_sum("AnonHugePages:")
    }

    /// Bytes of the region that are locked in memory (`Locked` in smaps).
    ///
    /// # Errors
    /// [`Error::Io`] when smaps cannot be read.
    pub fn locked_bytes(&self) -> Result<u64> {
        self.smaps_sum("Locked:")
    }

    fn smaps_sum(&self, field: &str) -> Result<u64> {
        let text = crate::sys::read_text("/proc/self/smaps").map_err(Error::io("/proc/self/smaps"))?;
        let (start, end) = (self.addr(), self.addr() + self.len());
        let mut inside = false;
        let mut total = 0u64;
        for line in text.lines() {
            let first = line.split(' ').next().unwrap_or("");
            if let Some((s, e)) = first.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                    inside = s >= start && e <= end;
                    continue;
                }
            }
            if inside {
                if let Some(rest) = line.strip_prefix(field) {
                    let kb: u64 = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    total += kb * 1024;
                }
            }
        }
        Ok(total)
    }

    /// Locks the region in memory (`mlock(2)`).
    ///
    /// # Errors
    /// The `mlock` errno.
    pub fn mlock(&self) -> Result<()> {
        sys::mlock(self.addr(), self.len()).map_err(Error::sys("mlock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;
    use std::sync::atomic::Ordering;

    #[test]
    fn new_region_is_carved_into_folios() {
        watchdog(60, || {
            let r = Region::new(1 << 20, 64 << 10, None).unwrap();
            assert_eq!(r.folios().len(), 16);
            assert!(r.folios().iter().all(|f| f.size() == 64 << 10));
            r.word(5).store(99, Ordering::Relaxed);
            assert_eq!(r.word(5).load(Ordering::Relaxed), 99);
            let placed: usize = r.placement().unwrap().iter().filter(|(n, _)| **n >= 0).map(|(_, c)| c).sum();
            assert_eq!(placed, 256);
        });
    }

    #[test]
    fn bad_shapes_are_refused() {
        watchdog(60, || {
            assert!(matches!(Region::new(0, 4096, None), Err(Error::Invalid(_))));
            assert!(matches!(Region::new(6144, 4096, None), Err(Error::Invalid(_))));
            assert!(matches!(Region::new(8192, 3000, None), Err(Error::Invalid(_))));
            assert!(matches!(Region::new(8192, 4096, Some(999)), Err(Error::UnknownNode { .. })));
        });
    }
}
