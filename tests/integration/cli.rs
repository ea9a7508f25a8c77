//! The `sluice` binary as an operator uses it: check, publish, run, tail.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{cell, plugin_path};
use sluice_tests::common;

fn sluice(args: &[&str]) -> Output {
    common::sluice()
        .args(args)
        .env("SLUICE_LOG", "warn")
        .env_remove("SLUICE_BACKEND_URL")
        .output()
        .expect("run sluice")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn write_config(dir: &Path, body: &str) -> String {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

fn pipeline_config(dir: &Path, plugin: &str) -> String {
    common::upper_config(dir, Path::new(plugin), "")
}

#[test]
fn check_names_the_unknown_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string())
        .replace("plugin = \"upper\"\n", "plugin = \"upper\"\nretries = 3\n");
    let out = sluice(&["check", &write_config(dir.path(), &body)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown field `retries`"), "{err}");
    assert!(err.contains("line 16"), "{err}");
}

#[test]
fn check_names_a_dangling_reference() {
    let dir = tempfile::tempdir().unwrap();
    let body = pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string())
        .replace("plugin = \"upper\"\n", "plugin = \"lower\"\n");
    let out = sluice(&["check", &write_config(dir.path(), &body)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("routes[0].plugin"), "{err}");
    assert!(err.contains("line 15"), "{err}");
}

/// `sluice check` says which world each plugin implements, the
/// `wasi:messaging` draft's included, and takes `reject_on`.
#[test]
fn check_names_the_world_of_a_wasi_messaging_component() {
    let dir = tempfile::tempdir().unwrap();
    let body = pipeline_config(
        dir.path(),
        &plugin_path("wasi_messaging").display().to_string(),
    )
    .replace(
        "publish_to = [\"shouted\"]\n",
        "publish_to = [\"shouted\"]\nreject_on = [\"permission-denied\"]\n",
    );
    let out = sluice(&["check", &write_config(dir.path(), &body)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "plugin upper: implements wasi:messaging/messaging-request-reply@0.2.0-draft"
        ),
        "{text}"
    );

    let body = body.replace("\"permission-denied\"", "\"forbidden\"");
    let out = sluice(&["check", &write_config(dir.path(), &body)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("reject_on") || err.contains("unknown variant"),
        "{err}"
    );
}

#[test]
fn check_refuses_a_component_of_another_world() {
    let dir = tempfile::tempdir().unwrap();
    let body = pipeline_config(
        dir.path(),
        &plugin_path("wrong_world").display().to_string(),
    );
    let out = sluice(&["check", &write_config(dir.path(), &body)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("plugins.upper"), "{err}");
    assert!(
        err.contains("does not implement the `sluice:plugin/handler@0.2.0` world"),
        "{err}"
    );
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let body = pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string());
    let out = sluice(&["check", &write_config(dir.path(), &body)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("implements sluice:plugin/batch-handler@0.2.0"));
}

#[test]
fn run_processes_then_drains_on_sigterm_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string()),
    );
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let published = sluice(&["publish", "--url", &url, "words", "hello", "--count", "50"]);
    assert!(published.status.success(), "{}", stderr(&published));

    let mut run = common::sluice()
        .args(["run", &config])
        .env("SLUICE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the outputs are there, then ask it to stop.
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let tail = sluice(&["tail", "--url", &url, "shouted", "--json", "--limit", "50"]);
        if stdout(&tail).lines().count() == 50 {
            break;
        }
        assert!(Instant::now() < give_up, "outputs did not appear");
        std::thread::sleep(Duration::from_millis(200));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let give_up = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < give_up, "did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = run.wait_with_output().unwrap();
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        stderr(&output)
    );
    let summary = stdout(&output);
    assert!(
        summary.contains("route upper: received 50, succeeded 50"),
        "{summary}"
    );

    let tail = sluice(&["tail", "--url", &url, "shouted", "--json"]);
    let lines: Vec<serde_json::Value> = stdout(&tail)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        50,
        "a throw-away tail group reads everything again"
    );
    assert!(
        lines
            .iter()
            .all(|m| m["payload"] == "HELLO" && m["topic"] == "shouted")
    );
}

