//! The file log backend: durability across restarts and crashes, the
//! startup check (torn tails, damaged records), retention, compaction with
//! an injected crash, the single-process lock and the `sluice log` tools.
//! (The conformance suite runs against it in `conformance.rs`.)

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use sluice::Message;
use sluice::backend::{self, Backend, StartFrom, SubscribeOptions, Subscription};
use sluice_tests::common;

const WAIT: Duration = Duration::from_secs(2);

fn url(dir: &Path, query: &str) -> String {
    let base = format!("file://{}", dir.display());
    if query.is_empty() {
        base
    } else {
        format!("{base}?{query}")
    }
}

async fn open(dir: &Path, query: &str) -> Arc<dyn Backend> {
    backend::connect(&url(dir, query)).await.unwrap()
}

fn options(topics: &[&str], group: &str) -> SubscribeOptions {
    let mut options = SubscribeOptions::new(topics.iter().map(|t| t.to_string()).collect(), group);
    options.lease = Duration::from_millis(500);
    options
}

fn numbered(topic: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(topic, format!("m{i}")))
        .collect()
}

fn text(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

/// Fetches and acks until nothing arrives for a while; returns (payload, attempt).
async fn drain(sub: &dyn Subscription) -> Vec<(String, u32)> {
    let mut seen = Vec::new();
    loop {
        let batch = sub.fetch(100, Duration::from_millis(300)).await.unwrap();
        if batch.is_empty() {
            return seen;
        }
        for d in batch {
            seen.push((text(&d.message), d.attempt));
            sub.ack(&d).await.unwrap();
        }
    }
}

fn segment_files(dir: &Path, topic: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("topics").join(topic))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    files.sort();
    files
}

/// Runs the built `sluice` binary.
fn sluice(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = common::sluice();
    command
        .args(args)
        .env("SLUICE_LOG", "warn")
        .env("NO_COLOR", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run sluice")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn messages_keep_key_headers_and_payload_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sent = vec![
        Message::new("orders.eu", "zoë ✓")
            .with_key("order-1")
            .with_header("trace", "t-1")
            .with_header("trace", "t-2"),
        Message::new("orders.eu", vec![0u8, 159, 146, 150, 255]),
        Message::new("orders/odd name", "")
            .with_key("")
            .with_header("", ""),
    ];
    {
        let backend = open(dir.path(), "").await;
        backend.publish(sent.clone()).await.unwrap();
    }
    let backend = open(dir.path(), "").await;
    let sub = backend
        .subscribe(options(&["orders.eu", "orders/odd name"], "g"))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let batch = sub.fetch(10, WAIT).await.unwrap();
        assert!(!batch.is_empty(), "only {} arrived", got.len());
        for d in batch {
            assert_eq!(d.attempt, 1);
            sub.ack(&d).await.unwrap();
            got.push(d.message);
        }
    }
    for original in &sent {
        let back = got.iter().find(|m| m.id == original.id).expect("delivered");
        assert_eq!(back, original, "message changed on disk");
    }
    // Human-readable on disk: UTF-8 payloads as text, others as base64.
    let segment = std::fs::read_to_string(&segment_files(dir.path(), "orders.eu")[0]).unwrap();
    assert!(segment.contains("\"payload\":\"zoë ✓\""), "{segment}");
    assert!(segment.contains("\"payload_b64\":"), "{segment}");
    assert!(
        dir.path().join("topics/orders%2Fodd%20name").is_dir(),
        "topic names are escaped into one directory name"
    );
}

