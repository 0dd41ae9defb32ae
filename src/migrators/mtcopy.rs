//! `mtcopy`: multi-threaded CPU copy on pinned worker threads (the RFC's follow-up 4).
//!
//! A batch is dealt out to `threads` workers, each pinned to a CPU round-robin. With at
//! least as many folios as threads, each worker copies a contiguous share of the folios
//! (`n*(i+1)/t - n*i/t` of them), in pieces of at most [`PIECE_BYTES`], and reports each
//! piece complete as soon as it is copied, so the pipelined move moves it while the rest
//! is still copied: the first folio waits for one piece, however large the batch. With fewer folios than
//! threads (a few large folios), every folio is split into byte ranges across the workers
//! and reported complete when its last range is copied.
//!
//! The workers outlive batches; a batch borrows its memory only for the duration of
//! [`OffloadCopy::offload_copy`], which does not return before every worker has finished
//! with it. That is the one `unsafe` promise in this module.
#![allow(unsafe_code)]

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use std::sync::mpsc::{Sender, channel};

use crate::copy::CopyPair;
use crate::offload::{Batch, Migrator, OffloadCopy, Owner, registry};
use crate::process::MadeIn;
use crate::sys::{self, Errno};

/// The most bytes a worker copies before reporting them complete.
pub const PIECE_BYTES: usize = 2 << 20;

/// The most worker threads accepted.
pub const MAX_THREADS: usize = 64;

/// One worker's part of a batch.
struct Job {
    /// The batch, with its lifetime erased (see the module docs).
    batch: *const Batch<'static>,
    /// Folios to copy whole.
    whole: Range<usize>,
    /// Byte ranges of large folios: `(folio, offset, len)`.
    parts: Vec<(usize, usize, usize)>,
    latch: Arc<Latch>,
}

// SAFETY: the batch pointer is only dereferenced while `offload_copy` waits on the latch,
// which keeps the batch alive; the batch itself is shared read-only (its completion callback
// is `Sync`).
unsafe impl Send for Job {}

/// Counts finished jobs and per-folio remaining parts.
struct Latch {
    state: Mutex<(usize, Option<Errno>)>,
    cv: Condvar,
    remaining_parts: Vec<AtomicUsize>,
}

impl Latch {
    fn done(&self, err: Option<Errno>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        if s.1.is_none() {
            s.1 = err;
        }
        self.cv.notify_all();
    }

    fn wait(&self) -> Option<Errno> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.0 > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.1
    }
}

fn run_job(job: Job) {
    // SAFETY: `offload_copy` created the pointer from a live `&Batch` and blocks on the
    // latch until this job calls `done`, so the batch outlives this use.
    let batch = unsafe { &*job.batch };
    let mut err = None;
    let pairs = batch.pairs();
    let mut at = job.whole.start;
    while at < job.whole.end && err.is_none() {
        let mut end = at + 1;
        let mut bytes = pairs[at].len;
        while end < job.whole.end && bytes + pairs[end].len <= PIECE_BYTES {
            bytes += pairs[end].len;
            end += 1;
        }
        err = batch.copy_range(at..end).and_then(|()| batch.complete(at..end)).err();
        at = end;
    }
    for &(folio, off, len) in &job.parts {
        if let Err(e) = batch.copy_part(folio, off, len) {
            err = Some(e);
            continue;
        }
        if job.latch.remaining_parts[folio].fetch_sub(1, Ordering::AcqRel) == 1 && err.is_none() {
            err = batch.complete(folio..folio + 1).err();
        }
    }
    job.latch.done(err);
}

struct Worker {
    /// The process that spawned the thread: a forked child has the entry, not the thread.
    made: MadeIn,
    tx: Sender<Job>,
    handle: Option<JoinHandle<()>>,
}

/// The multi-threaded CPU copy migrator.
pub struct MtCopy {
    threads: AtomicUsize,
    workers: Mutex<Vec<Worker>>,
    offloading: AtomicBool,
    owner: Arc<Owner>,
    self_ref: OnceLock<std::sync::Weak<MtCopy>>,
    /// Folios copied by this migrator.
    pub folios_copied: AtomicU64,
}

impl std::fmt::Debug for MtCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtCopy").field("threads", &self.threads()).field("offloading", &self.offloading()).finish()
    }
}

impl MtCopy {
    /// Takes the worker list's lock for a `fork()` in progress (see `migrate::fork`).
    pub(crate) fn hold_for_fork(&'static self, held: &mut Vec<Box<dyn std::any::Any>>) {
        held.push(Box::new(self.workers.lock().unwrap_or_else(|e| e.into_inner())));
    }

