//! A program closes or replaces pagemig's descriptors, as daemons do: `close_range(3, ~0U,
//! 0)`, or `dup2` of its own files over every descriptor pagemig holds, then opens pipes and
//! socketpairs that take the freed numbers. pagemig must notice (the open file, not the
//! number), never read from or write to the program's files (every byte written to them is
//! read back by the program), not spin on a descriptor that is gone, and serve later calls
//! with a reopened engine or through the kernel, with every byte of the moved memory intact.
//!
//! Each case runs in a forked child (closing descriptors is process-wide) under a deadline.

mod common;

use common::node;

use std::time::{Duration, Instant};

use pagemig::{Engine, MigrateOptions, Mode, Reason, Region, numa, workload};

/// What the program does to pagemig's descriptors.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Blow {
    /// `close_range(3, ~0U, 0)`, a second without descriptors, then new pipes and
    /// socketpairs until every number pagemig held is taken again.
    CloseRange,
    /// `dup2` of pipe and socket ends over every descriptor pagemig holds.
    Dup2All,
    /// `dup2` over the lowest-numbered half of pagemig's descriptors only.
    Dup2Some,
    /// `close_range(64, ~0U, 0)`: the high numbers only, where pagemig keeps a duplicate of
    /// each userfaultfd (its low numbers stay).
    CloseHigh,
}

/// This process's descriptors that name a userfaultfd, with the inode of each.
fn userfaultfds() -> Vec<(i32, u64)> {
    open_fds()
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|l| l.to_string_lossy().contains("[userfaultfd]"))
        })
        .map(|fd| {
            // SAFETY: plain data, overwritten by `fstat` on a descriptor of ours.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::fstat(fd, &mut st) };
            (fd, st.st_ino)
        })
        .collect()
}

const SEED: u64 = 4242;
const LEN: usize = 4 << 20;
/// Bytes written into each of the program's files.
const BYTES: usize = 4096;
/// Process CPU time over a second of the program sleeping that counts as spinning.
const SPIN: Duration = Duration::from_millis(250);

/// The node a further move targets: another one where there is one.
fn other_node() -> u32 {
    let nodes = numa::memory_nodes().unwrap();
    *nodes.last().unwrap()
}

/// The descriptors open in this process.
fn open_fds() -> Vec<i32> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: reads the limit into a struct of ours.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let max = lim.rlim_cur.min(1 << 16) as i32;
    // SAFETY: F_GETFD only asks whether the number is open.
    (0..max).filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1).collect()
}

/// User and system CPU time of the whole process so far.
fn cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: fills the struct of ours.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime))
}

/// CPU time the process spends while this thread sleeps for `d`.
fn cpu_while_sleeping(d: Duration) -> Duration {
    let before = cpu();
    std::thread::sleep(d);
    cpu().saturating_sub(before)
}

/// A file pair of the program: bytes written at `write` are read at `read`.
struct Pair {
    what: &'static str,
    read: i32,
    write: i32,
}

fn pipe_pair() -> Pair {
    let mut fds = [0; 2];
    // SAFETY: fills the array of ours.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) }, 0);
    Pair { what: "pipe", read: fds[0], write: fds[1] }
}

fn socket_pair() -> Pair {
    let mut fds = [0; 2];
    // SAFETY: fills the array of ours.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    Pair { what: "socketpair", read: fds[0], write: fds[1] }
}

fn pattern(k: usize) -> Vec<u8> {
    (0..BYTES).map(|i| (i * 7 + k * 13 + 1) as u8).collect()
}

