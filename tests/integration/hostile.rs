//! A plugin cannot hurt the host: the `hostile` plugin attacks it from a
//! route while a healthy route runs beside it, and each attack ends with
//! the host alive, the healthy route served, the attacking message failed
//! with the right cause, and nothing forged in the log.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use sluice::Message;
use sluice::backend::Backend;
use sluice::message::headers;
use sluice::runtime::{Outcome, PluginSettings, Runtime};
use sluice_tests::common;

const LIMIT: Duration = Duration::from_secs(20);

/// The tests here measure the host's memory, its log and a route's
/// throughput, so each runs in a process of its own, one at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Everything the host logs in this process, as text.
fn captured_log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(sink.clone()))
            .init();
        log
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hostile_settings(output: &str) -> PluginSettings {
    let mut settings = settings("hostile", &[("output", output)]);
    settings.publish_to = vec![output.into()];
    // Long enough that the limits under test, not the deadline, stop a
    // call, even in a debug build of the host.
    settings.timeout = Duration::from_secs(10);
    settings.memory_limit = 64 << 20;
    settings
}

/// The attack `payload` goes to a route of the hostile plugin while a
/// healthy route of the same plugin handles 50 ordinary messages beside
/// it; returns the attacking message's dead letter, once every healthy
/// message came through.
async fn attack(backend: &Arc<dyn Backend>, settings: PluginSettings, payload: &str) -> Message {
    let runtime = runtime();
    let ns = uuid::Uuid::now_v7().simple().to_string();
    let (attacked, healthy) = (format!("{ns}.attacked"), format!("{ns}.healthy"));
    let letters = Collector::start(backend, &[&format!("{attacked}.dead-letter")]).await;
    let served = Collector::start(backend, &[&format!("{ns}.served")]).await;
    let attacker = Running::start(route(
        &attacked,
        backend,
        &format!("{ns}.in"),
        load(&runtime, "hostile", settings),
        quick_retry(2),
    ))
    .await;
    let good = Running::start(route(
        &healthy,
        backend,
        &format!("{ns}.work"),
        load(
            &runtime,
            "hostile",
            hostile_settings(&format!("{ns}.served")),
        ),
        quick_retry(2),
    ))
    .await;
    backend
        .publish(vec![Message::new(format!("{ns}.in"), payload)])
        .await
        .unwrap();
    backend
        .publish(
            (0..50)
                .map(|i| Message::new(format!("{ns}.work"), format!("ok {i}")))
                .collect(),
        )
        .await
        .unwrap();
    let letter = letters.wait_for(1, LIMIT).await.unwrap().remove(0);
    served.wait_for(50, LIMIT).await.unwrap();
    attacker.stop().await;
    good.stop().await;
    letter
}

fn header<'a>(message: &'a Message, name: &str) -> &'a str {
    message.header(name).unwrap_or("<none>")
}

