//! One sample being generated: its cache, sampler, detokenizer and stop matcher.
//!
//! The engine loop owns a list of these; after each forward it hands every
//! sequence its logits row and gets back the events to send.

use crate::engine::request::{Event, FinishReason, GenerateRequest, TokenLogprob};
use crate::error::Result;
use crate::llama::SequenceCache;
use crate::sampling::{SampledToken, Sampler, TokenHistory};
use crate::stop::StopMatcher;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

pub(crate) struct Sequence {
    /// Which sample of its request this is (the choice index before best_of).
    pub index: usize,
    pub cache: SequenceCache,
    /// Tokens not yet in `cache`, fed to the model in the next step: the
    /// last sampled token, or (after a preemption dropped the cache) the
    /// prompt and every generated token.
    pub pending: Vec<u32>,
    /// Every token sampled so far, in order.
    pub tokens: Vec<u32>,
    pub finished: bool,
    sampler: Sampler,
    history: TokenHistory,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    generated: usize,
    logprob_sum: f32,
    max_tokens: usize,
    want_logprobs: bool,
    ignore_eos: bool,
}

/// What the engine needs from the model and tokenizer to turn logits into events.
pub(crate) struct Vocabulary<'a> {
    pub tokenizer: &'a Tokenizer,
    pub eos: &'a [u32],
    pub max_positions: usize,
}

impl Sequence {
    /// A sample whose cache holds the prompt (`pending` empty), or part of
    /// it (`pending` the rest).
    pub fn new(index: usize, request: &GenerateRequest, cache: SequenceCache, pending: Vec<u32>) -> Self {
        Self {
            index,
            cache,
            pending,
            tokens: Vec::new(),
            finished: false,
            sampler: Sampler::new(&request.sampling, index as u64),
            history: TokenHistory::default(),
            decoder: IncrementalDecoder::new(!request.include_special_text),
            stop: StopMatcher::new(request.stop.clone()),
            generated: 0,
            logprob_sum: 0.0,
            max_tokens: request.max_tokens,
            want_logprobs: request.sampling.top_logprobs.is_some(),
            ignore_eos: request.ignore_eos,
        }
    }

    /// Tokens sampled so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Samples the next token from `logits` and returns the events it causes.
    pub fn advance(&mut self, logits: &[f32], vocab: &Vocabulary<'_>, events: &mut Vec<Event>) -> Result<()> {
        if self.max_tokens == 0 {
            return self.finish(FinishReason::Length, vocab, events);
        }
        let sampled = self.sampler.sample(logits, &self.history)?;
        if !self.ignore_eos && vocab.eos.contains(&sampled.token) {
            return self.finish(FinishReason::Stop, vocab, events);
        }
        self.history.push(sampled.token);
        self.tokens.push(sampled.token);
        self.generated += 1;
        self.logprob_sum += sampled.logprob;
        let piece = self.decoder.push(vocab.tokenizer, sampled.token)?;
        let step = self.stop.push(&piece);
        let token = self.want_logprobs.then(|| token_logprob(vocab.tokenizer, &sampled));
        events.push(Event::Token { index: self.index, text: step.emit, token });
        if step.stopped {
            self.finished = true;
            events.push(self.finished_event(FinishReason::Stop));
        } else if self.generated >= self.max_tokens || self.cache.len() >= vocab.max_positions {
            self.finish(FinishReason::Length, vocab, events)?;
        } else {
            self.pending.push(sampled.token);
        }
        Ok(())
    }

    /// Ends the sample at its current length: it alone outgrew the KV pool.
    pub fn finish_at_capacity(&mut self, vocab: &Vocabulary<'_>, events: &mut Vec<Event>) -> Result<()> {
        self.finish(FinishReason::Length, vocab, events)
    }

    /// The prompt and every sampled token: what the cache holds once `pending` is computed.
    pub fn all_tokens(&self, prompt: &[u32]) -> Vec<u32> {
        let mut all = Vec::with_capacity(prompt.len() + self.tokens.len());
        all.extend_from_slice(prompt);
        all.extend_from_slice(&self.tokens);
        all
    }

    /// Releases held-back text (it was not a stop sequence after all) and ends.
    fn finish(&mut self, reason: FinishReason, vocab: &Vocabulary<'_>, events: &mut Vec<Event>) -> Result<()> {
        let rest = self.decoder.flush(vocab.tokenizer)?;
        let step = self.stop.push(&rest);
        let mut tail = step.emit;
        let reason = if step.stopped {
            FinishReason::Stop
        } else {
            tail.push_str(&self.stop.finish());
            reason
        };
        if !tail.is_empty() {
            events.push(Event::Token { index: self.index, text: tail, token: None });
        }
        self.finished = true;
        events.push(self.finished_event(reason));
        Ok(())
    }

    fn finished_event(&self, reason: FinishReason) -> Event {
        let mean_logprob = if self.generated == 0 { 0.0 } else { self.logprob_sum / self.generated as f32 };
        Event::Finished { index: self.index, reason, completion_tokens: self.generated, mean_logprob }
    }
}

pub(crate) fn token_logprob(tokenizer: &Tokenizer, sampled: &SampledToken) -> TokenLogprob {
    TokenLogprob {
        token: sampled.token,
        text: tokenizer.token_str(sampled.token),
        logprob: Some(sampled.logprob),
        top: sampled.top.iter().map(|&(t, lp)| (tokenizer.token_str(t), lp)).collect(),
    }
}
