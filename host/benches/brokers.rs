//! Benchmarks Sluice on the networked backends against a plain client loop
//! doing the same broker work without Sluice, so what the host costs on a
//! real broker shows as a ratio. For Redis Streams and NATS JetStream:
//!
//! - Sluice: a route running the `echo` plugin from `bench.in` to
//!   `bench.out`, and a counting subscription on `bench.out`;
//! - plain: the broker's own client crate reading batches of 100 from an
//!   input stream, writing each to an output stream (pipelined; on
//!   JetStream with a `Nats-Msg-Id` each, as Sluice publishes, so both
//!   sides pay for the server's deduplication), acking the batch, and a
//!   second loop counting (and acking) the outputs.
//!
//! Both get the same pre-published 1 KiB messages and are timed from the
//! start of consuming until the last output is counted. Rates on a shared
//! two-core machine move from run to run (the same plain loop has run at
//! 25k and 52k msgs/s within minutes), so every phase runs in each of
//! several rounds (`SLUICE_BENCH_ROUNDS`, default 3), one round after
//! another. A ratio is taken within each round, between phases that ran
//! minutes apart at most, and the tables give the median round with the
//! lowest and highest beside it. On backends that
//! keep a key with one consumer at a time (SQLite, PostgreSQL, Redis Streams,
//! Kafka, JetStream on a stream with 8 key shards; SQS too, but not on
//! its emulator, see `Broker::ordered_rate_means_something`), an ordered
//! route over 1,000 keys runs too, and its rate is given as a share of the
//! unordered route's at the same concurrency (on JetStream the unordered
//! runs read a stream without shards). Results go to the
//! terminal, to `target/bench/brokers.json` and to an SVG chart beside it.
//!
//! Needs Redis on 127.0.0.1:6379 and NATS with JetStream on 127.0.0.1:4222
//! (a broker that cannot be reached is skipped). Every run uses key
//! prefixes and stream names of its own and deletes them afterwards.
//! `SLUICE_BENCH_BROKER_MESSAGES` (default 20000) sets the messages per
//! run; `SLUICE_BENCH_BROKERS` (e.g. `postgres,kafka`) picks brokers by
//! slug. SQS (feature `sqs`) runs against the endpoint `SLUICE_BENCH_SQS`
//! (default 127.0.0.1:5000, e.g. `moto_server -p 5000`) with fewer
//! messages (see `plain/sqs.rs`); Kafka (feature `kafka`) on a fresh
//! private tansu broker per phase (see `plain/kafka.rs`). Needs the plugins built: `cargo xtask bench` does both.

use std::fmt::Write as _;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use chart::{bar, legend, median, round2, save, svg_open, thousands};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};
use serde_json::json;
use sluice::router::MessageHandler;
use sluice::runtime::Runtime;

#[path = "common/chart.rs"]
mod chart;
#[path = "common/pipeline.rs"]
mod pipeline;
#[cfg(feature = "kafka")]
#[path = "plain/kafka.rs"]
mod plain_kafka;
#[cfg(feature = "postgres")]
#[path = "plain/postgres.rs"]
mod plain_postgres;
#[cfg(feature = "sqlite")]
#[path = "plain/sqlite.rs"]
mod plain_sqlite;
#[cfg(feature = "sqs")]
#[path = "plain/sqs.rs"]
mod plain_sqs;

use pipeline::{INPUT, PAYLOAD_BYTES, Pipeline, echo_handler, positive_env};

/// Workers per route. The router fetches twice its concurrency at a time
/// (at least 128), so at 32 the concurrency also sets how many round trips
/// a message costs.
const CONCURRENCIES: [usize; 3] = [1, 8, 32];
/// Keys of the ordered run, on backends that keep a key with one consumer
/// at a time (`key_affinity`), and the concurrency it is compared at.
const ORDERED_KEYS: usize = 1_000;
const ORDERED_CONCURRENCY: usize = 32;
/// Key shards of the JetStream stream an ordered run reads (`shards=`).
/// One member reads every shard and keeps each key's turn itself, so the
/// count does not limit what is in flight; each shard is a consumer the
/// server works for on every stored message, so fewer run faster (with
/// leases, 64 ran at 0.55 of unordered, 16 at 0.73, 8 at 0.85, 4 at 0.78),
/// and 8 still lets a group of several members divide them.
const JETSTREAM_SHARDS: u32 = 8;
/// Enough for connections, wasm instances and code paths to be warm.
const WARMUP_MESSAGES: usize = 1_000;
/// Publish batch of the plain loops' producers.
const PUBLISH_BATCH: usize = 500;
/// Entries the plain loops read at once, as Sluice's Redis backend does.
const PLAIN_BATCH: usize = 100;
/// Longer than the router's fetch wait and a JetStream pull request, so a
/// paused route has stopped reading before the timed messages go in.
const SETTLE: Duration = Duration::from_millis(1_500);
/// Longest wait for any output before a run is declared stuck.
const STALL: Duration = Duration::from_secs(30);

const SLUICE_COLOURS: [&str; 3] = ["#b7adf7", "#8a78f3", "#654ff0"];
const PLAIN_COLOUR: &str = "#f0883e";

