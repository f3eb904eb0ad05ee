//! `instructd train`: the continuous trainer process. It ingests the streams
//! durably (exactly once, surviving kill -9), builds dataset snapshots when
//! enough new data arrived or the period passed, and refreshes from each
//! snapshot: SFT on new demonstrations, a reward model on new rankings. New
//! policies are published to the checkpoint store and announced on
//! `instructd:checkpoints` for the gateway to roll out. Training runs on this
//! process's one thread: ingestion waits meanwhile (entries stay in Redis).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use feedback::RedisLink;
use inference::checkpoint::CheckpointStore;
use trainer::ingest::Ingestor;
use trainer::refresh::Refresher;
use trainer::snapshot::{self, Filters};
use trainer::store::DatasetStore;

use crate::config::Config;

#[derive(Args)]
pub struct TrainArgs {
    /// Configuration file (default: configs/default.toml, or INSTRUCTD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(train(config))
}

async fn train(config: Config) -> anyhow::Result<()> {
    let trainer = config.trainer.clone();
    let link = Arc::new(RedisLink::for_blocking_reads(&config.redis.url, Duration::from_millis(trainer.block_ms))?);
    let mut store = DatasetStore::open(&trainer.data_dir)
        .with_context(|| format!("opening the dataset store in {}", trainer.data_dir.display()))?;
    let mut ingestor = Ingestor::new(link.clone(), trainer.clone());
    let checkpoints_dir = &config.gateway.rollout.checkpoints_dir;
    let checkpoints = CheckpointStore::open(checkpoints_dir)
        .with_context(|| format!("opening the checkpoint store {}", checkpoints_dir.display()))?;
    let mut refresher = Refresher::open(
        checkpoints,
        &config.model.dir,
        &trainer.data_dir,
        trainer.refresh.clone(),
        trainer.sft.clone(),
        trainer.reward_model.clone(),
    )?;
    let filters = Filters {
        max_prompts_per_user: trainer.max_prompts_per_user,
        dedupe_prefix_chars: trainer.dedupe_prefix_chars,
        split: config.gateway.playground.split,
    };
    println!(
        "instructd trainer consuming as {}/{} into {}",
        trainer.group,
        trainer.consumer,
        trainer.data_dir.display()
    );
    let mut groups_ready = false;
    let mut new_events = 0usize;
    let mut last_snapshot = Instant::now();
    let period = Duration::from_secs(trainer.snapshot_period_secs);
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        if !groups_ready {
            match ingestor.ensure_groups().await {
                Ok(()) => groups_ready = true,
                Err(e) => {
                    tracing::warn!(error = %e, "Redis unavailable; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            }
        }
        let step = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            step = ingestor.step(&mut store) => step,
        };
        match step {
            Ok(done) => {
                if done.stored > 0 {
                    tracing::info!(stored = done.stored, acknowledged = done.acknowledged, "ingested");
                }
                new_events += done.stored;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ingestion step failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        let due = new_events >= trainer.snapshot_min_events || (new_events > 0 && last_snapshot.elapsed() >= period);
        if due {
            let span = tracing::info_span!("snapshot", new_events);
            let _guard = span.enter();
            let data = snapshot::build(&store, &filters)?;
            let manifest = snapshot::write(&store, &trainer.data_dir, &data, &filters)?;
            tracing::info!(id = %manifest.id, counts = ?manifest.counts, excluded = ?manifest.excluded, "dataset snapshot");
            println!("snapshot {} {:?}", manifest.id, manifest.counts);
            new_events = 0;
            last_snapshot = Instant::now();
            drop(_guard);
            match refresher.after_snapshot(&manifest, &data) {
                Ok(published) => {
                    for p in published.into_iter().filter(|p| p.servable) {
                        match trainer::refresh::announce(&link, &p.manifest).await {
                            Ok(_) => println!("announced {}", p.manifest.id),
                            Err(e) => tracing::error!(
                                checkpoint = %p.manifest.id, error = %e,
                                "checkpoint not announced; load it with POST /admin/checkpoints/{{id}}/load"
                            ),
                        }
                    }
                }
                // A failed refresh leaves the serving model as it is; the next snapshot retries.
                Err(e) => tracing::error!(error = %e, "refresh failed"),
            }
        }
    }
}
