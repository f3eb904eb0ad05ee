//! `[engine] kind = "openai_http"`: generation requests that passed the
//! gateway's own checks (auth, rate limits, fair-share queue, use-case
//! policy) run on upstream OpenAI-compatible servers (vLLM, SGLang,
//! llama-server) instead of this process.
//!
//! The pool is an [`ExternalRunner`] inside an [`Engine`], so the generation
//! path, the swap handle, canary, pinning and `system_fingerprint` stay the
//! built-in engine's. Requests go to the healthy upstream with the fewest in
//! flight, at most `max_concurrency` per upstream; the rest wait in the
//! engine's bounded queue (429/503 when it is full, as with the built-in one).
//!
//! The upstreams are either static (`upstreams`, run by the operator) or
//! launched by the gateway, one process per checkpoint ([`launch`],
//! [`blue_green`]): then each engine's pool holds its own process.

pub mod blue_green;
mod call;
mod health;
pub mod launch;
mod request;
pub mod sse;
mod stats;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inference::engine::{
    Engine, EngineConfig, Event, ExternalJob, ExternalRunner, FinishReason, GenerateRequest, OpenAiHttpConfig,
};
use serde_json::{Value, json};

use stats::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("[engine.openai_http] upstreams is empty: name at least one base URL (http://host:port)")]
    NoUpstreams,
    #[error(
        "[engine.openai_http] names both upstreams and a launch command: the gateway either forwards to static \
         upstreams or launches its own, not both"
    )]
    LaunchAndStatic,
    #[error("[engine.openai_http] upstream {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("[engine.openai_http] ca_file {path}: {reason}")]
    CaFile { path: std::path::PathBuf, reason: String },
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Model(#[from] inference::Error),
    #[error(transparent)]
    Launch(#[from] launch::LaunchError),
}

/// The upstreams and the HTTP client that reaches them.
pub struct Pool {
    upstreams: Vec<Upstream>,
    client: reqwest::Client,
    config: OpenAiHttpConfig,
    /// The process behind the one upstream of a launched pool: stopped when the pool drops, i.e. once its engine
    /// was replaced and every call on it has ended.
    process: Option<launch::Process>,
}

impl Pool {
    pub fn new(config: &OpenAiHttpConfig) -> Result<Self, UpstreamError> {
        if config.upstreams.is_empty() {
            return Err(UpstreamError::NoUpstreams);
        }
        if let Some(bad) = config.upstreams.iter().find(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            return Err(UpstreamError::BadUrl(bad.clone()));
        }
        let upstreams = config.upstreams.iter().map(|base| Upstream::new(base, config.max_concurrency, true)).collect();
        Ok(Self { upstreams, client: client(config)?, config: config.clone(), process: None })
    }

    /// A pool of one upstream, `base`, served by `process` (not tried until a probe finds it healthy).
    pub fn launched(config: &OpenAiHttpConfig, base: &str, process: launch::Process) -> Result<Self, UpstreamError> {
        let upstreams = vec![Upstream::new(base, config.max_concurrency, false)];
        Ok(Self { upstreams, client: client(config)?, config: config.clone(), process: Some(process) })
    }

    /// The upstream for the next attempt: not tried yet, healthy, fewest in flight (ties: the first). When every
    /// upstream was tried, the least busy overall; an unhealthy one only when no healthy one is left.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let rank = |i: &usize| {
            let upstream = &self.upstreams[*i];
            (tried.contains(i), !upstream.is_healthy(), upstream.in_flight())
        };
        (0..self.upstreams.len()).min_by_key(rank)
    }
}

/// The client for every upstream: `https://` ones verified against the system's and Mozilla's roots and `ca_file`'s.
fn client(config: &OpenAiHttpConfig) -> Result<reqwest::Client, UpstreamError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(config.connect_timeout_secs.max(1)))
        .tcp_nodelay(true);
    if !config.ca_file.as_os_str().is_empty() {
        let ca_error = |reason: String| UpstreamError::CaFile { path: config.ca_file.clone(), reason };
        let pem = std::fs::read(&config.ca_file).map_err(|e| ca_error(e.to_string()))?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.to_string()))?;
        if roots.is_empty() {
            return Err(ca_error("no PEM certificate in it".into()));
        }
        for root in roots {
            builder = builder.add_root_certificate(root);
        }
    }
    Ok(builder.build()?)
}

