//! Receive tasks: one ReceiveMessage call each, long polling, whose
//! messages are held by the subscription until a fetch hands them out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use tokio::time::Instant;

use super::client::{error_code, is_missing_queue};
use super::codec::decode;
use super::names::queue_name_of;
use super::send::MAX_BATCH;
use super::subscription::{Held, Inner, State};

/// Receives under way at once on a busy queue.
const MAX_PARALLEL: usize = 4;
/// How long a queue rests after a failed receive.
const REST_AFTER_ERROR: Duration = Duration::from_millis(500);

/// Starts receives on the queues that have none under way (more on a busy
/// queue when `max` asks for more than one batch), long polling for about
/// `wait` (in whole seconds, at least one).
pub fn start(inner: &Arc<Inner>, state: &mut State, max: usize, wait: Duration) {
    let now = Instant::now();
    let wait_seconds =
        (wait.as_millis().div_ceil(1000) as u64).clamp(1, inner.wait_s.into()) as i32;
    let per_receive = max.min(MAX_BATCH) as i32;
    for queue in 0..inner.queues.len() {
        if state.rest_until[queue].is_some_and(|until| now < until) {
            continue;
        }
        // One at a time on an ordered group's FIFO queue, so a key's
        // messages arrive in the order SQS hands them out even where
        // concurrent receives are not kept off each other's message groups
        // (moto's are not: two took later messages of a key while earlier
        // ones were on their way).
        let wanted = if state.busy[queue] && !inner.ordered {
            max.div_ceil(MAX_BATCH).clamp(1, MAX_PARALLEL)
        } else {
            1
        };
        while state.receiving[queue] < wanted {
            state.receiving[queue] += 1;
            tokio::spawn(receive(inner.clone(), queue, per_receive, wait_seconds));
        }
    }
}

async fn receive(inner: Arc<Inner>, queue: usize, max: i32, wait_seconds: i32) {
    let source = &inner.queues[queue];
    let result = inner
        .sqs
        .receive_message()
        .queue_url(&source.url)
        .max_number_of_messages(max)
        .wait_time_seconds(wait_seconds)
        .visibility_timeout(inner.lease.seconds)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
        .send()
        .await;
    let now = Instant::now();
    {
        let mut state = inner.state.lock().unwrap();
        state.receiving[queue] -= 1;
        match result {
            Ok(out) => {
                let messages = out.messages.unwrap_or_default();
                state.busy[queue] = messages.len() >= MAX_BATCH;
                state.rest_until[queue] = None;
                state.errors[queue] = None;
                for raw in messages {
                    let sqs_id = raw.message_id.clone().unwrap_or_default();
                    match decode(raw, &source.topic) {
                        Ok(received) => {
                            let token = state.next_token;
                            state.next_token += 1;
                            let key = (received.message.key.as_ref())
                                .filter(|key| inner.ordered && !key.is_empty())
                                .cloned();
                            state.held.insert(
                                token,
                                Held {
                                    queue,
                                    receipt: received.receipt_handle.clone(),
                                    received: now,
                                    extended: now,
                                    key,
                                },
                            );
                            state.ready.push_back((token, received));
                        }
                        // Left alone: it comes back after the lease, and goes
                        // to the dead-letter queue after `max_receive` tries.
                        Err(e) => tracing::warn!(
                            group = %inner.group,
                            queue = queue_name_of(&source.url),
                            sqs_message = %sqs_id,
                            "cannot read a message: {e:#}"
                        ),
                    }
                }
            }
            Err(e) => {
                state.rest_until[queue] = Some(now + REST_AFTER_ERROR);
                if !inner.closed.load(Ordering::SeqCst) {
                    let gone = is_missing_queue(error_code(&e));
                    if gone {
                        state.missing[queue] = true;
                        state.rest_until[queue] = None;
                    }
                    let error = anyhow::Error::new(e).context(if gone {
                        format!(
                            "queue `{}` of group `{}` no longer exists",
                            queue_name_of(&source.url),
                            inner.group
                        )
                    } else {
                        format!("SQS ReceiveMessage from `{}`", queue_name_of(&source.url))
                    });
                    state.errors[queue] = Some(format!("{error:#}"));
                }
            }
        }
    }
    inner.arrived.notify_waiters();
}
