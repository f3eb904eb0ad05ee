//! A model directory loaded for training: every weight a candle [`Var`] in a [`VarMap`], the [`Llama`] built on
//! those vars (so its differentiable forward reaches all of them), the tokenizer, and a way back to a model
//! directory the serving side loads (`inference::load::LoadedModel::load`).
//!
//! Shared by SFT, the reward model (its trunk) and PPO (policy, reference and value trunks).
//!
//! Weights are trained in F32 whatever the file's dtype, and saved in F32 by default: Adam updates of ~1e-5
//! relative size vanish when rounded to BF16 (about 3 significant digits).
//!
//! Options that cut work rather than speed it up: frozen lower layers ([`PolicyModel::with_frozen_layers`]),
//! LoRA adapters ([`PolicyModel::with_lora`]: only the adapters train, and saving merges them into the weights,
//! so a checkpoint stays a plain model directory) and gradient checkpointing
//! ([`PolicyModel::with_gradient_checkpointing`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use inference::config::LlamaConfig;
use inference::llama::{Llama, LoraSpec, NamedAdapter, Projection, WeightGrads};
use inference::model_files::ModelFiles;
use inference::tokenizer::{ChatMessage, Tokenizer};

use crate::losses::token_logprobs;

/// Errors of the training stages (SFT, reward model).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] inference::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The data cannot train anything (no training examples, nothing left after tokenisation, ...).
    #[error("training data: {0}")]
    Data(String),
    /// A saved checkpoint is incomplete or inconsistent.
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A stop was requested ([`crate::stop`]): the stage ended at a step boundary and published nothing.
    #[error("stopped on request")]
    Stopped,
}

pub type TrainResult<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}

/// Files besides the weights that make a model directory: copied verbatim when a trained model is saved
/// (`config.json` gets its `torch_dtype` updated).
pub const SIDECAR_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
];

pub const WEIGHTS_FILE: &str = "model.safetensors";

/// LoRA's scale numerator when a stage config leaves `lora_alpha` out (the update is scaled by `alpha / rank`).
pub const DEFAULT_LORA_ALPHA: f64 = 16.0;

/// The projections that get adapters when a stage config leaves `lora_targets` out: all seven. Adapting every
/// linear layer, not only Q and V as the LoRA paper did, is what brings LoRA close to a full fine-tune (Dettmers
/// et al. 2023, QLoRA); at rank 8 it is still about 1.8% of SmolLM2-135M's parameters.
pub fn default_lora_targets() -> Vec<Projection> {
    Projection::ALL.to_vec()
}

/// The LoRA spec of a stage config's `lora_rank`, `lora_alpha` and `lora_targets`; `None` for rank 0 (the full
/// fine-tune).
pub fn lora_spec(rank: usize, alpha: f64, targets: &[Projection], seed: u64) -> Option<LoraSpec> {
    (rank > 0).then(|| LoraSpec { rank, alpha, targets: targets.to_vec(), seed })
}

/// The options that cut a stage's work rather than speed it up, as every stage config carries them
/// (`freeze_layers`, `lora_rank`/`lora_alpha`/`lora_targets`, `gradient_checkpointing`). The default is the
/// paper's full fine-tune.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CostOptions {
    pub freeze_layers: usize,
    pub lora: Option<LoraSpec>,
    pub gradient_checkpointing: bool,
}

impl CostOptions {
    /// What a stage config got wrong, if anything: LoRA settings, or checkpointing beside residual dropout
    /// (a dropout layer runs op by op, which cannot recompute its activations).
    pub fn check(&self, residual_dropout: f32) -> Option<&'static str> {
        if let Some(lora) = &self.lora {
            if !lora.alpha.is_finite() || lora.alpha <= 0.0 {
                return Some("lora_alpha must be positive");
            }
            if lora.targets.is_empty() {
                return Some("lora_targets must name at least one projection");
            }
        }
        (self.gradient_checkpointing && residual_dropout > 0.0)
            .then_some("gradient_checkpointing needs residual_dropout = 0")
    }
}

