//! Per-node destination pool: memory bound to a node and populated before the migration's
//! critical path needs it.
//!
//! Each (node, huge-page advice) pair has one current *chunk*: a large reservation of
//! virtual memory (`mmap` with `MAP_NORESERVE`), bound to the node with `mbind(MPOL_BIND)`
//! and given the huge-page advice of the folios it will receive (huge pages for huge folios,
//! base pages for the others). Destinations are handed
//! out from the front of the chunk in order, so that pieces moved out of it in address
//! order merge back into one mapping at their new home; each destination starts at the
//! offset modulo its alignment that the caller asks for (its source's, so that 2 MiB folios
//! stay PMD-mapped; see the pipeline's `prepare` for the one exception). Populating
//! (`MADV_POPULATE_WRITE`) is the expensive part: [`Pool::prefill`] does it ahead of time,
//! up to a bound, and [`Pool::take`] reports the time it had to spend itself.
//!
//! Populating writes every byte of the destination once (the kernel zeroes each page) before
//! the copy writes it again. Destinations of base pages can skip that: an *empty* chunk
//! ([`Key::empty`]) is registered in missing mode with a userfaultfd of the pool's, and its
//! destinations are handed out without pages; the copy then allocates each page on the
//! node and fills it in one step (`UFFDIO_COPY`, see [`crate::copy::Dst`]). The kernel's
//! `UFFDIO_COPY` installs base pages only, so huge-page destinations are populated.
//!
//! The pool owns its reservations, so it is one of the few modules allowed to unmap memory.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::lock::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::sys::uffd::Uffd;
use crate::sys::{self, Advice, HPAGE_SIZE};

/// Virtual size of a chunk; only the populated part costs memory.
const CHUNK_BYTES: usize = 1 << 30;
/// A chunk is reserved inaccessible and made read-write in steps of this many bytes as its
/// destinations are handed out or populated ahead ([`Chunk::open_to`]): a program's
/// `mlockall` populates every accessible mapping, and a gibibyte of pagemig's waiting to be
/// handed out had it killed for want of memory.
const OPEN_STEP: usize = 8 << 20;

/// The huge-page advice a destination carries: huge pages for huge folios, base pages for
/// the others ([`crate::Engine::reserve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThpAdvice {
    /// `MADV_HUGEPAGE`: destinations of huge folios.
    Huge,
    /// `MADV_NOHUGEPAGE`: destinations of base pages.
    NoHuge,
    /// No advice: the system-wide THP mode decides.
    Default,
}

/// Which destinations a chunk serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The node the memory is bound to.
    pub node: u32,
    /// The huge-page advice.
    pub thp: ThpAdvice,
    /// Destinations without pages, filled by `UFFDIO_COPY` (base pages only).
    pub empty: bool,
}

/// A destination handed out by [`Pool::take`]: populated memory on the key's node.
///
/// The receiver owns it: it moves its pages away and gives the range back with
/// [`Pool::release`].
///
/// # Invariants
/// The range was handed out by a pool and nothing else refers to it.
#[derive(Debug, PartialEq, Eq)]
pub struct Dest {
    addr: usize,
    len: usize,
    empty: bool,
    fresh: bool,
}

impl Dest {
    /// First byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the destination has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it was populated (zeroed) by the take that handed it out, just now: its
    /// lines may still be in the cache.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Whether it was handed out without pages, registered with the pool's userfaultfd
    /// ([`Pool::fill_uffd`]), to be filled by `UFFDIO_COPY`.
    pub fn unpopulated(&self) -> bool {
        self.empty
    }

    /// Splits into `[addr, addr + at)` and the rest.
    ///
    /// # Panics
    /// When `at` is past the end.
    pub fn split_at(self, at: usize) -> (Dest, Dest) {
        assert!(at <= self.len, "split at {at} past a destination of {} bytes", self.len);
        // INVARIANT: two disjoint parts of a range that was ours alone.
        let (empty, fresh) = (self.empty, self.fresh);
        (
            Dest { addr: self.addr, len: at, empty, fresh },
            Dest { addr: self.addr + at, len: self.len - at, empty, fresh },
        )
    }
}

#[derive(Debug)]
struct Chunk {
    /// One past the reservation's last byte.
    end: usize,
    /// Everything below was handed out or left as padding.
    cursor: usize,
    /// Everything from `cursor` up to here is populated.
    prepared_end: usize,
    /// Everything below is read-write; the rest of the reservation is inaccessible.
    open_end: usize,
    /// Padding skipped to keep alignment, still mapped and ours to unmap.
    holes: Vec<(usize, usize)>,
    /// The range past `prepared_end` a call's helper populates now, without the chunks
    /// lock ([`Pool::populate_ahead`]): not handed out, and the chunk not retired, until
    /// it is done.
    populating: Option<(usize, usize)>,
}

