//! `config.json` of a Llama-family model, as Hugging Face writes it.
//!
//! One struct covers Llama 2/3, SmolLM2, TinyLlama, Mistral (without sliding
//! window) and Qwen2 (whose only difference here is the bias on Q/K/V).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Architectures [`crate::llama::Llama`] implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2 has a bias on the Q, K and V projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

/// `eos_token_id` is a number in most configs and a list in Llama 3's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Llama 3.1-style frequency-dependent RoPE scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default = "default_low_freq_factor")]
    pub low_freq_factor: f64,
    #[serde(default = "default_high_freq_factor")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max_position_embeddings")]
    pub original_max_position_embeddings: usize,
}

fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_low_freq_factor() -> f64 {
    1.0
}
fn default_high_freq_factor() -> f64 {
    4.0
}
fn default_original_max_position_embeddings() -> usize {
    8192
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Checks the numbers are mutually consistent and the architecture is one
    /// we implement, so shape errors surface at load time with a clear cause.
    pub fn validate(&self) -> Result<()> {
        let arch = self.architectures.first().map(String::as_str).unwrap_or("LlamaForCausalLM");
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(Error::UnsupportedArchitecture(arch.to_string()));
        }
        let bad = |msg: String| Err(Error::model_file("config.json", msg));
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("hidden_size, num_attention_heads and num_hidden_layers must be positive".into());
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if let Some(scaling) = &self.rope_scaling
            && scaling.rope_type != "llama3"
        {
            return bad(format!("rope_scaling type {:?} is not supported (only \"llama3\")", scaling.rope_type));
        }
        Ok(())
    }

    /// Qwen2 configs do not carry `attention_bias`; the architecture implies it.
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias || self.architectures.iter().any(|a| a == "Qwen2ForCausalLM")
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_style_config() {
        let cfg: LlamaConfig = serde_json::from_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":300,
            "eos_token_id":[1,2],"rope_scaling":{"rope_type":"llama3","factor":8.0}}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.head_dim(), 16);
        assert_eq!(cfg.eos_token_ids(), vec![1, 2]);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let mut cfg: LlamaConfig = serde_json::from_str(
            r#"{"architectures":["GPT2LMHeadModel"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":300}"#,
        )
        .unwrap();
        assert!(matches!(cfg.validate(), Err(Error::UnsupportedArchitecture(_))));
        cfg.architectures = vec!["LlamaForCausalLM".into()];
        cfg.num_key_value_heads = Some(3);
        assert!(cfg.validate().is_err());
    }
}
