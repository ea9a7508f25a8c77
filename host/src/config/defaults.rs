//! The default of every config key that has one.

pub(super) fn timeout_ms() -> u64 {
    1_000
}
pub(super) fn memory_limit_mb() -> u64 {
    64
}
pub(super) fn max_outputs() -> usize {
    crate::runtime::OutputLimits::default().max_outputs
}
pub(super) fn max_output_mb() -> usize {
    crate::runtime::OutputLimits::default().max_bytes >> 20
}
pub(super) fn max_outbound_requests() -> usize {
    8
}
pub(super) fn max_message_bytes() -> usize {
    crate::runtime::OutputLimits::default().max_message_bytes
}
pub(super) fn max_hops() -> u32 {
    crate::router::RouteSpec::DEFAULT_MAX_HOPS
}
pub(super) fn concurrency() -> usize {
    1
}
pub(super) fn lease_ms() -> u64 {
    30_000
}
pub(super) fn shadow_sample() -> f64 {
    1.0
}

pub(super) fn service_name() -> String {
    "sluice".into()
}

pub(super) fn stalled_after_ms() -> u64 {
    30_000
}
pub(super) fn max_in_flight() -> usize {
    crate::router::RouteSpec::DEFAULT_MAX_IN_FLIGHT
}
pub(super) fn batch_size() -> usize {
    1
}
pub(super) fn max_attempts() -> u32 {
    5
}
pub(super) fn initial_backoff_ms() -> u64 {
    200
}
pub(super) fn max_backoff_ms() -> u64 {
    30_000
}
pub(super) fn multiplier() -> f64 {
    2.0
}
pub(super) fn jitter() -> f64 {
    0.2
}
pub(super) fn yes() -> bool {
    true
}
pub(super) fn shutdown_grace_ms() -> u64 {
    30_000
}
pub(super) fn admin_listen() -> String {
    "127.0.0.1:9464".into()
}
pub(super) fn max_upload_mb() -> u64 {
    32
}
