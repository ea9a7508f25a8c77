//! Components built for `wasi:messaging@0.2.0-draft` with the draft's WIT
//! alone, one in Rust (wit-bindgen, `messaging-request-reply`) and one in
//! Python (componentize-py, `messaging-core`), run as route plugins: their
//! sends are outputs under the `publish_to` grant and output limits, an
//! `error` is a retry (or a rejection where `reject_on` says so), metadata
//! and content type are headers, and the Rust one answers and asks through
//! the draft's request-reply. Routes run them on SQLite and Redis Streams.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice::Message;
use sluice::backend::{self, Backend};
use sluice::message::headers;
use sluice::request::Requester;
use sluice::router::{Route, WasmHandler};
use sluice::runtime::{CallError, Outcome, Plugin, PluginSettings};
use sluice_tests::common::{
    Collector, Running, plugin_path, quick_retry, repo_root, route, runtime, settings, text, unique,
};

const LIMIT: Duration = Duration::from_secs(60);

/// The components, by the language they are written in (Python's where
/// the language toolchains are part of the run).
fn components() -> Vec<(&'static str, PathBuf)> {
    let mut components = vec![("rust", plugin_path("wasi_messaging"))];
    if cfg!(feature = "languages") {
        components.push(("python", python_component()));
    }
    components
}