#[test]
fn environment_moves_the_same_config_to_another_backend() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string()),
    );
    let other = dir.path().join("other.db");
    let other_url = format!("sqlite://{}", other.display());
    let published = sluice(&["publish", "--url", &other_url, "words", "moved"]);
    assert!(published.status.success(), "{}", stderr(&published));
    let out = common::sluice()
        .args(["run", &config, "--exit-when-idle", "1"])
        .env("SLUICE_LOG", "warn")
        .env("SLUICE_BACKEND_MAIN_URL", &other_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("succeeded 1"), "{}", stdout(&out));
    assert!(
        !dir.path().join("sluice.db").exists(),
        "the file in the config was not used"
    );
    let tail = sluice(&["tail", "--url", &other_url, "shouted"]);
    assert!(
        stdout(&tail).contains("[shouted] MOVED"),
        "{}",
        stdout(&tail)
    );
}

/// A route with `output_backend` reads its input from one backend and
/// publishes to another (here SQLite to a file log): the outputs are on the
/// output backend only, and the input is settled where it came from.
#[test]
fn outputs_go_to_the_output_backend_and_inputs_are_settled_at_home() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_path("uppercase");
    let out_url = format!("file://{}", dir.path().join("out-log").display());
    let body = common::upper_config(dir.path(), &plugin, "").replace(
        "plugin = \"upper\"\n",
        "plugin = \"upper\"\nbackend = \"main\"\noutput_backend = \"out\"\n",
    ) + &format!("\n[backends.out]\nurl = \"{out_url}\"\n");
    let config = write_config(dir.path(), &body);
    let in_url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let published = sluice(&["publish", "--url", &in_url, "words", "crossed"]);
    assert!(published.status.success(), "{}", stderr(&published));
    for _ in 0..2 {
        let run = common::sluice()
            .args(["run", &config, "--exit-when-idle", "1"])
            .env("SLUICE_LOG", "warn")
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", stderr(&run));
    }
    let on_output = stdout(&sluice(&["tail", "--url", &out_url, "shouted"]));
    assert_eq!(
        on_output.matches("[shouted] CROSSED").count(),
        1,
        "handled once, its output on the output backend: {on_output}"
    );
    let at_home = stdout(&sluice(&["tail", "--url", &in_url, "shouted"]));
    assert!(!at_home.contains("CROSSED"), "{at_home}");
}

/// SIGTERM waits for in-flight messages only as long as the grace period;
/// a message cut off there is not lost: it comes back after its lease.
#[test]
fn shutdown_grace_period_cuts_a_slow_message_which_then_returns() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let config = write_config(
        dir.path(),
        &format!(
            r#"[backends.main]
url = "{url}"

[plugins.slow]
path = "{plugin}"
config = {{ output = "done" }}
publish_to = ["done"]
timeout_ms = 5000

[runtime]
cache_dir = "{cache}"
shutdown_grace_ms = 300

[[routes]]
name = "slow"
topics = ["jobs"]
plugin = "slow"
lease_ms = 6000
"#,
            plugin = plugin_path("chaos").display(),
            cache = dir.path().join("cache").display(),
        ),
    );
    assert!(
        sluice(&["publish", "--url", &url, "jobs", "sleep:2000"])
            .status
            .success()
    );

    let mut run = common::sluice()
        .args(["run", &config])
        .env("SLUICE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = run.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(log));
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("route subscribed"))),
        "sluice run did not start"
    );
    // Let the fetcher hand the message to the plugin, then stop mid-call.
    std::thread::sleep(Duration::from_millis(700));
    let pid = run.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = run.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "a stop that cut work off must say so"
    );
    let nothing = sluice(&["tail", "--url", &url, "done"]);
    assert!(
        !stdout(&nothing).contains("sleep:2000"),
        "the cut-off call was not finished"
    );

    let second = common::sluice()
        .args(["run", &config, "--exit-when-idle", "8"])
        .env("SLUICE_LOG", "warn")
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", stderr(&second));
    let done = sluice(&["tail", "--url", &url, "done", "--json"]);
    let outputs: Vec<serde_json::Value> = stdout(&done)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    let attempt = outputs[0]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "attempt")
        .map(|h| h[1].clone());
    assert_eq!(
        attempt,
        Some(serde_json::json!("2")),
        "redelivered after its lease"
    );
}

