//! Huge lengths: `Engine::move_range` over a small mapping with a length of 64 TiB answers
//! with a clear error, without trying to allocate an address per page of the range, and a
//! range far longer than its mapping (but within the machine's memory) gets an outcome for
//! every page in bounded memory.
//!
//! In forked children under an address-space limit (`RLIMIT_AS` at the current size plus
//! 1 GiB): an allocation the size of the range would fail there, and Rust ends a process
//! whose allocation fails; each child has a watchdog.
#![allow(unsafe_code, reason = "setrlimit, mmap: the test's own limits and mappings")]

mod common;

use std::time::Duration;

use pagemig::{Engine, Error, MigrateOptions, PAGE_SIZE, numa};

/// Limits this process's address space to what it has mapped now plus `extra` bytes.
fn limit_address_space(extra: u64) {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().next().unwrap().parse().unwrap();
    let limit = libc::rlimit { rlim_cur: pages * PAGE_SIZE as u64 + extra, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a struct of ours.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
}

/// Eight fresh pages, written, followed by `beyond` bytes of inaccessible reservation of
/// ours (so that a range running past the pages names no memory of anyone else's).
fn eight_pages(beyond: usize) -> usize {
    // SAFETY: a fresh anonymous mapping the kernel places.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8 * PAGE_SIZE + beyond,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(at, libc::MAP_FAILED);
    // SAFETY: the first eight pages of the mapping just made, made writable, then written.
    unsafe {
        assert_eq!(libc::mprotect(at, 8 * PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE), 0);
        std::ptr::write_bytes(at.cast::<u8>(), 3, 8 * PAGE_SIZE);
    }
    at as usize
}

/// Writes `text` to standard error with one `write(2)` (no lock a parent thread may hold).
fn say(text: &str) {
    // SAFETY: a buffer of ours, `text.len()` bytes.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

fn child_64_tib() -> i32 {
    let node = numa::memory_nodes().unwrap()[0];
    let Ok(engine) = Engine::global() else { return 0 };
    let at = eight_pages(0);
    limit_address_space(1 << 30);
    // SAFETY: this thread does not touch the range during the call.
    match unsafe { engine.move_range(at, 64 << 40, node, &MigrateOptions::default()) } {
        Err(Error::Invalid(why)) if why.contains("times the machine's memory") => 0,
        other => {
            say(&format!("move_range of 64 TiB: {other:?}\n"));
            1
        }
    }
}

fn child_long_range() -> i32 {
    let node = numa::memory_nodes().unwrap()[0];
    let Ok(engine) = Engine::global() else { return 0 };
    let at = eight_pages(1 << 30);
    limit_address_space(1 << 30);
    // 8 pages, then 1 GiB of inaccessible reservation: 262152 outcomes, addresses in
    // bounded chunks.
    let len = 8 * PAGE_SIZE + (1 << 30);
    // SAFETY: this thread does not touch the range during the call.
    match unsafe { engine.move_range(at, len, node, &MigrateOptions::default()) } {
        Ok(out) if out.status.len() == len / PAGE_SIZE && out.status[..8].iter().all(|&s| s == node as i32) => 0,
        other => {
            say(&format!(
                "move_range of 8 pages + 1 GiB: {:?}\n",
                other.map(|o| (o.status.len(), o.status[..8].to_vec()))
            ));
            1
        }
    }
}

#[test]
fn move_range_with_a_64_tib_length_is_a_clear_error() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "move_range_with_a_64_tib_length_is_a_clear_error");
    // SAFETY: the child uses its own engine and this thread's state.
    let code = unsafe { common::fork_and_wait(Duration::from_secs(60), child_64_tib) };
    assert_eq!(code, 0, "move_range of 64 TiB over 8 pages did not answer with the clear error");
}

#[test]
fn a_range_far_longer_than_its_mapping_gets_an_outcome_per_page() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "a_range_far_longer_than_its_mapping_gets_an_outcome_per_page");
    // SAFETY: as above.
    let code = unsafe { common::fork_and_wait(Duration::from_secs(120), child_long_range) };
    assert_eq!(code, 0, "move_range of a long range did not give an outcome for each page");
}
