//! A warm plugin instance: one store, instantiated once, called for many
//! messages by one worker, and discarded after a trap.
//!
//! `handle` takes one message per call; `handle-batch` (where the plugin
//! exports it) takes several in one call, under the same deadline as one
//! `handle` call, and answers for each.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::gate::{Share, Slot};
use super::log::{MAX_TEXT, escape};
use super::messaging::{self, DraftMessage};
use super::outbound::Hooks;
use super::outputs::{Tally, clean_headers};
use super::sluice::plugin::types;
use super::{BatchHandler, EPOCH_TICK, Exports, Handler, Plugin, PluginSettings, RouteLink};
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
    /// The call handed the host more outputs or bytes than it may.
    #[error("plugin exceeded its output limit: {0}")]
    OutputLimit(String),
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
            CallError::OutputLimit(_) => "output-limit",
        }
    }
}

/// How long past its deadline a call waiting in the host (a WASI sleep or
/// poll, which epoch interruption cannot reach) is given before it is cut:
/// a spinning call is interrupted by the epoch first, and reported so.
const HOST_WAIT_SLACK: Duration = Duration::from_millis(2 * EPOCH_TICK.as_millis() as u64);

/// The data of one store.
pub struct State {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    /// Outbound HTTP: the plugin's grant and the current call's deadline.
    http_hooks: Hooks,
    pub(super) table: ResourceTable,
    memory: MemoryCap,
    pub(super) settings: Arc<PluginSettings>,
    /// Messages sent with the host's `publish` during the current call.
    pub(super) published: Vec<Message>,
    /// What the current call has handed the host, against its limits.
    pub(super) tally: Tally,
    /// The current call is `handle-batch`, during which `publish` is
    /// refused.
    pub(super) in_batch: bool,
    deadline: Instant,
    /// The route's share of the CPU, if the instance runs in one.
    share: Option<Share>,
    /// The slot the current call runs in; given up and taken again at an
    /// epoch tick when another route waits (see `runtime/gate.rs`).
    slot: Arc<Mutex<Option<Slot>>>,
    /// What the plugin reaches of the route it runs for.
    pub(super) link: RouteLink,
    /// Bytes of `wasi:messaging` messages the host holds for the plugin.
    pub(super) draft_bytes: usize,
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
                "plugin `{}` may not publish to `{topic}` ({})",
                self.settings.name,
                allowed(&self.settings.name, &self.settings.publish_to)
            ));
        }
        Ok(())
    }

    /// Takes one output of the current call into the host: its topic must
    /// be granted, its headers are cleaned, and it counts against the
    /// call's limits. `Err(Ok)` refuses the output (the plugin's fault, for
    /// good); `Err(Err)` means the call went over a limit.
    /// A request the plugin may send: to a topic its `request_to` grants,
    /// with clean headers, within the call's caps (a request counts as an
    /// output).
    pub(super) fn take_request(
        &mut self,
        mut outgoing: types::Outgoing,
    ) -> Result<Message, String> {
        let topic = &outgoing.topic;
        pattern::validate(topic).map_err(|e| format!("denied: {e}"))?;
        let granted = self
            .settings
            .request_to
            .iter()
            .any(|p| pattern::matches(p, topic));
        if pattern::is_pattern(topic) || !granted {
            return Err(format!(
                "denied: plugin `{}` may not send requests to `{topic}` ({})",
                self.settings.name,
                match self.settings.request_to.as_slice() {
                    [] => format!(
                        "it is granted none: add `plugins.{}.request_to` to the config",
                        self.settings.name
                    ),
                    granted => format!("allowed: {}", granted.join(", ")),
                }
            ));
        }
        clean_headers(&mut outgoing.headers).map_err(|e| format!("denied: {e}"))?;
        let request = to_message(outgoing);
        self.tally
            .admit(&self.settings.limits, &request)
            .map_err(|e| format!("denied: {e}"))?;
        Ok(request)
    }

    /// How long a request may wait for its reply: what it asks, but never
    /// past the call's deadline, less a margin for the plugin to carry on.
    pub(super) fn request_time(&self, asked: Duration) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        asked.min(left.saturating_sub(REQUEST_MARGIN))
    }

    /// Gives up the call's CPU slot while it waits in the host.
    pub(super) fn leave_slot(&self) {
        drop(take(&self.slot));
    }

    /// Takes a slot again after [`State::leave_slot`].
    pub(super) async fn reenter_slot(share: Option<Share>, slot: Arc<Mutex<Option<Slot>>>) {
        if let Some(share) = share {
            let again = share.enter().await;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(again);
        }
    }

    /// What [`State::reenter_slot`] needs, taken before an await.
    pub(super) fn slot_handles(&self) -> (Option<Share>, Arc<Mutex<Option<Slot>>>) {
        (self.share.clone(), self.slot.clone())
    }

    pub(super) fn take_output(
        &mut self,
        mut outgoing: types::Outgoing,
    ) -> Result<Message, Result<String, String>> {
        self.may_publish(&outgoing.topic).map_err(Ok)?;
        clean_headers(&mut outgoing.headers).map_err(Ok)?;
        let output = to_message(outgoing);
        self.tally
            .admit(&self.settings.limits, &output)
            .map_err(Err)?;
        Ok(output)
    }
}

