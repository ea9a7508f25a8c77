//! The admin API and the operator commands against a running `sluice run`.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, cell, free_port, plugin_path};
use sluice_tests::common;

fn sluice(args: &[&str], admin: &str, token: Option<&str>) -> Output {
    let mut command = common::sluice();
    command
        .args(args)
        .env("SLUICE_ADMIN_URL", admin)
        .env_remove("SLUICE_ADMIN_TOKEN");
    if let Some(token) = token {
        command.env("SLUICE_ADMIN_TOKEN", token);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What `sluice ARGS --json` printed, as the one JSON document it must be.
fn json(args: &[&str], admin: &str) -> serde_json::Value {
    let out = sluice(&[args, &["--json"]].concat(), admin, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

fn start(dir: &Path, port: u16, token: Option<&str>) -> KillOnDrop {
    let url = format!("sqlite://{}", dir.join("sluice.db").display());
    start_on(dir, port, token, &url, "")
}

/// Starts a host whose one route reads `words` on `url`, with `route_extra`
/// lines added to the route, and waits for its admin API.
fn start_on(
    dir: &Path,
    port: u16,
    token: Option<&str>,
    url: &str,
    route_extra: &str,
) -> KillOnDrop {
    let mut admin_extra = "max_upload_mb = 1".to_string();
    if let Some(token) = token {
        admin_extra.push_str(&format!("\ntoken = \"{token}\""));
    }
    let host = common::run_admin_host(dir, url, port, &admin_extra, route_extra);
    let admin = format!("http://127.0.0.1:{port}");
    let give_up = Instant::now() + Duration::from_secs(30);
    while !sluice(&["routes"], &admin, token).status.success() {
        assert!(Instant::now() < give_up, "the admin API never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    host
}

fn get(url: &str) -> (u16, String) {
    common::http_get(url, None)
}

#[test]
fn deploy_refuse_rollback_pause_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let _host = start(dir.path(), port, None);

    assert_eq!(get(&format!("{admin}/healthz")).0, 200);
    // Ready once the route has reached its backend.
    wait_ready_status(&admin, 200, Duration::from_secs(30));

    let plugins = text(&sluice(&["plugins"], &admin, None).stdout);
    let first = sluice::runtime::hash(&std::fs::read(plugin_path("uppercase")).unwrap());
    assert!(plugins.contains(&first[..12]), "{plugins}");

    // A component of another world is refused; the running version stays.
    let wrong = sluice(
        &[
            "deploy",
            plugin_path("wrong_world").to_str().unwrap(),
            "--plugin",
            "upper",
        ],
        &admin,
        None,
    );
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("does not implement"),
        "{}",
        text(&wrong.stderr)
    );
    let plugins = text(&sluice(&["plugins"], &admin, None).stdout);
    assert!(
        plugins.contains(&first[..12]) && plugins.contains("last refused version"),
        "{plugins}"
    );

    // A good one goes live and is written over the plugin file.
    let echo = plugin_path("echo");
    let deployed = sluice(
        &["deploy", echo.to_str().unwrap(), "--plugin", "upper"],
        &admin,
        None,
    );
    assert!(deployed.status.success(), "{}", text(&deployed.stderr));
    let second = sluice::runtime::hash(&std::fs::read(&echo).unwrap());
    assert!(text(&deployed.stdout).contains(&second[..12]));
    assert_eq!(
        std::fs::read(dir.path().join("upper.wasm")).unwrap(),
        std::fs::read(&echo).unwrap()
    );

    let rolled = sluice(&["rollback", "upper"], &admin, None);
    assert!(
        text(&rolled.stdout).contains(&first[..12]),
        "{}",
        text(&rolled.stdout)
    );
    // Rolled back on disk too, and the watcher, seeing the files the host
    // wrote itself, does not deploy them again.
    assert_eq!(
        std::fs::read(dir.path().join("upper.wasm")).unwrap(),
        std::fs::read(plugin_path("uppercase")).unwrap()
    );
    std::thread::sleep(Duration::from_secs(1));
    let plugins = text(&sluice(&["plugins"], &admin, None).stdout);
    assert!(
        plugins.contains(&first[..12]),
        "the rollback was undone: {plugins}"
    );

    // A paused route fetches nothing; resumed, it takes up what waited.
    assert!(sluice(&["pause", "upper"], &admin, None).status.success());
    let routes = text(&sluice(&["routes"], &admin, None).stdout);
    assert_eq!(cell(&routes, "upper", "STATE"), "paused");
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let publish = common::sluice()
        .args(["publish", "--url", &url, "words", "held back"])
        .output()
        .unwrap();
    assert!(publish.status.success());
    std::thread::sleep(Duration::from_secs(1));
    let tail = |topic: &str| {
        text(
            &common::sluice()
                .args(["tail", "--url", &url, topic])
                .output()
                .unwrap()
                .stdout,
        )
    };
    assert!(!tail("words.upper").contains("HELD BACK") && !tail("shouted").contains("HELD BACK"));
    let (_, routes) = get(&format!("{admin}/api/routes"));
    assert!(
        routes.contains("\"received\":0"),
        "a paused route fetched: {routes}"
    );
    assert!(sluice(&["resume", "upper"], &admin, None).status.success());
    let routes = text(&sluice(&["routes"], &admin, None).stdout);
    assert_eq!(cell(&routes, "upper", "STATE"), "running");
    let give_up = Instant::now() + Duration::from_secs(20);
    while !tail("shouted").contains("HELD BACK") {
        assert!(
            Instant::now() < give_up,
            "the resumed route never handled the waiting message"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Uploads over the limit are refused before they are looked at.
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, vec![0u8; 2 << 20]).unwrap();
    let too_big = sluice(
        &["deploy", big.to_str().unwrap(), "--plugin", "upper"],
        &admin,
        None,
    );
    assert!(!too_big.status.success());
    assert!(
        text(&too_big.stderr).contains("413"),
        "{}",
        text(&too_big.stderr)
    );
    let unknown = sluice(&["pause", "nope"], &admin, None);
    assert!(text(&unknown.stderr).contains("no route named `nope`"));

    let (status, metrics) = get(&format!("{admin}/metrics"));
    assert_eq!(status, 200);
    for family in [
        "sluice_route_received_total{route=\"upper\"}",
        "sluice_route_in_flight{route=\"upper\"}",
        "sluice_handler_duration_seconds_bucket{route=\"upper\",le=\"+Inf\"}",
        "sluice_plugin_traps_total{plugin=\"upper\"}",
        "sluice_plugin_version_info{plugin=\"upper\"",
        "sluice_backend_up{backend=\"main\",kind=\"sqlite\"} 1",
        "sluice_route_pending{route=\"upper\"} 0",
    ] {
        assert!(metrics.contains(family), "missing {family} in\n{metrics}");
    }
    let stats = sluice(&["stats", "--interval", "0"], &admin, None);
    assert!(stats.status.success(), "{}", text(&stats.stderr));
    let stats = text(&stats.stdout);
    let handled = cell(&stats, "upper", "HANDLED");
    assert!(handled.parse::<u64>().is_ok(), "{stats}");
    assert_eq!(
        cell(&stats, "upper", "MSG/S"),
        "-",
        "no rate from one reading"
    );
}

/// The value of a metric's line in `/metrics`, if it has one.
fn metric(admin: &str, line: &str) -> Option<u64> {
    let (_, metrics) = get(&format!("{admin}/metrics"));
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
}

/// Polls `/metrics` until the line reads `want`.
fn wait_metric(admin: &str, line: &str, want: u64) {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let now = metric(admin, line);
        if now == Some(want) {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "`{line}` is {now:?}, not {want}, after 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What waits behind a paused route shows as its backlog: in `/metrics`,
/// `/api/routes`, `sluice routes` and `sluice stats`; resumed, the route
/// takes it up and the backlog falls to 0.
#[test]
fn a_paused_route_shows_its_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let _host = start(dir.path(), port, None);
    let backlog = "sluice_route_backlog{route=\"upper\"} ";
    // Once the route has made its group.
    wait_metric(&admin, backlog, 0);

    assert!(sluice(&["pause", "upper"], &admin, None).status.success());
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let published = common::sluice()
        .args(["publish", "--url", &url, "words", "waiting", "--count", "5"])
        .output()
        .unwrap();
    assert!(published.status.success(), "{}", text(&published.stderr));
    assert_eq!(metric(&admin, backlog), Some(5));
    let (_, metrics) = get(&format!("{admin}/metrics"));
    assert!(
        metrics.contains("# TYPE sluice_route_backlog gauge"),
        "{metrics}"
    );
    assert_eq!(
        metric(&admin, "sluice_route_pending{route=\"upper\"} "),
        Some(0),
        "nothing was delivered"
    );
    let (_, routes) = get(&format!("{admin}/api/routes"));
    assert!(routes.contains("\"backlog\":5"), "{routes}");
    let listed = text(&sluice(&["routes"], &admin, None).stdout);
    assert_eq!(cell(&listed, "upper", "BACKLOG"), "5", "{listed}");
    let stats = text(&sluice(&["stats"], &admin, None).stdout);
    assert_eq!(cell(&stats, "upper", "BACKLOG"), "5", "{stats}");
    assert_eq!(cell(&stats, "upper", "PENDING"), "0", "{stats}");

    assert!(sluice(&["resume", "upper"], &admin, None).status.success());
    wait_metric(&admin, backlog, 0);
}

#[test]
fn a_token_guards_everything_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let _host = start(dir.path(), port, Some("s3cret"));
    assert_eq!(get(&format!("{admin}/healthz")).0, 200);
    assert_eq!(get(&format!("{admin}/api/plugins")).0, 401);
    assert_eq!(get(&format!("{admin}/metrics")).0, 401);
    let refused = sluice(&["plugins"], &admin, None);
    assert!(
        text(&refused.stderr).contains("bearer token"),
        "{}",
        text(&refused.stderr)
    );
    assert!(
        sluice(&["plugins"], &admin, Some("s3cret"))
            .status
            .success()
    );
}

#[test]
fn listening_beyond_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[backends.main]\nurl = \"memory://\"\n\n[admin]\nlisten = \"0.0.0.0:{}\"\n",
        free_port()
    );
    std::fs::write(dir.path().join("sluice.toml"), config).unwrap();
    let out = common::sluice()
        .args(["check", dir.path().join("sluice.toml").to_str().unwrap()])
        .env_remove("SLUICE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("admin.token"),
        "{}",
        text(&out.stderr)
    );
}

fn publish_and_tail(dir: &Path, payload: &str, topic: &str) -> String {
    let url = format!("sqlite://{}", dir.join("sluice.db").display());
    let published = common::sluice()
        .args(["publish", "--url", &url, "words", payload])
        .output()
        .unwrap();
    assert!(published.status.success());
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let tail = common::sluice()
            .args(["tail", "--url", &url, topic])
            .output()
            .unwrap();
        let seen = text(&tail.stdout);
        if seen.contains(&payload.to_uppercase()) {
            return seen;
        }
        assert!(Instant::now() < give_up, "{payload} never reached {topic}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn reload_applies_a_new_config_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let host = start(dir.path(), port, None);
    publish_and_tail(dir.path(), "before", "shouted");

    // Outputs move to another topic with a reload through the API.
    let config_path = dir.path().join("sluice.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, original.replace("\"shouted\"", "\"yelled\"")).unwrap();
    let reloaded = sluice(&["reload"], &admin, None);
    assert!(reloaded.status.success(), "{}", text(&reloaded.stderr));
    publish_and_tail(dir.path(), "after", "yelled");

    // A broken config is refused and the running one stays.
    std::fs::write(
        &config_path,
        original.replace("plugin = \"upper\"", "plugin = \"missing\""),
    )
    .unwrap();
    let refused = sluice(&["reload"], &admin, None);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("no plugin named `missing`"),
        "{}",
        text(&refused.stderr)
    );
    publish_and_tail(dir.path(), "still", "yelled");

    // SIGHUP does the same as the API, in the background: messages keep
    // flowing to the old topic until the new config is live.
    std::fs::write(
        &config_path,
        original.replace("\"shouted\"", "\"hollered\""),
    )
    .unwrap();
    let pid = host.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let give_up = Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        let payload = format!("hangup-{round}");
        let published = common::sluice()
            .args(["publish", "--url", &url, "words", &payload])
            .output()
            .unwrap();
        assert!(published.status.success());
        std::thread::sleep(Duration::from_millis(300));
        let tail = common::sluice()
            .args(["tail", "--url", &url, "hollered"])
            .output()
            .unwrap();
        if text(&tail.stdout).contains("HANGUP-") {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the SIGHUP reload never took effect"
        );
    }
}

/// A broker process of this test's own, to stop and start again.
struct Broker {
    child: Child,
    spawn: Box<dyn Fn() -> Child>,
}

impl Broker {
    fn start(spawn: impl Fn() -> Child + 'static, port: u16) -> Self {
        let broker = Broker {
            child: spawn(),
            spawn: Box::new(spawn),
        };
        wait_listening(port);
        broker
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn start_again(&mut self, port: u16) {
        self.child = (self.spawn)();
        wait_listening(port);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_listening(port: u16) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < give_up, "no broker on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `/readyz` until its status is `status`; answers the last body.
fn wait_ready_status(admin: &str, status: u16, limit: Duration) -> String {
    let give_up = Instant::now() + limit;
    loop {
        let (now, body) = get(&format!("{admin}/readyz"));
        if now == status {
            return body;
        }
        assert!(
            Instant::now() < give_up,
            "/readyz still answers {now} after {limit:?}, not {status}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With the route's broker stopped, `/readyz` turns 503 naming the route
/// and why, and `sluice routes` shows it not ready; with the broker back, it
/// turns 200 again. `/healthz` stays 200 throughout. A broker that comes
/// back empty (`restored`: the kind of backend) has had the route's
/// server-side state made again, as `/metrics` counts.
fn readiness_follows_the_broker(
    broker: &mut Broker,
    broker_port: u16,
    url: &str,
    restored: Option<&str>,
) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let _host = start_on(dir.path(), port, None, url, "stalled_after_ms = 1000");
    wait_ready_status(&admin, 200, Duration::from_secs(30));

    broker.stop();
    let body = wait_ready_status(&admin, 503, Duration::from_secs(30));
    assert!(
        body.contains("route `upper`: fetches failing for"),
        "unexpected reason: {body}"
    );
    assert_eq!(get(&format!("{admin}/healthz")).0, 200);
    let routes = text(&sluice(&["routes"], &admin, None).stdout);
    assert_eq!(cell(&routes, "upper", "STATE"), "not-ready", "{routes}");
    assert!(routes.contains("route upper: fetches failing"), "{routes}");

    broker.start_again(broker_port);
    wait_ready_status(&admin, 200, Duration::from_secs(60));
    let routes = text(&sluice(&["routes"], &admin, None).stdout);
    assert_eq!(cell(&routes, "upper", "STATE"), "running", "{routes}");
    if let Some(kind) = restored {
        let metrics = get(&format!("{admin}/metrics")).1;
        let line = format!("sluice_backend_state_restored_total{{kind=\"{kind}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{line}` in /metrics:\n{metrics}"));
        assert!(count >= 1, "{metrics}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "redis"),
    ignore = "needs redis-server (feature `redis`)"
)]
fn readiness_follows_redis() {
    let port = free_port();
    let spawn = move || {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server")
    };
    let mut broker = Broker::start(spawn, port);
    // It keeps nothing on disk: it comes back without the route's group.
    let url = format!("redis://127.0.0.1:{port}/0");
    readiness_follows_the_broker(&mut broker, port, &url, Some("redis"));
}

#[test]
#[cfg_attr(not(feature = "nats"), ignore = "needs nats-server (feature `nats`)")]
fn readiness_follows_jetstream() {
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let store_path = store.path().to_path_buf();
    let spawn = move || {
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server")
    };
    let mut broker = Broker::start(spawn, port);
    let url = format!("jetstream://127.0.0.1:{port}");
    readiness_follows_the_broker(&mut broker, port, &url, None);
}

#[test]
#[cfg_attr(not(feature = "sqs"), ignore = "needs moto_server (feature `sqs`)")]
fn readiness_follows_sqs() {
    let port = free_port();
    let spawn = move || {
        Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server (pip install 'moto[server]')")
    };
    let mut broker = Broker::start(spawn, port);
    // moto keeps queues in memory: it comes back without the route's queue.
    let url = format!("sqs://test:test@127.0.0.1:{port}?region=us-east-1");
    readiness_follows_the_broker(&mut broker, port, &url, Some("sqs"));
}

/// A shadow run: the candidate (`hostile`) handles what the live version
/// (`echo`) handles; it agrees on plain messages, differs on `outputs:3`
/// and fails on `spin:2000` (past the plugin's deadline). Nothing of the
/// candidate's is published; the report, the metrics and the CLI say how it
/// compared; promoting makes it live, and a new run can be stopped.
#[test]
fn a_shadow_candidate_is_compared_then_promoted_or_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    std::fs::copy(plugin_path("echo"), dir.path().join("live.wasm")).unwrap();
    std::fs::copy(plugin_path("hostile"), dir.path().join("candidate.wasm")).unwrap();
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let config = format!(
        r#"[backends.main]
url = "{url}"

[plugins.p]
path = "live.wasm"
timeout_ms = 500
publish_to = ["out"]
shadow = {{ path = "candidate.wasm" }}

[runtime]
cache_dir = "cache"

[admin]
listen = "127.0.0.1:{port}"

[[routes]]
name = "r"
topics = ["in"]
plugin = "p"
"#
    );
    std::fs::write(dir.path().join("sluice.toml"), config).unwrap();
    let candidate = sluice::runtime::hash(&std::fs::read(plugin_path("hostile")).unwrap());
    let _host = common::run_host(dir.path());
    let give_up = Instant::now() + Duration::from_secs(30);
    while !sluice(&["routes"], &admin, None).status.success() {
        assert!(Instant::now() < give_up, "the admin API never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let plugins = text(&sluice(&["plugins"], &admin, None).stdout);
    assert_eq!(
        cell(&plugins, "p", "SHADOW"),
        format!("{} on 100%", &candidate[..12]),
        "{plugins}"
    );
    assert_eq!(json(&["plugins"], &admin)[0]["shadow"]["hash"], candidate);
    for payload in ["a", "b", "outputs:3", "spin:2000"] {
        let out = common::sluice()
            .args(["publish", "--url", &url, "in", payload])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let report = loop {
        let (status, body) = get(&format!("{admin}/api/plugins/p/shadow"));
        assert_eq!(status, 200, "{body}");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        let total: u64 = ["same", "different", "candidate_failed"]
            .iter()
            .map(|k| report[k].as_u64().unwrap())
            .sum();
        if total == 4 {
            break report;
        }
        assert!(Instant::now() < give_up, "{report}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(report["same"], 2, "{report}");
    assert_eq!(report["different"], 1, "{report}");
    assert_eq!(report["candidate_failed"], 1, "{report}");
    let differences = report["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 2, "{report}");
    let differs = differences
        .iter()
        .find(|d| d["live"].as_str().unwrap().contains("\"outputs:3\""))
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(
        differs["candidate"]
            .as_str()
            .unwrap()
            .matches("payload=\"x\"")
            .count(),
        3,
        "{differs}"
    );
    assert!(
        differences
            .iter()
            .any(|d| d["candidate"] == "failed: timeout"),
        "{report}"
    );

    // Only the live version's outputs were published.
    let tail = common::sluice()
        .args(["tail", "--url", &url, "out"])
        .output()
        .unwrap();
    let published = text(&tail.stdout);
    assert_eq!(
        published.lines().filter(|l| l.starts_with("[out]")).count(),
        4,
        "{published}"
    );
    assert!(!published.contains("[out] x"), "{published}");

    let line = format!(
        "sluice_plugin_shadow_total{{plugin=\"p\",candidate=\"{}\",result=\"candidate_failed\"}} ",
        &candidate[..12]
    );
    assert_eq!(metric(&admin, &line), Some(1));
    let shown = text(&sluice(&["shadow", "report", "p"], &admin, None).stdout);
    assert!(
        shown.contains("2 same, 1 different, 1 candidate failed"),
        "{shown}"
    );
    assert!(shown.contains("    candidate: failed: timeout"), "{shown}");

    // Promoted, the candidate is live and the run is over.
    let promoted = sluice(&["shadow", "promote", "p"], &admin, None);
    assert!(promoted.status.success(), "{}", text(&promoted.stderr));
    let plugins = text(&sluice(&["plugins"], &admin, None).stdout);
    assert!(plugins.contains(&candidate[..12]), "{plugins}");
    assert_eq!(get(&format!("{admin}/api/plugins/p/shadow")).0, 404);
    assert_eq!(
        std::fs::read(dir.path().join("live.wasm")).unwrap(),
        std::fs::read(plugin_path("hostile")).unwrap(),
        "a restart runs the promoted version"
    );

    // A run started from the CLI, on a sample, and stopped.
    let started = sluice(
        &[
            "deploy",
            plugin_path("echo").to_str().unwrap(),
            "--plugin",
            "p",
            "--shadow",
            "--sample",
            "0.5",
        ],
        &admin,
        None,
    );
    assert!(started.status.success(), "{}", text(&started.stderr));
    assert!(text(&started.stdout).contains("on 50% of messages"));
    let stopped = sluice(&["shadow", "stop", "p"], &admin, None);
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
    assert!(text(&stopped.stdout).contains("shadow run stopped"));
    let plugins = text(&sluice(&["plugins"], &admin, None).stdout);
    assert!(
        plugins.contains(&candidate[..12]),
        "stopping changes nothing live: {plugins}"
    );
    let refused = sluice(&["shadow", "stop", "p"], &admin, None);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("no shadow run"),
        "{}",
        text(&refused.stderr)
    );
}

fn post(url: &str) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut response = agent.post(url).send_empty().unwrap();
    (
        response.status().as_u16(),
        response.body_mut().read_to_string().unwrap(),
    )
}

/// The dead-letter endpoints: a summary, the messages, redrive (only on a
/// route that reads its redrive topic) and purge, with filters.
#[test]
fn dead_letters_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let _host = start_on(dir.path(), port, None, &url, "redrive = true");
    let api = format!("{admin}/api/routes/upper/dead-letters");
    // A payload that is not UTF-8: the uppercase plugin rejects it.
    common::publish_json_lines(&url, "words", br#"{"payload_base64":"//4=","key":"k"}"#);

    let wait_count = |want: u64| -> serde_json::Value {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = get(&api);
            assert_eq!(status, 200, "{body}");
            let summary: serde_json::Value = serde_json::from_str(&body).unwrap();
            if summary["count"] == want {
                return summary;
            }
            assert!(Instant::now() < give_up, "{summary}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let summary = wait_count(1);
    assert_eq!(summary["causes"]["rejected"], 1, "{summary}");
    let (_, body) = get(&format!("{api}/messages?cause=rejected"));
    let messages: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(messages.len(), 1, "{body}");
    assert_eq!(messages[0]["payload_base64"], "//4=");
    assert_eq!(messages[0]["key"], "k");
    let (_, body) = get(&format!("{api}/messages?cause=attempts-exhausted"));
    assert_eq!(body, "[]");

    // Redriven, it fails again: back with one step of history.
    let (status, body) = post(&format!("{api}/redrive"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"redriven\":1"), "{body}");
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = get(&format!("{api}/messages"));
        if body.contains("sluice-redrive-history") {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "never dead-lettered again: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = post(&format!("{api}/purge?cause=rejected"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"purged\":1"), "{body}");
    wait_count(0);
    assert_eq!(get(&format!("{admin}/api/routes/nope/dead-letters")).0, 404);
}

/// `plugins`, `routes` and `stats` print a table with a header and a row
/// per plugin or route; with `--json`, the admin API's answer as one
/// document with the fields the tables are made from.
#[test]
fn operator_tables_and_their_json() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let _host = start(dir.path(), port, None);
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let published = common::sluice()
        .args(["publish", "--url", &url, "words", "hello", "--count", "3"])
        .output()
        .unwrap();
    assert!(published.status.success(), "{}", text(&published.stderr));
    wait_metric(&admin, "sluice_route_acked_total{route=\"upper\"} ", 3);
    let hash = sluice::runtime::hash(&std::fs::read(plugin_path("uppercase")).unwrap());

    let plugins = text(&sluice(&["plugins"], &admin, None).stdout);
    assert!(plugins.starts_with("PLUGIN "), "{plugins}");
    assert_eq!(cell(&plugins, "upper", "LIVE VERSION"), hash[..12]);
    let deployed = cell(&plugins, "upper", "DEPLOYED");
    assert!(
        deployed == "just now" || deployed.ends_with(" ago"),
        "{plugins}"
    );
    assert_eq!(cell(&plugins, "upper", "EARLIER"), "0");
    assert_eq!(cell(&plugins, "upper", "SHADOW"), "-");
    let plugins = json(&["plugins"], &admin);
    assert_eq!(plugins[0]["name"], "upper", "{plugins}");
    assert_eq!(plugins[0]["current"]["hash"], hash, "{plugins}");
    assert!(plugins[0]["current"]["loaded_at_ms"].is_u64(), "{plugins}");
    assert!(plugins[0]["shadow"].is_null(), "{plugins}");
    assert_eq!(plugins[0]["counters"]["calls"], 3, "{plugins}");
    assert_eq!(plugins[0]["counters"]["traps"], 0, "{plugins}");

    let routes = text(&sluice(&["routes"], &admin, None).stdout);
    assert!(routes.starts_with("ROUTE "), "{routes}");
    for (column, want) in [
        ("STATE", "running"),
        ("TOPICS", "words"),
        ("GROUP", "upper"),
        ("BACKEND", "main"),
        ("PLUGIN", "upper"),
        ("BACKLOG", "0"),
    ] {
        assert_eq!(cell(&routes, "upper", column), want, "{routes}");
    }
    let routes = json(&["routes"], &admin);
    assert_eq!(routes[0]["name"], "upper", "{routes}");
    assert_eq!(routes[0]["state"], "running", "{routes}");
    assert_eq!(routes[0]["topics"][0], "words", "{routes}");
    assert_eq!(routes[0]["backlog"], 0, "{routes}");
    assert_eq!(routes[0]["in_flight"], 0, "{routes}");
    assert!(routes[0]["last_activity_ms"].is_u64(), "{routes}");

    let stats = text(&sluice(&["stats"], &admin, None).stdout);
    let (by_route, by_plugin) = stats
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("two tables: {stats}"));
    assert!(by_route.starts_with("ROUTE "), "{stats}");
    assert_eq!(cell(by_route, "upper", "HANDLED"), "3", "{stats}");
    assert_eq!(cell(by_route, "upper", "DEAD-LETTERED"), "0", "{stats}");
    assert_eq!(cell(by_route, "upper", "IN FLIGHT"), "0", "{stats}");
    let rate: f64 = cell(by_route, "upper", "MSG/S")
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {stats}"));
    assert!(rate >= 0.0, "{stats}");
    let last = cell(by_route, "upper", "LAST ACTIVITY");
    assert!(last == "just now" || last.ends_with(" ago"), "{stats}");
    assert!(by_plugin.starts_with("PLUGIN "), "{stats}");
    assert_eq!(cell(by_plugin, "upper", "CALLS"), "3", "{stats}");
    assert_eq!(cell(by_plugin, "upper", "TIMEOUTS"), "0", "{stats}");
    let stats = json(&["stats", "--interval", "0.2"], &admin);
    assert_eq!(stats["routes"][0]["stats"]["succeeded"], 3, "{stats}");
    assert_eq!(stats["plugins"][0]["counters"]["calls"], 3, "{stats}");
    assert!(stats["handled_per_second"]["upper"].is_f64(), "{stats}");
}
