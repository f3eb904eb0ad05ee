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

mod call;
mod health;
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
    #[error("[engine.openai_http] upstream {0:?} is not an http:// URL")]
    BadUrl(String),
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Model(#[from] inference::Error),
}

/// The upstreams and the HTTP client that reaches them.
pub struct Pool {
    upstreams: Vec<Upstream>,
    client: reqwest::Client,
    config: OpenAiHttpConfig,
}

impl Pool {
    pub fn new(config: &OpenAiHttpConfig) -> Result<Self, UpstreamError> {
        if config.upstreams.is_empty() {
            return Err(UpstreamError::NoUpstreams);
        }
        if let Some(bad) = config.upstreams.iter().find(|u| !u.starts_with("http://")) {
            return Err(UpstreamError::BadUrl(bad.clone()));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(config.connect_timeout_secs.max(1)))
            .tcp_nodelay(true)
            .build()?;
        let upstreams = config.upstreams.iter().map(|base| Upstream::new(base, config.max_concurrency)).collect();
        Ok(Self { upstreams, client, config: config.clone() })
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
        json!({
            "kind": "openai_http",
            "upstreams": self.0.upstreams.iter().map(Upstream::status).collect::<Vec<_>>(),
        })
    }
}

/// The serving engine for `kind = "openai_http"`: the upstreams probed once, then every `health_interval_secs`;
/// `model_dir`'s config and tokenizer (the weights the upstreams serve) for validation and accounting. The
/// fingerprint is `openai_http.checkpoint`, else `default_checkpoint` (the model directory's name).
pub async fn start_engine(
    model_dir: &Path,
    name: &str,
    default_checkpoint: &str,
    config: EngineConfig,
) -> Result<Engine, UpstreamError> {
    let pool = Arc::new(Pool::new(&config.openai_http)?);
    health::probe_all(&pool).await;
    for upstream in pool.upstreams.iter().filter(|u| !u.is_healthy()) {
        tracing::warn!(upstream = %upstream.base, "upstream not healthy at startup; serving when it is");
    }
    // The probe task holds only a weak reference: it ends with the last engine using the pool.
    health::spawn(&pool);
    let checkpoint = match config.openai_http.checkpoint.as_str() {
        "" => default_checkpoint.to_string(),
        named => named.to_string(),
    };
    let runner: Arc<dyn ExternalRunner> = Arc::new(Runner(pool));
    Ok(inference::load::external_engine(model_dir, name, &checkpoint, config, runner)?)
}
