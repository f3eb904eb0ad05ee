//! The gateway's section of the configuration (`[gateway]` in
//! `configs/*.toml`). The binary loads the whole file, applies environment
//! overrides and hands this part over.

use std::path::PathBuf;

use serde::Deserialize;

use crate::rate_limit::KeyLimits;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Listen address (`INSTRUCTD_ADDR`).
    pub addr: String,
    /// Largest request body accepted, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most prompt text one generation request may carry, in bytes (all its
    /// prompts, or all its messages' text): refused with a 400 before any
    /// tokenization or rate limiting.
    pub max_prompt_bytes: usize,
    /// Prefix of every Redis key the gateway owns.
    pub redis_prefix: String,
    /// Secret of the bootstrap admin key (`INSTRUCTD_ADMIN_KEY`).
    pub admin_key: Option<String>,
    /// Limits given to keys created without explicit ones.
    pub default_limits: KeyLimits,
    /// Rule file of the use-case classifier.
    pub use_case_rules: PathBuf,
    /// Refusals within `refusal_window_secs` that auto-suspend a key.
    pub max_refusals: u32,
    pub refusal_window_secs: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_secs: u64,
    /// Most connections open at once; above it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// A request's line and headers must arrive within this time of their
    /// first byte (and a new connection's first request within this time of
    /// its opening). 0 = no limit.
    pub header_read_timeout_secs: u64,
    /// A request body must arrive within this time once the handler reads it (408 after). 0 = no limit.
    pub body_timeout_secs: u64,
    /// A keep-alive connection with no new request for this long is closed. 0 = no limit.
    pub idle_timeout_secs: u64,
    /// A client that reads nothing of its response (stream included) for this
    /// long is disconnected and its generation cancelled. 0 = no limit.
    pub write_stall_timeout_secs: u64,
    /// How long a stored response of the Responses API (`store: true`) is kept for `GET /v1/responses/{id}` and
    /// `previous_response_id`.
    pub responses_ttl_secs: u64,
    pub playground: PlaygroundConfig,
    pub feedback: FeedbackConfig,
    pub rollout: crate::rollout::RolloutConfig,
    pub arena: crate::arena::ArenaConfig,
}

/// `[gateway.playground]`: consent, playground sampling, feedback capture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlaygroundConfig {
    /// Version of the training-use notice users accept; changing it asks everyone again.
    pub notice_version: String,
    /// The notice's text (Markdown), shown in the playground.
    pub notice_file: PathBuf,
    /// Samples per playground prompt (K) unless the request says otherwise, and the most allowed.
    pub default_samples: usize,
    pub max_samples: usize,
    pub default_max_tokens: usize,
    /// Replace personal data found in logged prompts by placeholders (else only flag it).
    pub redact_pii: bool,
    /// Serve labelers tasks with the personal data the PII screen finds replaced by placeholders (prompts the
    /// screen flagged are never queued for labeling either way).
    pub redact_for_labelers: bool,
    /// How long a labeler holds a task before it returns to the queue.
    pub labeling_lease_secs: u64,
    /// Judgments a prompt needs before it leaves the labeling queue.
    pub labels_per_prompt: u32,
    /// The share of prompts (0..=1, chosen by a hash of the prompt id) that go to
    /// `overlap_labels` labelers instead, so quality control can compare them.
    pub overlap_fraction: f64,
    pub overlap_labels: u32,
    /// Where feedback waits while Redis is away (one file per listening port).
    pub spill_dir: PathBuf,
    pub spill_capacity_bytes: u64,
    /// How long a submission's idempotency key is remembered.
    pub idempotency_ttl_secs: u64,
    /// How often streams are trimmed below what the trainer acknowledged.
    pub trim_interval_secs: u64,
    /// Consumer groups that must have acknowledged an entry before it is trimmed.
    pub consumer_groups: Vec<String>,
    pub split: feedback::split::SplitConfig,
}

/// `[gateway.feedback]`: size caps of `POST /v1/feedback` (its rate limit is the key's own).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// Largest feedback body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Longest rating comment, in bytes (400 above).
    pub max_comment_bytes: usize,
    /// Longest demonstration response or labeler-written prompt, in bytes (400 above).
    pub max_text_bytes: usize,
    /// Longest prompt or generation id, in bytes (400 above).
    pub max_id_bytes: usize,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self { max_body_bytes: 128 << 10, max_comment_bytes: 4 << 10, max_text_bytes: 32 << 10, max_id_bytes: 128 }
    }
}

