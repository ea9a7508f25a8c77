//! The conformance suite: the behaviours every backend must show, run
//! against each backend by one line in `backends!` below.
//!
//! The contract cases are ported from the behaviours Watermill's universal
//! Pub/Sub tests check, in Sluice's terms; the host cases run the full
//! router with a real WebAssembly plugin. Each backend declares its
//! capabilities, and a case that needs one the backend lacks is reported as
//! "n/a" with the reason — never hidden as a pass.
//!
//! Each backend's results are printed as a table (visible with
//! `--nocapture`) and written to `target/tmp/conformance/<backend>.tsv`,
//! which `cargo xtask test` prints as one table. Set
//! `SLUICE_CONFORMANCE_STRESS=N` to run the whole suite N times in parallel
//! per backend, and `SLUICE_CONFORMANCE_CASES=a,b` to run only the cases
//! named.

#[path = "../common/mod.rs"]
mod common;

mod cases;
mod harness;
mod host_cases;
mod targets;

use harness::run_suite;

macro_rules! backends {
    ($($(#[$meta:meta])* $name:ident => $target:expr;)*) => {
        $(
            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run_suite(std::sync::Arc::new($target)).await;
            }
        )*
    };
}

backends! {
    memory => targets::Memory::new();
    sqlite => targets::Sqlite::new();
    file => targets::FileLog::new();
    redis_streams => targets::Redis::streams();
    redis_pubsub => targets::Redis::pubsub();
    nats => targets::Nats::core();
    jetstream => targets::Nats::jetstream();
    #[cfg(feature = "postgres")]
    postgres => targets::postgres::Postgres::new();
    #[cfg(feature = "kafka")]
    kafka => targets::kafka::Kafka::new();
    #[cfg(feature = "sqs")]
    sqs => targets::sqs::Sqs::queue();
    #[cfg(feature = "sqs")]
    sns_sqs => targets::sqs::Sqs::fan_out();
}
