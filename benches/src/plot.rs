//! The two plots RESULTS.md links: decision cost per engine and grant-set
//! size, and the distribution of revocation latency per number of sidecars.
//! SVG only, so no fonts or image codecs are needed to draw them.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Log bounds that hold every value with some room.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (1.0, 10.0);
    }
    (lo / 2.0, hi * 2.0)
}

/// One line per engine: p50 nanoseconds per decision against grant-set size,
/// both axes logarithmic, plus horizontal reference lines (e.g. the filter's
/// in-wasm decision and the ext_authz round trip).
pub fn decision(
    path: &Path,
    series: &[(String, Vec<(usize, f64)>)],
    references: &[(String, f64)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let all_y = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .chain(references.iter().map(|r| r.1));
    let (y_lo, y_hi) = log_range(all_y);
    let x_hi = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.0 as f64))
        .fold(10.0, f64::max)
        * 3.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Consent decision cost by engine and grant-set size",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d((0.5f64..x_hi).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("grants held")
        .y_desc("p50 per decision (ns)")
        .x_label_formatter(&|x| crate::report::human_count(x.round() as usize))
        .y_label_formatter(&|y| crate::report::human_ns(*y))
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = points.iter().map(|(x, y)| (*x as f64, *y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 5, color.filled())))
            .map_err(err)?;
    }
    for (j, (name, y)) in references.iter().enumerate() {
        let color = PALETTE[(series.len() + j) % PALETTE.len()];
        let style = ShapeStyle::from(&color).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.5, *y), (x_hi, *y)],
                6,
                4,
                style,
            ))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Cumulative distributions of latency samples (milliseconds), one per series.
pub fn latency_cdf(path: &Path, title: &str, series: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (x_lo, x_hi) = log_range(series.iter().flat_map(|(_, s)| s.iter().copied()));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0f64..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds from the revoke call (log scale)")
        .y_desc("fraction acknowledged")
        .x_label_formatter(&|x| format!("{x:.2}"))
        .draw()
        .map_err(err)?;
    for (i, (name, samples)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| *v > 0.0).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        // At most ~2000 points per curve keeps the SVG small.
        let step = (sorted.len() / 2000).max(1);
        let pts: Vec<(f64, f64)> = sorted
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k + 1 == sorted.len())
            .map(|(k, v)| (*v, (k + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_their_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("decision.svg");
        decision(
            &d,
            &[("consent-core".into(), vec![(1, 120.0), (10_000, 180.0)])],
            &[("in filter".into(), 900.0)],
        )
        .expect("decision plot");
        let svg = std::fs::read_to_string(&d).expect("written");
        assert!(
            svg.starts_with("<svg") && svg.contains("consent-core") && svg.contains("in filter")
        );

        let p = dir.path().join("propagation.svg");
        latency_cdf(&p, "t", &[("N = 1".into(), vec![0.5, 1.0, 2.0])]).expect("cdf plot");
        let svg = std::fs::read_to_string(&p).expect("written");
        assert!(svg.contains("N = 1") && svg.contains("<polyline"));
    }
}
