//! The second world the host runs: `wasi:messaging@0.2.0-draft`
//! (`messaging-core` and `messaging-request-reply`), so a component built
//! for that draft runs as a route's plugin unchanged, with the delivery
//! semantics of Sluice's own world.
//!
//! The draft's calls map onto what a Sluice call already does:
//! - `handle(message)` is the route's call; `ok` publishes what the call
//!   sent, then acks; an `error` is a retry, or a rejection (dead letter)
//!   for the error kinds the plugin's `reject_on` lists.
//! - `producer.send` does not publish at once: the message joins the call's
//!   outputs, under the same `publish_to` grant and limits as Sluice's
//!   outputs, and goes out with them, before the ack, only if `handle`
//!   succeeds.
//! - `client.connect(name)` takes `default` or the name of one of the
//!   route's output backends; sends through any client go to the route's
//!   outputs (every output backend, for a route that publishes to several),
//!   which is what the route promises about delivery.
//! - metadata is the message's headers (the host's `sluice-` headers
//!   excluded from outputs, as always) and the content type is the
//!   `content-type` header.
//! - `request-reply.request` is the host's `request` (granted by
//!   `request_to`); `reply` is an output to the reply topic the delivery
//!   carries, which `publish_to` must grant like any other.
//!
//! The WIT is fetched at build time (see the sluice-witdeps crate).

use std::time::Duration;

use wasmtime::component::Resource;

use super::instance::State;
use super::sluice::plugin::types as sluice_types;
use crate::message::{Message, headers};

pub use bindings::MessagingRequestReplyPre;
pub use bindings::wasi::messaging::types::Error;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../target/wit/wasi-messaging",
        world: "messaging-request-reply",
        exports: { default: async },
        imports: {
            // A request waits for its reply without blocking the thread.
            "wasi:messaging/request-reply.request": async | trappable,
            default: trappable,
        },
        with: {
            "wasi:messaging/types.client": super::Client,
            "wasi:messaging/types.message": super::DraftMessage,
            "wasi:messaging/request-reply.request-options": super::RequestOptions,
        },
    });
}

use bindings::wasi::messaging::{producer, request_reply, types};

/// The package of the draft, as components import and export it.
pub const PACKAGE: &str = "wasi:messaging@0.2.0-draft";
/// The export that marks a component as built for the draft.
pub const HANDLER_EXPORT: &str = "wasi:messaging/incoming-handler@0.2.0-draft";
/// The import that tells `messaging-request-reply` from `messaging-core`.
pub const REQUEST_REPLY_IMPORT: &str = "wasi:messaging/request-reply@0.2.0-draft";
pub const CORE_WORLD: &str = "wasi:messaging/messaging-core@0.2.0-draft";
pub const REQUEST_REPLY_WORLD: &str = "wasi:messaging/messaging-request-reply@0.2.0-draft";

/// The header the draft's content type travels in.
pub const CONTENT_TYPE: &str = "content-type";

/// The name a client may always connect to: the route's outputs.
pub const DEFAULT_CLIENT: &str = "default";

/// The bindings of an instance of a draft component.
pub type Bindings = bindings::MessagingRequestReply;

/// Links the draft's interfaces (its components get no other host API).
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<State>) -> wasmtime::Result<()> {
    bindings::MessagingRequestReply::add_to_linker::<State, wasmtime::component::HasSelf<State>>(
        linker,
        |s| s,
    )
}

/// A `client`: a connection to the route's outputs, which is all a send
/// can reach, so it needs to remember nothing.
pub struct Client;

/// A `message` resource: one the host handed the plugin, or one the
/// plugin made to send.
pub struct DraftMessage {
    topic: Option<String>,
    data: Vec<u8>,
    /// Every header but the content type.
    metadata: Vec<(String, String)>,
    content_type: Option<String>,
    /// Where a reply to it goes: the delivery's `sluice-reply-to`, set by
    /// the host alone (metadata a plugin writes cannot aim a reply).
    reply_to: Option<String>,
}

