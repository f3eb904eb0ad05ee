//! Refreshes: turns a new dataset snapshot into checkpoints. New
//! demonstrations train an SFT policy from the current one; new rankings
//! train a reward model from the current policy; a new reward model (or a new
//! SFT policy once an RM exists) starts PPO-ptx from the current policy with
//! the newest SFT policy as the KL reference. Every policy candidate goes
//! through the evaluation gate against the policy offered before it (once a
//! reward model exists to judge); its verdict is in the manifest's metrics.
//! Each result is published to the checkpoint store (manifest with parent,
//! stage, snapshot, hyperparameters and metrics); policies that passed are
//! announced for the gateway to roll out.
//!
//! What was trained from which data is kept in `<data_dir>/refresh.json`, so
//! a restarted trainer does not repeat a refresh.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use inference::checkpoint::{CheckpointError, CheckpointStore, Manifest, Stage};
use serde::{Deserialize, Serialize};
use serde_json::json;

use feedback::split::Split;

use crate::TrainerConfig;
use crate::backend::{self, BackendKind, StageJob, TrainingBackend};
use crate::corpus::PretrainCorpus;
use crate::evaluation::{self, Evaluation, GateConfig, GateInputs};
use crate::journal::Journal;
use crate::policy_model::TrainError;
use crate::ppo;
use crate::reward_model::RewardModel;
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
    /// Run PPO-ptx once a reward model exists (after each new RM or offered SFT policy).
    pub ppo: bool,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self { enabled: true, min_new_demonstrations: 8, min_new_rankings: 8, ppo: true }
    }
}

/// What has been trained so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshState {
    /// The newest policy offered for rollout (passed the gate; None: the base model).
    pub policy: Option<String>,
    /// The newest offered SFT policy: PPO's KL reference (None: the base model).
    pub sft: Option<String>,
    pub reward_model: Option<String>,
    /// The reward model the last PPO run used (PPO runs again when a newer one exists).
    pub ppo_reward_model: Option<String>,
    /// Training-split examples the last refresh of each kind used.
    pub sft_examples: usize,
    pub rm_examples: usize,
}

/// A checkpoint published by a refresh.
#[derive(Debug, Clone)]
pub struct Published {
    pub manifest: Manifest,
    /// Whether it is a policy the gateway may serve (announce it): a policy that passed the evaluation gate.
    pub servable: bool,
}

pub struct Refresher {
    store: CheckpointStore,
    base_model: PathBuf,
    state_path: PathBuf,
    pub state: RefreshState,
    config: TrainerConfig,
    backend: Box<dyn TrainingBackend>,
    /// Where dataset snapshots live (`<data_dir>/snapshots`).
    snapshots_dir: PathBuf,
    /// Loaded on first use (PPO's mix, the alignment tax).
    corpus: Option<Arc<PretrainCorpus>>,
    journal: Journal,
    progress: Box<dyn Progress>,
}

/// What the process running the refresher shows people while it trains (`instructd train` draws progress
/// bars). Every method has a silent default.
pub trait Progress: Send {
    /// A stage starts; PPO says how many iterations it will run.
    fn stage_started(&mut self, _stage: &str, _checkpoint: &str, _iterations: Option<usize>) {}
    fn ppo_iteration(&mut self, _iteration: &ppo::PpoIteration) {}
    /// `outcome`: "offered", "published", "held back by the evaluation gate" or "failed".
    fn stage_finished(&mut self, _stage: &str, _checkpoint: &str, _outcome: &str) {}
}

/// No progress display (tests, library use).
pub struct Silent;

impl Progress for Silent {}

/// One stage's inputs, besides the snapshot.
struct StagePlan {
    manifest: Manifest,
    policy_dir: PathBuf,
    reference_dir: Option<PathBuf>,
    reward_model_dir: Option<PathBuf>,
    corpus: Option<Arc<PretrainCorpus>>,
    gate: Option<Gate>,
}

/// The stage as the manifest and the journal spell it.
fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Base => "base",
        Stage::Sft => "sft",
        Stage::RewardModel => "reward_model",
        Stage::PpoPtx => "ppo_ptx",
    }
}

