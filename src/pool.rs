//! Per-node destination pool: memory bound to a node and populated before the migration's
//! critical path needs it.
//!
//! Each (node, huge-page advice) pair has one current *chunk*: a large reservation of
//! virtual memory (`mmap` with `MAP_NORESERVE`), bound to the node with `mbind(MPOL_BIND)`
//! and given the huge-page advice of the memory it will replace. Destinations are handed
//! out from the front of the chunk in order, so that pieces moved out of it in address
//! order merge back into one mapping at their new home; each destination keeps the offset
//! of its source modulo its alignment, so 2 MiB folios stay PMD-mapped. Populating
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

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::sys::uffd::Uffd;
use crate::sys::{self, Advice, HPAGE_SIZE};

/// Virtual size of a chunk; only the populated part costs memory.
const CHUNK_BYTES: usize = 1 << 30;

/// The huge-page advice a destination must carry (the moved mapping takes it over).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThpAdvice {
    /// `MADV_HUGEPAGE` (the source had `hg` in its `VmFlags`).
    Huge,
    /// `MADV_NOHUGEPAGE` (the source had `nh`).
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
    /// Padding skipped to keep alignment, still mapped and ours to unmap.
    holes: Vec<(usize, usize)>,
}

impl Chunk {
    fn new(key: Key, min_len: usize, uffd: Option<&Uffd>) -> Result<Self> {
        let len = min_len.max(CHUNK_BYTES).next_multiple_of(HPAGE_SIZE);
        let base = sys::mmap_anon_aligned(len, HPAGE_SIZE).map_err(Error::sys("mmap (destination pool)"))?;
        // pagemig's own memory, never the program's: an agent migrating the program leaves it.
        crate::sys::own::claim(base, len);
        let mut chunk = Chunk { end: base + len, cursor: base, prepared_end: base, holes: Vec::new() };
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
    /// `MADV_POPULATE_WRITE`: a node out of memory is an `ENOMEM` error. The kernel holds the
    /// mmap lock for the whole range, so an `mremap` on another thread waits for it.
    Madvise,
    /// A store to every base page: each fault takes only its mapping's lock, so moves on
    /// another thread go on meanwhile. A node out of memory is not an error but the OOM
    /// killer: only for destinations the node has ample free memory for.
    Touch,
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
}

/// A migration running: the reserve thread waits until it ends. Made by
/// [`Pool::call_started`].
pub struct CallGuard<'p> {
    pool: &'p Pool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.pool.inner.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _reserves = self.pool.inner.reserves.lock();
            self.pool.inner.wake.notify_all();
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
        self.inner.take(key, len, align, phase, populate)
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
            if let Some(mut c) = self.inner.chunks.lock().remove(&key) {
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
    pub fn release(&self, dest: Dest) {
        if dest.len == 0 {
            return;
        }
        // SAFETY: a `Dest` is only made by `take` and owns its range (type invariant); it is
        // consumed here, so nothing refers to the range afterwards.
        let _ = unsafe { sys::munmap(dest.addr, dest.len) };
    }

    /// Ends every reserve and unmaps every chunk's unused memory.
    pub fn clear(&self) {
        self.inner.reserves.lock().clear();
        for (_, mut c) in self.inner.chunks.lock().drain() {
            c.retire();
        }
    }
}

impl Inner {
    fn take(&self, key: Key, len: usize, align: usize, phase: usize, populate: Populate) -> Result<(Dest, Duration)> {
        debug_assert!(align.is_power_of_two() && len > 0);
        let mut chunks = self.chunks.lock();
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
        let started = Instant::now();
        let from = if key.empty { end } else { chunk.prepared_end.max(addr) };
        if from < end {
            let populated = match populate {
                Populate::Madvise => sys::madvise(from, end - from, Advice::PopulateWrite),
                Populate::Touch => {
                    touch(from, end);
                    Ok(())
                }
            };
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
        let spent = if from < end { started.elapsed() } else { Duration::ZERO };
        // INVARIANT: `[addr, end)` was just carved from our reservation.
        Ok((Dest { addr, len, empty: key.empty, fresh: from < end }, spent))
    }

    /// Populates at most [`RESERVE_STEP`] more towards `bytes` ready ahead of `key`'s next
    /// destinations; returns whether there is more to do.
    fn prefill_step(&self, key: Key, bytes: usize) -> Result<bool> {
        if key.empty {
            return Ok(false);
        }
        let mut chunks = self.chunks.lock();
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_keep_phase_and_follow_each_other() {
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
    }

    #[test]
    fn prefill_makes_take_free() {
        let pool = Pool::populated_only();
        let key = Key { node: crate::numa::memory_nodes().unwrap()[0], thp: ThpAdvice::NoHuge, empty: false };
        pool.prefill(key, 4 << 20).unwrap();
        let (d, spent) = pool.take(key, 1 << 20, 4096, 0, Populate::Madvise).unwrap();
        assert_eq!(spent, Duration::ZERO);
        pool.release(d);
    }
}
