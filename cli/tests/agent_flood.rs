//! The agent of a running program (`pagemig-target --agent`) under connections that send
//! nothing: another user's, which must be refused at once, the owner's own, which must not
//! hold up the owner's next request, and a process with no free descriptor, where `accept`
//! fails and the agent must wait instead of spinning.
//!
//! The time bounds below detect a hang (a request served after another's ten-second wait);
//! they are not measurements: a healthy agent answers in milliseconds.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use pagemig::agent::{self, MoveRequest};
use pagemig::sys::Errno;

/// What "at once" means here: far above a healthy answer, far below the 10 s an agent that
/// waits for a silent connection spends on each.
const ANSWER_BOUND: Duration = Duration::from_secs(5);
/// The user the other-user tests act as (`nobody`).
const NOBODY: u32 = 65534;

fn node() -> u32 {
    pagemig::numa::memory_nodes().unwrap()[0]
}

fn root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// Runs `body` on a thread of its own and fails the test if it takes over `secs` (the
/// library's tests' watchdog).
fn watchdog(secs: u64, body: impl FnOnce() + Send + 'static) {
    common::watchdog(Duration::from_secs(secs), "the test's body", body);
}

/// A running `pagemig-target` with its agent, killed when dropped.
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pid: u32,
}

impl Target {
    fn spawn() -> Target {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pagemig-target"))
            .args(["--size", "8MiB", "--writers", "1", "--agent"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start pagemig-target");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Target { child, stdin, lines, pid: 0 };
        let header = t.expect("pagemig-target ");
        t.pid = header.split(' ').find_map(|w| w.strip_prefix("pid=")).unwrap().parse().unwrap();
        assert!(header.contains(" agent=@pagemig-agent."), "{header}");
        t.expect("ready");
        t
    }

    /// The next line starting with `prefix` (earlier lines are dropped).
    fn expect(&self, prefix: &str) -> String {
        loop {
            let line = self.lines.recv_timeout(Duration::from_secs(120)).expect("a line from the target");
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Ends the target; asserts that it found its memory as it left it.
    fn quit(mut self) {
        drop(self.stdin.take());
        let done = self.expect("done ");
        assert!(done.starts_with("done ok"), "{done}");
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection to `pid`'s agent that sends nothing.
fn connect(pid: u32) -> UnixStream {
    let addr = SocketAddr::from_abstract_name(agent::socket_name(pid).as_bytes()).unwrap();
    UnixStream::connect_addr(&addr).unwrap()
}

/// Pings `pid`'s agent; fails unless it answers for `pid` within [`ANSWER_BOUND`].
fn ping_at_once(pid: u32, what: &str) {
    let started = Instant::now();
    let pong = agent::ping(pid, Duration::from_secs(60));
    let took = started.elapsed();
    assert_eq!(pong.unwrap(), pid, "{what}");
    assert!(took < ANSWER_BOUND, "{what}: the ping was answered after {took:?}");
}

/// A forked child that connects to an agent `connections` times as another user and holds
/// the connections open, sending nothing, until [`IdleClients::finish`].
struct IdleClients {
    child: libc::pid_t,
    go: libc::c_int,
}

impl IdleClients {
    const MAX: usize = 16;

    /// Forks the child, which drops to `uid` (and its group), connects, and tells the parent
    /// it holds every connection before this returns.
    fn hold(pid: u32, uid: u32, connections: usize) -> IdleClients {
        assert!(connections <= Self::MAX);
        // Everything the child needs is made before the fork: it only makes system calls.
        let name = agent::socket_name(pid);
        // SAFETY: an all-zero sockaddr_un is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in name.bytes().enumerate() {
            // An abstract name: sun_path[0] stays NUL.
            addr.sun_path[i + 1] = b as libc::c_char;
        }
        let addr_len = (std::mem::size_of::<libc::sa_family_t>() + 1 + name.len()) as libc::socklen_t;
        let (mut ready, mut go) = ([0; 2], [0; 2]);
        // SAFETY: each call fills a local array of two descriptors.
        unsafe {
            assert_eq!(libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC), 0);
        }
        // SAFETY: the child makes raw system calls only (no allocation, no lock another
        // thread of this process could hold) and ends with _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork");
        if child == 0 {
            // SAFETY: system calls on locals and on the descriptors made above.
            unsafe { Self::child(&addr, addr_len, connections, uid, ready, go) };
        }
        // SAFETY: the parent's copies of the child's ends; then one byte read into a local.
        unsafe {
            libc::close(ready[1]);
            libc::close(go[0]);
            let mut byte = 0u8;
            let n = libc::read(ready[0], (&mut byte as *mut u8).cast(), 1);
            libc::close(ready[0]);
            assert_eq!((n, byte), (1, b'c'), "the child did not connect (its code: {byte})");
        }
        IdleClients { child, go: go[1] }
    }

    /// The child: drops to `uid`, connects, reports, waits for the parent, then reads what
    /// the agent wrote on each connection and exits with how many were refused with `EPERM`.
    ///
    /// # Safety
    /// Runs in the child of a fork only; `ready` and `go` are the two pipes made for it
    /// (read end first), the child writes to `ready` and reads from `go`.
    unsafe fn child(
        addr: &libc::sockaddr_un,
        addr_len: libc::socklen_t,
        connections: usize,
        uid: u32,
        [ready_parent, ready]: [libc::c_int; 2],
        [go, go_parent]: [libc::c_int; 2],
    ) -> ! {
        let fail = |code: u8| -> ! {
            // SAFETY: a byte from a local to the pipe the parent reads; then the end.
            unsafe {
                libc::write(ready, (&code as *const u8).cast(), 1);
                libc::_exit(100)
            }
        };
        // SAFETY: the caller's promise: system calls on locals and owned descriptors.
        unsafe {
            // The parent's ends: the parent's close of `go` must reach this process as EOF.
            libc::close(ready_parent);
            libc::close(go_parent);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                fail(1);
            }
            let mut fds = [-1; Self::MAX];
            for fd in fds.iter_mut().take(connections) {
                *fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if *fd < 0 || libc::connect(*fd, (addr as *const libc::sockaddr_un).cast(), addr_len) != 0 {
                    fail(2);
                }
            }
            let connected = b'c';
            libc::write(ready, (&connected as *const u8).cast(), 1);
            let mut byte = 0u8;
            // Until the parent closes its end.
            while libc::read(go, (&mut byte as *mut u8).cast(), 1) > 0 {}
            let mut refused = 0;
            for &fd in fds.iter().take(connections) {
                let wait = libc::timeval { tv_sec: 5, tv_usec: 0 };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&wait as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
                let mut buf = [0u8; 64];
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n >= REFUSAL.len() as isize && buf[..REFUSAL.len()] == *REFUSAL {
                    refused += 1;
                }
            }
            libc::_exit(refused)
        }
    }

    /// Lets the child read its replies; returns how many connections the agent refused.
    fn finish(self) -> i32 {
        // SAFETY: our end of the pipe; then waits, without blocking, for our own child.
        unsafe { libc::close(self.go) };
        let started = Instant::now();
        let mut status = 0;
        // SAFETY: as above.
        while unsafe { libc::waitpid(self.child, &mut status, libc::WNOHANG) } == 0 {
            if started.elapsed() > Duration::from_secs(60) {
                // SAFETY: our own child.
                unsafe { libc::kill(self.child, libc::SIGKILL) };
                panic!("the other user's client hung");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }
}

/// The start of the agent's answer to a sender the kernel would refuse (`EPERM`).
const REFUSAL: &[u8] = b"pagemig-agent 1 error errno=1 ";

/// Another user's connections, open and silent, while the owner pings and moves memory:
/// each is refused at once (`EPERM`, before anything is read), and the owner's requests are
/// answered without waiting for them.
#[test]
fn another_users_silent_connections_do_not_delay_the_owner() {
    watchdog(300, || {
        if !root() {
            eprintln!("skipped: acting as uid {NOBODY} needs root");
            return;
        }
        let t = Target::spawn();
        let others = IdleClients::hold(t.pid, NOBODY, 4);
        ping_at_once(t.pid, "the owner's ping behind another user's silent connections");
        let started = Instant::now();
        let r = agent::request_move(t.pid, &MoveRequest::new(node()), Duration::from_secs(120)).unwrap();
        assert!(r.adds_up() && r.failed == 0, "{r:?}");
        let took = started.elapsed();
        // A whole-process move of a small program: a second at most on a busy machine.
        assert!(took < Duration::from_secs(30), "the owner's move took {took:?}");
        assert_eq!(others.finish(), 4, "every connection of the other user is refused with EPERM");
        ping_at_once(t.pid, "after the other user left");
        t.quit();
    });
}

/// The owner's own connections, open and silent, do not hold up the owner's next request;
/// each can still send its request later and be answered; connections past the agent's
/// bound are answered at once too (served, or told to try again), and once the silent
/// ones close the agent serves everyone again.
#[test]
fn silent_connections_of_the_owner_do_not_delay_another_request() {
    watchdog(300, || {
        let t = Target::spawn();
        let mut silent: Vec<UnixStream> = (0..4).map(|_| connect(t.pid)).collect();
        ping_at_once(t.pid, "a ping behind four silent connections");
        let r = agent::request_move(t.pid, &MoveRequest::new(node()), Duration::from_secs(120)).unwrap();
        assert!(r.adds_up() && r.failed == 0, "{r:?}");
        // A silent connection speaks up: it is answered.
        let late = &mut silent[0];
        late.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        late.write_all(b"pagemig-agent 1 ping\n").unwrap();
        let mut reply = String::new();
        late.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, format!("pagemig-agent 1 ok pid={}\nend\n", t.pid));
        // Many more than the agent serves at once: still an answer, at once.
        silent.extend((0..64).map(|_| connect(t.pid)));
        let started = Instant::now();
        match agent::ping(t.pid, Duration::from_secs(60)) {
            Ok(pid) => assert_eq!(pid, t.pid),
            Err(e) => assert_eq!(e.errno(), Errno::AGAIN, "{e}"),
        }
        let took = started.elapsed();
        assert!(took < ANSWER_BOUND, "a ping behind 68 silent connections was answered after {took:?}");
        drop(silent);
        let started = Instant::now();
        loop {
            match agent::ping(t.pid, Duration::from_secs(60)) {
                Ok(pid) => break assert_eq!(pid, t.pid),
                Err(e) if e.errno() == Errno::AGAIN && started.elapsed() < ANSWER_BOUND => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("after the silent connections closed: {e}"),
            }
        }
        t.quit();
    });
}

/// CPU time (user and system) the thread `tid` of `pid` has used.
fn thread_cpu(pid: u32, tid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // The fields after the command name, which may hold spaces: state is field 3, utime 14,
    // stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// The thread of `pid` that accepts the agent's connections.
fn agent_thread(pid: u32) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).is_ok_and(|c| c.trim() == "pagemig-agent")
        })
        .expect("a thread named pagemig-agent")
}

/// Sets `pid`'s limits on open descriptors to `new` (unchanged with `None`); returns the
/// old ones.
fn nofile(pid: u32, new: Option<libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let new_ptr = new.as_ref().map_or(std::ptr::null(), |n| n as *const libc::rlimit);
    // SAFETY: `new_ptr` is null or points to a local, `old` is a local of the right type.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, new_ptr, &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// With no descriptor left in the program (`RLIMIT_NOFILE` of 0), `accept` fails with
/// `EMFILE` again and again while a client waits: the agent waits between tries (its
/// thread's CPU time over 2 s stays far below a spinning loop's), and the client is
/// answered soon after the limit is raised again.
#[test]
fn no_free_descriptor_costs_little_cpu_and_the_client_is_answered_after() {
    watchdog(300, || {
        let t = Target::spawn();
        let pid = t.pid;
        ping_at_once(pid, "before the limit");
        let tid = agent_thread(pid);
        let old = nofile(pid, None);
        nofile(pid, Some(libc::rlimit { rlim_cur: 0, rlim_max: old.rlim_max }));
        // A thread blocked in accept holds the number it took before the limit fell: the
        // first connection gets it (and is answered that the agent cannot read its sender's
        // credentials: no descriptor for /proc). Every accept after that fails.
        let _ = agent::ping(pid, Duration::from_secs(1));
        let (tx, answered) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(agent::ping(pid, Duration::from_secs(120)));
        });
        // The client's connection waits in the listen queue; accept fails for it.
        std::thread::sleep(Duration::from_millis(200));
        let before = thread_cpu(pid, &tid);
        std::thread::sleep(Duration::from_secs(2));
        let used = thread_cpu(pid, &tid) - before;
        if let Ok(early) = answered.try_recv() {
            panic!("answered with no descriptor to accept on: {early:?}");
        }
        nofile(pid, Some(old));
        assert!(used < Duration::from_millis(100), "the agent used {used:?} of CPU in 2 s of EMFILE");
        let started = Instant::now();
        let pong = answered.recv_timeout(Duration::from_secs(30)).expect("an answer after the limit is raised");
        let took = started.elapsed();
        assert_eq!(pong.unwrap(), pid);
        assert!(took < ANSWER_BOUND, "answered {took:?} after the limit was raised");
        ping_at_once(pid, "after the limit");
        t.quit();
    });
}
