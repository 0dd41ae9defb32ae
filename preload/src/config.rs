//! The environment, read once when the library is loaded, and the attributes applied once
//! per process.
//!
//! The variables are read in the library's constructor, before the program's `main`, so
//! that a call pays one atomic load to learn whether pagemig is on. The engine is opened,
//! and `PAGEMIG_ATTRS` applied, only by the first call pagemig serves in a process: a
//! program that never migrates (a shell that passes `LD_PRELOAD` on to its children) pays
//! nothing more.
#![expect(unsafe_code, reason = "the constructor in .init_array, atexit and pthread_atfork")]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

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
    /// `PAGEMIG_ATTRS`, split into `path=value` entries.
    pub(crate) attrs: Vec<String>,
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
        attrs: parse_attrs(var("PAGEMIG_ATTRS").as_deref().unwrap_or("")),
        summary: match var("PAGEMIG_SUMMARY").as_deref() {
            None | Some("0") => None,
            Some("1") => Some(SummaryTo::Stderr),
            Some(path) => Some(SummaryTo::File(path.into())),
        },
    }
}

/// `path=value,path=value` as its entries.
fn parse_attrs(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect()
}

/// The process-wide engine for a call pagemig serves, with `PAGEMIG_ATTRS` applied first
/// in this process (a forked child opens an engine of its own, with the attributes'
/// defaults, and applies them again).
///
/// # Errors
/// As [`Engine::global`]: userfaultfd is not available to this process.
pub(crate) fn engine() -> pagemig::Result<&'static Engine> {
    /// The process that applied the attributes; the process applying them now.
    static APPLIED: AtomicU32 = AtomicU32::new(0);
    static APPLYING: AtomicU32 = AtomicU32::new(0);
    let engine = Engine::global()?;
    let pid = std::process::id();
    summary::engine_opened(pid);
    while APPLIED.load(Ordering::Acquire) != pid {
        let applying = APPLYING.load(Ordering::Acquire);
        if applying != pid && APPLYING.compare_exchange(applying, pid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            for entry in &config().attrs {
                summary::attr_applied(entry, pagemig::attr::apply(entry));
            }
            APPLIED.store(pid, Ordering::Release);
        } else {
            // Another thread of this process is applying them.
            std::thread::yield_now();
        }
    }
    Ok(engine)
}

/// Runs when the library is loaded: reads the environment, silences panics (each is
/// counted; the boundary turns it into an error), arranges the summary at exit and the
/// counters' reset in a forked child.
extern "C" fn init() {
    let config = config();
    std::panic::set_hook(Box::new(|_| summary::panicked()));
    // SAFETY: a plain function of this library, which stays loaded until exit.
    unsafe { libc::pthread_atfork(None, None, Some(summary::forked)) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_split_on_commas() {
        assert_eq!(
            parse_attrs(" migrate/max_batch_pages=64, ,mtcopy/threads=2,"),
            ["migrate/max_batch_pages=64", "mtcopy/threads=2"]
        );
        assert!(parse_attrs("").is_empty());
    }
}
