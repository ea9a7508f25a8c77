//! Sluice: a message-processing host that owns every backend connection and
//! delivery guarantee, and runs business logic as sandboxed WebAssembly
//! components (the `sluice:plugin/handler` world).
//!
//! - [`backend`]: the contract every message backend implements, and the
//!   backends themselves;
//! - [`runtime`]: wasmtime, plugin loading and warm instances;
//! - [`router`]: the delivery loop of a route (call, publish, settle);
//! - [`config`]: the TOML configuration;
//! - [`rate`]: token buckets (a route's `max_rate`, a plugin's log lines);
//! - [`replay`]: a route's stored messages from a time on, handled again;
//! - [`deploy`]: new plugin versions into a running host, and rollback;
//! - [`dlq`]: a route's dead letters: list, show, purge;
//! - [`admin`]: the admin HTTP API, health and metrics;
//! - [`telemetry`]: the log, and delivery spans exported over OTLP;
//! - `kit`: `sluice new`, `sluice build` and `sluice test` for plugin authors;
//! - [`app`]: wiring it all into a running host;
//! - [`cli`]: the `sluice` command.

pub mod admin;
pub mod app;
pub mod backend;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod dlq;
#[cfg(test)]
mod fuzz;
#[cfg(feature = "kit")]
pub mod kit;
pub mod message;
pub mod rate;
pub mod replay;
pub mod request;
pub mod router;
pub mod runtime;
pub mod telemetry;

pub use message::Message;

/// The memory allocator the `sluice` binary (and the benchmarks) run on:
/// a route allocates and frees a payload-sized buffer or two per message on
/// several threads, which glibc's allocator spends a quarter of a busy
/// host's CPU on (consolidating and unlinking chunks).
pub use mimalloc::MiMalloc as Allocator;
