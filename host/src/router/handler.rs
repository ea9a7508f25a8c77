//! What a route calls for each message: a WebAssembly plugin in production,
//! or a native function (benchmarks compare the two on the same pipeline).

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;

use crate::message::Message;
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
}

/// Runs a WebAssembly plugin, keeping one warm instance per worker.
pub struct WasmHandler {
    pub plugin: Arc<Plugin>,
}

impl MessageHandler for WasmHandler {
    fn worker(&self) -> Box<dyn Worker> {
        Box::new(WasmWorker {
            plugin: self.plugin.clone(),
            instance: None,
        })
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.plugin.settings.name, self.plugin.short_hash())
    }
}

struct WasmWorker {
    plugin: Arc<Plugin>,
    /// Dropped after a failed call, re-created on the next one.
    instance: Option<Instance>,
}

#[async_trait]
impl Worker for WasmWorker {
    async fn handle(&mut self, message: &Message, attempt: u32) -> Result<Outcome, CallError> {
        let instance = match &mut self.instance {
            Some(instance) => instance,
            None => {
                let fresh = self
                    .plugin
                    .instantiate()
                    .await
                    .map_err(|e| CallError::Trap(format!("instantiation failed: {e:#}")))?;
                self.instance.insert(fresh)
            }
        };
        let result = instance.handle(message, attempt).await;
        if let Err(error) = &result {
            tracing::warn!(plugin = %self.plugin.settings.name, message = %message.id, "{error}; discarding the instance");
            self.instance = None;
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