/// A prompt rendered with the chat template, then the response (and end-of-sequence) tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    /// `ids[..prompt_len]` is the rendered prompt (ending where the assistant's reply begins).
    pub prompt_len: usize,
}

/// Tokenises a (prompt, response) pair as the serving side sees a chat: the prompt as one user message through
/// the model's chat template with the generation prompt (`<|im_start|>assistant\n` for ChatML), encoded without
/// extra special tokens (the template carries them), then the response, then the first end-of-sequence id when
/// `append_eos` (so the model learns to stop, and the reward model reads a fixed final token).
pub fn encode_chat(tokenizer: &Tokenizer, prompt: &str, response: &str, append_eos: bool) -> TrainResult<ChatTokens> {
    encode_conversation(tokenizer, &[ChatMessage::new("user", prompt)], response, append_eos)
}

/// [`encode_chat`] of a whole conversation (system, user and assistant turns) before the response: the gateway's
/// reward scoring of chat traffic.
pub fn encode_conversation(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    response: &str,
    append_eos: bool,
) -> TrainResult<ChatTokens> {
    let text = tokenizer.apply_chat_template(messages, true)?;
    let mut ids = tokenizer.encode(&text, false)?;
    let prompt_len = ids.len();
    ids.extend(tokenizer.encode(response, false)?);
    if append_eos {
        let Some(&eos) = tokenizer.eos_token_ids().first() else {
            return Err(TrainError::Data("the tokenizer has no end-of-sequence token".into()));
        };
        ids.push(eos);
    }
    Ok(ChatTokens { ids, prompt_len })
}

/// The prompt as one user message through the chat template, ending where the assistant's reply begins: what
/// the serving side's chat route feeds the model, and the prompt part of [`encode_chat`].
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str) -> TrainResult<Vec<u32>> {
    let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?;
    Ok(tokenizer.encode(&text, false)?)
}

/// A model directory's weights as trainable variables.
pub struct PolicyModel {
    varmap: VarMap,
    model: Llama,
    tokenizer: Tokenizer,
    files: ModelFiles,
    device: Device,
    /// Names of the variables [`PolicyModel::with_frozen_layers`] (or LoRA) froze.
    frozen: HashSet<String>,
    /// LoRA adapters ([`PolicyModel::with_lora`]): trainable, merged into their weights when saving.
    adapters: Vec<NamedAdapter>,
    /// Weight gradients of the fused CPU ops, moved into the `GradStore` by [`PolicyModel::backward`].
    weight_grads: WeightGrads,
}

