//! Admin key routes (admin scope only): create (the secret is returned once),
//! list, set the fair-sharing weight, suspend, reinstate and revoke. Every
//! status change is audited.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::{ApiJson, OptionalApiJson};
use crate::keys::{ApiKey, KeyError, KeyStatus, NewKey, Scope};
use crate::state::SharedState;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusChange {
    pub reason: Option<String>,
}

fn key_error(error: KeyError, id: &str) -> ApiError {
    match error {
        KeyError::NotFound => ApiError::not_found(format!("No API key with id '{id}'.")).with_param("id"),
        KeyError::Invalid { param, message } => ApiError::invalid_request(param, message),
        KeyError::Conflict(message) => ApiError::conflict("key_revoked", message),
        KeyError::Unavailable(message) => ApiError::unavailable(format!("The key store is unavailable: {message}")),
        KeyError::Corrupt { .. } => ApiError::internal(error.to_string()),
    }
}

fn key_object(key: &ApiKey) -> Value {
    let mut value = serde_json::to_value(key).unwrap_or_default();
    value["object"] = json!("api_key");
    value
}

pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(new): ApiJson<NewKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Scope::Admin)?;
    let (key, secret) = state.keys.create(new).await.map_err(|e| key_error(e, ""))?;
    state.audit.record_status_change(&key.id, "created", "created by an administrator", &caller.key().id).await;
    let mut body = key_object(&key);
    body["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn list(State(state): State<SharedState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let keys = state.keys.list().await.map_err(|e| key_error(e, ""))?;
    Ok(Json(json!({"object": "list", "data": keys.iter().map(key_object).collect::<Vec<_>>()})))
}

async fn change(
    state: &SharedState,
    caller: &Caller,
    id: &str,
    status: KeyStatus,
    reason: Option<String>,
    verb: &str,
) -> Result<ApiKey, ApiError> {
    caller.require(Scope::Admin)?;
    let reason = reason.unwrap_or_else(|| format!("{verb} by an administrator"));
    let key = state.keys.set_status(id, status, Some(reason.clone())).await.map_err(|e| key_error(e, id))?;
    state.audit.record_status_change(id, verb, &reason, &caller.key().id).await;
    Ok(key)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightChange {
    pub weight: u32,
}

/// The key's share of the engine against other waiting organisations.
pub async fn set_weight(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<WeightChange>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let key = state.keys.set_weight(&id, body.weight).await.map_err(|e| key_error(e, &id))?;
    tracing::info!(key = %id, weight = key.weight, by = %caller.key().id, "key weight set");
    Ok(Json(key_object(&key)))
}

pub async fn suspend(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalApiJson(body): OptionalApiJson<StatusChange>,
) -> Result<Json<Value>, ApiError> {
    let reason = body.and_then(|b| b.reason);
    let key = change(&state, &caller, &id, KeyStatus::Suspended, reason, "suspended").await?;
    Ok(Json(key_object(&key)))
}

pub async fn reinstate(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = change(&state, &caller, &id, KeyStatus::Active, Some("reinstated".into()), "reinstated").await?;
    // Old refusals must not re-suspend the key on its next refusal.
    if let Err(e) = state.audit.reset_refusals(&id).await {
        tracing::warn!(key = %id, error = %e, "could not reset the refusal count of a reinstated key");
    }
    Ok(Json(key_object(&key)))
}

pub async fn revoke(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    change(&state, &caller, &id, KeyStatus::Revoked, None, "revoked").await?;
    Ok(Json(json!({"id": id, "object": "api_key", "deleted": true})))
}
