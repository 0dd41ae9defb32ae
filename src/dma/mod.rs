//! A DMA engine API with the verbs of Linux DMAEngine, and `soft`, a provider that runs
//! the transfers on worker threads.
//!
//! # Model
//!
//! A [`Device`] (`struct dma_device`) is a provider with a name, a capability mask
//! ([`Caps`]) and channels ([`Channel`], `struct dma_chan`). Devices are made known with
//! [`register_device`], and clients take channels in one of two ways:
//!
//! - *exclusively*, with [`request_chan_by_mask`] (`dma_request_chan_by_mask()`) or
//!   [`Device::request_chan`]: the [`Chan`] handle is the only user of the channel until it
//!   is released (dropped, or [`Chan::release`]); `ENODEV` when no free channel has the
//!   capabilities asked for;
//! - *shared*, with [`find_channel`] (`dma_find_channel()`) or [`Device::find_channel`]: a
//!   [`SharedChan`] on any channel with the capabilities that nobody holds exclusively,
//!   possibly used by several clients at once. Devices with [`Caps::PRIVATE`] hand out no
//!   shared channels, as in Linux.
//!
//! A transfer goes through the DMAEngine life cycle:
//!
//! 1. *prepare* a [`Descriptor`] with [`Channel::prep_memcpy`] or
//!    [`Channel::prep_memcpy_sg`] (`dmaengine_prep_dma_memcpy[_sg]()`); these are `unsafe`:
//!    the caller promises the memory stays valid until the transfer is over;
//! 2. optionally attach a completion callback, [`Descriptor::set_callback`];
//! 3. [`Descriptor::submit`] it (`dmaengine_submit()`): it is queued, with a [`Cookie`],
//!    and does **not** run yet;
//! 4. [`Channel::issue_pending`] (`dma_async_issue_pending()`) starts everything submitted;
//! 5. completion: the callback runs on the channel's thread with the outcome, and
//!    [`Channel::tx_status`] / [`Channel::wait`] report a cookie's [`Status`];
//! 6. [`Channel::terminate_sync`] (`dmaengine_terminate_sync()`) aborts whatever is queued
//!    or running and returns once the channel will never touch that memory again.
//!
//! # The `soft` provider
//!
//! [`Device::soft`] makes a device whose channels are worker threads, pinned round-robin to
//! the CPUs when the system allows it. A worker takes issued descriptors one at a time and
//! copies their bytes with non-temporal stores, checking between chunks whether the
//! channel is being terminated. It has [`Caps::MEMCPY`], [`Caps::MEMCPY_SG`] (unless
//! configured without) and [`Caps::PRIVATE`] (unless configured shared).
//!
//! Its [`FaultPlan`] injects the failures a real engine has: descriptor *k* of the device
//! (counted in submit order from 0) fails with `EIO` after a partial copy, or never
//! completes, and the worker may run issued descriptors newest first so that completions
//! arrive out of order. The plan can be changed at any time with [`Device::set_faults`].

mod channel;
mod device;

pub use channel::{Callback, Channel, Descriptor};
pub use device::{Chan, Device, FaultPlan, MAX_SOFT_CHANNELS, SharedChan, SoftConfig};

use std::ops::{BitOr, BitOrAssign};
use std::sync::Arc;

use crate::copy::CopyPair;
use crate::sys::Errno;

macro_rules! flag_set {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $flag:ident = $bit:expr;)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name(u32);

        impl $name {
            $($(#[$fmeta])* pub const $flag: Self = Self($bit);)*

            /// No flag set.
            pub const fn empty() -> Self {
                Self(0)
            }

            /// The raw bits.
            pub const fn bits(self) -> u32 {
                self.0
            }

            /// Whether every flag of `other` is set in `self`.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// The flags of `self` that are not in `other`.
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }
        }

        impl BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                Self(self.0 | rhs.0)
            }
        }

        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0;
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut set = f.debug_set();
                $(if self.contains(Self::$flag) && Self::$flag.0 != 0 {
                    set.entry(&format_args!("{}", stringify!($flag)));
                })*
                set.finish()
            }
        }
    };
}

flag_set! {
    /// What a device can do (`dma_cap_mask_t`).
    Caps {
        /// Memory-to-memory copy of one contiguous range (`DMA_MEMCPY`).
        MEMCPY = 1 << 0;
        /// Memory-to-memory copy of a scatter list in one descriptor (`DMA_MEMCPY_SG`).
        MEMCPY_SG = 1 << 1;
        /// Channels are only handed out exclusively, never shared (`DMA_PRIVATE`).
        PRIVATE = 1 << 2;
    }
}

flag_set! {
    /// Flags of a prepared transfer (`enum dma_ctrl_flags`). The soft provider accepts
    /// them for fidelity and runs every descriptor's callback whatever they say.
    PrepFlags {
        /// Signal completion of this descriptor (`DMA_PREP_INTERRUPT`).
        INTERRUPT = 1 << 0;
        /// The client does not reuse the descriptor (`DMA_CTRL_ACK`).
        CTRL_ACK = 1 << 1;
    }
}

