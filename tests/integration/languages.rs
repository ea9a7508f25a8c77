//! The same plugin, JSON enrich, written in Rust, Python, JavaScript and C,
//! run through the same route: every language must publish the same
//! outputs and dead-letter the same messages, through a retry, a reject and
//! an exhausted retry, and answer a batch as it answers each message. The
//! batch example in every language answers a batch with mixed results, and
//! a trap in the middle of a batch fails only the message that traps. The
//! request-reply example in every language asks and answers as the Rust one
//! does, and across languages. Also:
//! what the host accepts from those toolchains (newer WASI 0.2 imports, an
//! extra `init` export, wasi:http imports). JavaScript's `fetch` under the
//! outbound grant is tested in `outbound_http`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Collector, Running, quick_retry, route, rpc, runtime, settings};
use sluice::Message;
use sluice::router::{MessageHandler, WasmHandler};
use sluice::runtime::{BATCH_WORLD, CallError, Outcome, Plugin, Runtime};
use sluice_tests::common;

const LANGS: [&str; 4] = ["rust", "python", "js", "c"];

fn enrich_path(lang: &str) -> std::path::PathBuf {
    match lang {
        "rust" => common::plugin_path("enrich"),
        other => common::example_path(other, "enrich"),
    }
}

/// What one language's plugin did with the inputs, in a comparable form.
#[derive(Debug, PartialEq)]
struct Results {
    /// (topic, key, `enriched-by` header, payload), by key.
    outputs: Vec<(String, Option<String>, Option<String>, String)>,
    /// (payload, cause, reason, attempts), by payload.
    dead: Vec<(String, String, String, String)>,
}

