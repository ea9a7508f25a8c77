//! Delivery spans exported over OTLP/HTTP (protobuf bodies, the OTLP
//! default) to `<endpoint>/v1/traces`, in batches sent from a thread of
//! the exporter's own so that a slow collector never holds up a route.
//!
//! A delivery's span joins the trace of its input's `traceparent` (or
//! starts one), and its own ids are what the delivery's outputs carry, so
//! the collector links a message's spans across routes and hosts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

use crate::config::TelemetryConfig;

/// Set while an exporter runs.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// How long one export may take before it is given up (its spans dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The running exporter.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to the collector `config` names.
    pub fn start(config: &TelemetryConfig) -> Result<Self> {
        let endpoint = config.otlp_endpoint.trim_end_matches('/');
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            bail!(
                "telemetry.otlp_endpoint `{endpoint}` must be an http:// or https:// URL \
                 (OTLP over HTTP, e.g. http://localhost:4318)"
            );
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(EXPORT_TIMEOUT))
            .build()
            .new_agent();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Ureq(agent))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{endpoint}/v1/traces"))
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(config.headers.clone().into_iter().collect())
            .build()
            .context("telemetry: cannot make the OTLP exporter")?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        RUNNING.store(true, Ordering::Relaxed);
        Ok(Exporter { provider })
    }

    /// The layer that turns delivery spans into exported spans.
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, SdkTracer>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("sluice"))
    }

    /// Sends the spans still waiting, then stops.
    pub fn shutdown(self) {
        RUNNING.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            eprintln!("telemetry: exporting the last spans failed: {e}");
        }
    }
}

/// Whether an exporter runs.
pub fn running() -> bool {
    RUNNING.load(Ordering::Relaxed)
}

/// The parent a delivery's span continues: the ids and flags of a valid
/// `traceparent`, and its `tracestate`.
pub struct RemoteParent<'a> {
    pub trace_id: &'a str,
    pub parent_id: &'a str,
    pub flags: &'a str,
    pub state: Option<&'a str>,
}

/// Makes `span` (not yet entered) a child of `parent`, or the root of a new
/// trace, and returns its trace id, span id and flags as lowercase hex;
/// `None` if the span is not exported.
pub fn adopt(span: &tracing::Span, parent: Option<RemoteParent>) -> Option<(String, String, u8)> {
    let parent = match parent {
        Some(p) => {
            let remote = SpanContext::new(
                TraceId::from_hex(p.trace_id).ok()?,
                SpanId::from_hex(p.parent_id).ok()?,
                TraceFlags::new(u8::from_str_radix(p.flags, 16).ok()?),
                true,
                p.state
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default(),
            );
            opentelemetry::Context::new().with_remote_span_context(remote)
        }
        None => opentelemetry::Context::new(),
    };
    span.set_parent(parent).ok()?;
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then(|| {
        (
            format!("{:032x}", own.trace_id()),
            format!("{:016x}", own.span_id()),
            own.trace_flags().to_u8(),
        )
    })
}

/// ureq as the exporter's HTTP client. Blocking is right here: exports run
/// on the batch processor's own thread.
#[derive(Debug)]
struct Ureq(ureq::Agent);

#[async_trait]
impl HttpClient for Ureq {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut response = self
            .0
            .run(ureq::http::Request::from_parts(parts, body.to_vec()))?;
        let status = response.status();
        let body = response.body_mut().read_to_vec()?;
        Ok(Response::builder().status(status).body(Bytes::from(body))?)
    }
}
