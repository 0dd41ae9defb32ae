//! An in-process agent: a thread that migrates this process's memory when another process
//! asks, with pagemig's batched copy where it may and the kernel's `move_pages(2)` where it
//! may not.
//!
//! The kernel moves another process's pages with `migrate_pages(2)` or `move_pages(2)`;
//! pagemig can only move memory of the process it runs in (userfaultfd works on the
//! caller's own address space). [`start`] gives a process a thread that listens for
//! requests from outside (`pagemig move --pid PID`) and migrates the process's own memory
//! from the inside.
//!
//! # The socket
//!
//! The agent listens on the abstract Unix socket `@pagemig-agent.<pid>` ([`socket_name`]):
//! an abstract name needs no directory that every user can write to (`/run` is root's,
//! `$XDG_RUNTIME_DIR` is one user's and absent in services), leaves no file behind when the
//! process dies, and is found from the pid alone. Anyone in the same network namespace can
//! connect to it, so the agent checks every request's sender itself (below); and anyone
//! could bind the name first, so a client checks that the process holding the socket is
//! the one it asked for (`SO_PEERCRED` on the client side), and [`start`] fails with
//! `EADDRINUSE` rather than share the name. A client must see the same pid (same pid
//! namespace) and reach the same abstract namespace (same network namespace).
//!
//! # Who may ask
//!
//! Exactly who could move this process's pages with `move_pages(2)`: the kernel's
//! `find_mm_struct` (`mm/migrate.c`) requires `ptrace_may_access(task,
//! PTRACE_MODE_READ_REALCREDS)`: the caller's *real* user id equals this process's real,
//! effective and saved user ids and its real group id this process's three group ids, or
//! the caller has `CAP_SYS_PTRACE`; and a process that is not dumpable only admits holders
//! of `CAP_SYS_PTRACE`. The sender is the peer of the connection (`SO_PEERCRED`, its
//! effective ids), whose real ids and capabilities come from `/proc/<pid>/status`;
//! capabilities count when the sender is in this process's user namespace (the kernel
//! also honours them from an ancestor namespace, which this check does not). A target node
//! outside this process's cpuset needs `CAP_SYS_NICE` (`migrate_pages(2)`'s rule). The
//! LSM hook `security_task_movememory` has no user-space mirror.
//!
//! # Protocol (version 1)
//!
//! One request per connection, one line of at most 4096 bytes:
//!
//! ```text
//! pagemig-agent 1 ping
//! pagemig-agent 1 move to=1 [from=0,2] [range=0x7f00a000-0x7f10a000] [detail=1] [deadline_ms=N]
//! ```
//!
//! With `deadline_ms`, the agent stops moving that many milliseconds after it took the
//! request: the pages it had not reached stay where they are and are counted as
//! `not_reached` (the client sets it a little short of how long it waits for the reply, so
//! that nothing goes on moving after the client gave up).
//!
//! The reply is `pagemig-agent 1 ok` with `key=value` fields ([`Report`]), `map` lines for
//! each mapping with `detail=1`, and `end`; or one line `pagemig-agent 1 error errno=N
//! message` (malformed request, refused sender, failure). Fields a version-1 reader does not
//! know are ignored; an unknown request field is an error.
//!
//! # What moves, and how
//!
//! Without a range: every private anonymous mapping (the `brk` heap and the main stack
//! included); with a range: every page of it. Optionally only pages now on the nodes
//! `from`. Each mapping is routed:
//!
//! - **left alone**: pagemig's own mappings (destination pool, graveyards, measuring
//!   buffers), recorded when pagemig maps them;
//! - **the kernel's `move_pages(2)`**: what pagemig does not move (shared, file-backed,
//!   special mappings), and memory pagemig's own threads may touch while they migrate,
//!   which must never wait on the migration they perform: mappings next to an inaccessible
//!   guard (thread stacks, the agent's among them, and malloc arenas), the anonymous
//!   `.bss` right after a file mapping (statics, pagemig's among them), mappings holding the
//!   engine's or this thread's heap objects, and mappings under 2 MiB (the loader's and
//!   allocators' bookkeeping, where the kernel is as fast);
//! - **pagemig** ([`Engine::move_pages`]): the rest, the program's buffers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::maps::{self, Vma};
use crate::migrate::{Engine, MigrateOptions};
use crate::sys::{self, Errno, HPAGE_SIZE, PAGE_SIZE};

