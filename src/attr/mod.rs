//! Named attributes with sysfs semantics: the knobs and counters of the migration core and
//! its migrators, read and written by path (`dcbm/nr_dma_chan`, `migrate/max_batch_pages`,
//! …) as text, exactly as their `/sys/module/*/` counterparts in the RFC.
//!
//! | path | access | values |
//! |---|---|---|
//! | `dcbm/offloading` | rw | `1` registers the DMA migrator, `0` unregisters it |
//! | `dcbm/nr_dma_chan` | rw | DMA channels per batch, 1 … 16 |
//! | `dcbm/folios_migrated` | rw | folios copied by DMA; any write resets it to 0 |
//! | `dcbm/folios_failures` | rw | folios that fell back; any write resets it to 0 |
//! | `mtcopy/offloading` | rw | `1` registers the multi-threaded copy, `0` unregisters it |
//! | `mtcopy/threads` | rw | copy threads, 1 … 64 |
//! | `mtcopy/folios_copied` | rw | folios copied; any write resets it to 0 |
//! | `migrate/max_batch_pages` | rw | bound on a batch in base pages, 1 … 262144 |
//! | `migrate/pipelined` | rw | `1` moves runs as their copies complete, `0` after the batch |
//! | `migrate/deferred_free` | rw | `1` frees replaced base pages on a background thread (calls of more than 2 MiB) |
//! | `migrate/copy_in` | rw | `1` lets the mover copy base pages of mappings without a memory policy of their own straight into their source, bound to the target node (no destination), `0` always goes through a destination |
//! | `migrate/answer_faults` | rw | `1` lets the event reader answer a thread's fault on an isolated base page at once: the page's old contents (with up to 60 KiB after it) are copied in on the target node and the move leaves them alone (mappings without a memory policy of their own; the default); `0` keeps the thread waiting until its whole piece has moved |
//! | `migrate/copy_helper` | rw | `1` lets a second thread copy each piece of the pipelined CPU copy of folios smaller than a huge page with the caller, 64 KiB at a time (calls of more than 2 MiB, on two CPUs or more; the default); `0` copies on the caller alone |
//! | `migrate/copy_kernel` | rw | the CPU copy kernels: `auto` (measured at start-up, one for freshly zeroed destinations and one for cold ones), or `nt`, `nt2`, `memcpy` for every destination |
//! | `migrate/fill_empty` | rw | `1` leaves base-page destinations without pages and fills them with `UFFDIO_COPY` (never zeroed), `0` populates them first |
//! | `migrate/piece_budget_us` | rw | `0` lets the pipelined CPU copy's pieces grow to 8 MiB of huge pages or 2 MiB of smaller folios; else, 50 … 100000: a piece is cut where isolating and copying it would take longer than this many µs at the pace of the pieces before it (down to 512 KiB) |
//! | `migrate/precopy` | rw | `1` reads each piece of the pipelined CPU copy while it is still writable, then write-protects it and copies again only the pages that differ (the program's threads wait for the comparison, not the copy); `0` copies only once protected |
//! | `migrate/prepare_ahead_mib` | rw | `0`: each batch of huge pages populates its destination as it begins; else up to this many MiB (at least two batches) of the next destinations are populated meanwhile by a helper thread; 8 by default where the process may run on 4 CPUs or more, else 0 |
//! | `migrate/mover` | rw | `1` moves base-page runs on a thread of their own, overlapping the next copy |
//! | `offload/active` | ro | the active migrator's name, or empty |
//!
//! # Where settings live
//!
//! The settings (every `rw` attribute above but the counters) can be kept in a config
//! file that every process applies once, when its engine opens ([`Engine::global`]); see
//! [`config`] for where the file is, its format, and the `PAGEMIG_ATTRS` environment
//! variable that overrides it. [`loaded`] says what was applied and what was rejected, and
//! [`source`] where each attribute's value came from. Counters and read-only attributes
//! belong to one process and are never kept.

pub mod config;
mod opening;

use std::sync::atomic::Ordering;

pub use config::{Loaded, Rejected, Setting, Source, loaded};

use crate::error::{Error, Result};
use crate::migrate::{Engine, SETTING_ATTRS, SettingAttr};
use crate::migrators::{self, mtcopy::MAX_THREADS};
use crate::offload::registry;
use crate::sys::Errno;

