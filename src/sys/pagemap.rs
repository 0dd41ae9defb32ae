//! What the kernel says of this process's pages and mappings: `/proc/self/pagemap` (its
//! `PAGEMAP_SCAN` ioctl and entries) and the `PROCMAP_QUERY` ioctl of `/proc/self/maps`.

use linux_raw_sys::general::{page_region, pm_scan_arg};

use super::{Errno, PAGE_SIZE, check_int, last_errno};

/// `/proc/self/pagemap` entry bits: present, write-protected through a userfaultfd,
/// mapped by this process alone, soft-dirty; the page frame (zero without
/// `CAP_SYS_ADMIN`).
const PM_PRESENT: u64 = 1 << 63;
const PM_UFFD_WP: u64 = 1 << 57;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_SOFT_DIRTY: u64 = 1 << 55;
#[cfg(any(feature = "ffi", feature = "internals"))]
const PM_PFN: u64 = (1 << 55) - 1;

/// What `/proc/self/pagemap` says of a page that bears on who may move it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageMarks {
    /// Present (the others are false where not).
    pub present: bool,
    /// Present and mapped by another process too (a `fork`'s copy-on-write sharing, bit 56
    /// "exclusively mapped" clear): the pages `move_pages(2)` refuses with `EACCES` without
    /// `MPOL_MF_MOVE_ALL`.
    pub shared: bool,
    /// Write-protected through a userfaultfd (bit 57): the program's own, which the
    /// kernel's migration keeps on the new page.
    pub uffd_wp: bool,
    /// Written since the program last cleared the soft-dirty bits (bit 55; always set
    /// where the kernel does not track them), which the kernel's migration keeps as it was.
    pub soft_dirty: bool,
}

/// [`PageMarks`] of each page address in `pages`; pages not present have none.
///
/// # Errors
/// The errno of opening or reading `/proc/self/pagemap`.
pub fn page_marks(pages: &[usize]) -> Result<Vec<PageMarks>, Errno> {
    /// Entries read at once, at most.
    const CHUNK: usize = 8192;
    let mut order: Vec<usize> = (0..pages.len()).collect();
    order.sort_unstable_by_key(|&i| pages[i] / PAGE_SIZE);
    let mut marks = vec![PageMarks::default(); pages.len()];
    let tracked = soft_dirty_tracked();
    let mut buf = vec![0u8; CHUNK * 8];
    super::with_kept_file(c"/proc/self/pagemap", |file| {
        // A try after a lost number starts over.
        marks.fill(PageMarks::default());
        let mut k = 0;
        while k < order.len() {
        // A run of pages no more than CHUNK entries wide, read with one pread.
        let first = pages[order[k]] / PAGE_SIZE;
        let mut j = k;
        while j < order.len() && pages[order[j]] / PAGE_SIZE < first + CHUNK {
            j += 1;
        }
        let span = pages[order[j - 1]] / PAGE_SIZE - first + 1;
        let bytes = &mut buf[..span * 8];
        file.read_exact_at(bytes, (first * 8) as u64)?;
        for &i in &order[k..j] {
            let at = (pages[i] / PAGE_SIZE - first) * 8;
            let entry = u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
            if entry & PM_PRESENT != 0 {
                marks[i] = PageMarks {
                    present: true,
                    shared: entry & PM_EXCLUSIVE == 0,
                    uffd_wp: entry & PM_UFFD_WP != 0,
                    soft_dirty: entry & PM_SOFT_DIRTY != 0 || !tracked,
                };
            }
        }
        k = j;
    }
    Ok(())
    })?;
    Ok(marks)
}

/// Whether the kernel tracks soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`): a page written just
/// now shows bit 55. Asked once per process.
pub fn soft_dirty_tracked() -> bool {
    // Per process (a child takes its parent's answer): a `OnceLock` being filled at a
    // `fork()` would leave the child waiting on it for good.
    static TRACKED: crate::process::PerProcess<bool> = crate::process::PerProcess::new();
    *TRACKED.get_or_init(|parent| {
        if let Some(&tracked) = parent {
            return tracked;
        }
        let Ok(map) = super::Mapping::new_own(PAGE_SIZE, PAGE_SIZE) else { return true };
        // SAFETY: the page is the fresh mapping's own, which nothing else knows of.
        unsafe { std::ptr::write_volatile(map.addr() as *mut u8, 1) };
        // Unknown: as tracked (a page then counts as written only where its bit says so).
        pagemap_entry(map.addr()).is_none_or(|e| e & PM_SOFT_DIRTY != 0)
    })
}

/// Reads the 8 bytes at `at` of the file at `path`: raw system calls and a buffer on the
/// stack (async-signal-safe); `None` where it cannot.
fn read_u64_at(path: &std::ffi::CStr, at: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    super::with_file(path, |f| f.read_exact_at(&mut b, at)).ok()?;
    Some(u64::from_ne_bytes(b))
}

