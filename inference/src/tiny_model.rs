//! Writes a tiny random-weight Llama model directory for fast tests.
//!
//! Tests of the engine, the gateway and the trainer need a real model
//! directory (config, safetensors, tokenizer, chat template) but not a real
//! model's quality. This writes one in Hugging Face layout, shaped like
//! SmolLM2 (ChatML template, `<|im_start|>` = 1, `<|im_end|>` = 2, byte-level
//! BPE) but small enough to run a forward pass in microseconds, and seeded so
//! two runs with the same spec produce byte-identical weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

use crate::bpe_tokenizer::{self, GenerationConfigFile, SpecialToken, TokenizerConfigFile};
use crate::config::{LlamaConfig, TokenIds};
use crate::error::{Error, Result};
use crate::gguf_import;

/// SmolLM2-Instruct's chat template, verbatim.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The special tokens, at the ids SmolLM2 gives them.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const BOS_TOKEN_ID: u32 = 1;
pub const EOS_TOKEN_ID: u32 = 2;

/// Merges of frequent English pairs, in GPT-2's byte-level spelling
/// (`Ġ` is a space) and priority order. Each half is a byte or an earlier
/// merge, so common words encode to one or two tokens and tests see real
/// multi-byte tokens without a trained vocabulary.
#[rustfmt::skip]
const MERGES: &[&str] = &[
    "Ġ t", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ a", "a t", "Ġ s", "e n", "Ġ o", "Ġ w", "o r", "e s",
    "Ġ c", "i s", "i t", "a n", "Ġ b", "Ġ f", "Ġ p", "Ġ m", "a l", "e d", "o u", "in g", "Ġo f", "Ġa n", "Ġan d",
    "Ġt o", "Ġ i", "Ġi s", "Ġi n", "Ġw h", "Ġ h", "l l", "Ġc on", "Ġ I", "Ġ T", "Ġ W", "Ġ d", "Ġ l", "Ġ n", "Ġ e",
    "Ġ y", "Ġy ou", "Ġt h", "Ġth at", "Ġf or", "Ġi t", "a s", "Ġw as", "Ġb e", "it h", "Ġw ith", "Ġ re", "Ġ Ġ",
    "ĠĠ ĠĠ", "Ċ Ċ",
];

/// The shape and initialisation of a tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// When false, a separate `lm_head.weight` is written.
    pub tie_word_embeddings: bool,
    /// F32, BF16 or F16.
    pub dtype: DType,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            dtype: DType::F32,
            seed: 0,
        }
    }
}

/// Std of the normal init of every matrix (GPT-2 / Llama's 0.02).
const INIT_STD: f32 = 0.02;
/// Std of the noise on norm weights around 1.0: large enough that a model
/// which forgets to multiply by them gives visibly different logits.
const NORM_NOISE_STD: f32 = 0.1;

