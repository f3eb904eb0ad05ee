//! `POST /v1/responses` request body: the fields the Responses API shares with
//! chat, checked once here into a conversation of plain text messages, which
//! then runs through chat's template, checks and engine request. Fields this
//! server cannot honour (tools, file and image inputs, reasoning, background
//! runs) are refused by name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chat::{ChatCompletionRequest, Content, Message};
use super::common::reject_unsupported;
use crate::error::ApiError;

/// Most `metadata` pairs, and the longest key and value (OpenAI's limits).
pub const MAX_METADATA_PAIRS: usize = 16;
pub const MAX_METADATA_KEY_CHARS: usize = 64;
pub const MAX_METADATA_VALUE_CHARS: usize = 512;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponsesRequest {
    pub model: String,
    /// A string (one user message) or a list of message items.
    pub input: Value,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "crate::openai::common::top_p")]
    pub top_p: Option<f32>,
    pub stream: Option<bool>,
    pub user: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    /// Whether the response is kept for `GET /v1/responses/{id}` and `previous_response_id` (OpenAI's default: true).
    pub store: Option<bool>,
    pub previous_response_id: Option<String>,
    /// Only `"none"` and `"auto"` (there are no tools to choose).
    pub tool_choice: Option<Value>,
    /// Accepted as a boolean: without tools there is nothing to call in parallel.
    pub parallel_tool_calls: Option<bool>,
    /// Only `{"format": {"type": "text"}}`.
    pub text: Option<Value>,
    /// Only `"disabled"`: a conversation longer than the context is refused, never cut.
    pub truncation: Option<String>,
    /// Only `"auto"` and `"default"`.
    pub service_tier: Option<String>,
    // Known OpenAI fields this server does not implement: refused by name.
    pub tools: Option<Value>,
    pub reasoning: Option<Value>,
    pub background: Option<Value>,
    pub include: Option<Value>,
    pub max_tool_calls: Option<Value>,
    pub prompt: Option<Value>,
    pub conversation: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub stream_options: Option<Value>,
    pub prompt_cache_key: Option<Value>,
    pub prompt_cache_retention: Option<Value>,
    pub safety_identifier: Option<Value>,
}

/// One message of a conversation as stored and replayed (`previous_response_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl TextMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.to_string(), content: content.into() }
    }
}

/// A request checked for what it asks of this server, before any stored history is read.
#[derive(Debug)]
pub struct ResponsesCall {
    pub model: String,
    pub instructions: Option<String>,
    /// This turn's input messages (instructions not included).
    pub input: Vec<TextMessage>,
    pub max_output_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stream: bool,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub store: bool,
    pub previous_response_id: Option<String>,
    /// `"auto"` unless the client sent `"none"`; echoed in the response.
    pub tool_choice: &'static str,
    pub parallel_tool_calls: bool,
}

impl ResponsesRequest {
    /// Refuses what cannot be honoured and reads `input` into messages.
    pub fn check(self) -> Result<ResponsesCall, ApiError> {
        reject_unsupported(&[
            ("tools", &self.tools),
            ("reasoning", &self.reasoning),
            ("background", &self.background.filter(|v| v != &Value::Bool(false))),
            ("include", &self.include),
            ("max_tool_calls", &self.max_tool_calls),
            ("prompt", &self.prompt),
            ("conversation", &self.conversation),
            ("top_logprobs", &self.top_logprobs.filter(|v| v != &Value::from(0))),
            ("stream_options", &self.stream_options),
            ("prompt_cache_key", &self.prompt_cache_key),
            ("prompt_cache_retention", &self.prompt_cache_retention),
            ("safety_identifier", &self.safety_identifier),
        ])?;
        let tool_choice = match &self.tool_choice {
            None | Some(Value::Null) => "auto",
            Some(Value::String(s)) if s == "auto" => "auto",
            Some(Value::String(s)) if s == "none" => "none",
            Some(_) => return Err(ApiError::unsupported("tool_choice")),
        };
        check_text_format(&self.text)?;
        if self.truncation.as_deref().is_some_and(|t| t != "disabled") {
            return Err(ApiError::unsupported("truncation"));
        }
        if self.service_tier.as_deref().is_some_and(|t| t != "auto" && t != "default") {
            return Err(ApiError::unsupported("service_tier"));
        }
        let max_output_tokens = match self.max_output_tokens {
            None => None,
            Some(v) if v < 1 => {
                return Err(ApiError::invalid_request(
                    Some("max_output_tokens"),
                    format!("max_output_tokens must be at least 1, got {v}"),
                ));
            }
            Some(v) => Some(v as usize),
        };
        let metadata = self.metadata.unwrap_or_default();
        check_metadata(&metadata)?;
        if let Some(id) = &self.previous_response_id {
            check_response_id(id).map_err(|e| e.with_param("previous_response_id"))?;
        }
        Ok(ResponsesCall {
            model: self.model,
            instructions: self.instructions,
            input: read_input(self.input)?,
            max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stream: self.stream.unwrap_or(false),
            user: self.user,
            metadata,
            store: self.store.unwrap_or(true),
            previous_response_id: self.previous_response_id,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls.unwrap_or(false),
        })
    }
}

