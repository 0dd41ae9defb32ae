//! Devices, the soft provider's configuration and fault plan, and the channel handles
//! clients hold.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crate::lock::Mutex;

use super::Caps;
use super::channel::{Channel, DeviceShared};
use crate::process::MadeIn;
use crate::sys::Errno;

/// The most channels a soft device may have.
pub const MAX_SOFT_CHANNELS: usize = 64;

/// Faults the soft provider injects. Descriptors are counted per device, in submit order,
/// from 0 ([`Device::descriptors_submitted`] is the index the next one gets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// This descriptor copies part of its first segment, then fails: its callback gets
    /// `EIO` and its status is `Error`.
    pub fail_descriptor: Option<u64>,
    /// This descriptor is parked by the worker: it stays `InProgress` and its callback is
    /// never called, until `terminate_sync` aborts it. The channel goes on with the others.
    pub never_complete: Option<u64>,
    /// The worker runs the issued descriptors newest first, so that completions (and
    /// callbacks) arrive out of submit order.
    pub out_of_order: bool,
}

/// How a soft device is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftConfig {
    /// Faults to inject from the start (see [`Device::set_faults`]).
    pub faults: FaultPlan,
    /// Whether the device has [`Caps::MEMCPY_SG`] (default: yes).
    pub memcpy_sg: bool,
    /// Whether the device has [`Caps::PRIVATE`], handing out no shared channels
    /// (default: yes, like the engines DCBM was written for).
    pub private: bool,
    /// Whether to pin each worker to a CPU, round-robin (default: yes; a refusal is
    /// ignored).
    pub pin: bool,
}

impl Default for SoftConfig {
    fn default() -> Self {
        Self { faults: FaultPlan::default(), memcpy_sg: true, private: true, pin: true }
    }
}

/// Who holds a channel.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    exclusive: bool,
    shared: usize,
}

/// A DMA provider (`struct dma_device`): a name, capabilities and channels.
pub struct Device {
    name: String,
    caps: Caps,
    shared: Arc<DeviceShared>,
    channels: Vec<Channel>,
    usage: Mutex<Vec<Usage>>,
    workers: Vec<JoinHandle<()>>,
    /// The process whose threads serve the channels: a forked child has none.
    made: MadeIn,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("caps", &self.caps)
            .field("channels", &self.channels.len())
            .field("faults", &self.faults())
            .finish()
    }
}

/// The next CPU a soft worker is pinned to: channels of all devices spread round-robin.
static NEXT_CPU: AtomicUsize = AtomicUsize::new(0);

impl Device {
    /// Whether the channels' worker threads run in this process (not in a forked child
    /// of the one that made the device, where they do not exist).
    pub fn served_here(&self) -> bool {
        self.made.is_here()
    }

