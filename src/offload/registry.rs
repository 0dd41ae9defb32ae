//! The migrator registry: one active migrator, a dispatch path that costs one relaxed load
//! when none is registered, and an unregister that waits for every copy in flight.
//!
//! # Algorithm
//!
//! *Registration* (`migrate_offload_register()`): under the registry mutex, refuse a
//! migrator without a copy function or owner (`EINVAL`), refuse while another is active
//! (`EBUSY`), take a reference on the owner or refuse if it is going away (`ENODEV`), then
//! publish it and set `enabled`, the static-key analogue.
//!
//! *Dispatch* (`migrate_offload_batch_copy()`): if `enabled` is clear, return at once. Else
//! enter a read-side critical section of a small sleepable RCU: read the epoch, count
//! ourselves in that epoch's reader counter, then take the active migrator under the
//! mutex and call it outside the mutex; leave by decrementing the same counter.
//!
//! *Unregistration* (`migrate_offload_unregister()`): under the mutex, check that the
//! caller names the active migrator (`EINVAL` otherwise), clear `enabled` and the active
//! slot. Then, outside the mutex, wait for a *grace period*: flip the epoch and wait until
//! the old epoch's counter drains, twice, so that every reader that could have seen the old
//! migrator has left. Readers arriving later find the slot empty. Only then is the owner
//! reference dropped and the call returns: the migrator's resources may be freed.

use std::fmt;

use crate::offload::{Batch, OffloadCopy};
use std::sync::Arc;

use crate::sync::{AtomicBool, AtomicUsize, Mutex, Ordering, fence, yield_now};
use crate::sys::Errno;

/// The longest migrator name, as `MIGRATOR_NAME_LEN - 1`.
pub const MIGRATOR_NAME_MAX: usize = 31;

/// What provides a migrator (the kernel's `struct module`): registration takes a reference
/// on it, and fails with `ENODEV` once it is going away.
#[derive(Debug)]
pub struct Owner {
    name: String,
    live: AtomicBool,
}

impl Owner {
    /// A live owner.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self { name: name.to_string(), live: AtomicBool::new(true) })
    }

    /// The owner's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marks the owner as going away (module unload has begun): new registrations fail.
    pub fn going_away(&self) {
        self.live.store(false, Ordering::SeqCst);
    }

    /// Whether the owner is still live (`try_module_get` would succeed).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }
}

/// A migrator as registered (the kernel's `struct migrator`): a name, a copy function and
/// an owner. Fields may be missing, as in C, and registration checks them.
#[derive(Clone)]
pub struct Migrator {
    /// The migrator's name (at most 31 bytes).
    pub name: String,
    /// The batch copy.
    pub offload_copy: Option<Arc<dyn OffloadCopy>>,
    /// Who provides it.
    pub owner: Option<Arc<Owner>>,
}

impl Migrator {
    /// A complete migrator.
    pub fn new(name: &str, copy: Arc<dyn OffloadCopy>, owner: Arc<Owner>) -> Self {
        Self { name: name.to_string(), offload_copy: Some(copy), owner: Some(owner) }
    }

    fn same_as(&self, other: &Migrator) -> bool {
        let ptr = |m: &Migrator| m.offload_copy.as_ref().map(|c| Arc::as_ptr(c) as *const ());
        self.name == other.name && ptr(self) == ptr(other)
    }
}

impl fmt::Debug for Migrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Migrator")
            .field("name", &self.name)
            .field("offload_copy", &self.offload_copy.is_some())
            .field("owner", &self.owner.as_ref().map(|o| o.name().to_string()))
            .finish()
    }
}

/// The registry of the one active migrator.
pub struct Registry {
    enabled: AtomicBool,
    active: Mutex<Option<Migrator>>,
    epoch: AtomicUsize,
    readers: [AtomicUsize; 2],
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("active", &self.active_name()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            enabled: AtomicBool::new(false),
            active: Mutex::new(None),
            epoch: AtomicUsize::new(0),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }

    /// Makes `m` the active migrator (`migrate_offload_register()`).
    ///
    /// # Errors
    /// `EINVAL` without a copy function, owner or name (or a name over 31 bytes), `EBUSY`
    /// while another migrator is active, `ENODEV` when the owner is going away.
    pub fn register(&self, m: &Migrator) -> Result<(), Errno> {
        if m.offload_copy.is_none() || m.name.is_empty() || m.name.len() > MIGRATOR_NAME_MAX {
            return Err(Errno::INVAL);
        }
        let Some(owner) = &m.owner else { return Err(Errno::INVAL) };
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if active.is_some() {
            return Err(Errno::BUSY);
        }
        if !owner.is_live() {
            return Err(Errno::NODEV);
        }
        *active = Some(m.clone());
        self.enabled.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Registers `m` and returns a handle that unregisters it, once, when dropped.
    ///
    /// # Errors
    /// As [`Registry::register`].
    pub fn register_scoped(&self, m: Migrator) -> Result<Registration<'_>, Errno> {
        self.register(&m)?;
        Ok(Registration { registry: self, migrator: Some(m) })
    }