    /// A migrator with `threads` workers (started on first use).
    ///
    /// # Errors
    /// `EINVAL` unless `1 <= threads <= 64`.
    pub fn new(threads: usize) -> Result<Arc<Self>, Errno> {
        check_threads(threads)?;
        let m = Arc::new(Self {
            threads: AtomicUsize::new(threads),
            workers: Mutex::new(Vec::new()),
            offloading: AtomicBool::new(false),
            owner: Owner::new("mtcopy"),
            self_ref: OnceLock::new(),
            folios_copied: AtomicU64::new(0),
        });
        let _ = m.self_ref.set(Arc::downgrade(&m));
        Ok(m)
    }

    /// Worker threads used per batch.
    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::Relaxed)
    }

    /// Sets the worker count (`mtcopy/threads`).
    ///
    /// # Errors
    /// `EINVAL` unless `1 <= threads <= 64`.
    pub fn set_threads(&self, threads: usize) -> Result<(), Errno> {
        check_threads(threads)?;
        self.threads.store(threads, Ordering::Relaxed);
        if self.offloading() {
            drop(self.ensure_workers(threads));
        }
        Ok(())
    }

    /// Whether this migrator is registered (`mtcopy/offloading`).
    pub fn offloading(&self) -> bool {
        self.offloading.load(Ordering::Relaxed)
    }

    /// Registers (`true`) or unregisters (`false`) this migrator with the global registry.
    ///
    /// # Errors
    /// `EBUSY` when another migrator is active; as [`crate::offload::Registry::register`].
    pub fn set_offloading(&self, on: bool) -> Result<(), Errno> {
        let me = self.self_ref.get().and_then(std::sync::Weak::upgrade).ok_or(Errno::NODEV)?;
        let m = Migrator::new("mtcopy", me, self.owner.clone());
        if on == self.offloading() {
            return Ok(());
        }
        if on {
            registry().register(&m)?;
            // Started now, not by the first batch: spawning them cost that batch's first
            // folio 200-300 µs (2 threads, 2 MiB folios, 2-core AMD EPYC VM: the first
            // batch 309-427 µs against 135-196 with the CPU copy).
            drop(self.ensure_workers(self.threads()));
        } else {
            registry().unregister(&m)?;
        }
        self.offloading.store(on, Ordering::Relaxed);
        Ok(())
    }

    fn ensure_workers(&self, n: usize) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if workers.first().is_some_and(|w| !w.made.is_here()) {
            // Forked: the parent's threads do not exist here; forget them, spawn our own.
            workers.drain(..).for_each(std::mem::forget);
        }
        let cores = sys::allowed_cpus();
        while workers.len() < n {
            let (tx, rx) = channel::<Job>();
            let core = (!cores.is_empty()).then(|| cores[workers.len() % cores.len()]);
            let spawned = sys::thread::spawn(format!("mtcopy-{}", workers.len()), move || {
                if let Some(c) = core {
                    // Pinning is an optimisation; a refusal (cgroup, seccomp) is fine.
                    let _ = sys::pin_to_cpu(c);
                }
                for job in rx {
                    run_job(job);
                }
            });
            // No thread to be had (the program's thread limit): the shares of the workers
            // missing are copied on the calling thread.
            let Ok(handle) = spawned else { break };
            workers.push(Worker { made: MadeIn::this_process(), tx, handle: Some(handle) });
        }
        workers
    }
}

fn check_threads(threads: usize) -> Result<(), Errno> {
    if (1..=MAX_THREADS).contains(&threads) { Ok(()) } else { Err(Errno::INVAL) }
}

/// One worker's share: folios to copy whole, and `(folio, offset, len)` byte ranges.
type Share = (Range<usize>, Vec<(usize, usize, usize)>);

/// How `n` folios of `pairs` are dealt out to `t` threads: whole shares when there are
/// enough folios, byte ranges of every folio otherwise.
fn plan(pairs: &[CopyPair], t: usize) -> Vec<Share> {
    let n = pairs.len();
    if n >= t {
        return (0..t).map(|i| (n * i / t..n * (i + 1) / t, Vec::new())).collect();
    }
    let mut out: Vec<Share> = (0..t).map(|_| (0..0, Vec::new())).collect();
    for (f, p) in pairs.iter().enumerate() {
        // Split on 4 KiB boundaries so non-temporal stores stay line-aligned.
        let pages = p.len / sys::PAGE_SIZE;
        let parts = t.min(pages.max(1));
        for i in 0..parts {
            let (a, b) = (pages * i / parts * sys::PAGE_SIZE, pages * (i + 1) / parts * sys::PAGE_SIZE);
            let b = if i + 1 == parts { p.len } else { b };
            out[(f + i) % t].1.push((f, a, b - a));
        }
    }
    out
}

