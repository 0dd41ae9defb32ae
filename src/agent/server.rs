//! The agent's threads: one accepts connections on the socket and checks each sender; each
//! admitted connection is served on a thread of its own (see the module docs of
//! [`crate::agent`], "Serving").
//!
//! The accepting thread never reads from a connection: it checks the sender from what the
//! kernel recorded at `connect` (`SO_PEERCRED`) and `/proc`, writes a refusal without
//! waiting and closes, or hands the connection to a serving thread. Nothing a client does
//! or fails to do can hold it up, and no connection waits for another's request: a silent
//! one costs its own thread (at most [`MAX_SERVING`] of them, each ending after
//! [`REQUEST_TIMEOUT`]), the next client is admitted at once, and past the bound it is
//! told to try again. Moves run one at a time (`moving`): two whole-process moves at once
//! would each move pages the other's thread is using; pings and refusals never wait for
//! them.
//!
//! When `accept` fails for want of a resource (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) a
//! waiting client stays in the queue and the next `accept` would fail at once again:
//! the thread sleeps between tries (a [`Backoff`] from 10 ms up to 1 s), so a process out of descriptors
//! costs the agent a few system calls a second, and the client is answered once one is
//! free. Before each `accept` the thread proves that its descriptor is still the socket it
//! bound (`fstat`: device and inode); once the program closed or replaced it, the agent
//! ends without touching that number again, and [`super::start`] may start a new one.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::credentials::{Sender, check_sender};
use super::protocol::error_line;
use super::{MAGIC, MAX_REQUEST, RUNNING, Request, VERSION, migrate_self, socket_name};
use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::sys::{self, Errno};

/// How long a serving thread waits for its connection's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections are served at once, each on a thread of its own; the agent answers
/// any more at once with `EAGAIN`.
pub(super) const MAX_SERVING: usize = 16;

pub(super) fn listen(pid: u32) -> Result<()> {
    let agent_error = |errno: Errno, message: String| Error::Agent { pid, errno, message };
    let io_errno = |e: &std::io::Error| Errno::from_io_error(e).unwrap_or(Errno::IO);
    let addr = SocketAddr::from_abstract_name(socket_name(pid).as_bytes())
        .map_err(|e| agent_error(io_errno(&e), format!("socket name: {e}")))?;
    let listener = UnixListener::bind_addr(&addr).map_err(|e| {
        agent_error(io_errno(&e), format!("binding @{}: {e} (another process holds the name?)", socket_name(pid)))
    })?;
    let identity = identity(&listener).map_err(|e| agent_error(e, format!("fstat of the agent's socket: {e}")))?;
    sys::close_in_children(listener.as_raw_fd());
    sys::thread::spawn("pagemig-agent", move || serve(listener, identity))
        .map_err(|e| agent_error(io_errno(&e), format!("starting the agent thread: {e}")))?;
    Ok(())
}

/// The open file a descriptor refers to: device and inode (a socket's inode is its own).
fn identity(fd: impl AsFd) -> std::result::Result<(u64, u64), Errno> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// What the serving threads of one agent share.
#[derive(Debug, Default)]
struct Shared {
    /// Connections being served now.
    serving: AtomicUsize,
    /// Held by the move being made.
    moving: crate::lock::Mutex<()>,
}

/// A place among the [`MAX_SERVING`] connections served at once, given back when dropped.
struct Slot(Arc<Shared>);

impl Slot {
    fn take(shared: &Arc<Shared>) -> Option<Slot> {
        let taken = shared.serving.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(shared));
        (taken < MAX_SERVING).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve(listener: UnixListener, bound: (u64, u64)) {
    // Per agent, not per process: a forked child that starts its own agent starts afresh
    // (no count of the parent's threads, no lock a parent's thread held at the fork).
    let shared = Arc::new(Shared::default());
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        if identity(&listener) != Ok(bound) {
            // The program closed the socket, or put another file under its number: neither
            // accepted from nor closed here (the number is not ours any more).
            std::mem::forget(listener);
            RUNNING.clear();
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                backoff.reset();
                // A panic (a failed allocation) ends that connection only.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| admit(stream, &shared)));
            }
            // The client gave up before it was accepted, or a signal: the next one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)) => {}
            // No descriptor or memory for the connection (EMFILE, ENFILE, ENOBUFS, ENOMEM),
            // or anything else: the client stays queued, and trying again at once would
            // fail at once again.
            Err(_) => {
                backoff.pause();
            }
        }
    }
}

