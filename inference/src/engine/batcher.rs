//! The continuous-batching loop: the one thread that owns the model.
//!
//! Each iteration (a "step") admits waiting requests under a prompt-token
//! budget, in the fair queue's order (weighted fair over tenants, or first
//! come, first served), then runs a single forward ([`Llama::begin_step`] to
//! [`Llama::finish_step`]) over every new prompt
//! (prefill) and every running sample's last token (decode), then samples.
//! Requests join and leave the running batch between steps; nothing waits for
//! the batch to drain. The `n` (or `best_of`) samples of one prompt share one
//! prefill and fork its cache. A request whose receiver is gone is cancelled
//! at the next step and its caches freed.
//!
//! With fair sharing, a tenant with nothing running does not wait for the
//! step in flight either: after each decoder layer of the full batch's
//! forward the batcher looks at its job channel, and a request from such a
//! tenant is admitted then, its prompt run to its first token in a forward
//! of its own, and the paused step resumed from the next layer
//! (`preempt_between_layers`).
//!
//! On the CPU keys and values come from one [`BlockPool`] per engine: a
//! request is admitted when the blocks its prompt needs (less those found in
//! the prefix cache) and one per sample are available beyond what running
//! samples may need next. When decoding outgrows the pool, the most recently
//! admitted request is preempted: its full blocks go to the prefix cache,
//! the rest are dropped, and it is parked until there is room to recompute
//! them (its samples keep their sampler state and streamed text). A sample
//! that alone outgrows the whole pool ends with `length`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::fair_queue::FairQueue;
use crate::engine::queue_account::QueueAccount;
use crate::engine::request::{Event, GenerateRequest, Tenant, TokenLogprob};
use crate::engine::sequence::{Sequence, Vocabulary};
use crate::engine::{EngineConfig, EngineStats};
use crate::error::{Error, Result};
use crate::kv_pool::{BlockPool, BlockShape, KvBlock};
use crate::llama::{BatchChunk, Llama, SequenceCache};
use crate::sampling::log_softmax_at;
use crate::tokenizer::Tokenizer;

/// A request waiting in the queue.
pub(crate) struct Job {
    pub id: u64,
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<Event>,
    pub enqueued: Instant,
    /// Where the batcher records how many steps the job waited
    /// ([`Generation::queued_steps`](crate::engine::Generation::queued_steps)).
    pub queued_steps: Arc<AtomicU64>,
}

/// A job in the batcher's queue, with the step count when it got there.
struct Waiting {
    job: Job,
    since_step: u64,
}

/// A request admitted to the batch: its samples and where to send events.
struct Active {
    id: u64,
    request: Arc<GenerateRequest>,
    events: mpsc::UnboundedSender<Event>,
    /// Set until the prompt has been prefilled.
    prefill: Option<SequenceCache>,
    samples: Vec<Sequence>,
    cancelled: bool,
    /// Prefilled in a pass of its own before the step's full batch: its
    /// tenant had nothing running while others' samples were decoding.
    first_of_tenant: bool,
    /// Preempted: its caches were dropped to make room; it waits for the
    /// pool to have room to recompute them.
    parked: bool,
}

impl Active {
    /// Tokens of work done so far: the prompt once prefilled, and every
    /// sample's generated tokens.
    fn work_done(&self) -> u64 {
        let prompt = if self.prefill.is_none() { self.request.prompt.len() } else { 0 };
        (prompt + self.samples.iter().map(Sequence::generated).sum::<usize>()) as u64
    }

    /// `echo` with logprobs: every prompt row's logits are scored.
    fn wants_prompt_logprobs(&self) -> bool {
        self.request.echo && self.request.sampling.top_logprobs.is_some()
    }

    /// Whether this step's `pass` runs it.
    fn in_pass(&self, pass: Pass) -> bool {
        !self.parked && (pass == Pass::All || self.first_of_tenant)
    }

    /// Blocks its caches need before the next forward.
    fn blocks_needed(&self) -> usize {
        let prefill = self.prefill.as_ref().map_or(0, |c| c.blocks_needed(self.request.prompt.len() - c.len()));
        let samples: usize =
            self.samples.iter().filter(|s| !s.finished).map(|s| s.cache.blocks_needed(s.pending.len())).sum();
        prefill + samples
    }

