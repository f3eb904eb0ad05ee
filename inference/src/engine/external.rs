//! The engine's other runner: requests validated and queue-accounted here, run
//! by something outside this process (`[engine] kind = "openai_http"`: an
//! upstream vLLM, SGLang or llama-server the gateway forwards to).
//!
//! This crate knows nothing of HTTP: the caller supplies an
//! [`ExternalRunner`]; [`Engine::start_external`](super::Engine::start_external)
//! wraps it so that everything built on [`Engine`](super::Engine) (the swap
//! handle, canary, pinning, `system_fingerprint`) works unchanged.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::EngineStats;
use super::queue_account::QueueAccount;
use super::request::{Event, GenerateRequest};
use crate::error::Result;

/// Which runner serves generation requests (`[engine] kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// This process's own batching engine on the `[model]` weights.
    #[default]
    Builtin,
    /// One or more upstream OpenAI-compatible servers (`[engine.openai_http]`).
    OpenaiHttp,
}

/// `[engine.openai_http]`: the upstreams and how the gateway talks to them.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiHttpConfig {
    /// Base URLs of the upstreams, each up to `/v1` excluded (`http://10.0.0.5:8000`, `https://vllm.internal`).
    pub upstreams: Vec<String>,
    /// PEM file of further root certificates trusted for `https://` upstreams (a private CA), beside the system's
    /// and Mozilla's; empty: those only. Certificates are always verified.
    pub ca_file: std::path::PathBuf,
    /// Requests one upstream runs at once; the rest wait in the gateway's
    /// queue (`queue_capacity`, `tenant_queue_share`).
    pub max_concurrency: usize,
    /// Connecting to an upstream, in seconds.
    pub connect_timeout_secs: u64,
    /// Most time between two chunks of an upstream's answer (or before its
    /// first), in seconds: past it the request fails, cleanly.
    pub read_timeout_secs: u64,
    /// Further upstreams tried when one cannot be reached or answers 5xx/429
    /// before the first token; never once a token was streamed.
    pub retries: usize,
    /// Seconds between health probes (`GET {upstream}/health`, else `/v1/models`).
    pub health_interval_secs: u64,
    /// The checkpoint id the upstreams serve (the `system_fingerprint`);
    /// empty: the `[model] dir`'s name, the weights they were converted from.
    pub checkpoint: String,
    /// Sent as `Authorization: Bearer` to the upstreams; empty: none.
    pub api_key: String,
    /// Sent as `model` to the upstreams (vLLM and SGLang check it against the name they serve); empty: omitted.
    pub model: String,
    /// `[engine.openai_http.launch]`: the gateway starts the upstream itself, one process per checkpoint.
    pub launch: LaunchConfig,
}

/// `[engine.openai_http.launch]`: the gateway starts one upstream process per checkpoint it serves (the start-up
/// model, then each published checkpoint: blue/green) instead of forwarding to the static `upstreams`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LaunchConfig {
    /// The upstream's command line, one argument per element; empty: no launch. Placeholders: `{gguf}` (the
    /// checkpoint exported to GGUF first), `{dir}` (its Hugging Face directory), `{port}` (a free port of
    /// `ports`), `{host}`, `{checkpoint}` (its id).
    pub command: Vec<String>,
    /// The address the upstream listens on and the gateway calls.
    pub host: String,
    /// First and last port (inclusive) an upstream may listen on.
    pub ports: [u16; 2],
    /// Most seconds from the start of an upstream to its first healthy probe (loading a large model takes long).
    pub health_timeout_secs: u64,
    /// Seconds between SIGTERM and SIGKILL when an upstream is stopped.
    pub stop_grace_secs: u64,
    /// Matrix dtype of the `{gguf}` export: `f32` or `f16`.
    pub gguf_dtype: String,
    /// Where GGUF exports and upstream logs go, one directory per checkpoint; empty: `.upstreams` inside
    /// `[gateway.rollout] checkpoints_dir`, next to the checkpoints (the store ignores dot directories).
    pub work_dir: std::path::PathBuf,
}

impl LaunchConfig {
    /// Whether the gateway launches its upstreams (a `command` is set).
    pub fn is_enabled(&self) -> bool {
        !self.command.is_empty()
    }
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            host: "127.0.0.1".into(),
            ports: [18100, 18199],
            health_timeout_secs: 300,
            stop_grace_secs: 10,
            gguf_dtype: "f32".into(),
            work_dir: std::path::PathBuf::new(),
        }
    }
}

impl Default for OpenAiHttpConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            ca_file: std::path::PathBuf::new(),
            max_concurrency: 16,
            connect_timeout_secs: 2,
            read_timeout_secs: 60,
            retries: 1,
            health_interval_secs: 2,
            checkpoint: String::new(),
            api_key: String::new(),
            model: String::new(),
            launch: LaunchConfig::default(),
        }
    }
}

/// Runs requests outside this process. Implemented by the gateway's upstream pool.
pub trait ExternalRunner: Send + Sync + 'static {
    /// Refuses (by the request field's name) what the runner cannot do, before anything is queued.
    fn check(&self, request: &GenerateRequest, streaming: bool) -> Result<()>;
    /// Starts `job`; its events (each sample's tokens, then `Finished`, or one
    /// `Failed`) go to `job.events`. Must not block.
    fn run(&self, job: ExternalJob);
    /// Whether at least one upstream answers its health probe (`/readyz`).
    fn is_healthy(&self) -> bool;
    /// Each upstream's health, load, latency and errors, for `/readyz`.
    fn status(&self) -> serde_json::Value;
}

/// A request handed to an [`ExternalRunner`].
pub struct ExternalJob {
    pub id: u64,
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<Event>,
    /// The request's place in the engine's queue: hold it while the request
    /// waits for an upstream slot, drop it once it runs.
    pub queued: QueueSlot,
}

/// A request's reservation in the engine's bounded queue, released on drop.
pub struct QueueSlot {
    account: Arc<QueueAccount>,
    stats: Arc<EngineStats>,
    /// What the release needs of the request (its tenant and samples), without its prompt.
    shape: GenerateRequest,
}

impl QueueSlot {
    pub(super) fn new(account: Arc<QueueAccount>, stats: Arc<EngineStats>, request: &GenerateRequest) -> Self {
        let mut shape = GenerateRequest::new(Vec::new(), 0);
        shape.tenant = request.tenant.clone();
        shape.n = request.n;
        shape.best_of = request.best_of;
        stats.queue_depth.store(account.depth(), Ordering::Relaxed);
        Self { account, stats, shape }
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.account.release(&self.shape);
        self.stats.queue_depth.store(self.account.depth(), Ordering::Relaxed);
    }
}
