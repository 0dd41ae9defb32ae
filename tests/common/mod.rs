//! Helpers shared by the library's tests: the node to use, watchdogs that turn a hang into
//! a failure (a whole test's, [`Watchdog`]; a part's, [`watchdog`]; a forked child's,
//! [`fork_and_wait`]), and a probe that every page of a region is writable again.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]

pub mod changes;
pub mod signal_stores;
pub mod strangers;

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use pagemig::Region;
use pagemig::sys::PAGE_SIZE;

/// The first node with memory: where the host tests put and move their memory.
pub fn node() -> u32 {
    pagemig::numa::memory_nodes().unwrap()[0]
}

/// How long one test may run before its [`Watchdog`] ends the test binary: far past what
/// any test takes, even under emulation and a busy machine.
pub const TEST_LIMIT: Duration = Duration::from_secs(300);

/// A whole test's watchdog: created first thing in the test, dropped when it returns or
/// panics. If the test is still running after its limit (a writer asleep on a protection
/// nobody lifts, a lock never released), the test binary prints what hung and aborts:
/// the hang fails the run instead of stalling the suite.
pub struct Watchdog {
    done: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Watchdog {
    /// Starts watching the test `what` for `limit`.
    pub fn new(limit: Duration, what: &'static str) -> Self {
        let done = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let watched = done.clone();
        std::thread::Builder::new()
            .name(format!("watchdog: {what}"))
            .spawn(move || {
                let (lock, cv) = &*watched;
                let guard = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (guard, _) = cv
                    .wait_timeout_while(guard, limit, |done| !*done)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !*guard {
                    eprintln!("{what}: still running after {limit:?} (hung); the test binary aborts");
                    eprintln!("{}", threads_now());
                    std::process::abort();
                }
            })
            .expect("spawn the watchdog thread");
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.done;
        *lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        cv.notify_all();
    }
}

/// The body of a test that runs in a fresh process of its own: `body` where this process is
/// that fresh one (`child` set), else the test `name` run again with `child` set
/// ([`in_fresh_process`]).
pub fn fresh_process_test(name: &str, child: &str, limit: Duration, body: impl FnOnce()) {
    if std::env::var_os(child).is_some() {
        return body();
    }
    in_fresh_process(name, &[(child, "1".as_ref())], limit);
}

/// Runs the test `name` of this test binary again in a fresh process, with `env` set (an
/// ignored test too, as the guest runs them), and fails if it fails or has not ended within
/// `limit` (then it is killed). The test tells
/// the two runs apart by the environment.
pub fn in_fresh_process(name: &str, env: &[(&str, &std::ffi::OsStr)], limit: Duration) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1", "--include-ignored"])
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{name}: the fresh process hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{name}: the fresh process failed: {status}");
}

/// Runs `f` on a thread of its own and fails the test if it has not returned within
/// `limit`: a hang (a writer asleep on a protection nobody lifts, a lock never released)
/// fails instead of stalling the suite. A panic in `f` fails the test with its message.
pub fn watchdog<R: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("watched: {what}"))
        .spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        })
        .expect("spawn the watched thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(r)) => {
            let _ = handle.join();
            r
        }
        Ok(Err(payload)) => std::panic::resume_unwind(payload),
        Err(_) => panic!("{what}: still running after {limit:?} (hung)\n{}", threads_now()),
    }
}

/// What each thread of this process is doing now, as the kernel sees it: its name, state,
/// the system call it is in (number, arguments, stack and instruction pointers) and its
/// kernel stack (where readable), one block per thread. What a hung test prints, so that a
/// hang seen once says where it was. (Not a debugger's view: a debugger reading the
/// memory of a process whose threads wait on its userfaultfd, or on its memory map's
/// lock, may wait for good itself.)
pub fn threads_now() -> String {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return "no /proc/self/task".into() };
    let mut out = String::from("threads of the hung test binary:\n");
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state follows the name's closing parenthesis.
        let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
        out += &format!(
            "  {} {:?} state {state} wchan {} syscall {}\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("syscall").trim(),
        );
        for frame in read("stack").lines().take(12) {
            out += &format!("      {frame}\n");
        }
    }
    out
}

/// Writes every page of `region` (adding zero to a word of each: a write access, data
/// unchanged) on another thread, and fails if that does not finish within 10 s: no page is
/// left write-protected with nobody to lift it.
pub fn assert_writable(region: &'static Region) {
    watchdog(Duration::from_secs(10), "probe write of every page", move || {
        for page in 0..region.len() / PAGE_SIZE {
            region.word(page * PAGE_SIZE / 8).fetch_add(0, Ordering::SeqCst);
        }
    });
}

/// Leaks `region` so that watched threads may use it; the test process unmaps it on exit.
pub fn leak(region: Region) -> &'static Region {
    Box::leak(Box::new(region))
}

