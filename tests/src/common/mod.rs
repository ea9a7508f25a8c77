//! Helpers shared by the integration tests: building the example plugins,
//! opening backends, running routes and collecting what they publish.

pub mod postgres;
pub mod rpc;
pub mod servers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sluice::Message;
use sluice::backend::{self, Backend, SubscribeOptions};
use sluice::router::{RetryPolicy, Route, RouteSpec, RouteStats, WasmHandler};
use sluice::runtime::{Plugin, PluginSettings, Runtime};
use tokio_util::sync::CancellationToken;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The directory cargo built this test binary's package into
/// (`target/debug`): a test binary runs from its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test binary under target/PROFILE/deps")
        .to_path_buf()
}

/// Scratch space the test runs share, as cargo's `CARGO_TARGET_TMPDIR`
/// (which only a test target is given, not this library).
pub fn target_tmp() -> PathBuf {
    profile_dir()
        .parent()
        .expect("a profile directory under target/")
        .join("tmp")
}

/// The `sluice` command, as this package builds it for the tests.
pub fn sluice() -> Command {
    Command::new(profile_dir().join(format!("sluice-under-test{}", std::env::consts::EXE_SUFFIX)))
}

/// Path of an example plugin, built (once per test binary) from `plugins/`.
pub fn plugin_path(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let plugins = repo_root().join("plugins");
        let target = plugins.join("target");
        // A fresh machine may lack the target: rustup adds it, and does
        // nothing when it is there (without rustup, the build says so).
        let _ = Command::new("rustup")
            .args(["target", "add", "wasm32-wasip2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(&plugins)
            .status()
            .expect("run cargo to build the plugins");
        assert!(
            status.success(),
            "building the plugins failed; is the wasm32-wasip2 target installed? (rustup target add wasm32-wasip2)"
        );
        target.join("wasm32-wasip2/release")
    });
    dir.join(format!("{name}.wasm"))
}

/// The example plugin `name` written in `lang` (`python`, `js` or `c`), from
/// `plugins/<lang>/<name>`, built with the kit's `sluice build` (skipped when
/// its inputs did not change). componentize-py and componentize-js are
/// installed into `target/toolchains` on first use.
pub fn example_path(lang: &str, name: &str) -> PathBuf {
    // One build at a time: parallel tests would otherwise race on the
    // same project's `target/`.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let options = sluice::kit::build::BuildOptions {
        project: repo_root().join("plugins").join(lang).join(name),
        out: None,
        toolchains: sluice::kit::toolchain::Toolchains::at(toolchains_dir()),
        force: false,
        cache_dir: Some(target_tmp().join("component-cache")),
    };
    match sluice::kit::build::build(&options) {
        Ok(built) => built.wasm,
        Err(error) => panic!(
            "building the {lang} example `{name}` failed (cargo xtask plugins installs what it needs): {error:#}"
        ),
    }
}

/// Where the kit installs componentize-py and componentize-js for tests.
pub fn toolchains_dir() -> PathBuf {
    repo_root().join("target").join("toolchains")
}

/// A runtime whose compiled-component cache is shared by the test run.
pub fn runtime() -> Runtime {
    let cache = target_tmp().join("component-cache");
    Runtime::new(Some(cache)).expect("runtime")
}

/// Settings for a test plugin: short deadline, small memory, every topic
/// granted, given config.
pub fn settings(name: &str, config: &[(&str, &str)]) -> PluginSettings {
    let mut settings = PluginSettings::new(name);
    settings.timeout = Duration::from_millis(500);
    settings.memory_limit = 32 << 20;
    settings.publish_to = vec![">".into()];
    settings.config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    settings
}

pub fn load(runtime: &Runtime, plugin: &str, settings: PluginSettings) -> Arc<Plugin> {
    Arc::new(
        runtime
            .load_file(&plugin_path(plugin), settings)
            .expect("load plugin"),
    )
}

/// Fast retries, so tests do not wait on backoff.
pub fn quick_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        multiplier: 2.0,
        jitter: 0.0,
    }
}

/// Every backend that needs no server, each fresh.
pub async fn embedded_backends() -> Vec<(&'static str, Arc<dyn Backend>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("sluice.db").display()
    );
    vec![
        (
            "memory",
            backend::connect("memory://").await.unwrap(),
            tempfile::tempdir().unwrap(),
        ),
        ("sqlite", backend::connect(&sqlite_url).await.unwrap(), dir),
        {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("file://{}", dir.path().join("log").display());
            ("file", backend::connect(&url).await.unwrap(), dir)
        },
    ]
}

