//! Playground generations: K samples for one prompt, each with a generation
//! id, logged to `instructd:prompts` only while the user's consent to the
//! current training-use notice is active. Nothing else in the gateway writes
//! to a training stream.

use feedback::consent::Consent;
use feedback::event_log::{Appended, Entry};
use feedback::events::{PromptEvent, SCHEMA_VERSION, Sample, WithdrawalEvent, new_id, now_ms};
use feedback::logged_prompts::PromptRecord;
use feedback::records::Record;
use feedback::split::{DEDUPE_PREFIX_CHARS, dedupe_key, split_for};
use feedback::streams;
use inference::engine::{Completion, Engine};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::admission::{Ticket, admit, rate_limit_early, refund};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys::ApiKey;
use crate::openai::chat::{ChatCompletionRequest, Message};
use crate::openai::common::{PreparedRequest, Stop};
use crate::openai::completions::{CompletionRequest, Prompt};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaygroundRequest {
    pub model: String,
    /// A plain prompt, or `messages` for a conversation (exactly one of them).
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    /// Samples to generate (K).
    pub k: Option<i64>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "crate::openai::common::top_p")]
    pub top_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
}

/// Why a playground prompt was not logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotLogged {
    /// The user never accepted, or withdrew.
    NoConsent,
    /// The user accepted an older version of the notice.
    NoticeChanged,
    /// Consent could not be checked (Redis away): never log on doubt.
    ConsentUnverifiable,
    /// The event could not be stored.
    StoreUnavailable,
}

/// A validated playground request.
pub struct PlaygroundPlan {
    pub prepared: PreparedRequest,
    pub samples: usize,
    /// The text logged as the prompt.
    pub prompt_text: String,
    pub messages: Option<Value>,
    pub params: Value,
}

/// A playground request turned into its completions or chat request, not yet tokenized.
pub struct PlaygroundDraft {
    inner: DraftRequest,
    samples: usize,
    params: Value,
}

enum DraftRequest {
    /// The request and the prompt text logged.
    Text(Box<CompletionRequest>, String),
    /// The request and the messages logged.
    Chat(Box<ChatCompletionRequest>, Value),
}

impl PlaygroundDraft {
    /// Every check, in the playground's order: the cheap shape checks, the rate limit (charged for `runs` runs
    /// of the request: the arena runs it on two checkpoints), tokenization on `engine`, then the use-case
    /// policy; the plan is charged to the key's tenant for fair sharing. A refusal after the rate limit gives
    /// its charge back.
    pub async fn admit(
        self,
        state: &AppState,
        caller: &Caller,
        headers: &axum::http::HeaderMap,
        engine: &Engine,
        runs: u64,
    ) -> Result<(PlaygroundPlan, Ticket), ApiError> {
        let estimate = self.precheck(engine, state.config.max_prompt_bytes)?;
        let admission = rate_limit_early(state, caller, estimate.saturating_mul(runs)).await?;
        let mut plan = match self.prepare(engine) {
            Ok(plan) => plan,
            Err(error) => {
                refund(admission).await;
                return Err(error);
            }
        };
        let ticket = admit(state, caller, headers, &plan.prepared, admission).await?;
        plan.prepared.charge_to(&caller.key().tenant());
        Ok((plan, ticket))
    }

    /// The checks that need no tokenizer; returns the estimated token charge (see `CompletionRequest::precheck`).
    pub fn precheck(&self, engine: &Engine, max_prompt_bytes: usize) -> Result<u64, ApiError> {
        match &self.inner {
            DraftRequest::Text(request, _) => request.precheck(engine, max_prompt_bytes),
            DraftRequest::Chat(request, _) => request.precheck(engine, max_prompt_bytes),
        }
    }

    /// Tokenizes and validates against `engine`.
    pub fn prepare(self, engine: &Engine) -> Result<PlaygroundPlan, ApiError> {
        let (prepared, prompt_text, messages) = match self.inner {
            DraftRequest::Text(request, prompt) => (request.prepare(engine)?, prompt, None),
            DraftRequest::Chat(request, logged) => {
                let prepared = request.prepare(engine)?;
                let text = prepared.policy_text.clone();
                (prepared, text, Some(logged))
            }
        };
        Ok(PlaygroundPlan { prepared, samples: self.samples, prompt_text, messages, params: self.params })
    }
}

