//! `instructd serve`: the gateway on the configured model, Redis and address.
//!
//! Redis being down at startup is not fatal: the gateway serves with local
//! rate limits and reconnects when Redis returns (`/readyz` says which).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use feedback::spill::Spill;
use feedback::{RedisLink, retention, streams};
use gateway::rollout::{self, Rollout};
use gateway::state::{AppState, Parts};
use inference::checkpoint::CheckpointStore;
use inference::engine::{EngineHandle, EngineKind};
use tokio::net::TcpListener;

use crate::config::Config;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (default: configs/default.toml, or INSTRUCTD_CONFIG).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    // Refuse a bad gateway setting (a short admin key...) before the model loads.
    config.gateway.validate()?;
    if config.engine.kind == EngineKind::OpenaiHttp {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(async {
            let engine = start_external_engine(&config).await?;
            serve(config, engine).await
        });
    }
    let engine = super::start_engine_as(
        &config.model.dir,
        &config.model.dtype,
        config.model.serve_dtype,
        config.model.name.as_deref(),
        config.engine.clone(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config, engine))
}

/// `[engine] kind = "openai_http"`: upstream servers run the model; the gateway reads only `[model] dir`'s config
/// and tokenizer (named and fingerprinted as with the built-in engine).
async fn start_external_engine(config: &Config) -> anyhow::Result<inference::engine::Engine> {
    let dir = &config.model.dir;
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let name = config.model.name.clone().unwrap_or_else(|| dir_name.clone());
    let checkpoints_dir = &config.gateway.rollout.checkpoints_dir;
    gateway::upstream::start_engine(dir, &name, &dir_name, config.engine.clone(), checkpoints_dir)
        .await
        .with_context(|| format!("starting the openai_http engine on {}", dir.display()))
}

async fn serve(config: Config, engine: inference::engine::Engine) -> anyhow::Result<()> {
    let gateway_config = config.gateway.clone();
    let link = Arc::new(RedisLink::new(&config.redis.url)?);
    if !link.ping().await {
        tracing::warn!(url = %link.shown_url(), "Redis is unreachable: serving with local rate limits until it returns");
    } else {
        if let Some(durable) = feedback::redis_persistence::check_at_start(&link, link.shown_url()).await {
            gateway::metrics::set_redis_persistence(durable);
        }
    }
    let listener =
        TcpListener::bind(&gateway_config.addr).await.with_context(|| format!("binding {}", gateway_config.addr))?;
    let address = listener.local_addr()?;
    let playground = &gateway_config.playground;
    // One spill file per listening port, so replicas on one machine never share one.
    std::fs::create_dir_all(&playground.spill_dir)
        .with_context(|| format!("creating {}", playground.spill_dir.display()))?;
    let spill_path = playground.spill_dir.join(format!("feedback-{}.jsonl", address.port()));
    let spill = Spill::open(&spill_path, playground.spill_capacity_bytes)
        .with_context(|| format!("opening the feedback spill {}", spill_path.display()))?;
    let trimmer = tokio::spawn(trim_streams(
        link.clone(),
        playground.consumer_groups.clone(),
        Duration::from_secs(playground.trim_interval_secs.max(1)),
    ));
    let rollout_config = gateway_config.rollout.clone();
    let checkpoints = CheckpointStore::open(&rollout_config.checkpoints_dir)
        .with_context(|| format!("opening the checkpoint store {}", rollout_config.checkpoints_dir.display()))?;
    let model_name = engine.info().name.clone();
    let rollout = Arc::new(
        Rollout::new(checkpoints, rollout_config.clone(), config.engine.clone(), &model_name, &config.model.dtype)
            .with_serve_dtype(config.model.serve_dtype)
            .with_initial(&engine.info().checkpoint, &config.model.dir),
    );
    let engine = Arc::new(EngineHandle::new(engine));
    // Blocking reads hold their connection: the watcher gets its own.
    let watch_link = Arc::new(RedisLink::for_blocking_reads(&config.redis.url, rollout::WATCH_BLOCK)?);
    let watcher =
        rollout_config.watch.then(|| tokio::spawn(rollout::watch(rollout.clone(), engine.clone(), watch_link)));
    let state = Arc::new(AppState::assemble(Parts {
        config: gateway_config.clone(),
        redis: link.clone(),
        engine,
        rollout,
        spill,
    })?);
    let replayer = state.events.spawn_replayer(Duration::from_secs(1));
    // Key changes announced by any replica (revocations) leave this one's cache at once.
    let invalidations = state.keys.spawn_invalidations();
    // Promotes or refuses candidates by the arena's votes, when the operator chose that gate.
    let vote_gate = gateway_config.arena.gate.then(|| tokio::spawn(gateway::vote_gate::run(state.clone())));
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
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    replayer.abort();
    invalidations.abort();
    if let Some(vote_gate) = vote_gate {
        vote_gate.abort();
    }
    // Launched upstreams are this gateway's children: SIGTERM them (they would get SIGKILL when it exits anyway).
    tokio::task::spawn_blocking(gateway::upstream::launch::stop_all).await?;
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
