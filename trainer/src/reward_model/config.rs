//! The reward model's configuration: typed serde data (`[trainer.reward_model]` in the TOML), its defaults and
//! the paper's values.

use inference::llama::Projection;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamConfig, PAPER_FINAL_LR_RATIO};
use crate::policy_model::{CostOptions, DEFAULT_LORA_ALPHA, TrainError, TrainResult, default_lora_targets, lora_spec};

/// The paper's RM learning rate (6B model).
pub const PAPER_RM_LR: f64 = 9e-6;
/// Epochs of RM training in the paper.
pub const PAPER_RM_EPOCHS: usize = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmConfig {
    /// Passes over the training rankings (paper: 1).
    pub epochs: usize,
    /// Peak learning rate (paper: 9e-6 for the 6B RM).
    pub learning_rate: f64,
    pub final_lr_ratio: f64,
    pub warmup_steps: usize,
    /// Prompts (rankings) per optimiser step (paper: 64).
    pub batch_prompts: usize,
    /// Prompts per forward/backward pass; all K completions of a prompt always share one pass. Gradients of a
    /// step's micro-batches are accumulated, so this bounds memory only.
    pub micro_batch_prompts: usize,
    pub residual_dropout: f32,
    /// Sequences keep their last `max_seq_len` tokens.
    pub max_seq_len: usize,
    pub max_grad_norm: Option<f64>,
    pub adam: AdamConfig,
    /// Seeds the head's initialisation and the order of prompts.
    pub seed: u64,
    /// Sequences per forward when scoring (validation, demonstrations).
    pub score_batch_size: usize,
    /// Freeze the token embedding and this many of the lowest layers (0 = the paper's full fine-tune): they get
    /// no gradient and no optimiser state, and the forward builds no graph through them. With tied embeddings the
    /// output projection freezes with the embedding.
    pub freeze_layers: usize,
    /// LoRA adapters of this rank on `lora_targets` of every trainable layer (0 = the paper's full fine-tune): the
    /// model's own weights freeze and only the adapters train (their weight gradients are not computed);
    /// saving merges the adapters into the weights, so checkpoints stay plain model directories.
    pub lora_rank: usize,
    /// The adapters' update is scaled by `lora_alpha / lora_rank`.
    pub lora_alpha: f64,
    /// The projections that get adapters: `q`, `k`, `v`, `o`, `gate`, `up`, `down` (default: all seven).
    pub lora_targets: Vec<Projection>,
    /// Keep only each layer's input through the forward and recompute its activations in the backward: less
    /// memory for long sequences, about one more forward per step (needs `residual_dropout = 0`).
    pub gradient_checkpointing: bool,
    /// With frozen layers, run them once per completion before the first epoch and keep their output (the
    /// residual stream, F32 `[tokens, hidden]` per completion; with every layer frozen only the last position)
    /// for all epochs: each step then runs only the trainable layers.
    pub cache_frozen_activations: bool,
    /// Keep the weights of the epoch with the lowest validation loss rather than the last epoch's (needs
    /// validation rankings; the paper trains one epoch and keeps it).
    pub keep_best_epoch: bool,
    /// Stop after this many epochs without a lower validation loss (`None`: run every epoch).
    pub early_stop_patience: Option<usize>,
    /// Rank-gap margin `m` of the ranking loss: a pair the labeler put `gap` ranks apart contributes
    /// `-log σ(r_w - r_l - m · (gap - 1))`, so adjacent ranks get none and far-apart pairs must be separated
    /// further (Llama 2's preference-strength margin, with the rank distance as the strength since InstructGPT's
    /// rankings carry no rating; see `losses::reward`). Default 0.0, which is the paper's setting: eq. 1 has no
    /// margin, every ordered pair counts alike. The validation loss (which picks the kept epoch and drives early
    /// stopping) uses the same margin, so epochs are chosen by the objective being trained; pair accuracy
    /// ignores it.
    pub margin_per_rank: f64,
}

impl Default for RmConfig {
    fn default() -> Self {
        Self {
            epochs: PAPER_RM_EPOCHS,
            learning_rate: 1e-5,
            final_lr_ratio: PAPER_FINAL_LR_RATIO,
            warmup_steps: 0,
            batch_prompts: 8,
            micro_batch_prompts: 2,
            residual_dropout: 0.0,
            max_seq_len: 512,
            max_grad_norm: Some(1.0),
            adam: AdamConfig::default(),
            seed: 0,
            score_batch_size: 16,
            freeze_layers: 0,
            lora_rank: 0,
            lora_alpha: DEFAULT_LORA_ALPHA,
            lora_targets: default_lora_targets(),
            gradient_checkpointing: false,
            cache_frozen_activations: true,
            keep_best_epoch: true,
            early_stop_patience: None,
            margin_per_rank: 0.0,
        }
    }
}

impl RmConfig {
    /// The options that cut this stage's work (frozen layers, LoRA, checkpointing).
    pub fn cost_options(&self) -> CostOptions {
        CostOptions {
            freeze_layers: self.freeze_layers,
            lora: lora_spec(self.lora_rank, self.lora_alpha, &self.lora_targets, self.seed),
            gradient_checkpointing: self.gradient_checkpointing,
        }
    }

    pub(super) fn validate(&self) -> TrainResult<()> {
        let bad = |m: &str| Err(TrainError::Data(format!("RM config: {m}")));
        if self.epochs == 0 || self.batch_prompts == 0 || self.micro_batch_prompts == 0 || self.score_batch_size == 0 {
            return bad("epochs, batch_prompts, micro_batch_prompts and score_batch_size must be positive");
        }
        let rates_ok =
            self.learning_rate.is_finite() && self.learning_rate > 0.0 && (0.0..=1.0).contains(&self.final_lr_ratio);
        if self.max_seq_len < 2 || !rates_ok {
            return bad("max_seq_len must be at least 2, learning_rate positive, final_lr_ratio within [0, 1]");
        }
        if !(0.0..1.0).contains(&self.residual_dropout) {
            return bad("residual_dropout must be within [0, 1)");
        }
        if !(self.margin_per_rank.is_finite() && self.margin_per_rank >= 0.0) {
            return bad("margin_per_rank must be finite and >= 0");
        }
        if let Some(problem) = self.cost_options().check(self.residual_dropout) {
            return bad(problem);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_defaults_to_the_papers_none_and_must_be_finite_and_non_negative() {
        assert_eq!(RmConfig::default().margin_per_rank, 0.0);
        assert!(RmConfig::default().validate().is_ok());
        assert!(RmConfig { margin_per_rank: 0.25, ..RmConfig::default() }.validate().is_ok());
        for m in [-0.1, f64::NAN, f64::INFINITY] {
            let err = RmConfig { margin_per_rank: m, ..RmConfig::default() }.validate().unwrap_err();
            assert!(err.to_string().contains("margin_per_rank"), "{m}: {err}");
        }
    }

    #[test]
    fn margin_deserialises_from_float_or_integer_and_typos_are_refused() {
        let config: RmConfig = serde_json::from_str(r#"{"margin_per_rank": 0.5}"#).unwrap();
        assert_eq!(config.margin_per_rank, 0.5);
        let config: RmConfig = serde_json::from_str(r#"{"margin_per_rank": 1}"#).unwrap();
        assert_eq!(config.margin_per_rank, 1.0);
        assert!(serde_json::from_str::<RmConfig>(r#"{"margin_per_ranks": 1.0}"#).is_err());
    }
}
