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
//!   old pages already isolated from it are copied to the new address (following it where
//!   later events move it on, dropped where they unmap or purge it), and the registration
//!   and protection that travelled with the mapping are taken off there, waking its threads.
//!
//! Fault messages are read and dropped: a thread waiting on a protected or isolated page
//! sleeps until the migration wakes it, and one that touched a never-touched page of a
//! call's runs until the call ends.
#![allow(unsafe_code, reason = "puts the old pages of a range the program moved at its new address")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Span;
use super::busy::{Busy, Claims};
use super::fork::Empty;
use crate::backoff::Backoff;
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
                    Ok(events) => handle_all(&uffd, &mut claims, events),
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

/// What the events of one read leave to do once they are all handled: old pages to put
/// where the program moved their memory, and moved mappings to release.
///
/// Both are addresses the program may move again (or unmap, or purge) before they are
/// dealt with: reading an event releases the thread that caused it, which may `mremap`
/// the same memory on at once. Each later event is applied to them, so the old pages go
/// where the memory is when they are put back, and none are put into memory the program
/// unmapped or purged.
#[derive(Debug, Default)]
struct Moved {
    /// Old pages on their way home: `(where they go, where they are, bytes)`.
    homing: Vec<(usize, usize, usize)>,
    /// Mappings `mremap` put elsewhere, to be released once their old pages are home.
    release: Vec<Span>,
    /// The pages of `homing`, counted empty for the fork barrier until they are home (or
    /// given up): taken from the claims with the spans.
    empty: Empty,
}

impl Moved {
    /// `len` bytes at `from` now lie at `to`: what was bound for them follows.
    fn follow(&mut self, from: usize, to: usize, len: usize) {
        let end = from + len;
        let moved = |a: usize| to + (a - from);
        let mut homing = Vec::with_capacity(self.homing.len());
        for (dst, grave, n) in self.homing.drain(..) {
            for (a, b, inside) in split(dst, dst + n, from, end) {
                homing.push((if inside { moved(a) } else { a }, grave + (a - dst), b - a));
            }
        }
        self.homing = homing;
        let mut release = Vec::with_capacity(self.release.len());
        for (s, e) in self.release.drain(..) {
            for (a, b, inside) in split(s, e, from, end) {
                release.push(if inside { (moved(a), moved(b)) } else { (a, b) });
            }
        }
        self.release = release;
    }

    /// `[start, end)` was unmapped or purged: the old pages bound for it are not put
    /// there (the program threw that memory away).
    fn discard(&mut self, start: usize, end: usize) {
        let mut homing = Vec::with_capacity(self.homing.len());
        for (dst, grave, n) in self.homing.drain(..) {
            for (a, b, inside) in split(dst, dst + n, start, end) {
                if inside {
                    self.empty.close((b - a) / sys::PAGE_SIZE);
                } else {
                    homing.push((a, grave + (a - dst), b - a));
                }
            }
        }
        self.homing = homing;
    }
}

/// `[s, e)` cut at the edges of `[from, to)`: the pieces, each with whether it lies inside.
fn split(s: usize, e: usize, from: usize, to: usize) -> Vec<(usize, usize, bool)> {
    let (a, b) = (s.max(from).min(e), e.min(to).max(s));
    if a >= b {
        return vec![(s, e, false)];
    }
    [(s, a, false), (a, b, true), (b, e, false)].into_iter().filter(|&(x, y, _)| x < y).collect()
}

/// Handles the events of one read, then puts the old pages they took where their memory
/// is now and releases the moved mappings. Under the claims lock, held throughout: no move
/// may free a graveyard before its old pages are out of it.
fn handle_all(uffd: &Uffd, claims: &mut Claims, events: Vec<Event>) {
    let mut moved = Moved::default();
    for event in events {
        handle(claims, event, &mut moved);
    }
    bring_home(uffd, claims, &mut moved);
    for (to, end) in std::mem::take(&mut moved.release) {
        release_moved(uffd, claims, to, end);
    }
}