/// A route consuming `input` with `plugin`, publishing to the same backend.
pub fn route(
    name: &str,
    backend: &Arc<dyn Backend>,
    input: &str,
    plugin: Arc<Plugin>,
    retry: RetryPolicy,
) -> Route {
    let mut subscribe = SubscribeOptions::new(vec![input.to_string()], name);
    subscribe.lease = Duration::from_secs(5);
    Route {
        spec: RouteSpec {
            retry,
            ..RouteSpec::new(name, subscribe)
        },
        source: backend.clone(),
        outputs: vec![backend.clone()],
        dead_letters: None,
        handler: Arc::new(WasmHandler::new(plugin)),
        stats: Arc::new(RouteStats::default()),
    }
}

/// A running route; stops and drains on `stop`.
pub struct Running {
    pub stats: Arc<RouteStats>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn start(route: Route) -> Self {
        let token = CancellationToken::new();
        let stats = route.stats.clone();
        let subscribed = route.subscribe().await.expect("route subscribes");
        let task = tokio::spawn(subscribed.run(token.clone()));
        Running { stats, token, task }
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("route stops within 10 s")
            .expect("route task")
            .expect("route ran");
    }
}

/// Collects every message of some topics, acknowledging them.
pub struct Collector {
    seen: Arc<Mutex<Vec<Message>>>,
    token: CancellationToken,
}

impl Collector {
    /// Subscribes now (so nothing published later is missed, even on a
    /// backend that keeps no history).
    pub async fn start(backend: &Arc<dyn Backend>, topics: &[&str]) -> Self {
        Self::start_with(backend, topics, false).await
    }

    /// As [`Collector::start`], as an ordered group: each key's messages
    /// arrive in the order they were published, on a backend that keeps
    /// it for ordered groups only (SQS's FIFO queues).
    pub async fn start_ordered(backend: &Arc<dyn Backend>, topics: &[&str]) -> Self {
        Self::start_with(backend, topics, true).await
    }

    async fn start_with(backend: &Arc<dyn Backend>, topics: &[&str], ordered: bool) -> Self {
        let group = format!("collector-{}", Message::new("x", "").id);
        let mut options =
            SubscribeOptions::new(topics.iter().map(|t| t.to_string()).collect(), group);
        options.ephemeral = true;
        options.ordered = ordered;
        let subscription = backend.subscribe(options).await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let (seen2, token2) = (seen.clone(), token.clone());
        tokio::spawn(async move {
            // A message the backend delivers to the collector again (it is
            // at least once) is not a second output: one the route
            // published twice comes with an attempt of 1 each time.
            let mut ids = std::collections::HashSet::new();
            while !token2.is_cancelled() {
                for delivery in subscription
                    .fetch(100, Duration::from_millis(50))
                    .await
                    .unwrap()
                {
                    let first = ids.insert(delivery.message.id.clone());
                    if first || delivery.attempt == 1 {
                        seen2.lock().unwrap().push(delivery.message.clone());
                    }
                    subscription.ack(&delivery).await.unwrap();
                }
            }
            subscription.close().await.unwrap();
        });
        Collector { seen, token }
    }

