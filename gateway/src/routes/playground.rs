//! Playground routes: the training-use notice, consent (accept / withdraw),
//! and K-sample completions that are logged only with active consent.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use feedback::consent::ConsentStatus;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::insert_headers;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::generation::collect_all;
use crate::json::ApiJson;
use crate::keys::Scope;
use crate::playground::{PlaygroundRequest, forget_user, log_samples};
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
    Accept { notice_version: String },
    /// A struct variant, not a unit one: serde lets a tagged unit variant ignore unknown fields.
    Withdraw {},
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
            // A well-formed acceptance of a notice that is no longer current: a conflict with the
            // notice's state (the client read an older one), not a malformed request.
            if notice_version != state.config.playground.notice_version {
                return Err(ApiError::conflict(
                    "notice_version_not_current",
                    format!(
                        "The current notice is version {}; read it (GET /v1/playground/notice) and accept that version.",
                        state.config.playground.notice_version
                    ),
                )
                .with_param("notice_version"));
            }
            let consent = state.consent.accept(&user, &notice_version).await.map_err(store_error)?;
            Ok(Json(consent_body(&state, &user, &consent)))
        }
        ConsentChange::Withdraw {} => {
            // Stop logging first, then remove what is still waiting in the stream.
            let consent = state.consent.withdraw(&user).await.map_err(store_error)?;
            let removed = forget_user(&state, &user).await?;
            let mut body = consent_body(&state, &user, &consent);
            body["removed"] = json!(removed);
            Ok(Json(body))
        }
    }
}

pub async fn completions(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaygroundRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Playground)?;
    let engine = crate::openai::common::engine_for(&state, &caller, &body.model)?;
    let (plan, ticket) = body.draft(&state)?.admit(&state, &caller, &headers, &engine, 1).await?;
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

#[cfg(test)]
mod tests {
    use super::ConsentChange;

    #[test]
    fn consent_changes_refuse_unknown_fields() {
        assert!(crate::json::parse::<ConsentChange>(br#"{"action": "withdraw"}"#).is_ok());
        for body in
            [&br#"{"action": "withdraw", "extra": 1}"#[..], br#"{"action": "accept", "notice_version": "1", "x": 0}"#]
        {
            let error = crate::json::parse::<ConsentChange>(body).err().map(|e| e.status.as_u16());
            assert_eq!(error, Some(400), "{}", String::from_utf8_lossy(body));
        }
    }
}
