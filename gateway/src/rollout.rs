//! Checkpoint rollout: the gateway hears a checkpoint announced on
//! `instructd:checkpoints`, loads it in the background, verifies every file's
//! checksum and runs a smoke generation, and then, per policy, promotes it
//! at once or waits for an operator to canary it (a share of new requests),
//! promote it, or roll back to the previous checkpoint.
//!
//! A gateway that shares the trainer's disk reads checkpoints from
//! `checkpoints_dir`; one with `fetch = "http"` first downloads an announced
//! checkpoint from the URL its announcement names ([`crate::checkpoint_fetch`])
//! into its own `checkpoints_dir`, then verifies it the same way.
//!
//! Swaps go through [`EngineHandle`]: a request in flight finishes on the
//! engine it started on, so a swap drops nothing. A checkpoint that fails
//! verification or the smoke test is marked failed and never served.
//!
//! With an external engine whose upstreams the gateway launches
//! (`[engine.openai_http.launch]`), "loading" a checkpoint starts its own
//! upstream process ([`crate::upstream::blue_green`]); the rest (canary,
//! promotion, rollback, pinning) is the same.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use feedback::announcement::{CheckpointAnnouncement, RollbackAnnouncement};
use inference::checkpoint::{CheckpointStore, Manifest};
use inference::engine::{Engine, EngineConfig, EngineHandle, GenerateRequest};
use inference::load::{LoadedModel, default_device};
use inference::model_files::parse_dtype;
use inference::quant::ServeDtype;
use serde::{Deserialize, Serialize};

use crate::checkpoint_fetch;

/// `[gateway.rollout]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Where checkpoints are read from: the trainer's own directory when shared with it (`fetch = "shared"`),
    /// this gateway's private copy when fetched (`fetch = "http"`).
    pub checkpoints_dir: PathBuf,
    /// Promote a verified candidate without waiting for an operator.
    pub auto_promote: bool,
    /// Watch `instructd:checkpoints` for announcements.
    pub watch: bool,
    /// How announced checkpoints reach this gateway.
    pub fetch: FetchMode,
    /// Where to fetch from when an announcement names no URL (and for `/load` of a checkpoint never announced to
    /// this gateway): the trainer's `[trainer] checkpoints_url`. Empty: only announced URLs.
    pub fetch_url: String,
    /// Most seconds one file of a fetched checkpoint may take.
    pub fetch_timeout_secs: u64,
    /// Most bytes a fetched checkpoint may have, all files together.
    pub fetch_max_bytes: u64,
}

/// `[gateway.rollout] fetch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchMode {
    /// `checkpoints_dir` is the trainer's (a shared volume, or one host).
    Shared,
    /// Download announced checkpoints over HTTP into `checkpoints_dir`.
    Http,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            checkpoints_dir: "checkpoints".into(),
            auto_promote: false,
            watch: true,
            fetch: FetchMode::Shared,
            fetch_url: String::new(),
            fetch_timeout_secs: 600,
            fetch_max_bytes: 64 << 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum CandidateState {
    Loading,
    Ready,
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("no checkpoint '{0}' is known to this gateway")]
    Unknown(String),
    #[error("checkpoint '{0}' is not ready to serve: {1}")]
    NotReady(String, String),
    #[error("there is no previous checkpoint to roll back to")]
    NoPrevious,
    #[error("checkpoint '{id}' cannot be served: {message}")]
    Invalid { id: String, message: String },
    #[error(
        "checkpoint '{0}' is a reward model (stage reward_model): reward models score samples and are never served"
    )]
    RewardModel(String),
    #[error(
        "checkpoint '{0}' failed its evaluation gate (metrics.evaluation.passed is false in its manifest); send \
         {{\"force\": true}} to load it anyway, e.g. to measure it"
    )]
    GateFailed(String),
}

#[derive(Default)]
struct State {
    candidates: BTreeMap<String, (CandidateState, Option<Arc<Engine>>)>,
    /// Checkpoints served before the current one, most recent last.
    history: Vec<String>,
    /// Where each announced checkpoint can be fetched from (announcements that named a URL).
    sources: BTreeMap<String, String>,
}

