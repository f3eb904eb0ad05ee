//! The OpenAI wire format: request bodies as clients send them, and the
//! conversion of each into the engine's typed [`GenerateRequest`]s. This is
//! the one place request fields are checked; the engine re-checks nothing.
//!
//! [`GenerateRequest`]: inference::engine::GenerateRequest

pub mod chat;
pub mod common;
pub mod completions;
pub mod response;
