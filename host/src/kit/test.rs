//! `sluice test`: runs a component locally on recorded messages, with no
//! backend, and prints one line per message with its outcome.
//!
//! Input is JSON lines, one message each, in the shape `sluice tail --json`
//! prints, so a topic's traffic can be recorded and replayed:
//! `{"topic": "orders", "key": "a1", "headers": [["h", "v"]], "payload": "…", "attempt": 1}`.
//! Only `payload` is required; a payload that is not a string is sent as
//! compact JSON; headers may also be an object. Blank lines and lines
//! starting with `#` are skipped.
//!
//! The messages go through a route's worker: one warm instance handles them
//! in order, and after a trap the next message gets a fresh one. With
//! `--batch N` they go N at a time to `handle-batch` (for a plugin that
//! exports it), as on a route with that `batch_size`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Message;
use crate::message::headers;
use crate::router::{MessageHandler, WasmHandler};
use crate::runtime::{CallError, Outcome, Plugin, PluginSettings, Runtime};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every message was handled (outputs, retry or reject) and, with
    /// `--expect`, the lines matched.
    Passed,
    /// Some message trapped, timed out or hit the memory cap.
    Trapped,
    /// The printed lines differ from the expected file.
    Mismatch,
}

/// What `sluice test` runs.
pub struct TestOptions {
    pub wasm: PathBuf,
    pub input: PathBuf,
    /// The plugin's `config` table.
    pub config: Vec<(String, String)>,
    /// Compare the outcome lines with this file.
    pub expect: Option<PathBuf>,
    pub timeout: Duration,
    pub memory_limit: usize,
    /// Messages per call; more than one calls `handle-batch`.
    pub batch: usize,
    /// Where compiled components are cached (none: not cached).
    pub cache_dir: Option<PathBuf>,
}

/// Runs every message of the input; prints and returns the outcome lines.
pub async fn run(options: &TestOptions) -> Result<(Verdict, Vec<String>)> {
    let text = std::fs::read_to_string(&options.input)
        .with_context(|| format!("cannot read {}", options.input.display()))?;
    let messages = parse_input(&text)
        .with_context(|| format!("{} is not JSON lines of messages", options.input.display()))?;
    let name = options
        .wasm
        .file_stem()
        .map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
    let mut settings = PluginSettings::new(name);
    settings.config = options.config.iter().cloned().collect();
    settings.timeout = options.timeout;
    settings.memory_limit = options.memory_limit;
    // The grant is the deployment's business; here every output is shown.
    settings.publish_to = vec![">".into()];
    let runtime = Runtime::new(options.cache_dir.clone())?;
    let plugin = Arc::new(runtime.load_file(&options.wasm, settings)?);

    // A plugin that cannot even start is a failed run, not a failed message.
    fresh(&plugin).await?;
    let mut worker = WasmHandler::new(plugin).worker();
    let mut lines = Vec::new();
    let mut trapped = false;
    for chunk in messages.chunks(options.batch.max(1)) {
        let batch: Vec<(&Message, u32)> = chunk.iter().map(|(m, a)| (m, *a)).collect();
        let results = match batch.as_slice() {
            [(message, attempt)] => vec![worker.handle(message, *attempt).await],
            _ => worker.handle_batch(&batch).await,
        };
        for result in results {
            let number = lines.len() + 1;
            let line = match result {
                Ok(mut outcome) => {
                    // The version is the file's hash: noise in a test line.
                    if let Outcome::Outputs(outputs) = &mut outcome {
                        for output in outputs {
                            output.headers.retain(|(n, _)| n != headers::PLUGIN_VERSION);
                        }
                    }
                    describe(number, &outcome)
                }
                Err(error) => {
                    trapped = true;
                    describe_error(number, &error)
                }
            };
            println!("{line}");
            lines.push(line);
        }
    }

    let verdict = match &options.expect {
        Some(path) => {
            let expected = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if compare(&expected, &lines) {
                if trapped {
                    Verdict::Trapped
                } else {
                    Verdict::Passed
                }
            } else {
                Verdict::Mismatch
            }
        }
        None if trapped => Verdict::Trapped,
        None => Verdict::Passed,
    };
    Ok((verdict, lines))
}

