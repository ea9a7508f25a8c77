//! Host capabilities other than logging (which has its own module).
//!
//! Thin wrappers so plugin code does not depend on the generated module
//! layout, which follows the WIT package name and would change with it.

use crate::bindings::sluice::plugin::host;
use crate::{Message, Outgoing};

/// Publishes `msg` in addition to the handler's returned outputs.
///
/// The host sends it only if the handler then succeeds, so it is safe to call
/// before deciding the outcome. When a [`handler!`](crate::handler) function
/// runs inside a batch, `msg` is kept with that message's outputs instead,
/// and a topic the plugin may not publish to rejects the message once the
/// batch returns.
///
/// # Errors
///
/// The host's reason, when this plugin is not allowed to publish to that
/// topic, or when called by a [`batch_handler!`](crate::batch_handler)
/// function (outputs belong in each message's result there).
pub fn publish(msg: &Outgoing) -> Result<(), String> {
    if crate::batch::keep_published(msg) {
        return Ok(());
    }
    host::publish(msg)
}

/// Sends `msg` as a request and waits for its reply, at most `timeout_ms`
/// and never past the call's deadline.
///
/// The request goes out on the route's output backend; the responder's
/// plugin answers with [`Message::reply`].
///
/// # Errors
///
/// The host's reason: `timeout: …` when no reply came in time (no
/// responder, or a slow one), `denied: …` when this plugin may not send
/// requests to that topic (grant it with `request_to`), `failed: …`
/// otherwise.
pub fn request(msg: &Outgoing, timeout_ms: u32) -> Result<Message, String> {
    host::request(msg, timeout_ms)
}

/// Reads `key` from this plugin's `config` table in the host config.
pub fn config_get(key: &str) -> Option<String> {
    host::config_get(key)
}
