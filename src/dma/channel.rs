//! A channel of the soft provider: the descriptor queues, the worker thread that runs
//! them, and the channel verbs.
//!
//! # Algorithm
//!
//! A channel's state sits under one mutex: the descriptors *submitted* (not yet issued),
//! *issued* (waiting for the worker), *parked* (stuck by fault injection), the cookies not
//! finished, the failed cookies, and whether the worker is *running* a copy or a callback.
//! `issue_pending` moves the submitted queue onto the issued one and wakes the worker.
//!
//! The worker takes one issued descriptor under the mutex, marks itself running and
//! records the channel's *abort generation*, then copies without the mutex, checking the
//! generation between chunks. Back under the mutex it records the outcome; if the
//! generation moved, the descriptor was aborted: it ends as an error and its callback is
//! dropped, never called. Otherwise it calls the callback without the mutex, marked as
//! running a callback.
//!
//! `terminate_sync` bumps the generation, takes every queued and parked descriptor away
//! (they end as errors, callbacks dropped), and waits until the worker runs neither a copy
//! nor a callback. From then on the worker can touch none of the memory of descriptors
//! submitted before: it never saw the ones taken away, and the one it was running is
//! finished.
#![allow(unsafe_code, reason = "the channel copies memory that the prep functions' callers lend it")]

use std::collections::{BTreeSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::lock::{Condvar, Mutex, MutexGuard};

use super::{Caps, Cookie, FaultPlan, PrepFlags, Segment, Status, any_overlap, pair_segments};
use crate::copy::CopyPair;
use crate::sys::Errno;

/// A completion callback: called once, on the channel's thread, with the descriptor's
/// outcome (`Err(EIO)` for a failed copy).
pub type Callback = Box<dyn FnOnce(Result<(), Errno>) + Send + 'static>;

/// Bytes the worker copies between two checks for `terminate_sync`.
const CHUNK: usize = 256 << 10;

/// How many failed cookies a channel remembers for [`Channel::tx_status`].
const ERRORS_REMEMBERED: usize = 4096;

/// What the channels of one device share: the fault plan and the device-wide descriptor
/// count that the plan refers to.
#[derive(Debug, Default)]
pub(crate) struct DeviceShared {
    pub(crate) faults: Mutex<FaultPlan>,
    pub(crate) submitted: AtomicU64,
}

/// A submitted descriptor as the channel holds it.
struct Job {
    cookie: u64,
    /// Position among all descriptors of the device, in submit order.
    index: u64,
    pieces: Vec<CopyPair>,
    callback: Option<Callback>,
}

#[derive(Default)]
struct State {
    last_cookie: u64,
    submitted: VecDeque<Job>,
    issued: VecDeque<Job>,
    parked: Vec<Job>,
    pending: BTreeSet<u64>,
    errors: BTreeSet<u64>,
    running: bool,
    shutdown: bool,
}

impl State {
    fn fail(&mut self, cookie: u64) {
        self.pending.remove(&cookie);
        self.errors.insert(cookie);
        if self.errors.len() > ERRORS_REMEMBERED {
            self.errors.pop_first();
        }
    }

    fn status(&self, cookie: Cookie) -> Result<Status, Errno> {
        let c = cookie.0;
        if c == 0 || c > self.last_cookie {
            Err(Errno::INVAL)
        } else if self.pending.contains(&c) {
            Ok(Status::InProgress)
        } else if self.errors.contains(&c) {
            Ok(Status::Error)
        } else {
            Ok(Status::Complete)
        }
    }

    /// Takes every descriptor not yet running away; they end as errors.
    fn abort_queued(&mut self) -> Vec<Job> {
        let mut victims: Vec<Job> = self.submitted.drain(..).collect();
        victims.extend(self.issued.drain(..));
        victims.append(&mut self.parked);
        for job in &victims {
            self.fail(job.cookie);
        }
        victims
    }
}

pub(crate) struct Inner {
    name: String,
    caps: Caps,
    device: Arc<DeviceShared>,
    state: Mutex<State>,
    /// Wakes the worker: work was issued, or shutdown.
    work: Condvar,
    /// Wakes waiters: a descriptor finished, or the worker went idle.
    changed: Condvar,
    abort_gen: AtomicU64,
    worker: Mutex<Option<ThreadId>>,
}

/// A DMA channel (`struct dma_chan`): the verbs to prepare, submit, issue, wait for and
/// abort transfers. Reached through a [`super::Chan`] or [`super::SharedChan`].
pub struct Channel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("name", &self.inner.name).field("caps", &self.inner.caps).finish()
    }
}

