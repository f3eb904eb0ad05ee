//! Refreshes: turns a new dataset snapshot into checkpoints. New
//! demonstrations train an SFT policy from the current one; new rankings
//! train a reward model from the current policy. Each result is published to
//! the checkpoint store (manifest with parent, stage, snapshot, hyperparameters
//! and metrics); policies are then announced for the gateway to roll out.
//! PPO-ptx and the evaluation gate build on this and are not in place yet.
//!
//! What was trained from which data is kept in `<data_dir>/refresh.json`, so
//! a restarted trainer does not repeat a refresh.

use std::path::{Path, PathBuf};

use inference::checkpoint::{CheckpointError, CheckpointStore, Manifest, Stage};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::policy_model::TrainError;
use crate::reward_model::{self, RmConfig};
use crate::sft::{self, SftConfig};
use crate::snapshot::{Dataset, SnapshotManifest};

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// When and how to refresh (`[trainer.refresh]`, `[trainer.sft]`, `[trainer.reward_model]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// Train at all (false: ingest and snapshot only).
    pub enabled: bool,
    /// New training-split demonstrations that trigger an SFT refresh.
    pub min_new_demonstrations: usize,
    /// New training-split rankings that trigger a reward-model refresh.
    pub min_new_rankings: usize,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self { enabled: true, min_new_demonstrations: 8, min_new_rankings: 8 }
    }
}

/// What has been trained so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefreshState {
    /// The newest policy checkpoint (None: the base model).
    pub policy: Option<String>,
    pub reward_model: Option<String>,
    /// Training-split examples the last refresh of each kind used.
    pub sft_examples: usize,
    pub rm_examples: usize,
}

/// A checkpoint published by a refresh.
#[derive(Debug, Clone)]
pub struct Published {
    pub manifest: Manifest,
    /// Whether it is a policy the gateway may serve (announce it).
    pub servable: bool,
}

pub struct Refresher {
    store: CheckpointStore,
    base_model: PathBuf,
    state_path: PathBuf,
    pub state: RefreshState,
    config: RefreshConfig,
    sft: SftConfig,
    rm: RmConfig,
}

impl Refresher {
    pub fn open(
        store: CheckpointStore,
        base_model: &Path,
        data_dir: &Path,
        config: RefreshConfig,
        sft: SftConfig,
        rm: RmConfig,
    ) -> Result<Self, RefreshError> {
        let state_path = data_dir.join("refresh.json");
        let state = match std::fs::read_to_string(&state_path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
            Err(_) => RefreshState::default(),
        };
        Ok(Self { store, base_model: base_model.to_path_buf(), state_path, state, config, sft, rm })
    }

    fn policy_dir(&self) -> PathBuf {
        match &self.state.policy {
            Some(id) => self.store.path(id),
            None => self.base_model.clone(),
        }
    }

    fn parent_label(&self) -> String {
        self.state.policy.clone().unwrap_or_else(|| {
            format!(
                "base:{}",
                self.base_model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            )
        })
    }

