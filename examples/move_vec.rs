//! Moves a `Vec` the program already has to a node, page by page, with each page's outcome:
//! `cargo run --release --example move_vec -- [NODE]` (default: the last node with memory;
//! on a machine with one node the pages are already there, and are left alone).

use pagemig::{Engine, numa};

/// Prints an error as a sentence (not as a debug dump) and exits 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("move_vec: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), pagemig::Error> {
    let node = std::env::args().nth(1).map_or(Ok(numa::memory_nodes()?.last().copied().unwrap_or(0)), |n| {
        n.parse().map_err(|_| pagemig::Error::Invalid(format!("{n:?} is not a node number")))
    })?;
    let buf: Vec<u64> = (0..(8 << 20) / 8).collect();
    let pages: Vec<usize> = (0..buf.len() * 8).step_by(4096).map(|o| buf.as_ptr() as usize + o).collect();
    let mut status = vec![0; pages.len()];
    // SAFETY: this thread does not touch `buf` during the call.
    let not_moved =
        unsafe { Engine::global()?.move_pages(&pages, Some(&vec![node as i32; pages.len()]), &mut status)? };
    let on_node = status.iter().filter(|&&s| s == node as i32).count();
    println!("{} pages: {on_node} on node {node}, {not_moved} could not move", pages.len());
    assert!(buf.iter().enumerate().all(|(i, &v)| v == i as u64), "every word kept");
    println!("every word kept");
    Ok(())
}
