//! The report's plots, drawn with plotters as SVG and PNG with an embedded font (DejaVu
//! Sans, registered with plotters' `register_font`: plotters has no font of its own).
//!
//! Each figure is one or more panels side by side with a shared legend on the right.
//! Measured series are solid (pipelined) or dotted (move after the batch copy); the RFC's
//! published numbers are dashed, in the colour of the measured series they correspond to
//! (`vanilla` ↔ `kernel move_pages`, or `cpu` where the kernel row is absent; `dma N` ↔
//! `dcbm N ch`). The RFC timed whole `move_pages()` calls, destination allocation included,
//! so its numbers are drawn against end-to-end throughput only, never against the
//! critical path. Axes are logarithmic: folio size and batch
//! size in powers of two, throughput and latency in decades.
//!
//! Colours: every migrator (or case) of a figure gets a colour no other one in that figure
//! has ([`colors_of`]): its usual colour ([`preferred_color`]) when free, else the next free
//! one of [`PALETTE`], else one made up for it. A migrator's measured series, its dotted
//! (unpipelined) twin and its dashed RFC counterpart share its colour on purpose; they are
//! told apart by their line.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use std::ops::Range;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::report::Error;
use crate::report::model::{BenchReport, MigratorSpec, Summary};
use crate::report::runner::short_size;
use crate::report::seed::{Reference, SOURCE};
use crate::report::table::runs;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The font family every text of the plots uses.
const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters, once.
///
/// # Errors
/// A message when plotters rejects the font (it never does for the embedded one).
pub fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "the embedded DejaVu Sans font is not a valid font".to_string())
        })
        .clone()
}

/// How a series' line is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// Solid: measured, pipelined.
    Solid,
    /// Dotted: measured, moved after the batch copy.
    Dotted,
    /// Dashed: the RFC's reference numbers.
    Dashed,
    /// Thick and pale: a yardstick (`memcpy`, `UFFDIO_COPY`).
    Limit,
}

/// How a series' points are marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// No marker.
    None,
    /// A filled circle.
    Circle,
    /// A hollow square.
    Square,
    /// A filled triangle.
    Triangle,
}

/// `(x, y, ±error)` points in data units.
pub type Points = Vec<(f64, f64, f64)>;

/// One line of a panel.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend's text.
    pub label: String,
    /// What the series measures (a migrator, a case): series of one group share a colour
    /// and differ by line, series of different groups never share one.
    pub group: String,
    /// Its colour.
    pub color: RGBColor,
    /// Its line.
    pub line: Line,
    /// Its markers.
    pub marker: Marker,
    /// The points.
    pub points: Points,
}

/// A logarithmic axis: ticks in data units with their labels.
#[derive(Clone, Debug)]
pub struct Axis {
    /// The axis' description.
    pub label: String,
    /// The logarithm's base (2 for sizes, 10 for throughput and latency).
    pub base: f64,
    /// `(value, label)` of every tick, in data units.
    pub ticks: Vec<(f64, String)>,
    /// The range shown, in data units.
    pub range: (f64, f64),
}

impl Axis {
    fn t(&self, v: f64) -> f64 {
        v.log(self.base)
    }

    fn label_at(&self, t: f64) -> String {
        self.ticks.iter().find(|(v, _)| (self.t(*v) - t).abs() < 1e-6).map(|(_, l)| l.clone()).unwrap_or_default()
    }
}

/// One chart.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Its caption.
    pub title: String,
    /// The horizontal axis.
    pub x: Axis,
    /// The vertical axis.
    pub y: Axis,
    /// Its lines.
    pub series: Vec<Series>,
}

/// A figure: a title, a subtitle, panels side by side and a shared legend.
#[derive(Clone, Debug)]
pub struct Figure {
    /// The file name without extension.
    pub name: String,
    /// The title.
    pub title: String,
    /// A line under the title: machine and configuration.
    pub subtitle: String,
    /// The panels, left to right.
    pub panels: Vec<Panel>,
    /// Extra legend lines (headings), drawn before the series' entries.
    pub legend_notes: Vec<String>,
    /// Width and height in pixels.
    pub size: (u32, u32),
}

/// The files of one drawn figure.
#[derive(Clone, Debug)]
pub struct PlotFiles {
    /// The file name without extension.
    pub name: String,
    /// The figure's title.
    pub title: String,
    /// The SVG file.
    pub svg: PathBuf,
    /// The PNG file.
    pub png: PathBuf,
    /// The SVG document, for inlining into HTML.
    pub svg_text: String,
}

