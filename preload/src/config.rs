//! The environment, read once when the library is loaded, and the attributes applied once
//! per process.
//!
//! The variables are read in the library's constructor, before the program's `main`, so
//! that a call pays one atomic load to learn whether pagemig is on. The engine is opened
//! (applying the config file and `PAGEMIG_ATTRS`) only by the first call pagemig serves in
//! a process: a
//! program that never migrates (a shell that passes `LD_PRELOAD` on to its children) pays
//! nothing more.
#![expect(unsafe_code, reason = "the constructor in .init_array, atexit and pthread_atfork")]

use std::sync::OnceLock;

use pagemig::Engine;

use crate::summary;

/// Where the summary goes at exit.
#[derive(Debug)]
pub(crate) enum SummaryTo {
    /// Standard error.
    Stderr,
    /// Appended to this file.
    File(std::path::PathBuf),
}

/// The environment as the library found it.
#[derive(Debug, Default)]
pub(crate) struct Config {
    /// Whether `PAGEMIG_PRELOAD` turned pagemig on.
    pub(crate) enabled: bool,
    /// `PAGEMIG_SUMMARY`.
    pub(crate) summary: Option<SummaryTo>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Whether pagemig is on in this process.
pub(crate) fn enabled() -> bool {
    config().enabled
}

/// The environment, read now if the constructor did not run (a static program cannot
/// preload; a loader that skips constructors).
pub(crate) fn config() -> &'static Config {
    CONFIG.get_or_init(read_env)
}

fn read_env() -> Config {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Config {
        enabled: var("PAGEMIG_PRELOAD")
            .is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.to_ascii_lowercase().as_str())),
        summary: match var("PAGEMIG_SUMMARY").as_deref() {
            None | Some("0") => None,
            Some("1") => Some(SummaryTo::Stderr),
            Some(path) => Some(SummaryTo::File(path.into())),
        },
    }
}

/// The process-wide engine for a call pagemig serves. Opening it applies the config file
/// and `PAGEMIG_ATTRS` (the library's own loader; a forked child's engine takes its
/// parent's settings).
///
/// # Errors
/// As [`Engine::global`]: userfaultfd is not available to this process.
pub(crate) fn engine() -> pagemig::Result<&'static Engine> {
    let engine = Engine::global()?;
    summary::engine_opened(std::process::id());
    Ok(engine)
}

/// Records for the summary that this process's engine is open, where a call opened it
/// through [`pagemig::ffi::move_pages`] (which opens it after its own checks).
pub(crate) fn note_engine() {
    if !Engine::global_needs_opening() && Engine::global().is_ok() {
        summary::engine_opened(std::process::id());
    }
}

/// Runs when the library is loaded: reads the environment, silences panics (each is
/// counted; the boundary turns it into an error), arranges the summary at exit and the
/// counters' and the worker's reset in a forked child.
extern "C" fn init() {
    let config = config();
    std::panic::set_hook(Box::new(|_| summary::panicked()));
    // SAFETY: a plain function of this library, which stays loaded until exit.
    unsafe { libc::pthread_atfork(None, None, Some(summary::forked)) };
    // SAFETY: as above.
    unsafe { libc::pthread_atfork(None, None, Some(crate::worker::forked)) };
    if config.summary.is_some() {
        // SAFETY: as above; `atexit` fails only when out of memory, and then there is no
        // summary.
        unsafe { libc::atexit(summary::at_exit) };
    }
}

/// The constructor, called by the dynamic loader when the library is loaded.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;
