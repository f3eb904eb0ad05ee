//! Operations routes: `/healthz` (the process answers), `/readyz` (the model
//! is loaded; Redis state reported) and Prometheus `/metrics`.
//!
//! `/readyz` stays 200 while Redis is away: the gateway keeps serving with
//! local rate limits, and pulling every replica out of a load balancer
//! because Redis blinked would turn a degradation into an outage. The body
//! says `degraded` so operators and probes can still see it. A serving
//! engine whose batching thread has died is different: nothing would run,
//! so `/readyz` answers 503 with `loaded: false`. `/readyz` also says whether
//! Redis keeps its data on disk (`redis_persistence`). With an external
//! engine (`openai_http`), `engine.upstreams` lists each upstream's health,
//! load, latency and errors; 503 when none answers its health probe.

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
    let persistence = if redis { redis_persistence(&state.redis).await } else { "unknown" };
    let engine = state.engine.current();
    let (status, mut body) = readiness(engine.is_running(), engine.info(), redis);
    body["redis_persistence"] = json!(persistence);
    // An external engine: each upstream's health, load, latency and errors.
    if let Some(upstreams) = engine.external_status() {
        body["engine"] = upstreams;
    }
    if let Some(canary) = state.engine.canary() {
        body["canary"] = canary_readiness(&canary);
    }
    (status, Json(body)).into_response()
}

/// Asks Redis whether it keeps its data on disk and sets the metric, for
/// `/readyz`: `aof`, `rdb`, `aof+rdb`, `none` or `unknown`.
async fn redis_persistence(link: &feedback::RedisLink) -> &'static str {
    match feedback::redis_persistence::check_persistence(link).await {
        Ok(persistence) => {
            metrics::set_redis_persistence(persistence.is_durable());
            persistence.as_str()
        }
        Err(e) => {
            tracing::debug!(error = %e, "Redis persistence unknown");
            "unknown"
        }
    }
}

/// The canary's part of `/readyz`. A canary that stopped running gets no
/// traffic (its share goes to the serving engine), so readiness stays 200;
/// `running: false` tells the operator to roll it back.
fn canary_readiness(canary: &inference::engine::Canary) -> serde_json::Value {
    json!({
        "checkpoint": canary.engine.info().checkpoint,
        "percent": canary.percent,
        "running": canary.engine.is_running(),
    })
}

/// The `/readyz` answer: 503 when the serving engine no longer runs.
fn readiness(
    engine_running: bool,
    info: &inference::engine::ModelInfo,
    redis: bool,
) -> (StatusCode, serde_json::Value) {
    let status = match (engine_running, redis) {
        (false, _) => "not_ready",
        (true, true) => "ready",
        (true, false) => "degraded",
    };
    let body = json!({
        "status": status,
        "model": {"loaded": engine_running, "name": info.name, "checkpoint": info.checkpoint},
        "redis": {"reachable": redis},
        "rate_limits": if redis { "shared" } else { "local_only" },
    });
    let code = if engine_running { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, body)
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    let engine = state.engine.current();
    let stats = engine.stats();
    metrics::set_engine_state(
        stats.queue_depth.load(Ordering::Relaxed),
        stats.running.load(Ordering::Relaxed),
        stats.last_batch_size.load(Ordering::Relaxed),
    );
    metrics::set_engine_preemptions(stats.layer_preemptions.load(Ordering::Relaxed));
    metrics::set_kv_cache(&stats.kv);
    metrics::set_serving_checkpoint(&engine.info().checkpoint);
    metrics::set_redis_reachable(state.redis.is_reachable());
    match &state.metrics {
        Some(handle) => ([("content-type", "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> inference::engine::ModelInfo {
        inference::engine::ModelInfo { name: "m".into(), checkpoint: "c".into(), vocab_size: 8, max_positions: 8 }
    }

    #[test]
    fn a_dead_engine_is_not_ready_and_not_loaded() {
        let (code, body) = readiness(false, &info(), true);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["model"]["loaded"], false);
        assert_eq!(body["status"], "not_ready");
    }

    #[test]
    fn a_running_engine_is_ready_or_degraded() {
        let (code, body) = readiness(true, &info(), true);
        assert_eq!(
            (code, body["status"].as_str(), body["model"]["loaded"].as_bool()),
            (StatusCode::OK, Some("ready"), Some(true))
        );
        let (code, body) = readiness(true, &info(), false);
        assert_eq!((code, body["status"].as_str()), (StatusCode::OK, Some("degraded")));
    }
}
