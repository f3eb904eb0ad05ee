//! Fields and rules shared by completions and chat: `stop`, stream options,
//! sampling fields, refusing unsupported fields, and the prepared request
//! both routes hand to the generation runner.

use inference::engine::{Engine, GenerateRequest, Tenant};
use inference::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// Checks the stop sequences without taking them (before tokenization).
    pub fn check(stop: &Option<Stop>) -> Result<(), ApiError> {
        let stops = match stop {
            None => return Ok(()),
            Some(Stop::One(s)) => std::slice::from_ref(s),
            Some(Stop::Many(v)) => v.as_slice(),
        };
        inference::stop::validate_stops(stops)?;
        Ok(())
    }

    /// The request's stop sequences, checked (count, none empty, each at most
    /// [`MAX_STOP_BYTES`](inference::stop::MAX_STOP_BYTES); 400 naming `stop`)
    /// and shared by every prompt and sample of the request.
    pub fn into_shared(stop: Option<Stop>) -> Result<std::sync::Arc<[String]>, ApiError> {
        let stops = match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        inference::stop::validate_stops(&stops)?;
        Ok(stops.into())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields of a request body, before validation.
#[derive(Debug, Default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub top_logprobs: Option<usize>,
}

impl SamplingFields {
    /// OpenAI's defaults for absent fields; ranges are checked by the engine's validation.
    pub fn into_params(self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            // Negative seeds are valid in OpenAI's API; any fixed mapping keeps them reproducible.
            seed: self.seed.map(|s| s as u64),
            top_logprobs: self.top_logprobs,
        }
    }
}

/// Reads `top_p`, whose range excludes 0: a positive value too small for f32 (`1e-60`) would
/// round to 0 and be refused, so it becomes the smallest positive f32, which samples alike.
pub fn top_p<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<f32>, D::Error> {
    let value = Option::<f64>::deserialize(deserializer)?;
    Ok(value.map(|p| if p > 0.0 { (p as f32).max(f32::MIN_POSITIVE) } else { p as f32 }))
}

/// Refuses fields we parse but do not implement, naming the first one set.
/// `null`, `{}` and `[]` count as not set, as clients send them for defaults.
pub fn reject_unsupported(fields: &[(&str, &Option<Value>)]) -> Result<(), ApiError> {
    for (name, value) in fields {
        let set = match value {
            None | Some(Value::Null) => false,
            Some(Value::Object(map)) => !map.is_empty(),
            Some(Value::Array(items)) => !items.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(ApiError::unsupported(name));
        }
    }
    Ok(())
}

pub fn check_stream_options(stream: bool, options: &Option<StreamOptions>) -> Result<bool, ApiError> {
    match options {
        Some(_) if !stream => Err(ApiError::invalid_request(
            Some("stream_options"),
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        )),
        Some(options) => Ok(options.include_usage),
        None => Ok(false),
    }
}

/// How `best_of` picks the `n` choices it returns (`rank_by`, instructd's own
/// field on completions): OpenAI's highest mean token log-probability, or
/// the serving reward model's highest score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankBy {
    #[default]
    MeanLogprob,
    Reward,
}

/// How the response reports log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    /// Completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.
    Completion,
    /// Chat: `content: [{token, logprob, bytes, top_logprobs}]`.
    Chat,
}

/// A validated request, ready for admission and the engine.
pub struct PreparedRequest {
    /// One engine request per prompt (a completions call may carry several).
    pub requests: Vec<GenerateRequest>,
    /// Text for each prompt, for `echo`.
    pub prompt_texts: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: LogprobsFormat,
    pub echo: bool,
    /// How `best_of` selects among the samples.
    pub rank_by: RankBy,
    /// What the use-case classifier reads.
    pub policy_text: String,
    pub user: Option<String>,
}

impl PreparedRequest {
    /// Tokens charged against the key's tokens/min up front: prompt plus the
    /// most the request may generate.
    pub fn charged_tokens(&self) -> u64 {
        self.requests.iter().map(|r| (r.prompt.len() + r.max_tokens * r.samples()) as u64).sum()
    }

    pub fn prompt_tokens(&self) -> usize {
        self.requests.iter().map(|r| r.prompt.len()).sum()
    }

    /// Charges every engine request to `tenant`, for the engine's fair sharing.
    pub fn charge_to(&mut self, tenant: &Tenant) {
        for request in &mut self.requests {
            request.tenant = tenant.clone();
        }
    }
}

/// Validates each request against the engine it will run on.
pub fn validate_all(engine: &Engine, requests: &[GenerateRequest], stream: bool) -> Result<(), ApiError> {
    let info = engine.info();
    for request in requests {
        request.validate(info.vocab_size, info.max_positions, engine.limits(), stream)?;
    }
    Ok(())
}

