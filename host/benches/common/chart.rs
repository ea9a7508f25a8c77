//! What the benchmarks share: the median of repeated runs, number
//! formatting, the pieces of their hand-written SVG bar charts, and writing
//! results under `target/bench`.
//! Included by each benchmark with `#[path]`, so it is not a bench itself.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// Sorts `values` and gives their median (the upper one of an even count);
/// `None` if there are none.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The opening of a chart: the root element, a white background, a title.
pub fn svg_open(width: f64, height: f64, margin: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="{margin}" y="28" font-size="16" font-weight="bold">{title}</text>"##
    );
    svg
}

/// A row of colour swatches with their names, starting at `x`.
pub fn legend(x: f64, y: f64, entries: &[(&str, &str)]) -> String {
    let mut svg = String::new();
    for (offset, (name, colour)) in entries.iter().enumerate() {
        let x = x + offset as f64 * 160.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}">{name}</text>"#,
            y - 10.0,
            x + 18.0,
            y
        );
    }
    svg
}

/// One bar standing on `baseline`, labelled with its value above it.
pub fn bar(left: f64, width: f64, baseline: f64, value: f64, height: f64, colour: &str) -> String {
    format!(
        r#"<rect x="{left:.1}" y="{:.1}" width="{width:.1}" height="{height:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>
"#,
        baseline - height,
        left + width / 2.0,
        baseline - height - 4.0,
        compact(value)
    )
}

/// Short labels for bars: 41.2k, 812, 23.4.
pub fn compact(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.1}k", value / 1000.0)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// 41234.6 → "41,235".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

pub fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Writes `<name>.json` and `<name>.svg` to `target/bench`.
pub fn save(name: &str, json: &serde_json::Value, svg: &str) -> Result<()> {
    let dir = workspace_root().join("target").join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(format!("{name}.json"));
    let json = serde_json::to_string_pretty(json)?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("wrote {}", json_path.display());
    let svg_path = dir.join(format!("{name}.svg"));
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    println!("wrote {}", svg_path.display());
    Ok(())
}

pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host package lives inside the workspace")
}
