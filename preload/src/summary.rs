//! What the library did in this process: calls per symbol, the calls pagemig served, the
//! calls handed to the kernel whole and why, and what became of the pages.
//!
//! Plain atomics, no locks: a forked child resets them (its summary is its own) without
//! meeting a lock a thread of its parent held at the fork.

use std::io::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use pagemig::Engine;

use crate::config::{self, SummaryTo};

/// Why a call went to the kernel whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Whole {
    /// `PAGEMIG_PRELOAD` is not set.
    Disabled,
    /// A pid other than 0 or the caller's own.
    OtherProcess,
    /// `MPOL_MF_MOVE_ALL`.
    MoveAll,
    /// Nothing to move: a status query, `count` 0, `mbind` without `MPOL_MF_MOVE`, flags
    /// or arrays the kernel refuses.
    NotAMove,
    /// An `mbind` policy that is not `MPOL_BIND`, `MPOL_PREFERRED` or
    /// `MPOL_PREFERRED_MANY` of exactly one node without mode flags.
    PolicyNotSingleNode,
    /// Userfaultfd is not available to this process.
    NoUserfaultfd,
    /// `process_vm_readv` may not read the caller's arrays.
    Unreadable,
    /// pagemig returned an error, panicked or could not allocate, or the arrays ended
    /// before `count` entries; the kernel served the call, or what pagemig had not served
    /// of it.
    PagemigFailed,
    /// A finite `RLIMIT_AS` or `RLIMIT_DATA` leaves pagemig too little room
    /// ([`pagemig::ffi::headroom`]), or `vm.max_map_count` too few mappings to start it
    /// ([`crate::worker::room`]).
    NoMemory,
}

impl Whole {
    const ALL: [Whole; 9] = [
        Whole::Disabled,
        Whole::OtherProcess,
        Whole::MoveAll,
        Whole::NotAMove,
        Whole::PolicyNotSingleNode,
        Whole::NoUserfaultfd,
        Whole::Unreadable,
        Whole::PagemigFailed,
        Whole::NoMemory,
    ];

    fn label(self) -> &'static str {
        match self {
            Whole::Disabled => "disabled",
            Whole::OtherProcess => "other process",
            Whole::MoveAll => "MPOL_MF_MOVE_ALL",
            Whole::NotAMove => "not a move (query, count 0, no MPOL_MF_MOVE, refused arguments)",
            Whole::PolicyNotSingleNode => "policy not single-node",
            Whole::NoUserfaultfd => "no userfaultfd",
            Whole::Unreadable => "process_vm_readv refused",
            Whole::PagemigFailed => "pagemig failed, kernel retried",
            Whole::NoMemory => "address-space or mapping-count limit",
        }
    }
}

/// A symbol the library serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Symbol {
    /// `move_pages`.
    MovePages,
    /// `mbind`.
    Mbind,
    /// `migrate_pages`.
    MigratePages,
}

struct Counts {
    calls: [AtomicU64; 3],
    served: [AtomicU64; 3],
    whole_calls: [AtomicU64; Whole::ALL.len()],
    whole_pages: [AtomicU64; Whole::ALL.len()],
    mbind_pages_not_movable: AtomicU64,
    panics: AtomicU64,
}

#[expect(clippy::declare_interior_mutable_const, reason = "only to initialise the arrays of the static below")]
const ZERO: AtomicU64 = AtomicU64::new(0);

static COUNTS: Counts = Counts {
    calls: [ZERO; 3],
    served: [ZERO; 3],
    whole_calls: [ZERO; Whole::ALL.len()],
    whole_pages: [ZERO; Whole::ALL.len()],
    mbind_pages_not_movable: ZERO,
    panics: ZERO,
};

/// The process whose engine the library opened.
static ENGINE_PID: AtomicU32 = AtomicU32::new(0);

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Counts a call of `symbol`.
pub(crate) fn call(symbol: Symbol) {
    add(&COUNTS.calls[symbol as usize], 1);
}

/// Counts a call of `symbol` that pagemig served.
pub(crate) fn served(symbol: Symbol) {
    add(&COUNTS.served[symbol as usize], 1);
}

