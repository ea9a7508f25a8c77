//! Sluice's integration tests, one module per area, in one binary so a
//! change links once. A module or test that needs a server or a toolchain
//! runs only with the feature that says so (see `tests/Cargo.toml`);
//! `cargo xtask test` turns them all on.

mod admin;
mod anywhere;
mod backends;
mod cli;
mod conformance;
#[cfg(feature = "browser")]
mod console;
mod crash;
mod dev;
mod filelog;
mod hostile;
mod hot_reload;
#[cfg(feature = "kafka")]
mod kafka;
mod kit;
#[cfg(feature = "languages")]
mod languages;
#[cfg(all(feature = "redis", feature = "nats"))]
mod migration;
#[cfg(feature = "nats")]
mod nats;
mod outbound_http;
mod pipeline;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod request_reply;
mod sdk;
mod sqlite;
#[cfg(feature = "sqs")]
mod sqs;
mod telemetry;
#[cfg(all(feature = "redis", feature = "nats", feature = "postgres"))]
mod tls;
mod wasi_messaging;
