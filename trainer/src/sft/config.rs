//! SFT's configuration: typed serde data (`[trainer.sft]` in the TOML), its defaults and the paper's values.

use inference::llama::Projection;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamConfig, PAPER_FINAL_LR_RATIO};
use crate::policy_model::{CostOptions, DEFAULT_LORA_ALPHA, TrainError, TrainResult, default_lora_targets, lora_spec};

/// Epochs of SFT in the paper.
pub const PAPER_SFT_EPOCHS: usize = 16;
/// Residual dropout of SFT in the paper.
pub const PAPER_RESIDUAL_DROPOUT: f32 = 0.2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Passes over the training split (paper: 16).
    pub epochs: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// The cosine decay ends at this fraction of the peak (paper: 0.1).
    pub final_lr_ratio: f64,
    /// Linear warm-up steps from 10% of the peak (0: start at the peak).
    pub warmup_steps: usize,
    /// Examples per optimiser step.
    pub batch_size: usize,
    /// Examples per forward/backward pass; gradients of the micro-batches of one step are accumulated
    /// (token-weighted), so this bounds memory without changing the result.
    pub micro_batch_size: usize,
    /// Dropout on every residual branch while training (paper: 0.2). Validation runs without it.
    pub residual_dropout: f32,
    /// Longer examples lose the end of their response; an example whose prompt alone fills it is skipped.
    pub max_seq_len: usize,
    /// Clip the gradient's global norm (not in the paper; a guard for small batches). `None` disables it.
    pub max_grad_norm: Option<f64>,
    pub adam: AdamConfig,
    /// Seeds the order of examples in each epoch.
    pub seed: u64,
    /// Also write every epoch's model to `<out_dir>/epoch-NN/`.
    pub save_every_epoch: bool,
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
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            epochs: 4,
            learning_rate: 5e-5,
            final_lr_ratio: PAPER_FINAL_LR_RATIO,
            warmup_steps: 0,
            batch_size: 8,
            micro_batch_size: 8,
            residual_dropout: 0.0,
            max_seq_len: 512,
            max_grad_norm: Some(1.0),
            adam: AdamConfig::default(),
            seed: 0,
            save_every_epoch: false,
            freeze_layers: 0,
            lora_rank: 0,
            lora_alpha: DEFAULT_LORA_ALPHA,
            lora_targets: default_lora_targets(),
            gradient_checkpointing: false,
        }
    }
}

impl SftConfig {
    /// The options that cut this stage's work (frozen layers, LoRA, checkpointing).
    pub fn cost_options(&self) -> CostOptions {
        CostOptions {
            freeze_layers: self.freeze_layers,
            lora: lora_spec(self.lora_rank, self.lora_alpha, &self.lora_targets, self.seed),
            gradient_checkpointing: self.gradient_checkpointing,
        }
    }

    /// The paper's schedule (16 epochs, residual dropout 0.2) with the CPU-sized batch and learning rate.
    pub fn paper() -> Self {
        Self { epochs: PAPER_SFT_EPOCHS, residual_dropout: PAPER_RESIDUAL_DROPOUT, ..Self::default() }
    }

    pub(super) fn validate(&self) -> TrainResult<()> {
        let bad = |m: &str| Err(TrainError::Data(format!("SFT config: {m}")));
        if self.epochs == 0 || self.batch_size == 0 || self.micro_batch_size == 0 || self.max_seq_len < 2 {
            return bad("epochs, batch_size and micro_batch_size must be positive and max_seq_len at least 2");
        }
        let rates_ok =
            self.learning_rate.is_finite() && self.learning_rate > 0.0 && (0.0..=1.0).contains(&self.final_lr_ratio);
        if !rates_ok {
            return bad("learning_rate must be positive and final_lr_ratio within [0, 1]");
        }
        if !(0.0..1.0).contains(&self.residual_dropout) {
            return bad("residual_dropout must be within [0, 1)");
        }
        if let Some(problem) = self.cost_options().check(self.residual_dropout) {
            return bad(problem);
        }
        Ok(())
    }
}
