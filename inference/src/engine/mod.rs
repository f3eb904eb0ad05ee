//! The serving engine: a bounded queue in front of one batching thread, and a
//! handle that can swap the whole engine atomically.
//!
//! [`Engine::submit`] validates a request and enqueues it, returning
//! [`Error::Overloaded`] at once when the queue is full, or
//! [`Error::QueueShareExceeded`] when the request's tenant already has its
//! share of the queue waiting. Waiting requests enter the batch in weighted
//! fair order over tenants (`fair_queue`). The returned
//! [`Generation`] streams [`Event`]s; dropping it cancels the request.
//! [`EngineHandle::swap`] installs a new engine for new requests while the old
//! one finishes the requests it already has, then stops.

mod batcher;
pub mod external;
mod fair_queue;
mod queue_account;
pub mod request;
mod sequence;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::mpsc;

pub use external::{EngineKind, ExternalJob, ExternalRunner, LaunchConfig, OpenAiHttpConfig};
pub use request::{Event, FinishReason, GenerateRequest, RequestLimits, Tenant, TokenLogprob};

use crate::error::{Error, Result};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use batcher::{Batcher, Job, KvCapacity};
use queue_account::QueueAccount;

/// Queueing and batching limits (`[engine]` in the config file).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Requests that may wait for admission before `Overloaded` is returned.
    pub queue_capacity: usize,
    /// Samples (sequences) decoded together at most.
    pub max_running: usize,
    /// Prompt tokens prefilled in one step at most (one larger prompt may
    /// still run alone).
    pub max_batch_tokens: usize,
    pub limits: RequestLimits,
    /// Threads the engine computes with (0 = one per available core).
    pub compute_threads: usize,
    /// Admit waiting requests in weighted fair order over tenants (the
    /// gateway's organisations), and cap each tenant's share of the queue;
    /// false: one first-come, first-served queue.
    pub fair_sharing: bool,
    /// With fair sharing, the part of `queue_capacity` one tenant's waiting
    /// requests may fill, counting each request as its samples (`n` or
    /// `best_of`). Past it: `QueueShareExceeded` (HTTP 429).
    pub tenant_queue_share: f64,
    /// With fair sharing, pause the running batch's forward between decoder
    /// layers when a request of a tenant with nothing running arrives, run
    /// that prompt to its first token, then resume: its first token waits
    /// for one layer of the step in flight, not the rest of the step.
    pub preempt_between_layers: bool,
    /// Memory for the keys and values of every running and cached sequence,
    /// in MiB (CPU serving). Sequences are admitted by the blocks they need
    /// and preempted (recomputed later) when decoding outgrows it. SmolLM2
    /// (F32 KV, 46 KiB a position; F16 23 KiB): 4096 MiB is ~93k positions (F16 ~186k).
    pub kv_cache_mb: usize,
    /// The pool's size in blocks instead of `kv_cache_mb` (0: from `kv_cache_mb`).
    pub kv_cache_blocks: usize,
    /// Positions per KV block.
    pub kv_block_tokens: usize,
    /// How the pool stores keys and values: `f32` (exact) or `f16` (half the
    /// memory and the bytes a decode step reads; llama.cpp's default).
    pub kv_dtype: crate::kv_pool::KvDtype,
    /// Keep the KV blocks of prompts (and finished chats) and reuse them for
    /// later requests that start with the same tokens: system prompts, chat
    /// history, few-shot examples, the playground's K samples of a prompt.
    pub prefix_cache: bool,
    /// `builtin` (this process runs the model) or `openai_http` (upstream servers do).
    pub kind: EngineKind,
    /// The upstreams, with `kind = "openai_http"`.
    pub openai_http: OpenAiHttpConfig,
}

impl EngineConfig {
    /// `compute_threads` with 0 resolved to the number of available cores.
    pub fn resolved_compute_threads(&self) -> usize {
        match self.compute_threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }

