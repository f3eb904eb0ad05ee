//! `ApiJson<T>`: the one JSON body extractor. It turns every way a body can be
//! wrong (too large, not UTF-8, not JSON, wrong field types, unknown fields)
//! into an OpenAI-style 4xx naming the offending `param`, before a handler runs;
//! a body that does not arrive within the body deadline is a 408.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        parse(&read_body(request, state).await?).map(ApiJson)
    }
}

/// An optional JSON body: empty means `None`; anything else must parse.
pub struct OptionalApiJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(request, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            Ok(OptionalApiJson(None))
        } else {
            parse(&bytes).map(|v| OptionalApiJson(Some(v)))
        }
    }
}

async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    let limit = request.extensions().get::<BodyLimit>().map(|l| l.0).unwrap_or(0);
    let timeout = request.extensions().get::<BodyTimeout>().and_then(|t| t.0);
    let read = Bytes::from_request(request, state);
    let result = match timeout {
        Some(timeout) => tokio::time::timeout(timeout, read).await.map_err(|_| ApiError::request_timeout(timeout))?,
        None => read.await,
    };
    result.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::invalid_request(None, format!("Could not read the request body: {rejection}"))
        }
    })
}

/// The configured body limit, put in request extensions so the 413 message can state it.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// How long a whole request body may take to arrive (`None`: no limit).
#[derive(Clone, Copy)]
pub struct BodyTimeout(pub Option<std::time::Duration>);

/// Parses a JSON body into `T`, naming the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid_request(
            None,
            format!("The request body is not valid UTF-8 (invalid byte at offset {}).", e.valid_up_to()),
        )
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid_request(
            None,
            "The request body is empty; expected a JSON object. See the API reference for the fields.",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let mut value: serde_json::Value = serde::Deserialize::deserialize(&mut deserializer).map_err(|e| {
        ApiError::invalid_request(
            None,
            format!("We could not parse the JSON body of your request ({e}). The body must be a JSON object."),
        )
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::invalid_request(None, format!("Unexpected data after the JSON body: {e}")))?;
    integral_numbers_as_integers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                // serde names an unknown field in its message; OpenAI words it this way.
                if let Some(field) = unknown_field(&message) {
                    return ApiError::invalid_request(
                        Some(&field),
                        format!("Unrecognized request argument supplied: {field}"),
                    );
                }
                let param = if path == "." { None } else { Some(path.as_str()) };
                ApiError::invalid_request(param, format!("Invalid value for '{path}': {message}"))
            }
            _ => ApiError::invalid_request(
                None,
                format!("We could not parse the JSON body of your request ({inner}). The body must be a JSON object."),
            ),
        }
    })
}

/// JSON has one number type: `28.0` is the integer 28 to JSON Schema (and so
/// to openapi.yaml) and to OpenAI's API, so integer fields take it. Floats
/// with a fractional part, or beyond what an integer type holds, stay floats
/// (and are refused by integer fields, naming them).
fn integral_numbers_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(number) => {
            // Within ±2^53 every integral f64 is exact, so the cast loses nothing.
            if let Some(float) = number.as_f64().filter(|_| number.is_f64())
                && float.fract() == 0.0
                && float.abs() <= 9_007_199_254_740_992.0
            {
                *number = serde_json::Number::from(float as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers_as_integers),
        _ => {}
    }
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        n: Option<u32>,
        messages: Option<Vec<Message>>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Message {
        content: String,
    }

    fn error(body: &[u8]) -> ApiError {
        parse::<Sample>(body).unwrap_err()
    }

    #[test]
    fn wrong_type_names_the_field() {
        assert_eq!(error(br#"{"n": "two"}"#).param.as_deref(), Some("n"));
        assert_eq!(error(br#"{"messages": [{"content": 3}]}"#).param.as_deref(), Some("messages[0].content"));
    }

    #[test]
    fn integral_floats_fill_integer_fields() {
        let sample: Sample = parse(br#"{"n": 28.0}"#).unwrap();
        assert_eq!(sample.n, Some(28));
        assert_eq!(error(br#"{"n": 2.5}"#).param.as_deref(), Some("n"));
        assert_eq!(error(br#"{"n": 1e20}"#).param.as_deref(), Some("n"));
    }

    #[test]
    fn malformed_invalid_utf8_and_unknown_fields_are_400() {
        for body in [&b"{\"n\": 1"[..], b"", b"\xff\xfe", b"[1, 2]", b"{} trailing"] {
            assert_eq!(error(body).status, StatusCode::BAD_REQUEST, "{body:?}");
        }
        let unknown = error(br#"{"frobnicate": true}"#);
        assert_eq!(unknown.param.as_deref(), Some("frobnicate"));
        assert!(unknown.message.contains("Unrecognized request argument"));
    }
}
