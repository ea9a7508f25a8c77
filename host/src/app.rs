//! Assembles a running host from a config: connects the backends, loads the
//! plugins, builds the routes, runs them until shutdown and reports; on a
//! reload, changes only what the new config changes.

mod generation;
mod supervisor;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::{self, Loaded};
use crate::message::now_ms;
use crate::router::{RouteStats, StatsSnapshot};
use crate::runtime::Runtime;
use generation::{Changes, Generation};
use supervisor::Supervisor;

/// Where compiled components are cached when the config names no
/// `[runtime] cache_dir`: `$SLUICE_CACHE_DIR`, else the user's cache
/// directory. `sluice run` and the kit (`build`, `test`) share it.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("SLUICE_CACHE_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(Runtime::default_cache_dir)
}

/// Builds the runtime the config asks for. The compiled cache is the
/// config's `[runtime] cache_dir` (relative to the config file), else
/// [`default_cache_dir`]; none with `cache = false`.
pub fn runtime(loaded: &Loaded) -> Result<Runtime> {
    let runtime_config = &loaded.config.runtime;
    let cache_dir = if runtime_config.cache {
        runtime_config
            .cache_dir
            .as_ref()
            .map(|dir| loaded.base_dir.join(dir))
            .or_else(default_cache_dir)
    } else {
        None
    };
    Runtime::new(cache_dir)
}

/// A config being checked and wired for a reload.
type Preparing = Pin<Box<dyn Future<Output = Result<(Generation, Changes)>> + Send>>;

/// Runs the config at `path` until SIGINT or SIGTERM (or idle), and on
/// SIGHUP or `POST /api/reload` re-reads it. The new config is checked, its
/// new or changed backends connected and its new or changed plugins loaded
/// while every route keeps running; a config that fails any of that is
/// refused and nothing changes. Then only the routes whose config changed
/// (or whose backends or plugin did) are drained and started again, removed
/// ones drained and added ones started; the others run on. A route that
/// stays keeps its counters and its pause, a plugin that stays its versions.
/// Returns each route's counters.
pub async fn serve(
    path: &Path,
    shutdown: CancellationToken,
    exit_when_idle: Option<Duration>,
) -> Result<Vec<(String, StatsSnapshot)>> {
    let loaded = config::load(path)?;
    let mut current = Arc::new(Generation::start(loaded).await?);
    let (reload_requests, mut reloads) = mpsc::channel::<ReloadReply>(4);
    let admin = match current.loaded.config.admin.clone() {
        Some(config) => {
            let admin = Arc::new(Admin::new(
                current.admin_state(),
                config.token.clone(),
                reload_requests.clone(),
            ));
            admin::serve(&config, admin.clone(), shutdown.clone()).await?;
            Some(admin)
        }
        None => None,
    };
    spawn_hangup_listener(reload_requests, shutdown.clone());

    // Cancelled on shutdown, when idle, or when a route fails.
    let stop_all = shutdown.child_token();
    let mut routes = Supervisor::new(stop_all.clone());
    routes
        .start(wire_all(&current, &current.route_names()))
        .await?;
    let mut watcher = watch_plugins(&current)?;
    let watched = Arc::new(RwLock::new(all_stats(&current)));
    if let Some(idle) = exit_when_idle {
        spawn_idle_watch(watched.clone(), idle, stop_all.clone());
    }

    let mut preparing: Option<(Preparing, ReloadReply)> = None;
    let mut deadline = None;
    loop {
        tokio::select! {
            more = routes.next() => if more.is_none() { break },
            _ = stop_all.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + current.grace());
                if let Some((_, reply)) = preparing.take() {
                    let _ = reply.send(Err("the host is shutting down".into()));
                }
            }
            _ = sleep_until(deadline) => {
                // A stop that cut work off is not a clean stop: the exit
                // code says so, as the log does.
                let cut = anyhow::anyhow!(
                    "in-flight messages did not finish within the {:?} shutdown grace period; \
                     stopped anyway (they will be redelivered after their lease)",
                    current.grace()
                );
                tracing::error!("{cut:#}");
                routes.abort_all();
                while routes.next().await.is_some() {}
                routes.first_error.get_or_insert(cut);
                break;
            }
            Some(reply) = reloads.recv(), if preparing.is_none() && !stop_all.is_cancelled() => {
                let (running, path) = (current.clone(), path.to_path_buf());
                let next: Preparing = Box::pin(async move {
                    let loaded = config::load(&path)?;
                    running.next(loaded).await
                });
                preparing = Some((next, reply));
            }
            prepared = async { (&mut preparing.as_mut().expect("preparing").0).await }, if preparing.is_some() => {
                let (_, reply) = preparing.take().expect("preparing");
                let (next, changes) = match prepared {
                    Ok(next) => next,
                    Err(e) => {
                        let message = format!("{e:#}");
                        tracing::error!("config reload refused, the running config stays: {message}");
                        let _ = reply.send(Err(message));
                        continue;
                    }
                };
                routes.stop(&changes.to_stop(), current.grace()).await;
                if stop_all.is_cancelled() {
                    let _ = reply.send(Err("the host is shutting down".into()));
                    continue;
                }
                if let Err(e) = routes.start(wire_all(&next, &changes.to_start())).await {
                    let message = format!("{e:#}");
                    tracing::error!("the reloaded config's routes did not start: {message}");
                    stop_all.cancel();
                    routes.first_error.get_or_insert(e);
                    let _ = reply.send(Err(message));
                    continue;
                }
                current = Arc::new(next);
                if let Some(admin) = &admin {
                    admin.replace(current.admin_state());
                }
                *watched.write().unwrap() = all_stats(&current);
                watcher.cancel();
                watcher = match watch_plugins(&current) {
                    Ok(token) => token,
                    Err(e) => {
                        tracing::warn!("plugin files are not watched: {e:#}");
                        CancellationToken::new()
                    }
                };
                current.deployer.record_running();
                let deployer = current.deployer.clone();
                let kept = changes.plugins_kept.clone();
                tokio::spawn(async move { deployer.deploy_changed_files(&kept).await });
                tracing::info!("config reloaded: {changes}");
                let _ = reply.send(Ok(()));
            }
        }
    }
    watcher.cancel();
    if let Some(e) = routes.first_error.take() {
        return Err(e);
    }
    let summary: Vec<(String, StatsSnapshot)> = current
        .route_names()
        .into_iter()
        .map(|name| {
            let stats = current.routes[&name].stats.snapshot();
            (name, stats)
        })
        .collect();
    let undecodable: u64 = summary.iter().map(|(_, s)| s.undecodable).sum();
    if exit_when_idle.is_some() && undecodable > 0 {
        // A batch run that met corrupt data must not look clean.
        anyhow::bail!(
            "{undecodable} stored message(s) could not be decoded and were dead-lettered raw: \
             a backend holds corrupt data"
        );
    }
    Ok(summary)
}