/// The `/proc/self/pagemap` entry of the page at `addr` (async-signal-safe).
fn pagemap_entry(addr: usize) -> Option<u64> {
    read_u64_at(c"/proc/self/pagemap", (addr / PAGE_SIZE * 8) as u64)
}

/// Whether the page at `page` belongs to a folio larger than a page that is not mapped by
/// one huge-page entry (a huge page split into page entries, a multi-size one): its page
/// frame from `/proc/self/pagemap`, then `/proc/kpageflags` (compound head or tail). Both
/// need `CAP_SYS_ADMIN` (without it, or where either cannot be read, false).
/// Async-signal-safe.
#[cfg(any(feature = "ffi", feature = "internals"))]
pub fn large_folio_at(page: usize) -> bool {
    const COMPOUND_HEAD: u64 = 1 << 15;
    const COMPOUND_TAIL: u64 = 1 << 16;
    let Some(entry) = pagemap_entry(page) else { return false };
    let pfn = entry & PM_PFN;
    entry & PM_PRESENT != 0
        && pfn != 0
        && read_u64_at(c"/proc/kpageflags", pfn * 8).is_some_and(|f| f & (COMPOUND_HEAD | COMPOUND_TAIL) != 0)
}

/// Whether the 2 MiB block at `block` (aligned) is mapped by one transparent huge page now
/// (`PAGEMAP_SCAN`, Linux 6.7; false where it cannot tell). Raw system calls and a buffer
/// on the stack: async-signal-safe.
#[cfg(any(feature = "ffi", feature = "internals"))]
pub fn huge_page_at(block: usize) -> bool {
    let Some(end) = block.checked_add(super::HPAGE_SIZE) else { return false };
    let mut region = [page_region { start: 0, end: 0, categories: 0 }];
    let found = super::with_file(c"/proc/self/pagemap", |f| {
        f.check()?;
        let found = scan_step(f.raw_fd(), block, end, linux_raw_sys::general::PAGE_IS_HUGE, &mut region);
        f.check().and(found)
    });
    found.is_ok_and(|(n, _)| n == 1) && region[0].start == block as u64 && region[0].end == end as u64
}

/// One `PAGEMAP_SCAN` of `[start, end)` on the pagemap descriptor `fd`: the ranges whose
/// pages are each in one of `categories`, into `regions`; returns how many it filled and
/// where the walk ended. No allocation (async-signal-safe).
///
/// # Errors
/// The ioctl's errno.
fn scan_step(
    fd: libc::c_int,
    start: usize,
    end: usize,
    categories: u32,
    regions: &mut [page_region],
) -> Result<(usize, usize), Errno> {
    // _IOWR('f', 16, struct pm_scan_arg)
    const PAGEMAP_SCAN: libc::c_ulong =
        (3 << 30) | ((std::mem::size_of::<pm_scan_arg>() as libc::c_ulong) << 16) | (0x66 << 8) | 16;
    let mut arg = pm_scan_arg {
        size: std::mem::size_of::<pm_scan_arg>() as u64,
        flags: 0,
        start: start as u64,
        end: end as u64,
        walk_end: 0,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: 0,
        category_anyof_mask: u64::from(categories),
        return_mask: u64::from(categories),
    };
    // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `regions`, which holds
    // `vec_len` entries and outlives the call; the ioctl only reads page tables.
    let n = unsafe { libc::ioctl(fd, PAGEMAP_SCAN, &mut arg as *mut pm_scan_arg) };
    if n < 0 { Err(last_errno()) } else { Ok((n as usize, arg.walk_end as usize)) }
}

