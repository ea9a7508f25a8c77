//! A warm plugin instance: one store, instantiated once, called for many
//! messages by one worker, and discarded after a trap.
//!
//! `handle` takes one message per call; `handle-batch` (where the plugin
//! exports it) takes several in one call, under the same deadline as one
//! `handle` call, and answers for each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::sluice::plugin::types;
use super::{BatchHandler, Exports, Handler, Plugin, PluginSettings};
use crate::backend::pattern;
use crate::message::Message;

/// What a successful call decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Publish these, then acknowledge the input.
    Outputs(Vec<Message>),
    /// A transient failure: try again after a backoff.
    Retry(String),
    /// A permanent failure: dead-letter the input.
    Reject(String),
}

/// A call that did not return; the instance is unusable afterwards.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin exceeded its {0:?} deadline")]
    Timeout(Duration),
    #[error("plugin exceeded its memory limit of {} MiB", .0 >> 20)]
    MemoryLimit(usize),
}

/// Why a `handle-batch` call gave no answer for its messages; the instance
/// must be dropped after either.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchError {
    /// The call did not return; which message caused it is unknown.
    Failed(CallError),
    /// It returned, but answered for a different number of messages than
    /// it was given (or there is no `handle-batch` to call): the whole
    /// batch's failure, since no answer can be matched to a message.
    Contract(CallError),
}

impl CallError {
    /// Short name for headers and metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            CallError::Trap(_) => "trap",
            CallError::Timeout(_) => "timeout",
            CallError::MemoryLimit(_) => "memory-limit",
        }
    }
}

/// Most messages one call may publish through the host API.
const MAX_PUBLISHES_PER_CALL: usize = 10_000;

/// The data of one store.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryCap,
    pub(super) settings: Arc<PluginSettings>,
    /// Messages sent with the host's `publish` during the current call.
    pub(super) published: Vec<types::Outgoing>,
    /// The current call is `handle-batch`, during which `publish` is
    /// refused.
    pub(super) in_batch: bool,
    deadline: Instant,
}

