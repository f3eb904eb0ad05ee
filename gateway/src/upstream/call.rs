//! One sample of one request on the upstreams: wait for a slot, send it,
//! turn the upstream's event stream into the engine's [`Event`]s, and retry
//! on another upstream only while nothing has been streamed to the client.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inference::engine::external::QueueSlot;
use inference::engine::{Event, FinishReason, GenerateRequest};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::Pool;
use super::sse::SseReader;
use super::stats::{Outcome, Upstream};

/// How one attempt ended.
enum Attempt {
    /// Every token and the `Finished` event were sent.
    Done,
    /// The client hung up: nothing more to send.
    Cancelled,
    /// Failed before any token reached the client: another upstream may take it.
    Retryable(String),
    /// A pooled keep-alive connection the upstream had closed (llama-server closes idle ones): the request never
    /// got an answer, so it is sent again on a new connection without using up `retries`.
    Stale(String),
    /// Failed for good (the upstream refused it, or broke off mid-answer).
    Failed(String),
}

/// How often one sample is sent again after hitting a closed keep-alive connection.
const STALE_RESENDS: usize = 3;

/// Runs sample `sample` of `request` to its end, sending its events; `queued` is released once it runs.
pub async fn run_sample(
    pool: Arc<Pool>,
    request: Arc<GenerateRequest>,
    sample: usize,
    events: UnboundedSender<Event>,
    queued: Arc<Mutex<Option<QueueSlot>>>,
) {
    let mut tried: Vec<usize> = Vec::new();
    let mut stale = 0;
    loop {
        let Some(index) = pool.pick(&tried) else {
            let _ = events.send(Event::Failed { message: "no upstream is configured".into() });
            return;
        };
        tried.push(index);
        let upstream = &pool.upstreams[index];
        let permit = tokio::select! {
            permit = upstream.slots.clone().acquire_owned() => permit,
            _ = events.closed() => return,
        };
        let Ok(_permit) = permit else {
            let _ = events.send(Event::Failed { message: "the upstream pool is shutting down".into() });
            return;
        };
        // Running now: the request no longer counts against the gateway's queue.
        drop(queued.lock().unwrap_or_else(|e| e.into_inner()).take());
        match attempt(&pool, upstream, &request, sample, &events).await {
            Attempt::Done | Attempt::Cancelled => return,
            Attempt::Stale(message) if stale < STALE_RESENDS => {
                stale += 1;
                tried.pop();
                tracing::debug!(upstream = %upstream.base, error = %message, "stale upstream connection; sending again");
            }
            Attempt::Retryable(message) | Attempt::Stale(message) if tried.len() <= pool.config.retries => {
                tracing::warn!(upstream = %upstream.base, error = %message, "upstream failed before the first token; retrying");
            }
            Attempt::Retryable(message) | Attempt::Stale(message) | Attempt::Failed(message) => {
                let _ = events.send(Event::Failed { message });
                return;
            }
        }
    }
}

/// What one upstream answer has told so far.
#[derive(Default)]
struct Progress {
    /// Token chunks forwarded to the client: once non-zero, no retry.
    chunks: usize,
    reason: Option<FinishReason>,
    usage_tokens: Option<usize>,
}