async fn fresh(plugin: &Arc<Plugin>) -> Result<()> {
    plugin
        .instantiate()
        .await
        .context("cannot instantiate the plugin")?;
    Ok(())
}

/// Whether the printed lines are the expected ones; prints the first
/// difference if not.
fn compare(expected: &str, got: &[String]) -> bool {
    let expected: Vec<&str> = expected.lines().filter(|l| !l.trim().is_empty()).collect();
    for (i, want) in expected.iter().enumerate() {
        match got.get(i) {
            Some(line) if line == want => {}
            Some(line) => {
                eprintln!("line {}: expected\n  {want}\nbut got\n  {line}", i + 1);
                return false;
            }
            None => {
                eprintln!("expected {} lines, got {}", expected.len(), got.len());
                return false;
            }
        }
    }
    if got.len() > expected.len() {
        eprintln!("expected {} lines, got {}", expected.len(), got.len());
        return false;
    }
    true
}

/// The messages of a JSON-lines file, each with its attempt number.
pub fn parse_input(text: &str) -> Result<Vec<(Message, u32)>> {
    let mut messages = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let record: Value =
            serde_json::from_str(line).with_context(|| format!("line {}", index + 1))?;
        messages.push(
            parse_record(&record, messages.len() + 1)
                .with_context(|| format!("line {}", index + 1))?,
        );
    }
    Ok(messages)
}

fn parse_record(record: &Value, number: usize) -> Result<(Message, u32)> {
    let Value::Object(fields) = record else {
        bail!("a message must be a JSON object");
    };
    let payload = match (fields.get("payload"), fields.get("payload_base64")) {
        (Some(Value::String(text)), None) => text.clone().into_bytes(),
        (Some(other), None) => other.to_string().into_bytes(),
        (None, Some(Value::String(encoded))) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .context("`payload_base64` is not base64")?
        }
        (None, Some(_)) => bail!("`payload_base64` must be a string"),
        (Some(_), Some(_)) => bail!("both `payload` and `payload_base64`"),
        (None, None) => bail!("no `payload` or `payload_base64`"),
    };
    let topic = match fields.get("topic") {
        Some(Value::String(topic)) => topic.clone(),
        None => "test".to_string(),
        Some(_) => bail!("`topic` must be a string"),
    };
    let mut message = Message::new(topic, payload);
    message.id = match fields.get("id") {
        Some(Value::String(id)) => id.clone(),
        _ => format!("test-{number}"),
    };
    message.key = match fields.get("key") {
        Some(Value::String(key)) => Some(key.clone()),
        None | Some(Value::Null) => None,
        Some(_) => bail!("`key` must be a string or null"),
    };
    message.timestamp_ms = fields
        .get("timestamp_ms")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    message.headers = match fields.get("headers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(name, value)| Ok((name.clone(), text_of(value)?)))
            .collect::<Result<_>>()?,
        Some(Value::Array(pairs)) => pairs
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([Value::String(name), value]) => Ok((name.clone(), text_of(value)?)),
                _ => bail!("each header must be [name, value]"),
            })
            .collect::<Result<_>>()?,
        Some(_) => bail!("`headers` must be an object or a list of [name, value]"),
    };
    let attempt = match fields.get("attempt") {
        None => 1,
        Some(value) => value
            .as_u64()
            .and_then(|a| u32::try_from(a).ok())
            .filter(|a| *a >= 1)
            .context("`attempt` must be a whole number from 1")?,
    };
    Ok((message, attempt))
}

fn text_of(value: &Value) -> Result<String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Number(_) | Value::Bool(_) => Ok(value.to_string()),
        _ => bail!("a header value must be a string"),
    }
}

/// `N ok -> TOPIC [key=K] [NAME=VALUE…] PAYLOAD | …`, `N retry: …`, `N reject: …`.
pub fn describe(number: usize, outcome: &Outcome) -> String {
    format!("{number} {}", describe_outcome(outcome))
}

