//! The one writer of a SQLite backend: a task that owns the write
//! connection and turns whatever publishes, claims, settlements and acks
//! have queued up meanwhile into one transaction (and one fsync).
//!
//! SQLite lets one connection write at a time; connections that want to
//! write while another does sleep in its busy handler. With every write of
//! this process going through one connection, none does: they queue here
//! instead, and the queue grows with the load, so a busy backend commits
//! large batches. (Other processes sharing the file still take turns with
//! this one through SQLite's lock.)
//!
//! Each request runs under a savepoint of its own, so one that fails leaves
//! the others of the transaction standing; a settlement that fails is tried
//! again one item at a time, so an item at fault fails alone. Answers go
//! out once the transaction has committed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::store::{self, Item};
use crate::backend::Settlement;
use crate::backend::{Delivery, SettleError, StartFrom};
use crate::message::Message;

/// The most requests one transaction takes.
const BATCH_MAX: usize = 1024;

/// Single acks queued and not yet committed, at most: an `ack` past this
/// waits for the writer, so a crash redelivers at most this many acked
/// messages (besides what consumers held unsettled).
pub const QUEUED_ACKS_MAX: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T>>;

type Settled = Vec<Result<(), SettleError>>;

enum Request {
    Publish {
        messages: Vec<Message>,
        done: Reply<()>,
    },
    Subscribe {
        group: String,
        topics: Vec<String>,
        start: StartFrom,
        done: Reply<()>,
    },
    Claim {
        group: String,
        lease: Duration,
        max: usize,
        /// Only the oldest unsettled delivery of each key (see `store::claim`).
        ordered: bool,
        done: Reply<Vec<Delivery>>,
    },
    Settle {
        group: String,
        /// The group keeps per-key order (see `store::delete_claimed`).
        ordered: bool,
        items: Vec<Item>,
        done: oneshot::Sender<Settled>,
    },
    /// An ack nobody waits for.
    Ack {
        group: String,
        ordered: bool,
        claim: (i64, i64),
        /// Room in the ack queue, given back once the ack is committed.
        room: OwnedSemaphorePermit,
    },
    /// Hands claims back to the group.
    Release {
        group: String,
        claims: Vec<(i64, i64)>,
        done: Reply<()>,
    },
    /// Removes a group.
    Forget { group: String, done: Reply<()> },
}

impl Request {
    /// Answers that the transaction failed before the request ran.
    fn fail(self, error: &anyhow::Error) {
        let outcome = match self {
            Request::Publish { done, .. }
            | Request::Subscribe { done, .. }
            | Request::Release { done, .. }
            | Request::Forget { done, .. } => Outcome::Unit(done, Ok(())),
            Request::Claim { done, .. } => Outcome::Claimed(done, Ok(Vec::new())),
            Request::Settle { items, done, .. } => {
                Outcome::Settled(done, items.iter().map(|_| Ok(())).collect())
            }
            Request::Ack { .. } => return,
        };
        outcome.fail(error);
    }
}

/// A request carried out, waiting for the commit to answer.
enum Outcome {
    Unit(Reply<()>, Result<()>),
    Claimed(Reply<Vec<Delivery>>, Result<Vec<Delivery>>),
    Settled(oneshot::Sender<Settled>, Settled),
}

impl Outcome {
    /// Answers with the request's own result.
    fn answer(self) {
        match self {
            Outcome::Unit(done, result) => drop(done.send(result)),
            Outcome::Claimed(done, result) => drop(done.send(result)),
            Outcome::Settled(done, results) => drop(done.send(results)),
        }
    }

    /// Answers that the transaction failed: nothing took effect.
    fn fail(self, error: &anyhow::Error) {
        let error = || anyhow!("the SQLite transaction failed: {error:#}");
        match self {
            Outcome::Unit(done, _) => drop(done.send(Err(error()))),
            Outcome::Claimed(done, _) => drop(done.send(Err(error()))),
            Outcome::Settled(done, results) => drop(
                done.send(
                    results
                        .iter()
                        .map(|_| Err(SettleError::Unavailable(error())))
                        .collect(),
                ),
            ),
        }
    }
}

/// The handle on the writer task; the task ends once every handle is gone
/// and what was queued is written.
pub struct Writer {
    requests: mpsc::UnboundedSender<Request>,
    /// Room for single acks between queued and committed.
    ack_room: Arc<Semaphore>,
}

