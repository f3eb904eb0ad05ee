//! The router (every route, in one table) and the server: the accept loop of
//! `connections.rs` with its connection limits and graceful shutdown (on the
//! signal, the listener closes and in-flight requests, streams included, run
//! to their end).

use std::convert::Infallible;
use std::future::Future;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, delete, get, post};
use tokio::net::TcpListener;

use crate::error::ApiError;
use crate::json::{BodyLimit, BodyTimeout};
use crate::observe::observe;
use crate::routes::{
    admin_checkpoints, admin_keys, admin_leaderboard, admin_training, arena, chat, completions, feedback, health,
    labeling, models, playground, playground_page, responses, rewards,
};
use crate::state::SharedState;

/// Every route the gateway serves: (method, path, handler). The router is
/// built from this table alone, so [`route_list`] (which the `openapi.yaml`
/// sync test reads) cannot drift from what is served.
fn table() -> Vec<(&'static str, &'static str, MethodRouter<SharedState>)> {
    vec![
        ("post", "/v1/completions", post(completions::create)),
        ("post", "/v1/chat/completions", post(chat::create)),
        ("post", "/v1/responses", post(responses::create)),
        ("get", "/v1/responses/{id}", get(responses::get)),
        ("delete", "/v1/responses/{id}", delete(responses::delete)),
        ("post", "/v1/rewards", post(rewards::score)),
        ("get", "/v1/models", get(models::list)),
        ("get", "/v1/models/{id}", get(models::get)),
        ("post", "/admin/keys", post(admin_keys::create)),
        ("get", "/admin/keys", get(admin_keys::list)),
        ("post", "/admin/keys/{id}/weight", post(admin_keys::set_weight)),
        ("post", "/admin/keys/{id}/suspend", post(admin_keys::suspend)),
        ("post", "/admin/keys/{id}/reinstate", post(admin_keys::reinstate)),
        ("delete", "/admin/keys/{id}", delete(admin_keys::revoke)),
        ("get", "/admin/checkpoints", get(admin_checkpoints::list)),
        ("post", "/admin/checkpoints/{id}/load", post(admin_checkpoints::load)),
        ("post", "/admin/checkpoints/{id}/canary", post(admin_checkpoints::canary)),
        ("post", "/admin/checkpoints/{id}/promote", post(admin_checkpoints::promote)),
        ("post", "/admin/checkpoints/rollback", post(admin_checkpoints::rollback)),
        ("get", "/admin/training/report", get(admin_training::report)),
        ("get", "/admin/training", get(admin_training::page)),
        ("get", "/admin/leaderboard", get(admin_leaderboard::get)),
        ("get", "/v1/playground/notice", get(playground::notice)),
        ("get", "/v1/playground/consent", get(playground::get_consent)),
        ("post", "/v1/playground/consent", post(playground::post_consent)),
        ("post", "/v1/playground/completions", post(playground::completions)),
        ("post", "/v1/playground/arena", post(arena::battle)),
        ("post", "/v1/playground/arena/{battle_id}/vote", post(arena::vote)),
        ("post", "/v1/feedback", post(feedback::submit)),
        ("get", "/v1/labeling/next", get(labeling::next)),
        ("get", "/playground", get(playground_page::page)),
        ("get", "/healthz", get(health::healthz)),
        ("get", "/readyz", get(health::readyz)),
        ("get", "/metrics", get(health::metrics)),
    ]
}

/// (method, path) of every route, lower-case methods, `{param}` paths.
pub fn route_list() -> Vec<(&'static str, &'static str)> {
    table().into_iter().map(|(method, path, _)| (method, path)).collect()
}

pub fn router(state: SharedState) -> Router {
    let limit = state.config.max_body_bytes;
    let feedback_limit = state.config.feedback.max_body_bytes;
    let mut router = Router::new();
    for (_, path, mut handler) in table() {
        if path == "/v1/feedback" {
            // Judgments are small: a tighter cap than the completion routes'.
            handler = handler
                .layer::<_, Infallible>(axum::Extension(BodyLimit(feedback_limit)))
                .layer::<_, Infallible>(DefaultBodyLimit::max(feedback_limit));
        }
        // Routes on one path with different methods merge.
        router = router.route(path, handler);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(observe))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(axum::Extension(BodyTimeout(state.config.body_timeout())))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("Unknown route {}. See openapi.yaml for the API.", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let mut error = ApiError::invalid_request(None, format!("Method {method} is not allowed on {}.", uri.path()));
    error.status = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    error
}

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    state: SharedState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::metrics::set_serving_checkpoint(&state.engine.current().info().checkpoint);
    let limits = state.config.connection_limits();
    crate::connections::serve(listener, router(state), limits, shutdown).await
}
