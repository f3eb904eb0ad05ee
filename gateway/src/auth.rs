//! `Caller`: the authenticated key behind a request, extracted from
//! `Authorization: Bearer <secret>`. Refusals follow OpenAI: 401 for a
//! missing, unknown or revoked key, 403 for a suspended one.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::keys::{ApiKey, KeyError, KeyStatus, Scope};
use crate::metrics::record_rejection;
use crate::state::SharedState;

#[derive(Debug, Clone)]
pub struct Caller(pub Arc<ApiKey>);

impl Caller {
    pub fn key(&self) -> &ApiKey {
        &self.0
    }

    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.has_scope(scope) {
            Ok(())
        } else {
            record_rejection("scope");
            Err(ApiError::forbidden(
                "insufficient_scope",
                format!("This API key lacks the '{}' scope required for this route.", scope.as_str()),
            ))
        }
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Self::Rejection> {
        let secret = bearer(parts).inspect_err(|_| record_rejection("auth"))?;
        let key = match state.keys.authenticate(secret).await {
            Ok(key) => key,
            Err(KeyError::NotFound) => {
                record_rejection("auth");
                return Err(ApiError::invalid_api_key(format!(
                    "Incorrect API key provided: {}. Ask an administrator for a valid key.",
                    redact(secret)
                )));
            }
            Err(KeyError::Unavailable(reason)) => {
                return Err(ApiError::unavailable(format!(
                    "API keys cannot be checked right now (key store unavailable: {reason}). Retry shortly."
                )));
            }
            Err(e) => return Err(ApiError::internal(e.to_string())),
        };
        match key.status {
            KeyStatus::Active => Ok(Caller(key)),
            KeyStatus::Suspended => {
                record_rejection("key_suspended");
                let reason = key.status_reason.as_deref().unwrap_or("suspended by an administrator");
                Err(ApiError::key_suspended(format!("This API key is suspended ({reason}).")))
            }
            KeyStatus::Revoked => {
                record_rejection("auth");
                Err(ApiError::invalid_api_key("This API key has been revoked."))
            }
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::invalid_api_key(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
        )
    };
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| ApiError::invalid_api_key("The Authorization header is not valid text."))?;
    let secret = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::invalid_api_key("The Authorization header must be 'Bearer YOUR_KEY'."))?
        .trim();
    if secret.is_empty() { Err(missing()) } else { Ok(secret) }
}

/// Shows enough of a secret to recognise it, as OpenAI's messages do.
fn redact(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn redaction_hides_the_middle() {
        assert_eq!(super::redact("sk-instructd-0123456789"), "sk-i***6789");
        assert_eq!(super::redact("short"), "*****");
    }
}
