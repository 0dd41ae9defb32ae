//! Settings that outlive a process: the config file and `PAGEMIG_ATTRS`.
//!
//! # Where the file is
//!
//! [`path`] resolves it, in this order:
//!
//! 1. `PAGEMIG_CONFIG`, a file path, when it is set and not empty;
//! 2. `/etc/pagemig/attrs` for root (effective user id 0);
//! 3. `$XDG_CONFIG_HOME/pagemig/attrs` when `XDG_CONFIG_HOME` is an absolute path;
//! 4. `$HOME/.config/pagemig/attrs`.
//!
//! One file applies: root does not read a user's file, and a user does not read
//! `/etc/pagemig/attrs`.
//!
//! # Format
//!
//! One `path = value` per line (blanks around `=` are optional); `#` starts a comment,
//! to the end of its line; blank lines are skipped. A path set twice takes its last value.
//! Only settings belong there ([`Attr::persistent`](super::Attr::persistent)): counters
//! and read-only attributes are rejected.
//!
//! ```text
//! # DMA offload with four channels for every pagemig process of this user
//! dcbm/offloading = 1
//! dcbm/nr_dma_chan = 4
//! migrate/max_batch_pages = 4096
//! ```
//!
//! `PAGEMIG_ATTRS="path=value,path=value"` is applied after the file, so its values win.
//!
//! # When it applies
//!
//! Once per process, by the thread that opens the process's engine ([`Engine::global`]),
//! before any other thread can reach that engine. A value that is malformed, unknown or out
//! of range is rejected, reported by [`loaded`], and leaves the attribute as it was; the
//! engine opens all the same. A process forked from one whose engine was open does not
//! read the file again: its engine takes the settings of the parent's, and the migrators'
//! settings are the parent's already (they were copied with its memory).
//!
//! [`save`] and [`unset`] change the file atomically (a temporary file in the same
//! directory, renamed over it) and keep every other line and comment. Each reads, edits
//! and replaces the file under an exclusive `flock` of its directory, so that processes
//! keeping settings at the same moment each keep theirs.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Attr, find, set_source, write_to};
use crate::error::{Error, Result};
use crate::migrate::Engine;
use crate::sys::Errno;

/// The environment variable naming the config file.
pub const CONFIG_VAR: &str = "PAGEMIG_CONFIG";

/// The environment variable of settings applied after the file, `path=value,path=value`.
pub const ATTRS_VAR: &str = "PAGEMIG_ATTRS";

/// Where settings are kept, in words, for messages.
pub const WHERE: &str = "settings are kept in the file named by PAGEMIG_CONFIG, else /etc/pagemig/attrs for root, \
                         else $XDG_CONFIG_HOME/pagemig/attrs, else ~/.config/pagemig/attrs";

/// Where an attribute's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// Nothing set it: its default.
    Default,
    /// A line of the config file (line 0: the file as a whole).
    File {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
    },
    /// The `PAGEMIG_ATTRS` environment variable.
    Env,
    /// A write in this process ([`super::write`], the C ABI's `pagemig_attr_write`, …).
    Process,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line: 0 } => write!(f, "{}", path.display()),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Env => f.write_str(ATTRS_VAR),
            Source::Process => f.write_str("set in this process"),
        }
    }
}

/// A setting applied from the config file or `PAGEMIG_ATTRS`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Setting {
    /// The attribute.
    pub path: &'static str,
    /// The value as written.
    pub value: String,
    /// Where it was written.
    pub source: Source,
}

/// An entry of the config file or `PAGEMIG_ATTRS` that was not applied, and why.
#[derive(Debug)]
#[non_exhaustive]
pub struct Rejected {
    /// Where it was written.
    pub source: Source,
    /// The entry as written.
    pub text: String,
    /// Why it was rejected.
    pub error: Error,
}

/// What a process applied when its engine opened.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Loaded {
    /// The config file ([`path`]), whether or not it exists; `None` when no path could be
    /// resolved (no `HOME`).
    pub file: Option<PathBuf>,
    /// What was applied, in order (a later setting of a path overrides an earlier one).
    pub applied: Vec<Setting>,
    /// What was not.
    pub rejected: Vec<Rejected>,
}

/// What this process applied from the config file and `PAGEMIG_ATTRS`: opens the engine
/// ([`Engine::global`]) if it is not open yet, which applies them.
pub fn loaded() -> &'static Loaded {
    crate::attr::opening::loaded()
}

