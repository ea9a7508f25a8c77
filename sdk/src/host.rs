//! Host capabilities other than logging (which has its own module).
//!
//! Thin wrappers so plugin code does not depend on the generated module
//! layout, which follows the WIT package name and would change with it.

use crate::Outgoing;
use crate::bindings::sluice::plugin::host;

/// Publishes `msg` in addition to the handler's returned outputs.
///
/// The host sends it only if the handler then succeeds, so it is safe to call
/// before deciding the outcome.
///
/// # Errors
///
/// The host's reason, when this plugin is not allowed to publish to that
/// topic.
pub fn publish(msg: &Outgoing) -> Result<(), String> {
    host::publish(msg)
}

/// Reads `key` from this plugin's `config` table in the host config.
pub fn config_get(key: &str) -> Option<String> {
    host::config_get(key)
}
