//! The event reader: what the program does to memory under migration, learnt from
//! userfaultfd's non-cooperative events.
//!
//! `madvise(MADV_DONTNEED/FREE/REMOVE)` and `mremap` of a registered range hold the thread
//! that calls them until the event is read. The reader polls the descriptor and reads under
//! the claims lock ([`super::busy`]), so a move in progress finishes before the program is
//! released, and every move after that sees the event:
//!
//! - **Remove** (sent before the pages go): the purged part of a claim is *dead*: it is
//!   never moved into or put back, and its folios fail with `ENOENT`. A purge of the new
//!   pages, announced after the move, purges them as the program asked.
//! - **Unmap** (sent after `munmap`, before it returns): the unmapped part of a claim is
//!   dead too, so that a mapping made there afterwards (by another thread, and migrated by
//!   another call) never receives pages of the old one.
//! - **Remap** (sent after the move): the moved part of a claim is dead at its old address;
//!   old pages already isolated from it are moved to the new address, and the registration
//!   and protection that travelled with the mapping are taken off there, waking its threads.
//!
//! Fault messages are read and dropped: a thread waiting on a protected or isolated page
//! sleeps until the migration wakes it, and one that touched a never-touched page of a
//! call's runs until the call ends.
#![allow(unsafe_code, reason = "puts the old pages of a range the program moved at its new address")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::busy::{Busy, Claims};
use crate::sys::uffd::{Event, Uffd};
use crate::sys::{self, Errno};

/// How long one poll waits, in milliseconds: the reader's delay in noticing it should stop.
const POLL_MS: i32 = 50;

/// The reader thread; dropping it stops the thread.
#[derive(Debug)]
pub(super) struct Reader {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts reading `uffd`'s events, excluding the moves recorded in `busy`.
    ///
    /// # Errors
    /// `EAGAIN` when no thread can be started.
    pub fn spawn(uffd: Arc<Uffd>, busy: Arc<Busy>) -> Result<Self, Errno> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = crate::sys::thread::spawn("pagemig-events", move || {
            while !flag.load(Ordering::Relaxed) {
                match uffd.poll(POLL_MS) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    // The program closed the descriptor or put a file of its own at its
                    // number: given up (see `Uffd::check`), and this thread ends.
                    Err(_) => return,
                }
                let mut claims = busy.lock();
                // Reading releases the threads the events held: under the lock.
                match uffd.read_messages() {
                    Ok(events) => {
                        for event in events {
                            handle(&uffd, &mut claims, event);
                        }
                    }
                    Err(_) if uffd.is_lost() => return,
                    // Not seen from a userfaultfd that polled readable; were it to happen,
                    // wait a poll's time rather than spin.
                    Err(_) => {
                        drop(claims);
                        std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                    }
                }
            }
        })
        .map_err(|_| Errno::AGAIN)?;
        Ok(Self { stop, handle: Some(handle) })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn handle(uffd: &Uffd, claims: &mut Claims, event: Event) {
    match event {
        // Its thread waits until the migration (or the end of the call) wakes it.
        Event::Missing { .. } => {}
        // Unmapped: whatever is mapped there next is not the program's old memory, and no
        // move may land in it.
        Event::Remove { start, end } | Event::Unmap { start, end } => {
            claims.mark_dead(start, end);
        }
        Event::Remap { from, to, len } => {
            claims.mark_dead(from, from + len);
            for (s, e, g) in claims.take_isolated(from, from + len) {
                // Copied, not moved: a copy into the graveyard's destination may be reading
                // them right now. The program's thread finishing its `mremap` may hold the
                // kernel back for a moment (`EAGAIN`).
                // The `mremap` also unmapped the old range, and the kernel refuses copies
                // until that event is read too: read and handle what follows meanwhile, with
                // the lock still held (no move may free this graveyard before the copy).
                let deadline = Instant::now() + Duration::from_secs(2);
                let mut done = 0;
                while let Err((copied, Errno::AGAIN)) =
                    // SAFETY: `g` holds the old pages of `[s, e)`, which the program moved to
                    // `to + (s - from)`; that range came with the registration (its accesses
                    // wait) and is empty there: it receives exactly its own data.
                    unsafe { uffd.copy(to + (s - from) + done, g + done, e - s - done) }
                {
                    done += copied;
                    if Instant::now() >= deadline {
                        break;
                    }
                    for later in uffd.read_messages().unwrap_or_default() {
                        handle(uffd, claims, later);
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                super::fork::close((e - s) / sys::PAGE_SIZE);
            }
            release_moved(uffd, claims, to, len);
        }
    }
}

/// Takes registration and protection off the mapping `mremap` put at `to` (`len` bytes of
/// it were registered; a grown mapping is registered to its end), except where it meets a
/// range still claimed; unregistering wakes its threads.
fn release_moved(uffd: &Uffd, claims: &mut Claims, to: usize, len: usize) {
    let end = crate::maps::vmas()
        .ok()
        .and_then(|vmas| vmas.into_iter().find(|v| v.start <= to && to < v.end))
        .map_or(to + len, |v| v.end.max(to + len));
    for (s, e) in claims.unclaimed_in(to, end) {
        let _ = uffd.unregister(s, e - s);
    }
}
