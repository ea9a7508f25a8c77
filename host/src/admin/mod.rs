//! The admin HTTP API: deploy and roll back plugins, pause and resume
//! routes, and expose health, readiness and Prometheus metrics.
//!
//! It listens on loopback by default; bound anywhere else it requires a
//! bearer token (the config check refuses to start without one). Health
//! endpoints are open so orchestrators can probe them.

pub mod cli;
pub mod client;
mod console;
mod dead_letters;
mod metrics;
mod shadow;
pub mod table;
mod upload;
mod views;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::deploy::Deployer;
use crate::router::{RouteControl, RouteStats};

/// What the API reports and controls of one route.
pub struct RouteHandle {
    pub name: String,
    pub topics: Vec<String>,
    pub group: String,
    /// The route's plugin; none on a forwarding route.
    pub plugin: Option<String>,
    pub backend: String,
    pub stats: Arc<RouteStats>,
    pub control: Arc<RouteControl>,
    /// The group's identity in the backend, for pending and backlog
    /// counts.
    pub group_key: String,
    pub source: Arc<dyn crate::backend::Backend>,
    /// How long a route may fail or stall before it is reported not ready.
    pub stalled_after: std::time::Duration,
    /// Its dead letters, for the dead-letter endpoints.
    pub dead_letters: crate::dlq::DeadLetters,
}

impl RouteHandle {
    /// Why the route is not ready, if it is not; a paused route is as its
    /// operator wants it.
    fn trouble(&self) -> Option<String> {
        if self.control.is_paused() {
            return None;
        }
        if !self.stats.backend_ok.load(Ordering::Relaxed)
            && self.stats.failing_since_ms.load(Ordering::Relaxed) == 0
        {
            return Some(format!("backend `{}` not connected yet", self.backend));
        }
        self.stats.trouble(self.stalled_after)
    }
}

/// A backend, for metrics.
pub struct BackendHandle {
    pub name: String,
    pub kind: &'static str,
}

/// What the API sees of the host's current config generation.
pub struct AdminState {
    pub deployer: Arc<Deployer>,
    pub routes: Vec<RouteHandle>,
    pub backends: Vec<BackendHandle>,
}

/// The API's own state: the current generation (replaced by a config
/// reload), the token, and where reload requests go.
pub struct Admin {
    current: std::sync::RwLock<Arc<AdminState>>,
    token: Option<String>,
    reloads: tokio::sync::mpsc::Sender<crate::app::ReloadReply>,
}

impl Admin {
    pub fn new(
        state: AdminState,
        token: Option<String>,
        reloads: tokio::sync::mpsc::Sender<crate::app::ReloadReply>,
    ) -> Self {
        Admin {
            current: std::sync::RwLock::new(Arc::new(state)),
            token,
            reloads,
        }
    }

    /// Points the API at a new config generation.
    pub fn replace(&self, state: AdminState) {
        *self.current.write().unwrap() = Arc::new(state);
    }

    fn current(&self) -> Arc<AdminState> {
        self.current.read().unwrap().clone()
    }
}

impl AdminState {
    pub fn new(
        deployer: Arc<Deployer>,
        routes: Vec<RouteHandle>,
        backends: Vec<BackendHandle>,
    ) -> Self {
        AdminState {
            deployer,
            routes,
            backends,
        }
    }

    /// Why the host is not ready, if it is not.
    fn not_ready(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter_map(|r| Some(format!("route `{}`: {}", r.name, r.trouble()?)))
            .collect()
    }

    fn route(&self, name: &str) -> Result<&RouteHandle, ApiError> {
        self.routes
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no route named `{name}`")))
    }
}

