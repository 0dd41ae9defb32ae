//! Writes the kernel makes into migrating memory through pages it pinned — `O_DIRECT`
//! reads, `process_vm_writev` from another process — are never lost: a page pinned when
//! the migration reaches it does not move (it is tried again on a later pass), and a pin
//! taken after the write-protect waits for the move. Every write is read back.

mod common;

use common::node;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{assert_writable, leak, pages_on, watchdog};
use pagemig::sys::PAGE_SIZE;
use pagemig::{Engine, Error, MigrateOptions, Mode, Reason, Region};

const BLOCKS: usize = 64;
/// Bytes of one `process_vm_writev`.
const CHUNK: usize = PAGE_SIZE;

/// The word at `i` of file block `b`.
fn block_word(b: usize, i: usize) -> u64 {
    ((b as u64 + 1) << 32) | i as u64
}

/// Migrates `region` again and again until `stop`; returns (migrations, folios that
/// failed, all with `EBUSY`).
fn migrate_until(region: &Region, stop: &AtomicBool) -> (u64, u64) {
    let (mut migrations, mut failed) = (0, 0);
    let opts = MigrateOptions::default();
    while !stop.load(Ordering::Relaxed) {
        match Engine::global().unwrap().migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts) {
            Ok(_) => {}
            Err(Error::Partial { failed: n, first, .. }) => {
                // A page pinned through every pass: refused, never lost.
                assert_eq!(first.errno(), pagemig::sys::Errno::BUSY, "{first}");
                failed += n;
            }
            Err(e) => panic!("migration failed: {e}"),
        }
        migrations += 1;
    }
    (migrations, failed)
}

fn o_direct_reads(folio: usize, reads: usize) {
    let path = std::env::temp_dir().join(format!("pagemig-odirect-{}-{folio}", std::process::id()));
    {
        let mut f = std::fs::File::create(&path).unwrap();
        for b in 0..BLOCKS {
            let block: Vec<u8> = (0..PAGE_SIZE / 8).flat_map(|i| block_word(b, i).to_ne_bytes()).collect();
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let region = leak(Region::new(4 << 20, folio, Some(node())).unwrap());
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let (lost, migrations, failed) =
        watchdog(Duration::from_secs(240), "O_DIRECT reads during migrations", move || {
            std::thread::scope(|s| {
                let migrator = s.spawn(|| migrate_until(region, stop));
                let pages = region.len() / PAGE_SIZE;
                let mut lost = 0u64;
                for n in 0..reads {
                    let (page, block) = ((n * 7) % pages, n % BLOCKS);
                    let base = page * PAGE_SIZE / 8;
                    // A user write first, so a read that got lost shows.
                    for i in 0..PAGE_SIZE / 8 {
                        region.word(base + i).store(u64::MAX, Ordering::Relaxed);
                    }
                    // SAFETY: reads one block into a page of the region, which lives for the test.
                    let got = unsafe {
                        libc::pread(
                            file.as_raw_fd(),
                            region.as_ptr().add(page * PAGE_SIZE).cast(),
                            PAGE_SIZE,
                            (block * PAGE_SIZE) as libc::off_t,
                        )
                    };
                    assert_eq!(got, PAGE_SIZE as isize, "O_DIRECT read: {}", std::io::Error::last_os_error());
                    if (0..PAGE_SIZE / 8).any(|i| region.word(base + i).load(Ordering::Relaxed) != block_word(block, i))
                    {
                        lost += 1;
                    }
                }
                stop.store(true, Ordering::Relaxed);
                let (migrations, failed) = migrator.join().unwrap();
                (lost, migrations, failed)
            })
        });
    println!(
        "folio {folio}: {reads} O_DIRECT reads, {migrations} migrations, {failed} folios refused as pinned, {lost} lost"
    );
    assert!(migrations > 5, "too little overlap: {migrations} migrations");
    assert_eq!(lost, 0, "{lost} of {reads} O_DIRECT reads lost");
    assert_eq!(pages_on(region, node()), region.len() / PAGE_SIZE);
    assert_writable(region);
}

#[test]
fn o_direct_reads_during_migrations_lose_nothing() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "o_direct_reads_during_migrations_lose_nothing");
    o_direct_reads(4096, 20_000);
    o_direct_reads(2 << 20, 10_000);
}

#[test]
fn process_vm_writev_from_another_process_loses_nothing() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "process_vm_writev_from_another_process_loses_nothing");
    for folio in [4096, 2 << 20] {
        let region = leak(Region::new(4 << 20, folio, Some(node())).unwrap());
        let slots = region.len() / CHUNK;
        let writes: u64 = 300_000;
        let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        let written: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let (migrations, failed) =
            watchdog(Duration::from_secs(240), "process_vm_writev during migrations", move || {
                let parent = std::process::id() as libc::pid_t;
                // SAFETY: the child only calls process_vm_writev and _exit.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0);
                if pid == 0 {
                    // Whole pages: the longer each write, the wider its window (the kernel
                    // pins a write's pages before it copies).
                    let mut page = vec![0u64; CHUNK / 8];
                    for n in 1..=writes {
                        let slot = (n as usize * 13) % slots;
                        page.fill(n);
                        let local = libc::iovec { iov_base: page.as_mut_ptr().cast(), iov_len: CHUNK };
                        let remote =
                            libc::iovec { iov_base: region.as_ptr().wrapping_add(slot * CHUNK).cast(), iov_len: CHUNK };
                        // SAFETY: writes a page into the parent's region, which outlives the child.
                        if unsafe { libc::process_vm_writev(parent, &local, 1, &remote, 1, 0) } != CHUNK as isize {
                            // SAFETY: ends the child.
                            unsafe { libc::_exit(2) };
                        }
                    }
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(0) };
                }
                std::thread::scope(|s| {
                    let migrator = s.spawn(|| migrate_until(region, stop));
                    let mut status = 0;
                    // SAFETY: waits for the child just forked.
                    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "writer child: {status:#x}");
                    written.store(writes, Ordering::Relaxed);
                    stop.store(true, Ordering::Relaxed);
                    migrator.join().unwrap()
                })
            });
        // Read back: every slot holds the last value written to it.
        let mut last = vec![0u64; slots];
        for n in 1..=written.load(Ordering::Relaxed) {
            last[(n as usize * 13) % slots] = n;
        }
        let words = CHUNK / 8;
        let lost = (0..slots)
            .filter(|&s| (0..words).any(|i| region.word(s * words + i).load(Ordering::Relaxed) != last[s]))
            .count();
        println!(
            "folio {folio}: {writes} process_vm_writev writes, {migrations} migrations, {failed} refused, {lost} lost"
        );
        assert!(migrations > 5, "too little overlap: {migrations} migrations");
        assert_eq!(lost, 0, "{lost} slots lost their last write");
        assert_eq!(pages_on(region, node()), region.len() / PAGE_SIZE);
        assert_writable(region);
    }
}
