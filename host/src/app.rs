//! Assembles a running host from a config: connects the backends, loads the
//! plugins, builds the routes, runs them until shutdown and reports.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin, AdminState, BackendHandle, RouteHandle};
use crate::backend::{self, Backend, SubscribeOptions};
use crate::config::{self, AdminConfig, Loaded};
use crate::deploy::Deployer;
use crate::dlq::DeadLetters;
use crate::message::now_ms;
use crate::router::{Route, RouteControl, RouteSpec, RouteStats, StatsSnapshot, WasmHandler};
use crate::runtime::Runtime;

/// Builds the runtime the config asks for.
pub fn runtime(loaded: &Loaded) -> Result<Runtime> {
    let runtime_config = &loaded.config.runtime;
    let cache_dir = if runtime_config.cache {
        runtime_config
            .cache_dir
            .as_ref()
            .map(|dir| loaded.base_dir.join(dir))
            .or_else(Runtime::default_cache_dir)
    } else {
        None
    };
    Runtime::new(cache_dir)
}

/// Connects every backend of the config.
pub async fn connect_backends(loaded: &Loaded) -> Result<BTreeMap<String, Arc<dyn Backend>>> {
    let mut backends = BTreeMap::new();
    for (name, config) in &loaded.config.backends {
        let backend = backend::connect(&config.url)
            .await
            .with_context(|| format!("backends.{name}"))?;
        tracing::info!(backend = %name, url = %backend::redact(&config.url), kind = backend.kind(), "backend connected");
        backends.insert(name.clone(), backend);
    }
    Ok(backends)
}

/// A host ready to run: its routes, wired.
pub struct Host {
    routes: Vec<(Route, Arc<RouteControl>)>,
    deployer: Arc<Deployer>,
    routes_view: Vec<RouteHandle>,
    backends_view: Vec<BackendHandle>,
    admin: Option<AdminConfig>,
    watch_plugins: bool,
    grace: Duration,
}

impl Host {
    pub async fn from_config(loaded: &Loaded) -> Result<Self> {
        let runtime = Arc::new(runtime(loaded)?);
        let deployer = Arc::new(Deployer::start(runtime, loaded)?);
        let backends = connect_backends(loaded).await?;
        let mut routes = Vec::new();
        let mut handles = Vec::new();
        for route in &loaded.config.routes {
            let mut subscribe = SubscribeOptions::new(
                route.topics.iter().map(|t| t.get_ref().clone()).collect(),
                route.group(),
            );
            subscribe.start = route.start;
            subscribe.lease = Duration::from_millis(route.lease_ms);
            let slot = deployer
                .slot(route.plugin.get_ref())
                .expect("checked plugin")
                .clone();
            let stats = Arc::new(RouteStats::default());
            let control = Arc::new(RouteControl::default());
            handles.push(RouteHandle {
                name: route.name.clone(),
                topics: subscribe.topics.clone(),
                group: route.group().to_string(),
                plugin: route.plugin.get_ref().clone(),
                backend: loaded.source_backend(route).to_string(),
                stats: stats.clone(),
                control: control.clone(),
                group_key: subscribe.group_key(),
                source: backends[loaded.source_backend(route)].clone(),
                stalled_after: Duration::from_millis(route.stalled_after_ms),
                dead_letters: DeadLetters {
                    route: route.name.clone(),
                    backend: backends[loaded.dead_letter_backend(route)].clone(),
                    topic: route.dead_letter_topic(),
                    redrive: route.redrive.then(|| {
                        (
                            backends[loaded.source_backend(route)].clone(),
                            route.redrive_topic(),
                        )
                    }),
                },
            });
            let spec = RouteSpec {
                name: route.name.clone(),
                subscribe,
                concurrency: route.concurrency,
                ordered: route.ordered,
                retry: (&route.retry).into(),
                dead_letter_topic: route.dead_letter_topic(),
                max_in_flight: route.max_in_flight,
                batch_size: route.batch_size,
                max_hops: route.max_hops,
                max_message_bytes: loaded.config.runtime.max_message_bytes,
                max_rate: route.max_rate,
                redriven: false,
            };
            let wire = |spec: RouteSpec| Route {
                spec,
                source: backends[loaded.source_backend(route)].clone(),
                sink: backends[loaded.output_backend(route)].clone(),
                dead_letters: (loaded.dead_letter_backend(route) != loaded.output_backend(route))
                    .then(|| backends[loaded.dead_letter_backend(route)].clone()),
                handler: Arc::new(WasmHandler::over(slot.clone())),
                stats: stats.clone(),
            };
            if route.redrive {
                // A second subscription of the same group, on the redrive
                // topic alone: the route's own subscription (and its place
                // in its topics) stays as it was. Counters and pause are
                // the route's.
                let mut redriven = spec.clone();
                redriven.subscribe.topics = vec![route.redrive_topic()];
                redriven.redriven = true;
                routes.push((wire(redriven), control.clone()));
            }
            routes.push((wire(spec), control));
        }
        let backend_handles = backends
            .iter()
            .map(|(name, b)| BackendHandle {
                name: name.clone(),
                kind: b.kind(),
            })
            .collect();
        Ok(Host {
            routes,
            deployer,
            routes_view: handles,
            backends_view: backend_handles,
            admin: loaded.config.admin.clone(),
            watch_plugins: loaded.config.runtime.watch_plugins,
            grace: Duration::from_millis(loaded.config.runtime.shutdown_grace_ms),
        })
    }

