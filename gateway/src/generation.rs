//! Runs a prepared request on the engine and shapes the answer: one JSON
//! body, or a Server-Sent Events stream ending in `data: [DONE]`.
//!
//! A completions call may carry several prompts; each becomes its own engine
//! request, and choice `i` of prompt `p` is reported at index `p * n + i`, as
//! OpenAI does. All requests are submitted at once before the response
//! starts, so a full engine queue (503) or a key's full share of it (429) is
//! a clean error rather than a broken stream. Every request is charged to the
//! key's tenant, its organisation, for the engine's fair sharing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use inference::engine::{Completion, Engine, Event, Generation};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::admission::{Ticket, admit, insert_headers};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::metrics as m;
use crate::openai::common::PreparedRequest;
use crate::openai::response::{Format, ResponseMeta, Usage};
use crate::rate_limit::RateLimitHeaders;
use crate::reward_ranking::RewardRanker;
use crate::state::AppState;

/// A generation request past every check (shape, rate limit, tokenization, use-case policy), charged to the
/// key's tenant: what is left is running it and shaping the answer. `engine` is the one the request was validated
/// on; it serves the request to the end even if a new one is swapped in.
pub struct Admitted {
    pub engine: Arc<Engine>,
    pub prepared: PreparedRequest,
    pub ticket: Ticket,
}

impl Admitted {
    /// The `on_finish` that settles the key's token charge with the request's real usage, and the rate-limit
    /// headers to send.
    pub fn settle(self) -> (Arc<Engine>, PreparedRequest, OnFinish, RateLimitHeaders) {
        let Admitted { engine, prepared, ticket } = self;
        let headers = ticket.admission.headers().clone();
        let admission = ticket.admission;
        let on_finish: OnFinish = Box::new(move |usage: Usage| {
            tokio::spawn(admission.finish(usage.total_tokens as u64));
        });
        (engine, prepared, on_finish, headers)
    }
}

/// The checks of a generation route after authentication: the cheap ones, then the rate limit, and only then
/// tokenization (a limited key cannot burn CPU on huge prompts) and the use-case policy; a request refused after
/// admission gets its token charge back.
pub async fn admit_body<B: crate::openai::GenerationBody>(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: B,
) -> Result<Admitted, ApiError> {
    let engine = crate::openai::common::engine_for(state, caller, body.model())?;
    let estimate = body.precheck(&engine, state.config.max_prompt_bytes)?;
    let admission = crate::admission::rate_limit_early(state, caller, estimate).await?;
    let mut prepared = match body.prepare(&engine) {
        Ok(prepared) => prepared,
        Err(error) => {
            crate::admission::refund(admission).await;
            return Err(error);
        }
    };
    let ticket = admit(state, caller, headers, &prepared, admission).await?;
    prepared.charge_to(&caller.key().tenant());
    tracing::info!(
        use_case = ticket.classification.use_case.as_str(),
        prompts = prepared.requests.len(),
        prompt_tokens = prepared.prompt_tokens(),
        stream = prepared.stream,
        "admitted"
    );
    Ok(Admitted { engine, prepared, ticket })
}

/// The whole of a completions or chat route after authentication: [`admit_body`], then the answer, streamed or
/// whole, with the key's rate-limit headers.
pub async fn generate<B: crate::openai::GenerationBody>(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: B,
    format: Format,
) -> Result<Response, ApiError> {
    let (engine, prepared, on_finish, limit_headers) = admit_body(state, caller, headers, body).await?.settle();
    let ranker = match RewardRanker::for_request(state.rollout.reward_models(), &prepared) {
        Ok(ranker) => ranker,
        Err(e) => {
            on_finish(Usage::default());
            return Err(e);
        }
    };
    let info = engine.info();
    let meta = ResponseMeta::new(format, &info.name, &info.checkpoint, prepared.logprobs);
    let mut response = if prepared.stream {
        stream(engine, prepared, meta, on_finish)?.into_response()
    } else {
        Json(complete(&engine, prepared, meta, on_finish, ranker).await?).into_response()
    };
    insert_headers(response.headers_mut(), &limit_headers);
    Ok(response)
}

/// Called once with the request's real usage when it ends (normally or not).
pub type OnFinish = Box<dyn FnOnce(Usage) + Send>;

/// What every streamed generation settles however it ends (finished, failed, or the client hung up): its
/// metrics (time to first token, duration, usage) and the key's token charge (`on_finish`, exactly once).
pub struct StreamAccounting {
    format: Format,
    usage: Usage,
    started: Instant,
    first_token: Option<Instant>,
    on_finish: Option<OnFinish>,
}