impl Channel {
    pub(crate) fn new(name: String, caps: Caps, device: Arc<DeviceShared>) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                caps,
                device,
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                changed: Condvar::new(),
                abort_gen: AtomicU64::new(0),
                worker: Mutex::new(None),
            }),
        }
    }

    /// The channel's name (`dma0chan3`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The capabilities of the channel's device.
    pub fn caps(&self) -> Caps {
        self.inner.caps
    }

    fn is_worker_thread(&self) -> bool {
        *self.inner.worker.lock() == Some(std::thread::current().id())
    }

    /// Prepares a copy of `len` bytes from `src` to `dst` (`dmaengine_prep_dma_memcpy()`).
    /// Nothing is accessed before the descriptor is submitted and issued.
    ///
    /// # Errors
    /// `EINVAL` for a zero length, a range that wraps the address space, or overlapping
    /// ranges; `EOPNOTSUPP` when the device lacks [`Caps::MEMCPY`].
    ///
    /// # Safety
    /// Once the descriptor is submitted, `src` must stay readable and `dst` writable for
    /// `len` bytes, no other thread may write `src` or access `dst`, until the descriptor
    /// has finished ([`Channel::tx_status`] is not `InProgress`) or
    /// [`Channel::terminate_sync`] on this channel (or the channel's release, or the
    /// device's drop) has returned.
    pub unsafe fn prep_memcpy(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        flags: PrepFlags,
    ) -> Result<Descriptor, Errno> {
        if !self.caps().contains(Caps::MEMCPY) {
            return Err(Errno::OPNOTSUPP);
        }
        if len == 0 || dst.checked_add(len).is_none() || src.checked_add(len).is_none() {
            return Err(Errno::INVAL);
        }
        self.descriptor(vec![CopyPair { dst, src, len }], flags)
    }

    /// Prepares one descriptor that copies the scatter list `src` into the scatter list
    /// `dst` (`dmaengine_prep_dma_memcpy_sg()`). The lists may be split differently, even
    /// into different numbers of segments, as long as their totals match: the bytes are
    /// copied in order across segment boundaries.
    ///
    /// # Errors
    /// `EINVAL` when a list is empty or holds an empty segment, the totals differ, or a
    /// destination overlaps a source; `EOPNOTSUPP` when the device lacks
    /// [`Caps::MEMCPY_SG`].
    ///
    /// # Safety
    /// As [`Channel::prep_memcpy`], for every segment of both lists.
    pub unsafe fn prep_memcpy_sg(
        &self,
        dst: &[Segment],
        src: &[Segment],
        flags: PrepFlags,
    ) -> Result<Descriptor, Errno> {
        if !self.caps().contains(Caps::MEMCPY_SG) {
            return Err(Errno::OPNOTSUPP);
        }
        self.descriptor(pair_segments(dst, src)?, flags)
    }

    fn descriptor(&self, pieces: Vec<CopyPair>, flags: PrepFlags) -> Result<Descriptor, Errno> {
        if any_overlap(&pieces) {
            return Err(Errno::INVAL);
        }
        Ok(Descriptor { chan: self.inner.clone(), pieces, flags, callback: None })
    }

    /// Starts every submitted descriptor (`dma_async_issue_pending()`).
    pub fn issue_pending(&self) {
        let mut st = self.inner.state.lock();
        if st.submitted.is_empty() {
            return;
        }
        let mut submitted = std::mem::take(&mut st.submitted);
        st.issued.append(&mut submitted);
        self.inner.work.notify_one();
    }

    /// Where the descriptor with `cookie` stands (`dmaengine_tx_status()`). A failure is
    /// remembered for the 4096 most recent failed descriptors of the channel; past that an
    /// old failed cookie reads `Complete`, so use the callback to learn outcomes for sure.
    ///
    /// # Errors
    /// `EINVAL` for a cookie this channel never handed out.
    pub fn tx_status(&self, cookie: Cookie) -> Result<Status, Errno> {
        self.inner.state.lock().status(cookie)
    }

    /// Waits up to `timeout` for the descriptor with `cookie` to finish (`dma_sync_wait()`,
    /// without its implicit `issue_pending`). Returns `Complete` or `Error`.
    ///
    /// # Errors
    /// `ETIMEDOUT` when it is still in progress after `timeout`; `EINVAL` for a cookie this
    /// channel never handed out; `EDEADLK` when called from one of this channel's callbacks
    /// for a descriptor not finished (the channel runs nothing while its callback runs).
    pub fn wait(&self, cookie: Cookie, timeout: Duration) -> Result<Status, Errno> {
        let deadline = Instant::now().checked_add(timeout);
        let on_worker = self.is_worker_thread();
        let mut st = self.inner.state.lock();
        loop {
            let status = st.status(cookie)?;
            if status != Status::InProgress {
                return Ok(status);
            }
            if on_worker {
                return Err(Errno::DEADLK);
            }
            match deadline {
                Some(deadline) => {
                    if self.inner.changed.wait_until(&mut st, deadline).timed_out()
                        && st.status(cookie)? == Status::InProgress
                    {
                        return Err(Errno::TIMEDOUT);
                    }
                }
                None => self.inner.changed.wait(&mut st),
            }
        }
    }

    /// Aborts every descriptor submitted, issued, running or stuck on the channel and
    /// returns once the channel will never touch their memory again nor run any of their
    /// callbacks (`dmaengine_terminate_sync()`).
    ///
    /// Aborted descriptors end with status `Error` and their callbacks are **never
    /// called**: they are dropped. A descriptor that finished before the abort took effect
    /// keeps its outcome, and its callback has returned by the time this returns, except
    /// when this is called from that very callback: then the channel runs nothing but the
    /// caller, and this returns at once. On a shared channel this aborts the other users'
    /// transfers too.
    pub fn terminate_sync(&self) {
        let on_worker = self.is_worker_thread();
        let mut st = self.inner.state.lock();
        self.inner.abort_gen.fetch_add(1, Ordering::SeqCst);
        let victims = st.abort_queued();
        self.inner.changed.notify_all();
        // On the worker thread we are inside a callback: no copy runs, and waiting for
        // the callback to end would wait for ourselves.
        while st.running && !on_worker {
            self.inner.changed.wait(&mut st);
        }
        drop(st);
        // Callbacks may own anything; drop them without the lock.
        drop(victims);
    }

    /// Stops the worker for good: what is queued is aborted, the worker exits after the
    /// copy or callback it may be running.
    pub(crate) fn shutdown(&self) {
        let mut st = self.inner.state.lock();
        st.shutdown = true;
        self.inner.abort_gen.fetch_add(1, Ordering::SeqCst);
        let victims = st.abort_queued();
        self.inner.work.notify_all();
        self.inner.changed.notify_all();
        drop(st);
        drop(victims);
    }

    /// The worker thread's body.
    pub(crate) fn worker(&self) -> impl FnOnce() + Send + 'static {
        let inner = self.inner.clone();
        move || {
            *inner.worker.lock() = Some(std::thread::current().id());
            run_worker(&inner);
        }
    }
}

