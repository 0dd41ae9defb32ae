//! The agent's thread: it accepts connections on the socket, reads each request, checks its
//! sender and answers (see the module docs of [`crate::agent`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::Duration;

use super::credentials::check_sender;
use super::protocol::error_line;
use super::{MAGIC, MAX_REQUEST, Request, VERSION, migrate_self, socket_name};
use crate::error::{Error, Result};
use crate::sys::{self, Errno};

/// How long the agent waits for a request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn listen(pid: u32) -> Result<()> {
    let agent_error = |errno: Errno, message: String| Error::Agent { pid, errno, message };
    let io_errno = |e: &std::io::Error| Errno::from_io_error(e).unwrap_or(Errno::IO);
    let addr = SocketAddr::from_abstract_name(socket_name(pid).as_bytes())
        .map_err(|e| agent_error(io_errno(&e), format!("socket name: {e}")))?;
    let listener = UnixListener::bind_addr(&addr).map_err(|e| {
        agent_error(io_errno(&e), format!("binding @{}: {e} (another process holds the name?)", socket_name(pid)))
    })?;
    sys::close_in_children(listener.as_raw_fd());
    sys::thread::spawn("pagemig-agent", move || serve(listener))
        .map_err(|e| agent_error(io_errno(&e), format!("starting the agent thread: {e}")))?;
    Ok(())
}

fn serve(listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // A sender that stops reading or a request that panics ends that request only.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(stream)));
    }
}

/// Reads one request from `stream`, checks its sender and writes the reply.
fn answer(mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let reply = match read_request(&mut stream) {
        Err((errno, message)) => error_line(errno, &message),
        Ok(request) => match check_sender(&stream, &request) {
            Err((errno, message)) => error_line(errno, &message),
            Ok(()) => match request {
                Request::Ping => format!("{MAGIC} {VERSION} ok pid={}\nend\n", std::process::id()),
                Request::Move(m) => match migrate_self(&m) {
                    Ok(report) => report.to_lines(),
                    Err(e) => error_line(e.errno(), &e.to_string()),
                },
            },
        },
    };
    let _ = stream.write_all(reply.as_bytes());
    // What the sender wrote past its request (a line too long) is read and dropped, so that
    // closing does not reset the connection before the sender reads the reply.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = std::io::copy(&mut Read::by_ref(&mut stream).take(1 << 16), &mut std::io::sink());
}

fn read_request(stream: &mut UnixStream) -> std::result::Result<Request, (Errno, String)> {
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

    use super::super::{MoveRequest, ping, request_move, start, watchdog};
    use super::*;

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
