//! What the host tells operators besides its metrics: its log, as text or
//! as one JSON object per line (`SLUICE_LOG_FORMAT`), filtered by
//! `SLUICE_LOG`; and, when the config's `[telemetry]` names a collector,
//! the spans of every delivery exported over OTLP.
//!
//! Each delivery has a span (target [`DELIVERY`]: route, message id,
//! attempt, plugin and version, outcome) with a child span for handling it,
//! where the plugin's log lines land, and one for settling it. They are at
//! debug level, so the default text log does not pay for them; the OTLP
//! exporter takes them whatever `SLUICE_LOG` says.

pub mod otlp;

use anyhow::{Result, bail};
use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::config::TelemetryConfig;

/// The target of the spans of a delivery (`delivery`, `handle`, `settle`).
pub const DELIVERY: &str = "sluice::delivery";

/// What `SLUICE_LOG` is when unset.
const DEFAULT_FILTER: &str = "info,sqlx=warn,wasmtime=warn,cranelift=warn";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    Text,
    /// For log collectors: one JSON object per line, with the fields and
    /// the spans the event happened in.
    Json,
}

impl LogFormat {
    /// The format `SLUICE_LOG_FORMAT` asks for (`text` when unset).
    pub fn from_env() -> Result<Self> {
        match std::env::var("SLUICE_LOG_FORMAT") {
            Err(_) => Ok(LogFormat::Text),
            Ok(value) => match value.trim() {
                "" | "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                other => bail!("SLUICE_LOG_FORMAT is `{other}`; it must be `text` or `json`"),
            },
        }
    }
}

/// Keeps the exporter running; dropping it sends what spans are left.
#[must_use = "dropping the guard stops exporting spans"]
pub struct Guard {
    exporter: Option<otlp::Exporter>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(exporter) = self.exporter.take() {
            exporter.shutdown();
        }
    }
}

/// Installs the process's log (and span exporter, with `telemetry`).
pub fn init(telemetry: Option<&TelemetryConfig>) -> Result<Guard> {
    let format = LogFormat::from_env()?;
    let filter =
        EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let exporter = telemetry.map(otlp::Exporter::start).transpose()?;
    match &exporter {
        // The log alone: `SLUICE_LOG` filters the whole subscriber. Filtering
        // the log layer only would lose the next event after a `log` crate
        // query the filter answers no to (tokio-rs/tracing#2519): creating
        // a Kafka client asks one, and with a debug directive in
        // `SLUICE_LOG` the host's following info line went missing.
        None => tracing_subscriber::registry()
            .with(filter)
            .with(log_layer(format))
            .init(),
        // Each layer has its own filter, as the exporter takes the delivery
        // spans whatever `SLUICE_LOG` says; that upstream issue remains.
        Some(exporter) => tracing_subscriber::registry()
            .with(log_layer(format).with_filter(filter))
            .with(exporter.layer().with_filter(exported()))
            .init(),
    }
    Ok(Guard { exporter })
}

/// The stderr log in `format`.
fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let stderr = std::io::stderr;
    match format {
        LogFormat::Text => fmt::layer()
            .with_writer(stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(stderr)
            .boxed(),
    }
}

/// What goes to the collector: the delivery spans, and events at info or
/// above (an event becomes an event of the span it happened in).
fn exported() -> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    filter_fn(|meta| {
        if meta.is_span() {
            meta.target() == DELIVERY
        } else {
            *meta.level() <= tracing::Level::INFO
        }
    })
}

/// Whether delivery spans are exported (and so carry their own ids into
/// the trace context of what a delivery publishes).
pub fn exporting() -> bool {
    otlp::running()
}