impl Chunk {
    fn new(key: Key, min_len: usize, uffd: Option<&Uffd>) -> Result<Self> {
        let len = min_len.max(CHUNK_BYTES).next_multiple_of(HPAGE_SIZE);
        let base = sys::mmap_reserve_aligned(len, HPAGE_SIZE).map_err(Error::sys("mmap (destination pool)"))?;
        // pagemig's own memory, never the program's: an agent migrating the program leaves it.
        crate::sys::own::claim(base, len);
        let mut chunk = Chunk {
            end: base + len,
            cursor: base,
            prepared_end: base,
            open_end: base,
            holes: Vec::new(),
            populating: None,
        };
        let setup = sys::mbind(base, len, key.node, false)
            .map_err(Error::sys("mbind (destination pool)"))
            .and_then(|()| {
                let advice = match key.thp {
                    ThpAdvice::Huge => Some(Advice::HugePage),
                    ThpAdvice::NoHuge => Some(Advice::NoHugePage),
                    ThpAdvice::Default => None,
                };
                advice.map_or(Ok(()), |a| sys::madvise(base, len, a).map_err(Error::sys("madvise (destination pool)")))
            })
            // A child forked while a destination waits would share its pages, and a shared
            // page cannot be moved into the source.
            .and_then(|()| sys::madvise(base, len, Advice::DontFork).map_err(Error::sys("madvise (destination pool)")))
            .and_then(|()| match (key.empty, uffd) {
                (false, _) => Ok(()),
                (true, Some(uffd)) => {
                    uffd.register_missing(base, len).map_err(Error::sys("userfaultfd register (destination pool)"))
                }
                (true, None) => Err(Error::sys("destination pool without a userfaultfd")(sys::Errno::OPNOTSUPP)),
            });
        if let Err(e) = setup {
            chunk.retire();
            return Err(e);
        }
        Ok(chunk)
    }

    /// Makes the reservation read-write up to `to` at least, whole [`OPEN_STEP`]s at a time
    /// (one `munlock` and one `mprotect` each time).
    fn open_to(&mut self, to: usize) -> std::result::Result<(), sys::Errno> {
        if to <= self.open_end {
            return Ok(());
        }
        let open = (self.open_end + (to - self.open_end).next_multiple_of(OPEN_STEP)).min(self.end);
        sys::open_reserved(self.open_end, open - self.open_end)?;
        self.open_end = open;
        Ok(())
    }

    /// Where a destination of `len` bytes congruent to `phase` modulo `align` would start.
    fn place(&self, len: usize, align: usize, phase: usize) -> Option<usize> {
        let mut addr = (self.cursor & !(align - 1)) + (phase & (align - 1));
        if addr < self.cursor {
            addr += align;
        }
        (addr.checked_add(len)? <= self.end).then_some(addr)
    }

    fn retire(&mut self) {
        for (start, len) in self.holes.drain(..).chain(std::iter::once((self.cursor, self.end - self.cursor))) {
            if len > 0 {
                // SAFETY: holes and the tail past the cursor were never handed out: they
                // belong to this chunk alone.
                let _ = unsafe { sys::munmap(start, len) };
            }
        }
        self.cursor = self.end;
        self.prepared_end = self.end;
    }
}

/// How a destination is populated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Populate {
    /// `MADV_POPULATE_WRITE`, a huge page's worth at a time: a node out of memory is an
    /// `ENOMEM` error. The kernel holds the mmap lock for each step, so an `mremap` on
    /// another thread waits for it.
    Madvise,
    /// A store to every base page: each fault takes only its mapping's lock, so moves on
    /// another thread go on meanwhile. A node out of memory is not an error but the OOM
    /// killer: only for destinations the node has ample free memory for.
    Touch,
}

/// The part of a destination taken with [`Pool::take_later`] that is still without pages:
/// its taker populates it, in address order, before writing any byte of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Unpopulated {
    /// Everything below is populated (or was prepared ahead).
    next: usize,
    end: usize,
}

impl Unpopulated {
    /// Nothing left to populate.
    pub const NONE: Unpopulated = Unpopulated { next: 0, end: 0 };

    /// Whether nothing is left to populate.
    pub fn is_done(&self) -> bool {
        self.next >= self.end
    }

    /// Populates what is left of the destination below `to` (`MADV_POPULATE_WRITE`, a huge
    /// page's worth at a time from `to` back: what is zeroed last is copied into first), and
    /// returns the time it took. Contents are never changed: populating a page that holds
    /// data already only faults it in.
    ///
    /// # Errors
    /// `ENOMEM` where the node cannot supply the memory: the part below `to` stays without
    /// some of its pages and counts as done (its folios must fail, never be written). The
    /// time is returned either way.
    pub fn populate_to(&mut self, to: usize) -> (Duration, std::result::Result<(), sys::Errno>) {
        let (from, to) = (self.next, to.min(self.end));
        if to <= from {
            return (Duration::ZERO, Ok(()));
        }
        self.next = to;
        let started = Instant::now();
        let populated = populate_backwards(from, to, Populate::Madvise);
        (started.elapsed(), populated)
    }
}

/// Populates `[from, end)` of the pool's own memory (a destination being taken) a huge
/// page's worth at a time, from its end back to its start: the call copies into the start
/// first, and what was zeroed last is still in the cache. 1 GiB of 2 MiB folios in one
/// batch, 5 pairs alternating with one `MADV_POPULATE_WRITE` of the whole destination
/// (2-core AMD EPYC VM): first folio 223 against 282 µs (medians), and the destination's
/// preparation 49-523 ms against 636-1459 ms (one big populate there met the VM's slow first
/// touch of host memory every time, the steps less often).
///
/// # Errors
/// The errno of the first step refused (`ENOMEM`): the range above that step is
/// populated, the rest not.
fn populate_backwards(from: usize, end: usize, populate: Populate) -> std::result::Result<(), sys::Errno> {
    let mut hi = end;
    while hi > from {
        let lo = ((hi - 1) & !(HPAGE_SIZE - 1)).max(from);
        match populate {
            Populate::Madvise => sys::madvise(lo, hi - lo, Advice::PopulateWrite)?,
            Populate::Touch => touch(lo, hi),
        }
        hi = lo;
    }
    Ok(())
}

