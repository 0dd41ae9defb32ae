//! The engine's settings, declared once in one table ([`settings!`]): each is a field of
//! [`Settings`] with its default, an `Option` of [`MigrateOptions`] that overrides it for
//! one call, and an attribute (`migrate/<name>`) that reads and writes the engine's value.
//! A call resolves its settings once, as it begins ([`Settings::with_overrides`], then
//! [`Settings::check`]).

use std::sync::atomic::{AtomicPtr, Ordering};

use super::MigrateOptions;
use super::options::{DEFAULT_MAX_BATCH_PAGES, MAX_BATCH_PAGES_LIMIT};
use crate::error::{Error, Result};

/// A setting's value as an attribute's text.
trait Text: Sized {
    fn text(self) -> String;
    fn parse_text(text: &str) -> Option<Self>;
}

impl Text for bool {
    fn text(self) -> String {
        if self { "1" } else { "0" }.to_string()
    }

    /// As sysfs's `kstrtobool`: `1/0`, `y/n`, `on/off`.
    fn parse_text(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "1" | "y" | "yes" | "on" | "true" => Some(true),
            "0" | "n" | "no" | "off" | "false" => Some(false),
            _ => None,
        }
    }
}

impl Text for usize {
    fn text(self) -> String {
        self.to_string()
    }

    fn parse_text(text: &str) -> Option<Self> {
        text.trim().parse().ok()
    }
}

/// The attribute of one setting.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SettingAttr {
    /// `migrate/<name>`.
    pub path: &'static str,
    /// The values it accepts, in words.
    pub accepts: &'static str,
    /// Its value in `settings`, as text.
    pub read: fn(&Settings) -> String,
    /// Sets it in `settings` from text; `None` for text that is not a value of its type
    /// (a value of its type out of bounds fails [`Settings::check`]).
    pub write: fn(&mut Settings, &str) -> Option<()>,
}

macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr, accepts $accepts:literal, valid $valid:expr;
    )*) => {
        /// The settings of an engine: each the default of the calls that do not override it
        /// in their [`MigrateOptions`], and an attribute, `migrate/<name>`
        /// ([`crate::attr`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        impl Settings {
            /// These settings, with what `opts` overrides for its call.
            #[must_use]
            pub fn with_overrides(mut self, opts: &MigrateOptions) -> Self {
                $( if let Some(value) = opts.$name { self.$name = value; } )*
                self
            }

            /// Checks every value against its bounds.
            ///
            /// # Errors
            /// [`Error::Invalid`] naming the first value out of bounds and what is accepted.
            pub fn check(&self) -> Result<()> {
                $(
                    let valid: fn($ty) -> bool = $valid;
                    if !valid(self.$name) {
                        return Err(Error::Invalid(format!(
                            "{} {:?} is outside what it accepts: {}", stringify!($name), self.$name, $accepts
                        )));
                    }
                )*
                Ok(())
            }
        }

        /// One attribute per setting, in the table's order.
        pub(crate) const SETTING_ATTRS: &[SettingAttr] = &[
            $( SettingAttr {
                path: concat!("migrate/", stringify!($name)),
                accepts: $accepts,
                read: |s| Text::text(s.$name),
                write: |s, text| {
                    s.$name = Text::parse_text(text)?;
                    Some(())
                },
            }, )*
        ];
    };
}

