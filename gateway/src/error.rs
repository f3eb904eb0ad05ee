//! Every refusal the gateway sends, as OpenAI sends it:
//! `{"error": {"message", "type", "param", "code"}}` with the matching HTTP
//! status. Handlers return `Result<_, ApiError>`; nothing else builds error
//! bodies, so the shape cannot drift between routes.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error response. Build it with the constructors; they fix the
/// type/code pairs OpenAI clients key their retry logic on.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Extra headers (Retry-After, x-ratelimit-*).
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorObject<'a>,
}

/// The `error` object, also sent as the last SSE event when a stream fails.
#[derive(Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code, headers: Vec::new() }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn invalid_request(param: Option<&str>, message: impl Into<String>) -> Self {
        let error = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message);
        match param {
            Some(param) => error.with_param(param),
            None => error,
        }
    }

    /// A field we recognise but do not implement: refused, never ignored.
    pub fn unsupported(param: &str) -> Self {
        Self::invalid_request(Some(param), format!("The '{param}' parameter is not supported by this server."))
            .with_code("unsupported_parameter")
    }

    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), message)
    }

    pub fn key_suspended(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", Some("key_suspended"), message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", Some(code), message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model '{model}' does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    /// A well-formed request that the resource's current state refuses (409).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", Some(code), message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("The request body exceeds the limit of {limit} bytes."),
        )
    }

    pub fn request_timeout(limit: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            format!("The request body did not arrive within {} s.", limit.as_secs_f64()),
        )
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: Duration) -> Self {
        // Whole seconds, rounded up: "retry after 0" invites a busy loop.
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", Some("rate_limit_exceeded"), message)
            .with_header("retry-after", seconds.max(1).to_string())
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("engine_overloaded"), message)
            .with_header("retry-after", "1")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("service_unavailable"), message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn object(&self) -> ErrorObject<'_> {
        ErrorObject { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code }
    }

    /// The `{"error": ...}` body as JSON text.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&Body { error: self.object() }).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into()
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, [(header::CONTENT_TYPE, "application/json")], self.body_json()).into_response();
        for (name, value) in &self.headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                response.headers_mut().insert(*name, value);
            }
        }
        response
    }
}

/// Engine errors reach clients through here only.
impl From<inference::Error> for ApiError {
    fn from(error: inference::Error) -> Self {
        use inference::Error as E;
        match error {
            E::InvalidRequest { param, message } => ApiError::invalid_request(Some(param), message),
            E::Overloaded => {
                ApiError::overloaded("The engine is at capacity: its request queue is full. Retry shortly.")
            }
            E::QueueShareExceeded { .. } => {
                crate::metrics::record_rejection("engine_queue_share");
                ApiError::rate_limited(format!("{error}."), Duration::from_secs(1))
                    .with_code("engine_queue_share_exceeded")
            }
            E::EngineStopped => ApiError::unavailable("The model is restarting or shutting down. Retry shortly."),
            E::UpstreamUnavailable(why) => {
                ApiError::unavailable(format!("The model's servers are unavailable ({why}). Retry shortly."))
            }
            E::Tokenizer(message) => {
                ApiError::invalid_request(None, format!("Could not tokenize the input: {message}"))
            }
            other => {
                tracing::error!(error = %other, "engine error");
                ApiError::internal(format!("The server had an error while processing your request: {other}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let error = ApiError::invalid_request(Some("n"), "n must be between 1 and 16");
        let value: serde_json::Value = serde_json::from_str(&error.body_json()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"error": {"message": "n must be between 1 and 16", "type": "invalid_request_error",
                "param": "n", "code": null}})
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        let error = ApiError::rate_limited("slow down", Duration::from_millis(12_100));
        assert!(error.headers.contains(&("retry-after", "13".to_string())));
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        assert_eq!(ApiError::from(inference::Error::Overloaded).status, StatusCode::SERVICE_UNAVAILABLE);
        let share = ApiError::from(inference::Error::QueueShareExceeded { queued: 128, limit: 128 });
        assert_eq!((share.status, share.code), (StatusCode::TOO_MANY_REQUESTS, Some("engine_queue_share_exceeded")));
        assert!(share.headers.contains(&("retry-after", "1".to_string())));
        let invalid = ApiError::from(inference::Error::invalid("max_tokens", "too many"));
        assert_eq!((invalid.status, invalid.param.as_deref()), (StatusCode::BAD_REQUEST, Some("max_tokens")));
    }
}
