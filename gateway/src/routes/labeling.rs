//! `GET /v1/labeling/next`: leases a labeler the next logged prompt with its
//! samples that they have not judged yet (204 when there is none).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys::Scope;
use crate::state::SharedState;

/// Leases skipped per call because their prompt vanished (consent withdrawn).
const MAX_SKIPS: usize = 20;

pub async fn next(State(state): State<SharedState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Labeler)?;
    let unavailable = |e: feedback::LinkError| ApiError::unavailable(format!("The labeling queue is unreachable: {e}"));
    for _ in 0..MAX_SKIPS {
        let Some(lease) = state.labeling.claim(&caller.key().user).await.map_err(unavailable)? else {
            return Ok(StatusCode::NO_CONTENT.into_response());
        };
        let Some(task) = state.prompts.get(&lease.prompt_id).await.map_err(unavailable)?.and_then(|r| r.task) else {
            state.labeling.remove(std::slice::from_ref(&lease.prompt_id)).await.map_err(unavailable)?;
            continue;
        };
        return Ok(Json(json!({
            "object": "labeling.task",
            "task_id": lease.prompt_id,
            "prompt_id": lease.prompt_id,
            "prompt": task["prompt"],
            "messages": task["messages"],
            "use_case": task["use_case"],
            "samples": task["samples"],
            "lease_expires_at_ms": lease.expires_at_ms,
        }))
        .into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