/// The `publish_to` grant for an error message, saying what to add when
/// there is none.
fn allowed(plugin: &str, publish_to: &[String]) -> String {
    if publish_to.is_empty() {
        format!("it is granted no topics: add `plugins.{plugin}.publish_to` to the config")
    } else {
        format!("allowed: {}", publish_to.join(", "))
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

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

/// Caps the memory of an instance: all its linear memories and tables
/// together, so a component cannot multiply the cap by declaring more of
/// them. Remembers that the cap was hit, so the trap that follows is
/// reported as a memory-limit hit rather than a plain trap.
struct MemoryCap {
    limit: usize,
    /// Bytes of every memory and table of the store, as last grown.
    used: usize,
    hit: bool,
}

/// What one table element is counted as: a reference, as the host holds it.
/// What a request leaves of the call's time for the plugin to go on with
/// once it gave up waiting.
const REQUEST_MARGIN: Duration = Duration::from_millis(50);

const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

impl MemoryCap {
    fn grow(&mut self, current: usize, desired: usize) -> wasmtime::Result<bool> {
        let total = (self.used - current.min(self.used)).saturating_add(desired);
        if total > self.limit {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes reached (memories and tables together)",
                self.limit
            )));
        }
        self.used = total;
        Ok(true)
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current, desired)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(
            current.saturating_mul(TABLE_ELEMENT_BYTES),
            desired.saturating_mul(TABLE_ELEMENT_BYTES),
        )
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
    Messaging(messaging::Bindings),
}