/// The config file of this process, resolved as the [module documentation](self) says;
/// `None` when nothing names one (not root, no `PAGEMIG_CONFIG`, `XDG_CONFIG_HOME` or
/// `HOME`).
pub fn path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(file) = var(CONFIG_VAR) {
        return Some(file);
    }
    if rustix::process::geteuid().is_root() {
        return Some(PathBuf::from("/etc/pagemig/attrs"));
    }
    if let Some(xdg) = var("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("pagemig/attrs"));
    }
    var("HOME").map(|home| home.join(".config/pagemig/attrs"))
}

/// One line of the file: a `path = value` entry (text trimmed, comment removed), or
/// nothing to apply.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Blank,
    Entry { path: &'a str, value: &'a str },
    Malformed(&'a str),
}

fn parse_line(line: &str) -> Line<'_> {
    let text = line.split_once('#').map_or(line, |(before, _)| before).trim();
    if text.is_empty() {
        return Line::Blank;
    }
    match text.split_once('=') {
        Some((path, value)) if !path.trim().is_empty() => {
            Line::Entry { path: path.trim().trim_matches('/'), value: value.trim() }
        }
        _ => Line::Malformed(text),
    }
}

/// The error of an entry that names an attribute the file cannot keep, or `None`.
fn not_kept(attr: &Attr) -> Option<Error> {
    if attr.persistent {
        return None;
    }
    let (errno, why) = if attr.writable {
        (Errno::INVAL, "is a counter of each process (every process starts it at 0; a write resets it there)")
    } else {
        (Errno::ACCESS, "is read-only")
    };
    Some(Error::Attr { path: attr.path.to_string(), errno, message: format!("{why}; only settings are kept") })
}

/// Applies one entry to the engine being opened.
fn apply_entry(loaded: &mut Loaded, source: Source, path: &str, value: &str, engine: super::EngineRef<'_>) {
    let text = format!("{path}={value}");
    let result = find(path).and_then(|attr| match not_kept(attr) {
        Some(error) => Err(error),
        None => write_to(attr, value, engine).map(|()| attr),
    });
    match result {
        Ok(attr) => {
            set_source(attr.path, source.clone());
            loaded.applied.push(Setting { path: attr.path, value: value.to_string(), source });
        }
        Err(error) => loaded.rejected.push(Rejected { source, text, error }),
    }
}

/// Applies the config file, then `PAGEMIG_ATTRS`, to the migrators and to `engine` (the
/// engine being opened, or why it could not be): called once per process by
/// [`Engine::global`] before the engine is published.
pub(crate) fn apply(engine: std::result::Result<&'static Engine, Errno>) -> Loaded {
    let engine_ref = move || engine.map_err(|errno| Error::Sys { op: "userfaultfd (the engine did not open)", errno });
    let mut loaded = Loaded { file: path(), ..Default::default() };
    if let Some(file) = loaded.file.clone() {
        match crate::sys::read_text(&file) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    let source = Source::File { path: file.clone(), line: i + 1 };
                    match parse_line(line) {
                        Line::Blank => {}
                        Line::Entry { path, value } => apply_entry(&mut loaded, source, path, value, &engine_ref),
                        Line::Malformed(text) => loaded.rejected.push(Rejected {
                            source,
                            text: text.to_string(),
                            error: Error::Invalid(format!("{text:?} is not `path = value`")),
                        }),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source_err) => loaded.rejected.push(Rejected {
                source: Source::File { path: file.clone(), line: 0 },
                text: String::new(),
                error: Error::Io { path: file.display().to_string(), source: source_err },
            }),
        }
    }
    if let Some(env) = std::env::var_os(ATTRS_VAR) {
        let env = env.to_string_lossy();
        for item in env.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((path, value)) if !path.trim().is_empty() => {
                    apply_entry(&mut loaded, Source::Env, path.trim(), value.trim(), &engine_ref)
                }
                _ => loaded.rejected.push(Rejected {
                    source: Source::Env,
                    text: item.to_string(),
                    error: Error::Invalid(format!("{item:?} is not path=value")),
                }),
            }
        }
    }
    loaded
}