/// What [`describe`] says after the message's number.
pub fn describe_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Outputs(outputs) if outputs.is_empty() => "ok (no outputs)".to_string(),
        Outcome::Outputs(outputs) => {
            let mut line = "ok".to_string();
            for (i, output) in outputs.iter().enumerate() {
                line.push_str(if i == 0 { " -> " } else { " | " });
                line.push_str(&output.topic);
                if let Some(key) = &output.key {
                    let _ = write!(line, " key={key}");
                }
                for (name, value) in &output.headers {
                    let _ = write!(line, " {name}={value}");
                }
                let _ = write!(line, " {}", printable(&output.payload));
            }
            line
        }
        Outcome::Retry(reason) => format!("retry: {reason}"),
        Outcome::Reject(reason) => format!("reject: {reason}"),
    }
}

/// `N trap: …`, `N timeout: …` or `N memory-limit: …`.
pub fn describe_error(number: usize, error: &CallError) -> String {
    format!("{number} {}", describe_call_error(error))
}

/// What [`describe_error`] says after the message's number.
pub fn describe_call_error(error: &CallError) -> String {
    format!("{}: {error}", error.cause())
}

/// The payload as text on one line: control characters escaped.
pub fn printable(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload)
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_take_the_shape_tail_prints_and_a_looser_one() {
        let input = r#"
# recorded
{"id": "m1", "topic": "orders", "key": "k", "headers": [["a", "1"]], "payload": "hi", "timestamp_ms": 5, "attempt": 3}

{"payload": {"n": 1}, "headers": {"b": 2}}
{"payload_base64": "//4="}
"#;
        let messages = parse_input(input).unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(
            messages[2].0.payload,
            [0xff, 0xfe],
            "binary, as tail prints it"
        );
        let (first, attempt) = &messages[0];
        assert_eq!((first.id.as_str(), first.topic.as_str()), ("m1", "orders"));
        assert_eq!(first.key.as_deref(), Some("k"));
        assert_eq!(first.headers, vec![("a".to_string(), "1".to_string())]);
        assert_eq!(
            (first.payload.as_slice(), first.timestamp_ms, *attempt),
            (&b"hi"[..], 5, 3)
        );
        let (second, attempt) = &messages[1];
        assert_eq!(
            (second.id.as_str(), second.topic.as_str()),
            ("test-2", "test")
        );
        assert_eq!(second.payload, br#"{"n":1}"#);
        assert_eq!(second.headers, vec![("b".to_string(), "2".to_string())]);
        assert_eq!((second.key.clone(), *attempt), (None, 1));
    }

    #[test]
    fn bad_records_name_their_line() {
        for (input, expected) in [
            ("{\"topic\": \"t\"}", "no `payload`"),
            ("{\"payload\": \"x\", \"attempt\": 0}", "`attempt`"),
            ("\n[1]", "JSON object"),
            (
                "{\"payload\": \"x\", \"headers\": [[\"a\"]]}",
                "[name, value]",
            ),
        ] {
            let error = format!("{:#}", parse_input(input).unwrap_err());
            assert!(error.contains(expected), "{input}: {error}");
            assert!(error.starts_with("line "), "{input}: {error}");
        }
    }

    #[test]
    fn outcome_lines() {
        let mut out = Message::new("out", "A\nB");
        out.key = Some("k".into());
        out.headers = vec![("h".into(), "v".into())];
        let outputs = Outcome::Outputs(vec![out, Message::new("side", "x")]);
        assert_eq!(
            describe(1, &outputs),
            "1 ok -> out key=k h=v A\\nB | side x"
        );
        assert_eq!(describe(2, &Outcome::Outputs(vec![])), "2 ok (no outputs)");
        assert_eq!(
            describe(3, &Outcome::Retry("later".into())),
            "3 retry: later"
        );
        assert_eq!(describe(4, &Outcome::Reject("bad".into())), "4 reject: bad");
        assert_eq!(
            describe_error(5, &CallError::Trap("unreachable".into())),
            "5 trap: plugin trapped: unreachable"
        );
    }

    #[test]
    fn expected_lines_must_match_exactly_and_all() {
        let got = vec!["1 ok".to_string(), "2 retry: x".to_string()];
        assert!(compare("1 ok\n2 retry: x\n\n", &got));
        assert!(!compare("1 ok\n", &got));
        assert!(!compare("1 ok\n2 retry: y\n", &got));
        assert!(!compare("1 ok\n2 retry: x\n3 ok\n", &got));
    }
}
