//! instructd's model runtime.
//!
//! Loads Hugging Face layout model directories (and imports GGUF files into
//! that layout), runs one Llama-family transformer both for differentiable
//! training forwards and for cached, batched inference, samples with OpenAI
//! semantics, and serves generation requests from a continuously batched
//! engine behind a swappable handle. It knows nothing of HTTP.

pub mod bpe_tokenizer;
pub mod checkpoint;
pub mod config;
pub mod cpu_linear;
pub mod engine;
pub mod error;
pub mod gemm;
pub mod gguf_dequantize;
pub mod gguf_export;
pub mod gguf_import;
pub mod kv_cache;
pub mod kv_pool;
pub mod llama;
pub mod load;
pub mod model_files;
pub mod quant;
pub mod safetensors_file;
pub mod sampling;
pub mod simd;
pub mod stop;
pub mod tiny_model;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use error::{Error, Result};