    /// Waits until `count` messages arrived (an error naming those that
    /// did after `limit`), then a little longer to catch extras, and
    /// returns them all.
    pub async fn wait_for(&self, count: usize, limit: Duration) -> anyhow::Result<Vec<Message>> {
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            let seen = self.now();
            if seen.len() >= count {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < give_up,
                "expected {count} messages within {limit:?}, got {}: {seen:?}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(self.now())
    }

    /// Waits until `count` messages arrived, for as long as more keep
    /// arriving: an error only once none came for `idle` (a loaded machine
    /// may be slow; a stall fails), naming how many did.
    pub async fn wait_while_arriving(
        &self,
        count: usize,
        idle: Duration,
    ) -> anyhow::Result<Vec<Message>> {
        let mut arrived = 0;
        let mut last_change = tokio::time::Instant::now();
        loop {
            let now = self.seen.lock().unwrap().len();
            if now >= count {
                break;
            }
            if now != arrived {
                arrived = now;
                last_change = tokio::time::Instant::now();
            }
            anyhow::ensure!(
                last_change.elapsed() < idle,
                "expected {count} messages, got {arrived}, and none more for {idle:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(self.now())
    }

    pub fn now(&self) -> Vec<Message> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

pub fn text(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

/// A config for the `sluice` binary: a SQLite backend in `dir`, `plugin` as
/// plugin `upper`, and route `upper` from `<ns>words` to `<ns>shouted` (`ns`
/// keeps topics apart on a shared server; empty for none).
pub fn upper_config(dir: &Path, plugin: &Path, ns: &str) -> String {
    format!(
        r#"[backends.main]
url = "sqlite://{db}"

[plugins.upper]
path = "{plugin}"
config = {{ output = "{ns}shouted" }}
publish_to = ["{ns}shouted"]

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "upper"
topics = ["{ns}words"]
plugin = "upper"
"#,
        db = dir.join("sluice.db").display(),
        plugin = plugin.display(),
        cache = dir.join("cache").display(),
    )
}

/// The cell under `column` in the row whose first cell is `first`, of a
/// table `sluice` printed (a header row; columns two spaces or more apart).
pub fn cell(table: &str, first: &str, column: &str) -> String {
    let split = |line: &str| -> Vec<String> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut lines = table.lines();
    let header = split(lines.next().unwrap_or_default());
    let at = header
        .iter()
        .position(|h| h == column)
        .unwrap_or_else(|| panic!("no column {column} in\n{table}"));
    let row = lines
        .map(split)
        .find(|row| row.first().is_some_and(|c| c == first))
        .unwrap_or_else(|| panic!("no row {first} in\n{table}"));
    row[at].clone()
}

/// A `sluice` command as the kit tests run it: toolchains and the
/// component cache under the target directory, and Rust scaffolds building
/// in the plugins' target directory, so the SDK's dependencies are not
/// compiled again for each.
pub fn kit_command() -> Command {
    let mut command = sluice();
    command
        .env("SLUICE_TOOLCHAINS", toolchains_dir())
        .env("SLUICE_CACHE_DIR", target_tmp().join("component-cache"))
        .env("CARGO_TARGET_DIR", repo_root().join("plugins/target"));
    command
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port()
}

/// A name of its own on a shared server: `prefix` and ten characters of a
/// fresh message id.
pub fn unique(prefix: &str) -> String {
    let id = Message::new("x", "").id.replace('-', "");
    format!("{prefix}{}", &id[id.len() - 10..])
}

/// A child process killed when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `sluice run` on `dir/sluice.toml`, quietly.
pub fn run_host(dir: &Path) -> KillOnDrop {
    let child = sluice()
        .arg("run")
        .arg(dir.join("sluice.toml"))
        .env("SLUICE_LOG", "warn")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sluice run");
    KillOnDrop(child)
}

/// Runs a host whose one route, `upper`, reads `words` on `url` through the
/// uppercase plugin (which publishes to `shouted`), with the admin API on
/// `port`; `admin_extra` lines go under `[admin]` and `route_extra` lines
/// under the route.
pub fn run_admin_host(
    dir: &Path,
    url: &str,
    port: u16,
    admin_extra: &str,
    route_extra: &str,
) -> KillOnDrop {
    std::fs::copy(plugin_path("uppercase"), dir.join("upper.wasm")).unwrap();
    let config = format!(
        r#"[backends.main]
url = "{url}"

[plugins.upper]
path = "upper.wasm"
config = {{ output = "shouted" }}
publish_to = ["shouted"]

[runtime]
cache_dir = "cache"

[admin]
listen = "127.0.0.1:{port}"
{admin_extra}

[[routes]]
name = "upper"
topics = ["words"]
plugin = "upper"
{route_extra}
"#,
    );
    std::fs::write(dir.join("sluice.toml"), config).unwrap();
    run_host(dir)
}

/// `GET url`, with a bearer token if given: the status and the body (status
/// 0 and the error when nothing answered).
pub fn http_get(url: &str, token: Option<&str>) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut request = agent.get(url);
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    match request.call() {
        Ok(mut response) => (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

/// `sluice publish --lines --json` of `lines` to `topic` on `url`, as
/// `sluice tail --json` prints messages.
pub fn publish_json_lines(url: &str, topic: &str, lines: &[u8]) {
    use std::io::Write;
    let mut publish = sluice()
        .args(["publish", "--url", url, topic, "--lines", "--json"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    publish.stdin.take().unwrap().write_all(lines).unwrap();
    assert!(publish.wait().unwrap().success());
}

/// Whether this process is the one the test `name` (in module `module`,
/// as `module_path!()` gives it) should run in. A test that measures its
/// process, its memory or its log, calls this first: the first time, it
/// runs the test again in a child process of its own, fails if the child
/// did not pass it, and answers false; in the child it answers true.
pub fn in_own_process(module: &str, name: &str) -> bool {
    const MARK: &str = "SLUICE_TEST_OWN_PROCESS";
    // The test binary's own name leads the module path; filters start after it.
    let test = match module.split_once("::") {
        Some((_, inner)) => format!("{inner}::{name}"),
        None => name.to_string(),
    };
    if std::env::var(MARK).is_ok_and(|running| running == test) {
        return true;
    }
    let out = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([test.as_str(), "--exact", "--include-ignored", "--nocapture"])
        .env(MARK, &test)
        .output()
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in its own process:\n{stdout}\n{stderr}"
    );
    false
}