const LEGEND_WIDTH: u32 = 300;
const HEADER_HEIGHT: u32 = 64;

/// Distinct colours, in the order a figure's groups take them when their usual colour is
/// taken: Tableau's ten, their light variants, and a few darker ones.
pub const PALETTE: [RGBColor; 24] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(255, 152, 150),
    RGBColor(197, 176, 213),
    RGBColor(196, 156, 148),
    RGBColor(247, 182, 210),
    RGBColor(219, 219, 141),
    RGBColor(158, 218, 229),
    RGBColor(0, 0, 128),
    RGBColor(128, 0, 0),
    RGBColor(0, 100, 0),
    RGBColor(75, 0, 130),
    RGBColor(184, 134, 11),
];

/// The colour a migrator is drawn in when its figure has no other use for it: the same one
/// in every figure, so that `cpu` is black and `dcbm 4 ch` green throughout.
pub fn preferred_color(m: MigratorSpec) -> RGBColor {
    match m {
        MigratorSpec::Cpu => RGBColor(30, 30, 30),
        MigratorSpec::CpuReserved => RGBColor(214, 39, 40),
        MigratorSpec::Memcpy => RGBColor(150, 150, 150),
        MigratorSpec::Kernel => RGBColor(0, 128, 128),
        MigratorSpec::UffdioCopy => RGBColor(110, 190, 110),
        MigratorSpec::Mtcopy { threads } => match threads {
            1 => RGBColor(140, 86, 75),
            2 => RGBColor(188, 160, 34),
            3 | 4 => RGBColor(227, 119, 194),
            _ => RGBColor(120, 120, 60),
        },
        MigratorSpec::Dcbm { channels } => match channels {
            1 => RGBColor(31, 119, 180),
            2 => RGBColor(23, 190, 207),
            3 | 4 => RGBColor(44, 160, 44),
            5..=8 => RGBColor(148, 103, 189),
            9..=12 => RGBColor(0, 0, 128),
            _ => RGBColor(255, 127, 14),
        },
    }
}

