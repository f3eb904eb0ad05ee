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
    pub playground: PlaygroundConfig,
    pub rollout: crate::rollout::RolloutConfig,
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
    /// How long a labeler holds a task before it returns to the queue.
    pub labeling_lease_secs: u64,
    /// Judgments a prompt needs before it leaves the labeling queue.
    pub labels_per_prompt: u32,
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

impl Default for PlaygroundConfig {
    fn default() -> Self {
        Self {
            notice_version: "2026-11-01".into(),
            notice_file: "configs/training_notice.md".into(),
            default_samples: 4,
            max_samples: 9,
            default_max_tokens: 128,
            redact_pii: false,
            labeling_lease_secs: 600,
            labels_per_prompt: 1,
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
            redis_prefix: "instructd".into(),
            admin_key: None,
            default_limits: KeyLimits { requests_per_minute: 60, tokens_per_minute: 100_000, max_concurrent: 8 },
            use_case_rules: "configs/use_cases.toml".into(),
            max_refusals: 10,
            refusal_window_secs: 600,
            shutdown_grace_secs: 30,
            playground: PlaygroundConfig::default(),
            rollout: crate::rollout::RolloutConfig::default(),
        }
    }
}
