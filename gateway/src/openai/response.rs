//! Response bodies and stream chunks in OpenAI's shapes, for completions and
//! chat, built from the engine's events. Both formats share the logprob
//! conversions and the usage block.

use std::collections::BTreeMap;

use inference::engine::TokenLogprob;
use serde::Serialize;
use serde_json::{Value, json};

use super::common::LogprobsFormat;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Which endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Completion,
    Chat,
    /// The Responses API: its bodies and events are built in `openai::responses_output`; the variant names the
    /// endpoint in metrics.
    Responses,
}

/// What every body and chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// The serving checkpoint id.
    pub system_fingerprint: String,
    pub format: Format,
    pub logprobs: LogprobsFormat,
}

impl ResponseMeta {
    pub fn new(format: Format, model: &str, checkpoint: &str, logprobs: LogprobsFormat) -> Self {
        let prefix = match format {
            Format::Completion => "cmpl",
            Format::Chat => "chatcmpl",
            Format::Responses => "resp",
        };
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            id: format!("{prefix}-{:024x}", rand::random::<u128>() >> 32),
            created,
            model: model.to_string(),
            system_fingerprint: checkpoint.to_string(),
            format,
            logprobs,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.format, chunk) {
            (Format::Completion, _) => "text_completion",
            (Format::Chat, false) => "chat.completion",
            (Format::Chat, true) => "chat.completion.chunk",
            (Format::Responses, _) => "response",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> serde_json::Map<String, Value> {
        let mut body = serde_json::Map::new();
        body.insert("id".into(), json!(self.id));
        body.insert("object".into(), json!(self.object(chunk)));
        body.insert("created".into(), json!(self.created));
        body.insert("model".into(), json!(self.model));
        body.insert("system_fingerprint".into(), json!(self.system_fingerprint));
        body.insert("choices".into(), Value::Array(choices));
        body
    }

    /// A whole (non-streamed) response.
    pub fn body(&self, choices: Vec<Value>, usage: Usage) -> Value {
        let mut body = self.envelope(false, choices);
        body.insert("usage".into(), json!(usage));
        Value::Object(body)
    }

    /// A stream chunk; `usage` is `null` except on the final usage chunk.
    pub fn chunk(&self, choices: Vec<Value>, usage: Option<Usage>, include_usage: bool) -> Value {
        let mut body = self.envelope(true, choices);
        if include_usage {
            body.insert("usage".into(), json!(usage));
        }
        Value::Object(body)
    }

    /// One choice of a whole response.
    pub fn choice(&self, index: usize, text: &str, logprobs: Option<Value>, finish_reason: Option<&str>) -> Value {
        match self.format {
            Format::Completion => {
                json!({"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Format::Chat | Format::Responses => json!({
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        }
    }

    /// One choice of a stream chunk.
    pub fn delta(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        match self.format {
            Format::Completion => {
                json!({"text": text.unwrap_or(""), "index": index, "logprobs": logprobs, "finish_reason": finish})
            }
            Format::Chat | Format::Responses => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(text) = text {
                    delta.insert("content".into(), json!(text));
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// The logprobs object for `tokens`, or `None` when none were requested.
    /// `text_offset` counts characters from the start of the choice's text.
    pub fn logprobs(&self, tokens: &[TokenLogprob], text_offset: &mut usize) -> Option<Value> {
        match self.logprobs {
            LogprobsFormat::None => None,
            LogprobsFormat::Completion => Some(completion_logprobs(tokens, text_offset)),
            LogprobsFormat::Chat => Some(chat_logprobs(tokens)),
        }
    }
}

fn completion_logprobs(tokens: &[TokenLogprob], text_offset: &mut usize) -> Value {
    let mut offsets = Vec::with_capacity(tokens.len());
    for token in tokens {
        offsets.push(*text_offset);
        *text_offset += token.text.chars().count();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|t| {
                t.logprob.map(|_| t.top.iter().map(|(s, lp)| (s.clone(), *lp)).collect::<BTreeMap<String, f32>>())
            })
            .collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |text: &str, logprob: f32| json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()});
    json!({
        "content": tokens
            .iter()
            .map(|t| {
                let mut value = entry(&t.text, t.logprob.unwrap_or(0.0));
                value["top_logprobs"] = Value::Array(t.top.iter().map(|(s, lp)| entry(s, *lp)).collect());
                value
            })
            .collect::<Vec<_>>(),
        "refusal": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str, logprob: Option<f32>) -> TokenLogprob {
        TokenLogprob { token: 1, text: text.into(), logprob, top: vec![(text.into(), logprob.unwrap_or(0.0))] }
    }

    #[test]
    fn completion_logprobs_offsets_and_first_token() {
        let meta = ResponseMeta::new(Format::Completion, "m", "c", LogprobsFormat::Completion);
        let mut offset = 0;
        let value = meta.logprobs(&[token("Hé", None), token(" llo", Some(-0.5))], &mut offset).unwrap();
        assert_eq!(value["text_offset"], json!([0, 2]));
        assert_eq!(value["token_logprobs"], json!([null, -0.5]));
        assert_eq!(value["top_logprobs"][0], Value::Null);
        assert_eq!(offset, 6);
    }

    #[test]
    fn chat_chunk_shapes() {
        let meta = ResponseMeta::new(Format::Chat, "m", "ckpt", LogprobsFormat::None);
        assert!(meta.id.starts_with("chatcmpl-"));
        let chunk = meta.chunk(vec![meta.delta(0, Some(""), true, None, None)], None, false);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(chunk["system_fingerprint"], "ckpt");
        assert!(chunk.get("usage").is_none());
    }
}
