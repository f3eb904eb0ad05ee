//! Admin checkpoint routes (admin scope): list checkpoints with lineage,
//! metrics and role; canary a candidate at a percentage; promote; roll back;
//! load a checkpoint on request (never a reward model; a gate-failed policy only when forced).

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::{ApiJson, OptionalApiJson};
use crate::keys::Scope;
use crate::rollout::RolloutError;
use crate::state::SharedState;
use feedback::announcement::RollbackAnnouncement;

fn rollout_error(error: RolloutError) -> ApiError {
    match error {
        RolloutError::Unknown(_) => ApiError::not_found(error.to_string()).with_param("id"),
        RolloutError::NotReady(..) | RolloutError::NoPrevious => {
            ApiError::conflict("checkpoint_not_ready", error.to_string())
        }
        RolloutError::Invalid { .. } => {
            ApiError::invalid_request(Some("id"), error.to_string()).with_code("checkpoint_invalid")
        }
        // The request is well formed; what the checkpoint is forbids it (as a failed gate does).
        RolloutError::RewardModel(_) => {
            ApiError::conflict("checkpoint_not_servable", error.to_string()).with_param("id")
        }
        RolloutError::GateFailed(_) => {
            ApiError::conflict("checkpoint_gate_failed", error.to_string()).with_param("force")
        }
    }
}

pub async fn list(State(state): State<SharedState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.rollout.status(&state.engine)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryRequest {
    /// Share of new requests sent to the candidate, 0..=100 (0 stops the canary).
    pub percent: u8,
}

pub async fn canary(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CanaryRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if body.percent > 100 {
        return Err(ApiError::invalid_request(Some("percent"), "percent must be between 0 and 100"));
    }
    if body.percent == 0 {
        state.engine.clear_canary();
    } else {
        state.rollout.canary(&state.engine, &id, body.percent).map_err(rollout_error)?;
    }
    Ok(Json(state.rollout.status(&state.engine)))
}

pub async fn promote(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    state.rollout.promote(&state.engine, &id).map_err(rollout_error)?;
    Ok(Json(state.rollout.status(&state.engine)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Announce the rollback on `instructd:checkpoints` so every gateway of the fleet serves the restored
    /// checkpoint too (and none promotes the one rolled back from).
    #[serde(default)]
    pub fleet: bool,
}

/// `POST /admin/checkpoints/rollback`: this gateway serves its previous checkpoint again; with `{"fleet": true}`
/// every gateway does.
pub async fn rollback(
    State(state): State<SharedState>,
    caller: Caller,
    OptionalApiJson(body): OptionalApiJson<RollbackRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let from = state.engine.current().info().checkpoint.clone();
    let restored = state.rollout.rollback(&state.engine).await.map_err(rollout_error)?;
    let mut status = state.rollout.status(&state.engine);
    status["restored"] = json!(restored);
    if body.unwrap_or_default().fleet {
        let announcement = RollbackAnnouncement { to: restored, from };
        status["fleet"] = match announcement.publish(&state.redis).await {
            Ok(entry) => json!({"announced": true, "entry": entry}),
            Err(e) => {
                tracing::error!(error = %e, "the fleet-wide rollback could not be announced");
                json!({"announced": false, "error": format!("rolled back on this gateway only: {e}")})
            }
        };
    }
    Ok(Json(status))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// Load a policy whose evaluation gate failed anyway (never a reward model).
    #[serde(default)]
    pub force: bool,
}

/// `POST /admin/checkpoints/{id}/load`: load and verify a checkpoint on disk that was not announced, or that
/// failed to load before. Refuses reward models, and gate-failed policies unless the body says `{"force": true}`.
pub async fn load(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalApiJson(body): OptionalApiJson<LoadRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let force = body.unwrap_or_default().force;
    state.rollout.load_requested(&state.engine, &id, force).await.map_err(rollout_error)?;
    Ok(Json(state.rollout.status(&state.engine)))
}