fn run_worker(inner: &Inner) {
    let mut st = inner.state.lock();
    loop {
        if st.shutdown {
            return;
        }
        let faults = *inner.device.faults.lock();
        let next = if faults.out_of_order { st.issued.pop_back() } else { st.issued.pop_front() };
        let Some(job) = next else {
            inner.work.wait(&mut st);
            continue;
        };
        if faults.never_complete == Some(job.index) {
            st.parked.push(job);
            continue;
        }
        let generation = inner.abort_gen.load(Ordering::SeqCst);
        st.running = true;
        drop(st);

        let fail = faults.fail_descriptor == Some(job.index);
        // SAFETY: the descriptor was prepared with the promise that its pieces stay valid
        // and unshared until it finishes or the channel is terminated; it has not finished
        // (we hold it), and `terminate_sync` waits for `running` to clear before it
        // returns, which happens only after this copy.
        let result = unsafe { execute(&job.pieces, fail, &inner.abort_gen, generation) };

        st = inner.state.lock();
        let aborted = inner.abort_gen.load(Ordering::SeqCst) != generation;
        let cookie = job.cookie;
        if aborted || result.is_err() {
            st.fail(cookie);
        } else {
            st.pending.remove(&cookie);
        }
        match job.callback {
            Some(callback) if !aborted => {
                // Still `running`: terminate_sync waits for the callback too.
                inner.changed.notify_all();
                MutexGuard::unlocked(&mut st, || {
                    // A panicking callback must not kill the channel and leave `running` set.
                    let _ = catch_unwind(AssertUnwindSafe(move || callback(result)));
                });
                st.running = false;
                inner.changed.notify_all();
            }
            callback => {
                st.running = false;
                inner.changed.notify_all();
                // An aborted descriptor's callback is dropped, never called; it may own
                // anything, so not under the lock.
                MutexGuard::unlocked(&mut st, || drop(callback));
            }
        }
    }
}