/// A colour for the `n`th group past the palette: hues a golden angle apart, at two
/// lightnesses.
fn made_up_color(n: usize) -> RGBColor {
    let hue = (n as f64 * 137.507_764) % 360.0;
    let (s, v) = if n % 2 == 0 { (0.75, 0.8) } else { (0.55, 0.55) };
    let c = v * s;
    let x = c * (1.0 - ((hue / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (hue / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    let byte = |f: f64| ((f + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    RGBColor(byte(r), byte(g), byte(b))
}

/// One colour per entry of `groups`, no two alike: each group's `preferred` colour when no
/// earlier group took it, else the first free colour of [`PALETTE`], else a made-up one.
/// Equal groups get equal colours.
pub fn colors_of<T: PartialEq>(groups: &[T], preferred: impl Fn(&T) -> Option<RGBColor>) -> Vec<RGBColor> {
    let mut taken: Vec<RGBColor> = Vec::new();
    let mut out: Vec<RGBColor> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        if let Some(j) = groups[..i].iter().position(|earlier| earlier == g) {
            out.push(out[j]);
            continue;
        }
        let mut made_up = (0..).map(made_up_color);
        let color = preferred(g)
            .into_iter()
            .chain(PALETTE)
            .find(|c| !taken.contains(c))
            .or_else(|| made_up.find(|c| !taken.contains(c)))
            .unwrap_or(BLACK);
        taken.push(color);
        out.push(color);
    }
    out
}

/// Colours for the migrators of one figure, as [`colors_of`] gives them.
pub fn migrator_colors(migrators: &[MigratorSpec]) -> Vec<(MigratorSpec, RGBColor)> {
    let colors = colors_of(migrators, |m| Some(preferred_color(*m)));
    migrators.iter().copied().zip(colors).collect()
}

fn color_in(colors: &[(MigratorSpec, RGBColor)], m: MigratorSpec) -> RGBColor {
    colors.iter().find(|(n, _)| *n == m).map_or_else(|| preferred_color(m), |(_, c)| *c)
}

/// A number as a tick label: `0.5`, `2`, `20`, `5k`, `2M`.
pub fn tick_label(v: f64) -> String {
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if v >= 1e6 {
        format!("{}M", trim(format!("{:.1}", v / 1e6)))
    } else if v >= 1e3 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if v >= 1.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

/// Ticks for a base-10 log axis over `lo..hi`: 1-2-5 per decade, or denser or sparser
/// marks so that there are between 3 and 12 (as many as fit otherwise).
pub fn decade_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let make = |mults: &[f64]| -> Vec<f64> {
        (d0..=d1)
            .flat_map(|d| mults.iter().map(move |m| m * 10f64.powi(d)))
            .filter(|v| *v >= lo * 0.999 && *v <= hi * 1.001)
            .collect()
    };
    let sets: [&[f64]; 5] = [
        &[1.0, 2.0, 5.0],
        &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0],
        &[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[1.0, 3.0],
        &[1.0],
    ];
    let candidates: Vec<Vec<f64>> = sets.iter().map(|m| make(m)).collect();
    if let Some(t) = candidates.iter().find(|t| (3..=12).contains(&t.len())) {
        return t.clone();
    }
    candidates.into_iter().filter(|t| t.len() <= 12).max_by_key(Vec::len).unwrap_or_default()
}

/// A base-10 axis fitted to `values` (positive ones), with some room above and below.
pub fn value_axis(label: &str, values: impl IntoIterator<Item = f64>) -> Axis {
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for v in values.into_iter().filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        (lo, hi) = (1.0, 10.0);
    }
    let (lo, hi) = if hi / lo < 3.0 { (lo / 1.7, hi * 1.7) } else { (lo / 1.3, hi * 1.3) };
    let ticks = decade_ticks(lo, hi).into_iter().map(|v| (v, tick_label(v))).collect();
    Axis { label: label.into(), base: 10.0, ticks, range: (lo, hi) }
}

/// A base-2 axis with a tick at every value of `ticks`, labelled by `label_of`.
pub fn size_axis(label: &str, ticks: &[f64], label_of: impl Fn(f64) -> String) -> Axis {
    let lo = ticks.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ticks.iter().copied().fold(0f64, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 { (lo, hi) } else { (1.0, 2.0) };
    Axis {
        label: label.into(),
        base: 2.0,
        ticks: ticks.iter().map(|&v| (v, label_of(v))).collect(),
        range: (lo / 2f64.powf(0.4), hi * 2f64.powf(0.4)),
    }
}

/// A linear coordinate (over log-transformed values) whose ticks are exactly the given
/// points: plotters' own float coordinates choose their ticks themselves.
struct Ticked {
    range: Range<f64>,
    ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let share = (v - self.range.start) / (self.range.end - self.range.start);
        limit.0 + (f64::from(limit.1 - limit.0) * share).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() { Vec::new() } else { self.ticks.clone() }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn font(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font()).color(&BLACK)
}

fn shape(color: RGBColor, line: Line) -> ShapeStyle {
    match line {
        Line::Solid => color.stroke_width(2),
        Line::Dotted => color.stroke_width(2),
        Line::Dashed => color.mix(0.75).stroke_width(2),
        Line::Limit => color.mix(0.6).stroke_width(5),
    }
}

/// Draws a line through `points` (backend pixels) in the style of `line`.
fn draw_line<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    points: Vec<(i32, i32)>,
    color: RGBColor,
    line: Line,
) -> Result<(), String> {
    let style = shape(color, line);
    match line {
        Line::Solid | Line::Limit => area.draw(&PathElement::new(points, style)).map_err(err),
        Line::Dotted => area.draw(&DashedPathElement::new(points, 3, 4, style)).map_err(err),
        Line::Dashed => area.draw(&DashedPathElement::new(points, 9, 5, style)).map_err(err),
    }
}

fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    color: RGBColor,
    marker: Marker,
) -> Result<(), String> {
    let (x, y) = at;
    match marker {
        Marker::None => Ok(()),
        Marker::Circle => area.draw(&Circle::new(at, 4, color.filled())).map_err(err),
        Marker::Square => {
            area.draw(&Rectangle::new([(x - 4, y - 4), (x + 4, y + 4)], WHITE.filled())).map_err(err)?;
            area.draw(&Rectangle::new([(x - 4, y - 4), (x + 4, y + 4)], color.stroke_width(2))).map_err(err)
        }
        Marker::Triangle => area.draw(&TriangleMarker::new(at, 5, color.filled())).map_err(err),
    }
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<(), String> {
    let (x0, x1) = (p.x.t(p.x.range.0), p.x.t(p.x.range.1));
    let (y0, y1) = (p.y.t(p.y.range.0), p.y.t(p.y.range.1));
    let xk: Vec<f64> = p.x.ticks.iter().map(|(v, _)| p.x.t(*v)).collect();
    let yk: Vec<f64> = p.y.ticks.iter().map(|(v, _)| p.y.t(*v)).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, font(17))
        .margin(12)
        .margin_right(20)
        .x_label_area_size(48)
        .y_label_area_size(62)
        .build_cartesian_2d(Ticked { range: x0..x1, ticks: xk }, Ticked { range: y0..y1, ticks: yk })
        .map_err(err)?;
    let x_fmt = |t: &f64| p.x.label_at(*t);
    let y_fmt = |t: &f64| p.y.label_at(*t);
    chart
        .configure_mesh()
        .x_desc(p.x.label.as_str())
        .y_desc(p.y.label.as_str())
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style(font(13))
        .axis_desc_style(font(14))
        .bold_line_style(RGBColor(225, 225, 225).stroke_width(1))
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    // Reference and limit lines first, measured lines over them.
    let order = |s: &&Series| match s.line {
        Line::Limit => 0,
        Line::Dashed => 1,
        _ => 2,
    };
    let mut series: Vec<&Series> = p.series.iter().collect();
    series.sort_by_key(order);
    let plot = chart.plotting_area();
    let px = |x: f64, y: f64| chart.backend_coord(&(p.x.t(x), p.y.t(y)));
    let usable = |&&(x, y, _): &&(f64, f64, f64)| x > 0.0 && y > 0.0 && x.is_finite() && y.is_finite();
    let root = plot.strip_coord_spec();
    let (ox, oy) = {
        let r = root.get_base_pixel();
        (r.0, r.1)
    };
    let local = |(x, y): (i32, i32)| (x - ox, y - oy);
    for s in series {
        let pts: Vec<&(f64, f64, f64)> = s.points.iter().filter(usable).collect();
        for &&(x, y, e) in &pts {
            if e > 0.0 {
                // Error bars stop at the axis' ends (a spread as large as the mean would reach
                // zero, far below a log axis).
                let (lo, hi) = ((y - e).max(p.y.range.0), (y + e).min(p.y.range.1));
                let path = vec![local(px(x, lo)), local(px(x, hi))];
                root.draw(&PathElement::new(path, s.color.mix(0.6).stroke_width(1))).map_err(err)?;
            }
        }
        let line: Vec<(i32, i32)> = pts.iter().map(|&&(x, y, _)| local(px(x, y))).collect();
        if line.len() > 1 {
            draw_line(&root, line.clone(), s.color, s.line)?;
        }
        for at in line {
            draw_marker(&root, at, s.color, s.marker)?;
        }
    }
    if p.series.iter().all(|s| s.points.iter().filter(usable).count() == 0) {
        let (w, h) = root.dim_in_pixel();
        root.draw(&Text::new("no data", (w as i32 / 2 - 30, h as i32 / 2), font(16))).map_err(err)?;
    }
    Ok(())
}

fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, fig: &Figure) -> Result<(), String> {
    let mut y = 30;
    let mut seen: Vec<&str> = Vec::new();
    for note in &fig.legend_notes {
        for line in note.lines() {
            area.draw(&Text::new(line.to_string(), (8, y - 7), font(13))).map_err(err)?;
            y += 17;
        }
        y += 6;
    }
    for s in fig.panels.iter().flat_map(|p| p.series.iter()) {
        if seen.contains(&s.label.as_str()) {
            continue;
        }
        seen.push(&s.label);
        draw_line(area, vec![(10, y), (46, y)], s.color, s.line)?;
        draw_marker(area, (28, y), s.color, s.marker)?;
        area.draw(&Text::new(s.label.clone(), (54, y - 7), font(13))).map_err(err)?;
        y += 20;
    }
    Ok(())
}

fn render<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, fig: &Figure) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    root.draw(&Text::new(fig.title.clone(), (16, 10), font(21))).map_err(err)?;
    root.draw(&Text::new(fig.subtitle.clone(), (16, 38), font(13).color(&RGBColor(90, 90, 90)))).map_err(err)?;
    let body = root.margin(HEADER_HEIGHT, 0, 0, 0);
    let (w, _) = body.dim_in_pixel();
    let (plots, legend) = body.split_horizontally(w.saturating_sub(LEGEND_WIDTH));
    let panels = plots.split_evenly((1, fig.panels.len().max(1)));
    for (area, panel) in panels.iter().zip(&fig.panels) {
        draw_panel(area, panel)?;
    }
    draw_legend(&legend, fig)?;
    root.present().map_err(err)
}

