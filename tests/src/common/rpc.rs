//! Routes running an `rpc` example plugin, in any language, in either of
//! its roles: shared by the request-reply tests of every backend and of
//! every language.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice::backend::{Backend, SubscribeOptions};
use sluice::request::Requester;
use sluice::router::{Route, RouteSpec, RouteStats, WasmHandler};
use sluice::runtime::Runtime;

use super::{quick_retry, settings};

/// A route over `<ns>.<input>` running the `rpc` plugin at `plugin` with
/// `config`; an asking one sends its requests on `backend` and may ask
/// `<ns>.questions`, `<ns>.nobody` and `<ns>.late`, nothing else.
pub fn route(
    runtime: &Runtime,
    backend: &Arc<dyn Backend>,
    plugin: &Path,
    ns: &str,
    input: &str,
    config: &[(&str, &str)],
) -> Route {
    let mut plugin_settings = settings("rpc", config);
    // The call's deadline must outlast the longest request it waits for,
    // and a Kafka group's settling in before the first reply.
    plugin_settings.timeout = Duration::from_secs(20);
    plugin_settings.request_to = ["questions", "nobody", "late"]
        .map(|topic| format!("{ns}.{topic}"))
        .into();
    let plugin = runtime
        .load_file(plugin, plugin_settings)
        .unwrap_or_else(|e| panic!("{} does not load: {e:#}", plugin.display()));
    let name = format!("{ns}-{input}");
    let mut subscribe = SubscribeOptions::new(vec![format!("{ns}.{input}")], name.clone());
    subscribe.lease = Duration::from_secs(60);
    let mut handler = WasmHandler::new(Arc::new(plugin));
    if config.contains(&("role", "ask")) {
        handler = handler.requesting(Arc::new(Requester::new(backend.clone())));
    }
    Route {
        spec: RouteSpec {
            retry: quick_retry(3),
            concurrency: 2,
            ..RouteSpec::new(name, subscribe)
        },
        source: backend.clone(),
        outputs: vec![backend.clone()],
        dead_letters: None,
        handler: Arc::new(handler),
        stats: Arc::new(RouteStats::default()),
    }
}

/// An asking route: each message of `<ns>.<input>` becomes a request to
/// `<ns>.<ask>`, and its answer (or why there is none) an output on
/// `<ns>.answers`.
pub fn asker(
    runtime: &Runtime,
    backend: &Arc<dyn Backend>,
    plugin: &Path,
    ns: &str,
    input: &str,
    ask: &str,
    timeout_ms: &str,
) -> Route {
    let (ask, output) = (format!("{ns}.{ask}"), format!("{ns}.answers"));
    route(
        runtime,
        backend,
        plugin,
        ns,
        input,
        &[
            ("role", "ask"),
            ("ask", &ask),
            ("timeout_ms", timeout_ms),
            ("output", &output),
        ],
    )
}

/// A responding route on `<ns>.<input>`: replies with the payload
/// uppercased.
pub fn answerer(
    runtime: &Runtime,
    backend: &Arc<dyn Backend>,
    plugin: &Path,
    ns: &str,
    input: &str,
) -> Route {
    route(runtime, backend, plugin, ns, input, &[("role", "answer")])
}
