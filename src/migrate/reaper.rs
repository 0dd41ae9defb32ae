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

use crate::lock::{Condvar, Mutex};

use super::zerofill;
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
    /// May be kept for a later reservation once freed ([`Kept`]): not locked.
    keep: bool,
    /// Made for huge pages (kept, it is given to huge pages only).
    huge: bool,
    /// [`zerofill::answers`] before it was mapped.
    epoch: u64,
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
        let Grave { keep, huge, epoch, .. } = self;
        (
            Grave { addr: self.addr, len: at, keep, huge, epoch },
            Grave { addr: self.addr + at, len: self.len - at, keep, huge, epoch },
        )
    }
}

/// Graveyards freed of their pages and kept mapped and registered for the next
/// [`Reaper::reserve`] of the same length, phase and kind: making one and unmapping it
/// take the mmap lock for writing six times, and a thread of the program whose fault
/// waited on a migration takes the mmap lock to try again, queued behind every such writer.
/// A call of 2 MiB pieces makes and frees a graveyard per piece (per huge page, at the
/// default batch: kept, calls of 1 GiB of huge pages went 1.07x faster, the first call of
/// a process 1.12x, 12 alternating pairs of processes against 1.01x between two copies of
/// the same build, 2-core AMD EPYC VM).
///
/// Graveyards of base pages are given to base pages again: the page tables they were given
/// stay after the discard. A huge page moved into a range with a page table is split (the
/// kernel splits it rather than move it whole), so a graveyard of huge pages is kept only
/// where the kernel frees the page table a discard empties ([`huge_graves_reusable`]: a
/// graveyard a huge folio mapped by base pages was moved into has one), and given to huge
/// pages again only while no fault was answered with a page of zeros since it was made
/// ([`zerofill::answers`]: a stranger's read of pagemig's mappings, which may have been
/// this graveyard after its discard, or a touch of memory a call left registered). When
/// full, the oldest makes room.
#[derive(Debug, Default)]
struct Kept {
    /// Oldest first.
    graves: Vec<Grave>,
    /// How many reservations took a kept graveyard.
    reused: u64,
}

impl Kept {
    /// The most graveyards kept: a call's pieces in flight (the mover's queue, the one
    /// copied, the one the reaper frees) with room to spare.
    const MAX: usize = 8;

    /// The latest kept graveyard of `len` bytes starting at `phase` modulo 2 MiB, of the
    /// kind asked for, if any (those asked for no more age out: a full list gives up its
    /// oldest); the graveyards of huge pages no longer fit for them
    /// ([`Grave::fit_for_huge_pages`]) are moved into `stale`.
    fn take(&mut self, len: usize, phase: usize, huge: bool, stale: &mut Vec<Grave>) -> Option<Grave> {
        // Nothing allocated on this path of every piece, unless some are stale.
        let mut i = 0;
        while i < self.graves.len() {
            if self.graves[i].huge && !self.graves[i].fit_for_huge_pages() {
                stale.push(self.graves.remove(i));
            } else {
                i += 1;
            }
        }
        let at = self
            .graves
            .iter()
            .rposition(|g| g.len == len && g.huge == huge && g.addr % sys::HPAGE_SIZE == phase % sys::HPAGE_SIZE)?;
        self.reused += 1;
        Some(self.graves.remove(at))
    }
}

