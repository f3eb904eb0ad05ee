//! `instructd serve`: the gateway on the configured model, Redis and address.
//!
//! Redis being down at startup is not fatal: the gateway serves with local
//! rate limits and reconnects when Redis returns (`/readyz` says which).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use feedback::consent::ConsentStore;
use feedback::event_log::EventLog;
use feedback::labeling::LabelingQueue;
use feedback::logged_prompts::LoggedPrompts;
use feedback::pii::PiiScreen;
use feedback::spill::Spill;
use feedback::{RedisLink, retention, streams};
use gateway::AppState;
use gateway::keys::KeyStore;
use gateway::policy::{AuditLog, Policy, RuleClassifier};
use gateway::rate_limit::RateLimiter;
use inference::engine::EngineHandle;
use tokio::net::TcpListener;

use crate::config::Config;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (default: configs/default.toml, or INSTRUCTD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let engine = super::start_engine_as(
        &config.model.dir,
        &config.model.dtype,
        config.model.name.as_deref(),
        config.engine.clone(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config, engine))
}

async fn serve(config: Config, engine: inference::engine::Engine) -> anyhow::Result<()> {
    let gateway_config = config.gateway.clone();
    let link = Arc::new(RedisLink::new(&config.redis.url)?);
    if !link.ping().await {
        tracing::warn!(url = %config.redis.url, "Redis is unreachable: serving with local rate limits until it returns");
    }
    let classifier = RuleClassifier::from_file(&gateway_config.use_case_rules)
        .with_context(|| format!("loading use-case rules from {}", gateway_config.use_case_rules.display()))?;
    let prefix = gateway_config.redis_prefix.clone();
    let listener =
        TcpListener::bind(&gateway_config.addr).await.with_context(|| format!("binding {}", gateway_config.addr))?;
    let address = listener.local_addr()?;
    let playground = &gateway_config.playground;
    let notice_text = std::fs::read_to_string(&playground.notice_file)
        .with_context(|| format!("reading the training-use notice {}", playground.notice_file.display()))?;
    playground.split.validate().map_err(|e| anyhow::anyhow!("[gateway.playground.split]: {e}"))?;
    // One spill file per listening port, so replicas on one machine never share one.
    std::fs::create_dir_all(&playground.spill_dir)
        .with_context(|| format!("creating {}", playground.spill_dir.display()))?;
    let spill_path = playground.spill_dir.join(format!("feedback-{}.jsonl", address.port()));
    let spill = Spill::open(&spill_path, playground.spill_capacity_bytes)
        .with_context(|| format!("opening the feedback spill {}", spill_path.display()))?;
    let events = Arc::new(EventLog::new(
        link.clone(),
        spill,
        &format!("{prefix}:event"),
        Duration::from_secs(playground.idempotency_ttl_secs),
    ));
    let replayer = events.spawn_replayer(Duration::from_secs(1));
    let trimmer = tokio::spawn(trim_streams(
        link.clone(),
        playground.consumer_groups.clone(),
        Duration::from_secs(playground.trim_interval_secs.max(1)),
    ));
    let state = Arc::new(AppState {
        consent: ConsentStore::new(link.clone(), &prefix),
        prompts: LoggedPrompts::new(link.clone(), &prefix),
        labeling: LabelingQueue::new(
            link.clone(),
            &prefix,
            Duration::from_secs(playground.labeling_lease_secs),
            playground.labels_per_prompt,
        ),
        events,
        pii: PiiScreen::new(),
        notice_text,
        keys: KeyStore::new(link.clone(), &prefix, gateway_config.default_limits, gateway_config.admin_key.as_deref()),
        limiter: RateLimiter::new(link.clone(), &format!("{prefix}:rl")),
        policy: Policy::new(Arc::new(classifier)),
        audit: AuditLog::new(
            link.clone(),
            gateway_config.max_refusals,
            Duration::from_secs(gateway_config.refusal_window_secs),
        ),
        engine: Arc::new(EngineHandle::new(engine)),
        redis: link,
        metrics: gateway::metrics::install(),
        config: gateway_config.clone(),
    });
    // Tests and scripts read this line to find the port when addr ends in :0.
    println!("instructd gateway listening on http://{address}");
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        super::shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stopping_tx.send(());
    };
    let grace = Duration::from_secs(gateway_config.shutdown_grace_secs);
    tokio::select! {
        result = gateway::serve(state, listener, shutdown) => result?,
        _ = async { if stopping_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending().await } } => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over with requests still in flight; exiting");
        }
    }
    trimmer.abort();
    replayer.abort();
    Ok(())
}

/// Trims the training streams below what every consumer group acknowledged.
async fn trim_streams(link: Arc<RedisLink>, groups: Vec<String>, every: Duration) {
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    loop {
        tokio::time::sleep(every).await;
        for stream in [streams::PROMPTS, streams::FEEDBACK] {
            match retention::trim_acknowledged(&link, stream, &groups).await {
                Ok(0) => {}
                Ok(trimmed) => tracing::info!(stream, trimmed, "trimmed acknowledged entries"),
                Err(e) => tracing::debug!(stream, error = %e, "stream not trimmed"),
            }
        }
    }
}
