//! The admin API of a route's dead letters, as `sluice dlq` offers them:
//! a summary, the messages, redrive and purge, with the same filters.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Admin, ApiError};
use crate::dlq::{Filter, Summary};
use crate::message::Message;

pub(super) fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route("/api/routes/{name}/dead-letters", get(summary))
        .route("/api/routes/{name}/dead-letters/messages", get(messages))
        .route("/api/routes/{name}/dead-letters/redrive", post(redrive))
        .route("/api/routes/{name}/dead-letters/purge", post(purge))
}

/// Which dead letters: `cause` and `id` may repeat (comma-separated),
/// ages in seconds.
#[derive(Deserialize, Default)]
struct Which {
    cause: Option<String>,
    id: Option<String>,
    older_than_s: Option<u64>,
    newer_than_s: Option<u64>,
    /// Redrive only: at most this many a second.
    rate: Option<f64>,
}

impl Which {
    fn filter(&self) -> Filter {
        let list = |text: &Option<String>| -> Vec<String> {
            text.iter()
                .flat_map(|t| t.split(','))
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        Filter {
            causes: list(&self.cause),
            ids: list(&self.id),
            older_than: self.older_than_s.map(Duration::from_secs),
            newer_than: self.newer_than_s.map(Duration::from_secs),
        }
    }
}

fn failed(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::BAD_GATEWAY, format!("{e:#}"))
}

/// The route's dead letters that `which` takes, left in place.
async fn peek(admin: &Admin, name: &str, which: &Which) -> Result<Vec<Message>, ApiError> {
    let state = admin.current();
    let route = state.route(name)?;
    route
        .dead_letters
        .peek(&which.filter())
        .await
        .map_err(failed)
}

async fn summary(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(which): Query<Which>,
) -> Result<Json<Summary>, ApiError> {
    Ok(Json(Summary::of(&peek(&admin, &name, &which).await?)))
}

async fn messages(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(which): Query<Which>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let letters = peek(&admin, &name, &which).await?;
    Ok(Json(
        letters
            .iter()
            .map(|letter| crate::message::json::write(letter, &[]))
            .collect(),
    ))
}

async fn redrive(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(which): Query<Which>,
) -> Result<Json<Value>, ApiError> {
    let state = admin.current();
    let route = state.route(&name)?;
    if route.dead_letters.redrive.is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("route `{name}` reads no redrive topic; set `redrive = true` on it"),
        ));
    }
    if which.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "rate must be a positive number of messages a second".into(),
        ));
    }
    let redriven = route
        .dead_letters
        .redrive(&which.filter(), which.rate, |_| {})
        .await
        .map_err(failed)?;
    Ok(Json(json!({ "redriven": redriven })))
}

async fn purge(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(which): Query<Which>,
) -> Result<Json<Value>, ApiError> {
    let state = admin.current();
    let route = state.route(&name)?;
    let purged = route
        .dead_letters
        .purge(&which.filter(), |_| {})
        .await
        .map_err(failed)?;
    Ok(Json(json!({ "purged": purged })))
}
