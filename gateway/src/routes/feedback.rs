//! `POST /v1/feedback`: ratings, rankings, comparisons and demonstrations,
//! within the size caps of `[gateway.feedback]` and the key's rate limits
//! (as completions, one request each), checked, then written exactly once to
//! `instructd:feedback` (spilled to disk while Redis is away; 503 only when
//! the spill is full).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use feedback::event_log::{AppendError, Appended};
use feedback::events::FeedbackPayload;
use feedback::records::Record;
use serde_json::json;

use crate::admission::{insert_headers, rate_limit};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::judgments::{check, check_sizes, event_id};
use crate::keys::Scope;
use crate::state::SharedState;

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

pub async fn submit(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(payload): ApiJson<FeedbackPayload>,
) -> Result<Response, ApiError> {
    let key = caller.key();
    if !key.has_scope(Scope::Labeler) && !key.has_scope(Scope::Playground) {
        caller.require(Scope::Labeler)?;
    }
    check_sizes(&payload, &state.config.feedback)?;
    // Held to the end of the request (its concurrency slot); no tokens are charged.
    let admission = rate_limit(&state, &caller, 0).await?;
    let idempotency = match headers.get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().ok().filter(|s| !s.is_empty() && s.len() <= 255).ok_or_else(|| {
            ApiError::invalid_request(Some(IDEMPOTENCY_HEADER), "Idempotency-Key must be 1..255 visible characters.")
        })?),
    };
    let event = check(&state, key, payload, event_id(key, idempotency)).await?;
    let kind = event.payload.kind();
    let entry =
        Record::Feedback(event.clone()).to_entry(&event.event_id).map_err(|e| ApiError::internal(e.to_string()))?;
    let (status, stream_id) = match state.events.append(entry).await {
        Ok(Appended::Written { stream_id }) => ("recorded", Some(stream_id)),
        Ok(Appended::Duplicate { stream_id }) => ("duplicate", Some(stream_id)),
        Ok(Appended::Spilled) => ("queued", None),
        // Judgments carry no consent guard: a refusal here is a bug, and nothing was written.
        Ok(Appended::NoConsent) => return Err(ApiError::internal("a judgment was refused for consent")),
        Err(AppendError::SpillFull { capacity_bytes }) => {
            return Err(ApiError::unavailable(format!(
                "Feedback cannot be stored right now: Redis is unreachable and the local spill ({capacity_bytes} \
                 bytes) is full. Nothing was recorded; retry later with the same Idempotency-Key."
            )));
        }
        Err(e) => return Err(ApiError::unavailable(format!("Feedback cannot be stored right now: {e}"))),
    };
    if status != "duplicate"
        && key.has_scope(Scope::Labeler)
        && let Some(prompt_id) = &event.prompt_id
        && let Err(e) = state.labeling.mark_labeled(prompt_id, &key.user).await
    {
        tracing::warn!(error = %e, prompt = %prompt_id, "labeling queue not updated");
    }
    let mut body = json!({
        "id": event.event_id, "object": "feedback", "type": kind, "status": status,
        "prompt_id": event.prompt_id, "stream_id": stream_id,
    });
    // A labeler sees the reward model's ordering only now, after submitting their own ranking.
    if let (FeedbackPayload::Ranking { prompt_id, ranking }, true) = (&event.payload, key.has_scope(Scope::Labeler))
        && let Ok(Some(task)) = state.prompts.get(prompt_id).await.map(|r| r.and_then(|r| r.task))
        && let Some(order) = crate::reward_order::for_ranking(state.rollout.reward_models(), &task, ranking).await
    {
        body["reward_model"] = order.to_json();
    }
    let code = if status == "recorded" { StatusCode::CREATED } else { StatusCode::OK };
    let mut response = (code, Json(body)).into_response();
    insert_headers(response.headers_mut(), admission.headers());
    tokio::spawn(admission.finish(0));
    Ok(response)
}
