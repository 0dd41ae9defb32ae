//! Graveyards for replaced source pages, and the thread that frees them.
//!
//! Before a run is copied, its old pages are moved out of the source (`UFFDIO_MOVE`) into a
//! *graveyard*: a mapping of ours, registered in missing mode (a move needs a registered
//! destination) with a userfaultfd of its own, and kept at the source's offset modulo 2 MiB
//! so that huge pages move whole. A graveyard may be mapped where the program just unmapped
//! a source; its own userfaultfd keeps every move into a source from landing in it. Before it is freed it is unregistered, so that freeing it
//! raises no event. The copy reads the graveyard; once the new pages are in the source, the
//! graveyard's pages are garbage. Freeing them — the expensive part of replacing base pages
//! — happens on this background thread with `MADV_DONTNEED`, which holds the mmap lock only
//! for reading, while the next run is copied. The backlog is bounded: past `limit` bytes the
//! move phase waits for the reaper.
#![allow(unsafe_code)]

use std::sync::Arc;

use std::sync::mpsc::{Sender, channel};

use parking_lot::{Condvar, Mutex};

use crate::sys::{self, Errno, uffd::Uffd};

/// A graveyard: a range of ours that receives a run's old pages.
///
/// # Invariants
/// The range was mapped by [`Reaper::reserve`], read-write, private and anonymous; nothing
/// but the migration it was made for refers to it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Grave {
    addr: usize,
    len: usize,
    /// May be kept for a later reservation once freed ([`Kept`]): not locked, and made
    /// for base pages only.
    keep: bool,
}

impl Grave {
    /// First byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Splits into `[addr, addr + at)` and the rest.
    ///
    /// # Panics
    /// When `at` is past the end.
    pub fn split_at(self, at: usize) -> (Grave, Grave) {
        assert!(at <= self.len, "split at {at} past a graveyard of {} bytes", self.len);
        // INVARIANT: two disjoint parts of a range that was ours alone.
        let keep = self.keep;
        (Grave { addr: self.addr, len: at, keep }, Grave { addr: self.addr + at, len: self.len - at, keep })
    }
}

/// Graveyards freed of their pages and kept mapped and registered for the next
/// [`Reaper::reserve`] of the same length and phase: making one and unmapping it take the
/// mmap lock for writing six times, and a thread of the program whose fault waited on a
/// migration takes the mmap lock to try again, queued behind every such writer. A call of
/// 2 MiB pieces makes and frees a graveyard per piece.
///
/// Only graveyards of base pages are kept, and given to base pages again: the page tables
/// they were given stay after the discard, and a huge page moved into a range with a page
/// table is split (a graveyard that only ever took huge pages has none, but one a stranger's
/// read faulted into has).
#[derive(Debug, Default)]
struct Kept {
    graves: Vec<Grave>,
}

impl Kept {
    /// The most graveyards kept: a call's pieces in flight (the mover's queue, the one
    /// copied, the one the reaper frees) with room to spare.
    const MAX: usize = 8;

    /// A kept graveyard of `len` bytes starting at `phase` modulo 2 MiB, if any.
    fn take(&mut self, len: usize, phase: usize) -> Option<Grave> {
        let at =
            self.graves.iter().position(|g| g.len == len && g.addr % sys::HPAGE_SIZE == phase % sys::HPAGE_SIZE)?;
        Some(self.graves.swap_remove(at))
    }
}

/// The background thread that frees graveyards.
pub(super) struct Reaper {
    uffd: Arc<Uffd>,
    kept: Arc<Mutex<Kept>>,
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
    /// Starts the thread, with at most `limit` bytes waiting to be freed, for graveyards
    /// registered with `uffd`.
    pub fn new(uffd: Arc<Uffd>, limit: usize) -> Self {
        let (tx, rx) = channel::<Grave>();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let p = pending.clone();
        let u = uffd.clone();
        let kept = Arc::new(Mutex::new(Kept::default()));
        let k = kept.clone();
        crate::sys::thread::spawn("pagemig-reaper", move || {
            for g in rx {
                let len = g.len;
                free_or_keep(&u, &k, g);
                let (lock, cv) = &*p;
                *lock.lock() -= len;
                cv.notify_all();
            }
            // The reaper is gone: nothing will reserve a kept graveyard again.
            free_kept(&u, &k);
        })
        .expect("spawn the reaper thread");
        Self { uffd, kept, tx: Mutex::new(tx), pending, limit }
    }

    /// Maps a graveyard of `len` bytes whose start is congruent to `phase` modulo 2 MiB
    /// ([`reserve`]), or, for `base_pages` not locked, takes one kept ([`Kept`]).
    ///
    /// # Errors
    /// The errno of mapping, registering or locking it.
    pub fn reserve(&self, len: usize, phase: usize, locked: bool, base_pages: bool) -> Result<Grave, Errno> {
        let keep = !locked && base_pages;
        if keep && let Some(g) = self.kept.lock().take(len, phase) {
            return Ok(g);
        }
        let mut g = reserve(&self.uffd, len, phase, locked)?;
        g.keep = keep;
        Ok(g)
    }