impl Instance {
    pub(super) async fn new(
        plugin: Arc<Plugin>,
        share: Option<Share>,
        link: RouteLink,
    ) -> Result<Self> {
        let settings = plugin.settings.clone();
        let mut wasi = WasiCtx::builder();
        for (name, value) in &settings.env {
            wasi.env(name, value);
        }
        for (guest, host) in &settings.read_dirs {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly)?;
        }
        let deadline = Instant::now() + settings.timeout;
        let state = State {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            http_hooks: Hooks {
                plugin: settings.name.clone(),
                grant: settings.outbound_http.clone(),
                deadline,
            },
            table: ResourceTable::new(),
            memory: MemoryCap {
                limit: settings.memory_limit,
                used: 0,
                hit: false,
            },
            settings: settings.clone(),
            published: Vec::new(),
            tally: Tally::default(),
            in_batch: false,
            deadline,
            share,
            slot: Arc::new(Mutex::new(None)),
            link,
            draft_bytes: 0,
        };
        let mut store = Store::new(&plugin.engine, state);
        store.limiter(|state| &mut state.memory);
        // Yield to the executor at every tick, and give the slot up if
        // another route waits for one; stop once the deadline passed.
        store.epoch_deadline_callback(|store| {
            let state = store.data();
            if Instant::now() >= state.deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            match &state.share {
                Some(share) if share.should_yield() => {
                    let (share, slot) = (share.clone(), state.slot.clone());
                    Ok(UpdateDeadline::YieldCustom(
                        1,
                        Box::pin(async move {
                            drop(take(&slot));
                            let again = share.enter().await;
                            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(again);
                        }),
                    ))
                }
                _ => Ok(UpdateDeadline::Yield(1)),
            }
        });
        store.set_epoch_deadline(1);
        let limit = settings.timeout + HOST_WAIT_SLACK;
        let bindings = match &plugin.exports {
            Exports::Single(pre) => Bindings::Single(
                tokio::time::timeout(limit, pre.instantiate_async(&mut store)).await??,
            ),
            Exports::Batch(pre) => Bindings::Batch(
                tokio::time::timeout(limit, pre.instantiate_async(&mut store)).await??,
            ),
            Exports::Messaging(pre, _) => Bindings::Messaging(
                tokio::time::timeout(limit, pre.instantiate_async(&mut store)).await??,
            ),
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
        if matches!(self.bindings, Bindings::Messaging(_)) {
            return self.handle_draft(message).await;
        }
        let headers = header_params(message);
        let input = to_input(message, attempt, &headers);
        let timeout = self.plugin.settings.timeout;
        let _slot = self.enter().await;
        start_call(&mut self.store, timeout, false);
        let call = async {
            match &self.bindings {
                Bindings::Single(bindings) => bindings.call_handle(&mut self.store, input).await,
                Bindings::Batch(bindings) => bindings.call_handle(&mut self.store, input).await,
                Bindings::Messaging(_) => unreachable!("handled above"),
            }
        };
        let result = cut_at_deadline(timeout, call).await?;
        let returned = result.map_err(|error| self.call_error(error))?;
        let state = self.store.data_mut();
        let published = std::mem::take(&mut state.published);
        outcome(state, published, returned)
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
        let headers: Vec<Vec<types::HeaderParam>> = batch
            .iter()
            .map(|(message, _)| header_params(message))
            .collect();
        let inputs: Vec<types::MessageParam> = batch
            .iter()
            .zip(&headers)
            .map(|((message, attempt), headers)| to_input(message, *attempt, headers))
            .collect();
        let timeout = self.plugin.settings.timeout;
        let _slot = self.enter().await;
        start_call(&mut self.store, timeout, true);
        let result = cut_at_deadline(
            timeout,
            bindings.call_handle_batch(&mut self.store, &inputs),
        )
        .await
        .map_err(BatchError::Failed)?;
        self.store.data_mut().in_batch = false;
        let results = result.map_err(|error| BatchError::Failed(self.call_error(error)))?;
        if results.len() != batch.len() {
            return Err(BatchError::Contract(CallError::Trap(format!(
                "`handle-batch` returned {} result(s) for {} messages",
                results.len(),
                batch.len()
            ))));
        }
        // The limits are the call's: a batch over them fails as a whole,
        // and is handled again one message per call like a trap.
        let state = self.store.data_mut();
        results
            .into_iter()
            .map(|result| outcome(state, Vec::new(), result))
            .collect::<Result<_, _>>()
            .map_err(BatchError::Failed)
    }

    /// Calls a `wasi:messaging` component's `handle` with the delivery as
    /// a `message` resource. The attempt has no place in the draft.
    async fn handle_draft(&mut self, message: &Message) -> Result<Outcome, CallError> {
        let Bindings::Messaging(bindings) = &self.bindings else {
            unreachable!("called for draft components only");
        };
        let timeout = self.plugin.settings.timeout;
        let _slot = self.enter().await;
        start_call(&mut self.store, timeout, false);
        let input = DraftMessage::delivered(message);
        let state = self.store.data_mut();
        state.draft_bytes = state.draft_bytes.saturating_add(input.size());
        let input = state
            .table
            .push(input)
            .map_err(|e| CallError::Trap(format!("handing the message over: {e}")))?;
        let call = bindings
            .wasi_messaging_incoming_handler()
            .call_handle(&mut self.store, input);
        let result = cut_at_deadline(timeout, call).await?;
        let returned = result.map_err(|error| self.call_error(error))?;
        let state = self.store.data_mut();
        if let Some(reason) = &state.tally.exceeded {
            return Err(CallError::OutputLimit(reason.clone()));
        }
        let published = std::mem::take(&mut state.published);
        Ok(match returned {
            Ok(()) => Outcome::Outputs(published),
            Err(error) => {
                let reason = escape(&messaging::describe(&error), MAX_TEXT);
                let kind = messaging::error_kind(&error);
                if state.settings.reject_on.iter().any(|k| k == kind) {
                    Outcome::Reject(reason)
                } else {
                    Outcome::Retry(reason)
                }
            }
        })
    }

    /// Takes a slot of the route's share for a call about to start; the
    /// guard gives whatever slot the call holds at its end back.
    fn enter(&self) -> impl Future<Output = SlotGuard> + Send + 'static {
        let state = self.store.data();
        let (share, cell) = (state.share.clone(), state.slot.clone());
        async move {
            if let Some(share) = share {
                let slot = share.enter().await;
                *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
            }
            SlotGuard(cell)
        }
    }

    /// What a call that did not return ran into.
    fn call_error(&self, error: wasmtime::Error) -> CallError {
        let state = self.store.data();
        if let Some(reason) = &state.tally.exceeded {
            CallError::OutputLimit(reason.clone())
        } else if state.memory.hit {
            CallError::MemoryLimit(state.memory.limit)
        } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            CallError::Timeout(self.plugin.settings.timeout)
        } else {
            CallError::Trap(describe_trap(&error))
        }
    }
}

