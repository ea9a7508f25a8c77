//! Assembles a running host from a config: connects the backends, loads the
//! plugins, builds the routes, runs them until shutdown and reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, Backend, SubscribeOptions};
use crate::config::Loaded;
use crate::message::now_ms;
use crate::router::{Route, RouteSpec, RouteStats, StatsSnapshot, WasmHandler};
use crate::runtime::{Plugin, Runtime};

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

/// Loads and validates every plugin of the config.
pub fn load_plugins(loaded: &Loaded, runtime: &Runtime) -> Result<BTreeMap<String, Arc<Plugin>>> {
    let mut plugins = BTreeMap::new();
    for name in loaded.config.plugins.keys() {
        let (path, settings) = loaded.plugin_settings(name).expect("listed plugin");
        let plugin = runtime
            .load_file(&path, settings)
            .with_context(|| format!("plugins.{name}"))?;
        tracing::info!(plugin = %name, version = plugin.short_hash(), path = %path.display(), "plugin loaded");
        plugins.insert(name.clone(), Arc::new(plugin));
    }
    Ok(plugins)
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
    routes: Vec<Route>,
    // Kept alive for the epoch ticker while routes run.
    _runtime: Runtime,
}

impl Host {
    pub async fn from_config(loaded: &Loaded) -> Result<Self> {
        let runtime = runtime(loaded)?;
        let plugins = load_plugins(loaded, &runtime)?;
        let backends = connect_backends(loaded).await?;
        let mut routes = Vec::new();
        for route in &loaded.config.routes {
            let mut subscribe = SubscribeOptions::new(
                route.topics.iter().map(|t| t.get_ref().clone()).collect(),
                route.group(),
            );
            subscribe.start = route.start;
            subscribe.lease = Duration::from_millis(route.lease_ms);
            routes.push(Route {
                spec: RouteSpec {
                    name: route.name.clone(),
                    subscribe,
                    concurrency: route.concurrency,
                    ordered: route.ordered,
                    retry: (&route.retry).into(),
                    dead_letter_topic: route.dead_letter_topic(),
                },
                source: backends[loaded.source_backend(route)].clone(),
                sink: backends[loaded.output_backend(route)].clone(),
                handler: Arc::new(WasmHandler {
                    plugin: plugins[route.plugin.get_ref()].clone(),
                }),
                stats: Arc::new(RouteStats::default()),
            });
        }
        Ok(Host {
            routes,
            _runtime: runtime,
        })
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
            .map(|r| (r.spec.name.clone(), r.stats.clone()))
            .collect();
        for (_, s) in &stats {
            s.touch();
        }
        // Every route joins its group before any runs, so outputs of one
        // route reach the next even on a backend that keeps no history.
        let mut subscribed = Vec::new();
        for route in self.routes {
            let name = route.spec.name.clone();
            subscribed.push((
                name.clone(),
                route
                    .subscribe()
                    .await
                    .with_context(|| format!("route `{name}`"))?,
            ));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (name, route) in subscribed {
            let token = shutdown.clone();
            tasks.spawn(async move {
                route
                    .run(token)
                    .await
                    .with_context(|| format!("route `{name}`"))
            });
        }
        if let Some(idle) = exit_when_idle {
            let watched = stats.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>();
            let token = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
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
                        token.cancel();
                        return;
                    }
                }
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
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
        Ok(stats
            .into_iter()
            .map(|(name, s)| (name, s.snapshot()))
            .collect())
    }
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