/// Populates `[start, end)` of the pool's own memory with one store per base page.
fn touch(start: usize, end: usize) {
    let mut page = start;
    while page < end {
        // SAFETY: `[start, end)` lies in a chunk reservation of the pool, mapped read-write
        // and not yet handed out: nothing else refers to it. A byte of a fresh page is 0
        // already; storing 0 only makes the kernel allocate the page.
        unsafe { std::ptr::write_volatile(page as *mut u8, 0) };
        page += sys::PAGE_SIZE;
    }
}

/// The destination pools of every node.
#[derive(Debug)]
pub struct Pool {
    inner: Arc<Inner>,
    /// The reserve thread, started by the first [`Pool::reserve`].
    preparer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Inner {
    chunks: Mutex<HashMap<Key, Chunk>>,
    uffd: Option<Arc<Uffd>>,
    /// Bytes the reserve thread keeps populated ahead of use, per key.
    reserves: Mutex<HashMap<Key, usize>>,
    /// Wakes the reserve thread: a take consumed prepared memory, a reserve changed, or
    /// the pool is dropped.
    wake: Condvar,
    stop: AtomicBool,
    /// Migrations running now: the reserve thread tops up only between them, off their
    /// path (its populating would hold the memory map's lock against their moves).
    calls: std::sync::atomic::AtomicUsize,
    /// Signalled by every take: a call's helper waits on it ([`Pool::populate_ahead`]).
    taken: Condvar,
    /// Helpers populating ahead now ([`Pool::helper_started`]).
    helpers: std::sync::atomic::AtomicUsize,
    /// Destinations given back while calls or helpers ran, their pages freed already:
    /// unmapped when the last of them ends ([`Pool::release`]).
    spent: Mutex<Vec<(usize, usize)>>,
}

/// A helper populating ahead: made by [`Pool::helper_started`].
pub struct HelperGuard<'p> {
    pool: &'p Pool,
}

impl Drop for HelperGuard<'_> {
    fn drop(&mut self) {
        let inner = &self.pool.inner;
        inner.helpers.fetch_sub(1, Ordering::SeqCst);
        if !inner.deferring() {
            inner.unmap_spent();
        }
    }
}

/// A migration running: the reserve thread waits until it ends. Made by
/// [`Pool::call_started`].
pub struct CallGuard<'p> {
    pool: &'p Pool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let inner = &self.pool.inner;
        if inner.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            if !inner.deferring() {
                inner.unmap_spent();
            }
            let _reserves = inner.reserves.lock();
            inner.wake.notify_all();
        }
    }
}

/// What the reserve thread populates with the chunks lock held, at most: a take waits no
/// longer than this takes.
const RESERVE_STEP: usize = 8 << 20;

impl Pool {
    /// A pool of populated destinations only.
    #[cfg(test)]
    pub fn populated_only() -> Self {
        Self::make(None)
    }

    /// A pool that can also hand out empty destinations, registered with `uffd` (which
    /// must have a thread answering stray faults, as the engine's has).
    pub fn with_fill_uffd(uffd: Arc<Uffd>) -> Self {
        Self::make(Some(uffd))
    }

    fn make(uffd: Option<Arc<Uffd>>) -> Self {
        let inner = Inner {
            chunks: Mutex::new(HashMap::new()),
            uffd,
            reserves: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            calls: std::sync::atomic::AtomicUsize::new(0),
            helpers: std::sync::atomic::AtomicUsize::new(0),
            spent: Mutex::new(Vec::new()),
            taken: Condvar::new(),
        };
        Self { inner: Arc::new(inner), preparer: Mutex::new(None) }
    }

    /// The userfaultfd empty destinations are registered with: `UFFDIO_COPY` into them goes
    /// through it.
    pub fn fill_uffd(&self) -> Option<&Uffd> {
        self.inner.uffd.as_deref()
    }

    /// Takes a destination of `len` bytes whose address is congruent to `phase` modulo
    /// `align` (a power of two), populated unless `key.empty`, and returns it with the time
    /// spent populating it now (zero when it was prepared earlier).
    ///
    /// # Errors
    /// [`Error::Sys`] with `ENOMEM` when the node cannot supply the memory, or the errno of
    /// the failing `mmap`/`mbind`.
    pub fn take(
        &self,
        key: Key,
        len: usize,
        align: usize,
        phase: usize,
        populate: Populate,
    ) -> Result<(Dest, Duration)> {
        let (dest, spent, _) = self.inner.take(key, len, align, phase, Some(populate))?;
        Ok((dest, spent))
    }

    /// As [`Pool::take`], but the part of the destination not prepared ahead is left
    /// without pages, for its taker to populate piece by piece, each just before it writes
    /// it ([`Unpopulated::populate_to`]). A large destination populated whole before its
    /// first byte is copied is zeroed out of the cache, holds memory that its source does
    /// not give back until it moved, and, on a virtual machine whose host took back memory
    /// freed a while ago, meets the slow first touch of all of it (1 GiB of 2 MiB folios in
    /// one batch, 2-core AMD EPYC VM: preparation 1.2–1.9 s against 20–29 ms when each
    /// 2 MiB batch populated its own destination, re-using the huge pages the batch before
    /// freed).
    ///
    /// # Errors
    /// As [`Pool::take`], but never `ENOMEM` from populating: that comes from
    /// [`Unpopulated::populate_to`].
    pub fn take_later(&self, key: Key, len: usize, align: usize, phase: usize) -> Result<(Dest, Unpopulated)> {
        let (dest, _, later) = self.inner.take(key, len, align, phase, None)?;
        Ok((dest, later))
    }

