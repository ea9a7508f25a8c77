//! What the host tells operators: JSON log lines, and delivery spans
//! exported over OTLP to a collector (a receiver in this test that decodes
//! what the host sends), linked across routes by the trace context the
//! messages carry.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use common::plugin_path;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use sluice_tests::common;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn sluice(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = common::sluice();
    command
        .args(args)
        .env_remove("SLUICE_BACKEND_URL")
        .env_remove("SLUICE_LOG_FORMAT")
        .env("SLUICE_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run sluice")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Two routes in a chain on SQLite: `first` reads `in` and writes `middle`,
/// `second` reads `middle` and writes `out`; `extra` goes at the end.
fn chain_config(dir: &Path, extra: &str) -> String {
    let chaos = plugin_path("chaos");
    let config = format!(
        r#"[backends.main]
url = "sqlite://{db}"

[plugins.first]
path = "{chaos}"
config = {{ output = "middle" }}
publish_to = ["middle"]

[plugins.second]
path = "{chaos}"
config = {{ output = "out" }}
publish_to = ["out"]

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "first"
topics = ["in"]
plugin = "first"
retry = {{ max_attempts = 1 }}

[[routes]]
name = "second"
topics = ["middle"]
plugin = "second"
{extra}"#,
        db = dir.join("sluice.db").display(),
        chaos = chaos.display(),
        cache = dir.join("cache").display(),
    );
    let path = dir.join("sluice.toml");
    std::fs::write(&path, config).unwrap();
    path.display().to_string()
}

