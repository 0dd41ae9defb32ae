//! `Engine::move_pages`: memory the caller already has, page by page, with each page's
//! outcome as `move_pages(2)` gives it. On this host (one node) every case is checked
//! against the kernel's own `move_pages(2)` given the same addresses; the cross-node part
//! runs in the two-node guest (`tests/numa_guest.rs`).

mod common;

use pagemig::sys::{self, Errno, HPAGE_SIZE, PAGE_SIZE};
use pagemig::{Engine, Error, Region, numa, workload};

fn node() -> i32 {
    numa::memory_nodes().unwrap()[0] as i32
}

/// Frames of the pages at `addrs` (`None` where absent).
fn frames(addrs: &[usize]) -> Vec<Option<u64>> {
    addrs.iter().map(|&a| numa::page_frames(a & !(PAGE_SIZE - 1), PAGE_SIZE).unwrap()[0]).collect()
}

/// A mix of pages: base pages, a page of a huge page, a never-touched page, an unmapped
/// address, an address inside a page, a shared file-backed page, a read-only page.
struct Mix {
    addrs: Vec<usize>,
    _keep: Vec<Region>,
    _file: std::fs::File,
}

fn mix() -> Mix {
    let base = Region::new(64 * PAGE_SIZE, PAGE_SIZE, Some(node() as u32)).unwrap();
    workload::fill(&base, 3);
    let huge = Region::new(2 * HPAGE_SIZE, HPAGE_SIZE, Some(node() as u32)).unwrap();
    workload::fill(&huge, 4);
    let untouched = sys::mmap_anon(4 * PAGE_SIZE).unwrap();
    let hole = sys::reserve(4 * PAGE_SIZE).unwrap(); // PROT_NONE: mapped, not accessible
    let (file, shared) = common::shared_file_pages(2);
    let addrs = vec![
        base.addr(),
        base.addr() + 5 * PAGE_SIZE + 123, // inside a page
        base.addr() + 63 * PAGE_SIZE,
        huge.addr(), // one address per huge page
        huge.addr() + HPAGE_SIZE + 7 * PAGE_SIZE,
        untouched + PAGE_SIZE,
        hole,
        0x1000, // never mapped
        shared,
        shared + PAGE_SIZE, // never touched
    ];
    Mix { addrs, _keep: vec![base, huge], _file: file }
}

#[test]
fn queries_match_the_kernel() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "queries_match_the_kernel");
    let m = mix();
    let mut ours = vec![i32::MIN; m.addrs.len()];
    // SAFETY: a query moves nothing.
    let left = unsafe { Engine::global().unwrap().move_pages(&m.addrs, None, &mut ours) }.unwrap();
    assert_eq!(left, 0);
    let mut kernel = vec![i32::MIN; m.addrs.len()];
    sys::move_pages(&m.addrs, None, &mut kernel).unwrap();
    assert_eq!(ours, kernel);
    assert_eq!(ours[5], -libc::ENOENT, "{ours:?}");
    assert_eq!(ours[7], -libc::EFAULT, "{ours:?}");
}

#[test]
fn moves_to_the_node_pages_are_on_match_the_kernel_and_leave_pages_alone() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "moves_to_the_node_pages_are_on_match_the_kernel_and_leave_pages_alone",
    );
    let m = mix();
    let nodes = vec![node(); m.addrs.len()];
    let before = frames(&m.addrs);
    let mut ours = vec![i32::MIN; m.addrs.len()];
    // SAFETY: this thread does not touch the pages during the call.
    let left = unsafe { Engine::global().unwrap().move_pages(&m.addrs, Some(&nodes), &mut ours) }.unwrap();
    let mut kernel = vec![i32::MIN; m.addrs.len()];
    sys::move_pages(&m.addrs, Some(&nodes), &mut kernel).unwrap();
    assert_eq!(ours, kernel, "pagemig against the kernel");
    assert_eq!(left, 0, "nothing needed moving");
    // Already on the node: nothing was copied, every page kept its frame.
    assert_eq!(frames(&m.addrs), before);
}

#[test]
fn bad_input_is_refused_before_anything_moves() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "bad_input_is_refused_before_anything_moves");
    let m = mix();
    let engine = Engine::global().unwrap();
    let before = frames(&m.addrs);
    let mut status = vec![0; m.addrs.len()];
    for (nodes, errno) in [
        (vec![node(); m.addrs.len() - 1], Errno::INVAL),
        (vec![-1; m.addrs.len()], Errno::NODEV),
        (vec![5000; m.addrs.len()], Errno::NODEV),
        (vec![1000; m.addrs.len()], Errno::NODEV),
    ] {
        // SAFETY: refused before any page is touched.
        let err = unsafe { engine.move_pages(&m.addrs, Some(&nodes), &mut status) }.unwrap_err();
        assert_eq!(err.errno(), errno, "{err}");
    }
    let mut short = vec![0; 1];
    // SAFETY: refused before any page is touched.
    let err = unsafe { engine.move_pages(&m.addrs, None, &mut short) }.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert_eq!(frames(&m.addrs), before);
    // No pages: nothing to do.
    // SAFETY: no pages.
    assert_eq!(unsafe { engine.move_pages(&[], Some(&[]), &mut []) }.unwrap(), 0);
}

/// Pages a forked child maps too are known as such (the pages `move_pages(2)` refuses with
/// `EACCES`, which `Engine::move_pages` hands to the kernel), and stop being so once the
/// child exits; pages written after the fork, and pages never touched, are the parent's
/// alone.
#[test]
fn pages_a_child_maps_too_are_told_apart() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "pages_a_child_maps_too_are_told_apart");
    common::watchdog(std::time::Duration::from_secs(60), "shared pages", || {
        let region = Region::new(8 * PAGE_SIZE, PAGE_SIZE, Some(node() as u32)).unwrap();
        workload::fill(&region, 5);
        let addrs: Vec<usize> = (0..8).map(|p| region.addr() + p * PAGE_SIZE).collect();
        let untouched = sys::mmap_anon(PAGE_SIZE).unwrap();
        let mut hold = [0; 2];
        // SAFETY: a pipe of our own.
        assert_eq!(unsafe { libc::pipe(hold.as_mut_ptr()) }, 0);
        // SAFETY: the child only blocks on the pipe, then calls `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut c = 0u8;
            // SAFETY: reads one byte into a local from our end of the pipe.
            unsafe {
                libc::close(hold[1]);
                libc::read(hold[0], (&raw mut c).cast(), 1);
                libc::_exit(0);
            }
        }
        // SAFETY: our end of the pipe.
        unsafe { libc::close(hold[0]) };
        // Written after the fork: the parent's own copy now.
        region.word(7 * PAGE_SIZE / 8).store(1, std::sync::atomic::Ordering::Relaxed);
        let mut all = addrs.clone();
        all.push(untouched);
        let shared_pages = |all: &[usize]| sys::page_marks(all).unwrap().iter().map(|m| m.shared).collect::<Vec<_>>();
        let shared = shared_pages(&all);
        let mut status = 0;
        // SAFETY: ends the child, then reaps it.
        unsafe {
            libc::close(hold[1]);
            libc::waitpid(pid, &mut status, 0);
        }
        assert_eq!(shared, [true, true, true, true, true, true, true, false, false], "while the child lives");
        assert_eq!(shared_pages(&all), vec![false; 9], "once the child exited");
        // SAFETY: our own mapping, unused past here.
        unsafe { sys::munmap(untouched, PAGE_SIZE).unwrap() };
    });
}