impl Writer {
    /// Starts the task on `conn`; it rings `changed` when a transaction made
    /// messages visible (published, nacked or handed back).
    pub fn start(conn: SqliteConnection, changed: Arc<Notify>) -> Writer {
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, queue, changed));
        Writer {
            requests,
            ack_room: Arc::new(Semaphore::new(QUEUED_ACKS_MAX)),
        }
    }

    pub async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.ask(|done| Request::Publish { messages, done }).await
    }

    pub async fn subscribe(&self, group: &str, topics: &[String], start: StartFrom) -> Result<()> {
        self.ask(|done| Request::Subscribe {
            group: group.to_string(),
            topics: topics.to_vec(),
            start,
            done,
        })
        .await
    }

    pub async fn claim(
        &self,
        group: &str,
        lease: Duration,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<Delivery>> {
        self.ask(|done| Request::Claim {
            group: group.to_string(),
            lease,
            max,
            ordered,
            done,
        })
        .await
    }

    pub async fn settle(&self, group: &str, ordered: bool, items: Vec<Item>) -> Settled {
        let count = items.len();
        let (done, answer) = oneshot::channel();
        let request = Request::Settle {
            group: group.to_string(),
            ordered,
            items,
            done,
        };
        if self.requests.send(request).is_err() {
            return (0..count).map(|_| Err(SettleError::Closed)).collect();
        }
        match answer.await {
            Ok(results) => results,
            // Dropped unanswered: its transaction failed.
            Err(_) => (0..count)
                .map(|_| {
                    Err(SettleError::Unavailable(anyhow!(
                        "the SQLite transaction failed"
                    )))
                })
                .collect(),
        }
    }

    /// Queues an ack and returns: it is written with the next transaction.
    /// Waits while [`QUEUED_ACKS_MAX`] acks are queued.
    pub async fn ack(&self, group: &str, ordered: bool, claim: (i64, i64)) {
        let Ok(room) = self.ack_room.clone().acquire_owned().await else {
            return;
        };
        let _ = self.requests.send(Request::Ack {
            group: group.to_string(),
            ordered,
            claim,
            room,
        });
    }

    pub async fn release(&self, group: &str, claims: Vec<(i64, i64)>) -> Result<()> {
        self.ask(|done| Request::Release {
            group: group.to_string(),
            claims,
            done,
        })
        .await
    }

    pub async fn drop_group(&self, group: &str) -> Result<()> {
        self.ask(|done| Request::Forget {
            group: group.to_string(),
            done,
        })
        .await
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(request(done))
            .map_err(|_| anyhow!("the SQLite writer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the SQLite transaction failed"))?
    }
}

async fn run(
    mut conn: SqliteConnection,
    mut queue: mpsc::UnboundedReceiver<Request>,
    changed: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while queue.recv_many(&mut batch, BATCH_MAX).await > 0 {
        if commit(&mut conn, batch.drain(..)).await {
            changed.notify_waiters();
        }
    }
    let _ = conn.close().await;
}

/// Runs `requests` in one transaction and answers them; whether messages
/// became visible.
async fn commit(conn: &mut SqliteConnection, requests: impl Iterator<Item = Request>) -> bool {
    let mut acks: HashMap<(String, bool), Vec<(i64, i64)>> = HashMap::new();
    // Held until the transaction ends, so the queue's room comes back only
    // for acks that are written (or failed).
    let mut _ack_room = Vec::new();
    let mut others = Vec::new();
    for request in requests {
        match request {
            Request::Ack {
                group,
                ordered,
                claim,
                room,
            } => {
                acks.entry((group, ordered)).or_default().push(claim);
                _ack_room.push(room);
            }
            other => others.push(other),
        }
    }
    let mut outcomes = Vec::with_capacity(others.len());
    let mut pending = others.into_iter();
    let mut visible = false;
    let result = async {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        // Each is one statement, all or nothing on its own.
        for ((group, ordered), claims) in &acks {
            store::delete_claimed(&mut tx, group, *ordered, claims).await?;
        }
        for request in pending.by_ref() {
            visible |= makes_visible(&request);
            outcomes.push(carry_out(&mut tx, request).await?);
        }
        tx.commit().await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => outcomes.into_iter().for_each(Outcome::answer),
        Err(e) => {
            if !acks.is_empty() {
                tracing::warn!("acks not written; they will be redelivered: {e:#}");
            }
            outcomes.into_iter().for_each(|o| o.fail(&e));
            // Those not carried out yet; the one that broke the transaction
            // was dropped, which its caller reads as the same failure.
            pending.for_each(|request| request.fail(&e));
            visible = false;
        }
    }
    visible
}