/// The first word of every request and reply line.
pub const MAGIC: &str = "pagemig-agent";
/// The protocol version this agent speaks.
pub const VERSION: u32 = 1;
/// The longest request line, newline included.
pub const MAX_REQUEST: usize = 4096;
/// Mappings smaller than this go to the kernel (see the module docs).
pub const MIN_ACCELERATED: usize = HPAGE_SIZE;
/// The size and alignment of a glibc arena heap (`HEAP_MAX_SIZE` on 64-bit).
const ARENA_HEAP: usize = 64 << 20;
/// Pages looked up and moved per step of a mapping (256 MiB of base pages).
const STEP_PAGES: usize = 1 << 16;
/// How long the agent waits for a request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `CAP_SYS_PTRACE`'s bit in `CapEff`.
const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_SYS_NICE`'s bit in `CapEff`.
const CAP_SYS_NICE: u32 = 23;

/// The abstract socket name (without the leading NUL) the agent of process `pid` listens on.
pub fn socket_name(pid: u32) -> String {
    format!("pagemig-agent.{pid}")
}

/// A running agent ([`start`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pid: u32,
}

impl Agent {
    /// The process it serves.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its socket's abstract name, as `ss -x` prints it (`@pagemig-agent.<pid>`).
    pub fn socket(&self) -> String {
        format!("@{}", socket_name(self.pid))
    }
}

/// The process whose agent runs (a parent's pid in a child forked since).
static RUNNING: AtomicU32 = AtomicU32::new(0);
/// The process starting its agent now (a stale pid in a child forked meanwhile).
static STARTING: AtomicU32 = AtomicU32::new(0);

/// Starts this process's agent, once per process: later calls return the running one.
///
/// A child forked from a process with an agent has no agent thread and does not keep the
/// parent's socket open (it is closed as the child starts); it may start its own, which
/// listens under its own pid.
///
/// # Errors
/// [`Error::Agent`] with `EADDRINUSE` when another socket holds the name, or the errno of
/// binding the socket or starting the thread.
pub fn start() -> Result<Agent> {
    let pid = std::process::id();
    loop {
        if RUNNING.load(Ordering::Acquire) == pid {
            return Ok(Agent { pid });
        }
        let starting = STARTING.load(Ordering::Acquire);
        if starting != pid && STARTING.compare_exchange(starting, pid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let started = listen(pid);
            if started.is_ok() {
                RUNNING.store(pid, Ordering::Release);
            }
            // Others may try again after a failure.
            STARTING.store(0, Ordering::Release);
            return started.map(|()| Agent { pid });
        }
        std::thread::yield_now();
    }
}

fn listen(pid: u32) -> Result<()> {
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

fn error_line(errno: Errno, message: &str) -> String {
    format!("{MAGIC} {VERSION} error errno={} {}\n", errno.raw_os_error(), message.replace('\n', " "))
}

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Is an agent there, and whose is it?
    Ping,
    /// Migrate memory.
    Move(MoveRequest),
}

/// What to migrate where.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveRequest {
    /// The node to move to.
    pub to: u32,
    /// Only pages now on one of these nodes (`None`: wherever they are).
    pub from: Option<Vec<u32>>,
    /// Only this address range, `(start, end)`, every page of it whatever its mapping
    /// (`None`: all private anonymous memory).
    pub range: Option<(usize, usize)>,
    /// Report each mapping's route too.
    pub detail: bool,
    /// Stop moving this long after the request was taken (`None`: no limit).
    pub deadline: Option<Duration>,
}

impl MoveRequest {
    /// All private anonymous memory to `to`.
    pub fn new(to: u32) -> Self {
        Self { to, from: None, range: None, detail: false, deadline: None }
    }

    /// Only pages now on `nodes`.
    pub fn from_nodes(mut self, nodes: Vec<u32>) -> Self {
        self.from = Some(nodes);
        self
    }

    /// Only `[start, end)`.
    pub fn range(mut self, start: usize, end: usize) -> Self {
        self.range = Some((start, end));
        self
    }

    /// With or without each mapping's route.
    pub fn detail(mut self, on: bool) -> Self {
        self.detail = on;
        self
    }

    /// Stops moving `after` the agent took the request; pages not reached by then stay.
    pub fn deadline(mut self, after: Duration) -> Self {
        self.deadline = Some(after);
        self
    }
}

impl Request {
    /// Parses a request line (with or without its newline).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming what is wrong; [`Error::Sys`] with `EPROTONOSUPPORT` for
    /// another version.
    pub fn parse(line: &str) -> Result<Request> {
        let bad = |why: String| Error::Invalid(why);
        let mut words = line.trim_end_matches('\n').split(' ');
        if words.next() != Some(MAGIC) {
            return Err(bad(format!("a request starts with {MAGIC:?}")));
        }
        match words.next().map(str::parse::<u32>) {
            Some(Ok(VERSION)) => {}
            Some(Ok(v)) => {
                return Err(Error::Sys {
                    op: "agent request: this agent speaks protocol version 1, not the version asked",
                    errno: if v == 0 { Errno::INVAL } else { Errno::PROTONOSUPPORT },
                });
            }
            _ => return Err(bad("the protocol version (a number) follows the magic word".into())),
        }
        match words.next() {
            Some("ping") => match words.next() {
                None => Ok(Request::Ping),
                Some(w) => Err(bad(format!("ping takes no fields, got {w:?}"))),
            },
            Some("move") => {
                let mut to = None;
                let mut m = MoveRequest::new(0);
                for word in words {
                    let (key, value) =
                        word.split_once('=').ok_or_else(|| bad(format!("{word:?} is not a key=value field")))?;
                    let dup = || bad(format!("field {key} given twice"));
                    match key {
                        "to" => {
                            if to.replace(parse_node(value)?).is_some() {
                                return Err(dup());
                            }
                        }
                        "from" => {
                            let nodes = value.split(',').map(parse_node).collect::<Result<Vec<u32>>>()?;
                            if m.from.replace(nodes).is_some() {
                                return Err(dup());
                            }
                        }
                        "range" => {
                            if m.range.replace(parse_range(value)?).is_some() {
                                return Err(dup());
                            }
                        }
                        "detail" => {
                            m.detail = match value {
                                "0" => false,
                                "1" => true,
                                _ => return Err(bad(format!("detail is 0 or 1, not {value:?}"))),
                            }
                        }
                        "deadline_ms" => {
                            let ms = value.parse::<u64>().map_err(|_| {
                                bad(format!("deadline_ms is a whole number of milliseconds, not {value:?}"))
                            })?;
                            if m.deadline.replace(Duration::from_millis(ms)).is_some() {
                                return Err(dup());
                            }
                        }
                        _ => return Err(bad(format!("unknown field {key:?} (to, from, range, detail, deadline_ms)"))),
                    }
                }
                m.to = to.ok_or_else(|| bad("move needs to=NODE".into()))?;
                Ok(Request::Move(m))
            }
            Some(other) => Err(bad(format!("unknown request {other:?} (ping, move)"))),
            None => Err(bad("the request (ping, move) follows the version".into())),
        }
    }

    /// The request as a line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Request::Ping => format!("{MAGIC} {VERSION} ping\n"),
            Request::Move(m) => {
                let mut line = format!("{MAGIC} {VERSION} move to={}", m.to);
                if let Some(from) = &m.from {
                    let nodes: Vec<String> = from.iter().map(u32::to_string).collect();
                    line += &format!(" from={}", nodes.join(","));
                }
                if let Some((s, e)) = m.range {
                    line += &format!(" range={s:#x}-{e:#x}");
                }
                if m.detail {
                    line += " detail=1";
                }
                if let Some(d) = m.deadline {
                    line += &format!(" deadline_ms={}", d.as_millis());
                }
                line + "\n"
            }
        }
    }
}

fn parse_node(s: &str) -> Result<u32> {
    s.parse::<u32>()
        .ok()
        .filter(|&n| n < 1024)
        .ok_or_else(|| Error::Invalid(format!("{s:?} is not a node number (0 … 1023)")))
}

/// Parses `START-END` in hex (`0x` optional, as `/proc/PID/maps` prints them): a non-empty
/// range, rounded out to whole pages.
///
/// # Errors
/// [`Error::Invalid`] for anything else.
pub fn parse_range(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::Invalid(format!("{s:?} is not a range START-END of hex addresses (0x7f00a000-0x7f10a000)"));
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let hex = |x: &str| {
        let x = x.trim();
        let x = x.strip_prefix("0x").or_else(|| x.strip_prefix("0X")).unwrap_or(x);
        usize::from_str_radix(x, 16).ok().filter(|_| !x.is_empty())
    };
    let (start, end) = (hex(a).ok_or_else(bad)?, hex(b).ok_or_else(bad)?);
    if start >= end {
        return Err(Error::Invalid(format!("range {s:?} is empty or reversed")));
    }
    let end = end.checked_next_multiple_of(PAGE_SIZE).ok_or_else(bad)?;
    Ok((start & !(PAGE_SIZE - 1), end))
}

/// How a mapping was migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// pagemig's batched copy ([`Engine::move_pages`]).
    Pagemig,
    /// The kernel's `move_pages(2)`.
    Kernel,
    /// Left alone: pagemig's own memory.
    Internal,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Pagemig => "pagemig",
            Route::Kernel => "kernel",
            Route::Internal => "internal",
        }
    }
}

/// One mapping (or part) of a [`Report`] with `detail`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MappingReport {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// How it was migrated.
    pub route: Route,
    /// Its pages that are on the target node now because of this request.
    pub moved: u64,
    /// Why it took that route.
    pub why: String,
}

/// What a move request did. Every page looked at is counted once:
/// `pages == moved_pagemig + moved_kernel + already_there + not_selected + absent + failed +
/// internal + not_reached`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The process that migrated.
    pub pid: u32,
    /// The target node.
    pub to: u32,
    /// Pages looked at.
    pub pages: u64,
    /// Pages pagemig moved itself.
    pub moved_pagemig: u64,
    /// Pages the kernel's `move_pages(2)` moved (mappings pagemig leaves to it, and pages
    /// pagemig handed over).
    pub moved_kernel: u64,
    /// Pages on the target node already.
    pub already_there: u64,
    /// Pages on a node the request did not name in `from`.
    pub not_selected: u64,
    /// Pages not there to move (never touched, not mapped, or unmapped or purged by the
    /// program while the request ran).
    pub absent: u64,
    /// Pages present elsewhere that could not be moved.
    pub failed: u64,
    /// Pages of pagemig's own mappings, left alone.
    pub internal: u64,
    /// Pages not reached before the request's deadline, left where they are.
    pub not_reached: u64,
    /// Mappings (or parts) pagemig moved, the kernel moved, and left alone.
    pub mappings: [u64; 3],
    /// The first page that failed, and its errno.
    pub first_failure: Option<(usize, i32)>,
    /// How long the request took, in microseconds.
    pub time_us: u64,
    /// Each mapping's route, with `detail`.
    pub detail: Vec<MappingReport>,
}

