//! Benchmarks the JSON-enrich example plugin in each language it is written
//! in (Rust, Python, JavaScript, C): the build from a clean state with the
//! toolchain installed, the rebuild after an edit of the entry file, the
//! component's size, the time to compile it for
//! the host, the cost of one call on a warm instance and of a fresh
//! instance (instantiate plus one call). Rust is the baseline of every
//! ratio. Results go to the terminal, `target/bench/languages.json` and an
//! SVG chart beside it.
//!
//! `SLUICE_BENCH_CALLS` (default 2000) sets the warm calls per language,
//! `SLUICE_BENCH_FRESH` (default 100) the fresh instances. The Python and
//! JavaScript toolchains are installed into `target/toolchains` if missing
//! (`cargo xtask bench` builds everything first).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chart::{bar, round2, save, svg_open};
use serde_json::json;
use sluice::Message;
use sluice::runtime::{Outcome, Plugin, PluginSettings, Runtime};

// Shared with the other benchmarks, which use parts this one does not.
#[allow(dead_code)]
#[path = "common/chart.rs"]
mod chart;

/// Language, project, entry file.
const LANGS: [(&str, &str, &str); 4] = [
    ("rust", "plugins/enrich", "src/lib.rs"),
    ("python", "plugins/python/enrich", "plugin.py"),
    ("js", "plugins/js/enrich", "plugin.js"),
    ("c", "plugins/c/enrich", "plugin.c"),
];
const COLOURS: [&str; 4] = ["#dea584", "#3572a5", "#f1e05a", "#555555"];
const PAYLOAD: &str = r#"{"order":1,"item":"tea","customer":"c-17","amount_cents":1250,"currency":"EUR","lines":[{"sku":"t-1","qty":2},{"sku":"b-9","qty":1}]}"#;
const WARMUP_CALLS: usize = 200;

#[tokio::main]
async fn main() -> Result<()> {
    let calls = positive_env("SLUICE_BENCH_CALLS", 2000)?;
    let fresh = positive_env("SLUICE_BENCH_FRESH", 100)?;
    let runtime = Runtime::new(None)?;
    let scratch = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for (lang, project, entry) in LANGS {
        let project = chart::workspace_root().join(project);
        println!("{lang}: building from clean…");
        let (wasm, clean) = build(lang, &project, scratch.path())?;
        println!("{lang}: rebuilding after an edit…");
        std::fs::File::options()
            .append(true)
            .open(project.join(entry))?
            .set_modified(std::time::SystemTime::now())?;
        let (_, rebuild) = build(lang, &project, scratch.path())?;
        let size = std::fs::metadata(&wasm)?.len();
        println!("{lang}: compiling for the host…");
        let started = Instant::now();
        let plugin = Arc::new(runtime.load_file(&wasm, settings())?);
        let compile = started.elapsed();
        println!("{lang}: {calls} warm calls, {fresh} fresh instances…");
        let warm = warm_call(&plugin, calls).await?;
        let fresh = fresh_instance(&plugin, fresh).await?;
        rows.push(Row {
            lang,
            build: clean,
            rebuild,
            size,
            compile,
            warm,
            fresh,
        });
    }
    print(&rows, calls);
    save("languages", &to_json(&rows, calls), &to_svg(&rows))
}

struct Row {
    lang: &'static str,
    build: Duration,
    rebuild: Duration,
    size: u64,
    compile: Duration,
    /// Median of one call on a warm instance.
    warm: Duration,
    /// Median of instantiating and making one call.
    fresh: Duration,
}

fn settings() -> PluginSettings {
    let mut settings = PluginSettings::new("enrich");
    settings.config.insert("region".into(), "eu-west".into());
    settings.timeout = Duration::from_secs(10);
    settings.publish_to = vec![">".into()];
    settings
}

/// Builds the project with `sluice build --force` into `scratch`; Rust with
/// a target dir of its own there, so the first build starts from nothing
/// but the installed toolchain and the second is cargo's incremental one. Returns the component and the language build's
/// own time as `sluice build` reports it (without the world check).
fn build(lang: &str, project: &Path, scratch: &Path) -> Result<(PathBuf, Duration)> {
    let out = scratch.join(format!("enrich-{lang}.wasm"));
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("build")
        .arg(project)
        .arg("--force")
        .arg("--out")
        .arg(&out)
        .env("CARGO_TARGET_DIR", scratch.join(format!("cargo-{lang}")))
        // The world check's compiled component stays in the scratch dir.
        .env("SLUICE_CACHE_DIR", scratch.join("component-cache"))
        .env(
            "SLUICE_TOOLCHAINS",
            chart::workspace_root().join("target/toolchains"),
        )
        .output()
        .context("run sluice build")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "building the {lang} example failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let seconds = stdout
        .split("built in ")
        .nth(1)
        .and_then(|rest| rest.split(" s").next())
        .and_then(|s| s.parse::<f64>().ok())
        .with_context(|| format!("no build time in `{stdout}`"))?;
    Ok((out, Duration::from_secs_f64(seconds)))
}