/// Writes the tiny model into `out_dir` (created if missing; files in it are
/// overwritten): `config.json`, `model.safetensors`, `tokenizer.json`,
/// `tokenizer_config.json` and `generation_config.json`.
pub fn init_tiny(out_dir: &Path, spec: &TinySpec) -> Result<()> {
    let torch_dtype = match spec.dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => {
            return Err(Error::model_file(out_dir, format!("tiny model dtype {other:?}: use F32, BF16 or F16")));
        }
    };
    let tokenizer = tiny_tokenizer()?;
    let vocab_size = tokenizer.get_vocab_size(true).div_ceil(64) * 64;
    let config = LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: Some("llama".into()),
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_hidden_layers: spec.num_hidden_layers,
        num_attention_heads: spec.num_attention_heads,
        num_key_value_heads: Some(spec.num_key_value_heads),
        head_dim: None,
        vocab_size,
        max_position_embeddings: spec.max_position_embeddings,
        rope_theta: spec.rope_theta,
        rms_norm_eps: spec.rms_norm_eps,
        tie_word_embeddings: spec.tie_word_embeddings,
        attention_bias: false,
        bos_token_id: Some(BOS_TOKEN_ID),
        eos_token_id: Some(TokenIds::One(EOS_TOKEN_ID)),
        rope_scaling: None,
        torch_dtype: Some(torch_dtype.into()),
    };
    // A spec the runtime would refuse is a bug in the test, not a model to write.
    config.validate()?;

    std::fs::create_dir_all(out_dir).map_err(|e| Error::model_file(out_dir, e))?;
    let tensors = init_weights(&config, spec.seed, spec.dtype)?;
    bpe_tokenizer::write_json(&out_dir.join("config.json"), &config)?;
    gguf_import::write_safetensors(&tensors, out_dir)?;
    bpe_tokenizer::save_tokenizer(&tokenizer, out_dir)?;

    let mut tokenizer_config = TokenizerConfigFile::new(spec.max_position_embeddings);
    tokenizer_config.chat_template = Some(CHATML_TEMPLATE.into());
    tokenizer_config.bos_token = Some(SPECIAL_TOKENS[BOS_TOKEN_ID as usize].into());
    tokenizer_config.eos_token = Some(SPECIAL_TOKENS[EOS_TOKEN_ID as usize].into());
    tokenizer_config.pad_token = Some(SPECIAL_TOKENS[EOS_TOKEN_ID as usize].into());
    tokenizer_config.unk_token = Some(SPECIAL_TOKENS[0].into());
    bpe_tokenizer::write_tokenizer_config(out_dir, &tokenizer_config)?;
    bpe_tokenizer::write_generation_config(
        out_dir,
        &GenerationConfigFile {
            bos_token_id: Some(BOS_TOKEN_ID),
            eos_token_id: Some(EOS_TOKEN_ID),
            pad_token_id: Some(EOS_TOKEN_ID),
        },
    )
}

/// The tiny model's tokenizer: the three specials at ids 0..=2, the 256 byte
/// tokens at 3..=258, then one token per merge.
pub fn tiny_tokenizer() -> Result<Tokenizer> {
    let specials: Vec<SpecialToken> =
        SPECIAL_TOKENS.iter().enumerate().map(|(id, s)| SpecialToken::new(id as u32, *s)).collect();
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(bpe_tokenizer::bytes_to_unicode().iter().map(char::to_string));
    let merges = MERGES.iter().map(|m| bpe_tokenizer::parse_merge(m)).collect::<Result<Vec<_>>>()?;
    for (left, right) in &merges {
        let merged = format!("{left}{right}");
        if !tokens.contains(&merged) {
            tokens.push(merged);
        }
    }
    bpe_tokenizer::build_byte_level_bpe(&tokens, &merges, &specials)
}

/// Every weight of `config`, seeded: matrices ~ N(0, 0.02²), norm weights
/// ~ 1 + N(0, 0.1²). Tensors are drawn in sorted-name order so the values
/// depend only on the seed and the shapes.
fn init_weights(config: &LlamaConfig, seed: u64, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let hidden = config.hidden_size;
    let q_rows = config.num_attention_heads * config.head_dim();
    let kv_rows = config.num_kv_heads() * config.head_dim();
    let inter = config.intermediate_size;

    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![config.vocab_size, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
    ];
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![config.vocab_size, hidden]));
    }
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        shapes.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![q_rows, hidden]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv_rows, hidden]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv_rows, hidden]),
            (format!("{p}.self_attn.o_proj.weight"), vec![hidden, q_rows]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
        ]);
    }
    shapes.sort();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::with_capacity(shapes.len());
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let z = standard_normal(&mut rng);
                if is_norm { 1.0 + NORM_NOISE_STD * z } else { INIT_STD * z }
            })
            .collect();
        let tensor = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// One N(0, 1) sample by Box-Muller (rand 0.9 has no normal distribution
