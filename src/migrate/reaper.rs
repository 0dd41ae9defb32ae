//! Deferred freeing of replaced source pages.
//!
//! With deferred freeing, the move phase first moves a run's old pages aside
//! (`MREMAP_DONTUNMAP` into a reserved "graveyard") and then the new pages over the emptied
//! source: two page-table moves. Freeing the old pages — the expensive part of replacing
//! base pages — happens on this background thread with `MADV_DONTNEED`, which holds the
//! mmap lock only for reading, while the next run is copied. The backlog is bounded: past
//! `limit` bytes the move phase waits for the reaper.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};

use parking_lot::{Condvar, Mutex};

use crate::sys;

/// A reservation holding moved-out pages.
pub(super) struct Grave {
    pub raw: usize,
    pub total: usize,
}

/// The background thread that frees graveyards.
pub(super) struct Reaper {
    tx: Mutex<Sender<Grave>>,
    pending: Arc<(Mutex<usize>, Condvar)>,
    limit: usize,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").field("pending", &*self.pending.0.lock()).field("limit", &self.limit).finish()
    }
}

impl Reaper {
    /// Starts the thread, with at most `limit` bytes waiting to be freed.
    pub fn new(limit: usize) -> Self {
        let (tx, rx) = channel::<Grave>();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let p = pending.clone();
        std::thread::Builder::new()
            .name("pagemig-reaper".into())
            .spawn(move || {
                for g in rx {
                    free(&g);
                    let (lock, cv) = &*p;
                    *lock.lock() -= g.total;
                    cv.notify_all();
                }
            })
            .expect("spawn the reaper thread");
        Self { tx: Mutex::new(tx), pending, limit }
    }

    /// Reserves a graveyard for `len` bytes whose start is congruent to `phase` modulo
    /// 2 MiB, so that moving pages into it moves whole page tables. Returns
    /// `(reservation, reservation length, graveyard start)`.
    pub fn reserve(&self, len: usize, phase: usize) -> Result<(usize, usize, usize), sys::Errno> {
        let total = len + sys::HPAGE_SIZE;
        let raw = sys::reserve(total)?;
        let mut g = (raw & !(sys::HPAGE_SIZE - 1)) + (phase & (sys::HPAGE_SIZE - 1));
        if g < raw {
            g += sys::HPAGE_SIZE;
        }
        Ok((raw, total, g))
    }

    /// Hands a reservation holding moved-out pages to the thread, first waiting while the
    /// backlog is over the limit.
    pub fn bury(&self, raw: usize, total: usize) {
        let (lock, cv) = &*self.pending;
        let mut pending = lock.lock();
        while *pending > self.limit {
            cv.wait(&mut pending);
        }
        *pending += total;
        drop(pending);
        if let Err(e) = self.tx.lock().send(Grave { raw, total }) {
            free(&e.0);
            *lock.lock() -= total;
        }
    }

    /// Gives back a reservation that holds nothing.
    pub fn release(&self, raw: usize, total: usize) {
        free(&Grave { raw, total });
    }

    /// Waits until everything handed over is freed.
    pub fn drain(&self) {
        let (lock, cv) = &*self.pending;
        let mut pending = lock.lock();
        while *pending > 0 {
            cv.wait(&mut pending);
        }
    }
}

fn free(g: &Grave) {
    // SAFETY: a reservation made by `Reaper::reserve` holds only pages moved out of
    // replaced sources; nothing refers to it. Discarding first frees the pages under the
    // mmap read lock; the unmap that follows finds nothing to free.
    unsafe {
        let _ = sys::discard(g.raw, g.total);
        let _ = sys::munmap(g.raw, g.total);
    }
}