impl PolicyModel {
    /// Loads `dir` (Hugging Face layout) on `device`, every tensor of its safetensors a [`Var`] (F32).
    /// A tensor the model needs but the files lack is an error naming it (a `VarMap` would silently create it).
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> TrainResult<Self> {
        let files = ModelFiles::open(dir.as_ref())?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, tensor) in files.load_tensors(DType::F32, device)? {
                data.insert(name, Var::from_tensor(&tensor)?);
            }
        }
        let loaded: HashSet<String> = varmap.data().lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Llama::new(&files.config, vb).map_err(|e| match e {
            inference::Error::Candle(inner) => {
                inference::Error::model_file(&files.dir, format!("weights do not match config.json: {inner}"))
            }
            other => other,
        })?;
        let mut missing: Vec<String> = varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|k| !loaded.contains(*k))
            .cloned()
            .collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(TrainError::Checkpoint {
                path: files.dir.clone(),
                message: format!("weights missing from the safetensors: {}", missing.join(", ")),
            });
        }
        let tokenizer = Tokenizer::from_dir(&files.dir)?.with_extra_eos(&files.config.eos_token_ids());
        let weight_grads = WeightGrads::new();
        let model = model.with_weight_grads(weight_grads.clone());
        Ok(Self {
            varmap,
            model,
            tokenizer,
            files,
            device: device.clone(),
            frozen: HashSet::new(),
            adapters: Vec::new(),
            weight_grads,
        })
    }

    /// Freezes the token embedding and the lowest `n` transformer layers ([`Llama::with_frozen_layers`]): they
    /// leave [`PolicyModel::vars`] (no optimiser state, no update) and the training forward runs them without a
    /// graph. With tied embeddings the output projection freezes with the embedding. Saving still writes every
    /// weight.
    pub fn with_frozen_layers(mut self, n: usize) -> TrainResult<Self> {
        self.model = self.model.with_frozen_layers(n);
        let n = self.model.frozen_layers();
        if n > 0 {
            let layer_prefixes: Vec<String> = (0..n).map(|i| format!("model.layers.{i}.")).collect();
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            self.frozen = data
                .keys()
                .filter(|name| {
                    name.starts_with("model.embed_tokens.") || layer_prefixes.iter().any(|p| name.starts_with(p))
                })
                .cloned()
                .collect();
        }
        Ok(self)
    }

    /// LoRA ([`Llama::with_lora`]; `None` changes nothing): every weight of the file freezes and the layers above
    /// the frozen ones get adapters, which become [`PolicyModel::vars`]. [`PolicyModel::save`] writes the weights
    /// with the adapters merged in. Freeze layers first.
    pub fn with_lora(mut self, spec: Option<&LoraSpec>) -> TrainResult<Self> {
        let Some(spec) = spec else { return Ok(self) };
        if !self.adapters.is_empty() {
            return Err(TrainError::Data("LoRA adapters were already added to this model".into()));
        }
        let (model, adapters) = self.model.with_lora(spec)?;
        self.model = model;
        self.adapters = adapters;
        self.frozen = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        tracing::info!(rank = spec.rank, alpha = spec.alpha, adapters = self.adapters.len(), "LoRA adapters added");
        Ok(self)
    }

    /// Frozen layers, then LoRA, then gradient checkpointing, as `options` asks.
    pub fn with_cost_options(self, options: &CostOptions) -> TrainResult<Self> {
        Ok(self
            .with_frozen_layers(options.freeze_layers)?
            .with_lora(options.lora.as_ref())?
            .with_gradient_checkpointing(options.gradient_checkpointing))
    }

    /// Gradient checkpointing ([`Llama::with_gradient_checkpointing`]): less memory for long sequences, about one
    /// more forward pass per backward.
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.model = self.model.with_gradient_checkpointing(on);
        self
    }

    /// The LoRA adapters, empty for a full fine-tune.
    pub fn adapters(&self) -> &[NamedAdapter] {
        &self.adapters
    }

    /// Gradients of `loss` (a scalar computed through this model's forward) wrt every tensor it depends on, this
    /// model's weights included. Use this rather than `loss.backward()`: the fused CPU ops collect weight
    /// gradients beside candle's autograd ([`WeightGrads`]), and this is where they join the store.
    pub fn backward(&self, loss: &Tensor) -> TrainResult<GradStore> {
        self.weight_grads.clear();
        let mut store = loss.backward()?;
        let vars = self.vars();
        let weights: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
        self.weight_grads.drain_into(&mut store, &weights)?;
        Ok(store)
    }

    pub fn llama(&self) -> &Llama {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.files.config
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The directory the weights came from.
    pub fn source_dir(&self) -> &Path {
        &self.files.dir
    }

    /// Every trainable variable (all but the frozen ones, and the LoRA adapters) with its tensor name, sorted by
    /// name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut vars: Vec<(String, Var)> =
            data.iter().filter(|(k, _)| !self.frozen.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.extend(self.adapter_vars());
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The adapters' `A` and `B` variables with their names.
    fn adapter_vars(&self) -> impl Iterator<Item = (String, Var)> + '_ {
        self.adapters.iter().flat_map(|adapter| {
            let [a, b] = adapter.var_names();
            [(a, adapter.a.clone()), (b, adapter.b.clone())]
        })
    }

    /// Every trainable variable, sorted by tensor name (a stable order for the optimiser).
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Every variable, the file's weights and the adapters, with its name.
    fn all_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter().map(|(k, v)| (k.clone(), v.clone())).chain(self.adapter_vars()).collect()
    }

    /// Detached copies of every weight (adapters included), for keeping the best epoch while training goes on.
    pub fn snapshot_weights(&self) -> TrainResult<HashMap<String, Tensor>> {
        self.all_vars().into_iter().map(|(k, v)| Ok((k, v.as_tensor().detach().copy()?))).collect()
    }

    /// Sets the weights back to a [`PolicyModel::snapshot_weights`] copy.
    pub fn restore_weights(&self, weights: &HashMap<String, Tensor>) -> TrainResult<()> {
        for (name, var) in self.all_vars() {
            let Some(w) = weights.get(&name) else {
                return Err(TrainError::Data(format!("weight snapshot lacks {name}")));
            };
            var.set(w)?;
        }
        Ok(())
    }

    /// Writes a loadable model directory: `model.safetensors` (same tensor names as the source, F32, LoRA
    /// adapters merged into their weights), the source's `config.json` and tokenizer files.
    pub fn save(&self, out_dir: &Path) -> TrainResult<()> {
        self.save_as(out_dir, DType::F32)
    }

    /// [`PolicyModel::save`] with the weights converted to `dtype`.
    pub fn save_as(&self, out_dir: &Path, dtype: DType) -> TrainResult<()> {
        std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
        let adapters: HashMap<&str, &NamedAdapter> = self.adapters.iter().map(|a| (a.weight.as_str(), a)).collect();
        let tensors: HashMap<String, Tensor> = {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| {
                    let w = match adapters.get(k.as_str()) {
                        Some(adapter) => adapter.adapter().merged(v.as_tensor())?,
                        None => v.as_tensor().detach(),
                    };
                    Ok((k.clone(), w.to_dtype(dtype)?.to_device(&Device::Cpu)?))
                })
                .collect::<TrainResult<_>>()?
        };
        write_safetensors_atomic(&tensors, &out_dir.join(WEIGHTS_FILE))?;
        copy_model_sidecars(&self.files.dir, out_dir, dtype)
    }

    /// Sum of log-probabilities of the response tokens and the end-of-sequence token given the chat-rendered
    /// prompt, one forward per pair, no dropout.
    pub fn response_logprobs<P: AsRef<str>, R: AsRef<str>>(&self, pairs: &[(P, R)]) -> TrainResult<Vec<f32>> {
        pairs
            .iter()
            .map(|(p, r)| {
                let tokens = encode_chat(&self.tokenizer, p.as_ref(), r.as_ref(), true)?;
                let n = tokens.ids.len();
                let input = Tensor::new(&tokens.ids[..n - 1], &self.device)?.unsqueeze(0)?;
                let targets = Tensor::new(&tokens.ids[1..], &self.device)?.unsqueeze(0)?;
                let logits = self.model.forward_train(&input, 0.0)?;
                let lp = token_logprobs(&logits, &targets)?.squeeze(0)?.detach();
                let first = tokens.prompt_len.max(1) - 1;
                Ok(lp.narrow(0, first, n - 1 - first)?.sum_all()?.to_scalar::<f32>()?)
            })
            .collect()
    }
}