/// `model` names the engine's model, alone or pinned to the engine's checkpoint (`name@checkpoint`).
pub fn check_model(engine: &Engine, model: &str) -> Result<(), ApiError> {
    let info = engine.info();
    match model.split_once('@') {
        None if model == info.name => Ok(()),
        Some((name, checkpoint)) if name == info.name && checkpoint == info.checkpoint => Ok(()),
        _ => Err(ApiError::model_not_found(model)),
    }
}

/// The engine a request runs on: the one serving its pinned checkpoint (`model: "<name>@<checkpoint id>"`), or
/// the serving / canary pick for a plain model name. Pinning the serving checkpoint is open to every caller;
/// pinning any other (the canary, a verified candidate) needs the `pin_checkpoints` scope (403 otherwise, checked
/// before anything about that checkpoint is revealed). A pin to a checkpoint this gateway has not loaded is a 404.
pub fn engine_for(
    state: &crate::state::AppState,
    caller: &crate::auth::Caller,
    model: &str,
) -> Result<std::sync::Arc<Engine>, ApiError> {
    let Some((_, checkpoint)) = model.split_once('@') else { return Ok(state.engine.pick()) };
    let serving = state.engine.current();
    if serving.info().checkpoint == checkpoint {
        return Ok(serving);
    }
    if !caller.key().has_scope(crate::keys::Scope::PinCheckpoints) {
        crate::metrics::record_rejection("scope");
        return Err(ApiError::forbidden(
            "insufficient_scope",
            format!(
                "Pinning checkpoint '{checkpoint}', which is not the serving checkpoint, needs the 'pin_checkpoints' \
                 scope, which an operator grants (POST /admin/keys). Pin the serving checkpoint or name the model alone."
            ),
        )
        .with_param("model"));
    }
    state.rollout.pinned(&state.engine, checkpoint).ok_or_else(|| {
        let mut error = ApiError::model_not_found(model);
        error.message = format!(
            "The checkpoint '{checkpoint}' is not loaded on this gateway: the serving checkpoint, the canary and \
             verified candidates can be pinned (GET /admin/checkpoints lists them)."
        );
        error
    })
}

/// Refuses a request carrying more than `max_bytes` of prompt text (400 naming `param`), before any tokenization.
pub fn check_prompt_bytes(bytes: usize, max_bytes: usize, param: &str) -> Result<(), ApiError> {
    if bytes > max_bytes {
        return Err(ApiError::invalid_request(
            Some(param),
            format!("The prompt text is {bytes} bytes; at most {max_bytes} bytes are accepted per request."),
        )
        .with_code("string_above_max_length"));
    }
    Ok(())
}

pub fn check_max_tokens(max_tokens: Option<i64>, param: &'static str) -> Result<Option<usize>, ApiError> {
    match max_tokens {
        None => Ok(None),
        Some(v) if v < 0 => {
            Err(ApiError::invalid_request(Some(param), format!("{param} must be non-negative, got {v}")))
        }
        Some(v) => Ok(Some(v as usize)),
    }
}

pub fn check_count(value: Option<i64>, param: &'static str, default: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v < 1 => Err(ApiError::invalid_request(Some(param), format!("{param} must be at least 1, got {v}"))),
        Some(v) => Ok(v as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_positive_top_p_stays_positive() {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default, deserialize_with = "top_p")]
            top_p: Option<f32>,
        }
        let parse = |json: &str| serde_json::from_str::<Body>(json).map(|b| b.top_p).ok().flatten();
        assert_eq!(parse(r#"{"top_p": 7.4e-117}"#), Some(f32::MIN_POSITIVE));
        assert_eq!(parse(r#"{"top_p": 0}"#), Some(0.0));
        assert_eq!(parse(r#"{"top_p": 0.5}"#), Some(0.5));
        assert_eq!(parse(r#"{"top_p": null}"#), None);
    }

    #[test]
    fn stop_sequences_are_capped_in_length_and_shared() {
        let long = Stop::into_shared(Some(Stop::Many(vec!["ok".into(), "x".repeat(257)])));
        let error = long.err().map(|e| (e.status.as_u16(), e.param));
        assert_eq!(error, Some((400, Some("stop".to_string()))));
        let fine = Stop::into_shared(Some(Stop::One("x".repeat(256)))).unwrap_or_else(|e| panic!("{}", e.message));
        let shared = fine.clone();
        assert!(std::ptr::eq(fine.as_ptr(), shared.as_ptr()), "clones share one allocation");
    }
}