/// Draws `fig` into `dir` as `NAME.svg` and `NAME.png`.
///
/// # Errors
/// [`Error::Plot`] when drawing fails, [`Error::Write`] when a file cannot be written.
pub fn draw(fig: &Figure, dir: &Path) -> Result<PlotFiles, Error> {
    let svg = dir.join(format!("{}.svg", fig.name));
    let png = dir.join(format!("{}.png", fig.name));
    let fail = |path: &Path, message: String| Error::Plot { path: path.to_path_buf(), message };
    register_font().map_err(|m| fail(&svg, m))?;
    let mut svg_text = String::new();
    render(SVGBackend::with_string(&mut svg_text, fig.size).into_drawing_area(), fig).map_err(|m| fail(&svg, m))?;
    super::write_file(&svg, &svg_text)?;
    render(BitMapBackend::new(&png, fig.size).into_drawing_area(), fig).map_err(|m| fail(&png, m))?;
    Ok(PlotFiles { name: fig.name.clone(), title: fig.title.clone(), svg, png, svg_text })
}

fn subtitle(report: &BenchReport, what: &str) -> String {
    let c = &report.config;
    format!(
        "{} — {what}, node {} → {}{}",
        report.machine.summary(),
        c.from_node,
        c.to_node,
        if c.quick { ", quick run" } else { "" }
    )
}