    /// Runs the refreshes `snapshot` calls for; returns what was published.
    pub fn after_snapshot(
        &mut self,
        snapshot: &SnapshotManifest,
        data: &Dataset,
    ) -> Result<Vec<Published>, RefreshError> {
        let mut published = Vec::new();
        if !self.config.enabled {
            return Ok(published);
        }
        let demonstrations = data.sft.iter().filter(|e| e.split == feedback::split::Split::Train).count();
        if demonstrations >= self.state.sft_examples + self.config.min_new_demonstrations {
            let span = tracing::info_span!("sft_refresh", snapshot = %snapshot.id, demonstrations);
            let _guard = span.enter();
            let parent_dir = self.policy_dir();
            let mut manifest = Manifest::new(&new_id("sft"), Some(&self.parent_label()), Stage::Sft);
            manifest.snapshots = vec![snapshot.id.clone()];
            manifest.hyperparameters = json!(self.sft);
            let config = self.sft.clone();
            let manifest = self.store.publish(manifest, |dir, manifest| {
                let report = sft::train(&parent_dir, &data.sft, config, dir).map_err(|e| invalid(dir, e))?;
                manifest.metrics = json!({
                    "best_epoch": report.best_epoch,
                    "val_loss": report.epochs.get(report.best_epoch).and_then(|e| e.val_loss),
                    "train_loss": report.epochs.last().map(|e| e.train_loss),
                    "train_examples": report.train_examples,
                    "wall_secs": report.wall_secs,
                });
                Ok(())
            })?;
            tracing::info!(checkpoint = %manifest.id, metrics = %manifest.metrics, "SFT refresh published");
            self.state.policy = Some(manifest.id.clone());
            self.state.sft_examples = demonstrations;
            self.save()?;
            published.push(Published { manifest, servable: true });
        }
        let rankings = data.rm.iter().filter(|e| e.split == feedback::split::Split::Train).count();
        if rankings >= self.state.rm_examples + self.config.min_new_rankings {
            let span = tracing::info_span!("rm_refresh", snapshot = %snapshot.id, rankings);
            let _guard = span.enter();
            let policy_dir = self.policy_dir();
            let mut manifest = Manifest::new(&new_id("rm"), Some(&self.parent_label()), Stage::RewardModel);
            manifest.snapshots = vec![snapshot.id.clone()];
            manifest.hyperparameters = json!(self.rm);
            let config = self.rm.clone();
            let manifest = self.store.publish(manifest, |dir, manifest| {
                let report =
                    reward_model::train(&policy_dir, &data.rm, &data.sft, config, dir).map_err(|e| invalid(dir, e))?;
                manifest.metrics = json!({
                    "val_accuracy_before": report.val_before.as_ref().map(|v| v.accuracy),
                    "val_accuracy": report.epochs.last().and_then(|e| e.val.as_ref()).map(|v| v.accuracy),
                    "demonstration_bias": report.bias_offset,
                    "train_prompts": report.train_prompts,
                    "wall_secs": report.wall_secs,
                });
                Ok(())
            })?;
            tracing::info!(checkpoint = %manifest.id, metrics = %manifest.metrics, "reward model published");
            self.state.reward_model = Some(manifest.id.clone());
            self.state.rm_examples = rankings;
            self.save()?;
            published.push(Published { manifest, servable: false });
        }
        Ok(published)
    }

    fn save(&self) -> Result<(), RefreshError> {
        let io = |source| RefreshError::Io { path: self.state_path.clone(), source };
        let tmp = self.state_path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state).unwrap_or_default()).map_err(io)?;
        std::fs::rename(&tmp, &self.state_path).map_err(io)
    }
}

fn invalid(dir: &Path, error: TrainError) -> CheckpointError {
    CheckpointError::Invalid { id: dir.display().to_string(), message: error.to_string() }
}

fn new_id(stage: &str) -> String {
    format!("{stage}-{}-{:06x}", feedback::events::now_ms(), rand::random::<u32>() & 0xff_ffff)
}

/// Announces a servable checkpoint on `instructd:checkpoints` (the gateway
/// watches it); returns the entry id.
pub async fn announce(link: &feedback::RedisLink, manifest: &Manifest) -> Result<String, feedback::LinkError> {
    let stage =
        serde_json::to_value(manifest.stage).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let fields = [
        ("kind".to_string(), "checkpoint".to_string()),
        ("id".to_string(), manifest.id.clone()),
        ("stage".to_string(), stage),
        ("parent".to_string(), manifest.parent.clone().unwrap_or_default()),
    ];
    let id = link
        .run(|mut c| async move {
            redis::cmd("XADD")
                .arg(feedback::streams::CHECKPOINTS)
                .arg("*")
                .arg(&fields[..])
                .query_async::<String>(&mut c)
                .await
        })
        .await?;
    tracing::info!(checkpoint = %manifest.id, stream_id = %id, "checkpoint announced");
    Ok(id)
}
