//! Riding over short connection losses. A Redis restart or failover drops
//! every connection for a moment; the connection managers reconnect with
//! backoff, and the operations here are retried meanwhile (all of them are
//! safe to repeat: a repeated publish can only duplicate, never lose), so a
//! blip is not an error. An outage longer than [`RIDE_OVER`] is reported.

use std::future::Future;
use std::time::Duration;

use ::redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use tokio::time::Instant;

/// How long an operation keeps retrying before the error is returned.
pub const RIDE_OVER: Duration = Duration::from_secs(5);

/// Whether the error is the connection's (worth retrying), not the
/// command's.
pub fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || e.kind() == ErrorKind::Server(ServerErrorKind::BusyLoading)
}

/// Whether an error from an operation (possibly with context added) came
/// from the connection or from a read that did not answer in time.
pub fn is_transient_any(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<RedisError>().is_some_and(is_transient)
            || cause.is::<tokio::time::error::Elapsed>()
    })
}

/// Runs `op`, again after a pause whenever it fails transiently, for at
/// most [`RIDE_OVER`].
pub async fn retry<T, F, Fut>(mut op: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    let give_up = Instant::now() + RIDE_OVER;
    let mut pause = Duration::from_millis(50);
    loop {
        match op().await {
            Err(e) if is_transient(&e) && Instant::now() + pause < give_up => {
                tracing::debug!("Redis connection trouble, retrying in {pause:?}: {e}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}
