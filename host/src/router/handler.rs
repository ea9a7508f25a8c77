//! What a route calls for each message: a WebAssembly plugin in production,
//! or a native function (benchmarks compare the two on the same pipeline).

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;

use crate::deploy::PluginSlot;
use crate::message::{Message, headers};
use crate::runtime::{CallError, Instance, Outcome, Plugin};

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
        let mut results = Vec::with_capacity(batch.len());
        for (message, attempt) in batch {
            results.push(self.handle(message, *attempt).await);
        }
        results
    }
}

/// Runs the current version of a WebAssembly plugin, keeping one warm
/// instance per worker.
pub struct WasmHandler {
    pub slot: Arc<PluginSlot>,
}

impl WasmHandler {
    /// A handler over a slot of its own holding `plugin`.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        let name = plugin.settings.name.clone();
        WasmHandler {
            slot: Arc::new(PluginSlot::new(name, plugin, "loaded")),
        }
    }
}

impl MessageHandler for WasmHandler {
    fn worker(&self) -> Box<dyn Worker> {
        Box::new(WasmWorker {
            slot: self.slot.clone(),
            instance: None,
        })
    }

    fn describe(&self) -> String {
        let current = self.slot.current();
        format!("{}@{}", self.slot.name, current.short_hash())
    }
}

struct WasmWorker {
    slot: Arc<PluginSlot>,
    /// Dropped after a failed call or when the slot's version changes.
    instance: Option<Instance>,
}

#[async_trait]
impl Worker for WasmWorker {
    async fn handle(&mut self, message: &Message, attempt: u32) -> Result<Outcome, CallError> {
        // A swap takes effect here, between messages: the call below runs
        // to its end on whichever version it started with.
        let current = self.slot.current();
        if self
            .instance
            .as_ref()
            .is_some_and(|i| !Arc::ptr_eq(i.plugin(), &current))
        {
            self.instance = None;
        }
        let instance = match &mut self.instance {
            Some(instance) => instance,
            None => {
                let fresh = current
                    .instantiate()
                    .await
                    .map_err(|e| CallError::Trap(format!("instantiation failed: {e:#}")))?;
                self.instance.insert(fresh)
            }
        };
        let counters = &self.slot.counters;
        self.slot.count(&counters.calls);
        let mut result = instance.handle(message, attempt).await;
        match &mut result {
            Ok(Outcome::Outputs(outputs)) => {
                for output in outputs {
                    output.set_header(headers::PLUGIN_VERSION, current.short_hash());
                }
            }
            Ok(_) => {}
            Err(error) => {
                self.slot.count(match error {
                    CallError::Trap(_) => &counters.traps,
                    CallError::Timeout(_) => &counters.timeouts,
                    CallError::MemoryLimit(_) => &counters.memory_limit_hits,
                });
                tracing::warn!(plugin = %self.slot.name, message = %message.id, "{error}; discarding the instance");
                self.instance = None;
            }
        }
        result
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
