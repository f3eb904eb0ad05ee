//! The continuous-batching loop: the one thread that owns the model.
//!
//! Each iteration (a "step") admits waiting requests under a prompt-token
//! budget, in the fair queue's order (weighted fair over tenants, or first
//! come, first served), then runs a single [`Llama::forward_batch`] over every new prompt
//! (prefill) and every running sample's last token (decode), then samples.
//! Requests join and leave the running batch between steps; nothing waits for
//! the batch to drain. The `n` (or `best_of`) samples of one prompt share one
//! prefill and fork its cache. A request whose receiver is gone is cancelled
//! at the next step and its caches freed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::fair_queue::FairQueue;
use crate::engine::queue_account::QueueAccount;
use crate::engine::request::{Event, GenerateRequest, TokenLogprob};
use crate::engine::sequence::{Sequence, Vocabulary};
use crate::engine::{EngineConfig, EngineStats};
use crate::error::{Error, Result};
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
}

impl Active {
    /// Tokens of work done so far: the prompt once prefilled, and every
    /// sample's generated tokens.
    fn work_done(&self) -> u64 {
        let prompt = if self.prefill.is_none() { self.request.prompt.len() } else { 0 };
        (prompt + self.samples.iter().map(Sequence::generated).sum::<usize>()) as u64
    }
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
        Self { model, tokenizer, eos, config, stats, account, jobs, waiting, active: Vec::new() }
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
        while let Ok(job) = self.jobs.try_recv() {
            self.enqueue(job);
        }
        for waiting in self.waiting.remove_unless(|w| !w.job.events.is_closed()) {
            self.account.release(&waiting.job.request);
        }
        let mut budget = self.config.max_batch_tokens;
        let mut admitted = 0;
        while let Some(Waiting { job, .. }) = self.waiting.peek() {
            let prompt_len = job.request.prompt.len();
            let fits_budget = prompt_len <= budget || admitted == 0;
            let fits_running = self.running_samples() + job.request.samples()
                <= self.config.max_running + self.headroom_for(&job.request)
                || self.active.is_empty();
            if !fits_budget || !fits_running {
                break;
            }
            let Some(Waiting { job, since_step }) = self.waiting.pop() else { break };
            self.account.release(&job.request);
            let queued_steps = self.stats.steps.load(Ordering::Relaxed) - since_step;
            job.queued_steps.store(queued_steps, Ordering::Relaxed);
            budget = budget.saturating_sub(prompt_len);
            admitted += 1;
            let capacity = prompt_len + job.request.max_tokens;
            // A tenant with nothing in the batch, joining one busy decoding
            // others' work: its prompt gets a forward of its own (below).
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
            self.active.push(Active {
                id: job.id,
                prefill: Some(self.model.new_cache(capacity)),
                request: Arc::new(job.request),
                events: job.events,
                samples: Vec::new(),
                cancelled: false,
                first_of_tenant,
            });
        }
        self.stats.queue_depth.store(self.account.depth(), Ordering::Relaxed);
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

    /// One forward over all prefills and decodes (or only the prefills of
    /// tenants new to the batch), then sampling.
    fn step(&mut self, pass: Pass) -> Result<()> {
        let started = Instant::now();
        let mut chunks = Vec::new();
        // (active index, None = prefill | Some(sample index))
        let mut owners: Vec<(usize, Option<usize>)> = Vec::new();
        for (ai, active) in self.active.iter_mut().enumerate() {
            if pass == Pass::FirstOfTenant && !std::mem::take(&mut active.first_of_tenant) {
                continue;
            }
            let want_prompt_logprobs = active.request.echo && active.request.sampling.top_logprobs.is_some();
            if let Some(cache) = active.prefill.as_mut() {
                chunks.push(BatchChunk { tokens: &active.request.prompt, cache, all_logits: want_prompt_logprobs });
                owners.push((ai, None));
            }
            for (si, sample) in active.samples.iter_mut().enumerate() {
                if sample.finished {
                    continue;
                }
                chunks.push(BatchChunk {
                    tokens: std::slice::from_ref(&sample.next_input),
                    cache: &mut sample.cache,
                    all_logits: false,
                });
                owners.push((ai, Some(si)));
            }
        }
        if chunks.is_empty() {
            return Ok(());
        }
        let batch = chunks.len();
        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let logits = self.model.forward_batch(&mut chunks)?;
        drop(chunks);
        let forward_us = started.elapsed().as_micros() as u64;
        let vocab =
            Vocabulary { tokenizer: &self.tokenizer, eos: &self.eos, max_positions: self.model.max_positions() };
        let mut events = Vec::new();
        for ((ai, sample), logits) in owners.into_iter().zip(logits) {
            let active = &mut self.active[ai];
            let rows = logits.to_vec2::<f32>()?;
            let Some(last) = rows.last() else { continue };
            match sample {
                None => {
                    let Some(prefilled) = active.prefill.take() else { continue };
                    if active.request.echo {
                        events.push(Event::Prompt { tokens: prompt_logprobs(&active.request, &rows, &self.tokenizer) });
                    }
                    let samples = active.request.samples();
                    let capacity = active.request.prompt.len() + active.request.max_tokens;
                    let mut caches = Vec::with_capacity(samples);
                    for _ in 1..samples {
                        caches.push(prefilled.fork(capacity)?);
                    }
                    caches.push(prefilled);
                    for (index, cache) in caches.into_iter().enumerate() {
                        let mut seq = Sequence::new(index, &active.request, cache);
                        seq.advance(last, &vocab, &mut events)?;
                        active.samples.push(seq);
                    }
                }
                Some(si) => active.samples[si].advance(last, &vocab, &mut events)?,
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
            }
            !(cancelled || done)
        });
        self.stats.running.store(self.active.iter().map(|a| a.samples.len()).sum(), Ordering::Relaxed);
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

/// The prompt's tokens with the log-probability the model gave each one
/// (row `i` of the prefill logits predicts token `i + 1`).
fn prompt_logprobs(request: &GenerateRequest, rows: &[Vec<f32>], tokenizer: &Tokenizer) -> Vec<TokenLogprob> {
    let top_n = request.sampling.top_logprobs;
    request
        .prompt
        .iter()
        .enumerate()
        .map(|(i, &token)| {
            let scored = match (top_n, i.checked_sub(1).and_then(|r| rows.get(r))) {
                (Some(k), Some(row)) => Some(log_softmax_at(row, token, k)),
                _ => None,
            };
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
