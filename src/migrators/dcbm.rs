//! `dcbm`: the DMA Core Batch Migrator, copying a batch's folios on DMA channels (the
//! RFC's patch 6/7, with its follow-ups 1 and 3 and the review's per-descriptor
//! completion).
//!
//! # Algorithm
//!
//! For a batch of `n` folios, take `ch = min(nr_dma_chan, n, 16)` channels exclusively
//! ([`crate::dma::Device::request_chan`] on the migrator's device, or
//! [`crate::dma::request_chan_by_mask`] from the registry), using fewer if fewer are free
//! and declining with `ENODEV` when none is. Channel `i` gets the `n*(i+1)/ch - n*i/ch`
//! folios after those of channel `i - 1` ([`split_folios`]).
//!
//! Each channel's folios become a source and a destination scatter list, adjacent folios
//! coalesced into one segment on each side independently, so the two lists may have
//! different segment counts. With [`Caps::MEMCPY_SG`] the whole share is one
//! `prep_memcpy_sg` descriptor, which copies across uneven segment boundaries
//! (follow-ups 1 and 3); without it, the lists are cut at every boundary of either side and
//! each piece is one `prep_memcpy` descriptor (follow-up 3). Where the seed falls back to
//! the CPU on uneven lists, this copies them.
//!
//! Every descriptor has its own callback (completion may come out of order, so the last
//! descriptor's callback says nothing about the others). A channel's share is done when all
//! its descriptors have called back without error; the waiting thread reports it at once
//! with [`Batch::complete`], so the pipelined move moves those folios while other channels
//! still copy.
//!
//! Everything is prepared and submitted before any channel is issued. Then the thread
//! waits, up to the timeout in all. A descriptor error terminates its channel and is
//! remembered while the other channels are still waited for; at the end, after an error
//! or at the timeout, every channel is terminated (`terminate_sync`), which guarantees
//! that no DMA touches the batch afterwards, and the first error is returned. Channels
//! that finished in between are still reported. The core copies what was not reported.
//!
//! Counters: `folios_migrated` grows by the folios reported complete, `folios_failures`
//! by the folios of the batch that were not (including a batch declined for want of
//! channels). Channels are released after every batch, so a change of `nr_dma_chan` holds
//! from the next batch on.
#![allow(unsafe_code, reason = "lends the batch's memory to the DMA channels")]

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::lock::{Condvar, Mutex};

use crate::copy::CopyPair;
use crate::dma::{self, Caps, Chan, Descriptor, Device, PrepFlags, Segment};
use crate::offload::{Batch, Migrator, OffloadCopy, Owner, Registry, registry};
use crate::sys::Errno;

/// The most channels one batch uses (`MAX_DMA_CHANNELS`).
pub const MAX_DMA_CHANNELS: usize = 16;

/// How long a batch may take on the DMA engine before it is aborted and falls back.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The migrator's name in the registry.
pub const NAME: &str = "dcbm";

/// The DMA Core Batch Migrator.
pub struct Dcbm {
    device: Option<Arc<Device>>,
    offloading: AtomicBool,
    nr_dma_chan: AtomicUsize,
    folios_migrated: AtomicU64,
    folios_failures: AtomicU64,
    timeout_us: AtomicU64,
    owner: Arc<Owner>,
    /// The registered migrator while offloading (the seed's `dcbm_mutex` guards it).
    registered: std::sync::Mutex<Option<Migrator>>,
}

impl std::fmt::Debug for Dcbm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dcbm")
            .field("device", &self.device.as_ref().map(|d| d.name().to_string()))
            .field("offloading", &self.offloading())
            .field("nr_dma_chan", &self.nr_dma_chan())
            .field("folios_migrated", &self.folios_migrated())
            .field("folios_failures", &self.folios_failures())
            .field("timeout", &self.timeout())
            .finish()
    }
}

impl Dcbm {
    /// A migrator taking its channels from `device`, or from the DMA registry
    /// ([`dma::request_chan_by_mask`]) when `None`. It starts with one channel, the
    /// default timeout, and offloading off.
    pub fn new(device: Option<Arc<Device>>) -> Arc<Self> {
        Arc::new(Self {
            device,
            offloading: AtomicBool::new(false),
            nr_dma_chan: AtomicUsize::new(1),
            folios_migrated: AtomicU64::new(0),
            folios_failures: AtomicU64::new(0),
            timeout_us: AtomicU64::new(DEFAULT_TIMEOUT.as_micros() as u64),
            owner: Owner::new(NAME),
            registered: std::sync::Mutex::new(None),
        })
    }

    /// The device channels come from, if one was given.
    pub fn device(&self) -> Option<&Arc<Device>> {
        self.device.as_ref()
    }

    /// The owner it registers with.
    pub fn owner(&self) -> &Arc<Owner> {
        &self.owner
    }

