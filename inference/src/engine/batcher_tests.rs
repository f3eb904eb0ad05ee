//! The batcher driven step by step on a tiny model: pausing the running
//! batch between layers for a newly arrived tenant (`preempt_between_layers`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{DType, Device};
use tokio::sync::mpsc;

use super::{Batcher, Job, Pass};
use crate::engine::queue_account::QueueAccount;
use crate::engine::request::{Event, GenerateRequest, Tenant};
use crate::engine::{EngineConfig, EngineStats};
use crate::load::LoadedModel;
use crate::tiny_model::{TinySpec, init_tiny};

/// What a request's events said, bit for bit: per event, the sample, the
/// token and its log-probability's bits (`u32::MAX` for a finish).
type Transcript = Vec<(usize, u32, u32)>;

struct Harness {
    batcher: Batcher,
    jobs: mpsc::UnboundedSender<Job>,
    next_id: u64,
}

impl Harness {
    fn new(dir: &Path, preempt_between_layers: bool) -> Self {
        if !dir.join("config.json").exists() {
            let spec = TinySpec { num_hidden_layers: 4, tie_word_embeddings: false, seed: 7, ..Default::default() };
            init_tiny(dir, &spec).unwrap();
        }
        let loaded = LoadedModel::load(dir, DType::F32, &Device::Cpu).unwrap();
        let config = EngineConfig { max_running: 8, preempt_between_layers, ..Default::default() };
        let account = Arc::new(QueueAccount::new(config.queue_capacity, None));
        let (jobs, rx) = mpsc::unbounded_channel();
        let batcher = Batcher::new(
            loaded.model,
            Arc::new(loaded.tokenizer),
            config,
            Arc::new(EngineStats::default()),
            account,
            rx,
        );
        Self { batcher, jobs, next_id: 0 }
    }

    /// Sends a greedy request of `tenant` to the batcher's channel.
    fn send(&mut self, tenant: &str, prompt: Vec<u32>, max_tokens: usize, n: usize) -> mpsc::UnboundedReceiver<Event> {
        let mut request = GenerateRequest::new(prompt, max_tokens);
        request.tenant = Tenant::new(tenant, 1);
        request.n = n;
        request.ignore_eos = true;
        request.sampling.temperature = 0.0;
        request.sampling.top_logprobs = Some(2);
        self.batcher.account.reserve(std::slice::from_ref(&request)).unwrap();
        let (events, rx) = mpsc::unbounded_channel();
        self.next_id += 1;
        let job = Job {
            id: self.next_id,
            request,
            events,
            enqueued: Instant::now(),
            queued_steps: Arc::new(AtomicU64::new(0)),
        };
        self.jobs.send(job).unwrap();
        rx
    }

    /// One iteration of [`Batcher::run`], with `arrive` called between the
    /// admission and the full batch's step (as if a request came in while
    /// that step was starting).
    fn iterate(&mut self, arrive: impl FnOnce(&mut Self)) {
        self.batcher.admit();
        if self.batcher.active.iter().any(|a| a.first_of_tenant) {
            self.batcher.step(Pass::FirstOfTenant).unwrap();
        }
        arrive(self);
        self.batcher.step(Pass::All).unwrap();
        self.batcher.retire();
    }

    fn idle(&self) -> bool {
        self.batcher.active.is_empty() && self.batcher.waiting.is_empty()
    }

    fn stats(&self) -> &EngineStats {
        &self.batcher.stats
    }
}

/// Every event received so far.
fn transcript(rx: &mut mpsc::UnboundedReceiver<Event>) -> Transcript {
    let mut out = Vec::new();
    while let Ok(event) = rx.try_recv() {
        match event {
            Event::Token { index, token: Some(t), .. } => {
                out.push((index, t.token, t.logprob.map_or(0, f32::to_bits)));
            }
            Event::Finished { index, .. } => out.push((index, u32::MAX, u32::MAX)),
            Event::Failed { message } => panic!("the engine failed: {message}"),
            _ => {}
        }
    }
    out
}

/// A flood of 3 requests (n = 2, 12 tokens) from one tenant decoding; a
/// victim's 4-token request arrives as a full-batch step starts. Returns
/// the flood's and the victim's transcripts, what the victim had received
/// when that step returned, and the preemptions counted.
fn flood_and_victim(dir: &Path, preempt: bool) -> (Vec<Transcript>, Transcript, Transcript, u64) {
    let mut h = Harness::new(dir, preempt);
    let mut flood: Vec<_> = (0..3).map(|i| h.send("org:flood", vec![3, 4, 5 + i, 6], 12, 2)).collect();
    // Prefill, then two decode steps: the flood is decoding.
    for _ in 0..3 {
        h.iterate(|_| {});
    }
    let steps_before = h.stats().steps.load(Ordering::Relaxed);
    let mut victim = None;
    h.iterate(|h| victim = Some(h.send("org:victim", vec![9, 10, 11, 12, 13], 4, 1)));
    let mut victim = victim.unwrap();
    let during = transcript(&mut victim);
    let steps = h.stats().steps.load(Ordering::Relaxed) - steps_before;
    if preempt {
        assert_eq!(steps, 2, "the victim's prefill and the flood's step");
    }
    let mut victim_all = during.clone();
    while !h.idle() {
        h.iterate(|_| {});
    }
    victim_all.extend(transcript(&mut victim));
    let flood = flood.iter_mut().map(transcript).collect();
    (flood, victim_all, during, h.stats().layer_preemptions.load(Ordering::Relaxed))
}

#[test]
fn a_new_tenant_gets_its_first_token_inside_the_running_step_and_nothing_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let (flood_on, victim_on, during_on, preemptions_on) = flood_and_victim(tmp.path(), true);
    let (flood_off, victim_off, during_off, preemptions_off) = flood_and_victim(tmp.path(), false);

    // (b) With preemption the victim's first token comes out of the very step
    // call that decodes the flood, which paused for it once; without, it
    // waits for the next step boundary.
    assert_eq!(preemptions_on, 1);
    assert_eq!(preemptions_off, 0);
    assert_eq!(during_on.first().map(|&(index, ..)| index), Some(0), "no first token mid-step: {during_on:?}");
    assert!(during_off.is_empty(), "without preemption the victim waits for the boundary: {during_off:?}");

    // (a) Bit-identical tokens and log-probabilities for the paused batch and the victim.
    assert_eq!(victim_on.iter().filter(|e| e.1 != u32::MAX).count(), 4);
    assert_eq!(victim_on, victim_off);
    assert_eq!(flood_on, flood_off);
    for transcript in &flood_on {
        assert_eq!(transcript.iter().filter(|e| e.1 != u32::MAX).count(), 24, "two samples of 12 tokens");
    }
}

#[test]
fn a_busy_tenant_does_not_pause_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Harness::new(tmp.path(), true);
    let _flood = h.send("org:flood", vec![3, 4, 5, 6], 12, 2);
    h.iterate(|_| {});
    h.iterate(|_| {});
    // More from the tenant already running: it waits for the step boundary.
    let mut more = None;
    h.iterate(|h| more = Some(h.send("org:flood", vec![7, 8], 4, 1)));
    assert!(transcript(&mut more.unwrap()).is_empty());
    assert_eq!(h.stats().layer_preemptions.load(Ordering::Relaxed), 0);
}
