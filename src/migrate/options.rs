//! Per-call settings, the bounds they are checked against, and fault injection.

use std::sync::Arc;
use std::time::Duration;

/// The default bound on a batch, in base pages (the kernel's `NR_MAX_BATCHED_MIGRATION`).
pub const DEFAULT_MAX_BATCH_PAGES: usize = 512;
/// The largest accepted `max_batch_pages` (1 GiB of base pages).
pub const MAX_BATCH_PAGES_LIMIT: usize = 262_144;
/// Passes over busy folios before they fail with `EAGAIN` (`NR_MAX_MIGRATE_PAGES_RETRY`).
pub const NR_MAX_MIGRATE_PASSES: usize = 10;
/// Bytes of replaced source pages that may wait for the reaper thread, at most.
pub const DEFAULT_REAPER_BACKLOG: usize = 64 << 20;
/// Failures to inject, to exercise the fallback and undo paths on real memory.
#[derive(Clone, Debug, Default)]
pub struct FaultInjection {
    /// Make the batch copy fail: its folios fall back to the per-folio copy.
    pub fail_batch_copy: bool,
    /// Make the per-folio copy of these folios fail (indices into the call's folios sorted
    /// by address): they are undone and reported as failed.
    pub fail_folio_copy: Vec<usize>,
    /// Pause for this long before the per-folio copy of the folio at this index (sorted by
    /// address), while it is write-protected: lets a test act on memory mid-migration.
    pub delay_folio_copy: Option<(usize, Duration)>,
    /// Pause for this long before every move, with the copy made and the source empty:
    /// lets a test act on memory between copy and move.
    pub delay_move: Option<Duration>,
    /// Make the move of the runs holding these folios fail as a refused move would
    /// (indices as above): their folios are undone and reported as failed.
    pub fail_move: Vec<usize>,
    /// Where the program moves memory of this call (`mremap`) whose old pages are isolated,
    /// the event reader copies them into holdings of its own at once and puts them home
    /// from there without the claims lock, as it does when the kernel has not taken them
    /// from their graveyards within a millisecond (the program's thread slow to finish its
    /// `mremap`).
    pub home_through_holdings: bool,
    /// Pause for this long after the pre-copy of each batch's first piece, before that
    /// piece is protected (`migrate/precopy`): lets a test write into memory the pre-copy
    /// has read, and change memory it has yet to read.
    pub delay_after_precopy: Option<Duration>,
    /// Refuse to take the call's registration off its runs when it ends, as a kernel out
    /// of mappings (`vm.max_map_count`) refuses the split an unregistration needs: the runs
    /// stay registered after the call, until the next call ends (the event reader, which
    /// otherwise tries them again while no call is in progress, leaves them to it).
    pub fail_unregister: bool,
    /// The first put-back of each claim's isolated pages (folios that will not move going
    /// back) moves its first page only, then meets the kernel refusing the rest for a
    /// moment (`EAGAIN`) and waits there for a test's thread ([`Handshake`]), the claims
    /// lock let go, before it tries again: lets a test move or unmap memory part of which
    /// is back.
    pub stall_put_back: Option<Arc<Handshake>>,
    /// While any claim of the call is held, the engine's event reader thread leaves the
    /// events waiting unread for up to 2 s at a time: the call's copying threads, which
    /// read the events waiting between two chunks of base pages, read and answer them
    /// meanwhile. Lets a test tell their answers from the reader's. (An event no copy reads
    /// holds the program's thread, and the kernel's moves, for those 2 s.)
    pub pause_event_reader: bool,
    /// Where the pipelined copy populates the destination of a piece holding one of these
    /// folios (indices as above) just before copying it, the node refuses the memory
    /// (`ENOMEM`), as a node filled meanwhile by another program would: the piece's folios
    /// stay as they were and fail.
    pub fail_populate: Vec<usize>,
    /// Where the isolation first makes pages shared with a child this process's own
    /// (`EBUSY` after a `fork`), with their protection off and the claims lock let go, it
    /// waits there for a test's thread ([`Handshake`]) before it write-faults them: lets
    /// the test purge or replace pages meanwhile.
    pub unshare_handshake: Option<Arc<Handshake>>,
    /// Before it claims its first batch, its runs registered, the call waits there for a
    /// test's thread ([`Handshake`]): lets the test purge memory next to the runs, its
    /// event read before the call has claimed anything.
    pub claim_handshake: Option<Arc<Handshake>>,
    /// Between the protection of the call's first stretch of folios and their isolation,
    /// it waits there for a test's thread ([`Handshake`]): lets the test unmap the memory
    /// and map its own in its place meanwhile.
    pub isolate_handshake: Option<Arc<Handshake>>,
    /// As the call ends, before it reads the events waiting and takes its registration
    /// off, no event read meanwhile, it waits there for a test's thread ([`Handshake`]):
    /// lets the test purge memory of the call's, whose event is read only then.
    pub end_handshake: Option<Arc<Handshake>>,
    /// As the call ends, once it has read the events waiting, with the claims lock held
    /// and no event read meanwhile, just before it takes its registration off, it waits
    /// there for a test's thread ([`Handshake`]): lets the test purge memory of the call's,
    /// whose event is read only once the registration went.
    pub end_handshake_read: Option<Arc<Handshake>>,
    /// Where old pages of a claim cannot move home (the program changed their mapping
    /// meanwhile) and are copied back instead, the node refuses the first this many copies
    /// (`ENOMEM`), as a node filled meanwhile by another program would.
    pub fail_put_back_copies: u32,
}

