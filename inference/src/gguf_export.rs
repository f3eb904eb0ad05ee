//! Writes a Hugging Face layout Llama checkpoint (the default model, the tiny
//! test model, or any checkpoint the trainer publishes) as a GGUF file that
//! llama.cpp's `llama-server` loads: the inverse of [`gguf_import`](crate::gguf_import).
//!
//! Weights go out as F32 or F16 (norms stay F32, as llama.cpp's converter
//! keeps them), Q/K rows permuted into llama.cpp's interleaved RoPE layout,
//! and the byte-level BPE tokenizer (`tokenizer.json`) with its specials,
//! BOS/EOS and chat template goes into `tokenizer.ggml.*`. Only what the
//! importer reads back is written, so export then import is the identity
//! (tested below).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::model_files::ModelFiles;

/// `general.file_type` values (llama.cpp's `llama_ftype`).
const FTYPE_ALL_F32: u32 = 0;
const FTYPE_MOSTLY_F16: u32 = 1;
/// `tokenizer.ggml.token_type` values.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Writes `model_dir` as a GGUF at `dst` (replaced atomically) with matrices in `dtype` (F32 or F16); returns the
/// number of tensors written.
pub fn export_gguf(model_dir: &Path, dst: &Path, dtype: DType) -> Result<usize> {
    let matrix_dtype = match dtype {
        DType::F32 => GgmlDType::F32,
        DType::F16 => GgmlDType::F16,
        other => return Err(Error::Import(format!("GGUF export writes f32 or f16, not {other:?}"))),
    };
    let files = ModelFiles::open(model_dir)?;
    let config = &files.config;
    if config.architectures.iter().any(|a| a != "LlamaForCausalLM") || config.attention_bias {
        return Err(Error::Import(format!(
            "GGUF export supports LlamaForCausalLM without attention bias; {} is {:?}",
            files.dir.display(),
            config.architectures
        )));
    }
    if config.rope_scaling.is_some() {
        return Err(Error::Import("GGUF export does not write RoPE scaling yet".into()));
    }
    let mut metadata = model_metadata(&files, dtype)?;
    metadata.extend(tokenizer_metadata(&files.dir, config.vocab_size)?);
    let mut tensors = files.load_tensors(DType::F32, &Device::Cpu)?;
    let head_dim = config.head_dim.unwrap_or(config.hidden_size / config.num_attention_heads.max(1));
    let mut out: Vec<(String, QTensor)> = Vec::with_capacity(tensors.len());
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    for hf_name in names {
        let Some(tensor) = tensors.remove(&hf_name) else { continue };
        let gguf_name = gguf_tensor_name(&hf_name)
            .ok_or_else(|| Error::Import(format!("tensor {hf_name} has no GGUF name (not a Llama weight)")))?;
        let tensor = if hf_name.ends_with("q_proj.weight") {
            crate::gguf_import::permute_rope_rows(&tensor, config.num_attention_heads, head_dim)?
        } else if hf_name.ends_with("k_proj.weight") {
            crate::gguf_import::permute_rope_rows(&tensor, config.num_kv_heads(), head_dim)?
        } else {
            tensor
        };
        // 1-D tensors (norms) stay F32, as llama.cpp requires of them.
        let ggml = if tensor.rank() == 1 { GgmlDType::F32 } else { matrix_dtype };
        out.push((gguf_name, QTensor::quantize(&tensor.contiguous()?, ggml)?));
    }
    crate::gguf_dequantize::write_gguf(dst, &metadata, &out)?;
    Ok(out.len())
}