/// The pool as the engine's runner: each request's samples run as separate upstream calls.
struct Runner(Arc<Pool>);

impl ExternalRunner for Runner {
    fn check(&self, request: &GenerateRequest, _streaming: bool) -> inference::Result<()> {
        request::check(request)?;
        if !self.is_healthy() {
            let count = self.0.upstreams.len();
            return Err(inference::Error::UpstreamUnavailable(format!(
                "none of the {count} upstream(s) answers its health probe"
            )));
        }
        Ok(())
    }

    fn run(&self, job: ExternalJob) {
        let ExternalJob { id, request, events, queued } = job;
        let span = tracing::info_span!("upstream_request", id, samples = request.samples());
        if request.echo {
            // The prompt's text is the gateway's own; no log-probabilities were asked for (they are refused).
            let _ = events.send(Event::Prompt { tokens: Vec::new() });
        }
        if request.max_tokens == 0 {
            for index in 0..request.n {
                let _ = events.send(Event::Finished {
                    index,
                    reason: FinishReason::Length,
                    completion_tokens: 0,
                    mean_logprob: 0.0,
                });
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let message = "an external engine runs requests on the gateway's async runtime only".to_string();
            let _ = events.send(Event::Failed { message });
            return;
        };
        let request = Arc::new(request);
        let queued = Arc::new(Mutex::new(Some(queued)));
        for sample in 0..request.n {
            let call = call::run_sample(self.0.clone(), request.clone(), sample, events.clone(), queued.clone());
            runtime.spawn(tracing::Instrument::instrument(call, span.clone()));
        }
    }

    fn is_healthy(&self) -> bool {
        self.0.upstreams.iter().any(Upstream::is_healthy)
    }

    fn status(&self) -> Value {
        let mut upstreams: Vec<Value> = self.0.upstreams.iter().map(Upstream::status).collect();
        if let (Some(process), [upstream]) = (&self.0.process, upstreams.as_mut_slice()) {
            upstream["process"] = process.status();
        }
        json!({ "kind": "openai_http", "upstreams": upstreams })
    }
}

/// The serving engine for `kind = "openai_http"`: the upstreams probed once, then every `health_interval_secs`;
/// `model_dir`'s config and tokenizer (the weights the upstreams serve) for validation and accounting. The
/// fingerprint is `openai_http.checkpoint`, else `default_checkpoint` (the model directory's name). With
/// `[engine.openai_http.launch]`, an upstream is started on `model_dir` first (see [`blue_green`]), its
/// conversion and log under `checkpoints_dir`'s work directory.
pub async fn start_engine(
    model_dir: &Path,
    name: &str,
    default_checkpoint: &str,
    config: EngineConfig,
    checkpoints_dir: &Path,
) -> Result<Engine, UpstreamError> {
    let checkpoint = match config.openai_http.checkpoint.as_str() {
        "" => default_checkpoint.to_string(),
        named => named.to_string(),
    };
    if config.openai_http.launch.is_enabled() {
        if !config.openai_http.upstreams.is_empty() {
            return Err(UpstreamError::LaunchAndStatic);
        }
        let work_dir = blue_green::work_dir(&config, checkpoints_dir);
        return blue_green::start(model_dir, name, &checkpoint, config, &work_dir).await;
    }
    let pool = Arc::new(Pool::new(&config.openai_http)?);
    health::probe_all(&pool).await;
    for upstream in pool.upstreams.iter().filter(|u| !u.is_healthy()) {
        tracing::warn!(upstream = %upstream.base, "upstream not healthy at startup; serving when it is");
    }
    // The probe task holds only a weak reference: it ends with the last engine using the pool.
    health::spawn(&pool);
    let runner: Arc<dyn ExternalRunner> = Arc::new(Runner(pool));
    Ok(inference::load::external_engine(model_dir, name, &checkpoint, config, runner)?)
}
