//! The size limit of plugin uploads (`[admin] max_upload_mb`).
//!
//! An upload that says it is too large is answered 413 only after its body
//! has been read and thrown away: answering at once would close the
//! connection under a client still sending, which then sees a broken pipe
//! instead of the answer. What is read that way is bounded too.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use futures::StreamExt;

use super::{Admin, ApiError};

/// How much of an oversized upload is read before the connection is
/// dropped anyway, as a multiple of the limit.
const DRAINED_AT_MOST: usize = 8;

/// `method` with bodies over `limit` bytes refused.
pub(super) fn limited(method: MethodRouter<Arc<Admin>>, limit: usize) -> MethodRouter<Arc<Admin>> {
    method
        .layer(DefaultBodyLimit::max(limit))
        .layer(from_fn_with_state(limit, refuse_oversized))
}

async fn refuse_oversized(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let Some(length) = declared.filter(|&length| length > limit) else {
        // Bodies of unknown length are cut at the limit by the body limit.
        return next.run(request).await;
    };
    if length <= limit.saturating_mul(DRAINED_AT_MOST) {
        let mut body = request.into_body().into_data_stream();
        while let Some(Ok(_)) = body.next().await {}
    }
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the upload is {length} bytes; this host takes at most {limit} ([admin] max_upload_mb)"
        ),
    )
    .into_response()
}
