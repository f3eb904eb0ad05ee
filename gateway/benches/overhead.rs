//! What the gateway adds to a completion, measured in process (no network):
//! the same short prompt sent (a) straight to the engine and (b) through the
//! whole router (`POST /v1/completions`: auth, use-case policy, rate limits
//! in Redis, JSON in and out), plus (c) `GET /v1/models` (auth only, no
//! engine) and each step of the gate alone.
//!
//!   cargo bench -p gateway --bench overhead
//!
//! Runs on a tiny random-weight model (so the engine's share is small and the
//! gateway's shows) against a private `redis-server` (Debian's, on `PATH` or
//! `$REDIS_SERVER`). `OVERHEAD_ITERS` sets the iterations per row (default 300,
//! after 30 of warm-up). (a), (b) and (c) are interleaved, one of each per
//! iteration, so machine drift hits them alike.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::DType;
use feedback::RedisLink;
use feedback::redis_server::RedisServer;
use feedback::spill::Spill;
use gateway::policy::KeyPolicy;
use gateway::rollout::Rollout;
use gateway::state::Parts;
use gateway::{AppState, GatewayConfig, SharedState};
use inference::checkpoint::CheckpointStore;
use inference::engine::{EngineConfig, EngineHandle, GenerateRequest};
use inference::load::{LoadedModel, default_device};
use inference::tiny_model::{TinySpec, init_tiny};
use serde_json::{Value, json};
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ADMIN_KEY: &str = "sk-bench-admin-0123456789abcdef0123456789";
const MODEL_NAME: &str = "tiny";
const PROMPT: &str = "Say hi";
const WARMUP: usize = 30;

fn main() -> Result<(), BoxError> {
    let iterations: usize = match std::env::var("OVERHEAD_ITERS") {
        Ok(v) => v.parse().map_err(|_| format!("OVERHEAD_ITERS={v} is not a number"))?,
        Err(_) => 300,
    };
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join(MODEL_NAME);
    init_tiny(&model_dir, &TinySpec::default())?;
    let redis = RedisServer::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(&model_dir, &redis.url(), dir.path(), iterations))
}