    /// Samples still generating (a parked request's count too).
    fn unfinished(&self) -> usize {
        if self.prefill.is_some() {
            self.request.samples()
        } else {
            self.samples.iter().filter(|s| !s.finished).count()
        }
    }

    /// Drops its caches (full blocks go to the prefix cache first, so that
    /// the recompute may find them) and parks it.
    fn park(&mut self, pool: &mut BlockPool) {
        self.parked = true;
        self.first_of_tenant = false;
        if let Some(cache) = self.prefill.as_mut() {
            *cache = SequenceCache::pooled(pool.shape(), Vec::new());
        }
        for sample in self.samples.iter_mut().filter(|s| !s.finished) {
            let all = sample.all_tokens(&self.request.prompt);
            pool.register(&all[..sample.cache.len()], sample.cache.blocks());
            sample.cache = SequenceCache::pooled(pool.shape(), Vec::new());
            sample.pending = all;
        }
    }

    /// Blocks resuming it needs at most (no prefix hit assumed): all its
    /// tokens' blocks, and one more per sample for its next token.
    fn blocks_to_resume(&self, shape: BlockShape) -> usize {
        if self.prefill.is_some() {
            return shape.blocks_for(self.request.prompt.len()) + self.request.samples();
        }
        let prompt = self.request.prompt.len();
        self.samples.iter().filter(|s| !s.finished).map(|s| shape.blocks_for(prompt + s.tokens.len()) + 1).sum()
    }
}

/// The least a request needs of an engine's KV pool to run at all: its
/// prompt's blocks and one block per sample for the first decode step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvCapacity {
    pub block_tokens: usize,
    pub total_blocks: usize,
    pub megabytes: usize,
}

impl KvCapacity {
    /// Refuses a request that could never be admitted, however idle the engine.
    pub fn check(&self, request: &GenerateRequest) -> Result<()> {
        let samples = request.samples();
        let needed = request.prompt.len().div_ceil(self.block_tokens.max(1)) + samples;
        if needed <= self.total_blocks {
            return Ok(());
        }
        Err(Error::invalid(
            if samples > 1 && request.prompt.len().div_ceil(self.block_tokens.max(1)) < self.total_blocks {
                "n"
            } else {
                "prompt"
            },
            format!(
                "This request needs at least {needed} KV cache blocks of {} tokens ({} prompt tokens, {samples} \
                 samples) but this server's KV cache holds {} blocks ({} MB). Please reduce your prompt or the \
                 number of samples.",
                self.block_tokens,
                request.prompt.len(),
                self.total_blocks,
                self.megabytes
            ),
        ))
    }
}

/// The cached blocks `request`'s prompt starts with; none for `echo` with
/// logprobs (every prompt row's logits are needed) or without a prefix
/// cache. At least the last prompt token is always computed: its logits
/// give the first token.
fn prompt_hits(pool: &mut BlockPool, request: &GenerateRequest) -> Vec<Arc<KvBlock>> {
    let scored = request.echo && request.sampling.top_logprobs.is_some();
    if scored || !pool.caches_prefixes() {
        return Vec::new();
    }
    let max_blocks = (request.prompt.len().saturating_sub(1)) / pool.shape().tokens;
    pool.lookup(&request.prompt, max_blocks)
}

/// The prefix-cache hits `request` would start from when the pool has room
/// for the rest of its prompt and a block per sample beyond `reserve`
/// blocks; `None` when it has not (no pool: always room, no hits).
fn kv_room(pool: Option<&mut BlockPool>, request: &GenerateRequest, reserve: usize) -> Option<Vec<Arc<KvBlock>>> {
    let Some(pool) = pool else { return Some(Vec::new()) };
    let hits = prompt_hits(pool, request);
    let needed = pool.shape().blocks_for(request.prompt.len()) - hits.len() + request.samples();
    pool.has_room(needed + reserve).then_some(hits)
}