#[tokio::main]
async fn main() -> Result<()> {
    let messages = positive_env("SLUICE_BENCH_BROKER_MESSAGES", 20_000)?;
    let rounds = positive_env("SLUICE_BENCH_ROUNDS", 3)?;
    let runtime = Runtime::new(None)?;
    let handler = echo_handler(&runtime)?;
    let mut results = Vec::new();
    let only = std::env::var("SLUICE_BENCH_BROKERS").ok();
    for &broker in Broker::ALL {
        if let Some(only) = &only
            && !only.split(',').any(|slug| slug.trim() == broker.slug())
        {
            continue;
        }
        if let Err(why) = broker.reachable().await {
            println!("{}: {why}, skipped", broker.name());
            continue;
        }
        results.push(measure(broker, &handler, messages, rounds).await?);
    }
    if results.is_empty() {
        bail!("no broker could be reached");
    }
    print_tables(&results);
    save(
        "brokers",
        &to_json(&results, messages, rounds),
        &to_svg(&results),
    )
}

#[derive(Clone, Copy)]
enum Broker {
    RedisStreams,
    JetStream,
    #[cfg(feature = "postgres")]
    Postgres,
    #[cfg(feature = "sqlite")]
    Sqlite,
    #[cfg(feature = "sqs")]
    Sqs,
    #[cfg(feature = "kafka")]
    Kafka,
}

impl Broker {
    const ALL: &[Broker] = &[
        Broker::RedisStreams,
        Broker::JetStream,
        #[cfg(feature = "postgres")]
        Broker::Postgres,
        #[cfg(feature = "sqlite")]
        Broker::Sqlite,
        #[cfg(feature = "sqs")]
        Broker::Sqs,
        #[cfg(feature = "kafka")]
        Broker::Kafka,
    ];

    fn name(self) -> &'static str {
        match self {
            Broker::RedisStreams => "Redis Streams",
            Broker::JetStream => "NATS JetStream",
            #[cfg(feature = "postgres")]
            Broker::Postgres => "PostgreSQL",
            #[cfg(feature = "sqlite")]
            Broker::Sqlite => "SQLite",
            #[cfg(feature = "sqs")]
            Broker::Sqs => "SQS",
            #[cfg(feature = "kafka")]
            Broker::Kafka => "Kafka (tansu)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Broker::RedisStreams => "redis-streams",
            Broker::JetStream => "jetstream",
            #[cfg(feature = "postgres")]
            Broker::Postgres => "postgres",
            #[cfg(feature = "sqlite")]
            Broker::Sqlite => "sqlite",
            #[cfg(feature = "sqs")]
            Broker::Sqs => "sqs",
            #[cfg(feature = "kafka")]
            Broker::Kafka => "kafka",
        }
    }

    /// The scheme of Sluice's URL for the broker.
    fn scheme(self) -> &'static str {
        match self {
            Broker::RedisStreams => "redis",
            other => other.slug(),
        }
    }

    fn address(self) -> &'static str {
        match self {
            Broker::RedisStreams => "127.0.0.1:6379",
            Broker::JetStream => "127.0.0.1:4222",
            #[cfg(feature = "postgres")]
            Broker::Postgres => plain_postgres::ADDRESS,
            #[cfg(feature = "sqlite")]
            Broker::Sqlite => "a database file per phase",
            #[cfg(feature = "sqs")]
            Broker::Sqs => plain_sqs::address(),
            #[cfg(feature = "kafka")]
            Broker::Kafka => "a private tansu broker per phase",
        }
    }

    /// Why the broker cannot be benchmarked here, if it cannot.
    async fn reachable(self) -> std::result::Result<(), String> {
        #[cfg(feature = "sqlite")]
        if let Broker::Sqlite = self {
            return Ok(());
        }
        #[cfg(feature = "kafka")]
        if let Broker::Kafka = self {
            return match plain_kafka::available() {
                true => Ok(()),
                false => Err("tansu cannot be started (set SLUICE_TANSU or put it on PATH)".into()),
            };
        }
        match tokio::net::TcpStream::connect(self.address()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("nothing listens on {}", self.address())),
        }
    }

    /// The backend URL of a phase; on Kafka, the phase's fresh broker.
    /// An ordered run's URL on JetStream keeps topics in key shards.
    fn sluice_url(self, namespace: &str, ordered: bool) -> Result<String> {
        Ok(match self {
            Broker::RedisStreams => format!("redis://{}/0?prefix={namespace}:", self.address()),
            Broker::JetStream => format!(
                "jetstream://{}?stream_prefix={namespace}{}",
                self.address(),
                if ordered {
                    format!("&shards={JETSTREAM_SHARDS}")
                } else {
                    String::new()
                }
            ),
            #[cfg(feature = "postgres")]
            Broker::Postgres => plain_postgres::sluice_url(namespace),
            #[cfg(feature = "sqlite")]
            Broker::Sqlite => plain_sqlite::sluice_url(namespace),
            #[cfg(feature = "sqs")]
            Broker::Sqs => plain_sqs::sluice_url(namespace),
            #[cfg(feature = "kafka")]
            Broker::Kafka => plain_kafka::sluice_url(namespace)?,
        })
    }

    /// Deletes whatever a run under `namespace` left on the broker.
    async fn clean(self, namespace: &str) -> Result<()> {
        match self {
            Broker::RedisStreams => redis_clean(namespace).await,
            Broker::JetStream => jetstream_clean(namespace).await,
            #[cfg(feature = "postgres")]
            Broker::Postgres => plain_postgres::clean(namespace).await,
            #[cfg(feature = "sqlite")]
            Broker::Sqlite => plain_sqlite::clean(namespace).await,
            #[cfg(feature = "sqs")]
            Broker::Sqs => plain_sqs::clean(namespace).await,
            #[cfg(feature = "kafka")]
            Broker::Kafka => plain_kafka::clean(namespace).await,
        }
    }

    /// What a message's journey costs in durability, the same on both
    /// sides, for the output.
    fn durability(self) -> &'static str {
        match self {
            Broker::RedisStreams => {
                "the server's own settings on both sides; outputs XADDed before the input is XACKed"
            }
            Broker::JetStream => {
                "file streams; every output published with its own Nats-Msg-Id (deduplicated by the server) and confirmed by its PubAck before the input is acked, on both sides"
            }
            #[cfg(feature = "postgres")]
            Broker::Postgres => {
                "every payload to the client and back; input consumed and outputs written in one transaction, synchronous_commit=off, plain TCP (no TLS), on both sides"
            }
            #[cfg(feature = "sqlite")]
            Broker::Sqlite => {
                "WAL, synchronous=FULL (an fsync per commit); outputs committed before (or with) the input's removal, on both sides"
            }
            #[cfg(feature = "sqs")]
            Broker::Sqs => "SendMessageBatch confirmed before DeleteMessageBatch, on both sides",
            #[cfg(feature = "kafka")]
            Broker::Kafka => {
                "idempotent producer, acks=all; offsets committed after the outputs are acknowledged, on both sides"
            }
        }
    }

    /// The timed messages of a run: as requested, or fewer for an emulator
    /// that slows down as its queues grow.
    fn messages(self, requested: usize) -> Result<usize> {
        #[cfg(feature = "sqs")]
        if let Broker::Sqs = self {
            return plain_sqs::messages(requested);
        }
        Ok(requested)
    }

    /// Whether an ordered run measures the route rather than the server:
    /// not on the SQS emulator, whose FIFO queues (what an ordered group
    /// reads there) slow down with the square of what they hold.
    fn ordered_rate_means_something(self) -> bool {
        #[cfg(feature = "sqs")]
        if let Broker::Sqs = self {
            return false;
        }
        true
    }

    fn warmup_messages(self) -> usize {
        #[cfg(feature = "sqs")]
        if let Broker::Sqs = self {
            return plain_sqs::WARMUP;
        }
        WARMUP_MESSAGES
    }
}