    /// Samples one tenant may have waiting; `None` without fair sharing.
    fn tenant_queue_limit(&self) -> Option<usize> {
        let share = if self.tenant_queue_share.is_finite() { self.tenant_queue_share.clamp(0.0, 1.0) } else { 1.0 };
        self.fair_sharing.then(|| ((self.queue_capacity as f64 * share).ceil() as usize).max(1))
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            max_running: 64,
            max_batch_tokens: 512,
            limits: RequestLimits::default(),
            compute_threads: 0,
            fair_sharing: true,
            tenant_queue_share: 0.5,
            preempt_between_layers: true,
            kv_cache_mb: 4096,
            kv_cache_blocks: 0,
            kv_block_tokens: crate::kv_pool::DEFAULT_BLOCK_TOKENS,
            kv_dtype: crate::kv_pool::KvDtype::F32,
            prefix_cache: true,
            kind: EngineKind::Builtin,
            openai_http: OpenAiHttpConfig::default(),
        }
    }
}

/// Live counters for metrics and `/readyz`.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub last_batch_size: AtomicUsize,
    pub steps: AtomicU64,
    /// Steps paused between layers for a newly arrived tenant's prompt
    /// (`[engine] preempt_between_layers`).
    pub layer_preemptions: AtomicU64,
    /// The KV block pool (0 blocks in total where the engine has none:
    /// a device engine, or one whose requests run elsewhere).
    pub kv: KvStats,
}

/// The KV block pool's use and the prefix cache's hits.
#[derive(Debug, Default)]
pub struct KvStats {
    pub blocks_total: AtomicUsize,
    /// Blocks held by running sequences.
    pub blocks_used: AtomicUsize,
    /// Blocks in the prefix cache (some may also be in use).
    pub blocks_cached: AtomicUsize,
    /// Prompt tokens whose KV came from the prefix cache, not a forward.
    pub prefix_hit_tokens: AtomicU64,
    pub prefix_hit_blocks: AtomicU64,
    /// Prompt tokens looked up in the prefix cache (the hit rate's denominator).
    pub prefix_lookup_tokens: AtomicU64,
    /// Requests set aside (their KV dropped, recomputed later) to make room.
    pub preemptions: AtomicU64,
}

/// What a client may know about the model an engine serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name clients pass as `model`.
    pub name: String,
    /// The checkpoint the weights came from (the `system_fingerprint`).
    pub checkpoint: String,
    pub vocab_size: usize,
    pub max_positions: usize,
}

pub struct Engine {
    runner: Runner,
    account: Arc<QueueAccount>,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    next_id: AtomicU64,
}

/// Who runs the requests an engine accepts.
enum Runner {
    /// This process's batching thread.
    Batching {
        jobs: mpsc::UnboundedSender<Job>,
        /// True while the batching thread runs; cleared when it exits or panics.
        alive: Arc<AtomicBool>,
        /// The KV pool's size, to refuse at once a request that could never fit.
        kv_capacity: Option<KvCapacity>,
    },
    /// Servers outside this process (`[engine] kind = "openai_http"`).
    External(Arc<dyn ExternalRunner>),
}

impl Engine {
    /// Starts the batching thread that owns `model`.
    pub fn start(model: Llama, tokenizer: Tokenizer, info: ModelInfo, config: EngineConfig) -> Result<Self> {
        let tokenizer = Arc::new(tokenizer);
        let stats = Arc::new(EngineStats::default());
        // The account bounds the queue; the channel only carries jobs to the
        // batching thread, which moves them into its fair queue every step.
        let account = Arc::new(QueueAccount::new(config.queue_capacity, config.tenant_queue_limit()));
        let (tx, rx) = mpsc::unbounded_channel();
        let batcher = Batcher::new(model, tokenizer.clone(), config.clone(), stats.clone(), account.clone(), rx);
        let kv_capacity = batcher.kv_capacity();
        // The batching loop runs on a worker of the engine's own pool, so the
        // parallel matmuls it starts split across that worker and its
        // siblings without waking a thread from outside on every call.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.resolved_compute_threads())
            .thread_name(move |i| format!("engine-compute-{i}"))
            .build()
            .map_err(|e| Error::EngineFailure(format!("cannot start compute threads: {e}")))?;
        let alive = Arc::new(AtomicBool::new(true));
        spawn_batching(format!("engine-{}", info.checkpoint), alive.clone(), move || {
            pool.install(move || batcher.run())
        })?;
        let runner = Runner::Batching { jobs: tx, alive, kv_capacity };
        Ok(Self { runner, account, info, tokenizer, config, stats, next_id: AtomicU64::new(1) })
    }