/// A mapping as `PROCMAP_QUERY` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueriedVma {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// `PROCMAP_QUERY_VMA_*` bits: readable 1, writable 2, executable 4, shared 8.
    pub flags: u64,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[anon:name]`), empty for plain anonymous memory.
    pub name: String,
}

/// The mapping of this process that holds `addr`, or (with `or_next`) the first one above
/// it: `ioctl(fd, PROCMAP_QUERY)` on an open `/proc/self/maps` (Linux 6.11), one lookup
/// in the kernel's tree instead of a walk of every mapping.
///
/// # Errors
/// `ENOENT` when there is none, `ENOTTY` before Linux 6.11, or the ioctl's errno.
pub fn procmap_query(fd: &super::OwnFile, addr: usize, or_next: bool) -> Result<QueriedVma, Errno> {
    use linux_raw_sys::general::{procmap_query, procmap_query_flags};
    // _IOWR('f', 17, struct procmap_query)
    const PROCMAP_QUERY: libc::c_ulong =
        (3 << 30) | ((std::mem::size_of::<procmap_query>() as libc::c_ulong) << 16) | (0x66 << 8) | 17;
    let mut name = [0u8; 4096];
    let mut q = procmap_query {
        size: std::mem::size_of::<procmap_query>() as u64,
        query_flags: if or_next { procmap_query_flags::PROCMAP_QUERY_COVERING_OR_NEXT_VMA as u64 } else { 0 },
        query_addr: addr as u64,
        vma_start: 0,
        vma_end: 0,
        vma_flags: 0,
        vma_page_size: 0,
        vma_offset: 0,
        inode: 0,
        dev_major: 0,
        dev_minor: 0,
        vma_name_size: name.len() as u32,
        build_id_size: 0,
        vma_name_addr: name.as_mut_ptr() as u64,
        build_id_addr: 0,
    };
    // An ioctl on a number the program took since could mean anything to its file.
    fd.check()?;
    // SAFETY: `q` is a valid `procmap_query` of its own size, and its name buffer is
    // `name`, writable for `vma_name_size` bytes for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.raw_fd(), PROCMAP_QUERY, &mut q) };
    // The answer is this file's only while the number still names it.
    fd.check()?;
    check_int(rc)?;
    let len = (q.vma_name_size as usize).min(name.len());
    let text = &name[..len];
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(len)];
    Ok(QueriedVma {
        start: q.vma_start as usize,
        end: q.vma_end as usize,
        flags: q.vma_flags,
        inode: q.inode,
        name: String::from_utf8_lossy(text).into_owned(),
    })
}

/// The ranges of `[start, end)` mapped by huge pages in this process (a transparent huge
/// page mapped whole by one page-table entry), from the `PAGEMAP_SCAN` ioctl on
/// `/proc/self/pagemap` (Linux 6.7), as `(start, end)` in address order.
///
/// # Errors
/// The errno of opening `/proc/self/pagemap` or of the ioctl (`EINVAL` for an unaligned or
/// wrapping range, `ENOTTY` before Linux 6.7).
pub fn huge_ranges(start: usize, end: usize) -> Result<Vec<(usize, usize)>, Errno> {
    scan_ranges(start, end, linux_raw_sys::general::PAGE_IS_HUGE, false)
}

/// [`huge_ranges`] through `/proc/self/pagemap` kept open between uses
/// ([`super::with_kept_file`]): for a question asked again and again (after every move of
/// huge folios), where opening the file each time cost more than the scan. Not
/// async-signal-safe.
///
/// # Errors
/// As [`huge_ranges`].
pub fn huge_ranges_kept(start: usize, end: usize) -> Result<Vec<(usize, usize)>, Errno> {
    scan_ranges(start, end, linux_raw_sys::general::PAGE_IS_HUGE, true)
}

/// The ranges of `[start, end)` whose pages are present in memory (not swapped out, never
/// touched or purged), as [`huge_ranges`] finds them: the kernel skips empty page tables,
/// so a sparse mapping of terabytes costs what its present pages cost.
///
/// # Errors
/// As [`huge_ranges`].
pub fn present_ranges(start: usize, end: usize) -> Result<Vec<(usize, usize)>, Errno> {
    scan_ranges(start, end, linux_raw_sys::general::PAGE_IS_PRESENT, false)
}

/// The ranges of `[start, end)` holding a page (present, or swapped out, or being migrated
/// by the kernel: anything but an empty page table entry), as [`present_ranges`] finds them.
///
/// # Errors
/// As [`huge_ranges`].
pub fn held_ranges(start: usize, end: usize) -> Result<Vec<(usize, usize)>, Errno> {
    scan_ranges(start, end, linux_raw_sys::general::PAGE_IS_PRESENT | linux_raw_sys::general::PAGE_IS_SWAPPED, false)
}

/// The ranges of `[start, end)` whose pages are each in one of `categories` (`PAGE_IS_*`
/// bits), by the `PAGEMAP_SCAN` ioctl, adjacent ranges merged; `kept`: through the file
/// kept open between uses.
fn scan_ranges(start: usize, end: usize, categories: u32, kept: bool) -> Result<Vec<(usize, usize)>, Errno> {
    let mut regions = vec![page_region { start: 0, end: 0, categories: 0 }; 256];
    let with = if kept { super::with_kept_file } else { super::with_file };
    with(c"/proc/self/pagemap", &mut |file: &super::OwnFile| {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut at = start;
    while at < end {
        file.check()?;
        let step = scan_step(file.raw_fd(), at, end, categories, &mut regions);
        let (n, walked) = file.check().and(step)?;
        for r in &regions[..n] {
            match out.last_mut() {
                Some(last) if last.1 == r.start as usize => last.1 = r.end as usize,
                _ => out.push((r.start as usize, r.end as usize)),
            }
        }
        if walked <= at {
            break;
        }
        at = walked;
    }
    Ok(out)
    })
}