/// A setting the gateway refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "the admin key (INSTRUCTD_ADMIN_KEY / [gateway] admin_key) has {0} characters; at least {MIN_ADMIN_KEY_CHARS} \
         are required"
    )]
    AdminKeyTooShort(usize),
    #[error("[gateway] max_connections must be at least 1")]
    NoConnections,
    #[error("[gateway.arena]: {0}")]
    Arena(String),
    #[error("[gateway.playground]: {0}")]
    Overlap(String),
}

/// Shortest bootstrap admin secret accepted.
pub const MIN_ADMIN_KEY_CHARS: usize = 32;

impl GatewayConfig {
    /// Checks what serde cannot; `instructd serve` calls it before loading the model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(secret) = self.admin_key.as_deref().filter(|s| !s.is_empty()) {
            let chars = secret.chars().count();
            if chars < MIN_ADMIN_KEY_CHARS {
                return Err(ConfigError::AdminKeyTooShort(chars));
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        self.arena.validate().map_err(ConfigError::Arena)?;
        let playground = &self.playground;
        if !(0.0..=1.0).contains(&playground.overlap_fraction) {
            return Err(ConfigError::Overlap(format!(
                "overlap_fraction must be in [0, 1], got {}",
                playground.overlap_fraction
            )));
        }
        if playground.overlap_fraction > 0.0 && playground.overlap_labels < 2 {
            return Err(ConfigError::Overlap(format!(
                "overlap_labels must be at least 2 when overlap_fraction > 0, got {}",
                playground.overlap_labels
            )));
        }
        Ok(())
    }

    /// The connection limits of [`crate::connections`].
    pub fn connection_limits(&self) -> crate::connections::Limits {
        let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
        crate::connections::Limits {
            max_connections: self.max_connections,
            header_read_timeout: secs(self.header_read_timeout_secs),
            idle_timeout: secs(self.idle_timeout_secs),
            write_stall_timeout: secs(self.write_stall_timeout_secs),
        }
    }

    pub fn body_timeout(&self) -> Option<std::time::Duration> {
        (self.body_timeout_secs > 0).then(|| std::time::Duration::from_secs(self.body_timeout_secs))
    }
}

impl Default for PlaygroundConfig {
    fn default() -> Self {
        Self {
            notice_version: "2026-11-01".into(),
            notice_file: "configs/training_notice.md".into(),
            default_samples: 4,
            max_samples: 9,
            default_max_tokens: 128,
            redact_pii: false,
            redact_for_labelers: true,
            labeling_lease_secs: 600,
            labels_per_prompt: 1,
            overlap_fraction: 0.2,
            overlap_labels: 2,
            spill_dir: ".cache/spill".into(),
            spill_capacity_bytes: 64 << 20,
            idempotency_ttl_secs: 7 * 24 * 3600,
            trim_interval_secs: 60,
            consumer_groups: vec!["trainer".into()],
            split: feedback::split::SplitConfig::default(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            max_body_bytes: 4 << 20,
            max_prompt_bytes: 256 << 10,
            redis_prefix: "instructd".into(),
            admin_key: None,
            default_limits: KeyLimits { requests_per_minute: 60, tokens_per_minute: 100_000, max_concurrent: 8 },
            use_case_rules: "configs/use_cases.toml".into(),
            max_refusals: 10,
            refusal_window_secs: 600,
            shutdown_grace_secs: 30,
            max_connections: 1024,
            header_read_timeout_secs: 10,
            body_timeout_secs: 30,
            idle_timeout_secs: 60,
            write_stall_timeout_secs: 30,
            responses_ttl_secs: 30 * 24 * 3600,
            playground: PlaygroundConfig::default(),
            feedback: FeedbackConfig::default(),
            rollout: crate::rollout::RolloutConfig::default(),
            arena: crate::arena::ArenaConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_admin_keys_are_refused() {
        let with = |key: &str| GatewayConfig { admin_key: Some(key.into()), ..GatewayConfig::default() };
        assert!(matches!(with("sk-short").validate(), Err(ConfigError::AdminKeyTooShort(8))));
        assert!(with(&"k".repeat(MIN_ADMIN_KEY_CHARS)).validate().is_ok());
        // Unset (or empty): no bootstrap key at all.
        assert!(with("").validate().is_ok());
        assert!(GatewayConfig::default().validate().is_ok());
    }
}