#[tokio::test]
async fn a_crash_redelivers_unacked_messages_with_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let backend = open(dir.path(), "").await;
        backend.publish(numbered("jobs", 10)).await.unwrap();
        let sub = backend
            .subscribe(options(&["jobs"], "workers"))
            .await
            .unwrap();
        let batch = sub.fetch(10, WAIT).await.unwrap();
        assert_eq!(batch.len(), 10);
        for d in &batch[..4] {
            sub.ack(d).await.unwrap();
        }
        sub.nack(&batch[4], Duration::from_secs(60)).await.unwrap();
        // The process "crashes": no close; five held, one delayed.
    }
    let backend = open(dir.path(), "").await;
    backend.publish(numbered("jobs", 1)).await.unwrap();
    let sub = backend
        .subscribe(options(&["jobs"], "workers"))
        .await
        .unwrap();
    let mut seen = drain(sub.as_ref()).await;
    seen.sort();
    let mut expected: Vec<(String, u32)> = (5..10).map(|i| (format!("m{i}"), 2)).collect();
    expected.push(("m0".into(), 1)); // published after the restart
    expected.sort();
    assert_eq!(
        seen, expected,
        "held ones come back at once with attempt 2; the nacked one waits out its delay"
    );
}

#[tokio::test]
async fn latest_and_earliest_and_ephemeral_groups() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), "").await;
    backend.publish(numbered("t", 3)).await.unwrap();
    let mut latest = options(&["t"], "new");
    latest.start = StartFrom::Latest;
    drop(backend.subscribe(latest.clone()).await.unwrap());
    let mut tail = options(&["t"], "tail");
    tail.ephemeral = true;
    let tail = backend.subscribe(tail).await.unwrap();
    assert_eq!(drain(tail.as_ref()).await.len(), 3);
    tail.close().await.unwrap();
    drop(backend);

    let backend = open(dir.path(), "").await;
    backend
        .publish(vec![Message::new("t", "fresh")])
        .await
        .unwrap();
    let sub = backend.subscribe(latest).await.unwrap();
    assert_eq!(
        drain(sub.as_ref()).await,
        [("fresh".to_string(), 1)],
        "a latest group keeps its start across a restart"
    );
    let groups: Vec<String> = std::fs::read_dir(dir.path().join("groups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        groups,
        ["new%5Bt%5D"],
        "the ephemeral group left nothing behind"
    );
}

#[tokio::test]
async fn pattern_groups_pick_up_topics_created_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let backend = open(dir.path(), "").await;
        let sub = backend
            .subscribe(options(&["orders.*"], "g"))
            .await
            .unwrap();
        backend.publish(numbered("orders.eu", 1)).await.unwrap();
        assert_eq!(drain(sub.as_ref()).await.len(), 1);
        sub.close().await.unwrap();
    }
    let backend = open(dir.path(), "").await;
    let sub = backend
        .subscribe(options(&["orders.*"], "g"))
        .await
        .unwrap();
    backend
        .publish(vec![
            Message::new("orders.us", "new topic"),
            Message::new("orders.us.paid", "too deep"),
        ])
        .await
        .unwrap();
    assert_eq!(drain(sub.as_ref()).await, [("new topic".to_string(), 1)]);
}

#[tokio::test]
async fn connecting_twice_in_one_process_shares_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let one = open(dir.path(), "").await;
    let two = backend::connect(&format!("file://{}/.", dir.path().display()))
        .await
        .unwrap();
    let sub = two.subscribe(options(&["t"], "g")).await.unwrap();
    one.publish(numbered("t", 2)).await.unwrap();
    assert_eq!(drain(sub.as_ref()).await.len(), 2);
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let segment = {
        let backend = open(dir.path(), "").await;
        backend.publish(numbered("t", 3)).await.unwrap();
        segment_files(dir.path(), "t").pop().unwrap()
    };
    let clean_len = std::fs::metadata(&segment).unwrap().len();
    append(&segment, b"{\"offset\":3,\"at\":17000000");

    let check = sluice(&["log", "check", dir.path().to_str().unwrap()], &[]);
    assert_eq!(check.status.code(), Some(1), "{}", describe(&check));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains("topics/t/00000000000000000000.ndjson:4: torn record"),
        "{}",
        describe(&check)
    );

    let backend = open(dir.path(), "").await;
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), clean_len);
    let saved = std::fs::read_to_string(
        dir.path()
            .join("quarantine/topics/t/00000000000000000000.ndjson"),
    )
    .unwrap();
    assert!(
        saved.contains("17000000"),
        "the torn bytes are kept: {saved}"
    );
    backend
        .publish(vec![Message::new("t", "after")])
        .await
        .unwrap();
    let sub = backend.subscribe(options(&["t"], "g")).await.unwrap();
    let payloads: Vec<String> = drain(sub.as_ref()).await.into_iter().map(|p| p.0).collect();
    assert_eq!(payloads, ["m0", "m1", "m2", "after"]);
}

