//! The conformance suite (`sluice_tests::conformance`) run against every
//! backend, each by one line in `backends!` below, with the capabilities
//! it is expected to declare pinned: the suite fails if a backend declares
//! anything else, and decides which cases apply from the pinned ones.

use sluice_tests::conformance::{pinned, run_suite, targets};

macro_rules! backends {
    ($($(#[$meta:meta])* $name:ident => $target:expr, $capabilities:literal;)*) => {
        $(
            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run_suite(
                    std::sync::Arc::new($target),
                    pinned($capabilities),
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
         at_least_once lease_checked backlog key_affinity";
    file => targets::FileLog::new(),
        "persistent history consumer_groups ordered_per_key native_delay lease wildcards \
         at_least_once backlog";
    #[cfg_attr(not(feature = "redis"), ignore = "needs redis-server (feature `redis`)")]
    redis_streams => targets::Redis::streams(),
        "persistent history consumer_groups ordered_per_key lease wildcards at_least_once \
         lease_checked backlog key_affinity";
    #[cfg_attr(not(feature = "redis"), ignore = "needs redis-server (feature `redis`)")]
    redis_pubsub => targets::Redis::pubsub(),
        "consumer_groups ordered_per_key wildcards";
    #[cfg_attr(not(feature = "nats"), ignore = "needs nats-server (feature `nats`)")]
    nats => targets::Nats::core(),
        "consumer_groups ordered_per_key native_delay wildcards";
    #[cfg_attr(not(feature = "nats"), ignore = "needs nats-server (feature `nats`)")]
    jetstream => targets::Nats::jetstream(),
        "persistent history consumer_groups native_delay lease wildcards at_least_once backlog";
    #[cfg_attr(not(feature = "nats"), ignore = "needs nats-server (feature `nats`)")]
    jetstream_sharded => targets::Nats::jetstream_sharded(),
        "persistent history consumer_groups ordered_per_key native_delay lease wildcards \
         at_least_once backlog key_affinity";
    #[cfg_attr(not(feature = "postgres"), ignore = "needs PostgreSQL (feature `postgres`)")]
    postgres => targets::postgres::Postgres::new(),
        "persistent history consumer_groups ordered_per_key native_delay lease wildcards \
         at_least_once lease_checked backlog key_affinity";
    #[cfg(feature = "kafka")]
    kafka => targets::kafka::Kafka::new(),
        "persistent history consumer_groups ordered_per_key lease wildcards at_least_once backlog \
         key_affinity";
    #[cfg(feature = "sqs")]
    sqs => targets::sqs::Sqs::queue(),
        "persistent consumer_groups ordered_per_key native_delay lease wildcards at_least_once \
         backlog key_affinity";
    #[cfg(feature = "sqs")]
    sns_sqs => targets::sqs::Sqs::fan_out(),
        "persistent consumer_groups native_delay lease wildcards at_least_once backlog";
}