/// Whether a request, once committed, lets a waiting consumer find
/// something new.
fn makes_visible(request: &Request) -> bool {
    match request {
        Request::Publish { .. } | Request::Release { .. } => true,
        Request::Settle { items, .. } => items
            .iter()
            .any(|item| !matches!(item.settlement, Settlement::Ack)),
        _ => false,
    }
}

/// Runs one request under a savepoint, so that its failure undoes only it.
/// An error here (rather than in the outcome) leaves the transaction in an
/// unknown state: it must not commit.
async fn carry_out(conn: &mut SqliteConnection, request: Request) -> Result<Outcome> {
    Ok(match request {
        Request::Publish { messages, done } => {
            let messages: Vec<&Message> = messages.iter().collect();
            let result = savepoint(conn, async |conn| {
                store::insert_messages(conn, &messages).await
            })
            .await?;
            Outcome::Unit(done, result)
        }
        Request::Subscribe {
            group,
            topics,
            start,
            done,
        } => {
            let result = savepoint(conn, async |conn| {
                store::create_group(conn, &group, &topics, start).await
            })
            .await?;
            Outcome::Unit(done, result)
        }
        Request::Claim {
            group,
            lease,
            max,
            ordered,
            done,
        } => {
            let result = savepoint(conn, async |conn| {
                store::claim(conn, &group, lease, max, ordered).await
            })
            .await?;
            Outcome::Claimed(done, result)
        }
        Request::Settle {
            group,
            ordered,
            items,
            done,
        } => Outcome::Settled(done, settle(conn, &group, ordered, &items).await?),
        Request::Release {
            group,
            claims,
            done,
        } => {
            // One statement: all or nothing by itself.
            let result = store::release(conn, &group, &claims).await;
            Outcome::Unit(done, result)
        }
        Request::Forget { group, done } => {
            let result =
                savepoint(conn, async |conn| store::drop_group(conn, &group).await).await?;
            Outcome::Unit(done, result)
        }
        Request::Ack { .. } => unreachable!("acks are written together"),
    })
}

/// Settles a batch under one savepoint; if that fails, each item under one
/// of its own.
async fn settle(
    conn: &mut SqliteConnection,
    group: &str,
    ordered: bool,
    items: &[Item],
) -> Result<Settled> {
    let answer =
        |held: &HashSet<(i64, i64)>, item: &Item| match held.contains(&(item.seq, item.attempt)) {
            true => Ok(()),
            false => Err(SettleError::LeaseLost),
        };
    let error = match savepoint(conn, async |conn| {
        store::settle(conn, group, ordered, items).await
    })
    .await?
    {
        Ok(held) => return Ok(items.iter().map(|item| answer(&held, item)).collect()),
        Err(e) => e,
    };
    if items.len() == 1 {
        return Ok(vec![Err(SettleError::Unavailable(error))]);
    }
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        let one = std::slice::from_ref(item);
        results.push(
            match savepoint(conn, async |conn| {
                store::settle(conn, group, ordered, one).await
            })
            .await?
            {
                Ok(held) => answer(&held, item),
                Err(e) => Err(SettleError::Unavailable(e)),
            },
        );
    }
    Ok(results)
}

/// Runs `work` under a savepoint: kept if it succeeds, undone if it fails.
/// The outer error is the savepoint's own (the transaction is broken), the
/// inner one `work`'s.
async fn savepoint<T>(
    conn: &mut SqliteConnection,
    work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T>,
) -> Result<Result<T>> {
    sqlx::raw_sql("SAVEPOINT request")
        .execute(&mut *conn)
        .await?;
    let result = work(conn).await;
    let end = match result {
        Ok(_) => "RELEASE request",
        Err(_) => "ROLLBACK TO request; RELEASE request",
    };
    sqlx::raw_sql(end).execute(&mut *conn).await?;
    Ok(result)
}
