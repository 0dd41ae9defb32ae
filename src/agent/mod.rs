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
//! # Serving
//!
//! The sender is checked as the agent accepts the connection, before anything is read from
//! it: one the kernel would refuse gets one error line (`EPERM`), written without waiting,
//! and the connection is closed at once. An admitted connection is served on a thread of
//! its own, at most 16 at once (a further one is answered at once with `EAGAIN`: try
//! again), so a connection that sends nothing delays no other request; it is answered
//! `ETIMEDOUT` after 10 s. Moves run one at a time; pings do not wait for them. Every
//! thread of the agent blocks all signals. When `accept` fails for want of a resource
//! (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) the agent waits between tries, 10 ms doubling
//! up to 1 s, instead of retrying at once: the waiting client is answered once a
//! descriptor is free.
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
//! message` (malformed request, refused sender, busy agent, failure). Fields a version-1 reader does not
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
//! - **pagemig** ([`Engine::move_pages`](crate::migrate::Engine::move_pages)): the rest, the program's buffers.

mod client;
mod credentials;
mod protocol;
mod routing;
mod server;

use crate::process::PerProcess;

use crate::error::Result;

pub use client::{ping, request_move};
pub use protocol::{MappingReport, MoveRequest, Report, Route, parse_range};
// The wire protocol's and the serving side's own items: not the client's to use.
pub(crate) use protocol::{MAGIC, MAX_REQUEST, Request, VERSION};
pub(crate) use routing::migrate_self;

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

/// Set while this process's agent runs (a child forked from a process with one starts its
/// own); cleared when its socket is lost, so that the next [`start`] starts it again.
static RUNNING: PerProcess<()> = PerProcess::new();

/// Starts this process's agent, once per process: later calls return the running one.
///
/// A child forked from a process with an agent has no agent thread and does not keep the
/// parent's socket open (it is closed as the child starts); it may start its own, which
/// listens under its own pid.
///
/// # Errors
/// [`Error::Agent`](crate::error::Error::Agent) with `EADDRINUSE` when another socket holds the name, or the errno of
/// binding the socket or starting the thread.
pub fn start() -> Result<Agent> {
    let pid = std::process::id();
    // One thread starts it; after a failure a later call tries again.
    RUNNING.get_or_try_init(|_| server::listen(pid))?;
    Ok(Agent { pid })
}