/// One contiguous piece of a scatter list: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub addr: usize,
    /// Bytes.
    pub len: usize,
}

impl Segment {
    /// A segment of `len` bytes at `addr`.
    pub const fn new(addr: usize, len: usize) -> Self {
        Self { addr, len }
    }
}

/// The handle of a submitted descriptor (`dma_cookie_t`): per channel, starting at 1 and
/// increasing by one with every submit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cookie(u64);

impl Cookie {
    /// The cookie's number.
    pub const fn value(self) -> u64 {
        self.0
    }
}

/// Where a submitted descriptor stands (`enum dma_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Its copy is complete (`DMA_COMPLETE`).
    Complete,
    /// Submitted and not finished: waiting for `issue_pending`, queued, running, or stuck
    /// (`DMA_IN_PROGRESS`).
    InProgress,
    /// It failed or was aborted by `terminate_sync`; its destination may hold part of the
    /// data (`DMA_ERROR`).
    Error,
}

/// Pairs two scatter lists of the same total length into contiguous copies, cutting at
/// every segment boundary of either list: the pieces a scatter-gather copy is made of when
/// the two lists are split differently.
///
/// # Errors
/// `EINVAL` when a list is empty, holds an empty segment or a segment that wraps the
/// address space, or the totals differ.
///
/// # Examples
/// ```
/// use pagemig::dma::{Segment, pair_segments};
///
/// let dst = [Segment::new(0x10000, 0x3000)];
/// let src = [Segment::new(0x1000, 0x1000), Segment::new(0x5000, 0x2000)];
/// let pieces = pair_segments(&dst, &src)?;
/// assert_eq!(pieces.len(), 2);
/// assert_eq!((pieces[1].dst, pieces[1].src, pieces[1].len), (0x11000, 0x5000, 0x2000));
/// # Ok::<(), pagemig::sys::Errno>(())
/// ```
pub fn pair_segments(dst: &[Segment], src: &[Segment]) -> Result<Vec<CopyPair>, Errno> {
    let total = |list: &[Segment]| -> Result<usize, Errno> {
        if list.is_empty() {
            return Err(Errno::INVAL);
        }
        list.iter().try_fold(0usize, |sum, s| {
            if s.len == 0 || s.addr.checked_add(s.len).is_none() {
                return Err(Errno::INVAL);
            }
            sum.checked_add(s.len).ok_or(Errno::INVAL)
        })
    };
    if total(dst)? != total(src)? {
        return Err(Errno::INVAL);
    }
    let mut pieces = Vec::with_capacity(dst.len().max(src.len()));
    let (mut d, mut s) = (0, 0);
    let (mut d_off, mut s_off) = (0, 0);
    while d < dst.len() && s < src.len() {
        let len = (dst[d].len - d_off).min(src[s].len - s_off);
        pieces.push(CopyPair { dst: dst[d].addr + d_off, src: src[s].addr + s_off, len });
        d_off += len;
        s_off += len;
        if d_off == dst[d].len {
            d += 1;
            d_off = 0;
        }
        if s_off == src[s].len {
            s += 1;
            s_off = 0;
        }
    }
    Ok(pieces)
}