    /// Whether it is registered as the active migrator (`dcbm/offloading`).
    pub fn offloading(&self) -> bool {
        self.offloading.load(Ordering::SeqCst)
    }

    /// Registers (`true`) or unregisters (`false`) it with the global registry
    /// (`dcbm/offloading`). Asking for the state it is already in succeeds and does
    /// nothing.
    ///
    /// # Errors
    /// As [`Dcbm::set_offloading_in`].
    pub fn set_offloading(self: &Arc<Self>, on: bool) -> Result<(), Errno> {
        self.set_offloading_in(registry(), on)
    }

    /// As [`Dcbm::set_offloading`], with `registry`; turn it off with the registry it was
    /// turned on with.
    ///
    /// # Errors
    /// `EBUSY` when another migrator is active; `ENODEV` when the owner is going away;
    /// `EINVAL` when turning off with a registry where it is not the active migrator.
    pub fn set_offloading_in(self: &Arc<Self>, registry: &Registry, on: bool) -> Result<(), Errno> {
        let mut registered = self.registered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if on == registered.is_some() {
            return Ok(());
        }
        if on {
            let m = Migrator::new(NAME, self.clone(), self.owner.clone());
            registry.register(&m)?;
            *registered = Some(m);
        } else if let Some(m) = registered.as_ref() {
            registry.unregister(m)?;
            // Drops the migrator's reference to `self`.
            *registered = None;
        }
        self.offloading.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// The most channels a batch uses (`dcbm/nr_dma_chan`).
    pub fn nr_dma_chan(&self) -> usize {
        self.nr_dma_chan.load(Ordering::Relaxed)
    }

    /// Sets the most channels a batch uses, from the next batch on.
    ///
    /// # Errors
    /// `EINVAL` unless `1 <= n <= 16`; the setting is unchanged then.
    pub fn set_nr_dma_chan(&self, n: usize) -> Result<(), Errno> {
        if !(1..=MAX_DMA_CHANNELS).contains(&n) {
            return Err(Errno::INVAL);
        }
        self.nr_dma_chan.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// Folios whose copy the DMA engine completed (`dcbm/folios_migrated`).
    pub fn folios_migrated(&self) -> u64 {
        self.folios_migrated.load(Ordering::Relaxed)
    }

    /// Folios handed to it that it did not copy, left to the CPU fallback
    /// (`dcbm/folios_failures`).
    pub fn folios_failures(&self) -> u64 {
        self.folios_failures.load(Ordering::Relaxed)
    }

    /// Sets `folios_migrated` to 0.
    pub fn reset_folios_migrated(&self) {
        self.folios_migrated.store(0, Ordering::Relaxed);
    }

    /// Sets `folios_failures` to 0.
    pub fn reset_folios_failures(&self) {
        self.folios_failures.store(0, Ordering::Relaxed);
    }

    /// How long a batch may take before it is aborted.
    pub fn timeout(&self) -> Duration {
        Duration::from_micros(self.timeout_us.load(Ordering::Relaxed))
    }

    /// Sets how long a batch may take before it is aborted (default 10 s).
    ///
    /// # Errors
    /// `EINVAL` for zero or more than a day.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), Errno> {
        if timeout.is_zero() || timeout > Duration::from_secs(86_400) {
            return Err(Errno::INVAL);
        }
        self.timeout_us.store(timeout.as_micros().max(1) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn request_chan(&self) -> Result<Chan, Errno> {
        match &self.device {
            Some(device) => device.request_chan(Caps::MEMCPY),
            None => dma::request_chan_by_mask(Caps::MEMCPY),
        }
    }

    /// Copies the batch on `chans`; returns the folios reported complete and the outcome.
    fn copy_on(&self, batch: &Batch<'_>, chans: &[Chan]) -> (usize, Result<(), Errno>) {
        let deadline = Instant::now().checked_add(self.timeout());
        let shares = split_folios(batch.folio_count(), chans.len());
        let tracker = Arc::new(Tracker::new(chans.len()));

        for (c, (chan, share)) in chans.iter().zip(&shares).enumerate() {
            let descriptors = match prep_share(chan, &batch.pairs()[share.clone()]) {
                Ok(d) => d,
                Err(e) => {
                    // Nothing was issued: terminating drops what was submitted unrun.
                    chans.iter().for_each(|c| c.terminate_sync());
                    return (0, Err(e));
                }
            };
            tracker.state.lock().outstanding[c] = descriptors.len();
            for mut desc in descriptors {
                let tracker = tracker.clone();
                desc.set_callback(move |result| tracker.descriptor_done(c, result));
                desc.submit();
            }
        }
        for chan in chans {
            chan.issue_pending();
        }

        let mut reported = 0;
        let mut settled = 0;
        let mut error = None;
        while settled < chans.len() {
            let Some(events) = tracker.next_events(deadline) else {
                error.get_or_insert(Errno::TIMEDOUT);
                break;
            };
            for c in events.finished {
                if batch.complete(shares[c].clone()).is_ok() {
                    reported += shares[c].len();
                }
                settled += 1;
            }
            for (c, e) in events.failed {
                chans[c].terminate_sync();
                error.get_or_insert(e);
                settled += 1;
            }
        }
        if let Some(e) = error {
            for chan in chans {
                chan.terminate_sync();
            }
            // No callback runs any more: report the shares that finished meanwhile.
            for c in tracker.take_finished() {
                if batch.complete(shares[c].clone()).is_ok() {
                    reported += shares[c].len();
                }
            }
            return (reported, Err(e));
        }
        (reported, Ok(()))
    }
}

// SAFETY: a channel's share is reported only once every descriptor of it completed; on
// an error or a timeout every channel is terminated (`terminate_sync` returns once no
// descriptor runs any more) before `offload_copy` returns, and descriptors write only the
// batch's destinations.
unsafe impl OffloadCopy for Dcbm {
    fn offload_copy(&self, batch: &Batch<'_>) -> Result<(), Errno> {
        let n = batch.folio_count();
        if n == 0 {
            return Ok(());
        }
        if self.device.as_ref().is_some_and(|d| !d.served_here()) {
            // A forked child: the device's threads stayed in the parent; the CPU copies.
            return Err(Errno::NODEV);
        }
        let want = self.nr_dma_chan().min(n).min(MAX_DMA_CHANNELS);
        let chans: Vec<Chan> = std::iter::from_fn(|| self.request_chan().ok()).take(want).collect();
        let (reported, result) = if chans.is_empty() { (0, Err(Errno::NODEV)) } else { self.copy_on(batch, &chans) };
        // Released here, before the counters: the next batch may use them.
        drop(chans);
        self.folios_migrated.fetch_add(reported as u64, Ordering::Relaxed);
        self.folios_failures.fetch_add((n - reported) as u64, Ordering::Relaxed);
        result
    }
}

/// The process-wide migrator of [`global`] (shared with a forked child; see
/// `offload::registry`'s `REGISTRY` for why not a `OnceLock`).
static DCBM: crate::process::PerProcess<Arc<Dcbm>> = crate::process::PerProcess::new();

/// Takes the global migrator's lock for a `fork()` in progress (see `migrate::fork`).
pub(crate) fn hold_for_fork(held: &mut Vec<Box<dyn std::any::Any>>) {
    if let Some(d) = DCBM.latest() {
        held.push(Box::new(d.registered.lock().unwrap_or_else(std::sync::PoisonError::into_inner)));
    }
}

/// The process-wide migrator that the `dcbm/*` attributes drive: it takes its channels
/// from the DMA registry, where [`dma::soft_default`] is registered on first use.
pub fn global() -> &'static Arc<Dcbm> {
    DCBM.get_or_init_inherited(|| {
        super::hold_at_fork();
        // Without a device every batch is declined (`ENODEV`) and falls back; a later
        // registration of a device makes DCBM usable.
        let _ = dma::soft_default();
        Dcbm::new(None)
    })
}

/// The folios of each of `channels` channels out of `n` (the seed's
/// `n*(i+1)/ch - n*i/ch`): contiguous shares, in order, whose sizes differ by at most one.
/// No share for zero channels.
///
/// # Examples
/// ```
/// use pagemig::migrators::dcbm::split_folios;
///
/// assert_eq!(split_folios(10, 4), [0..2, 2..5, 5..7, 7..10]);
/// ```
pub fn split_folios(n: usize, channels: usize) -> Vec<Range<usize>> {
    (0..channels).map(|i| n * i / channels..n * (i + 1) / channels).collect()
}

/// The segments of one side of `pairs`, adjacent ranges coalesced.
fn segments(pairs: &[CopyPair], side: impl Fn(&CopyPair) -> usize) -> Vec<Segment> {
    let mut segs: Vec<Segment> = Vec::new();
    for p in pairs {
        match segs.last_mut() {
            Some(last) if last.addr + last.len == side(p) => last.len += p.len,
            _ => segs.push(Segment::new(side(p), p.len)),
        }
    }
    segs
}

/// Prepares the descriptors of one channel's share.
fn prep_share(chan: &Chan, pairs: &[CopyPair]) -> Result<Vec<Descriptor>, Errno> {
    let dst = segments(pairs, |p| p.dst);
    let src = segments(pairs, |p| p.src);
    let flags = PrepFlags::INTERRUPT | PrepFlags::CTRL_ACK;
    if chan.caps().contains(Caps::MEMCPY_SG) {
        // SAFETY: the batch's invariant: every pair is readable/writable and unshared for
        // as long as the batch lives, and `offload_copy` does not return before every
        // descriptor has finished or its channel was terminated.
        return Ok(vec![unsafe { chan.prep_memcpy_sg(&dst, &src, flags)? }]);
    }
    dma::pair_segments(&dst, &src)?
        .into_iter()
        // SAFETY: as above; each piece lies inside one pair of the batch.
        .map(|p| unsafe { chan.prep_memcpy(p.dst, p.src, p.len, flags) })
        .collect()
}

/// Completion state of one batch, shared with the descriptors' callbacks.
struct Tracker {
    state: Mutex<TrackState>,
    cv: Condvar,
}

struct TrackState {
    /// Descriptors of each channel not yet called back.
    outstanding: Vec<usize>,
    /// Channels with a failed descriptor.
    failed: Vec<bool>,
    /// Channels done and not yet reported.
    finished: Vec<usize>,
    /// Channel failures not yet handled.
    errors: Vec<(usize, Errno)>,
}

/// What happened since the last look.
struct Events {
    finished: Vec<usize>,
    failed: Vec<(usize, Errno)>,
}

impl Tracker {
    fn new(channels: usize) -> Self {
        Self {
            state: Mutex::new(TrackState {
                outstanding: vec![0; channels],
                failed: vec![false; channels],
                finished: Vec::new(),
                errors: Vec::new(),
            }),
            cv: Condvar::new(),
        }
    }

    /// A descriptor's callback: runs on the channel's thread.
    fn descriptor_done(&self, c: usize, result: Result<(), Errno>) {
        let mut st = self.state.lock();
        if st.failed[c] {
            return;
        }
        match result {
            Ok(()) => {
                st.outstanding[c] = st.outstanding[c].saturating_sub(1);
                if st.outstanding[c] == 0 {
                    st.finished.push(c);
                }
            }
            Err(e) => {
                st.failed[c] = true;
                st.errors.push((c, e));
            }
        }
        self.cv.notify_all();
    }

    /// Waits until something happens or `deadline` passes (`None` then).
    fn next_events(&self, deadline: Option<Instant>) -> Option<Events> {
        let mut st = self.state.lock();
        loop {
            if !st.finished.is_empty() || !st.errors.is_empty() {
                return Some(Events {
                    finished: std::mem::take(&mut st.finished),
                    failed: std::mem::take(&mut st.errors),
                });
            }
            match deadline {
                Some(deadline) => {
                    if self.cv.wait_until(&mut st, deadline).timed_out()
                        && st.finished.is_empty()
                        && st.errors.is_empty()
                    {
                        return None;
                    }
                }
                None => self.cv.wait(&mut st),
            }
        }
    }

    fn take_finished(&self) -> Vec<usize> {
        std::mem::take(&mut self.state.lock().finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_matches_the_seed_formula() {
        for n in 0..200usize {
            for ch in 1..=16usize {
                let shares = split_folios(n, ch);
                assert_eq!(shares.len(), ch);
                let mut next = 0;
                for (i, s) in shares.iter().enumerate() {
                    assert_eq!(s.len(), n * (i + 1) / ch - n * i / ch, "n={n} ch={ch} i={i}");
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, n);
                let (min, max) = (shares.iter().map(|s| s.len()).min(), shares.iter().map(|s| s.len()).max());
                assert!(max.unwrap() - min.unwrap() <= 1);
            }
        }
        assert!(split_folios(5, 0).is_empty());
    }

    #[test]
    fn segments_coalesce_each_side_alone() {
        let p = |dst, src, len| CopyPair { dst, src, len };
        let pairs = [p(0x10000, 0x1000, 0x1000), p(0x11000, 0x3000, 0x1000), p(0x20000, 0x4000, 0x1000)];
        assert_eq!(segments(&pairs, |p| p.dst), [Segment::new(0x10000, 0x2000), Segment::new(0x20000, 0x1000)]);
        assert_eq!(segments(&pairs, |p| p.src), [Segment::new(0x1000, 0x1000), Segment::new(0x3000, 0x2000)]);
    }

    #[test]
    fn nr_dma_chan_bounds() {
        let d = Dcbm::new(None);
        assert_eq!(d.nr_dma_chan(), 1);
        assert_eq!(d.set_nr_dma_chan(0), Err(Errno::INVAL));
        assert_eq!(d.set_nr_dma_chan(17), Err(Errno::INVAL));
        assert_eq!(d.nr_dma_chan(), 1);
        d.set_nr_dma_chan(16).unwrap();
        assert_eq!(d.nr_dma_chan(), 16);
        assert_eq!(d.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(d.set_timeout(Duration::ZERO), Err(Errno::INVAL));
    }
}