impl Grave {
    /// Whether no fault was answered with a page of zeros in pagemig's mappings since this
    /// graveyard was made (see [`Kept`]).
    fn fit_for_huge_pages(&self) -> bool {
        zerofill::answers() == self.epoch
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
    /// ([`reserve`]), or, not locked, takes one kept for the same kind of pages ([`Kept`]).
    ///
    /// # Errors
    /// The errno of mapping, registering or locking it.
    pub fn reserve(&self, len: usize, phase: usize, locked: bool, base_pages: bool) -> Result<Grave, Errno> {
        let (keep, huge) = (!locked, !base_pages);
        if keep {
            let mut stale = Vec::new();
            let kept = self.kept.lock().take(len, phase, huge, &mut stale);
            for g in stale {
                free(&self.uffd, &g);
            }
            // Unlocked, as its source is (a program's `mlockall` since may have locked it:
            // a move needs both alike).
            if let Some(g) = kept {
                if sys::munlock(g.addr, g.len).is_ok() {
                    return Ok(g);
                }
                free(&self.uffd, &g);
            }
        }
        // Read before the graveyard exists: any answer in it comes after.
        let epoch = zerofill::answers();
        let mut g = reserve(&self.uffd, len, phase, locked)?;
        g.keep = keep;
        g.huge = huge;
        g.epoch = epoch;
        Ok(g)
    }

    /// The graveyards kept now, of base pages and of huge pages, and how many
    /// reservations took a kept one so far.
    #[cfg(any(test, feature = "internals"))]
    pub fn kept(&self) -> (usize, usize, u64) {
        let k = self.kept.lock();
        let huge = k.graves.iter().filter(|g| g.huge).count();
        (k.graves.len() - huge, huge, k.reused)
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
            // A `drain` or another `bury` waiting on the count sees it fall.
            cv.notify_all();
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
/// made for huge pages where the kernel would leave it a page table, or a stranger's fault
/// may have given it one.
fn free_or_keep(uffd: &Uffd, kept: &Mutex<Kept>, g: Grave) {
    if !g.keep || g.huge && !(g.fit_for_huge_pages() && huge_graves_reusable(uffd)) {
        free(uffd, &g);
        return;
    }
    // SAFETY: a graveyard holds only pages moved out of replaced sources, or nothing; it is
    // ours alone (type invariant). It stays registered: the graveyards' userfaultfd hears
    // of no purge, so the discard raises no event. Under the mmap read lock.
    let _ = unsafe { sys::discard(g.addr, g.len) };
    // The oldest kept graveyard makes room: the latest are likelier to be asked for again
    // (the pieces of a large batch of huge pages, 2, 2, 4, 8 MiB…, are not, as a run's
    // graveyard is asked for whole).
    let mut k = kept.lock();
    let evicted = (k.graves.len() >= Kept::MAX).then(|| k.graves.remove(0));
    k.graves.push(g);
    drop(k);
    if let Some(old) = evicted {
        free(uffd, &old);
    }
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
    // Reserved inaccessible, then opened: a program's `mlockall(MCL_FUTURE)` would have a
    // read-write mapping populated whole as it is made, and a graveyard must be empty.
    let raw = sys::reserve(total)?;
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
    // INVARIANT: a fresh private anonymous mapping of ours, read-write once opened.
    let grave = Grave { addr: g, len, keep: false, huge: false, epoch: 0 };
    // Not inherited by a child: its pages stay this process's own (movable back).
    let setup = sys::open_reserved(g, len)
        .and_then(|()| sys::madvise(g, len, sys::Advice::NoHugePage))
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

/// Whether the kernel frees a page table that `MADV_DONTNEED` empties
/// (`CONFIG_PT_RECLAIM`), so that a graveyard of huge pages, discarded, takes a huge page
/// whole again even where a base page lay in it before ([`Kept`]). Found out on memory of
/// the process's own, once it could be: a graveyard given one page (and so a page table),
/// then discarded, then given a huge page of a fresh mapping, which must arrive whole (as
/// `PAGEMAP_SCAN` sees it: a few system calls and one huge page populated, on whichever
/// thread first frees a graveyard of huge pages). Where no huge page can be had to try
/// with or a system call fails, no for now, tried again the next few times. Racing threads
/// may both find out (no lock: a `fork` meanwhile leaves none held).
fn huge_graves_reusable(uffd: &Uffd) -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    /// How many times an experiment that could not be made is tried again.
    const TRIES: u8 = 3;
    /// 0 ..= TRIES: experiments that could not be made so far; YES; NO.
    const YES: u8 = 100;
    const NO: u8 = 101;
    static REUSABLE: AtomicU8 = AtomicU8::new(0);
    match REUSABLE.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        tried if tried >= TRIES => false,
        tried => {
            let found = page_tables_reclaimed(uffd);
            let next = match found {
                Some(true) => YES,
                Some(false) => NO,
                None => tried + 1,
            };
            REUSABLE.store(next, Ordering::Relaxed);
            found == Some(true)
        }
    }
}

/// The experiment of [`huge_graves_reusable`]: `None` where it could not be made (no huge
/// page to try with, or a system call failed).
fn page_tables_reclaimed(uffd: &Uffd) -> Option<bool> {
    const HUGE: usize = sys::HPAGE_SIZE;
    let whole = |at: usize| sys::huge_ranges(at, at + HUGE).ok().map(|r| r == [(at, at + HUGE)]);
    let grave = reserve(uffd, HUGE, 0, false).ok()?;
    let found = (|| {
        // SAFETY: `grave` is a fresh graveyard of ours, registered with `uffd`, that nothing
        // else knows of; the page of zeros is a static.
        unsafe { uffd.copy(grave.addr, zerofill::zero_page(), sys::PAGE_SIZE) }.ok()?;
        // SAFETY: as above; its one page is ours to drop.
        unsafe { sys::discard(grave.addr, HUGE) }.ok()?;
        let source = sys::mmap_anon_aligned(HUGE, HUGE).ok()?;
        crate::sys::own::claim(source, HUGE);
        let moved_whole = (|| {
            // Not shared with a child forked meanwhile (a shared page does not move).
            sys::madvise(source, HUGE, sys::Advice::DontFork).ok()?;
            sys::madvise(source, HUGE, sys::Advice::HugePage).ok()?;
            sys::madvise(source, HUGE, sys::Advice::PopulateWrite).ok()?;
            if !whole(source)? {
                return None;
            }
            // SAFETY: both ranges are fresh mappings of ours that nothing else knows of;
            // the graveyard is empty again, registered with `uffd`.
            unsafe { uffd.move_pages(grave.addr, source, HUGE) }.ok()?;
            whole(grave.addr)
        })();
        // SAFETY: the source is ours and nothing uses it any more.
        let _ = unsafe { sys::munmap(source, HUGE) };
        moved_whole
    })();
    free(uffd, &grave);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CONFIG_PT_RECLAIM` of the running kernel, where its configuration can be read
    /// (`/proc/config.gz` through `zcat`, or `/boot/config-<release>`).
    fn pt_reclaim_configured() -> Option<bool> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let text = std::process::Command::new("zcat")
            .arg("/proc/config.gz")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .or_else(|| std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok())?;
        Some(text.lines().any(|l| l == "CONFIG_PT_RECLAIM=y"))
    }

    /// The experiment finds what the kernel was built with: a huge page moved into a
    /// discarded graveyard that held a base page arrives whole exactly where the kernel
    /// frees emptied page tables.
    #[test]
    fn the_experiment_finds_whether_the_kernel_frees_emptied_page_tables() {
        let uffd = Uffd::open_for_moves().unwrap();
        match (page_tables_reclaimed(&uffd), pt_reclaim_configured()) {
            (Some(found), Some(configured)) => assert_eq!(found, configured),
            (found, configured) => {
                eprintln!("not compared: found {found:?}, configured {configured:?} (no huge page, or no config)")
            }
        }
    }
}