    /// The plugins of this host, for deploying new versions.
    pub fn deployer(&self) -> &Arc<Deployer> {
        &self.deployer
    }

    /// What the admin API shows and controls of this host; the routes view
    /// is handed over, so call it once.
    fn admin_state(&mut self) -> AdminState {
        AdminState::new(
            self.deployer.clone(),
            std::mem::take(&mut self.routes_view),
            std::mem::take(&mut self.backends_view),
        )
    }

    /// Runs every route until `shutdown` is cancelled or, with
    /// `exit_when_idle`, until nothing has happened for that long. Returns
    /// each route's counters.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        exit_when_idle: Option<Duration>,
    ) -> Result<Vec<(String, StatsSnapshot)>> {
        let stats: Vec<(String, Arc<RouteStats>)> = self
            .routes
            .iter()
            .map(|(r, _)| (r.spec.name.clone(), r.stats.clone()))
            .collect();
        // Every route joins its group before any runs, so outputs of one
        // route reach the next even on a backend that keeps no history.
        let mut subscribed = Vec::new();
        for (route, control) in self.routes {
            let name = route.spec.name.clone();
            let route = route
                .subscribe()
                .await
                .with_context(|| format!("route `{name}`"))?;
            subscribed.push((name, route, control));
        }
        // The idle clock starts now: joining a group can take seconds (a
        // Kafka group waits for a crashed member's session to lapse).
        for (_, s) in &stats {
            s.touch();
        }
        // Side services stop only after the routes have drained.
        let services = CancellationToken::new();
        let _stop_services = services.clone().drop_guard();
        if self.watch_plugins {
            self.deployer.watch(services.clone())?;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (name, route, control) in subscribed {
            let token = shutdown.clone();
            tasks.spawn(async move {
                route
                    .run_with(token, control)
                    .await
                    .with_context(|| format!("route `{name}`"))
            });
        }
        if let Some(idle) = exit_when_idle {
            spawn_idle_watch(
                stats.iter().map(|(_, s)| s.clone()).collect(),
                idle,
                shutdown.clone(),
            );
        }
        let mut first_error = None;
        let mut deadline = None;
        loop {
            let joined = tokio::select! {
                joined = tasks.join_next() => joined,
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + self.grace);
                    continue;
                }
                _ = sleep_until(deadline) => {
                    // A stop that cut work off is not a clean stop: the
                    // exit code says so, as the log does.
                    let cut = anyhow::anyhow!(
                        "in-flight messages did not finish within the {:?} shutdown grace period; \
                         stopped anyway (they will be redelivered after their lease)",
                        self.grace
                    );
                    tracing::error!("{cut:#}");
                    tasks.abort_all();
                    first_error.get_or_insert(cut);
                    break;
                }
            };
            let Some(joined) = joined else { break };
            let result = joined.context("route task panicked").and_then(|r| r);
            if let Err(e) = result {
                tracing::error!("{e:#}");
                shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let undecodable: u64 = stats
            .iter()
            .map(|(_, s)| s.undecodable.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        if exit_when_idle.is_some() && undecodable > 0 {
            // A batch run that met corrupt data must not look clean.
            anyhow::bail!(
                "{undecodable} stored message(s) could not be decoded and were dead-lettered raw: \
                 a backend holds corrupt data"
            );
        }
        Ok(stats
            .into_iter()
            .map(|(name, s)| (name, s.snapshot()))
            .collect())
    }
}

/// Runs the config at `path` until SIGINT or SIGTERM (or idle), and on
/// SIGHUP or `POST /api/reload` re-reads it: the new config is checked, its
/// backends connected and its plugins loaded while the old routes keep
/// running; only then are the old routes drained and the new ones started.
/// A config that fails any of that is refused and the running one stays.
pub async fn serve(
    path: &Path,
    shutdown: CancellationToken,
    exit_when_idle: Option<Duration>,
) -> Result<Vec<(String, StatsSnapshot)>> {
    let loaded = config::load(path)?;
    let mut host = Host::from_config(&loaded).await?;
    let (reload_requests, mut reloads) = mpsc::channel::<ReloadReply>(4);
    let admin = match host.admin.clone() {
        Some(config) => {
            let admin = Arc::new(Admin::new(
                host.admin_state(),
                config.token.clone(),
                reload_requests.clone(),
            ));
            admin::serve(&config, admin.clone(), shutdown.clone()).await?;
            Some(admin)
        }
        None => None,
    };
    spawn_hangup_listener(reload_requests, shutdown.clone());
    loop {
        let generation = shutdown.child_token();
        let running = tokio::spawn(host.run(generation.clone(), exit_when_idle));
        tokio::pin!(running);
        let next = loop {
            tokio::select! {
                finished = &mut running => return finished.context("host task panicked")?,
                Some(reply) = reloads.recv() => {
                    match prepare(path).await {
                        Ok(next) => break (next, reply),
                        Err(e) => {
                            let message = format!("{e:#}");
                            tracing::error!("config reload refused, the running config stays: {message}");
                            let _ = reply.send(Err(message));
                        }
                    }
                }
            }
        };
        let (mut next, reply) = next;
        tracing::info!("config reloaded: draining the running routes");
        generation.cancel();
        let drained = running.await.context("host task panicked")?;
        if let Ok(summary) = &drained {
            for (route, stats) in summary {
                tracing::info!(route = %route, %stats, "route stopped for the reload");
            }
        }
        if let Some(admin) = &admin {
            admin.replace(next.admin_state());
        }
        let _ = reply.send(Ok(()));
        host = next;
        if shutdown.is_cancelled() {
            return drained;
        }
    }
}

/// Where a reload request gets its answer.
pub type ReloadReply = oneshot::Sender<std::result::Result<(), String>>;

/// Reads, checks and builds the next host without touching the running one.
async fn prepare(path: &Path) -> Result<Host> {
    let loaded = config::load(path)?;
    Host::from_config(&loaded).await
}

/// Turns SIGHUP into reload requests.
fn spawn_hangup_listener(requests: mpsc::Sender<ReloadReply>, shutdown: CancellationToken) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload through the admin API instead");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = hangups.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    let (reply, outcome) = oneshot::channel();
                    if requests.send(reply).await.is_err() {
                        return;
                    }
                    let _ = outcome.await;
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (requests, shutdown);
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Cancels `shutdown` once no route has done anything for `idle`.
fn spawn_idle_watch(watched: Vec<Arc<RouteStats>>, idle: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let busy = watched
                .iter()
                .any(|s| s.in_flight.load(Ordering::Relaxed) > 0);
            let last = watched
                .iter()
                .map(|s| s.last_activity_ms.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            if !busy && now_ms().saturating_sub(last) >= idle.as_millis() as u64 {
                tracing::info!("idle for {idle:?}, shutting down");
                shutdown.cancel();
                return;
            }
        }
    });
}

/// A cancellation token cancelled by SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested: finishing in-flight messages");
        cancel.cancel();
    });
    token
}
