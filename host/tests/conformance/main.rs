//! The conformance suite: the behaviours every backend must show, run
//! against each backend by one line in `backends!` below.
//!
//! The contract cases are ported from the behaviours Watermill's universal
//! Pub/Sub tests check, in Sluice's terms; the host cases run the full
//! router with a real WebAssembly plugin. Each backend's capabilities are
//! pinned here, where it is listed: the suite checks the backend declares
//! exactly those, and a case that needs one it lacks is reported as "n/a"
//! with the reason — never hidden as a pass.
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
    ($($(#[$meta:meta])* $name:ident => $target:expr, $capabilities:literal;)*) => {
        $(
            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run_suite(
                    std::sync::Arc::new($target),
                    harness::pinned($capabilities),
                )
                .await;
            }
        )*
    };
}

// What each backend guarantees, pinned: the suite fails if a backend
// declares anything else, and decides which cases apply from this.
backends! {
    memory => targets::Memory::new(),
        "consumer_groups ordered_per_key native_delay wildcards at_least_once backlog";
    sqlite => targets::Sqlite::new(),
        "persistent history consumer_groups ordered_per_key native_delay lease wildcards \
         at_least_once lease_checked backlog";
    file => targets::FileLog::new(),
        "persistent history consumer_groups ordered_per_key native_delay lease wildcards \
         at_least_once backlog";
    redis_streams => targets::Redis::streams(),
        "persistent history consumer_groups lease wildcards at_least_once lease_checked backlog";
    redis_pubsub => targets::Redis::pubsub(),
        "consumer_groups ordered_per_key wildcards";
    nats => targets::Nats::core(),
        "consumer_groups ordered_per_key native_delay wildcards";
    jetstream => targets::Nats::jetstream(),
        "persistent history consumer_groups native_delay lease wildcards at_least_once backlog";
    #[cfg(feature = "postgres")]
    postgres => targets::postgres::Postgres::new(),
        "persistent history consumer_groups ordered_per_key native_delay lease wildcards \
         at_least_once lease_checked backlog";
    #[cfg(feature = "kafka")]
    kafka => targets::kafka::Kafka::new(),
        "persistent history consumer_groups ordered_per_key lease wildcards at_least_once backlog";
    #[cfg(feature = "sqs")]
    sqs => targets::sqs::Sqs::queue(),
        "persistent consumer_groups native_delay lease at_least_once backlog";
    #[cfg(feature = "sqs")]
    sns_sqs => targets::sqs::Sqs::fan_out(),
        "persistent consumer_groups native_delay lease at_least_once backlog";
}
