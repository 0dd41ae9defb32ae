//! `pagemig attr`: list, read and write attributes.

use std::process::ExitCode;

use comfy_table::Table;
use pagemig::attr;

/// Options of `pagemig attr`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// `PATH` to read one attribute, `PATH=VALUE` to write it; nothing lists them all.
    target: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.target {
        None => {
            let mut t = Table::new();
            t.set_header(["attribute", "value", "access", "accepts"]);
            for (a, value) in attr::ATTRS.iter().zip(attr::list()) {
                let v = value.1.unwrap_or_else(|e| format!("<{e}>"));
                t.add_row([a.path, v.as_str(), if a.writable { "rw" } else { "ro" }, a.accepts]);
            }
            println!("{t}");
        }
        Some(t) if t.contains('=') => attr::apply(&t)?,
        Some(path) => println!("{}", attr::read(&path)?),
    }
    Ok(ExitCode::SUCCESS)
}