#[tokio::test]
async fn a_damaged_record_is_quarantined_and_the_rest_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let segment = {
        let backend = open(dir.path(), "").await;
        backend.publish(numbered("t", 5)).await.unwrap();
        segment_files(dir.path(), "t").pop().unwrap()
    };
    // Flip one byte of the third record's payload: still JSON, wrong checksum.
    let mut bytes = std::fs::read(&segment).unwrap();
    let third = bytes
        .windows(4)
        .position(|w| w == b"\"m2\"")
        .expect("third payload");
    bytes[third + 2] = b'7';
    std::fs::write(&segment, &bytes).unwrap();

    let check = sluice(&["log", "check", dir.path().to_str().unwrap()], &[]);
    assert_eq!(check.status.code(), Some(1), "{}", describe(&check));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains("topics/t/00000000000000000000.ndjson:3: checksum mismatch"),
        "{}",
        describe(&check)
    );
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "check changes nothing"
    );

    let recover = sluice(&["log", "recover", dir.path().to_str().unwrap()], &[]);
    assert_eq!(recover.status.code(), Some(0), "{}", describe(&recover));
    let stdout = String::from_utf8_lossy(&recover.stdout);
    assert!(
        stdout.contains(":3: checksum mismatch")
            && stdout.contains("moved to quarantine/topics/t/00000000000000000000.ndjson"),
        "{}",
        describe(&recover)
    );
    let check = sluice(&["log", "check", dir.path().to_str().unwrap()], &[]);
    assert_eq!(check.status.code(), Some(0), "{}", describe(&check));

    let saved = std::fs::read_to_string(
        dir.path()
            .join("quarantine/topics/t/00000000000000000000.ndjson"),
    )
    .unwrap();
    assert!(
        saved.contains("\"line\":3") && saved.contains("m7"),
        "{saved}"
    );
    let backend = open(dir.path(), "").await;
    let sub = backend.subscribe(options(&["t"], "g")).await.unwrap();
    let payloads: Vec<String> = drain(sub.as_ref()).await.into_iter().map(|p| p.0).collect();
    assert_eq!(payloads, ["m0", "m1", "m3", "m4"]);
    backend
        .publish(vec![Message::new("t", "m5")])
        .await
        .unwrap();
    assert_eq!(drain(sub.as_ref()).await, [("m5".to_string(), 1)]);
}