fn folio_ticks(sizes: &[u64]) -> Vec<f64> {
    sizes.iter().map(|&s| s as f64 / 1024.0).collect()
}

fn kib_label(kib: f64) -> String {
    short_size((kib * 1024.0) as u64)
}

fn pages_label(pages: f64) -> String {
    let p = pages as u64;
    if p >= 1024 && p % 1024 == 0 { format!("{}K", p / 1024) } else { p.to_string() }
}

fn reference_note() -> String {
    format!("Dashed: the RFC's numbers,\n{SOURCE}")
}

fn point_of(x: f64, s: Option<Summary>) -> Option<(f64, f64, f64)> {
    s.map(|s| (x, s.mean, s.stddev))
}

/// The throughput figure: by folio size per migrator, end to end (with the RFC's first
/// table dashed: it times the same whole calls) and the critical path.
pub fn throughput_figure(report: &BenchReport) -> Option<Figure> {
    let t = report.throughput.as_ref()?;
    let r = &report.reference;
    let has_kernel = t.rows.iter().any(|row| row.migrator == MigratorSpec::Kernel);
    // The RFC's vanilla kernel is drawn in the colour of the kernel measured here, or of
    // the serial CPU copy where the kernel could not be measured (one node).
    let vanilla_as = if has_kernel { MigratorSpec::Kernel } else { MigratorSpec::Cpu };
    let reference = |m: MigratorSpec| -> Option<(String, Points)> {
        let (path, ch) = match m {
            m if m == vanilla_as => ("vanilla", 0),
            MigratorSpec::Dcbm { channels } => ("dma", channels as u32),
            _ => return None,
        };
        let pts: Vec<(f64, f64, f64)> =
            r.throughput_series(path, ch).into_iter().map(|(k, g)| (k as f64, g, 0.0)).collect();
        let label = if ch == 0 { "RFC vanilla kernel".to_string() } else { format!("RFC dcbm {ch} ch") };
        (!pts.is_empty()).then_some((label, pts))
    };
    let colors = migrator_colors(&t.rows.iter().map(|row| row.migrator).collect::<Vec<_>>());
    let mut panels = Vec::new();
    for end_to_end in [true, false] {
        let mut series = Vec::new();
        for row in &t.rows {
            let points: Vec<(f64, f64, f64)> = t
                .folio_sizes
                .iter()
                .zip(&row.cells)
                .filter(|(_, c)| c.ok)
                .filter_map(|(&f, c)| {
                    point_of(f as f64 / 1024.0, if end_to_end { c.gbps } else { c.critical_path_gbps })
                })
                .collect();
            if !end_to_end && row.migrator == MigratorSpec::Kernel {
                // The kernel's calls have no critical path of their own.
                continue;
            }
            let (line, marker) = match row.migrator {
                m if m.is_yardstick() => (Line::Limit, Marker::None),
                MigratorSpec::Kernel => (Line::Solid, Marker::Triangle),
                _ => (Line::Solid, Marker::Circle),
            };
            let label = match row.migrator {
                MigratorSpec::UffdioCopy => "UFFDIO_COPY (4K pages)".to_string(),
                m => m.to_string(),
            };
            let (group, color) = (row.migrator.to_string(), color_in(&colors, row.migrator));
            series.push(Series { label, group, color, line, marker, points });
        }
        if end_to_end {
            for row in &t.rows {
                if let Some((label, points)) = reference(row.migrator) {
                    series.push(Series {
                        label,
                        group: row.migrator.to_string(),
                        color: color_in(&colors, row.migrator),
                        line: Line::Dashed,
                        marker: Marker::None,
                        points,
                    });
                }
            }
        }
        let values: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
        panels.push(Panel {
            title: if end_to_end {
                "End to end (whole call; RFC dashed)".into()
            } else {
                "Critical path (excluding destination preparation)".into()
            },
            x: size_axis("folio size", &folio_ticks(&t.folio_sizes), kib_label),
            y: value_axis("GB/s (log)", values),
            series,
        });
    }
    let mut legend_notes = vec!["Solid: measured here".into(), "Pale, thick: same-run yardsticks".into()];
    if let Some([from, to]) = t.kernel_nodes {
        legend_notes.push(format!("kernel: move_pages(2),\nnode {from} → {to}"));
    } else {
        legend_notes.push("kernel: absent (one memory node)".into());
    }
    legend_notes.push(format!("{}\n(end-to-end panel only)", reference_note()));
    Some(Figure {
        name: "throughput".into(),
        title: "Migration throughput by folio size".into(),
        subtitle: subtitle(
            report,
            &format!(
                "{} moved, batch ≤ {} pages, mean ± stddev of {}",
                short_size(t.bytes),
                t.batch_pages,
                runs(report.config.reps)
            ),
        ),
        panels,
        legend_notes,
        size: (1500, 720),
    })
}