/// A name no other run shares: the servers are shared, and a leftover of
/// an earlier run must not be read as this one's.
fn namespace(broker: Broker, phase: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let slug = broker.slug().replace('-', "");
    format!("sluicebench{slug}{}x{nanos}{phase}", std::process::id())
}

struct BrokerResult {
    broker: Broker,
    /// Timed messages per run.
    messages: usize,
    rounds: Vec<Round>,
}

/// The rates (msgs/s) of one round, whose phases ran one after another.
struct Round {
    /// At each router concurrency.
    sluice: Vec<(usize, f64)>,
    /// An ordered route over [`ORDERED_KEYS`] keys at
    /// [`ORDERED_CONCURRENCY`], where the backend has key affinity.
    ordered: Option<f64>,
    plain: f64,
}

impl Round {
    fn sluice_at(&self, concurrency: usize) -> Option<f64> {
        self.sluice
            .iter()
            .find(|(c, _)| *c == concurrency)
            .map(|(_, rate)| *rate)
    }

    /// The ordered route's rate over the unordered one's, at the same
    /// concurrency.
    fn ordered_over_unordered(&self) -> Option<f64> {
        Some(self.ordered? / self.sluice_at(ORDERED_CONCURRENCY)?)
    }
}

/// The median of what each round gives (the upper one of an even count),
/// with the lowest and highest; `None` if no round gives one.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    low: f64,
    high: f64,
}

impl Spread {
    fn of(rounds: &[Round], value: impl Fn(&Round) -> Option<f64>) -> Option<Spread> {
        let mut values: Vec<f64> = rounds.iter().filter_map(value).collect();
        Some(Spread {
            median: median(&mut values)?,
            low: *values.first()?,
            high: *values.last()?,
        })
    }

    /// `median (low-high)`, each written by `show`; the median alone for
    /// one round.
    fn show(&self, show: impl Fn(f64) -> String) -> String {
        if self.low == self.high {
            return show(self.median);
        }
        format!(
            "{} ({}-{})",
            show(self.median),
            show(self.low),
            show(self.high)
        )
    }
}