/// Copies the pieces, chunk by chunk, giving up with `ECANCELED` as soon as the abort
/// generation moves. With `fail`, copies half of the first piece and reports `EIO`.
///
/// # Safety
/// Every piece's source must be readable and destination writable, unshared, for the
/// whole call, and no destination may overlap a source.
unsafe fn execute(pieces: &[CopyPair], fail: bool, abort: &AtomicU64, generation: u64) -> Result<(), Errno> {
    if fail {
        if let Some(first) = pieces.first() {
            let half = (first.len / 2) & !63;
            // SAFETY: a prefix of the first piece, which the caller vouches for.
            unsafe { crate::copy::simd::copy_bytes_nt(first.dst, first.src, half) };
        }
        return Err(Errno::IO);
    }
    for piece in pieces {
        let mut done = 0;
        while done < piece.len {
            if abort.load(Ordering::Relaxed) != generation {
                return Err(Errno::CANCELED);
            }
            let len = CHUNK.min(piece.len - done);
            // SAFETY: `done + len <= piece.len`, so this is inside a piece the caller
            // vouches for; pieces never overlap their sources (checked at prep).
            unsafe { crate::copy::simd::copy_bytes_nt(piece.dst + done, piece.src + done, len) };
            done += len;
        }
    }
    Ok(())
}

/// A prepared transfer (`struct dma_async_tx_descriptor`). Dropping it unsubmitted
/// accesses nothing.
pub struct Descriptor {
    chan: Arc<Inner>,
    pieces: Vec<CopyPair>,
    flags: PrepFlags,
    callback: Option<Callback>,
}

impl std::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Descriptor")
            .field("chan", &self.chan.name)
            .field("pieces", &self.pieces.len())
            .field("bytes", &self.len())
            .field("flags", &self.flags)
            .field("callback", &self.callback.is_some())
            .finish()
    }
}

impl Descriptor {
    /// Sets the completion callback (`tx->callback_result`): called once, on the channel's
    /// thread, with `Ok(())` or the error (`EIO`) when the descriptor finishes, and never
    /// when it is aborted by [`Channel::terminate_sync`]. It must not block for long: the
    /// channel runs nothing else meanwhile.
    pub fn set_callback<F>(&mut self, callback: F)
    where
        F: FnOnce(Result<(), Errno>) + Send + 'static,
    {
        self.callback = Some(Box::new(callback));
    }