    /// Stops `m` from being used (`migrate_offload_unregister()`), returning once every copy
    /// already running through it has finished.
    ///
    /// # Errors
    /// `EINVAL` unless `m` is the active migrator.
    pub fn unregister(&self, m: &Migrator) -> Result<(), Errno> {
        let old = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            if !active.as_ref().is_some_and(|a| a.same_as(m)) {
                return Err(Errno::INVAL);
            }
            // New dispatches stop entering the offload path first.
            self.enabled.store(false, Ordering::SeqCst);
            active.take()
        };
        self.synchronize();
        // The owner reference goes last, after the grace period (module_put).
        drop(old);
        Ok(())
    }

    /// The active migrator's name, if any (`offload/active`).
    pub fn active_name(&self) -> Option<String> {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|m| m.name.clone())
    }

    /// Whether the active migrator copies only through the batch's own copies and so may
    /// be handed unpopulated destinations ([`OffloadCopy::fills_unpopulated`]); `false`
    /// when none is registered.
    pub fn active_fills_unpopulated(&self) -> bool {
        // The migrator's code runs with the lock let go: it may use the registry itself.
        let copy = self.active.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|m| m.offload_copy.clone());
        copy.is_some_and(|c| c.fills_unpopulated())
    }

    /// Whether a migrator is registered (one relaxed load: the static-key check).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Hands `batch` to the active migrator; `None` when none is registered.
    #[inline]
    pub fn dispatch(&self, batch: &Batch<'_>) -> Option<Result<(), Errno>> {
        if !self.enabled() {
            return None;
        }
        self.dispatch_slow(batch)
    }

    /// Hands `batch` to the active migrator; `None` when none is registered. A panic in the
    /// migrator comes back as `Some(Err(message))`, with the reader count restored.
    pub fn dispatch_caught(&self, batch: &Batch<'_>) -> Option<Result<Result<(), Errno>, String>> {
        if !self.enabled() {
            return None;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.dispatch_slow(batch))) {
            Ok(result) => result.map(Ok),
            Err(payload) => Some(Err(panic_message(payload.as_ref()))),
        }
    }

    #[cold]
    fn dispatch_slow(&self, batch: &Batch<'_>) -> Option<Result<(), Errno>> {
        // Left on every path, unwinding included: an unbalanced count would make every
        // later unregister wait forever.
        let _reader = ReadGuard { registry: self, idx: self.read_lock() };
        let copy = self.active.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|m| m.offload_copy.clone());
        copy.map(|c| c.offload_copy(batch))
    }

    fn read_lock(&self) -> usize {
        let idx = self.epoch.load(Ordering::SeqCst) & 1;
        self.readers[idx].fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        idx
    }

    fn read_unlock(&self, idx: usize) {
        fence(Ordering::SeqCst);
        self.readers[idx].fetch_sub(1, Ordering::SeqCst);
    }

    /// Waits until every reader that entered before the call has left.
    fn synchronize(&self) {
        for _ in 0..2 {
            fence(Ordering::SeqCst);
            let old = self.epoch.fetch_add(1, Ordering::SeqCst) & 1;
            while self.readers[old].load(Ordering::SeqCst) != 0 {
                yield_now();
            }
            fence(Ordering::SeqCst);
        }
    }
}

/// A read-side critical section of the registry, left when dropped.
struct ReadGuard<'r> {
    registry: &'r Registry,
    idx: usize,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.registry.read_unlock(self.idx);
    }
}

/// The text of a panic's payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A registration that unregisters its migrator, once, when dropped.
pub struct Registration<'r> {
    registry: &'r Registry,
    migrator: Option<Migrator>,
}

impl Registration<'_> {
    /// The registered migrator.
    pub fn migrator(&self) -> &Migrator {
        self.migrator.as_ref().expect("present until drop")
    }

    /// Unregisters now, reporting the outcome (dropping does the same, silently).
    ///
    /// # Errors
    /// As [`Registry::unregister`].
    pub fn unregister(mut self) -> Result<(), Errno> {
        let m = self.migrator.take().expect("present until drop");
        self.registry.unregister(&m)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.migrator.take() {
            let _ = self.registry.unregister(&m);
        }
    }
}

impl fmt::Debug for Registration<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration").field("migrator", &self.migrator).finish()
    }
}

/// The process-wide registry (shared with a forked child, whose fork handlers keep it
/// usable there; not a `OnceLock`, whose first use in a child forked while a thread of
/// its parent made it would wait for good).
static REGISTRY: crate::process::PerProcess<Registry> = crate::process::PerProcess::new();

