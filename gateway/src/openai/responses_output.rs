//! What `POST /v1/responses` answers, in OpenAI's shapes: the `response`
//! object (one assistant message with one `output_text` part) and its event
//! stream: `response.created`, `response.in_progress`,
//! `response.output_item.added`, `response.content_part.added`, one
//! `response.output_text.delta` per piece of text, then the matching `.done`
//! events and `response.completed` (or `response.incomplete` when
//! `max_output_tokens` cut it), each with its `sequence_number`. A failure
//! mid-stream is an `error` event, and the stream ends.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use inference::engine::{Event, FinishReason, Generation};
use serde_json::{Value, json};

use super::responses::ResponsesCall;
use crate::error::ApiError;
use crate::generation::{OnFinish, StreamAccounting};
use crate::openai::response::{Format, Usage};

/// What every body and event of one response repeats.
#[derive(Debug, Clone)]
pub struct ResponseShell {
    pub id: String,
    pub message_id: String,
    pub created_at: u64,
    pub model: String,
    instructions: Option<String>,
    max_output_tokens: Option<usize>,
    temperature: f32,
    top_p: f32,
    store: bool,
    previous_response_id: Option<String>,
    metadata: BTreeMap<String, String>,
    user: Option<String>,
    tool_choice: &'static str,
    parallel_tool_calls: bool,
}

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    /// `max_output_tokens` (or the context) was reached.
    Incomplete,
}

impl Ending {
    pub fn of(reason: Option<FinishReason>) -> Self {
        match reason {
            Some(FinishReason::Length) => Ending::Incomplete,
            _ => Ending::Completed,
        }
    }

    fn status(self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::Incomplete => "incomplete",
        }
    }
}

fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl ResponseShell {
    pub fn new(call: &ResponsesCall, model: &str) -> Self {
        let created_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            id: format!("resp_{}", random_hex()),
            message_id: format!("msg_{}", random_hex()),
            created_at,
            model: model.to_string(),
            instructions: call.instructions.clone(),
            max_output_tokens: call.max_output_tokens,
            temperature: call.temperature.unwrap_or(1.0),
            top_p: call.top_p.unwrap_or(1.0),
            store: call.store,
            previous_response_id: call.previous_response_id.clone(),
            metadata: call.metadata.clone(),
            user: call.user.clone(),
            tool_choice: call.tool_choice,
            parallel_tool_calls: call.parallel_tool_calls,
        }
    }

    /// The `response` object. `usage` is `null` until it has ended.
    pub fn object(&self, status: &str, output: Vec<Value>, usage: Option<Usage>) -> Value {
        let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": null, "summary": null},
            "service_tier": "default",
            "store": self.store,
            "temperature": self.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": self.tool_choice,
            "tools": [],
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage.map(usage_object),
            "user": self.user,
            "metadata": self.metadata,
        })
    }

    /// The whole response once generation ended.
    pub fn finished(&self, text: &str, ending: Ending, usage: Usage) -> Value {
        self.object(ending.status(), vec![self.message(ending.status(), Some(text))], Some(usage))
    }

    /// The assistant message item; `text` `None` while it has no content part yet.
    fn message(&self, status: &str, text: Option<&str>) -> Value {
        json!({
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": text.map(|t| vec![part(t)]).unwrap_or_default(),
        })
    }
}

fn part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn usage_object(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    })
}

/// Called once with the finished response object and its text when a stream ends normally (to store it).
pub type OnComplete = Box<dyn FnOnce(Value, String) + Send>;