/// Counts a call handed to the kernel whole, naming `pages` pages.
pub(crate) fn whole(why: Whole, pages: u64) {
    let i = Whole::ALL.iter().position(|&w| w == why).expect("every reason is listed");
    add(&COUNTS.whole_calls[i], 1);
    add(&COUNTS.whole_pages[i], pages);
}

/// Counts pages of an `mbind` range that pagemig does not move itself (shared,
/// file-backed, special or unmapped memory), left to the kernel's `mbind`.
pub(crate) fn mbind_not_movable(pages: u64) {
    add(&COUNTS.mbind_pages_not_movable, pages);
}

/// Records that this process opened its engine.
pub(crate) fn engine_opened(pid: u32) {
    ENGINE_PID.store(pid, Ordering::Relaxed);
}

/// The panic hook: counts the panic and prints nothing.
pub(crate) fn panicked() {
    add(&COUNTS.panics, 1);
}

/// The `pthread_atfork` child handler: the child's summary counts the child's calls.
pub(crate) extern "C" fn forked() {
    let all = COUNTS.calls.iter().chain(&COUNTS.served).chain(&COUNTS.whole_calls).chain(&COUNTS.whole_pages);
    for c in all.chain([&COUNTS.mbind_pages_not_movable, &COUNTS.panics]) {
        c.store(0, Ordering::Relaxed);
    }
}

/// The summary, one `label: value` a line.
pub(crate) fn text() -> String {
    use std::fmt::Write;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let pid = std::process::id();
    let mut out = String::new();
    let state = if config::enabled() { "enabled" } else { "disabled (PAGEMIG_PRELOAD not set)" };
    let _ = writeln!(out, "pagemig-preload summary (pid {pid}): {state}");
    let symbols =
        [("move_pages", Symbol::MovePages), ("mbind", Symbol::Mbind), ("migrate_pages", Symbol::MigratePages)];
    for (name, s) in symbols {
        let _ = writeln!(out, "{name} calls: {}", get(&COUNTS.calls[s as usize]));
    }
    for (name, s) in symbols {
        let _ = writeln!(out, "served by pagemig, {name} calls: {}", get(&COUNTS.served[s as usize]));
    }
    for (i, w) in Whole::ALL.iter().enumerate() {
        let (calls, pages) = (get(&COUNTS.whole_calls[i]), get(&COUNTS.whole_pages[i]));
        let _ = writeln!(out, "to the kernel whole, {}: {calls} calls, {pages} pages", w.label());
    }
    // The engine's own count, only where this process opened it (asking would open it).
    let pages =
        (ENGINE_PID.load(Ordering::Relaxed) == pid).then(Engine::global).and_then(Result::ok).map(|e| e.pages_stats());
    let _ = writeln!(out, "engine: {}", if pages.is_some() { "opened" } else { "not opened" });
    let p = pages.unwrap_or_default();
    // What opening the engine applied (the config file, `PAGEMIG_ATTRS`), where it opened.
    let loaded = pages.is_some().then(pagemig::attr::loaded);
    for (label, n) in [
        ("pages moved by pagemig", p.moved),
        ("pages already on their node", p.already_home),
        ("pages not present", p.absent),
        ("pages failed", p.failed),
        ("pages to the kernel, not movable by pagemig (move_pages)", p.kernel_unmovable),
        ("pages to the kernel, pagemig could not move them", p.kernel_retried),
        ("pages to the kernel, not movable by pagemig (mbind)", get(&COUNTS.mbind_pages_not_movable)),
        ("attributes applied", loaded.map_or(0, |l| l.applied.len() as u64)),
        ("attributes rejected", loaded.map_or(0, |l| l.rejected.len() as u64)),
        ("panics caught", get(&COUNTS.panics)),
    ] {
        let _ = writeln!(out, "{label}: {n}");
    }
    if let Some(first) = loaded.and_then(|l| l.rejected.first()) {
        let _ = writeln!(out, "first attribute rejected: {} ({}): {}", first.text, first.source, first.error);
    }
    out
}

/// Writes the summary where `PAGEMIG_SUMMARY` asked, at exit. Errors are dropped: there
/// is nobody left to tell.
pub(crate) extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let text = text();
        match &config::config().summary {
            Some(SummaryTo::Stderr) => {
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
            Some(SummaryTo::File(path)) => {
                if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                    let _ = f.write_all(text.as_bytes());
                }
            }
            None => {}
        }
    });
}
