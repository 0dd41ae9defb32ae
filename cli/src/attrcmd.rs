//! `pagemig attr`: list, read, keep and remove attributes.
//!
//! A setting written here is kept in the config file ([`pagemig::attr::config`]) and
//! applied by every pagemig process that opens an engine from then on; a write that cannot
//! be kept is refused. Counters and read-only attributes belong to one process and are
//! refused: a counter is reset by the process that migrates (`pagemig move` resets the
//! counters itself).

use std::process::ExitCode;

use comfy_table::Table;
use pagemig::attr::{self, config};

use crate::JsonStyle;

/// Options of `pagemig attr`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Settings are kept in the file named by PAGEMIG_CONFIG if set, else /etc/pagemig/attrs \
for root, else $XDG_CONFIG_HOME/pagemig/attrs, else ~/.config/pagemig/attrs: one `path = value` per line, `#` \
comments. PAGEMIG_ATTRS=\"path=value,path=value\" overrides the file. Every pagemig process applies them when its \
engine opens. Counters (dcbm/folios_migrated, dcbm/folios_failures, mtcopy/folios_copied) and read-only attributes \
are not kept, and writing them here is refused.")]
pub struct Args {
    /// `PATH` to read one attribute, `PATH=VALUE` to set one and keep it in the config
    /// file; nothing lists them all, with their values and where each came from.
    #[arg(conflicts_with = "unset")]
    target: Option<String>,
    /// Remove the kept value of PATH from the config file (processes opened from then on
    /// take the default, or PAGEMIG_ATTRS's value).
    #[arg(long, value_name = "PATH")]
    unset: Option<String>,
    /// Print the listing as JSON: `--json` (or `--json=pretty`) indented, `--json=compact`
    /// on one line.
    #[arg(long, value_name = "STYLE", num_args = 0..=1, require_equals = true, default_missing_value = "pretty")]
    json: Option<JsonStyle>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(path) = args.unset {
        let (file, removed) = config::unset(&path)?;
        if removed {
            println!("{path}: removed from {}", file.display());
        } else {
            println!("{path}: not set in {}; nothing to remove", file.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    match args.target {
        None => list(args.json),
        Some(t) if t.contains('=') => {
            anyhow::ensure!(args.json.is_none(), "--json prints the listing; it does not go with PATH=VALUE");
            let (path, value) = t.split_once('=').expect("checked for '='");
            let counter = attr::find(path).is_ok_and(|a| a.writable && !a.persistent);
            let file = config::save(path, value).map_err(|e| {
                let hint = if counter {
                    "; reset a counter in the process that migrates (pagemig::attr::write, pagemig_attr_write), \
                     or let `pagemig move` reset it"
                } else {
                    ""
                };
                anyhow::anyhow!("{e}{hint}")
            })?;
            let a = attr::find(path)?;
            println!("{} = {} (kept in {})", a.path, value.trim(), file.display());
            if let Some(env) = std::env::var_os(config::ATTRS_VAR)
                .map(|v| v.to_string_lossy().into_owned())
                .filter(|v| v.split(',').any(|i| i.split_once('=').is_some_and(|(p, _)| p.trim() == a.path)))
            {
                eprintln!(
                    "pagemig: note: {}={env:?} sets {} too, and overrides the file where it is set",
                    config::ATTRS_VAR,
                    a.path
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(path) => {
            anyhow::ensure!(args.json.is_none(), "--json prints the listing; read one attribute without it");
            println!("{}", attr::read(&path)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(json: Option<JsonStyle>) -> anyhow::Result<ExitCode> {
    let loaded = attr::loaded();
    let rows: Vec<(&attr::Attr, Result<String, String>, String)> = attr::ATTRS
        .iter()
        .map(|a| {
            let source = attr::source(a.path).map_or_else(|e| format!("<{e}>"), |s| s.to_string());
            (a, attr::read(a.path).map_err(|e| e.to_string()), source)
        })
        .collect();
    let file_exists = loaded.file.as_ref().is_some_and(|f| f.exists());
    let env = std::env::var(config::ATTRS_VAR).ok();
    if let Some(style) = json {
        let v = serde_json::json!({
            "config_file": loaded.file,
            "config_file_exists": file_exists,
            "env": env,
            "attributes": rows.iter().map(|(a, value, source)| serde_json::json!({
                "path": a.path,
                "value": value.as_ref().ok(),
                "error": value.as_ref().err(),
                "source": source,
                "access": if a.writable { "rw" } else { "ro" },
                "kept": a.persistent,
                "accepts": a.accepts,
            })).collect::<Vec<_>>(),
            "rejected": loaded.rejected.iter().map(|r| serde_json::json!({
                "source": r.source.to_string(),
                "entry": r.text,
                "error": r.error.to_string(),
            })).collect::<Vec<_>>(),
        });
        crate::print_json(&v, style)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    t.set_header(["attribute", "value", "source", "access", "accepts"]);
    for (a, value, source) in &rows {
        let v = value.clone().unwrap_or_else(|e| format!("<{e}>"));
        let access = match (a.writable, a.persistent) {
            (true, true) => "rw",
            (true, false) => "rw (not kept)",
            (false, _) => "ro",
        };
        t.add_row([a.path, v.as_str(), source.as_str(), access, a.accepts]);
    }
    println!("{t}");
    match &loaded.file {
        Some(f) => println!("config file: {}{}", f.display(), if file_exists { "" } else { " (not present)" }),
        None => println!("config file: none ({})", config::WHERE),
    }
    if let Some(env) = env {
        println!("{}: {env}", config::ATTRS_VAR);
    }
    for r in &loaded.rejected {
        println!("rejected: {}: {:?}: {}", r.source, r.text, r.error);
    }
    Ok(ExitCode::SUCCESS)
}