    /// A call's helper: while `going`, keeps up to `ahead` bytes past `key`'s next
    /// destination populated ([`Pool::populate_ahead`], one huge page at a time), `budget`
    /// bytes at most; returns the bytes it populated. Destinations given back meanwhile
    /// are unmapped once it returns ([`Pool::helper_started`]); [`Pool::wake_helpers`]
    /// ends its wait for the next take.
    pub fn populate_ahead_while(&self, key: Key, ahead: usize, budget: usize, going: &AtomicBool) -> u64 {
        let _helper = self.helper_started();
        let mut left = budget;
        while left > 0 && going.load(Ordering::Relaxed) {
            left -= self.populate_ahead(key, ahead, HPAGE_SIZE.min(left), Duration::from_millis(5));
        }
        (budget - left) as u64
    }

    /// Populates up to `step` bytes more of `key`'s current chunk, so that up to `ahead`
    /// bytes past its next destination are ready (a call's helper, preparing the next
    /// batches' destinations while the call copies); returns the bytes populated now, 0
    /// when that much is ready already or `key` has no chunk yet, after waiting for the
    /// next take (`wait` at most). The step is populated without the chunks lock: a take
    /// of a destination before it goes on meanwhile, one overlapping it waits, and no
    /// chunk is retired until it is done.
    ///
    /// Populated by touching ([`Populate::Touch`]): only where the node has ample free
    /// memory for it.
    pub fn populate_ahead(&self, key: Key, ahead: usize, step: usize, wait: Duration) -> usize {
        if key.empty {
            return 0;
        }
        let mut chunks = self.inner.chunks.lock();
        let range = chunks.get(&key).map(|chunk| {
            let from = chunk.prepared_end.max(chunk.cursor);
            (from, chunk.cursor.saturating_add(ahead).min(chunk.end).min(from.saturating_add(step)))
        });
        // One helper populates a chunk at a time: a second (another call's, to the same
        // node) would take the same step, and ending first, clear `populating` while the
        // first still touched it, letting a take hand that out.
        let busy = chunks.get(&key).is_some_and(|chunk| chunk.populating.is_some());
        let Some((from, to)) = range.filter(|(from, to)| from < to && !busy) else {
            self.inner.taken.wait_for(&mut chunks, wait);
            return 0;
        };
        let chunk = chunks.get_mut(&key).expect("looked up above, under the same lock");
        if chunk.open_to(to).is_err() {
            // Refused (out of mappings or memory): not again at once.
            self.inner.taken.wait_for(&mut chunks, wait);
            return 0;
        }
        let id = chunk.end;
        chunk.populating = Some((from, to));
        // Touched, not `MADV_POPULATE_WRITE`: each fault takes only the chunk's mapping's
        // lock, so the call's `mmap`s, `munmap`s and registrations elsewhere go on. Without
        // the chunks lock, so that a take of a destination before it goes on too.
        crate::lock::MutexGuard::unlocked(&mut chunks, || touch(from, to));
        // The chunk is still there: nothing retires a chunk while it is populated.
        if let Some(chunk) = chunks.get_mut(&key).filter(|c| c.end == id) {
            chunk.prepared_end = chunk.prepared_end.max(to);
            chunk.populating = None;
        }
        self.inner.taken.notify_all();
        to - from
    }

    /// Wakes the helpers waiting in [`Pool::populate_ahead`] (their call is ending).
    pub fn wake_helpers(&self) {
        let _chunks = self.inner.chunks.lock();
        self.inner.taken.notify_all();
    }