#[tokio::test]
async fn retention_drops_acknowledged_and_expired_segments() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), "segment_bytes=1024").await;
    let sub = backend.subscribe(options(&["acked"], "g")).await.unwrap();
    backend.publish(numbered("acked", 60)).await.unwrap();
    backend.publish(numbered("unread", 60)).await.unwrap();
    let before = segment_files(dir.path(), "acked").len();
    assert!(before > 3, "{before} segments");
    assert_eq!(drain(sub.as_ref()).await.len(), 60);
    // The maintenance thread runs retention once a second.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while segment_files(dir.path(), "acked").len() > 1 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "acknowledged segments stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        segment_files(dir.path(), "unread").len(),
        before,
        "no group has read `unread`: it is kept for groups to come"
    );
    drop((sub, backend));

    // With retention_ms the limit wins, read or not.
    let expiring = tempfile::tempdir().unwrap();
    let backend = open(expiring.path(), "segment_bytes=1024&retention_ms=300").await;
    backend.publish(numbered("unread", 60)).await.unwrap();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let segments = segment_files(expiring.path(), "unread");
        let emptied = segments.len() == 1 && std::fs::metadata(&segments[0]).unwrap().len() == 0;
        if emptied {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "expired segments stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let late = backend
        .subscribe(options(&["unread"], "late"))
        .await
        .unwrap();
    assert!(drain(late.as_ref()).await.is_empty());
    backend.publish(numbered("unread", 1)).await.unwrap();
    let sub = backend
        .subscribe(options(&["unread"], "later"))
        .await
        .unwrap();
    assert_eq!(drain(sub.as_ref()).await, [("m0".to_string(), 1)]);

    // retention_bytes keeps the newest segments within the bound.
    let bounded = tempfile::tempdir().unwrap();
    let backend = open(bounded.path(), "segment_bytes=1024&retention_bytes=3000").await;
    backend.publish(numbered("unread", 100)).await.unwrap();
    let size = |dir: &Path| -> u64 {
        segment_files(dir, "unread")
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while size(bounded.path()) > 3000 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the topic stayed too big"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sub = backend.subscribe(options(&["unread"], "g")).await.unwrap();
    let kept = drain(sub.as_ref()).await;
    assert!(!kept.is_empty() && kept.len() < 100, "{} kept", kept.len());
    assert_eq!(kept.last().unwrap().0, "m99", "the newest records are kept");
}

#[tokio::test]
async fn compaction_keeps_unacked_records_and_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    {
        let backend = open(dir.path(), "segment_bytes=1024").await;
        backend.publish(numbered("jobs", 40)).await.unwrap();
        let sub = backend
            .subscribe(options(&["jobs"], "workers"))
            .await
            .unwrap();
        let mut fetched = Vec::new();
        while fetched.len() < 40 {
            fetched.extend(sub.fetch(40, WAIT).await.unwrap());
        }
        for d in &fetched {
            let n: usize = text(&d.message)[1..].parse().unwrap();
            if n.is_multiple_of(2) {
                sub.ack(d).await.unwrap();
            }
        }
        // Crash: the odd ones stay unacknowledged.
    }

    let crashed = sluice(
        &["log", "compact", &path],
        &[("SLUICE_FILELOG_FAILPOINT", "compact-before-rename")],
    );
    assert!(!crashed.status.success(), "{}", describe(&crashed));
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path().join("topics/jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "the crash left the new segment unrenamed"
    );
    let check = sluice(&["log", "check", &path], &[]);
    assert_eq!(check.status.code(), Some(1), "{}", describe(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("temporary file"),
        "{}",
        describe(&check)
    );

    let compact = sluice(&["log", "compact", &path], &[]);
    assert_eq!(compact.status.code(), Some(0), "{}", describe(&compact));
    let stdout = String::from_utf8_lossy(&compact.stdout);
    let numbers: Vec<u64> = stdout
        .lines()
        .find(|l| l.starts_with("compacted"))
        .expect("a summary line")
        .split(&[' ', '('][..])
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(numbers.len() >= 2 && numbers[1] < numbers[0], "{stdout}");
    assert!(!leftovers[0].exists(), "the leftover was cleaned");
    let on_disk: String = segment_files(dir.path(), "jobs")
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        !on_disk.contains("\"m0\"") && on_disk.contains("\"m1\""),
        "{on_disk}"
    );

    let backend = open(dir.path(), "segment_bytes=1024").await;
    let sub = backend
        .subscribe(options(&["jobs"], "workers"))
        .await
        .unwrap();
    let seen = drain(sub.as_ref()).await;
    let expected: HashSet<(String, u32)> = (0..40)
        .filter(|n: &usize| !n.is_multiple_of(2))
        .map(|n| (format!("m{n}"), 2))
        .collect();
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
}

