//! The continuous-batching loop: the one thread that owns the model.
//!
//! Each iteration (a "step") admits waiting requests under a prompt-token
//! budget, then runs a single [`Llama::forward_batch`] over every new prompt
//! (prefill) and every running sample's last token (decode), then samples.
//! Requests join and leave the running batch between steps; nothing waits for
//! the batch to drain. The `n` (or `best_of`) samples of one prompt share one
//! prefill and fork its cache. A request whose receiver is gone is cancelled
//! at the next step and its caches freed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

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
}

pub(crate) struct Batcher {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    jobs: mpsc::Receiver<Job>,
    /// A job taken from the channel that did not fit this step.
    deferred: VecDeque<Job>,
    active: Vec<Active>,
}

impl Batcher {
    pub fn new(
        model: Llama,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        stats: Arc<EngineStats>,
        jobs: mpsc::Receiver<Job>,
    ) -> Self {
        let mut eos = tokenizer.eos_token_ids().to_vec();
        eos.extend(model.config().eos_token_ids());
        eos.sort_unstable();
        eos.dedup();
        Self { model, tokenizer, eos, config, stats, jobs, deferred: VecDeque::new(), active: Vec::new() }
    }

    /// Runs until every handle to the engine is gone and all work is done:
    /// requests in flight during a hot swap finish here, on this model.
    pub fn run(mut self) {
        loop {
            if self.active.is_empty() && self.deferred.is_empty() {
                match self.jobs.blocking_recv() {
                    Some(job) => self.deferred.push_back(job),
                    None => break,
                }
            }
            self.admit();
            if let Err(err) = self.step() {
                self.fail_all(&err);
            }
            self.retire();
        }
        tracing::info!("engine stopped: no handles left and no work in flight");
    }

    fn running_samples(&self) -> usize {
        self.active.iter().map(|a| a.samples.len().max(a.request.samples())).sum()
    }

    /// Moves waiting jobs into the batch while the prompt-token budget and
    /// the running-sample cap allow. One oversized prompt may always enter an
    /// otherwise prefill-free step, so it cannot starve.
    fn admit(&mut self) {
        let mut budget = self.config.max_batch_tokens;
        let mut admitted = 0;
        loop {
            let job = match self.deferred.pop_front() {
                Some(job) => job,
                None => match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            if job.events.is_closed() {
                continue;
            }
            let prompt_len = job.request.prompt.len();
            let fits_budget = prompt_len <= budget || admitted == 0;
            let fits_running =
                self.running_samples() + job.request.samples() <= self.config.max_running || self.active.is_empty();
            if !fits_budget || !fits_running {
                self.deferred.push_front(job);
                break;
            }
            budget = budget.saturating_sub(prompt_len);
            admitted += 1;
            let capacity = prompt_len + job.request.max_tokens;
            tracing::debug!(
                request = job.id,
                prompt_tokens = prompt_len,
                samples = job.request.samples(),
                queued_ms = job.enqueued.elapsed().as_millis() as u64,
                "admitted"
            );
            self.active.push(Active {
                id: job.id,
                prefill: Some(self.model.new_cache(capacity)),
                request: Arc::new(job.request),
                events: job.events,
                samples: Vec::new(),
                cancelled: false,
            });
        }
        self.stats.queue_depth.store(self.deferred.len() + self.jobs.len(), Ordering::Relaxed);
    }

    /// One forward over all prefills and decodes, then sampling.
    fn step(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut chunks = Vec::new();
        // (active index, None = prefill | Some(sample index))
        let mut owners: Vec<(usize, Option<usize>)> = Vec::new();
        for (ai, active) in self.active.iter_mut().enumerate() {
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

    /// Drops finished and cancelled requests, freeing their caches.
    fn retire(&mut self) {
        self.active.retain(|a| {
            let done = a.prefill.is_none() && a.samples.iter().all(|s| s.finished);
            if a.cancelled || a.events.is_closed() {
                tracing::debug!(request = a.id, "cancelled: client went away");
                return false;
            }
            if done {
                tracing::debug!(request = a.id, "finished");
            }
            !done
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
