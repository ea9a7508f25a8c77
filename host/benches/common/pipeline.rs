//! What both benchmarks run: one route from `bench.in` to `bench.out` on a
//! backend, with a consumer of `bench.out` counting the outputs, plus the
//! echo plugin and the message they feed it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use sluice::Message;
use sluice::backend::{Backend, Settlement, SubscribeOptions, Subscription};
use sluice::router::{MessageHandler, Route, RouteControl, RouteSpec, RouteStats, WasmHandler};
use sluice::runtime::{PluginSettings, Runtime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::chart::workspace_root;

/// The allocator the `sluice` binary runs on, so a route here costs what it
/// costs there.
#[global_allocator]
static ALLOCATOR: sluice::Allocator = sluice::Allocator;

pub const INPUT: &str = "bench.in";
pub const OUTPUT: &str = "bench.out";
pub const PAYLOAD_BYTES: usize = 1024;
/// Messages per handler call (the echo plugin exports `handle-batch`; the
/// native handler gets the same batches, one call per message).
pub const BATCH_SIZE: usize = 64;
const PUBLISH_BATCH: usize = 100;
/// Longest wait for any output before a run is declared stuck.
const STALL: Duration = Duration::from_secs(30);

/// A positive number from the environment, or `default`.
pub fn positive_env(name: &str, default: usize) -> Result<usize> {
    let Ok(value) = std::env::var(name) else {
        return Ok(default);
    };
    match value.parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{name} must be a positive number, not `{value}`"),
    }
}

/// The `echo` plugin, publishing to `bench.out`.
pub fn echo_handler(runtime: &Runtime) -> Result<Arc<dyn MessageHandler>> {
    let path = workspace_root().join("plugins/target/wasm32-wasip2/release/echo.wasm");
    println!("loading {}", path.display());
    let mut settings = PluginSettings::new("echo");
    settings.config.insert("output".into(), OUTPUT.into());
    settings.publish_to = vec![OUTPUT.into()];
    let plugin = runtime
        .load_file(&path, settings)
        .context("the plugins must be built first (cargo xtask plugins)")?;
    Ok(Arc::new(WasmHandler::new(Arc::new(plugin))))
}

/// A 1 KiB message for `bench.in`.
pub fn message() -> Message {
    let payload: Vec<u8> = (0..PAYLOAD_BYTES).map(|i| b'a' + (i % 26) as u8).collect();
    Message::new(INPUT, payload)
}

/// `count` messages in publish batches, built before any clock starts;
/// with `keys`, the messages take that many keys in turn.
pub fn batches(count: usize, keys: Option<usize>) -> Vec<Vec<Message>> {
    let messages: Vec<Message> = (0..count)
        .map(|i| {
            let mut message = message();
            message.key = keys.map(|keys| format!("key-{}", i % keys));
            message
        })
        .collect();
    messages
        .chunks(PUBLISH_BATCH)
        .map(<[Message]>::to_vec)
        .collect()
}

/// A running route and its output counter.
pub struct Pipeline {
    pub backend: Arc<dyn Backend>,
    pub stats: Arc<RouteStats>,
    pub control: Arc<RouteControl>,
    shutdown: CancellationToken,
    route: JoinHandle<Result<()>>,
    counter: JoinHandle<Result<()>>,
    outputs: mpsc::UnboundedReceiver<usize>,
    /// The keys inputs take in turn, on an ordered route.
    pub keys: Option<usize>,
}

impl Pipeline {
    /// With `keys`, the route is ordered and its inputs take that many keys
    /// in turn.
    pub async fn start(
        backend: Arc<dyn Backend>,
        handler: Arc<dyn MessageHandler>,
        concurrency: usize,
        keys: Option<usize>,
    ) -> Result<Self> {
        let shutdown = CancellationToken::new();
        // Both groups are joined before anything is published: the memory
        // backend keeps nothing for a group that does not exist yet.
        let subscription = backend
            .subscribe(SubscribeOptions::new(vec![OUTPUT.into()], "bench-counter"))
            .await?;
        let (sender, outputs) = mpsc::unbounded_channel();
        let counter = tokio::spawn(count(subscription, sender, shutdown.clone()));
        let stats = Arc::new(RouteStats::default());
        let route = Route {
            spec: RouteSpec {
                concurrency,
                batch_size: BATCH_SIZE,
                ordered: keys.is_some(),
                ..RouteSpec::new("bench", SubscribeOptions::new(vec![INPUT.into()], "bench"))
            },
            source: backend.clone(),
            outputs: vec![backend.clone()],
            dead_letters: None,
            handler,
            stats: stats.clone(),
        };
        let control = Arc::new(RouteControl::default());
        let subscribed = route.subscribe().await?;
        let route = tokio::spawn(subscribed.run_with(shutdown.clone(), control.clone()));
        Ok(Pipeline {
            backend,
            stats,
            control,
            shutdown,
            route,
            counter,
            outputs,
            keys,
        })
    }

    /// Publishes `count` messages, a batch at a time.
    pub async fn publish(&self, count: usize) -> Result<()> {
        for batch in batches(count, self.keys) {
            self.backend.publish(batch).await?;
        }
        Ok(())
    }

    /// Waits for `count` outputs. Every input yields one output and nothing
    /// fails, so none is left over from an earlier phase.
    pub async fn collect(&mut self, count: usize) -> Result<()> {
        let mut counted = 0;
        while counted < count {
            counted += tokio::time::timeout(STALL, self.outputs.recv())
                .await
                .map_err(|_| anyhow!("no output for {STALL:?}; route: {}", self.stats.snapshot()))?
                .context("the output counter stopped")?;
        }
        Ok(())
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.route.await??;
        self.counter.await??;
        Ok(())
    }
}

/// Acknowledges every output and reports how many came. The acks of a
/// batch go out together, and the count once per batch: one at a time, the
/// counter would be what is measured.
async fn count(
    subscription: Box<dyn Subscription>,
    sender: mpsc::UnboundedSender<usize>,
    shutdown: CancellationToken,
) -> Result<()> {
    while !shutdown.is_cancelled() {
        let deliveries = subscription.fetch(256, Duration::from_millis(100)).await?;
        if deliveries.is_empty() {
            continue;
        }
        let acks = deliveries.iter().map(|d| (d, Settlement::Ack)).collect();
        for result in subscription.settle(acks).await {
            result?;
        }
        // Nobody listening means the run is stopping.
        let _ = sender.send(deliveries.len());
    }
    subscription.close().await
}
