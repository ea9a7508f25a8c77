//! The backend contract on the embedded backends: consumer groups, nack
//! with delay, and (SQLite) durability across a restart.

use std::collections::HashSet;
use std::time::Duration;

use common::embedded_backends;
use sluice::Message;
use sluice::backend::{self, SubscribeOptions};
use sluice_tests::common;

fn payloads(n: usize, topic: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(topic, format!("m{i}")))
        .collect()
}

#[tokio::test]
async fn every_group_gets_every_message() {
    for (kind, backend, _dir) in embedded_backends().await {
        let a = backend
            .subscribe(SubscribeOptions::new(vec!["t".into()], "a"))
            .await
            .unwrap();
        let b = backend
            .subscribe(SubscribeOptions::new(vec!["t".into()], "b"))
            .await
            .unwrap();
        backend.publish(payloads(20, "t")).await.unwrap();
        for (name, sub) in [("a", &a), ("b", &b)] {
            let mut seen = HashSet::new();
            while seen.len() < 20 {
                let batch = sub.fetch(100, Duration::from_secs(2)).await.unwrap();
                assert!(
                    !batch.is_empty(),
                    "{kind}: group {name} stalled at {}",
                    seen.len()
                );
                for d in batch {
                    assert!(seen.insert(String::from_utf8(d.message.payload.clone()).unwrap()));
                    sub.ack(&d).await.unwrap();
                }
            }
            assert!(
                sub.fetch(10, Duration::from_millis(100))
                    .await
                    .unwrap()
                    .is_empty(),
                "{kind}"
            );
        }
    }
}

#[tokio::test]
async fn members_of_one_group_split_the_messages() {
    for (kind, backend, _dir) in embedded_backends().await {
        let one = backend
            .subscribe(SubscribeOptions::new(vec!["t".into()], "g"))
            .await
            .unwrap();
        let two = backend
            .subscribe(SubscribeOptions::new(vec!["t".into()], "g"))
            .await
            .unwrap();
        backend.publish(payloads(100, "t")).await.unwrap();
        let mut seen = HashSet::new();
        let mut counts = [0usize; 2];
        while seen.len() < 100 {
            let mut progressed = false;
            for (i, sub) in [&one, &two].into_iter().enumerate() {
                for d in sub.fetch(5, Duration::from_millis(200)).await.unwrap() {
                    let payload = String::from_utf8(d.message.payload.clone()).unwrap();
                    assert!(
                        seen.insert(payload),
                        "{kind}: a message went to two members"
                    );
                    counts[i] += 1;
                    progressed = true;
                    sub.ack(&d).await.unwrap();
                }
            }
            assert!(progressed, "{kind}: stalled at {}", seen.len());
        }
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "{kind}: both members got a share: {counts:?}"
        );
        assert_eq!(counts[0] + counts[1], 100, "{kind}");
    }
}

#[tokio::test]
async fn nack_with_delay_redelivers_later_with_a_higher_attempt() {
    for (kind, backend, _dir) in embedded_backends().await {
        let sub = backend
            .subscribe(SubscribeOptions::new(vec!["t".into()], "g"))
            .await
            .unwrap();
        backend.publish(payloads(1, "t")).await.unwrap();
        let first = sub
            .fetch(1, Duration::from_secs(2))
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(first.attempt, 1, "{kind}");
        sub.nack(&first, Duration::from_millis(300)).await.unwrap();
        let early = sub.fetch(1, Duration::from_millis(50)).await.unwrap();
        assert!(early.is_empty(), "{kind}: redelivered before its delay");
        let again = sub
            .fetch(1, Duration::from_secs(3))
            .await
            .unwrap()
            .pop()
            .expect("redelivered");
        assert_eq!(again.message.id, first.message.id, "{kind}");
        assert_eq!(again.attempt, 2, "{kind}");
        sub.ack(&again).await.unwrap();
    }
}

#[tokio::test]
async fn wildcard_subscriptions_match_topics() {
    for (kind, backend, _dir) in embedded_backends().await {
        let star = backend
            .subscribe(SubscribeOptions::new(vec!["orders.*".into()], "star"))
            .await
            .unwrap();
        let tail = backend
            .subscribe(SubscribeOptions::new(vec!["orders.>".into()], "tail"))
            .await
            .unwrap();
        backend
            .publish(vec![
                Message::new("orders.eu", "1"),
                Message::new("orders.eu.paid", "2"),
                Message::new("invoices.eu", "3"),
            ])
            .await
            .unwrap();
        assert_eq!(drain_topics(star.as_ref()).await, ["orders.eu"], "{kind}");
        assert_eq!(
            drain_topics(tail.as_ref()).await,
            ["orders.eu", "orders.eu.paid"],
            "{kind}"
        );
    }
}

#[tokio::test]
async fn memory_backend_applies_back_pressure() {
    let backend = backend::connect("memory://?capacity=10").await.unwrap();
    let sub = backend
        .subscribe(SubscribeOptions::new(vec!["t".into()], "g"))
        .await
        .unwrap();
    backend.publish(payloads(10, "t")).await.unwrap();
    let blocked = tokio::time::timeout(
        Duration::from_millis(200),
        backend.publish(payloads(1, "t")),
    )
    .await;
    assert!(blocked.is_err(), "publish waits while the group is full");
    let d = sub
        .fetch(1, Duration::from_secs(1))
        .await
        .unwrap()
        .pop()
        .unwrap();
    sub.ack(&d).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), backend.publish(payloads(1, "t")))
        .await
        .expect("publish proceeds once there is room")
        .unwrap();
}

