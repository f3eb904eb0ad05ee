//! Blue/green serving on launched upstreams: each checkpoint gets its own
//! upstream process (converted first as the engine needs: a GGUF export for
//! `{gguf}`), health-checked before it takes a request, wrapped in its own
//! [`Engine`] whose `system_fingerprint` is that checkpoint.
//!
//! The rollout swaps engines as it does for the built-in one (canary,
//! promotion, rollback): new requests go to the new engine, requests in flight
//! finish on the upstream they started on. The process belongs to the engine's
//! pool, which every running upstream call holds, so the old process is
//! stopped when the old engine is replaced and its last request has ended:
//! draining needs no timer, and no request can straddle two checkpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use inference::engine::{Engine, EngineConfig, ExternalRunner};

use super::launch::{self, LaunchError, Placeholders, Process};
use super::{Pool, Runner, UpstreamError, health};

/// Where GGUF exports and upstream logs go: `launch.work_dir`, else `.upstreams` in the checkpoint store.
pub fn work_dir(config: &EngineConfig, checkpoints_dir: &Path) -> PathBuf {
    match &config.openai_http.launch.work_dir {
        dir if dir.as_os_str().is_empty() => checkpoints_dir.join(".upstreams"),
        dir => dir.clone(),
    }
}

/// Starts an upstream on checkpoint `checkpoint` (its Hugging Face files in `dir`), waits until it is healthy,
/// and returns the engine that forwards to it alone. `work_dir` holds the conversion and the log.
pub async fn start(
    dir: &Path,
    name: &str,
    checkpoint: &str,
    config: EngineConfig,
    work_dir: &Path,
) -> Result<Engine, UpstreamError> {
    let span = tracing::info_span!("launch_upstream", checkpoint);
    tracing::Instrument::instrument(launch_and_wait(dir, name, checkpoint, config, work_dir), span).await
}

async fn launch_and_wait(
    dir: &Path,
    name: &str,
    checkpoint: &str,
    config: EngineConfig,
    work_dir: &Path,
) -> Result<Engine, UpstreamError> {
    let launch = &config.openai_http.launch;
    let own = work_dir.join(checkpoint);
    std::fs::create_dir_all(&own).map_err(|source| LaunchError::Io { path: own.clone(), source })?;
    let gguf = if launch::needs_gguf(&launch.command) {
        let (dir, dst, dtype) = (dir.to_path_buf(), own.join("model.gguf"), launch.gguf_dtype.clone());
        let converted = tokio::task::spawn_blocking(move || export_if_stale(&dir, &dst, &dtype).map(|()| dst));
        Some(converted.await.map_err(|e| LaunchError::Convert(e.to_string()))??)
    } else {
        None
    };
    let port = launch::free_port(&launch.host, launch.ports)?;
    let values = Placeholders { gguf: gguf.as_deref(), dir, host: &launch.host, port, checkpoint };
    let argv = launch::fill(&launch.command, &values);
    let log = own.join(format!("upstream-{port}.log"));
    let process = Process::spawn(argv, port, &log, Duration::from_secs(launch.stop_grace_secs))?;
    let base = format!("http://{}:{port}", launch.host);
    let pool = Arc::new(Pool::launched(&config.openai_http, &base, process)?);
    wait_healthy(&pool, Duration::from_secs(launch.health_timeout_secs.max(1))).await?;
    tracing::info!(upstream = %base, "launched upstream healthy");
    health::spawn(&pool);
    let runner: Arc<dyn ExternalRunner> = Arc::new(Runner(pool));
    Ok(inference::load::external_engine(dir, name, checkpoint, config, runner)?)
}

/// Probes the pool's upstream until it answers, its process exits, or `timeout` passes.
async fn wait_healthy(pool: &Pool, timeout: Duration) -> Result<(), LaunchError> {
    let started = Instant::now();
    let Some(process) = pool.process.as_ref() else { return Ok(()) };
    let log = process.log().display().to_string();
    loop {
        health::probe_all(pool).await;
        if pool.upstreams.iter().all(|u| u.is_healthy()) {
            return Ok(());
        }
        if let Some(status) = process.exited() {
            return Err(LaunchError::Exited { status, log, tail: process.log_tail() });
        }
        if started.elapsed() >= timeout {
            return Err(LaunchError::Unhealthy { secs: timeout.as_secs(), log, tail: process.log_tail() });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exports `dir` to GGUF at `dst` unless `dst` is newer than every file of `dir` (a checkpoint served again on
/// rollback is not converted twice; the export replaces `dst` atomically, so an existing one is whole).
fn export_if_stale(dir: &Path, dst: &Path, dtype: &str) -> Result<(), LaunchError> {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let newest_source = std::fs::read_dir(dir)
        .map_err(|source| LaunchError::Io { path: dir.to_path_buf(), source })?
        .flatten()
        .filter_map(|entry| modified(&entry.path()))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if modified(dst).is_some_and(|converted| converted >= newest_source) {
        return Ok(());
    }
    let dtype = inference::model_files::parse_dtype(dtype).map_err(|e| LaunchError::Convert(e.to_string()))?;
    let started = Instant::now();
    let tensors =
        inference::gguf_export::export_gguf(dir, dst, dtype).map_err(|e| LaunchError::Convert(e.to_string()))?;
    tracing::info!(gguf = %dst.display(), tensors, secs = started.elapsed().as_secs_f64(), "checkpoint exported to GGUF");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launch whose process dies before it is healthy fails with the process's own words, and leaves nothing
    /// running.
    #[tokio::test]
    async fn an_upstream_that_exits_early_fails_the_launch_with_its_log() {
        let scratch = tempfile::tempdir().unwrap();
        let model = scratch.path().join("tiny");
        inference::tiny_model::init_tiny(&model, &inference::tiny_model::TinySpec::default()).unwrap();
        let mut config = EngineConfig { kind: inference::engine::EngineKind::OpenaiHttp, ..Default::default() };
        config.openai_http.launch.command =
            ["sh", "-c", "echo cannot load {checkpoint} on {port}; exit 3"].map(String::from).into();
        let error = start(&model, "m", "ckpt-x", config, &scratch.path().join("work")).await.err().expect("fails");
        let text = error.to_string();
        assert!(text.contains("exited") && text.contains("cannot load ckpt-x on 181"), "{text}");
        assert!(scratch.path().join("work/ckpt-x").is_dir());
    }

    #[test]
    fn the_work_dir_defaults_to_a_dot_directory_in_the_store() {
        let mut config = EngineConfig::default();
        assert_eq!(work_dir(&config, Path::new("/c")), Path::new("/c/.upstreams"));
        config.openai_http.launch.work_dir = "/w".into();
        assert_eq!(work_dir(&config, Path::new("/c")), Path::new("/w"));
    }
}