impl Refresher {
    pub fn open(
        store: CheckpointStore,
        base_model: &Path,
        data_dir: &Path,
        config: TrainerConfig,
    ) -> Result<Self, RefreshError> {
        let state_path = data_dir.join("refresh.json");
        let state = match std::fs::read_to_string(&state_path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
            Err(_) => RefreshState::default(),
        };
        let backend = backend::from_config(&config)?;
        tracing::info!(backend = backend.name(), "training backend");
        Ok(Self {
            store,
            base_model: base_model.to_path_buf(),
            state_path,
            state,
            config,
            backend,
            snapshots_dir: data_dir.join("snapshots"),
            corpus: None,
            journal: Journal::new(data_dir),
            progress: Box::new(Silent),
        })
    }

    /// Shows progress through `progress` from now on.
    pub fn with_progress(mut self, progress: Box<dyn Progress>) -> Self {
        self.progress = progress;
        self
    }

    fn dir_of(&self, id: &Option<String>) -> PathBuf {
        match id {
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

    /// The pre-training corpus, tokenised once with the policy's tokenizer and shared by PPO and the gate.
    fn corpus(&mut self) -> Result<Arc<PretrainCorpus>, RefreshError> {
        if let Some(corpus) = &self.corpus {
            return Ok(corpus.clone());
        }
        let tokenizer = inference::tokenizer::Tokenizer::from_dir(&self.base_model).map_err(TrainError::from)?;
        let corpus = PretrainCorpus::load(&self.config.corpus, &tokenizer)?;
        tracing::info!(
            dir = %self.config.corpus.dir.display(),
            files = corpus.files,
            tokens = corpus.tokens,
            train_windows = corpus.train_windows(),
            held_out_windows = corpus.held_out_windows(),
            "pre-training corpus loaded"
        );
        Ok(self.corpus.insert(Arc::new(corpus)).clone())
    }

    /// Runs the refreshes `snapshot` calls for; returns what was published, and hands each checkpoint to
    /// `on_published` as soon as its stage ends: an SFT policy can then be announced (and served) while the reward
    /// model and PPO after it still train.
    pub fn after_snapshot(
        &mut self,
        snapshot: &SnapshotManifest,
        data: &Dataset,
        on_published: &mut dyn FnMut(&Published),
    ) -> Result<Vec<Published>, RefreshError> {
        let mut published = Vec::new();
        let mut publish = |p: Published, published: &mut Vec<Published>| {
            on_published(&p);
            published.push(p);
        };
        self.journal.snapshot(&snapshot.id, &snapshot.counts);
        if !self.config.refresh.enabled {
            return Ok(published);
        }
        let held_out = HeldOut::from(data);
        let mut offered_sft = false;
        let demonstrations = data.sft.iter().filter(|e| e.split == Split::Train).count();
        if demonstrations >= self.state.sft_examples + self.config.refresh.min_new_demonstrations {
            let span = tracing::info_span!("sft_refresh", snapshot = %snapshot.id, demonstrations);
            let _guard = span.enter();
            let parent_dir = self.dir_of(&self.state.policy);
            let mut manifest = Manifest::new(&new_id("sft"), Some(&self.parent_label()), Stage::Sft);
            manifest.hyperparameters = json!(self.config.sft);
            let gate = self.gate_for(&parent_dir, None, &held_out)?;
            // With a reward model, the epoch kept is the one it scores highest on validation prompts.
            let reward_model_dir = self.state.reward_model.as_ref().map(|id| self.store.path(id));
            let plan = StagePlan {
                manifest,
                policy_dir: parent_dir,
                reference_dir: None,
                reward_model_dir,
                corpus: None,
                gate: Some(gate),
            };
            let published_sft = self.run_stage(plan, snapshot, data)?;
            self.state.sft_examples = demonstrations;
            if published_sft.servable {
                self.state.policy = Some(published_sft.manifest.id.clone());
                self.state.sft = Some(published_sft.manifest.id.clone());
                offered_sft = true;
            }
            self.save()?;
            publish(published_sft, &mut published);
        }
        let rankings = data.rm.iter().filter(|e| e.split == Split::Train).count();
        if rankings >= self.state.rm_examples + self.config.refresh.min_new_rankings {
            let span = tracing::info_span!("rm_refresh", snapshot = %snapshot.id, rankings);
            let _guard = span.enter();
            let policy_dir = self.dir_of(&self.state.policy);
            let mut manifest = Manifest::new(&new_id("rm"), Some(&self.parent_label()), Stage::RewardModel);
            manifest.hyperparameters = json!(self.config.reward_model);
            let plan = StagePlan {
                manifest,
                policy_dir,
                reference_dir: None,
                reward_model_dir: None,
                corpus: None,
                gate: None,
            };
            let rm = self.run_stage(plan, snapshot, data)?;
            self.state.reward_model = Some(rm.manifest.id.clone());
            self.state.rm_examples = rankings;
            self.save()?;
            publish(rm, &mut published);
        }
        let new_reward_model =
            self.state.reward_model.is_some() && self.state.ppo_reward_model != self.state.reward_model;
        if self.config.refresh.ppo && (new_reward_model || (offered_sft && self.state.reward_model.is_some())) {
            if backend::train_prompts(data).is_empty() {
                tracing::warn!("a reward model exists but no training prompts yet: PPO waits");
            } else {
                let ppo = self.ppo_refresh(snapshot, data, &held_out)?;
                publish(ppo, &mut published);
            }
        }
        Ok(published)
    }

    fn ppo_refresh(
        &mut self,
        snapshot: &SnapshotManifest,
        data: &Dataset,
        held_out: &HeldOut,
    ) -> Result<Published, RefreshError> {
        let Some(rm_id) = self.state.reward_model.clone() else {
            return Err(RefreshError::Train(TrainError::Data("PPO needs a reward model".into())));
        };
        let span = tracing::info_span!("ppo_refresh", snapshot = %snapshot.id, reward_model = %rm_id);
        let _guard = span.enter();
        let policy_dir = self.dir_of(&self.state.policy);
        let reference_dir = self.dir_of(&self.state.sft);
        let mut manifest = Manifest::new(&new_id("ppo"), Some(&self.parent_label()), Stage::PpoPtx);
        manifest.hyperparameters = json!({
            "ppo": self.config.ppo,
            "reward_model": rm_id,
            "reference": self.state.sft.clone().unwrap_or_else(|| "base".into()),
        });
        let gate = self.gate_for(&policy_dir, Some(&reference_dir), held_out)?;
        let corpus = if self.config.ppo.ptx_coef > 0.0 && self.config.backend.kind == BackendKind::InProcess {
            Some(self.corpus()?)
        } else {
            None
        };
        let plan = StagePlan {
            manifest,
            policy_dir,
            reference_dir: Some(reference_dir),
            reward_model_dir: Some(self.store.path(&rm_id)),
            corpus,
            gate: Some(gate),
        };
        let published = self.run_stage(plan, snapshot, data);
        // A failed run is not retried with the same reward model; a newer one starts PPO again.
        self.state.ppo_reward_model = Some(rm_id);
        let published = published?;
        if published.servable {
            self.state.policy = Some(published.manifest.id.clone());
        }
        self.save()?;
        Ok(published)
    }

    /// Trains one stage through the backend into a new checkpoint (gate included, so the manifest carries the
    /// verdict), with the journal, metrics and progress around it. Reward models are never servable.
    fn run_stage(
        &mut self,
        plan: StagePlan,
        snapshot: &SnapshotManifest,
        data: &Dataset,
    ) -> Result<Published, RefreshError> {
        let StagePlan { mut manifest, policy_dir, reference_dir, reward_model_dir, corpus, gate } = plan;
        manifest.snapshots = vec![snapshot.id.clone()];
        let (stage, id) = (manifest.stage, manifest.id.clone());
        let name = stage_name(stage);
        let iterations = (stage == Stage::PpoPtx).then_some(self.config.ppo.iterations);
        self.journal.stage_started(name, &id);
        self.progress.stage_started(name, &id, iterations);
        let started = std::time::Instant::now();
        let snapshot_dir = self.snapshots_dir.join(&snapshot.id);
        let (backend, journal, progress) = (&self.backend, &self.journal, &mut self.progress);
        let result = self.store.publish(manifest, |dir, manifest| {
            let job = StageJob {
                stage,
                snapshot_dir: &snapshot_dir,
                data,
                policy_dir: &policy_dir,
                reference_dir: reference_dir.as_deref(),
                reward_model_dir: reward_model_dir.as_deref(),
                corpus: corpus.as_deref(),
                out_dir: dir,
            };
            let mut on_iteration = |it: &ppo::PpoIteration| {
                journal.ppo_iteration(&id, it);
                progress.ppo_iteration(it);
            };
            manifest.metrics = backend.run(&job, &mut on_iteration).map_err(|e| invalid(dir, e))?;
            if let Some(metrics) = manifest.metrics.as_object_mut() {
                metrics.insert("data".into(), data_summary(data));
            }
            match &gate {
                Some(gate) => gate.run(dir, manifest),
                None => Ok(()),
            }
        });
        let manifest = match result {
            Ok(manifest) => manifest,
            Err(e) => {
                self.journal.stage_failed(name, &id, &e.to_string());
                self.progress.stage_finished(name, &id, "failed");
                return Err(e.into());
            }
        };
        if let Some(evaluation) =
            manifest.metrics.get("evaluation").and_then(|e| serde_json::from_value::<Evaluation>(e.clone()).ok())
        {
            self.journal.evaluation(&id, &evaluation);
        }
        let servable = stage != Stage::RewardModel && gate_passed(&manifest);
        let wall_secs = started.elapsed().as_secs_f64();
        self.journal.stage_finished(name, &id, wall_secs, &manifest.metrics, servable);
        let outcome = match (stage, servable) {
            (Stage::RewardModel, _) => "published",
            (_, true) => "offered",
            (_, false) => "held back by the evaluation gate",
        };
        self.progress.stage_finished(name, &id, outcome);
        tracing::info!(checkpoint = %id, stage = name, servable, wall_secs, metrics = %manifest.metrics, "refresh published");
        Ok(Published { manifest, servable })
    }

    /// What the gate will compare a candidate with: the serving policy, the SFT reference (None: the candidate is
    /// its own reference, as an SFT policy is), the newest reward model (no RM: no gate).
    fn gate_for(
        &mut self,
        serving_dir: &Path,
        sft_dir: Option<&Path>,
        held_out: &HeldOut,
    ) -> Result<Gate, RefreshError> {
        let enabled = self.config.evaluation.enabled && self.state.reward_model.is_some();
        let corpus =
            if enabled && self.config.evaluation.max_alignment_tax.is_some() { Some(self.corpus()?) } else { None };
        Ok(Gate {
            enabled,
            config: self.config.evaluation.clone(),
            reward_model_dir: self.state.reward_model.as_ref().map(|id| self.store.path(id)),
            serving_dir: serving_dir.to_path_buf(),
            sft_dir: sft_dir.map(Path::to_path_buf),
            prompts: held_out.prompts.clone(),
            split: held_out.split,
            corpus,
        })
    }

    fn save(&self) -> Result<(), RefreshError> {
        let io = |source| RefreshError::Io { path: self.state_path.clone(), source };
        let tmp = self.state_path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state).unwrap_or_default()).map_err(io)?;
        std::fs::rename(&tmp, &self.state_path).map_err(io)
    }
}

