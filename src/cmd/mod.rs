//! One module per subcommand.

pub mod bench;
pub mod bench_quality;
pub mod bench_train;
pub mod generate;
pub mod model;
pub mod serve;
pub mod simulate_labelers;
pub mod train;
pub mod win_rate;

use std::path::Path;

use anyhow::Context;
use inference::engine::{Engine, EngineConfig};
use inference::load::{LoadedModel, default_device};
use inference::model_files::parse_dtype;
use inference::quant::ServeDtype;

/// Loads a model directory and starts an engine on it; shared by the
/// subcommands that generate.
pub fn start_engine(model_dir: &Path, dtype: &str, config: EngineConfig) -> anyhow::Result<Engine> {
    start_engine_as(model_dir, dtype, ServeDtype::F32, None, config)
}

/// As [`start_engine`], with the projections packed in `serve_dtype`, serving under `name` (the directory name
/// when `None`).
pub fn start_engine_as(
    model_dir: &Path,
    dtype: &str,
    serve_dtype: ServeDtype,
    name: Option<&str>,
    config: EngineConfig,
) -> anyhow::Result<Engine> {
    let dtype = parse_dtype(dtype)?;
    let loaded = LoadedModel::load(model_dir, dtype, &default_device())
        .and_then(|loaded| loaded.with_serve_dtype(serve_dtype))
        .with_context(|| format!("loading model from {}", model_dir.display()))?;
    let dir_name = model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let name = name.map(str::to_string).unwrap_or_else(|| dir_name.clone());
    Ok(loaded.into_engine(&name, &dir_name, config)?)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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

/// Peak resident set size of this process (VmHWM), in KiB.
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU's model name (from `/proc/cpuinfo`), for benchmark headers.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
