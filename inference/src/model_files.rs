//! A model directory in Hugging Face layout, checked and loaded.
//!
//! The layout is `config.json`, `tokenizer.json` (optionally
//! `tokenizer_config.json`, `generation_config.json`) and either
//! `model.safetensors` or `model.safetensors.index.json` with its shards.
//! Every failure names the file at fault, because "shape mismatch" alone does
//! not tell an operator which of three checkpoints is broken.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

const CONFIG: &str = "config.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const SHARD_INDEX: &str = "model.safetensors.index.json";

/// A model directory whose config parsed and whose weight files exist.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub weight_files: Vec<PathBuf>,
}

impl ModelFiles {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::model_file(&dir, "not a directory (expected a Hugging Face model directory)"));
        }
        let config_path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::model_file(&config_path, e))?;
        let config: LlamaConfig =
            serde_json::from_str(&text).map_err(|e| Error::model_file(&config_path, format!("invalid JSON: {e}")))?;
        config.validate().map_err(|e| match e {
            Error::ModelFile { message, .. } => Error::model_file(&config_path, message),
            other => other,
        })?;
        let weight_files = find_weight_files(&dir)?;
        Ok(Self { dir, config, weight_files })
    }

    /// Reads every weight file into memory as `dtype` on `device`.
    ///
    /// Corrupt or truncated safetensors fail here with the file's name; shape
    /// mismatches fail when the model takes its tensors.
    pub fn load_tensors(&self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut all = HashMap::new();
        for path in &self.weight_files {
            let tensors = crate::safetensors_file::read(path)
                .map_err(|e| Error::model_file(path, format!("cannot read safetensors: {e}")))?;
            for (name, tensor) in tensors {
                let tensor = tensor
                    .to_dtype(dtype)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| Error::model_file(path, format!("tensor {name}: {e}")))?;
                all.insert(name, tensor);
            }
        }
        Ok(all)
    }
}

fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_WEIGHTS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(SHARD_INDEX);
    if !index_path.is_file() {
        return Err(Error::model_file(dir, format!("no weights: neither {SINGLE_WEIGHTS} nor {SHARD_INDEX} exists")));
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| Error::model_file(&index_path, e))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::model_file(&index_path, format!("invalid JSON: {e}")))?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::model_file(&index_path, "missing \"weight_map\" object"));
    };
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::model_file(&index_path, "\"weight_map\" names no shard files"));
    }
    files
        .into_iter()
        .map(|name| {
            // Shard names come from a file: refuse paths that escape the directory.
            if name.contains('/') || name.contains("..") {
                return Err(Error::model_file(&index_path, format!("invalid shard name {name:?}")));
            }
            let path = dir.join(&name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::model_file(&path, format!("shard listed in {SHARD_INDEX} is missing")))
            }
        })
        .collect()
}

/// Parses a dtype name as used on the command line and in configs.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::invalid("dtype", format!("unknown dtype {other:?}: use f32, bf16 or f16"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_directory_and_config_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = ModelFiles::open(tmp.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        let err = ModelFiles::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn missing_weights_and_shards_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}"#,
        )
        .unwrap();
        let err = ModelFiles::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::write(tmp.path().join(SHARD_INDEX), r#"{"weight_map":{"a":"model-00001.safetensors"}}"#).unwrap();
        let err = ModelFiles::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("model-00001.safetensors") && err.contains("missing"), "{err}");
    }

    #[test]
    fn corrupt_safetensors_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}"#,
        )
        .unwrap();
        std::fs::write(tmp.path().join(SINGLE_WEIGHTS), b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage").unwrap();
        let files = ModelFiles::open(tmp.path()).unwrap();
        let err = files.load_tensors(DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("safetensors"), "{err}");
    }
}