impl ResponsesCall {
    /// The conversation the model reads: the instructions (as a system message), the stored conversation of
    /// `previous_response_id` (whose own instructions are not carried over, as OpenAI does), then this turn's input.
    pub fn conversation(&self, history: &[TextMessage]) -> Vec<TextMessage> {
        let mut messages = Vec::with_capacity(history.len() + self.input.len() + 1);
        if let Some(instructions) = self.instructions.as_deref().filter(|i| !i.is_empty()) {
            messages.push(TextMessage::new("system", instructions));
        }
        messages.extend(history.iter().cloned());
        messages.extend(self.input.iter().cloned());
        messages
    }

    /// The chat request that runs it: chat's checks, template and engine request.
    pub fn chat_request(&self, conversation: &[TextMessage]) -> ChatCompletionRequest {
        ChatCompletionRequest {
            model: self.model.clone(),
            messages: conversation
                .iter()
                .map(|m| Message {
                    role: m.role.clone(),
                    content: Some(Content::Text(m.content.clone())),
                    name: None,
                    tool_calls: None,
                    tool_call_id: None,
                })
                .collect(),
            max_completion_tokens: self.max_output_tokens.map(|v| v as i64),
            temperature: self.temperature,
            top_p: self.top_p,
            stream: Some(self.stream),
            user: self.user.clone(),
            ..ChatCompletionRequest::default()
        }
    }
}

/// Chat's parameter names in an error, as a Responses client knows them.
pub fn rename_chat_param(mut error: ApiError) -> ApiError {
    let renamed = match error.param.as_deref() {
        Some("max_completion_tokens" | "max_tokens") => Some("max_output_tokens".to_string()),
        Some(p) if p == "messages" || p.starts_with("messages[") => Some("input".to_string()),
        _ => None,
    };
    if renamed.is_some() {
        error.param = renamed;
        error.message =
            error.message.replace("max_completion_tokens", "max_output_tokens").replace("messages", "input");
    }
    error
}

/// Response ids this server makes: `resp_` and 32 lowercase hex digits. Anything else is unknown (404), and never
/// reaches a Redis key.
pub fn check_response_id(id: &str) -> Result<(), ApiError> {
    let hex = id.strip_prefix("resp_").unwrap_or("");
    if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("No response found with id '{}'.", truncate(id, 80))))
    }
}

