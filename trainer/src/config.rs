//! The trainer's section of the configuration (`[trainer]`).

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Where the dataset store, snapshots and the trainer's journal (`training.jsonl`) live.
    pub data_dir: PathBuf,
    /// Where `instructd train` serves Prometheus `/metrics` (empty: nowhere).
    pub metrics_addr: String,
    /// The base URL gateways reach `metrics_addr` at (e.g. `http://instructd-trainer:9465`). When set, the trainer
    /// serves its checkpoint directory read-only there (`/checkpoints/<id>/<file>`) and announces each checkpoint
    /// with it, so gateways with `[gateway.rollout] fetch = "http"` need no shared disk. Empty: announce no URL.
    pub checkpoints_url: String,
    /// The consumer group every trainer process reads with.
    pub group: String,
    /// This process's consumer name; keep it stable across restarts so the
    /// process finds its own pending entries again.
    pub consumer: String,
    /// Entries read (and fsynced, then acknowledged) per batch.
    pub batch: usize,
    /// How long one read waits for new entries.
    pub block_ms: u64,
    /// Entries another consumer left pending this long are taken over.
    pub claim_idle_ms: u64,
    /// A new dataset snapshot once this many new events arrived...
    pub snapshot_min_events: usize,
    /// ...or this long after the last one, if anything arrived.
    pub snapshot_period_secs: u64,
    /// Prompts used per user at most (the paper: 200).
    pub max_prompts_per_user: usize,
    /// Characters of the normalised prompt that make the dedupe key.
    pub dedupe_prefix_chars: usize,
    /// Labeler quality control applied to every snapshot.
    pub labeler_qc: crate::labeler_quality::LabelerQcConfig,
    pub refresh: crate::refresh::RefreshConfig,
    pub sft: crate::sft::SftConfig,
    pub reward_model: crate::reward_model::RmConfig,
    pub ppo: crate::ppo::PpoConfig,
    pub evaluation: crate::evaluation::GateConfig,
    /// The pre-training text of PPO-ptx and the alignment-tax check.
    pub corpus: crate::corpus::CorpusConfig,
    /// Where training runs: in this process, or an external command.
    pub backend: crate::backend::BackendConfig,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            data_dir: "data".into(),
            metrics_addr: "127.0.0.1:9465".into(),
            checkpoints_url: String::new(),
            group: "trainer".into(),
            consumer: "trainer-1".into(),
            batch: 128,
            block_ms: 1000,
            claim_idle_ms: 60_000,
            snapshot_min_events: 32,
            snapshot_period_secs: 600,
            max_prompts_per_user: 200,
            dedupe_prefix_chars: feedback::split::DEDUPE_PREFIX_CHARS,
            labeler_qc: Default::default(),
            refresh: Default::default(),
            sft: Default::default(),
            reward_model: Default::default(),
            ppo: Default::default(),
            evaluation: Default::default(),
            corpus: Default::default(),
            backend: Default::default(),
        }
    }
}