/// One attribute's description.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    /// Its path.
    pub path: &'static str,
    /// Whether it can be written.
    pub writable: bool,
    /// The values it accepts.
    pub accepts: &'static str,
    /// Whether it is a setting that the config file can keep: a counter (which every
    /// process starts at 0, and a write resets) or a read-only attribute is not.
    pub persistent: bool,
}

/// Every attribute, in listing order.
pub const ATTRS: &[Attr] = &[
    #[cfg(feature = "dma")]
    Attr { path: "dcbm/offloading", writable: true, accepts: "0 or 1", persistent: true },
    #[cfg(feature = "dma")]
    Attr { path: "dcbm/nr_dma_chan", writable: true, accepts: "an integer from 1 to 16", persistent: true },
    #[cfg(feature = "dma")]
    Attr {
        path: "dcbm/folios_migrated",
        writable: true,
        accepts: "anything (resets the counter to 0)",
        persistent: false,
    },
    #[cfg(feature = "dma")]
    Attr {
        path: "dcbm/folios_failures",
        writable: true,
        accepts: "anything (resets the counter to 0)",
        persistent: false,
    },
    Attr { path: "mtcopy/offloading", writable: true, accepts: "0 or 1", persistent: true },
    Attr { path: "mtcopy/threads", writable: true, accepts: "an integer from 1 to 64", persistent: true },
    Attr {
        path: "mtcopy/folios_copied",
        writable: true,
        accepts: "anything (resets the counter to 0)",
        persistent: false,
    },
    // The engine's settings, from their table (`migrate::Settings`).
    setting(0),
    setting(1),
    setting(2),
    setting(3),
    setting(4),
    setting(5),
    setting(6),
    setting(7),
    setting(8),
    setting(9),
    setting(10),
    Attr { path: "migrate/copy_kernel", writable: true, accepts: "auto, nt, nt2 or memcpy", persistent: true },
    Attr { path: "offload/active", writable: false, accepts: "nothing (read-only)", persistent: false },
];

/// The attribute of the engine's setting `i` ([`SETTING_ATTRS`]).
const fn setting(i: usize) -> Attr {
    let s = &SETTING_ATTRS[i];
    Attr { path: s.path, writable: true, accepts: s.accepts, persistent: true }
}

/// The engine's setting at `path`, if it is one.
fn setting_at(path: &str) -> Option<&'static SettingAttr> {
    SETTING_ATTRS.iter().find(|s| s.path == path)
}

/// The attribute at `path` (leading and trailing `/` and blanks ignored).
///
/// # Errors
/// [`Error::Attr`] with `ENOENT` for an unknown path, listing the known ones.
pub fn find(path: &str) -> Result<&'static Attr> {
    let path = path.trim().trim_matches('/');
    ATTRS.iter().find(|a| a.path == path).ok_or_else(|| Error::Attr {
        path: path.to_string(),
        errno: Errno::NOENT,
        message: format!("no such attribute; known: {}", ATTRS.iter().map(|a| a.path).collect::<Vec<_>>().join(", ")),
    })
}

fn bad_value(attr: &Attr, value: &str, errno: Errno) -> Error {
    Error::Attr {
        path: attr.path.to_string(),
        errno,
        message: format!("{value:?} rejected; accepted: {}", attr.accepts),
    }
}

/// Parses a boolean as sysfs's `kstrtobool` does: `1/0`, `y/n`, `on/off`.
fn parse_bool(attr: &Attr, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "y" | "yes" | "on" | "true" => Ok(true),
        "0" | "n" | "no" | "off" | "false" => Ok(false),
        _ => Err(bad_value(attr, value, Errno::INVAL)),
    }
}

fn parse_range(attr: &Attr, value: &str, lo: usize, hi: usize) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(bad_value(attr, value, Errno::INVAL)),
    }
}

/// Where each attribute's value came from, for those not at their default.
static SOURCES: std::sync::Mutex<Vec<(&'static str, Source)>> = std::sync::Mutex::new(Vec::new());

/// The attributes' lock, held across every `fork()` from now on.
fn sources() -> std::sync::MutexGuard<'static, Vec<(&'static str, Source)>> {
    static STEP: crate::process::AtFork = crate::process::AtFork::holding(hold_for_fork);
    crate::process::at_fork(crate::process::ForkRank::Attr, &STEP);
    SOURCES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes the attributes' lock for a `fork()` in progress.
fn hold_for_fork(held: &mut Vec<Box<dyn std::any::Any>>) {
    held.push(Box::new(SOURCES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)));
}