/// Runs a call to its end or cuts it at its deadline. Epoch interruption
/// stops a guest that runs; this stops one that waits in a host call (a
/// WASI sleep or poll), by dropping the call: the instance must be
/// discarded after it, as after any timeout.
async fn cut_at_deadline<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = T>,
) -> Result<T, CallError> {
    tokio::time::timeout(timeout + HOST_WAIT_SLACK, call)
        .await
        .map_err(|_| CallError::Timeout(timeout))
}

/// Frees the slot a call holds when the call ends, however it ends.
struct SlotGuard(Arc<Mutex<Option<Slot>>>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        drop(take(&self.0));
    }
}

fn take(slot: &Mutex<Option<Slot>>) -> Option<Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Arms the deadline for a call starting now: one plugin timeout, whether
/// the call is `handle` or `handle-batch`.
fn start_call(store: &mut Store<State>, timeout: Duration, in_batch: bool) {
    let state = store.data_mut();
    state.published.clear();
    state.tally = Tally::default();
    state.in_batch = in_batch;
    state.deadline = Instant::now() + timeout;
    state.http_hooks.deadline = state.deadline;
    store.set_epoch_deadline(1);
}

/// The WIT message for one delivery, borrowing from it: wasmtime copies it
/// into the guest's memory, so a copy on the host first would be wasted.
fn to_input<'a>(
    message: &'a Message,
    attempt: u32,
    headers: &'a [types::HeaderParam<'a>],
) -> types::MessageParam<'a> {
    types::MessageParam {
        id: &message.id,
        topic: &message.topic,
        key: message.key.as_deref(),
        headers,
        payload: &message.payload,
        attempt,
        timestamp_ms: message.timestamp_ms,
    }
}

/// A delivery's headers as [`to_input`] lends them.
fn header_params(message: &Message) -> Vec<types::HeaderParam<'_>> {
    message
        .headers
        .iter()
        .map(|(name, value)| types::HeaderParam { name, value })
        .collect()
}

/// The outcome of one message's result: `published` (with the host's
/// `publish`, already taken in) and the returned outputs, if the plugin may
/// publish them all. A call over its output limits fails.
fn outcome(
    state: &mut State,
    published: Vec<Message>,
    result: Result<Vec<types::Outgoing>, types::Failure>,
) -> Result<Outcome, CallError> {
    if let Some(reason) = &state.tally.exceeded {
        return Err(CallError::OutputLimit(reason.clone()));
    }
    Ok(match result {
        Ok(outputs) => {
            let mut messages = published;
            messages.reserve(outputs.len());
            for outgoing in outputs {
                match state.take_output(outgoing) {
                    Ok(message) => messages.push(message),
                    Err(Ok(refusal)) => return Ok(Outcome::Reject(refusal)),
                    Err(Err(over)) => return Err(CallError::OutputLimit(over)),
                }
            }
            Outcome::Outputs(messages)
        }
        Err(types::Failure::Retry(reason)) => Outcome::Retry(escape(&reason, MAX_TEXT)),
        Err(types::Failure::Reject(reason)) => Outcome::Reject(escape(&reason, MAX_TEXT)),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two memories of 40 MiB do not fit a 64 MiB cap, though each would.
    #[test]
    fn the_memory_cap_covers_every_memory_and_table_together() {
        let mut cap = MemoryCap {
            limit: 64 << 20,
            used: 0,
            hit: false,
        };
        assert!(cap.memory_growing(0, 40 << 20, None).unwrap());
        assert!(cap.memory_growing(0, 40 << 20, None).is_err());
        assert!(cap.hit);
        // Growing one memory counts only its growth.
        let mut cap = MemoryCap {
            limit: 64 << 20,
            used: 0,
            hit: false,
        };
        assert!(cap.memory_growing(0, 30 << 20, None).unwrap());
        assert!(cap.memory_growing(30 << 20, 60 << 20, None).unwrap());
        assert!(
            cap.table_growing(0, 1 << 20, None).is_err(),
            "8 MiB of table on top"
        );
    }
}