impl DraftMessage {
    /// The delivery, as the draft shows it.
    pub fn delivered(message: &Message) -> Self {
        let mut metadata = Vec::with_capacity(message.headers.len());
        let mut content_type = None;
        for (name, value) in &message.headers {
            if content_type.is_none() && name.eq_ignore_ascii_case(CONTENT_TYPE) {
                content_type = Some(value.clone());
            } else {
                metadata.push((name.clone(), value.clone()));
            }
        }
        DraftMessage {
            topic: Some(message.topic.clone()),
            data: message.payload.clone(),
            metadata,
            content_type,
            reply_to: message.header(headers::REPLY_TO).map(str::to_owned),
        }
    }

    /// Bytes the host holds for it.
    pub(super) fn size(&self) -> usize {
        self.data.len()
            + self.content_type.as_ref().map_or(0, String::len)
            + self
                .metadata
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
    }

    /// The message as an output to `topic`, for the grant and limit checks
    /// Sluice's own outputs go through.
    fn into_outgoing(self, topic: String) -> sluice_types::Outgoing {
        let mut headers: Vec<sluice_types::HeaderResult> = self
            .metadata
            .into_iter()
            .map(|(name, value)| sluice_types::HeaderResult { name, value })
            .collect();
        if let Some(value) = self.content_type {
            headers.push(sluice_types::HeaderResult {
                name: CONTENT_TYPE.into(),
                value,
            });
        }
        sluice_types::Outgoing {
            topic,
            key: None,
            headers,
            payload: self.data,
        }
    }
}

/// A `request-options` resource.
#[derive(Default)]
pub struct RequestOptions {
    timeout_ms: Option<u32>,
}

/// How long a request waits when its options set no timeout: the draft
/// says "until a reply comes", which the call's deadline cuts anyway.
const NO_TIMEOUT: Duration = Duration::from_secs(3600);

impl State {
    fn message(&self, resource: &Resource<DraftMessage>) -> wasmtime::Result<&DraftMessage> {
        Ok(self.table.get(resource)?)
    }

    fn message_mut(
        &mut self,
        resource: &Resource<DraftMessage>,
    ) -> wasmtime::Result<&mut DraftMessage> {
        Ok(self.table.get_mut(resource)?)
    }

    /// Counts `grown` more bytes of messages held for the plugin; past its
    /// `max_output_mb` the call fails, as it would for outputs that big.
    fn hold(&mut self, grown: usize) -> wasmtime::Result<()> {
        self.draft_bytes = self.draft_bytes.saturating_add(grown);
        if self.draft_bytes > self.settings.limits.max_bytes {
            let reason = format!(
                "more than {} MiB of wasi:messaging messages held at once (max_output_mb)",
                self.settings.limits.max_bytes >> 20
            );
            self.tally.exceeded.get_or_insert(reason.clone());
            return Err(wasmtime::Error::msg(reason));
        }
        Ok(())
    }

    /// Changes a message the plugin holds, counting what it grew or shrank
    /// by.
    fn change(
        &mut self,
        resource: &Resource<DraftMessage>,
        edit: impl FnOnce(&mut DraftMessage),
    ) -> wasmtime::Result<()> {
        let message = self.message_mut(resource)?;
        let before = message.size();
        edit(message);
        let after = message.size();
        self.draft_bytes = self.draft_bytes.saturating_sub(before);
        self.hold(after)
    }

    /// Takes a message out of the table, no longer counted as held.
    fn release(&mut self, resource: Resource<DraftMessage>) -> wasmtime::Result<DraftMessage> {
        let message = self.table.delete(resource)?;
        self.draft_bytes = self.draft_bytes.saturating_sub(message.size());
        Ok(message)
    }