/// The llama.cpp name of a Hugging Face Llama tensor; inverse of [`hf_tensor_name`](crate::gguf_import::hf_tensor_name).
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match part {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

fn model_metadata(files: &ModelFiles, dtype: DType) -> Result<Vec<(String, Value)>> {
    let c = &files.config;
    let name = files.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
    let u32v = |v: usize| Value::U32(v as u32);
    Ok(vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(if dtype == DType::F16 { FTYPE_MOSTLY_F16 } else { FTYPE_ALL_F32 })),
        ("llama.context_length".into(), u32v(c.max_position_embeddings)),
        ("llama.embedding_length".into(), u32v(c.hidden_size)),
        ("llama.block_count".into(), u32v(c.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u32v(c.intermediate_size)),
        ("llama.attention.head_count".into(), u32v(c.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u32v(c.num_kv_heads())),
        ("llama.attention.key_length".into(), u32v(head_dim)),
        ("llama.attention.value_length".into(), u32v(head_dim)),
        ("llama.rope.dimension_count".into(), u32v(head_dim)),
        ("llama.rope.freq_base".into(), Value::F32(c.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(c.rms_norm_eps as f32)),
        ("llama.vocab_size".into(), u32v(c.vocab_size)),
    ])
}

/// `tokenizer.ggml.*` from `tokenizer.json` (byte-level BPE only) and `tokenizer_config.json`; the token list is
/// padded to `vocab_size` with unused tokens, since llama.cpp wants one token per embedding row.
fn tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let bad = |message: String| Error::model_file(&path, message);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::model_file(&path, e))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if json.pointer("/model/type").and_then(Json::as_str) != Some("BPE") {
        return Err(bad("GGUF export supports byte-level BPE tokenizers only".into()));
    }
    let vocab = json.pointer("/model/vocab").and_then(Json::as_object).ok_or_else(|| bad("no model.vocab".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TOKEN_NORMAL; vocab_size];
    let mut place = |id: u64, text: &str, kind: i32| -> Result<()> {
        let slot =
            tokens.get_mut(id as usize).ok_or_else(|| bad(format!("token id {id} beyond vocab {vocab_size}")))?;
        *slot = Some(text.to_string());
        types[id as usize] = kind;
        Ok(())
    };
    for (text, id) in vocab {
        place(id.as_u64().ok_or_else(|| bad(format!("vocab id of {text:?}")))?, text, TOKEN_NORMAL)?;
    }
    let mut specials: HashMap<String, u32> = HashMap::new();
    for added in json.get("added_tokens").and_then(Json::as_array).into_iter().flatten() {
        let (Some(id), Some(text)) =
            (added.get("id").and_then(Json::as_u64), added.get("content").and_then(Json::as_str))
        else {
            return Err(bad("an added token lacks id or content".into()));
        };
        let special = added.get("special").and_then(Json::as_bool).unwrap_or(false);
        place(id, text, if special { TOKEN_CONTROL } else { TOKEN_USER_DEFINED })?;
        specials.insert(text.to_string(), id as u32);
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if t.is_none() {
                types[i] = TOKEN_UNUSED;
            }
            Value::String(t.unwrap_or_else(|| format!("[PAD{i}]")))
        })
        .collect();
    let merges: Vec<Value> = json
        .pointer("/model/merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(pair) => match (pair.first().and_then(Json::as_str), pair.get(1).and_then(Json::as_str)) {
                (Some(a), Some(b)) => Ok(Value::String(format!("{a} {b}"))),
                _ => Err(bad("a merge is not a pair of strings".into())),
            },
            _ => Err(bad("a merge is neither \"a b\" nor [a, b]".into())),
        })
        .collect::<Result<_>>()?;
    // llama.cpp picks its pre-tokenizer regex by name: SmolLM2-style tokenizers split digits one by one first.
    let splits_digits = text.contains("\"Digits\"");
    let pre = if splits_digits { "smollm" } else { "gpt2" };
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(false)),
    ];
    let config_path = dir.join("tokenizer_config.json");
    let config: Json =
        std::fs::read_to_string(&config_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Json::Null);
    let special_id = |field: &str| {
        let token = config.get(field)?;
        let text = token.as_str().or_else(|| token.get("content").and_then(Json::as_str))?;
        specials.get(text).copied().or_else(|| vocab.get(text).and_then(Json::as_u64).map(|v| v as u32))
    };
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(id) = special_id(field) {
            out.push((key.to_string(), Value::U32(id)));
        }
    }
    if let Some(template) = config.get("chat_template").and_then(Json::as_str) {
        out.push(("tokenizer.chat_template".to_string(), Value::String(template.to_string())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_model::{TinySpec, init_tiny};

    #[test]
    fn tensor_names_round_trip_with_the_importer() {
        for name in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.11.post_attention_layernorm.weight",
        ] {
            let gguf = gguf_tensor_name(name).unwrap_or_else(|| panic!("{name} has no GGUF name"));
            assert_eq!(crate::gguf_import::hf_tensor_name(&gguf).as_deref(), Some(name));
        }
        assert_eq!(gguf_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
    }

    /// Export then import gives back the same weights (Q/K permutation undone) and the same tokenizer.
    fn round_trip(dtype: DType, tolerance: f32) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let model = dir.path().join("tiny");
        init_tiny(&model, &TinySpec::default()).unwrap_or_else(|e| panic!("tiny model: {e}"));
        let gguf = dir.path().join("tiny.gguf");
        export_gguf(&model, &gguf, dtype).unwrap_or_else(|e| panic!("export: {e}"));
        let back = dir.path().join("back");
        crate::gguf_import::import_gguf(&gguf, &back, DType::F32, false).unwrap_or_else(|e| panic!("import: {e}"));
        let original = ModelFiles::open(&model).and_then(|f| f.load_tensors(DType::F32, &Device::Cpu));
        let imported = ModelFiles::open(&back).and_then(|f| f.load_tensors(DType::F32, &Device::Cpu));
        let (original, imported) =
            (original.unwrap_or_else(|e| panic!("{e}")), imported.unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(original.len(), imported.len());
        for (name, tensor) in &original {
            let other = imported.get(name).unwrap_or_else(|| panic!("{name} missing after the round trip"));
            let diff = (tensor - other)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(diff <= tolerance, "{name} differs by {diff}");
        }
        let tok = |d: &Path| crate::tokenizer::Tokenizer::from_dir(d).unwrap_or_else(|e| panic!("tokenizer: {e}"));
        let (a, b) = (tok(&model), tok(&back));
        let text = "Hello 2024, <|im_start|>user\nwhy?<|im_end|>";
        assert_eq!(a.encode(text, false).ok(), b.encode(text, false).ok());
        assert_eq!(a.eos_token_ids(), b.eos_token_ids());
    }

    #[test]
    fn f32_export_imports_back_exactly() {
        round_trip(DType::F32, 0.0);
    }

    #[test]
    fn f16_export_imports_back_within_half_precision() {
        round_trip(DType::F16, 1e-2);
    }

    #[test]
    fn other_dtypes_are_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let error = export_gguf(dir.path(), &dir.path().join("x.gguf"), DType::BF16).err().map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("f32 or f16")));
    }
}
