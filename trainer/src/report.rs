//! `trainer report`: a PNG of a run's `metrics.jsonl` with four panels (training loss, validation loss, tokens/s, learning rate over steps).
use crate::runlog::{read_metrics, ReportRow};
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

const WIDTH: u32 = 1600;
const HEIGHT: u32 = 1000;
const FONT: &str = "sans-serif";
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VALIDATION: RGBColor = RGBColor(214, 39, 40);
const THROUGHPUT: RGBColor = RGBColor(44, 160, 44);
const SCHEDULE: RGBColor = RGBColor(148, 103, 189);

/// Plotters draws text with fonts registered here: DejaVu Sans, compiled into the binary, so no
/// system fonts are needed.
fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

fn drawing<E: std::error::Error + Send + Sync>(error: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the report: {error}")
}

/// One line (optionally with points) in a panel.
struct Series<'a> {
    label: &'a str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    markers: bool,
}

/// Writes the report of `run_dir/metrics.jsonl` to `output` (PNG).
pub fn write_report(run_dir: &Path, output: &Path) -> Result<()> {
    let rows = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let name = std::fs::canonicalize(run_dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| run_dir.display().to_string());
    draw(&rows, &name, output)
}

/// Draws `rows` into a PNG at `output`.
pub fn draw(rows: &[ReportRow], name: &str, output: &Path) -> Result<()> {
    register_fonts();
    let finite = |v: f64| v.is_finite().then_some(v);
    let column = |f: &dyn Fn(&ReportRow) -> Option<f64>| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r.step as f64, finite(f(r)?)?))).collect()
    };
    let loss = column(&|r| Some(r.loss));
    let val_loss = column(&|r| r.val_loss);
    let tokens = column(&|r| Some(r.tokens_per_s));
    let lr = column(&|r| Some(r.lr));
    let (first, last) =
        (rows.iter().map(|r| r.step).min().unwrap_or(0), rows.iter().map(|r| r.step).max().unwrap_or(1));
    let steps = first as f64..(last.max(first + 1)) as f64;

    let root = BitMapBackend::new(output, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let title = match (loss.last(), val_loss.last()) {
        (Some(&(_, l)), Some(&(_, v))) => {
            format!("{name}: {} steps, final loss {l:.3}, validation loss {v:.3}", rows.len())
        }
        (Some(&(_, l)), None) => format!("{name}: {} steps, final loss {l:.3}", rows.len()),
        _ => format!("{name}: {} steps", rows.len()),
    };
    let root =
        root.margin(12, 0, 0, 0).titled(&title, (FONT, 30).into_font().style(FontStyle::Bold)).map_err(drawing)?;
    let panels = root.split_evenly((2, 2));

    let mut loss_series =
        vec![Series { label: "training loss", color: TRAIN, points: loss.clone(), markers: rows.len() < 40 }];
    if !val_loss.is_empty() {
        loss_series.push(Series {
            label: "validation loss",
            color: VALIDATION,
            points: val_loss.clone(),
            markers: true,
        });
    }
    panel(&panels[0], "Training loss", "loss (nats/token)", steps.clone(), &loss_series, |v| format!("{v:.2}"))?;
    if val_loss.is_empty() {
        empty_panel(&panels[1], "Validation loss", "no validation loss in this run (train.eval_every = 0)")?;
    } else {
        let series = [Series { label: "validation loss", color: VALIDATION, points: val_loss, markers: true }];
        panel(&panels[1], "Validation loss", "loss (nats/token)", steps.clone(), &series, |v| format!("{v:.2}"))?;
    }
    let series = [Series { label: "tokens/s (all ranks)", color: THROUGHPUT, points: tokens, markers: false }];
    panel(&panels[2], "Throughput", "tokens/s", steps.clone(), &series, |v| format!("{v:.0}"))?;
    let series = [Series { label: "learning rate", color: SCHEDULE, points: lr, markers: false }];
    panel(&panels[3], "Learning rate", "learning rate", steps, &series, |v| format!("{v:.1e}"))?;
    root.present().map_err(drawing).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
}

fn empty_panel(area: &DrawingArea<BitMapBackend<'_>, Shift>, title: &str, message: &str) -> Result<()> {
    let area = area.margin(10, 10, 10, 10).titled(title, (FONT, 24)).map_err(drawing)?;
    let (w, h) = area.dim_in_pixel();
    let grey = BLACK.mix(0.6);
    let style = TextStyle::from((FONT, 20).into_font()).color(&grey).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw_text(message, &style, (w as i32 / 2, h as i32 / 2)).map_err(drawing)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_label: &str,
    steps: std::ops::Range<f64>,
    series: &[Series<'_>],
    y_format: fn(&f64) -> String,
) -> Result<()> {
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !low.is_finite() {
        return empty_panel(area, title, "no finite values");
    }
    let pad = if high > low { (high - low) * 0.06 } else { low.abs().max(1e-12) * 0.1 };
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(title, (FONT, 24).into_font().style(FontStyle::Bold))
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(steps, (low - pad)..(high + pad))
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&y_format)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.15))
        .draw()
        .map_err(drawing)?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(drawing)?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        if s.markers {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(drawing)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 18))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(drawing)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_from_metrics_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = String::new();
        for step in 1..=50 {
            let val =
                if step % 10 == 0 { format!(",\"val_loss\":{}", 6.0 - step as f64 / 20.0) } else { String::new() };
            lines += &format!(
                "{{\"step\":{step},\"loss\":{},\"lr\":{},\"grad_norm\":1.0,\"tokens_per_s\":{},\"step_seconds\":0.1{val}}}\n",
                8.0 - step as f64 / 15.0,
                1e-3 * (step as f64 / 50.0),
                2000.0 + (step % 7) as f64 * 10.0
            );
        }
        std::fs::write(dir.path().join("metrics.jsonl"), lines).unwrap();
        let output = dir.path().join("report.png");
        write_report(dir.path(), &output).unwrap();
        let png = std::fs::read(&output).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (w, h) =
            (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(png.len() > 20_000, "{} bytes: is anything drawn?", png.len());
    }

    #[test]
    fn a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), "{\"step\":1,\"loss\":2,\"lr\":1,\"tokens_per_s\":3}\nnope\n")
            .unwrap();
        let error = format!("{:#}", write_report(dir.path(), &dir.path().join("r.png")).unwrap_err());
        assert!(error.contains("metrics.jsonl line 2"), "{error}");
        let empty = tempfile::tempdir().unwrap();
        let error = format!("{:#}", write_report(empty.path(), &empty.path().join("r.png")).unwrap_err());
        assert!(error.contains("cannot read"), "{error}");
    }
}