impl Report {
    /// Whether the counts add up ([`Report`]'s invariant).
    pub fn adds_up(&self) -> bool {
        self.pages
            == self.moved_pagemig
                + self.moved_kernel
                + self.already_there
                + self.not_selected
                + self.absent
                + self.failed
                + self.internal
                + self.not_reached
    }

    /// The reply lines, `end` included.
    pub fn to_lines(&self) -> String {
        let mut out = format!(
            "{MAGIC} {VERSION} ok pid={} to={} pages={} pagemig={} kernel={} already={} unselected={} absent={} \
             failed={} internal={} maps_pagemig={} maps_kernel={} maps_internal={} time_us={}",
            self.pid,
            self.to,
            self.pages,
            self.moved_pagemig,
            self.moved_kernel,
            self.already_there,
            self.not_selected,
            self.absent,
            self.failed,
            self.internal,
            self.mappings[0],
            self.mappings[1],
            self.mappings[2],
            self.time_us
        );
        if self.not_reached > 0 {
            out += &format!(" not_reached={}", self.not_reached);
        }
        if let Some((addr, errno)) = self.first_failure {
            out += &format!(" first_failure={addr:#x}:{errno}");
        }
        out.push('\n');
        for m in &self.detail {
            out += &format!(
                "map {:#x}-{:#x} {} moved={} {}\n",
                m.start,
                m.end,
                m.route.as_str(),
                m.moved,
                m.why.replace('\n', " ")
            );
        }
        out + "end\n"
    }

