//! The host capabilities a plugin imports (`sluice:plugin/host`), under the
//! current version's name and under 0.1.0's, whose interface is the same.

use std::time::Duration;

use wasmtime::StoreContextMut;
use wasmtime::component::Linker;

use super::instance::State;
use super::log::{Admit, MAX_TEXT, escape};
use super::sluice::plugin::{host, types};

impl types::Host for State {}

impl host::Host for State {
    fn publish(&mut self, msg: types::Outgoing) -> Result<(), String> {
        if self.in_batch {
            return Err(
                "`publish` is not available during `handle-batch`: put the message in its \
                 input's result (the host settles each message of a batch on its own, so it \
                 could not tell which input a published message belongs to)"
                    .into(),
            );
        }
        // A call over its limits fails once it returns; until then each
        // further `publish` is refused without being kept.
        let message = self
            .take_output(msg)
            .map_err(|e| e.unwrap_or_else(|over| over))?;
        self.published.push(message);
        Ok(())
    }

    async fn request(
        &mut self,
        msg: types::Outgoing,
        timeout_ms: u32,
    ) -> Result<types::MessageResult, String> {
        let request = self.take_request(msg)?;
        let Some(requester) = self.link.requester.clone() else {
            return Err(
                "failed: requests are not available here (a shadow run, or a plugin \
                 called outside a route)"
                    .into(),
            );
        };
        let timeout = self.request_time(Duration::from_millis(timeout_ms.into()));
        // Waiting is not running: the route's other calls may have the CPU.
        let (share, slot) = self.slot_handles();
        self.leave_slot();
        let reply = requester.request(request, timeout).await;
        State::reenter_slot(share, slot).await;
        let reply = reply.map_err(|e| e.to_string())?;
        Ok(types::MessageResult {
            id: reply.id,
            topic: reply.topic,
            key: reply.key,
            headers: reply
                .headers
                .into_iter()
                .map(|(name, value)| types::HeaderResult { name, value })
                .collect(),
            payload: reply.payload,
            attempt: 1,
            timestamp_ms: reply.timestamp_ms,
        })
    }

    fn log(&mut self, level: host::LogLevel, message: String) {
        let plugin = self.settings.name.as_str();
        match self.settings.log_budget.admit() {
            Admit::Drop => return,
            Admit::Write { dropped_before: 0 } => {}
            Admit::Write { dropped_before } => {
                tracing::warn!(
                    plugin,
                    "dropped {dropped_before} log line(s) over the plugin's rate"
                )
            }
        }
        let message = escape(&message, MAX_TEXT);
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            host::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            host::LogLevel::Info => tracing::info!(plugin, "{message}"),
            host::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            host::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.settings.config.get(&key).cloned()
    }
}

/// Defines `sluice:plugin/host@0.1.0` (and the types interface it uses) with
/// the same functions as the current version. Semver matching cannot do it:
/// 0.1 and 0.2 are different tracks. Component types are structural, so
/// the current version's Rust types lift and lower 0.1.0's unchanged.
pub(super) fn add_v0_1_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.instance("sluice:plugin/types@0.1.0")?;
    let mut v0_1 = linker.instance("sluice:plugin/host@0.1.0")?;
    v0_1.func_wrap(
        "publish",
        |mut store: StoreContextMut<'_, State>, (msg,): (types::Outgoing,)| {
            Ok((host::Host::publish(store.data_mut(), msg),))
        },
    )?;
    v0_1.func_wrap(
        "log",
        |mut store: StoreContextMut<'_, State>, (level, message): (host::LogLevel, String)| {
            host::Host::log(store.data_mut(), level, message);
            Ok(())
        },
    )?;
    v0_1.func_wrap(
        "config-get",
        |mut store: StoreContextMut<'_, State>, (key,): (String,)| {
            Ok((host::Host::config_get(store.data_mut(), key),))
        },
    )?;
    Ok(())
}