/// A broken file dropped over a running plugin is refused; after a crash
/// the host starts from the last good version it ran, says so, and the
/// route runs on instead of the host exiting at start.
#[test]
fn a_refused_file_never_takes_the_route_down() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("upper.wasm");
    std::fs::copy(plugin_path("uppercase"), &plugin).unwrap();
    let config = write_config(
        dir.path(),
        &pipeline_config(dir.path(), &plugin.display().to_string()),
    );
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());

    let mut run = common::sluice()
        .args(["run", &config])
        .env("SLUICE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = run.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(log));
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("watching for new plugin versions"))),
        "sluice run did not start watching its plugin"
    );
    std::fs::write(&plugin, b"\0asm broken beyond repair").unwrap();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("refused"))),
        "the broken file was not refused"
    );
    run.kill().unwrap();
    run.wait().unwrap();

    assert!(
        sluice(&["publish", "--url", &url, "words", "after the crash"])
            .status
            .success()
    );
    let second = common::sluice()
        .args(["run", &config, "--exit-when-idle", "3"])
        .env("SLUICE_LOG", "warn")
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("running the last good version"),
        "{}",
        stderr(&second)
    );
    let shouted = sluice(&["tail", "--url", &url, "shouted"]);
    assert!(
        stdout(&shouted).contains("AFTER THE CRASH"),
        "{}",
        stdout(&shouted)
    );
    // Checking the config still reports the broken file.
    let check = sluice(&["check", &config]);
    assert!(!check.status.success());
    assert!(
        stderr(&check).contains("plugins.upper"),
        "{}",
        stderr(&check)
    );
}

/// A stored message that cannot be decoded is dead-lettered with its raw
/// bytes, the messages beside it are handled, and a run that exits when
/// idle says so in its exit code.
#[test]
fn a_poison_row_is_dead_lettered_raw_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string()),
    );
    let db = dir.path().join("sluice.db");
    let url = format!("sqlite://{}", db.display());
    for word in ["first", "poison", "last"] {
        assert!(
            sluice(&["publish", "--url", &url, "words", word])
                .status
                .success()
        );
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let changed =
            sqlx::query("UPDATE sluice_messages SET headers = '{not json' WHERE payload = ?1")
                .bind(b"poison".as_slice())
                .execute(&pool)
                .await
                .unwrap();
        assert_eq!(changed.rows_affected(), 1);
        pool.close().await;
    });

    let run = common::sluice()
        .args(["run", &config, "--exit-when-idle", "2"])
        .env("SLUICE_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("could not be decoded"),
        "{}",
        stderr(&run)
    );
    let shouted = stdout(&sluice(&["tail", "--url", &url, "shouted"]));
    assert!(
        shouted.contains("FIRST") && shouted.contains("LAST"),
        "{shouted}"
    );
    assert!(!shouted.contains("POISON"), "{shouted}");
    let letters = stdout(&sluice(&[
        "tail",
        "--url",
        &url,
        "upper.dead-letter",
        "--json",
    ]));
    assert!(letters.contains("undecodable"), "{letters}");
    assert!(
        letters.contains("poison"),
        "the raw bytes are kept: {letters}"
    );
}

/// The config the Kubernetes manifest ships is one `sluice check` accepts,
/// with its plugin path and backend URL filled in as the pod would.
#[test]
fn the_kubernetes_manifests_config_passes_check() {
    let manifest =
        std::fs::read_to_string(common::repo_root().join("deploy/kubernetes.yaml")).unwrap();
    let start = manifest
        .find("  sluice.toml: |\n")
        .expect("the ConfigMap's sluice.toml")
        + 17;
    let config: String = manifest[start..]
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    assert!(config.contains("[admin]"), "{config}");
    let dir = tempfile::tempdir().unwrap();
    let config = config
        .replace(
            "/opt/plugins/orders.wasm",
            &plugin_path("uppercase").display().to_string(),
        )
        .replace(
            "/var/lib/sluice/cache",
            &dir.path().join("cache").display().to_string(),
        );
    let path = write_config(dir.path(), &config);
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let out = common::sluice()
        .args(["check", &path])
        .env("BACKEND_URL", &url)
        .env("SLUICE_ADMIN_TOKEN", "t")
        .env_remove("SLUICE_BACKEND_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{config}", stderr(&out));
}

/// `sluice request` prints the reply a running host's route gives; when
/// nothing answers, it says so and exits 1.
#[test]
fn sluice_request_prints_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("sluice.db").display()
    );
    write_config(
        dir.path(),
        &format!(
            r#"[backends.main]
url = "{url}"

[plugins.rpc]
path = "{plugin}"
config = {{ role = "answer" }}
publish_to = ["sluice-reply.>"]

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "answer"
topics = ["questions"]
plugin = "rpc"
"#,
            plugin = plugin_path("rpc").display(),
            cache = dir.path().join("cache").display(),
        ),
    );
    let _host = common::run_host(dir.path());
    let request = |topic: &str, timeout_ms: &str| {
        common::sluice()
            .args(["request", "--url", &url, topic, "hello there"])
            .args(["--timeout-ms", timeout_ms])
            .env("SLUICE_LOG", "warn")
            .output()
            .unwrap()
    };
    // The host may still be starting: its route reads the request once up.
    let out = request("questions", "30000");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "HELLO THERE\n");
    let out = request("nobody", "300");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("timeout: no reply to `nobody` within 300ms"),
        "{}",
        stderr(&out)
    );
}