    /// Parses the `ok` line of a reply and its `map` lines (without `end`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a line that is not part of a version-1 report.
    pub fn parse(lines: &[&str]) -> Result<Report> {
        let bad = |why: String| Error::Invalid(format!("agent reply: {why}"));
        let (first, maps) = lines.split_first().ok_or_else(|| bad("empty".into()))?;
        let rest = first
            .strip_prefix(&format!("{MAGIC} {VERSION} ok"))
            .ok_or_else(|| bad(format!("{first:?} is not an ok line")))?;
        let mut r = Report::default();
        for word in rest.split_whitespace() {
            let (key, value) = word.split_once('=').ok_or_else(|| bad(format!("{word:?} is not key=value")))?;
            let num = || value.parse::<u64>().map_err(|_| bad(format!("{key}={value:?} is not a number")));
            match key {
                "pid" => r.pid = num()? as u32,
                "to" => r.to = num()? as u32,
                "pages" => r.pages = num()?,
                "pagemig" => r.moved_pagemig = num()?,
                "kernel" => r.moved_kernel = num()?,
                "already" => r.already_there = num()?,
                "unselected" => r.not_selected = num()?,
                "absent" => r.absent = num()?,
                "failed" => r.failed = num()?,
                "internal" => r.internal = num()?,
                "not_reached" => r.not_reached = num()?,
                "maps_pagemig" => r.mappings[0] = num()?,
                "maps_kernel" => r.mappings[1] = num()?,
                "maps_internal" => r.mappings[2] = num()?,
                "time_us" => r.time_us = num()?,
                "first_failure" => {
                    let (a, e) = value.split_once(':').ok_or_else(|| bad(format!("first_failure={value:?}")))?;
                    let addr = usize::from_str_radix(a.trim_start_matches("0x"), 16)
                        .map_err(|_| bad(format!("first_failure={value:?}")))?;
                    r.first_failure = Some((addr, e.parse().map_err(|_| bad(format!("first_failure={value:?}")))?));
                }
                // A later version's field.
                _ => {}
            }
        }
        for line in maps {
            let mut w = line.splitn(5, ' ');
            let (tag, range, route, moved) = (w.next(), w.next(), w.next(), w.next());
            if tag != Some("map") {
                return Err(bad(format!("{line:?} is not a map line")));
            }
            let (start, end) = parse_range(range.unwrap_or_default())?;
            let route = match route {
                Some("pagemig") => Route::Pagemig,
                Some("kernel") => Route::Kernel,
                Some("internal") => Route::Internal,
                _ => return Err(bad(format!("{line:?}: unknown route"))),
            };
            let moved = moved
                .and_then(|m| m.strip_prefix("moved="))
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| bad(format!("{line:?}: no moved=N")))?;
            r.detail.push(MappingReport { start, end, route, moved, why: w.next().unwrap_or_default().to_string() });
        }
        Ok(r)
    }
}

/// The credentials `/proc/<pid>/status` shows: real, effective and saved user and group
/// ids, and the effective capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Creds {
    uid: [u32; 3],
    gid: [u32; 3],
    cap_eff: u64,
}

impl Creds {
    fn parse(status: &str) -> Option<Creds> {
        let ids = |key: &str| -> Option<[u32; 3]> {
            let line = status.lines().find_map(|l| l.strip_prefix(key))?;
            let v: Vec<u32> = line.split_whitespace().take(3).map(|x| x.parse().ok()).collect::<Option<_>>()?;
            v.try_into().ok()
        };
        let cap_eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim)?;
        Some(Creds { uid: ids("Uid:")?, gid: ids("Gid:")?, cap_eff: u64::from_str_radix(cap_eff, 16).ok()? })
    }

    fn read(pid: &str) -> Option<Creds> {
        Creds::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }

    fn has(&self, cap: u32) -> bool {
        self.cap_eff & (1 << cap) != 0
    }
}

/// The kernel's `ptrace_may_access(target, PTRACE_MODE_READ_REALCREDS)`, for a sender
/// `peer` and this process `me`; `caps` is whether the sender's capabilities count here
/// (same user namespace).
fn may_access(peer: &Creds, me: &Creds, caps: bool, dumpable: bool) -> std::result::Result<(), String> {
    let ptrace = caps && peer.has(CAP_SYS_PTRACE);
    let same = me.uid.iter().all(|&u| u == peer.uid[0]) && me.gid.iter().all(|&g| g == peer.gid[0]);
    if !same && !ptrace {
        return Err(format!(
            "the sender (real uid {}, gid {}) is not this process's user and group (uids {:?}, gids {:?}) \
             and lacks CAP_SYS_PTRACE: the kernel's move_pages(2) would refuse it too",
            peer.uid[0], peer.gid[0], me.uid, me.gid
        ));
    }
    if !dumpable && !ptrace {
        return Err("this process is not dumpable and the sender lacks CAP_SYS_PTRACE: \
                    the kernel's move_pages(2) would refuse it too"
            .into());
    }
    Ok(())
}

