//! The OpenAI wire format: request bodies as clients send them, and the
//! conversion of each into the engine's typed [`GenerateRequest`]s. This is
//! the one place request fields are checked; the engine re-checks nothing.
//!
//! [`GenerateRequest`]: inference::engine::GenerateRequest

pub mod chat;
pub mod common;
pub mod completions;
pub mod response;
pub mod responses;
pub mod responses_output;

use inference::engine::Engine;

use crate::error::ApiError;
use common::PreparedRequest;

/// A generation request body (completions, chat), checked in two steps so a request is refused as cheaply as
/// possible: shape and size first (before the rate limit), tokenization and templating only after it.
pub trait GenerationBody {
    /// The `model` field as sent.
    fn model(&self) -> &str;
    /// Shape and byte-size checks without tokenizing; the tokens the rate limit charges up front.
    fn precheck(&self, engine: &Engine, max_prompt_bytes: usize) -> Result<u64, ApiError>;
    /// The engine requests, tokenized.
    fn prepare(self, engine: &Engine) -> Result<PreparedRequest, ApiError>;
}
