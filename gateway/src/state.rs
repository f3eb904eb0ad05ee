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
    /// Checkpoint candidates, canary, promotion and rollback.
    pub rollout: Arc<crate::rollout::Rollout>,
    /// Blind side-by-side battles between loaded checkpoints and their votes.
    pub arena: crate::arena::Arena,
    /// Stored responses of the Responses API.
    pub responses: crate::responses_store::ResponseStore,
}

pub type SharedState = Arc<AppState>;

/// What only the caller can provide; everything else is built from the config.
pub struct Parts {
    pub config: GatewayConfig,
    pub redis: Arc<RedisLink>,
    pub engine: Arc<EngineHandle>,
    pub rollout: Arc<crate::rollout::Rollout>,
    /// This replica's feedback spill (one per replica).
    pub spill: feedback::spill::Spill,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("use-case rules {}: {source}", path.display())]
    Rules { path: std::path::PathBuf, source: crate::policy::PolicyError },
    #[error("training-use notice {}: {source}", path.display())]
    Notice { path: std::path::PathBuf, source: std::io::Error },
    #[error("[gateway.playground.split]: {0}")]
    Split(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl AppState {
    /// Builds the gateway's state the same way for `instructd serve`, tests and benchmarks.
    pub fn assemble(parts: Parts) -> Result<Self, StartError> {
        let Parts { config, redis: link, engine, rollout, spill } = parts;
        config.validate()?;
        let rules = &config.use_case_rules;
        let classifier = crate::policy::RuleClassifier::from_file(rules)
            .map_err(|source| StartError::Rules { path: rules.clone(), source })?;
        let playground = &config.playground;
        let notice_text = std::fs::read_to_string(&playground.notice_file)
            .map_err(|source| StartError::Notice { path: playground.notice_file.clone(), source })?;
        playground.split.validate().map_err(StartError::Split)?;
        let prefix = config.redis_prefix.clone();
        let window = std::time::Duration::from_secs(config.refusal_window_secs);
        Ok(Self {
            keys: KeyStore::new(link.clone(), &prefix, config.default_limits, config.admin_key.as_deref()),
            limiter: RateLimiter::new(link.clone(), &format!("{prefix}:rl")),
            policy: Policy::new(Arc::new(classifier)),
            audit: AuditLog::new(link.clone(), config.max_refusals, window),
            consent: ConsentStore::new(link.clone(), &prefix),
            prompts: LoggedPrompts::new(link.clone(), &prefix),
            labeling: LabelingQueue::new(
                link.clone(),
                &prefix,
                std::time::Duration::from_secs(playground.labeling_lease_secs),
                feedback::labeling::Overlap {
                    labels_per_prompt: playground.labels_per_prompt,
                    fraction: playground.overlap_fraction,
                    overlap_labels: playground.overlap_labels,
                },
            ),
            events: Arc::new(EventLog::new(
                link.clone(),
                spill,
                &format!("{prefix}:event"),
                std::time::Duration::from_secs(playground.idempotency_ttl_secs),
            )),
            pii: PiiScreen::new(),
            arena: crate::arena::Arena::new(
                link.clone(),
                &prefix,
                std::time::Duration::from_secs(config.arena.battle_ttl_secs),
            ),
            responses: crate::responses_store::ResponseStore::new(
                link.clone(),
                &prefix,
                std::time::Duration::from_secs(config.responses_ttl_secs),
            ),
            notice_text,
            rollout,
            engine,
            redis: link,
            metrics: crate::metrics::install(),
            config,
        })
    }
}