pub(crate) fn set_source(path: &'static str, source: Source) {
    let mut sources = sources();
    sources.retain(|(p, _)| *p != path);
    if source != Source::Default {
        sources.push((path, source));
    }
}

/// Where the value of the attribute at `path` came from: its default, a line of the config
/// file, `PAGEMIG_ATTRS`, or a write in this process. Opens the engine first, as [`read`].
///
/// # Errors
/// [`Error::Attr`] with `ENOENT` for an unknown path.
pub fn source(path: &str) -> Result<Source> {
    let attr = find(path)?;
    let _ = loaded();
    Ok(sources().iter().find(|(p, _)| *p == attr.path).map_or(Source::Default, |(_, s)| s.clone()))
}

/// The engine as a write reaches it: the process-wide one, or, while that one opens and
/// applies the config, the one being opened.
type EngineRef<'a> = &'a dyn Fn() -> Result<&'static Engine>;

fn engine() -> Result<&'static Engine> {
    Engine::global()
}

fn errno_to(attr: &Attr, value: &str) -> impl FnOnce(Errno) -> Error {
    let (path, value) = (attr.path.to_string(), value.to_string());
    move |errno| Error::Attr { path, errno, message: format!("writing {value:?} failed: {errno}") }
}

/// Reads an attribute as text.
///
/// The first read, write or listing of a process opens its engine ([`Engine::global`]),
/// which applies the config file and `PAGEMIG_ATTRS` ([`config`]): what is read is what the
/// process runs with.
///
/// # Errors
/// [`Error::Attr`] with `ENOENT` for an unknown path.
pub fn read(path: &str) -> Result<String> {
    let attr = find(path)?;
    let _ = loaded();
    let b = |v: bool| if v { "1" } else { "0" }.to_string();
    if let Some(setting) = setting_at(attr.path) {
        return Ok((setting.read)(&engine()?.settings()));
    }
    Ok(match attr.path {
        #[cfg(feature = "dma")]
        "dcbm/offloading" => b(migrators::dcbm().offloading()),
        #[cfg(feature = "dma")]
        "dcbm/nr_dma_chan" => migrators::dcbm().nr_dma_chan().to_string(),
        #[cfg(feature = "dma")]
        "dcbm/folios_migrated" => migrators::dcbm().folios_migrated().to_string(),
        #[cfg(feature = "dma")]
        "dcbm/folios_failures" => migrators::dcbm().folios_failures().to_string(),
        "mtcopy/offloading" => b(migrators::mtcopy().offloading()),
        "mtcopy/threads" => migrators::mtcopy().threads().to_string(),
        "mtcopy/folios_copied" => migrators::mtcopy().folios_copied.load(Ordering::Relaxed).to_string(),
        "migrate/copy_kernel" => {
            let k = crate::copy::kernels();
            if k.figures.is_empty() {
                k.hot.name().to_string()
            } else {
                format!("auto (fresh: {}, cold: {})", k.hot.name(), k.cold.name())
            }
        }
        "offload/active" => registry().active_name().unwrap_or_default(),
        other => unreachable!("attribute {other} is listed but not readable"),
    })
}

/// Writes an attribute from text, in this process (see [`config::save`] to keep it).
///
/// The process's engine opens first, applying the config file and `PAGEMIG_ATTRS`, so
/// that they never overwrite this write later.
///
/// # Errors
/// [`Error::Attr`]: `ENOENT` for an unknown path, `EACCES` for a read-only one, `EINVAL`
/// for a value outside what it accepts (the message names them), or the errno of the action
/// (`EBUSY` when enabling a migrator while another is active).
pub fn write(path: &str, value: &str) -> Result<()> {
    let attr = find(path)?;
    let _ = loaded();
    write_to(attr, value, &engine)?;
    if attr.persistent {
        set_source(attr.path, Source::Process);
    }
    Ok(())
}