/// Huge-page allocations the kernel failed at a fault so far, machine-wide
/// (`thp_fault_fallback` in `/proc/vmstat`): a destination populated then got base pages.
pub fn thp_fault_fallbacks() -> u64 {
    vmstat("thp_fault_fallback")
}

/// Huge pages `khugepaged` (or `MADV_COLLAPSE`) made from base pages so far, machine-wide
/// (`thp_collapse_alloc` in `/proc/vmstat`): a mapping advised `MADV_HUGEPAGE` may get
/// huge pages that no migration made.
pub fn thp_collapses() -> u64 {
    vmstat("thp_collapse_alloc")
}

/// Has the kernel map each huge page of `region` (2 MiB folios) with base pages, as a program
/// does by changing one page's protection and back; returns the huge bytes left (0 where the
/// kernel split them all).
pub fn map_with_base_pages(region: &Region) -> u64 {
    const HUGE: usize = 2 << 20;
    for f in 0..region.len() / HUGE {
        let page = (region.addr() + f * HUGE + 4096) as *mut libc::c_void;
        // SAFETY: a page of the caller's region; its protection comes back at once, and the
        // caller lets no other thread touch the region meanwhile.
        unsafe {
            assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ), 0);
            assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_WRITE), 0);
        }
    }
    region.anon_huge_bytes().expect("smaps")
}

/// The counter `name` of `/proc/vmstat` (0 where this kernel has none).
pub fn vmstat(name: &str) -> u64 {
    let vmstat = std::fs::read_to_string("/proc/vmstat").expect("/proc/vmstat");
    vmstat
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<u64>().expect("a count"))
        .sum()
}

/// The `VmFlags` smaps gives the mapping holding `addr` (empty where nothing is mapped).
pub fn vm_flags(addr: usize) -> Vec<String> {
    pagemig::maps::vmas_with_flags(addr, addr + 1).expect("smaps").into_iter().flat_map(|v| v.flags).collect()
}

/// Pages of `region` on `node`.
pub fn pages_on(region: &Region, node: u32) -> usize {
    region.placement().unwrap().get(&(node as i32)).copied().unwrap_or(0)
}

/// A shared read-write mapping of a fresh unlinked file of `pages` pages, its first page
/// touched and the rest not: memory pagemig hands to the kernel. Returns the file (keep it
/// open while the mapping is used) and the mapping's address.
pub fn shared_file_pages(pages: usize) -> (std::fs::File, usize) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicUsize;
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("pagemig-shared-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    file.set_len((pages * PAGE_SIZE) as u64).unwrap();
    // SAFETY: a shared read-write mapping of a file of ours.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    } as usize;
    assert_ne!(addr, libc::MAP_FAILED as usize);
    // SAFETY: the first page of our own shared mapping.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 1) };
    (file, addr)
}

/// Forks; the child runs `child` and exits with what it returns, without running the
/// parent's destructors. Waits for the child at most `limit` and returns its exit status;
/// a child still running then is killed and fails the test (with `PAGEMIG_DEBUG_HANG` set,
/// after `gdb` printed its threads' stacks).
///
/// # Safety
/// `child` runs in a forked copy of a multithreaded process: it must need nothing that
/// only another thread of the parent would release.
pub unsafe fn fork_and_wait(limit: Duration, child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the caller's promise.
    unsafe { fork_and_wait_or_kill(limit, child) }
        .unwrap_or_else(|| panic!("the forked child hung (still running after {limit:?})"))
}

/// How a forked child ended ([`fork_and_wait_or_kill_or_crash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code, reason = "not every test binary tells every ending apart")]
pub enum ChildEnd {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it (a crash).
    Signalled(i32),
    /// Still running after the limit: killed (its threads reported first).
    Hung,
}

/// [`fork_and_wait`], where every ending is returned rather than failing the test: a
/// child still running after `limit` is reported and killed, a crash is told by its
/// signal (with `PAGEMIG_DEBUG_HANG`, after `gdb` read its core).
///
/// # Safety
/// As [`fork_and_wait`].
#[allow(dead_code, reason = "used by some test binaries only")]
pub unsafe fn fork_and_wait_or_kill_or_crash(limit: Duration, child: impl FnOnce() -> i32) -> ChildEnd {
    // SAFETY: the caller's promise about `child`.
    match unsafe { fork_and_wait_status(limit, child) } {
        None => ChildEnd::Hung,
        Some(status) if libc::WIFEXITED(status) => ChildEnd::Exited(libc::WEXITSTATUS(status)),
        Some(status) => ChildEnd::Signalled(libc::WTERMSIG(status)),
    }
}