fn truncate(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

fn check_text_format(text: &Option<Value>) -> Result<(), ApiError> {
    let Some(Value::Object(text)) = text else {
        return match text {
            None | Some(Value::Null) => Ok(()),
            Some(_) => Err(ApiError::invalid_request(Some("text"), "'text' must be an object.")),
        };
    };
    for (field, value) in text {
        match (field.as_str(), value) {
            ("format", Value::Object(format)) if format.get("type") == Some(&Value::from("text")) => {}
            ("format", Value::Null) => {}
            ("verbosity", Value::Null) => {}
            (field, _) => return Err(ApiError::unsupported(&format!("text.{field}"))),
        }
    }
    Ok(())
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let invalid = |message: String| Err(ApiError::invalid_request(Some("metadata"), message));
    if metadata.len() > MAX_METADATA_PAIRS {
        return invalid(format!("'metadata' may hold at most {MAX_METADATA_PAIRS} pairs, got {}.", metadata.len()));
    }
    for (key, value) in metadata {
        if key.chars().count() > MAX_METADATA_KEY_CHARS {
            return invalid(format!("metadata keys are at most {MAX_METADATA_KEY_CHARS} characters."));
        }
        if value.chars().count() > MAX_METADATA_VALUE_CHARS {
            return invalid(format!("metadata values are at most {MAX_METADATA_VALUE_CHARS} characters."));
        }
    }
    Ok(())
}

/// `input`: a string (one user message), or a list of message items `{"role", "content"}` (optionally
/// `"type": "message"`), whose content is a string or a list of `input_text` parts (`output_text` in assistant
/// items, as clients replay earlier output).
fn read_input(input: Value) -> Result<Vec<TextMessage>, ApiError> {
    let items = match input {
        Value::String(text) => return Ok(vec![TextMessage::new("user", text)]),
        Value::Array(items) if !items.is_empty() => items,
        Value::Array(_) => {
            return Err(ApiError::invalid_request(Some("input"), "'input' must contain at least one item."));
        }
        Value::Null => return Err(ApiError::invalid_request(Some("input"), "'input' is required.")),
        _ => {
            return Err(ApiError::invalid_request(
                Some("input"),
                "'input' must be a string or a list of message items.",
            ));
        }
    };
    items.into_iter().enumerate().map(|(i, item)| read_item(i, item)).collect()
}

fn read_item(i: usize, item: Value) -> Result<TextMessage, ApiError> {
    let param = |field: &str| format!("input[{i}]{field}");
    let Value::Object(mut item) = item else {
        return Err(ApiError::invalid_request(Some(&param("")), format!("input[{i}] must be a message object.")));
    };
    match item.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == "message" => {}
        Some(Value::String(kind)) => {
            return Err(ApiError::invalid_request(
                Some(&param(".type")),
                format!("Input items of type '{kind}' are not supported: this server takes messages only."),
            )
            .with_code("unsupported_parameter"));
        }
        Some(_) => return Err(ApiError::invalid_request(Some(&param(".type")), "'type' must be a string.")),
    }
    for field in item.keys() {
        if !matches!(field.as_str(), "type" | "role" | "content" | "id" | "status") {
            return Err(ApiError::invalid_request(
                Some(&param(&format!(".{field}"))),
                format!("Unknown field '{field}' in input[{i}]."),
            ));
        }
    }
    let role = match item.get("role").and_then(Value::as_str) {
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some("system" | "developer") => "system",
        Some(other) => {
            return Err(ApiError::invalid_request(
                Some(&param(".role")),
                format!(
                    "Invalid value '{}' for input[{i}].role: expected 'user', 'assistant', 'system' or 'developer'.",
                    truncate(other, 40)
                ),
            ));
        }
        None => {
            return Err(ApiError::invalid_request(Some(&param(".role")), format!("input[{i}].role is required.")));
        }
    };
    let content = match item.remove("content") {
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let part_param = param(&format!(".content[{j}]"));
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                let allowed = kind == "input_text" || (role == "assistant" && kind == "output_text");
                if !allowed {
                    let message = match kind {
                        "input_image" | "input_file" | "input_audio" => {
                            format!("Content parts of type '{kind}' are not supported: this model reads text only.")
                        }
                        "" => "Each content part needs a 'type' ('input_text').".to_string(),
                        other => format!(
                            "Content parts of type '{}' are not supported here: expected 'input_text'.",
                            truncate(other, 40)
                        ),
                    };
                    return Err(ApiError::invalid_request(Some(&format!("{part_param}.type")), message)
                        .with_code("unsupported_parameter"));
                }
                match part.get("text") {
                    Some(Value::String(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid_request(
                            Some(&format!("{part_param}.text")),
                            "A text content part needs 'text' (a string).",
                        ));
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid_request(
                Some(&param(".content")),
                format!("input[{i}].content must be a string or a list of input_text parts."),
            ));
        }
    };
    Ok(TextMessage::new(role, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(body: Value) -> Result<ResponsesCall, ApiError> {
        let request: ResponsesRequest =
            serde_json::from_value(body).map_err(|e| ApiError::invalid_request(None, e.to_string()))?;
        request.check()
    }

    fn param(body: Value) -> Option<String> {
        request(body).err().and_then(|e| e.param)
    }

    #[test]
    fn a_string_is_one_user_message_and_items_keep_their_roles() {
        let call = request(json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(call.input, vec![TextMessage::new("user", "hi")]);
        assert!(call.store, "stored by default, as OpenAI does");
        let call = request(json!({"model": "m", "instructions": "be brief", "input": [
            {"role": "developer", "content": "d"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "c", "annotations": []}], "id": "msg_1", "status": "completed"},
        ]}))
        .unwrap();
        let roles: Vec<(&str, &str)> = call.input.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(roles, [("system", "d"), ("user", "ab"), ("assistant", "c")]);
        let conversation = call.conversation(&[TextMessage::new("user", "before")]);
        assert_eq!(conversation[0], TextMessage::new("system", "be brief"));
        assert_eq!(conversation[1], TextMessage::new("user", "before"));
        assert_eq!(conversation.len(), 5);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let base = |extra: Value| {
            let mut body = json!({"model": "m", "input": "hi"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            body
        };
        assert_eq!(param(base(json!({"tools": [{"type": "web_search"}]}))).as_deref(), Some("tools"));
        assert_eq!(param(base(json!({"reasoning": {"effort": "high"}}))).as_deref(), Some("reasoning"));
        assert_eq!(param(base(json!({"background": true}))).as_deref(), Some("background"));
        assert_eq!(param(base(json!({"tool_choice": "required"}))).as_deref(), Some("tool_choice"));
        assert_eq!(param(base(json!({"text": {"format": {"type": "json_object"}}}))).as_deref(), Some("text.format"));
        assert_eq!(param(base(json!({"truncation": "auto"}))).as_deref(), Some("truncation"));
        assert_eq!(param(base(json!({"max_output_tokens": 0}))).as_deref(), Some("max_output_tokens"));
        assert!(
            request(base(json!({"tool_choice": "none", "background": false, "text": {"format": {"type": "text"}}})))
                .is_ok()
        );
        let image =
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]});
        let error = request(image).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("input[0].content[0].type"));
        assert_eq!(error.code, Some("unsupported_parameter"));
        let call = json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]});
        assert_eq!(param(call).as_deref(), Some("input[0].type"));
        assert_eq!(
            param(json!({"model": "m", "input": [{"role": "tool", "content": "x"}]})).as_deref(),
            Some("input[0].role")
        );
        assert_eq!(param(json!({"model": "m", "input": []})).as_deref(), Some("input"));
        assert_eq!(param(json!({"model": "m", "input": 3})).as_deref(), Some("input"));
    }

    #[test]
    fn ids_and_metadata_are_checked() {
        assert!(check_response_id(&format!("resp_{}", "0a".repeat(16))).is_ok());
        for bad in ["resp_", "resp_XYZ", "x:resp_00", &format!("resp_{}:", "0".repeat(32))] {
            assert_eq!(check_response_id(bad).unwrap_err().status.as_u16(), 404, "{bad}");
        }
        let long = json!({"model": "m", "input": "x", "metadata": {"k": "v".repeat(513)}});
        assert_eq!(param(long).as_deref(), Some("metadata"));
        let many: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(param(json!({"model": "m", "input": "x", "metadata": many})).as_deref(), Some("metadata"));
    }

    #[test]
    fn chat_parameter_names_become_responses_names() {
        let error = rename_chat_param(ApiError::invalid_request(Some("messages[2].role"), "bad messages"));
        assert_eq!(error.param.as_deref(), Some("input"));
        let error = rename_chat_param(ApiError::invalid_request(Some("max_completion_tokens"), "too many"));
        assert_eq!(error.param.as_deref(), Some("max_output_tokens"));
    }
}
