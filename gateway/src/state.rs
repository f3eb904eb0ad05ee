//! Everything a handler may touch, built once at startup and shared.

use std::sync::Arc;

use feedback::RedisLink;
use inference::engine::EngineHandle;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::GatewayConfig;
use crate::keys::KeyStore;
use crate::policy::{AuditLog, Policy};
use crate::rate_limit::RateLimiter;

pub struct AppState {
    pub config: GatewayConfig,
    pub engine: Arc<EngineHandle>,
    pub redis: Arc<RedisLink>,
    pub keys: KeyStore,
    pub limiter: RateLimiter,
    pub policy: Policy,
    pub audit: AuditLog,
    pub metrics: Option<PrometheusHandle>,
}

pub type SharedState = Arc<AppState>;
