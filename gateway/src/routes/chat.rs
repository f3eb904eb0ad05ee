//! `POST /v1/chat/completions`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::generation::generate;
use crate::json::ApiJson;
use crate::keys::Scope;
use crate::openai::chat::ChatCompletionRequest;
use crate::openai::response::Format;
use crate::state::SharedState;

pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Completions)?;
    generate(&state, &caller, &headers, body, Format::Chat).await
}
