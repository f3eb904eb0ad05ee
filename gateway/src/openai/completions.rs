//! `POST /v1/completions` request body and its conversion into engine requests.

use inference::engine::{Engine, GenerateRequest};
use serde::Deserialize;
use serde_json::Value;

use super::common::{
    LogprobsFormat, PreparedRequest, RankBy, SamplingFields, Stop, StreamOptions, check_count, check_max_tokens,
    check_model, check_prompt_bytes, check_stream_options, reject_unsupported, validate_all,
};
use crate::error::ApiError;

/// OpenAI's default `max_tokens` for completions.
pub const DEFAULT_MAX_TOKENS: usize = 16;
/// The most prompts one call may carry.
pub const MAX_PROMPTS: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "crate::openai::common::top_p")]
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    /// instructd's own: how `best_of` ranks its samples.
    pub rank_by: Option<RankBy>,
    // Known OpenAI fields this server does not implement: refused by name.
    pub suffix: Option<Value>,
    pub logit_bias: Option<Value>,
}

impl CompletionRequest {
    /// The checks that need no tokenizer: model, prompt count, prompt bytes, stop
    /// sequences, counts. Returns an upper bound of the tokens the request will be
    /// charged (a text prompt has at most one token per byte, and none beyond the
    /// context), so it can be rate limited before its prompts are tokenized.
    pub fn precheck(&self, engine: &Engine, max_prompt_bytes: usize) -> Result<u64, ApiError> {
        check_model(engine, &self.model)?;
        let max_positions = engine.info().max_positions;
        let (lengths, text_bytes): (Vec<usize>, usize) = match &self.prompt {
            None => return Err(ApiError::invalid_request(Some("prompt"), "You must provide a prompt.")),
            Some(Prompt::Text(text)) => (vec![text.len()], text.len()),
            Some(Prompt::Texts(texts)) => {
                (texts.iter().map(String::len).collect(), texts.iter().map(String::len).sum())
            }
            Some(Prompt::Tokens(tokens)) => (vec![tokens.len()], 0),
            Some(Prompt::TokenLists(lists)) => (lists.iter().map(Vec::len).collect(), 0),
        };
        check_prompt_count(lengths.len())?;
        check_prompt_bytes(text_bytes, max_prompt_bytes, "prompt")?;
        Stop::check(&self.stop)?;
        let max_tokens = check_max_tokens(self.max_tokens, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS);
        let n = check_count(self.n, "n", 1)?;
        let best_of = self.best_of.map(|b| check_count(Some(b), "best_of", 1)).transpose()?;
        let samples = best_of.unwrap_or(n).max(n);
        let per_prompt = max_tokens.saturating_mul(samples);
        Ok(lengths.iter().map(|&len| len.min(max_positions).saturating_add(per_prompt) as u64).sum())
    }

    pub fn prepare(self, engine: &Engine) -> Result<PreparedRequest, ApiError> {
        check_model(engine, &self.model)?;
        reject_unsupported(&[("suffix", &self.suffix), ("logit_bias", &self.logit_bias)])?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = check_stream_options(stream, &self.stream_options)?;
        let top_logprobs = match self.logprobs {
            None => None,
            Some(k @ 0..=5) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid_request(
                    Some("logprobs"),
                    format!("logprobs must be between 0 and 5, got {k}"),
                ));
            }
        };
        let echo = self.echo.unwrap_or(false);
        let max_tokens = check_max_tokens(self.max_tokens, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS);
        let n = check_count(self.n, "n", 1)?;
        let best_of = self.best_of.map(|b| check_count(Some(b), "best_of", 1)).transpose()?;
        let sampling = SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            top_logprobs,
        }
        .into_params();
        let stop = Stop::into_shared(self.stop)?;

        let tokenizer = engine.tokenizer();
        let encode = |text: &str| tokenizer.encode(text, false).map_err(ApiError::from);
        let (prompts, texts): (Vec<Vec<u32>>, Vec<String>) = match self.prompt {
            None => return Err(ApiError::invalid_request(Some("prompt"), "You must provide a prompt.")),
            Some(Prompt::Text(text)) => (vec![encode(&text)?], vec![text]),
            Some(Prompt::Texts(texts)) => (texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?, texts),
            Some(Prompt::Tokens(tokens)) => {
                let text = decode(engine, &tokens);
                (vec![tokens], vec![text])
            }
            Some(Prompt::TokenLists(lists)) => {
                let texts = lists.iter().map(|t| decode(engine, t)).collect();
                (lists, texts)
            }
        };
        check_prompt_count(prompts.len())?;
        let requests: Vec<GenerateRequest> = prompts
            .into_iter()
            .map(|prompt| GenerateRequest {
                // The caller's tenant is set once the key is known (`charge_to`).
                tenant: Default::default(),
                prompt,
                max_tokens,
                n,
                best_of,
                sampling: sampling.clone(),
                stop: stop.clone(),
                echo,
                include_special_text: false,
                ignore_eos: false,
            })
            .collect();
        validate_all(engine, &requests, stream)?;
        Ok(PreparedRequest {
            requests,
            policy_text: texts.join("\n"),
            prompt_texts: texts,
            n,
            stream,
            include_usage,
            logprobs: if top_logprobs.is_some() { LogprobsFormat::Completion } else { LogprobsFormat::None },
            echo,
            rank_by: self.rank_by.unwrap_or_default(),
            user: self.user,
        })
    }
}

fn check_prompt_count(count: usize) -> Result<(), ApiError> {
    if count == 0 {
        return Err(ApiError::invalid_request(Some("prompt"), "The prompt list is empty."));
    }
    if count > MAX_PROMPTS {
        return Err(ApiError::invalid_request(
            Some("prompt"),
            format!("At most {MAX_PROMPTS} prompts per request, got {count}."),
        ));
    }
    Ok(())
}

/// Token prompts are validated by the engine; an id outside the vocabulary
/// decodes to nothing here and is refused there with its own message.
fn decode(engine: &Engine, tokens: &[u32]) -> String {
    engine.tokenizer().decode(tokens, false).unwrap_or_default()
}

impl super::GenerationBody for CompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }

    fn precheck(&self, engine: &Engine, max_prompt_bytes: usize) -> Result<u64, ApiError> {
        CompletionRequest::precheck(self, engine, max_prompt_bytes)
    }

    fn prepare(self, engine: &Engine) -> Result<PreparedRequest, ApiError> {
        CompletionRequest::prepare(self, engine)
    }
}
