//! `POST /v1/chat/completions` request body: `messages` validation and the
//! model's chat template, then the same engine request as completions.

use inference::engine::{Engine, GenerateRequest};
use inference::tokenizer::ChatMessage;
use serde::Deserialize;
use serde_json::Value;

use super::common::{
    LogprobsFormat, PreparedRequest, RankBy, SamplingFields, Stop, StreamOptions, check_count, check_max_tokens,
    check_model, check_prompt_bytes, check_stream_options, reject_unsupported, validate_all,
};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    // Assistant tool calls are not supported; refused if present.
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

impl Message {
    /// Bytes of the message's text (all text parts), without copying it.
    pub fn text_bytes(&self) -> usize {
        match &self.content {
            Some(Content::Text(text)) => text.len(),
            Some(Content::Parts(parts)) => parts.iter().filter_map(|p| p.text.as_deref()).map(str::len).sum(),
            None => 0,
        }
    }

    /// The message's text, text parts joined (for logging).
    pub fn text(&self) -> String {
        match &self.content {
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
            None => String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<Value>,
    pub input_audio: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "crate::openai::common::top_p")]
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    // Known OpenAI fields this server does not implement: refused by name.
    pub logit_bias: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    pub modalities: Option<Value>,
    pub audio: Option<Value>,
    pub prediction: Option<Value>,
}

/// Template text a message may add around its content, in tokens, for the estimate below.
const TEMPLATE_TOKENS_PER_MESSAGE: usize = 64;

impl ChatCompletionRequest {
    /// The checks that need no tokenizer or template: model, message count, text
    /// bytes, stop sequences, counts. Returns an estimate of the tokens the request
    /// will be charged, so it can be rate limited before its messages are rendered
    /// and tokenized (the charge is settled with the real usage when it ends).
    /// `max_completion_tokens`, else `max_tokens` (OpenAI's older name); each must be at least 1 when
    /// sent, even the one that loses, so a request is never half valid.
    fn explicit_max_tokens(&self) -> Result<Option<usize>, ApiError> {
        let at_least_one = |value: Option<i64>, param: &'static str| match check_max_tokens(value, param)? {
            Some(0) => Err(ApiError::invalid_request(Some(param), format!("{param} must be at least 1."))),
            other => Ok(other),
        };
        let completion = at_least_one(self.max_completion_tokens, "max_completion_tokens")?;
        let legacy = at_least_one(self.max_tokens, "max_tokens")?;
        Ok(completion.or(legacy))
    }

    pub fn precheck(&self, engine: &Engine, max_prompt_bytes: usize) -> Result<u64, ApiError> {
        check_model(engine, &self.model)?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid_request(Some("messages"), "'messages' must contain at least one message."));
        }
        let bytes: usize = self.messages.iter().map(Message::text_bytes).sum();
        check_prompt_bytes(bytes, max_prompt_bytes, "messages")?;
        Stop::check(&self.stop)?;
        let n = check_count(self.n, "n", 1)?;
        let explicit_max = self.explicit_max_tokens()?;
        let max_positions = engine.info().max_positions;
        let prompt =
            bytes.saturating_add(self.messages.len().saturating_mul(TEMPLATE_TOKENS_PER_MESSAGE)).min(max_positions);
        // Without max_tokens a sample may fill the context: prompt + its rest, n times, is at most the context n times.
        let estimate = match explicit_max {
            Some(max) => prompt.saturating_add(max.saturating_mul(n)),
            None => max_positions.saturating_mul(n),
        };
        Ok(estimate as u64)
    }

    pub fn prepare(self, engine: &Engine) -> Result<PreparedRequest, ApiError> {
        check_model(engine, &self.model)?;
        reject_unsupported(&[
            ("logit_bias", &self.logit_bias),
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
            ("response_format", &self.response_format),
            ("parallel_tool_calls", &self.parallel_tool_calls),
            ("modalities", &self.modalities),
            ("audio", &self.audio),
            ("prediction", &self.prediction),
        ])?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = check_stream_options(stream, &self.stream_options)?;
        let explicit_max = self.explicit_max_tokens()?;
        let messages = to_chat_messages(self.messages)?;
        let top_logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::invalid_request(
                    Some("top_logprobs"),
                    "top_logprobs requires logprobs to be true.",
                ));
            }
            (true, None) => Some(0),
            (true, Some(k @ 0..=5)) => Some(k as usize),
            (true, Some(k)) => {
                return Err(ApiError::invalid_request(
                    Some("top_logprobs"),
                    format!("top_logprobs must be between 0 and 5, got {k}"),
                ));
            }
        };
        let n = check_count(self.n, "n", 1)?;

        let stop = Stop::into_shared(self.stop)?;

        let tokenizer = engine.tokenizer();
        let rendered = tokenizer.apply_chat_template(&messages, true)?;
        let prompt = tokenizer.encode(&rendered, false)?;
        // OpenAI's default is "as much as the context allows".
        let max_tokens = explicit_max.unwrap_or_else(|| engine.info().max_positions.saturating_sub(prompt.len()));
        let request = GenerateRequest {
            // The caller's tenant is set once the key is known (`charge_to`).
            tenant: Default::default(),
            prompt,
            max_tokens,
            n,
            best_of: None,
            sampling: SamplingFields {
                temperature: self.temperature,
                top_p: self.top_p,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                seed: self.seed,
                top_logprobs,
            }
            .into_params(),
            stop,
            echo: false,
            include_special_text: false,
            ignore_eos: false,
        };
        let requests = vec![request];
        validate_all(engine, &requests, stream).map_err(rename_prompt_param)?;
        Ok(PreparedRequest {
            requests,
            prompt_texts: vec![rendered],
            policy_text: messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
            n,
            stream,
            include_usage,
            logprobs: if top_logprobs.is_some() { LogprobsFormat::Chat } else { LogprobsFormat::None },
            echo: false,
            rank_by: RankBy::MeanLogprob,
            user: self.user,
        })
    }
}

