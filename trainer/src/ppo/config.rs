//! PPO-ptx's configuration: typed serde data (`[trainer.ppo]` in the TOML), its CPU-sized defaults and the
//! paper's values.

use inference::llama::Projection;
use serde::{Deserialize, Serialize};

use crate::losses::{PAPER_CLIP_RATIO, PAPER_KL_BETA, PAPER_PTX_GAMMA};
use crate::optim::AdamConfig;
use crate::policy_model::{CostOptions, DEFAULT_LORA_ALPHA, TrainError, TrainResult, default_lora_targets, lora_spec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// PPO iterations per refresh (rollouts + one optimisation pass each).
    pub iterations: usize,
    /// Episodes sampled per iteration (paper: 512).
    pub episodes_per_iteration: usize,
    /// Episodes per optimiser step (paper: 64).
    pub minibatch_size: usize,
    /// Passes over each iteration's episodes (paper: 1).
    pub inner_epochs: usize,
    /// Response length limit of a rollout.
    pub max_new_tokens: usize,
    /// Prompts whose chat rendering is longer are not used.
    pub max_prompt_tokens: usize,
    /// Sampling temperature of rollouts (paper: 1).
    pub temperature: f32,
    /// Peak learning rate of the policy.
    pub learning_rate: f64,
    /// Peak learning rate of the value function.
    pub value_learning_rate: f64,
    /// Iterations of linear warm-up from 1/10 of the peak (paper: 10).
    pub warmup_iterations: usize,
    /// β, the per-token KL penalty against the SFT policy (paper: 0.02); the starting β when `kl_target` is set.
    pub kl_coef: f64,
    /// Adapt β towards this KL from SFT (nats per response; Ziegler et al. 2019 used 6), see
    /// [`KlController`]. `None`: β stays fixed (the paper).
    pub kl_target: Option<f64>,
    /// Episodes over which a clipped proportional error moves β by its size (Ziegler et al.: 10,000).
    pub kl_horizon: usize,
    /// Normalise the RM's scores to mean 0 and variance 1 over the first iteration's rollouts (the starting
    /// policy's samples, as Ziegler et al. 2019 did), fixed for the run, with the value head rescaled to match.
    /// The paper only shifts the RM so demonstrations score 0; normalising makes β mean the same whatever spread
    /// the reward model happens to have.
    pub normalize_rewards: bool,
    /// ε of the clipped policy loss (paper: 0.2).
    pub clip_ratio: f64,
    /// Band of the clipped value loss.
    pub value_clip: f64,
    /// GAE λ (the discount is 1, as in the paper).
    pub gae_lambda: f32,
    /// Scales the value loss (separate network: only its learning signal).
    pub vf_coef: f64,
    /// γ, the pre-training loss coefficient (paper: 27.8; 0 gives plain PPO).
    pub ptx_coef: f64,
    /// Pre-training windows per episode (paper: 8).
    pub ptx_per_episode: usize,
    /// Pre-training windows per forward/backward pass (memory only).
    pub ptx_micro_batch: usize,
    /// EMA of the policy weights, saved instead of the last weights (paper: 0.992). `None` saves the last.
    pub ema_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub adam: AdamConfig,
    pub seed: u64,
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
    /// memory for long sequences, about one more forward per step.
    pub gradient_checkpointing: bool,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            iterations: 8,
            episodes_per_iteration: 16,
            minibatch_size: 8,
            inner_epochs: 1,
            max_new_tokens: 48,
            max_prompt_tokens: 256,
            temperature: 1.0,
            learning_rate: 1e-5,
            value_learning_rate: 1e-5,
            warmup_iterations: 2,
            kl_coef: PAPER_KL_BETA,
            kl_target: None,
            kl_horizon: 10_000,
            normalize_rewards: false,
            clip_ratio: PAPER_CLIP_RATIO,
            value_clip: PAPER_CLIP_RATIO,
            gae_lambda: 0.95,
            vf_coef: 1.0,
            ptx_coef: 1.0,
            ptx_per_episode: 1,
            ptx_micro_batch: 8,
            ema_decay: Some(0.9),
            max_grad_norm: Some(1.0),
            adam: AdamConfig::default(),
            seed: 0,
            freeze_layers: 0,
            lora_rank: 0,
            lora_alpha: DEFAULT_LORA_ALPHA,
            lora_targets: default_lora_targets(),
            gradient_checkpointing: false,
        }
    }
}

impl PpoConfig {
    /// The options that cut this stage's work (frozen layers, LoRA, checkpointing).
    pub fn cost_options(&self) -> CostOptions {
        CostOptions {
            freeze_layers: self.freeze_layers,
            lora: lora_spec(self.lora_rank, self.lora_alpha, &self.lora_targets, self.seed),
            gradient_checkpointing: self.gradient_checkpointing,
        }
    }

    /// The paper's settings (section 3.5 and appendix C.4), with the default learning rates.
    pub fn paper() -> Self {
        Self {
            episodes_per_iteration: 512,
            minibatch_size: 64,
            warmup_iterations: 10,
            ptx_coef: PAPER_PTX_GAMMA,
            ptx_per_episode: 8,
            ema_decay: Some(0.992),
            ..Self::default()
        }
    }

    pub(super) fn validate(&self) -> TrainResult<()> {
        let bad = |m: &str| Err(TrainError::Data(format!("PPO config: {m}")));
        if self.iterations == 0
            || self.episodes_per_iteration == 0
            || self.minibatch_size == 0
            || self.inner_epochs == 0
            || self.max_new_tokens == 0
            || self.ptx_micro_batch == 0
        {
            return bad("iterations, episodes_per_iteration, minibatch_size, inner_epochs, max_new_tokens and \
                        ptx_micro_batch must be positive");
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.learning_rate) || !positive(self.value_learning_rate) {
            return bad("learning rates must be positive");
        }
        if !(self.kl_coef.is_finite() && self.kl_coef >= 0.0 && self.ptx_coef.is_finite() && self.ptx_coef >= 0.0) {
            return bad("kl_coef and ptx_coef must be at least 0");
        }
        if !(0.0..=2.0).contains(&self.temperature) || self.temperature == 0.0 {
            return bad("temperature must be within (0, 2]");
        }
        if !(0.0..=1.0).contains(&self.gae_lambda) {
            return bad("gae_lambda must be within [0, 1]");
        }
        if self.ema_decay.is_some_and(|d| !(0.0..1.0).contains(&d)) {
            return bad("ema_decay must be within [0, 1)");
        }
        if let Some(problem) = self.cost_options().check(0.0) {
            return bad(problem);
        }
        Ok(())
    }
}