/// Built by `cargo xtask plugins` with componentize-py from the draft's WIT.
fn python_component() -> PathBuf {
    let path = repo_root().join("plugins/python/wasi_messaging/target/wasi_messaging.wasm");
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask plugins` builds it",
        path.display()
    );
    path
}

fn load(path: &Path, settings: PluginSettings) -> Arc<Plugin> {
    Arc::new(runtime().load_file(path, settings).expect("load plugin"))
}

fn draft_settings(lang: &str) -> PluginSettings {
    let mut settings = settings(&format!("draft-{lang}"), &[]);
    settings.timeout = Duration::from_secs(5);
    settings
}

async fn handle(plugin: &Arc<Plugin>, message: &Message) -> Result<Outcome, CallError> {
    plugin.instantiate().await.unwrap().handle(message, 1).await
}

fn retry_reason(outcome: Result<Outcome, CallError>) -> String {
    match outcome {
        Ok(Outcome::Retry(reason)) => reason,
        other => panic!("expected a retry, got {other:?}"),
    }
}

/// What each of the draft's results becomes, for both components.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drafts_results_become_outputs_retries_and_rejections() {
    for (lang, path) in components() {
        let plugin = load(&path, draft_settings(lang));
        let expected_world = if lang == "rust" {
            "wasi:messaging/messaging-request-reply@0.2.0-draft"
        } else {
            "wasi:messaging/messaging-core@0.2.0-draft"
        };
        assert_eq!(plugin.world(), expected_world, "{lang}");
        assert!(!plugin.batches(), "{lang}");

        // A send is an output, with metadata and content type as headers.
        let hello = Message::new("orders.in", "hello")
            .with_header("content-type", "text/x-greeting")
            .with_header("trace", "t-1");
        let Ok(Outcome::Outputs(outputs)) = handle(&plugin, &hello).await else {
            panic!("{lang}: hello was not handled");
        };
        assert_eq!(outputs.len(), 1, "{lang}");
        let out = &outputs[0];
        assert_eq!(out.topic, "orders.in.done", "{lang}");
        assert_eq!(out.payload, b"HELLO", "{lang}");
        assert_eq!(out.header("content-type"), Some("text/plain"), "{lang}");
        assert_eq!(out.header("trace"), Some("t-1"), "{lang}");
        assert_eq!(out.header("handled-by"), Some(lang), "{lang}");
        assert_eq!(
            out.header("input-content-type"),
            Some("text/x-greeting"),
            "{lang}"
        );

        let Ok(Outcome::Outputs(outputs)) =
            handle(&plugin, &Message::new("orders.in", "burst:3")).await
        else {
            panic!("{lang}: burst:3 was not handled");
        };
        let payloads: Vec<String> = outputs.iter().map(text).collect();
        assert_eq!(payloads, ["0", "1", "2"], "{lang}");

        // An error is a retry, with the handler's own words.
        let reason = retry_reason(handle(&plugin, &Message::new("orders.in", "fail")).await);
        assert!(reason.contains("asked to fail"), "{lang}: {reason}");

        // Sends are granted like any output: an ungranted topic is refused
        // with permission-denied, which the handler returns.
        let mut narrow = draft_settings(lang);
        narrow.publish_to = vec!["orders.>".into()];
        let narrow = load(&path, narrow);
        let reason = retry_reason(handle(&narrow, &Message::new("orders.in", "forbidden")).await);
        assert!(
            reason.contains("permission-denied") && reason.contains("forbidden.out"),
            "{lang}: {reason}"
        );

        // ...and `reject_on` makes that kind a rejection.
        let mut rejecting = draft_settings(lang);
        rejecting.publish_to = vec!["orders.>".into()];
        rejecting.reject_on = vec!["permission-denied".into()];
        let rejecting = load(&path, rejecting);
        match handle(&rejecting, &Message::new("orders.in", "forbidden")).await {
            Ok(Outcome::Reject(reason)) => assert!(reason.contains("forbidden.out"), "{reason}"),
            other => panic!("{lang}: expected a rejection, got {other:?}"),
        }

        // The output limits hold: the call fails as a whole.
        let mut capped = draft_settings(lang);
        capped.limits.max_outputs = 2;
        let capped = load(&path, capped);
        let outcome = handle(&capped, &Message::new("orders.in", "burst:5")).await;
        assert!(
            matches!(outcome, Err(CallError::OutputLimit(_))),
            "{lang}: {outcome:?}"
        );

        // A client connects to `default` or to a route's output backend.
        let mut elsewhere = draft_settings(lang);
        elsewhere.env = [("MESSAGING_CLIENT".into(), "billing".into())].into();
        let elsewhere = load(&path, elsewhere);
        let reason = retry_reason(handle(&elsewhere, &Message::new("orders.in", "hello")).await);
        assert!(
            reason.contains("may connect only to default"),
            "{lang}: {reason}"
        );
    }
}

/// Messages a component keeps live in the host, outside its memory cap, so
/// they count against its `max_output_mb`: a component that hoards them
/// fails the call (`output-limit`) once it holds more, wherever it spreads
/// them over calls, and a fresh instance starts from nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_component_hoards_are_bounded() {
    let mut capped = draft_settings("rust");
    capped.limits.max_bytes = 4 << 20;
    let plugin = load(&plugin_path("wasi_messaging"), capped);
    let mut instance = plugin.instantiate().await.unwrap();
    let hoard = |n: u32| Message::new("orders.in", format!("hoard:{n}"));
    assert!(matches!(
        instance.handle(&hoard(2), 1).await,
        Ok(Outcome::Outputs(_))
    ));
    let outcome = instance.handle(&hoard(3), 1).await;
    assert!(
        matches!(&outcome, Err(CallError::OutputLimit(reason)) if reason.contains("held at once")),
        "{outcome:?}"
    );
    let mut fresh = plugin.instantiate().await.unwrap();
    assert!(matches!(
        fresh.handle(&hoard(3), 1).await,
        Ok(Outcome::Outputs(_))
    ));
}

/// A route `<name>-route` of `plugin` over `input`, three attempts each.
fn draft_route(backend: &Arc<dyn Backend>, name: &str, input: &str, plugin: Arc<Plugin>) -> Route {
    let mut route = route(
        &format!("{name}-route"),
        backend,
        input,
        plugin,
        quick_retry(3),
    );
    route.spec.concurrency = 4;
    route
}

/// Every message handled once and its output published, through a client
/// connected to the route's output backend by its name; one that fails
/// every attempt is retried, then dead-lettered, and so is one whose sends
/// go over the output limit.
async fn draft_components_run_on(url: &str) {
    for (lang, path) in components() {
        let ns = unique(&format!("wm-{lang}"));
        let backend = backend::connect(url).await.unwrap();
        let dead_letter_topic = format!("{ns}-route.dead-letter");
        let done = Collector::start(&backend, &[&format!("{ns}.in.done")]).await;
        let dead = Collector::start(&backend, &[&dead_letter_topic]).await;
        let mut capped = draft_settings(lang);
        capped.limits.max_outputs = 10;
        // The client names the route's output backend, as a config would.
        capped.env = [("MESSAGING_CLIENT".into(), "main".into())].into();
        let plugin = load(&path, capped);
        let mut route = draft_route(&backend, &ns, &format!("{ns}.in"), plugin.clone());
        route.handler = Arc::new(WasmHandler::new(plugin).publishing_to(["main".to_owned()]));
        let running = Running::start(route).await;

        let mut messages: Vec<Message> = (0..40)
            .map(|i| Message::new(format!("{ns}.in"), format!("m{i}")))
            .collect();
        messages.push(Message::new(format!("{ns}.in"), "fail"));
        messages.push(Message::new(format!("{ns}.in"), "burst:11"));
        backend.publish(messages).await.unwrap();

        let outputs = done.wait_for(40, LIMIT).await.unwrap();
        let mut payloads: Vec<String> = outputs.iter().map(text).collect();
        payloads.sort();
        let mut expected: Vec<String> = (0..40).map(|i| format!("M{i}")).collect();
        expected.sort();
        assert_eq!(payloads, expected, "{url} {lang}");

        let letters = dead.wait_for(2, LIMIT).await.unwrap();
        for (payload, why) in [("fail", "asked to fail"), ("burst:11", "max_outputs")] {
            let letter = letters
                .iter()
                .find(|l| text(l) == payload)
                .unwrap_or_else(|| panic!("{url} {lang}: no dead letter for {payload}"));
            assert_eq!(
                letter.header(headers::DEAD_LETTER_CAUSE),
                Some("attempts-exhausted"),
                "{url} {lang}: {letter:?}"
            );
            assert!(
                letter
                    .header(headers::DEAD_LETTER_REASON)
                    .is_some_and(|r| r.contains(why)),
                "{url} {lang}: {letter:?}"
            );
        }
        // Nothing more: no output of the failed messages, nothing twice.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(done.now().len(), 40, "{url} {lang}");
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_components_run_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    draft_components_run_on(&format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("wm.db").display()
    ))
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_components_run_on_redis_streams() {
    let prefix = unique("wm");
    draft_components_run_on(&format!("redis://127.0.0.1:6379/0?prefix={prefix}:")).await;
}

/// The Rust component answers a request with the draft's `reply`, and
/// asks one with its `request` of a route of Sluice's own world (the `rpc`
/// plugin, which answers upper-cased), both through a backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draft_request_reply_goes_through_the_host() {
    let ns = unique("wm-rr");
    let backend = backend::connect("memory://").await.unwrap();
    let path = plugin_path("wasi_messaging");

    // Answering: `reply` goes to the request's reply topic, as an output.
    let mut answering = draft_settings("rust");
    answering.publish_to = vec!["sluice-reply.>".into()];
    let answer = draft_route(
        &backend,
        &format!("{ns}.pings"),
        &format!("{ns}.ping"),
        load(&path, answering),
    );
    let answer = Running::start(answer).await;
    let requester = Requester::new(backend.clone());
    let reply = requester
        .request(Message::new(format!("{ns}.ping"), "ping"), LIMIT)
        .await
        .unwrap();
    assert_eq!(text(&reply), "pong");

    // Asking: `request` is granted by `request_to` and waits for the reply.
    let rpc = draft_route(
        &backend,
        &format!("{ns}.questions"),
        &format!("{ns}.question"),
        Arc::new(
            runtime()
                .load_file(&plugin_path("rpc"), settings("rpc", &[("role", "answer")]))
                .unwrap(),
        ),
    );
    let rpc = Running::start(rpc).await;
    let mut asking = draft_settings("rust");
    asking.request_to = vec![format!("{ns}.question")];
    let asker = Route {
        handler: Arc::new(
            WasmHandler::new(load(&path, asking))
                .requesting(Arc::new(Requester::new(backend.clone()))),
        ),
        ..draft_route(
            &backend,
            &ns,
            &format!("{ns}.in"),
            load(&path, draft_settings("rust")),
        )
    };
    let answers = Collector::start(&backend, &[&format!("{ns}.in.done")]).await;
    let asker = Running::start(asker).await;
    backend
        .publish(vec![Message::new(
            format!("{ns}.in"),
            format!("ask:{ns}.question"),
        )])
        .await
        .unwrap();
    let got = answers.wait_for(1, LIMIT).await.unwrap();
    assert_eq!(text(&got[0]), "QUESTION", "{got:?}");

    // A message that was not a request names no reply topic.
    let plugin = load(&path, draft_settings("rust"));
    let reason = retry_reason(handle(&plugin, &Message::new("x", "ping")).await);
    assert!(reason.contains("not sent as a request"), "{reason}");

    asker.stop().await;
    rpc.stop().await;
    answer.stop().await;
}
