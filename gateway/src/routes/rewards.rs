//! `POST /v1/rewards` (instructd's own): scores completions of a prompt with
//! the serving reward model, for keys with the `scoring` scope. Charged to the
//! key's rate limits like a generation (one request, and the tokens scored).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::admission::{insert_headers, rate_limit_early};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::keys::Scope;
use crate::scoring::RewardsRequest;
use crate::state::SharedState;

pub async fn score(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(body): ApiJson<RewardsRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Scoring)?;
    let scoring = body.check(state.config.max_prompt_bytes)?;
    let Some(model) = state.rollout.reward_models().current() else {
        return Err(crate::reward_model::unavailable());
    };
    if let Some(asked) = scoring.model.as_deref().filter(|m| *m != model.id) {
        let mut error = ApiError::model_not_found(asked);
        error.message = format!("The reward model '{asked}' is not the one this gateway scores with ('{}').", model.id);
        return Err(error);
    }
    let admission = rate_limit_early(&state, &caller, scoring.estimate).await?;
    let limit_headers = admission.headers().clone();
    let id = model.id.clone();
    let scored = state.rollout.reward_models().score(model, scoring.conversation, scoring.completions).await;
    let scores = match scored {
        Ok(scores) => scores,
        Err(message) => {
            crate::admission::refund(admission).await;
            return Err(ApiError::internal(format!("The reward model failed to score: {message}")));
        }
    };
    tokio::spawn(admission.finish(scores.tokens as u64));
    let data: Vec<_> = scores
        .rewards
        .iter()
        .zip(&scores.truncated)
        .enumerate()
        .map(|(index, (reward, truncated))| {
            json!({"object": "reward", "index": index, "reward": reward, "truncated": truncated})
        })
        .collect();
    let body = json!({"object": "list", "model": id, "data": data, "usage": {"total_tokens": scores.tokens}});
    let mut response = Json(body).into_response();
    insert_headers(response.headers_mut(), &limit_headers);
    Ok(response)
}
