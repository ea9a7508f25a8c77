//! The routes that run, each under a cancellation token of its own, so a
//! reload can drain and start some of them while the others run on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::router::{Route, RouteControl};

/// One configured route that runs: its own task and, with `redrive`, its
/// redrive companion's, stopped together.
struct Running {
    token: CancellationToken,
    tasks: BTreeMap<Id, AbortHandle>,
}

pub struct Supervisor {
    tasks: JoinSet<Result<()>>,
    /// Which route each task runs.
    names: HashMap<Id, String>,
    running: BTreeMap<String, Running>,
    /// Every route's token is a child of this one; it is cancelled to stop
    /// them all (shutdown, idle, or a route that failed).
    all: CancellationToken,
    /// The first error a route stopped with.
    pub first_error: Option<anyhow::Error>,
}

impl Supervisor {
    pub fn new(all: CancellationToken) -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            running: BTreeMap::new(),
            all,
            first_error: None,
        }
    }

    /// Subscribes every part of every route first, so outputs of one route
    /// reach the next even on a backend that keeps no history, then runs
    /// them. A subscription that fails is an error and nothing starts.
    pub async fn start(
        &mut self,
        routes: Vec<(String, Vec<Route>, Arc<RouteControl>)>,
    ) -> Result<()> {
        let mut subscribed = Vec::new();
        for (name, parts, control) in routes {
            for part in parts {
                let part = part
                    .subscribe()
                    .await
                    .with_context(|| format!("route `{name}`"))?;
                // The idle clock starts now: joining a group can take
                // seconds (a Kafka group waits for a crashed member's
                // session to lapse).
                part.stats().touch();
                subscribed.push((name.clone(), part, control.clone()));
            }
        }
        for (name, part, control) in subscribed {
            let running = self.running.entry(name.clone()).or_insert_with(|| Running {
                token: self.all.child_token(),
                tasks: BTreeMap::new(),
            });
            let token = running.token.clone();
            let task_name = name.clone();
            let abort = self.tasks.spawn(async move {
                part.run_with(token, control)
                    .await
                    .with_context(|| format!("route `{task_name}`"))
            });
            running.tasks.insert(abort.id(), abort.clone());
            self.names.insert(abort.id(), name);
        }
        Ok(())
    }

    /// Waits for the next route task to end and takes note; `None` once no
    /// task runs.
    pub async fn next(&mut self) -> Option<()> {
        let joined = self.tasks.join_next_with_id().await?;
        self.ended(joined);
        Some(())
    }

    fn ended(&mut self, joined: Result<(Id, Result<()>), JoinError>) {
        let (id, result) = match joined {
            Ok((id, result)) => (id, result),
            // Aborted after the grace period: already reported.
            Err(e) if e.is_cancelled() => (e.id(), Ok(())),
            Err(e) => (e.id(), Err(anyhow::anyhow!("route task panicked: {e}"))),
        };
        if let Some(name) = self.names.remove(&id)
            && let Some(running) = self.running.get_mut(&name)
        {
            running.tasks.remove(&id);
            if running.tasks.is_empty() {
                self.running.remove(&name);
            }
        }
        if let Err(e) = result {
            // A route stopping with an error stops the host, as it did
            // before any reload.
            tracing::error!("{e:#}");
            self.all.cancel();
            self.first_error.get_or_insert(e);
        }
    }

    /// Drains the routes named: they stop fetching and finish and settle
    /// what they hold, while the others run on. What is still held after
    /// `grace` is cut off (redelivered after its lease), and said so.
    pub async fn stop(&mut self, names: &[String], grace: Duration) {
        let names: BTreeSet<&String> = names.iter().collect();
        for name in &names {
            if let Some(running) = self.running.get(*name) {
                running.token.cancel();
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut cut = false;
        while names.iter().any(|n| self.running.contains_key(*n)) {
            tokio::select! {
                joined = self.tasks.join_next_with_id() => match joined {
                    Some(joined) => self.ended(joined),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline), if !cut => {
                    cut = true;
                    for name in &names {
                        if let Some(running) = self.running.get(*name) {
                            tracing::error!(
                                route = %name,
                                "in-flight messages did not finish within the {grace:?} shutdown \
                                 grace period; stopped anyway (they will be redelivered after \
                                 their lease)"
                            );
                            running.tasks.values().for_each(AbortHandle::abort);
                        }
                    }
                }
            }
        }
    }

    /// Cuts every route off at once.
    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }
}