    /// Marks a helper populating ahead ([`Pool::populate_ahead`]) until the guard drops:
    /// destinations given back meanwhile are unmapped only once no helper runs.
    pub fn helper_started(&self) -> HelperGuard<'_> {
        self.inner.helpers.fetch_add(1, Ordering::AcqRel);
        HelperGuard { pool: self }
    }

    /// Marks a migration running until the guard drops: the reserve thread does not top up
    /// meanwhile.
    pub fn call_started(&self) -> CallGuard<'_> {
        self.inner.calls.fetch_add(1, Ordering::AcqRel);
        CallGuard { pool: self }
    }

    /// Bytes populated and ready ahead of the next destinations of `key`.
    pub fn ready(&self, key: Key) -> usize {
        self.inner.chunks.lock().get(&key).map_or(0, |c| c.prepared_end.saturating_sub(c.cursor))
    }

    /// Bytes populated and ready on `node`, every key together.
    pub fn ready_on(&self, node: u32) -> usize {
        let chunks = self.inner.chunks.lock();
        chunks.iter().filter(|(k, _)| k.node == node).map(|(_, c)| c.prepared_end.saturating_sub(c.cursor)).sum()
    }

    /// Populates `bytes` ahead of the next destinations of `key` on this thread (what the
    /// reserve thread does between migrations). Returns the time spent.
    ///
    /// # Errors
    /// As [`Pool::take`].
    #[cfg(test)]
    pub fn prefill(&self, key: Key, bytes: usize) -> Result<Duration> {
        let started = Instant::now();
        while self.inner.prefill_step(key, bytes)? {}
        Ok(started.elapsed())
    }

    /// Keeps `bytes` populated ahead of the next destinations of `key` from now on, on a
    /// background thread that works between migrations, never during one (a *prepared reserve*: destinations a call takes from it cost the
    /// call nothing to prepare); `0` ends the reserve and gives back what it prepared and
    /// nothing took. The bytes are a memory budget: populated memory not yet handed out.
    /// Empty keys need no preparing and are refused.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty key; [`Error::Sys`] with `EAGAIN` when the thread
    /// cannot be started.
    pub fn reserve(&self, key: Key, bytes: usize) -> Result<()> {
        if key.empty {
            return Err(Error::Invalid("an empty destination needs no prepared reserve".into()));
        }
        {
            let mut preparer = self.preparer.lock();
            if preparer.is_none() && bytes > 0 {
                let inner = self.inner.clone();
                let handle = sys::thread::spawn("pagemig-reserve", move || inner.prepare_reserves())
                    .map_err(|_| Error::sys("reserve thread")(sys::Errno::AGAIN))?;
                *preparer = Some(handle);
            }
        }
        let mut reserves = self.inner.reserves.lock();
        if bytes == 0 {
            reserves.remove(&key);
            drop(reserves);
            let mut chunks = self.inner.chunks.lock();
            self.inner.settle(&mut chunks);
            if let Some(mut c) = chunks.remove(&key) {
                c.retire();
            }
        } else {
            reserves.insert(key, bytes.next_multiple_of(HPAGE_SIZE));
        }
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Waits until every reserve is populated in full or `timeout` passes; returns whether
    /// they are.
    pub fn wait_reserved(&self, timeout: Duration) -> bool {
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(1), Duration::from_millis(10)).within(timeout);
        loop {
            let reserves: Vec<(Key, usize)> = self.inner.reserves.lock().iter().map(|(k, b)| (*k, *b)).collect();
            if reserves.iter().all(|&(k, b)| self.ready(k) >= b) {
                return true;
            }
            if !backoff.pause() {
                return false;
            }
        }
    }

    /// Gives back a destination (or the part of it still in place) that was not moved.
    /// While a migration runs ([`Pool::call_started`]) or a helper populates ahead
    /// ([`Pool::helper_started`]), its pages are freed now (`MADV_DONTNEED`, under the
    /// memory map's lock for reading) and its range unmapped once the last of them ends,
    /// the ranges given back in a row in one `munmap`. An unmap takes the memory map's
    /// lock for writing: a thread of the program whose fault waited on a migration takes
    /// it for reading to try again, queued behind each such writer (a call of 4 KiB folios
    /// unmapped a destination per 2 MiB piece, on the mover, beside the program's
    /// faults). An unmap also splits the chunk's mapping, and so waits for every fault in
    /// it, a helper's too (the moves of a 2-MiB-batch call on the 16-core Intel Xeon VM
    /// took 83–113 ms/GiB instead of 13). A destination whose pages cannot be freed so
    /// (a locked one) is unmapped at once.
    pub fn release(&self, dest: Dest) {
        if dest.len == 0 {
            return;
        }
        let inner = &self.inner;
        // SAFETY: a `Dest` is only made by `take` and owns its range (type invariant); it
        // is consumed here, so nothing relies on its contents any more.
        if inner.deferring() && unsafe { sys::discard(dest.addr, dest.len) }.is_ok() {
            let mut spent = inner.spent.lock();
            match spent.last_mut() {
                Some(last) if last.0 + last.1 == dest.addr => last.1 += dest.len,
                _ => spent.push((dest.addr, dest.len)),
            }
            // Unmapped by the last guard to drop, unless that one dropped meanwhile.
            if inner.deferring() {
                return;
            }
            drop(spent);
            inner.unmap_spent();
            return;
        }
        // SAFETY: as above; the range is unmapped, and nothing refers to it afterwards.
        let _ = unsafe { sys::munmap(dest.addr, dest.len) };
    }

    /// Ends every reserve and unmaps every chunk's unused memory.
    pub fn clear(&self) {
        self.inner.reserves.lock().clear();
        let mut chunks = self.inner.chunks.lock();
        self.inner.settle(&mut chunks);
        for (_, mut c) in chunks.drain() {
            c.retire();
        }
    }
}

impl Inner {
    /// Whether a call or a helper runs: destinations given back are unmapped only once
    /// none does ([`Pool::release`]).
    fn deferring(&self) -> bool {
        self.helpers.load(Ordering::SeqCst) > 0 || self.calls.load(Ordering::SeqCst) > 0
    }

    /// Waits until no helper populates any chunk ([`Pool::populate_ahead`]).
    fn settle(&self, chunks: &mut crate::lock::MutexGuard<'_, HashMap<Key, Chunk>>) {
        while chunks.values().any(|c| c.populating.is_some()) {
            self.taken.wait(chunks);
        }
    }

    /// Unmaps the destinations given back during migrations ([`Pool::release`]).
    fn unmap_spent(&self) {
        let spent = std::mem::take(&mut *self.spent.lock());
        for (addr, len) in spent {
            // SAFETY: each range was a `Dest` given back to the pool (consumed by
            // `release`): nothing refers to it, and it was never handed out again.
            let _ = unsafe { sys::munmap(addr, len) };
        }
    }

