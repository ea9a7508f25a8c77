//! The host capabilities a plugin imports (`sluice:plugin/host`).

use super::instance::State;
use super::sluice::plugin::{host, types};

impl types::Host for State {}

impl host::Host for State {
    fn publish(&mut self, msg: types::Outgoing) -> Result<(), String> {
        self.may_publish(&msg.topic)?;
        self.published.push(msg);
        Ok(())
    }

    fn log(&mut self, level: host::LogLevel, message: String) {
        let plugin = self.settings.name.as_str();
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