/// The sweep figures: first-folio latency and throughput against `max_batch_pages`, one
/// panel per folio size, with the RFC's second table dashed.
pub fn sweep_figures(report: &BenchReport) -> Vec<Figure> {
    let Some(s) = report.sweep.as_ref() else { return Vec::new() };
    let r: &Reference = &report.reference;
    let colors = migrator_colors(&s.migrators());
    let mut figures = Vec::new();
    for latency in [true, false] {
        let mut panels = Vec::new();
        for folio in s.folio_sizes() {
            let mut series = Vec::new();
            let mut xs: Vec<f64> = s.batch_pages.iter().map(|&b| b as f64).collect();
            for m in s.migrators() {
                for pipelined in [true, false] {
                    let points = s
                        .points
                        .iter()
                        .filter(|p| p.folio_size == folio && p.migrator == m && p.pipelined == pipelined && p.cell.ok)
                        .filter_map(|p| {
                            let x = p.batch_pages as f64;
                            if latency { p.first_folio_us.map(|v| (x, v, 0.0)) } else { point_of(x, p.cell.gbps) }
                        })
                        .collect();
                    series.push(Series {
                        label: format!("{m}{}", if pipelined { ", pipelined" } else { ", after batch copy" }),
                        group: m.to_string(),
                        color: color_in(&colors, m),
                        line: if pipelined { Line::Solid } else { Line::Dotted },
                        marker: if pipelined { Marker::Circle } else { Marker::Square },
                        points,
                    });
                }
            }
            for ch in r.sweep_channels() {
                let spec = MigratorSpec::Dcbm { channels: ch as usize };
                if !s.migrators().contains(&spec) {
                    continue;
                }
                let points: Vec<(f64, f64, f64)> = r
                    .sweep_series(folio / 1024, ch)
                    .into_iter()
                    .map(|(b, g, f)| (b as f64, if latency { f } else { g }, 0.0))
                    .collect();
                xs.extend(points.iter().map(|p| p.0));
                if !points.is_empty() {
                    series.push(Series {
                        label: format!("RFC dcbm {ch} ch"),
                        group: spec.to_string(),
                        color: color_in(&colors, spec),
                        line: Line::Dashed,
                        marker: Marker::None,
                        points,
                    });
                }
            }
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            let lo = xs.first().copied().unwrap_or(512.0);
            let hi = xs.last().copied().unwrap_or(lo);
            // A tick at every measured batch size and every factor of 4 from the smallest, as
            // long as it keeps clear of the previous one.
            let mut candidates: Vec<f64> =
                std::iter::successors(Some(lo), |v| Some(v * 4.0)).take_while(|v| *v < hi).collect();
            candidates.extend(s.batch_pages.iter().map(|&b| b as f64));
            candidates.push(hi);
            candidates.sort_by(f64::total_cmp);
            let mut ticks: Vec<f64> = Vec::new();
            for v in candidates {
                if ticks.last().is_none_or(|&last| v / last >= 1.9) {
                    ticks.push(v);
                }
            }
            let values: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
            panels.push(Panel {
                title: format!("{} folios", short_size(folio)),
                x: size_axis("max_batch_pages (base pages per batch)", &ticks, pages_label),
                y: value_axis(if latency { "first-folio latency, µs (log)" } else { "GB/s, end to end (log)" }, values),
                series,
            });
        }
        let (name, title, what) = if latency {
            ("first-folio", "First-folio latency against batch size", "median over batches")
        } else {
            ("batch-throughput", "Throughput against batch size", "mean of runs")
        };
        figures.push(Figure {
            name: name.into(),
            title: title.into(),
            subtitle: subtitle(
                report,
                &format!("{} moved, {what}, {} per point", short_size(s.bytes), runs(report.config.sweep_reps)),
            ),
            panels,
            legend_notes: vec![
                "Solid: pipelined move".into(),
                "Dotted: move after the batch copy".into(),
                reference_note(),
            ],
            size: (1500, 640),
        });
    }
    figures
}

