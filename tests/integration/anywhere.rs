//! `examples/anywhere.toml` on every backend a second process can reach:
//! the same config file and the same plugin, with only `SLUICE_BACKEND_URL`
//! changed, handle the same messages the same way (Kafka and SQS on private
//! servers of the test's own). (The in-memory backend
//! lives inside one process, and the file log admits one process per
//! directory; the pipeline and backend tests run this plugin on both.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use sluice::Message;
use sluice::backend::{self, SubscribeOptions};
use sluice_tests::common::{self, unique};

const INPUTS: [&str; 3] = ["espresso", "green tea", "croissant"];

/// `sluice run examples/anywhere.toml` with the backend from the environment.
struct Host(Child);

impl Host {
    fn start(url: &str) -> Host {
        // Built before the host needs it.
        common::plugin_path("uppercase");
        let root = common::repo_root();
        let mut child = common::sluice()
            .args(["run", "examples/anywhere.toml"])
            .current_dir(&root)
            .env("SLUICE_BACKEND_URL", url)
            .env("SLUICE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice run");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (subscribed, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("route subscribed") {
                    let _ = subscribed.send(());
                }
            }
        });
        wait.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("sluice run on {url} did not subscribe"));
        Host(child)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Runs the example on `url`, publishes the inputs, and checks the outputs.
async fn shouts_on(url: &str) {
    let backend = backend::connect(url).await.unwrap();
    let mut options = SubscribeOptions::new(vec!["orders.shouted".into()], "anywhere-check");
    options.ephemeral = true;
    let outputs = backend.subscribe(options).await.unwrap();
    let host = Host::start(url);
    let published: Vec<Message> = INPUTS
        .iter()
        .map(|text| Message::new("orders.new", *text))
        .collect();
    backend.publish(published).await.unwrap();

    let mut got = Vec::new();
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < INPUTS.len() && std::time::Instant::now() < give_up {
        for delivery in outputs.fetch(10, Duration::from_millis(500)).await.unwrap() {
            got.push(String::from_utf8(delivery.message.payload.clone()).unwrap());
            outputs.ack(&delivery).await.unwrap();
        }
    }
    drop(host);
    outputs.close().await.unwrap();
    got.sort();
    let mut expected: Vec<String> = INPUTS.iter().map(|s| s.to_uppercase()).collect();
    expected.sort();
    assert_eq!(got, expected, "on {}", backend::redact(url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    let dir = tempfile::tempdir().unwrap();
    shouts_on(&format!("sqlite://{}", dir.path().join("a.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "redis"), ignore = "needs Redis (feature `redis`)")]
async fn redis_streams() {
    shouts_on(&format!(
        "redis://127.0.0.1:6379/0?prefix={}:",
        unique("anywhere")
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "redis"), ignore = "needs Redis (feature `redis`)")]
async fn redis_pubsub() {
    shouts_on(&format!(
        "redis+pubsub://127.0.0.1:6379?prefix={}:",
        unique("anywhere")
    ))
    .await;
}

/// NATS core and JetStream share the server's subjects (a JetStream stream
/// captures what core publishers send), so they take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "nats"), ignore = "needs NATS (feature `nats`)")]
async fn nats_core_then_jetstream() {
    // A stream an earlier, interrupted run left behind would still keep
    // `orders.>`, and the backend would read its history.
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let leftovers: Vec<String> = js
        .stream_names()
        .filter_map(|name| async move { name.ok() })
        .filter(|name| std::future::ready(name.starts_with("ANYWHERE")))
        .collect()
        .await;
    for name in leftovers {
        let _ = js.delete_stream(&name).await;
    }

    shouts_on("nats://127.0.0.1:4222").await;
    let prefix = unique("ANYWHERE");
    shouts_on(&format!(
        "jetstream://127.0.0.1:4222?stream_prefix={prefix}"
    ))
    .await;
    let _ = js.delete_stream(format!("{prefix}_orders")).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let schema = common::postgres::PostgresSchema::new();
    shouts_on(&schema.url("")).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka() {
    let tansu = common::servers::Server::tansu();
    shouts_on(&tansu.kafka_url("")).await;
}

#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_and_sns_sqs() {
    let moto = common::servers::Server::moto();
    shouts_on(&moto.aws_url("sqs", "anywhere", "")).await;
    shouts_on(&moto.aws_url("sns+sqs", "anywhere", "")).await;
}