/// The engine calls the rendered conversation `prompt`; chat clients know it as `messages`.
fn rename_prompt_param(mut error: ApiError) -> ApiError {
    if error.param.as_deref() == Some("prompt") {
        error.param = Some("messages".into());
    }
    error
}

pub fn to_chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_request(Some("messages"), "'messages' must contain at least one message."));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" | "function" => {
                return Err(ApiError::invalid_request(
                    Some(&format!("messages[{i}].role")),
                    format!("Role '{}' is not supported: this server has no tool calling.", message.role),
                ));
            }
            other => {
                return Err(ApiError::invalid_request(
                    Some(&format!("messages[{i}].role")),
                    format!(
                        "Invalid value '{other}' for messages[{i}].role: expected 'system', 'developer', 'user' or \
                         'assistant'."
                    ),
                ));
            }
        };
        if message.tool_calls.as_ref().is_some_and(|v| !v.is_null()) || message.tool_call_id.is_some() {
            return Err(ApiError::unsupported(&format!("messages[{i}].tool_calls")));
        }
        let content = match message.content {
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        ("text", None) => {
                            return Err(ApiError::invalid_request(
                                Some(&format!("messages[{i}].content[{j}].text")),
                                "A text content part needs 'text'.",
                            ));
                        }
                        (kind, _) => {
                            return Err(ApiError::invalid_request(
                                Some(&format!("messages[{i}].content[{j}].type")),
                                format!(
                                    "Content parts of type '{kind}' are not supported: this model reads text only."
                                ),
                            ));
                        }
                    }
                }
                text
            }
            None if role == "assistant" => String::new(),
            None => {
                return Err(ApiError::invalid_request(
                    Some(&format!("messages[{i}].content")),
                    format!("messages[{i}].content is required for role '{role}'."),
                ));
            }
        };
        let _ = message.name;
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

impl super::GenerationBody for ChatCompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }

    fn precheck(&self, engine: &Engine, max_prompt_bytes: usize) -> Result<u64, ApiError> {
        ChatCompletionRequest::precheck(self, engine, max_prompt_bytes)
    }

    fn prepare(self, engine: &Engine) -> Result<PreparedRequest, ApiError> {
        ChatCompletionRequest::prepare(self, engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: Some(Content::Text(content.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    #[test]
    fn roles_are_checked_and_developer_is_system() {
        let ok = to_chat_messages(vec![message("developer", "be brief"), message("user", "hi")]).unwrap();
        assert_eq!(ok[0].role, "system");
        let bad = to_chat_messages(vec![message("user", "hi"), message("wizard", "x")]).unwrap_err();
        assert_eq!(bad.param.as_deref(), Some("messages[1].role"));
        assert_eq!(to_chat_messages(vec![]).unwrap_err().param.as_deref(), Some("messages"));
    }

    #[test]
    fn text_parts_join_and_images_are_refused() {
        let parts: Vec<Message> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]))
        .unwrap();
        assert_eq!(to_chat_messages(parts).unwrap()[0].content, "ab");
        let image: Vec<Message> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]))
        .unwrap();
        assert_eq!(to_chat_messages(image).unwrap_err().param.as_deref(), Some("messages[0].content[0].type"));
    }
}