/// The routes named, wired to start.
fn wire_all(
    generation: &Generation,
    names: &[String],
) -> Vec<(
    String,
    Vec<crate::router::Route>,
    Arc<crate::router::RouteControl>,
)> {
    names
        .iter()
        .map(|name| {
            let control = generation.routes[name].control.clone();
            (name.clone(), generation.wire(name), control)
        })
        .collect()
}

fn all_stats(generation: &Generation) -> Vec<Arc<RouteStats>> {
    generation
        .routes
        .values()
        .map(|r| r.stats.clone())
        .collect()
}

/// Watches the generation's plugin files if its config asks for it, until
/// the token returned is cancelled.
fn watch_plugins(generation: &Generation) -> Result<CancellationToken> {
    let token = CancellationToken::new();
    if generation.loaded.config.runtime.watch_plugins {
        generation.deployer.watch(token.clone())?;
    }
    Ok(token)
}

/// Where a reload request gets its answer.
pub type ReloadReply = oneshot::Sender<std::result::Result<(), String>>;

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

/// Cancels `shutdown` once no route (of those `watched` holds now) has done
/// anything for `idle`.
fn spawn_idle_watch(
    watched: Arc<RwLock<Vec<Arc<RouteStats>>>>,
    idle: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let (busy, last) = {
                let watched = watched.read().unwrap();
                let busy = watched
                    .iter()
                    .any(|s| s.in_flight.load(Ordering::Relaxed) > 0);
                let last = watched
                    .iter()
                    .map(|s| s.last_activity_ms.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0);
                (busy, last)
            };
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