/// The prompts candidates are evaluated on: held-out users' (validation and test splits), or the training
/// users' while there are none yet (recorded in the evaluation as `prompt_split`).
struct HeldOut {
    prompts: Vec<String>,
    split: &'static str,
}

impl HeldOut {
    fn from(data: &Dataset) -> Self {
        let held: Vec<String> =
            data.prompts.iter().filter(|p| p.split != Split::Train).map(|p| p.prompt.clone()).collect();
        if held.is_empty() {
            Self { prompts: data.prompts.iter().map(|p| p.prompt.clone()).collect(), split: "train" }
        } else {
            Self { prompts: held, split: "held_out" }
        }
    }
}

/// An evaluation to run on a freshly trained candidate before its checkpoint is renamed into place, so the
/// manifest carries the verdict.
struct Gate {
    enabled: bool,
    config: GateConfig,
    reward_model_dir: Option<PathBuf>,
    serving_dir: PathBuf,
    sft_dir: Option<PathBuf>,
    prompts: Vec<String>,
    split: &'static str,
    corpus: Option<Arc<PretrainCorpus>>,
}

impl Gate {
    fn run(&self, candidate: &Path, manifest: &mut Manifest) -> Result<(), CheckpointError> {
        let (true, Some(rm_dir)) = (self.enabled, self.reward_model_dir.as_ref()) else {
            return Ok(());
        };
        let span = tracing::info_span!("evaluation_gate", candidate = %manifest.id);
        let _guard = span.enter();
        let reward_model = RewardModel::load(rm_dir).map_err(|e| invalid(candidate, e))?;
        let inputs = GateInputs {
            candidate_dir: candidate,
            serving_dir: &self.serving_dir,
            sft_dir: self.sft_dir.as_deref().unwrap_or(candidate),
            reward_model: &reward_model,
            prompts: &self.prompts,
            prompt_split: self.split,
            corpus: self.corpus.as_deref(),
        };
        let evaluation = evaluation::evaluate(inputs, &self.config).map_err(|e| invalid(candidate, e))?;
        if let Some(metrics) = manifest.metrics.as_object_mut() {
            metrics.insert("evaluation".into(), json!(evaluation));
        }
        Ok(())
    }
}

