//! What a route calls for each message: a WebAssembly plugin in production,
//! or a native function (benchmarks compare the two on the same pipeline).

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;

use crate::deploy::PluginSlot;
use crate::message::{Message, headers};
use crate::request::Requester;
use crate::runtime::{BatchError, CallError, Gate, Instance, Outcome, Plugin, RouteLink, Share};

/// Makes one [`Worker`] per concurrent slot of a route.
pub trait MessageHandler: Send + Sync + 'static {
    fn worker(&self) -> Box<dyn Worker>;
    /// For logs: plugin name and version.
    fn describe(&self) -> String;
}

/// Per-worker state (a warm instance), used by one task at a time.
#[async_trait]
pub trait Worker: Send {
    async fn handle(&mut self, message: &Message, attempt: u32) -> Result<Outcome, CallError>;

    /// Handles several messages (each with its attempt), answering for each
    /// in order. The default calls [`Worker::handle`] for each; a worker
    /// that can hand the whole batch to one call overrides it.
    async fn handle_batch(&mut self, batch: &[(&Message, u32)]) -> Vec<Result<Outcome, CallError>> {
        one_by_one(self, batch).await
    }

    /// The name and version of what handles the messages, for the delivery
    /// spans.
    fn plugin(&self) -> (String, String) {
        ("native".into(), "-".into())
    }
}

/// Runs the current version of a WebAssembly plugin, keeping one warm
/// instance per worker. Each handler (one per route) draws its own share
/// of the CPU, so its calls cannot starve another route's.
pub struct WasmHandler {
    pub slot: Arc<PluginSlot>,
    share: Share,
    /// What the plugin's calls reach of the route.
    link: RouteLink,
}

impl WasmHandler {
    /// A handler over a slot of its own holding `plugin`.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        let name = plugin.settings.name.clone();
        Self::over(Arc::new(PluginSlot::new(name, plugin, "loaded")))
    }

    /// A handler running whatever version `slot` holds.
    pub fn over(slot: Arc<PluginSlot>) -> Self {
        WasmHandler {
            slot,
            share: Gate::process().share(),
            link: RouteLink::default(),
        }
    }

    /// The plugin's requests go out through `requester`.
    pub fn requesting(mut self, requester: Arc<Requester>) -> Self {
        self.link.requester = Some(requester);
        self
    }

    /// The route publishes to the backends named `names` (what a
    /// `wasi:messaging` client may connect to).
    pub fn publishing_to(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.link.output_backends = names.into_iter().collect();
        self
    }
}

impl MessageHandler for WasmHandler {
    fn worker(&self) -> Box<dyn Worker> {
        Box::new(WasmWorker {
            slot: self.slot.clone(),
            share: self.share.clone(),
            link: self.link.clone(),
            instance: None,
            candidate: None,
        })
    }

    fn describe(&self) -> String {
        let current = self.slot.current();
        format!("{}@{}", self.slot.name, current.short_hash())
    }
}

struct WasmWorker {
    slot: Arc<PluginSlot>,
    share: Share,
    link: RouteLink,
    /// Dropped after a failed call or when the slot's version changes.
    instance: Option<Instance>,
    /// A warm instance of the slot's shadow candidate, while it has one.
    candidate: Option<Instance>,
}

impl WasmWorker {
    /// A warm instance of `current` (the slot's current version), made if
    /// needed, for a call about to be made. A swap takes effect here,
    /// between calls: a call runs to its end on whichever version it
    /// started with.
    async fn warm(&mut self, current: &Arc<Plugin>) -> Result<&mut Instance, CallError> {
        if self
            .instance
            .as_ref()
            .is_some_and(|i| !Arc::ptr_eq(i.plugin(), current))
        {
            self.instance = None;
        }
        if self.instance.is_none() {
            let fresh = current
                .instantiate_sharing(self.share.clone(), self.link.clone())
                .await
                .map_err(|e| CallError::Trap(format!("instantiation failed: {e:#}")))?;
            self.instance = Some(fresh);
        }
        self.slot.count(&self.slot.counters.calls);
        Ok(self.instance.as_mut().expect("made above"))
    }

    /// Hands `message` to the slot's shadow candidate, if it has one and
    /// the message is sampled, and compares its result with the live one.
    async fn shadow(&mut self, message: &Message, attempt: u32, live: &Result<Outcome, CallError>) {
        let Some(shadow) = self.slot.shadow() else {
            self.candidate = None;
            return;
        };
        if !shadow.sampled() {
            return;
        }
        let warm = self
            .candidate
            .take()
            .filter(|i| Arc::ptr_eq(i.plugin(), &shadow.plugin));
        let instance = match warm {
            Some(instance) => Ok(instance),
            None => shadow
                .plugin
                // A shadow run sends nothing anywhere: no requests either.
                .instantiate_sharing(
                    self.share.clone(),
                    RouteLink {
                        requester: None,
                        ..self.link.clone()
                    },
                )
                .await
                .map_err(|e| CallError::Trap(format!("instantiation failed: {e:#}"))),
        };
        let result = match instance {
            Ok(mut instance) => {
                let result = instance.handle(message, attempt).await;
                if result.is_ok() {
                    self.candidate = Some(instance);
                }
                result
            }
            Err(error) => Err(error),
        };
        shadow.compare(message, attempt, live, &result);
    }

