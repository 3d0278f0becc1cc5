//! The soak's curves as one PNG: four panels over the run's minutes
//! (memory, descriptors and threads, latency, delivered rates), with the
//! upstream restarts marked as red vertical lines in each (at the end of
//! the sampling interval the restart fell in).

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;

use crate::{Measure, Sample};

/// The font the labels are drawn with (Debian package fonts-dejavu-core);
/// plotters' ab_glyph backend renders it without fontconfig.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One curve: its name, colour and value.
type Curve = (&'static str, RGBColor, Measure);

pub fn draw(samples: &[Sample], png: &Path, title: &str) -> Result<(), Box<dyn Error>> {
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT} (fonts-dejavu-core): {e}"))?;
    // plotters keeps fonts for the process's life.
    plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak())
        .map_err(|_| format!("{FONT} is not a usable font"))?;
    let root = BitMapBackend::new(png, (1400, 1500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(40);
    head.titled(title, ("sans-serif", 20))?;
    let panels = body.split_evenly((4, 1));
    let minutes = samples.last().map_or(1.0, |s| s.t / 60.0).max(1.0);
    let restarts: Vec<f64> = samples
        .iter()
        .filter(|s| s.restarted)
        .map(|s| s.t / 60.0)
        .collect();
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let green = RGBColor(44, 160, 44);
    panel(
        &panels[0],
        samples,
        minutes,
        &restarts,
        "router memory (MiB)",
        false,
        &[
            ("RSS", blue, |s| s.rss_mib),
            ("heap in use", orange, |s| s.heap_mib),
            ("heap held free", green, |s| s.heap_free_mib),
        ],
    )?;
    panel(
        &panels[1],
        samples,
        minutes,
        &restarts,
        "router open descriptors and threads",
        false,
        &[
            ("open descriptors", blue, |s| s.fds as f64),
            ("threads", orange, |s| s.threads as f64),
        ],
    )?;
    panel(
        &panels[2],
        samples,
        minutes,
        &restarts,
        "latency per interval (ms, log scale)",
        true,
        &[
            ("embedded subscriber p50", green, |s| s.local_p50_ms),
            ("embedded subscriber p99", blue, |s| s.local_p99_ms),
            ("upstream subscriber p99", orange, |s| s.upstream_p99_ms),
        ],
    )?;
    panel(
        &panels[3],
        samples,
        minutes,
        &restarts,
        "messages per second received",
        false,
        &[
            ("embedded subscriber", blue, |s| s.local_rate),
            ("upstream subscriber", orange, |s| s.upstream_rate),
        ],
    )?;
    root.present()?;
    Ok(())
}

/// One panel: `curves` against minutes, restarts as grey lines.
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    samples: &[Sample],
    minutes: f64,
    restarts: &[f64],
    caption: &str,
    log: bool,
    curves: &[Curve],
) -> Result<(), Box<dyn Error>> {
    let values = || {
        curves
            .iter()
            .flat_map(|c| samples.iter().map(c.2))
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
    };
    let top = values().fold(0.0f64, f64::max).max(1e-3) * 1.15;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70);
    let red = RGBColor(214, 39, 40);
    let restart_line = |chart_top: f64, bottom: f64| {
        restarts
            .iter()
            .map(move |&m| PathElement::new(vec![(m, bottom), (m, chart_top)], red))
    };
    macro_rules! finish {
        ($chart:expr, $bottom:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("minutes")
                .light_line_style(WHITE)
                .draw()?;
            chart
                .draw_series(restart_line(top, $bottom))?
                .label("upstream restarted")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
            // The first curve widest, so one that a later one covers shows.
            for (i, &(name, colour, value)) in curves.iter().enumerate() {
                let style = colour.stroke_width(if i == 0 { 5 } else { 2 });
                let points = samples
                    .iter()
                    .map(|s| (s.t / 60.0, value(s)))
                    .filter(|(_, v)| v.is_finite() && (!log || *v > 0.0));
                chart
                    .draw_series(LineSeries::new(points, style))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    if log {
        let bottom = values().fold(f64::INFINITY, f64::min).min(top / 10.0) / 1.5;
        finish!(
            builder.build_cartesian_2d(0.0..minutes, (bottom..top).log_scale())?,
            bottom
        );
    } else {
        finish!(builder.build_cartesian_2d(0.0..minutes, 0.0..top)?, 0.0);
    }
    Ok(())
}