/// Where a call's thread and a test's meet once ([`FaultInjection::unshare_handshake`],
/// [`FaultInjection::claim_handshake`], [`FaultInjection::stall_put_back`]):
/// the call waits at the point named until the test has called [`Handshake::wait`] twice,
/// the first time to learn the call is there, the second to let it go on.
#[derive(Debug)]
pub struct Handshake {
    /// 0: the call is not there yet; 1: it is; 2: the test knows; 3: let go (or the test
    /// gave up waiting).
    state: crate::lock::Mutex<u8>,
    changed: crate::lock::Condvar,
    met: std::sync::atomic::AtomicBool,
}

impl Handshake {
    /// How long the test's first [`Handshake::wait`] waits for the call to come.
    #[cfg(feature = "internals")]
    const ARRIVAL: Duration = Duration::from_secs(30);

    /// A handshake not met yet.
    #[cfg(feature = "internals")]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: crate::lock::Mutex::new(0),
            changed: crate::lock::Condvar::new(),
            met: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The test's side: returns once the call is there (first call), or lets it go on
    /// (second call).
    ///
    /// # Panics
    /// At the first call, where the call has not come within 30 s (it failed before the
    /// point named, or never reaches it): the test fails rather than wait for ever.
    #[cfg(feature = "internals")]
    pub fn wait(&self) {
        let mut state = self.state.lock();
        if *state >= 2 {
            *state = 3;
            self.changed.notify_all();
            return;
        }
        let deadline = std::time::Instant::now() + Self::ARRIVAL;
        while *state == 0 {
            if self.changed.wait_until(&mut state, deadline).timed_out() && *state == 0 {
                // Given up: a call that comes later goes on at once.
                *state = 3;
                panic!("the call never reached the handshake");
            }
        }
        *state = 2;
    }

    /// The call's side: the first time, waits until the test has come and gone; then never.
    pub(crate) fn meet(&self) {
        if !self.met.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut state = self.state.lock();
            if *state == 3 {
                return;
            }
            *state = 1;
            self.changed.notify_all();
            while *state != 3 {
                self.changed.wait(&mut state);
            }
        }
    }
}