impl State {
    /// Whether the plugin may publish to `topic`.
    pub(super) fn may_publish(&self, topic: &str) -> Result<(), String> {
        pattern::validate(topic)?;
        if pattern::is_pattern(topic) {
            return Err(format!("cannot publish to a pattern (`{topic}`)"));
        }
        if !self
            .settings
            .publish_to
            .iter()
            .any(|p| pattern::matches(p, topic))
        {
            return Err(format!(
                "plugin `{}` may not publish to `{topic}` (allowed: {})",
                self.settings.name,
                self.settings.publish_to.join(", ")
            ));
        }
        if self.published.len() >= MAX_PUBLISHES_PER_CALL {
            return Err(format!(
                "more than {MAX_PUBLISHES_PER_CALL} publishes in one call"
            ));
        }
        Ok(())
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers that the cap was hit, so the trap that
/// follows is reported as a memory-limit hit rather than a plain trap.
struct MemoryCap {
    limit: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes reached",
                self.limit
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// A plugin instance owned by one worker.
pub struct Instance {
    plugin: Arc<Plugin>,
    store: Store<State>,
    bindings: Bindings,
}

enum Bindings {
    Single(Handler),
    Batch(BatchHandler),
}

impl Instance {
    pub(super) async fn new(plugin: Arc<Plugin>) -> Result<Self> {
        let settings = plugin.settings.clone();
        let mut wasi = WasiCtx::builder();
        for (name, value) in &settings.env {
            wasi.env(name, value);
        }
        for (guest, host) in &settings.read_dirs {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly)?;
        }
        let state = State {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            memory: MemoryCap {
                limit: settings.memory_limit,
                hit: false,
            },
            settings: settings.clone(),
            published: Vec::new(),
            in_batch: false,
            deadline: Instant::now() + settings.timeout,
        };
        let mut store = Store::new(&plugin.engine, state);
        store.limiter(|state| &mut state.memory);
        // Yield to the executor at every tick; stop once the deadline passed.
        store.epoch_deadline_callback(|store| {
            if Instant::now() >= store.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.set_epoch_deadline(1);
        let bindings = match &plugin.exports {
            Exports::Single(pre) => Bindings::Single(pre.instantiate_async(&mut store).await?),
            Exports::Batch(pre) => Bindings::Batch(pre.instantiate_async(&mut store).await?),
        };
        Ok(Instance {
            plugin,
            store,
            bindings,
        })
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Calls the plugin's `handle`. After an `Err` this instance must be
    /// dropped: wasmtime refuses to enter a trapped instance again.
    pub async fn handle(&mut self, message: &Message, attempt: u32) -> Result<Outcome, CallError> {
        let input = to_input(message, attempt);
        start_call(&mut self.store, self.plugin.settings.timeout, false);
        let result = match &self.bindings {
            Bindings::Single(bindings) => bindings.call_handle(&mut self.store, &input).await,
            Bindings::Batch(bindings) => bindings.call_handle(&mut self.store, &input).await,
        };
        let returned = result.map_err(|error| self.call_error(error))?;
        let state = self.store.data_mut();
        let published = std::mem::take(&mut state.published);
        Ok(outcome(state, published, returned))
    }

    /// Calls the plugin's `handle-batch` once for all of `batch`, each
    /// message with its attempt, and answers for each in order.
    ///
    /// An `Err` is the whole call's, and this instance must be dropped
    /// after it.
    pub async fn handle_batch(
        &mut self,
        batch: &[(&Message, u32)],
    ) -> Result<Vec<Outcome>, BatchError> {
        let Bindings::Batch(bindings) = &self.bindings else {
            return Err(BatchError::Contract(CallError::Trap(
                "the plugin does not export `handle-batch`".into(),
            )));
        };
        let inputs: Vec<types::Message> = batch
            .iter()
            .map(|(message, attempt)| to_input(message, *attempt))
            .collect();
        start_call(&mut self.store, self.plugin.settings.timeout, true);
        let result = bindings.call_handle_batch(&mut self.store, &inputs).await;
        self.store.data_mut().in_batch = false;
        let results = result.map_err(|error| BatchError::Failed(self.call_error(error)))?;
        if results.len() != batch.len() {
            return Err(BatchError::Contract(CallError::Trap(format!(
                "`handle-batch` returned {} result(s) for {} messages",
                results.len(),
                batch.len()
            ))));
        }
        let state = self.store.data();
        Ok(results
            .into_iter()
            .map(|result| outcome(state, Vec::new(), result))
            .collect())
    }

    /// What a call that did not return ran into.
    fn call_error(&self, error: wasmtime::Error) -> CallError {
        let state = self.store.data();
        if state.memory.hit {
            CallError::MemoryLimit(state.memory.limit)
        } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            CallError::Timeout(self.plugin.settings.timeout)
        } else {
            CallError::Trap(describe_trap(&error))
        }
    }
}

/// Arms the deadline for a call starting now: one plugin timeout, whether
/// the call is `handle` or `handle-batch`.
fn start_call(store: &mut Store<State>, timeout: Duration, in_batch: bool) {
    let state = store.data_mut();
    state.published.clear();
    state.in_batch = in_batch;
    state.deadline = Instant::now() + timeout;
    store.set_epoch_deadline(1);
}

/// The WIT message for one delivery.
fn to_input(message: &Message, attempt: u32) -> types::Message {
    types::Message {
        id: message.id.clone(),
        topic: message.topic.clone(),
        key: message.key.clone(),
        headers: message
            .headers
            .iter()
            .map(|(name, value)| types::Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        payload: message.payload.clone(),
        attempt,
        timestamp_ms: message.timestamp_ms,
    }
}

/// The outcome of one message's result: `published` (with the host's
/// `publish`) and the returned outputs, if the plugin may publish them all.
fn outcome(
    state: &State,
    published: Vec<types::Outgoing>,
    result: Result<Vec<types::Outgoing>, types::Failure>,
) -> Outcome {
    match result {
        Ok(outputs) => {
            let mut messages = Vec::with_capacity(published.len() + outputs.len());
            for outgoing in published.into_iter().chain(outputs) {
                if let Err(reason) = state.may_publish(&outgoing.topic) {
                    return Outcome::Reject(reason);
                }
                messages.push(to_message(outgoing));
            }
            Outcome::Outputs(messages)
        }
        Err(types::Failure::Retry(reason)) => Outcome::Retry(reason),
        Err(types::Failure::Reject(reason)) => Outcome::Reject(reason),
    }
}

fn to_message(outgoing: types::Outgoing) -> Message {
    let mut message = Message::new(outgoing.topic, outgoing.payload);
    message.key = outgoing.key;
    message.headers = outgoing
        .headers
        .into_iter()
        .map(|h| (h.name, h.value))
        .collect();
    message
}

/// One line: the trap kind, without the wasm backtrace.
fn describe_trap(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    }
}
