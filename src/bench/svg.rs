//! Pictures of `chord bench` results as SVG (`--svg FILE`), drawn with plotters. Built with
//! the `svg` cargo feature (on by default).
//!
//! Both pictures are horizontal bar charts, one bar per measured row, with the row's label on
//! the left; groups in the order the table first prints them:
//! - [`kernels`]: each bar is a row's rate as a percentage of its roof, with a line at 100%.
//!   The bars are grouped by op, format, shape and thread count, and coloured by backend,
//!   variant and mode.
//! - [`model`]: each bar is a test's tokens/s at one thread count, coloured by mode; the
//!   modes of a test and thread count sit together.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::kernels::Row;
use super::model::ModelRow;

/// Pixels per bar.
const BAR: u32 = 18;

/// One bar: its label, the group it is drawn with, the series it belongs to (colour and
/// legend) and its length.
struct Bar {
    label: String,
    group: String,
    series: String,
    value: f64,
}

/// The kernel table as bars of percent of roof (see the module docs).
pub fn kernels(rows: &[Row], title: &str) -> Result<String, String> {
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| {
            let unit = r.unit.name();
            Bar {
                label: format!(
                    "{} {} {}  {}t  {:.1} {unit}",
                    r.op.name(),
                    r.dtype,
                    r.shape,
                    r.threads,
                    r.rate
                ),
                series: match r.mode {
                    Some(mode) => format!("{} {mode}", r.backend),
                    None => r.backend.clone(),
                },
                group: format!("{} {} {} {}", r.op.name(), r.dtype, r.shape, r.threads),
                value: r.roof_pct,
            }
        })
        .collect();
    draw(
        &bars,
        title,
        "% of the roof (this run's probes)",
        Some(100.0),
    )
}

/// Whole-model throughput as bars of tokens/s (see the module docs).
pub fn model(rows: &[ModelRow], title: &str) -> Result<String, String> {
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| Bar {
            label: format!(
                "{} {} thread{}  {:.1} tok/s",
                r.test,
                r.threads,
                if r.threads == 1 { "" } else { "s" },
                r.tokens_per_second
            ),
            group: format!("{} {}", r.test, r.threads),
            series: format!("{} {}", r.backend, r.mode),
            value: r.tokens_per_second,
        })
        .collect();
    draw(&bars, title, "tokens/s (median)", None)
}

fn draw(bars: &[Bar], title: &str, axis: &str, mark: Option<f64>) -> Result<String, String> {
    if bars.is_empty() {
        return Err("no rows to draw".into());
    }
    // The bars of a group together, groups in the order they first appear.
    let mut groups: Vec<&str> = Vec::new();
    for b in bars {
        if !groups.contains(&b.group.as_str()) {
            groups.push(&b.group);
        }
    }
    let mut bars: Vec<&Bar> = bars.iter().collect();
    bars.sort_by_key(|b| groups.iter().position(|g| *g == b.group));
    let err = |e: &dyn std::fmt::Display| format!("drawing the SVG: {e}");
    let mut series: Vec<&str> = Vec::new();
    for b in &bars {
        if !series.contains(&b.series.as_str()) {
            series.push(&b.series);
        }
    }
    let widest = bars.iter().map(|b| b.label.len()).max().unwrap_or(0) as u32;
    let label_width = 20 + 7 * widest;
    let height = 110 + BAR * bars.len() as u32 + 20 * series.len() as u32;
    let top = bars.iter().map(|b| b.value).fold(0.0, f64::max);
    let xmax = mark.map_or(top, |m| top.max(m)) * 1.08;
    let n = bars.len();
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (label_width + 560, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        // The legend gets its own strip under the chart, so that it never covers a bar.
        let legend_height = 10 + 20 * series.len() as u32;
        let (upper, legend) = root.split_vertically(height - legend_height);
        let mut chart = ChartBuilder::on(&upper)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(label_width)
            .build_cartesian_2d(0.0..xmax.max(1e-9), (0..n - 1).into_segmented())
            .map_err(|e| err(&e))?;
        let labels: Vec<&str> = bars.iter().map(|b| b.label.as_str()).collect();
        let label_of = move |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) if *i < n => labels[n - 1 - *i].to_string(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(TRANSPARENT)
            .y_labels(n)
            .y_label_formatter(&label_of)
            .y_label_style(("monospace", 12))
            .x_desc(axis)
            .draw()
            .map_err(|e| err(&e))?;
        for (k, name) in series.iter().enumerate() {
            let colour = Palette99::pick(k).mix(0.9);
            chart
                .draw_series(
                    bars.iter()
                        .enumerate()
                        .filter(|(_, b)| b.series == *name)
                        .map(|(i, b)| {
                            // The first row on top, as the table prints it.
                            let row = n - 1 - i;
                            let mut r = Rectangle::new(
                                [
                                    (0.0, SegmentValue::Exact(row)),
                                    (b.value, SegmentValue::Exact(row + 1)),
                                ],
                                colour.filled(),
                            );
                            r.set_margin(2, 2, 0, 0);
                            r
                        }),
                )
                .map_err(|e| err(&e))?;
            let y = 5 + 20 * k as i32;
            let x = label_width as i32 + 12;
            legend
                .draw(&Rectangle::new(
                    [(x, y + 2), (x + 14, y + 14)],
                    colour.filled(),
                ))
                .map_err(|e| err(&e))?;
            legend
                .draw(&Text::new(
                    name.to_string(),
                    (x + 22, y + 2),
                    ("sans-serif", 13),
                ))
                .map_err(|e| err(&e))?;
        }
        if let Some(m) = mark {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(m, SegmentValue::Exact(0)), (m, SegmentValue::Exact(n))],
                    BLACK.stroke_width(1),
                )))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_picture_has_a_bar_and_a_label_per_row() {
        let rows: Vec<ModelRow> = [
            ("pp512", 1, 400.0),
            ("pp512", 2, 770.0),
            ("tg128", 2, 255.5),
        ]
        .iter()
        .map(|&(test, threads, tps)| ModelRow {
            test: test.into(),
            depth: 0,
            backend: "simd-avx512".into(),
            mode: "exact".into(),
            threads,
            tokens_per_second: tps,
            repetitions: 3,
        })
        .collect();
        let svg = model(&rows, "SmolLM2").unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        for label in [
            "pp512 1 thread  400.0 tok/s",
            "tg128 2 threads  255.5 tok/s",
            "SmolLM2",
        ] {
            assert!(svg.contains(label), "no {label:?}");
        }
        // Three bars and one legend swatch in the series colour; bar lengths in proportion
        // to tokens/s.
        let colour = Palette99::pick(0).to_rgba();
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", colour.0, colour.1, colour.2);
        let widths: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<rect") && l.contains(&fill))
            .map(|l| {
                let w = l.split("width=\"").nth(1).unwrap();
                w[..w.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert_eq!(widths.len(), 4, "{svg}");
        let (pp1, pp2, tg2) = (widths[0], widths[1], widths[2]);
        assert!((pp2 / pp1 - 770.0 / 400.0).abs() < 0.01, "{widths:?}");
        assert!((tg2 / pp1 - 255.5 / 400.0).abs() < 0.01, "{widths:?}");
        assert!(model(&[], "empty").is_err());
    }
}
