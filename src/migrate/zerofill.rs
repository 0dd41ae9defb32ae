//! The fault handler of the engine's own mappings: destinations left empty for
//! `UFFDIO_COPY` and graveyards, both registered in missing mode with the second
//! userfaultfd.
//!
//! The pipeline fills an empty destination with `UFFDIO_COPY` and never otherwise touches a
//! page of ours that has none. A store into one all the same (a migrator that copies with
//! its own stores into the destinations it was handed) would wait on that descriptor for
//! ever; this thread answers such a fault with a page of zeros, after which the store goes
//! on as into any fresh page. It costs the zeroing the empty destination was meant to
//! save, never a byte.
#![allow(unsafe_code, reason = "fills a missing page of the engine's own mappings with zeros")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crate::sys::uffd::{Event, Uffd};
use crate::sys::{self, Errno};

/// How long one poll waits, in milliseconds: the delay in noticing it should stop.
const POLL_MS: i32 = 100;

/// A page of zeros to copy from.
#[repr(align(4096))]
struct ZeroPage([u8; sys::PAGE_SIZE]);

static ZEROS: ZeroPage = ZeroPage([0; sys::PAGE_SIZE]);

/// How many faults [`answer_with_zeros`] answered in this process, counted before each
/// answer: a graveyard mapped before the count last changed may have been given a page
/// (and a page table) by a stranger's read ([`super::reaper`]).
static ANSWERS: AtomicU64 = AtomicU64::new(0);

/// The count of answered faults ([`ANSWERS`]).
pub(super) fn answers() -> u64 {
    ANSWERS.load(Ordering::SeqCst)
}

/// The address of a page of zeros, to copy from.
pub(super) fn zero_page() -> usize {
    ZEROS.0.as_ptr() as usize
}

/// Answers a missing fault at `addr` with a page of zeros (`UFFDIO_COPY`) and wakes the
/// threads waiting there; `EEXIST` (filled meanwhile) wakes them all the same.
///
/// # Safety
/// The page of `addr`, registered with `uffd`, must be one whose faulting threads would
/// read zeros from a fresh page: a page nobody fills with anything else.
pub(super) unsafe fn answer_with_zeros(uffd: &Uffd, addr: usize) {
    let page = addr & !(sys::PAGE_SIZE - 1);
    ANSWERS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as this function's contract.
    let _ = unsafe { uffd.copy(page, zero_page(), sys::PAGE_SIZE) };
    let _ = uffd.wake(page, sys::PAGE_SIZE);
}

/// The handler thread; dropping it stops the thread.
#[derive(Debug)]
pub(super) struct ZeroFill {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl ZeroFill {
    /// Starts answering `uffd`'s missing-page faults with zeros.
    ///
    /// # Errors
    /// `EAGAIN` when no thread can be started.
    pub fn spawn(uffd: Arc<Uffd>) -> Result<Self, Errno> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = crate::sys::thread::spawn("pagemig-zerofill", move || {
            while !flag.load(Ordering::Relaxed) {
                match uffd.poll(POLL_MS) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    // Not the engine's descriptor any more: given up, and this thread ends.
                    Err(_) => return,
                }
                let events = match uffd.read_messages() {
                    Ok(events) => events,
                    Err(_) if uffd.is_lost() => return,
                    Err(_) => {
                        std::thread::sleep(std::time::Duration::from_millis(POLL_MS as u64));
                        continue;
                    }
                };
                for event in events {
                    if let Event::Missing { addr } = event {
                        // SAFETY: only the engine's own empty destinations and graveyards
                        // are registered here; the faulting thread waits for this page
                        // and, on a fresh page, would have read zeros.
                        unsafe { answer_with_zeros(&uffd, addr) };
                    }
                }
            }
        })
        .map_err(|_| Errno::AGAIN)?;
        Ok(Self { stop, handle: Some(handle) })
    }
}

impl Drop for ZeroFill {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
