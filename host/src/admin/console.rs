//! The web console: one page, served beside the admin API on the same
//! address, that shows and drives what the API offers (routes and their
//! throughput, plugins, shadow runs, dead letters).
//!
//! Its files are compiled into the binary and need nothing from elsewhere.
//! The page itself is open, as `/healthz` is: it holds no data, and every
//! call it makes to `/api` carries the bearer token the operator enters.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::Admin;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Only the page's own files and calls to its own origin: whatever a
/// message or plugin name holds cannot load or run anything.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; form-action 'none'; \
    frame-ancestors 'none'; base-uri 'none'";

/// `/` and `/console` answer the page; its script and style sit under
/// `/console/`.
pub(super) fn routes() -> Router<Arc<Admin>> {
    let page = || async { asset("text/html; charset=utf-8", PAGE) };
    Router::new()
        .route("/", get(page))
        .route("/console", get(page))
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A new binary may bring a new console: never run a stale one.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