pub struct Rollout {
    store: CheckpointStore,
    config: RolloutConfig,
    engine_config: EngineConfig,
    model_name: String,
    dtype: String,
    /// The format the projections are packed in before a checkpoint serves (`[model] serve_dtype`).
    serve_dtype: ServeDtype,
    /// The model the gateway started with (from `[model]`, not the store), so
    /// a rollback can return to it: (checkpoint id, directory).
    initial: Option<(String, PathBuf)>,
    state: Mutex<State>,
    /// The reward model `POST /v1/rewards` scores with: the newest reward-model checkpoint published.
    reward_models: Arc<crate::reward_model::RewardModels>,
}

impl Rollout {
    pub fn new(
        store: CheckpointStore,
        config: RolloutConfig,
        engine_config: EngineConfig,
        model_name: &str,
        dtype: &str,
    ) -> Self {
        Self {
            store,
            config,
            engine_config,
            model_name: model_name.to_string(),
            dtype: dtype.to_string(),
            serve_dtype: ServeDtype::F32,
            initial: None,
            state: Mutex::new(State::default()),
            reward_models: Arc::default(),
        }
    }

    /// Packs every checkpoint this rollout loads in `dtype`, as the start-up model was.
    pub fn with_serve_dtype(mut self, dtype: ServeDtype) -> Self {
        self.serve_dtype = dtype;
        self
    }

    /// Records the model served at start-up (checkpoint id and directory).
    pub fn with_initial(mut self, id: &str, dir: &std::path::Path) -> Self {
        self.initial = Some((id.to_string(), dir.to_path_buf()));
        self
    }

    pub fn config(&self) -> &RolloutConfig {
        &self.config
    }

    pub fn reward_models(&self) -> &Arc<crate::reward_model::RewardModels> {
        &self.reward_models
    }

