//! Playground routes: the training-use notice, consent (accept / withdraw),
//! and K-sample completions that are logged only with active consent.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use feedback::consent::ConsentStatus;
use feedback::events::{SCHEMA_VERSION, WithdrawalEvent, now_ms};
use feedback::records::Record;
use feedback::streams;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::{admit, insert_headers, rate_limit_early, refund};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::generation::collect_all;
use crate::json::ApiJson;
use crate::keys::Scope;
use crate::playground::{PlaygroundRequest, log_samples};
use crate::state::SharedState;
use axum::response::{IntoResponse, Response};

pub async fn notice(State(state): State<SharedState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Playground)?;
    Ok(Json(json!({"version": state.config.playground.notice_version, "text": state.notice_text})))
}

fn consent_body(state: &SharedState, user: &str, consent: &feedback::consent::Consent) -> Value {
    let current = &state.config.playground.notice_version;
    json!({
        "object": "playground.consent",
        "user": user,
        "status": consent.status,
        "notice_version": consent.notice_version,
        "current_notice_version": current,
        "logging": consent.allows_logging(current),
        "accepted_at_ms": consent.accepted_at_ms,
        "withdrawn_at_ms": consent.withdrawn_at_ms,
    })
}

fn store_error(e: feedback::LinkError) -> ApiError {
    ApiError::unavailable(format!("Consent cannot be read or changed right now: {e}. Retry shortly."))
}

pub async fn get_consent(State(state): State<SharedState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Playground)?;
    let user = &caller.key().user;
    let consent = state.consent.get(user).await.map_err(store_error)?;
    Ok(Json(consent_body(&state, user, &consent)))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action", deny_unknown_fields)]
pub enum ConsentChange {
    /// Accept the notice; `notice_version` must be the current one (the user read that text).
    Accept {
        notice_version: String,
    },
    Withdraw,
}

pub async fn post_consent(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(change): ApiJson<ConsentChange>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Playground)?;
    let user = caller.key().user.clone();
    match change {
        ConsentChange::Accept { notice_version } => {
            if notice_version != state.config.playground.notice_version {
                return Err(ApiError::invalid_request(
                    Some("notice_version"),
                    format!(
                        "The current notice is version {}; read it (GET /v1/playground/notice) and accept that version.",
                        state.config.playground.notice_version
                    ),
                ));
            }
            let consent = state.consent.accept(&user, &notice_version).await.map_err(store_error)?;
            Ok(Json(consent_body(&state, &user, &consent)))
        }
        ConsentChange::Withdraw => {
            // Stop logging first, then remove what is still waiting in the stream.
            let consent = state.consent.withdraw(&user).await.map_err(store_error)?;
            let removed = withdraw_entries(&state, &user).await?;
            let mut body = consent_body(&state, &user, &consent);
            body["removed"] = json!(removed);
            Ok(Json(body))
        }
    }
}

/// Deletes the user's entries still in `instructd:prompts` and tells the
/// trainer (through the same stream) to drop any it already stored.
async fn withdraw_entries(state: &SharedState, user: &str) -> Result<u64, ApiError> {
    let records = state.prompts.user_records(user).await.map_err(store_error)?;
    let ids: Vec<String> = records.iter().filter_map(|r| r.stream_id.clone()).collect();
    let removed: u64 = if ids.is_empty() {
        0
    } else {
        state
            .redis
            .run(|mut c| async move { redis::cmd("XDEL").arg(streams::PROMPTS).arg(ids).query_async(&mut c).await })
            .await
            .map_err(store_error)?
    };
    // Only now forget the records: a failure above can be retried and still finds the entries.
    state.prompts.take_user(user).await.map_err(store_error)?;
    let prompt_ids: Vec<String> = records.iter().map(|r| r.prompt_id.clone()).collect();
    if let Err(e) = state.labeling.remove(&prompt_ids).await {
        tracing::warn!(error = %e, "withdrawn prompts left in the labeling queue");
    }
    let event = WithdrawalEvent {
        schema_version: SCHEMA_VERSION,
        user: user.to_string(),
        removed_from_stream: removed,
        created_at_ms: now_ms(),
    };
    let entry = Record::Withdrawal(event)
        .to_entry(&feedback::events::new_id("wdr"))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    state.events.append(entry).await.map_err(|e| ApiError::unavailable(format!("Withdrawal not recorded: {e}")))?;
    tracing::info!(user, removed, "consent withdrawn");
    Ok(removed)
}

pub async fn completions(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaygroundRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Playground)?;
    let engine = crate::openai::common::engine_for(&state, &caller, &body.model)?;
    // Cheap shape checks, then the rate limit, and only then tokenization.
    let draft = body.draft(&state)?;
    let estimate = draft.precheck(&engine, state.config.max_prompt_bytes)?;
    let admission = rate_limit_early(&state, &caller, estimate).await?;
    let mut plan = match draft.prepare(&engine) {
        Ok(plan) => plan,
        Err(error) => {
            refund(admission).await;
            return Err(error);
        }
    };
    let ticket = admit(&state, &caller, &headers, &plan.prepared, admission).await?;
    plan.prepared.charge_to(&caller.key().tenant());
    let limit_headers = ticket.admission.headers().clone();
    let result = collect_all(&engine, &plan.prepared).await;
    let usage_tokens = result.as_ref().map_or(0, |c| c.iter().map(|c| c.completion_tokens).sum::<usize>());
    ticket.admission.finish((plan.prepared.prompt_tokens() + usage_tokens) as u64).await;
    let completion = result?.into_iter().next().ok_or_else(|| ApiError::internal("no completion"))?;
    let use_case = ticket.classification.use_case.as_str();
    let logged = log_samples(&state, caller.key(), &engine, &plan, &completion, use_case).await;
    let info = engine.info();
    let samples: Vec<Value> = completion
        .choices
        .iter()
        .zip(&logged.generation_ids)
        .map(|(choice, id)| {
            json!({
                "generation_id": id, "index": choice.index, "text": choice.text,
                "finish_reason": choice.finish_reason.map(|r| r.as_str()),
            })
        })
        .collect();
    let body = json!({
        "object": "playground.completion",
        "prompt_id": logged.prompt_id,
        "logged": logged.logged,
        "not_logged_reason": logged.not_logged,
        "consent_version": if logged.logged { Some(&state.config.playground.notice_version) } else { None },
        "pii": logged.pii,
        "use_case": use_case,
        "model": info.name,
        "system_fingerprint": info.checkpoint,
        "samples": samples,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    });
    let _ = plan.samples;
    let mut response = Json(body).into_response();
    insert_headers(response.headers_mut(), &limit_headers);
    let _ = ConsentStatus::None;
    Ok(response)
}
