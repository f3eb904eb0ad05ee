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
        }
    }
}
