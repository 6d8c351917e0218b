//! What a run writes besides its checkpoint: metrics, the confusion
//! matrix and the learning curve.

use std::path::Path;

use anyhow::Result;

use crate::checkpoint::write_atomic;
use crate::train::{EpochMetrics, Evaluation, Recipe, ARTICLE_MOMENTUM_5};

/// Writes `metrics.csv` and `metrics.json` (`raw_test_acc`, the raw
/// weights' accuracy, only in a run with `--ema`).
pub fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut csv = String::from(
        "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds,images_per_sec,raw_test_acc\n",
    );
    for m in history {
        let raw = m.raw_test_acc.map_or(String::new(), |a| format!("{a:.4}"));
        csv.push_str(&format!(
            "{},{:.6},{:.4},{:.6},{:.4},{:.8},{:.3},{:.2},{raw}\n",
            m.epoch,
            m.train_loss,
            m.train_acc,
            m.test_loss,
            m.test_acc,
            m.lr,
            m.seconds,
            m.images_per_sec
        ));
    }
    write_atomic(&dir.join("metrics.csv"), csv.as_bytes())?;
    write_atomic(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(history)?.as_bytes(),
    )
}

/// Writes `confusion.csv` (rows: true class, columns: predicted) and
/// `per_class.json`.
pub fn write_confusion(dir: &Path, ev: &Evaluation) -> Result<()> {
    let names: Vec<&str> = (0..ev.confusion.len()).map(|c| ev.class_name(c)).collect();
    let mut csv = format!("true\\predicted,{}\n", names.join(","));
    for (c, row) in ev.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        csv.push_str(&format!("{},{}\n", names[c], cells.join(",")));
    }
    write_atomic(&dir.join("confusion.csv"), csv.as_bytes())?;
    let per: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(ev.per_class())
        .map(|(n, a)| (n.to_string(), serde_json::json!(a)))
        .collect();
    write_atomic(
        &dir.join("per_class.json"),
        serde_json::to_string_pretty(&per)?.as_bytes(),
    )
}

/// Formats the confusion matrix and per-class accuracy for the terminal.
pub fn format_confusion(ev: &Evaluation) -> String {
    let mut s = String::from("true \\ pred  ");
    for c in 0..ev.confusion.len() {
        let short: String = ev.class_name(c).chars().take(4).collect();
        s.push_str(&format!("{short:>6}"));
    }
    s.push_str("   acc\n");
    for (c, (row, acc)) in ev.confusion.iter().zip(ev.per_class()).enumerate() {
        s.push_str(&format!("{:<12} ", ev.class_name(c)));
        for v in row {
            s.push_str(&format!("{v:>6}"));
        }
        s.push_str(&format!("  {acc:5.1}%\n"));
    }
    s
}

/// Draws the learning curve (accuracy and loss per epoch) as SVG, with the
/// article's Momentum figure as a reference line.
pub fn plot_learning_curve(path: &Path, history: &[EpochMetrics], recipe: Recipe) -> Result<()> {
    use plotters::prelude::*;
    // Drawn into memory, then written atomically: a full disk leaves the
    // previous curve, never a truncated one.
    let mut svg = String::new();
    let draw = |svg: &mut String| -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(svg, (960, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(480);
        let n = history.len().max(2) as f64;
        let mut acc = ChartBuilder::on(&left)
            .caption(format!("accuracy ({recipe:?})"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(1f64..n, 0f64..100f64)?;
        acc.configure_mesh().x_desc("epoch").y_desc("%").draw()?;
        type Field = fn(&EpochMetrics) -> f64;
        let curves: [(&str, RGBColor, Field); 2] = [
            ("train (augmented)", BLUE, |m| m.train_acc),
            ("test", RED, |m| m.test_acc),
        ];
        for (label, color, field) in curves {
            acc.draw_series(LineSeries::new(
                history.iter().map(|m| (m.epoch as f64, field(m))),
                color,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        acc.draw_series(LineSeries::new(
            [(1.0, ARTICLE_MOMENTUM_5), (n, ARTICLE_MOMENTUM_5)],
            BLACK.mix(0.4),
        ))?
        .label("article, Momentum 5 ep (74.36%)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK.mix(0.4)));
        acc.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .draw()?;
        let max_loss = history
            .iter()
            .flat_map(|m| [m.train_loss, m.test_loss])
            .fold(0.1f64, f64::max);
        let mut loss = ChartBuilder::on(&right)
            .caption("loss", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(1f64..n, 0f64..max_loss * 1.05)?;
        loss.configure_mesh().x_desc("epoch").draw()?;
        loss.draw_series(LineSeries::new(
            history.iter().map(|m| (m.epoch as f64, m.train_loss)),
            &BLUE,
        ))?;
        loss.draw_series(LineSeries::new(
            history.iter().map(|m| (m.epoch as f64, m.test_loss)),
            &RED,
        ))?;
        root.present()?;
        Ok(())
    };
    // plotters' error is a `Box<dyn Error>` without `Send`: anyhow cannot
    // hold it as a source, so its message is kept.
    draw(&mut svg).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    write_atomic(path, svg.as_bytes())
}