    /// Counts a call that did not return and drops its instance.
    fn failed(&mut self, error: &CallError, what: &str) {
        let counters = &self.slot.counters;
        self.slot.count(match error {
            CallError::Trap(_) => &counters.traps,
            CallError::Timeout(_) => &counters.timeouts,
            CallError::MemoryLimit(_) => &counters.memory_limit_hits,
            CallError::OutputLimit(_) => &counters.output_limit_hits,
        });
        tracing::warn!(plugin = %self.slot.name, "{what}: {error}; discarding the instance");
        self.instance = None;
    }
}

#[async_trait]
impl Worker for WasmWorker {
    fn plugin(&self) -> (String, String) {
        (
            self.slot.name.clone(),
            self.slot.current().short_hash().to_string(),
        )
    }

    async fn handle(&mut self, message: &Message, attempt: u32) -> Result<Outcome, CallError> {
        let current = self.slot.current();
        let instance = self.warm(&current).await?;
        let mut result = instance.handle(message, attempt).await;
        match &mut result {
            Ok(outcome) => tag(outcome, &current),
            Err(error) => self.failed(error, &format!("message {}", message.id)),
        }
        self.shadow(message, attempt, &result).await;
        result
    }

    /// One `handle-batch` call when the plugin exports it. A call that does
    /// not return (trap, timeout, memory cap) cannot say which message
    /// caused it, so the batch is handled again one message per call on a
    /// fresh instance: the failure lands on the messages that cause it on
    /// their own, and the others get their answers. A batch call that
    /// answers for the wrong number of messages fails every message in it.
    async fn handle_batch(&mut self, batch: &[(&Message, u32)]) -> Vec<Result<Outcome, CallError>> {
        let current = self.slot.current();
        if !current.batches() {
            return one_by_one(self, batch).await;
        }
        let instance = match self.warm(&current).await {
            Ok(instance) => instance,
            Err(error) => return vec![Err(error); batch.len()],
        };
        match instance.handle_batch(batch).await {
            Ok(mut outcomes) => {
                outcomes.iter_mut().for_each(|o| tag(o, &current));
                let results: Vec<_> = outcomes.into_iter().map(Ok).collect();
                // The candidate takes the messages one by one: its answers
                // are compared per message whatever its batch would do.
                for ((message, attempt), result) in batch.iter().zip(&results) {
                    self.shadow(message, *attempt, result).await;
                }
                results
            }
            Err(BatchError::Failed(error)) => {
                let what = format!("a batch of {}, handled again one by one", batch.len());
                self.failed(&error, &what);
                one_by_one(self, batch).await
            }
            Err(BatchError::Contract(error)) => {
                self.failed(&error, &format!("a batch of {}", batch.len()));
                vec![Err(error); batch.len()]
            }
        }
    }
}

/// What [`Worker::handle_batch`] does by default: a `handle` call each.
async fn one_by_one<W: Worker + ?Sized>(
    worker: &mut W,
    batch: &[(&Message, u32)],
) -> Vec<Result<Outcome, CallError>> {
    let mut results = Vec::with_capacity(batch.len());
    for (message, attempt) in batch {
        results.push(worker.handle(message, *attempt).await);
    }
    results
}

/// Marks each output with the plugin version that made it.
fn tag(outcome: &mut Outcome, plugin: &Plugin) {
    if let Outcome::Outputs(outputs) = outcome {
        for output in outputs {
            output.set_header(headers::PLUGIN_VERSION, plugin.short_hash());
        }
    }
}

/// A native function as a handler.
pub struct FnHandler<F>(pub F);

impl<F> MessageHandler for FnHandler<F>
where
    F: Fn(&Message, u32) -> Outcome + Clone + Send + Sync + 'static,
{
    fn worker(&self) -> Box<dyn Worker> {
        Box::new(FnWorker(self.0.clone()))
    }

    fn describe(&self) -> String {
        "native".into()
    }
}

struct FnWorker<F>(F);

#[async_trait]
impl<F> Worker for FnWorker<F>
where
    F: Fn(&Message, u32) -> Outcome + Send + Sync,
{
    async fn handle(&mut self, message: &Message, attempt: u32) -> Result<Outcome, CallError> {
        Ok((self.0)(message, attempt))
    }
}
