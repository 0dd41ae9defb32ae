//! A migration on a thread of its own, for callers that cannot block: progress, cancel
//! and a deadline ([`Engine::migrate_in_background`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use super::{Engine, MigrateOptions, MigrateStats, Mode, Reason};
use crate::error::{Error, Result};
use crate::folio::Folio;

/// A migration running on its own thread. Dropping it cancels the migration and waits for
/// the thread: nothing it started outlives it.
#[derive(Debug)]
pub struct Background {
    thread: Option<JoinHandle<Result<MigrateStats>>>,
    cancel: Arc<AtomicBool>,
    moved: Arc<AtomicU64>,
    total: u64,
}

impl Background {
    /// Bytes moved so far (as last told to the progress callback: about 10 ms behind at
    /// most, and every byte once the call ends), and bytes in the call.
    pub fn progress(&self) -> (u64, u64) {
        (self.moved.load(Ordering::Relaxed), self.total)
    }

    /// Asks the migration to stop: no batch begins after the one running, and the folios
    /// not reached fail with `ECANCELED`, exactly as they were.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether the migration has ended (its result is ready for [`Background::wait`]).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the migration to end and returns what [`Engine::migrate_pages`] would
    /// have returned.
    ///
    /// # Errors
    /// As [`Engine::migrate_pages`]; [`Error::Partial`] with `ECANCELED` or `ETIMEDOUT`
    /// for folios a cancel or the deadline kept from moving.
    pub fn wait(mut self) -> Result<MigrateStats> {
        self.join()
    }

    fn join(&mut self) -> Result<MigrateStats> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(payload)) => Err(Error::Panicked {
                what: "pagemig",
                message: crate::offload::registry::panic_message(payload.as_ref()),
                stats: Box::default(),
            }),
            None => Err(Error::Invalid("the background migration was already waited for".into())),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.cancel();
            let _ = self.join();
        }
    }
}

impl Engine {
    /// Starts migrating `folios` to `target` on a thread of its own and returns at once; the
    /// handle reports progress, cancels, and waits for the result. `opts.deadline` bounds
    /// the migration (the folios not reached by then fail with `ETIMEDOUT`); a progress
    /// callback in `opts` is called as well. The folios are `'static`: the memory must
    /// outlive any handle (a leaked region, or folios named with the `unsafe`
    /// [`Folio::new`]).
    ///
    /// # Examples
    /// ```no_run
    /// use pagemig::{Engine, MigrateOptions, Mode, Reason, Region};
    /// let region: &'static Region = Box::leak(Box::new(Region::new(64 << 20, 4096, Some(0))?));
    /// let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    /// let job = Engine::global()?.migrate_in_background(
    ///     region.folios(), 1, Reason::Demotion, Mode::Sync, MigrateOptions::default().deadline(deadline),
    /// )?;
    /// while !job.is_finished() {
    ///     let (moved, total) = job.progress();
    ///     println!("{moved} of {total} bytes");
    ///     std::thread::sleep(std::time::Duration::from_millis(10));
    /// }
    /// let stats = job.wait();
    /// # Ok::<(), pagemig::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Sys`] with `EAGAIN` when no thread can be started; everything else comes
    /// from [`Background::wait`].
    pub fn migrate_in_background(
        &'static self,
        folios: Vec<Folio<'static>>,
        target: u32,
        reason: Reason,
        mode: Mode,
        opts: MigrateOptions,
    ) -> Result<Background> {
        let cancel = opts.cancel.clone().unwrap_or_default();
        let moved = Arc::new(AtomicU64::new(0));
        let total = folios.iter().map(|f| f.size() as u64).sum();
        let (m, caller) = (moved.clone(), opts.progress.clone());
        let progress: super::Progress = Arc::new(move |bytes| {
            m.store(bytes, Ordering::Relaxed);
            if let Some(p) = &caller {
                p(bytes);
            }
        });
        let opts = MigrateOptions { cancel: Some(cancel.clone()), progress: Some(progress), ..opts };
        let thread = crate::sys::thread::spawn("pagemig-background", move || {
            self.migrate_pages(&folios, target, reason, mode, &opts)
        })
        .map_err(|_| Error::sys("background migration thread")(crate::sys::Errno::AGAIN))?;
        Ok(Background { thread: Some(thread), cancel, moved, total })
    }
}
