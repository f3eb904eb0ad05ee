//! `GET /admin/leaderboard` (admin scope): every checkpoint voted on in the
//! arena, ranked by a Bradley-Terry fit with bootstrap intervals, each with its
//! modelled chance of beating the serving checkpoint.

use axum::Json;
use axum::extract::State;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys::Scope;
use crate::leaderboard::{self, Leaderboard, LeaderboardError};
use crate::state::SharedState;

pub async fn get(State(state): State<SharedState>, caller: Caller) -> Result<Json<Leaderboard>, ApiError> {
    caller.require(Scope::Admin)?;
    let serving = state.engine.current().info().checkpoint.clone();
    leaderboard::current(&state.arena, &serving, &state.config.arena).await.map(Json).map_err(|e| match e {
        LeaderboardError::Link(e) => ApiError::unavailable(format!("Arena votes cannot be read right now: {e}")),
        LeaderboardError::Fit(message) => ApiError::internal(message),
    })
}