impl BrokerResult {
    fn sluice(&self, concurrency: usize) -> Option<Spread> {
        Spread::of(&self.rounds, |round| round.sluice_at(concurrency))
    }

    /// Sluice over the plain loop of the same round.
    fn sluice_over_plain(&self, concurrency: usize) -> Option<Spread> {
        Spread::of(&self.rounds, |round| {
            Some(round.sluice_at(concurrency)? / round.plain)
        })
    }

    fn plain(&self) -> Option<Spread> {
        Spread::of(&self.rounds, |round| Some(round.plain))
    }

    fn ordered(&self) -> Option<Spread> {
        Spread::of(&self.rounds, |round| round.ordered)
    }

    fn ordered_over_unordered(&self) -> Option<Spread> {
        Spread::of(&self.rounds, Round::ordered_over_unordered)
    }
}

/// `rounds` rounds of every phase, one round after another.
async fn measure(
    broker: Broker,
    handler: &Arc<dyn MessageHandler>,
    messages: usize,
    rounds: usize,
) -> Result<BrokerResult> {
    let messages = broker.messages(messages)?;
    let mut done = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        println!("{}: round {round} of {rounds}", broker.name());
        done.push(measure_round(broker, handler, messages).await?);
    }
    Ok(BrokerResult {
        broker,
        messages,
        rounds: done,
    })
}

/// Every Sluice concurrency, the ordered route, then the plain loop, each
/// on fresh keys.
async fn measure_round(
    broker: Broker,
    handler: &Arc<dyn MessageHandler>,
    messages: usize,
) -> Result<Round> {
    let mut sluice = Vec::new();
    for concurrency in CONCURRENCIES {
        let namespace = namespace(broker, &format!("c{concurrency}"));
        let rate = sluice_rate(broker, &namespace, handler, concurrency, messages, None).await;
        // Cleaned even when the run failed; the run's error matters more.
        let cleaned = broker.clean(&namespace).await;
        sluice.push((concurrency, rate?));
        cleaned?;
    }
    let keyed = namespace(broker, "ordered");
    // Asked of the scheme (a Kafka URL starts a broker), with JetStream's
    // shards.
    let ordered_caps = match broker {
        Broker::JetStream => format!("jetstream://localhost?shards={JETSTREAM_SHARDS}"),
        _ => broker.scheme().to_string(),
    };
    let ordered = match sluice::backend::capabilities_of(&ordered_caps) {
        Some(caps) if caps.key_affinity && broker.ordered_rate_means_something() => {
            let keys = Some(ORDERED_KEYS);
            let rate =
                sluice_rate(broker, &keyed, handler, ORDERED_CONCURRENCY, messages, keys).await;
            let cleaned = broker.clean(&keyed).await;
            let rate = rate?;
            cleaned?;
            Some(rate)
        }
        _ => None,
    };
    let namespace = namespace(broker, "plain");
    let plain = plain_rate(broker, &namespace, messages).await;
    let cleaned = broker.clean(&namespace).await;
    let plain = plain?;
    cleaned?;
    Ok(Round {
        sluice,
        ordered,
        plain,
    })
}

async fn sluice_rate(
    broker: Broker,
    namespace: &str,
    handler: &Arc<dyn MessageHandler>,
    concurrency: usize,
    messages: usize,
    keys: Option<usize>,
) -> Result<f64> {
    let ordered = match keys {
        Some(keys) => format!(", ordered over {keys} keys"),
        None => String::new(),
    };
    let phase = format!(
        "{}, sluice, concurrency {concurrency}{ordered}:",
        broker.name()
    );
    if let Broker::JetStream = broker {
        refuse_foreign_stream().await?;
    }
    println!("{phase} warming up…");
    let backend = sluice::backend::connect(&broker.sluice_url(namespace, keys.is_some())?).await?;
    let mut run = Pipeline::start(backend, handler.clone(), concurrency, keys).await?;
    run.publish(broker.warmup_messages()).await?;
    run.collect(broker.warmup_messages()).await?;
    run.control.pause_and_wait(SETTLE).await;
    // A JetStream pull request already sent may still bring messages in.
    tokio::time::sleep(SETTLE).await;
    println!(
        "{phase} publishing {} messages…",
        thousands(messages as f64)
    );
    run.publish(messages).await?;
    println!("{phase} consuming…");
    let started = Instant::now();
    run.control.resume();
    run.collect(messages).await?;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    run.stop().await?;
    println!("{phase} {} msgs/s", thousands(rate));
    Ok(rate)
}

/// Sluice's JetStream backend uses whatever stream already keeps a topic:
/// one left on the shared server would bring old messages into the count.
async fn refuse_foreign_stream() -> Result<()> {
    let client = async_nats::connect(Broker::JetStream.address()).await?;
    let js = jetstream::new(client);
    if let Ok(stream) = js.stream_by_subject(INPUT).await {
        bail!("JetStream stream `{stream}` already keeps `{INPUT}`; delete it to run this bench");
    }
    Ok(())
}

/// A route from `bench.in` to `bench.out` and a consumer of `bench.out`
/// feeding a channel, on one backend.
/// The same payload the Sluice pipeline gets.
fn payload() -> Vec<u8> {
    pipeline::message().payload
}