/// Writes `attr` from text, reaching the engine through `engine`.
fn write_to(attr: &'static Attr, value: &str, engine: EngineRef<'_>) -> Result<()> {
    if let Some(setting) = setting_at(attr.path) {
        // Parsed first, then applied to the engine's settings as they are then.
        (setting.write)(&mut Default::default(), value).ok_or_else(|| bad_value(attr, value, Errno::INVAL))?;
        return engine()?
            .update_settings(|s| {
                let _ = (setting.write)(s, value);
            })
            .map(drop)
            .map_err(|_| bad_value(attr, value, Errno::INVAL));
    }
    match attr.path {
        #[cfg(feature = "dma")]
        "dcbm/offloading" => {
            let on = parse_bool(attr, value)?;
            migrators::dcbm().set_offloading(on).map_err(errno_to(attr, value))
        }
        #[cfg(feature = "dma")]
        "dcbm/nr_dma_chan" => {
            let n = parse_range(attr, value, 1, 16)?;
            migrators::dcbm().set_nr_dma_chan(n).map_err(errno_to(attr, value))
        }
        #[cfg(feature = "dma")]
        "dcbm/folios_migrated" => {
            migrators::dcbm().reset_folios_migrated();
            Ok(())
        }
        #[cfg(feature = "dma")]
        "dcbm/folios_failures" => {
            migrators::dcbm().reset_folios_failures();
            Ok(())
        }
        "mtcopy/offloading" => {
            let on = parse_bool(attr, value)?;
            migrators::mtcopy().set_offloading(on).map_err(errno_to(attr, value))
        }
        "mtcopy/threads" => {
            let n = parse_range(attr, value, 1, MAX_THREADS)?;
            migrators::mtcopy().set_threads(n).map_err(errno_to(attr, value))
        }
        "mtcopy/folios_copied" => {
            migrators::mtcopy().folios_copied.store(0, Ordering::Relaxed);
            Ok(())
        }
        "migrate/copy_kernel" => {
            let kernel = match value.trim() {
                "auto" => None,
                k => Some(k.parse().map_err(|_| bad_value(attr, value, Errno::INVAL))?),
            };
            crate::copy::set_kernel(kernel);
            Ok(())
        }
        _ => Err(bad_value(attr, value, Errno::ACCESS)),
    }
}

/// Applies `PATH=VALUE`.
///
/// # Errors
/// [`Error::Invalid`] without `=`; otherwise as [`write()`].
pub fn apply(assignment: &str) -> Result<()> {
    let (path, value) = assignment
        .split_once('=')
        .ok_or_else(|| Error::Invalid(format!("{assignment:?} is not PATH=VALUE (e.g. dcbm/nr_dma_chan=4)")))?;
    write(path, value)
}

/// Every attribute with its current value (or the error reading it), as [`read`] reads it.
pub fn list() -> Vec<(&'static str, Result<String>)> {
    ATTRS.iter().map(|a| (a.path, read(a.path))).collect()
}

/// Makes `name` the active migrator (`cpu` unregisters whichever is active), with
/// `channels` DMA channels for `dcbm` or `threads` copy threads for `mtcopy`.
///
/// # Errors
/// [`Error::Invalid`] for an unknown name; as [`write()`].
pub fn select_migrator(name: &str, channels: Option<usize>, threads: Option<usize>) -> Result<()> {
    let known: &[&str] = if cfg!(feature = "dma") { &["cpu", "mtcopy", "dcbm"] } else { &["cpu", "mtcopy"] };
    if !known.contains(&name) {
        return Err(Error::Invalid(format!("unknown migrator {name:?}; accepted: {}", known.join(", "))));
    }
    for other in known[1..].iter().filter(|m| **m != name) {
        write(&format!("{other}/offloading"), "0")?;
    }
    if let Some(c) = channels.filter(|_| cfg!(feature = "dma")) {
        write("dcbm/nr_dma_chan", &c.to_string())?;
    }
    if let Some(t) = threads {
        write("mtcopy/threads", &t.to_string())?;
    }
    if name != "cpu" {
        write(&format!("{name}/offloading"), "1")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attribute table lists every setting of the engine's table once, and every
    /// setting reads back what was written through its attribute.
    #[test]
    fn every_engine_setting_is_an_attribute() {
        for setting in SETTING_ATTRS {
            let listed: Vec<_> = ATTRS.iter().filter(|a| a.path == setting.path).collect();
            assert_eq!(listed.len(), 1, "{} listed {} times", setting.path, listed.len());
            assert!(listed[0].writable && listed[0].persistent && listed[0].accepts == setting.accepts);
        }
        let settings = ATTRS.iter().filter(|a| a.path.starts_with("migrate/") && a.path != "migrate/copy_kernel");
        assert_eq!(settings.count(), SETTING_ATTRS.len());
    }
}