    /// An engine whose requests `runner` runs outside this process; `tokenizer` and `info` describe the model it
    /// serves, for validation, limits and accounting at the edge.
    pub fn start_external(
        tokenizer: Tokenizer,
        info: ModelInfo,
        config: EngineConfig,
        runner: Arc<dyn ExternalRunner>,
    ) -> Self {
        let account = Arc::new(QueueAccount::new(config.queue_capacity, config.tenant_queue_limit()));
        Self {
            runner: Runner::External(runner),
            account,
            info,
            tokenizer: Arc::new(tokenizer),
            config,
            stats: Arc::new(EngineStats::default()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Whether requests submitted now would run: the batching thread still runs (false once it panicked or
    /// exited), or an upstream answers its health probe.
    pub fn is_running(&self) -> bool {
        match &self.runner {
            Runner::Batching { jobs, alive, .. } => alive.load(Ordering::Acquire) && !jobs.is_closed(),
            Runner::External(runner) => runner.is_healthy(),
        }
    }

    /// The upstreams' state when this engine forwards to servers outside this process (`/readyz`).
    pub fn external_status(&self) -> Option<serde_json::Value> {
        match &self.runner {
            Runner::External(runner) => Some(runner.status()),
            Runner::Batching { .. } => None,
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The per-request limits this engine validates against.
    pub fn limits(&self) -> &RequestLimits {
        &self.config.limits
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Validates and enqueues. `streaming` only changes validation (`best_of`).
    pub fn submit(&self, request: GenerateRequest, streaming: bool) -> Result<Generation> {
        let mut generations = self.submit_all(vec![request], streaming)?;
        generations.pop().ok_or(Error::EngineStopped)
    }

    /// Validates and enqueues every request, or none: a completions call with
    /// several prompts is refused whole (full queue, tenant's share) rather
    /// than half queued.
    pub fn submit_all(&self, requests: Vec<GenerateRequest>, streaming: bool) -> Result<Vec<Generation>> {
        for request in &requests {
            request.validate(self.info.vocab_size, self.info.max_positions, &self.config.limits, streaming)?;
        }
        let jobs = match &self.runner {
            Runner::Batching { jobs, kv_capacity, .. } => {
                if let Some(capacity) = kv_capacity {
                    requests.iter().try_for_each(|r| capacity.check(r))?;
                }
                jobs
            }
            Runner::External(runner) => return self.submit_external(runner, requests, streaming),
        };
        self.account.reserve(&requests)?;
        let mut generations = Vec::with_capacity(requests.len());
        let mut requests = requests.into_iter();
        for request in requests.by_ref() {
            let (tx, rx) = mpsc::unbounded_channel();
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let summary =
                GenerationSummary { prompt_tokens: request.prompt.len(), n: request.n, samples: request.samples() };
            let queued_steps = Arc::new(AtomicU64::new(NOT_ADMITTED));
            let job = Job { id, request, events: tx, enqueued: Instant::now(), queued_steps: queued_steps.clone() };
            if let Err(mpsc::error::SendError(job)) = jobs.send(job) {
                // The batching thread is gone: nothing of this submission runs.
                self.account.release(&job.request);
                requests.for_each(|r| self.account.release(&r));
                return Err(Error::EngineStopped);
            }
            generations.push(Generation { id, events: rx, summary, queued_steps });
        }
        Ok(generations)
    }

    fn submit_external(
        &self,
        runner: &Arc<dyn ExternalRunner>,
        requests: Vec<GenerateRequest>,
        streaming: bool,
    ) -> Result<Vec<Generation>> {
        for request in &requests {
            runner.check(request, streaming)?;
        }
        self.account.reserve(&requests)?;
        let mut generations = Vec::with_capacity(requests.len());
        for request in requests {
            let (events, rx) = mpsc::unbounded_channel();
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let summary =
                GenerationSummary { prompt_tokens: request.prompt.len(), n: request.n, samples: request.samples() };
            let queued = external::QueueSlot::new(self.account.clone(), self.stats.clone(), &request);
            runner.run(ExternalJob { id, request, events, queued });
            // Queue steps are the batching thread's measure; an upstream has none.
            generations.push(Generation { id, events: rx, summary, queued_steps: Arc::new(AtomicU64::new(0)) });
        }
        Ok(generations)
    }

    /// Submits and waits for the whole completion.
    pub async fn generate(&self, request: GenerateRequest) -> Result<Completion> {
        self.submit(request, false)?.collect().await
    }
}

/// Runs `body` on a new thread named `name`; `alive` is cleared when the
/// thread ends, by return or by panic (the guard drops while unwinding).
fn spawn_batching(
    name: String,
    alive: Arc<AtomicBool>,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    struct ClearOnExit(Arc<AtomicBool>);
    impl Drop for ClearOnExit {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
            if std::thread::panicking() {
                tracing::error!("engine batching thread panicked: this engine serves nothing from now on");
            }
        }
    }
    std::thread::Builder::new().name(name).spawn(move || {
        let _guard = ClearOnExit(alive);
        body();
    })
}

#[derive(Debug, Clone, Copy)]
struct GenerationSummary {
    prompt_tokens: usize,
    n: usize,
    samples: usize,
}

/// A request in flight. Dropping it cancels the request.
pub struct Generation {
    id: u64,
    events: mpsc::UnboundedReceiver<Event>,
    summary: GenerationSummary,
    queued_steps: Arc<AtomicU64>,
}

/// `queued_steps` before admission.
const NOT_ADMITTED: u64 = u64::MAX;

impl Generation {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Engine steps the request waited in the queue before it entered the
    /// batch; `None` until it has. Steps, not time: what fair sharing
    /// bounds, and the same on any machine.
    pub fn queued_steps(&self) -> Option<u64> {
        Some(self.queued_steps.load(Ordering::Relaxed)).filter(|&s| s != NOT_ADMITTED)
    }

    /// The next event, or `None` when every sample has finished.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Gathers all events into choices; with `best_of > n`, keeps the `n`
    /// samples with the highest mean token log-probability.
    pub async fn collect(self) -> Result<Completion> {
        let n = self.summary.n;
        let mut completion = self.collect_samples().await?;
        let scores: Vec<f32> = completion.choices.iter().map(|c| c.mean_logprob).collect();
        completion.keep_best(n, &scores);
        Ok(completion)
    }

    /// Gathers all events into choices, every sample kept (`best_of` of
    /// them), for a caller that ranks them itself (by a reward model).
    pub async fn collect_samples(mut self) -> Result<Completion> {
        let mut completion = Completion {
            prompt: None,
            choices: (0..self.summary.samples).map(Choice::empty).collect(),
            prompt_tokens: self.summary.prompt_tokens,
            completion_tokens: 0,
        };
        let mut finished = 0;
        while finished < self.summary.samples {
            let Some(event) = self.events.recv().await else {
                return Err(Error::EngineStopped);
            };
            match event {
                Event::Prompt { tokens } => completion.prompt = Some(tokens),
                Event::Token { index, text, token } => {
                    if let Some(choice) = completion.choices.get_mut(index) {
                        choice.text.push_str(&text);
                        choice.tokens.extend(token);
                    }
                }
                Event::Finished { index, reason, completion_tokens, mean_logprob } => {
                    if let Some(choice) = completion.choices.get_mut(index) {
                        choice.finish_reason = Some(reason);
                        choice.mean_logprob = mean_logprob;
                        choice.completion_tokens = completion_tokens;
                    }
                    completion.completion_tokens += completion_tokens;
                    finished += 1;
                }
                Event::Failed { message } => return Err(Error::EngineFailure(message)),
            }
        }
        Ok(completion)
    }
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The prompt's tokens when `echo` was set.
    pub prompt: Option<Vec<TokenLogprob>>,
    pub choices: Vec<Choice>,
    pub prompt_tokens: usize,
    /// Tokens generated over all samples, including those `best_of` dropped.
    pub completion_tokens: usize,
}

impl Completion {
    /// `best_of`'s selection: keeps the `n` choices with the highest
    /// `scores` (one per choice, in choice order), best first, and numbers
    /// them `0..n`. Nothing changes when there are no more than `n`.
    pub fn keep_best(&mut self, n: usize, scores: &[f32]) {
        if self.choices.len() <= n || scores.len() != self.choices.len() {
            return;
        }
        let mut ranked: Vec<(f32, Choice)> = scores.iter().copied().zip(self.choices.drain(..)).collect();
        // Stable sort: equal scores keep sample order.
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        self.choices = ranked.into_iter().take(n).map(|(_, choice)| choice).collect();
        for (i, choice) in self.choices.iter_mut().enumerate() {
            choice.index = i;
        }
    }
}

#[derive(Debug, Clone)]
pub struct Choice {
    pub index: usize,
    pub text: String,
    /// Per-token log-probabilities, when they were requested.
    pub tokens: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub mean_logprob: f32,
    pub completion_tokens: usize,
}

impl Choice {
    fn empty(index: usize) -> Self {
        Self {
            index,
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: None,
            mean_logprob: 0.0,
            completion_tokens: 0,
        }
    }
}

/// The engine currently serving, replaceable while requests run.
///
/// Each request takes an `Arc<Engine>` when it starts and keeps its
/// [`Generation`] from that engine, so a swap never moves it. The old
/// engine's thread exits once its last request ends and its last `Arc` drops.
///
/// A canary engine may run beside it and take a percentage of new requests
/// ([`pick`](Self::pick)) until it is promoted or dropped.
pub struct EngineHandle {
    current: ArcSwap<Engine>,
    canary: ArcSwapOption<Canary>,
}

/// A candidate engine serving `percent` of new requests.
pub struct Canary {
    pub engine: Arc<Engine>,
    pub percent: u8,
}

impl EngineHandle {
    pub fn new(engine: Engine) -> Self {
        Self { current: ArcSwap::from_pointee(engine), canary: ArcSwapOption::empty() }
    }

    /// The serving engine (the canary, if any, is not included).
    pub fn current(&self) -> Arc<Engine> {
        self.current.load_full()
    }

    /// The engine a new generation request should run on: the canary for its
    /// share of requests, else the serving engine. A canary whose engine no
    /// longer runs takes nothing: its share falls back to the serving engine
    /// (and `/readyz` says so) instead of failing.
    pub fn pick(&self) -> Arc<Engine> {
        if let Some(canary) = self.canary.load_full()
            && rand::random_range(0..100u8) < canary.percent
            && canary.engine.is_running()
        {
            return canary.engine.clone();
        }
        self.current()
    }

    /// Installs `engine` for all new requests; returns the one it replaced.
    pub fn swap(&self, engine: Engine) -> Arc<Engine> {
        self.swap_arc(Arc::new(engine))
    }

    /// As [`swap`](Self::swap), for an engine already shared (a promoted canary).
    /// A canary running the same engine is retired with it.
    pub fn swap_arc(&self, engine: Arc<Engine>) -> Arc<Engine> {
        if self.canary.load().as_ref().is_some_and(|c| Arc::ptr_eq(&c.engine, &engine)) {
            self.canary.store(None);
        }
        let old = self.current.swap(engine);
        tracing::info!(from = %old.info.checkpoint, to = %self.current.load().info.checkpoint, "engine swapped");
        old
    }

    /// Sends `percent` (0..=100) of new requests to `engine` beside the serving one.
    pub fn set_canary(&self, engine: Arc<Engine>, percent: u8) {
        tracing::info!(canary = %engine.info.checkpoint, percent, "canary set");
        self.canary.store(Some(Arc::new(Canary { engine, percent: percent.min(100) })));
    }

    /// Stops the canary; returns its engine.
    pub fn clear_canary(&self) -> Option<Arc<Engine>> {
        self.canary.swap(None).map(|c| c.engine.clone())
    }

    pub fn canary(&self) -> Option<Arc<Canary>> {
        self.canary.load_full()
    }

    /// Whether the serving engine's batching thread still runs (`/readyz`).
    pub fn is_serving(&self) -> bool {
        self.current.load().is_running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batching_thread_that_panics_is_reported_dead() {
        let alive = Arc::new(AtomicBool::new(true));
        let thread = spawn_batching("engine-test".into(), alive.clone(), || panic!("a step failed"))
            .unwrap_or_else(|e| panic!("cannot spawn: {e}"));
        assert!(thread.join().is_err(), "the body panicked");
        assert!(!alive.load(Ordering::Acquire), "a panicked batching thread must not count as alive");
    }

    #[test]
    fn an_engine_whose_batching_thread_is_gone_is_not_running() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        crate::tiny_model::init_tiny(dir.path(), &crate::tiny_model::TinySpec::default())
            .unwrap_or_else(|e| panic!("tiny model: {e}"));
        let engine = crate::load::LoadedModel::load(dir.path(), candle_core::DType::F32, &candle_core::Device::Cpu)
            .and_then(|m| m.into_engine("tiny", "a", EngineConfig::default()))
            .unwrap_or_else(|e| panic!("engine: {e}"));
        let handle = EngineHandle::new(engine);
        assert!(handle.is_serving());
        // What the batching thread's exit does: the flag clears and its receiver drops.
        let current = handle.current();
        let Runner::Batching { alive, .. } = &current.runner else { panic!("a built-in engine") };
        alive.store(false, Ordering::Release);
        assert!(!handle.is_serving(), "/readyz must not report a dead engine as loaded");
    }

    #[test]
    fn keep_best_keeps_the_highest_scores_in_order_and_renumbers() {
        let mut completion = Completion {
            prompt: None,
            choices: ["a", "b", "c", "d"]
                .iter()
                .enumerate()
                .map(|(i, t)| Choice { text: t.to_string(), ..Choice::empty(i) })
                .collect(),
            prompt_tokens: 1,
            completion_tokens: 8,
        };
        completion.keep_best(2, &[0.1, 0.9, 0.5, 0.9]);
        let kept: Vec<(usize, &str)> = completion.choices.iter().map(|c| (c.index, c.text.as_str())).collect();
        assert_eq!(kept, [(0, "b"), (1, "d")], "ties keep sample order");
        assert_eq!(completion.completion_tokens, 8, "dropped samples stay counted");
        completion.keep_best(2, &[0.0]);
        assert_eq!(completion.choices.len(), 2, "nothing to drop");
    }

    #[test]
    fn a_canary_that_stopped_running_takes_no_traffic() {
        let engine = |checkpoint: &str| {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            crate::tiny_model::init_tiny(dir.path(), &crate::tiny_model::TinySpec::default())
                .unwrap_or_else(|e| panic!("tiny model: {e}"));
            crate::load::LoadedModel::load(dir.path(), candle_core::DType::F32, &candle_core::Device::Cpu)
                .and_then(|m| m.into_engine("tiny", checkpoint, EngineConfig::default()))
                .unwrap_or_else(|e| panic!("engine: {e}"))
        };
        let handle = EngineHandle::new(engine("serving"));
        let canary = Arc::new(engine("canary"));
        handle.set_canary(canary.clone(), 100);
        assert_eq!(handle.pick().info().checkpoint, "canary");
        match &canary.runner {
            Runner::Batching { alive, .. } => alive.store(false, Ordering::Release),
            Runner::External(_) => unreachable!("a built-in engine"),
        }
        for _ in 0..20 {
            assert_eq!(handle.pick().info().checkpoint, "serving", "a dead canary's share goes to the serving engine");
        }
    }
}
