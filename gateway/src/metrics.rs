//! Metric names and the Prometheus recorder. Every metric the gateway emits
//! is named here, so `/metrics` has one place to read from.
//!
//! Every label value comes from a closed set (known methods, route templates,
//! fixed reasons, "other"), so no request can add series to `/metrics`.
//!
//! Gauges that mirror engine state (queue depth, running sequences, batch
//! size) are sampled when `/metrics` is scraped rather than pushed per step.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::Method;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::openai::response::{Format, Usage};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let latency = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let builder = PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency);
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

fn endpoint(format: Format) -> &'static str {
    match format {
        Format::Completion => "completions",
        Format::Chat => "chat",
        Format::Responses => "responses",
    }
}

/// The `method` label: a standard HTTP method, else "other".
pub fn method_label(method: &Method) -> &'static str {
    const KNOWN: [&str; 9] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE"];
    KNOWN.into_iter().find(|m| *m == method.as_str()).unwrap_or("other")
}

/// The `route` label: a route template of the router, else "other".
pub fn route_label(matched: Option<&str>) -> &'static str {
    static ROUTES: OnceLock<Vec<&'static str>> = OnceLock::new();
    let routes = ROUTES.get_or_init(|| crate::server::route_list().into_iter().map(|(_, path)| path).collect());
    matched.and_then(|m| routes.iter().find(|r| **r == m).copied()).unwrap_or("other")
}

/// The `status` label: a valid status code (100..=599), else "other".
fn status_label(status: u16) -> String {
    if (100..=599).contains(&status) { status.to_string() } else { "other".into() }
}

pub fn record_request(route: &'static str, method: &'static str, status: u16, elapsed: Duration) {
    let labels = [("route", route.to_string()), ("method", method.to_string()), ("status", status_label(status))];
    counter!("instructd_http_requests_total", &labels).increment(1);
    histogram!("instructd_http_request_duration_seconds", &labels[..2]).record(elapsed.as_secs_f64());
}

pub fn record_time_to_first_token(format: Format, elapsed: Duration) {
    histogram!("instructd_time_to_first_token_seconds", "endpoint" => endpoint(format)).record(elapsed.as_secs_f64());
}

/// Tokens in and out, and time per output token after the first.
pub fn record_generation(format: Format, usage: Usage, elapsed: Duration, ttft: Option<Duration>) {
    let endpoint = endpoint(format);
    counter!("instructd_prompt_tokens_total", "endpoint" => endpoint).increment(usage.prompt_tokens as u64);
    counter!("instructd_completion_tokens_total", "endpoint" => endpoint).increment(usage.completion_tokens as u64);
    if usage.completion_tokens > 1 {
        let decode = elapsed.saturating_sub(ttft.unwrap_or_default());
        let per_token = decode.as_secs_f64() / (usage.completion_tokens - 1) as f64;
        histogram!("instructd_time_per_output_token_seconds", "endpoint" => endpoint).record(per_token);
    }
}

/// A request refused before the engine: `reason` is auth, rate limit or policy.
pub fn record_rejection(reason: &'static str) {
    counter!("instructd_rejections_total", "reason" => reason).increment(1);
}

/// A connection closed by a deadline: `reason` is header_timeout, idle_timeout or write_stall.
pub fn record_connection_closed(reason: &'static str) {
    counter!("instructd_connections_closed_total", "reason" => reason).increment(1);
}

pub fn connection_opened() {
    gauge!("instructd_connections_open").increment(1.0);
}

pub fn connection_closed() {
    gauge!("instructd_connections_open").decrement(1.0);
}

pub fn set_engine_state(queue_depth: usize, running: usize, batch_size: usize) {
    gauge!("instructd_engine_queue_depth").set(queue_depth as f64);
    gauge!("instructd_engine_running_sequences").set(running as f64);
    gauge!("instructd_batch_size_last").set(batch_size as f64);
}

/// Running-batch steps the engine paused between layers to give a newly
/// arrived tenant its first token (`[engine] preempt_between_layers`); the
/// engine's own counter, reset with a swapped-in engine like the KV ones.
pub fn set_engine_preemptions(total: u64) {
    counter!("instructd_engine_preemptions_total").absolute(total);
}

/// The serving engine's KV block pool (`state`: capacity, used by running
/// sequences, held by the prefix cache) and its prefix-cache counters. The
/// counters are the engine's own: they restart with a swapped-in engine,
/// which Prometheus reads as a counter reset.
pub fn set_kv_cache(kv: &inference::engine::KvStats) {
    use std::sync::atomic::Ordering::Relaxed;
    gauge!("instructd_kv_cache_blocks", "state" => "capacity").set(kv.blocks_total.load(Relaxed) as f64);
    gauge!("instructd_kv_cache_blocks", "state" => "used").set(kv.blocks_used.load(Relaxed) as f64);
    gauge!("instructd_kv_cache_blocks", "state" => "cached").set(kv.blocks_cached.load(Relaxed) as f64);
    counter!("instructd_prefix_cache_hit_tokens_total").absolute(kv.prefix_hit_tokens.load(Relaxed));
    counter!("instructd_prefix_cache_hit_blocks_total").absolute(kv.prefix_hit_blocks.load(Relaxed));
    counter!("instructd_prefix_cache_lookup_tokens_total").absolute(kv.prefix_lookup_tokens.load(Relaxed));
    counter!("instructd_kv_cache_preemptions_total").absolute(kv.preemptions.load(Relaxed));
}

pub fn set_serving_checkpoint(checkpoint: &str) {
    gauge!("instructd_serving_checkpoint", "checkpoint" => checkpoint.to_string()).set(1.0);
}

/// 1 when Redis keeps its data on disk (append-only file or snapshots), 0 when a restart would lose it.
pub fn set_redis_persistence(durable: bool) {
    gauge!("instructd_redis_persistence").set(if durable { 1.0 } else { 0.0 });
}

pub fn set_redis_reachable(reachable: bool) {
    gauge!("instructd_redis_reachable").set(if reachable { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_a_closed_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        for invented in ["M1", "M300", "get", "PROPFIND"] {
            let method = Method::from_bytes(invented.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{invented}");
        }
        assert_eq!(route_label(Some("/v1/models/{id}")), "/v1/models/{id}");
        assert_eq!(route_label(Some("/v1/models/gpt-4")), "other");
        assert_eq!(route_label(None), "other");
        assert_eq!(status_label(404), "404");
        assert_eq!(status_label(999), "other");
    }
}