/// Whether any destination piece overlaps any source piece (a sweep over both lists in
/// address order).
pub(crate) fn any_overlap(pieces: &[CopyPair]) -> bool {
    let mut dst: Vec<(usize, usize)> = pieces.iter().map(|p| (p.dst, p.dst + p.len)).collect();
    let mut src: Vec<(usize, usize)> = pieces.iter().map(|p| (p.src, p.src + p.len)).collect();
    dst.sort_unstable();
    src.sort_unstable();
    let (mut i, mut j) = (0, 0);
    while i < dst.len() && j < src.len() {
        let (a, b) = (dst[i], src[j]);
        if a.0 < b.1 && b.0 < a.1 {
            return true;
        }
        if a.1 <= b.1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    false
}

/// The devices registered with [`register_device`], in registration order.
static DEVICES: std::sync::Mutex<Vec<Arc<Device>>> = std::sync::Mutex::new(Vec::new());

/// Makes `device` available to [`request_chan_by_mask`] and [`find_channel`]
/// (`dma_async_device_register()`).
///
/// # Errors
/// `EEXIST` when this device, or another with the same name, is registered.
pub fn register_device(device: Arc<Device>) -> Result<(), Errno> {
    let mut devices = DEVICES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if devices.iter().any(|d| Arc::ptr_eq(d, &device) || d.name() == device.name()) {
        return Err(Errno::EXIST);
    }
    devices.push(device);
    Ok(())
}

/// Withdraws `device` from the registry (`dma_async_device_unregister()`). Channels
/// already handed out stay usable until released.
///
/// # Errors
/// `EINVAL` when `device` is not registered.
pub fn unregister_device(device: &Arc<Device>) -> Result<(), Errno> {
    let mut devices = DEVICES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let at = devices.iter().position(|d| Arc::ptr_eq(d, device)).ok_or(Errno::INVAL)?;
    devices.remove(at);
    Ok(())
}

/// The registered devices, in registration order.
pub fn devices() -> Vec<Arc<Device>> {
    DEVICES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

/// Takes a free channel with every capability of `mask` from the first registered device
/// that has one (`dma_request_chan_by_mask()`), for the caller's exclusive use.
///
/// # Errors
/// `ENODEV` when no registered device has a free channel with those capabilities.
pub fn request_chan_by_mask(mask: Caps) -> Result<Chan, Errno> {
    devices().iter().find_map(|d| d.request_chan(mask).ok()).ok_or(Errno::NODEV)
}

/// A channel with every capability of `mask`, possibly shared with other users
/// (`dma_find_channel()`): the least shared one of the first registered device that is not
/// [`Caps::PRIVATE`] and has a channel nobody holds exclusively.
pub fn find_channel(mask: Caps) -> Option<SharedChan> {
    devices().iter().find_map(|d| d.find_channel(mask))
}

/// The process-wide soft device of [`soft_default`], once made.
static DEFAULT: std::sync::Mutex<Option<Arc<Device>>> = std::sync::Mutex::new(None);

/// Takes the device registry's locks for a `fork()` in progress (see `migrate::fork`), in
/// the lock order.
/// Makes every `fork()` from now on hold the devices' locks.
fn hold_at_fork() {
    static STEP: crate::process::AtFork = crate::process::AtFork::holding(hold_for_fork);
    crate::process::at_fork(crate::process::ForkRank::Dma, &STEP);
}

fn hold_for_fork(held: &mut Vec<Box<dyn std::any::Any>>) {
    held.push(Box::new(DEFAULT.lock().unwrap_or_else(std::sync::PoisonError::into_inner)));
    held.push(Box::new(DEVICES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)));
}

/// The process-wide soft device `soft0`, with 16 channels and the default
/// [`SoftConfig`], made and registered on the first call.
///
/// # Errors
/// The errno of making it, or `EEXIST` when another device named `soft0` is registered;
/// the next call tries again.
pub fn soft_default() -> Result<Arc<Device>, Errno> {
    hold_at_fork();
    let mut slot = DEFAULT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(device) = slot.as_ref() {
        return Ok(device.clone());
    }
    let device = Device::soft("soft0", 16, SoftConfig::default())?;
    register_device(device.clone())?;
    *slot = Some(device.clone());
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: usize, len: usize) -> Segment {
        Segment::new(addr, len)
    }

    #[test]
    fn pairing_cuts_at_every_boundary() {
        let dst = [seg(0x100, 0x30), seg(0x200, 0x10)];
        let src = [seg(0x1000, 0x10), seg(0x2000, 0x28), seg(0x3000, 0x8)];
        let p: Vec<_> = pair_segments(&dst, &src).unwrap().iter().map(|p| (p.dst, p.src, p.len)).collect();
        assert_eq!(p, [(0x100, 0x1000, 0x10), (0x110, 0x2000, 0x20), (0x200, 0x2020, 0x8), (0x208, 0x3000, 0x8)]);
        assert_eq!(pair_segments(&[seg(0x100, 0x10)], &[seg(0x0, 0x10)]).unwrap().len(), 1);
    }

    #[test]
    fn pairing_refuses_bad_lists() {
        assert_eq!(pair_segments(&[], &[seg(0, 1)]), Err(Errno::INVAL));
        assert_eq!(pair_segments(&[seg(0, 1)], &[]), Err(Errno::INVAL));
        assert_eq!(pair_segments(&[seg(0, 2)], &[seg(8, 1)]), Err(Errno::INVAL));
        assert_eq!(pair_segments(&[seg(0, 0), seg(0, 1)], &[seg(8, 1)]), Err(Errno::INVAL));
        assert_eq!(pair_segments(&[seg(usize::MAX, 2)], &[seg(8, 2)]), Err(Errno::INVAL));
    }

    #[test]
    fn overlap_sweep() {
        let p = |dst, src, len| CopyPair { dst, src, len };
        assert!(!any_overlap(&[p(0, 100, 50), p(50, 150, 50)]));
        assert!(any_overlap(&[p(0, 100, 50), p(120, 150, 50)]));
        assert!(any_overlap(&[p(0, 40, 50)]));
        assert!(!any_overlap(&[p(200, 0, 100), p(300, 100, 100)]));
    }

    #[test]
    fn flags_compose() {
        let caps = Caps::MEMCPY | Caps::PRIVATE;
        assert!(caps.contains(Caps::MEMCPY));
        assert!(!caps.contains(Caps::MEMCPY_SG));
        assert!(caps.contains(Caps::empty()));
        assert_eq!(caps.difference(Caps::PRIVATE), Caps::MEMCPY);
        assert_eq!(format!("{caps:?}"), "{MEMCPY, PRIVATE}");
    }
}