/// The plain loop: warmed up on a first batch, then timed on the second.
async fn plain_rate(broker: Broker, namespace: &str, messages: usize) -> Result<f64> {
    let phase = format!("{}, plain client:", broker.name());
    println!("{phase} warming up…");
    let mut plain = Plain::connect(broker, namespace).await?;
    plain.publish(broker.warmup_messages()).await?;
    plain.process(broker.warmup_messages()).await?;
    println!(
        "{phase} publishing {} messages…",
        thousands(messages as f64)
    );
    plain.publish(messages).await?;
    println!("{phase} consuming…");
    let started = Instant::now();
    plain.process(messages).await?;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    println!("{phase} {} msgs/s", thousands(rate));
    Ok(rate)
}

enum Plain {
    // Boxed: they are large, and unequal in size.
    Redis(Box<PlainRedis>),
    JetStream(Box<PlainJetStream>),
    #[cfg(feature = "postgres")]
    Postgres(Box<plain_postgres::PlainPostgres>),
    #[cfg(feature = "sqlite")]
    Sqlite(Box<plain_sqlite::PlainSqlite>),
    #[cfg(feature = "sqs")]
    Sqs(Box<plain_sqs::PlainSqs>),
    #[cfg(feature = "kafka")]
    Kafka(Box<plain_kafka::PlainKafka>),
}

impl Plain {
    async fn connect(broker: Broker, namespace: &str) -> Result<Self> {
        Ok(match broker {
            Broker::RedisStreams => Plain::Redis(Box::new(PlainRedis::connect(namespace).await?)),
            Broker::JetStream => {
                Plain::JetStream(Box::new(PlainJetStream::connect(namespace).await?))
            }
            #[cfg(feature = "postgres")]
            Broker::Postgres => Plain::Postgres(Box::new(
                plain_postgres::PlainPostgres::connect(namespace).await?,
            )),
            #[cfg(feature = "sqlite")]
            Broker::Sqlite => Plain::Sqlite(Box::new(
                plain_sqlite::PlainSqlite::connect(namespace).await?,
            )),
            #[cfg(feature = "sqs")]
            Broker::Sqs => Plain::Sqs(Box::new(plain_sqs::PlainSqs::connect(namespace).await?)),
            #[cfg(feature = "kafka")]
            Broker::Kafka => {
                Plain::Kafka(Box::new(plain_kafka::PlainKafka::connect(namespace).await?))
            }
        })
    }

    async fn publish(&mut self, count: usize) -> Result<()> {
        match self {
            Plain::Redis(plain) => plain.publish(count).await,
            Plain::JetStream(plain) => plain.publish(count).await,
            #[cfg(feature = "postgres")]
            Plain::Postgres(plain) => plain.publish(count, &payload()).await,
            #[cfg(feature = "sqlite")]
            Plain::Sqlite(plain) => plain.publish(count, &payload()).await,
            #[cfg(feature = "sqs")]
            Plain::Sqs(plain) => plain.publish(count, &payload()).await,
            #[cfg(feature = "kafka")]
            Plain::Kafka(plain) => plain.publish(count, &payload()).await,
        }
    }

    /// Moves `count` messages from input to output and counts them there;
    /// the two loops run at once, as Sluice's route and counter do.
    async fn process(&mut self, count: usize) -> Result<()> {
        match self {
            Plain::Redis(plain) => plain.process(count).await,
            Plain::JetStream(plain) => plain.process(count).await,
            #[cfg(feature = "postgres")]
            Plain::Postgres(plain) => plain.process(count).await,
            #[cfg(feature = "sqlite")]
            Plain::Sqlite(plain) => plain.process(count).await,
            #[cfg(feature = "sqs")]
            Plain::Sqs(plain) => plain.process(count).await,
            #[cfg(feature = "kafka")]
            Plain::Kafka(plain) => plain.process(count).await,
        }
    }
}

/// Redis Streams through the `redis` crate: XREADGROUP, XADD, XACK.
struct PlainRedis {
    input: String,
    output: String,
    /// One connection per loop: a blocking XREADGROUP holds up whatever is
    /// queued behind it on a multiplexed connection.
    publisher: MultiplexedConnection,
    worker: MultiplexedConnection,
    counter: MultiplexedConnection,
}

const WORK_GROUP: &str = "work";
const COUNT_GROUP: &str = "count";

impl PlainRedis {
    async fn connect(namespace: &str) -> Result<Self> {
        let client = redis::Client::open(format!("redis://{}/0", Broker::RedisStreams.address()))?;
        let mut publisher = redis_connection(&client).await?;
        let worker = redis_connection(&client).await?;
        let counter = redis_connection(&client).await?;
        let input = format!("{namespace}:plain.in");
        let output = format!("{namespace}:plain.out");
        for (stream, group) in [(&input, WORK_GROUP), (&output, COUNT_GROUP)] {
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async::<()>(&mut publisher)
                .await?;
        }
        Ok(PlainRedis {
            input,
            output,
            publisher,
            worker,
            counter,
        })
    }

