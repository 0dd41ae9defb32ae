//! `pagemig`: migrate memory between NUMA nodes with batched copying, and measure it.

mod attrcmd;
mod bench;
mod movecmd;
mod pidcmd;
mod placement;
mod size;
mod topology;

use clap::{Parser, Subcommand};

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
    /// List attributes, read one (`PATH`) or write one (`PATH=VALUE`).
    Attr(attrcmd::Args),
    /// Run the RFC's experiments (throughput, batch-size sweep, scattered folios) and write
    /// tables, JSON, plots and an HTML report.
    Bench(bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Topology(a) => topology::run(a),
        Command::Move(a) => movecmd::run(a),
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