/// A callback told the number of bytes moved so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Per-call settings: `MigrateOptions::default()` and the builder methods below.
///
/// ```
/// use std::time::{Duration, Instant};
/// use pagemig::MigrateOptions;
///
/// let opts = MigrateOptions::default()
///     .max_batch_pages(4096)
///     .deadline(Instant::now() + Duration::from_millis(50))
///     .progress(|bytes| eprintln!("{bytes} bytes moved"));
/// assert_eq!(opts.max_batch_pages, Some(4096));
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct MigrateOptions {
    /// Bound on a batch in base pages; `None` takes the engine's setting.
    pub max_batch_pages: Option<usize>,
    /// Copy folio by folio even where the reason allows a batch copy (for a
    /// latency-sensitive caller).
    pub no_batch_copy: bool,
    /// Move each run as soon as its copy completes (`None`: the engine's setting,
    /// `migrate/pipelined`).
    pub pipelined: Option<bool>,
    /// Free replaced source pages on a background thread (`None`: the engine's setting,
    /// `migrate/deferred_free`).
    pub deferred_free: Option<bool>,
    /// Move base-page runs on a mover thread while the next piece is copied (`None`: the
    /// engine's setting, `migrate/mover`).
    pub mover: Option<bool>,
    /// Leave base-page destinations without pages and fill them with `UFFDIO_COPY` (`None`:
    /// the engine's setting, `migrate/fill_empty`).
    pub fill_empty: Option<bool>,
    /// Let the mover copy base pages of mappings without a memory policy of their own
    /// straight into their source (`None`: the engine's setting, `migrate/copy_in`).
    pub copy_in: Option<bool>,
    /// Let a second thread copy each piece of the pipelined CPU copy with the caller
    /// (`None`: the engine's setting, `migrate/copy_helper`).
    pub copy_helper: Option<bool>,
    /// Answer a thread's fault on an isolated base page at once, from the event reader
    /// (`None`: the engine's setting, `migrate/answer_faults`).
    pub answer_faults: Option<bool>,
    /// Bound on how long the program's threads wait on one piece of the pipelined CPU
    /// copy, µs (`None`: the engine's setting, `migrate/piece_budget_us`; 0 for none).
    pub piece_budget_us: Option<usize>,
    /// Pre-copy each piece while it is still writable, then copy again only what differs
    /// (`None`: the engine's setting, `migrate/precopy`).
    pub precopy: Option<bool>,
    /// MiB of huge-page destinations a helper thread populates ahead while the call copies
    /// (`None`: the engine's setting, `migrate/prepare_ahead_mib`; 0 for none).
    pub prepare_ahead_mib: Option<usize>,
    /// Failures to inject (with the `internals` feature: pagemig's own tests).
    #[cfg(feature = "internals")]
    pub fault: FaultInjection,
    /// Called with the bytes moved so far as runs move: the first total at once, then at
    /// most one every 10 ms (see [`MigrateOptions::progress`]).
    pub progress: Option<Progress>,
    /// Raised by the caller to stop the call: batches not begun fail with `ECANCELED` and
    /// stay as they were; the batch running finishes. Raised from another thread (or the
    /// `progress` callback): a signal handler of the calling thread runs only once the call
    /// returns (see [`crate::Folio::new`]), as after `move_pages(2)`, and so does the
    /// default action of a signal, `SIGINT`'s included.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Past this instant no batch begins: the folios not reached fail with `ETIMEDOUT` and
    /// stay as they were.
    pub deadline: Option<std::time::Instant>,
}

