//! The process-wide engine ([`Engine::global`]): opened on first use, with the settings of
//! the config file and `PAGEMIG_ATTRS` applied ([`crate::attr::config`]) before any other
//! thread can reach it; opened again in a forked child (with its parent's settings) and
//! once the program closed its descriptors.

use crate::attr::Loaded;
use crate::error::{Error, Result};
use crate::migrate::Engine;
use crate::process::PerProcess;
use crate::sys::Errno;

/// The engine of this process, or why it could not be opened, and what opening it
/// applied. Leaked: never freed.
struct Slot {
    engine: std::result::Result<&'static Engine, Errno>,
    loaded: &'static Loaded,
}

/// This process's slot (a child forked from a process with one opens its own).
static SLOT: PerProcess<Slot> = PerProcess::new();

impl Engine {
    /// The process-wide engine, opened on first use.
    ///
    /// Opening it applies the settings of the config file and of `PAGEMIG_ATTRS`
    /// ([`crate::attr::config`]) before any other thread can reach it; entries that are
    /// rejected do not keep it from opening ([`crate::attr::loaded`] reports them).
    ///
    /// A process forked from one that had an engine opens its own on first use: the
    /// parent's threads do not exist in the child, and its userfaultfd registrations do
    /// not carry over. The child's engine takes the settings of the parent's, and the
    /// config is not read again.
    ///
    /// Likewise once the program closed or replaced the engine's descriptors
    /// ([`Engine::descriptors_lost`]): the next call opens a new engine with the same
    /// settings. A reference to the old one stays valid; its calls fail with `EBADF`.
    ///
    /// # Errors
    /// As [`Engine::new`], on every call once opening failed (in this process).
    pub fn global() -> Result<&'static Engine> {
        slot().engine.map_err(|errno| Error::Sys { op: "userfaultfd", errno })
    }

    /// Whether [`Engine::global`] would open an engine now (none in this process yet, or
    /// the program closed the open one's descriptors): opening makes threads, so maps their
    /// stacks, and the first of them may land where the program has just unmapped memory.
    /// A caller that answers for addresses the program names asks the kernel about them
    /// first when this is true. False once an engine is open, and once opening it failed
    /// (no userfaultfd: later calls open nothing).
    pub fn global_needs_opening() -> bool {
        !SLOT.get().is_some_and(|s| !matches!(s.engine, Ok(e) if e.descriptors_lost()))
    }
}

/// The slot of this process, filled on first use ([`Engine::global`]); an engine whose
/// descriptors the program closed or replaced is replaced by a new one with its settings
/// (the old one stays, leaked, as every engine).
fn slot() -> &'static Slot {
    let slot = SLOT.get_or_init(|parent| {
        let engine = Engine::new().map(|e| &*Box::leak(Box::new(e))).map_err(|e| e.errno());
        // A child takes the settings of the engine it was forked from.
        let loaded = match (parent, engine) {
            (Some(Slot { engine: Ok(from), loaded }), Ok(engine)) => {
                engine.take_settings(from);
                *loaded
            }
            _ => &*Box::leak(Box::new(crate::attr::config::apply(engine))),
        };
        Slot { engine, loaded }
    });
    let Ok(old) = slot.engine else { return slot };
    if !old.descriptors_lost() {
        return slot;
    }
    SLOT.replace(slot, |stale| {
        // Its prepared destinations are of no use to anyone now.
        old.clear_pool();
        let engine = Engine::new()?;
        engine.take_settings(old);
        Ok::<_, Error>(Slot { engine: Ok(&*Box::leak(Box::new(engine))), loaded: stale.loaded })
    })
    // Not now (no descriptor left, say): this call's caller meets the old engine's `EBADF`,
    // and the next call tries again.
    .unwrap_or(slot)
}

/// What opening the engine of this process applied (opening it first).
pub(crate) fn loaded() -> &'static Loaded {
    slot().loaded
}