/// Checks the sender of a connection just accepted, then serves it on a thread of its own,
/// or refuses it at once.
fn admit(stream: UnixStream, shared: &Arc<Shared>) {
    let sender = match check_sender(&stream) {
        Ok(sender) => sender,
        Err((errno, message)) => return refuse(&stream, errno, &message),
    };
    let Some(slot) = Slot::take(shared) else {
        let message = format!("busy: {MAX_SERVING} connections are being served; try again");
        return refuse(&stream, Errno::AGAIN, &message);
    };
    let stream = Arc::new(stream);
    let served = Arc::clone(&stream);
    // The slot is given back when the thread ends, or here if it does not start.
    let spawned = sys::thread::spawn("pagemig-request", move || {
        // A sender that stops reading or a request that panics ends that request only.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(&served, &sender, &slot.0)));
    });
    if let Err(e) = spawned {
        refuse(&stream, Errno::from_io_error(&e).unwrap_or(Errno::AGAIN), &format!("no thread to serve it: {e}"));
    }
}

/// Writes one error line without waiting (a fresh connection's buffer holds it) and closes.
fn refuse(stream: &UnixStream, errno: Errno, message: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = (&mut &*stream).write(error_line(errno, message).as_bytes());
}

/// Reads one request from `stream` and writes the reply.
fn answer(stream: &UnixStream, sender: &Sender, shared: &Shared) {
    let mut stream = stream;
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let reply = match read_request(&mut stream) {
        Err((errno, message)) => error_line(errno, &message),
        Ok(Request::Ping) => format!("{MAGIC} {VERSION} ok pid={}\nend\n", std::process::id()),
        Ok(Request::Move(mut m)) => match sender.may_move_to(m.to) {
            Err((errno, message)) => error_line(errno, &message),
            Ok(()) => {
                let taken = Instant::now();
                let _one_at_a_time = shared.moving.lock();
                // The deadline counts from when the request was taken, waiting included.
                m.deadline = m.deadline.map(|d| d.saturating_sub(taken.elapsed()));
                match migrate_self(&m) {
                    Ok(report) => report.to_lines(),
                    Err(e) => error_line(e.errno(), &e.to_string()),
                }
            }
        },
    };
    let _ = stream.write_all(reply.as_bytes());
    // What the sender wrote past its request (a line too long) is read and dropped, so that
    // closing does not reset the connection before the sender reads the reply.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = std::io::copy(&mut stream.take(1 << 16), &mut std::io::sink());
}

fn read_request(stream: &mut &UnixStream) -> std::result::Result<Request, (Errno, String)> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(Read::by_ref(stream).take(MAX_REQUEST as u64));
    reader.read_until(b'\n', &mut line).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            (Errno::TIMEDOUT, format!("no request line within {} s", REQUEST_TIMEOUT.as_secs()))
        }
        _ => (Errno::from_io_error(&e).unwrap_or(Errno::IO), e.to_string()),
    })?;
    if line.last() != Some(&b'\n') {
        return Err((
            Errno::INVAL,
            format!("a request is one line of at most {MAX_REQUEST} bytes ending in a newline"),
        ));
    }
    let line = std::str::from_utf8(&line).map_err(|_| (Errno::INVAL, "a request is UTF-8 text".to_string()))?;
    Request::parse(line).map_err(|e| (e.errno(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{MoveRequest, ping, request_move, start};
    use super::*;
    use crate::testing::watchdog;

    #[test]
    fn the_agent_answers_its_own_user_and_rejects_malformed_requests() {
        watchdog(120, the_agent_answers);
    }

    fn the_agent_answers() {
        let agent = start().unwrap();
        assert_eq!(start().unwrap(), agent, "start is idempotent");
        let pid = std::process::id();
        assert_eq!(ping(pid, Duration::from_secs(30)).unwrap(), pid);
        let raw = |text: &[u8]| {
            let addr = SocketAddr::from_abstract_name(socket_name(pid).as_bytes()).unwrap();
            let mut s = UnixStream::connect_addr(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            // Past the request's bound the agent may stop reading: what it replies counts.
            let _ = s.write_all(text);
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        assert!(raw(b"pagemig-agent 1 fly\n").starts_with("pagemig-agent 1 error errno=22 "));
        assert!(
            raw(b"pagemig-agent 9 ping\n")
                .starts_with(&format!("pagemig-agent 1 error errno={} ", libc::EPROTONOSUPPORT))
        );
        assert!(raw(&[b'x'; MAX_REQUEST + 10]).contains("at most 4096 bytes"));
        assert!(raw(b"pagemig-agent 1 ping").contains("ending in a newline"));
        let e = request_move(pid, &MoveRequest::new(999), Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.errno(), Errno::NODEV, "{e}");
        let node = crate::numa::memory_nodes().unwrap()[0];
        let r = request_move(pid, &MoveRequest::new(node).from_nodes(vec![node]), Duration::from_secs(120)).unwrap();
        assert!(r.adds_up() && r.pid == pid && r.failed == 0, "{r:?}");
        // Nobody listens under a pid with no agent.
        let e = ping(u32::MAX - 7, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.errno(), Errno::CONNREFUSED, "{e}");
    }
}
