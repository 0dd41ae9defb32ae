//! Stopping a call when code it runs panics.
//!
//! Caller code (a migrator, a progress callback) runs under `catch_unwind`. A panic there
//! raises the call's [`Abort`]: no further folio is protected, copied or moved, everything
//! claimed and protected is undone in order behind the moves already queued, and the call
//! returns [`crate::Error::Panicked`].

use std::sync::atomic::{AtomicBool, Ordering};

use crate::lock::Mutex;

/// A call's stop signal and the first panic that raised it.
#[derive(Debug, Default)]
pub(super) struct Abort {
    set: AtomicBool,
    first: Mutex<Option<(&'static str, String)>>,
}

impl Abort {
    /// Stops the call, remembering the first panic.
    pub fn raise(&self, what: &'static str, message: String) {
        let mut first = self.first.lock();
        if first.is_none() {
            *first = Some((what, message));
        }
        self.set.store(true, Ordering::Release);
    }

    /// Whether the call has stopped.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// The panic that stopped the call, if one did.
    pub fn take(&self) -> Option<(&'static str, String)> {
        self.first.lock().take()
    }

    /// Runs caller code, raising the abort if it panics.
    pub fn run_caught(&self, what: &'static str, f: impl FnOnce()) {
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            self.raise(what, crate::offload::registry::panic_message(payload.as_ref()));
        }
    }
}