// SAFETY: its workers copy only through `Batch::copy_range` and `Batch::copy_part`, report
// a folio only once every part of it is copied, and `offload_copy` returns only after every
// worker is done with the batch.
unsafe impl OffloadCopy for MtCopy {
    fn fills_unpopulated(&self) -> bool {
        true
    }

    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
        let n = batch.folio_count();
        if n == 0 {
            return Ok(());
        }
        let t = self.threads();
        let jobs = plan(batch.pairs(), t);
        let mut remaining = vec![0usize; n];
        for (_, parts) in &jobs {
            for &(f, _, _) in parts {
                remaining[f] += 1;
            }
        }
        let busy = jobs.iter().filter(|(w, p)| !w.is_empty() || !p.is_empty()).count();
        let latch = Arc::new(Latch {
            state: Mutex::new((busy, None)),
            cv: Condvar::new(),
            remaining_parts: remaining.into_iter().map(AtomicUsize::new).collect(),
        });
        let ptr = (batch as *const Batch<'_>).cast::<Batch<'static>>();
        {
            let workers = self.ensure_workers(t);
            for (i, (whole, parts)) in jobs.into_iter().enumerate() {
                if whole.is_empty() && parts.is_empty() {
                    continue;
                }
                let job = Job { batch: ptr, whole, parts, latch: latch.clone() };
                match workers.get(i) {
                    Some(worker) => {
                        if let Err(e) = worker.tx.send(job) {
                            // A worker that went away: copy its share here.
                            run_job(e.0);
                        }
                    }
                    // A worker that could not be started: likewise.
                    None => run_job(job),
                }
            }
        }
        // Every job holds the batch pointer until it calls `done`: wait for all of them.
        match latch.wait() {
            Some(e) => Err(e),
            None => {
                self.folios_copied.fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

impl Drop for MtCopy {
    fn drop(&mut self) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for mut w in workers.drain(..) {
            if !w.made.is_here() {
                std::mem::forget(w);
                continue;
            }
            drop(w.tx);
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;

    fn pair(len: usize) -> CopyPair {
        CopyPair { dst: 0, src: 0, len }
    }

    #[test]
    fn plan_deals_whole_shares_or_splits_large_folios() {
        watchdog(60, || {
            let p: Vec<_> = (0..10).map(|_| pair(4096)).collect();
            let shares: Vec<_> = plan(&p, 4).into_iter().map(|(r, parts)| (r, parts.len())).collect();
            assert_eq!(shares, [(0..2, 0), (2..5, 0), (5..7, 0), (7..10, 0)]);
            let big = [pair(2 << 20)];
            let split = plan(&big, 4);
            let total: usize = split.iter().flat_map(|(_, p)| p.iter().map(|x| x.2)).sum();
            assert_eq!(total, 2 << 20);
            assert!(split.iter().all(|(r, p)| r.is_empty() && p.len() == 1));
            assert!(MtCopy::new(0).is_err() && MtCopy::new(65).is_err());
        });
    }

    #[test]
    fn copies_every_byte_and_reports_each_share() {
        watchdog(60, || {
            for (threads, folio, count) in [(1, 4096, 64), (2, 4096, 64), (4, 4096, 7), (4, 2 << 20, 2), (3, 65536, 1)]
            {
                let len = folio * count;
                let src = sys::Mapping::new(len, folio).unwrap();
                let dst = sys::Mapping::new(len, folio).unwrap();
                for i in 0..len / 8 {
                    src.word(i).unwrap().store(i as u64 ^ 0xabcd, Ordering::Relaxed);
                }
                let pairs: Vec<_> = (0..count)
                    .map(|i| CopyPair { dst: dst.addr() + i * folio, src: src.addr() + i * folio, len: folio })
                    .collect();
                let seen = Mutex::new(vec![0u32; count]);
                let on_complete = |r: Range<usize>| r.for_each(|i| seen.lock().unwrap()[i] += 1);
                // SAFETY: two private mappings of `len` bytes, disjoint, alive for the call.
                let batch = unsafe { Batch::new(&pairs, Some(&on_complete)) };
                let m = MtCopy::new(threads).unwrap();
                m.offload_copy(&batch).unwrap();
                assert!(seen.lock().unwrap().iter().all(|&c| c == 1), "{threads} {folio} {count}");
                for i in 0..len / 8 {
                    assert_eq!(dst.word(i).unwrap().load(Ordering::Relaxed), i as u64 ^ 0xabcd);
                }
            }
        });
    }
}
