//! Training curves for operators: `GET /admin/training/report` (admin scope)
//! answers the report built from the checkpoint store's manifests, charts as
//! SVG included; `GET /admin/training` serves the page that shows it (one
//! self-contained HTML file compiled into the binary; it asks for an admin
//! key in the browser).

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys::Scope;
use crate::state::SharedState;
use crate::training_curves::{self, TrainingReport};

const PAGE: &str = include_str!("../../static/training.html");

/// `GET /admin/training/report`: charts and table over every checkpoint in the store.
pub async fn report(State(state): State<SharedState>, caller: Caller) -> Result<Json<TrainingReport>, ApiError> {
    caller.require(Scope::Admin)?;
    let rollout = state.rollout.clone();
    // Reads every manifest from disk and renders a dozen SVGs: off the async workers.
    let report = tokio::task::spawn_blocking(move || training_curves::report(&rollout.manifests()))
        .await
        .map_err(|e| ApiError::internal(format!("building the training report failed: {e}")))?;
    Ok(Json(report))
}

/// `GET /admin/training`: the page. Public; the data route it calls checks the key.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // The page talks only to this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        PAGE,
    )
}
