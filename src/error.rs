//! The library's error type: every variant maps to an errno, and batch failures carry the
//! progress made before them.

use crate::stats::MigrateStats;
use crate::sys::Errno;

/// What went wrong, with enough context to act on it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    Sys {
        /// The call and what it was doing.
        op: &'static str,
        /// The errno it returned.
        errno: Errno,
    },
    /// An argument is out of range or malformed (`EINVAL`).
    Invalid(String),
    /// The node does not exist, is offline, or has no memory (`ENODEV`).
    UnknownNode {
        /// The node asked for.
        node: u32,
        /// The nodes that could be used instead.
        online: Vec<u32>,
    },
    /// The range holds memory pagemig may not move (`EFAULT`): shared, file-backed,
    /// special or unmapped memory.
    NotMovable {
        /// First byte of the offending range.
        start: usize,
        /// One past its last byte.
        end: usize,
        /// What the memory is and why it cannot move.
        why: String,
    },
    /// The migration would push the process past `vm.max_map_count` (`ENOMEM`): checked up
    /// front for calls of many runs (more than 248 separate ranges); a smaller call that
    /// crosses the limit fails folio by folio with `ENOMEM` instead, untouched.
    MapCountLimit {
        /// Mappings the process holds now.
        current: usize,
        /// Mappings the migration may need at most.
        needed: usize,
        /// `vm.max_map_count`.
        limit: usize,
    },
    /// The target node has too little free memory (`ENOMEM`).
    NodeFull {
        /// The target node.
        node: u32,
        /// Bytes the migration needs there.
        needed: u64,
        /// Bytes free there (`MemFree` of the node).
        free: u64,
        /// Bytes pagemig leaves free for everything else.
        reserve: u64,
    },
    /// Some folios migrated and some did not; `stats` says which and how many.
    Partial {
        /// Folios that did not migrate.
        failed: u64,
        /// Folios asked for.
        total: u64,
        /// The first error seen.
        first: Box<Error>,
        /// Everything measured, including the folios that did migrate.
        stats: Box<MigrateStats>,
    },
    /// Code the caller handed pagemig (a migrator, a progress callback) panicked, or
    /// pagemig itself did (`ECANCELED`). The call stopped there: every folio that had not
    /// moved was undone and is exactly as it was; `stats` counts what moved before.
    Panicked {
        /// Whose code panicked.
        what: &'static str,
        /// The panic's message.
        message: String,
        /// Everything measured, including the folios that did migrate.
        stats: Box<MigrateStats>,
    },
    /// An attribute could not be read or written.
    Attr {
        /// The attribute's path.
        path: String,
        /// `ENOENT` (unknown), `EACCES` (read-only), `EINVAL` (bad value) or the action's.
        errno: Errno,
        /// What was wrong and what is accepted.
        message: String,
    },
    /// A process's agent ([`crate::agent`]) could not be reached, refused a request or
    /// failed it; or the socket it should listen on is held by another process.
    Agent {
        /// The process asked.
        pid: u32,
        /// `ECONNREFUSED`: no agent listens; `EPERM`/`EACCES`: refused as the kernel would
        /// refuse `move_pages(2)`; `EINVAL`/`EPROTO`: a malformed request or reply;
        /// `ETIMEDOUT`: no reply in time; otherwise what failed.
        errno: Errno,
        /// What happened, as the agent or the client says it.
        message: String,
    },
    /// Reading a `/proc` or `/sys` file failed.
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Error {
    /// The errno that best describes this error.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Sys { errno, .. } => *errno,
            Error::Invalid(_) => Errno::INVAL,
            Error::UnknownNode { .. } => Errno::NODEV,
            Error::NotMovable { .. } => Errno::FAULT,
            Error::MapCountLimit { .. } | Error::NodeFull { .. } => Errno::NOMEM,
            Error::Partial { first, .. } => first.errno(),
            Error::Attr { errno, .. } | Error::Agent { errno, .. } => *errno,
            Error::Panicked { .. } => Errno::CANCELED,
            Error::Io { source, .. } => Errno::from_io_error(source).unwrap_or(Errno::IO),
        }
    }

    pub(crate) fn sys(op: &'static str) -> impl FnOnce(Errno) -> Error {
        move |errno| Error::Sys { op, errno }
    }

    pub(crate) fn io(path: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io { path: path.to_string(), source }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Sys { op, errno } => write!(f, "{op} failed: {errno}"),
            Error::Invalid(why) => write!(f, "invalid argument: {why}"),
            Error::UnknownNode { node, online } => {
                write!(f, "node {node} is not an online node with memory (online nodes with memory: {online:?})")
            }
            Error::NotMovable { start, end, why } => write!(f, "cannot migrate {start:#x}..{end:#x}: {why}"),
            Error::MapCountLimit { current, needed, limit } => write!(
                f,
                "migration would need up to {needed} mappings but vm.max_map_count is {limit} \
                 ({current} in use); migrate fewer scattered folios at a time or raise vm.max_map_count"
            ),
            Error::NodeFull { node, needed, free, reserve } => write!(
                f,
                "node {node} has {free} bytes free, too few for {needed} bytes and the {reserve} bytes left to others"
            ),
            Error::Partial { failed, total, first, .. } => {
                write!(f, "{failed} of {total} folios were not migrated: {first}")
            }
            Error::Panicked { what, message, stats } => write!(
                f,
                "{what} panicked ({message}); the migration stopped: {} of {} folios had moved, the rest are as they were",
                stats.succeeded_folios, stats.folios
            ),
            Error::Attr { path, message, .. } => write!(f, "attribute {path}: {message}"),
            Error::Agent { pid, errno, message } => write!(f, "agent of process {pid}: {message} ({errno})"),
            Error::Io { path, source } => write!(f, "reading {path}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            // What stopped the first folio that did not migrate.
            Error::Partial { first, .. } => Some(first.as_ref()),
            _ => None,
        }
    }
}

/// An errno from the offload extension point ([`crate::offload`]) or another call that
/// answers with one, as an [`Error::Sys`] named "system call"; `?` converts it.
impl From<Errno> for Error {
    fn from(errno: Errno) -> Self {
        Error::Sys { op: "system call", errno }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