/// What a checkpoint's manifest says about the data it learned from: how fresh the judgments were when it was
/// published (staleness: the gateway adds the time until it serves) and the labelers' agreement.
fn data_summary(data: &Dataset) -> serde_json::Value {
    let now = feedback::events::now_ms();
    let age = |ms: Option<u64>| ms.map(|ms| now.saturating_sub(ms) as f64 / 1000.0);
    let qc = &data.labeler_quality;
    json!({
        "judgments_newest_ms": data.judgments_newest_ms,
        "judgments_oldest_ms": data.judgments_oldest_ms,
        "newest_judgment_age_secs": age(data.judgments_newest_ms),
        "oldest_judgment_age_secs": age(data.judgments_oldest_ms),
        "labeler_agreement": qc.overall_agreement,
        "labeler_comparisons": qc.comparisons,
        "labelers_flagged": qc.flagged().map(|l| l.labeler_id.clone()).collect::<Vec<_>>(),
        // Every labeler's figures, for the admin page's quality table.
        "labelers": qc.labelers.values().collect::<Vec<_>>(),
        "rankings_excluded_by_qc": data.excluded.low_agreement_labeler,
        "judgments_superseded": data.excluded.superseded,
    })
}

/// A policy is offered unless its evaluation failed (no evaluation: no reward model yet, or the gate is off).
fn gate_passed(manifest: &Manifest) -> bool {
    manifest.metrics.get("evaluation").and_then(|e| e.get("passed")).and_then(|p| p.as_bool()).unwrap_or(true)
}

fn invalid(dir: &Path, error: TrainError) -> CheckpointError {
    CheckpointError::Invalid { id: dir.display().to_string(), message: error.to_string() }
}

fn new_id(stage: &str) -> String {
    format!("{stage}-{}-{:06x}", feedback::events::now_ms(), rand::random::<u32>() & 0xff_ffff)
}

/// Announces a checkpoint on `instructd:checkpoints` (the gateways watch it), naming `source` as where its files
/// can be fetched over HTTP when the trainer serves them; returns the entry id.
pub async fn announce(
    link: &feedback::RedisLink,
    manifest: &Manifest,
    source: Option<&str>,
) -> Result<String, feedback::LinkError> {
    let stage = serde_json::to_value(manifest.stage).ok().and_then(|v| v.as_str().map(str::to_string));
    let announcement = feedback::announcement::CheckpointAnnouncement {
        id: manifest.id.clone(),
        stage,
        parent: manifest.parent.clone(),
        source: source.map(str::to_string),
    };
    let id = announcement.publish(link).await?;
    tracing::info!(checkpoint = %manifest.id, stream_id = %id, "checkpoint announced");
    Ok(id)
}