    /// The userfaultfd graveyards are registered with: moves into a graveyard go through it.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Hands a graveyard to the thread, first waiting while the backlog is over the limit.
    pub fn bury(&self, g: Grave) {
        if g.len == 0 {
            return;
        }
        let (lock, cv) = &*self.pending;
        let mut pending = lock.lock();
        while *pending > self.limit {
            cv.wait(&mut pending);
        }
        *pending += g.len;
        drop(pending);
        if let Err(e) = self.tx.lock().send(g) {
            let g = e.0;
            let len = g.len;
            free_or_keep(&self.uffd, &self.kept, g);
            *lock.lock() -= len;
        }
    }

    /// Frees a graveyard on the calling thread.
    pub fn free_now(&self, g: Grave) {
        if g.len > 0 {
            free_or_keep(&self.uffd, &self.kept, g);
        }
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

impl Drop for Reaper {
    fn drop(&mut self) {
        // What the thread keeps after this is freed as it ends.
        free_kept(&self.uffd, &self.kept);
    }
}

/// Frees the pages of `g`, then keeps it for a later reservation where there is room
/// ([`Kept`]), or frees it whole. A locked graveyard is not kept (few sources are), nor one
/// made for huge pages.
fn free_or_keep(uffd: &Uffd, kept: &Mutex<Kept>, g: Grave) {
    if !g.keep {
        free(uffd, &g);
        return;
    }
    // SAFETY: a graveyard holds only pages moved out of replaced sources, or nothing; it is
    // ours alone (type invariant). It stays registered: the graveyards' userfaultfd hears
    // of no purge, so the discard raises no event. Under the mmap read lock.
    let _ = unsafe { sys::discard(g.addr, g.len) };
    let mut k = kept.lock();
    if k.graves.len() < Kept::MAX {
        k.graves.push(g);
        return;
    }
    drop(k);
    free(uffd, &g);
}

/// Frees every kept graveyard.
fn free_kept(uffd: &Uffd, kept: &Mutex<Kept>) {
    let graves = std::mem::take(&mut kept.lock().graves);
    for g in graves {
        free(uffd, &g);
    }
}

/// Maps a graveyard of `len` bytes whose start is congruent to `phase` modulo 2 MiB, so
/// that moving pages into it moves whole page tables, registered in missing mode with
/// `uffd` (the graveyards' userfaultfd), locked on fault where the source is locked (a
/// move needs both alike). Registered with that userfaultfd, it cannot be registered with
/// the program's (`EBUSY`), whatever range a migration registers later.
///
/// # Errors
/// The errno of mapping, registering or locking it.
pub(super) fn reserve(uffd: &Uffd, len: usize, phase: usize, locked: bool) -> Result<Grave, Errno> {
    let total = len + sys::HPAGE_SIZE;
    let raw = sys::mmap_anon(total)?;
    // pagemig's own memory (the padding unmapped below is disclaimed with it).
    crate::sys::own::claim(raw, total);
    let mut g = (raw & !(sys::HPAGE_SIZE - 1)) + (phase & (sys::HPAGE_SIZE - 1));
    if g < raw {
        g += sys::HPAGE_SIZE;
    }
    // SAFETY: the padding on either side lies in the mapping just made, which nothing
    // else knows of.
    unsafe {
        if g > raw {
            let _ = sys::munmap(raw, g - raw);
        }
        if raw + total > g + len {
            let _ = sys::munmap(g + len, raw + total - (g + len));
        }
    }
    // INVARIANT: a fresh private anonymous read-write mapping of ours.
    let grave = Grave { addr: g, len, keep: false };
    // Not inherited by a child: its pages stay this process's own (movable back).
    let setup = sys::madvise(g, len, sys::Advice::NoHugePage)
        .and_then(|()| sys::madvise(g, len, sys::Advice::DontFork))
        .and_then(|()| uffd.register_missing(g, len))
        .and_then(|()| if locked { sys::mlock_onfault(g, len) } else { Ok(()) });
    if let Err(e) = setup {
        free(uffd, &grave);
        return Err(e);
    }
    Ok(grave)
}

/// Frees a graveyard registered with `uffd`.
pub(super) fn free(uffd: &Uffd, g: &Grave) {
    // Unregistered first (missing mode alone: no page walk), so the discard raises no event.
    let _ = uffd.unregister(g.addr, g.len);
    // SAFETY: a graveyard holds only pages moved out of replaced sources, or nothing; it is
    // ours alone (type invariant). Discarding first frees the pages under the mmap read
    // lock; the unmap that follows finds nothing to free.
    unsafe {
        let _ = sys::discard(g.addr, g.len);
        let _ = sys::munmap(g.addr, g.len);
    }
}
