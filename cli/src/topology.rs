//! `pagemig topology`.

use std::process::ExitCode;

use comfy_table::Table;
use pagemig::{Engine, numa};

/// Options of `pagemig topology`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object instead of a table: `--json` (or `--json=pretty`) indented,
    /// `--json=compact` on one line.
    #[arg(long, value_name = "STYLE", num_args = 0..=1, require_equals = true, default_missing_value = "pretty")]
    json: Option<crate::JsonStyle>,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let nodes = numa::nodes()?;
    let thp = read_trim("/sys/kernel/mm/transparent_hugepage/enabled");
    let max_map_count = pagemig::sys::max_map_count();
    let caps = Engine::global().map(|e| e.capabilities());
    if let Some(style) = args.json {
        let v = serde_json::json!({
            "nodes": nodes,
            "thp": thp,
            "max_map_count": max_map_count,
            "copy_kernels": pagemig::copy::kernels(),
            "userfaultfd": match &caps {
                Ok(c) => serde_json::json!({ "available": true, "user_mode_only": c.user_mode_only,
                    "wp_unpopulated": c.wp_unpopulated, "note": c.describe() }),
                Err(e) => serde_json::json!({ "available": false, "error": e.to_string() }),
            },
        });
        crate::print_json(&v, style)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new();
    table.set_header(["node", "cpus", "memory", "free", "distances"]);
    for n in &nodes {
        table.add_row([
            n.id.to_string(),
            crate::nodes::format(&n.cpus),
            format!("{:.1} GiB", n.mem_total as f64 / (1u64 << 30) as f64),
            format!("{:.1} GiB", n.mem_free as f64 / (1u64 << 30) as f64),
            n.distances.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
        ]);
    }
    println!("{table}");
    println!("transparent huge pages: {thp}");
    println!("vm.max_map_count: {max_map_count}");
    let k = pagemig::copy::kernels();
    let figures: Vec<String> =
        k.figures.iter().map(|f| format!("{} {:.1}/{:.1}", f.kernel.name(), f.fresh_gbps, f.cold_gbps)).collect();
    println!(
        "copy kernels: {} for fresh destinations, {} for cold ones (GB/s fresh/cold at start-up: {})",
        k.hot.name(),
        k.cold.name(),
        if figures.is_empty() { "chosen by hand".to_string() } else { figures.join(", ") }
    );
    match caps {
        Ok(c) => println!("userfaultfd: {}", c.describe()),
        Err(e) => println!("userfaultfd: unavailable ({e}); pagemig cannot migrate here"),
    }
    Ok(ExitCode::SUCCESS)
}