/// Reads what `fd` holds now (non-blocking), up to `BYTES + 1`.
fn read_all(fd: i32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: reads into a buffer of ours of the length given.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 || out.len() > BYTES {
            return out;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// The child: opens the engine and migrates once, does `blow`, passes bytes through its
/// own files, and migrates again. Returns a mask of what went wrong (0: nothing).
fn child(blow: Blow) -> i32 {
    let before = open_fds();
    let Ok(engine) = Engine::global() else { return 64 };
    let region = Region::new(LEN, 4096, Some(node())).unwrap();
    workload::fill(&region, SEED);
    let opts = MigrateOptions::default();
    if let Err(e) = engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts) {
        eprintln!("first migration: {e}");
        return 64;
    }
    let ours: Vec<i32> = open_fds().into_iter().filter(|fd| !before.contains(fd)).collect();
    eprintln!("{blow:?}: pagemig's descriptors {ours:?}");
    let mut failed = 0;
    let mut pairs = Vec::new();
    match blow {
        Blow::CloseRange => {
            // SAFETY: closes every descriptor from 3 up, as a daemon does; the child uses
            // none of them afterwards except through pagemig, which must cope.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
            assert_eq!(rc, 0, "close_range");
            let spent = cpu_while_sleeping(Duration::from_secs(1));
            eprintln!("{blow:?}: CPU over 1 s with the descriptors closed: {spent:?}");
            if spent > SPIN {
                failed |= 2;
            }
            // The numbers a new file can take (the lowest free ones); a high one pagemig
            // may keep is the program's only through `dup2`, the other cases.
            let low: Vec<i32> = ours.iter().copied().filter(|&fd| fd < 1024).collect();
            while low.iter().any(|&fd| {
                // SAFETY: F_GETFD only asks whether the number is open.
                unsafe { libc::fcntl(fd, libc::F_GETFD) == -1 }
            }) && pairs.len() < 64
            {
                pairs.push(if pairs.len() % 2 == 0 { pipe_pair() } else { socket_pair() });
            }
        }
        Blow::CloseHigh => unreachable!("a case of the test during a call only"),
        Blow::Dup2All | Blow::Dup2Some => {
            let targets = if blow == Blow::Dup2All { &ours[..] } else { &ours[..ours.len().div_ceil(2)] };
            for (k, &fd) in targets.iter().enumerate() {
                let pair = if k % 2 == 0 { pipe_pair() } else { socket_pair() };
                // SAFETY: puts the program's own read end over pagemig's number, as a
                // daemon redirecting its descriptors does.
                assert_eq!(unsafe { libc::dup2(pair.read, fd) }, fd, "dup2");
                pairs.push(Pair { what: pair.what, read: fd, write: pair.write });
            }
        }
    }
    eprintln!("{blow:?}: the program's files now read at {:?}", pairs.iter().map(|p| p.read).collect::<Vec<_>>());
    for (k, p) in pairs.iter().enumerate() {
        let data = pattern(k);
        // SAFETY: writes from a buffer of ours of the length given.
        let n = unsafe { libc::write(p.write, data.as_ptr().cast(), data.len()) };
        assert_eq!(n, BYTES as isize, "write into the {}", p.what);
    }
    let spent = cpu_while_sleeping(Duration::from_secs(1));
    eprintln!("{blow:?}: CPU over 1 s with the program's files in place: {spent:?}");
    if spent > SPIN {
        failed |= 2;
    }
    for (k, p) in pairs.iter().enumerate() {
        let got = read_all(p.read);
        if got != pattern(k) {
            let lost = BYTES.saturating_sub(got.len());
            eprintln!("{blow:?}: {} at {}: read {} of {BYTES} bytes back ({lost} missing)", p.what, p.read, got.len());
            failed |= 1;
        }
    }
    // Further moves: the engine in hand (its descriptors gone: the kernel serves the
    // call), then the process's engine (reopened, or the same one).
    let pages: Vec<usize> = (0..LEN / 4096).map(|i| region.addr() + i * 4096).collect();
    let target = other_node() as i32;
    let mut status = vec![0; pages.len()];
    // SAFETY: this thread does not touch the region during the call.
    match unsafe { engine.move_pages(&pages, Some(&vec![target; pages.len()]), &mut status) } {
        Ok(0) if status.iter().all(|&s| s == target) => {}
        other => {
            let wrong = status.iter().filter(|&&s| s != target).count();
            eprintln!("{blow:?}: move_pages with the engine in hand: {other:?}, {wrong} statuses not {target}");
            failed |= 4;
        }
    }
    if !workload::verify(&region, SEED, &Default::default()).ok() {
        eprintln!("{blow:?}: bytes wrong after move_pages");
        failed |= 8;
    }
    match Engine::global() {
        Ok(again) => {
            eprintln!("{blow:?}: Engine::global() reopened: {}", !std::ptr::eq(again, engine));
            match again.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts) {
                Ok(stats) => {
                    eprintln!("{blow:?}: migration after: {} of {} folios", stats.succeeded_folios, stats.folios)
                }
                Err(e) => {
                    eprintln!("{blow:?}: migration after: {e}");
                    failed |= 4;
                }
            }
        }
        Err(e) => {
            eprintln!("{blow:?}: Engine::global() after: {e}");
            failed |= 4;
        }
    }
    if !workload::verify(&region, SEED, &Default::default()).ok() {
        eprintln!("{blow:?}: bytes wrong after the migration");
        failed |= 8;
    }
    // Still no spin, and nothing read from the program's files after the calls either.
    for (k, p) in pairs.iter().enumerate() {
        let data = pattern(k);
        // SAFETY: writes from a buffer of ours of the length given.
        unsafe { libc::write(p.write, data.as_ptr().cast(), data.len()) };
    }
    let spent = cpu_while_sleeping(Duration::from_millis(500));
    eprintln!("{blow:?}: CPU over 0.5 s after the calls: {spent:?}");
    if spent > SPIN / 2 {
        failed |= 2;
    }
    for (k, p) in pairs.iter().enumerate() {
        if read_all(p.read) != pattern(k) {
            eprintln!("{blow:?}: {} at {}: bytes missing after the calls", p.what, p.read);
            failed |= 1;
        }
    }
    failed
}