    /// One output of the call, as the draft's `send` and `reply` hand it in.
    fn send_output(&mut self, message: DraftMessage, topic: String) -> Result<(), Error> {
        if self.in_batch {
            // A Sluice component may import the draft too; in a batch its
            // sends could not be told apart by input.
            return Err(Error::Other(
                "`send` is not available during `handle-batch`: put the message in its \
                 input's result"
                    .into(),
            ));
        }
        match self.take_output(message.into_outgoing(topic)) {
            Ok(output) => {
                self.published.push(output);
                Ok(())
            }
            Err(Ok(refusal)) => Err(Error::PermissionDenied(refusal)),
            Err(Err(over)) => Err(Error::Other(over)),
        }
    }
}

impl types::Host for State {}

impl types::HostClient for State {
    fn connect(&mut self, name: String) -> wasmtime::Result<Result<Resource<Client>, Error>> {
        let granted = name == DEFAULT_CLIENT || self.link.output_backends.contains(&name);
        if !granted {
            let mut names = vec![DEFAULT_CLIENT.to_owned()];
            names.extend(self.link.output_backends.iter().cloned());
            return Ok(Err(Error::PermissionDenied(format!(
                "plugin `{}` may connect only to {} (the route's output backends)",
                self.settings.name,
                names.join(", ")
            ))));
        }
        Ok(Ok(self.table.push(Client)?))
    }

    fn disconnect(&mut self, _client: Resource<Client>) -> wasmtime::Result<Result<(), Error>> {
        Ok(Ok(()))
    }

    fn drop(&mut self, client: Resource<Client>) -> wasmtime::Result<()> {
        self.table.delete(client)?;
        Ok(())
    }
}

impl types::HostMessage for State {
    fn new(&mut self, data: Vec<u8>) -> wasmtime::Result<Resource<DraftMessage>> {
        self.hold(data.len())?;
        Ok(self.table.push(DraftMessage {
            topic: None,
            data,
            metadata: Vec::new(),
            content_type: None,
            reply_to: None,
        })?)
    }

    fn topic(&mut self, message: Resource<DraftMessage>) -> wasmtime::Result<Option<String>> {
        Ok(self.message(&message)?.topic.clone())
    }

    fn content_type(
        &mut self,
        message: Resource<DraftMessage>,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.message(&message)?.content_type.clone())
    }

    fn set_content_type(
        &mut self,
        message: Resource<DraftMessage>,
        content_type: String,
    ) -> wasmtime::Result<()> {
        self.change(&message, |m| m.content_type = Some(content_type))
    }

    fn data(&mut self, message: Resource<DraftMessage>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.message(&message)?.data.clone())
    }

    fn set_data(&mut self, message: Resource<DraftMessage>, data: Vec<u8>) -> wasmtime::Result<()> {
        self.change(&message, |m| m.data = data)
    }

    fn metadata(
        &mut self,
        message: Resource<DraftMessage>,
    ) -> wasmtime::Result<Option<types::Metadata>> {
        let metadata = &self.message(&message)?.metadata;
        Ok((!metadata.is_empty()).then(|| metadata.clone()))
    }

    fn add_metadata(
        &mut self,
        message: Resource<DraftMessage>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.change(&message, |m| {
            m.metadata.retain(|(name, _)| *name != key);
            m.metadata.push((key, value));
        })
    }

    fn set_metadata(
        &mut self,
        message: Resource<DraftMessage>,
        meta: types::Metadata,
    ) -> wasmtime::Result<()> {
        self.change(&message, |m| m.metadata = meta)
    }

    fn remove_metadata(
        &mut self,
        message: Resource<DraftMessage>,
        key: String,
    ) -> wasmtime::Result<()> {
        self.change(&message, |m| m.metadata.retain(|(name, _)| *name != key))
    }

    fn drop(&mut self, message: Resource<DraftMessage>) -> wasmtime::Result<()> {
        self.release(message)?;
        Ok(())
    }
}