/// The process-wide registry the migration pipeline dispatches through.
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init_inherited(|| {
        // (The loom model's registry has loom's locks, which a fork handler does not take.)
        #[cfg(not(loom))]
        {
            static STEP: crate::process::AtFork = crate::process::AtFork::holding(hold_for_fork);
            crate::process::at_fork(crate::process::ForkRank::Registry, &STEP);
        }
        Registry::new()
    })
}

/// Takes the registry's lock for a `fork()` in progress (see `process::at_fork`): the child
/// must not inherit it held by a thread it does not have.
#[cfg(not(loom))]
fn hold_for_fork(held: &mut Vec<Box<dyn std::any::Any>>) {
    if let Some(r) = REGISTRY.latest() {
        held.push(Box::new(r.active.lock().unwrap_or_else(|e| e.into_inner())));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::offload::CpuCopy;
    use std::sync::atomic::AtomicBool as StdBool;
    use std::time::Duration;

    fn cpu(name: &str) -> Migrator {
        Migrator::new(name, Arc::new(CpuCopy), Owner::new("test"))
    }

    #[test]
    fn error_table() {
        let r = Registry::new();
        let a = cpu("a");
        let mut no_copy = cpu("x");
        no_copy.offload_copy = None;
        assert_eq!(r.register(&no_copy), Err(Errno::INVAL));
        let mut no_owner = cpu("x");
        no_owner.owner = None;
        assert_eq!(r.register(&no_owner), Err(Errno::INVAL));
        assert_eq!(r.register(&cpu("")), Err(Errno::INVAL));
        assert_eq!(r.register(&cpu(&"n".repeat(32))), Err(Errno::INVAL));
        let dying = cpu("dying");
        dying.owner.as_ref().unwrap().going_away();
        assert_eq!(r.register(&dying), Err(Errno::NODEV));
        assert_eq!(r.unregister(&a), Err(Errno::INVAL));
        r.register(&a).unwrap();
        assert_eq!(r.active_name().as_deref(), Some("a"));
        assert_eq!(r.register(&cpu("b")), Err(Errno::BUSY));
        assert_eq!(r.register(&a), Err(Errno::BUSY));
        assert_eq!(r.unregister(&cpu("b")), Err(Errno::INVAL));
        // Same name, another copy function: not the active one.
        assert_eq!(r.unregister(&cpu("a")), Err(Errno::INVAL));
        r.unregister(&a).unwrap();
        assert_eq!(r.active_name(), None);
        assert!(!r.enabled());
        assert_eq!(r.unregister(&a), Err(Errno::INVAL));
    }

    #[test]
    fn handle_unregisters_once_on_drop() {
        let r = Registry::new();
        let h = r.register_scoped(cpu("h")).unwrap();
        assert_eq!(h.migrator().name, "h");
        assert!(r.enabled());
        drop(h);
        assert!(!r.enabled());
        let h = r.register_scoped(cpu("h2")).unwrap();
        h.unregister().unwrap();
        assert_eq!(r.active_name(), None);
    }

    /// A migrator whose copy takes a while and that notices use after its "free".
    struct Slow {
        running: StdBool,
        freed: StdBool,
    }

    // SAFETY: copies nothing and reports nothing.
    unsafe impl OffloadCopy for Slow {
        fn offload_copy(&self, _batch: &Batch<'_>) -> Result<(), Errno> {
            assert!(!self.freed.load(std::sync::atomic::Ordering::SeqCst), "used after unregister returned");
            self.running.store(true, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            assert!(!self.freed.load(std::sync::atomic::Ordering::SeqCst), "freed during a copy");
            self.running.store(false, std::sync::atomic::Ordering::SeqCst);
            Err(Errno::OPNOTSUPP)
        }
    }

    #[test]
    fn unregister_waits_for_the_copy_in_flight() {
        let r = Registry::new();
        let slow = Arc::new(Slow { running: StdBool::new(false), freed: StdBool::new(false) });
        let m = Migrator::new("slow", slow.clone(), Owner::new("test"));
        r.register(&m).unwrap();
        std::thread::scope(|s| {
            let copying = s.spawn(|| {
                // SAFETY: an empty batch touches no memory.
                let batch = unsafe { Batch::new(&[], None) };
                r.dispatch(&batch)
            });
            while !slow.running.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::yield_now();
            }
            let started = std::time::Instant::now();
            r.unregister(&m).unwrap();
            assert!(!slow.running.load(std::sync::atomic::Ordering::SeqCst), "unregister returned mid-copy");
            assert!(started.elapsed() >= Duration::from_millis(100));
            slow.freed.store(true, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(copying.join().unwrap(), Some(Err(Errno::OPNOTSUPP)));
        });
        // SAFETY: an empty batch touches no memory.
        let batch = unsafe { Batch::new(&[], None) };
        assert_eq!(r.dispatch(&batch), None);
    }
}