/// Checks the connection's sender as the kernel checks a `move_pages(2)` caller.
fn check_sender(stream: &UnixStream, request: &Request) -> std::result::Result<(), (Errno, String)> {
    let (pid, euid, egid) = sys::peer_cred(stream.as_fd()).map_err(|e| (e, format!("SO_PEERCRED: {e}")))?;
    let gone = || (Errno::PERM, format!("cannot read the credentials of the sender (pid {pid})"));
    let peer = Creds::read(&pid.to_string()).ok_or_else(gone)?;
    // The status read is the connecting process's, not a later one with its pid.
    if peer.uid[1] != euid || peer.gid[1] != egid {
        return Err(gone());
    }
    let me = Creds::read("self").ok_or((Errno::PERM, "cannot read this process's credentials".to_string()))?;
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    let caps = ns(&pid.to_string()).is_some_and(|n| Some(n) == ns("self"));
    may_access(&peer, &me, caps, sys::dumpable()).map_err(|m| (Errno::PERM, m))?;
    if let Request::Move(m) = request {
        let allowed = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Mems_allowed_list:")).map(str::to_string))
            .and_then(|list| crate::numa::parse_list(&list).ok());
        if allowed.is_some_and(|a| !a.contains(&m.to)) && !(caps && peer.has(CAP_SYS_NICE)) {
            return Err((
                Errno::ACCESS,
                format!("node {} is outside this process's cpuset and the sender lacks CAP_SYS_NICE", m.to),
            ));
        }
    }
    Ok(())
}

/// Whether `v` is private anonymous memory (the heap and stacks included).
fn private_anonymous(v: &Vma) -> bool {
    v.perms.as_bytes().get(3) == Some(&b'p')
        && v.inode == 0
        && !v.path.starts_with('/')
        && !["[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]"].contains(&v.path.as_str())
}

fn inaccessible_anonymous(v: &Vma) -> bool {
    v.perms.starts_with("---") && v.inode == 0 && v.path.is_empty()
}

/// Why the kernel, not pagemig, must move `vmas[i]`, or `None` when pagemig may.
fn kernel_reason(vmas: &[Vma], i: usize, anchors: &[usize]) -> Option<String> {
    let v = &vmas[i];
    if let Some(why) = v.refusal() {
        return Some(why);
    }
    let prev = i.checked_sub(1).map(|p| &vmas[p]).filter(|p| p.end == v.start);
    let next = vmas.get(i + 1).filter(|n| n.start == v.end);
    // glibc's arenas of threads other than the main one: heaps of `ARENA_HEAP` bytes aligned
    // to their size, read-write up to what is in use and inaccessible beyond.
    let heap_end = v.start + ARENA_HEAP;
    if v.start % ARENA_HEAP == 0
        && (v.end == heap_end || next.is_some_and(|n| inaccessible_anonymous(n) && n.end == heap_end))
    {
        return Some("a malloc arena's heap".into());
    }
    if prev.is_some_and(inaccessible_anonymous) {
        return Some("above an inaccessible guard: a thread stack".into());
    }
    if let Some(p) = prev.filter(|p| p.inode != 0) {
        return Some(format!("the .bss of {}: statics", p.path));
    }
    if anchors.iter().any(|&a| v.start <= a && a < v.end) {
        return Some("holds pagemig's own state or this thread's heap".into());
    }
    if v.end - v.start < MIN_ACCELERATED {
        return Some("under 2 MiB: allocator and loader bookkeeping".into());
    }
    None
}

/// Migrates this process's own memory as `request` asks, on the calling thread, and says
/// what happened (see the module docs for what moves and how).
///
/// The calling thread's stack and heap, and pagemig's own state, are the kernel's to move,
/// so any thread may call it; the others' accesses to memory being moved wait, as in any
/// migration.
///
/// # Errors
/// Nothing moved: [`Error::UnknownNode`] for a target without memory, [`Error::Invalid`]
/// for a node in `from` past 1023, the errno of reading `/proc/self/maps`. Pages that
/// failed are counted in the report, not errors.
pub fn migrate_self(request: &MoveRequest) -> Result<Report> {
    let started = Instant::now();
    let until = request.deadline.and_then(|d| started.checked_add(d));
    crate::numa::check_node(request.to)?;
    let engine = Engine::global().ok();
    let mut vmas = maps::vmas()?;
    vmas.sort_unstable_by_key(|v| v.start);
    // Heap objects this thread and every call touch: their mappings go to the kernel.
    let probe = Box::new(0u64);
    let mut anchors = vec![&*probe as *const u64 as usize];
    if let Some(e) = engine {
        anchors.extend(e.heap_anchors());
    }
    if let Some((s, _)) = sys::current_thread_stack() {
        anchors.push(s);
    }
    let claimed = crate::own::ranges();
    let mut report = Report { pid: std::process::id(), to: request.to, ..Default::default() };
    let range = request.range.map(|(s, e)| (s & !(PAGE_SIZE - 1), e.next_multiple_of(PAGE_SIZE)));
    let mut covered = range.map(|(s, _)| s);
    for (i, v) in vmas.iter().enumerate() {
        let (start, end) = match range {
            Some((s, e)) => {
                if v.end <= s || v.start >= e {
                    continue;
                }
                // Holes of the range: not mapped.
                if let Some(at) = covered.filter(|&at| at < v.start.max(s)) {
                    report.pages += ((v.start.max(s) - at) / PAGE_SIZE) as u64;
                    report.absent += ((v.start.max(s) - at) / PAGE_SIZE) as u64;
                }
                covered = Some(v.end.min(e));
                (v.start.max(s), v.end.min(e))
            }
            None if private_anonymous(v) && !v.perms.starts_with("---") => (v.start, v.end),
            None => continue,
        };
        let (pieces, skipped) = crate::own::unclaimed(start, end, &claimed);
        if skipped > 0 {
            report.pages += (skipped / PAGE_SIZE) as u64;
            report.internal += (skipped / PAGE_SIZE) as u64;
            report.mappings[2] += 1;
            if request.detail {
                report.detail.push(MappingReport {
                    start,
                    end,
                    route: Route::Internal,
                    moved: 0,
                    why: format!("{} KiB of pagemig's own memory", skipped >> 10),
                });
            }
        }
        let why = match engine {
            None => Some("userfaultfd unavailable in this process".to_string()),
            Some(_) => kernel_reason(&vmas, i, &anchors),
        };
        for (s, e) in pieces {
            let route = if why.is_some() { Route::Kernel } else { Route::Pagemig };
            let moved = move_piece(engine.filter(|_| route == Route::Pagemig), s, e, request, until, &mut report);
            report.mappings[if route == Route::Pagemig { 0 } else { 1 }] += 1;
            if request.detail {
                let why = why.clone().unwrap_or_else(|| format!("private anonymous {}", display_path(v)));
                report.detail.push(MappingReport { start: s, end: e, route, moved, why });
            }
        }
    }
    if let (Some((_, e)), Some(at)) = (range, covered) {
        report.pages += (e.saturating_sub(at) / PAGE_SIZE) as u64;
        report.absent += (e.saturating_sub(at) / PAGE_SIZE) as u64;
    }
    drop(probe);
    report.time_us = started.elapsed().as_micros() as u64;
    Ok(report)
}

