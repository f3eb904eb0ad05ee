//! The one error type of the inference crate.
//!
//! Loading errors name the file and the problem; request errors name the
//! offending parameter so the gateway can turn them into OpenAI-style 400s
//! without re-validating.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file is missing, unreadable or inconsistent with the others.
    #[error("{}: {message}", path.display())]
    ModelFile { path: PathBuf, message: String },

    /// `config.json` names an architecture this runtime does not implement.
    #[error("unsupported architecture {0:?}: supported are LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM")]
    UnsupportedArchitecture(String),

    /// Converting a GGUF file into Hugging Face layout failed.
    #[error("gguf import: {0}")]
    Import(String),

    /// The tokenizer could not encode, decode or render a chat template.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request failed validation; `param` is the request field at fault.
    #[error("{message}")]
    InvalidRequest { param: &'static str, message: String },

    /// The engine queue is full; the caller should retry later (HTTP 503).
    #[error("the engine is overloaded: its request queue is full, retry later")]
    Overloaded,

    /// One tenant already has its share of the engine's queue waiting; the
    /// caller should retry later (HTTP 429). Other tenants are still served.
    #[error(
        "your requests already fill this engine's queue share ({queued} of {limit} waiting samples); \
         retry once some have started"
    )]
    QueueShareExceeded { queued: usize, limit: usize },

    /// The engine task has stopped (shut down or crashed).
    #[error("the engine has stopped")]
    EngineStopped,

    /// No upstream server of an external engine (`openai_http`) answers its health probe (HTTP 503).
    #[error("no upstream is available: {0}")]
    UpstreamUnavailable(String),

    /// A forward pass failed while this request was in the batch.
    #[error("the engine failed while generating: {0}")]
    EngineFailure(String),

    /// The weights cannot be served in the configured `serve_dtype`.
    #[error("serve_dtype {dtype}: {message}")]
    ServeDtype { dtype: &'static str, message: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest { param, message: message.into() }
    }

    pub fn model_file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::ModelFile { path: path.into(), message: message.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