/// The error of a file that cannot be changed.
fn unsaved(attr_path: &str, file: &Path, what: &str, e: &std::io::Error) -> Error {
    Error::Attr {
        path: attr_path.to_string(),
        errno: Errno::from_io_error(e).unwrap_or(Errno::IO),
        message: format!("cannot {what} {}: {e} ({WHERE})", file.display()),
    }
}

/// The config file, or the error of having none.
fn file_for(attr_path: &str) -> Result<PathBuf> {
    path().ok_or_else(|| Error::Attr {
        path: attr_path.to_string(),
        errno: Errno::NOENT,
        message: format!("no config file: none of PAGEMIG_CONFIG, XDG_CONFIG_HOME or HOME is set ({WHERE})"),
    })
}

/// The directory of `file` and its name.
fn dir_and_name(file: &Path) -> (&Path, String) {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    (dir, file.file_name().map_or("attrs".into(), |n| n.to_string_lossy().into_owned()))
}

/// Edits `file` under an exclusive `flock` of its directory (no lock file is left beside
/// it): sets `attr_path` to `value` (`None`: removes its entries) in what the file holds at
/// that moment, and replaces the file when something changed. Returns how many entries it
/// replaced or removed. Two processes (or threads) keeping settings at once each keep
/// theirs: neither reads the file before the other's rename is done.
///
/// # Errors
/// [`Error::Attr`] naming the step (`lock`, `read`, `write`) and the file's errno.
fn keep(file: &Path, attr_path: &str, value: Option<&str>) -> Result<usize> {
    let fail = |what: &'static str| move |e: std::io::Error| unsaved(attr_path, file, what, &e);
    let (dir, _) = dir_and_name(file);
    std::fs::create_dir_all(dir).map_err(fail("write"))?;
    let lock = std::fs::File::open(dir).map_err(fail("lock"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| fail("lock")(e.into()))?;
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fail("read")(e)),
    };
    let (text, found) = edit(&text, attr_path, value);
    if value.is_some() || found > 0 {
        replace(file, &text).map_err(fail("write"))?;
    }
    // The lock goes with `lock`, closed here.
    Ok(found)
}

