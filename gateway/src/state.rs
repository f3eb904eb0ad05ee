//! Everything a handler may touch, built once at startup and shared.

use std::sync::Arc;

use feedback::RedisLink;
use feedback::consent::ConsentStore;
use feedback::event_log::EventLog;
use feedback::labeling::LabelingQueue;
use feedback::logged_prompts::LoggedPrompts;
use feedback::pii::PiiScreen;
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
    pub consent: ConsentStore,
    pub prompts: LoggedPrompts,
    pub labeling: LabelingQueue,
    /// Exactly-once writes to the training streams, spilling to disk while Redis is away.
    pub events: Arc<EventLog>,
    pub pii: PiiScreen,
    /// The training-use notice users accept (Markdown).
    pub notice_text: String,
}

pub type SharedState = Arc<AppState>;
