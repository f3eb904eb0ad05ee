//! `GET /v1/models` and `GET /v1/models/{id}`: the model being served.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::SharedState;

fn model_object(state: &SharedState) -> Value {
    let engine = state.engine.current();
    let info = engine.info();
    json!({
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "instructd",
        "checkpoint": info.checkpoint,
        "context_length": info.max_positions,
    })
}

pub async fn list(State(state): State<SharedState>, _caller: Caller) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&state)]}))
}

pub async fn get(
    State(state): State<SharedState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let model = model_object(&state);
    if model["id"] == id.as_str() { Ok(Json(model)) } else { Err(ApiError::model_not_found(&id)) }
}