async fn run_enrich(plugin: Arc<Plugin>) -> Results {
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let outputs = Collector::start(&backend, &["enriched"]).await;
    let dead = Collector::start(&backend, &["enrich.dead-letter"]).await;
    let running = Running::start(route("enrich", &backend, "orders", plugin, quick_retry(3))).await;
    let inputs = [
        ("o-1", r#"{"order":1,"item":"tea"}"#),
        ("o-2", r#"{"order":2,"item":"cake","retry_until":2}"#),
        ("o-3", "not json"),
        ("o-4", "[1,2]"),
        ("o-5", r#"{"order":5,"retry_until":9}"#),
    ];
    backend
        .publish(
            inputs
                .iter()
                .map(|(key, payload)| {
                    let mut message = Message::new("orders", *payload);
                    message.key = Some(key.to_string());
                    message
                })
                .collect(),
        )
        .await
        .unwrap();
    let got = outputs.wait_for(2, Duration::from_secs(30)).await.unwrap();
    let dead_got = dead.wait_for(3, Duration::from_secs(30)).await.unwrap();
    running.stop().await;

    let mut outputs: Vec<_> = got
        .iter()
        .map(|m| {
            (
                m.topic.clone(),
                m.key.clone(),
                m.header("enriched-by").map(str::to_string),
                common::text(m),
            )
        })
        .collect();
    outputs.sort_by(|a, b| a.1.cmp(&b.1));
    let mut dead: Vec<_> = dead_got
        .iter()
        .map(|m| {
            let header = |name: &str| m.header(name).unwrap_or_default().to_string();
            (
                common::text(m),
                header("sluice-dead-letter-cause"),
                header("sluice-dead-letter-reason"),
                header("sluice-attempts"),
            )
        })
        .collect();
    dead.sort();
    Results { outputs, dead }
}

#[tokio::test]
async fn every_language_enriches_the_same_way() {
    let runtime = runtime();
    let mut results = Vec::new();
    for lang in LANGS {
        let plugin = Arc::new(
            runtime
                .load_file(
                    &enrich_path(lang),
                    settings("enrich", &[("region", "eu-west")]),
                )
                .unwrap_or_else(|e| panic!("the {lang} plugin does not load: {e:#}")),
        );
        results.push((lang, run_enrich(plugin).await));
    }

    let (_, rust) = &results[0];
    let enriched = |key: &str, payload: &str| {
        (
            "enriched".to_string(),
            Some(key.to_string()),
            Some("enrich".to_string()),
            payload.to_string(),
        )
    };
    assert_eq!(
        rust.outputs,
        vec![
            enriched(
                "o-1",
                r#"{"order":1,"item":"tea","enriched":{"topic":"orders","attempt":1,"region":"eu-west"}}"#
            ),
            enriched(
                "o-2",
                r#"{"order":2,"item":"cake","retry_until":2,"enriched":{"topic":"orders","attempt":2,"region":"eu-west"}}"#
            ),
        ]
    );
    let dead = |payload: &str, cause: &str, reason: &str, attempts: &str| {
        (
            payload.to_string(),
            cause.to_string(),
            reason.to_string(),
            attempts.to_string(),
        )
    };
    assert_eq!(
        rust.dead,
        vec![
            dead("[1,2]", "rejected", "payload is not a JSON object", "1"),
            dead("not json", "rejected", "payload is not a JSON object", "1"),
            dead(
                r#"{"order":5,"retry_until":9}"#,
                "attempts-exhausted",
                "not ready before attempt 9 (after 3 attempts)",
                "3"
            ),
        ]
    );
    for (lang, got) in &results[1..] {
        assert_eq!(got, rust, "the {lang} plugin differs from the Rust one");
    }
}

fn batch_path(lang: &str) -> std::path::PathBuf {
    match lang {
        "rust" => common::plugin_path("batch"),
        other => common::example_path(other, "batch"),
    }
}

/// One message's answer in a comparable form: outputs as (topic, key,
/// `batch` header, payload); a call that did not return by its cause.
#[derive(Debug, PartialEq)]
enum Answer {
    Out(Vec<(String, Option<String>, Option<String>, String)>),
    Retry(String),
    Reject(String),
    Failed(&'static str),
}

fn answers(results: Vec<Result<Outcome, CallError>>) -> Vec<Answer> {
    results
        .into_iter()
        .map(|result| match result {
            Ok(Outcome::Outputs(outputs)) => Answer::Out(
                outputs
                    .iter()
                    .map(|m| {
                        (
                            m.topic.clone(),
                            m.key.clone(),
                            m.header("batch").map(str::to_string),
                            common::text(m),
                        )
                    })
                    .collect(),
            ),
            Ok(Outcome::Retry(reason)) => Answer::Retry(reason),
            Ok(Outcome::Reject(reason)) => Answer::Reject(reason),
            Err(error) => Answer::Failed(error.cause()),
        })
        .collect()
}

fn load(runtime: &sluice::runtime::Runtime, path: &std::path::Path, lang: &str) -> Arc<Plugin> {
    let plugin = runtime
        .load_file(path, settings("batch", &[("region", "eu-west")]))
        .unwrap_or_else(|e| panic!("the {lang} plugin does not load: {e:#}"));
    assert_eq!(plugin.world(), BATCH_WORLD, "{lang}");
    Arc::new(plugin)
}

#[tokio::test]
async fn every_language_answers_a_batch_with_mixed_results() {
    let runtime = runtime();
    let out = |key: Option<&str>, place: &str, payload: &str| {
        Answer::Out(vec![(
            "out".to_string(),
            key.map(str::to_string),
            Some(place.to_string()),
            payload.to_string(),
        )])
    };
    for lang in LANGS {
        let handler = WasmHandler::new(load(&runtime, &batch_path(lang), lang));
        let mut worker = handler.worker();
        let keyed = Message::new("in", "a").with_key("k-1");
        let inputs = [
            keyed,
            Message::new("in", "retry"),
            Message::new("in", "reject"),
            Message::new("in", "b"),
            Message::new("in", "retry"),
        ];
        let mut batch: Vec<(&Message, u32)> = inputs.iter().map(|m| (m, 1)).collect();
        batch[4].1 = 2;
        assert_eq!(
            answers(worker.handle_batch(&batch).await),
            vec![
                out(Some("k-1"), "1/5", "a"),
                Answer::Retry("asked to retry".into()),
                Answer::Reject("asked to reject".into()),
                out(None, "4/5", "b"),
                out(None, "5/5", "retry"),
            ],
            "{lang}: one call answers each message"
        );

        // The trap fails the call; handled again one by one, only the
        // message that traps on its own fails.
        let inputs = [
            Message::new("in", "c"),
            Message::new("in", "reject"),
            Message::new("in", "trap"),
            Message::new("in", "d"),
        ];
        let batch: Vec<(&Message, u32)> = inputs.iter().map(|m| (m, 1)).collect();
        assert_eq!(
            answers(worker.handle_batch(&batch).await),
            vec![
                out(None, "1/1", "c"),
                Answer::Reject("asked to reject".into()),
                Answer::Failed("trap"),
                out(None, "1/1", "d"),
            ],
            "{lang}: a trap in the middle of a batch"
        );

        // The worker's instance after the trap is a fresh one that batches.
        let inputs = [Message::new("in", "e"), Message::new("in", "f")];
        let batch: Vec<(&Message, u32)> = inputs.iter().map(|m| (m, 1)).collect();
        assert_eq!(
            answers(worker.handle_batch(&batch).await),
            vec![out(None, "1/2", "e"), out(None, "2/2", "f")],
            "{lang}: batching again after a trap"
        );
        assert_eq!(
            answers(vec![worker.handle(&Message::new("in", "g"), 1).await]),
            vec![out(None, "1/1", "g")],
            "{lang}: one message through `handle`"
        );
    }
}

/// The helpers export `handle-batch` for a plugin written one message at a
/// time: a batch gets the answers the messages get one by one.
#[tokio::test]
async fn every_language_batches_a_per_message_handler() {
    let runtime = runtime();
    let inputs: Vec<Message> = [
        r#"{"order":1,"item":"tea"}"#,
        r#"{"order":2,"retry_until":2}"#,
        "not json",
        r#"{"order":3}"#,
    ]
    .iter()
    .map(|payload| Message::new("orders", *payload).with_key("k"))
    .collect();
    let batch: Vec<(&Message, u32)> = inputs.iter().map(|m| (m, 1)).collect();
    for lang in LANGS {
        let handler = WasmHandler::new(load(&runtime, &enrich_path(lang), lang));
        let mut worker = handler.worker();
        let together = answers(worker.handle_batch(&batch).await);
        let mut alone = Vec::new();
        for (message, attempt) in &batch {
            alone.push(worker.handle(message, *attempt).await);
        }
        let alone = answers(alone);
        assert_eq!(together, alone, "{lang}");
        assert!(
            matches!(&together[1], Answer::Retry(_)),
            "{lang}: {together:?}"
        );
        assert!(
            matches!(&together[2], Answer::Reject(_)),
            "{lang}: {together:?}"
        );
        assert!(
            matches!(&together[3], Answer::Out(o) if o.len() == 1),
            "{lang}: {together:?}"
        );
    }
}

fn rpc_path(lang: &str) -> std::path::PathBuf {
    match lang {
        "rust" => common::plugin_path("rpc"),
        other => common::example_path(other, "rpc"),
    }
}

/// An asker's output in a comparable form: (`question` header, `failed`
/// header, payload).
type Answered = (Option<String>, Option<String>, String);

/// What the asking plugin published when the answering plugin answered three
/// requests and nobody answered a fourth.
async fn ask_and_answer(runtime: &Runtime, asking: &Path, answering: &Path) -> Vec<Answered> {
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let answers = Collector::start(&backend, &["rpc.answers"]).await;
    let routes = [
        rpc::answerer(runtime, &backend, answering, "rpc", "questions"),
        rpc::asker(
            runtime,
            &backend,
            asking,
            "rpc",
            "asks",
            "questions",
            "15000",
        ),
        rpc::asker(runtime, &backend, asking, "rpc", "lonely", "nobody", "500"),
    ];
    let mut running = Vec::new();
    for route in routes {
        running.push(Running::start(route).await);
    }
    let publish = |topic: &str, payloads: &[&str]| {
        let messages = payloads.iter().map(|p| Message::new(topic, *p)).collect();
        backend.publish(messages)
    };
    publish("rpc.asks", &["one", "two", "three"]).await.unwrap();
    publish("rpc.lonely", &["anyone?"]).await.unwrap();
    let got = answers.wait_for(4, Duration::from_secs(60)).await.unwrap();
    for route in running {
        route.stop().await;
    }
    let header = |m: &Message, name: &str| m.header(name).map(str::to_string);
    let mut answered: Vec<Answered> = got
        .iter()
        .map(|m| (header(m, "question"), header(m, "failed"), common::text(m)))
        .collect();
    // The answered ones first (no `failed` header), then by question.
    answered.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_language_asks_and_answers() {
    let runtime = runtime();
    let rust = rpc_path("rust");
    let expected = ask_and_answer(&runtime, &rust, &rust).await;
    let answer =
        |question: &str, payload: &str| (Some(question.to_string()), None, payload.to_string());
    assert_eq!(
        expected[..3],
        [
            answer("one", "ONE"),
            answer("three", "THREE"),
            answer("two", "TWO")
        ],
        "{expected:?}"
    );
    let (question, failed, reason) = &expected[3];
    assert_eq!(
        (question.as_deref(), failed.as_deref()),
        (Some("anyone?"), Some("true")),
        "{expected:?}"
    );
    assert!(
        reason.starts_with("timeout: no reply to `rpc.nobody`"),
        "{reason}"
    );

    for lang in &LANGS[1..] {
        let theirs = rpc_path(lang);
        for (asking, answering, pair) in [
            (&theirs, &theirs, format!("{lang} asking {lang}")),
            (&rust, &theirs, format!("rust asking {lang}")),
            (&theirs, &rust, format!("{lang} asking rust")),
        ] {
            assert_eq!(
                ask_and_answer(&runtime, asking, answering).await,
                expected,
                "{pair}: not what the Rust plugins do"
            );
        }
    }
}

/// The Python and JavaScript `rpc` examples' unit tests, which call
/// `request` and `reply` against the helpers' stand-in host, pass natively
/// with the repository's helpers.
#[test]
fn the_rpc_examples_pass_their_unit_tests() {
    let root = common::repo_root();
    let project = |lang: &str, files: &[&str], helper: &str| {
        let dir = tempfile::tempdir().unwrap();
        for file in files {
            std::fs::copy(
                root.join("plugins").join(lang).join("rpc").join(file),
                dir.path().join(file),
            )
            .unwrap();
        }
        std::fs::copy(
            root.join("sdk").join(lang).join(helper),
            dir.path().join(helper),
        )
        .unwrap();
        dir
    };
    let python = project("python", &["plugin.py", "test_plugin.py"], "sluice.py");
    let js = project("js", &["plugin.js", "plugin.test.js"], "sluice.js");
    std::fs::write(js.path().join("package.json"), r#"{"type": "module"}"#).unwrap();
    for (dir, command, a_test) in [
        (
            &python,
            &["python3", "-m", "unittest", "-v"][..],
            "test_publishes_why_a_request_failed",
        ),
        (
            &js,
            &["node", "--test"][..],
            "an asker publishes why a request failed",
        ),
    ] {
        let output = Command::new(command[0])
            .args(&command[1..])
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", command[0]));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{command:?} failed:\n{said}");
        assert!(
            said.contains(a_test),
            "{command:?} did not run `{a_test}`:\n{said}"
        );
    }
}

/// The import and export names of a component, read from its type
/// without compiling it.
fn interface(path: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let wit_component::DecodedWasm::Component(resolve, world) =
        wit_component::decode(&std::fs::read(path).unwrap()).unwrap()
    else {
        panic!("{} is not a component", path.display());
    };
    let world = &resolve.worlds[world];
    // An exported interface shows as `NAME#FUNCTION` for each function.
    let names = |items: &wit_parser::IndexMap<wit_parser::WorldKey, wit_parser::WorldItem>| {
        let mut names = Vec::new();
        for (key, item) in items {
            let name = resolve.name_world_key(key);
            if let wit_parser::WorldItem::Interface { id, .. } = item {
                for function in resolve.interfaces[*id].functions.keys() {
                    names.push(format!("{name}#{function}"));
                }
            }
            names.push(name);
        }
        names
    };
    (names(&world.imports), names(&world.exports))
}

/// Guards the reasons the host must be lenient: if a toolchain stops doing
/// these, the leniency (and this test) can go.
#[test]
fn the_toolchains_components_need_what_the_host_accepts() {
    let (imports, exports) = interface(&common::example_path("python", "enrich"));
    assert!(exports.contains(&"exports#init".to_string()), "{exports:?}");
    assert!(
        imports
            .iter()
            .any(|i| i.starts_with("wasi:") && i.ends_with("@0.2.9")),
        "{imports:?}"
    );
    // Built against `wasi:http` too (`sluice.http_get`), whether or not it
    // makes requests.
    assert!(
        imports
            .iter()
            .any(|i| i.starts_with("wasi:http/outgoing-handler@")),
        "{imports:?}"
    );
    let (imports, _) = interface(&common::example_path("js", "enrich"));
    assert!(
        imports.iter().any(|i| i.starts_with("wasi:http/")),
        "{imports:?}"
    );
    assert!(
        imports
            .iter()
            .any(|i| i.starts_with("wasi:") && i.ends_with("@0.2.12")),
        "{imports:?}"
    );
}

/// A component that imports, under each name, an instance with one
/// function `f: func()`, and exports nothing.
fn component_importing(names: &[&str]) -> Vec<u8> {
    use wasm_encoder::{
        ComponentImportSection, ComponentTypeRef, ComponentTypeSection, ComponentValType,
        InstanceType,
    };
    let mut instance = InstanceType::new();
    instance
        .ty()
        .function()
        .params(std::iter::empty::<(&str, ComponentValType)>())
        .result(None);
    instance.export("f", ComponentTypeRef::Func(0));
    let mut types = ComponentTypeSection::new();
    types.ty().instance(&instance);
    let mut imports = ComponentImportSection::new();
    for name in names {
        imports.import(*name, ComponentTypeRef::Instance(0));
    }
    let mut component = wasm_encoder::Component::new();
    component.section(&types);
    component.section(&imports);
    component.finish()
}

/// Every import must be linked for real: one the host lacks is refused,
/// named.
#[test]
fn an_import_the_host_lacks_is_refused_naming_it() {
    let runtime = runtime();
    let wasm = component_importing(&["acme:vault/secrets@1.0.0"]);
    let error = format!(
        "{:#}",
        runtime
            .load(&wasm, settings("odd", &[]))
            .err()
            .expect("refused")
    );
    assert!(
        error.contains("acme:vault/secrets@1.0.0")
            && error.contains("matching implementation was not found"),
        "{error}"
    );
}
