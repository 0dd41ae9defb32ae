//! The process and its threads: peer credentials, dumpability, descriptors closed in forked
//! children, CPU affinity.

use super::{Errno, check_int};

/// The process, user and group at the other end of a connected Unix socket, as they were
/// when it connected or listened: `getsockopt(SO_PEERCRED)` (see `unix(7)`). The user and
/// group are the peer's effective ones.
///
/// # Errors
/// The `getsockopt` errno (`ENOTSOCK`, `ENOTCONN`).
pub fn peer_cred(fd: std::os::fd::BorrowedFd<'_>) -> Result<(i32, u32, u32), Errno> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid locals of the size given; the descriptor is borrowed
    // for the call.
    check_int(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// Whether this process is dumpable (`prctl(PR_GET_DUMPABLE)`): the kernel lets only
/// holders of `CAP_SYS_PTRACE` inspect or migrate a process that is not.
pub fn dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer and only reads the process's flag.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

/// The descriptor a forked child closes (`-1`: none).
static CLOSE_IN_CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// In a child just forked: closes the descriptor [`close_in_children`] named.
fn close_in_child() {
    let fd = CLOSE_IN_CHILD.swap(-1, std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: the parent handed this descriptor over for exactly this; in the child, no
        // thread but the forking one exists, and nothing there uses it (the thread that
        // did is the parent's). `close` is async-signal-safe.
        unsafe { libc::close(fd) };
    }
}

/// Makes every child forked from now on close `fd` (one descriptor per process: a later
/// call replaces it) as it starts, with a `pthread_atfork` child handler: a listening
/// socket whose serving thread a child does not have must not stay open there, holding its
/// name for connections nobody accepts.
pub fn close_in_children(fd: std::os::fd::RawFd) {
    static STEP: crate::process::AtFork =
        crate::process::AtFork { prepare: |_| {}, parent: crate::process::nothing, child: close_in_child };
    CLOSE_IN_CHILD.store(fd, std::sync::atomic::Ordering::SeqCst);
    crate::process::at_fork(crate::process::ForkRank::AgentSocket, &STEP);
}

/// The CPUs the calling thread may run on, in order (empty if the kernel does not say).
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => Vec::new(),
    }
}

/// How many CPUs the calling thread may run on (at least 1): `sched_getaffinity(2)`,
/// without reading a file. `std::thread::available_parallelism` reads
/// `/proc/self/cgroup` with `read(2)` on a number the program may have closed and given to
/// a pipe of its own meanwhile: that read would take the program's bytes.
pub fn usable_cpus() -> usize {
    let allowed = match rustix::thread::sched_getaffinity(None) {
        Ok(set) => set.count() as usize,
        Err(_) => 1,
    };
    allowed.min(cgroup_cpus().unwrap_or(usize::MAX)).max(1)
}

/// The CPUs the CPU quota of the process's cgroup (v2, `cpu.max`) allows, rounded up; `None`
/// without a quota. Read once per process (through `sys::files`, as every file pagemig reads
/// during a call).
fn cgroup_cpus() -> Option<usize> {
    // Per process: a `OnceLock` being filled at a `fork()` would leave the child waiting on
    // it for good.
    static QUOTA: crate::process::PerProcess<Option<usize>> = crate::process::PerProcess::new();
    *QUOTA.get_or_init(|_| {
        let groups = super::read_text("/proc/self/cgroup").ok()?;
        let path = groups.lines().find_map(|l| l.strip_prefix("0::"))?;
        let max = super::read_text(format!("/sys/fs/cgroup{}/cpu.max", path.trim_end())).ok()?;
        let mut fields = max.split_whitespace();
        let quota: u64 = fields.next()?.parse().ok()?;
        let period: u64 = fields.next()?.parse().ok()?;
        (period > 0).then(|| quota.div_ceil(period).max(1) as usize)
    })
}

/// Pins the calling thread to `cpu`.
///
/// # Errors
/// The errno of `sched_setaffinity(2)` (`EINVAL` for a CPU the thread may not use).
pub fn pin_to_cpu(cpu: usize) -> Result<(), Errno> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
}

/// How often the calling thread has been switched out: `(voluntary, involuntary)`. A
/// voluntary switch is a sleep (a fault waiting on userfaultfd, a lock); an involuntary one
/// is a preemption (another thread took the CPU). `(0, 0)` if the kernel does not say.
#[cfg(any(test, feature = "internals"))]
pub fn context_switches() -> (u64, u64) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` writes one `rusage` into the buffer, which is large enough; a
    // failure leaves it zeroed.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) != 0 {
            return (0, 0);
        }
        usage.assume_init()
    };
    (usage.ru_nvcsw as u64, usage.ru_nivcsw as u64)
}

/// How long the calling thread has waited runnable for a CPU, in all, read from its
/// `/proc/thread-self/schedstat` (the second figure: `run_delay`, nanoseconds): after each
/// wake-up and each preemption until it ran again. Opened by the thread it describes; `None`
/// where the kernel keeps no such figure (no `CONFIG_SCHED_INFO`) or `/proc` is not mounted.
#[cfg(any(test, feature = "internals"))]
#[derive(Debug)]
pub struct RunDelay(std::fs::File);

#[cfg(any(test, feature = "internals"))]
impl RunDelay {
    /// The calling thread's figure.
    pub fn open() -> Option<Self> {
        let me = Self(std::fs::File::open("/proc/thread-self/schedstat").ok()?);
        me.read().map(|_| me)
    }

    /// The figure now, nanoseconds; `None` if it could not be read.
    pub fn read(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 96];
        let n = self.0.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.split_whitespace().nth(1)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// A thread that spins for 300 ms on a CPU another thread spins on too waits about half
    /// of that for the CPU: its figure grows by at least a quarter of it.
    #[test]
    fn run_delay_counts_the_time_spent_waiting_for_a_cpu() {
        watchdog(60, || {
            let cpu = *allowed_cpus().first().expect("this thread may run on some CPU");
            let spin = |d: Duration| {
                let t = Instant::now();
                while t.elapsed() < d {
                    std::hint::spin_loop();
                }
            };
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let measured = s.spawn(move || {
                    pin_to_cpu(cpu).unwrap();
                    let delay = RunDelay::open().expect("/proc/thread-self/schedstat (CONFIG_SCHED_INFO)");
                    let before = delay.read().unwrap();
                    ready_tx.send(()).unwrap();
                    spin(Duration::from_millis(300));
                    delay.read().unwrap() - before
                });
                ready_rx.recv().unwrap();
                s.spawn(|| {
                    pin_to_cpu(cpu).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                });
                let waited = measured.join().unwrap();
                stop.store(true, Ordering::Relaxed);
                assert!(waited >= 75_000_000, "waited {waited} ns for the CPU while sharing it for 300 ms");
            });
        });
    }
}
