//! `POST /v1/chat/completions`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use crate::admission::{rate_limit_early, refund};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::generation::respond;
use crate::json::ApiJson;
use crate::keys::Scope;
use crate::openai::chat::ChatCompletionRequest;
use crate::openai::common::engine_for;
use crate::openai::response::Format;
use crate::state::SharedState;

pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Completions)?;
    let engine = engine_for(&state, &caller, &body.model)?;
    // Cheap shape checks, then the rate limit, and only then tokenization.
    let estimate = body.precheck(&engine, state.config.max_prompt_bytes)?;
    let admission = rate_limit_early(&state, &caller, estimate).await?;
    let prepared = match body.prepare(&engine) {
        Ok(prepared) => prepared,
        Err(error) => {
            refund(admission).await;
            return Err(error);
        }
    };
    respond(&state, &caller, &headers, engine, prepared, Format::Chat, admission).await
}