fn case(blow: Blow) {
    common::watchdog(Duration::from_secs(90), &format!("{blow:?}"), move || {
        let started = Instant::now();
        // SAFETY: the child opens its own engine and uses only this thread's state.
        let code = unsafe { common::fork_and_wait(Duration::from_secs(60), || child(blow)) };
        assert_eq!(
            code,
            0,
            "{blow:?} after {:?}: 1 bytes of the program's files lost, 2 spinning, 4 a later call failed, \
             8 memory bytes wrong, 64 setup",
            started.elapsed()
        );
    });
}

#[test]
fn close_range_over_every_descriptor_then_pipes_and_sockets() {
    let _watchdog =
        common::Watchdog::new(common::TEST_LIMIT, "close_range_over_every_descriptor_then_pipes_and_sockets");
    case(Blow::CloseRange);
}

#[test]
fn dup2_over_every_descriptor_of_pagemig() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "dup2_over_every_descriptor_of_pagemig");
    case(Blow::Dup2All);
}

#[test]
fn dup2_over_some_descriptors_of_pagemig() {
    let _watchdog = common::Watchdog::new(common::TEST_LIMIT, "dup2_over_some_descriptors_of_pagemig");
    case(Blow::Dup2Some);
}

/// The child of [`closing_or_replacing_every_descriptor_during_a_migration_loses_no_write`]:
/// one migration of 32 MiB of base pages with a writer storing into every page, while
/// another thread of the program does `blow` after `after`. Returns a mask (0: nothing
/// wrong; 1 bytes of the program's files lost, 8 memory bytes or writes lost, 4 a later
/// call failed, 64 setup).
fn blow_during(blow: Blow, after: Duration) -> i32 {
    let before = open_fds();
    let Ok(engine) = Engine::global() else { return 64 };
    let ours: Vec<i32> = open_fds().into_iter().filter(|fd| !before.contains(fd)).collect();
    let region = Region::new(8 * LEN, 4096, Some(node())).unwrap();
    workload::fill(&region, SEED);
    let opts = MigrateOptions::default();
    let pairs = std::sync::Mutex::new(Vec::new());
    let (result, log) = workload::with_writers(&region, 1, || {
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(after);
                match blow {
                    // SAFETY: closes every descriptor from 3 up, as a daemon's thread might;
                    // nothing of this child's uses them but pagemig.
                    Blow::CloseRange => unsafe {
                        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                    },
                    // SAFETY: as above, from 64 up.
                    Blow::CloseHigh => unsafe {
                        libc::syscall(libc::SYS_close_range, 64u32, u32::MAX, 0u32);
                    },
                    _ => {
                        for (k, &fd) in ours.iter().enumerate() {
                            let pair = if k % 2 == 0 { pipe_pair() } else { socket_pair() };
                            // SAFETY: the program's own read end over pagemig's number.
                            assert_eq!(unsafe { libc::dup2(pair.read, fd) }, fd, "dup2");
                            let data = pattern(k);
                            // SAFETY: writes from a buffer of ours of the length given.
                            let n = unsafe { libc::write(pair.write, data.as_ptr().cast(), data.len()) };
                            assert_eq!(n, BYTES as isize);
                            pairs.lock().unwrap().push(Pair { what: pair.what, read: fd, write: pair.write });
                        }
                    }
                }
            });
            engine.migrate_pages(&region.folios(), other_node(), Reason::Syscall, Mode::Sync, &opts)
        })
    });
    let report = workload::verify(&region, SEED, &log);
    let outcome = result.as_ref().map(|s| (s.succeeded_folios, s.folios)).map_err(|e| e.errno());
    eprintln!("{blow:?} after {after:?}: {outcome:?}, {} writes; {report:?}", log.writes);
    let mut failed = if report.ok() { 0 } else { 8 };
    // The call itself goes on: nothing the program did keeps the memory from moving.
    if outcome.is_err() || outcome.is_ok_and(|(done, all)| done != all) {
        failed |= 2;
    }
    // pagemig holds at most two numbers per userfaultfd (the one it uses and a duplicate),
    // none it lost track of (such a copy would keep the userfaultfd open for ever).
    let held = userfaultfds();
    let most = held.iter().map(|&(_, ino)| held.iter().filter(|&&(_, i)| i == ino).count()).max().unwrap_or(0);
    if most > 2 {
        eprintln!("{blow:?}: descriptors naming a userfaultfd (number, inode): {held:?}");
        failed |= 16;
    }
    // What pagemig took back sits at high numbers, not where a program that closed its
    // descriptors expects its next `open` (the lowest free number) to land.
    if blow == Blow::CloseRange && held.iter().any(|&(fd, _)| fd < 64) {
        eprintln!("{blow:?}: a userfaultfd taken back at a low number: {held:?}");
        failed |= 32;
    }
    for (k, p) in pairs.lock().unwrap().iter().enumerate() {
        if read_all(p.read) != pattern(k) {
            eprintln!("{blow:?}: {} at {}: bytes missing", p.what, p.read);
            failed |= 1;
        }
    }
    // The moved memory moves again (back), whole and intact (with the engine in hand,
    // or, where its descriptors were lost, the one `Engine::global` opens instead).
    let Ok(engine) = Engine::global() else { return failed | 4 };
    match engine.migrate_pages(&region.folios(), node(), Reason::Syscall, Mode::Sync, &opts) {
        Ok(stats) if stats.succeeded_folios == stats.folios => {}
        other => {
            eprintln!("{blow:?}: the next call: {:?}", other.map(|s| s.succeeded_folios).map_err(|e| e.errno()));
            failed |= 4;
        }
    }
    if !workload::verify(&region, SEED, &log).ok() {
        failed |= 8;
    }
    failed
}