fn message() -> Message {
    let mut message = Message::new("orders", PAYLOAD);
    message.key = Some("o-1".into());
    message
}

async fn warm_call(plugin: &Arc<Plugin>, calls: usize) -> Result<Duration> {
    let mut instance = plugin.instantiate().await?;
    let message = message();
    for _ in 0..WARMUP_CALLS {
        expect_output(instance.handle(&message, 1).await?)?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        let outcome = instance.handle(&message, 1).await?;
        samples.push(started.elapsed());
        expect_output(outcome)?;
    }
    Ok(median(samples))
}

async fn fresh_instance(plugin: &Arc<Plugin>, rounds: usize) -> Result<Duration> {
    let message = message();
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut instance = plugin.instantiate().await?;
        let outcome = instance.handle(&message, 1).await?;
        samples.push(started.elapsed());
        expect_output(outcome)?;
    }
    Ok(median(samples))
}

fn expect_output(outcome: Outcome) -> Result<()> {
    match outcome {
        Outcome::Outputs(outputs) if outputs.len() == 1 => Ok(()),
        other => bail!("expected one output, got {other:?}"),
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn positive_env(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => match value.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{name} must be a positive whole number, not `{value}`"),
        },
        Err(_) => Ok(default),
    }
}

/// The figures of one language, with its name and unit, for printing,
/// JSON and the chart.
fn figures(row: &Row) -> [(&'static str, &'static str, f64); 6] {
    [
        ("build", "s", row.build.as_secs_f64()),
        ("rebuild", "s", row.rebuild.as_secs_f64()),
        ("size", "KiB", row.size as f64 / 1024.0),
        ("compile", "ms", row.compile.as_secs_f64() * 1e3),
        ("warm call", "µs", row.warm.as_secs_f64() * 1e6),
        ("fresh instance", "µs", row.fresh.as_secs_f64() * 1e6),
    ]
}

fn print(rows: &[Row], calls: usize) {
    println!();
    println!(
        "JSON enrich per language ({} B payload; warm: median of {calls} calls; Rust = 1.00)",
        PAYLOAD.len()
    );
    let base = figures(&rows[0]);
    for (i, (name, unit, _)) in base.iter().enumerate() {
        let mut line = format!("  {:<20}", format!("{name} ({unit})"));
        for row in rows {
            let value = figures(row)[i].2;
            let _ = write!(
                line,
                "  {:>7} {:>10.1} ({:>6.2}x)",
                row.lang,
                value,
                value / base[i].2
            );
        }
        println!("{line}");
    }
    println!();
}

fn to_json(rows: &[Row], calls: usize) -> serde_json::Value {
    let base = figures(&rows[0]);
    let languages: Vec<_> = rows
        .iter()
        .map(|row| {
            let mut entry = serde_json::Map::new();
            entry.insert("lang".into(), row.lang.into());
            for (i, (name, unit, value)) in figures(row).iter().enumerate() {
                let key = name.replace(' ', "_");
                entry.insert(
                    format!("{key}_{}", unit.replace('µ', "u")),
                    round2(*value).into(),
                );
                entry.insert(format!("{key}_over_rust"), round2(value / base[i].2).into());
            }
            serde_json::Value::Object(entry)
        })
        .collect();
    json!({
        "plugin": "enrich",
        "payload_bytes": PAYLOAD.len(),
        "warm_calls": calls,
        "statistic": "median",
        "build": "clean build with the toolchain installed, as `sluice build --force` times it",
        "rebuild": "the same after the entry file's modification time changed",
        "languages": languages,
    })
}

/// One panel per figure, a bar per language.
fn to_svg(rows: &[Row]) -> String {
    let panels = figures(&rows[0]).len();
    let (panel_width, height, margin) = (200.0, 300.0, 20.0);
    let width = margin * 2.0 + panel_width * panels as f64;
    let mut svg = svg_open(width, height, margin, "JSON enrich plugin per language");
    let baseline = height - 50.0;
    for panel in 0..panels {
        let left = margin + panel as f64 * panel_width;
        let (name, unit, _) = figures(&rows[0])[panel];
        let max = rows
            .iter()
            .map(|r| figures(r)[panel].2)
            .fold(f64::MIN_POSITIVE, f64::max);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="56" text-anchor="middle" font-weight="bold">{name} ({unit})</text>"#,
            left + panel_width / 2.0
        );
        for (i, row) in rows.iter().enumerate() {
            let value = figures(row)[panel].2;
            let bar_left = left + 15.0 + i as f64 * 42.0;
            svg.push_str(&bar(
                bar_left,
                34.0,
                baseline,
                value,
                (value / max) * (baseline - 80.0),
                COLOURS[i],
            ));
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                bar_left + 17.0,
                baseline + 16.0,
                row.lang
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
