//! Hot reload under load: a steady stream of messages while the plugin file
//! is replaced ten times (once with a broken file). Every message is handled
//! exactly once, by the version current at its time.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Collector, Running, plugin_path, quick_retry, route};
use sluice::Message;
use sluice::deploy::Deployer;
use sluice::message::headers;
use sluice::router::WasmHandler;
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
        .await;
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