fn handle(claims: &mut Claims, event: Event, moved: &mut Moved) {
    match event {
        // Its thread waits until the migration (or the end of the call) wakes it.
        Event::Missing { .. } => {}
        // Unmapped: whatever is mapped there next is not the program's old memory, and no
        // move may land in it.
        Event::Remove { start, end } | Event::Unmap { start, end } => {
            claims.mark_dead(start, end);
            moved.discard(start, end);
        }
        Event::Remap { from, to, len } => {
            claims.mark_dead(from, from + len);
            moved.follow(from, to, len);
            let (spans, empty) = claims.take_isolated(from, from + len);
            moved.empty.merge(empty);
            for (s, e, g) in spans {
                moved.homing.push((to + (s - from), g, e - s));
            }
            // A grown mapping is registered to its end.
            let end = crate::maps::vmas()
                .ok()
                .and_then(|vmas| vmas.into_iter().find(|v| v.start <= to && to < v.end))
                .map_or(to + len, |v| v.end.max(to + len));
            moved.release.push((to, end));
        }
    }
}

/// How long the old pages of moved memory are offered to the kernel before they are given
/// up (the memory's folios fail in any case: the program moved them).
const HOMING_LIMIT: Duration = Duration::from_secs(5);

/// Puts the old pages in `moved` where the program moved their memory: copied, not moved,
/// for a copy into the graveyard's destination may be reading them right now; moved where
/// a page cannot be allocated (`ENOMEM`), as nothing will use that destination any more
/// (the memory's folios are dead). While the kernel refuses (`EAGAIN`: the program's
/// thread finishing its `mremap`, or a later event unread, which holds every copy back;
/// `ENOENT`: the memory moved on or unmapped, its event not read yet),
/// the later events are read and handled meanwhile: they may move the memory on, or
/// unmap it. What still cannot be put back is left in the graveyard, and its folios fail
/// (they are dead).
fn bring_home(uffd: &Uffd, claims: &mut Claims, moved: &mut Moved) {
    let mut backoff = Backoff::kernel().within(HOMING_LIMIT);
    while let Some(&(dst, grave, len)) = moved.homing.first() {
        // SAFETY: `grave` holds the old pages of memory the program moved to `dst` (moved
        // on with it by every later event); that range came with the registration (its
        // accesses wait) and is empty there: it receives exactly its own data.
        let result = unsafe { uffd.copy(dst, grave, len) };
        let (done, errno) = match result {
            Ok(()) => (len, None),
            Err((done, errno)) => (done, Some(errno)),
        };
        moved.empty.close(done / sys::PAGE_SIZE);
        moved.homing[0] = (dst + done, grave + done, len - done);
        let retry = match errno {
            None => false,
            // `ENOENT`: the memory is gone from `dst` and the event that says where (an
            // `mremap` on, or a `munmap`) is not read yet: the kernel looks the mapping up
            // before it checks for changes in progress.
            Some(Errno::AGAIN | Errno::NOENT) => {
                for later in uffd.read_messages().unwrap_or_default() {
                    handle(claims, later, moved);
                }
                backoff.pause()
            }
            // SAFETY: as above; the pages move instead of being copied, nothing allocated.
            Some(Errno::NOMEM) => match unsafe { uffd.move_pages(dst + done, grave + done, len - done) } {
                Ok(()) => {
                    moved.empty.close((len - done) / sys::PAGE_SIZE);
                    moved.homing[0].2 = 0;
                    false
                }
                Err((more, _)) => {
                    moved.empty.close(more / sys::PAGE_SIZE);
                    moved.homing[0] = (dst + done + more, grave + done + more, len - done - more);
                    backoff.pause()
                }
            },
            // Unmapped meanwhile with no event left unread (`ENOENT`), or given up.
            Some(_) => false,
        };
        if retry {
            // The entry may have moved, split or gone with the events just handled.
            moved.homing.retain(|&(_, _, n)| n > 0);
            continue;
        }
        let (_, _, left) = moved.homing.remove(0);
        moved.empty.close(left / sys::PAGE_SIZE);
    }
}

/// Takes registration and protection off `[to, end)`, the mapping `mremap` put there,
/// except where it meets a range still claimed; unregistering wakes its threads.
fn release_moved(uffd: &Uffd, claims: &mut Claims, to: usize, end: usize) {
    for (s, e) in claims.unclaimed_in(to, end) {
        let _ = uffd.unregister(s, e - s);
    }
}
