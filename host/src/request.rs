//! Request-reply over any backend: send a message, wait for its answer.
//!
//! A requester publishes the request with two headers: `sluice-reply-to`,
//! a topic of its own (`sluice-reply.<id>`, so one grant, `sluice-reply.>`,
//! lets a responder answer on every backend), and `sluice-correlation-id`,
//! new per request. It reads that topic as a throwaway group of its own and
//! hands each reply to the request whose correlation id it carries; a reply
//! nobody waits for any more (it came after its request's timeout) is
//! dropped and logged. (Not NATS's `_INBOX.` prefix: JetStream would keep
//! it in a stream of its own, and with it the replies of its own API.)
//!
//! The responder is an ordinary route: an output its plugin addresses to
//! the input's `sluice-reply-to` topic is the reply, and the host copies the
//! input's correlation id onto it (plugins cannot set `sluice-` headers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::sync::{OnceCell, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backend::{Backend, Settlement, SubscribeOptions};
use crate::message::{Message, headers};

/// The first token of every requester's reply topic.
pub const REPLY_PREFIX: &str = "sluice-reply";

/// How long the reader of replies waits after a failed fetch, at first and
/// at most.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("timeout: no reply to `{topic}` within {after:?} (no responder, or none in time)")]
    Timeout { topic: String, after: Duration },
    #[error("failed: {0}")]
    Failed(String),
}

/// Sends requests on one backend and waits for their replies.
pub struct Requester {
    backend: Arc<dyn Backend>,
    /// Where replies to this requester's requests go.
    topic: String,
    /// Correlation id to the request waiting for it.
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>,
    /// Set once the reply topic is read; stops reading when dropped.
    listening: OnceCell<DropGuard>,
}

impl Requester {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Requester {
            backend,
            topic: format!("{REPLY_PREFIX}.{id}"),
            waiting: Arc::default(),
            listening: OnceCell::new(),
        }
    }

    /// The topic replies come back on.
    pub fn reply_topic(&self) -> &str {
        &self.topic
    }

    /// Publishes `request` with the headers that ask for a reply, and waits
    /// at most `timeout` for it (reading the reply topic first, on the first
    /// request, so that no reply can come before anyone listens).
    pub async fn request(
        &self,
        mut request: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        let topic = request.topic.clone();
        let timed_out = || RequestError::Timeout {
            topic: topic.clone(),
            after: timeout,
        };
        let sent = async {
            self.listen()
                .await
                .map_err(|e| RequestError::Failed(format!("{e:#}")))?;
            let correlation = uuid::Uuid::now_v7().to_string();
            request.set_header(headers::REPLY_TO, self.topic.clone());
            request.set_header(headers::CORRELATION_ID, correlation.clone());
            let (answer, reply) = oneshot::channel();
            self.waiting
                .lock()
                .unwrap()
                .insert(correlation.clone(), answer);
            let _forget = Forget {
                waiting: &self.waiting,
                correlation,
            };
            self.backend
                .publish(vec![request])
                .await
                .map_err(|e| RequestError::Failed(format!("publishing the request: {e:#}")))?;
            reply
                .await
                .map_err(|_| RequestError::Failed("the requester stopped reading replies".into()))
        };
        tokio::time::timeout(timeout, sent)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }

    /// Reads the reply topic from now on, once.
    async fn listen(&self) -> Result<()> {
        self.listening
            .get_or_try_init(|| async {
                let mut options = SubscribeOptions::new(vec![self.topic.clone()], "sluice-replies");
                // From the earliest: the topic is this requester's alone,
                // and a backend that is slow to place a new group (Kafka)
                // still finds a reply sent before it was placed.
                options.ephemeral = true;
                let subscription = self
                    .backend
                    .subscribe(options)
                    .await
                    .with_context(|| format!("reading replies on `{}`", self.topic))?;
                let stop = CancellationToken::new();
                let waiting = self.waiting.clone();
                let stopped = stop.clone();
                tokio::spawn(async move {
                    // While the backend is down: a warning once, then
                    // tries further and further apart.
                    let mut pause: Option<Duration> = None;
                    while !stopped.is_cancelled() {
                        let batch = tokio::select! {
                            batch = subscription.fetch(64, Duration::from_millis(250)) => batch,
                            _ = stopped.cancelled() => break,
                        };
                        let batch = match batch {
                            Ok(batch) => {
                                pause = None;
                                batch
                            }
                            Err(e) => {
                                let wait = match pause {
                                    None => {
                                        tracing::warn!("reading replies failed: {e:#}");
                                        FIRST_PAUSE
                                    }
                                    Some(wait) => (wait * 2).min(LONGEST_PAUSE),
                                };
                                pause = Some(wait);
                                tokio::select! {
                                    _ = tokio::time::sleep(wait) => {}
                                    _ = stopped.cancelled() => break,
                                }
                                continue;
                            }
                        };
                        for delivery in &batch {
                            hand_over(&waiting, &delivery.message);
                        }
                        let acks = batch.iter().map(|d| (d, Settlement::Ack)).collect();
                        for result in subscription.settle(acks).await {
                            if let Err(e) = result {
                                tracing::debug!("acking a reply failed: {e}");
                            }
                        }
                    }
                    let _ = subscription.close().await;
                });
                Ok(stop.drop_guard())
            })
            .await
            .map(|_| ())
    }
}

/// Gives a reply to the request waiting for it, if one still does.
fn hand_over(waiting: &Mutex<HashMap<String, oneshot::Sender<Message>>>, reply: &Message) {
    let Some(correlation) = reply.header(headers::CORRELATION_ID) else {
        tracing::debug!(message = %reply.id, "a message on the reply topic without a correlation id: dropped");
        return;
    };
    match waiting.lock().unwrap().remove(correlation) {
        Some(answer) => {
            let _ = answer.send(reply.clone());
        }
        None => {
            tracing::debug!(correlation, "a reply after its request gave up: dropped");
        }
    }
}

/// Forgets a request when it ends, answered or not.
struct Forget<'a> {
    waiting: &'a Mutex<HashMap<String, oneshot::Sender<Message>>>,
    correlation: String,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting.lock().unwrap().remove(&self.correlation);
    }
}
