//! The admin API of shadow runs: start a candidate beside a plugin's live
//! version, read how it compares, promote it or stop it.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Admin, ApiError};

/// `PUT` starts a run, `GET` reports; `promote` and `stop` end it.
pub(super) fn routes(upload_limit: usize) -> Router<Arc<Admin>> {
    Router::new()
        .route(
            "/api/plugins/{name}/shadow",
            super::upload::limited(get(report).put(start), upload_limit),
        )
        .route("/api/plugins/{name}/shadow/promote", post(promote))
        .route("/api/plugins/{name}/shadow/stop", post(stop))
}

#[derive(Deserialize)]
struct Sample {
    /// Share of messages the candidate handles too; all by default.
    sample: Option<f64>,
}

/// 404 unless the plugin exists.
fn known(admin: &Admin, name: &str) -> Result<(), ApiError> {
    match admin.current().deployer.slot(name) {
        Some(_) => Ok(()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no plugin named `{name}`"),
        )),
    }
}

async fn start(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(query): Query<Sample>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    known(&admin, &name)?;
    let sample = query.sample.unwrap_or(1.0);
    match admin
        .current()
        .deployer
        .shadow(&name, body.to_vec(), sample)
        .await
    {
        Ok(info) => Ok(Json(json!({ "shadow": info, "sample": sample }))),
        Err(e) => Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"))),
    }
}

async fn report(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known(&admin, &name)?;
    match admin.current().deployer.shadow_report(&name) {
        Ok(report) => Ok(Json(json!(report))),
        Err(e) => Err(ApiError(StatusCode::NOT_FOUND, format!("{e:#}"))),
    }
}

async fn promote(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known(&admin, &name)?;
    let state = admin.current();
    if let Err(e) = state.deployer.shadow_report(&name) {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("{e:#}")));
    }
    match state.deployer.promote_shadow(&name).await {
        Ok(Some(info)) => Ok(Json(json!({ "deployed": info }))),
        Ok(None) => Ok(Json(
            json!({ "unchanged": state.deployer.slot(&name).expect("known").current_info() }),
        )),
        Err(e) => Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"))),
    }
}

async fn stop(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known(&admin, &name)?;
    match admin.current().deployer.stop_shadow(&name) {
        Ok(report) => Ok(Json(json!({ "stopped": report }))),
        Err(e) => Err(ApiError(StatusCode::NOT_FOUND, format!("{e:#}"))),
    }
}