/// [`fork_and_wait`], where a child still running after `limit` is killed and reported
/// as `None`.
///
/// # Safety
/// As [`fork_and_wait`].
#[allow(unsafe_code, reason = "fork, waitpid, kill, _exit")]
pub unsafe fn fork_and_wait_or_kill(limit: Duration, child: impl FnOnce() -> i32) -> Option<i32> {
    // SAFETY: the caller's promise about `child`.
    let status = unsafe { fork_and_wait_status(limit, child) }?;
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    Some(libc::WEXITSTATUS(status))
}

/// Forks, runs `child` in the child and waits for it at most `limit`: its `waitpid`
/// status, or `None` where it was still running then (reported and killed). A crash's
/// core is read by `gdb` with `PAGEMIG_DEBUG_HANG`.
///
/// # Safety
/// As [`fork_and_wait`].
#[allow(unsafe_code, reason = "fork, waitpid, kill, _exit")]
unsafe fn fork_and_wait_status(limit: Duration, child: impl FnOnce() -> i32) -> Option<i32> {
    // SAFETY: the caller's promise about `child`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    let debug = std::env::var_os("PAGEMIG_DEBUG_HANG").is_some();
    if pid == 0 {
        if debug {
            // A crash leaves a core for the parent's report (the guest's `core_pattern`).
            let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
            // SAFETY: sets this child's own limit from a struct of ours.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &unlimited) };
        }
        let code = child();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let started = std::time::Instant::now();
    let mut status = 0;
    // SAFETY: waits (without blocking) for the child just forked.
    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
        if started.elapsed() > limit {
            report_hang(pid);
            // SAFETY: our own child; reaped right after.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !libc::WIFEXITED(status) && debug {
        report_crash(pid);
    }
    Some(status)
}

/// What a hung child's threads are doing, on stderr: each thread's name, state, the
/// syscall it waits in and its kernel stack (where readable), from `/proc`; with
/// `PAGEMIG_DEBUG_HANG` set, also `gdb`'s backtraces of every thread (where `gdb` is found).
pub fn report_hang(pid: libc::pid_t) {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    tids.sort_unstable();
    eprintln!("hung child {pid}: {} threads", tids.len());
    for tid in tids {
        let t = format!("/proc/{pid}/task/{tid}");
        let stat = read(format!("{t}/stat"));
        let state = stat.rsplit_once(") ").map_or("?", |(_, r)| &r[..1]);
        eprintln!(
            "  {tid} {:?} state {state} wchan {} syscall {}",
            read(format!("{t}/comm")).trim(),
            read(format!("{t}/wchan")),
            read(format!("{t}/syscall")).trim(),
        );
        for line in read(format!("{t}/stack")).lines().take(12) {
            eprintln!("      {line}");
        }
        report_user_stack(pid, &read(format!("{t}/syscall")), &read(format!("/proc/{pid}/maps")));
    }
    if std::env::var_os("PAGEMIG_DEBUG_HANG").is_some() {
        gdb(&["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 30"]);
    }
}

/// For a hung thread whose `/proc/.../syscall` line is `syscall`: where a futex it waits
/// on lies (the mapping of `maps`, and the word there), and the words of its user stack
/// that point into executable file mappings, as the file and the address less where the
/// file is mapped (what `addr2line -f -C -e FILE ADDRESS` takes): the likely return
/// addresses, innermost first, among stale words.
pub fn report_user_stack(pid: libc::pid_t, syscall: &str, maps: &str) {
    let fields: Vec<u64> = syscall
        .split_whitespace()
        .map(|f| {
            u64::from_str_radix(f.trim_start_matches("0x"), if f.starts_with("0x") { 16 } else { 10 }).unwrap_or(0)
        })
        .collect();
    if fields.len() < 9 {
        return;
    }
    let mappings: Vec<(u64, u64, u64, String, String)> = maps
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (range, perms, offset) = (it.next()?, it.next()?, it.next()?);
            let path = it.nth(2).unwrap_or("").to_string();
            let (a, b) = range.split_once('-')?;
            let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
            Some((a, b, u64::from_str_radix(offset, 16).ok()?, perms.to_string(), path))
        })
        .collect();
    let find = |addr: u64| mappings.iter().find(|m| m.0 <= addr && addr < m.1);
    let peek = |addr: u64, len: usize| -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
        // SAFETY: reads the child's memory into our own buffer, or fails.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        buf.truncate(n.max(0) as usize);
        buf
    };
    if fields[0] == libc::SYS_futex as u64 {
        let uaddr = fields[1];
        let word = peek(uaddr, 4);
        let value = (word.len() == 4).then(|| u32::from_ne_bytes(word[..4].try_into().unwrap()));
        match find(uaddr) {
            Some(m) => eprintln!(
                "      futex {uaddr:#x} = {value:x?} in {:#x}-{:#x} {} {} (+{:#x})",
                m.0,
                m.1,
                m.3,
                m.4,
                uaddr - m.0
            ),
            None => eprintln!("      futex {uaddr:#x} = {value:x?}, in no mapping"),
        }
    }
    let sp = fields[fields.len() - 2];
    let stack = peek(sp, 16 << 10);
    let mut shown = 0;
    for w in stack.chunks_exact(8) {
        let v = u64::from_ne_bytes(w.try_into().unwrap());
        if let Some(m) = find(v).filter(|m| m.3.contains('x') && m.4.starts_with('/')) {
            // The address the file's first byte is mapped at: what `addr2line` wants taken off.
            let base = mappings.iter().find(|f| f.4 == m.4 && f.2 == 0).map_or(m.0 - m.2, |f| f.0);
            eprintln!("      stack: {} {:#x}", m.4, v - base);
            shown += 1;
            if shown == 40 {
                break;
            }
        }
    }
}