/// A thread of the program closes every descriptor, or puts its own files over pagemig's,
/// while another thread migrates and a third writes: the call goes on with its
/// userfaultfds taken back from the vault (released, they would have taken the
/// registration and protection off pages in the middle of their move: the program read
/// zeros where it had data, 2 MiB of 32 before the vault). Placement is checked in the
/// guest, where the pages move to another node.
#[test]
fn closing_or_replacing_every_descriptor_during_a_migration_loses_no_write() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "closing_or_replacing_every_descriptor_during_a_migration_loses_no_write",
    );
    for blow in [Blow::CloseRange, Blow::Dup2All, Blow::CloseHigh] {
        for us in [0u64, 200, 500, 1000, 2000, 4000, 8000, 12000] {
            let after = Duration::from_micros(us);
            // SAFETY: the child opens its own engine and uses only its own threads.
            let code = unsafe { common::fork_and_wait(Duration::from_secs(60), || blow_during(blow, after)) };
            assert_eq!(
                code, 0,
                "{blow:?} {after:?} into the migration: 1 bytes of the program's files lost, 2 the call failed, \
                 4 a later call failed, 8 memory bytes or writes lost, 16 a userfaultfd copy lost track of, \
                 32 a low number taken"
            );
        }
    }
}

/// Calls while a thread of the program keeps closing every low descriptor and putting the
/// read end of a pipe of its own (holding data it reads back at the end) at each number:
/// the files pagemig opens for a call (`/proc/self/pagemap`, `/proc/self/maps`, the node
/// lists in `/sys`) are closed or replaced between their `open` and their `read` again and
/// again. Every call moves every folio (before, one failed `EBADF` reading
/// `/sys/devices/system/node/has_memory` now and then, in the guest), no byte of the
/// program's pipe is read by pagemig (a `read` of it would take the data, or wait for ever
/// on an empty pipe), and every byte of memory stays.
fn hammered_calls() -> i32 {
    const CALLS: usize = 40;
    let Ok(engine) = Engine::global() else { return 64 };
    let region = Region::new(LEN, 4096, Some(node())).unwrap();
    workload::fill(&region, SEED);
    let pair = pipe_pair();
    // The program's own numbers, above those it hammers (and below pagemig's high ones).
    // SAFETY: duplicates of the program's own pipe ends.
    let (read, write) = unsafe {
        (libc::fcntl(pair.read, libc::F_DUPFD_CLOEXEC, 200), libc::fcntl(pair.write, libc::F_DUPFD_CLOEXEC, 201))
    };
    let data = pattern(7);
    // SAFETY: writes from a buffer of ours of the length given.
    assert_eq!(unsafe { libc::write(write, data.as_ptr().cast(), data.len()) }, BYTES as isize);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut failed = 0;
    let mut done = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: the program closes its low numbers (pagemig's among them) and puts
                // its pipe at each; its own ends sit at 200 and 201.
                unsafe {
                    libc::syscall(libc::SYS_close_range, 3u32, 199u32, 0u32);
                    for n in 3..64 {
                        libc::dup2(read, n);
                    }
                }
            }
        });
        let opts = MigrateOptions::default();
        for k in 0..CALLS {
            match engine.migrate_pages(
                &region.folios(),
                if k % 2 == 0 { other_node() } else { node() },
                Reason::Syscall,
                Mode::Sync,
                &opts,
            ) {
                Ok(st) if st.succeeded_folios == st.folios => done += 1,
                other => {
                    eprintln!("call {k}: {:?}", other.map(|s| (s.succeeded_folios, s.folios)));
                    failed |= 2;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    eprintln!("hammered: {done} of {CALLS} calls whole");
    if !workload::verify(&region, SEED, &workload::WriteLog::default()).ok() {
        failed |= 8;
    }
    if read_all(read) != data {
        eprintln!("the program's pipe lost bytes");
        failed |= 1;
    }
    failed
}

#[test]
fn closing_and_replacing_low_descriptors_all_the_time_fails_no_call_and_reads_none_of_the_programs() {
    let _watchdog = common::Watchdog::new(
        common::TEST_LIMIT,
        "closing_and_replacing_low_descriptors_all_the_time_fails_no_call_and_reads_none_of_the_programs",
    );
    // SAFETY: the child opens its own engine and uses only its own threads.
    let code = unsafe { common::fork_and_wait(Duration::from_secs(120), hammered_calls) };
    assert_eq!(code, 0, "1 the program's pipe read by pagemig, 2 a call failed, 8 memory bytes lost, 64 setup");
}
