//! Benchmarks the in-memory pipeline with the `echo` WebAssembly plugin
//! against the same pipeline with a native Rust handler doing the same, so
//! the cost of the sandbox shows as a ratio: throughput at concurrency 1 and
//! 4, and round-trip latency one message at a time. The route's
//! `batch_size` is [`pipeline::BATCH_SIZE`]: the plugin gets up to that many
//! messages per `handle-batch` call. An ordered route over 1,000 keys runs
//! too, against the same route unordered: what keeping each key's order
//! costs the router itself, with no backend to wait for. Results go to the
//! terminal, to `target/bench/pipeline.json` and to an SVG chart beside it.
//!
//! `SLUICE_BENCH_MESSAGES` (default 20000) sets the messages per throughput
//! run, `SLUICE_BENCH_ROUNDS` (default 10000) the round trips per handler
//! for latency. Needs the plugins built: `cargo xtask bench` does both.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chart::{bar, legend, median, round2, save, svg_open, thousands};
use serde_json::json;
use sluice::Message;
use sluice::backend::memory::MemoryBackend;
use sluice::router::{FnHandler, MessageHandler};
use sluice::runtime::{Outcome, Runtime};

#[path = "common/chart.rs"]
mod chart;
// Shared with the broker benchmark, which uses parts this one does not.
#[allow(dead_code)]
#[path = "common/pipeline.rs"]
mod pipeline;

use pipeline::{
    BATCH_SIZE, OUTPUT, PAYLOAD_BYTES, Pipeline, batches, echo_handler, message, positive_env,
};

const CONCURRENCIES: [usize; 2] = [1, 4];
const LATENCY_CONCURRENCY: usize = 1;
/// The ordered run's keys and concurrency, as in the broker benchmark, so
/// that its ratio there can be read against this one.
const ORDERED_KEYS: usize = 1_000;
const ORDERED_CONCURRENCY: usize = 32;
/// Enough for every worker's instance to exist and every code path to be hot.
const WARMUP_MESSAGES: usize = 2_000;
const WARMUP_ROUNDS: usize = 500;
/// Runs per throughput figure, which is their median: a single run of a
/// few thousand messages lasts a fraction of a second and is easily skewed.
const REPEATS: usize = 5;

const WASM_COLOUR: &str = "#654ff0";
const NATIVE_COLOUR: &str = "#f0883e";

#[tokio::main]
async fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    let runtime = Runtime::new(None)?;
    let handlers = Handlers::new(&runtime)?;
    let mut throughput = Vec::new();
    for concurrency in CONCURRENCIES {
        let rate = measure_throughput(&handlers, concurrency, &settings).await?;
        throughput.push(Throughput { concurrency, rate });
    }
    let order = measure_order_cost(&handlers, &settings).await?;
    let latency = measure_latency(&handlers, &settings).await?;
    let results = Results {
        settings,
        throughput,
        order,
        latency,
    };
    results.print();
    results.save()
}

struct Settings {
    messages: usize,
    rounds: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        Ok(Settings {
            messages: positive_env("SLUICE_BENCH_MESSAGES", 20_000)?,
            rounds: positive_env("SLUICE_BENCH_ROUNDS", 10_000)?,
        })
    }
}

/// The two handlers compared: they produce the same outputs.
struct Handlers {
    wasm: Arc<dyn MessageHandler>,
    native: Arc<dyn MessageHandler>,
}

impl Handlers {
    fn new(runtime: &Runtime) -> Result<Self> {
        Ok(Handlers {
            wasm: echo_handler(runtime)?,
            native: Arc::new(FnHandler(native_echo)),
        })
    }
}

/// What the `echo` plugin does, natively: the host turns a plugin's output
/// into a fresh message with the same key, headers and payload.
fn native_echo(message: &Message, _attempt: u32) -> Outcome {
    let mut output = Message::new(OUTPUT, message.payload.clone());
    output.key = message.key.clone();
    output.headers = message.headers.clone();
    Outcome::Outputs(vec![output])
}

/// Median messages per second of each handler over [`REPEATS`] runs.
async fn measure_throughput(
    handlers: &Handlers,
    concurrency: usize,
    settings: &Settings,
) -> Result<Pair<f64>> {
    let phase = format!("throughput, concurrency {concurrency}:");
    println!("{phase} warming up…");
    let mut pipelines = Pair::<Pipeline>::start(handlers, concurrency).await?;
    println!(
        "{phase} {REPEATS} × {} messages, wasm and native in turn…",
        settings.messages
    );
    let mut rates = Pair {
        wasm: Vec::new(),
        native: Vec::new(),
    };
    for _ in 0..REPEATS {
        rates
            .wasm
            .push(throughput(&mut pipelines.wasm, settings.messages).await?);
        rates
            .native
            .push(throughput(&mut pipelines.native, settings.messages).await?);
    }
    pipelines.stop().await?;
    let rate = Pair {
        wasm: median(&mut rates.wasm).context("no throughput run")?,
        native: median(&mut rates.native).context("no throughput run")?,
    };
    println!(
        "{phase} wasm {} msgs/s, native {} msgs/s",
        thousands(rate.wasm),
        thousands(rate.native)
    );
    Ok(rate)
}

