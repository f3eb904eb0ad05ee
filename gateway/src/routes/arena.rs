//! The playground's arena: `POST /v1/playground/arena` answers one prompt
//! with two loaded checkpoints, in a random order and without saying which
//! is which; `POST /v1/playground/arena/{battle_id}/vote` records the user's
//! verdict once and only then reveals the checkpoints. Votes feed the
//! leaderboard (`GET /admin/leaderboard`). Arena prompts and answers are not
//! logged for training: a vote stores only the two checkpoint ids.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use feedback::arena::Verdict;
use inference::engine::Engine;
use serde::Deserialize;
use serde_json::json;

use crate::admission::insert_headers;
use crate::arena::ArenaError;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::generation::collect_all;
use crate::json::ApiJson;
use crate::keys::Scope;
use crate::openai::chat::Message;
use crate::openai::common::Stop;
use crate::playground::PlaygroundRequest;
use crate::state::SharedState;

/// A prompt for two checkpoints; sampling as in the playground (one answer each).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BattleRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoteRequest {
    pub verdict: Verdict,
}

fn arena_error(e: ArenaError) -> ApiError {
    match e {
        ArenaError::NoBattle(_) => ApiError::not_found(e.to_string()),
        ArenaError::Link(e) => {
            ApiError::unavailable(format!("The arena cannot be reached right now: {e}. Retry shortly."))
        }
        ArenaError::Encode(e) => ApiError::internal(e.to_string()),
    }
}

/// Two distinct loaded checkpoints in a random order, or why there are not two.
fn contenders(state: &SharedState) -> Result<(Arc<Engine>, Arc<Engine>), ApiError> {
    let mut engines = state.rollout.loaded_engines(&state.engine);
    if engines.len() < 2 {
        return Err(ApiError::conflict(
            "arena_unavailable",
            "The arena compares two checkpoints, and only one is loaded on this gateway. An operator loads a second \
             (POST /admin/checkpoints/{id}/load) to open it.",
        ));
    }
    use rand::seq::SliceRandom;
    engines.shuffle(&mut rand::rng());
    let a = engines.swap_remove(0);
    let b = engines.swap_remove(0);
    Ok((a, b))
}

/// `POST /v1/playground/arena`.
pub async fn battle(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<BattleRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Playground)?;
    if !state.config.arena.enabled {
        return Err(ApiError::not_found("The arena is turned off on this gateway ([gateway.arena] enabled = false)."));
    }
    let (engine_a, engine_b) = contenders(&state)?;
    let request = PlaygroundRequest {
        model: engine_a.info().name.clone(),
        prompt: body.prompt,
        messages: body.messages,
        k: Some(1),
        max_tokens: body.max_tokens,
        temperature: body.temperature,
        top_p: body.top_p,
        presence_penalty: None,
        frequency_penalty: None,
        seed: body.seed,
        stop: body.stop,
    };
    // Charged for two answers; checkpoints of one model share its tokenizer, so one tokenization serves both.
    let (plan, ticket) = request.draft(&state)?.admit(&state, &caller, &headers, &engine_a, 2).await?;
    let prepared = plan.prepared;
    let limit_headers = ticket.admission.headers().clone();
    let (a, b) = tokio::join!(collect_all(&engine_a, &prepared), collect_all(&engine_b, &prepared));
    let tokens = |r: &Result<Vec<inference::engine::Completion>, ApiError>| {
        r.as_ref().map_or(0, |c| c.iter().map(|c| c.completion_tokens).sum::<usize>())
    };
    let used = 2 * prepared.prompt_tokens() + tokens(&a) + tokens(&b);
    ticket.admission.finish(used as u64).await;
    let (a, b) = (first_choice(a?)?, first_choice(b?)?);
    let battle_id = state
        .arena
        .open(&caller.key().user, &engine_a.info().checkpoint, &engine_b.info().checkpoint)
        .await
        .map_err(arena_error)?;
    let answer = |slot: &str, c: &inference::engine::Completion| {
        let choice = c.choices.first();
        json!({
            "slot": slot,
            "text": choice.map(|c| c.text.as_str()).unwrap_or_default(),
            "finish_reason": choice.and_then(|c| c.finish_reason).map(|r| r.as_str()),
            "completion_tokens": c.completion_tokens,
        })
    };
    let body = json!({
        "object": "playground.arena_battle",
        "battle_id": battle_id,
        "expires_in_secs": state.config.arena.battle_ttl_secs,
        "answers": [answer("a", &a), answer("b", &b)],
        "usage": {
            "prompt_tokens": 2 * prepared.prompt_tokens(),
            "completion_tokens": a.completion_tokens + b.completion_tokens,
            "total_tokens": used,
        },
    });
    let mut response = Json(body).into_response();
    insert_headers(response.headers_mut(), &limit_headers);
    Ok(response)
}

fn first_choice(
    mut completions: Vec<inference::engine::Completion>,
) -> Result<inference::engine::Completion, ApiError> {
    if completions.is_empty() {
        return Err(ApiError::internal("the engine returned no completion"));
    }
    Ok(completions.swap_remove(0))
}

/// `POST /v1/playground/arena/{battle_id}/vote`.
pub async fn vote(
    State(state): State<SharedState>,
    caller: Caller,
    Path(battle_id): Path<String>,
    ApiJson(body): ApiJson<VoteRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Playground)?;
    if battle_id.len() > 64 || !battle_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ApiError::not_found("No open battle with that id: battle ids are short letters, digits and '_'."));
    }
    let vote = state.arena.vote(&battle_id, caller.key(), body.verdict).await.map_err(arena_error)?;
    Ok(Json(json!({
        "object": "playground.arena_vote",
        "battle_id": vote.battle_id,
        "verdict": vote.verdict,
        "a": {"checkpoint": vote.checkpoint_a},
        "b": {"checkpoint": vote.checkpoint_b},
    })))
}
