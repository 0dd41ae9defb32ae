//! Per-process state: a value each process makes for itself on first use, so that a child
//! forked from a process that had one makes its own instead of using its parent's, whose
//! locks another thread of the parent may have held at the fork and whose threads the child
//! does not have. The parent's value is left in place in the child (leaked, never freed:
//! nothing there will finish with it).

use std::sync::atomic::{AtomicPtr, Ordering};

/// A value per process (see the module's description).
pub(crate) struct PerProcess<T: 'static> {
    current: AtomicPtr<Entry<T>>,
}

struct Entry<T> {
    pid: u32,
    value: T,
}

impl<T: 'static> PerProcess<T> {
    /// No value yet.
    pub(crate) const fn new() -> Self {
        PerProcess { current: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// This process's value, if it has made one.
    #[cfg(test)]
    #[allow(unsafe_code, reason = "reads the leaked, never freed, entry")]
    pub(crate) fn get(&self) -> Option<&'static T> {
        // SAFETY: a non-null pointer was made by `Box::into_raw` in `get_or_init` and is
        // never freed.
        let entry = unsafe { self.current.load(Ordering::Acquire).as_ref() }?;
        (entry.pid == std::process::id()).then_some(&entry.value)
    }

    /// This process's value, made by `make` on its first use in this process. Two threads
    /// may both make one; one is kept.
    #[allow(unsafe_code, reason = "publishes a leaked entry, or frees one never shared")]
    pub(crate) fn get_or_init(&self, make: impl Fn() -> T) -> &'static T {
        let pid = std::process::id();
        loop {
            let current = self.current.load(Ordering::Acquire);
            // SAFETY: as in `get`.
            if let Some(entry) = unsafe { current.as_ref() }
                && entry.pid == pid
            {
                return &entry.value;
            }
            let fresh = Box::into_raw(Box::new(Entry { pid, value: make() }));
            if self.current.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                // SAFETY: just made, and published for the life of the process.
                return unsafe { &(*fresh).value };
            }
            // SAFETY: another thread published its entry first; ours was never shared.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
}

/// Waits for the child `pid` (just forked by a unit test) at most `limit`; its exit code.
/// A child still running then is killed and fails the test with `hung`; one that did not
/// exit normally fails it too.
#[cfg(test)]
#[allow(unsafe_code, reason = "waitpid and kill of the test's own child")]
pub(crate) fn wait_child(pid: libc::pid_t, limit: std::time::Duration, hung: &str) -> i32 {
    let started = std::time::Instant::now();
    let mut status = 0;
    // SAFETY: waits, without blocking, for the caller's own child.
    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
        if started.elapsed() > limit {
            // SAFETY: the caller's own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{hung}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forked child makes its own value; its parent keeps its own.
    #[test]
    #[allow(unsafe_code, reason = "fork, waitpid, _exit")]
    fn a_child_makes_its_own_value() {
        static CELL: PerProcess<u32> = PerProcess::new();
        let parent = CELL.get_or_init(std::process::id);
        assert_eq!(*parent, std::process::id());
        assert_eq!(CELL.get(), Some(parent));
        // SAFETY: the child only reads atomics and its own pid, then ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let fresh = CELL.get().is_none() && *CELL.get_or_init(std::process::id) == std::process::id();
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(if fresh { 0 } else { 1 }) };
        }
        assert_eq!(wait_child(pid, std::time::Duration::from_secs(20), "the child hung"), 0);
        assert_eq!(CELL.get(), Some(parent));
    }
}