/// The scattered-folio figure: time per folio and throughput, every other folio against
/// the whole region.
pub fn scatter_figure(report: &BenchReport) -> Option<Figure> {
    let s = report.scattered.as_ref()?;
    let sizes: Vec<u64> = s.rows.iter().map(|r| r.folio_size).collect();
    let mut panels = Vec::new();
    for per_folio in [true, false] {
        let mut series = Vec::new();
        for (scattered, label, color) in
            [(false, "all folios (contiguous)", PALETTE[0]), (true, "every other folio", PALETTE[3])]
        {
            let points = s
                .rows
                .iter()
                .filter_map(|r| {
                    let case = if scattered { &r.scattered } else { &r.contiguous };
                    let x = r.folio_size as f64 / 1024.0;
                    if !case.cell.ok {
                        return None;
                    }
                    point_of(x, if per_folio { case.us_per_folio } else { case.cell.gbps })
                })
                .collect();
            let group = label.to_string();
            series.push(Series {
                label: label.into(),
                group,
                color,
                line: Line::Solid,
                marker: Marker::Circle,
                points,
            });
        }
        let values: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
        panels.push(Panel {
            title: if per_folio { "Critical-path time per folio".into() } else { "Throughput (end to end)".into() },
            x: size_axis("folio size", &folio_ticks(&sizes), kib_label),
            y: value_axis(if per_folio { "µs per folio (log)" } else { "GB/s (log)" }, values),
            series,
        });
    }
    Some(Figure {
        name: "scattered".into(),
        title: "Scattered folios: one run (mremap) per folio".into(),
        subtitle: subtitle(report, &format!("{}, mean ± stddev of {}", s.migrator, runs(report.config.reps))),
        panels,
        legend_notes: vec!["Every other folio of a region\nagainst the whole region".into()],
        size: (1300, 560),
    })
}