fn display_path(v: &Vma) -> &str {
    if v.path.is_empty() { "memory" } else { &v.path }
}

/// Moves the pages of `[start, end)` step by step, with pagemig (`engine`) or the kernel,
/// counting them in `report`; returns the pages moved. From `until` on, nothing more is
/// moved: pagemig's batches stop at it (their pages not reached report `ETIMEDOUT`), and the
/// pages of the steps not begun are counted as not reached.
#[expect(unsafe_code, reason = "pagemig's move_pages on memory this thread leaves alone")]
fn move_piece(
    engine: Option<&Engine>,
    start: usize,
    end: usize,
    request: &MoveRequest,
    until: Option<Instant>,
    report: &mut Report,
) -> u64 {
    let target = request.to as i32;
    let mut moved_here = 0;
    let mut at = start;
    let opts = until.map_or_else(MigrateOptions::default, |t| MigrateOptions::default().deadline(t));
    while at < end {
        if until.is_some_and(|t| Instant::now() >= t) {
            let left = ((end - at) / PAGE_SIZE) as u64;
            report.pages += left;
            report.not_reached += left;
            break;
        }
        let step_end = end.min(at + STEP_PAGES * PAGE_SIZE);
        let pages: Vec<usize> = (at..step_end).step_by(PAGE_SIZE).collect();
        at = step_end;
        report.pages += pages.len() as u64;
        let mut now = vec![0i32; pages.len()];
        if sys::move_pages(&pages, None, &mut now).is_err() {
            // Unmapped meanwhile: nothing there to move.
            report.absent += pages.len() as u64;
            continue;
        }
        let mut todo = Vec::new();
        for (k, &node) in now.iter().enumerate() {
            if node < 0 {
                report.absent += 1;
            } else if node == target {
                report.already_there += 1;
            } else if request.from.as_ref().is_some_and(|f| !f.contains(&(node as u32))) {
                report.not_selected += 1;
            } else {
                todo.push(pages[k]);
            }
        }
        if todo.is_empty() {
            continue;
        }
        let nodes = vec![target; todo.len()];
        let mut status = vec![0i32; todo.len()];
        let (ok, by_pagemig) = match engine {
            Some(engine) => {
                let before = engine.pages_stats().moved;
                // SAFETY: this thread touches none of these pages during the call: its stack
                // and its heap (the probe allocation's mapping), the engine's state and
                // pagemig's own mappings were routed to the kernel or left alone above, and
                // the vectors made since the mappings were read lie outside this piece.
                let result = unsafe { engine.move_pages_with(&todo, &nodes, &mut status, &opts) };
                if let Err(e) = result {
                    status.fill(-e.errno().raw_os_error());
                }
                let ok = status.iter().filter(|&&s| s == target).count() as u64;
                (ok, (engine.pages_stats().moved - before).min(ok))
            }
            None => {
                if let Err(e) = sys::move_pages_of(0, &todo, Some(&nodes), &mut status) {
                    status.fill(-e.raw_os_error());
                }
                (status.iter().filter(|&&s| s == target).count() as u64, 0)
            }
        };
        // Not reached before the deadline; gone meanwhile (the program unmapped or purged
        // them since they were looked at: absent, as the kernel's migrate_pages(2) would
        // not have found them either); the rest that are not on the target failed.
        let gone = |s: i32| s == -libc::EFAULT || s == -libc::ENOENT;
        let failure = |s: i32| s != target && s != -libc::ETIMEDOUT && !gone(s);
        report.moved_pagemig += by_pagemig;
        report.moved_kernel += ok - by_pagemig;
        report.not_reached += status.iter().filter(|&&s| s == -libc::ETIMEDOUT).count() as u64;
        report.absent += status.iter().filter(|&&s| gone(s)).count() as u64;
        report.failed += status.iter().filter(|&&s| failure(s)).count() as u64;
        moved_here += ok;
        if report.first_failure.is_none() {
            report.first_failure =
                todo.iter().zip(&status).find(|&(_, &s)| failure(s)).map(|(&a, &s)| (a, if s < 0 { -s } else { 0 }));
        }
    }
    moved_here
}

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
    let mut stream = UnixStream::connect_addr(&addr).map_err(|e| {
        let errno = Errno::from_io_error(&e).unwrap_or(Errno::IO);
        fail(errno, format!("no agent listening on @{name}: {e}"))
    })?;
    let (holder, _, _) = sys::peer_cred(stream.as_fd()).map_err(|e| fail(e, format!("SO_PEERCRED: {e}")))?;
    if holder != pid as i32 {
        return Err(fail(Errno::ADDRINUSE, format!("@{name} is held by process {holder}, not by process {pid}")));
    }
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(request.to_line().as_bytes()).map_err(io)?;
    let mut lines = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(io)?;
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
    Err(fail(Errno::PROTO, "the reply ended before its end line".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a thread of its own and fails the test if it takes over `secs`.
    fn watchdog(secs: u64, body: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = sys::thread::spawn("agent-test-watched", move || {
            body();
            let _ = tx.send(());
        })
        .unwrap();
        match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(()) => handle.join().unwrap(),
            // The body panicked: join to show its message.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => handle.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("watchdog: no end after {secs} s"),
        }
    }

    #[test]
    fn requests_round_trip_and_malformed_ones_say_why() {
        let m = MoveRequest::new(1)
            .from_nodes(vec![0, 2])
            .range(0x1000, 0x3000)
            .detail(true)
            .deadline(Duration::from_millis(1500));
        let line = Request::Move(m.clone()).to_line();
        assert_eq!(line, "pagemig-agent 1 move to=1 from=0,2 range=0x1000-0x3000 detail=1 deadline_ms=1500\n");
        assert_eq!(Request::parse(&line).unwrap(), Request::Move(m));
        assert_eq!(Request::parse("pagemig-agent 1 ping\n").unwrap(), Request::Ping);
        for (bad, says) in [
            ("", "starts with"),
            ("hello 1 ping", "starts with"),
            ("pagemig-agent x ping", "version"),
            ("pagemig-agent 1", "follows the version"),
            ("pagemig-agent 1 dance", "unknown request"),
            ("pagemig-agent 1 ping now", "no fields"),
            ("pagemig-agent 1 move", "needs to=NODE"),
            ("pagemig-agent 1 move to=x", "not a node"),
            ("pagemig-agent 1 move to=1024", "not a node"),
            ("pagemig-agent 1 move to=1 to=2", "twice"),
            ("pagemig-agent 1 move to=1 from=", "not a node"),
            ("pagemig-agent 1 move to=1 range=0x2000-0x1000", "empty or reversed"),
            ("pagemig-agent 1 move to=1 range=zz-0x1000", "not a range"),
            ("pagemig-agent 1 move to=1 colour=red", "unknown field"),
            ("pagemig-agent 1 move to=1 detail=yes", "detail is 0 or 1"),
            ("pagemig-agent 1 move to=1 deadline_ms=1.5", "whole number of milliseconds"),
            ("pagemig-agent 1 move to=1 deadline_ms=-1", "whole number of milliseconds"),
            ("pagemig-agent 1 move to=1 deadline_ms=5 deadline_ms=6", "twice"),
            ("pagemig-agent 1 move to=1 justaword", "not a key=value"),
        ] {
            let e = Request::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert_eq!(Request::parse("pagemig-agent 2 ping").unwrap_err().errno(), Errno::PROTONOSUPPORT);
    }

    #[test]
    fn ranges_read_as_proc_maps_prints_them() {
        assert_eq!(parse_range("7f00a000-7f00c000").unwrap(), (0x7f00a000, 0x7f00c000));
        assert_eq!(parse_range("0x7f00a010-0x7f00b001").unwrap(), (0x7f00a000, 0x7f00c000));
        assert!(parse_range("0x10").is_err());
        assert!(parse_range("-0x10").is_err());
        assert!(parse_range("0x-0x10").is_err());
    }

    #[test]
    fn reports_round_trip() {
        let r = Report {
            pid: 7,
            to: 1,
            pages: 13,
            moved_pagemig: 4,
            moved_kernel: 1,
            already_there: 2,
            absent: 1,
            failed: 1,
            internal: 1,
            not_reached: 3,
            mappings: [1, 2, 1],
            first_failure: Some((0x5000, 16)),
            time_us: 99,
            detail: vec![MappingReport {
                start: 0x1000,
                end: 0x3000,
                route: Route::Kernel,
                moved: 1,
                why: "next to an inaccessible guard: a thread stack".into(),
            }],
            ..Default::default()
        };
        assert!(r.adds_up());
        let text = r.to_lines();
        let lines: Vec<&str> = text.lines().take_while(|l| *l != "end").collect();
        assert_eq!(Report::parse(&lines).unwrap(), r);
        assert!(Report::parse(&["pagemig-agent 1 ok pages=x"]).is_err());
    }

    #[test]
    fn the_kernels_ptrace_rule_decides_who_may_ask() {
        let me = Creds { uid: [1000; 3], gid: [100; 3], cap_eff: 0 };
        let same = Creds { uid: [1000, 1000, 1000], gid: [100; 3], cap_eff: 0 };
        assert!(may_access(&same, &me, true, true).is_ok());
        // The sender's real id counts, not its effective one.
        let setuid = Creds { uid: [1001, 1000, 1000], ..same };
        assert!(may_access(&setuid, &me, true, true).is_err());
        let other_group = Creds { gid: [101; 3], ..same };
        assert!(may_access(&other_group, &me, true, true).is_err());
        // A target that changed its ids (setuid program) is not the sender's to move.
        let mixed = Creds { uid: [1000, 0, 0], ..me };
        assert!(may_access(&same, &mixed, true, true).is_err());
        let root = Creds { uid: [0; 3], gid: [0; 3], cap_eff: 1 << CAP_SYS_PTRACE };
        assert!(may_access(&root, &me, true, true).is_ok());
        assert!(may_access(&root, &me, true, false).is_ok());
        // Capabilities from another user namespace do not count here.
        assert!(may_access(&root, &me, false, true).is_err());
        // Not dumpable: only CAP_SYS_PTRACE.
        assert!(may_access(&same, &me, true, false).is_err());
        // Root without CAP_SYS_PTRACE is just another user.
        let bare_root = Creds { cap_eff: 0, ..root };
        assert!(may_access(&bare_root, &me, true, true).is_err());
    }

    #[test]
    fn status_files_give_the_three_ids_and_capabilities() {
        let text = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t6\t7\t8\nCapEff:\t0000000000080000\n";
        let c = Creds::parse(text).unwrap();
        assert_eq!((c.uid, c.gid), ([1000, 1001, 1002], [5, 6, 7]));
        assert!(c.has(CAP_SYS_PTRACE) && !c.has(CAP_SYS_NICE));
        assert!(Creds::parse("Uid:\t1\n").is_none());
        assert!(Creds::read("self").is_some());
    }

    #[test]
    fn guarded_bss_small_and_anchored_mappings_go_to_the_kernel() {
        let line = |s: usize, e: usize, perms: &str, inode: u64, path: &str| Vma {
            start: s,
            end: e,
            perms: perms.into(),
            inode,
            path: path.into(),
            flags: vec![],
        };
        const M: usize = 1 << 20;
        let vmas = vec![
            line(0x1000_0000, 0x1000_0000 + M, "rw-p", 7, "/usr/bin/x"),
            line(0x1000_0000 + M, 0x1000_0000 + 8 * M, "rw-p", 0, ""),
            line(0x2000_0000, 0x2000_0000 + 8 * M, "rw-p", 0, ""),
            line(0x2000_0000 + 8 * M, 0x2400_0000, "---p", 0, ""),
            line(0x2400_0000, 0x2400_0000 + 8 * M, "rw-p", 0, ""),
            line(0x3000_0000, 0x3000_0000 + 8 * M, "rw-p", 0, ""),
            // Below a thread stack's guard: the program's.
            line(0x3000_0000 + 8 * M, 0x3000_0000 + 9 * M, "---p", 0, ""),
            line(0x4000_0000, 0x4000_0000 + M, "rw-p", 0, ""),
            line(0x5000_0000, 0x5000_0000 + 8 * M, "rw-p", 0, "[anon:buffers]"),
            line(0x6000_0000, 0x6000_0000 + 8 * M, "rw-p", 0, "[heap]"),
        ];
        let anchors = [0x5000_0000 + 5];
        let why = |i| kernel_reason(&vmas, i, &anchors);
        assert!(why(0).unwrap().contains("file-backed"));
        assert!(why(1).unwrap().contains(".bss"));
        assert!(why(2).unwrap().contains("arena"));
        assert!(why(4).unwrap().contains("thread stack"));
        assert_eq!(why(5), None, "below a guard: the program's");
        assert!(why(7).unwrap().contains("2 MiB"));
        assert!(why(8).unwrap().contains("own state"));
        assert!(why(9).unwrap().contains("special"));
    }

    #[test]
    fn a_buffer_of_the_program_is_migrated_by_pagemig_and_the_counts_add_up() {
        watchdog(120, a_buffer_of_the_program);
    }

    fn a_buffer_of_the_program() {
        let node = crate::numa::memory_nodes().unwrap()[0];
        let buf: Vec<u64> = (0..(8 << 20) / 8).collect();
        let (s, e) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len() * 8);
        let r = migrate_self(&MoveRequest::new(node).range(s, e).detail(true)).unwrap();
        assert!(r.adds_up(), "{r:?}");
        assert_eq!(r.failed, 0, "{r:?}");
        // A large vector is a mapping of its own: pagemig's to move, wherever it started.
        assert!(r.detail.iter().any(|m| m.route == Route::Pagemig && m.start <= s + 8192), "{r:?}");
        assert!(buf.iter().enumerate().all(|(i, &w)| w == i as u64));
        // The whole process: the pool reserve is left alone, and the engine works after.
        let engine = Engine::global().unwrap();
        engine.reserve(node, 4 << 20, crate::ThpAdvice::Default).unwrap();
        assert!(engine.wait_reserved(Duration::from_secs(30)));
        let all = migrate_self(&MoveRequest::new(node).detail(true)).unwrap();
        assert!(all.adds_up(), "{all:?}");
        assert!(all.internal >= (4 << 20) / PAGE_SIZE as u64, "{all:?}");
        assert!(
            all.detail
                .iter()
                .all(|m| m.route != Route::Pagemig
                    || !crate::own::ranges().iter().any(|&(a, b)| a < m.end && m.start < b))
        );
        engine.reserve(node, 0, crate::ThpAdvice::Default).unwrap();
        assert!(buf.iter().enumerate().all(|(i, &w)| w == i as u64));
        // A deadline already past: nothing is looked at or moved, every page is counted as
        // not reached, and the counts still add up.
        let late = migrate_self(&MoveRequest::new(node).range(s, e).deadline(Duration::ZERO)).unwrap();
        assert!(late.adds_up(), "{late:?}");
        let pages = ((e.next_multiple_of(PAGE_SIZE) - (s & !(PAGE_SIZE - 1))) / PAGE_SIZE) as u64;
        assert_eq!((late.pages, late.not_reached), (pages, pages - late.internal - late.absent), "{late:?}");
        assert!(late.not_reached >= (8 << 20) / PAGE_SIZE as u64, "{late:?}");
        assert_eq!(late.moved_pagemig + late.moved_kernel + late.already_there + late.failed, 0, "{late:?}");
        assert!(buf.iter().enumerate().all(|(i, &w)| w == i as u64));
    }

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