impl std::fmt::Debug for MigrateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateOptions")
            .field("max_batch_pages", &self.max_batch_pages)
            .field("no_batch_copy", &self.no_batch_copy)
            .field("pipelined", &self.pipelined)
            .field("deferred_free", &self.deferred_free)
            .field("mover", &self.mover)
            .field("fill_empty", &self.fill_empty)
            .field("copy_in", &self.copy_in)
            .field("copy_helper", &self.copy_helper)
            .field("answer_faults", &self.answer_faults)
            .field("piece_budget_us", &self.piece_budget_us)
            .field("precopy", &self.precopy)
            .field("prepare_ahead_mib", &self.prepare_ahead_mib)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl MigrateOptions {
    /// Bounds a batch to `pages` base pages (checked when the call begins: 1 ..= 262144).
    #[must_use]
    pub fn max_batch_pages(mut self, pages: usize) -> Self {
        self.max_batch_pages = Some(pages);
        self
    }

    /// Bounds how long the program's threads may wait on one piece of the pipelined CPU
    /// copy, in µs (0 for no bound; else checked when the call begins: 50 ..= 100000).
    #[must_use]
    pub fn piece_budget_us(mut self, us: usize) -> Self {
        self.piece_budget_us = Some(us);
        self
    }

    /// Pre-copies each piece of the pipelined CPU copy while it is still writable, then
    /// write-protects it and copies again only the pages written meanwhile: the program's
    /// threads wait for that comparison, not for the whole copy (`migrate/precopy`).
    #[must_use]
    pub fn precopy(mut self, on: bool) -> Self {
        self.precopy = Some(on);
        self
    }

    /// Lets a helper thread populate up to `mib` MiB (at least two batches) of the next
    /// huge-page destinations while the call copies; 0: each batch populates its own
    /// (`migrate/prepare_ahead_mib`).
    #[must_use]
    pub fn prepare_ahead_mib(mut self, mib: usize) -> Self {
        self.prepare_ahead_mib = Some(mib);
        self
    }

    /// Copies folio by folio, for a caller that wants the first folio back soonest.
    #[must_use]
    pub fn no_batch_copy(mut self, on: bool) -> Self {
        self.no_batch_copy = on;
        self
    }

    /// Moves each run as soon as its copy completes, or only after the whole batch.
    #[must_use]
    pub fn pipelined(mut self, on: bool) -> Self {
        self.pipelined = Some(on);
        self
    }

    /// Frees replaced source pages on a background thread, or before the call returns.
    #[must_use]
    pub fn deferred_free(mut self, on: bool) -> Self {
        self.deferred_free = Some(on);
        self
    }

    /// Moves base-page runs on a mover thread while the next piece is copied, or inline.
    #[must_use]
    pub fn mover(mut self, on: bool) -> Self {
        self.mover = Some(on);
        self
    }

    /// Leaves base-page destinations without pages and fills them with `UFFDIO_COPY`, or
    /// populates them first.
    #[must_use]
    pub fn fill_empty(mut self, on: bool) -> Self {
        self.fill_empty = Some(on);
        self
    }

    /// Lets the mover copy base pages straight into their source mapping where no memory
    /// policy of the mapping's own would place them elsewhere.
    #[must_use]
    pub fn copy_in(mut self, on: bool) -> Self {
        self.copy_in = Some(on);
        self
    }

    /// Lets a second thread copy each piece of the pipelined CPU copy with the caller.
    #[must_use]
    pub fn copy_helper(mut self, on: bool) -> Self {
        self.copy_helper = Some(on);
        self
    }

    /// Lets the event reader answer a thread's fault on an isolated base page at once,
    /// copying the page in on the target node, rather than keep the thread waiting until
    /// its whole piece has moved.
    #[must_use]
    pub fn answer_faults(mut self, on: bool) -> Self {
        self.answer_faults = Some(on);
        self
    }

    /// Calls `f` with the bytes moved so far as runs move, in increasing order: the first
    /// total at once, then at most one every 10 ms (the totals that arrive meanwhile, or
    /// while `f` runs, are told as one, the latest), the last (every byte moved) always
    /// before the call returns. Told at every run, the reports woke `f`'s thread hundreds
    /// of times a GiB and slowed the call itself. `f` runs on a thread of its own that no
    /// migration waits on, so it may do anything, even store into the memory being migrated
    /// (the store waits for its folio's move); the call returns once `f` has returned for
    /// the last time. A panic in it stops the call as
    /// [`Error::Panicked`](crate::Error::Panicked) with every folio not moved left as it was.
    #[must_use]
    pub fn progress(mut self, f: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Stops the call when `flag` is raised: batches not begun fail with `ECANCELED`.
    #[must_use]
    pub fn cancel(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Begins no batch past `at`: the folios not reached fail with `ETIMEDOUT`.
    #[must_use]
    pub fn deadline(mut self, at: std::time::Instant) -> Self {
        self.deadline = Some(at);
        self
    }

    /// Injects these failures (with the `internals` feature: pagemig's own tests).
    #[cfg(feature = "internals")]
    #[must_use]
    pub fn fault(mut self, fault: FaultInjection) -> Self {
        self.fault = fault;
        self
    }

    /// The failures to inject: none without the `internals` feature.
    pub(crate) fn faults(&self) -> &FaultInjection {
        #[cfg(feature = "internals")]
        {
            &self.fault
        }
        #[cfg(not(feature = "internals"))]
        {
            static NONE: FaultInjection = FaultInjection {
                fail_batch_copy: false,
                fail_folio_copy: Vec::new(),
                delay_folio_copy: None,
                delay_move: None,
                fail_move: Vec::new(),
                home_through_holdings: false,
                delay_after_precopy: None,
                fail_unregister: false,
                stall_put_back: None,
                pause_event_reader: false,
                fail_populate: Vec::new(),
                unshare_handshake: None,
                claim_handshake: None,
                end_handshake: None,
                end_handshake_read: None,
                isolate_handshake: None,
                fail_put_back_copies: 0,
            };
            &NONE
        }
    }
}

/// What this kernel and process allow.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Capabilities {
    /// Only user-mode faults wait: kernel writes into migrating memory (`read(2)` into the
    /// buffer, `O_DIRECT`, `process_vm_writev`) fail with `EFAULT` instead.
    pub user_mode_only: bool,
    /// Never-touched pages can be protected without populating them first.
    pub wp_unpopulated: bool,
}

impl Capabilities {
    /// A sentence for users about what the capabilities mean.
    pub fn describe(&self) -> &'static str {
        if self.user_mode_only {
            "userfaultfd is limited to user-mode faults: kernel writes into migrating memory fail with EFAULT"
        } else {
            "userfaultfd handles kernel-mode faults: kernel writes into migrating memory wait for the move"
        }
    }
}
