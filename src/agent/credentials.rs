//! Who may ask: the kernel's rule for `move_pages(2)` of another process, applied to the
//! sender of a connection (see the module docs of [`crate::agent`]).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use crate::sys::{self, Errno};

/// `CAP_SYS_PTRACE`'s bit in `CapEff`.
const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_SYS_NICE`'s bit in `CapEff`.
const CAP_SYS_NICE: u32 = 23;

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

    fn read(pid: &str) -> std::io::Result<Creds> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        Creds::parse(&status).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected format"))
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

/// A connection's sender whom the kernel would let move this process's pages
/// ([`check_sender`]).
#[derive(Debug)]
pub(super) struct Sender {
    creds: Creds,
    /// Whether its capabilities count here (same user namespace).
    caps: bool,
}

/// Checks the sender of `stream` as the kernel checks a `move_pages(2)` caller, from what
/// the kernel recorded when it connected (`SO_PEERCRED`) and its `/proc` entries: nothing
/// is read from the connection, so a sender that says nothing costs no wait.
///
/// # Errors
/// `EPERM` with the reason for a sender the kernel would refuse, or one whose credentials
/// cannot be read (gone already); the errno of reading them when this process lacks a
/// resource for it (`EMFILE`, `ENOMEM`).
pub(super) fn check_sender(stream: &UnixStream) -> Result<Sender, (Errno, String)> {
    let (pid, euid, egid) = sys::peer_cred(stream.as_fd()).map_err(|e| (e, format!("SO_PEERCRED: {e}")))?;
    let unreadable = |whose: String, e: std::io::Error| match Errno::from_io_error(&e) {
        Some(errno @ (Errno::MFILE | Errno::NFILE | Errno::NOMEM)) => {
            (errno, format!("cannot read the credentials of {whose} now: {e}"))
        }
        _ => (Errno::PERM, format!("cannot read the credentials of {whose}: {e}")),
    };
    let peer = Creds::read(&pid.to_string()).map_err(|e| unreadable(format!("the sender (pid {pid})"), e))?;
    // The status read is the connecting process's, not a later one with its pid.
    if peer.uid[1] != euid || peer.gid[1] != egid {
        return Err((Errno::PERM, format!("the sender (pid {pid}) changed its credentials or is gone")));
    }
    let me = Creds::read("self").map_err(|e| unreadable("this process".into(), e))?;
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    let caps = ns(&pid.to_string()).is_some_and(|n| Some(n) == ns("self"));
    may_access(&peer, &me, caps, sys::dumpable()).map_err(|m| (Errno::PERM, m))?;
    Ok(Sender { creds: peer, caps })
}

impl Sender {
    /// Whether the sender may move memory to `node`: a node outside this process's cpuset
    /// needs `CAP_SYS_NICE` (`migrate_pages(2)`'s rule).
    ///
    /// # Errors
    /// `EACCES` saying why.
    pub(super) fn may_move_to(&self, node: u32) -> Result<(), (Errno, String)> {
        let allowed = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Mems_allowed_list:")).map(str::to_string))
            .and_then(|list| crate::numa::parse_list(&list).ok());
        if allowed.is_some_and(|a| !a.contains(&node)) && !(self.caps && self.creds.has(CAP_SYS_NICE)) {
            return Err((
                Errno::ACCESS,
                format!("node {node} is outside this process's cpuset and the sender lacks CAP_SYS_NICE"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(Creds::read("self").is_ok());
    }
}