async fn run(model_dir: &Path, redis_url: &str, scratch: &Path, iterations: usize) -> Result<(), BoxError> {
    let state = app_state(model_dir, redis_url, scratch)?;
    let router = gateway::router(state.clone());
    let secret = create_key(&router).await?;
    let key = state.keys.authenticate(&secret).await?;
    let engine = state.engine.current();
    let prompt_tokens = engine.tokenizer().encode(PROMPT, false)?;
    let completion_body =
        serde_json::to_vec(&json!({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}))?;

    // (a), (b), (c) interleaved.
    let mut direct = Vec::with_capacity(iterations);
    let mut routed = Vec::with_capacity(iterations);
    let mut models = Vec::with_capacity(iterations);
    for i in 0..WARMUP + iterations {
        let mut request = GenerateRequest::new(prompt_tokens.clone(), 1);
        request.sampling.temperature = 0.0;
        let started = Instant::now();
        let completion = engine.generate(request).await?;
        let a = started.elapsed();
        assert_eq!(completion.choices.len(), 1);

        let started = Instant::now();
        let response = call(&router, "POST", "/v1/completions", &secret, Some(completion_body.clone())).await?;
        let b = started.elapsed();
        assert_eq!(response["object"], "text_completion", "{response}");

        let started = Instant::now();
        let response = call(&router, "GET", "/v1/models", &secret, None).await?;
        let c = started.elapsed();
        assert_eq!(response["object"], "list", "{response}");

        if i >= WARMUP {
            direct.push(a);
            routed.push(b);
            models.push(c);
        }
    }

    // The steps of the gate alone.
    let auth = time(iterations, || async {
        state.keys.authenticate(&secret).await.expect("known key");
    })
    .await;
    let key_policy = KeyPolicy { allowed_use_cases: &key.use_cases, approved_domains: &key.approved_domains };
    let policy = time(iterations, || async {
        state.policy.check(PROMPT, None, &key_policy).expect("allowed");
    })
    .await;
    let tokenize = time(iterations, || async {
        engine.tokenizer().encode(PROMPT, false).expect("tokenizes");
    })
    .await;
    let charge = (prompt_tokens.len() + 1) as u64;
    let admit = time(iterations, || async {
        let admission = state.limiter.admit(&key.id, &key.limits, charge).await.expect("admitted");
        // Settled outside the timing, as the gateway does after the response.
        tokio::spawn(admission.finish(charge));
    })
    .await;
    let admit_finish = time(iterations, || async {
        let admission = state.limiter.admit(&key.id, &key.limits, charge).await.expect("admitted");
        admission.finish(charge).await;
    })
    .await;
    assert!(state.limiter.shared_mode(), "rate limits fell back to local: Redis was not used");

    println!();
    println!(
        "Gateway overhead, in process: tiny model (1 compute thread), private Redis, {} cores, {iterations} iterations per row",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!();
    println!("| step | p50 µs | p99 µs | mean µs |");
    println!("|---|---:|---:|---:|");
    let rows: [(&str, &[Duration]); 8] = [
        ("(a) engine.generate, max_tokens 1 (no gateway)", &direct),
        ("(b) POST /v1/completions through the router, max_tokens 1", &routed),
        ("(c) GET /v1/models through the router (auth only)", &models),
        ("keys.authenticate (cached)", &auth),
        ("policy.check (use-case classifier)", &policy),
        ("tokenizer.encode(prompt)", &tokenize),
        ("limiter.admit (1 Redis round trip)", &admit),
        ("limiter.admit + finish (2 Redis round trips)", &admit_finish),
    ];
    for (name, samples) in rows {
        let s = Stats::of(samples);
        println!("| {name} | {:.1} | {:.1} | {:.1} |", s.p50, s.p99, s.mean);
    }
    let (a, b) = (Stats::of(&direct), Stats::of(&routed));
    println!();
    println!("gateway overhead = (b) - (a) = {:.1} µs at p50 ({:.1} µs at the mean)", b.p50 - a.p50, b.mean - a.mean);
    Ok(())
}

/// The same state `instructd serve` builds, on `model_dir` and `redis_url`.
fn app_state(model_dir: &Path, redis_url: &str, scratch: &Path) -> Result<SharedState, BoxError> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = GatewayConfig {
        admin_key: Some(ADMIN_KEY.into()),
        use_case_rules: repo.join("configs/use_cases.toml"),
        playground: gateway::config::PlaygroundConfig {
            notice_file: repo.join("configs/training_notice.md"),
            ..Default::default()
        },
        ..GatewayConfig::default()
    };
    let link = Arc::new(RedisLink::new(redis_url)?);
    let spill = Spill::open(&scratch.join("feedback.jsonl"), 64 << 20)?;
    // The tiny model gains nothing from several compute threads.
    let engine_config = EngineConfig { compute_threads: 1, ..EngineConfig::default() };
    let engine = LoadedModel::load(model_dir, DType::F32, &default_device())?.into_engine(
        MODEL_NAME,
        MODEL_NAME,
        engine_config.clone(),
    )?;
    let checkpoints = CheckpointStore::open(&scratch.join("checkpoints"))?;
    let rollout = Arc::new(Rollout::new(checkpoints, config.rollout.clone(), engine_config, MODEL_NAME, "f32"));
    // As in `instructd serve`, including the Prometheus recorder, so metrics cost what they cost there.
    Ok(Arc::new(AppState::assemble(Parts {
        config,
        redis: link,
        engine: Arc::new(EngineHandle::new(engine)),
        rollout,
        spill,
    })?))
}

/// A key that no limit will stop (counted in Redis all the same), through the admin API.
async fn create_key(router: &Router) -> Result<String, BoxError> {
    let body = json!({
        "user": "bench",
        "scopes": ["completions"],
        "limits": {"requests_per_minute": 1_000_000, "tokens_per_minute": 0, "max_concurrent": 0},
    });
    let key = call(router, "POST", "/admin/keys", ADMIN_KEY, Some(serde_json::to_vec(&body)?)).await?;
    key["secret"].as_str().map(str::to_string).ok_or_else(|| format!("no secret in {key}").into())
}

/// One request through the router; the whole body read and parsed.
async fn call(
    router: &Router,
    method: &str,
    path: &str,
    secret: &str,
    body: Option<Vec<u8>>,
) -> Result<Value, BoxError> {
    let builder = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {secret}"));
    let request = match body {
        Some(bytes) => builder.header("content-type", "application/json").body(Body::from(bytes))?,
        None => builder.body(Body::empty())?,
    };
    let response = router.clone().oneshot(request).await?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    if !(status.is_success() || status == StatusCode::CREATED) {
        return Err(format!("{method} {path}: {status}: {}", String::from_utf8_lossy(&bytes)).into());
    }
    Ok(serde_json::from_slice(&bytes)?)
}

async fn time<F, Fut>(iterations: usize, mut step: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..WARMUP + iterations {
        let started = Instant::now();
        step().await;
        if i >= WARMUP {
            samples.push(started.elapsed());
        }
    }
    samples
}

/// p50, p99 and mean, in microseconds.
struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

impl Stats {
    fn of(samples: &[Duration]) -> Self {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1];
        Self { p50: at(0.5), p99: at(0.99), mean: us.iter().sum::<f64>() / us.len() as f64 }
    }
}