    /// Bytes the descriptor copies.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// Whether it copies nothing (never true of a prepared descriptor).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The contiguous copies it is made of, in order.
    pub fn pieces(&self) -> &[CopyPair] {
        &self.pieces
    }

    /// The flags it was prepared with.
    pub fn flags(&self) -> PrepFlags {
        self.flags
    }

    /// Queues the descriptor on its channel (`dmaengine_submit()`) and returns its cookie.
    /// It runs only after [`Channel::issue_pending`]. On a channel whose device is gone it
    /// ends at once as `Error`, its callback dropped.
    pub fn submit(self) -> Cookie {
        let Descriptor { chan, pieces, flags: _, callback } = self;
        let mut st = chan.state.lock();
        st.last_cookie += 1;
        let cookie = st.last_cookie;
        let index = chan.device.submitted.fetch_add(1, Ordering::SeqCst);
        if st.shutdown {
            st.fail(cookie);
            drop(st);
            drop(callback);
        } else {
            st.pending.insert(cookie);
            st.submitted.push_back(Job { cookie, index, pieces, callback });
        }
        Cookie(cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;

    fn job(cookie: u64) -> Job {
        Job { cookie, index: cookie, pieces: Vec::new(), callback: None }
    }

    #[test]
    fn status_follows_the_cookie_sets() {
        watchdog(60, || {
            let mut st = State { last_cookie: 3, ..Default::default() };
            st.pending.extend([2, 3]);
            assert_eq!(st.status(Cookie(0)), Err(Errno::INVAL));
            assert_eq!(st.status(Cookie(4)), Err(Errno::INVAL));
            assert_eq!(st.status(Cookie(1)), Ok(Status::Complete));
            assert_eq!(st.status(Cookie(2)), Ok(Status::InProgress));
            st.fail(2);
            assert_eq!(st.status(Cookie(2)), Ok(Status::Error));
            st.submitted.push_back(job(3));
            assert_eq!(st.abort_queued().len(), 1);
            assert_eq!(st.status(Cookie(3)), Ok(Status::Error));
            assert!(st.pending.is_empty());
        });
    }

    #[test]
    fn failures_are_remembered_within_a_bound() {
        watchdog(60, || {
            let mut st = State::default();
            let n = ERRORS_REMEMBERED as u64 + 10;
            st.last_cookie = n;
            for c in 1..=n {
                st.fail(c);
            }
            assert_eq!(st.errors.len(), ERRORS_REMEMBERED);
            assert_eq!(st.status(Cookie(n)), Ok(Status::Error));
            assert_eq!(st.status(Cookie(1)), Ok(Status::Complete), "the oldest failures are forgotten");
        });
    }

    #[test]
    fn failing_execution_copies_a_prefix_only() {
        watchdog(60, || {
            let src = vec![7u8; 8192];
            let mut dst = vec![0u8; 8192];
            let piece = CopyPair { dst: dst.as_mut_ptr() as usize, src: src.as_ptr() as usize, len: 8192 };
            let abort = AtomicU64::new(0);
            // SAFETY: two distinct live vectors that nothing else touches during the call.
            assert_eq!(unsafe { execute(&[piece], true, &abort, 0) }, Err(Errno::IO));
            assert!(dst[..4096].iter().all(|&b| b == 7) && dst[4096..].iter().all(|&b| b == 0));
            // SAFETY: as above; the generation already moved, so nothing is copied.
            assert_eq!(unsafe { execute(&[piece], false, &abort, 1) }, Err(Errno::CANCELED));
            assert!(dst[4096..].iter().all(|&b| b == 0));
            // SAFETY: as above.
            assert_eq!(unsafe { execute(&[piece], false, &abort, 0) }, Ok(()));
            assert_eq!(dst, src);
        });
    }
}