/// Runs `gdb` (on the path, or `/usr/bin/gdb`) with `args` and prints what it printed, its
/// errors included, on stderr.
fn gdb(args: &[&str]) {
    let run = ["gdb", "/usr/bin/gdb"].into_iter().find_map(|g| std::process::Command::new(g).args(args).output().ok());
    match run {
        Some(o) => eprintln!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        None => eprintln!("PAGEMIG_DEBUG_HANG: no gdb found"),
    }
}

/// `gdb`'s backtraces of every thread of a crashed child, from its core where one was
/// dumped (`/tmp/core.PID`: the core pattern `vm/run` sets with `PAGEMIG_DEBUG_HANG`).
fn report_crash(pid: libc::pid_t) {
    let core = format!("/tmp/core.{pid}");
    if !std::path::Path::new(&core).exists() {
        eprintln!("PAGEMIG_DEBUG_HANG: no core at {core}");
        return;
    }
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    gdb(&["-batch", "-ex", "thread apply all bt 40", &exe.to_string_lossy(), &core]);
    let _ = std::fs::remove_file(&core);
}

/// The address of a page this process mapped, wrote and unmapped again, placed low in the
/// address space (from 256 MiB up) where the kernel's top-down `mmap` never reaches: other
/// threads' and the engine's own later mappings cannot take the hole over, so the address
/// stays unmapped for the rest of the test. Each call gives a different page.
pub fn unmapped_page() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0x1000_0000);
    loop {
        let at = NEXT.fetch_add(16 * PAGE_SIZE, Ordering::Relaxed);
        assert!(at < 0x4000_0000, "no free low page found for an unmapped address");
        // SAFETY: MAP_FIXED_NOREPLACE fails rather than replace anything already there.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize != at {
            if p != libc::MAP_FAILED {
                // SAFETY: an older kernel treated the flag as a hint and mapped elsewhere; ours.
                unsafe { libc::munmap(p, PAGE_SIZE) };
            }
            continue;
        }
        // SAFETY: the page was just mapped here by this call; written, then unmapped.
        unsafe {
            std::ptr::write_volatile(at as *mut u8, 1);
            assert_eq!(libc::munmap(p, PAGE_SIZE), 0);
        }
        return at;
    }
}

/// Runs `change` while the put-back of the run at `base` waits at `stall`
/// (`FaultInjection::stall_put_back`): its first page back, the next still in the
/// graveyard (the isolation empties a run from its start). Lets the put-back go on after,
/// also where `change` panics (the panic goes on from here).
pub fn while_put_back_stalled<T>(stall: &pagemig::Handshake, base: usize, change: impl FnOnce() -> T) -> T {
    stall.wait();
    let changed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let f = pagemig::numa::page_frames(base, 2 * PAGE_SIZE).unwrap();
        assert!(f[0].is_some() && f[1].is_none(), "the put-back did not stall after its first page: {f:?}");
        change()
    }));
    stall.wait();
    changed.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Returns once the thread `tid` of this process is inside the system call `nr` (its
/// `/proc/self/task/<tid>/syscall`), blocked there or about to be; fails with `what` after
/// 20 s.
pub fn await_in_syscall(tid: i32, nr: i64, what: &str) {
    let started = std::time::Instant::now();
    loop {
        let now = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if now.split_whitespace().next().and_then(|n| n.parse::<i64>().ok()) == Some(nr) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{what}: {now}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Returns once the page at `addr` is not present (a migration moved it out); fails with
/// `what` after 20 s.
pub fn await_gone(addr: usize, what: &str) {
    let started = std::time::Instant::now();
    while pagemig::numa::page_frames(addr, PAGE_SIZE).unwrap()[0].is_some() {
        assert!(started.elapsed() < Duration::from_secs(20), "{what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}