/// Median messages per second of the wasm route unordered and ordered,
/// measured in turn.
async fn measure_order_cost(handlers: &Handlers, settings: &Settings) -> Result<OrderCost> {
    let phase =
        format!("ordered over {ORDERED_KEYS} keys, concurrency {ORDERED_CONCURRENCY}, wasm:");
    println!("{phase} warming up…");
    let mut unordered = memory_pipeline(handlers.wasm.clone(), ORDERED_CONCURRENCY, None).await?;
    let mut ordered = memory_pipeline(
        handlers.wasm.clone(),
        ORDERED_CONCURRENCY,
        Some(ORDERED_KEYS),
    )
    .await?;
    warm_up(&mut unordered).await?;
    warm_up(&mut ordered).await?;
    println!(
        "{phase} {REPEATS} × {} messages, unordered and ordered in turn…",
        settings.messages
    );
    let (mut unordered_rates, mut ordered_rates) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        unordered_rates.push(throughput(&mut unordered, settings.messages).await?);
        ordered_rates.push(throughput(&mut ordered, settings.messages).await?);
    }
    unordered.stop().await?;
    ordered.stop().await?;
    let cost = OrderCost {
        unordered: median(&mut unordered_rates).context("no throughput run")?,
        ordered: median(&mut ordered_rates).context("no throughput run")?,
    };
    println!(
        "{phase} unordered {} msgs/s, ordered {} msgs/s",
        thousands(cost.unordered),
        thousands(cost.ordered)
    );
    Ok(cost)
}

/// Round trips one message at a time, both handlers.
async fn measure_latency(handlers: &Handlers, settings: &Settings) -> Result<Pair<Latency>> {
    let phase = format!("latency, concurrency {LATENCY_CONCURRENCY}:");
    println!("{phase} warming up…");
    let mut pipelines = Pair::<Pipeline>::start(handlers, LATENCY_CONCURRENCY).await?;
    // Round trips exercise paths that batches do not: warm those too.
    round_trips(&mut pipelines.wasm, WARMUP_ROUNDS).await?;
    round_trips(&mut pipelines.native, WARMUP_ROUNDS).await?;
    println!(
        "{phase} {} round trips each, wasm and native in turn…",
        settings.rounds
    );
    let mut samples = Pair {
        wasm: Vec::new(),
        native: Vec::new(),
    };
    let slice = settings.rounds.div_ceil(REPEATS);
    while samples.wasm.len() < settings.rounds {
        let rounds = slice.min(settings.rounds - samples.wasm.len());
        samples
            .wasm
            .extend(round_trips(&mut pipelines.wasm, rounds).await?);
        samples
            .native
            .extend(round_trips(&mut pipelines.native, rounds).await?);
    }
    pipelines.stop().await?;
    let latency = Pair {
        wasm: Latency::from_samples(samples.wasm),
        native: Latency::from_samples(samples.native),
    };
    println!(
        "{phase} p50 wasm {:.1} µs, native {:.1} µs",
        micros(latency.wasm.p50),
        micros(latency.native.p50)
    );
    Ok(latency)
}

/// Both pipelines live side by side and are measured in turn, so a burst
/// of load from elsewhere on the machine hits both rather than one.
impl Pair<Pipeline> {
    async fn start(handlers: &Handlers, concurrency: usize) -> Result<Self> {
        let mut pipelines = Pair {
            wasm: memory_pipeline(handlers.wasm.clone(), concurrency, None).await?,
            native: memory_pipeline(handlers.native.clone(), concurrency, None).await?,
        };
        warm_up(&mut pipelines.wasm).await?;
        warm_up(&mut pipelines.native).await?;
        Ok(pipelines)
    }

    async fn stop(self) -> Result<()> {
        self.wasm.stop().await?;
        self.native.stop().await
    }
}

/// A pipeline on a fresh in-memory backend of its own; with `keys`, an
/// ordered one whose inputs take that many keys in turn.
async fn memory_pipeline(
    handler: Arc<dyn MessageHandler>,
    concurrency: usize,
    keys: Option<usize>,
) -> Result<Pipeline> {
    let backend = Arc::new(MemoryBackend::from_url("memory://")?);
    Pipeline::start(backend, handler, concurrency, keys).await
}