impl PlaygroundRequest {
    /// Checks the playground's own fields (`k`, one of `prompt` / `messages`) and builds the request to run.
    pub fn draft(self, state: &AppState) -> Result<PlaygroundDraft, ApiError> {
        let config = &state.config.playground;
        let k = match self.k {
            None => config.default_samples,
            Some(k) if k >= 1 && k as usize <= config.max_samples => k as usize,
            Some(k) => {
                return Err(ApiError::invalid_request(
                    Some("k"),
                    format!("k must be between 1 and {}, got {k}", config.max_samples),
                ));
            }
        };
        let max_tokens = Some(self.max_tokens.unwrap_or(config.default_max_tokens as i64));
        let params = json!({
            "k": k, "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty, "seed": self.seed,
        });
        let inner = match (self.prompt, self.messages) {
            (Some(prompt), None) => {
                let request = CompletionRequest {
                    model: self.model,
                    prompt: Some(Prompt::Text(prompt.clone())),
                    max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: Some(k as i64),
                    stop: self.stop,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    seed: self.seed,
                    ..Default::default()
                };
                DraftRequest::Text(Box::new(request), prompt)
            }
            (None, Some(messages)) => {
                let logged = serde_json::to_value(
                    messages.iter().map(|m| json!({"role": m.role, "content": m.text()})).collect::<Vec<_>>(),
                )
                .unwrap_or(Value::Null);
                let request = ChatCompletionRequest {
                    model: self.model,
                    messages,
                    max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: Some(k as i64),
                    stop: self.stop,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    seed: self.seed,
                    ..Default::default()
                };
                DraftRequest::Chat(Box::new(request), logged)
            }
            _ => {
                return Err(ApiError::invalid_request(
                    Some("prompt"),
                    "Provide exactly one of 'prompt' and 'messages'.",
                ));
            }
        };
        Ok(PlaygroundDraft { inner, samples: k, params })
    }
}

/// The outcome of logging, for the response.
pub struct Logged {
    pub prompt_id: String,
    pub generation_ids: Vec<String>,
    pub logged: bool,
    pub not_logged: Option<NotLogged>,
    pub pii: Vec<&'static str>,
}

/// Logs the samples when consent allows; never fails the request.
pub async fn log_samples(
    state: &AppState,
    key: &ApiKey,
    engine: &Engine,
    plan: &PlaygroundPlan,
    completion: &Completion,
    use_case: &str,
) -> Logged {
    let prompt_id = new_id("prm");
    let generation_ids: Vec<String> = (0..completion.choices.len()).map(|i| format!("{prompt_id}-{i}")).collect();
    let config = &state.config.playground;
    let mut logged = Logged {
        prompt_id: prompt_id.clone(),
        generation_ids: generation_ids.clone(),
        logged: false,
        not_logged: None,
        pii: vec![],
    };
    let consent: Consent = match state.consent.get(&key.user).await {
        Ok(consent) => consent,
        Err(e) => {
            tracing::warn!(error = %e, "consent unverifiable: not logging");
            logged.not_logged = Some(NotLogged::ConsentUnverifiable);
            return logged;
        }
    };
    if !consent.allows_logging(&config.notice_version) {
        logged.not_logged =
            Some(if consent.notice_version.is_some() && consent.status == feedback::consent::ConsentStatus::Accepted {
                NotLogged::NoticeChanged
            } else {
                NotLogged::NoConsent
            });
        return logged;
    }
    let findings = state.pii.screen(&plan.prompt_text);
    logged.pii = findings.iter().map(|f| f.kind.as_str()).collect();
    let redact = config.redact_pii && !findings.is_empty();
    let prompt = if redact { state.pii.redact(&plan.prompt_text, &findings) } else { plan.prompt_text.clone() };
    let info = engine.info();
    let event = PromptEvent {
        schema_version: SCHEMA_VERSION,
        prompt_id: prompt_id.clone(),
        dedupe_key: dedupe_key(&prompt, DEDUPE_PREFIX_CHARS),
        prompt,
        messages: if redact { None } else { plan.messages.clone() },
        samples: completion
            .choices
            .iter()
            .zip(&generation_ids)
            .map(|(choice, id)| Sample {
                generation_id: id.clone(),
                text: choice.text.clone(),
                finish_reason: choice.finish_reason.map_or("length", |r| r.as_str()).to_string(),
                completion_tokens: choice.completion_tokens,
                mean_logprob: choice.mean_logprob,
            })
            .collect(),
        params: plan.params.clone(),
        model: info.name.clone(),
        checkpoint: info.checkpoint.clone(),
        user: key.user.clone(),
        organization: key.organization.clone(),
        key_id: key.id.clone(),
        use_case: use_case.to_string(),
        consent_version: config.notice_version.clone(),
        pii: findings,
        redacted: redact,
        split: split_for(&key.user, &config.split),
        created_at_ms: now_ms(),
    };
    let Ok(entry) = Record::Prompt(event.clone()).to_entry(&prompt_id) else {
        logged.not_logged = Some(NotLogged::StoreUnavailable);
        return logged;
    };
    let entry = Entry { consent: Some(state.consent.guard(&key.user, &config.notice_version)), ..entry };
    let stream_id = match state.events.append(entry).await {
        Ok(Appended::Written { stream_id } | Appended::Duplicate { stream_id }) => Some(stream_id),
        Ok(Appended::Spilled) => None,
        // Withdrawn while the completion ran: the write was refused atomically.
        Ok(Appended::NoConsent) => {
            logged.not_logged = Some(NotLogged::NoConsent);
            return logged;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not log a playground prompt");
            logged.not_logged = Some(NotLogged::StoreUnavailable);
            return logged;
        }
    };
    let written = stream_id.is_some();
    let record = PromptRecord {
        prompt_id: prompt_id.clone(),
        user: key.user.clone(),
        organization: key.organization.clone(),
        generation_ids,
        stream_id,
        has_pii: !event.pii.is_empty(),
        created_at_ms: event.created_at_ms,
        task: Some(json!({
            "prompt": event.prompt,
            "messages": event.messages,
            "use_case": event.use_case,
            "samples": event.samples.iter().map(|s| json!({"generation_id": s.generation_id, "text": s.text})).collect::<Vec<_>>(),
        })),
    };
    if let Err(e) = state.prompts.insert(&record).await {
        tracing::warn!(error = %e, prompt = %prompt_id, "prompt record kept in memory only");
    }
    // A prompt with personal data in it is never shown to labelers (nor trained on: the snapshot drops it).
    if !record.has_pii
        && let Err(e) = state.labeling.push(&prompt_id).await
    {
        tracing::warn!(error = %e, prompt = %prompt_id, "prompt not queued for labeling");
    }
    // A withdrawal between the write and the record above found no record of this prompt to delete; whichever of
    // the two comes second sees the other (the withdrawal reads the records after it changes the consent, this
    // reads the consent after it stored the record), so the prompt never outlives the withdrawal.
    if written && matches!(state.consent.get(&key.user).await, Ok(c) if !c.allows_logging(&config.notice_version)) {
        if let Err(e) = forget_user(state, &key.user).await {
            tracing::error!(error = %e.message, prompt = %prompt_id, "withdrawn during logging: not yet forgotten");
        }
        logged.not_logged = Some(NotLogged::NoConsent);
        return logged;
    }
    logged.logged = true;
    logged
}

