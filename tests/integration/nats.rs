//! NATS-specific behaviour on the shared server at 127.0.0.1:4222 (with
//! JetStream): request-reply, queue-group splits, JetStream nak delays and
//! attempts, AckWait redelivery, in-progress acks, batch settlement, the
//! key shards an ordered group's members divide, and the `sluice` binary
//! moved onto JetStream by `SLUICE_BACKEND_URL` alone.
//!
//! The server is shared with other test runs: every test uses subjects and
//! streams of its own (a unique first token and stream prefix) and deletes
//! only the streams it made. Without a server the tests fail when `CI` is
//! set and are skipped, loudly, otherwise.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sluice::Message;
use sluice::backend::{self, Delivery, SettleError, Settlement, SubscribeOptions, Subscription};
use sluice::router::{FnHandler, Route, RouteSpec, RouteStats};
use sluice::runtime::Outcome;

use common::{Running, plugin_path, quick_retry};
use sluice_tests::common;

const SERVER: &str = "127.0.0.1:4222";
const LIMIT: Duration = Duration::from_secs(20);

/// Whether the shared server is there; panics under CI if it is not.
fn server_up(test: &str) -> bool {
    let reachable = SERVER
        .parse()
        .ok()
        .and_then(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .is_some();
    if !reachable {
        assert!(
            std::env::var_os("CI").is_none(),
            "NATS is not reachable at {SERVER} (CI is set, so {test} cannot be skipped): \
             start nats-server -js"
        );
        eprintln!("\n*** SKIPPING {test}: no NATS server at {SERVER} ***\n");
    }
    reachable
}

/// A first topic token and stream prefix no other run uses.
fn unique(label: &str) -> String {
    let id = Message::new("x", "").id;
    format!("sluicetest{label}{}", &id[id.len() - 12..])
}

/// The JetStream URL for a test's own streams.
fn jetstream_url(token: &str) -> String {
    format!("jetstream://{SERVER}?stream_prefix=T{token}")
}

/// Deletes the stream a test's topics went to (and only that one).
async fn delete_own_stream(token: &str) {
    let Ok(client) = async_nats::connect(SERVER).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    let name = format!("T{token}_{token}");
    if let Err(e) = js.delete_stream(&name).await {
        eprintln!("could not delete test stream {name}: {e}");
    }
}

fn options(topic: &str, group: &str, lease: Duration) -> SubscribeOptions {
    let mut options = SubscribeOptions::new(vec![topic.to_string()], group);
    options.lease = lease;
    options
}

async fn fetch_one(sub: &dyn Subscription, within: Duration) -> Result<sluice::backend::Delivery> {
    let give_up = tokio::time::Instant::now() + within;
    loop {
        if let Some(d) = sub.fetch(1, Duration::from_millis(200)).await?.pop() {
            return Ok(d);
        }
        ensure!(
            tokio::time::Instant::now() < give_up,
            "nothing delivered within {within:?}"
        );
    }
}

/// Everything `subs` are handed within `quiet` of each other fetch,
/// acked, as (member, payload).
async fn drain(subs: &[&dyn Subscription], quiet: Duration) -> Result<Vec<(usize, String)>> {
    let mut got = Vec::new();
    loop {
        let before = got.len();
        for (member, sub) in subs.iter().enumerate() {
            for delivery in sub.fetch(100, quiet).await? {
                got.push((
                    member,
                    String::from_utf8_lossy(&delivery.message.payload).into_owned(),
                ));
                sub.ack(&delivery).await?;
            }
        }
        if got.len() == before {
            return Ok(got);
        }
    }
}

/// The members of an ordered group on a sharded stream divide the key
/// shards among themselves, and the shards of a member that closes go to
/// the others: every later message reaches the one left, each key's in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_ordered_members_divide_the_key_shards() -> Result<()> {
    if !server_up("jetstream_ordered_members_divide_the_key_shards") {
        return Ok(());
    }
    let token = unique("lease");
    let result = async {
        let topic = format!("{token}.jobs");
        let backend = backend::connect(&format!("{}&shards=16", jetstream_url(&token))).await?;
        let ordered = || {
            let mut options = options(&topic, "g", Duration::from_secs(2));
            options.ordered = true;
            options
        };
        let first = backend.subscribe(ordered()).await?;
        let second = backend.subscribe(ordered()).await?;
        let members = [first.as_ref(), second.as_ref()];
        let keyed = |round: usize, key: usize| {
            Message::new(&topic, format!("{key}:{round}")).with_key(format!("k{key}"))
        };

        // The first member took every shard; it hands the second its share
        // once it sees it. Until both get keys of their own (a bound on
        // liveness, not a timing).
        let give_up = tokio::time::Instant::now() + LIMIT;
        let mut got_by = [0, 0];
        let mut round = 0;
        while got_by.contains(&0) {
            ensure!(
                tokio::time::Instant::now() < give_up,
                "the members did not divide the shards: {got_by:?} messages"
            );
            backend
                .publish((0..32).map(|key| keyed(round, key)).collect())
                .await?;
            for (member, _) in drain(&members, Duration::from_millis(200)).await? {
                got_by[member] += 1;
            }
            round += 1;
        }

        // What is published after the first member closed reaches the
        // second, all of it, each key's in order.
        first.close().await?;
        let after: Vec<Message> = (0..3)
            .flat_map(|r| (0..32).map(move |key| (r, key)))
            .map(|(r, key)| keyed(round + r, key))
            .collect();
        backend.publish(after).await?;
        let mut seen = Vec::new();
        while seen.len() < 96 {
            ensure!(
                tokio::time::Instant::now() < give_up + LIMIT,
                "the second member got {} of 96 after the first closed",
                seen.len()
            );
            seen.extend(drain(&members[1..], Duration::from_millis(200)).await?);
        }
        for key in 0..32 {
            let rounds: Vec<usize> = seen
                .iter()
                .filter_map(|(_, text)| text.split_once(':'))
                .filter(|(k, _)| k.parse() == Ok(key))
                .map(|(_, r)| r.parse().unwrap())
                .collect();
            let expected: Vec<usize> = (round..round + 3).collect();
            ensure!(rounds == expected, "key {key}: rounds {rounds:?}");
        }
        second.close().await?;
        Ok(())
    }
    .await;
    delete_own_stream(&token).await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_is_answered_by_a_route_through_sluice_reply_to() -> Result<()> {
    if !server_up("request_is_answered_by_a_route_through_sluice_reply_to") {
        return Ok(());
    }
    let token = unique("rpc");
    let topic = format!("{token}.rpc.upper");
    let backend = backend::connect(&format!("nats://{SERVER}")).await?;
    // What a plugin does: answer to the topic in `sluice-reply-to`.
    let handler =
        FnHandler(
            |message: &Message, _attempt: u32| match message.header("sluice-reply-to") {
                Some(reply_to) => Outcome::Outputs(vec![Message::new(
                    reply_to,
                    String::from_utf8_lossy(&message.payload).to_uppercase(),
                )]),
                None => Outcome::Reject("not a request".into()),
            },
        );
    let route = Route {
        spec: RouteSpec {
            concurrency: 2,
            retry: quick_retry(3),
            dead_letter_topic: format!("{token}.dead"),
            ..RouteSpec::new("rpc", options(&topic, "rpc", Duration::from_secs(5)))
        },
        source: backend.clone(),
        outputs: vec![backend.clone()],
        dead_letters: None,
        handler: Arc::new(handler),
        stats: Arc::new(RouteStats::default()),
    };
    let running = Running::start(route).await;
    let requester = async_nats::connect(SERVER).await?;
    for word in ["hello", "queue", "reply"] {
        let answer = tokio::time::timeout(LIMIT, requester.request(topic.clone(), word.into()))
            .await
            .context("no answer in time")??;
        ensure!(
            answer.payload.as_ref() == word.to_uppercase().as_bytes(),
            "answer {:?}",
            answer.payload
        );
    }
    // The answer can arrive before the route counts it: stop (drain) first.
    let stats = running.stats.clone();
    running.stop().await;
    let stats = stats.snapshot();
    ensure!(stats.succeeded == 3, "{stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_queue_group_members_split_and_groups_fan_out() -> Result<()> {
    if !server_up("core_queue_group_members_split_and_groups_fan_out") {
        return Ok(());
    }
    let token = unique("queue");
    let topic = format!("{token}.events");
    let backend = backend::connect(&format!("nats://{SERVER}")).await?;
    let one = backend.subscribe(options(&topic, "workers", LIMIT)).await?;
    let two = backend.subscribe(options(&topic, "workers", LIMIT)).await?;
    let audit = backend
        .subscribe(options(&format!("{token}.*"), "audit", LIMIT))
        .await?;
    let sent: Vec<Message> = (0..200)
        .map(|i| Message::new(&topic, i.to_string()))
        .collect();
    backend.publish(sent).await?;
    let mut counts = [0usize; 3];
    let mut workers_seen = std::collections::HashSet::new();
    let mut audit_seen = std::collections::HashSet::new();
    let give_up = tokio::time::Instant::now() + LIMIT;
    while workers_seen.len() < 200 || audit_seen.len() < 200 {
        ensure!(tokio::time::Instant::now() < give_up, "stalled: {counts:?}");
        for (i, sub) in [&one, &two, &audit].into_iter().enumerate() {
            for d in sub.fetch(50, Duration::from_millis(50)).await? {
                counts[i] += 1;
                let fresh = if i == 2 {
                    audit_seen.insert(d.message.id.clone())
                } else {
                    workers_seen.insert(d.message.id.clone())
                };
                ensure!(fresh, "a message came twice to one group");
                sub.ack(&d).await?;
            }
        }
    }
    ensure!(
        counts[0] > 0 && counts[1] > 0,
        "one member got everything: {counts:?}"
    );
    ensure!(
        counts[0] + counts[1] == 200 && counts[2] == 200,
        "{counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_nak_delay_is_counted_in_attempts() -> Result<()> {
    if !server_up("jetstream_nak_delay_is_counted_in_attempts") {
        return Ok(());
    }
    let token = unique("nak");
    let result = async {
        let topic = format!("{token}.jobs");
        let backend = backend::connect(&jetstream_url(&token)).await?;
        let sub = backend
            .subscribe(options(&topic, "g", Duration::from_secs(10)))
            .await?;
        backend.publish(vec![Message::new(&topic, "job")]).await?;
        let first = fetch_one(sub.as_ref(), LIMIT).await?;
        ensure!(first.attempt == 1, "first attempt {}", first.attempt);
        let nacked_at = tokio::time::Instant::now();
        sub.nack(&first, Duration::from_millis(800)).await?;
        let second = fetch_one(sub.as_ref(), LIMIT).await?;
        ensure!(
            nacked_at.elapsed() >= Duration::from_millis(800),
            "back after {:?}, before the delay",
            nacked_at.elapsed()
        );
        // The server's delivery count: 2, or more if on a loaded machine it
        // also redelivered the message after AckWait before it was read.
        ensure!(
            second.attempt >= 2 && second.message.id == first.message.id,
            "attempt {} of {}",
            second.attempt,
            second.message.id
        );
        sub.nack(&second, Duration::ZERO).await?;
        let third = fetch_one(sub.as_ref(), LIMIT).await?;
        ensure!(
            third.attempt > second.attempt,
            "attempt {} after {}",
            third.attempt,
            second.attempt
        );
        sub.ack(&third).await?;
        ensure!(
            sub.fetch(1, Duration::from_millis(500)).await?.is_empty(),
            "came back after ack"
        );
        sub.close().await
    }
    .await;
    delete_own_stream(&token).await;
    result
}

/// A stream's shard count is fixed when it is made: a URL that says
/// another, or none, is refused with both named, and stores nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_shards_are_fixed_when_the_stream_is_made() -> Result<()> {
    if !server_up("jetstream_shards_are_fixed_when_the_stream_is_made") {
        return Ok(());
    }
    let token = unique("shards");
    let result = async {
        let topic = format!("{token}.jobs");
        let url = jetstream_url(&token);
        let sharded = backend::connect(&format!("{url}&shards=4")).await?;
        sharded.publish(vec![Message::new(&topic, "a")]).await?;
        for (other, says) in [("&shards=8", "shards=8"), ("", "no shards")] {
            let backend = backend::connect(&format!("{url}{other}")).await?;
            let err = backend
                .publish(vec![Message::new(&topic, "b")])
                .await
                .expect_err("a URL with other shards was accepted");
            let text = format!("{err:#}");
            ensure!(
                text.contains("shards=4") && text.contains(says),
                "unclear refusal: {text}"
            );
        }
        let sub = sharded.subscribe(options(&topic, "g", LIMIT)).await?;
        let got = fetch_all(sub.as_ref(), 1).await?;
        ensure!(
            got[0].message.topic == topic && nothing_more(sub.as_ref()).await?,
            "the stream holds {:?}",
            got.iter().map(|d| &d.message.topic).collect::<Vec<_>>()
        );
        sub.close().await
    }
    .await;
    delete_own_stream(&token).await;
    result
}

/// Whether a subscription gets nothing more for a while.
async fn nothing_more(sub: &dyn Subscription) -> Result<bool> {
    Ok(sub.fetch(10, Duration::from_millis(500)).await?.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_abandoned_delivery_returns_after_ack_wait() -> Result<()> {
    if !server_up("jetstream_abandoned_delivery_returns_after_ack_wait") {
        return Ok(());
    }
    let token = unique("lease");
    let result = async {
        let topic = format!("{token}.jobs");
        let lease = Duration::from_millis(700);
        let backend = backend::connect(&jetstream_url(&token)).await?;
        let doomed = backend.subscribe(options(&topic, "g", lease)).await?;
        backend.publish(vec![Message::new(&topic, "job")]).await?;
        let held = fetch_one(doomed.as_ref(), LIMIT).await?;
        // The consumer dies holding it: no ack, no nack, no close.
        drop(doomed);
        let fetched_at = tokio::time::Instant::now();
        let survivor = backend.subscribe(options(&topic, "g", lease)).await?;
        let again = fetch_one(survivor.as_ref(), LIMIT).await?;
        ensure!(
            again.message.id == held.message.id && again.attempt == 2,
            "attempt {}",
            again.attempt
        );
        ensure!(
            fetched_at.elapsed() >= lease / 2,
            "returned after {:?}, well before AckWait",
            fetched_at.elapsed()
        );
        survivor.ack(&again).await?;
        survivor.close().await
    }
    .await;
    delete_own_stream(&token).await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_in_progress_acks_keep_a_slow_delivery() -> Result<()> {
    if !server_up("jetstream_in_progress_acks_keep_a_slow_delivery") {
        return Ok(());
    }
    let token = unique("wpi");
    let result = async {
        let topic = format!("{token}.jobs");
        let lease = Duration::from_millis(600);
        let backend = backend::connect(&jetstream_url(&token)).await?;
        let slow = backend.subscribe(options(&topic, "g", lease)).await?;
        let other = backend.subscribe(options(&topic, "g", lease)).await?;
        backend
            .publish(vec![Message::new(&topic, "long job")])
            .await?;
        let held = fetch_one(slow.as_ref(), LIMIT).await?;
        // Three leases long, while the slow member is alive and fetching.
        let until = tokio::time::Instant::now() + lease * 3;
        while tokio::time::Instant::now() < until {
            ensure!(slow.fetch(1, Duration::from_millis(100)).await?.is_empty());
            ensure!(
                other.fetch(1, Duration::from_millis(100)).await?.is_empty(),
                "redelivered although in progress"
            );
        }
        slow.ack(&held).await?;
        ensure!(
            other.fetch(1, lease * 2).await?.is_empty(),
            "came back after the ack"
        );
        slow.close().await?;
        other.close().await
    }
    .await;
    delete_own_stream(&token).await;
    result
}

/// Fetches until `count` deliveries are in hand.
async fn fetch_all(sub: &dyn Subscription, count: usize) -> Result<Vec<Delivery>> {
    let give_up = tokio::time::Instant::now() + LIMIT;
    let mut held = Vec::new();
    while held.len() < count {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "fetched {} of {count}",
            held.len()
        );
        held.extend(
            sub.fetch(count - held.len(), Duration::from_millis(200))
                .await?,
        );
    }
    Ok(held)
}

/// Nothing is delivered to `subs` for `span` (longer than their AckWait).
async fn nothing_comes_back(subs: &[&dyn Subscription], span: Duration) -> Result<()> {
    let until = tokio::time::Instant::now() + span;
    while tokio::time::Instant::now() < until {
        for sub in subs {
            let got = sub.fetch(10, Duration::from_millis(100)).await?;
            ensure!(
                got.is_empty(),
                "{} came back after being settled (attempt {})",
                String::from_utf8_lossy(&got[0].message.payload),
                got[0].attempt
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_batch_settle_acks_every_delivery() -> Result<()> {
    if !server_up("jetstream_batch_settle_acks_every_delivery") {
        return Ok(());
    }
    const COUNT: usize = 600;
    let token = unique("batch");
    let result = async {
        let topic = format!("{token}.jobs");
        let lease = Duration::from_secs(1);
        let backend = backend::connect(&jetstream_url(&token)).await?;
        let sub = backend.subscribe(options(&topic, "g", lease)).await?;
        let messages: Vec<Message> = (0..COUNT)
            .map(|i| Message::new(&topic, format!("job-{i}")))
            .collect();
        backend.publish(messages).await?;
        let held = fetch_all(sub.as_ref(), COUNT).await?;
        let results = sub
            .settle(held.iter().map(|d| (d, Settlement::Ack)).collect())
            .await;
        ensure!(results.len() == COUNT, "{} answers", results.len());
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            anyhow::bail!("an ack of the batch failed: {e}");
        }
        // A lost ack would bring its message back after AckWait, to this
        // member or to a new one.
        let other = backend.subscribe(options(&topic, "g", lease)).await?;
        nothing_comes_back(&[sub.as_ref(), other.as_ref()], lease * 3).await?;
        sub.close().await?;
        other.close().await
    }
    .await;
    delete_own_stream(&token).await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_mixed_batch_settles_each_item_on_its_own() -> Result<()> {
    if !server_up("jetstream_mixed_batch_settles_each_item_on_its_own") {
        return Ok(());
    }
    let token = unique("mixed");
    let result = async {
        let topic = format!("{token}.jobs");
        let lease = Duration::from_secs(1);
        let backend = backend::connect(&jetstream_url(&token)).await?;
        let sub = backend.subscribe(options(&topic, "g", lease)).await?;
        let messages: Vec<Message> = (0..10)
            .map(|i| Message::new(&topic, format!("job-{i}")))
            .collect();
        backend.publish(messages).await?;
        let held = fetch_all(sub.as_ref(), 10).await?;
        // Even ones acked, odd ones nacked (one with a delay), and the
        // first one settled a second time in the same batch.
        let mut batch: Vec<(&Delivery, Settlement)> = held
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let settlement = match i {
                    _ if i % 2 == 0 => Settlement::Ack,
                    9 => Settlement::Nack(Duration::from_millis(300)),
                    _ => Settlement::Nack(Duration::ZERO),
                };
                (d, settlement)
            })
            .collect();
        batch.push((&held[0], Settlement::Ack));
        let results = sub.settle(batch).await;
        ensure!(results.len() == 11, "{} answers", results.len());
        for (i, result) in results[..10].iter().enumerate() {
            ensure!(result.is_ok(), "item {i}: {result:?}");
        }
        ensure!(
            matches!(results[10], Err(SettleError::Fatal(_))),
            "settling twice: {:?}",
            results[10]
        );
        let nacked: HashSet<&str> = held
            .iter()
            .skip(1)
            .step_by(2)
            .map(|d| d.message.id.as_str())
            .collect();
        let again = fetch_all(sub.as_ref(), nacked.len()).await?;
        let ids: HashSet<&str> = again.iter().map(|d| d.message.id.as_str()).collect();
        ensure!(ids == nacked, "redelivered: {:?}", payloads(&again));
        ensure!(
            again.iter().all(|d| d.attempt == 2),
            "attempts {:?}",
            again.iter().map(|d| d.attempt).collect::<Vec<_>>()
        );
        let results = sub
            .settle(again.iter().map(|d| (d, Settlement::Ack)).collect())
            .await;
        ensure!(results.iter().all(Result::is_ok), "{results:?}");
        nothing_comes_back(&[sub.as_ref()], lease * 3).await?;
        sub.close().await
    }
    .await;
    delete_own_stream(&token).await;
    result
}

fn payloads(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
        .collect()
}

#[test]
fn the_same_plugin_and_config_run_on_jetstream_by_environment() {
    if !server_up("the_same_plugin_and_config_run_on_jetstream_by_environment") {
        return;
    }
    let token = unique("cli");
    let url = jetstream_url(&token);
    let dir = tempfile::tempdir().unwrap();
    // The same config as the SQLite CLI tests, but with topics of our own.
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        common::upper_config(dir.path(), &plugin_path("uppercase"), &format!("{token}.")),
    )
    .unwrap();
    let sluice = |args: &[&str]| {
        common::sluice()
            .args(args)
            .env("SLUICE_LOG", "warn")
            .env("SLUICE_BACKEND_URL", &url)
            .output()
            .expect("run sluice")
    };
    let words = format!("{token}.words");
    let published = sluice(&["publish", &words, "moved", "--count", "5"]);
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let run = sluice(&["run", config.to_str().unwrap(), "--exit-when-idle", "2"]);
    let summary = String::from_utf8_lossy(&run.stdout).into_owned();
    let shouted = format!("{token}.shouted");
    let tail = sluice(&["tail", &shouted, "--json", "--limit", "5"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(delete_own_stream(&token));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(summary.contains("succeeded 5"), "{summary}");
    assert!(
        !dir.path().join("sluice.db").exists(),
        "the SQLite file of the config was used"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{}", String::from_utf8_lossy(&tail.stderr));
    assert!(
        lines
            .iter()
            .all(|m| m["payload"] == "MOVED" && m["topic"] == shouted.as_str())
    );
}

/// The probe of `check --connect` reaches both NATS backends and says
/// whether JetStream's named stream exists, without making it, and refuses
/// one whose key shards are not what the URL says.
#[tokio::test]
async fn probes_reach_the_server_and_make_no_stream() -> Result<()> {
    if !server_up("probes_reach_the_server_and_make_no_stream") {
        return Ok(());
    }
    let core = backend::probe(&format!("nats://{SERVER}")).await?;
    ensure!(core.starts_with("NATS "), "{core}");
    let token = unique("probe");
    let without_subjects = format!("jetstream://{SERVER}?stream=T{token}");
    let err = backend::probe(&without_subjects)
        .await
        .err()
        .context("a missing stream with no subjects to make it passed")?;
    ensure!(format!("{err:#}").contains("give subjects="), "{err:#}");
    let named = format!("{without_subjects}&subjects={token}.>");
    let found = backend::probe(&named).await?;
    ensure!(
        found.contains(&format!("stream `T{token}` does not exist yet")),
        "{found}"
    );
    let client = async_nats::connect(SERVER).await?;
    let js = async_nats::jetstream::new(client);
    ensure!(
        js.get_stream(format!("T{token}")).await.is_err(),
        "the probe made the stream"
    );
    // Once the backend has connected for real, the stream is there.
    drop(backend::connect(&named).await?);
    let found = backend::probe(&named).await?;
    ensure!(
        found.contains(&format!("stream `T{token}` exists")),
        "{found}"
    );
    let err = backend::probe(&format!("{named}&shards=8"))
        .await
        .err()
        .context("a stream without shards passed for one with 8")?;
    ensure!(
        format!("{err:#}").contains("with no shards, and the URL says shards=8"),
        "{err:#}"
    );
    js.delete_stream(format!("T{token}")).await?;
    let err = backend::probe("nats://127.0.0.1:1")
        .await
        .err()
        .context("a closed port answered")?;
    ensure!(format!("{err:#}").contains("127.0.0.1:1"), "{err:#}");
    Ok(())
}