    /// Takes a destination, populated with `populate`, or left for its taker to populate
    /// ([`Unpopulated`], the part not prepared ahead) where `populate` is `None`.
    fn take(
        &self,
        key: Key,
        len: usize,
        align: usize,
        phase: usize,
        populate: Option<Populate>,
    ) -> Result<(Dest, Duration, Unpopulated)> {
        debug_assert!(align.is_power_of_two() && len > 0);
        let mut chunks = self.chunks.lock();
        // A destination overlapping what a helper populates now, or a chunk to retire,
        // waits for it to be done.
        while chunks.get(&key).is_some_and(|c| {
            c.populating.is_some_and(|(from, to)| {
                c.place(len, align, phase).is_none_or(|addr| addr < to && from < addr + len)
            })
        }) {
            self.taken.wait(&mut chunks);
        }
        let chunk = match chunks.get_mut(&key) {
            Some(c) if c.place(len, align, phase).is_some() => c,
            _ => {
                let fresh = Chunk::new(key, len + align, self.uffd.as_deref())?;
                if let Some(mut old) = chunks.insert(key, fresh) {
                    old.retire();
                }
                chunks.get_mut(&key).expect("just inserted")
            }
        };
        let addr = chunk.place(len, align, phase).expect("a fresh chunk fits the request");
        if addr > chunk.cursor {
            chunk.holes.push((chunk.cursor, addr - chunk.cursor));
        }
        let end = addr + len;
        if let Err(errno) = chunk.open_to(end) {
            chunk.holes.push((addr, len));
            chunk.cursor = end;
            chunk.prepared_end = chunk.prepared_end.max(end);
            return Err(Error::sys("mprotect of a destination")(errno));
        }
        let started = Instant::now();
        let from = if key.empty { end } else { chunk.prepared_end.max(addr) };
        if let Some(populate) = populate.filter(|_| from < end) {
            let populated = populate_backwards(from, end, populate);
            if let Err(errno) = populated {
                // Give the whole piece back: part of it may be populated.
                chunk.holes.push((addr, len));
                chunk.cursor = end;
                chunk.prepared_end = end;
                return Err(Error::sys("madvise(MADV_POPULATE_WRITE) of a destination")(errno));
            }
        }
        chunk.cursor = end;
        chunk.prepared_end = chunk.prepared_end.max(end);
        self.taken.notify_all();
        let spent = if from < end && populate.is_some() { started.elapsed() } else { Duration::ZERO };
        let later = Unpopulated { next: if populate.is_some() { end } else { from }, end };
        // INVARIANT: `[addr, end)` was just carved from our reservation.
        Ok((Dest { addr, len, empty: key.empty, fresh: from < end }, spent, later))
    }

    /// Populates at most [`RESERVE_STEP`] more towards `bytes` ready ahead of `key`'s next
    /// destinations; returns whether there is more to do.
    fn prefill_step(&self, key: Key, bytes: usize) -> Result<bool> {
        if key.empty {
            return Ok(false);
        }
        let mut chunks = self.chunks.lock();
        self.settle(&mut chunks);
        if chunks.get(&key).is_none_or(|c| c.end - c.cursor < bytes) {
            let fresh = Chunk::new(key, bytes, self.uffd.as_deref())?;
            if let Some(mut old) = chunks.insert(key, fresh) {
                old.retire();
            }
        }
        let chunk = chunks.get_mut(&key).expect("present");
        let target = (chunk.cursor + bytes).min(chunk.end);
        if chunk.prepared_end >= target {
            return Ok(false);
        }
        let from = chunk.prepared_end.max(chunk.cursor);
        let to = (from + RESERVE_STEP).min(target);
        chunk.open_to(to).map_err(Error::sys("mprotect of the destination pool"))?;
        sys::madvise(from, to - from, Advice::PopulateWrite)
            .map_err(Error::sys("madvise(MADV_POPULATE_WRITE) of the destination pool"))?;
        chunk.prepared_end = to;
        Ok(to < target)
    }

