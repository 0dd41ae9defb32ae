//! A migration that partly fails, and what the caller is told: the program's memory has a
//! guard in it (a folio made inaccessible and emptied, as allocators guard their arenas),
//! which pagemig may not move. The calls say which pages did not move and why; the rest
//! moved, and every byte of them is as it was. `cargo run --release --example partial -- [NODE]`

use pagemig::{Engine, Error, Folio, MigrateOptions, Mode, Reason, numa};

const FOLIO: usize = 64 << 10;
const FOLIOS: usize = 64;

/// Prints an error as a sentence (not as a debug dump) and exits 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("partial: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let node = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|_| Error::Invalid(format!("{n:?} is not a node number")))?,
        None => numa::memory_nodes()?[0],
    };
    let engine = Engine::global()?;
    // The program's own memory: an anonymous mapping, filled, with one folio made a guard
    // (a hole unmapped instead could be taken by any other mapping of the process, the
    // engine's own included, and is then no longer the program's to name).
    let len = FOLIO * FOLIOS;
    // SAFETY: a fresh private anonymous mapping, ours alone.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + FOLIO,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "mmap");
    let base = (base as usize).next_multiple_of(FOLIO);
    // SAFETY: `base .. base + len` lies inside the mapping just made.
    let bytes = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let hole = base + 5 * FOLIO;
    // SAFETY: one folio of our own mapping, inaccessible and empty from now on; `bytes` is
    // not used past this point.
    unsafe {
        assert_eq!(libc::mprotect(hole as *mut libc::c_void, FOLIO, libc::PROT_NONE), 0, "mprotect");
        assert_eq!(libc::madvise(hole as *mut libc::c_void, FOLIO, libc::MADV_DONTNEED), 0, "madvise");
    }

    // SAFETY: each folio is a range of our mapping (or the guard) and this thread does not
    // touch it during the call.
    let folios: Vec<Folio<'static>> =
        (0..FOLIOS).map(|f| unsafe { Folio::new(base + f * FOLIO, FOLIO) }).collect::<Result<_, _>>()?;
    let opts = MigrateOptions::default().max_batch_pages(128);
    // Folios the caller names must all be movable: the guard refuses the whole call up front,
    // before anything moves.
    match engine.migrate_pages(&folios, node, Reason::Syscall, Mode::Sync, &opts) {
        Err(Error::NotMovable { start, end, why }) => {
            println!("migrate_pages refused the call, nothing moved: +{:#x}..+{:#x} {why}", start - base, end - base)
        }
        // Folios that fail on the way (pinned, changed under the call) leave the rest moved.
        Err(Error::Partial { failed, total, first, stats }) => {
            println!("{failed} of {total} folios did not move (first error: {first})");
            for f in &stats.failures {
                println!("  folio at +{:#x}: errno {}", f.addr - base, f.errno);
            }
        }
        Ok(stats) => println!("all {} folios moved", stats.succeeded_folios),
        Err(e) => return Err(e),
    }
    // By range, every page gets its own outcome, as move_pages(2) gives it.
    // SAFETY: this thread does not touch the range during the call.
    let outcome = unsafe { engine.move_range(base, len, node, &opts)? };
    println!(
        "move_range: {} of {} pages on node {node}, {} not moved",
        outcome.pages_on(node),
        outcome.status.len(),
        outcome.not_moved
    );
    let mut errors: Vec<(usize, i32)> = outcome.errors().collect();
    errors.dedup_by_key(|e| e.1);
    for (addr, errno) in errors {
        println!("  from +{:#x}: {}", addr - base, pagemig::RangeOutcome::meaning(errno));
    }
    assert!(
        outcome.errors().all(|(a, e)| (hole..hole + FOLIO).contains(&a) && e == libc::ENOENT),
        "only the guard's pages, empty, did not move"
    );
    for f in (0..FOLIOS).filter(|&f| f != 5) {
        for o in f * FOLIO..(f + 1) * FOLIO {
            // SAFETY: a byte of a folio still mapped.
            let b = unsafe { std::ptr::read_volatile((base + o) as *const u8) };
            assert_eq!(b, (o % 251) as u8, "byte {o:#x} kept");
        }
    }
    println!("every byte of the other folios kept");
    Ok(())
}