#[tokio::test]
async fn a_second_process_is_refused_while_the_log_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let backend = open(dir.path(), "").await;
    backend.publish(numbered("t", 2)).await.unwrap();

    let stats = sluice(&["log", "stats", &path], &[]);
    assert_eq!(stats.status.code(), Some(2), "{}", describe(&stats));
    let stderr = String::from_utf8_lossy(&stats.stderr);
    let pid = format!("in use by process {}", std::process::id());
    assert!(
        stderr.contains(&path) && stderr.contains(&pid),
        "{}",
        describe(&stats)
    );
    let url = format!("file://{path}");
    let publish = sluice(&["publish", "--url", &url, "t", "x"], &[]);
    assert!(!publish.status.success(), "{}", describe(&publish));
    assert!(
        String::from_utf8_lossy(&publish.stderr).contains(&pid),
        "{}",
        describe(&publish)
    );

    drop(backend);
    let stats = sluice(&["log", "stats", &path], &[]);
    assert_eq!(stats.status.code(), Some(0), "{}", describe(&stats));
    let stdout = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stdout.contains("t: 1 segment(s), 2 record(s)"),
        "{}",
        describe(&stats)
    );
}

#[tokio::test]
async fn stats_show_group_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    {
        let backend = open(dir.path(), "").await;
        backend.publish(numbered("t", 10)).await.unwrap();
        let sub = backend.subscribe(options(&["t"], "g")).await.unwrap();
        let batch = sub.fetch(4, WAIT).await.unwrap();
        sub.ack(&batch[0]).await.unwrap();
        sub.ack(&batch[1]).await.unwrap();
    }
    let stats = sluice(&["log", "stats", &path], &[]);
    assert_eq!(stats.status.code(), Some(0), "{}", describe(&stats));
    let stdout = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stdout.contains("g[t]: patterns t")
            && stdout.contains(
                "t: position 2, pending 8 (unread 6, delivered and unacknowledged 2), in flight 2"
            ),
        "{}",
        describe(&stats)
    );
}

#[test]
fn the_tools_use_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let check = sluice(&["log", "check", missing.to_str().unwrap()], &[]);
    assert_eq!(check.status.code(), Some(2), "{}", describe(&check));
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("does not exist"),
        "{}",
        describe(&check)
    );
    let not_a_log = sluice(&["log", "stats", dir.path().to_str().unwrap()], &[]);
    assert_eq!(not_a_log.status.code(), Some(2), "{}", describe(&not_a_log));
    assert!(
        String::from_utf8_lossy(&not_a_log.stderr).contains("is not a Sluice file log"),
        "{}",
        describe(&not_a_log)
    );
    assert!(
        !dir.path().join("LOCK").exists(),
        "no lock file is left in a directory that is not a log"
    );

    let log = dir.path().join("log");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        open(&log, "")
            .await
            .publish(numbered("t", 1))
            .await
            .unwrap();
    });
    let log = log.to_str().unwrap();
    let clean = sluice(&["log", "check", log], &[]);
    assert_eq!(clean.status.code(), Some(0), "{}", describe(&clean));
    assert!(
        String::from_utf8_lossy(&clean.stdout).contains("no problems found"),
        "{}",
        describe(&clean)
    );
    let nothing = sluice(&["log", "recover", log], &[]);
    assert_eq!(nothing.status.code(), Some(0), "{}", describe(&nothing));
    assert!(
        String::from_utf8_lossy(&nothing.stdout).contains("nothing to repair"),
        "{}",
        describe(&nothing)
    );
}

fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

/// The probe of `check --connect` looks at the log's directory without
/// taking it or making it.
#[tokio::test]
async fn the_probe_makes_no_directory_and_takes_no_lock() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a").join("log");
    let url = format!("file://{}", log.display());
    let found = backend::probe(&url).await.unwrap();
    assert!(found.contains("does not exist yet"), "{found}");
    assert!(!log.exists() && !dir.path().join("a").exists());

    let open = backend::connect(&url).await.unwrap();
    let found = backend::probe(&url).await.unwrap();
    assert!(found.contains("exists"), "{found}");
    drop(open);

    std::fs::write(dir.path().join("file"), "x").unwrap();
    let under_a_file = format!("file://{}", dir.path().join("file").join("log").display());
    let err = backend::probe(&under_a_file).await.unwrap_err();
    assert!(format!("{err:#}").contains("is not a directory"), "{err:#}");
}
