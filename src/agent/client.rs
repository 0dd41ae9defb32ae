//! The client side: `pagemig move --pid` and other programs asking a process's agent.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

use super::{MAGIC, MoveRequest, Report, Request, VERSION, socket_name};
use crate::error::{Error, Result};
use crate::sys::{self, Errno};

/// Asks process `pid`'s agent to migrate, waiting up to `timeout` for the reply.
///
/// # Errors
/// [`Error::Agent`]: `ECONNREFUSED` when no agent listens; `EADDRINUSE` when the socket is
/// held by another process than `pid`; `EPERM`/`EACCES` when the agent refused the sender
/// as the kernel would; `ETIMEDOUT`; `EPROTO`
/// for a reply that is not version 1; the agent's errno for a request it failed.
pub fn request_move(pid: u32, request: &MoveRequest, timeout: Duration) -> Result<Report> {
    let lines = ask(pid, &Request::Move(request.clone()), timeout)?;
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    Report::parse(&refs).map_err(|e| Error::Agent { pid, errno: Errno::PROTO, message: e.to_string() })
}

/// Asks process `pid`'s agent whether it is there; returns the pid it answers for.
///
/// # Errors
/// As [`request_move`].
pub fn ping(pid: u32, timeout: Duration) -> Result<u32> {
    let lines = ask(pid, &Request::Ping, timeout)?;
    lines[0]
        .strip_prefix(&format!("{MAGIC} {VERSION} ok pid="))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| Error::Agent { pid, errno: Errno::PROTO, message: format!("reply {:?}", lines[0]) })
}

/// Sends `request` and returns the reply's lines up to `end` (excluded), or the agent's
/// error.
fn ask(pid: u32, request: &Request, timeout: Duration) -> Result<Vec<String>> {
    let fail = |errno: Errno, message: String| Error::Agent { pid, errno, message };
    let io = |e: std::io::Error| {
        let errno = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Errno::TIMEDOUT,
            _ => Errno::from_io_error(&e).unwrap_or(Errno::IO),
        };
        Error::Agent { pid, errno, message: format!("talking to the agent: {e}") }
    };
    let name = socket_name(pid);
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?;
    let stream = UnixStream::connect_addr(&addr).map_err(|e| {
        let errno = Errno::from_io_error(&e).unwrap_or(Errno::IO);
        fail(errno, format!("no agent listening on @{name}: {e}"))
    })?;
    let (holder, _, _) = sys::peer_cred(stream.as_fd()).map_err(|e| fail(e, format!("SO_PEERCRED: {e}")))?;
    if holder != pid as i32 {
        return Err(fail(Errno::ADDRINUSE, format!("@{name} is held by process {holder}, not by process {pid}")));
    }
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    // An agent that refuses the sender answers as it accepts, before the request: a request
    // it did not read fails to send (EPIPE), and the answer is read all the same.
    let sent = send_all(&stream, request.to_line().as_bytes());
    let mut lines = Vec::new();
    for line in BufReader::new(stream).lines() {
        // Nothing to read: the failed send says more than the reset that follows it.
        let line = match line {
            Ok(line) => line,
            Err(e) => return Err(io(sent.err().unwrap_or(e))),
        };
        if let Some(rest) = line.strip_prefix(&format!("{MAGIC} {VERSION} error ")) {
            let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
            let errno = errno.strip_prefix("errno=").and_then(|n| n.parse().ok()).unwrap_or(libc::EIO);
            return Err(fail(Errno::from_raw_os_error(errno), message.to_string()));
        }
        if line == "end" {
            if lines.is_empty() {
                break;
            }
            return Ok(lines);
        }
        lines.push(line);
    }
    sent.map_err(io)?;
    Err(fail(Errno::PROTO, "the reply ended before its end line".into()))
}

/// Writes all of `bytes` to `stream` with `send(2)` and `MSG_NOSIGNAL`: a peer that closed
/// its end gives `EPIPE`, not a `SIGPIPE` that would end a program which did not ignore it.
#[expect(unsafe_code, reason = "send(2) from a slice of ours on a descriptor we hold")]
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reads of its length; the descriptor is the stream's,
        // borrowed for the call.
        let sent = unsafe { libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        match sent {
            0.. => bytes = &bytes[sent as usize..],
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
