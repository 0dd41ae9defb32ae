//! What `Engine::move_pages` adds to a call it hands to the kernel (pages of a shared file
//! mapping, which pagemig does not move itself): the same call timed both ways.
//! `cargo run --release --example kernel_overhead`

use std::os::fd::AsRawFd;
use std::time::Instant;

use pagemig::{Engine, numa, sys};

fn main() -> Result<(), pagemig::Error> {
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
    let nodes = vec![node; pages];
    let mut status = vec![0; pages];
    let engine = Engine::global()?;
    let calls = 200;
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        t.elapsed().as_secs_f64() * 1e6 / calls as f64
    };
    let kernel = time(&mut || sys::move_pages(&addrs, Some(&nodes), &mut status).unwrap());
    let ours = time(&mut || {
        // SAFETY: this thread does not touch the mapping during the call.
        unsafe { engine.move_pages(&addrs, Some(&nodes), &mut status) }.unwrap();
    });
    println!(
        "{pages} pages of a shared file, {calls} calls: kernel move_pages {kernel:.1} µs, pagemig move_pages {ours:.1} µs a call"
    );
    Ok(())
}
