//! `instructd serve`: the gateway on the configured model, Redis and address.
//!
//! Redis being down at startup is not fatal: the gateway serves with local
//! rate limits and reconnects when Redis returns (`/readyz` says which).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use feedback::RedisLink;
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
    let state = Arc::new(AppState {
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
    let listener =
        TcpListener::bind(&gateway_config.addr).await.with_context(|| format!("binding {}", gateway_config.addr))?;
    // Tests and scripts read this line to find the port when addr ends in :0.
    println!("instructd gateway listening on http://{}", listener.local_addr()?);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown_signal().await;
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
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