async fn attempt(
    pool: &Pool,
    upstream: &Upstream,
    request: &GenerateRequest,
    sample: usize,
    events: &UnboundedSender<Event>,
) -> Attempt {
    let _in_flight = upstream.start();
    let started = Instant::now();
    let read_timeout = Duration::from_secs(pool.config.read_timeout_secs.max(1));
    let body = super::request::body(request, sample, &pool.config.model);
    let mut call = pool
        .client
        .post(format!("{}/v1/completions", upstream.base))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if !pool.config.api_key.is_empty() {
        call = call.bearer_auth(&pool.config.api_key);
    }
    let unavailable = |message: String| {
        upstream.record_outcome(Outcome::Unavailable, Some(&message));
        Attempt::Retryable(message)
    };
    let mut response = match tokio::time::timeout(read_timeout, call.send()).await {
        Err(_) => return unavailable(format!("upstream {} did not answer within {read_timeout:?}", upstream.base)),
        Ok(Err(e)) if closed_before_answer(&e) => {
            return Attempt::Stale(format!("upstream {} closed the connection: {}", upstream.base, causes(&e)));
        }
        Ok(Err(e)) => return unavailable(format!("upstream {} is unreachable: {}", upstream.base, causes(&e))),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = format!("upstream {} answered {status}: {}", upstream.base, error_message(&text));
        if status.is_server_error() || status.as_u16() == 429 {
            return unavailable(message);
        }
        upstream.record_outcome(Outcome::Rejected, Some(&message));
        return Attempt::Failed(message);
    }
    let mut reader = SseReader::default();
    let mut progress = Progress::default();
    loop {
        let chunk = tokio::select! {
            chunk = tokio::time::timeout(read_timeout, response.chunk()) => chunk,
            _ = events.closed() => {
                upstream.record_outcome(Outcome::Cancelled, None);
                return Attempt::Cancelled;
            }
        };
        let ended = matches!(chunk, Ok(Ok(None)));
        let payloads = match chunk {
            Ok(Ok(Some(bytes))) => reader.push(&bytes).map_err(|e| e.to_string()),
            Ok(Ok(None)) => Ok(reader.finish().into_iter().collect()),
            Ok(Err(e)) => Err(format!("upstream {} broke off its answer: {e}", upstream.base)),
            Err(_) => Err(format!("upstream {} sent nothing for {read_timeout:?}", upstream.base)),
        };
        let payloads = match payloads {
            Ok(payloads) => payloads,
            Err(message) => return broken(upstream, &progress, message),
        };
        for payload in payloads {
            if payload.trim() == "[DONE]" {
                return finish(upstream, &progress, sample, events);
            }
            let value: Value = match serde_json::from_str(&payload) {
                Ok(value) => value,
                Err(e) => {
                    return broken(upstream, &progress, format!("upstream {} sent invalid JSON: {e}", upstream.base));
                }
            };
            if let Some(error) = value.get("error") {
                let message = format!("upstream {} failed: {}", upstream.base, error_message(&error.to_string()));
                return broken(upstream, &progress, message);
            }
            if let Some(tokens) = value.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                progress.usage_tokens = Some(tokens as usize);
            }
            let Some(choice) = value.pointer("/choices/0") else { continue };
            if let Some(text) = choice.get("text").and_then(Value::as_str).filter(|t| !t.is_empty()) {
                if progress.chunks == 0 {
                    upstream.record_first_token(started.elapsed());
                }
                progress.chunks += 1;
                let token = Event::Token { index: sample, text: text.to_string(), token: None };
                if events.send(token).is_err() {
                    upstream.record_outcome(Outcome::Cancelled, None);
                    return Attempt::Cancelled;
                }
            }
            match choice.get("finish_reason").and_then(Value::as_str) {
                Some("length") => progress.reason = Some(FinishReason::Length),
                Some(_) => progress.reason = Some(FinishReason::Stop),
                None => {}
            }
        }
        if ended {
            // Some servers end the body without `[DONE]`: a finish reason is enough.
            if progress.reason.is_some() {
                return finish(upstream, &progress, sample, events);
            }
            return broken(
                upstream,
                &progress,
                format!("upstream {} closed its answer before it finished", upstream.base),
            );
        }
    }
}

/// Sends the sample's `Finished`. Its token count is the upstream's `usage`, else one per streamed chunk (what
/// llama-server and vLLM send per token without `usage`).
fn finish(upstream: &Upstream, progress: &Progress, sample: usize, events: &UnboundedSender<Event>) -> Attempt {
    let Some(reason) = progress.reason else {
        return broken(upstream, progress, format!("upstream {} ended without a finish reason", upstream.base));
    };
    upstream.record_outcome(Outcome::Ok, None);
    let completion_tokens = progress.usage_tokens.unwrap_or(progress.chunks);
    let _ = events.send(Event::Finished { index: sample, reason, completion_tokens, mean_logprob: 0.0 });
    Attempt::Done
}

/// A failure mid-answer: retryable while no token was forwarded, final after.
fn broken(upstream: &Upstream, progress: &Progress, message: String) -> Attempt {
    if progress.chunks == 0 {
        upstream.record_outcome(Outcome::Unavailable, Some(&message));
        Attempt::Retryable(message)
    } else {
        upstream.record_outcome(Outcome::Broken, Some(&message));
        Attempt::Failed(message)
    }
}

/// Whether the connection closed before any byte of the answer came back (hyper's "incomplete message"): what
/// reusing a keep-alive connection the server has just closed looks like.
fn closed_before_answer(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_incomplete_message) {
            return true;
        }
        source = cause.source();
    }
    false
}

/// `error` and its causes, outermost first: reqwest's own message ("error sending request") names no cause.
pub(super) fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The `error.message` of an OpenAI-style error body, else the body itself, cut short.
fn error_message(text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.get("message")))
        .and_then(Value::as_str)
        .unwrap_or(text);
    message.chars().take(300).collect()
}