/// Starts the server; it stops when `shutdown` is cancelled.
pub async fn serve(
    config: &AdminConfig,
    state: Arc<Admin>,
    shutdown: CancellationToken,
) -> Result<()> {
    let upload_limit = (config.max_upload_mb as usize) << 20;
    let api = Router::new()
        .route("/api/plugins", get(list_plugins))
        .route(
            "/api/plugins/{name}",
            upload::limited(put(deploy_plugin), upload_limit),
        )
        .route("/api/plugins/{name}/rollback", post(rollback_plugin))
        .merge(shadow::routes(upload_limit))
        .merge(dead_letters::routes())
        .route("/api/routes", get(list_routes))
        .route("/api/routes/{name}/pause", post(pause_route))
        .route("/api/routes/{name}/resume", post(resume_route))
        .route("/api/reload", post(reload))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .merge(console::routes())
        .merge(api)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", config.listen))?;
    tracing::info!(address = %listener.local_addr()?, "admin API listening");
    tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = server.await {
            tracing::error!("admin API stopped: {e}");
        }
    });
    Ok(())
}

async fn authorize(State(state): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required".into(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// An error answered as JSON `{"error": …}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

async fn reload(State(admin): State<Arc<Admin>>) -> Result<Json<serde_json::Value>, ApiError> {
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let refused = |why: String| ApiError(StatusCode::UNPROCESSABLE_ENTITY, why);
    admin
        .reloads
        .send(reply)
        .await
        .map_err(|_| refused("the host is shutting down".into()))?;
    match outcome.await {
        Ok(Ok(())) => Ok(Json(json!({ "reloaded": true }))),
        Ok(Err(why)) => Err(refused(why)),
        Err(_) => Err(refused("the host is shutting down".into())),
    }
}

async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    let state = admin.current();
    let problems = state.not_ready();
    if problems.is_empty() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n").into_response()
    }
}

#[derive(Serialize)]
struct PluginView {
    name: String,
    /// The live version; its `loaded_at_ms` is when it was deployed.
    current: crate::deploy::VersionInfo,
    earlier: Vec<crate::deploy::VersionInfo>,
    last_error: Option<String>,
    /// The candidate running in the shadow of the live version, if any.
    shadow: Option<ShadowView>,
    /// Calls and failed calls, across versions.
    counters: CountersView,
}

#[derive(Serialize)]
struct ShadowView {
    #[serde(flatten)]
    candidate: crate::deploy::VersionInfo,
    /// Share of messages the candidate handles too.
    sample: f64,
}

#[derive(Serialize)]
struct CountersView {
    calls: u64,
    traps: u64,
    timeouts: u64,
    memory_limit_hits: u64,
    output_limit_hits: u64,
}

async fn list_plugins(State(admin): State<Arc<Admin>>) -> Json<Vec<PluginView>> {
    let state = admin.current();
    Json(
        state
            .deployer
            .slots()
            .map(|slot| {
                let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
                let counters = &slot.counters;
                PluginView {
                    name: slot.name.clone(),
                    current: slot.current_info(),
                    earlier: slot.history(),
                    last_error: slot.last_error(),
                    shadow: slot.shadow().map(|shadow| ShadowView {
                        candidate: shadow.info.clone(),
                        sample: shadow.sample,
                    }),
                    counters: CountersView {
                        calls: get(&counters.calls),
                        traps: get(&counters.traps),
                        timeouts: get(&counters.timeouts),
                        memory_limit_hits: get(&counters.memory_limit_hits),
                        output_limit_hits: get(&counters.output_limit_hits),
                    },
                }
            })
            .collect(),
    )
}

async fn deploy_plugin(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let state = admin.current();
    if state.deployer.slot(&name).is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no plugin named `{name}`"),
        ));
    }
    match state.deployer.deploy_upload(&name, body.to_vec()).await {
        Ok(Some(info)) => Ok(Json(json!({ "deployed": info }))),
        Ok(None) => Ok(Json(
            json!({ "unchanged": state.deployer.slot(&name).unwrap().current_info() }),
        )),
        Err(e) => Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"))),
    }
}

async fn rollback_plugin(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let state = admin.current();
    match state.deployer.rollback(&name) {
        Ok(info) => Ok(Json(json!({ "current": info }))),
        Err(e) => Err(ApiError(StatusCode::CONFLICT, format!("{e:#}"))),
    }
}

