//! Sluice: a message-processing host that owns every backend connection and
//! delivery guarantee, and runs business logic as sandboxed WebAssembly
//! components (the `sluice:plugin/handler` world).
//!
//! - [`backend`]: the contract every message backend implements, and the
//!   backends themselves;
//! - [`runtime`]: wasmtime, plugin loading and warm instances;
//! - [`router`]: the delivery loop of a route (call, publish, settle);
//! - [`config`]: the TOML configuration;
//! - [`app`]: wiring it all into a running host.

pub mod app;
pub mod backend;
pub mod config;
pub mod message;
pub mod router;
pub mod runtime;

pub use message::Message;
