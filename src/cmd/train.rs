//! `instructd train`: the continuous trainer process. It ingests the streams
//! durably (exactly once, surviving kill -9), builds dataset snapshots when
//! enough new data arrived or the period passed, and refreshes from each
//! snapshot: SFT on new demonstrations, a reward model on new rankings,
//! PPO-ptx once a reward model exists, each policy through the evaluation
//! gate. Policies that pass are published to the checkpoint store and
//! announced on `instructd:checkpoints` for the gateway to roll out. Training
//! runs on a blocking thread while ingestion waits (entries stay in Redis);
//! Prometheus metrics stay served on `[trainer] metrics_addr`, progress bars
//! show on a terminal, and `<data_dir>/training.jsonl` records every stage.

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

/// Serves Prometheus `/metrics` (the trainer's journal gauges and counters) on `addr`, in the background, and the
/// checkpoint directory `checkpoints` read-only beside it when given.
async fn serve_metrics(addr: &str, checkpoints: Option<&std::path::Path>) -> anyhow::Result<()> {
    if addr.is_empty() {
        return Ok(());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Metrics are for watching; a taken port must not stop training.
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(addr, error = %e, "trainer metrics not served: cannot bind [trainer] metrics_addr");
            return Ok(());
        }
    };
    println!("instructd trainer metrics on http://{}/metrics", listener.local_addr()?);
    let mut app = axum::Router::new().route("/metrics", axum::routing::get(move || async move { handle.render() }));
    if let Some(root) = checkpoints {
        app = app.merge(crate::checkpoint_files::router(root));
        println!("instructd trainer checkpoints on http://{}/checkpoints/", listener.local_addr()?);
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Progress bars for the refresh stages: iterations for PPO, a spinner with the elapsed time for the others.
/// Drawn on stderr when it is a terminal; one plain line per finished stage on stdout either way.
#[derive(Default)]
struct Bars {
    bar: Option<indicatif::ProgressBar>,
}

impl trainer::refresh::Progress for Bars {
    fn stage_started(&mut self, stage: &str, checkpoint: &str, iterations: Option<usize>) {
        let bar = match iterations {
            Some(n) => indicatif::ProgressBar::new(n as u64).with_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} iterations {elapsed} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            ),
            None => {
                let spinner = indicatif::ProgressBar::new_spinner().with_style(
                    indicatif::ProgressStyle::with_template("{spinner} {prefix} {elapsed} {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                spinner.enable_steady_tick(Duration::from_millis(200));
                spinner
            }
        };
        bar.set_prefix(format!("{stage} {checkpoint}"));
        self.bar = Some(bar);
    }

    fn ppo_iteration(&mut self, it: &trainer::ppo::PpoIteration) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "reward {:+.4}  KL {:.3}  entropy {:.3}  clip {:.3}",
                it.reward_mean, it.kl, it.entropy, it.clip_fraction
            ));
            bar.inc(1);
        }
    }

    fn stage_finished(&mut self, stage: &str, checkpoint: &str, outcome: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            println!("{stage} {checkpoint}: {outcome} after {:.1} s", bar.elapsed().as_secs_f64());
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Configuration file (default: configs/default.toml, or INSTRUCTD_CONFIG).
    #[arg(long)]
    pub config: Option<PathBuf>,
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
    if !trainer.corpus.dir.is_dir() {
        tracing::warn!(
            dir = %trainer.corpus.dir.display(),
            "no pre-training corpus: PPO-ptx and the alignment-tax check will fail until \
             `instructd model fetch-corpus` has run"
        );
    }
    let mut refresher = Refresher::open(checkpoints, &config.model.dir, &trainer.data_dir, trainer.clone())?
        .with_progress(Box::new(Bars::default()));
    let source = Some(trainer.checkpoints_url.trim_end_matches('/').to_string()).filter(|url| !url.is_empty());
    serve_metrics(&trainer.metrics_addr, source.as_ref().map(|_| checkpoints_dir.as_path())).await?;
    let filters = Filters {
        max_prompts_per_user: trainer.max_prompts_per_user,
        dedupe_prefix_chars: trainer.dedupe_prefix_chars,
        split: config.gateway.playground.split,
        labeler_qc: trainer.labeler_qc.clone(),
    };
    println!(
        "instructd trainer consuming as {}/{} into {}",
        trainer.group,
        trainer.consumer,
        trainer.data_dir.display()
    );
    let mut groups_ready = false;
    // Data already in the store gets a snapshot at once: a refresh a stop interrupted runs again (its stage
    // never saved its progress), and one that finished finds nothing new to do.
    let stored = [feedback::streams::PROMPTS, feedback::streams::FEEDBACK]
        .iter()
        .any(|stream| store.last_id(stream) != trainer::store::StreamId::default());
    let mut new_events = if stored { trainer.snapshot_min_events.max(1) } else { 0 };
    let mut last_snapshot = Instant::now();
    let period = Duration::from_secs(trainer.snapshot_period_secs);
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    // A second listener for the refresh thread: stages stop at their next step boundary (`trainer::stop`).
    tokio::spawn(async {
        super::shutdown_signal().await;
        tracing::info!("stop requested: the running stage ends at its next step");
        trainer::stop::request();
    });
    loop {
        if !groups_ready {
            match ingestor.ensure_groups().await {
                Ok(()) => {
                    groups_ready = true;
                    // Entries the trainer has not stored yet live only in Redis.
                    if let Some(durable) = feedback::redis_persistence::check_at_start(&link, link.shown_url()).await {
                        metrics::gauge!("instructd_trainer_redis_persistence").set(if durable { 1.0 } else { 0.0 });
                    }
                }
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
            // Training runs on a blocking thread so this runtime keeps serving /metrics meanwhile;
            // ingestion waits (entries stay in Redis). Each servable checkpoint is announced as soon as its
            // stage ends, not after the stages that follow it.
            let (announce_tx, mut announce_rx) = tokio::sync::mpsc::unbounded_channel::<trainer::refresh::Published>();
            let announcer = {
                let (link, source) = (link.clone(), source.clone());
                tokio::spawn(async move {
                    while let Some(p) = announce_rx.recv().await {
                        match trainer::refresh::announce(&link, &p.manifest, source.as_deref()).await {
                            Ok(_) => println!("announced {}", p.manifest.id),
                            Err(e) => tracing::error!(
                                checkpoint = %p.manifest.id, error = %e,
                                "checkpoint not announced; load it with POST /admin/checkpoints/{{id}}/load"
                            ),
                        }
                    }
                })
            };
            let (back, outcome) = tokio::task::spawn_blocking(move || {
                let outcome = refresher.after_snapshot(&manifest, &data, &mut |p| {
                    if p.servable {
                        // The receiver lives until this thread is done.
                        let _ = announce_tx.send(p.clone());
                    }
                });
                (refresher, outcome)
            })
            .await
            .context("the refresh thread panicked")?;
            refresher = back;
            announcer.await.context("the announcing task panicked")?;
            if trainer::stop::requested() {
                tracing::info!("stopped; a restart resumes from the store");
                return Ok(());
            }
            // A failed refresh leaves the serving model as it is; the next snapshot retries.
            if let Err(e) = outcome {
                tracing::error!(error = %e, "refresh failed");
            }
        }
    }
}
