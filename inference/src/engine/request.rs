//! A generation request as the engine takes it, and what it sends back.
//!
//! Validation happens once, in [`GenerateRequest::validate`], against the
//! model it will run on; the engine loop then trusts the request. The
//! gateway maps each `InvalidRequest` error's `param` onto OpenAI's `param`.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::stop::validate_stops;

/// Upper bounds a deployment sets on a single request (`[engine.limits]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestLimits {
    pub max_n: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_n: 16, max_best_of: 20, max_stop_sequences: 4 }
    }
}

/// Whom a request's work is charged to when the engine shares its queue
/// fairly (`[engine] fair_sharing`): the gateway names the caller's
/// organisation and its weight. The default, an unnamed tenant of weight 1,
/// is for in-process callers (the trainer, benchmarks) and has no queue cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Arc<str>,
    /// Share of the engine relative to other waiting tenants (0 counts as 1).
    pub weight: u32,
}

impl Tenant {
    pub fn new(id: impl Into<Arc<str>>, weight: u32) -> Self {
        Self { id: id.into(), weight }
    }

    /// In-process callers' tenant: not capped, since it is not a client.
    pub fn is_unnamed(&self) -> bool {
        self.id.is_empty()
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self { id: Arc::from(""), weight: 1 }
    }
}

/// The prompt, already tokenized at the edge.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Whose work this is, for fair sharing of the engine.
    pub tenant: Tenant,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Choices returned.
    pub n: usize,
    /// Samples generated server-side; the `n` with the highest mean token
    /// log-probability are returned. `None` means `n`.
    pub best_of: Option<usize>,
    pub sampling: SamplingParams,
    /// Shared, not copied, by every prompt and sample of a request.
    pub stop: std::sync::Arc<[String]>,
    /// Also return the prompt's tokens (and their log-probabilities when
    /// `sampling.top_logprobs` is set).
    pub echo: bool,
    /// Keep emitting special tokens' text (false, as OpenAI's endpoints do).
    pub include_special_text: bool,
    /// Keep generating past end-of-sequence tokens (benchmarks need fixed lengths).
    pub ignore_eos: bool,
}

impl GenerateRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            tenant: Tenant::default(),
            prompt,
            max_tokens,
            n: 1,
            best_of: None,
            sampling: SamplingParams::default(),
            stop: std::sync::Arc::from([]),
            echo: false,
            include_special_text: false,
            ignore_eos: false,
        }
    }

    pub fn samples(&self) -> usize {
        self.best_of.unwrap_or(self.n).max(self.n)
    }

    /// The work this request may ask of the engine, in tokens: its prompt
    /// (prefilled once) and `max_tokens` for every sample. Fair sharing
    /// charges this at admission and refunds what was not generated.
    pub fn cost(&self) -> u64 {
        let samples = self.samples() as u64;
        (self.prompt.len() as u64).saturating_add(samples.saturating_mul(self.max_tokens as u64))
    }

    /// Checks every field against the model (context length, vocabulary) and
    /// the deployment's limits. `streaming` forbids `best_of > n`, since the
    /// winners are only known at the end.
    pub fn validate(
        &self,
        vocab_size: usize,
        max_positions: usize,
        limits: &RequestLimits,
        streaming: bool,
    ) -> Result<()> {
        if self.prompt.is_empty() {
            return Err(Error::invalid("prompt", "the prompt is empty"));
        }
        if let Some(&bad) = self.prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        if self.max_tokens == 0 && !self.echo {
            return Err(Error::invalid("max_tokens", "max_tokens must be at least 1 (0 is allowed only with echo)"));
        }
        let requested = self.prompt.len().saturating_add(self.max_tokens);
        if requested > max_positions {
            return Err(Error::invalid(
                if self.prompt.len() >= max_positions { "prompt" } else { "max_tokens" },
                format!(
                    "This model's maximum context length is {max_positions} tokens, however you requested \
                     {requested} tokens ({} in your prompt; {} for the completion). Please reduce your prompt; \
                     or completion length.",
                    self.prompt.len(),
                    self.max_tokens
                ),
            ));
        }
        if self.n == 0 || self.n > limits.max_n {
            return Err(Error::invalid("n", format!("n must be between 1 and {}, got {}", limits.max_n, self.n)));
        }
        if let Some(best_of) = self.best_of {
            if best_of < self.n || best_of > limits.max_best_of {
                return Err(Error::invalid(
                    "best_of",
                    format!("best_of must be between n ({}) and {}, got {best_of}", self.n, limits.max_best_of),
                ));
            }
            if streaming && best_of > self.n {
                return Err(Error::invalid("best_of", "best_of greater than n cannot be streamed"));
            }
        }
        self.sampling.validate()?;
        if self.stop.len() > limits.max_stop_sequences {
            return Err(Error::invalid("stop", format!("at most {} stop sequences", limits.max_stop_sequences)));
        }
        validate_stops(&self.stop)?;
        Ok(())
    }
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token's text as the tokenizer decodes it alone.
    pub text: String,
    /// `None` for the first prompt token, which has no context.
    pub logprob: Option<f32>,
    pub top: Vec<(String, f32)>,
}

/// What the engine streams back for one request.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's tokens, sent once first when `echo` is set.
    Prompt { tokens: Vec<TokenLogprob> },
    /// New text of sample `index`. `text` may be empty while a possible stop
    /// sequence is held back; `token` is `None` for that held-back text's
    /// release at the end.
    Token { index: usize, text: String, token: Option<TokenLogprob> },
    /// Sample `index` ended.
    Finished { index: usize, reason: FinishReason, completion_tokens: usize, mean_logprob: f32 },
    /// The engine failed while running this request; nothing more follows.
    Failed { message: String },
}