async fn list_routes(State(admin): State<Arc<Admin>>) -> Json<serde_json::Value> {
    let state = admin.current();
    let depths = depths(&state).await;
    let routes: Vec<serde_json::Value> = state
        .routes
        .iter()
        .zip(depths)
        .map(|(r, depth)| {
            let s = r.stats.snapshot();
            let trouble = r.trouble();
            let state = match (r.control.is_paused(), &trouble) {
                (true, _) => "paused",
                (false, Some(_)) => "not-ready",
                (false, None) => "running",
            };
            let last_activity = r.stats.last_activity_ms.load(Ordering::Relaxed);
            json!({
                "name": r.name,
                "topics": r.topics,
                "group": r.group,
                "plugin": r.plugin,
                "backend": r.backend,
                "paused": r.control.is_paused(),
                "state": state,
                "backend_ok": r.stats.backend_ok.load(Ordering::Relaxed),
                "trouble": trouble,
                "pending": depth.pending,
                "backlog": depth.backlog,
                "in_flight": s.in_flight,
                // Last fetch or settlement, ms since the epoch; null before
                // the first.
                "last_activity_ms": (last_activity != 0).then_some(last_activity),
                "stats": {
                    "received": s.received,
                    "succeeded": s.succeeded,
                    "published": s.published,
                    "retried": s.retried,
                    "dead_lettered": s.dead_lettered,
                    "plugin_errors": s.plugin_errors,
                    "backend_errors": s.backend_errors,
                    "lease_lost": s.lease_lost,
                    "in_flight": s.in_flight,
                },
            })
        })
        .collect();
    Json(json!(routes))
}

async fn pause_route(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let state = admin.current();
    let control = &state.route(&name)?.control;
    // Answer once the route has really stopped fetching, so an operator
    // (or a script) can rely on nothing more arriving.
    if !control
        .pause_and_wait(std::time::Duration::from_secs(5))
        .await
    {
        tracing::warn!(route = %name, "paused, but the fetcher did not confirm within 5 s");
    }
    tracing::info!(route = %name, "paused");
    Ok(Json(json!({ "route": name, "paused": true })))
}

async fn resume_route(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let state = admin.current();
    state.route(&name)?.control.resume();
    tracing::info!(route = %name, "resumed");
    Ok(Json(json!({ "route": name, "paused": false })))
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let state = admin.current();
    let depths = depths(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&state, &depths),
    )
        .into_response()
}

/// What a route's backend says of its group's messages; `None` where it
/// cannot say.
struct Depth {
    /// Delivered and not yet settled, or waiting out a nack delay.
    pending: Option<u64>,
    /// Published to its topics and not yet delivered.
    backlog: Option<u64>,
}

/// How long a backend gets to report a depth: a backend that is down must
/// not hold up the metrics or the route list, which say it is down.
const DEPTH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks every route's backend for its group's depth at once; in route
/// order.
async fn depths(state: &AdminState) -> Vec<Depth> {
    futures::future::join_all(state.routes.iter().map(depth)).await
}

async fn depth(route: &RouteHandle) -> Depth {
    let (pending, backlog) = tokio::join!(
        tokio::time::timeout(DEPTH_WAIT, route.source.pending(&route.group_key)),
        tokio::time::timeout(DEPTH_WAIT, route.source.backlog(&route.group_key))
    );
    let known = |what: &str, answer: Result<Result<Option<u64>>, _>| match answer {
        Ok(Ok(count)) => count,
        Ok(Err(e)) => {
            tracing::debug!(route = %route.name, "{what} unavailable: {e:#}");
            None
        }
        Err(_) => {
            tracing::debug!(route = %route.name, "{what} unavailable within {DEPTH_WAIT:?}");
            None
        }
    };
    Depth {
        pending: known("pending count", pending),
        backlog: known("backlog", backlog),
    }
}
