//! Per-process state: a value each process makes for itself on first use, so that a child
//! forked from a process that had one makes its own instead of using its parent's, whose
//! locks another thread of the parent may have held at the fork and whose threads the child
//! does not have. The maker is shown the parent's value, to take what still holds in the
//! child (settings, figures measured on the same machine). The parent's value is left in
//! place in the child (leaked, never freed: nothing there will finish with it).

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use crate::backoff::Backoff;

/// A value per process (see the module's description), made by one thread at a time.
pub(crate) struct PerProcess<T: 'static> {
    current: AtomicPtr<Entry<T>>,
    /// The process one of whose threads is making a value now (0: none; a parent's pid in a
    /// child forked meanwhile, where no thread is making it).
    making: AtomicU32,
}

struct Entry<T> {
    pid: u32,
    value: T,
}

/// Lets the next thread make the value once this one is done, whether it made one, failed
/// or panicked.
struct Making<'a>(&'a AtomicU32);

impl Drop for Making<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

impl<T: 'static> PerProcess<T> {
    /// No value yet.
    pub(crate) const fn new() -> Self {
        PerProcess { current: AtomicPtr::new(std::ptr::null_mut()), making: AtomicU32::new(0) }
    }

    #[allow(unsafe_code, reason = "reads the leaked, never freed, entry")]
    fn entry(&self) -> (*mut Entry<T>, Option<&'static Entry<T>>) {
        let current = self.current.load(Ordering::Acquire);
        // SAFETY: a non-null pointer was made by `Box::into_raw` in `publish` and is never
        // freed.
        (current, unsafe { current.as_ref() })
    }

    /// This process's value, if it has one.
    pub(crate) fn get(&self) -> Option<&'static T> {
        self.entry().1.filter(|e| e.pid == std::process::id()).map(|e| &e.value)
    }

    /// The value last made or set, this process's or, in a child that has made none yet,
    /// the one of the process it was forked from: for values that hold in a child too
    /// (figures measured on the same machine).
    pub(crate) fn latest(&self) -> Option<&'static T> {
        self.entry().1.map(|e| &e.value)
    }

    /// Forgets the value: the next [`PerProcess::get_or_try_init`] makes one again (the
    /// old one stays allocated).
    pub(crate) fn clear(&self) {
        self.current.store(std::ptr::null_mut(), Ordering::Release);
    }

    /// Publishes `value` as this process's in place of `replacing` (the pointer loaded
    /// before it was made); `None` if another was published meanwhile (ours is dropped).
    #[allow(unsafe_code, reason = "publishes a leaked entry, or frees one never shared")]
    fn publish(&self, replacing: *mut Entry<T>, value: T) -> Option<&'static T> {
        let fresh = Box::into_raw(Box::new(Entry { pid: std::process::id(), value }));
        if self.current.compare_exchange(replacing, fresh, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // SAFETY: just made, and published for the life of the process.
            return Some(unsafe { &(*fresh).value });
        }
        // SAFETY: another value was published first; ours was never shared.
        drop(unsafe { Box::from_raw(fresh) });
        None
    }

    /// This process's value, made by `make` on its first use in this process, shown the
    /// value of the process this one was forked from, if that one had one. One thread
    /// makes it, the others wait for it. When `make` fails nothing is kept (a later call
    /// tries again); a value [`PerProcess::set`] meanwhile is kept instead of the one made.
    pub(crate) fn get_or_try_init<E>(
        &self,
        make: impl FnOnce(Option<&'static T>) -> Result<T, E>,
    ) -> Result<&'static T, E> {
        let pid = std::process::id();
        self.make_one(|e| e.filter(|e| e.pid == pid).map(|e| &e.value), |e| make(e.map(|e| &e.value)))
    }

    /// The one-maker loop of [`PerProcess::get_or_try_init`] and [`PerProcess::replace`]:
    /// `found` says, of the entry published now, whether it is already what the caller
    /// wants; if not, one thread of this process makes a value from that entry with `make`
    /// and publishes it in its place, while the others wait and look again.
    fn make_one<E>(
        &self,
        found: impl Fn(Option<&'static Entry<T>>) -> Option<&'static T>,
        make: impl FnOnce(Option<&'static Entry<T>>) -> Result<T, E>,
    ) -> Result<&'static T, E> {
        let pid = std::process::id();
        let mut make = Some(make);
        let mut backoff = Backoff::kernel();
        loop {
            let (current, entry) = self.entry();
            if let Some(value) = found(entry) {
                return Ok(value);
            }
            let making = self.making.load(Ordering::Acquire);
            if making != pid && self.making.compare_exchange(making, pid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                let _done = Making(&self.making);
                // Published meanwhile by the thread that made it before us.
                if self.current.load(Ordering::Acquire) != current {
                    continue;
                }
                let make = make.take().expect("made once: a failure returns");
                let value = make(entry)?;
                if let Some(value) = self.publish(current, value) {
                    return Ok(value);
                }
                continue;
            }
            // Another thread of this process is making it.
            backoff.pause();
        }
    }

    /// The value made or set last, by this process or by the one it was forked from (a
    /// child shares its parent's, as it would a `OnceLock`'s); made by `make` where none
    /// was, by one thread of this process while the others wait. Unlike a `OnceLock`, a
    /// child forked while a thread of its parent was making the value (which the child
    /// will never see finished) makes one of its own instead of waiting for good. For
    /// values whose fork handlers make them safe to share with a child: they read it
    /// with [`PerProcess::latest`].
    pub(crate) fn get_or_init_inherited(&self, make: impl FnOnce() -> T) -> &'static T {
        let made = self.make_one(|e| e.map(|e| &e.value), |_| Ok::<T, std::convert::Infallible>(make()));
        match made {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// [`PerProcess::get_or_try_init`] with a `make` that cannot fail.
    pub(crate) fn get_or_init(&self, make: impl FnOnce(Option<&'static T>) -> T) -> &'static T {
        match self.get_or_try_init(|parent| Ok::<T, std::convert::Infallible>(make(parent))) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// Makes `value` this process's, in place of whatever was there.
    #[allow(unsafe_code, reason = "publishes a leaked entry")]
    pub(crate) fn set(&self, value: T) -> &'static T {
        let fresh = Box::into_raw(Box::new(Entry { pid: std::process::id(), value }));
        self.current.store(fresh, Ordering::Release);
        // SAFETY: just made, and published for the life of the process.
        unsafe { &(*fresh).value }
    }

    /// Replaces this process's value `stale` with one made by `make` from it. One thread
    /// makes it, and only while `stale` is still the value: the others, and later calls,
    /// get the value that replaced it. When `make` fails `stale` stays.
    pub(crate) fn replace<E>(
        &self,
        stale: &'static T,
        make: impl FnOnce(&'static T) -> Result<T, E>,
    ) -> Result<&'static T, E> {
        let pid = std::process::id();
        self.make_one(
            // `stale` is not the value any more (or was never this process's).
            |e| {
                (!e.is_some_and(|e| e.pid == pid && std::ptr::eq(&e.value, stale))).then(|| self.get().unwrap_or(stale))
            },
            |_| make(stale),
        )
    }

    /// Whether a thread of this process is making the value now.
    pub(crate) fn being_made(&self) -> bool {
        self.making.load(Ordering::Acquire) == std::process::id()
    }
}

/// What a part of pagemig does at a `fork()`: before it (`prepare`: wait, or take its
/// process-wide locks, pushing their guards, which are dropped in the parent and in the
/// child before their steps), and after it in the parent and in the child.
pub(crate) struct AtFork {
    pub prepare: fn(&mut Vec<Box<dyn std::any::Any>>),
    pub parent: fn(),
    pub child: fn(),
}

impl AtFork {
    /// A part that only holds its locks across a fork (`hold` pushes their guards).
    pub(crate) const fn holding(hold: fn(&mut Vec<Box<dyn std::any::Any>>)) -> Self {
        AtFork { prepare: hold, parent: nothing, child: nothing }
    }
}

/// The parts of pagemig that act at a `fork()`, in the order their `prepare` steps run
/// (the parent's and the child's steps run in the reverse order): the barrier for emptied
/// pages first, then every process-wide lock in the lock order (`migrate`'s LOCKING), then
/// the agent's socket. A part registers itself ([`at_fork`]) when it is first used; `process`
/// names them but imports none of them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ForkRank {
    /// `migrate::fork`: waits until no page is empty, and lets none empty until the child
    /// exists.
    Barrier,
    /// dcbm's registration and mtcopy's workers.
    Migrators,
    /// The migrator registry.
    #[cfg_attr(loom, allow(dead_code, reason = "the loom model's registry has loom's locks"))]
    Registry,
    /// The DMA devices.
    #[cfg_attr(not(feature = "dma"), allow(dead_code, reason = "registered by the dma feature's devices"))]
    Dma,
    /// The attributes' sources.
    Attr,
    /// The agent's listening socket, closed in the child.
    AgentSocket,
}

const RANKS: usize = ForkRank::AgentSocket as usize + 1;

/// The registered steps, by rank (null: none).
static STEPS: [AtomicPtr<AtFork>; RANKS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; RANKS];

/// Registers `step` as what the part `rank` does at every `fork()` from now on (a later call
/// for the same rank replaces it), and installs pagemig's one set of `pthread_atfork`
/// handlers, once per process.
///
/// Installed without a `Once`: `pthread_atfork` waits while a fork runs its handlers, and a
/// `Once` caught running by a fork would leave the child's every later call waiting for it
/// for good. The process that installs them marks it ([`INSTALLED`]: its pid, then done); a
/// child inherits the handlers with the mark. A thread that finds another of its process
/// installing them waits for it, up to 100 ms; a child forked while its parent was
/// installing them installs them again (glibc may or may not have taken the parent's: run
/// twice, the handlers do their work once, see [`prepare`]).
#[allow(unsafe_code, reason = "installs the pthread_atfork handlers")]
pub(crate) fn at_fork(rank: ForkRank, step: &'static AtFork) {
    STEPS[rank as usize].store(step as *const AtFork as *mut AtFork, Ordering::Release);
    // SAFETY: `getpid` takes no arguments.
    let me = u64::from(unsafe { libc::getpid() }.unsigned_abs());
    let started = std::time::Instant::now();
    loop {
        let mark = INSTALLED.load(Ordering::Acquire);
        if mark & DONE != 0 {
            return;
        }
        let installing_here = mark == me;
        if installing_here {
            if started.elapsed() > std::time::Duration::from_millis(100) {
                return;
            }
            std::thread::yield_now();
            continue;
        }
        if INSTALLED.compare_exchange(mark, me, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // SAFETY: the handlers are plain functions that touch only the steps above
            // (static, never freed) and the forking thread's own locals.
            let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
            // Without the handlers forks do not wait; `pthread_atfork` fails only on ENOMEM.
            debug_assert_eq!(rc, 0, "pthread_atfork");
            INSTALLED.store(me | DONE, Ordering::Release);
            return;
        }
    }
}

/// Whether pagemig's `pthread_atfork` handlers are installed ([`at_fork`]): 0, or the pid of
/// the process installing them, with [`DONE`] once they are.
static INSTALLED: AtomicU64 = AtomicU64::new(0);
const DONE: u64 = 1 << 32;

/// The registered steps, in rank order.
#[allow(unsafe_code, reason = "reads the static steps")]
fn steps() -> impl DoubleEndedIterator<Item = &'static AtFork> {
    // SAFETY: every non-null pointer came from a `&'static AtFork` in `at_fork`.
    STEPS.iter().filter_map(|s| unsafe { s.load(Ordering::Acquire).as_ref() })
}

thread_local! {
    /// The process-wide locks the forking thread holds between the prepare handler and
    /// the parent's or child's (dropped there, which lets them go).
    static HELD: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The steps whose `prepare` ran for the fork in progress, in rank order: only those
    /// take part after it (a step registered meanwhile prepared nothing, and its parent's
    /// or child's step could wait for a lock a thread of the parent held at the fork).
    static PREPARED: std::cell::RefCell<Vec<&'static AtFork>> = const { std::cell::RefCell::new(Vec::new()) };
    /// How many of the handlers' `prepare` calls this thread is inside ([`prepare`]).
    static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Before a `fork()`: every part's `prepare` step, in rank order. A part's locks are taken
/// after the barrier, because a migration filling its pages may need one of them; held
/// across the fork, no other thread is inside one, mid-update, when the process is copied,
/// and the child finds them all free (glibc does the same for malloc's arenas). They are
/// `std` mutexes: a `parking_lot` one keeps its waiters in a table of its own, and a child
/// would find the parent's waiters queued there, for ever.
extern "C" fn prepare() {
    // A fork from within a fork's handlers, or the handlers installed twice (see
    // `at_fork`): this thread holds the locks already, and taking a std mutex twice would
    // wait for ever. The outermost call does the work; the parent's and child's handlers
    // let go in the last of theirs.
    if DEPTH.with(|d| d.replace(d.get() + 1)) > 0 {
        return;
    }
    let mut held = Vec::new();
    let mut ran = Vec::new();
    for step in steps() {
        (step.prepare)(&mut held);
        ran.push(step);
    }
    HELD.with(|h| h.borrow_mut().extend(held));
    PREPARED.with(|p| *p.borrow_mut() = ran);
}

/// After a fork, in the parent or the child: for the last of the handlers' calls (see
/// [`prepare`]), lets go of what [`prepare`] took and returns the steps whose `prepare` ran,
/// in rank order; none for the others.
fn finish() -> Vec<&'static AtFork> {
    let depth = DEPTH.with(|d| {
        let left = d.get().saturating_sub(1);
        d.set(left);
        left
    });
    if depth > 0 {
        return Vec::new();
    }
    let held = HELD.with(|h| std::mem::take(&mut *h.borrow_mut()));
    drop(held);
    PREPARED.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

extern "C" fn parent() {
    for step in finish().into_iter().rev() {
        (step.parent)();
    }
}

extern "C" fn child() {
    for step in finish().into_iter().rev() {
        (step.child)();
    }
}

/// A step that does nothing.
pub(crate) fn nothing() {}

/// The process something was made in: a thread, a claim or a lock made in a parent exists
/// in a forked child only as a copied entry, not the child's to use, end or undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MadeIn(u32);

impl MadeIn {
    /// This process.
    pub(crate) fn this_process() -> Self {
        MadeIn(std::process::id())
    }

    /// Whether it was made in this process (not in the one this was forked from).
    pub(crate) fn is_here(self) -> bool {
        self.0 == std::process::id()
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
    use crate::testing::watchdog;

    /// One thread makes the value however many ask at once; a failure keeps nothing; a value
    /// set meanwhile wins over the one made; a replacement is made once, from the stale
    /// value, and a stale value is not replaced twice.
    #[test]
    fn one_maker_failures_settings_and_replacements() {
        watchdog(60, || {
            static CELL: PerProcess<u32> = PerProcess::new();
            static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            assert_eq!(CELL.get_or_try_init(|_| Err::<u32, _>("not now")), Err("not now"));
            assert!(CELL.get().is_none() && !CELL.being_made());
            let got: Vec<u32> = std::thread::scope(|s| {
                let threads: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            *CELL.get_or_init(|_| {
                                MADE.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_millis(20));
                                5
                            })
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert_eq!((got, MADE.load(Ordering::SeqCst)), (vec![5; 8], 1));
            CELL.clear();
            let kept = CELL.get_or_init(|_| {
                CELL.set(7);
                9
            });
            assert_eq!(*kept, 7);
            let next = CELL.replace(kept, |old| Ok::<_, ()>(old + 1)).unwrap();
            assert_eq!(*next, 8);
            assert_eq!(*CELL.replace(kept, |_| Ok::<_, ()>(100)).unwrap(), 8);
            assert_eq!(CELL.replace(next, |_| Err("failed")), Err("failed"));
            assert_eq!(CELL.get(), Some(next));
        });
    }

    /// An inherited value: a child forked once it is made shares it; a child forked while
    /// a thread of its parent is still making it (a `OnceLock` there would wait for that
    /// thread, which the child does not have, for ever) makes its own, and the parent's
    /// maker finishes in the parent alone.
    #[test]
    #[allow(unsafe_code, reason = "fork, waitpid, _exit")]
    fn a_child_forked_while_its_parent_makes_an_inherited_value_makes_its_own() {
        watchdog(60, || {
            static CELL: PerProcess<u32> = PerProcess::new();
            let (entered_tx, entered_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let maker = std::thread::spawn(move || {
                *CELL.get_or_init_inherited(|| {
                    entered_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    1
                })
            });
            entered_rx.recv().unwrap();
            assert!(CELL.being_made());
            // SAFETY: the child makes its value (one atomic exchange and a leaked box), then
            // ends with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let own = *CELL.get_or_init_inherited(|| 2) == 2;
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(if own { 0 } else { 1 }) };
            }
            assert_eq!(
                wait_child(pid, std::time::Duration::from_secs(20), "the child waited for its parent's maker"),
                0
            );
            go_tx.send(()).unwrap();
            assert_eq!(maker.join().unwrap(), 1);
            assert_eq!(*CELL.get_or_init_inherited(|| 3), 1);
            // Forked once it is made: the child shares it and makes none.
            // SAFETY: as above.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let shared = CELL.latest() == Some(&1) && *CELL.get_or_init_inherited(|| 4) == 1;
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(if shared { 0 } else { 1 }) };
            }
            assert_eq!(wait_child(pid, std::time::Duration::from_secs(20), "the child hung"), 0);
        });
    }

    /// A forked child makes its own value; its parent keeps its own.
    /// A child forked while its parent installs pagemig's fork handlers (the mark says a
    /// process is installing them, its parent) installs them itself rather than wait for
    /// the parent's thread, which it does not have: a `Once` there left the child's every
    /// later start of a thread waiting for good.
    #[test]
    #[allow(unsafe_code, reason = "fork, waitpid, _exit")]
    fn a_child_forked_while_its_parent_installs_the_fork_handlers_installs_them() {
        watchdog(60, || {
            static STEP: AtFork = AtFork::holding(|_| {});
            // SAFETY: `getpid` takes no arguments.
            let me = u64::from(unsafe { libc::getpid() }.unsigned_abs());
            let saved = INSTALLED.swap(me, Ordering::AcqRel);
            // SAFETY: the child only registers a step and reads atomics, then ends with _exit.
            let pid = unsafe { libc::fork() };
            if pid != 0 {
                INSTALLED.store(saved, Ordering::Release);
            }
            assert!(pid >= 0);
            if pid == 0 {
                at_fork(ForkRank::AgentSocket, &STEP);
                // SAFETY: `getpid` takes no arguments.
                let child = u64::from(unsafe { libc::getpid() }.unsigned_abs());
                let installed = INSTALLED.load(Ordering::Acquire) == child | DONE;
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(if installed { 0 } else { 1 }) };
            }
            assert_eq!(wait_child(pid, std::time::Duration::from_secs(20), "the child waited for its parent"), 0);
        });
    }

    #[test]
    #[allow(unsafe_code, reason = "fork, waitpid, _exit")]
    fn a_child_makes_its_own_value() {
        watchdog(60, || {
            static CELL: PerProcess<u32> = PerProcess::new();
            let parent = CELL.get_or_init(|_| std::process::id());
            assert_eq!(*parent, std::process::id());
            assert_eq!(CELL.get(), Some(parent));
            // SAFETY: the child only reads atomics and its own pid, then ends with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let mut seen = None;
                let fresh = CELL.get().is_none()
                    && *CELL.get_or_init(|parent| {
                        seen = parent.copied();
                        std::process::id()
                    }) == std::process::id();
                let fresh = fresh && seen.is_some();
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(if fresh { 0 } else { 1 }) };
            }
            assert_eq!(wait_child(pid, std::time::Duration::from_secs(20), "the child hung"), 0);
            assert_eq!(CELL.get(), Some(parent));
        });
    }
}