    async fn publish(&mut self, count: usize) -> Result<()> {
        let payload = payload();
        let mut left = count;
        while left > 0 {
            let batch = left.min(PUBLISH_BATCH);
            let mut pipe = redis::pipe();
            for _ in 0..batch {
                pipe.cmd("XADD")
                    .arg(&self.input)
                    .arg("*")
                    .arg("payload")
                    .arg(&payload)
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.publisher).await?;
            left -= batch;
        }
        Ok(())
    }

    async fn process(&mut self, count: usize) -> Result<()> {
        let work = redis_work(&mut self.worker, &self.input, &self.output, count);
        let counting = redis_count(&mut self.counter, &self.output, count);
        tokio::try_join!(work, counting)?;
        Ok(())
    }
}

async fn redis_connection(client: &redis::Client) -> Result<MultiplexedConnection> {
    // No response timeout: XREADGROUP BLOCK answers late on purpose.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// Reads a batch, writes each entry's payload to the output and acks the
/// batch, all in one pipeline: outputs before the ack, as Sluice does.
async fn redis_work(
    conn: &mut MultiplexedConnection,
    input: &str,
    output: &str,
    count: usize,
) -> Result<()> {
    let mut done = 0;
    while done < count {
        let entries = read_group(conn, input, WORK_GROUP, count - done).await?;
        if entries.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for entry in &entries {
            let Some(redis::Value::BulkString(payload)) = entry.map.get("payload") else {
                bail!("entry {} of {input} has no payload", entry.id);
            };
            pipe.cmd("XADD")
                .arg(output)
                .arg("*")
                .arg("payload")
                .arg(payload)
                .ignore();
        }
        pipe.cmd("XACK")
            .arg(input)
            .arg(WORK_GROUP)
            .arg(ids(&entries))
            .ignore();
        pipe.query_async::<()>(&mut *conn).await?;
        done += entries.len();
    }
    Ok(())
}

async fn redis_count(conn: &mut MultiplexedConnection, output: &str, count: usize) -> Result<()> {
    let mut counted = 0;
    while counted < count {
        let entries = read_group(conn, output, COUNT_GROUP, count - counted).await?;
        if entries.is_empty() {
            continue;
        }
        redis::cmd("XACK")
            .arg(output)
            .arg(COUNT_GROUP)
            .arg(ids(&entries))
            .query_async::<()>(&mut *conn)
            .await?;
        counted += entries.len();
    }
    Ok(())
}

/// Up to [`PLAIN_BATCH`] (and `left`) new entries for `group`; none if
/// nothing came for a second.
async fn read_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    left: usize,
) -> Result<Vec<StreamId>> {
    let reply: Option<StreamReadReply> = tokio::time::timeout(
        STALL,
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("bench")
            .arg("COUNT")
            .arg(left.min(PLAIN_BATCH))
            .arg("BLOCK")
            .arg(1_000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut *conn),
    )
    .await
    .map_err(|_| anyhow!("XREADGROUP on {stream} did not answer for {STALL:?}"))??;
    Ok(reply
        .map(|r| r.keys.into_iter().flat_map(|key| key.ids).collect())
        .unwrap_or_default())
}

fn ids(entries: &[StreamId]) -> Vec<&str> {
    entries.iter().map(|entry| entry.id.as_str()).collect()
}

