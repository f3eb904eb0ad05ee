//! One module per subcommand.

pub mod bench;
pub mod generate;
pub mod model;

use std::path::Path;

use anyhow::Context;
use inference::engine::{Engine, EngineConfig};
use inference::load::{LoadedModel, default_device};
use inference::model_files::parse_dtype;

/// Loads a model directory and starts an engine on it; shared by the
/// subcommands that generate.
pub fn start_engine(model_dir: &Path, dtype: &str, config: EngineConfig) -> anyhow::Result<Engine> {
    let dtype = parse_dtype(dtype)?;
    let loaded = LoadedModel::load(model_dir, dtype, &default_device())
        .with_context(|| format!("loading model from {}", model_dir.display()))?;
    let name = model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(loaded.into_engine(&name, &name, config)?)
}