/// Replaces `file` with `text`: written to a temporary file in the same directory, synced,
/// and renamed over it, with the old file's permissions.
fn replace(file: &Path, text: &str) -> std::io::Result<()> {
    let (dir, name) = dir_and_name(file);
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(file) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `text` with the entries of `attr_path` replaced by `attr_path = value` (the first one,
/// keeping its comment; the others removed), or with that line appended; `None` for the
/// value removes them all. Returns the new text and how many entries it replaced or removed.
fn edit(text: &str, attr_path: &str, value: Option<&str>) -> (String, usize) {
    let mut out = String::with_capacity(text.len() + 64);
    let mut found = 0;
    for line in text.lines() {
        if !matches!(parse_line(line), Line::Entry { path, .. } if path == attr_path) {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        found += 1;
        if let (Some(value), 1) = (value, found) {
            let comment = line.find('#').map_or(String::new(), |i| format!("  {}", &line[i..]));
            out.push_str(&format!("{attr_path} = {value}{comment}\n"));
        }
    }
    if let (Some(value), 0) = (value, found) {
        out.push_str(&format!("{attr_path} = {value}\n"));
    }
    (out, found)
}

/// Writes a setting in this process ([`super::write`]) and keeps it in the config file
/// ([`path`]), for every process that opens an engine from now on; returns the file.
///
/// # Errors
/// Nothing written or kept: [`Error::Attr`] as [`super::write`] (`ENOENT`, `EINVAL`,
/// `EBUSY` when another migrator is on), `EINVAL` for a counter and `EACCES` for a
/// read-only attribute (neither is kept). Written in this process but not kept:
/// [`Error::Attr`] with the errno of the file (`EACCES`, `EROFS`, …) or `ENOENT` when no
/// file can be named; the message says where settings are kept.
pub fn save(attr_path: &str, value: &str) -> Result<PathBuf> {
    let attr = find(attr_path)?;
    if let Some(error) = not_kept(attr) {
        return Err(error);
    }
    let value = value.trim();
    if value.contains(['#', '\n']) {
        return Err(Error::Attr {
            path: attr.path.to_string(),
            errno: Errno::INVAL,
            message: format!("{value:?} rejected: a kept value cannot hold `#` or a line break"),
        });
    }
    super::write(attr.path, value)?;
    let file = file_for(attr.path)?;
    keep(&file, attr.path, Some(value))?;
    Ok(file)
}

/// Removes the setting of `attr_path` from the config file; returns the file and whether it
/// held one. The value of this process is left as it is; processes opened from now on take
/// the default (or `PAGEMIG_ATTRS`'s value). Any path the file holds can be removed, known
/// or not (an entry the engine rejected as unknown, say).
///
/// # Errors
/// [`Error::Attr`] with `ENOENT` when no file can be named, or the errno of reading or
/// writing the file; the message says where settings are kept.
pub fn unset(attr_path: &str) -> Result<(PathBuf, bool)> {
    let attr_path = attr_path.trim().trim_matches('/');
    let file = file_for(attr_path)?;
    if !file.exists() {
        return Ok((file, false));
    }
    let found = keep(&file, attr_path, None)?;
    Ok((file, found > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_as_path_equals_value() {
        assert_eq!(parse_line("  # a comment"), Line::Blank);
        assert_eq!(parse_line(""), Line::Blank);
        assert_eq!(parse_line("dcbm/nr_dma_chan = 4"), Line::Entry { path: "dcbm/nr_dma_chan", value: "4" });
        assert_eq!(parse_line("/dcbm/nr_dma_chan=4 # four"), Line::Entry { path: "dcbm/nr_dma_chan", value: "4" });
        assert_eq!(parse_line("dcbm/nr_dma_chan 4"), Line::Malformed("dcbm/nr_dma_chan 4"));
        assert_eq!(parse_line(" = 4"), Line::Malformed("= 4"));
    }

    /// Threads keeping different settings in one file at the same time, each through an
    /// open file of its own (as separate processes would): every last value is kept.
    #[test]
    fn settings_kept_at_the_same_time_are_all_kept() {
        let dir = std::env::temp_dir().join(format!("pagemig-keep-{}", std::process::id()));
        let file = dir.join("attrs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&file, "# settings\n").unwrap();
        std::thread::scope(|s| {
            for t in 0..6 {
                let file = &file;
                s.spawn(move || {
                    for i in 0..25 {
                        keep(file, &format!("test/k{t}"), Some(&i.to_string())).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&file).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.starts_with("# settings\n"), "{text}");
        for t in 0..6 {
            assert!(text.contains(&format!("test/k{t} = 24\n")), "test/k{t} lost:\n{text}");
        }
        assert_eq!(text.lines().count(), 7, "{text}");
    }

    #[test]
    fn edits_keep_other_lines_and_comments() {
        let text = "# mine\ndcbm/nr_dma_chan = 2  # two\n\nmigrate/pipelined=0\ndcbm/nr_dma_chan = 3\n";
        let (out, n) = edit(text, "dcbm/nr_dma_chan", Some("4"));
        assert_eq!(n, 2);
        assert_eq!(out, "# mine\ndcbm/nr_dma_chan = 4  # two\n\nmigrate/pipelined=0\n");
        let (out, n) = edit(&out, "mtcopy/threads", Some("8"));
        assert_eq!(
            (out.as_str(), n),
            ("# mine\ndcbm/nr_dma_chan = 4  # two\n\nmigrate/pipelined=0\nmtcopy/threads = 8\n", 0)
        );
        let (out, n) = edit(&out, "dcbm/nr_dma_chan", None);
        assert_eq!((out.as_str(), n), ("# mine\n\nmigrate/pipelined=0\nmtcopy/threads = 8\n", 1));
        // A file without a final line break gets one before the new line.
        assert_eq!(edit("a/b = 1", "c/d", Some("2")).0, "a/b = 1\nc/d = 2\n");
    }

    #[test]
    fn replacing_is_atomic_and_keeps_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pagemig-config-unit-{}", std::process::id()));
        let file = dir.join("sub/attrs");
        replace(&file, "a = 1\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        replace(&file, "a = 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a = 2\n");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.join("sub")).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn counters_and_read_only_attributes_are_not_kept() {
        let e = save("dcbm/folios_migrated", "0").unwrap_err();
        assert_eq!(e.errno(), Errno::INVAL, "{e}");
        assert!(e.to_string().contains("counter"), "{e}");
        let e = save("offload/active", "dcbm").unwrap_err();
        assert_eq!(e.errno(), Errno::ACCESS, "{e}");
        assert_eq!(save("no/such", "1").unwrap_err().errno(), Errno::NOENT);
    }
}