    /// Loads reward-model checkpoint `id` (fetched first with `fetch = "http"`, then verified) and serves it for
    /// scoring unless a newer one is served already. A failure leaves the serving reward model in place.
    pub async fn consider_reward_model(self: &Arc<Self>, announcement: &CheckpointAnnouncement) {
        if let Some(source) = &announcement.source {
            self.lock().sources.insert(announcement.id.clone(), source.clone());
        }
        let this = self.clone();
        let id = announcement.id.clone();
        let loaded = tokio::task::spawn_blocking(move || this.load_reward_model(&id)).await;
        let id = &announcement.id;
        match loaded {
            Ok(Ok(model)) => {
                if self.reward_models.offer(model) {
                    tracing::info!(checkpoint = %id, "reward model loaded for scoring");
                } else {
                    tracing::info!(checkpoint = %id, "reward model not served: a newer one is");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(checkpoint = %id, error = %e, "reward model refused; scoring stays as it was")
            }
            Err(e) => tracing::error!(checkpoint = %id, error = %e, "reward model loader panicked"),
        }
    }

    fn load_reward_model(&self, id: &str) -> Result<crate::reward_model::ServingRewardModel, RolloutError> {
        let invalid = |message: String| RolloutError::Invalid { id: id.to_string(), message };
        self.fetch_if_missing(id)?;
        let manifest = self.store.verify(id).map_err(|e| invalid(e.to_string()))?;
        if manifest.stage != inference::checkpoint::Stage::RewardModel {
            return Err(invalid(format!("stage {:?} is not a reward model", manifest.stage)));
        }
        crate::reward_model::ServingRewardModel::load(id, manifest.created_at_ms, &self.store.path(id)).map_err(invalid)
    }

    /// The newest reward-model checkpoint in the store, to score with from start-up.
    pub fn newest_reward_model(&self) -> Option<CheckpointAnnouncement> {
        let (manifests, _) = self.store.list();
        let newest = manifests
            .into_iter()
            .filter(|m| m.stage == inference::checkpoint::Stage::RewardModel)
            .max_by_key(|m| m.created_at_ms)?;
        Some(CheckpointAnnouncement {
            id: newest.id,
            stage: Some("reward_model".into()),
            parent: newest.parent,
            source: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Verifies, loads and smoke-tests checkpoint `id` (blocking work on a
    /// blocking thread), then promotes it when the policy says so. A policy
    /// that failed its evaluation gate is refused unless `force` (an
    /// operator's `/load` with `{"force": true}`); a reward model always.
    pub async fn consider(self: &Arc<Self>, handle: &EngineHandle, id: &str, force: bool) {
        {
            let mut state = self.lock();
            // A candidate that failed may be tried again (its files may have been fixed).
            let busy = matches!(state.candidates.get(id), Some((CandidateState::Loading | CandidateState::Ready, _)));
            if busy || handle.current().info().checkpoint == id {
                return;
            }
            state.candidates.insert(id.to_string(), (CandidateState::Loading, None));
        }
        let this = self.clone();
        let owned = id.to_string();
        let loaded = tokio::task::spawn_blocking(move || this.load(&owned, force)).await;
        let result = match loaded {
            Ok(result) => result,
            Err(e) => Err(RolloutError::Invalid { id: id.to_string(), message: format!("loader panicked: {e}") }),
        };
        match result {
            Ok(engine) => {
                {
                    let mut state = self.lock();
                    // Refused while it loaded (a fleet-wide rollback from it, the arena's gate): it stays refused.
                    if let Some((CandidateState::Failed(reason), _)) = state.candidates.get(id) {
                        tracing::info!(checkpoint = id, reason = %reason, "candidate refused while it loaded");
                        return;
                    }
                    tracing::info!(checkpoint = id, "candidate verified and ready");
                    state.candidates.insert(id.to_string(), (CandidateState::Ready, Some(Arc::new(engine))));
                }
                if self.config.auto_promote
                    && let Err(e) = self.promote(handle, id)
                {
                    tracing::error!(checkpoint = id, error = %e, "automatic promotion failed");
                }
            }
            Err(e) => {
                tracing::error!(checkpoint = id, error = %e, "candidate refused; the serving model stays");
                self.lock().candidates.insert(id.to_string(), (CandidateState::Failed(e.to_string()), None));
            }
        }
    }

    /// Considers an announced checkpoint, remembering where its files can be fetched from.
    pub async fn consider_announced(self: &Arc<Self>, handle: &EngineHandle, announcement: &CheckpointAnnouncement) {
        if let Some(source) = &announcement.source {
            self.lock().sources.insert(announcement.id.clone(), source.clone());
        }
        // An announcement never forces: a gate-failed policy waits for an operator.
        self.consider(handle, &announcement.id, false).await;
    }

    /// With `fetch = "http"`, downloads checkpoint `id` into the store unless it is there already.
    fn fetch_if_missing(&self, id: &str) -> Result<(), RolloutError> {
        if self.config.fetch != FetchMode::Http || self.store.path(id).exists() {
            return Ok(());
        }
        let announced = self.lock().sources.get(id).cloned();
        let source = announced
            .or_else(|| Some(self.config.fetch_url.clone()).filter(|url| !url.is_empty()))
            .ok_or_else(|| RolloutError::Invalid {
                id: id.to_string(),
                message: "not in the checkpoint store and no URL to fetch it from (announced source or \
                          [gateway.rollout] fetch_url)"
                    .into(),
            })?;
        let limits = checkpoint_fetch::Limits {
            timeout: Duration::from_secs(self.config.fetch_timeout_secs.max(1)),
            max_bytes: self.config.fetch_max_bytes,
        };
        checkpoint_fetch::fetch(self.store.root(), &source, id, limits)
            .map_err(|e| RolloutError::Invalid { id: id.to_string(), message: format!("fetching from {source}: {e}") })
    }

    /// An operator's `/load` of checkpoint `id`: refuses a reward model always, and a policy that failed its
    /// evaluation gate unless `force`; then loads it as [`consider`](Self::consider) does.
    pub async fn load_requested(
        self: &Arc<Self>,
        handle: &EngineHandle,
        id: &str,
        force: bool,
    ) -> Result<(), RolloutError> {
        if let Some(manifest) = self.manifest(id) {
            check_servable(&manifest, force)?;
        }
        self.consider(handle, id, force).await;
        Ok(())
    }

    /// The manifest of checkpoint `id` in the store, if it has one that parses (verification comes later).
    fn manifest(&self, id: &str) -> Option<Manifest> {
        let bytes = std::fs::read(self.store.path(id).join(inference::checkpoint::MANIFEST)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn load(&self, id: &str, force: bool) -> Result<Engine, RolloutError> {
        let invalid = |message: String| RolloutError::Invalid { id: id.to_string(), message };
        let external = self.engine_config.kind == inference::engine::EngineKind::OpenaiHttp;
        // Loading it here would serve it from this process, not from the configured upstreams.
        if external && !self.engine_config.openai_http.launch.is_enabled() {
            return Err(invalid(
                "with [engine] kind = \"openai_http\" and static upstreams, the upstreams serve the weights: convert \
                 the checkpoint (`instructd model export-gguf` for llama-server) and start an upstream on it, or set \
                 [engine.openai_http.launch] so that the gateway does"
                    .into(),
            ));
        }
        // The start-up model is not in the store (nothing to verify against): load it from its directory.
        let dir = match &self.initial {
            Some((initial, dir)) if initial == id && !self.store.path(id).exists() => dir.clone(),
            _ => {
                self.fetch_if_missing(id)?;
                self.store.verify(id).map_err(|e| invalid(e.to_string()))?;
                // Checked again here, on the verified manifest: an announced (or fetched) checkpoint arrives
                // without the check `/load` makes first.
                let manifest = self.manifest(id).ok_or_else(|| invalid("its manifest does not parse".into()))?;
                check_servable(&manifest, force)?;
                self.store.path(id)
            }
        };
        let engine = if external {
            // Blue/green: a new upstream process on this checkpoint, healthy before it is offered.
            let work_dir = crate::upstream::blue_green::work_dir(&self.engine_config, &self.config.checkpoints_dir);
            let start =
                crate::upstream::blue_green::start(&dir, &self.model_name, id, self.engine_config.clone(), &work_dir);
            block_on(start).map_err(|e| invalid(e.to_string()))?.map_err(|e| invalid(e.to_string()))?
        } else {
            let dtype = parse_dtype(&self.dtype).map_err(|e| invalid(e.to_string()))?;
            let loaded = LoadedModel::load(dir, dtype, &default_device())
                .and_then(|loaded| loaded.with_serve_dtype(self.serve_dtype))
                .map_err(|e| invalid(e.to_string()))?;
            loaded.into_engine(&self.model_name, id, self.engine_config.clone()).map_err(|e| invalid(e.to_string()))?
        };
        // Smoke generation: a few greedy tokens must come out.
        let prompt = engine.tokenizer().encode("Hello", false).map_err(|e| invalid(e.to_string()))?;
        let mut request = GenerateRequest::new(prompt, 4);
        request.sampling.temperature = 0.0;
        request.ignore_eos = true;
        let completion = block_on(engine.generate(request))
            .map_err(|e| invalid(e.to_string()))?
            .map_err(|e| invalid(format!("smoke generation failed: {e}")))?;
        if completion.completion_tokens == 0 {
            return Err(invalid("smoke generation produced no tokens".into()));
        }
        Ok(engine)
    }

    fn ready_engine(&self, id: &str) -> Result<Arc<Engine>, RolloutError> {
        match self.lock().candidates.get(id) {
            Some((CandidateState::Ready, Some(engine))) => Ok(engine.clone()),
            Some((state, _)) => Err(RolloutError::NotReady(id.to_string(), format!("{state:?}"))),
            None => Err(RolloutError::Unknown(id.to_string())),
        }
    }

    /// Sends `percent` of new requests to candidate `id`.
    pub fn canary(&self, handle: &EngineHandle, id: &str, percent: u8) -> Result<(), RolloutError> {
        let engine = self.ready_engine(id)?;
        handle.set_canary(engine, percent);
        Ok(())
    }

    /// Makes candidate `id` the serving checkpoint.
    pub fn promote(&self, handle: &EngineHandle, id: &str) -> Result<(), RolloutError> {
        let engine = self.ready_engine(id)?;
        let old = handle.swap_arc(engine);
        let mut state = self.lock();
        state.history.push(old.info().checkpoint.clone());
        state.candidates.remove(id);
        metrics::counter!("instructd_checkpoint_swaps_total").increment(1);
        crate::metrics::set_serving_checkpoint(id);
        self.record_feedback_lag(id);
        Ok(())
    }

    /// Feedback lag, end to end: from the newest judgment checkpoint `id` learned from (its manifest's
    /// `metrics.data.judgments_newest_ms`, written by the trainer) to now, when it starts serving.
    fn record_feedback_lag(&self, id: &str) {
        let path = self.store.path(id).join(inference::checkpoint::MANIFEST);
        let newest = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|m| m["metrics"]["data"]["judgments_newest_ms"].as_u64());
        if let Some(newest) = newest {
            let lag = feedback::events::now_ms().saturating_sub(newest) as f64 / 1000.0;
            metrics::gauge!("instructd_feedback_to_serving_seconds").set(lag);
            tracing::info!(checkpoint = %id, lag_secs = lag, "serving a checkpoint trained on feedback this old");
        }
    }

    /// Serves the previous checkpoint again (reloaded and re-verified from disk).
    pub async fn rollback(self: &Arc<Self>, handle: &EngineHandle) -> Result<String, RolloutError> {
        let previous = self.lock().history.last().cloned().ok_or(RolloutError::NoPrevious)?;
        self.serve_again(handle, &previous).await?;
        Ok(previous)
    }

    /// What every rollback does: stops the canary, reloads and re-verifies checkpoint `id` (it served before, so
    /// an operator's rollback may return to it whatever its gate said), swaps it in and takes it off the top of
    /// the history. Returns the checkpoint it replaced.
    async fn serve_again(self: &Arc<Self>, handle: &EngineHandle, id: &str) -> Result<String, RolloutError> {
        handle.clear_canary();
        let this = self.clone();
        let owned = id.to_string();
        let engine = tokio::task::spawn_blocking(move || this.load(&owned, true))
            .await
            .map_err(|e| RolloutError::Invalid { id: id.to_string(), message: e.to_string() })??;
        let old = handle.swap(engine).info().checkpoint.clone();
        let mut state = self.lock();
        if state.history.last().is_some_and(|last| last == id) {
            state.history.pop();
        }
        drop(state);
        crate::metrics::set_serving_checkpoint(id);
        Ok(old)
    }

    /// Applies a fleet-wide rollback another gateway (or this one) announced:
    /// serves `to` unless it serves already, and refuses `from` so that a
    /// replica still loading it, or a later announcement, never promotes it.
    pub async fn rollback_to(
        self: &Arc<Self>,
        handle: &EngineHandle,
        rollback: &RollbackAnnouncement,
    ) -> Result<(), RolloutError> {
        let serving = handle.current().info().checkpoint.clone();
        if serving != rollback.from {
            self.refuse(handle, &rollback.from, "rolled back fleet-wide");
        }
        if serving == rollback.to {
            return Ok(());
        }
        let old = self.serve_again(handle, &rollback.to).await?;
        if old == rollback.from {
            self.lock().candidates.insert(old, (CandidateState::Failed("rolled back fleet-wide".into()), None));
        }
        tracing::info!(to = %rollback.to, from = %rollback.from, "fleet-wide rollback applied");
        Ok(())
    }

    /// The loaded engine serving checkpoint `id` for a request that pins it: the serving engine, the canary, or a
    /// verified candidate waiting for promotion. `None` when this gateway has no such engine loaded.
    pub fn pinned(&self, handle: &EngineHandle, id: &str) -> Option<Arc<Engine>> {
        let current = handle.current();
        if current.info().checkpoint == id {
            return Some(current);
        }
        if let Some(canary) = handle.canary().filter(|c| c.engine.info().checkpoint == id) {
            return Some(canary.engine.clone());
        }
        self.ready_engine(id).ok()
    }

    /// Every distinct checkpoint loaded on this gateway: the serving one first, then the canary and verified
    /// candidates (the arena's contenders).
    pub fn loaded_engines(&self, handle: &EngineHandle) -> Vec<Arc<Engine>> {
        let mut engines = vec![handle.current()];
        engines.extend(handle.canary().map(|c| c.engine.clone()));
        engines.extend(self.lock().candidates.values().filter_map(|(state, engine)| match state {
            CandidateState::Ready => engine.clone(),
            _ => None,
        }));
        let mut seen = std::collections::HashSet::new();
        engines.retain(|e| seen.insert(e.info().checkpoint.clone()));
        engines
    }

    /// Checkpoints loaded and waiting for a promotion decision: the canary and verified candidates.
    pub fn waiting_candidates(&self, handle: &EngineHandle) -> Vec<String> {
        self.loaded_engines(handle).iter().skip(1).map(|e| e.info().checkpoint.clone()).collect()
    }

    /// Takes candidate `id` out of contention (the canary's share of traffic included) and records why.
    pub fn refuse(&self, handle: &EngineHandle, id: &str, reason: &str) {
        if handle.canary().is_some_and(|c| c.engine.info().checkpoint == id) {
            handle.clear_canary();
        }
        self.lock().candidates.insert(id.to_string(), (CandidateState::Failed(reason.to_string()), None));
    }

    /// The manifest of every checkpoint in the store whose manifest parses, oldest first.
    pub fn manifests(&self) -> Vec<Manifest> {
        self.store.list().0
    }

    /// Every checkpoint on disk with its lineage and metrics, and what this gateway does with it.
    pub fn status(&self, handle: &EngineHandle) -> serde_json::Value {
        let (manifests, invalid) = self.store.list();
        let serving = handle.current().info().checkpoint.clone();
        let canary = handle.canary().map(|c| (c.engine.info().checkpoint.clone(), c.percent));
        let state = self.lock();
        let rows: Vec<serde_json::Value> = manifests
            .iter()
            .map(|m: &Manifest| {
                let role = if m.id == serving {
                    "serving".to_string()
                } else if canary.as_ref().is_some_and(|(c, _)| *c == m.id) {
                    "canary".to_string()
                } else if state.history.contains(&m.id) {
                    "previous".to_string()
                } else {
                    match state.candidates.get(&m.id) {
                        Some((CandidateState::Ready, _)) => "ready".into(),
                        Some((CandidateState::Loading, _)) => "loading".into(),
                        Some((CandidateState::Failed(_), _)) => "failed".into(),
                        None => "available".into(),
                    }
                };
                let failure = match state.candidates.get(&m.id) {
                    Some((CandidateState::Failed(message), _)) => Some(message.clone()),
                    _ => None,
                };
                serde_json::json!({
                    "id": m.id, "parent": m.parent, "stage": m.stage, "metrics": m.metrics,
                    "hyperparameters": m.hyperparameters, "snapshots": m.snapshots, "created_at_ms": m.created_at_ms,
                    "role": role, "failure": failure,
                })
            })
            .collect();
        serde_json::json!({
            "object": "list",
            "serving": serving,
            "canary": canary.map(|(id, percent)| serde_json::json!({"id": id, "percent": percent})),
            "previous": state.history.last(),
            "data": rows,
            "invalid": invalid.iter().map(|(id, e)| serde_json::json!({"id": id, "error": e})).collect::<Vec<_>>(),
        })
    }
}

/// Runs `future` to its end from a blocking thread: on the gateway's runtime when there is one (an external
/// engine's upstream calls and health probes must live on it, not on a runtime dropped after the load), else on a
/// runtime of its own (unit tests).
fn block_on<F: std::future::Future>(future: F) -> std::io::Result<F::Output> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => Ok(runtime.block_on(future)),
        Err(_) => Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(future)),
    }
}

/// Whether a checkpoint may be loaded for serving: never a reward model; a policy whose evaluation gate failed
/// (`metrics.evaluation.passed == false`) only when `force`.
fn check_servable(manifest: &Manifest, force: bool) -> Result<(), RolloutError> {
    if manifest.stage == inference::checkpoint::Stage::RewardModel {
        return Err(RolloutError::RewardModel(manifest.id.clone()));
    }
    let gate_failed = manifest.metrics["evaluation"]["passed"].as_bool() == Some(false);
    if gate_failed && !force {
        return Err(RolloutError::GateFailed(manifest.id.clone()));
    }
    Ok(())
}

/// How long one read of the announcements stream blocks.
pub const WATCH_BLOCK: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows `instructd:checkpoints` from now on and considers each announced
/// checkpoint: policies for serving, reward models for scoring (starting with
/// the newest reward model already in the store). `link` must be its own
/// (made with `RedisLink::for_blocking_reads`).
pub async fn watch(rollout: Arc<Rollout>, handle: Arc<EngineHandle>, link: Arc<feedback::RedisLink>) {
    if let Some(newest) = rollout.newest_reward_model() {
        let rollout = rollout.clone();
        tokio::spawn(async move { rollout.consider_reward_model(&newest).await });
    }
    let mut last = "$".to_string();
    loop {
        let from = last.clone();
        let reply: Result<redis::streams::StreamReadReply, _> = link
            .run(|mut c| async move {
                redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(WATCH_BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(feedback::streams::CHECKPOINTS)
                    .arg(from)
                    .query_async(&mut c)
                    .await
            })
            .await;
        match reply {
            Ok(reply) => {
                for key in reply.keys {
                    for entry in key.ids {
                        last = entry.id.clone();
                        if let Some(rollback) = RollbackAnnouncement::from_entry(&entry) {
                            let (rollout, handle) = (rollout.clone(), handle.clone());
                            tokio::spawn(async move {
                                if let Err(e) = rollout.rollback_to(&handle, &rollback).await {
                                    tracing::error!(to = %rollback.to, error = %e, "fleet-wide rollback failed here");
                                }
                            });
                            continue;
                        }
                        let Some(announced) = CheckpointAnnouncement::from_entry(&entry) else { continue };
                        // Reward models are published too: never served, but scored with.
                        if !announced.is_servable() {
                            tracing::info!(checkpoint = %announced.id, "reward model announced");
                            let rollout = rollout.clone();
                            tokio::spawn(async move { rollout.consider_reward_model(&announced).await });
                            continue;
                        }
                        tracing::info!(checkpoint = %announced.id, source = ?announced.source, "checkpoint announced");
                        let (rollout, handle) = (rollout.clone(), handle.clone());
                        tokio::spawn(async move { rollout.consider_announced(&handle, &announced).await });
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "checkpoint announcements unavailable; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inference::checkpoint::Stage;

    #[test]
    fn reward_models_are_never_servable_and_gate_failures_only_when_forced() {
        let reward = Manifest::new("rm", None, Stage::RewardModel);
        assert!(matches!(check_servable(&reward, false), Err(RolloutError::RewardModel(_))));
        assert!(matches!(check_servable(&reward, true), Err(RolloutError::RewardModel(_))));
        let mut gated = Manifest::new("ppo", None, Stage::PpoPtx);
        gated.metrics = serde_json::json!({"evaluation": {"passed": false}});
        assert!(matches!(check_servable(&gated, false), Err(RolloutError::GateFailed(_))));
        assert!(check_servable(&gated, true).is_ok());
        gated.metrics = serde_json::json!({"evaluation": {"passed": true}});
        assert!(check_servable(&gated, false).is_ok());
        assert!(check_servable(&Manifest::new("sft", None, Stage::Sft), false).is_ok());
    }

    /// Every checkpoint the rollout loads is packed in `[model] serve_dtype` before its smoke generation: a
    /// checkpoint whose rows are not whole Q8_0 blocks is refused for that reason under q8_0 and served under f32;
    /// one that packs serves.
    #[test]
    fn loaded_checkpoints_are_packed_in_the_serve_dtype() {
        use inference::tiny_model::{TinySpec, init_tiny};
        let root = tempfile::tempdir().unwrap();
        let (odd, even) = (root.path().join("odd"), root.path().join("even"));
        init_tiny(&odd, &TinySpec { hidden_size: 48, intermediate_size: 96, ..Default::default() }).unwrap();
        init_tiny(&even, &TinySpec::default()).unwrap();
        let rollout = |serve_dtype, dir: &std::path::Path| {
            let store = CheckpointStore::open(&root.path().join("store")).unwrap();
            Rollout::new(store, RolloutConfig::default(), EngineConfig::default(), "m", "f32")
                .with_serve_dtype(serve_dtype)
                .with_initial("start", dir)
        };
        let err = rollout(ServeDtype::Q8_0, &odd).load("start", false).err().expect("48-wide rows are not Q8_0");
        assert!(err.to_string().contains("serve_dtype q8_0"), "{err}");
        assert!(rollout(ServeDtype::F32, &odd).load("start", false).is_ok());
        assert!(rollout(ServeDtype::Q8_0, &even).load("start", false).is_ok());
        assert!(rollout(ServeDtype::Q4_0, &odd).load("start", false).is_err(), "48-wide rows are not Q4_0");
        assert!(rollout(ServeDtype::Q4_0, &even).load("start", false).is_ok());
        assert!(rollout(ServeDtype::Bf16, &even).load("start", false).is_ok());
    }
}