fn publish(dir: &Path, payload: &str, headers: &[&str]) {
    let url = format!("sqlite://{}", dir.join("sluice.db").display());
    let mut args = vec!["publish", "--url", &url, "in", payload];
    for header in headers {
        args.extend(["--header", header]);
    }
    let out = sluice(&args, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn json_log_lines_each_parse_and_carry_the_plugins_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = chain_config(dir.path(), "");
    publish(dir.path(), "log", &[]);
    publish(dir.path(), "reject", &[]);
    let out = sluice(
        &["run", &config, "--exit-when-idle", "1"],
        &[("SLUICE_LOG_FORMAT", "json"), ("SLUICE_LOG", "info")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(lines.len() >= 4, "{lines:?}");
    for line in &lines {
        assert!(line["timestamp"].is_string(), "{line}");
        assert!(line["level"].is_string(), "{line}");
        assert!(line["fields"].is_object(), "{line}");
    }
    let plugin_line = lines
        .iter()
        .find(|l| l["fields"]["message"] == "chaos: asked to log")
        .unwrap_or_else(|| panic!("no plugin log line in {lines:?}"));
    assert_eq!(plugin_line["fields"]["plugin"], "first", "{plugin_line}");
    assert_eq!(plugin_line["span"]["name"], "route", "{plugin_line}");
    assert_eq!(plugin_line["span"]["route"], "first", "{plugin_line}");
    let dead_letter = lines
        .iter()
        .find(|l| l["level"] == "WARN" && l["fields"]["cause"] == "rejected")
        .unwrap_or_else(|| panic!("no dead-letter warning in {lines:?}"));
    assert_eq!(dead_letter["span"]["route"], "first", "{dead_letter}");
}

#[test]
fn an_unknown_log_format_is_refused_by_name() {
    let out = sluice(&["--help"], &[("SLUICE_LOG_FORMAT", "xml")]);
    // `--help` is answered before the log starts; a command is not.
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let config = chain_config(dir.path(), "");
    let out = sluice(&["check", &config], &[("SLUICE_LOG_FORMAT", "xml")]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("SLUICE_LOG_FORMAT is `xml`; it must be `text` or `json`"),
        "{err}"
    );
}

/// The spans a collector received, by id.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
}

/// Listens for OTLP/HTTP exports on a free port; returns its base URL.
fn start_collector(received: Arc<Mutex<Received>>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
                    let received = received.clone();
                    async move {
                        assert_eq!(
                            headers["content-type"], "application/x-protobuf",
                            "OTLP/HTTP with protobuf bodies"
                        );
                        assert_eq!(headers["x-collector-key"], "s3cret");
                        let request = ExportTraceServiceRequest::decode(body).unwrap();
                        let mut received = received.lock().unwrap();
                        for resource in request.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .and_then(|a| a.value.clone());
                            assert_eq!(
                                service.and_then(|v| v.value),
                                Some(Value::StringValue("orders-host".into()))
                            );
                            for scope in resource.scope_spans {
                                received.spans.extend(scope.spans);
                            }
                        }
                        // An empty ExportTraceServiceResponse.
                        (
                            [("content-type", "application/x-protobuf")],
                            Vec::<u8>::new(),
                        )
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    url
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .clone()?;
    Some(match value.value? {
        Value::StringValue(s) => s,
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

#[test]
fn delivery_spans_reach_the_collector_linked_across_two_routes_and_a_dead_letter() {
    let received = Arc::new(Mutex::new(Received::default()));
    let collector = start_collector(received.clone());
    let dir = tempfile::tempdir().unwrap();
    let config = chain_config(
        dir.path(),
        r#"
[telemetry]
otlp_endpoint = "${COLLECTOR}"
service_name = "orders-host"
headers = { x-collector-key = "${COLLECTOR_KEY}" }
"#,
    );
    let traceparent = format!("traceparent=00-{TRACE_ID}-{PARENT_ID}-01");
    publish(dir.path(), "log", &[&traceparent]);
    publish(dir.path(), "reject", &[]);
    let out = sluice(
        &["run", &config, "--exit-when-idle", "1"],
        &[("COLLECTOR", &collector), ("COLLECTOR_KEY", "s3cret")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let spans = std::mem::take(&mut received.lock().unwrap().spans);
    let by_id: HashMap<String, &Span> = spans.iter().map(|s| (hex(&s.span_id), s)).collect();
    let deliveries: Vec<&Span> = spans.iter().filter(|s| s.name == "delivery").collect();
    let delivery_of = |route: &str, outcome: &str| {
        *deliveries
            .iter()
            .find(|s| {
                attribute(s, "route").as_deref() == Some(route)
                    && attribute(s, "outcome").as_deref() == Some(outcome)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no `{outcome}` delivery span of route `{route}` in {:#?}",
                    spans
                        .iter()
                        .map(|s| (&s.name, &s.attributes))
                        .collect::<Vec<_>>()
                )
            })
    };

    // The first hop continues the trace the published message carried.
    let first = delivery_of("first", "published");
    assert_eq!(hex(&first.trace_id), TRACE_ID);
    assert_eq!(hex(&first.parent_span_id), PARENT_ID);
    assert_eq!(attribute(first, "attempt").as_deref(), Some("1"));
    assert_eq!(attribute(first, "plugin").as_deref(), Some("first"));
    assert_eq!(attribute(first, "version").map(|v| v.len()), Some(12));
    assert!(attribute(first, "message_id").is_some());

    // The second hop is the first's child, through the output's header.
    let second = delivery_of("second", "published");
    assert_eq!(hex(&second.trace_id), TRACE_ID);
    assert_eq!(hex(&second.parent_span_id), hex(&first.span_id));

    // Handling and settling are children of their delivery; the plugin's
    // log line is an event of its handling.
    for delivery in [first, second] {
        for name in ["handle", "settle"] {
            let child = spans
                .iter()
                .find(|s| s.name == name && s.parent_span_id == delivery.span_id)
                .unwrap_or_else(|| panic!("no `{name}` span under {}", hex(&delivery.span_id)));
            assert_eq!(child.trace_id, delivery.trace_id);
            assert!(child.start_time_unix_nano >= delivery.start_time_unix_nano);
            assert!(child.end_time_unix_nano <= delivery.end_time_unix_nano);
        }
    }
    let handled = spans
        .iter()
        .find(|s| s.name == "handle" && s.parent_span_id == first.span_id)
        .unwrap();
    assert!(
        handled
            .events
            .iter()
            .any(|e| e.attributes.iter().any(|a| a.key == "plugin")),
        "the plugin's log line is not in its handling span: {:?}",
        handled.events
    );

    // A message without trace context starts a trace; its dead letter
    // carries that trace, with the delivery as parent.
    let rejected = delivery_of("first", "dead-lettered");
    assert!(rejected.parent_span_id.is_empty(), "a root span");
    assert_ne!(hex(&rejected.trace_id), TRACE_ID);
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let tail = sluice(&["tail", "--url", &url, "first.dead-letter", "--json"], &[]);
    let letter: serde_json::Value = serde_json::from_str(text(&tail.stdout).trim()).unwrap();
    let header = letter["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "traceparent")
        .unwrap()[1]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        header,
        format!(
            "00-{}-{}-01",
            hex(&rejected.trace_id),
            hex(&rejected.span_id)
        )
    );
    assert!(by_id.contains_key(&hex(&rejected.span_id)));
}

/// A debug directive for one module keeps every info line of the others:
/// creating a Kafka client asks the `log` crate whether debug is on, which
/// made a log filtered per layer drop the next event (the host's "backend
/// connected" and "route subscribed").
#[cfg(feature = "kafka")]
#[test]
fn a_debug_directive_for_one_module_loses_no_info_line() {
    let tansu = common::servers::Server::tansu();
    let dir = tempfile::tempdir().unwrap();
    let body = common::upper_config(dir.path(), &plugin_path("uppercase"), "").replace(
        &format!("sqlite://{}", dir.path().join("sluice.db").display()),
        &tansu.kafka_url(""),
    );
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, body).unwrap();
    let out = sluice(
        &["run", config.to_str().unwrap(), "--exit-when-idle", "1"],
        &[("SLUICE_LOG", "info,sluice::nothing_here=debug")],
    );
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    for line in ["backend connected", "route subscribed", "route stopped"] {
        assert!(log.contains(line), "no `{line}` in:\n{log}");
    }
}
