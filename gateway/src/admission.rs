//! The gate every generation passes before the engine. The order keeps a
//! limited key from spending the gateway's CPU: the route's cheap shape checks
//! (prompt count, bytes) come first, then the key's rate limits on an estimate
//! of the request's tokens ([`rate_limit_early`]), and only then tokenization,
//! the use-case policy and the exact size check ([`admit`]). Refusals are
//! recorded (metrics; policy refusals also in the audit stream, where enough of
//! them auto-suspend the key); a request refused after its admission gets its
//! token charge back.

use axum::http::{HeaderMap, HeaderValue};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys::KeyStatus;
use crate::metrics::record_rejection;
use crate::openai::common::PreparedRequest;
use crate::policy::{Classification, KeyPolicy, UseCase};
use crate::rate_limit::{Admission, RateLimitHeaders};
use crate::state::AppState;

/// The header a client may declare its use case in; checked, not trusted.
pub const USE_CASE_HEADER: &str = "x-use-case";

/// A request let through: keep it until the request ends.
pub struct Ticket {
    pub classification: Classification,
    pub admission: Admission,
}

/// Rate limits a generation before its prompt is tokenized, charging `estimate`
/// tokens up front (capped at the key's tokens/min: only the exact count, known
/// after tokenization, may call a request too large; see [`admit`]). The charge
/// is settled with the real usage when the request ends.
pub async fn rate_limit_early(state: &AppState, caller: &Caller, estimate: u64) -> Result<Admission, ApiError> {
    let per_minute = u64::from(caller.key().limits.tokens_per_minute);
    let charge = if per_minute > 0 { estimate.min(per_minute) } else { estimate };
    rate_limit(state, caller, charge).await
}

/// Gives back the token charge of a request refused after [`rate_limit_early`].
pub async fn refund(admission: Admission) {
    admission.finish(0).await;
}

/// The checks after tokenization: the declared use case, the use-case policy,
/// and the request's exact token count against the key's tokens/min. A refusal
/// gives the early admission's token charge back.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    prepared: &PreparedRequest,
    admission: Admission,
) -> Result<Ticket, ApiError> {
    match check(state, caller, headers, prepared).await {
        Ok(classification) => Ok(Ticket { classification, admission }),
        Err(error) => {
            refund(admission).await;
            Err(error)
        }
    }
}

async fn check(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    prepared: &PreparedRequest,
) -> Result<Classification, ApiError> {
    let key = caller.key();
    let declared = declared_use_case(headers)?;
    let key_policy = KeyPolicy { allowed_use_cases: &key.use_cases, approved_domains: &key.approved_domains };
    let classification = match state.policy.check(&prepared.policy_text, declared, &key_policy) {
        Ok(classification) => classification,
        Err((classification, refusal)) => {
            record_rejection("policy");
            let suspend =
                state.audit.record_refusal(&key.id, &key.user, &key.organization, &classification, &refusal).await;
            if suspend {
                let reason = format!(
                    "automatically suspended after {} policy refusals within {} s",
                    state.config.max_refusals, state.config.refusal_window_secs
                );
                match state.keys.set_status(&key.id, KeyStatus::Suspended, Some(reason.clone())).await {
                    Ok(_) => state.audit.record_status_change(&key.id, "suspended", &reason, "policy").await,
                    Err(e) => tracing::error!(key = %key.id, error = %e, "auto-suspension failed"),
                }
            }
            return Err(ApiError::forbidden(refusal.code(), refusal.message()));
        }
    };
    let tokens = prepared.charged_tokens();
    if key.limits.tokens_per_minute > 0 && tokens > u64::from(key.limits.tokens_per_minute) {
        return Err(rejection_error(&crate::rate_limit::Rejection::too_large(&key.limits, tokens)));
    }
    Ok(classification)
}

/// Charges one request (and `tokens` up front) against the key's rate limits.
pub async fn rate_limit(state: &AppState, caller: &Caller, tokens: u64) -> Result<Admission, ApiError> {
    let key = caller.key();
    state.limiter.admit(&key.id, &key.limits, tokens).await.map_err(|rejection| rejection_error(&rejection))
}

fn rejection_error(rejection: &crate::rate_limit::Rejection) -> ApiError {
    record_rejection(match rejection.reason.as_str() {
        "requests" => "rate_limit_requests",
        "tokens" => "rate_limit_tokens",
        "concurrency" => "rate_limit_concurrency",
        _ => "rate_limit_too_large",
    });
    let mut error = ApiError::rate_limited(rejection.message.clone(), rejection.retry_after);
    for (name, value) in header_pairs(&rejection.headers) {
        error = error.with_header(name, value);
    }
    error
}

fn declared_use_case(headers: &HeaderMap) -> Result<Option<UseCase>, ApiError> {
    let Some(value) = headers.get(USE_CASE_HEADER) else { return Ok(None) };
    let text = value.to_str().unwrap_or("");
    UseCase::parse(text).map(Some).ok_or_else(|| {
        ApiError::invalid_request(
            Some(USE_CASE_HEADER),
            format!(
                "Unknown use case '{text}' in the X-Use-Case header; expected one of: {}.",
                UseCase::ALL.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// `x-ratelimit-*` headers as OpenAI names them; unlimited dimensions are left out.
pub fn header_pairs(headers: &RateLimitHeaders) -> Vec<(&'static str, String)> {
    let mut pairs = Vec::new();
    if headers.limit_requests > 0 {
        pairs.push(("x-ratelimit-limit-requests", headers.limit_requests.to_string()));
        if headers.requests_known {
            pairs.push(("x-ratelimit-remaining-requests", headers.remaining_requests.to_string()));
            pairs.push(("x-ratelimit-reset-requests", format_reset(headers.reset_requests)));
        }
    }
    if headers.limit_tokens > 0 {
        pairs.push(("x-ratelimit-limit-tokens", headers.limit_tokens.to_string()));
        if headers.tokens_known {
            pairs.push(("x-ratelimit-remaining-tokens", headers.remaining_tokens.to_string()));
            pairs.push(("x-ratelimit-reset-tokens", format_reset(headers.reset_tokens)));
        }
    }
    pairs
}

pub fn insert_headers(target: &mut HeaderMap, headers: &RateLimitHeaders) {
    for (name, value) in header_pairs(headers) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            target.insert(name, value);
        }
    }
}

/// OpenAI writes resets as durations such as `6m0s`, `1s` or `120ms`.
fn format_reset(reset: std::time::Duration) -> String {
    let ms = reset.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let seconds = format!("{:.3}", reset.as_secs_f64());
        format!("{}s", seconds.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(super::format_reset(Duration::from_millis(120)), "120ms");
        assert_eq!(super::format_reset(Duration::from_millis(12_000)), "12s");
        assert_eq!(super::format_reset(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(super::format_reset(Duration::from_secs(360)), "6m0s");
    }
}
