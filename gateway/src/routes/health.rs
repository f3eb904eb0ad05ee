//! Operations routes: `/healthz` (the process answers), `/readyz` (the model
//! is loaded; Redis state reported) and Prometheus `/metrics`.
//!
//! `/readyz` stays 200 while Redis is away: the gateway keeps serving with
//! local rate limits, and pulling every replica out of a load balancer
//! because Redis blinked would turn a degradation into an outage. The body
//! says `degraded` so operators and probes can still see it.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::atomic::Ordering;

use crate::metrics;
use crate::state::SharedState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<SharedState>) -> Response {
    let redis = state.redis.ping().await;
    metrics::set_redis_reachable(redis);
    let engine = state.engine.current();
    let info = engine.info();
    let body = json!({
        "status": if redis { "ready" } else { "degraded" },
        "model": {"loaded": true, "name": info.name, "checkpoint": info.checkpoint},
        "redis": {"reachable": redis},
        "rate_limits": if redis { "shared" } else { "local_only" },
    });
    (StatusCode::OK, Json(body)).into_response()
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    let engine = state.engine.current();
    let stats = engine.stats();
    metrics::set_engine_state(
        stats.queue_depth.load(Ordering::Relaxed),
        stats.running.load(Ordering::Relaxed),
        stats.last_batch_size.load(Ordering::Relaxed),
    );
    metrics::set_serving_checkpoint(&engine.info().checkpoint);
    metrics::set_redis_reachable(state.redis.is_reachable());
    match &state.metrics {
        Some(handle) => ([("content-type", "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed").into_response(),
    }
}