/// Every figure of `report`, drawn into `dir`.
///
/// # Errors
/// As [`draw`].
pub fn draw_all(report: &BenchReport, dir: &Path) -> Result<Vec<PlotFiles>, Error> {
    let mut figures = Vec::new();
    figures.extend(throughput_figure(report));
    figures.extend(sweep_figures(report));
    figures.extend(scatter_figure(report));
    figures.iter().map(|f| draw(f, dir)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_labels() {
        assert_eq!(decade_ticks(0.8, 12.0), [1.0, 2.0, 5.0, 10.0]);
        assert_eq!(decade_ticks(2.0, 4.0), [2.0, 2.5, 3.0, 4.0]);
        assert!(decade_ticks(10.0, 1e6).len() <= 12);
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(20.0), "20");
        assert_eq!(tick_label(5000.0), "5k");
        assert_eq!(tick_label(1.5e5), "150k");
        assert_eq!(tick_label(2e6), "2M");
        assert_eq!(pages_label(512.0), "512");
        assert_eq!(pages_label(262_144.0), "256K");
        assert_eq!(kib_label(2048.0), "2M");
    }

    /// Every pair of series of a figure (its panels share one legend): the same colour
    /// exactly when they show the same group.
    fn assert_distinct_colors(fig: &Figure) {
        let series: Vec<&Series> = fig.panels.iter().flat_map(|p| p.series.iter()).collect();
        for a in &series {
            for b in &series {
                assert_eq!(
                    a.group == b.group,
                    a.color == b.color,
                    "{}: {} ({:?}) and {} ({:?})",
                    fig.name,
                    a.label,
                    a.color,
                    b.label,
                    b.color
                );
            }
        }
    }

    #[test]
    fn every_series_of_a_plot_has_its_own_colour() {
        use crate::report::model::sample::{cell, report, throughput};
        use crate::report::model::{Sweep, SweepPoint};

        // More migrators than any machine measures, with usual colours that collide
        // (mtcopy 8 and 16, dcbm 3 and 4): cpu, reserved and dcbm 12 ch among them.
        let mut migrators = vec![MigratorSpec::Cpu, MigratorSpec::CpuReserved];
        migrators.extend([1, 2, 3, 4, 8, 16, 32, 64].map(|threads| MigratorSpec::Mtcopy { threads }));
        migrators.extend([1, 2, 3, 4, 8, 12, 16].map(|channels| MigratorSpec::Dcbm { channels }));
        migrators.extend([MigratorSpec::Kernel, MigratorSpec::Memcpy, MigratorSpec::UffdioCopy]);
        let sizes = [4096, 2 << 20];
        let rows: Vec<(MigratorSpec, Vec<f64>)> = migrators.iter().map(|&m| (m, vec![1.0, 2.0])).collect();
        let points = migrators
            .iter()
            .filter(|m| !m.is_yardstick() && **m != MigratorSpec::Kernel)
            .flat_map(|&migrator| {
                [(4096, true), (4096, false), (2 << 20, true), (2 << 20, false)].map(|(folio_size, pipelined)| {
                    SweepPoint {
                        folio_size,
                        migrator,
                        pipelined,
                        batch_pages: 512,
                        first_folio_us: Some(100.0),
                        first_folio_p99_us: Some(200.0),
                        cell: cell(&[1.0, 1.1], 1.2, 0.1),
                    }
                })
            })
            .collect();
        let sweep = Sweep { wall_s: 1.0, bytes: 1 << 30, batch_pages: vec![512], points };
        let r = report(Some(throughput(&sizes, &rows)), Some(sweep), None);
        let fig = throughput_figure(&r).unwrap();
        assert!(fig.panels[0].series.len() > PALETTE.len() / 2);
        assert_distinct_colors(&fig);
        let cpu_reserved = fig.panels[0].series.iter().find(|s| s.label == "cpu, reserved").unwrap();
        let dcbm12 = fig.panels[0].series.iter().find(|s| s.label == "dcbm 12 ch").unwrap();
        assert_ne!(cpu_reserved.color, dcbm12.color);
        // The RFC's dcbm 4 ch shares the measured dcbm 4 ch's colour.
        let rfc = fig.panels[0].series.iter().find(|s| s.label == "RFC dcbm 4 ch").unwrap();
        assert_eq!(rfc.group, "dcbm 4 ch");
        for fig in sweep_figures(&r) {
            assert_distinct_colors(&fig);
        }
        // The usual colours where they do not collide: cpu black throughout.
        assert_eq!(fig.panels[0].series[0].color, preferred_color(MigratorSpec::Cpu));
        // Past the palette, made-up colours stay distinct.
        let many: Vec<usize> = (0..100).collect();
        let colors = colors_of(&many, |_| None);
        for (i, a) in colors.iter().enumerate() {
            assert!(colors[..i].iter().all(|b| b != a), "colour {i} repeats");
        }
        assert_eq!(colors[..PALETTE.len()], PALETTE);
    }

    #[test]
    fn draws_a_figure_with_text() {
        let dir = std::env::temp_dir().join(format!("pagemig-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fig = Figure {
            name: "t".into(),
            title: "A title".into(),
            subtitle: "sub".into(),
            panels: vec![Panel {
                title: "p".into(),
                x: size_axis("x", &[4.0, 16.0], kib_label),
                y: value_axis("y", [1.0, 3.0]),
                series: vec![Series {
                    label: "s".into(),
                    group: "s".into(),
                    color: preferred_color(MigratorSpec::Cpu),
                    line: Line::Dashed,
                    marker: Marker::Square,
                    points: vec![(4.0, 1.0, 0.2), (16.0, 3.0, 0.0)],
                }],
            }],
            legend_notes: vec!["n".into()],
            size: (600, 300),
        };
        let files = draw(&fig, &dir).unwrap();
        assert!(files.svg_text.contains("A title") && files.svg_text.contains("16K"));
        assert!(std::fs::metadata(&files.png).unwrap().len() > 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
