//! `pagemig bench`: the RFC's experiments, run on this machine and written out as tables,
//! plots, JSON and one HTML page.
//!
//! Three experiments, each a series of real migrations of freshly filled regions, every one
//! of them verified (every byte, every writer's last store, the node of every page):
//!
//! 1. **Throughput by folio size** (the RFC's first table): a region moved as folios of
//!    4 KiB … 2 MiB by the serial CPU copy (`cpu`), the multi-threaded copy (`mtcopy`) and
//!    the DMA migrator (`dcbm`) with 1 … 16 channels, and, on a machine with two memory
//!    nodes, by the kernel's own `move_pages(2)` (the RFC's vanilla baseline), mean ±
//!    standard deviation over repetitions, next to two yardsticks measured in the same
//!    runs: a plain `memcpy` of the same bytes and a `UFFDIO_COPY` fill of a fresh mapping
//!    on the target node.
//! 2. **Batch-size sweep** (the RFC's second table, the review's question): throughput and
//!    first-folio latency against `max_batch_pages`, with and without the pipelined move.
//! 3. **Scattered folios**: every other folio of a region, so that each folio is a run of
//!    its own and costs one `mremap`, against the same region moved whole.
//!
//! [`run`] measures ([`BenchConfig`] says what), giving a [`BenchReport`]; [`write_all`]
//! writes `report.json`, the plots as SVG and PNG, and `report.html`, which also draws the
//! RFC's published numbers ([`seed`]) as dashed reference series.
//!
//! Throughput is end to end first (the bytes over the whole migration a caller waits for,
//! destination preparation included: the figure the RFC's `move_pages()` timings compare
//! with), and the critical path, which leaves out destination preparation, second.
//!
//! A measurement whose migration, bytes, writes or placement is wrong is kept, marked
//! failed, and left out of every mean; its cell says `FAILED`. A cell whose runs spread
//! wider than [`model::NOISY_SPREAD`] of their mean is flagged `⚠`.
//!
//! Each experiment ends with what to conclude ([`conclude`]): sentences computed from the
//! run's medians (who wins where and by how much, why a gap exists, what to choose), under
//! its tables on the terminal and at the top of its section in `report.html`.

pub mod conclude;
pub mod html;
pub mod machine;
pub mod model;
pub mod plot;
pub mod runner;
pub mod scatter;
pub mod seed;
pub mod table;

use std::path::{Path, PathBuf};

pub use machine::Machine;
pub use model::{BenchReport, Measurement, MigratorSpec, Summary};
pub use runner::{BenchConfig, Experiments, Step, run};

/// What went wrong while writing a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("drawing {path}: {message}")]
    Plot {
        /// The file being drawn.
        path: PathBuf,
        /// What the plotting library said.
        message: String,
    },
    /// The report could not be serialised.
    #[error("serialising the report: {0}")]
    Json(#[from] serde_json::Error),
}

fn write_file(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::Write { path: path.to_path_buf(), source })
}

/// Writes `report.json`, every plot as SVG and PNG, and `report.html` into `dir` (made if
/// missing); returns the paths written.
///
/// # Errors
/// [`Error::Write`] when `dir` or a file cannot be written, [`Error::Plot`] when a plot
/// cannot be drawn.
pub fn write_all(report: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
    let mut written = Vec::new();
    let json = dir.join("report.json");
    write_file(&json, serde_json::to_string_pretty(report)?)?;
    written.push(json);
    let plots = plot::draw_all(report, dir)?;
    written.extend(plots.iter().flat_map(|p| [p.svg.clone(), p.png.clone()]));
    let html = dir.join("report.html");
    write_file(&html, html::render(report, &plots)?)?;
    written.push(html);
    Ok(written)
}
