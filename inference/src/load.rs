//! From a model directory to a ready model: files checked, weights loaded,
//! tokenizer read, on the chosen device and dtype.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::engine::{Engine, EngineConfig, ModelInfo};
use crate::error::{Error, Result};
use crate::llama::Llama;
use crate::model_files::ModelFiles;
use crate::tokenizer::Tokenizer;

pub struct LoadedModel {
    pub files: ModelFiles,
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

impl LoadedModel {
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let files = ModelFiles::open(dir)?;
        let tensors = files.load_tensors(dtype, device)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        // Missing tensors and shape mismatches surface here; name the directory.
        let model = Llama::new(&files.config, vb).map_err(|e| match e {
            Error::Candle(inner) => Error::model_file(&files.dir, format!("weights do not match config.json: {inner}")),
            other => other,
        })?;
        let tokenizer = Tokenizer::from_dir(&files.dir)?.with_extra_eos(&files.config.eos_token_ids());
        if tokenizer.vocab_size() > files.config.vocab_size {
            return Err(Error::model_file(
                files.dir.join("tokenizer.json"),
                format!(
                    "tokenizer has {} tokens but config.json's vocab_size is {}",
                    tokenizer.vocab_size(),
                    files.config.vocab_size
                ),
            ));
        }
        Ok(Self { files, model, tokenizer })
    }

    /// Starts a serving engine on this model.
    pub fn into_engine(self, name: &str, checkpoint: &str, config: EngineConfig) -> Result<Engine> {
        let info = ModelInfo {
            name: name.to_string(),
            checkpoint: checkpoint.to_string(),
            vocab_size: self.files.config.vocab_size,
            max_positions: self.model.max_positions(),
        };
        Engine::start(self.model, self.tokenizer, info, config)
    }
}

/// CUDA device 0 when built with the `cuda` feature and a GPU is present, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return device;
    }
    Device::Cpu
}