async fn warm_up(pipeline: &mut Pipeline) -> Result<()> {
    pipeline.publish(WARMUP_MESSAGES).await?;
    pipeline.collect(WARMUP_MESSAGES).await
}

/// Messages per second from the first publish until the last output is
/// consumed, publishing as fast as back-pressure allows, with the
/// pipeline's keys.
async fn throughput(pipeline: &mut Pipeline, messages: usize) -> Result<f64> {
    // Built beforehand: the publisher's own costs are not the pipeline's.
    let batches = batches(messages, pipeline.keys);
    let backend = pipeline.backend.clone();
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for batch in batches {
            backend.publish(batch).await?;
        }
        anyhow::Ok(())
    });
    pipeline.collect(messages).await?;
    let elapsed = started.elapsed();
    publisher.await??;
    Ok(messages as f64 / elapsed.as_secs_f64())
}

/// Publishes one message at a time and times until its output arrives.
async fn round_trips(pipeline: &mut Pipeline, rounds: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let message = message();
        let started = Instant::now();
        pipeline.backend.publish(vec![message]).await?;
        pipeline.collect(1).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// A figure for each handler.
#[derive(Clone, Copy)]
struct Pair<T> {
    wasm: T,
    native: T,
}

impl Pair<f64> {
    fn ratio(&self) -> f64 {
        self.wasm / self.native
    }
}

struct Throughput {
    concurrency: usize,
    /// Messages per second.
    rate: Pair<f64>,
}

/// The wasm route's messages per second, unordered and ordered.
struct OrderCost {
    unordered: f64,
    ordered: f64,
}

impl OrderCost {
    fn ratio(&self) -> f64 {
        self.ordered / self.unordered
    }
}

#[derive(Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

impl Latency {
    fn from_samples(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        Latency {
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            mean,
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Pair<Latency> {
    /// The latency figures by name, in microseconds.
    fn figures(&self) -> [(&'static str, Pair<f64>); 3] {
        let pick = |f: fn(&Latency) -> Duration| Pair {
            wasm: micros(f(&self.wasm)),
            native: micros(f(&self.native)),
        };
        [
            ("p50", pick(|l| l.p50)),
            ("p99", pick(|l| l.p99)),
            ("mean", pick(|l| l.mean)),
        ]
    }
}

struct Results {
    settings: Settings,
    throughput: Vec<Throughput>,
    order: OrderCost,
    latency: Pair<Latency>,
}

impl Results {
    fn print(&self) {
        println!();
        println!(
            "Throughput: median of {REPEATS} runs of {} messages of {PAYLOAD_BYTES} B, batch_size {BATCH_SIZE}, in memory, msgs/s (higher is better)",
            self.settings.messages
        );
        println!(
            "  {:>11}  {:>10}  {:>10}  {:>11}",
            "concurrency", "wasm", "native", "wasm/native"
        );
        for run in &self.throughput {
            println!(
                "  {:>11}  {:>10}  {:>10}  {:>11.2}",
                run.concurrency,
                thousands(run.rate.wasm),
                thousands(run.rate.native),
                run.rate.ratio()
            );
        }
        println!(
            "  ordered over {ORDERED_KEYS} keys, concurrency {ORDERED_CONCURRENCY}, wasm: {} msgs/s, {:.2} of unordered ({} msgs/s)",
            thousands(self.order.ordered),
            self.order.ratio(),
            thousands(self.order.unordered)
        );
        println!();
        println!(
            "Round-trip latency: {} messages one at a time, concurrency {LATENCY_CONCURRENCY}, µs (lower is better)",
            self.settings.rounds
        );
        println!(
            "  {:>11}  {:>10}  {:>10}  {:>11}",
            "", "wasm", "native", "wasm/native"
        );
        for (name, figure) in self.latency.figures() {
            println!(
                "  {name:>11}  {:>10.1}  {:>10.1}  {:>11.2}",
                figure.wasm,
                figure.native,
                figure.ratio()
            );
        }
        println!();
    }

    fn save(&self) -> Result<()> {
        save("pipeline", &self.to_json(), &self.to_svg())
    }

    fn to_json(&self) -> serde_json::Value {
        let runs: Vec<_> = self
            .throughput
            .iter()
            .map(|run| {
                json!({
                    "concurrency": run.concurrency,
                    "wasm_msgs_per_sec": run.rate.wasm.round(),
                    "native_msgs_per_sec": run.rate.native.round(),
                    "wasm_over_native": round2(run.rate.ratio()),
                })
            })
            .collect();
        let mut latency = serde_json::Map::new();
        for (name, figure) in self.latency.figures() {
            let entry = json!({
                "wasm_us": round2(figure.wasm),
                "native_us": round2(figure.native),
                "wasm_over_native": round2(figure.ratio()),
            });
            latency.insert(name.into(), entry);
        }
        json!({
            "payload_bytes": PAYLOAD_BYTES,
            "throughput": {
                "messages_per_run": self.settings.messages,
                "runs_per_figure": REPEATS,
                "statistic": "median",
                "figures": runs,
                "ordered": {
                    "keys": ORDERED_KEYS,
                    "concurrency": ORDERED_CONCURRENCY,
                    "handler": "wasm",
                    "unordered_msgs_per_sec": self.order.unordered.round(),
                    "ordered_msgs_per_sec": self.order.ordered.round(),
                    "ordered_over_unordered": round2(self.order.ratio()),
                },
            },
            "latency": {
                "rounds": self.settings.rounds,
                "concurrency": LATENCY_CONCURRENCY,
                "figures": latency,
            },
        })
    }

    fn to_svg(&self) -> String {
        let throughput = Panel {
            title: "Throughput, msgs/s (higher is better)",
            groups: self
                .throughput
                .iter()
                .map(|run| (format!("concurrency {}", run.concurrency), run.rate))
                .collect(),
        };
        let latency = Panel {
            title: "Round-trip latency, µs (lower is better)",
            groups: self
                .latency
                .figures()
                .into_iter()
                .filter(|(name, _)| *name != "mean")
                .map(|(name, figure)| (name.to_owned(), figure))
                .collect(),
        };
        chart(
            &format!(
                "Sluice pipeline, {PAYLOAD_BYTES} B messages: echo plugin (wasm) vs native handler"
            ),
            &[throughput, latency],
        )
    }
}

/// One bar chart: groups of a wasm bar and a native bar.
struct Panel {
    title: &'static str,
    groups: Vec<(String, Pair<f64>)>,
}

const PANEL_WIDTH: f64 = 420.0;
const PANEL_HEIGHT: f64 = 300.0;
const MARGIN: f64 = 30.0;
const TOP: f64 = 80.0;

fn chart(title: &str, panels: &[Panel]) -> String {
    let width = MARGIN + panels.len() as f64 * (PANEL_WIDTH + MARGIN);
    let height = TOP + PANEL_HEIGHT + MARGIN;
    let mut svg = svg_open(width, height, MARGIN, title);
    svg.push_str(&legend(
        MARGIN,
        50.0,
        &[
            ("wasm (echo plugin)", WASM_COLOUR),
            ("native", NATIVE_COLOUR),
        ],
    ));
    for (index, panel) in panels.iter().enumerate() {
        let x = MARGIN + index as f64 * (PANEL_WIDTH + MARGIN);
        svg.push_str(&panel.to_svg(x, TOP));
    }
    svg.push_str("</svg>\n");
    svg
}

impl Panel {
    fn to_svg(&self, x: f64, y: f64) -> String {
        let plot_top = y + 40.0;
        let baseline = y + PANEL_HEIGHT - 40.0;
        // Headroom above the tallest bar for its value label.
        let max = self
            .groups
            .iter()
            .flat_map(|(_, pair)| [pair.wasm, pair.native])
            .fold(0.0, f64::max)
            * 1.1;
        let scale = if max > 0.0 {
            (baseline - plot_top) / max
        } else {
            0.0
        };
        let group_width = PANEL_WIDTH / self.groups.len().max(1) as f64;
        let bar_width = (group_width * 0.3).min(70.0);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="14">{}</text><line x1="{x}" y1="{baseline}" x2="{}" y2="{baseline}" stroke="#333333"/>"##,
            x + PANEL_WIDTH / 2.0,
            y + 10.0,
            self.title,
            x + PANEL_WIDTH
        );
        for (index, (label, pair)) in self.groups.iter().enumerate() {
            let centre = x + group_width * (index as f64 + 0.5);
            for (value, colour, left) in [
                (pair.wasm, WASM_COLOUR, centre - bar_width - 2.0),
                (pair.native, NATIVE_COLOUR, centre + 2.0),
            ] {
                svg.push_str(&bar(
                    left,
                    bar_width,
                    baseline,
                    value,
                    value * scale,
                    colour,
                ));
            }
            let _ = writeln!(
                svg,
                r##"<text x="{centre}" y="{}" text-anchor="middle">{label}</text><text x="{centre}" y="{}" text-anchor="middle" fill="#555555">wasm/native {:.2}</text>"##,
                baseline + 18.0,
                baseline + 34.0,
                pair.ratio()
            );
        }
        svg
    }
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