/// The host's resident memory (`VmRSS`) or its peak since the last
/// reset (`VmHWM`), in MiB.
fn memory_mib(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib >> 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_more_bytes_than_allowed_fails_the_call_and_holds_little() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(
        module_path!(),
        "publishing_more_bytes_than_allowed_fails_the_call_and_holds_little",
    ) {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let mut settings = hostile_settings("sink");
    settings.limits.max_message_bytes = 8 << 20;
    settings.limits.max_bytes = 8 << 20;
    // The peak counts: memory held until the call ends and freed after
    // would not show in the resident size afterwards.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident size");
    let before = memory_mib("VmRSS:");
    // 40 publishes of 4 MiB: 160 MiB if the host kept them all.
    let letter = attack(&backend, settings, "publish:40:4096").await;
    let grown = memory_mib("VmHWM:").saturating_sub(before);
    let reason = header(&letter, headers::DEAD_LETTER_REASON);
    assert!(
        reason.contains("output limit") && reason.contains("max_output_mb"),
        "{reason}"
    );
    assert!(grown < 100, "host memory grew by {grown} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_outputs_fail_the_call() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(module_path!(), "too_many_outputs_fail_the_call") {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let letter = attack(&backend, hostile_settings("sink"), "outputs:20000").await;
    let reason = header(&letter, headers::DEAD_LETTER_REASON);
    assert!(reason.contains("max_outputs"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_message_maximum_fails_the_call() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(
        module_path!(),
        "an_output_over_the_message_maximum_fails_the_call",
    ) {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let letter = attack(&backend, hostile_settings("sink"), "publish:1:2048").await;
    let reason = header(&letter, headers::DEAD_LETTER_REASON);
    assert!(reason.contains("max_message_bytes"), "{reason}");
}

/// Epoch interruption cannot stop a guest that waits in the host; the
/// deadline must hold anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_sleep_is_cut_at_the_deadline() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(module_path!(), "a_wasi_sleep_is_cut_at_the_deadline") {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let mut settings = hostile_settings("sink");
    settings.timeout = Duration::from_millis(300);
    // Two attempts of an hour each, if the sleep escaped the deadline.
    let letter = attack(&backend, settings, "sleep:3600000").await;
    let reason = header(&letter, headers::DEAD_LETTER_REASON);
    assert!(reason.contains("deadline"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_text_cannot_forge_host_log_lines() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(module_path!(), "plugin_text_cannot_forge_host_log_lines") {
        return;
    }
    let log = captured_log();
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let letter = attack(&backend, hostile_settings("sink"), "forge").await;
    let reason = header(&letter, headers::DEAD_LETTER_REASON);
    assert!(
        !reason.contains('\n'),
        "a raw newline in the reason: {reason:?}"
    );
    assert!(reason.contains("done\\n2026"), "{reason}");
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        text.contains("forged by a plugin"),
        "the plugin's line is logged"
    );
    for line in text.lines() {
        assert!(
            !line.starts_with("2026-01-01T00:00:00Z"),
            "a forged line reached the log: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_is_rate_limited_and_counted() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(module_path!(), "a_log_flood_is_rate_limited_and_counted") {
        return;
    }
    let log = captured_log();
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let runtime = runtime();
    let plugin = load(&runtime, "hostile", hostile_settings("flood.out"));
    let outputs = Collector::start(&backend, &["flood.out"]).await;
    let running = Running::start(route(
        "flood",
        &backend,
        "flood.in",
        plugin.clone(),
        quick_retry(1),
    ))
    .await;
    backend
        .publish(vec![
            // The huge line first, while the plugin's log budget is full.
            Message::new("flood.in", "log-huge:1024"),
            Message::new("flood.in", "log-flood:100000"),
        ])
        .await
        .unwrap();
    outputs.wait_for(2, LIMIT).await.unwrap();
    running.stop().await;
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let written = text.lines().filter(|l| l.contains("flood line")).count();
    assert!(
        written <= 1_000,
        "{written} lines of the flood were written"
    );
    assert!(plugin.settings.log_budget.dropped() >= 99_000);
    let huge = text
        .lines()
        .find(|l| l.contains("LLLL"))
        .expect("the huge line is logged, cut");
    assert!(huge.len() < 8 << 10, "a log line of {} bytes", huge.len());
    assert!(huge.contains("more bytes)"), "it says it was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_set_host_headers_nor_bad_ones() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(
        module_path!(),
        "a_plugin_cannot_set_host_headers_nor_bad_ones",
    ) {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let runtime = runtime();
    let plugin = load(&runtime, "hostile", hostile_settings("hdr.out"));
    let outputs = Collector::start(&backend, &["hdr.out"]).await;
    let letters = Collector::start(&backend, &["hdr.dead-letter"]).await;
    let running = Running::start(route("hdr", &backend, "hdr.in", plugin, quick_retry(1))).await;
    backend
        .publish(vec![
            Message::new("hdr.in", "headers"),
            Message::new("hdr.in", "bad-header"),
        ])
        .await
        .unwrap();
    let output = outputs.wait_for(1, LIMIT).await.unwrap().remove(0);
    let letter = letters.wait_for(1, LIMIT).await.unwrap().remove(0);
    running.stop().await;
    assert_eq!(output.header(headers::DEAD_LETTER_CAUSE), None);
    assert_eq!(output.header("Sluice-Original-Topic"), None);
    assert_eq!(
        output.header(headers::HOPS),
        Some("1"),
        "the host's own count"
    );
    assert_eq!(output.header("x-kept"), Some("kept"));
    assert_eq!(header(&letter, headers::DEAD_LETTER_CAUSE), "rejected");
    let reason = header(&letter, headers::DEAD_LETTER_REASON);
    assert!(reason.contains("header name"), "{reason}");
}

/// A plugin that feeds its own input stops at `max_hops`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_stops_at_the_hop_limit() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(module_path!(), "a_loop_stops_at_the_hop_limit") {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let runtime = runtime();
    let plugin = load(&runtime, "hostile", hostile_settings("loop.in"));
    let copies = Collector::start(&backend, &["loop.in"]).await;
    let letters = Collector::start(&backend, &["loop.dead-letter"]).await;
    let running = Running::start(route("loop", &backend, "loop.in", plugin, quick_retry(1))).await;
    backend
        .publish(vec![Message::new("loop.in", "again")])
        .await
        .unwrap();
    let letter = letters.wait_for(1, LIMIT).await.unwrap().remove(0);
    running.stop().await;
    assert_eq!(header(&letter, headers::DEAD_LETTER_CAUSE), "hop-limit");
    assert_eq!(header(&letter, headers::HOPS), "16");
    // The original and its 16 copies, nothing after the limit.
    assert_eq!(copies.now().len(), 17);
}

/// Without `publish_to`, a plugin may publish nowhere, and the dead letter
/// says which key grants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_without_grants_publishes_nowhere() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(module_path!(), "a_plugin_without_grants_publishes_nowhere") {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let runtime = runtime();
    let mut ungranted = hostile_settings("anywhere");
    ungranted.publish_to = PluginSettings::new("hostile").publish_to;
    let plugin = load(&runtime, "hostile", ungranted);
    let outputs = Collector::start(&backend, &["anywhere"]).await;
    let letters = Collector::start(&backend, &["nogrant.dead-letter"]).await;
    let running = Running::start(route(
        "nogrant",
        &backend,
        "nogrant.in",
        plugin,
        quick_retry(1),
    ))
    .await;
    backend
        .publish(vec![Message::new("nogrant.in", "hello")])
        .await
        .unwrap();
    let letter = letters.wait_for(1, LIMIT).await.unwrap().remove(0);
    running.stop().await;
    let reason = header(&letter, headers::DEAD_LETTER_REASON);
    assert!(reason.contains("plugins.hostile.publish_to"), "{reason}");
    assert!(outputs.now().is_empty());
}

/// A compiled artifact copied over another plugin's is caught by its
/// digest and recompiled, never run under the wrong name.
#[tokio::test]
async fn a_swapped_cache_file_is_recompiled_not_run() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(module_path!(), "a_swapped_cache_file_is_recompiled_not_run") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(Some(cache.path().to_path_buf())).unwrap();
    let hostile = load(&runtime, "hostile", hostile_settings("out"));
    let echo = load(&runtime, "echo", hostile_settings("out"));
    let artifact = |hash: &str| {
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with(hash) && name.ends_with(".cwasm")
            })
            .unwrap()
    };
    let (victim, intruder) = (artifact(&hostile.hash), artifact(&echo.hash));
    std::fs::copy(&intruder, &victim).unwrap();
    std::fs::copy(
        intruder.with_extension("cwasm.mac"),
        victim.with_extension("cwasm.mac"),
    )
    .unwrap();

    let reloaded = load(&runtime, "hostile", hostile_settings("out"));
    let mut instance = reloaded.instantiate().await.unwrap();
    let outcome = instance
        .handle(&Message::new("in", "outputs:3"), 1)
        .await
        .unwrap();
    let Outcome::Outputs(outputs) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(outputs.len(), 3, "the hostile plugin ran, not the echo");
}

/// Messages a healthy route drains per second: `count` published at once,
/// from the publish to its last output.
async fn healthy_rate(backend: &Arc<dyn Backend>, count: usize) -> f64 {
    let runtime = runtime();
    let ns = uuid::Uuid::now_v7().simple().to_string();
    let served = Collector::start(backend, &[&format!("{ns}.served")]).await;
    let good = Running::start(route(
        &format!("{ns}.healthy"),
        backend,
        &format!("{ns}.work"),
        load(
            &runtime,
            "hostile",
            hostile_settings(&format!("{ns}.served")),
        ),
        quick_retry(2),
    ))
    .await;
    let started = tokio::time::Instant::now();
    backend
        .publish(
            (0..count)
                .map(|i| Message::new(format!("{ns}.work"), format!("ok {i}")))
                .collect(),
        )
        .await
        .unwrap();
    served.wait_for(count, LIMIT * 3).await.unwrap();
    let elapsed = started.elapsed();
    good.stop().await;
    count as f64 / elapsed.as_secs_f64()
}

/// Four workers spinning just under their deadline cannot starve a
/// healthy route beside them. On two cores the spinners keep one; the
/// bound is loose (without the gate the route fell to about 0.4 here),
/// the figure printed. Other tests running beside it would move the
/// figure, so it runs on its own after them (`cargo xtask test` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures throughput, so it runs alone: cargo test -- --ignored hostile::"]
async fn spinning_neighbours_cannot_starve_a_healthy_route() {
    let _serial = one_at_a_time().await;
    if !common::in_own_process(
        module_path!(),
        "spinning_neighbours_cannot_starve_a_healthy_route",
    ) {
        return;
    }
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let count = 2_000;
    let alone = healthy_rate(&backend, count).await;

    let runtime = runtime();
    let mut settings = hostile_settings("spun");
    settings.timeout = Duration::from_millis(1_000);
    let mut spinners = route(
        "spinners",
        &backend,
        "spin.in",
        load(&runtime, "hostile", settings),
        quick_retry(1),
    );
    spinners.spec.concurrency = 4;
    // Only what is handled is fetched, so stopping them waits for little.
    spinners.spec.max_in_flight = 4;
    let spinners = Running::start(spinners).await;
    backend
        .publish(
            (0..400)
                .map(|_| Message::new("spin.in", "spin:900"))
                .collect(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let beside = healthy_rate(&backend, count).await;
    spinners.stop().await;
    println!("healthy route: {alone:.0} msgs/s alone, {beside:.0} msgs/s beside four spinners");
    assert!(
        beside >= 0.6 * alone,
        "the healthy route fell to {:.2} of its own throughput",
        beside / alone
    );
}
