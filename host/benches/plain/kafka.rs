//! The plain Kafka loop of the broker benchmark, through `rdkafka`: a
//! worker in a consumer group reads `plain.in` in batches of up to 100,
//! produces each payload to `plain.out` (idempotent, `acks=all`, as Sluice's
//! producer), waits for the broker's acknowledgements, then commits the
//! batch's offsets (outputs before the commit, as Sluice does); a second
//! consumer group reads, counts and commits the outputs.
//!
//! Sluice's pipeline uses fixed topic names, so every phase (each Sluice
//! concurrency and the plain loop) gets a fresh private tansu broker, which
//! keeps messages in memory and is stopped afterwards: `SLUICE_TANSU` or
//! `tansu` on `PATH` (`cargo xtask test` installs it).

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Messages a plain batch handles at once, as the other plain loops.
const BATCH: usize = 100;
/// Partitions of each topic, as Sluice creates them by default.
const PARTITIONS: i32 = 3;
/// How long the worker waits to fill a batch once it has a message.
const FILL: Duration = Duration::from_millis(5);

/// The phase's broker: the process and its port.
static BROKER: Mutex<Option<(Child, u16)>> = Mutex::new(None);

fn tansu() -> std::ffi::OsString {
    std::env::var_os("SLUICE_TANSU").unwrap_or_else(|| "tansu".into())
}

/// Whether the broker can be started here.
pub fn available() -> bool {
    Command::new(tansu())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts a fresh broker for a phase (stopping the last one); its address.
fn fresh_broker() -> Result<String> {
    stop_broker();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listener = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(tansu())
        .args(["broker", "--listener-url", &listener])
        .args(["--advertised-listener-url", &listener])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start tansu")?;
    *BROKER.lock().unwrap() = Some((child, port));
    let give_up = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > give_up {
            bail!("tansu did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(format!("127.0.0.1:{port}"))
}

fn stop_broker() {
    if let Some((mut child, _)) = BROKER.lock().unwrap().take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

pub fn sluice_url(_namespace: &str) -> Result<String> {
    Ok(format!("kafka://{}", fresh_broker()?))
}

/// Stops the phase's broker, and with it everything the phase wrote.
pub async fn clean(_namespace: &str) -> Result<()> {
    stop_broker();
    Ok(())
}

pub struct PlainKafka {
    /// Detached on drop: destroying an rdkafka client connected to tansu
    /// can hang.
    clients: Option<(FutureProducer, StreamConsumer, StreamConsumer)>,
}

impl PlainKafka {
    pub async fn connect(_namespace: &str) -> Result<Self> {
        let address = fresh_broker()?;
        create_topics(&address).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &address)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .create()?;
        let worker = consumer(&address, "work", "plain.in")?;
        let counter = consumer(&address, "count", "plain.out")?;
        Ok(PlainKafka {
            clients: Some((producer, worker, counter)),
        })
    }

    pub async fn publish(&mut self, count: usize, payload: &[u8]) -> Result<()> {
        let (producer, _, _) = self.clients.as_ref().expect("until dropped");
        produce(producer, "plain.in", payload, count).await
    }

    pub async fn process(&mut self, count: usize) -> Result<()> {
        let (producer, worker, counter) = self.clients.as_ref().expect("until dropped");
        let work = async {
            let mut done = 0;
            while done < count {
                let batch = next_batch(worker).await?;
                let acknowledged = batch.iter().map(|payload| {
                    producer.send(
                        FutureRecord::<(), [u8]>::to("plain.out").payload(payload.as_slice()),
                        Duration::from_secs(30),
                    )
                });
                for result in futures::future::join_all(acknowledged).await {
                    result.map_err(|(e, _)| e)?;
                }
                worker.commit_consumer_state(CommitMode::Async)?;
                done += batch.len();
            }
            anyhow::Ok(())
        };
        let counting = async {
            let mut counted = 0;
            while counted < count {
                counted += next_batch(counter).await?.len();
                counter.commit_consumer_state(CommitMode::Async)?;
            }
            anyhow::Ok(())
        };
        tokio::try_join!(work, counting)?;
        Ok(())
    }
}

impl Drop for PlainKafka {
    fn drop(&mut self) {
        if let Some(clients) = self.clients.take() {
            std::thread::spawn(move || drop(clients));
        }
    }
}

/// The loop's topics: the broker creates none on its own.
async fn create_topics(address: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", address)
        .create()?;
    let topics: Vec<NewTopic> = ["plain.in", "plain.out"]
        .iter()
        .map(|name| NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        result.map_err(|(topic, e)| anyhow::anyhow!("cannot create `{topic}`: {e}"))?;
    }
    std::thread::spawn(move || drop(admin));
    Ok(())
}

fn consumer(address: &str, group: &str, topic: &str) -> Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// Publishes `count` copies of the payload, waiting for every
/// acknowledgement.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    payload: &[u8],
    count: usize,
) -> Result<()> {
    for start in (0..count).step_by(1_000) {
        let acknowledged = (start..count.min(start + 1_000)).map(|_| {
            producer.send(
                FutureRecord::<(), [u8]>::to(topic).payload(payload),
                Duration::from_secs(30),
            )
        });
        for result in futures::future::join_all(acknowledged).await {
            result.map_err(|(e, _)| e)?;
        }
    }
    Ok(())
}

/// The payloads of up to [`BATCH`] records: waits for the first (at most
/// the stall limit), then takes what arrives within [`FILL`].
async fn next_batch(consumer: &StreamConsumer) -> Result<Vec<Vec<u8>>> {
    let first = tokio::time::timeout(super::STALL, consumer.recv())
        .await
        .context("no record arrived")??;
    let mut batch = vec![first.payload().unwrap_or_default().to_vec()];
    consumer.store_offset_from_message(&first)?;
    let fill_until = tokio::time::Instant::now() + FILL;
    while batch.len() < BATCH {
        match tokio::time::timeout_at(fill_until, consumer.recv()).await {
            Ok(record) => {
                let record = record?;
                batch.push(record.payload().unwrap_or_default().to_vec());
                consumer.store_offset_from_message(&record)?;
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}