    /// The reserve thread: tops every reserve up, step by step, while no migration runs,
    /// and sleeps until a migration ends or a reserve changes.
    fn prepare_reserves(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            if self.calls.load(Ordering::Acquire) > 0 {
                let mut reserves = self.reserves.lock();
                if self.calls.load(Ordering::Acquire) > 0 && !self.stop.load(Ordering::Relaxed) {
                    self.wake.wait_for(&mut reserves, Duration::from_millis(100));
                }
                continue;
            }
            let reserves: Vec<(Key, usize)> = self.reserves.lock().iter().map(|(k, b)| (*k, *b)).collect();
            let mut more = false;
            for (key, bytes) in reserves {
                // A node out of memory: the reserve stays short, and calls prepare their own.
                more |= self.prefill_step(key, bytes).unwrap_or(false);
            }
            if !more {
                let mut reserves = self.reserves.lock();
                if !self.stop.load(Ordering::Relaxed) {
                    self.wake.wait_for(&mut reserves, Duration::from_millis(100));
                }
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        {
            let _reserves = self.inner.reserves.lock();
            self.inner.wake.notify_all();
        }
        if let Some(h) = self.preparer.lock().take() {
            let _ = h.join();
        }
        self.clear();
        self.inner.unmap_spent();
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::watchdog;
    use super::*;

    #[test]
    fn destinations_keep_phase_and_follow_each_other() {
        watchdog(60, || {
            let pool = Pool::populated_only();
            let key = Key { node: crate::numa::memory_nodes().unwrap()[0], thp: ThpAdvice::Default, empty: false };
            let (a, _) = pool.take(key, 8192, 4096, 0, Populate::Madvise).unwrap();
            let (b, _) = pool.take(key, 4096, 4096, 0, Populate::Touch).unwrap();
            assert_eq!(b.addr, a.addr + 8192);
            let (c, _) = pool.take(key, HPAGE_SIZE, HPAGE_SIZE, 0, Populate::Madvise).unwrap();
            assert_eq!(c.addr % HPAGE_SIZE, 0);
            let (d, _) = pool.take(key, 4096, 65536, 0x3000, Populate::Touch).unwrap();
            assert_eq!(d.addr % 65536, 0x3000);
            let (d1, d2) = d.split_at(0);
            assert!(d1.is_empty() && d2.len() == 4096);
            let nodes = crate::numa::page_nodes(a.addr, 8192).unwrap();
            assert!(nodes.iter().all(|&n| n == key.node as i32), "{nodes:?}");
            for dest in [a, b, c, d1, d2] {
                pool.release(dest);
            }
        });
    }

    fn fill(d: &Dest, byte: u8) {
        // SAFETY: a destination this test took: ours alone, mapped read-write.
        unsafe { std::ptr::write_bytes(d.addr as *mut u8, byte, d.len) };
    }

    fn holds(d: &Dest, byte: u8) -> bool {
        // SAFETY: as in `fill`; only read.
        unsafe { std::slice::from_raw_parts(d.addr as *const u8, d.len) }.iter().all(|&b| b == byte)
    }

    fn key() -> Key {
        Key { node: crate::numa::memory_nodes().unwrap()[0], thp: ThpAdvice::NoHuge, empty: false }
    }

    /// A destination is populated whole, edges included, whichever way and whatever its
    /// offset within a huge page (it is populated a huge page at a time, back to front), and
    /// one advised huge gets huge pages where the kernel has them.
    #[test]
    fn destinations_are_populated_whole_back_to_front() {
        watchdog(60, || {
            let pool = Pool::populated_only();
            for (thp, populate) in [
                (ThpAdvice::Huge, Populate::Madvise),
                (ThpAdvice::Huge, Populate::Touch),
                (ThpAdvice::NoHuge, Populate::Madvise),
            ] {
                let key = Key { thp, ..key() };
                // Three huge pages and a quarter, starting 12 KiB into a huge page.
                let len = 3 * HPAGE_SIZE + HPAGE_SIZE / 4;
                let (d, spent) = pool.take(key, len, HPAGE_SIZE, 0x3000, populate).unwrap();
                assert_eq!(d.addr % HPAGE_SIZE, 0x3000);
                assert!(spent > Duration::ZERO && d.fresh());
                let frames = crate::numa::page_frames(d.addr, len).unwrap();
                let missing: Vec<usize> = (0..frames.len()).filter(|&i| frames[i].is_none()).collect();
                assert!(missing.is_empty(), "{thp:?} {populate:?}: pages {missing:?} of {} not populated", frames.len());
                let huge = crate::sys::huge_ranges(d.addr, d.addr + len).unwrap();
                if thp == ThpAdvice::NoHuge {
                    assert!(huge.is_empty(), "{huge:x?}");
                }
                pool.release(d);
            }
        });
    }

    /// A helper's populating readies the next destinations (taken at no cost) and never
    /// writes one handed out.
    #[test]
    fn populate_ahead_readies_what_comes_next() {
        watchdog(60, || {
            let pool = Pool::populated_only();
            let key = key();
            // No chunk yet: nothing to do.
            assert_eq!(pool.populate_ahead(key, 4 << 20, 1 << 20, Duration::ZERO), 0);
            let (a, _) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
            fill(&a, 0xab);
            let mut ahead = 0;
            loop {
                match pool.populate_ahead(key, 4 << 20, 1 << 20, Duration::ZERO) {
                    0 => break,
                    n => ahead += n,
                }
            }
            assert_eq!(ahead, 4 << 20);
            assert_eq!(pool.ready(key), 4 << 20);
            assert!(holds(&a, 0xab));
            let (b, spent) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
            assert_eq!(spent, Duration::ZERO);
            assert!(!b.fresh());
            let present = crate::numa::page_frames(b.addr, b.len).unwrap();
            assert!(present.iter().all(Option::is_some), "{present:?}");
            pool.release(a);
            pool.release(b);
        });
    }

    /// A helper populating all along while destinations are taken, written at once, and the
    /// chunk retired twice (`clear`) and made again: no destination loses a byte (a take that
    /// overlaps the helper's step waits for it, and the retirement too).
    #[test]
    fn a_helper_never_writes_what_was_taken() {
        watchdog(60, || {
            let pool = Pool::populated_only();
            let key = key();
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let _helper = pool.helper_started();
                    while !stop.load(Ordering::Relaxed) {
                        pool.populate_ahead(key, 8 << 20, 256 << 10, Duration::from_millis(1));
                    }
                });
                let mut taken = Vec::new();
                for i in 0..96u32 {
                    let (d, _) = pool.take(key, 256 << 10, 4096, 0, Populate::Madvise).unwrap();
                    fill(&d, i as u8 + 1);
                    taken.push(d);
                    if i % 40 == 39 {
                        pool.clear();
                    }
                }
                stop.store(true, Ordering::Relaxed);
                pool.wake_helpers();
                for (i, d) in taken.iter().enumerate() {
                    assert!(holds(d, i as u8 + 1), "destination {i} was written");
                }
                for d in taken {
                    pool.release(d);
                }
        });
        });
    }

    /// Two calls' helpers populating the same chunk at once (calls to one node run side by
    /// side), while destinations are taken and written at once: neither writes one handed
    /// out. A second helper once took the same step as the first and, ending first, let a
    /// take hand out what the first was still touching: the program's moved data lost the
    /// first byte of its pages.
    #[test]
    fn helpers_side_by_side_never_write_what_was_taken() {
        watchdog(120, || {
            let pool = Pool::populated_only();
            let key = key();
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        let _helper = pool.helper_started();
                        while !stop.load(Ordering::Relaxed) {
                            pool.populate_ahead(key, 32 << 20, HPAGE_SIZE, Duration::from_millis(1));
                        }
                    });
                }
                let mut taken = Vec::new();
                let mut written = Vec::new();
                for i in 0..1600u32 {
                    let (d, _) = pool.take(key, 512 << 10, 4096, 0, Populate::Madvise).unwrap();
                    fill(&d, (i % 250) as u8 + 1);
                    taken.push((i, d));
                    if taken.len() > 16 || i == 1599 {
                        if i == 1599 {
                            stop.store(true, Ordering::Relaxed);
                            pool.wake_helpers();
                        }
                        for (i, d) in taken.drain(..) {
                            if !holds(&d, (i % 250) as u8 + 1) {
                                written.push(i);
                            }
                            pool.release(d);
                        }
                    }
                }
                assert!(written.is_empty(), "destinations {written:?} were written");
            });
        });
    }

    /// While a helper or a call runs, a destination given back keeps its range mapped (its
    /// pages freed) until the last of them ends: its unmap would wait for the helper's
    /// faults, and hold back the program's.
    #[test]
    fn destinations_given_back_beside_a_helper_are_unmapped_after_it() {
        watchdog(60, || {
            let pool = Pool::populated_only();
            let key = key();
            let mapped = |addr: usize| crate::maps::vmas().unwrap().iter().any(|v| v.start <= addr && addr < v.end);
            let (a, _) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
            let addr = a.addr;
            let helper = pool.helper_started();
            pool.release(a);
            assert!(mapped(addr));
            assert!(crate::numa::page_frames(addr, 1 << 20).unwrap().iter().all(Option::is_none));
            drop(helper);
            assert!(!mapped(addr));
            // During a call too, and with a helper beside it, until both end.
            let (c, _) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
            let (d, _) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
            let (c_addr, d_addr) = (c.addr, d.addr);
            let call = pool.call_started();
            pool.release(c);
            assert!(mapped(c_addr));
            assert!(crate::numa::page_frames(c_addr, 1 << 20).unwrap().iter().all(Option::is_none));
            let helper = pool.helper_started();
            drop(call);
            pool.release(d);
            assert!(mapped(c_addr) && mapped(d_addr));
            drop(helper);
            assert!(!mapped(c_addr) && !mapped(d_addr));
            // Without a call or a helper, at once.
            let (b, _) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
            let addr = b.addr;
            pool.release(b);
            assert!(!mapped(addr));
        });
    }

    /// A destination taken to be populated later has no pages past what was prepared
    /// ahead; each `populate_to` populates exactly what lies between the last one and its
    /// bound (never past the end), and the destination's bytes are zero.
    #[test]
    fn a_destination_taken_later_is_populated_piece_by_piece() {
        watchdog(60, || {
            let pool = Pool::populated_only();
            // Base pages: a huge page would populate past the bound.
            let key = key();
            let present = |d: &Dest| -> Vec<bool> {
                crate::numa::page_frames(d.addr, d.len).unwrap().iter().map(Option::is_some).collect()
            };
            // Prepared ahead: the first 3 MiB of the next destination.
            pool.prefill(key, 3 << 20).unwrap();
            let len = 8 * HPAGE_SIZE + 0x5000;
            let (d, mut later) = pool.take_later(key, len, 4096, 0x5000).unwrap();
            assert!(d.fresh() && !d.unpopulated() && !later.is_done());
            let mut populated = present(&d).iter().take_while(|&&p| p).count();
            assert!(populated > 0 && present(&d)[populated..].iter().all(|&p| !p), "{populated} pages prepared ahead");
            for to in [HPAGE_SIZE, 5 * HPAGE_SIZE + 0x3000, 2 * HPAGE_SIZE, len + HPAGE_SIZE] {
                assert!(later.populate_to(d.addr + to).1.is_ok());
                populated = populated.max(to.min(len) / sys::PAGE_SIZE);
                let now = present(&d);
                assert!(now[..populated].iter().all(|&p| p), "populated up to {to:#x}");
                assert!(now[populated..].iter().all(|&p| !p), "nothing past {to:#x}");
            }
            assert!(later.is_done());
            assert_eq!(later.populate_to(d.addr + len), (Duration::ZERO, Ok(())));
            // SAFETY: the destination is ours and populated whole.
            let bytes = unsafe { std::slice::from_raw_parts(d.addr as *const u8, len) };
            assert!(bytes.iter().all(|&b| b == 0));
            pool.release(d);
            // Prepared ahead whole: nothing left to populate.
            pool.prefill(key, 1 << 20).unwrap();
            let (e, later) = pool.take_later(key, 1 << 20, 4096, 0).unwrap();
            assert!(later.is_done() && present(&e).iter().all(|&p| p));
            pool.release(e);
        });
    }

    #[test]
    fn prefill_makes_take_free() {
        watchdog(60, || {
            let pool = Pool::populated_only();
            let key = Key { node: crate::numa::memory_nodes().unwrap()[0], thp: ThpAdvice::NoHuge, empty: false };
            pool.prefill(key, 4 << 20).unwrap();
            let (d, spent) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
            assert_eq!(spent, Duration::ZERO);
            pool.release(d);
        });
    }
}