#[tokio::test]
async fn sqlite_survives_restart_and_redelivers_unacked() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("durable.db").display()
    );
    let mut options = SubscribeOptions::new(vec!["jobs".into()], "workers");
    options.lease = Duration::from_millis(300);
    {
        let backend = backend::connect(&url).await.unwrap();
        backend.publish(payloads(10, "jobs")).await.unwrap();
        let sub = backend.subscribe(options.clone()).await.unwrap();
        let batch = sub.fetch(10, Duration::from_secs(2)).await.unwrap();
        assert_eq!(batch.len(), 10);
        for d in &batch[..4] {
            sub.ack(d).await.unwrap();
        }
        // The process "crashes": no nack, no close; six stay leased.
    }
    let backend = backend::connect(&url).await.unwrap();
    backend.publish(payloads(1, "jobs")).await.unwrap();
    let sub = backend.subscribe(options).await.unwrap();
    let mut seen = Vec::new();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.len() < 7 && tokio::time::Instant::now() < give_up {
        for d in sub.fetch(10, Duration::from_millis(200)).await.unwrap() {
            seen.push((
                String::from_utf8(d.message.payload.clone()).unwrap(),
                d.attempt,
            ));
            sub.ack(&d).await.unwrap();
        }
    }
    seen.sort();
    let mut expected: Vec<(String, u32)> = (4..10).map(|i| (format!("m{i}"), 2)).collect();
    expected.push(("m0".into(), 1)); // published after the restart
    expected.sort();
    assert_eq!(
        seen, expected,
        "the six unacked come back once their lease ran out, nothing else"
    );
}

#[tokio::test]
async fn sqlite_latest_group_skips_history_and_earliest_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("history.db").display());
    let backend = backend::connect(&url).await.unwrap();
    backend.publish(payloads(3, "t")).await.unwrap();
    let earliest = backend
        .subscribe(SubscribeOptions::new(vec!["t".into()], "old"))
        .await
        .unwrap();
    let mut options = SubscribeOptions::new(vec!["t".into()], "new");
    options.start = sluice::backend::StartFrom::Latest;
    let latest = backend.subscribe(options).await.unwrap();
    backend
        .publish(vec![Message::new("t", "fresh")])
        .await
        .unwrap();
    assert_eq!(
        earliest
            .fetch(10, Duration::from_secs(1))
            .await
            .unwrap()
            .len(),
        4
    );
    let fresh = latest.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].message.payload, b"fresh");
}

async fn drain_topics(sub: &dyn backend::Subscription) -> Vec<String> {
    let mut topics = Vec::new();
    loop {
        let batch = sub.fetch(10, Duration::from_millis(300)).await.unwrap();
        if batch.is_empty() {
            return topics;
        }
        for d in batch {
            topics.push(d.message.topic.clone());
            sub.ack(&d).await.unwrap();
        }
    }
}

// `sluice check` through the binary: config and plugin errors that say
// where the value came from and what to do, and a verdict free of log lines.

fn sluice_check(dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut command = common::sluice();
    command
        .args(["check", "sluice.toml"])
        .current_dir(dir)
        .env_remove("SLUICE_BACKEND_URL")
        .env_remove("SLUICE_LOG");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run sluice")
}

fn write_upper_config(dir: &std::path::Path, plugin: &std::path::Path) {
    let config = common::upper_config(dir, plugin, "");
    std::fs::write(dir.join("sluice.toml"), config).unwrap();
}

#[test]
fn check_says_a_missing_plugin_needs_building_and_where_it_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    write_upper_config(dir.path(), std::path::Path::new("target/upper.wasm"));
    let out = sluice_check(dir.path(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Relative to the config file, shown absolute.
    let absolute = dir.path().join("target/upper.wasm");
    assert!(err.contains("plugins.upper"), "{err}");
    assert!(
        err.contains(&format!(
            "plugin file `{}` does not exist: did you build it?",
            absolute.display()
        )),
        "{err}"
    );
}

#[test]
fn check_names_the_variable_that_set_a_bad_url() {
    let dir = tempfile::tempdir().unwrap();
    write_upper_config(dir.path(), std::path::Path::new("upper.wasm"));
    let out = sluice_check(dir.path(), &[("SLUICE_BACKEND_URL", "localhost:6379")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "sluice.toml: `backends.main.url` as set by the environment variable \
             SLUICE_BACKEND_URL: `localhost:6379` is not a URL"
        ),
        "{err}"
    );
    assert!(!err.contains("line 0"), "{err}");
}

#[test]
fn check_hints_at_the_missing_handler_macro() {
    let dir = tempfile::tempdir().unwrap();
    write_upper_config(dir.path(), &common::plugin_path("wrong_world"));
    let out = sluice_check(dir.path(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("it exports [process]"), "{err}");
    assert!(
        err.contains("did you forget `sluice_sdk::handler!`?"),
        "{err}"
    );
}

#[test]
fn check_prints_its_verdict_apart_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    write_upper_config(dir.path(), &common::plugin_path("uppercase"));
    let out = sluice_check(dir.path(), &[("SLUICE_LOG", "info")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = verdict.lines().collect();
    assert!(
        lines[0].starts_with("sluice.toml: ok (1 backend(s), 1 plugin(s), 1 route(s))"),
        "{verdict}"
    );
    for line in &lines[1..] {
        assert!(
            ["  backend main: ", "  plugin upper: ", "  route upper: "]
                .iter()
                .any(|start| line.starts_with(start)),
            "not a verdict line: {line:?} in\n{verdict}"
        );
    }
    assert!(
        verdict.contains("  route upper: words on main -> plugin upper -> main"),
        "{verdict}"
    );
    // The log is kept, written to stderr once the verdict is out.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("plugin loaded"), "{log}");
}