/// Who a step's chunk belongs to: an active request's prefill (`None`) or
/// one of its samples, by index into the batcher's `active`.
type Owner = (usize, Option<usize>);

/// The forward's chunks for `owners` (in `active`'s order), borrowing their
/// new tokens and caches from `active`. Built again after a pause between
/// layers from the same owners, they bring the same tokens and caches.
fn chunks_of<'a>(active: &'a mut [Active], owners: &[Owner]) -> Vec<BatchChunk<'a>> {
    let mut chunks = Vec::with_capacity(owners.len());
    let mut next = owners.iter().peekable();
    for (ai, active) in active.iter_mut().enumerate() {
        let all_logits = active.wants_prompt_logprobs();
        let Active { request, prefill, samples, .. } = active;
        if next.next_if_eq(&&(ai, None)).is_some()
            && let Some(cache) = prefill.as_mut()
        {
            // Past the prefix found in the cache (none when every row's logits are wanted).
            let tokens = &request.prompt[cache.len()..];
            chunks.push(BatchChunk { tokens, cache, all_logits });
        }
        for (si, sample) in samples.iter_mut().enumerate() {
            if next.next_if_eq(&&(ai, Some(si))).is_some() {
                chunks.push(BatchChunk { tokens: &sample.pending, cache: &mut sample.cache, all_logits: false });
            }
        }
    }
    chunks
}

/// What one forward of [`Batcher::step`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Only the prompts of tenants that had nothing running.
    FirstOfTenant,
    /// Every prompt waiting for its prefill and every running sample.
    All,
}

pub(crate) struct Batcher {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    account: Arc<QueueAccount>,
    jobs: mpsc::UnboundedReceiver<Job>,
    /// Jobs taken from the channel, waiting for room in the batch.
    waiting: FairQueue<Waiting>,
    active: Vec<Active>,
    /// KV blocks and the prefix cache (CPU serving; `None` on a device,
    /// whose caches stay candle's).
    pool: Option<BlockPool>,
    /// Set while the running batch's step is paused between layers
    /// ([`Batcher::serve_newcomers`]): nothing may be parked then.
    paused: bool,
}

impl Batcher {
    pub fn new(
        model: Llama,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        stats: Arc<EngineStats>,
        account: Arc<QueueAccount>,
        jobs: mpsc::UnboundedReceiver<Job>,
    ) -> Self {
        let mut eos = tokenizer.eos_token_ids().to_vec();
        eos.extend(model.config().eos_token_ids());
        eos.sort_unstable();
        eos.dedup();
        let waiting = FairQueue::new(config.fair_sharing);
        let pool = model.kv_in_blocks().then(|| {
            let shape = model.kv_block_shape(config.kv_block_tokens, config.kv_dtype);
            let total = match config.kv_cache_blocks {
                0 => BlockPool::blocks_in(config.kv_cache_mb.saturating_mul(1 << 20), shape),
                blocks => blocks,
            };
            // Weights that training updates in place would make cached keys stale.
            let prefix_cache = config.prefix_cache && !model.weights_may_change();
            BlockPool::new(shape, total, prefix_cache)
        });
        if let Some(pool) = &pool {
            stats.kv.blocks_total.store(pool.total(), Ordering::Relaxed);
            tracing::info!(
                blocks = pool.total(),
                block_tokens = pool.shape().tokens,
                block_kib = pool.shape().bytes() / 1024,
                prefix_cache = pool.caches_prefixes(),
                "KV block pool"
            );
        }
        Self { model, tokenizer, eos, config, stats, account, jobs, waiting, active: Vec::new(), pool, paused: false }
    }

    /// What a request needs of this engine's KV pool at least (`None`: no pool).
    pub fn kv_capacity(&self) -> Option<KvCapacity> {
        self.pool.as_ref().map(|pool| KvCapacity {
            block_tokens: pool.shape().tokens,
            total_blocks: pool.total(),
            megabytes: (pool.total() * pool.shape().bytes()) >> 20,
        })
    }