/// without the extra `rand_distr` crate).
fn standard_normal(rng: &mut StdRng) -> f32 {
    // 1 - u lies in (0, 1], so the logarithm is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_config(dir: &Path) -> LlamaConfig {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    }

    fn load(dir: &Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
    }

    #[test]
    fn writes_a_loadable_model_directory() {
        let dir = tempfile::tempdir().unwrap();
        init_tiny(dir.path(), &TinySpec::default()).unwrap();
        for file in
            ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
        {
            assert!(dir.path().join(file).is_file(), "{file} missing");
        }

        let cfg = read_config(dir.path());
        cfg.validate().unwrap();
        assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size), (64, 2, 128));
        assert_eq!((cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim()), (4, 2, 16));
        assert_eq!(cfg.vocab_size % 64, 0);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.bos_token_id, Some(1));
        assert_eq!(cfg.eos_token_ids(), vec![2]);

        let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        assert!(tok.get_vocab_size(true) <= cfg.vocab_size);
        assert!(tok.get_vocab_size(true) > 256 + 3 + 40);
        for (id, special) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(special), Some(id as u32));
        }
        let text = "<|im_start|>user\nWhat is the capital of France? It's 2024, naïve café 東京.<|im_end|>\n";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids()[0], 1);
        assert!(enc.get_ids().contains(&2));
        assert!(enc.get_ids().iter().all(|&id| (id as usize) < cfg.vocab_size));
        assert!(enc.get_tokens().iter().any(|t| t == "Ġthe"), "merges apply: {:?}", enc.get_tokens());
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);

        let tc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(tc["chat_template"], CHATML_TEMPLATE);
        assert_eq!(tc["eos_token"], "<|im_end|>");

        let weights = load(dir.path());
        assert_eq!(weights.len(), 2 + 2 * 9);
        assert!(!weights.contains_key("lm_head.weight"));
        assert_eq!(weights["model.embed_tokens.weight"].dims(), &[cfg.vocab_size, 64]);
        assert_eq!(weights["model.layers.1.self_attn.k_proj.weight"].dims(), &[32, 64]);
        assert_eq!(weights["model.layers.0.mlp.down_proj.weight"].dims(), &[64, 128]);

        let embed = weights["model.embed_tokens.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = (embed.iter().map(|x| x * x).sum::<f32>() / embed.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "init std {std}");
        let norm = weights["model.norm.weight"].to_vec1::<f32>().unwrap();
        let mean = norm.iter().sum::<f32>() / norm.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "norm mean {mean}");
        assert!(norm.iter().any(|&x| (x - 1.0).abs() > 0.01), "norm weights carry noise");
    }

    #[test]
    fn chat_template_renders_chatml() {
        let mut env = minijinja::Environment::new();
        env.add_template("chat", CHATML_TEMPLATE).unwrap();
        let rendered = env
            .get_template("chat")
            .unwrap()
            .render(minijinja::context! {
                messages => vec![minijinja::context! { role => "user", content => "Hi" }],
                add_generation_prompt => true,
            })
            .unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn same_seed_gives_identical_weights() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        init_tiny(a.path(), &TinySpec { seed: 42, ..TinySpec::default() }).unwrap();
        init_tiny(b.path(), &TinySpec { seed: 42, ..TinySpec::default() }).unwrap();
        init_tiny(c.path(), &TinySpec { seed: 43, ..TinySpec::default() }).unwrap();
        let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(bytes(a.path()), bytes(b.path()));
        assert_ne!(bytes(a.path()), bytes(c.path()));
    }

    #[test]
    fn untied_bf16_variant_writes_lm_head() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec { tie_word_embeddings: false, dtype: DType::BF16, ..TinySpec::default() };
        init_tiny(dir.path(), &spec).unwrap();
        let cfg = read_config(dir.path());
        assert!(!cfg.tie_word_embeddings);
        assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
        let weights = load(dir.path());
        let head = &weights["lm_head.weight"];
        assert_eq!(head.dims(), &[cfg.vocab_size, 64]);
        assert_eq!(head.dtype(), DType::BF16);
        assert_eq!(weights["model.norm.weight"].dtype(), DType::BF16);
    }

    #[test]
    fn refuses_inconsistent_specs() {
        let dir = tempfile::tempdir().unwrap();
        let bad_heads = TinySpec { num_key_value_heads: 3, ..TinySpec::default() };
        assert!(init_tiny(dir.path(), &bad_heads).is_err());
        let bad_dtype = TinySpec { dtype: DType::U8, ..TinySpec::default() };
        assert!(init_tiny(dir.path(), &bad_dtype).is_err());
        assert!(!dir.path().join("model.safetensors").exists());
    }
}