settings! {
    /// Bound on a batch, in base pages (the kernel's `NR_MAX_BATCHED_MIGRATION`).
    max_batch_pages: usize = DEFAULT_MAX_BATCH_PAGES,
        accepts "an integer from 1 to 262144", valid |n| (1..=MAX_BATCH_PAGES_LIMIT).contains(&n);
    /// Move each run as soon as its copy completes, not after the whole batch.
    pipelined: bool = true, accepts "0 or 1", valid |_| true;
    /// Free replaced base pages on a background thread (in calls of more than one huge
    /// page's worth: a smaller call frees them itself).
    deferred_free: bool = true, accepts "0 or 1", valid |_| true;
    /// Move base-page runs on a thread of their own, overlapping the next copy.
    mover: bool = true, accepts "0 or 1", valid |_| true;
    /// Leave base-page destinations without pages and fill them with `UFFDIO_COPY` (never
    /// zeroed), rather than populate them first.
    fill_empty: bool = true, accepts "0 or 1", valid |_| true;
    /// Let the mover copy base pages of mappings without a memory policy of their own
    /// straight into their source, bound to the target node (no destination). Off by
    /// default: no faster than filling an empty destination (the copies in take the claims
    /// lock, fills do not), and its first folio waits longer.
    copy_in: bool = false, accepts "0 or 1", valid |_| true;
    /// Answer a thread's fault on an isolated base page at once: the event reader (or a
    /// thread copying the piece, between two chunks) copies the page's old contents in
    /// (with up to 60 KiB after it), allocated on the target node, and the move leaves
    /// those pages alone. `0`: the thread waits until its whole piece
    /// has moved.
    answer_faults: bool = true, accepts "0 or 1", valid |_| true;
    /// Let a second thread copy each piece of the pipelined CPU copy of folios smaller than
    /// a huge page with the caller, 64 KiB at a time, in calls of more than one huge page's
    /// worth where the process may run on two CPUs or more: the mover and the reaper leave
    /// part of a CPU idle.
    copy_helper: bool = true, accepts "0 or 1", valid |_| true;
    /// Bounds how long the program's threads may wait on one piece of the pipelined CPU
    /// copy, in microseconds: a piece is cut where isolating and copying it would take
    /// longer, at the pace of the pieces before it (down to 512 KiB). 0: pieces grow to
    /// 8 MiB of huge pages or 2 MiB of smaller folios, the fastest. A thread that touches a
    /// page being migrated waits for its whole piece; with batches larger than 2 MiB, a bound of a few hundred µs keeps
    /// that wait under a millisecond, for a part of the throughput (smaller pieces, more
    /// system calls).
    piece_budget_us: usize = 0,
        accepts "0 (no bound) or an integer from 50 to 100000", valid |n| n == 0 || (50..=100_000).contains(&n);
    /// Pre-copy: the pipelined CPU copy reads each piece while it is still writable (the
    /// program's threads go on), then write-protects and isolates it and copies again only
    /// the pages that differ from what was read, so that the program's threads wait only
    /// for that comparison, not for the whole copy. Off by default: the reads go through
    /// `/proc/self/mem` (a read that meets memory the program purged meanwhile must fail
    /// rather than wait), slower than the copy it saves the waiters, and the pieces are
    /// small (256 KiB, or one folio).
    precopy: bool = false, accepts "0 or 1", valid |_| true;
    /// Huge-page destinations populated ahead by a helper thread while the call copies, up
    /// to this many MiB past the next destination and at least two batches (0: each batch
    /// populates its own destination when it begins). Only where the target node has free
    /// memory for twice the call: the helper populates by touching each page. By default
    /// 8 where the process may run on 4 CPUs or more, else 0: the helper's zeroing needs a
    /// CPU of its own (1 GiB of 2 MiB folios, 5 alternating pairs, end to end: 1.16x at the
    /// default batch and 1.44x at 4096 pages on a 16-core Intel Xeon VM, 0.84x and 1.04x on
    /// a 2-core AMD EPYC VM).
    prepare_ahead_mib: usize = default_prepare_ahead_mib(), accepts "an integer from 0 to 1024", valid |n| n <= 1024;
}

/// `migrate/prepare_ahead_mib`'s default: 8 where the process may run on 4 CPUs or more.
fn default_prepare_ahead_mib() -> usize {
    if crate::sys::usable_cpus() >= 4 { 8 } else { 0 }
}

/// An engine's settings, read and written from any thread without a lock (a forked child
/// reads its parent's engine's to take them over, whatever the parent's threads held). Each
/// change publishes a new copy; the old ones stay allocated (a few bytes a change).
#[derive(Debug)]
pub(super) struct SettingsCell(AtomicPtr<Settings>);

impl SettingsCell {
    pub fn new(settings: Settings) -> Self {
        Self(AtomicPtr::new(Box::into_raw(Box::new(settings))))
    }

    /// The settings now.
    #[allow(unsafe_code, reason = "reads a published, never freed, copy")]
    pub fn get(&self) -> Settings {
        // SAFETY: the pointer was made by `Box::into_raw` (`new`, `update`) and is never freed.
        unsafe { *self.0.load(Ordering::Acquire) }
    }

    /// Changes the settings with `change`, checked as a whole; returns them.
    ///
    /// # Errors
    /// As [`Settings::check`]; nothing changes then.
    #[allow(unsafe_code, reason = "publishes a leaked copy, or frees one never shared")]
    pub fn update(&self, change: impl Fn(&mut Settings)) -> Result<Settings> {
        loop {
            let current = self.0.load(Ordering::Acquire);
            // SAFETY: as in `get`.
            let mut next = unsafe { *current };
            change(&mut next);
            next.check()?;
            let fresh = Box::into_raw(Box::new(next));
            if self.0.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Ok(next);
            }
            // SAFETY: never published: another change came first, and this one is made again.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_bounds_are_checked() {
        let engine = Settings::default();
        assert_eq!(engine.max_batch_pages, DEFAULT_MAX_BATCH_PAGES);
        let opts = MigrateOptions::default().max_batch_pages(4096).pipelined(false);
        let call = engine.with_overrides(&opts);
        assert_eq!((call.max_batch_pages, call.pipelined, call.mover), (4096, false, true));
        for bad in [0, MAX_BATCH_PAGES_LIMIT + 1] {
            let e = engine.with_overrides(&MigrateOptions::default().max_batch_pages(bad)).check().unwrap_err();
            assert!(e.to_string().contains("max_batch_pages"), "{e}");
        }
        assert!(Settings { max_batch_pages: MAX_BATCH_PAGES_LIMIT, ..engine }.check().is_ok());
    }

    #[test]
    fn every_setting_has_an_attribute_that_reads_what_it_writes() {
        let mut s = Settings::default();
        assert_eq!(SETTING_ATTRS.len(), 11);
        for attr in SETTING_ATTRS {
            assert!(attr.path.starts_with("migrate/"));
            let value = if attr.accepts == "0 or 1" { "0" } else { "77" };
            (attr.write)(&mut s, value).unwrap();
            assert_eq!((attr.read)(&s), value, "{}", attr.path);
            assert!((attr.write)(&mut s, "maybe").is_none());
        }
        assert!(!s.pipelined && s.max_batch_pages == 77);
    }
}