/// Writes `tensors` to `path` through a temporary file in the same directory, fsynced, then renamed.
pub(crate) fn write_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> TrainResult<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> TrainResult<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Copies `config.json` (with `torch_dtype` set to the saved weights' dtype) and the [`SIDECAR_FILES`] that
/// exist from `src` to `dst`. Nothing to do when both are the same directory.
pub(crate) fn copy_model_sidecars(src: &Path, dst: &Path, dtype: DType) -> TrainResult<()> {
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dst.canonicalize())
        && a == b
    {
        return Ok(());
    }
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint { path: config_path.clone(), message: format!("invalid JSON: {e}") })?;
    if let Some(obj) = config.as_object_mut() {
        let name = match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        obj.insert("torch_dtype".into(), serde_json::Value::String(name.into()));
    }
    let pretty = serde_json::to_vec_pretty(&config).map_err(|e| TrainError::Data(e.to_string()))?;
    write_file_atomic(&dst.join("config.json"), &pretty)?;
    for file in SIDECAR_FILES {
        let from = src.join(file);
        if from.is_file() {
            let to = dst.join(file);
            std::fs::copy(&from, &to).map_err(io_err(&to))?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::Path;

    use inference::tiny_model::{TinySpec, init_tiny};

    /// A tiny random model directory (hidden 64, 2 layers, ChatML template).
    pub fn tiny_model(dir: &Path, seed: u64, tied: bool) {
        init_tiny(dir, &TinySpec { seed, tie_word_embeddings: tied, ..TinySpec::default() }).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::tiny_model;
    use super::*;
    use inference::load::LoadedModel;

    fn logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
        let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward_train(&input, 0.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn save_then_serving_load_gives_the_same_logits() {
        for tied in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let src = tmp.path().join("src");
            tiny_model(&src, 3, tied);
            let model = PolicyModel::load(&src, &Device::Cpu).unwrap();
            let expected_tensors = if tied { 20 } else { 21 };
            assert_eq!(model.vars().len(), expected_tensors, "one var per tensor in the file");
            // Move every weight so a save that wrote the source file back would be caught.
            for var in model.vars() {
                var.set(&(var.as_tensor() + var.randn_like(0.0, 0.01).unwrap()).unwrap()).unwrap();
            }
            let ids = encode_chat(model.tokenizer(), "What colour is the sky?", "Blue.", true).unwrap().ids;
            let before = logits(model.llama(), &ids);

            let out = tmp.path().join("out");
            model.save(&out).unwrap();
            for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
                assert!(out.join(file).is_file(), "{file} missing");
            }
            let loaded = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
            assert!(loaded.tokenizer.has_chat_template());
            let after = logits(&loaded.model, &ids);
            let diff = max_diff(&before, &after);
            assert!(diff < 1e-5, "tied={tied}: max logit difference {diff}");
            let original = LoadedModel::load(&src, DType::F32, &Device::Cpu).unwrap();
            assert!(max_diff(&before, &logits(&original.model, &ids)) > 1e-3, "the saved weights are the trained ones");

            // And back into training: same weights again.
            let reloaded = PolicyModel::load(&out, &Device::Cpu).unwrap();
            assert!(max_diff(&before, &logits(reloaded.llama(), &ids)) < 1e-5);
        }
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 0, true);
        let path = tmp.path().join(WEIGHTS_FILE);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        tensors.remove("model.layers.1.mlp.up_proj.weight");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = PolicyModel::load(tmp.path(), &Device::Cpu).err().expect("must fail").to_string();
        assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    }

    #[test]
    fn snapshot_and_restore_weights() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 1, true);
        let model = PolicyModel::load(tmp.path(), &Device::Cpu).unwrap();
        let ids = [5u32, 9, 40, 77];
        let before = logits(model.llama(), &ids);
        let saved = model.snapshot_weights().unwrap();
        for var in model.vars() {
            var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
        }
        assert!(max_diff(&before, &logits(model.llama(), &ids)) > 1e-3);
        model.restore_weights(&saved).unwrap();
        assert_eq!(max_diff(&before, &logits(model.llama(), &ids)), 0.0);
    }

    /// LoRA on a tiny model: a few steps reduce the loss, every adapter gets a gradient, the file's weights stay
    /// as loaded, and the saved checkpoint (adapters merged) serves the adapted model's logits.
    #[test]
    fn lora_trains_only_the_adapters_and_saves_them_merged() {
        use crate::optim::{Adam, AdamConfig, Gradients};
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tiny_model(&src, 5, false);
        let spec = lora_spec(4, 8.0, &default_lora_targets(), 1);
        let model = PolicyModel::load(&src, &Device::Cpu).unwrap().with_lora(spec.as_ref()).unwrap();
        let vars = model.vars();
        assert_eq!(vars.len(), 2 * 7 * 2, "A and B of seven projections in each of two layers, nothing else");
        let base: Vec<(String, Tensor)> = {
            let data = model.varmap().data().lock().unwrap();
            data.iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap())).collect()
        };
        let ids = encode_chat(model.tokenizer(), "Name a colour.", "Blue, like the sky.", true).unwrap().ids;
        let original = LoadedModel::load(&src, DType::F32, &Device::Cpu).unwrap();
        assert!(max_diff(&logits(&original.model, &ids), &logits(model.llama(), &ids)) < 1e-5, "B starts at 0");
        let n = ids.len();
        let input = Tensor::new(&ids[..n - 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let loss_of = |m: &PolicyModel| {
            let lp = token_logprobs(&m.llama().forward_train(&input, 0.0).unwrap(), &targets).unwrap();
            lp.mean_all().unwrap().neg().unwrap()
        };
        let mut adam = Adam::new(vars.clone(), AdamConfig::default()).unwrap();
        let mut losses = Vec::new();
        for step in 0..6 {
            let loss = loss_of(&model);
            losses.push(loss.to_scalar::<f32>().unwrap());
            let mut grads = Gradients::new();
            grads.accumulate(&model.backward(&loss).unwrap(), &vars, 1.0).unwrap();
            if step > 0 {
                assert_eq!(grads.len(), vars.len(), "every adapter matrix gets a gradient");
            }
            adam.step(&grads, 1e-2).unwrap();
        }
        assert!(losses[5] < losses[0] - 0.1, "LoRA steps reduce the loss: {losses:?}");
        for (name, before) in &base {
            let now = model.varmap().data().lock().unwrap()[name].as_tensor().copy().unwrap();
            assert_eq!(
                max_diff(
                    &before.flatten_all().unwrap().to_vec1().unwrap(),
                    &now.flatten_all().unwrap().to_vec1().unwrap()
                ),
                0.0,
                "{name} moved"
            );
        }
        let trained = logits(model.llama(), &ids);
        let out = tmp.path().join("out");
        model.save(&out).unwrap();
        let saved = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        let names: Vec<String> =
            candle_core::safetensors::load(out.join(WEIGHTS_FILE), &Device::Cpu).unwrap().into_keys().collect();
        assert!(names.iter().all(|n| !n.contains("lora")), "a plain checkpoint: {names:?}");
        assert!(max_diff(&trained, &logits(&saved.model, &ids)) < 1e-4, "merged weights serve the adapted model");
        assert!(max_diff(&trained, &logits(&original.model, &ids)) > 1e-3, "training moved the output");
    }

    #[test]
    fn cost_options_refuse_what_cannot_run() {
        let lora = |alpha: f64, targets: &[Projection]| CostOptions {
            lora: lora_spec(8, alpha, targets, 0),
            ..CostOptions::default()
        };
        assert_eq!(CostOptions::default().check(0.2), None, "the full fine-tune takes any dropout");
        assert_eq!(lora(16.0, &default_lora_targets()).check(0.0), None);
        assert!(lora(0.0, &default_lora_targets()).check(0.0).is_some());
        assert!(lora(16.0, &[]).check(0.0).is_some());
        let checkpointed = CostOptions { gradient_checkpointing: true, ..CostOptions::default() };
        assert_eq!(checkpointed.check(0.0), None);
        assert!(checkpointed.check(0.2).is_some(), "dropout layers run op by op and cannot recompute");
        assert_eq!(lora_spec(0, 16.0, &default_lora_targets(), 0), None, "rank 0 is the full fine-tune");
    }

    #[test]
    fn chat_encoding_masks_the_prompt_and_ends_with_eos() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 0, true);
        let model = PolicyModel::load(tmp.path(), &Device::Cpu).unwrap();
        let tok = model.tokenizer();
        let t = encode_chat(tok, "Hi", "Hello there", true).unwrap();
        let prompt = tok.decode(&t.ids[..t.prompt_len], false).unwrap();
        assert!(prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "{prompt:?}");
        assert_eq!(tok.decode(&t.ids[t.prompt_len..], false).unwrap(), "Hello there<|im_end|>");
        let no_eos = encode_chat(tok, "Hi", "Hello there", false).unwrap();
        assert_eq!(no_eos.ids.len() + 1, t.ids.len());
    }
}
