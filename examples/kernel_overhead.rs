//! What `Engine::move_pages` adds to a call it hands to the kernel (pages of a shared file
//! mapping, which pagemig does not move itself): the same call timed both ways.
//! `cargo run --release --example kernel_overhead`

use std::os::fd::AsRawFd;
use std::time::Instant;

use pagemig::{Engine, numa};

/// `MPOL_MF_MOVE` of `<numaif.h>`.
const MPOL_MF_MOVE: libc::c_int = 1 << 1;

/// Prints an error as a sentence (not as a debug dump) and exits 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernel_overhead: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), pagemig::Error> {
    let node = numa::memory_nodes()?[0] as i32;
    let pages = 64;
    let path = std::env::temp_dir().join(format!("pagemig-overhead-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    file.set_len((pages * 4096) as u64).unwrap();
    // SAFETY: a shared mapping of a file of ours.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    } as usize;
    assert_ne!(base, libc::MAP_FAILED as usize);
    for p in 0..pages {
        // SAFETY: a page of our own mapping.
        unsafe { std::ptr::write_volatile((base + p * 4096) as *mut u8, 1) };
    }
    let addrs: Vec<usize> = (0..pages).map(|p| base + p * 4096).collect();
    let mut status = vec![0; pages];
    let engine = Engine::global()?;
    // With two nodes every call moves the pages: the kernel to one node, pagemig back.
    let other = numa::memory_nodes()?.get(1).map_or(node, |&n| n as i32);
    let (to_other, to_home) = (vec![other; pages], vec![node; pages]);
    let calls = 200;
    let (mut kernel, mut ours) = (0.0, 0.0);
    for _ in 0..calls {
        let t = Instant::now();
        // SAFETY: move_pages(2) for this process, with arrays of `pages` entries.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0,
                pages as libc::c_ulong,
                addrs.as_ptr(),
                to_other.as_ptr(),
                status.as_mut_ptr(),
                MPOL_MF_MOVE,
            )
        };
        kernel += t.elapsed().as_secs_f64();
        assert!(r >= 0, "move_pages: {}", std::io::Error::last_os_error());
        assert!(status.iter().all(|&s| s == other), "the kernel moved every page: {status:?}");
        let t = Instant::now();
        // SAFETY: this thread does not touch the mapping during the call.
        unsafe { engine.move_pages(&addrs, Some(&to_home), &mut status) }?;
        ours += t.elapsed().as_secs_f64();
        assert!(status.iter().all(|&s| s == node), "pagemig (through the kernel) moved every page: {status:?}");
    }
    let (kernel, ours) = (kernel * 1e6 / calls as f64, ours * 1e6 / calls as f64);
    let what =
        if other == node { format!("all on node {node} already") } else { format!("between nodes {node} and {other}") };
    println!(
        "{pages} pages of a shared file, {what}, {calls} calls each: kernel move_pages {kernel:.1} µs, \
         pagemig move_pages {ours:.1} µs a call (+{:.1} µs)",
        ours - kernel
    );
    Ok(())
}
