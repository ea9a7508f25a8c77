//! Hot reload under load: a steady stream of messages while the plugin file
//! is replaced ten times (once with a broken file). Every message is handled
//! exactly once, by the version current at its time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Collector, Running, plugin_path, quick_retry, route};
use sluice::Message;
use sluice::deploy::Deployer;
use sluice::message::headers;
use sluice::router::WasmHandler;
use sluice_tests::common;
use tokio_util::sync::CancellationToken;

/// The echo plugin with a custom section naming `version`: the same
/// behaviour, a distinct content hash per version.
fn echo_version(version: u32) -> Vec<u8> {
    let mut wasm = std::fs::read(plugin_path("echo")).unwrap();
    let name = b"sluice-test-version";
    let payload = version.to_le_bytes();
    let body_len = 1 + name.len() + payload.len();
    wasm.push(0); // custom section
    wasm.push(body_len as u8);
    wasm.push(name.len() as u8);
    wasm.extend_from_slice(name);
    wasm.extend_from_slice(&payload);
    wasm
}

/// Replaces the plugin file the way a deploy script should: write aside,
/// then rename over.
fn drop_in(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("wasm.partial");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn hash(bytes: &[u8]) -> String {
    sluice::runtime::hash(bytes)[..12].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_plugin_under_load_loses_and_repeats_nothing() {
    // A rate an unoptimised test build sustains on one worker, so latency
    // shows the swaps rather than a queue; SLUICE_RELOAD_RATE raises it.
    let rate_per_second: usize = std::env::var("SLUICE_RELOAD_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    const SWAPS: u32 = 10;
    let dir = tempfile::tempdir().unwrap();
    let plugin_file = dir.path().join("echo.wasm");
    std::fs::write(&plugin_file, echo_version(0)).unwrap();
    let config = format!(
        "[backends.main]\nurl = \"memory://\"\n\n[plugins.echo]\npath = \"{}\"\nconfig = {{ output = \"out\" }}\npublish_to = [\"out\"]\n\n[[routes]]\nname = \"echo\"\ntopics = [\"in\"]\nplugin = \"echo\"\n",
        plugin_file.display()
    );
    let loaded =
        sluice::config::parse(&config, "test.toml", dir.path().to_path_buf(), |_| None).unwrap();
    let runtime = Arc::new(common::runtime());
    let deployer = Arc::new(Deployer::load(runtime, &loaded).unwrap());
    let watching = CancellationToken::new();
    deployer.watch(watching.clone()).unwrap();
    let slot = deployer.slot("echo").unwrap().clone();

    let backend = sluice::backend::connect("memory://?capacity=200000")
        .await
        .unwrap();
    let outputs = Collector::start(&backend, &["out"]).await;
    let mut echo = route(
        "echo",
        &backend,
        "in",
        common::load(&common::runtime(), "echo", common::settings("echo", &[])),
        quick_retry(3),
    );
    echo.handler = Arc::new(WasmHandler::over(slot.clone()));
    let running = Running::start(echo).await;

    // A steady publisher.
    let stop_publishing = CancellationToken::new();
    let publisher = {
        let backend = backend.clone();
        let stop = stop_publishing.clone();
        tokio::spawn(async move {
            let mut published = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.is_cancelled() {
                tick.tick().await;
                let batch: Vec<Message> = (0..rate_per_second / 100)
                    .map(|i| Message::new("in", format!("m{}-{i}", published.len())))
                    .collect();
                published.extend(batch.iter().map(|m| m.id.clone()));
                backend.publish(batch).await.unwrap();
            }
            published
        })
    };

    // Ten new versions, the fifth one broken; each must be live before the next.
    let mut versions = vec![hash(&echo_version(0))];
    let mut swap_times = Vec::new();
    for version in 1..=SWAPS {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if version == 5 {
            let before = slot.current_info().hash;
            drop_in(&plugin_file, b"\0asm this is not a component");
            let refused = Instant::now() + Duration::from_secs(20);
            while slot.last_error().is_none() {
                assert!(
                    Instant::now() < refused,
                    "the broken file was never looked at"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                slot.current_info().hash,
                before,
                "a broken file replaced the running version"
            );
            assert!(
                slot.last_error()
                    .unwrap()
                    .contains("not a valid WebAssembly component")
            );
            continue;
        }
        let bytes = echo_version(version);
        drop_in(&plugin_file, &bytes);
        let expected = sluice::runtime::hash(&bytes);
        let live = Instant::now() + Duration::from_secs(20);
        while slot.current_info().hash != expected {
            assert!(Instant::now() < live, "version {version} never went live");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        swap_times.push(sluice::message::now_ms());
        versions.push(hash(&bytes));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop_publishing.cancel();
    let published = publisher.await.unwrap();
    let got = outputs
        .wait_for(published.len(), Duration::from_secs(120))
        .await
        .unwrap();
    running.stop().await;
    watching.cancel();

    // Exactly once.
    let mut per_input: HashMap<&str, usize> = HashMap::new();
    for output in &got {
        *per_input
            .entry(output.header(headers::CAUSATION_ID).unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_input.len(), published.len(), "every message handled");
    assert!(
        per_input.values().all(|n| *n == 1),
        "no message handled twice"
    );

    // In handling order (one worker), versions only move forward: nothing ran
    // on an old version after a newer one had taken over.
    let order: Vec<usize> = got
        .iter()
        .map(|m| {
            let version = m.header(headers::PLUGIN_VERSION).unwrap();
            versions
                .iter()
                .position(|v| v == version)
                .expect("a deployed version")
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "a message ran on an older version after a newer one"
    );
    assert_eq!(
        *order.last().unwrap(),
        versions.len() - 1,
        "the last version handled the last messages"
    );

    // The latency spike around a swap, for the record.
    let mut all: Vec<u64> = Vec::new();
    let mut near_swap: Vec<u64> = Vec::new();
    for output in &got {
        let delay = output.timestamp_ms.saturating_sub(input_time(output));
        all.push(delay);
        if swap_times
            .iter()
            .any(|t| output.timestamp_ms.abs_diff(*t) < 200)
        {
            near_swap.push(delay);
        }
    }
    all.sort_unstable();
    near_swap.sort_unstable();
    println!(
        "{} messages at ~{rate_per_second}/s, {} versions live, 1 refused; publish-to-output latency p50 {} ms, p99 {} ms, max {} ms; within 200 ms of a swap: p50 {} ms, max {} ms",
        published.len(),
        versions.len(),
        all[all.len() / 2],
        all[all.len() * 99 / 100],
        all.last().unwrap(),
        near_swap.get(near_swap.len() / 2).copied().unwrap_or(0),
        near_swap.last().copied().unwrap_or(0),
    );
}

/// The input's publish time, carried by the uuid v7 id in its causation
/// header (its first 48 bits are milliseconds since the epoch).
fn input_time(output: &Message) -> u64 {
    let id = output
        .header(headers::CAUSATION_ID)
        .unwrap()
        .replace('-', "");
    u64::from_str_radix(&id[..12], 16).unwrap()
}

/// A component of `plugin` with a custom section naming `version`: the same
/// behaviour, a distinct content hash per version.
fn plugin_version(plugin: &str, version: u32) -> Vec<u8> {
    let mut wasm = std::fs::read(plugin_path(plugin)).unwrap();
    let name = b"sluice-test-version";
    let payload = version.to_le_bytes();
    wasm.push(0); // custom section
    wasm.push((1 + name.len() + payload.len()) as u8);
    wasm.push(name.len() as u8);
    wasm.extend_from_slice(name);
    wasm.extend_from_slice(&payload);
    wasm
}

/// The config `reloading` tests run and reload: route `steady` (plugin
/// `upper`) never changes; route `shifting` (plugin `loud`) gets
/// `shifting_extra` lines in its route table and `loud` publishes to
/// `loud_output`.
fn reload_config(port: u16, db: &Path, shifting_extra: &str, loud_output: &str) -> String {
    format!(
        r#"[backends.main]
url = "sqlite://{db}?poll_ms=20"

[plugins.upper]
path = "upper.wasm"
config = {{ output = "steady.out" }}
publish_to = [">"]

[plugins.loud]
path = "loud.wasm"
config = {{ output = "{loud_output}" }}
publish_to = [">"]

[admin]
listen = "127.0.0.1:{port}"

[[routes]]
name = "steady"
topics = ["steady.in"]
plugin = "upper"

[[routes]]
name = "shifting"
topics = ["shifting.in"]
plugin = "loud"
{shifting_extra}
"#,
        db = db.display()
    )
}

/// A `sluice run` of a test's own over [`reload_config`], its JSON log
/// collected; killed when dropped.
struct Served {
    child: std::process::Child,
    dir: tempfile::TempDir,
    port: u16,
    admin: sluice::admin::client::AdminClient,
    log: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    publisher: Arc<dyn sluice::backend::Backend>,
    runtime: tokio::runtime::Runtime,
}

impl Served {
    /// Starts the host with `SLUICE_CACHE_DIR` as `cache` (the config names
    /// no cache directory), and waits for its admin API.
    fn start(cache: &Path) -> Served {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(plugin_path("uppercase"), dir.path().join("upper.wasm")).unwrap();
        std::fs::copy(plugin_path("uppercase"), dir.path().join("loud.wasm")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let db = dir.path().join("sluice.db");
        std::fs::write(
            dir.path().join("sluice.toml"),
            reload_config(port, &db, "", "loud.out"),
        )
        .unwrap();
        let mut child = common::sluice()
            .arg("run")
            .arg(dir.path().join("sluice.toml"))
            .env("SLUICE_LOG", "info")
            .env("SLUICE_LOG_FORMAT", "json")
            .env("SLUICE_CACHE_DIR", cache)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if let Ok(event) = serde_json::from_str(&line) {
                    lines.lock().unwrap().push(event);
                }
            }
        });
        // The publisher's tasks (SQLite's writer) run on a worker of its own.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let publisher = runtime
            .block_on(sluice::backend::connect(&format!(
                "sqlite://{}?poll_ms=20",
                db.display()
            )))
            .unwrap();
        let admin =
            sluice::admin::client::AdminClient::new(&format!("http://127.0.0.1:{port}"), None);
        let mut served = Served {
            child,
            dir,
            port,
            admin,
            log,
            publisher,
            runtime,
        };
        let give_up = Instant::now() + Duration::from_secs(60);
        while served.admin.get("/api/routes").is_err() {
            assert!(
                served.child.try_wait().unwrap().is_none(),
                "the host exited: {:?}",
                served.log.lock().unwrap()
            );
            assert!(Instant::now() < give_up, "the admin API never came up");
            std::thread::sleep(Duration::from_millis(100));
        }
        served
    }

    /// Rewrites the config (see [`reload_config`]) and reloads it.
    fn reload(&self, shifting_extra: &str, loud_output: &str) {
        let db = self.dir.path().join("sluice.db");
        self.write_config(&reload_config(self.port, &db, shifting_extra, loud_output));
        self.ask_reload().unwrap();
    }

    /// Asks for a reload; the API's answer, once the host's log has caught
    /// up with it (it logs every reload, done or refused, before answering).
    fn ask_reload(&self) -> anyhow::Result<()> {
        let logged = |log: &Self| {
            log.events("config reloaded", None).len()
                + log.events("config reload refused", None).len()
        };
        let before = logged(self);
        let answer = self.admin.post("/api/reload").map(|_| ());
        let give_up = Instant::now() + Duration::from_secs(10);
        while logged(self) == before {
            assert!(Instant::now() < give_up, "the reload was never logged");
            std::thread::sleep(Duration::from_millis(20));
        }
        answer
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.dir.path().join("sluice.toml"), text).unwrap();
    }

    fn publish(&self, topic: &str, count: usize) {
        let messages = (0..count)
            .map(|i| Message::new(topic, format!("message {i}")))
            .collect();
        self.runtime
            .block_on(self.publisher.publish(messages))
            .unwrap();
    }

    /// Route `name` as `/api/routes` shows it.
    fn route(&self, name: &str) -> serde_json::Value {
        let routes = self.admin.get("/api/routes").unwrap();
        routes
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no route `{name}` in {routes}"))
            .clone()
    }

    fn succeeded(&self, route: &str) -> u64 {
        self.route(route)["stats"]["succeeded"].as_u64().unwrap()
    }

    /// Waits until route `name` has handled `count` messages in all.
    fn wait_handled(&self, name: &str, count: u64) {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let handled = self.succeeded(name);
            assert!(
                handled <= count,
                "route `{name}` handled {handled}, more than {count}"
            );
            if handled == count {
                return;
            }
            assert!(
                Instant::now() < give_up,
                "route `{name}` handled {handled} of {count}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Log events whose message is `message` and, if given, whose route is
    /// `route`.
    fn events(&self, message: &str, route: Option<&str>) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
                    && route.is_none_or(|r| e["fields"]["route"] == r)
            })
            .cloned()
            .collect()
    }

    /// How often route `name` joined its group since the start.
    fn subscriptions(&self, name: &str) -> usize {
        self.events("route subscribed", Some(name)).len()
    }

    fn plugin(&self, name: &str) -> serde_json::Value {
        let plugins = self.admin.get("/api/plugins").unwrap();
        plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no plugin `{name}` in {plugins}"))
            .clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The compiled-component cache the reload tests share, so each host does
/// not compile the plugin again.
fn shared_cache() -> std::path::PathBuf {
    common::target_tmp().join("reload-cache")
}

#[test]
fn a_paused_route_stays_paused_through_a_reload_even_when_its_config_changed() {
    let cache = tempfile::tempdir().unwrap();
    let host = Served::start(cache.path());
    // `sluice run` caches under SLUICE_CACHE_DIR when the config names no
    // directory: the versions that ran are kept there.
    assert!(
        cache.path().join("versions").is_dir(),
        "nothing kept under SLUICE_CACHE_DIR"
    );
    for route in ["steady", "shifting"] {
        host.admin
            .post(&format!("/api/routes/{route}/pause"))
            .unwrap();
    }
    host.reload("concurrency = 2", "loud.out");
    assert_eq!(
        host.subscriptions("shifting"),
        2,
        "the changed route restarted"
    );
    assert_eq!(
        host.subscriptions("steady"),
        1,
        "the unchanged route ran on"
    );
    for route in ["steady", "shifting"] {
        assert_eq!(host.route(route)["paused"], true, "{route} resumed");
    }
    // Paused in fact: what is published waits until the route resumes.
    host.publish("steady.in", 3);
    host.publish("shifting.in", 3);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(host.succeeded("steady"), 0);
    assert_eq!(host.succeeded("shifting"), 0);
    for route in ["steady", "shifting"] {
        host.admin
            .post(&format!("/api/routes/{route}/resume"))
            .unwrap();
        host.wait_handled(route, 3);
    }
}

#[test]
fn a_reload_keeps_a_deployed_version_and_its_rollback() {
    let host = Served::start(&shared_cache());
    let first = sluice::runtime::hash(&std::fs::read(plugin_path("uppercase")).unwrap());
    let second = plugin_version("uppercase", 2);
    host.admin
        .put("/api/plugins/upper", second.clone())
        .unwrap();
    host.admin.put("/api/plugins/loud", second.clone()).unwrap();
    let second = sluice::runtime::hash(&second);

    // `upper` is unchanged; `loud` publishes elsewhere now.
    host.reload("", "loud.elsewhere");
    let upper = host.plugin("upper");
    assert_eq!(upper["current"]["hash"], second, "{upper}");
    assert_eq!(upper["earlier"][0]["hash"], first, "{upper}");
    let loud = host.plugin("loud");
    assert_eq!(
        loud["current"]["hash"], second,
        "a changed plugin loads its file, where the deploy wrote: {loud}"
    );
    assert_eq!(loud["earlier"], serde_json::json!([]), "{loud}");
    assert_eq!(
        host.subscriptions("steady"),
        1,
        "the unchanged route ran on"
    );
    assert_eq!(
        host.subscriptions("shifting"),
        2,
        "the changed route restarted"
    );

    let rolled = host.admin.post("/api/plugins/upper/rollback").unwrap();
    assert_eq!(rolled["current"]["hash"], first, "{rolled}");
    assert_eq!(host.plugin("upper")["current"]["hash"], first);
    let refused = host.admin.post("/api/plugins/loud/rollback").unwrap_err();
    assert!(
        format!("{refused:#}").contains("no earlier version"),
        "{refused:#}"
    );
    // The rolled-back version is the one that runs.
    host.publish("steady.in", 1);
    host.wait_handled("steady", 1);
}

#[test]
fn a_reload_keeps_the_counters_of_the_routes_that_stay() {
    let host = Served::start(&shared_cache());
    host.publish("steady.in", 3);
    host.publish("shifting.in", 2);
    host.wait_handled("steady", 3);
    host.wait_handled("shifting", 2);
    host.reload("max_in_flight = 64", "loud.out");
    host.publish("steady.in", 4);
    host.publish("shifting.in", 1);
    host.wait_handled("steady", 7);
    host.wait_handled("shifting", 3);
    let metrics = host.admin.metrics().unwrap();
    for expected in [
        "sluice_route_acked_total{route=\"steady\"} 7",
        "sluice_route_acked_total{route=\"shifting\"} 3",
    ] {
        assert!(metrics.contains(expected), "{expected} not in {metrics}");
    }
}

#[test]
fn an_unchanged_route_runs_on_through_a_reload_and_a_changed_one_restarts() {
    let host = Served::start(&shared_cache());
    host.publish("steady.in", 5);
    host.wait_handled("steady", 5);
    // Messages keep coming while the config is reloaded twice.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publishing = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let publisher = host.publisher.clone();
        let runtime = host.runtime.handle().clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = vec![
                    Message::new("steady.in", "steady"),
                    Message::new("shifting.in", "shifting"),
                ];
                runtime.block_on(publisher.publish(batch)).unwrap();
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    host.reload("concurrency = 2", "loud.out");
    std::thread::sleep(Duration::from_millis(300));
    host.reload("concurrency = 3", "loud.out");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publishing.join().unwrap();
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    host.wait_handled("steady", 5 + sent);
    host.wait_handled("shifting", sent);

    assert_eq!(
        host.subscriptions("steady"),
        1,
        "the unchanged route restarted"
    );
    assert!(
        host.events("route stopped", Some("steady")).is_empty(),
        "the unchanged route stopped"
    );
    assert_eq!(
        host.subscriptions("shifting"),
        3,
        "the changed route ran on"
    );
    let reloads = host.events("config reloaded", None);
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    let said = reloads[1]["fields"]["message"].as_str().unwrap();
    assert!(
        said.contains("routes kept 1 [steady], restarted 1 [shifting], added 0 [], removed 0 []"),
        "{said}"
    );
}

#[test]
fn a_refused_reload_leaves_everything_as_it_was() {
    let host = Served::start(&shared_cache());
    let deployed = plugin_version("uppercase", 3);
    host.admin
        .put("/api/plugins/upper", deployed.clone())
        .unwrap();
    host.publish("steady.in", 2);
    host.wait_handled("steady", 2);
    host.admin.post("/api/routes/shifting/pause").unwrap();

    // The config checks out, but plugin `loud`'s new file is no component.
    std::fs::write(
        host.dir.path().join("broken.wasm"),
        b"\0asm not a component",
    )
    .unwrap();
    let db = host.dir.path().join("sluice.db");
    let config = reload_config(host.port, &db, "", "loud.elsewhere")
        .replace("path = \"loud.wasm\"", "path = \"broken.wasm\"");
    host.write_config(&config);
    let refused = host.ask_reload().unwrap_err();
    assert!(
        format!("{refused:#}").contains("plugins.loud"),
        "{refused:#}"
    );

    assert_eq!(host.subscriptions("steady"), 1);
    assert_eq!(host.subscriptions("shifting"), 1);
    assert_eq!(host.route("shifting")["paused"], true);
    let upper = host.plugin("upper");
    assert_eq!(
        upper["current"]["hash"],
        sluice::runtime::hash(&deployed),
        "{upper}"
    );
    host.admin.post("/api/plugins/upper/rollback").unwrap();
    host.publish("steady.in", 1);
    host.wait_handled("steady", 3);
    host.admin.post("/api/routes/shifting/resume").unwrap();
    host.publish("shifting.in", 1);
    host.wait_handled("shifting", 1);
}
