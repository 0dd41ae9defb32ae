//! `pagemig`: migrate memory between NUMA nodes with batched copying, and measure it.
#![deny(unsafe_code)]

mod attrcmd;
mod bench;
mod movecmd;
mod nodes;
mod pidcmd;
mod placement;
mod size;
mod topology;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// How `--json` prints: `--json` (or `--json=pretty`) indented, `--json=compact` on one line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum JsonStyle {
    /// Indented, one field a line.
    Pretty,
    /// One line.
    Compact,
}

/// Prints `value` on standard output in `style`.
fn print_json(value: &serde_json::Value, style: JsonStyle) -> anyhow::Result<()> {
    let text = match style {
        JsonStyle::Pretty => serde_json::to_string_pretty(value)?,
        JsonStyle::Compact => serde_json::to_string(value)?,
    };
    println!("{text}");
    Ok(())
}

/// Batched page migration between NUMA nodes, from user space.
#[derive(Parser, Debug)]
#[command(name = "pagemig", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the NUMA nodes, their CPUs and memory, and what this kernel allows.
    Topology(topology::Args),
    /// Allocate a region, fill it, migrate it while writers keep writing, and verify
    /// every byte, every write and the placement of every page.
    Move(movecmd::Args),
    /// Where a running process's memory is, per mapping and node (as `numastat -p`).
    Placement(placement::Args),
    /// List attributes and where their values came from, read one (`PATH`), set one and
    /// keep it in the config file (`PATH=VALUE`), or remove a kept one (`--unset PATH`).
    Attr(attrcmd::Args),
    /// Run the RFC's experiments (throughput, batch-size sweep, scattered folios) and write
    /// tables, JSON, plots and an HTML report.
    Bench(bench::Args),
}

/// Restores the default action of `SIGPIPE`, which the Rust runtime sets to ignored: a
/// write to a pipe whose reader has gone (`pagemig attr | head -1`) ends the process
/// quietly by the signal, as for any command-line tool, and the shell sees 141, instead of
/// `println!` panicking on `EPIPE`. pagemig itself writes to no pipe but its output.
#[expect(unsafe_code, reason = "sets a signal's disposition, which has no safe wrapper in libc")]
fn default_sigpipe() {
    // SAFETY: `SIG_DFL` is a valid disposition for `SIGPIPE`, and no other thread runs yet
    // (this is the first thing `main` does), so none depends on `SIGPIPE` being ignored.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> std::process::ExitCode {
    default_sigpipe();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Entries of the config file or PAGEMIG_ATTRS that were not applied (the engine
    // opened all the same; `pagemig attr` lists them too).
    for r in &pagemig::attr::loaded().rejected {
        eprintln!("pagemig: warning: {}: {:?} not applied: {}", r.source, r.text, r.error);
    }
    let result = match cli.command {
        Command::Topology(a) => topology::run(a),
        Command::Move(a) => movecmd::run(a, matches.subcommand_matches("move").expect("the move subcommand")),
        Command::Placement(a) => placement::run(a),
        Command::Attr(a) => attrcmd::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pagemig: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