    /// Makes a soft device named `name` with `nr_channels` channels, each a worker thread
    /// that runs the channel's issued descriptors.
    ///
    /// # Errors
    /// `EINVAL` for an empty name or a channel count outside 1..=[`MAX_SOFT_CHANNELS`];
    /// the errno of a failed thread creation.
    pub fn soft(name: &str, nr_channels: usize, config: SoftConfig) -> Result<Arc<Self>, Errno> {
        if name.is_empty() || !(1..=MAX_SOFT_CHANNELS).contains(&nr_channels) {
            return Err(Errno::INVAL);
        }
        let mut caps = Caps::MEMCPY;
        if config.memcpy_sg {
            caps |= Caps::MEMCPY_SG;
        }
        if config.private {
            caps |= Caps::PRIVATE;
        }
        let shared = Arc::new(DeviceShared::default());
        *shared.faults.lock() = config.faults;
        let channels: Vec<Channel> =
            (0..nr_channels).map(|i| Channel::new(format!("{name}chan{i}"), caps, shared.clone())).collect();
        let cpus = if config.pin { crate::sys::allowed_cpus() } else { Vec::new() };
        let mut workers = Vec::with_capacity(nr_channels);
        for chan in &channels {
            let cpu = (!cpus.is_empty()).then(|| cpus[NEXT_CPU.fetch_add(1, Ordering::Relaxed) % cpus.len()]);
            let body = chan.worker();
            let spawned = crate::sys::thread::spawn(chan.name(), move || {
                if let Some(cpu) = cpu {
                    // Pinning is an optimisation; a refusal (cgroup, seccomp) is fine.
                    let _ = crate::sys::pin_to_cpu(cpu);
                }
                body()
            });
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    for chan in &channels {
                        chan.shutdown();
                    }
                    for handle in workers {
                        let _ = handle.join();
                    }
                    return Err(e.raw_os_error().map_or(Errno::AGAIN, Errno::from_raw_os_error));
                }
            }
        }
        let usage = Mutex::new(vec![Usage::default(); nr_channels]);
        Ok(Arc::new(Self {
            name: name.to_string(),
            caps,
            shared,
            channels,
            usage,
            workers,
            made: MadeIn::this_process(),
        }))
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its capabilities.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// How many channels it has.
    pub fn nr_channels(&self) -> usize {
        self.channels.len()
    }

    /// How many channels nobody holds, exclusively or shared.
    pub fn free_channels(&self) -> usize {
        self.usage.lock().iter().filter(|u| !u.exclusive && u.shared == 0).count()
    }

    /// Takes a free channel for the caller's exclusive use (the per-device half of
    /// `dma_request_chan_by_mask()`): one that nobody holds, exclusively or shared.
    ///
    /// # Errors
    /// `ENODEV` when the device lacks a capability of `mask` ([`Caps::PRIVATE`] aside) or
    /// has no free channel.
    pub fn request_chan(self: &Arc<Self>, mask: Caps) -> Result<Chan, Errno> {
        if !self.caps.contains(mask.difference(Caps::PRIVATE)) {
            return Err(Errno::NODEV);
        }
        let mut usage = self.usage.lock();
        let index = usage.iter().position(|u| !u.exclusive && u.shared == 0).ok_or(Errno::NODEV)?;
        usage[index].exclusive = true;
        Ok(Chan { device: self.clone(), index })
    }

    /// A channel to share with other users (the per-device half of `dma_find_channel()`):
    /// the least shared of those nobody holds exclusively. `None` when the device is
    /// [`Caps::PRIVATE`], lacks a capability of `mask`, or every channel is held
    /// exclusively.
    pub fn find_channel(self: &Arc<Self>, mask: Caps) -> Option<SharedChan> {
        if self.caps.contains(Caps::PRIVATE) || !self.caps.contains(mask.difference(Caps::PRIVATE)) {
            return None;
        }
        let mut usage = self.usage.lock();
        let index = (0..usage.len()).filter(|&i| !usage[i].exclusive).min_by_key(|&i| usage[i].shared)?;
        usage[index].shared += 1;
        Some(SharedChan { device: self.clone(), index })
    }

    /// The faults injected now.
    pub fn faults(&self) -> FaultPlan {
        *self.shared.faults.lock()
    }

    /// Changes the faults to inject; a descriptor the workers have not picked up yet is
    /// judged by the new plan.
    pub fn set_faults(&self, plan: FaultPlan) {
        *self.shared.faults.lock() = plan;
    }

    /// Descriptors submitted to the device so far: the index the next one gets in a
    /// [`FaultPlan`].
    pub fn descriptors_submitted(&self) -> u64 {
        self.shared.submitted.load(Ordering::SeqCst)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if !self.served_here() {
            // A forked child: the workers are the parent's; nothing here to stop or join.
            std::mem::take(&mut self.workers).into_iter().for_each(std::mem::forget);
            return;
        }
        for chan in &self.channels {
            chan.shutdown();
        }
        let me = std::thread::current().id();
        for handle in self.workers.drain(..) {
            // The last reference may go away inside a callback, on a worker: that worker
            // exits by itself once the callback returns.
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}

/// A channel held exclusively (the `struct dma_chan *` of `dma_request_chan_by_mask()`).
/// Releasing it (drop, or [`Chan::release`]) aborts what is still queued on it, as
/// [`Channel::terminate_sync`], and makes it free again (`dma_release_channel()`).
pub struct Chan {
    device: Arc<Device>,
    index: usize,
}

impl Chan {
    /// The device the channel belongs to.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Gives the channel back (`dma_release_channel()`).
    pub fn release(self) {}
}

impl Deref for Chan {
    type Target = Channel;

    fn deref(&self) -> &Channel {
        &self.device.channels[self.index]
    }
}

impl Drop for Chan {
    fn drop(&mut self) {
        self.terminate_sync();
        self.device.usage.lock()[self.index].exclusive = false;
    }
}

impl std::fmt::Debug for Chan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Chan").field(&self.name()).finish()
    }
}

/// A channel that other users may hold too (the result of `dma_find_channel()`).
/// Dropping it only gives up this user's share; `terminate_sync` on it aborts every user's
/// transfers.
pub struct SharedChan {
    device: Arc<Device>,
    index: usize,
}

impl SharedChan {
    /// The device the channel belongs to.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl Deref for SharedChan {
    type Target = Channel;

    fn deref(&self) -> &Channel {
        &self.device.channels[self.index]
    }
}

impl Drop for SharedChan {
    fn drop(&mut self) {
        let mut usage = self.device.usage.lock();
        usage[self.index].shared = usage[self.index].shared.saturating_sub(1);
    }
}

impl std::fmt::Debug for SharedChan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SharedChan").field(&self.name()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::watchdog;

    #[test]
    fn configuration_sets_the_capabilities() {
        watchdog(60, || {
            let d = Device::soft(
                "u-caps",
                1,
                SoftConfig { memcpy_sg: false, private: false, pin: false, ..Default::default() },
            )
            .unwrap();
            assert_eq!(d.caps(), Caps::MEMCPY);
            let d = Device::soft("u-caps2", 2, SoftConfig::default()).unwrap();
            assert_eq!(d.caps(), Caps::MEMCPY | Caps::MEMCPY_SG | Caps::PRIVATE);
            assert_eq!((d.nr_channels(), d.free_channels()), (2, 2));
            // A private device still hands out exclusive channels asked for with PRIVATE.
            let c = d.request_chan(Caps::MEMCPY | Caps::PRIVATE).unwrap();
            assert_eq!(d.free_channels(), 1);
            drop(c);
            assert_eq!(d.free_channels(), 2);
        });
    }

    #[test]
    fn faults_change_at_run_time() {
        watchdog(60, || {
            let d = Device::soft("u-faults", 1, SoftConfig::default()).unwrap();
            assert_eq!(d.faults(), FaultPlan::default());
            let plan = FaultPlan { fail_descriptor: Some(3), never_complete: Some(5), out_of_order: true };
            d.set_faults(plan);
            assert_eq!(d.faults(), plan);
            assert_eq!(d.descriptors_submitted(), 0);
        });
    }
}
