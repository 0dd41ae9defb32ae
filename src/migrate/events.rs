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
//!   old pages already isolated from it are copied to the new address (following the
//!   memory where later events move it on, dropped where they unmap or purge it): from
//!   their graveyard under the lock for at most a millisecond, then out of it into holdings
//!   of the reader's under the lock and from those without it. The registration and
//!   protection that travelled with the mapping are then taken off there, waking its
//!   threads.
//!
//! The threads that copy a piece of base pages read and handle the events waiting between
//! two chunks as well ([`Reader::serve_now`]). One thread handles events at a time, for
//! the whole of what they ask (the reader's `reading` lock): old pages going home without
//! the claims lock must see every later event. A copying thread leaves old pages it could
//! not put home within a millisecond to the reader thread, in holdings.
//!
//! Faults: a thread that touched an isolated base page a call lets the reader answer is
//! answered at once, its page's old contents copied in on the target node (see
//! [`answer_faults`]); one that wrote to a page still being protected is remembered and
//! woken once the page is isolated, to fault again and be answered; any other waits until
//! the migration wakes it (one that touched a never-touched page of a call's runs, until
//! the call ends).
#![allow(unsafe_code, reason = "puts the old pages of a range the program moved at its new address")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Span;
use super::busy::{Busy, Claims};
use super::fork::Empty;
use super::reaper::{self, Grave};
use crate::backoff::Backoff;
use crate::lock::{Mutex, MutexGuard};
use crate::sys::uffd::{Event, Uffd};
use crate::sys::{self, Errno};

/// How long one poll waits, in milliseconds: the reader's delay in noticing it should stop.
const POLL_MS: i32 = 50;

/// How often the reader tries to take the registration off what calls that ended left
/// registered ([`super::mover::retry_strays`]); after each round the kernel refused part
/// of, twice as long, up to [`STRAYS_MAX`].
const STRAYS_EVERY: Duration = Duration::from_millis(250);
const STRAYS_MAX: Duration = Duration::from_secs(8);

/// The reader thread; dropping it stops the thread.
#[derive(Debug)]
pub(super) struct Reader {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// What the reader thread and the copying threads that handle events share.
#[derive(Debug)]
struct Shared {
    uffd: Arc<Uffd>,
    graves: Arc<Uffd>,
    busy: Arc<Busy>,
    /// Set when the reader is to stop.
    stop: AtomicBool,
    /// Held by whichever thread handles events, for as long as it does (the claims lock is
    /// let go while old pages go home, and every event read meanwhile must be applied to
    /// what they wait for: one handler at a time), with what a copying thread left to the
    /// reader thread ([`Reader::serve_now`]).
    reading: Mutex<Option<Moved>>,
}

impl Shared {
    fn home(&self) -> Home<'_> {
        Home { uffd: &self.uffd, graves: &self.graves, busy: &self.busy, stop: &self.stop }
    }

    /// Reads and handles the events waiting, on a call's thread ([`Handler::Copier`]), with
    /// `pending`, the reading lock's, carried on with them: what a copying thread left in
    /// holdings goes home as the reader thread would take it.
    fn handle_waiting(&self, pending: &mut Option<Moved>) {
        let claims = self.busy.lock();
        if let Ok(events) = self.uffd.read_messages()
            && !events.is_empty()
        {
            let moved = pending.take().unwrap_or_default();
            *pending = handle_all(&self.home(), claims, events, moved, Handler::Copier);
        }
    }

    /// Gives up what a copying thread left the reader thread, which ends (its userfaultfd
    /// lost): the old pages stay in their holdings, freed with them, and stop counting as
    /// empty for the fork barrier.
    fn abandon(&self) {
        if let Some(mut moved) = self.reading.lock().take() {
            moved.give_up();
            moved.free_holdings(&self.graves);
        }
    }
}