impl producer::Host for State {
    fn send(
        &mut self,
        _client: Resource<Client>,
        topic: String,
        message: Resource<DraftMessage>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let message = self.release(message)?;
        Ok(self.send_output(message, topic))
    }
}

impl request_reply::Host for State {
    async fn request(
        &mut self,
        _client: Resource<Client>,
        topic: String,
        message: Resource<DraftMessage>,
        options: Option<Resource<RequestOptions>>,
    ) -> wasmtime::Result<Result<Vec<Resource<DraftMessage>>, Error>> {
        let asked = match options {
            Some(options) => self.table.delete(options)?.timeout_ms,
            None => None,
        }
        .map_or(NO_TIMEOUT, |ms| Duration::from_millis(ms.into()));
        let outgoing = {
            let message = self.message(&message)?;
            DraftMessage {
                topic: None,
                data: message.data.clone(),
                metadata: message.metadata.clone(),
                content_type: message.content_type.clone(),
                reply_to: None,
            }
            .into_outgoing(topic)
        };
        let request = match self.take_request(outgoing) {
            Ok(request) => request,
            Err(denied) => return Ok(Err(Error::PermissionDenied(denied))),
        };
        let Some(requester) = self.link.requester.clone() else {
            return Ok(Err(Error::Other(
                "requests are not available here (a shadow run, or a plugin called outside a \
                 route)"
                    .into(),
            )));
        };
        let timeout = self.request_time(asked);
        let (share, slot) = self.slot_handles();
        self.leave_slot();
        let reply = requester.request(request, timeout).await;
        State::reenter_slot(share, slot).await;
        match reply {
            Ok(reply) => {
                let reply = DraftMessage::delivered(&reply);
                self.hold(reply.size())?;
                Ok(Ok(vec![self.table.push(reply)?]))
            }
            Err(crate::request::RequestError::Timeout { .. }) => Ok(Err(Error::Timeout)),
            Err(error) => Ok(Err(Error::Other(error.to_string()))),
        }
    }

    fn reply(
        &mut self,
        reply_to: Resource<DraftMessage>,
        message: Resource<DraftMessage>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let Some(topic) = self.message(&reply_to)?.reply_to.clone() else {
            return Ok(Err(Error::Other(
                "the message was not sent as a request: it names no topic to reply to".into(),
            )));
        };
        let message = self.release(message)?;
        Ok(self.send_output(message, topic))
    }
}

impl request_reply::HostRequestOptions for State {
    fn new(&mut self) -> wasmtime::Result<Resource<RequestOptions>> {
        Ok(self.table.push(RequestOptions::default())?)
    }

    fn set_timeout_ms(
        &mut self,
        options: Resource<RequestOptions>,
        timeout_ms: u32,
    ) -> wasmtime::Result<()> {
        self.table.get_mut(&options)?.timeout_ms = Some(timeout_ms);
        Ok(())
    }

    /// Sluice hands back the first reply: a request has one answer.
    fn set_expected_replies(
        &mut self,
        _options: Resource<RequestOptions>,
        _expected: u32,
    ) -> wasmtime::Result<()> {
        Ok(())
    }

    fn drop(&mut self, options: Resource<RequestOptions>) -> wasmtime::Result<()> {
        self.table.delete(options)?;
        Ok(())
    }
}

/// The error kinds of a draft handler's `error` result, as `reject_on`
/// names them.
pub fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::Timeout => "timeout",
        Error::Connection(_) => "connection",
        Error::PermissionDenied(_) => "permission-denied",
        Error::Other(_) => "other",
    }
}

/// The error as a retry or rejection reason.
pub fn describe(error: &Error) -> String {
    match error {
        Error::Timeout => "wasi:messaging error: timeout".into(),
        Error::Connection(text) => format!("wasi:messaging error: connection: {text}"),
        Error::PermissionDenied(text) => {
            format!("wasi:messaging error: permission-denied: {text}")
        }
        Error::Other(text) => format!("wasi:messaging error: {text}"),
    }
}
