//! Thin, safe wrappers over the system calls pagemig is built on.
//!
//! This module and the copy kernels (their loops: `copy::simd`) are the only places with
//! `unsafe` code. Every wrapper
//! returns an [`Errno`] on failure; the callers above attach context. The raw calls go
//! through `libc::syscall` for the NUMA calls that glibc does not wrap (`mbind`,
//! `get_mempolicy`, `move_pages`) and through `libc` for the memory-management calls;
//! constants and structures come from `linux-raw-sys`, so no C toolchain or libclang is
//! needed at build time.
//!
//! By topic: `mm` (mappings, advice, locking), `mempolicy` (policies and placement),
//! `pagemap` (what the kernel says of pages and mappings), `procmem` (reads of the
//! process's own memory that fail rather than wait), `task` (credentials, forked
//! children, CPU affinity), `uffd` (userfaultfd), `thread`
//! (threads with every signal blocked), `mapping` (an owned mapping); their items are
//! re-exported here.
#![allow(unsafe_code)]

mod files;
pub mod mapping;
pub(crate) mod own;
mod mempolicy;
mod mm;
mod pagemap;
mod procmem;
mod task;
pub mod thread;
pub mod uffd;
pub mod vault;

pub use files::{OwnFile, put_kept, read_kept_text, read_text, take_kept, with_file, with_kept_file};
pub use mapping::Mapping;
pub use mempolicy::*;
pub use mm::*;
pub use pagemap::*;
pub use procmem::ProcMem;
pub use task::*;

pub use rustix::io::Errno;

/// The base page size pagemig works in (x86-64).
pub const PAGE_SIZE: usize = 4096;
/// The size of a PMD-mapped transparent huge page (x86-64).
pub const HPAGE_SIZE: usize = 2 << 20;

pub(crate) fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

pub(crate) fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 { Err(last_errno()) } else { Ok(ret) }
}

fn check_int(ret: libc::c_int) -> Result<(), Errno> {
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush writes dirty lines back: every byte reads as written after it, unaligned
    /// ends included.
    #[test]
    fn flushed_lines_keep_their_data() {
        let buf: Vec<u8> = (0..(1 << 20) + 77).map(|i| (i * 7 + 3) as u8).collect();
        // SAFETY: `buf` is ours and readable throughout.
        let flushed = unsafe { crate::copy::simd::flush_cache(buf.as_ptr() as usize + 5, buf.len() - 5) };
        assert_eq!(flushed, cfg!(target_arch = "x86_64"));
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i * 7 + 3) as u8));
    }

    #[test]
    fn aligned_mapping_is_aligned_and_usable() {
        let addr = mmap_anon_aligned(HPAGE_SIZE, HPAGE_SIZE).unwrap();
        assert_eq!(addr % HPAGE_SIZE, 0);
        madvise(addr, HPAGE_SIZE, Advice::PopulateWrite).unwrap();
        // SAFETY: the mapping is ours and populated.
        unsafe {
            *(addr as *mut u64) = 7;
            assert_eq!(*(addr as *const u64), 7);
            munmap(addr, HPAGE_SIZE).unwrap();
        }
    }

    #[test]
    fn non_temporal_copy_copies_every_byte_on_each_path() {
        let src = Mapping::new(1 << 20, HPAGE_SIZE).unwrap();
        let dst = Mapping::new(1 << 20, HPAGE_SIZE).unwrap();
        for i in 0..src.len() / 8 {
            src.word(i)
                .unwrap()
                .store((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), std::sync::atomic::Ordering::Relaxed);
        }
        // (offset, len): the two-stream AVX2 path (whole, and with halves of an odd number
        // of lines), the one-stream AVX2 path, the SSE path (len not a multiple of 128), the
        // plain path (short or unaligned). Bytes around the range must stay as they were.
        let cases =
            [(0, 1 << 19), (128, (64 << 10) + 128), (8192, 8192), (4096, 4096 + 64), (64, 192), (8, 4096), (0, 100)];
        for (off, len) in cases {
            // SAFETY: both ranges lie inside our two private mappings.
            unsafe {
                std::ptr::write_bytes(dst.addr() as *mut u8, 0xaa, dst.len());
                crate::copy::simd::copy_bytes_nt(dst.addr() + off, src.addr() + off, len);
            }
            for b in off.saturating_sub(64)..(off + len + 64) {
                // SAFETY: reading our own mappings, no other thread touches them.
                let (x, y) = unsafe { (*((src.addr() + b) as *const u8), *((dst.addr() + b) as *const u8)) };
                if (off..off + len).contains(&b) {
                    assert_eq!(x, y, "byte {b} of ({off}, {len})");
                } else {
                    assert_eq!(y, 0xaa, "byte {b} outside ({off}, {len}) was written");
                }
            }
        }
    }

    #[test]
    fn move_pages_query_reports_a_node() {
        let addr = mmap_anon(PAGE_SIZE).unwrap();
        madvise(addr, PAGE_SIZE, Advice::PopulateWrite).unwrap();
        let mut status = [-1];
        move_pages(&[addr], None, &mut status).unwrap();
        assert!(status[0] >= 0, "status {}", status[0]);
        assert_eq!(get_mempolicy_node(addr).unwrap(), status[0] as u32);
        // SAFETY: the mapping is ours.
        unsafe { munmap(addr, PAGE_SIZE).unwrap() };
    }

    #[test]
    fn huge_ranges_find_huge_pages_and_only_them() {
        let len = 4 * HPAGE_SIZE;
        let huge = crate::region::Region::new(len, HPAGE_SIZE, None).unwrap();
        let small = crate::region::Region::new(len, PAGE_SIZE, None).unwrap();
        assert!(huge_ranges(small.addr(), small.addr() + len).unwrap().is_empty());
        let found = huge_ranges(huge.addr(), huge.addr() + len).unwrap();
        // The kernel may not find a huge page for every 2 MiB; what it reports lies inside,
        // 2 MiB aligned, and matches smaps.
        for &(s, e) in &found {
            assert!(huge.addr() <= s && e <= huge.addr() + len && s % HPAGE_SIZE == 0 && e % HPAGE_SIZE == 0);
        }
        let bytes: usize = found.iter().map(|(s, e)| e - s).sum();
        assert_eq!(bytes as u64, huge.anon_huge_bytes().unwrap(), "{found:x?}");
        // Part of a huge page: reported clipped to the range asked.
        if let Some(&(s, _)) = found.first() {
            assert_eq!(huge_ranges(s + PAGE_SIZE, s + 2 * PAGE_SIZE).unwrap(), [(s + PAGE_SIZE, s + 2 * PAGE_SIZE)]);
        }
    }

    #[test]
    fn mbind_rejects_nodes_beyond_the_mask() {
        let addr = mmap_anon(PAGE_SIZE).unwrap();
        assert_eq!(mbind(addr, PAGE_SIZE, 5000, false), Err(Errno::INVAL));
        // SAFETY: the mapping is ours.
        unsafe { munmap(addr, PAGE_SIZE).unwrap() };
    }
}