impl Reader {
    /// Starts reading `uffd`'s events, excluding the moves recorded in `busy`; the
    /// reader's holdings are registered with `graves`, the graveyards' userfaultfd.
    ///
    /// # Errors
    /// `EAGAIN` when no thread can be started.
    pub fn spawn(uffd: Arc<Uffd>, graves: Arc<Uffd>, busy: Arc<Busy>) -> Result<Self, Errno> {
        let shared =
            Arc::new(Shared { uffd, graves, busy, stop: AtomicBool::new(false), reading: Mutex::new_timed(None) });
        let ours = shared.clone();
        let handle = crate::sys::thread::spawn("pagemig-events", move || {
            let Shared { uffd, busy, stop, reading, .. } = &*ours;
            let mut paused_since: Option<Instant> = None;
            let (mut strays_every, mut strays_due) = (STRAYS_EVERY, Instant::now() + STRAYS_EVERY);
            // Once it is to stop, what a copying thread left is still carried on.
            while !stop.load(Ordering::Relaxed) || reading.lock().is_some() {
                // What calls that ended left registered is taken off where it can be, while
                // no call is in progress; less often while the kernel refuses.
                if Instant::now() >= strays_due {
                    let all = super::mover::retry_strays(uffd, busy);
                    strays_every = if all { STRAYS_EVERY } else { (strays_every * 2).min(STRAYS_MAX) };
                    strays_due = Instant::now() + strays_every;
                }
                // While a call is in progress, what a copying thread left here is taken up
                // within `LEFT_MS`, with or without an event.
                let wait = if busy.any_claimed() { LEFT_MS } else { POLL_MS };
                let ready = match uffd.poll(wait) {
                    Ok(ready) => ready,
                    // The program closed the descriptor or put a file of its own at its
                    // number: given up (see `Uffd::check`), and this thread ends.
                    Err(_) => return ours.abandon(),
                };
                let mut pending = reading.lock();
                if !ready && pending.is_none() {
                    continue;
                }
                let claims = busy.lock();
                // A test's pause (`FaultInjection::pause_event_reader`): what waits is left
                // to the call's copying threads, for a while.
                if ready
                    && pending.is_none()
                    && claims.reader_paused()
                    && paused_since.get_or_insert_with(Instant::now).elapsed() < PAUSE_MAX
                {
                    drop((claims, pending));
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                paused_since = None;
                // Reading releases the threads the events held: under the lock.
                let events = if ready {
                    match uffd.read_messages() {
                        Ok(events) => events,
                        Err(_) if uffd.is_lost() => {
                            // `abandon` takes the reading lock itself.
                            drop(claims);
                            drop(pending);
                            return ours.abandon();
                        }
                        // Not seen from a userfaultfd that polled readable; were it to
                        // happen, wait a poll's time rather than spin.
                        Err(_) if pending.is_none() => {
                            drop(claims);
                            drop(pending);
                            std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                            continue;
                        }
                        Err(_) => Vec::new(),
                    }
                } else {
                    Vec::new()
                };
                let moved = pending.take().unwrap_or_default();
                *pending = handle_all(&ours.home(), claims, events, moved, Handler::Reader);
            }
        })
        .map_err(|_| Errno::AGAIN)?;
        Ok(Self { shared, handle: Some(handle) })
    }

    /// Reads and handles the events waiting now, on a thread of a call's between two parts
    /// of its work, as the reader thread would ([`Handler::Copier`]). A thread of the
    /// program that faulted on a page the copy isolated is answered within a part's time,
    /// not once the scheduler runs the reader, which on a machine with fewer CPUs than busy
    /// threads waits behind the copy itself (2-core AMD EPYC VM, one writer: up to 1.6 ms
    /// between the fault and its answer, traced). Returns at once where nothing waits (one
    /// `poll`) or the reader thread has old pages left to put home; waits up to
    /// [`SERVE_WAIT`] for another handler to be done (a reader the scheduler took the CPU
    /// from while it handled gets this thread's), then leaves the events to it.
    ///
    /// It never waits on the calling thread's own work, and on the program's other
    /// threads only where no holding can be mapped for the old pages of memory they moved
    /// (up to 5 s, under the claims lock, as the reader thread would).
    ///
    /// Returns false where events wait and were left to another handler.
    pub fn serve_now(&self) -> bool {
        let shared = &*self.shared;
        if !shared.uffd.has_messages() {
            return true;
        }
        let Some(mut pending) = shared.reading.try_lock_for(SERVE_WAIT) else { return false };
        if pending.is_some() {
            // The reader thread carries on with what is left first.
            return false;
        }
        shared.handle_waiting(&mut pending);
        true
    }

    /// As a call ends: reads and handles the events waiting (on the calling thread, as
    /// [`Reader::serve_now`] does), then runs `f` with the claims lock held, no event read
    /// by anyone in between. The call's end takes its registration off in `f`: an event the
    /// program's purge raised while it was registered is so read while it still is, and
    /// the end keeps what it purged registered as long as its purge is recorded
    /// ([`Claims::purges_to_keep`]), so that an unmap of it is seen. Read after the
    /// registration went, the purge stayed recorded for a second with no unmap to be seen,
    /// and fresh memory the program mapped there failed with `ENOENT` where the kernel
    /// would move it. (A purge begun in the moment between this read and the
    /// unregistration still is: see the README's Limits.) `wait`: runs first, with the
    /// events held unread (`FaultInjection::end_handshake`).
    ///
    /// The reading lock is waited for however long the reader thread holds it: it does
    /// while it puts old pages home without the claims lock, into memory the program moved,
    /// which a call that began since may have registered among its runs; that call's end
    /// taking the registration off meanwhile would make those pages fail to go home, and
    /// the program would read zeros there. (The kernel refuses them for as long as the
    /// program's threads purge registered memory: the end waits as long.)
    pub fn after_events<R>(&self, wait: impl FnOnce(), f: impl FnOnce(&mut MutexGuard<'_, Claims>) -> R) -> R {
        let shared = &*self.shared;
        let mut pending = shared.reading.lock();
        wait();
        // What the reader thread left to do (old pages in holdings on their way home) is
        // carried on with these events, as the reader thread would.
        if shared.uffd.has_messages() {
            shared.handle_waiting(&mut pending);
        }
        let mut claims = shared.busy.lock();
        let done = f(&mut claims);
        drop(claims);
        drop(pending);
        done
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
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
    /// Old pages on their way home: `(where they go, where they are, bytes, held)`, where
    /// they are being a graveyard or, `held`, one of `holdings` ([`detach`]).
    homing: Vec<(usize, usize, usize, bool)>,
    /// Copies of old pages out of their graveyards, the reader's own: a graveyard may be
    /// freed once the claims lock is let go, a holding only when every entry is home.
    /// Each is mapped under the claims lock and registered with the graveyards'
    /// userfaultfd at once, so no migration registers it with the program's (every
    /// registration with that one happens under the claims lock too): unmapping it
    /// raises no event the reader itself would have to read.
    holdings: Vec<Grave>,
    /// Mappings `mremap` put elsewhere, to be released once their old pages are home.
    release: Vec<Span>,
    /// Whether a claim the events took old pages from sends them through holdings at once
    /// (`FaultInjection::home_through_holdings`).
    through_holdings: bool,
    /// The pages of `homing`, counted empty for the fork barrier until they are home (or
    /// given up): taken from the claims with the spans.
    empty: Empty,
    /// Missing faults in ranges a call left registered ([`Claims::is_stray`]) or on holes
    /// in pages a call makes its own ([`Claims::hole_while_unsharing`]), answered with
    /// zeros under the claims lock.
    strays: Vec<usize>,
    /// Other faults: answered with their old pages where they touched an isolated base
    /// page a call lets the reader answer ([`Claims::answerable`]).
    faults: Vec<usize>,
}

impl Moved {
    /// `len` bytes at `from` now lie at `to`: what was bound for them follows.
    fn follow(&mut self, from: usize, to: usize, len: usize) {
        let end = from + len;
        let moved = |a: usize| to + (a - from);
        let mut homing = Vec::with_capacity(self.homing.len());
        for (dst, src, n, held) in self.homing.drain(..) {
            for (a, b, inside) in split(dst, dst + n, from, end) {
                homing.push((if inside { moved(a) } else { a }, src + (a - dst), b - a, held));
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
        for (dst, src, n, held) in self.homing.drain(..) {
            for (a, b, inside) in split(dst, dst + n, start, end) {
                if inside {
                    self.empty.close((b - a) / sys::PAGE_SIZE);
                } else {
                    homing.push((a, src + (a - dst), b - a, held));
                }
            }
        }
        self.homing = homing;
    }

    /// `[start, end)` was unmapped: nothing goes there, and its registration is not taken
    /// off later (what is mapped there next is not pagemig's).
    fn unmapped(&mut self, start: usize, end: usize) {
        self.discard(start, end);
        let mut release = Vec::with_capacity(self.release.len());
        for (s, e) in self.release.drain(..) {
            release.extend(split(s, e, start, end).into_iter().filter(|p| !p.2).map(|(a, b, _)| (a, b)));
        }
        self.release = release;
    }

    /// Whether every entry on its way home is in a holding (none is read from a
    /// graveyard, which needs the claims lock).
    fn all_held(&self) -> bool {
        self.homing.iter().all(|h| h.3)
    }

    /// Frees the holdings: every entry is home or given up.
    fn free_holdings(&mut self, graves: &Uffd) {
        for holding in self.holdings.drain(..) {
            reaper::free(graves, &holding);
        }
    }

    /// Gives up the old pages still on their way home: they stay where they are and go
    /// with their graveyard or holding (the memory's folios fail: the program moved them).
    fn give_up(&mut self) {
        for (_, _, n, _) in self.homing.drain(..) {
            self.empty.close(n / sys::PAGE_SIZE);
        }
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

/// What the reader puts old pages home with: the program's userfaultfd (copies into the
/// memory it moved), the graveyards' (holdings) and the claims.
struct Home<'r> {
    uffd: &'r Uffd,
    graves: &'r Uffd,
    busy: &'r Busy,
    /// Set when the reader is to stop: old pages still on their way home are given up.
    stop: &'r AtomicBool,
}

/// How long the old pages of moved memory are first offered to the kernel under the claims
/// lock, straight from their graveyards: the program's thread is usually done with its
/// `mremap` by then, and the pages go home without a copy of the reader's.
const HOMING_LOCKED: Duration = Duration::from_millis(1);

/// Handles the events of one read, then puts the old pages they took where their memory
/// is now and releases the moved mappings. The events are handled under the claims lock,
/// and the old pages first offered to the kernel under it ([`HOMING_LOCKED`]). What the
/// kernel does not take by then is copied out of its graveyards into holdings of the
/// reader's before the lock is let go ([`detach`]): a move may free a graveyard once the
/// lock is free. The copies home then wait on the kernel without the lock, which is taken
/// again only to read and handle later events (and, where no holding could be made, held
/// throughout, as the graveyard must stay).
///
/// `moved` is what a handler before left to do (see [`Handler`]). A copying thread hands
/// what is still on its way home once it is in holdings back (`Some`), to be carried on
/// by the reader thread: the caller of [`handle_all`] keeps it under [`Reader`]'s
/// `reading` lock until then.
fn handle_all<'b>(
    home: &Home<'b>,
    mut claims: MutexGuard<'b, Claims>,
    events: Vec<Event>,
    mut moved: Moved,
    handler: Handler,
) -> Option<Moved> {
    for event in events {
        handle(&mut claims, event, &mut moved);
    }
    answer_all(home.uffd, &mut claims, &mut moved);
    if !moved.through_holdings {
        bring_home(home, Some(&mut claims), &mut moved, HOMING_LOCKED);
    }
    if !moved.homing.is_empty() {
        detach(home, &mut moved);
        if moved.all_held() {
            if handler == Handler::Copier {
                // The holdings are the reader's own: nothing of them needs the lock.
                return Some(moved);
            }
            drop(claims);
            bring_home(home, None, &mut moved, HOMING_LIMIT);
            claims = home.busy.lock();
        } else {
            bring_home(home, Some(&mut claims), &mut moved, HOMING_LIMIT);
        }
        moved.give_up();
    }
    // Faults read while the pages went home (the first, locked offer included): their
    // threads wait for an answer too.
    answer_all(home.uffd, &mut claims, &mut moved);
    for (to, end) in std::mem::take(&mut moved.release) {
        release_moved(home.uffd, &mut claims, to, end);
    }
    drop(claims);
    // Every entry is home or given up: the holdings go.
    moved.free_holdings(home.graves);
    None
}

/// Which thread handles events ([`handle_all`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    /// The reader thread: it handles them to the end, however long the program keeps the
    /// old pages of memory it moved from going home.
    Reader,
    /// A thread of a call's between two chunks of its copy ([`Reader::serve_now`]): it
    /// handles them as the reader would, and offers old pages home under the claims lock
    /// for [`HOMING_LOCKED`], but leaves the rest to the reader thread once it is in
    /// holdings: its call must not wait on the program (threads that purge or move memory
    /// without a pause keep the kernel refusing for as long as they go on, and may go on
    /// until the call returns). Where no holding can be mapped, it carries on as the reader
    /// would, under the claims lock, for up to [`HOMING_LIMIT`].
    Copier,
}

/// How often the reader thread looks for what a copying thread left it while a call is
/// in progress, in milliseconds: the threads that touch the memory those old pages go to
/// wait that much longer, in the rare call that leaves any (the program moved memory under
/// migration while the kernel refused its old pages a home for a millisecond); a reader
/// that woke every millisecond of every call cost the copy a CPU's share on two CPUs.
const LEFT_MS: i32 = 10;

/// How long the reader thread leaves events unread at a time under
/// `FaultInjection::pause_event_reader`: longer than a test's call, whose copying threads
/// read them meanwhile; an event no copy reads (none runs) holds the program and the
/// kernel's moves back no longer than this.
const PAUSE_MAX: Duration = Duration::from_secs(2);

/// How long a copying thread waits for another handler of events to be done
/// ([`Reader::serve_now`]): the reader thread, which the scheduler may have taken the CPU
/// from while it handles them, then gets this thread's; one that takes longer (old pages
/// going home) is left to it.
const SERVE_WAIT: Duration = Duration::from_micros(200);

/// Answers the faults recorded in `moved`: strays with a page of zeros, faults on isolated
/// pages a call lets the reader answer with their old pages ([`answer_faults`]).
///
/// A stray in memory whose old pages are still on their way home waits for them: its page
/// is theirs to fill.
fn answer_all(uffd: &Uffd, claims: &mut Claims, moved: &mut Moved) {
    for addr in std::mem::take(&mut moved.strays) {
        if moved.homing.iter().any(|&(dst, _, n, _)| (dst..dst + n).contains(&addr)) {
            moved.strays.push(addr);
            continue;
        }
        // Checked again: read while the lock was let go (the homing's), a call may have
        // claimed or registered the page since.
        if claims.is_stray(addr) || claims.hole_while_unsharing(addr) {
            // SAFETY: a missing page of the program's anonymous memory that no call claims
            // or registered, or one a call claims but has not isolated (no old pages of it
            // wait anywhere; not on their way home, checked above), checked under this hold
            // of the claims lock, which every claim, registration and isolation takes: its
            // thread would have read a fresh page of zeros. (Nothing is copied over a page
            // that is there: `UFFDIO_COPY` refuses it.)
            unsafe { super::zerofill::answer_with_zeros(uffd, addr) };
        }
    }
    answer_faults(uffd, claims, std::mem::take(&mut moved.faults));
}

/// The most bytes one fault's answer copies in: the page touched and those after it, which
/// a thread that goes through its memory in order touches next.
const ANSWER_MAX: usize = 64 << 10;

/// Answers the faults at `faults` that touched an isolated base page a call lets the
/// reader answer ([`Claims::answerable`]): the page's old contents (with up to
/// [`ANSWER_MAX`] bytes after it) are copied in at once, allocated on the call's target
/// node, which wakes the thread; the move leaves those pages alone. The thread waits for a
/// copy of a few pages instead of its whole piece's isolation, copy and move. A fault on a
/// claimed page not isolated yet (a write to a piece being protected) is recorded, and
/// its thread woken once the page is isolated, to fault again and be answered then. The
/// others wait as before. Under the claims lock, after the read's events: a purged or moved
/// page is not answered, and the graveyard stays while it is read.
fn answer_faults(uffd: &Uffd, claims: &mut Claims, faults: Vec<usize>) {
    if faults.is_empty() {
        return;
    }
    let mut binding = crate::sys::PolicyBinding::new();
    for addr in faults {
        let Some((start, end, grave, node)) = claims.answerable(addr, ANSWER_MAX) else {
            // Not answerable now: a claimed page still being protected is woken once it is
            // isolated, to fault again (see `Claims::add_waiting`); any other waits as before.
            claims.add_waiting(addr);
            continue;
        };
        // Not answered where the page would land elsewhere than on the target.
        if !binding.bind(node) {
            return;
        }
        // SAFETY: `[start, end)` is isolated by a call (empty, registered, every access
        // waiting for exactly its old data), and `grave` holds those old pages, whole, in
        // a graveyard that stays while the claims lock is held.
        let copied = match unsafe { uffd.copy(start, grave, end - start) } {
            Ok(()) => end - start,
            Err((copied, _)) => copied,
        };
        if copied > 0 {
            claims.mark_answered(start, start + copied);
        }
    }
}

/// Copies the old pages of every entry still in a graveyard into a holding of the
/// reader's own. Under the claims lock: the graveyards stay until it is let go, and no
/// migration registers the holding with the program's userfaultfd before it is registered
/// with the graveyards'.
fn detach(home: &Home<'_>, moved: &mut Moved) {
    for h in moved.homing.iter_mut().filter(|h| !h.3) {
        let (_, src, len, _) = *h;
        let Ok(holding) = reaper::reserve(home.graves, len, src, false) else { continue };
        // SAFETY: `src` is a graveyard part holding the old pages of `len` bytes the claims
        // gave up to this reader; the graveyard is not freed while the claims lock is held
        // (every move that frees one takes it first). The holding is fresh, ours, empty and
        // registered with `graves` in missing mode: it receives exactly these bytes. A page
        // the graveyard lacks reads as zeros (its fault is answered so), as a copy from it
        // would. Each page is copied onto the node its old page is on: the pages that go
        // home from here stay where they were.
        if unsafe { super::mover::copy_back(home.graves, holding.addr(), src, len) }.is_err() {
            reaper::free(home.graves, &holding);
            continue;
        }
        *h = (h.0, holding.addr(), len, true);
        moved.holdings.push(holding);
    }
}

fn handle(claims: &mut Claims, event: Event, moved: &mut Moved) {
    if let Event::Missing { addr } = event {
        // The page is empty: whatever purge of it was read before has been zapped.
        let page = addr & !(sys::PAGE_SIZE - 1);
        claims.forget_purged(page, page + sys::PAGE_SIZE);
    }
    match event {
        // In a range a call left registered: nothing will wake its thread, and the kernel
        // would have given it a page of zeros.
        Event::Missing { addr } if claims.is_stray(addr) => moved.strays.push(addr),
        // A hole in pages a call makes its own with the claims lock let go: the thread that
        // faulted may be that call's own (see `Claims::hole_while_unsharing`).
        Event::Missing { addr } if claims.hole_while_unsharing(addr) => moved.strays.push(addr),
        // Its thread waits until the migration (or the end of the call) wakes it, or until
        // its page is answered (once every event of the read is handled).
        Event::Missing { addr } | Event::Protected { addr } => moved.faults.push(addr),
        // Unmapped: whatever is mapped there next is not the program's old memory, and no
        // move may land in it.
        Event::Remove { start, end } => {
            claims.mark_dead(start, end);
            // Old pages of purged memory are garbage: dropped now, so that nothing (a later
            // move of the memory, below) takes them anywhere.
            drop(claims.take_isolated(start, end));
            // Its zap may still be coming: a claim made from now on counts it dead too.
            claims.add_purged(start, end);
            moved.discard(start, end);
        }
        Event::Unmap { start, end } => {
            claims.mark_dead(start, end);
            drop(claims.take_isolated(start, end));
            claims.forget_purged(start, end);
            claims.drop_strays(start, end);
            claims.forget_runs(start, end);
            moved.unmapped(start, end);
        }
        Event::Remap { from, to, len } => {
            claims.mark_dead(from, from + len);
            claims.forget_purged(from, from + len);
            claims.forget_purged(to, to + len);
            claims.drop_strays(from, from + len);
            claims.drop_strays(to, to + len);
            claims.forget_runs(from, from + len);
            claims.forget_runs(to, to + len);
            moved.follow(from, to, len);
            moved.through_holdings |= claims.through_holdings(from, from + len);
            let (spans, empty) = claims.take_isolated(from, from + len);
            moved.empty.merge(empty);
            for (s, e, g) in spans {
                moved.homing.push((to + (s - from), g, e - s, false));
            }
            // A grown mapping is registered to its end.
            let end = mapping_end(to).map_or(to + len, |e| e.max(to + len));
            moved.release.push((to, end));
        }
    }
}

/// How long the reader holds the claims lock in a row while the kernel refuses old pages
/// their home (no holding could be made for them) before it gives them up: every call
/// waits on that lock meanwhile, and one the program waits for would never end.
const HOMING_LIMIT: Duration = Duration::from_secs(5);

/// How many times in a row a refused copy home is tried again at once, the later events
/// read and handled in between, before the reader pauses: the kernel refuses every copy
/// while any event is unread or its thread not yet back from it, and threads that purge
/// or move memory without a pause leave that state for a few microseconds at a time,
/// which a pause is likely to miss. (Not all are caught: three such threads on two CPUs
/// kept 2 MiB of old pages from home for 6.9 s, until they stopped.)
const QUICK_TRIES: u32 = 64;

/// Puts the old pages in `moved` where the program moved their memory: copied, not moved,
/// for a copy into a graveyard's destination may be reading them right now; moved where a page cannot be allocated (`ENOMEM`), as nothing will use
/// that destination any more (the memory's folios are dead). While the kernel refuses
/// (`EAGAIN`: the program's thread finishing its `mremap`, or a later event unread, which
/// holds every copy back; `ENOENT`: the memory moved on or unmapped, its event not read
/// yet), the later events are read and handled meanwhile: they may move the memory on, or
/// unmap it, and the faults they hold are answered. An entry the kernel refuses for another
/// reason is given up.
///
/// Without the claims lock the pages are offered until they are home, however long the
/// program keeps the kernel refusing them (its threads that touch that memory wait for
/// them, as they would on the kernel's migration; moved memory none of whose pages still
/// wait is released meanwhile), except an entry where the kernel finds no mapping of ours
/// for [`HOMING_LIMIT`] ([`missing_for`]), and for [`HOMING_LIMIT`] once the reader is to
/// stop. Once the lock has been held `locked_limit` in a row, what is left stays in `moved`
/// (see [`Moved::give_up`]).
///
/// `claims` is the claims lock where the caller holds it: an entry still in a graveyard is
/// read only under it. Without it, the lock is taken to read and handle later events, and
/// what those take is detached before it goes; where that fails, the lock is kept.
fn bring_home<'b>(
    home: &Home<'b>,
    mut claims: Option<&mut MutexGuard<'_, Claims>>,
    moved: &mut Moved,
    locked_limit: Duration,
) {
    let mut taken: Option<MutexGuard<'b, Claims>> = None;
    let mut backoff = Backoff::kernel();
    let (mut quick, mut locked_since, mut stopping_since) = (0, None, None);
    // The first entry's address and since when the kernel has found no mapping of ours
    // there (`ENOENT`).
    let mut missing: Option<(usize, Instant)> = None;
    while let Some(&(dst, src, len, in_holding)) = moved.homing.first() {
        debug_assert!(in_holding || claims.is_some() || taken.is_some(), "a graveyard read without the claims lock");
        // SAFETY: `src` holds the old pages of memory the program moved to `dst` (moved on
        // with it by every later event): a holding of this reader's, or a graveyard while
        // the claims lock is held; `dst` came with the registration (its accesses wait) and
        // is empty there: it receives exactly its own data, on the node it was on.
        let result = unsafe { super::mover::copy_back(home.uffd, dst, src, len) };
        let (done, errno) = match result {
            Ok(()) => (len, None),
            Err((done, errno)) => (done, Some(errno)),
        };
        moved.empty.close(done / sys::PAGE_SIZE);
        moved.homing[0] = (dst + done, src + done, len - done, in_holding);
        if done > 0 {
            quick = 0;
        }
        let errno = match errno {
            // SAFETY: as above; the pages move instead of being copied, nothing allocated.
            Some(Errno::NOMEM) => match unsafe { home.uffd.move_pages(dst + done, src + done, len - done) } {
                Ok(()) => {
                    moved.empty.close((len - done) / sys::PAGE_SIZE);
                    moved.homing[0].2 = 0;
                    None
                }
                Err((more, errno)) => {
                    moved.empty.close(more / sys::PAGE_SIZE);
                    moved.homing[0] = (dst + done + more, src + done + more, len - done - more, in_holding);
                    Some(errno)
                }
            },
            other => other,
        };
        let retry = match errno {
            None => false,
            // `ENOENT`: the memory is gone from `dst` and the event that says where (an
            // `mremap` on, or a `munmap`) is not read yet: the kernel looks the mapping up
            // before it checks for changes in progress. Or the range no longer lies in one
            // mapping (the program split it: `mprotect` of a part), or in none registered:
            // see `missing_for`.
            Some(Errno::AGAIN | Errno::NOENT) => {
                let held: &mut Claims = match claims.as_deref_mut() {
                    Some(c) => c,
                    None => taken.get_or_insert_with(|| home.busy.lock()),
                };
                for later in home.uffd.read_messages().unwrap_or_default() {
                    handle(held, later, moved);
                }
                answer_all(home.uffd, held, moved);
                // Moved memory none of whose old pages are still on their way: its threads
                // go on now, not when the rest is home.
                let Moved { homing, release, .. } = &mut *moved;
                release.retain(|&(to, end)| {
                    let waits = homing.iter().any(|&(d, _, n, _)| d < end && to < d + n);
                    if !waits {
                        release_moved(home.uffd, held, to, end);
                    }
                    waits
                });
                if claims.is_none() {
                    // What the later events took leaves its graveyards before the lock goes;
                    // where no holding can be made, the lock stays until all are home.
                    detach(home, moved);
                    if moved.all_held() {
                        taken = None;
                    }
                }
                true
            }
            // Refused for another reason: given up.
            Some(_) => false,
        };
        if retry {
            // The entry may have moved, split or gone with the events just handled.
            moved.homing.retain(|&(_, _, n, _)| n > 0);
            if errno == Some(Errno::NOENT) && !missing_for(moved, &mut missing) {
                // No mapping of ours there for `HOMING_LIMIT`, whatever events came: there is
                // nowhere to put them.
                let (_, _, left, _) = moved.homing.remove(0);
                moved.empty.close(left / sys::PAGE_SIZE);
                missing = None;
                continue;
            }
            if claims.is_none() && taken.is_none() {
                locked_since = None;
            } else if locked_since.get_or_insert_with(Instant::now).elapsed() >= locked_limit {
                return;
            }
            // An engine dropped: offered for `HOMING_LIMIT` more, as the reader's last work.
            if home.stop.load(Ordering::Relaxed)
                && stopping_since.get_or_insert_with(Instant::now).elapsed() >= HOMING_LIMIT
            {
                return;
            }
            quick += 1;
            if quick >= QUICK_TRIES {
                quick = 0;
                backoff.pause();
            }
            continue;
        }
        let (_, _, left, _) = moved.homing.remove(0);
        moved.empty.close(left / sys::PAGE_SIZE);
    }
}

/// The end of the mapping holding `addr`, if any (one `PROCMAP_QUERY` where the kernel
/// answers it, not the whole of `/proc/self/maps`).
fn mapping_end(addr: usize) -> Option<usize> {
    crate::maps::Lookup::open().ok()?.at(addr).ok()?.map(|v| v.end)
}

/// After the kernel found no mapping of ours at the first entry of `moved` (`ENOENT`, the
/// events read since handled): cuts the entry where the mapping at its address ends (the
/// program split it, with `mprotect` of a part, say, and the kernel copies into one mapping
/// at a time), and returns whether it is worth trying again: `false` once the kernel has
/// found nothing of ours at the same address for [`HOMING_LIMIT`] (`missing`: that address
/// and since when), as where the mapping is no longer registered (a call that ended took
/// its registration off) and no event will ever say where the memory went.
fn missing_for(moved: &mut Moved, missing: &mut Option<(usize, Instant)>) -> bool {
    let Some(&(dst, src, len, held)) = moved.homing.first() else { return true };
    if let Some(end) = mapping_end(dst)
        && end < dst + len
    {
        moved.homing[0] = (dst, src, end - dst, held);
        moved.homing.insert(1, (end, src + (end - dst), dst + len - end, held));
        *missing = None;
        return true;
    }
    match *missing {
        Some((at, since)) if at == dst => since.elapsed() < HOMING_LIMIT,
        _ => {
            *missing = Some((dst, Instant::now()));
            true
        }
    }
}

/// Takes registration and protection off `[to, end)`, the mapping `mremap` put there,
/// except where it meets a range still claimed or a call in progress registered;
/// unregistering wakes its threads.
fn release_moved(uffd: &Uffd, claims: &mut Claims, to: usize, end: usize) {
    let unused = claims.unused_in(to, end);
    for &(s, e) in &unused {
        if uffd.unregister(s, e - s).is_err() {
            claims.add_stray(s, e);
        }
    }
    // Still claimed (the memory moved onto a range a call is migrating, whose runs no
    // longer hold it): left registered, taken off as a call ends, as what a call could
    // not unregister is.
    for (s, e) in super::busy::subtract(&[(to, end)], &unused) {
        claims.add_stray(s, e);
    }
}