impl StreamAccounting {
    pub fn new(format: Format, prompt_tokens: usize, on_finish: OnFinish) -> Self {
        Self {
            format,
            usage: Usage::new(prompt_tokens, 0),
            started: Instant::now(),
            first_token: None,
            on_finish: Some(on_finish),
        }
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// A token arrived: the first one records the time to first token.
    pub fn token(&mut self) {
        if self.first_token.is_none() {
            let now = Instant::now();
            self.first_token = Some(now);
            m::record_time_to_first_token(self.format, now - self.started);
        }
    }

    /// A sequence finished with `completion_tokens`.
    pub fn add_completion_tokens(&mut self, completion_tokens: usize) {
        self.usage = Usage::new(self.usage.prompt_tokens, self.usage.completion_tokens + completion_tokens);
    }

    /// Records the generation's metrics and settles the charge (if not settled yet).
    pub fn finish(&mut self) {
        let ttft = self.first_token.map(|t| t - self.started);
        m::record_generation(self.format, self.usage, self.started.elapsed(), ttft);
        if let Some(on_finish) = self.on_finish.take() {
            on_finish(self.usage);
        }
    }
}

impl Drop for StreamAccounting {
    /// A client that hangs up still settles its rate-limit charge.
    fn drop(&mut self) {
        if let Some(on_finish) = self.on_finish.take() {
            on_finish(self.usage);
        }
    }
}

/// Generates every choice and returns the whole body; `best_of` keeps the
/// samples with the highest mean log-probability, or the highest reward with
/// a `ranker`.
pub async fn complete(
    engine: &Engine,
    prepared: PreparedRequest,
    meta: ResponseMeta,
    on_finish: OnFinish,
    ranker: Option<RewardRanker<'_>>,
) -> Result<Value, ApiError> {
    let started = Instant::now();
    let collected = match &ranker {
        Some(ranker) => match submit(engine, &prepared) {
            Ok(generations) => ranker.collect(generations, &prepared).await,
            Err(e) => Err(e),
        },
        None => collect_all(engine, &prepared).await,
    };
    let completions = match collected {
        Ok(completions) => completions,
        Err(e) => {
            on_finish(Usage::new(prepared.prompt_tokens(), 0));
            return Err(e);
        }
    };
    let mut choices = Vec::new();
    let completion_tokens = completions.iter().map(|c| c.completion_tokens).sum();
    let usage = Usage::new(prepared.prompt_tokens(), completion_tokens);
    for (p, completion) in completions.into_iter().enumerate() {
        for choice in completion.choices {
            let mut offset = 0;
            let mut text = String::new();
            let mut tokens = Vec::new();
            if prepared.echo {
                text.push_str(&prepared.prompt_texts[p]);
                tokens.extend(completion.prompt.iter().flatten().cloned());
            }
            text.push_str(&choice.text);
            tokens.extend(choice.tokens);
            let logprobs = meta.logprobs(&tokens, &mut offset);
            let reason = choice.finish_reason.map(|r| r.as_str());
            choices.push(meta.choice(p * prepared.n + choice.index, &text, logprobs, reason));
        }
    }
    m::record_generation(meta.format, usage, started.elapsed(), None);
    on_finish(usage);
    Ok(meta.body(choices, usage))
}

/// Starts generation and returns the event stream.
pub fn stream(
    engine: Arc<Engine>,
    prepared: PreparedRequest,
    meta: ResponseMeta,
    on_finish: OnFinish,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let generations = match submit(&engine, &prepared) {
        Ok(generations) => generations,
        Err(e) => {
            on_finish(Usage::default());
            return Err(e);
        }
    };
    let samples: usize = prepared.requests.iter().map(|r| r.samples()).sum();
    let prompt_tokens = prepared.prompt_tokens();
    let (sender, receiver) = mpsc::channel::<(usize, Event)>(64);
    for (p, generation) in generations.into_iter().enumerate() {
        tokio::spawn(forward(p, generation, sender.clone()));
    }
    drop(sender);
    let state = StreamState {
        _engine: engine,
        receiver,
        accounting: StreamAccounting::new(meta.format, prompt_tokens, on_finish),
        meta,
        n: prepared.n,
        echo_texts: prepared.prompt_texts,
        include_usage: prepared.include_usage,
        offsets: vec![0; samples],
        opened: vec![false; samples],
        remaining: samples,
        pending: std::collections::VecDeque::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        let event = state.next_event().await?;
        Some((Ok(event), state))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Runs every request of `prepared` to the end.
pub async fn collect_all(engine: &Engine, prepared: &PreparedRequest) -> Result<Vec<Completion>, ApiError> {
    let generations = submit(engine, prepared)?;
    let completions = futures_util::future::join_all(generations.into_iter().map(|g| g.collect())).await;
    completions.into_iter().map(|c| c.map_err(ApiError::from)).collect()
}

pub fn submit(engine: &Engine, prepared: &PreparedRequest) -> Result<Vec<Generation>, ApiError> {
    // All prompts are queued, or none (a full queue, the tenant's share).
    engine.submit_all(prepared.requests.clone(), prepared.stream).map_err(ApiError::from)
}

/// Moves one generation's events into the shared channel; stops (and so
/// cancels the generation) when the client has gone.
async fn forward(prompt: usize, mut generation: Generation, sender: mpsc::Sender<(usize, Event)>) {
    while let Some(event) = generation.next().await {
        if sender.send((prompt, event)).await.is_err() {
            return;
        }
    }
}

struct StreamState {
    /// Keeps the engine this request started on alive across a swap.
    _engine: Arc<Engine>,
    receiver: mpsc::Receiver<(usize, Event)>,
    meta: ResponseMeta,
    n: usize,
    echo_texts: Vec<String>,
    include_usage: bool,
    accounting: StreamAccounting,
    /// Character offset per choice, for completions' `text_offset`.
    offsets: Vec<usize>,
    /// Whether a chat choice has sent its opening `role` delta.
    opened: Vec<bool>,
    remaining: usize,
    pending: std::collections::VecDeque<SseEvent>,
    done: bool,
}

impl StreamState {
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            if self.remaining == 0 {
                self.finish();
                if self.include_usage {
                    let chunk = self.meta.chunk(Vec::new(), Some(self.accounting.usage()), true);
                    self.pending.push_back(data(&chunk));
                }
                self.pending.push_back(SseEvent::default().data("[DONE]"));
                continue;
            }
            let Some((prompt, event)) = self.receiver.recv().await else {
                self.fail(ApiError::unavailable("The model stopped while generating. Retry the request."));
                continue;
            };
            match event {
                Event::Prompt { tokens } => {
                    for i in 0..self.n {
                        let index = prompt * self.n + i;
                        let mut offset = self.offsets[index];
                        let logprobs = self.meta.logprobs(&tokens, &mut offset);
                        self.offsets[index] = offset;
                        let text = self.echo_texts.get(prompt).map(String::as_str);
                        self.push_choice(self.meta.delta(index, text, false, logprobs, None));
                    }
                }
                Event::Token { index, text, token } => {
                    let index = prompt * self.n + index;
                    self.accounting.token();
                    let mut offset = self.offsets.get(index).copied().unwrap_or(0);
                    let logprobs =
                        token.as_ref().and_then(|t| self.meta.logprobs(std::slice::from_ref(t), &mut offset));
                    if let Some(slot) = self.offsets.get_mut(index) {
                        *slot = offset;
                    }
                    // Chat streams open each choice with its role.
                    let role = self.meta.format == Format::Chat
                        && self.opened.get_mut(index).is_some_and(|opened| !std::mem::replace(opened, true));
                    if text.is_empty() && logprobs.is_none() && !role {
                        continue;
                    }
                    self.push_choice(self.meta.delta(index, Some(&text), role, logprobs, None));
                }
                Event::Finished { index, reason, completion_tokens, .. } => {
                    let index = prompt * self.n + index;
                    self.accounting.add_completion_tokens(completion_tokens);
                    self.remaining -= 1;
                    self.push_choice(self.meta.delta(index, None, false, None, Some(reason.as_str())));
                }
                Event::Failed { message } => {
                    self.fail(ApiError::internal(format!("The server had an error while generating: {message}")));
                }
            }
        }
    }

    fn push_choice(&mut self, choice: Value) {
        let chunk = self.meta.chunk(vec![choice], None, self.include_usage);
        self.pending.push_back(data(&chunk));
    }

    /// Ends the stream with an `{"error": ...}` event (no `[DONE]`).
    fn fail(&mut self, error: ApiError) {
        self.pending.push_back(SseEvent::default().data(error.body_json()));
        self.finish();
    }

    fn finish(&mut self) {
        self.done = true;
        self.accounting.finish();
    }
}

fn data(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}
