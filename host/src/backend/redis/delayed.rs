//! Redelivery after a nack, done by Sluice on top of Redis (Streams have no
//! delayed visibility).
//!
//! A nack acks the entry and, in the same script (the settling script,
//! `settle.rs`, which does a batch's nacks with its acks), parks a copy of the
//! message (an envelope that also carries the attempts so far) in the
//! group's sorted set `P.delayed:<group>`, scored by the server time it is
//! due; with no delay it goes straight to the group's retry stream
//! `P.retry:<group>`. Every member moves due copies from the set to the
//! retry stream (another script), which it reads in the same XREADGROUP as
//! its topics. So a delay never blocks other messages, survives a restart of
//! the consumer, and a retry goes to whichever member is free. The retry
//! stream is private to the group: other groups never see the retry.
//!
//! Precision: a member looks for due retries between reads: at once after
//! a nack in this process, else every 500 ms or when the set says the next
//! one is due. A member blocked in XREADGROUP notices when its read ends, so
//! a retry may come up to one read (`block_ms`, or the fetch's wait if
//! shorter) after its delay. A zero-delay nack wakes blocked readers at once.

use std::time::Duration;

use ::redis::aio::ConnectionManager;
use anyhow::{Context, Result};

use super::scripts;
use super::subscription::StreamSubscription;

/// Due retries moved per script call at most.
const PROMOTE_BATCH: usize = 1000;

/// Moves the group's due retries to its retry stream; returns how long
/// until the next one is due, if any is waiting.
pub async fn promote(
    sub: &StreamSubscription,
    conn: &mut ConnectionManager,
) -> Result<Option<Duration>> {
    let keys = &sub.shared.keys;
    let next: i64 = scripts::PROMOTE
        .key(keys.delayed(&sub.group))
        .key(keys.retry(&sub.group))
        .arg(PROMOTE_BATCH)
        .invoke_async(conn)
        .await
        .context("moving due retries")?;
    Ok((next >= 0).then(|| Duration::from_millis(next as u64)))
}