/// Forgets `user`'s logged prompts after their consent was withdrawn: deletes their entries still in
/// `instructd:prompts` and this replica's spill (other replicas' spilled ones are refused at replay, their consent
/// being gone), their prompt records and labeling tasks, and tells the trainer (through the same stream) to drop
/// whatever of theirs it stored. Returns how many stream entries were deleted.
pub async fn forget_user(state: &AppState, user: &str) -> Result<u64, ApiError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::unavailable(format!("Consent cannot be read or changed right now: {e}. Retry shortly."))
    };
    let spilled = state.events.drop_user(user).await.map_err(|e| unavailable(&e))?;
    let records = state.prompts.user_records(user).await.map_err(|e| unavailable(&e))?;
    let ids: Vec<String> = records.iter().filter_map(|r| r.stream_id.clone()).collect();
    let removed: u64 = if ids.is_empty() {
        0
    } else {
        state
            .redis
            .run(|mut c| async move { redis::cmd("XDEL").arg(streams::PROMPTS).arg(ids).query_async(&mut c).await })
            .await
            .map_err(|e| unavailable(&e))?
    };
    // Only now forget the records: a failure above can be retried and still finds the entries.
    state.prompts.take_user(user).await.map_err(|e| unavailable(&e))?;
    let prompt_ids: Vec<String> = records.iter().map(|r| r.prompt_id.clone()).collect();
    if let Err(e) = state.labeling.remove(&prompt_ids).await {
        tracing::warn!(error = %e, "withdrawn prompts left in the labeling queue");
    }
    let event = WithdrawalEvent {
        schema_version: SCHEMA_VERSION,
        user: user.to_string(),
        removed_from_stream: removed,
        created_at_ms: now_ms(),
    };
    let entry = Record::Withdrawal(event).to_entry(&new_id("wdr")).map_err(|e| ApiError::internal(e.to_string()))?;
    state.events.append(entry).await.map_err(|e| ApiError::unavailable(format!("Withdrawal not recorded: {e}")))?;
    tracing::info!(user, removed, spilled, "consent withdrawn: the user's logged data forgotten");
    Ok(removed)
}
