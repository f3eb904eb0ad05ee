//! `POST /v1/responses`, `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`:
//! OpenAI's Responses API on the chat pipeline (same keys, rate limits,
//! use-case policy, fair sharing and metrics), with responses stored under
//! the key's user for `previous_response_id`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::admission::insert_headers;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::generation::{Admitted, OnFinish, admit_body, collect_all, submit};
use crate::json::ApiJson;
use crate::keys::Scope;
use crate::openai::response::{Format, Usage};
use crate::openai::responses::{ResponsesRequest, TextMessage, check_response_id, rename_chat_param};
use crate::openai::responses_output::{self, Ending, OnComplete, ResponseShell};
use crate::responses_store::{ResponseStore, StoreError, StoredResponse};
use crate::state::SharedState;

pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Completions)?;
    let call = body.check()?;
    let owner = caller.key().user.clone();
    let history = match &call.previous_response_id {
        None => Vec::new(),
        Some(id) => {
            let stored = state.responses.get(&owner, id).await.map_err(store_error)?;
            stored.ok_or_else(|| not_found(id).with_param("previous_response_id"))?.conversation
        }
    };
    let chat = call.chat_request(&call.conversation(&history));
    let admitted: Admitted = admit_body(&state, &caller, &headers, chat).await.map_err(rename_chat_param)?;
    let (engine, prepared, on_finish, limit_headers) = admitted.settle();
    let shell = ResponseShell::new(&call, &engine.info().name);
    // What a later `previous_response_id` continues: the history and this turn's input, then the output.
    let mut conversation = history;
    conversation.extend(call.input.iter().cloned());
    let saver = call.store.then(|| Saver { store: state.responses.clone(), owner, conversation });
    let prompt_tokens = prepared.prompt_tokens();
    let mut response = if call.stream {
        let generation = match submit(&engine, &prepared) {
            Ok(mut generations) if generations.len() == 1 => generations.remove(0),
            Ok(_) => return Err(ApiError::internal("a response runs as exactly one engine request")),
            Err(error) => {
                on_finish(Usage::default());
                return Err(error);
            }
        };
        let id = shell.id.clone();
        let on_complete: Option<OnComplete> = saver.map(|saver| -> OnComplete {
            Box::new(move |response, text| {
                tokio::spawn(async move { saver.save(&id, response, text).await });
            })
        });
        responses_output::stream(engine, generation, shell, prompt_tokens, on_finish, on_complete).into_response()
    } else {
        let body = complete(&engine, &prepared, &shell, on_finish).await?;
        if let Some(saver) = saver {
            let text = body["output"][0]["content"][0]["text"].as_str().unwrap_or_default().to_string();
            saver.save(&shell.id, body.clone(), text).await;
        }
        Json(body).into_response()
    };
    insert_headers(response.headers_mut(), &limit_headers);
    Ok(response)
}

/// Runs the request to the end and returns the whole `response` object.
async fn complete(
    engine: &inference::engine::Engine,
    prepared: &crate::openai::common::PreparedRequest,
    shell: &ResponseShell,
    on_finish: OnFinish,
) -> Result<Value, ApiError> {
    let started = std::time::Instant::now();
    let prompt_tokens = prepared.prompt_tokens();
    let completion = match collect_all(engine, prepared).await {
        Ok(mut completions) if !completions.is_empty() => completions.remove(0),
        Ok(_) => {
            on_finish(Usage::new(prompt_tokens, 0));
            return Err(ApiError::internal("the engine returned no completion"));
        }
        Err(error) => {
            on_finish(Usage::new(prompt_tokens, 0));
            return Err(error);
        }
    };
    let usage = Usage::new(prompt_tokens, completion.completion_tokens);
    let choice = completion.choices.into_iter().next();
    let ending = Ending::of(choice.as_ref().and_then(|c| c.finish_reason));
    let text = choice.map(|c| c.text).unwrap_or_default();
    crate::metrics::record_generation(Format::Responses, usage, started.elapsed(), None);
    on_finish(usage);
    Ok(shell.finished(&text, ending, usage))
}

/// Keeps a finished response for `GET` and `previous_response_id`.
struct Saver {
    store: ResponseStore,
    owner: String,
    conversation: Vec<TextMessage>,
}

impl Saver {
    /// A failed write loses only the stored copy: the client has its answer, and a later
    /// `previous_response_id` naming it is a clear 404.
    async fn save(self, id: &str, response: Value, text: String) {
        let Saver { store, owner, mut conversation } = self;
        conversation.push(TextMessage::new("assistant", text));
        let record = StoredResponse { owner, response, conversation };
        if let Err(e) = store.save(id, &record).await {
            tracing::warn!(response = id, error = %e, "response not stored");
        }
    }
}

pub async fn get(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Completions)?;
    check_response_id(&id)?;
    let stored = state.responses.get(&caller.key().user, &id).await.map_err(store_error)?;
    Ok(Json(stored.ok_or_else(|| not_found(&id))?.response))
}

pub async fn delete(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Completions)?;
    check_response_id(&id)?;
    if !state.responses.delete(&caller.key().user, &id).await.map_err(store_error)? {
        return Err(not_found(&id));
    }
    Ok(Json(json!({"id": id, "object": "response.deleted", "deleted": true})))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "No response found with id '{id}' (it was not stored, has expired, or belongs to another user)."
    ))
}

fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::Link(e) if e.is_unavailable() => {
            ApiError::unavailable(format!("Stored responses cannot be read right now ({e}). Retry shortly."))
        }
        other => ApiError::internal(format!("Stored responses cannot be read: {other}")),
    }
}