/// Removes every key under the namespace (SCAN, never FLUSHALL: the
/// server is shared).
async fn redis_clean(namespace: &str) -> Result<()> {
    let client = redis::Client::open(format!("redis://{}/0", Broker::RedisStreams.address()))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// JetStream through `async-nats`: a stream of its own with a pull
/// consumer on the input and another on the output.
struct PlainJetStream {
    js: jetstream::Context,
    input: String,
    output: String,
    work: jetstream::consumer::Consumer<pull::Config>,
    count: jetstream::consumer::Consumer<pull::Config>,
}

impl PlainJetStream {
    async fn connect(namespace: &str) -> Result<Self> {
        let client = async_nats::connect(Broker::JetStream.address()).await?;
        let js = jetstream::new(client);
        let input = format!("{namespace}.in");
        let output = format!("{namespace}.out");
        // File storage and default limits, like the streams Sluice makes.
        let stream = js
            .create_stream(jetstream::stream::Config {
                name: format!("{namespace}_plain"),
                subjects: vec![input.clone(), output.clone()],
                ..Default::default()
            })
            .await?;
        let consumer = |name: &str, subject: &str| pull::Config {
            durable_name: Some(name.into()),
            filter_subject: subject.into(),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        };
        let work = stream.create_consumer(consumer("work", &input)).await?;
        let count = stream.create_consumer(consumer("count", &output)).await?;
        Ok(PlainJetStream {
            js,
            input,
            output,
            work,
            count,
        })
    }

    async fn publish(&mut self, count: usize) -> Result<()> {
        let payload = payload();
        let mut left = count;
        while left > 0 {
            let batch = left.min(PUBLISH_BATCH);
            let mut acks = Vec::with_capacity(batch);
            for _ in 0..batch {
                let payload = payload.clone().into();
                acks.push(self.js.publish(self.input.clone(), payload).await?);
            }
            futures::future::try_join_all(acks.into_iter().map(IntoFuture::into_future)).await?;
            left -= batch;
        }
        Ok(())
    }

    async fn process(&mut self, count: usize) -> Result<()> {
        tokio::try_join!(self.work_loop(count), self.count_loop(count))?;
        Ok(())
    }

    /// Fetches a batch, publishes each payload (with a `Nats-Msg-Id`, so a
    /// retried publish is stored once) and awaits the PubAcks together, then
    /// acks the batch.
    async fn work_loop(&self, count: usize) -> Result<()> {
        let mut done = 0;
        while done < count {
            let mut batch = self
                .work
                .batch()
                .max_messages((count - done).min(PLAIN_BATCH))
                .expires(Duration::from_secs(1))
                .messages()
                .await?;
            let mut messages = Vec::new();
            while let Some(message) = batch.next().await {
                messages.push(message.map_err(|e| anyhow!(e))?);
            }
            let mut acks = Vec::with_capacity(messages.len());
            for message in &messages {
                // A fresh id per output, as Sluice gives each: the server
                // stores a publish retried after a lost PubAck once.
                let publish = PublishMessage::build()
                    .payload(message.payload.clone())
                    .message_id(uuid::Uuid::now_v7().to_string());
                acks.push(self.js.send_publish(self.output.clone(), publish).await?);
            }
            futures::future::try_join_all(acks.into_iter().map(IntoFuture::into_future)).await?;
            for message in &messages {
                message.ack().await.map_err(|e| anyhow!(e))?;
            }
            done += messages.len();
        }
        Ok(())
    }

    async fn count_loop(&self, count: usize) -> Result<()> {
        let mut counted = 0;
        while counted < count {
            let mut batch = self
                .count
                .batch()
                .max_messages((count - counted).min(PLAIN_BATCH))
                .expires(Duration::from_secs(1))
                .messages()
                .await?;
            // Acked as each arrives: outputs trickle in while the worker runs.
            while let Some(message) = batch.next().await {
                message
                    .map_err(|e| anyhow!(e))?
                    .ack()
                    .await
                    .map_err(|e| anyhow!(e))?;
                counted += 1;
            }
        }
        Ok(())
    }
}

/// A hand-written queue polls; a short sleep on an empty table keeps the
/// poll from starving the other loop.
async fn idle_if_empty(rows: usize) {
    if rows == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A polling counter took `rows` outputs: fails once none has come for
/// [`STALL`], and idles a moment after an empty poll.
async fn counted(rows: usize, last_output: &mut Instant) -> Result<()> {
    if rows > 0 {
        *last_output = Instant::now();
    } else if last_output.elapsed() > STALL {
        bail!("no output for {STALL:?}");
    }
    idle_if_empty(rows).await;
    Ok(())
}

/// Deletes the streams made under the namespace (consumers go with them).
async fn jetstream_clean(namespace: &str) -> Result<()> {
    let client = async_nats::connect(Broker::JetStream.address()).await?;
    let js = jetstream::new(client);
    let mut names = js.stream_names();
    let mut ours = Vec::new();
    while let Some(name) = names.next().await {
        let name = name?;
        if name.starts_with(namespace) {
            ours.push(name);
        }
    }
    for name in ours {
        js.delete_stream(&name).await?;
    }
    Ok(())
}

fn print_tables(results: &[BrokerResult]) {
    println!();
    let ratio = |r: f64| format!("{r:.2}");
    let rate = |r: f64| thousands(r);
    for result in results {
        println!(
            "{}: {} messages of {PAYLOAD_BYTES} B, msgs/s (higher is better), \
             median of {} rounds (lowest-highest)",
            result.broker.name(),
            thousands(result.messages as f64),
            result.rounds.len()
        );
        println!("  durability: {}", result.broker.durability());
        println!("  route: echo plugin, batch_size {}", pipeline::BATCH_SIZE);
        println!(
            "  {:>11}  {:>24}  {:>24}  {:>18}",
            "concurrency", "sluice", "plain client", "sluice/plain"
        );
        let plain = result.plain().map_or_else(String::new, |p| p.show(rate));
        for concurrency in CONCURRENCIES {
            let (Some(sluice), Some(over)) = (
                result.sluice(concurrency),
                result.sluice_over_plain(concurrency),
            ) else {
                continue;
            };
            println!(
                "  {concurrency:>11}  {:>24}  {plain:>24}  {:>18}",
                sluice.show(rate),
                over.show(ratio)
            );
        }
        if let (Some(ordered), Some(over)) = (result.ordered(), result.ordered_over_unordered()) {
            println!(
                "  ordered over {ORDERED_KEYS} keys, concurrency {ORDERED_CONCURRENCY}: {} msgs/s, \
                 {} of unordered",
                ordered.show(rate),
                over.show(ratio)
            );
        }
        println!();
    }
}

/// The medians (rates rounded, ratios to two places), and every round's
/// own figures under `rounds`.
fn to_json(results: &[BrokerResult], messages: usize, rounds: usize) -> serde_json::Value {
    let median = |spread: Option<Spread>, show: fn(f64) -> f64| spread.map(|s| show(s.median));
    let brokers: Vec<_> = results
        .iter()
        .map(|result| {
            let sluice: Vec<_> = CONCURRENCIES
                .iter()
                .map(|&concurrency| {
                    json!({
                        "concurrency": concurrency,
                        "msgs_per_sec": median(result.sluice(concurrency), f64::round),
                        "sluice_over_plain": median(result.sluice_over_plain(concurrency), round2),
                    })
                })
                .collect();
            let each: Vec<_> = result
                .rounds
                .iter()
                .map(|round| {
                    json!({
                        "sluice": round.sluice.iter().map(|(concurrency, rate)| json!({
                            "concurrency": concurrency,
                            "msgs_per_sec": rate.round(),
                        })).collect::<Vec<_>>(),
                        "ordered_msgs_per_sec": round.ordered.map(f64::round),
                        "plain_msgs_per_sec": round.plain.round(),
                    })
                })
                .collect();
            json!({
                "broker": result.broker.slug(),
                "durability": result.broker.durability(),
                "messages": result.messages,
                "plain_msgs_per_sec": median(result.plain(), f64::round),
                "sluice": sluice,
                "ordered": result.ordered().map(|rate| json!({
                    "keys": ORDERED_KEYS,
                    "concurrency": ORDERED_CONCURRENCY,
                    "msgs_per_sec": rate.median.round(),
                    "ordered_over_unordered": median(result.ordered_over_unordered(), round2),
                })),
                "rounds": each,
            })
        })
        .collect();
    json!({
        "payload_bytes": PAYLOAD_BYTES,
        "messages_per_run": messages,
        "rounds": rounds,
        "warmup_messages": WARMUP_MESSAGES,
        "plain_batch": PLAIN_BATCH,
        "brokers": brokers,
    })
}

const PANEL_WIDTH: f64 = 420.0;
const PANEL_HEIGHT: f64 = 300.0;
const MARGIN: f64 = 30.0;
const TOP: f64 = 80.0;

/// A panel per broker: a bar per Sluice concurrency, then the plain loop.
fn to_svg(results: &[BrokerResult]) -> String {
    let width = MARGIN + results.len() as f64 * (PANEL_WIDTH + MARGIN);
    let height = TOP + PANEL_HEIGHT + MARGIN;
    let title = format!(
        "Sluice (echo plugin) vs a plain client loop, {PAYLOAD_BYTES} B, msgs/s, median of rounds"
    );
    let mut svg = svg_open(width, height, MARGIN, &title);
    let mut entries: Vec<(String, &str)> = CONCURRENCIES
        .iter()
        .zip(SLUICE_COLOURS)
        .map(|(concurrency, colour)| (format!("sluice, concurrency {concurrency}"), colour))
        .collect();
    entries.push(("plain client".into(), PLAIN_COLOUR));
    let entries: Vec<(&str, &str)> = entries.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    svg.push_str(&legend(MARGIN, 50.0, &entries));
    for (index, result) in results.iter().enumerate() {
        let x = MARGIN + index as f64 * (PANEL_WIDTH + MARGIN);
        svg.push_str(&panel(result, x, TOP));
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(result: &BrokerResult, x: f64, y: f64) -> String {
    let plot_top = y + 40.0;
    let baseline = y + PANEL_HEIGHT - 40.0;
    let median = |spread: Option<Spread>| spread.map_or(0.0, |s| s.median);
    let mut bars: Vec<(String, f64, &str)> = CONCURRENCIES
        .iter()
        .zip(SLUICE_COLOURS)
        .map(|(&concurrency, colour)| {
            let rate = median(result.sluice(concurrency));
            (format!("c{concurrency}"), rate, colour)
        })
        .collect();
    bars.push(("plain".into(), median(result.plain()), PLAIN_COLOUR));
    // Headroom above the tallest bar for its value label.
    let max = bars.iter().map(|(_, v, _)| *v).fold(0.0, f64::max) * 1.1;
    let scale = if max > 0.0 {
        (baseline - plot_top) / max
    } else {
        0.0
    };
    let slot = PANEL_WIDTH / bars.len() as f64;
    let bar_width = (slot * 0.6).min(70.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" font-size="14">{}</text><line x1="{x}" y1="{baseline}" x2="{}" y2="{baseline}" stroke="#333333"/>"##,
        x + PANEL_WIDTH / 2.0,
        y + 10.0,
        result.broker.name(),
        x + PANEL_WIDTH
    );
    for (index, (label, value, colour)) in bars.iter().enumerate() {
        let centre = x + slot * (index as f64 + 0.5);
        svg.push_str(&bar(
            centre - bar_width / 2.0,
            bar_width,
            baseline,
            *value,
            value * scale,
            colour,
        ));
        let _ = writeln!(
            svg,
            r#"<text x="{centre}" y="{}" text-anchor="middle">{label}</text>"#,
            baseline + 18.0
        );
    }
    svg
}