    /// Runs until every handle to the engine is gone and all work is done:
    /// requests in flight during a hot swap finish here, on this model.
    pub fn run(mut self) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match self.jobs.blocking_recv() {
                    Some(job) => self.enqueue(job),
                    None => break,
                }
            }
            self.admit();
            // Newly arrived tenants' prompts first, alone: their first token
            // then waits for one short forward rather than a full batch.
            if self.active.iter().any(|a| a.first_of_tenant)
                && let Err(err) = self.step(Pass::FirstOfTenant)
            {
                self.fail_all(&err);
            }
            if let Err(err) = self.step(Pass::All) {
                self.fail_all(&err);
            }
            self.retire();
        }
        tracing::info!("engine stopped: no handles left and no work in flight");
    }

    /// Samples already decoding (requests past their prefill).
    fn decoding(&self) -> bool {
        self.active.iter().any(|a| a.samples.iter().any(|s| !s.finished))
    }

    fn running_samples(&self) -> usize {
        self.active.iter().map(|a| a.samples.len().max(a.request.samples())).sum()
    }

    fn enqueue(&mut self, job: Job) {
        let cost = job.request.cost();
        let tenant = job.request.tenant.clone();
        let since_step = self.stats.steps.load(Ordering::Relaxed);
        self.waiting.push(&tenant, cost, Waiting { job, since_step });
    }

    /// Moves waiting jobs into the batch, in fair order, while the
    /// prompt-token budget and the running-sample cap allow. The next job in
    /// that order keeps its place when it does not fit, so a large request
    /// is never overtaken forever; one oversized prompt may always enter an
    /// otherwise prefill-free step, so it cannot starve.
    fn admit(&mut self) {
        self.receive();
        for waiting in self.waiting.remove_unless(|w| !w.job.events.is_closed()) {
            self.account.release(&waiting.job.request);
        }
        // Parked requests come back first; nothing new enters while one waits.
        if !self.resume_parked() {
            self.stats.queue_depth.store(self.account.depth(), Ordering::Relaxed);
            return;
        }
        let mut budget = self.config.max_batch_tokens;
        let mut admitted = 0;
        // Blocks running samples may take in their next step.
        let mut reserve = self.running_reserve();
        while let Some(Waiting { job, .. }) = self.waiting.peek() {
            let prompt_len = job.request.prompt.len();
            let fits_budget = prompt_len <= budget || admitted == 0;
            if !fits_budget || !self.fits_running(&job.request) {
                break;
            }
            let Some(hits) = kv_room(self.pool.as_mut(), &job.request, reserve) else { break };
            let Some(waiting) = self.waiting.pop() else { break };
            reserve += waiting.job.request.samples();
            budget = budget.saturating_sub(prompt_len);
            admitted += 1;
            self.activate(waiting, hits);
        }
        self.stats.queue_depth.store(self.account.depth(), Ordering::Relaxed);
    }

    /// Moves the jobs sent since the last call into the fair queue; returns
    /// the tenants among their senders that have nothing in the batch.
    fn receive(&mut self) -> Vec<Tenant> {
        let mut idle: Vec<Tenant> = Vec::new();
        loop {
            match self.jobs.try_recv() {
                Ok(job) => {
                    let tenant = &job.request.tenant;
                    if !self.active.iter().any(|a| a.request.tenant.id == tenant.id)
                        && !idle.iter().any(|t| t.id == tenant.id)
                    {
                        idle.push(tenant.clone());
                    }
                    self.enqueue(job);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    // Every handle is gone (swapped out): nothing new will come, so no
                    // cached prefix will be read again.
                    if let Some(pool) = self.pool.as_mut() {
                        pool.clear_cache();
                    }
                    break;
                }
            }
        }
        idle
    }

    /// Blocks the samples of running (not parked) requests may take in their next step.
    fn running_reserve(&self) -> usize {
        self.active.iter().filter(|a| !a.parked).map(Active::unfinished).sum()
    }

    /// Whether `request`'s samples fit under `max_running` (with the
    /// headroom its tenant may have); anything fits an empty batch.
    fn fits_running(&self, request: &GenerateRequest) -> bool {
        self.running_samples() + request.samples() <= self.config.max_running + self.headroom_for(request)
            || self.active.is_empty()
    }

    /// Moves a job taken from the queue into the batch, its prefill cache
    /// starting with the prefix-cache `hits` found for it.
    fn activate(&mut self, Waiting { job, since_step }: Waiting, hits: Vec<Arc<KvBlock>>) {
        self.account.release(&job.request);
        let queued_steps = self.stats.steps.load(Ordering::Relaxed) - since_step;
        job.queued_steps.store(queued_steps, Ordering::Relaxed);
        let prompt_len = job.request.prompt.len();
        let capacity = prompt_len + job.request.max_tokens;
        // A tenant with nothing in the batch, joining one busy decoding
        // others' work: its prompt gets a forward of its own (`Pass::FirstOfTenant`).
        let first_of_tenant = self.config.fair_sharing
            && self.decoding()
            && !self.active.iter().any(|a| a.request.tenant.id == job.request.tenant.id);
        tracing::debug!(
            request = job.id,
            tenant = %job.request.tenant.id,
            prompt_tokens = prompt_len,
            samples = job.request.samples(),
            queued_ms = job.enqueued.elapsed().as_millis() as u64,
            queued_steps,
            "admitted"
        );
        let prefill = match self.pool.as_ref() {
            Some(pool) => {
                let kv = &self.stats.kv;
                kv.prefix_lookup_tokens.fetch_add(prompt_len as u64, Ordering::Relaxed);
                kv.prefix_hit_blocks.fetch_add(hits.len() as u64, Ordering::Relaxed);
                kv.prefix_hit_tokens.fetch_add((hits.len() * pool.shape().tokens) as u64, Ordering::Relaxed);
                SequenceCache::pooled(pool.shape(), hits)
            }
            None => self.model.new_cache(capacity),
        };
        self.active.push(Active {
            id: job.id,
            prefill: Some(prefill),
            request: Arc::new(job.request),
            events: job.events,
            samples: Vec::new(),
            cancelled: false,
            first_of_tenant,
            parked: false,
        });
    }

    /// While the running batch's step is paused between layers (`layer` of
    /// them done): takes the jobs that arrived and admits, out of fair order,
    /// the oldest waiting request of each sender with nothing running, where
    /// it fits as at a step boundary; runs their prompts to their first
    /// tokens now. Nothing else enters mid-step. The paused step's
    /// sequences keep their caches (a new prompt is given free blocks only,
    /// never by parking another request).
    fn serve_newcomers(&mut self, layer: usize) -> Result<()> {
        let idle = self.receive();
        if idle.is_empty() || !self.decoding() {
            return Ok(());
        }
        let mut reserve = self.running_reserve();
        let mut admitted = 0;
        for tenant in &idle {
            let Some(Waiting { job, .. }) = self.waiting.peek_tenant(tenant) else { continue };
            if job.events.is_closed() || !self.fits_running(&job.request) {
                continue;
            }
            let Some(hits) = kv_room(self.pool.as_mut(), &job.request, reserve) else { continue };
            let Some(waiting) = self.waiting.pop_tenant(tenant) else { continue };
            reserve += waiting.job.request.samples();
            admitted += 1;
            self.activate(waiting, hits);
        }
        self.stats.queue_depth.store(self.account.depth(), Ordering::Relaxed);
        if admitted == 0 {
            return Ok(());
        }
        self.stats.layer_preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(layer, admitted, "step paused between layers for new tenants' prompts");
        self.paused = true;
        let result = self.step(Pass::FirstOfTenant);
        self.paused = false;
        result
    }

    /// Samples past `max_running` that `request` may take. Under a flood the
    /// batch is always full and its requests tend to end together, so a
    /// tenant with nothing running would wait for a whole wave of them to
    /// finish; with fair sharing such a tenant may enter at once, into a
    /// small headroom (an eighth of `max_running`) that bounds the batch.
    fn headroom_for(&self, request: &GenerateRequest) -> usize {
        let idle = !self.active.iter().any(|a| a.request.tenant.id == request.tenant.id);
        if self.config.fair_sharing && idle { (self.config.max_running / 8).max(1) } else { 0 }
    }

    /// Brings parked requests back, oldest first, while the pool has room to
    /// recompute all of their tokens; false while one still has to wait.
    fn resume_parked(&mut self) -> bool {
        let Some(pool) = self.pool.as_mut() else { return true };
        let shape = pool.shape();
        let mut reserve: usize = self.active.iter().filter(|a| !a.parked).map(Active::unfinished).sum();
        let mut running = self.active.iter().any(|a| !a.parked);
        for active in self.active.iter_mut().filter(|a| a.parked) {
            let needed = active.blocks_to_resume(shape);
            // With nothing running the oldest always comes back (the estimate counts a
            // prompt once per sample): if it still does not fit, `reserve_blocks` ends
            // the samples that outgrew the whole pool.
            if running && !pool.has_room(needed + reserve) {
                return false;
            }
            running = true;
            if let Some(cache) = active.prefill.as_mut() {
                *cache = SequenceCache::pooled(shape, prompt_hits(pool, &active.request));
            }
            for sample in active.samples.iter_mut().filter(|s| !s.finished) {
                let all = sample.all_tokens(&active.request.prompt);
                let hits = pool.lookup(&all, all.len().saturating_sub(1) / shape.tokens);
                sample.cache = SequenceCache::pooled(shape, hits);
                sample.pending = all[sample.cache.len()..].to_vec();
            }
            tracing::debug!(request = active.id, "resumed after preemption");
            active.parked = false;
            reserve += needed;
        }
        true
    }

    /// Gives every sequence of this pass the blocks its new tokens need,
    /// preempting the most recently admitted requests while the pool is
    /// short. A request running alone that still does not fit has samples
    /// that outgrew the whole pool: those end with `length`.
    fn reserve_blocks(&mut self, pass: Pass) -> Result<()> {
        let Some(pool) = self.pool.as_mut() else { return Ok(()) };
        loop {
            let needed: usize = self.active.iter().filter(|a| a.in_pass(pass)).map(Active::blocks_needed).sum();
            if pool.has_room(needed) {
                break;
            }
            if self.paused {
                // Admission checked the room; parking now would drop the paused step's caches.
                return Err(Error::EngineFailure("no KV blocks for a prompt admitted during a paused step".into()));
            }
            let running: Vec<usize> = (0..self.active.len()).filter(|&i| !self.active[i].parked).collect();
            match running.as_slice() {
                [] => break,
                [alone] => {
                    let vocab = Vocabulary {
                        tokenizer: &self.tokenizer,
                        eos: &self.eos,
                        max_positions: self.model.max_positions(),
                    };
                    let active = &mut self.active[*alone];
                    let mut events = Vec::new();
                    for sample in active.samples.iter_mut().filter(|s| !s.finished) {
                        if sample.cache.blocks_needed(sample.pending.len()) > 0 {
                            tracing::warn!(request = active.id, "a sample outgrew the whole KV pool: ending it");
                            sample.finish_at_capacity(&vocab, &mut events)?;
                        }
                    }
                    for event in events {
                        if active.events.send(event).is_err() {
                            active.cancelled = true;
                        }
                    }
                    break;
                }
                [.., last] => {
                    let victim = &mut self.active[*last];
                    tracing::debug!(request = victim.id, needed, "preempted: the KV pool is full");
                    victim.park(pool);
                    self.stats.kv.preemptions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for active in self.active.iter_mut().filter(|a| a.in_pass(pass)) {
            let prompt = active.request.prompt.len();
            let caches = active
                .prefill
                .iter_mut()
                .map(|c| {
                    let new = prompt - c.len();
                    (c, new)
                })
                .chain(active.samples.iter_mut().filter(|s| !s.finished).map(|s| (&mut s.cache, s.pending.len())));
            for (cache, new_tokens) in caches {
                for _ in 0..cache.blocks_needed(new_tokens) {
                    let block = pool
                        .allocate()
                        .ok_or_else(|| Error::EngineFailure("the KV pool ran out after reserving".into()))?;
                    cache.push_block(block);
                }
            }
        }
        Ok(())
    }

    /// Publishes the pool's use.
    fn publish_kv(&self) {
        if let Some(pool) = &self.pool {
            let usage = pool.usage();
            let kv = &self.stats.kv;
            kv.blocks_used.store(usage.live.saturating_sub(usage.idle), Ordering::Relaxed);
            kv.blocks_cached.store(usage.cached, Ordering::Relaxed);
        }
    }

    /// One forward over all prefills and decodes (or only the prefills of
    /// tenants new to the batch), then sampling. With
    /// `preempt_between_layers`, the full batch's forward looks at the job
    /// channel after each layer but the last (one check a layer) and, when
    /// something arrived, lets [`Batcher::serve_newcomers`] run before it
    /// goes on from the next layer.
    fn step(&mut self, pass: Pass) -> Result<()> {
        self.reserve_blocks(pass)?;
        let started = Instant::now();
        let mut owners: Vec<Owner> = Vec::new();
        for (ai, active) in self.active.iter_mut().enumerate() {
            if active.parked || (pass == Pass::FirstOfTenant && !std::mem::take(&mut active.first_of_tenant)) {
                continue;
            }
            if active.prefill.is_some() {
                owners.push((ai, None));
            }
            let pending = active.samples.iter().enumerate().filter(|(_, s)| !s.finished && !s.pending.is_empty());
            owners.extend(pending.map(|(si, _)| (ai, Some(si))));
        }
        if owners.is_empty() {
            return Ok(());
        }
        // Per chunk: the echo prompt scorer, for prefills that want prompt logprobs.
        let mut scorers: Vec<Option<PromptScorer>> = owners
            .iter()
            .map(|&(ai, sample)| {
                let active = &self.active[ai];
                (sample.is_none() && active.wants_prompt_logprobs()).then(|| PromptScorer::new(&active.request))
            })
            .collect();
        let preempt = pass == Pass::All && self.config.fair_sharing && self.config.preempt_between_layers;
        let layers = self.model.num_layers();
        let mut chunks = chunks_of(&mut self.active, &owners);
        let batch = chunks.len();
        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let Some(mut state) = self.model.begin_step(&mut chunks)? else { return Ok(()) };
        if preempt {
            for layer in 1..layers {
                self.model.run_layers(&mut state, &mut chunks, layer)?;
                if !self.jobs.is_empty() {
                    drop(chunks);
                    self.serve_newcomers(layer)?;
                    chunks = chunks_of(&mut self.active, &owners);
                }
            }
        }
        let logits = self.model.finish_step(
            state,
            &mut chunks,
            Some(&mut |chunk, row| {
                if let Some(Some(scorer)) = scorers.get_mut(chunk) {
                    scorer.score(row);
                }
                Ok(())
            }),
        )?;
        drop(chunks);
        let forward_us = started.elapsed().as_micros() as u64;
        let vocab =
            Vocabulary { tokenizer: &self.tokenizer, eos: &self.eos, max_positions: self.model.max_positions() };
        let mut events = Vec::new();
        for (((ai, sample), logits), scorer) in owners.into_iter().zip(logits).zip(scorers) {
            let active = &mut self.active[ai];
            let rows = logits.to_vec2::<f32>()?;
            let Some(last) = rows.last() else { continue };
            match sample {
                None => {
                    let Some(prefilled) = active.prefill.take() else { continue };
                    if active.request.echo {
                        let scored = scorer.map(|s| s.scored).unwrap_or_default();
                        events
                            .push(Event::Prompt { tokens: prompt_logprobs(&active.request, scored, &self.tokenizer) });
                    }
                    let samples = active.request.samples();
                    let prompt = &active.request.prompt;
                    if let Some(pool) = self.pool.as_mut() {
                        pool.register(prompt, prefilled.blocks());
                    }
                    let capacity = prompt.len() + active.request.max_tokens;
                    let mut caches = Vec::with_capacity(samples);
                    for _ in 1..samples {
                        // No room for a copy of the partial block: this sample recomputes the prompt.
                        caches.push(match self.pool.as_mut() {
                            Some(pool) => match prefilled.fork_with(|block| pool.copy(block))? {
                                Some(cache) => (cache, Vec::new()),
                                None => (SequenceCache::pooled(pool.shape(), Vec::new()), prompt.clone()),
                            },
                            None => (prefilled.fork(capacity)?, Vec::new()),
                        });
                    }
                    caches.push((prefilled, Vec::new()));
                    for (index, (cache, pending)) in caches.into_iter().enumerate() {
                        let mut seq = Sequence::new(index, &active.request, cache, pending);
                        seq.advance(last, &vocab, &mut events)?;
                        active.samples.push(seq);
                    }
                }
                Some(si) => {
                    let sample = &mut active.samples[si];
                    sample.pending.clear();
                    sample.advance(last, &vocab, &mut events)?;
                }
            }
            for event in events.drain(..) {
                if active.events.send(event).is_err() {
                    active.cancelled = true;
                }
            }
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.last_batch_size.store(batch, Ordering::Relaxed);
        tracing::trace!(batch, tokens, forward_us, elapsed_us = started.elapsed().as_micros() as u64, "step");
        Ok(())
    }

    /// Drops finished and cancelled requests, freeing their caches, and
    /// refunds their tenants the work charged but not done.
    fn retire(&mut self) {
        let waiting = &mut self.waiting;
        let pool = &mut self.pool;
        self.active.retain(|a| {
            let done = a.prefill.is_none() && a.samples.iter().all(|s| s.finished);
            let cancelled = a.cancelled || a.events.is_closed();
            if cancelled {
                tracing::debug!(request = a.id, "cancelled: client went away");
            } else if done {
                tracing::debug!(request = a.id, "finished");
            }
            if cancelled || done {
                waiting.refund(&a.request.tenant, a.request.cost().saturating_sub(a.work_done()));
                // The whole conversation so far, for the next turn of a chat to find.
                if let Some(pool) = pool.as_mut() {
                    for sample in &a.samples {
                        let all = sample.all_tokens(&a.request.prompt);
                        pool.register(&all[..sample.cache.len().min(all.len())], sample.cache.blocks());
                    }
                }
            }
            !(cancelled || done)
        });
        self.stats.running.store(self.active.iter().map(|a| a.samples.len()).sum(), Ordering::Relaxed);
        self.publish_kv();
    }

    /// A failed forward poisons the whole step; every request in it is told
    /// and dropped rather than left hanging.
    fn fail_all(&mut self, err: &Error) {
        tracing::error!(error = %err, "engine step failed");
        for active in self.active.drain(..) {
            let _ = active.events.send(Event::Failed { message: err.to_string() });
        }
    }
}

/// Scores an `echo` prompt while its prefill's logits stream past, one row
/// at a time: row `i` predicts prompt token `i + 1`. Only the scores are
/// kept, never the rows.
struct PromptScorer {
    prompt: Vec<u32>,
    top_n: usize,
    scored: Vec<(f32, Vec<(u32, f32)>)>,
}

impl PromptScorer {
    fn new(request: &GenerateRequest) -> Self {
        let top_n = request.sampling.top_logprobs.unwrap_or(0);
        Self { prompt: request.prompt.clone(), top_n, scored: Vec::with_capacity(request.prompt.len()) }
    }

    fn score(&mut self, row: &[f32]) {
        if let Some(&next) = self.prompt.get(self.scored.len() + 1) {
            self.scored.push(log_softmax_at(row, next, self.top_n));
        }
    }
}

/// The prompt's tokens with the log-probability the model gave each one
/// (`scored[i]` is token `i + 1`'s; the first token has none).
fn prompt_logprobs(
    request: &GenerateRequest,
    scored: Vec<(f32, Vec<(u32, f32)>)>,
    tokenizer: &Tokenizer,
) -> Vec<TokenLogprob> {
    let mut scored = scored.into_iter();
    request
        .prompt
        .iter()
        .enumerate()
        .map(|(i, &token)| {
            let scored = if i == 0 { None } else { scored.next() };
            TokenLogprob {
                token,
                text: tokenizer.token_str(token),
                logprob: scored.as_ref().map(|(lp, _)| *lp),
                top: scored
                    .map(|(_, top)| top.into_iter().map(|(t, lp)| (tokenizer.token_str(t), lp)).collect())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "batcher_tests.rs"]
mod tests;