/// The event stream of one response running as `generation`.
pub fn stream(
    engine: std::sync::Arc<inference::engine::Engine>,
    generation: Generation,
    shell: ResponseShell,
    prompt_tokens: usize,
    on_finish: OnFinish,
    on_complete: Option<OnComplete>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut state = StreamState {
        _engine: engine,
        generation,
        shell,
        sequence: 0,
        text: String::new(),
        accounting: StreamAccounting::new(Format::Responses, prompt_tokens, on_finish),
        pending: std::collections::VecDeque::new(),
        on_complete,
        done: false,
    };
    state.open();
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        let event = state.next_event().await?;
        Some((Ok(event), state))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

struct StreamState {
    /// Keeps the engine this request started on alive across a swap.
    _engine: std::sync::Arc<inference::engine::Engine>,
    generation: Generation,
    shell: ResponseShell,
    sequence: u64,
    text: String,
    accounting: StreamAccounting,
    pending: std::collections::VecDeque<SseEvent>,
    on_complete: Option<OnComplete>,
    done: bool,
}

impl StreamState {
    /// Queues an event of `kind` with `fields` and the next sequence number.
    fn push(&mut self, kind: &str, mut fields: Value) {
        if let Some(object) = fields.as_object_mut() {
            object.insert("type".into(), json!(kind));
            object.insert("sequence_number".into(), json!(self.sequence));
        }
        self.sequence += 1;
        self.pending.push_back(SseEvent::default().event(kind).data(fields.to_string()));
    }

    fn item_fields(&self) -> Value {
        json!({"item_id": self.shell.message_id, "output_index": 0, "content_index": 0})
    }

    fn with(mut base: Value, extra: Value) -> Value {
        if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
            base.extend(extra);
        }
        base
    }

    fn open(&mut self) {
        let created = self.shell.object("in_progress", Vec::new(), None);
        self.push("response.created", json!({"response": created}));
        self.push("response.in_progress", json!({"response": created}));
        let item = self.shell.message("in_progress", None);
        self.push("response.output_item.added", json!({"output_index": 0, "item": item}));
        let fields = Self::with(self.item_fields(), json!({"part": part("")}));
        self.push("response.content_part.added", fields);
    }

    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            let Some(event) = self.generation.next().await else {
                self.fail(ApiError::unavailable("The model stopped while generating. Retry the request."));
                continue;
            };
            match event {
                Event::Prompt { .. } => {}
                Event::Token { text, .. } => {
                    self.accounting.token();
                    if text.is_empty() {
                        continue;
                    }
                    self.text.push_str(&text);
                    let fields = Self::with(self.item_fields(), json!({"delta": text, "logprobs": []}));
                    self.push("response.output_text.delta", fields);
                }
                Event::Finished { reason, completion_tokens, .. } => {
                    self.accounting.add_completion_tokens(completion_tokens);
                    self.close(Ending::of(Some(reason)));
                }
                Event::Failed { message } => {
                    self.fail(ApiError::internal(format!("The server had an error while generating: {message}")));
                }
            }
        }
    }

    /// The `.done` events and the final `response.completed` / `response.incomplete`.
    fn close(&mut self, ending: Ending) {
        let text = std::mem::take(&mut self.text);
        let fields = Self::with(self.item_fields(), json!({"text": text, "logprobs": []}));
        self.push("response.output_text.done", fields);
        let fields = Self::with(self.item_fields(), json!({"part": part(&text)}));
        self.push("response.content_part.done", fields);
        let item = self.shell.message(ending.status(), Some(&text));
        self.push("response.output_item.done", json!({"output_index": 0, "item": item}));
        let response = self.shell.finished(&text, ending, self.accounting.usage());
        let kind = match ending {
            Ending::Completed => "response.completed",
            Ending::Incomplete => "response.incomplete",
        };
        self.push(kind, json!({"response": response}));
        if let Some(on_complete) = self.on_complete.take() {
            on_complete(response, text);
        }
        self.finish();
    }

    /// Ends the stream with an `error` event.
    fn fail(&mut self, error: ApiError) {
        let fields = json!({"code": error.code, "message": error.message, "param": error.param});
        self.push("error", fields);
        self.finish();
    }

    fn finish(&mut self) {
        self.done = true;
        self.accounting.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::responses::ResponsesRequest;

    fn shell() -> ResponseShell {
        let request: ResponsesRequest =
            serde_json::from_value(json!({"model": "m", "input": "hi", "metadata": {"k": "v"}})).unwrap();
        ResponseShell::new(&request.check().unwrap(), "m")
    }

    #[test]
    fn a_finished_response_has_openai_shape() {
        let shell = shell();
        assert!(shell.id.starts_with("resp_") && shell.id.len() == 37);
        crate::openai::responses::check_response_id(&shell.id).unwrap();
        let body = shell.finished("Hello", Ending::Completed, Usage::new(3, 2));
        assert_eq!(body["object"], "response");
        assert_eq!(body["status"], "completed");
        assert_eq!(
            body["output"][0]["content"][0],
            json!({"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []})
        );
        assert_eq!(body["usage"]["total_tokens"], 5);
        assert_eq!(body["metadata"], json!({"k": "v"}));
        let cut = shell.finished("He", Ending::of(Some(FinishReason::Length)), Usage::new(3, 1));
        assert_eq!(cut["status"], "incomplete");
        assert_eq!(cut["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(cut["output"][0]["status"], "incomplete");
    }
}
