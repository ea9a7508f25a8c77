//! Logging through the host, which tags each line with the plugin's name.
//!
//! Guests have no useful stdout of their own, so this is the way to leave a
//! trace. Each call crosses into the host: keep it off hot paths.

pub use crate::bindings::sluice::plugin::host::LogLevel as Level;

/// Writes `message` at `level`.
pub fn write(level: Level, message: &str) {
    crate::bindings::sluice::plugin::host::log(level, message);
}

pub fn trace(message: &str) {
    write(Level::Trace, message);
}

pub fn debug(message: &str) {
    write(Level::Debug, message);
}

pub fn info(message: &str) {
    write(Level::Info, message);
}

pub fn warn(message: &str) {
    write(Level::Warn, message);
}

pub fn error(message: &str) {
    write(Level::Error, message);
}