/// The three steps of the migration guide are configs `sluice check`
/// accepts, and it shows where each route's outputs go.
#[test]
fn the_migration_guides_configs_pass_check() {
    plugin_path("uppercase");
    let dir = common::repo_root().join("examples/migration");
    let mut steps: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    steps.sort();
    assert_eq!(steps.len(), 3, "{steps:?}");
    let mut said = String::new();
    for step in &steps {
        let out = common::sluice()
            .args(["check", step.to_str().unwrap()])
            .env_remove("SLUICE_BACKEND_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", step.display(), stderr(&out));
        said += &String::from_utf8_lossy(&out.stdout);
    }
    assert!(said.contains("-> nats and sqs;"), "{said}");
    assert!(said.contains("on nats -> forward -> sqs;"), "{said}");
}

/// `sluice tail --json` prints what `sluice publish --lines --json` reads:
/// key, headers and payload (binary too) come through byte for byte.
#[test]
fn a_tail_publishes_back_byte_for_byte() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let publish = |topic: &str, lines: &str| {
        let mut child = common::sluice()
            .args(["publish", "--url", &url, topic, "--lines", "--json"])
            .env("SLUICE_LOG", "warn")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let tail = |topic: &str| -> Vec<serde_json::Value> {
        let out = sluice(&["tail", "--url", &url, topic, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Bytes that are not UTF-8, a key, and repeated and awkward headers.
    let original = [
        r#"{"key":"k1","headers":[["a","1"],["a","2 \"q\"\n"],["empty",""]],"payload_base64":"AJ+SlhD/Cg=="}"#,
        r#"{"key":null,"headers":[],"payload":"plain ✓"}"#,
    ];
    publish("first", &original.join("\n"));
    let first = tail("first");
    assert_eq!(first.len(), 2, "{first:?}");
    let printed: Vec<String> = first.iter().map(|v| v.to_string()).collect();
    publish("second", &printed.join("\n"));
    let second = tail("second");
    for ((want, once), twice) in original.iter().zip(&first).zip(&second) {
        let want: serde_json::Value = serde_json::from_str(want).unwrap();
        for got in [once, twice] {
            for field in ["key", "headers", "payload", "payload_base64"] {
                assert_eq!(got.get(field), want.get(field), "{field}: {got}");
            }
        }
        assert_eq!(twice["topic"], "second");
        assert_ne!(twice["id"], once["id"], "a publish is a new message");
    }
}

/// `sluice dlq`: list and show leave dead letters in place; purge drops
/// those its filter takes, and asks first unless told not to.
#[test]
fn dlq_lists_shows_and_purges_a_routes_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sluice.db");
    let url = format!("sqlite://{}", db.display());
    let config = write_config(
        dir.path(),
        &format!(
            r#"[backends.main]
url = "{url}"

[plugins.chaos]
path = "{plugin}"

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "fails"
topics = ["in"]
plugin = "chaos"
retry = {{ max_attempts = 1 }}
"#,
            plugin = plugin_path("chaos").display(),
            cache = dir.path().join("cache").display(),
        ),
    );
    for payload in ["reject", "reject", "retry"] {
        assert!(
            sluice(&["publish", "--url", &url, "in", payload])
                .status
                .success()
        );
    }
    let run = sluice(&["run", &config, "--exit-when-idle", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));

    for _ in 0..2 {
        let list = sluice(&["dlq", "list", "-c", &config]);
        assert!(list.status.success(), "{}", stderr(&list));
        let list = stdout(&list);
        assert!(list.starts_with("ROUTE "), "{list}");
        assert_eq!(cell(&list, "fails", "TOPIC"), "fails.dead-letter");
        assert_eq!(cell(&list, "fails", "COUNT"), "3");
        let oldest = cell(&list, "fails", "OLDEST");
        assert!(oldest == "just now" || oldest.ends_with(" ago"), "{list}");
        assert_eq!(
            cell(&list, "fails", "CAUSES"),
            "attempts-exhausted 1, rejected 2"
        );
    }
    let show = sluice(&[
        "dlq",
        "show",
        "-c",
        &config,
        "--cause",
        "attempts-exhausted",
    ]);
    let shown = stdout(&show);
    assert!(shown.starts_with("ROUTE "), "{shown}");
    assert_eq!(cell(&shown, "fails", "CAUSE"), "attempts-exhausted");
    assert_eq!(cell(&shown, "fails", "ATTEMPTS"), "1");
    assert_eq!(cell(&shown, "fails", "FROM"), "in");
    assert!(
        cell(&shown, "fails", "REASON").starts_with("asked to retry"),
        "{shown}"
    );
    assert_eq!(cell(&shown, "fails", "PAYLOAD"), "\"retry\"");
    assert!(!shown.contains("rejected"), "{shown}");
    let json = sluice(&["dlq", "show", "-c", &config, "--json"]);
    assert_eq!(stdout(&json).lines().count(), 3, "{}", stdout(&json));

    let unasked = sluice(&["dlq", "purge", "-c", &config, "--cause", "rejected"]);
    assert!(!unasked.status.success());
    assert!(stderr(&unasked).contains("--yes"), "{}", stderr(&unasked));
    let purged = sluice(&[
        "dlq", "purge", "-c", &config, "--cause", "rejected", "--yes",
    ]);
    assert!(purged.status.success(), "{}", stderr(&purged));
    assert!(
        stdout(&purged).contains("purged 2 dead letter(s)"),
        "{}",
        stdout(&purged)
    );
    let list = stdout(&sluice(&["dlq", "list", "-c", &config]));
    assert_eq!(cell(&list, "fails", "COUNT"), "1");
    assert_eq!(cell(&list, "fails", "CAUSES"), "attempts-exhausted 1");
    let json = stdout(&sluice(&["dlq", "list", "-c", &config, "--json"]));
    let summaries: serde_json::Value = serde_json::from_str(&json).expect("one JSON document");
    assert_eq!(summaries[0]["route"], "fails", "{json}");
    assert_eq!(summaries[0]["topic"], "fails.dead-letter", "{json}");
    assert_eq!(summaries[0]["count"], 1, "{json}");
    assert_eq!(summaries[0]["causes"]["attempts-exhausted"], 1, "{json}");
    assert!(summaries[0]["oldest_ms"].is_u64(), "{json}");

    let wrong = sluice(&["dlq", "list", "-c", &config, "--route", "nope"]);
    assert!(
        stderr(&wrong).contains("no route named `nope`"),
        "{}",
        stderr(&wrong)
    );
}

/// `sluice dlq redrive`: once the plugin is fixed, dead letters go back
/// through the route that failed them, under their original topic, with
/// key and headers kept and their history; another route on the same
/// topic sees none of it.
#[test]
fn dlq_redrive_sends_dead_letters_back_through_their_route_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let body = |plugin: &str| {
        format!(
            r#"[backends.main]
url = "{url}"

[plugins.p]
path = "{plugin}"
publish_to = ["out", "in.upper"]

[plugins.other]
path = "{echo}"
config = {{ output = "other-out" }}
publish_to = ["other-out"]

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "fails"
topics = ["in"]
plugin = "p"
retry = {{ max_attempts = 1 }}
redrive = true

[[routes]]
name = "other"
topics = ["in"]
plugin = "other"
"#,
            echo = plugin_path("echo").display(),
            cache = dir.path().join("cache").display(),
        )
    };
    let config = write_config(
        dir.path(),
        &body(&plugin_path("chaos").display().to_string()),
    );
    for _ in 0..2 {
        let published = sluice(&[
            "publish", "--url", &url, "in", "reject", "--key", "k", "--header", "h=1",
        ]);
        assert!(published.status.success(), "{}", stderr(&published));
    }
    let run = sluice(&["run", &config, "--exit-when-idle", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));

    let dry = sluice(&[
        "dlq",
        "redrive",
        "-c",
        &config,
        "--route",
        "fails",
        "--dry-run",
    ]);
    assert!(
        stdout(&dry).contains("would redrive 2 dead letter(s)"),
        "{}",
        stdout(&dry)
    );
    let not_redriven = sluice(&["dlq", "redrive", "-c", &config, "--route", "other"]);
    assert!(!not_redriven.status.success());
    assert!(
        stderr(&not_redriven).contains("redrive = true"),
        "{}",
        stderr(&not_redriven)
    );

    // The fix: uppercase writes to `<input topic>.upper`.
    write_config(
        dir.path(),
        &body(&plugin_path("uppercase").display().to_string()),
    );
    let redrive = sluice(&[
        "dlq", "redrive", "-c", &config, "--route", "fails", "--rate", "100",
    ]);
    assert!(redrive.status.success(), "{}", stderr(&redrive));
    assert!(
        stdout(&redrive).contains("redriven 2 dead letter(s)"),
        "{}",
        stdout(&redrive)
    );
    let list = stdout(&sluice(&["dlq", "list", "-c", &config, "--route", "fails"]));
    assert_eq!(cell(&list, "fails", "COUNT"), "0");
    let run = sluice(&["run", &config, "--exit-when-idle", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));

    let tail = |topic: &str| -> Vec<serde_json::Value> {
        stdout(&sluice(&["tail", "--url", &url, topic, "--json"]))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let header = |message: &serde_json::Value, name: &str| {
        message["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_string())
    };
    // What went back: new messages with key, headers and history.
    let sent = tail("fails.redrive");
    assert_eq!(sent.len(), 2, "{sent:?}");
    for message in &sent {
        assert_eq!(message["key"], "k");
        assert_eq!(header(message, "h").as_deref(), Some("1"));
        let history = header(message, "sluice-redrive-history").unwrap();
        assert!(history.contains("\"cause\":\"rejected\""), "{history}");
        assert_eq!(header(message, "sluice-dead-letter-cause"), None);
    }
    // What the fixed plugin made of them, under their original topic.
    let fixed = tail("in.upper");
    assert_eq!(fixed.len(), 2, "{fixed:?}");
    for message in &fixed {
        assert_eq!(message["payload"], "REJECT");
        assert_eq!(message["key"], "k");
        assert_eq!(header(message, "h").as_deref(), Some("1"));
    }
    assert_eq!(
        tail("other-out").len(),
        2,
        "the other route saw only the originals"
    );
}

/// A redrive killed with SIGKILL part way loses nothing: run again once
/// what it held is free, every dead letter has gone back to the route at
/// least once, and none is left.
#[test]
fn a_redrive_killed_part_way_loses_nothing() {
    const COUNT: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let config = write_config(
        dir.path(),
        &format!(
            r#"[backends.main]
url = "{url}"

[plugins.p]
path = "{chaos}"

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "fails"
topics = ["in"]
plugin = "p"
concurrency = 4
retry = {{ max_attempts = 1 }}
redrive = true
"#,
            chaos = plugin_path("chaos").display(),
            cache = dir.path().join("cache").display(),
        ),
    );
    let count = COUNT.to_string();
    let published = sluice(&["publish", "--url", &url, "in", "reject", "--count", &count]);
    assert!(published.status.success(), "{}", stderr(&published));
    let originals: std::collections::HashSet<String> =
        stdout(&sluice(&["tail", "--url", &url, "in", "--json"]))
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
            .collect();
    assert_eq!(originals.len(), COUNT);
    let run = sluice(&["run", &config, "--exit-when-idle", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));

    let mut redrive = common::sluice()
        .args(["dlq", "redrive", "-c", &config, "--rate", "1000"])
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    redrive.kill().unwrap();
    redrive.wait().unwrap();
    // What the killed run held comes back after its lease.
    std::thread::sleep(sluice::dlq::TAKE_LEASE + Duration::from_secs(1));
    let redriven = || -> Vec<serde_json::Value> {
        stdout(&sluice(&["tail", "--url", &url, "fails.redrive", "--json"]))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    eprintln!("redriven before the kill: {}", redriven().len());

    let again = sluice(&["dlq", "redrive", "-c", &config]);
    assert!(again.status.success(), "{}", stderr(&again));
    let after = redriven();
    let back: std::collections::HashSet<String> = after
        .iter()
        .map(|m| {
            let headers = m["headers"].as_array().unwrap();
            let history = headers
                .iter()
                .find(|h| h[0] == "sluice-redrive-history")
                .unwrap()[1]
                .as_str()
                .unwrap();
            let history: serde_json::Value = serde_json::from_str(history).unwrap();
            history[0]["id"].to_string()
        })
        .collect();
    assert_eq!(back.len(), COUNT, "every dead letter went back");
    assert_eq!(back, originals);
    let list = stdout(&sluice(&["dlq", "list", "-c", &config]));
    assert_eq!(cell(&list, "fails", "COUNT"), "0", "none is left");
}

/// `sluice replay` sends a route's stored messages from a time on back
/// through it; it says why where it cannot.
#[test]
fn replay_handles_stored_messages_again_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let body = |url: &str, redrive: bool| {
        format!(
            r#"[backends.main]
url = "{url}"

[plugins.upper]
path = "{plugin}"
config = {{ output = "shouted" }}
publish_to = ["shouted"]

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "upper"
topics = ["words"]
plugin = "upper"
redrive = {redrive}
"#,
            plugin = plugin_path("uppercase").display(),
            cache = dir.path().join("cache").display(),
        )
    };
    let config = write_config(dir.path(), &body(&url, true));
    for word in ["one", "two"] {
        assert!(
            sluice(&["publish", "--url", &url, "words", word])
                .status
                .success()
        );
    }
    let run = sluice(&["run", &config, "--exit-when-idle", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let replay = sluice(&["replay", "-c", &config, "--route", "upper", "--from", "1h"]);
    assert!(replay.status.success(), "{}", stderr(&replay));
    assert!(
        stdout(&replay).contains("replayed 2 message(s)"),
        "{}",
        stdout(&replay)
    );
    let run = sluice(&["run", &config, "--exit-when-idle", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let shouted = stdout(&sluice(&["tail", "--url", &url, "shouted"]));
    assert_eq!(shouted.matches("[shouted] ONE").count(), 2, "{shouted}");
    assert_eq!(shouted.matches("[shouted] TWO").count(), 2, "{shouted}");
    let none = sluice(&[
        "replay", "-c", &config, "--route", "upper", "--from", "1h", "--to", "1",
    ]);
    assert!(
        stdout(&none).contains("replayed 0 message(s)"),
        "{}",
        stdout(&none)
    );

    let off = write_config(dir.path(), &body(&url, false));
    let refused = sluice(&["replay", "-c", &off, "--route", "upper", "--from", "1h"]);
    assert!(
        stderr(&refused).contains("redrive = true"),
        "{}",
        stderr(&refused)
    );
    let memory = write_config(dir.path(), &body("memory://", true));
    let refused = sluice(&["replay", "-c", &memory, "--route", "upper", "--from", "1h"]);
    assert!(
        stderr(&refused).contains("keeps no history"),
        "{}",
        stderr(&refused)
    );
    let bad = sluice(&[
        "replay", "-c", &memory, "--route", "upper", "--from", "soon",
    ]);
    assert!(stderr(&bad).contains("neither an age"), "{}", stderr(&bad));
}

/// `sluice check` refuses a route whose dead letters would go where
/// nothing keeps them, naming the key to set.
#[test]
fn check_refuses_dead_letters_that_nothing_would_keep() {
    let dir = tempfile::tempdir().unwrap();
    let body = pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string());
    // The same config with its one backend on NATS core.
    let rest = &body[body.find("\n\n").unwrap()..];
    let nats = format!("[backends.main]\nurl = \"nats://127.0.0.1:4222\"{rest}");
    let out = sluice(&["check", &write_config(dir.path(), &nats)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "routes[0].dead_letter_backend: route `upper` would send its dead letters to \
             backend `main` (nats://)"
        ),
        "{}",
        stderr(&out)
    );
    // Sent to a backend that keeps them, the same route passes.
    let kept = nats.replace(
        "plugin = \"upper\"\n",
        "plugin = \"upper\"\nbackend = \"main\"\ndead_letter_backend = \"kept\"\n",
    ) + &format!(
        "\n[backends.kept]\nurl = \"sqlite://{}\"\n",
        dir.path().join("kept.db").display()
    );
    let out = sluice(&["check", &write_config(dir.path(), &kept)]);
    assert!(out.status.success(), "{}\n{kept}", stderr(&out));
    let out = sluice(&["check", &write_config(dir.path(), &body)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `run` and `check` read `./sluice.toml` when given no file, and
/// `completions` prints a script the shell can load.
#[test]
fn a_default_config_file_and_shell_completions() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string()),
    );
    let out = common::sluice()
        .arg("check")
        .current_dir(dir.path())
        .env("SLUICE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("sluice.toml: ok"),
        "{}",
        stdout(&out)
    );
    let empty = tempfile::tempdir().unwrap();
    let out = common::sluice()
        .arg("run")
        .current_dir(empty.path())
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("cannot read config `sluice.toml`"),
        "{}",
        stderr(&out)
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = sluice(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        assert!(stdout(&out).contains("dlq"), "{shell}");
    }
    let script = dir.path().join("sluice.bash");
    std::fs::write(&script, stdout(&sluice(&["completions", "bash"]))).unwrap();
    let loaded = Command::new("bash")
        .args([
            "-c",
            &format!("source {} && complete -p sluice", script.display()),
        ])
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", stderr(&loaded));
}

/// `--version` names the plugin world, read from the WIT file, the
/// `wasi:messaging` draft it also runs, and the backends this build has.
#[test]
fn version_names_the_world_and_the_backends() {
    let wit = std::fs::read_to_string(common::repo_root().join("wit/sluice.wit")).unwrap();
    let world = wit
        .lines()
        .find_map(|l| l.strip_prefix("package "))
        .unwrap()
        .trim_end_matches(';');
    let out = sluice(&["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let version = stdout(&out);
    assert!(
        version.starts_with(&format!("sluice {}\n", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(
        version.contains(&format!("plugin world: {world}\n")),
        "{version}"
    );
    assert!(
        version.contains("also runs: wasi:messaging@0.2.0-draft"),
        "{version}"
    );
    let backends = version
        .lines()
        .find_map(|l| l.strip_prefix("backends: "))
        .unwrap_or_else(|| panic!("{version}"));
    let backends: Vec<&str> = backends.split(", ").collect();
    for embedded in ["memory", "sqlite", "file"] {
        assert!(backends.contains(&embedded), "{version}");
    }
    let short = stdout(&sluice(&["-V"]));
    assert_eq!(short.lines().count(), 1, "{short}");
}

/// The commands `sluice ARGS --help` lists, but `help`.
fn subcommands(args: &[&str]) -> Vec<String> {
    let help = stdout(&sluice(&[args, &["--help"]].concat()));
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every command's help ends with an example of its use.
#[test]
fn every_command_shows_an_example() {
    let commands = subcommands(&[]);
    for expected in ["run", "check", "dev", "dlq", "plugins"] {
        assert!(commands.iter().any(|c| c == expected), "{commands:?}");
    }
    let mut checked = 0;
    for command in &commands {
        let mut paths = vec![vec![command.as_str()]];
        let nested = subcommands(&[command.as_str()]);
        paths.extend(nested.iter().map(|n| vec![command.as_str(), n.as_str()]));
        for path in paths {
            let help = stdout(&sluice(&[&path[..], &["--help"]].concat()));
            assert!(
                help.contains("Example"),
                "`sluice {} --help` shows no example:\n{help}",
                path.join(" ")
            );
            assert!(
                help.contains(&format!("sluice {}", path.join(" "))),
                "`sluice {} --help`'s example does not use it:\n{help}",
                path.join(" ")
            );
            checked += 1;
        }
    }
    assert!(checked > commands.len(), "no nested commands were checked");
}

/// `check --connect` reaches every backend and says where Sluice's state
/// stands there, without making any of it: no SQLite file, no PostgreSQL
/// schema. A backend that cannot be reached fails the check, by name.
#[cfg(feature = "postgres")]
#[test]
fn check_connect_reaches_every_backend_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let schema = format!("check_{}", std::process::id());
    let pg = format!("postgres://postgres@127.0.0.1/test?schema={schema}");
    let body =
        pipeline_config(dir.path(), &plugin_path("uppercase").display().to_string()).replace(
            "plugin = \"upper\"\n",
            "plugin = \"upper\"\nbackend = \"main\"\n",
        ) + &format!("\n[backends.pg]\nurl = \"{pg}\"\n");
    let config = write_config(dir.path(), &body);
    let schema_exists = || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1/test")
                .await
                .unwrap();
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = $1)",
            )
            .bind(&schema)
            .fetch_one(&mut conn)
            .await
            .unwrap()
        })
    };

    let out = sluice(&["check", "--connect", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains("connect main: ok:") && said.contains("sluice.db` does not exist yet"),
        "{said}"
    );
    assert!(
        said.contains("connect pg: ok: PostgreSQL ")
            && said.contains(&format!("schema `{schema}` does not exist yet")),
        "{said}"
    );
    assert!(
        !dir.path().join("sluice.db").exists(),
        "check made the database"
    );
    assert!(!schema_exists(), "check made the schema");

    // Once something has connected for real, the schema is up to date.
    let out = sluice(&["publish", "--url", &pg, "words", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sluice(&["check", "--connect", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("schema `{schema}` at version ")),
        "{}",
        stdout(&out)
    );

    // Nothing listens on port 1.
    let gone = body + "\n[backends.gone]\nurl = \"redis://127.0.0.1:1\"\n";
    let out = sluice(&["check", "--connect", &write_config(dir.path(), &gone)]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("connect gone: failed: "),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("connect pg: ok: "),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("cannot reach backend(s) gone"),
        "{}",
        stderr(&out)
    );

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1/test")
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&mut conn)
            .await
            .unwrap();
    });
}
