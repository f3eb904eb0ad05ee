//! The reward model (paper section 3.5, "Reward modeling"): the SFT model with its unembedding replaced by a
//! scalar head, trained on labelers' rankings.
//!
//! - Input: the prompt through the chat template, the response, then EOS (see
//!   [`encode_chat`](crate::policy_model::encode_chat)); the reward is `head(hidden state at the last token)`, the
//!   final-norm hidden state of the EOS token, which attends to the whole prompt and response. Sequences longer
//!   than `max_seq_len` keep their last `max_seq_len` tokens (the response and EOS matter most).
//! - Loss ([`ranking_loss_batch`]): each prompt's K completions are forwarded once, in one batch, and all its
//!   C(K,2) comparisons (ties dropped) form one batch element; a step averages over prompts.
//! - One epoch by default (the paper: more overfit), Adam β = (0.9, 0.95), cosine decay to 10% of the peak
//!   (paper peak: 9e-6 at 6B; here 1e-5 for SmolLM2-135M, and 2e-3 for the tiny random test models).
//! - Afterwards the head's bias is shifted so the labelers' demonstrations (training split) score 0 on average.
//!
//! On disk an RM is a model directory: the trunk as `model.safetensors` (HF names; an untied `lm_head.weight` is
//! kept, unused, so the directory still loads as a causal LM), `config.json` and the tokenizer files, plus
//! `reward_head.safetensors` (`score.weight` `[1, hidden]`, `score.bias` `[1]`) and `rm.json` ([`RmMeta`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarMap};
use feedback::split::Split;
use inference::tokenizer::ChatMessage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::losses::{ranking_loss_batch, ranking_loss_weighted, ranking_pairs};
use crate::optim::{Adam, AdamConfig, Decay, Gradients, LrSchedule, PAPER_FINAL_LR_RATIO};
use crate::policy_model::{
    PolicyModel, TrainError, TrainResult, encode_conversation, io_err, write_file_atomic, write_safetensors_atomic,
};
use crate::snapshot::{RankedExample, SftExample};
use crate::step_timing::{Phase, StepTiming};

/// The scalar head's weights.
pub const HEAD_FILE: &str = "reward_head.safetensors";
/// What makes a model directory a reward model.
pub const META_FILE: &str = "rm.json";
/// The training report written next to the model.
pub const REPORT_FILE: &str = "rm_report.json";
/// The paper's RM learning rate (6B model).
pub const PAPER_RM_LR: f64 = 9e-6;
/// Epochs of RM training in the paper.
pub const PAPER_RM_EPOCHS: usize = 1;
const META_KIND: &str = "instructd-reward-model";
const HEAD_WEIGHT: &str = "score.weight";
const HEAD_BIAS: &str = "score.bias";

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
    /// With frozen layers, run them once per completion before the first epoch and keep their output (the
    /// residual stream, F32 `[tokens, hidden]` per completion; with every layer frozen only the last position)
    /// for all epochs: each step then runs only the trainable layers.
    pub cache_frozen_activations: bool,
    /// Keep the weights of the epoch with the lowest validation loss rather than the last epoch's (needs
    /// validation rankings; the paper trains one epoch and keeps it).
    pub keep_best_epoch: bool,
    /// Stop after this many epochs without a lower validation loss (`None`: run every epoch).
    pub early_stop_patience: Option<usize>,
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
            cache_frozen_activations: true,
            keep_best_epoch: true,
            early_stop_patience: None,
        }
    }
}

impl RmConfig {
    fn validate(&self) -> TrainResult<()> {
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
        Ok(())
    }
}

/// `rm.json`: how to read the directory as a reward model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RmMeta {
    pub kind: String,
    pub format_version: u32,
    pub head_file: String,
    pub hidden_size: usize,
    /// The scored sequence ends with the tokenizer's first EOS id.
    pub append_eos: bool,
    /// Longer sequences keep their last `max_seq_len` tokens.
    pub max_seq_len: usize,
    /// Subtracted from the head's bias so demonstrations score 0 on average (already applied to the bias).
    pub bias_offset: f32,
    /// Demonstrations the offset was measured on.
    pub demonstrations: usize,
    /// The policy (SFT) directory the trunk started from.
    pub source_policy: PathBuf,
}

/// Ranking quality on a set of prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankEval {
    pub prompts: usize,
    pub pairs: usize,
    /// Mean over prompts of the per-prompt ranking loss.
    pub loss: f32,
    /// Fraction of pairs the RM orders like the labeler (strictly).
    pub accuracy: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RmEpoch {
    pub epoch: usize,
    pub steps: usize,
    /// Mean over the epoch's steps of the step loss (as the weights changed).
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub val: Option<RankEval>,
    pub last_lr: f64,
    pub wall_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RmReport {
    pub epochs: Vec<RmEpoch>,
    /// The epoch whose weights were saved (1-based; see [`RmConfig::keep_best_epoch`]).
    pub kept_epoch: usize,
    /// The validation split on the saved weights.
    pub val: Option<RankEval>,
    /// The frozen layers' cached output, when cached.
    pub activation_cache: Option<ActivationCache>,
    /// The validation split before training (the untrained head: about chance).
    pub val_before: Option<RankEval>,
    /// Mean demonstration reward before the bias shift (what was subtracted); `None` without demonstrations.
    pub bias_offset: Option<f32>,
    /// Mean demonstration reward after the shift (≈ 0).
    pub demo_mean_after: Option<f32>,
    pub demonstrations: usize,
    pub train_prompts: usize,
    pub val_prompts: usize,
    /// Rankings left out: no ordered pair (all tied) or completions and ranks of different lengths.
    pub skipped: usize,
    /// Sequences cut to `max_seq_len`.
    pub truncated: usize,
    pub total_steps: usize,
    pub wall_secs: f64,
    pub source_dir: PathBuf,
    pub out_dir: PathBuf,
    pub config: RmConfig,
}

/// The frozen layers' output kept across epochs ([`RmConfig::cache_frozen_activations`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActivationCache {
    pub bytes: usize,
    /// Time to compute it (the frozen layers' one forward over every completion).
    pub wall_secs: f64,
}

/// The epoch with the lowest validation loss so far and, while later epochs may still replace the weights, a
/// copy of its trainable weights.
#[derive(Default)]
struct BestEpoch {
    epoch: usize,
    loss: Option<f32>,
    weights: Option<Vec<Tensor>>,
}

/// Computes and attaches the frozen layers' output to every ranking of `set`; returns the floats kept (0 when
/// no layer is frozen).
fn cache_activations(rm: &RewardModel, set: &mut [Ranking], batch: usize) -> TrainResult<usize> {
    let sequences: Vec<&[u32]> = set.iter().flat_map(|r| r.sequences.iter().map(Vec::as_slice)).collect();
    let Some(activations) = rm.frozen_activations(&sequences, batch)? else {
        return Ok(0);
    };
    let floats = activations.iter().map(Vec::len).sum();
    let mut activations = activations.into_iter();
    for ranking in set.iter_mut() {
        ranking.activations = Some(activations.by_ref().take(ranking.sequences.len()).collect());
    }
    Ok(floats)
}

/// A transformer trunk and a scalar head.
pub struct RewardModel {
    trunk: PolicyModel,
    head_vars: VarMap,
    head: Linear,
    meta: RmMeta,
}

impl RewardModel {
    /// A fresh reward model from a policy (SFT) directory: its trunk, and a new head ~ N(0, 1/(hidden + 1)),
    /// bias 0, seeded.
    pub fn from_policy(
        policy_dir: impl AsRef<Path>,
        device: &Device,
        seed: u64,
        max_seq_len: usize,
    ) -> TrainResult<Self> {
        let trunk = PolicyModel::load(policy_dir.as_ref(), device)?;
        let hidden = trunk.config().hidden_size;
        let mut rng = StdRng::seed_from_u64(seed);
        let std = 1.0 / ((hidden + 1) as f64).sqrt();
        let weight: Vec<f32> = (0..hidden)
            .map(|_| {
                let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        let weight = Tensor::from_vec(weight, (1, hidden), device)?;
        let bias = Tensor::zeros(1, DType::F32, device)?;
        let meta = RmMeta {
            kind: META_KIND.into(),
            format_version: 1,
            head_file: HEAD_FILE.into(),
            hidden_size: hidden,
            append_eos: true,
            max_seq_len: max_seq_len.min(trunk.llama().max_positions()),
            bias_offset: 0.0,
            demonstrations: 0,
            source_policy: trunk.source_dir().to_path_buf(),
        };
        Self::assemble(trunk, weight, bias, meta)
    }

    /// Loads a reward-model directory written by [`RewardModel::save`], on the default device.
    pub fn load(dir: impl AsRef<Path>) -> TrainResult<Self> {
        Self::load_on(dir, &inference::load::default_device())
    }

    pub fn load_on(dir: impl AsRef<Path>, device: &Device) -> TrainResult<Self> {
        let dir = dir.as_ref();
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let checkpoint = |message: String| TrainError::Checkpoint { path: meta_path.clone(), message };
        let meta: RmMeta = serde_json::from_str(&text).map_err(|e| checkpoint(format!("invalid rm.json: {e}")))?;
        if meta.kind != META_KIND || meta.format_version != 1 {
            return Err(checkpoint(format!(
                "not a reward model (kind {:?}, version {})",
                meta.kind, meta.format_version
            )));
        }
        let trunk = PolicyModel::load(dir, device)?;
        let head_path = dir.join(&meta.head_file);
        let mut head = candle_core::safetensors::load(&head_path, device).map_err(|e| TrainError::Checkpoint {
            path: head_path.clone(),
            message: format!("cannot read the reward head: {e}"),
        })?;
        let hidden = trunk.config().hidden_size;
        let (weight, bias) = match (head.remove(HEAD_WEIGHT), head.remove(HEAD_BIAS)) {
            (Some(w), Some(b)) if w.dims() == [1, hidden] && b.dims() == [1] => (w, b),
            _ => {
                return Err(TrainError::Checkpoint {
                    path: head_path,
                    message: format!("expected {HEAD_WEIGHT} [1, {hidden}] and {HEAD_BIAS} [1]"),
                });
            }
        };
        Self::assemble(trunk, weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?, meta)
    }

    fn assemble(trunk: PolicyModel, weight: Tensor, bias: Tensor, meta: RmMeta) -> TrainResult<Self> {
        let head_vars = VarMap::new();
        let (weight, bias) = (Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
        {
            let mut data = head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
            data.insert(HEAD_WEIGHT.into(), weight.clone());
            data.insert(HEAD_BIAS.into(), bias.clone());
        }
        let head = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
        Ok(Self { trunk, head_vars, head, meta })
    }

    /// Writes the reward model as a directory (see the module docs).
    pub fn save(&self, out_dir: impl AsRef<Path>) -> TrainResult<()> {
        let out_dir = out_dir.as_ref();
        self.trunk.save(out_dir)?;
        let head: HashMap<String, Tensor> = {
            let data = self.head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_device(&Device::Cpu)?)))
                .collect::<TrainResult<_>>()?
        };
        write_safetensors_atomic(&head, &out_dir.join(HEAD_FILE))?;
        let meta = serde_json::to_vec_pretty(&self.meta).map_err(|e| TrainError::Data(e.to_string()))?;
        write_file_atomic(&out_dir.join(META_FILE), &meta)
    }

    /// Freezes the trunk's embedding and lowest `n` layers ([`PolicyModel::with_frozen_layers`]).
    pub fn with_frozen_layers(mut self, n: usize) -> TrainResult<Self> {
        self.trunk = self.trunk.with_frozen_layers(n)?;
        Ok(self)
    }

    pub fn trunk(&self) -> &PolicyModel {
        &self.trunk
    }

    pub fn head(&self) -> &Linear {
        &self.head
    }

    pub fn meta(&self) -> &RmMeta {
        &self.meta
    }

    /// Trunk variables (sorted by name), then the head's weight and bias.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars = self.trunk.vars();
        let data = self.head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
        vars.extend([HEAD_WEIGHT, HEAD_BIAS].iter().filter_map(|n| data.get(*n).cloned()));
        vars
    }

    /// The token ids the RM scores for a (prompt, response) pair, and whether they were cut to `max_seq_len`.
    pub fn encode(&self, prompt: &str, response: &str) -> TrainResult<(Vec<u32>, bool)> {
        self.encode_conversation(&[ChatMessage::new("user", prompt)], response)
    }

    /// [`RewardModel::encode`] of a response to a whole conversation (the gateway's `POST /v1/rewards` with
    /// `messages`).
    pub fn encode_conversation(&self, messages: &[ChatMessage], response: &str) -> TrainResult<(Vec<u32>, bool)> {
        let mut ids = encode_conversation(self.trunk.tokenizer(), messages, response, self.meta.append_eos)?.ids;
        let max = self.meta.max_seq_len;
        let cut = ids.len() > max;
        if cut {
            ids.drain(..ids.len() - max);
        }
        Ok((ids, cut))
    }

    /// Rewards `[B]` of a batch of token sequences, differentiable wrt the trunk and head.
    pub fn rewards(&self, sequences: &[&[u32]], residual_dropout: f32) -> TrainResult<Tensor> {
        let device = self.trunk.device();
        let t = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 || sequences.iter().any(|s| s.is_empty()) {
            return Err(TrainError::Data("cannot score an empty sequence".into()));
        }
        let mut ids = Vec::with_capacity(sequences.len() * t);
        let mut last = Vec::with_capacity(sequences.len());
        for (b, s) in sequences.iter().enumerate() {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(0u32, t - s.len()));
            last.push((b * t + s.len() - 1) as u32);
        }
        let input = Tensor::from_vec(ids, (sequences.len(), t), device)?;
        let hidden = self.trunk.llama().hidden_states(&input, residual_dropout)?;
        let (b, t, h) = hidden.dims3()?;
        let at_last = hidden.reshape((b * t, h))?.index_select(&Tensor::from_vec(last, b, device)?, 0)?;
        Ok(self.head.forward(&at_last)?.squeeze(1)?)
    }

    /// The output of the frozen layers for each sequence (see [`RmConfig::cache_frozen_activations`]): the rows
    /// `[len, hidden]` of every position, flattened, or only the last position's row when every layer is frozen
    /// (the head reads nothing else then). `None` when no layer is frozen. Runs `batch` sequences per forward,
    /// shortest first so little is padded.
    pub fn frozen_activations(&self, sequences: &[&[u32]], batch: usize) -> TrainResult<Option<Vec<Vec<f32>>>> {
        let llama = self.trunk.llama();
        if llama.frozen_layers() == 0 {
            return Ok(None);
        }
        let last_only = llama.frozen_layers() >= self.trunk.config().num_hidden_layers;
        let hidden = self.meta.hidden_size;
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| sequences[i].len());
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); sequences.len()];
        for chunk in order.chunks(batch.max(1)) {
            crate::stop::check()?;
            let t = chunk.iter().map(|&i| sequences[i].len()).max().unwrap_or(0);
            if t == 0 || chunk.iter().any(|&i| sequences[i].is_empty()) {
                return Err(TrainError::Data("cannot score an empty sequence".into()));
            }
            let mut ids = Vec::with_capacity(chunk.len() * t);
            for &i in chunk {
                ids.extend_from_slice(sequences[i]);
                ids.extend(std::iter::repeat_n(0u32, t - sequences[i].len()));
            }
            let input = Tensor::from_vec(ids, (chunk.len(), t), self.trunk.device())?;
            let prefix = crate::compute_pool::run(|| llama.frozen_prefix(&input))?
                .ok_or_else(|| TrainError::Data("no frozen layer".into()))?;
            let flat = prefix.flatten_all()?.to_vec1::<f32>()?;
            for (b, &i) in chunk.iter().enumerate() {
                let len = sequences[i].len();
                let rows = if last_only { len - 1..len } else { 0..len };
                out[i] = flat[(b * t + rows.start) * hidden..(b * t + rows.end) * hidden].to_vec();
            }
        }
        Ok(Some(out))
    }

    /// Rewards `[B]` from frozen-layer outputs as [`RewardModel::frozen_activations`] returns them,
    /// differentiable wrt the trainable layers and the head: the same values as [`RewardModel::rewards`] on the
    /// sequences they came from.
    pub fn rewards_from_activations(&self, activations: &[&[f32]], residual_dropout: f32) -> TrainResult<Tensor> {
        let hidden = self.meta.hidden_size;
        let lens: Vec<usize> = activations.iter().map(|a| a.len() / hidden).collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        if t == 0 || lens.contains(&0) || activations.iter().any(|a| a.len() % hidden != 0) {
            return Err(TrainError::Data("cannot score an empty sequence".into()));
        }
        let mut rows = vec![0f32; activations.len() * t * hidden];
        let mut last = Vec::with_capacity(activations.len());
        for (b, a) in activations.iter().enumerate() {
            rows[b * t * hidden..b * t * hidden + a.len()].copy_from_slice(a);
            last.push((b * t + lens[b] - 1) as u32);
        }
        let device = self.trunk.device();
        let prefix = Tensor::from_vec(rows, (activations.len(), t, hidden), device)?;
        let states = self.trunk.llama().hidden_states_above_frozen(&prefix, residual_dropout)?;
        let at_last = states
            .reshape((activations.len() * t, hidden))?
            .index_select(&Tensor::from_vec(last, activations.len(), device)?, 0)?;
        Ok(self.head.forward(&at_last)?.squeeze(1)?)
    }

    /// Per-position values `[B, T]` of a right-padded batch of token ids `[B, T]`: the head applied to every
    /// position's hidden state, differentiable. PPO's value function is a reward model read this way (the paper
    /// initialises it from the RM).
    pub fn values(&self, input: &Tensor, residual_dropout: f32) -> TrainResult<Tensor> {
        let hidden = self.trunk.llama().hidden_states(input, residual_dropout)?;
        Ok(self.head.forward(&hidden)?.squeeze(2)?)
    }

    /// Rewards of (prompt, response) pairs, for the evaluation gate and PPO.
    pub fn score<P: AsRef<str>, R: AsRef<str>>(&self, pairs: &[(P, R)]) -> TrainResult<Vec<f32>> {
        let sequences =
            pairs.iter().map(|(p, r)| Ok(self.encode(p.as_ref(), r.as_ref())?.0)).collect::<TrainResult<Vec<_>>>()?;
        self.score_tokens(&sequences, 16)
    }

    /// Rewards of already-tokenised sequences (as [`RewardModel::encode`] makes them), `batch` per forward.
    pub fn score_tokens(&self, sequences: &[Vec<u32>], batch: usize) -> TrainResult<Vec<f32>> {
        let mut out = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            out.extend(self.rewards(&refs, 0.0)?.detach().to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Maps the head's output `r` to `scale · r + shift` (PPO's reward normalisation applied to its value head).
    pub fn rescale_head(&self, scale: f64, shift: f64) -> TrainResult<()> {
        let data = self.head_vars.data().lock().unwrap_or_else(|e| e.into_inner());
        let (Some(weight), Some(bias)) = (data.get(HEAD_WEIGHT), data.get(HEAD_BIAS)) else {
            return Err(TrainError::Data("reward head has no weight or bias".into()));
        };
        weight.set(&(weight.as_tensor().detach() * scale)?)?;
        bias.set(&((bias.as_tensor().detach() * scale)? + shift)?)?;
        Ok(())
    }

    /// Shifts the head's bias so the given demonstrations score 0 on average; returns the mean before the shift
    /// (`None` when there are none).
    pub fn center_on_demonstrations(
        &mut self,
        demonstrations: &[SftExample],
        batch: usize,
    ) -> TrainResult<Option<f32>> {
        if demonstrations.is_empty() {
            return Ok(None);
        }
        let pairs: Vec<(&str, &str)> =
            demonstrations.iter().map(|d| (d.prompt.as_str(), d.response.as_str())).collect();
        let sequences = pairs.iter().map(|(p, r)| Ok(self.encode(p, r)?.0)).collect::<TrainResult<Vec<_>>>()?;
        let scores = self.score_tokens(&sequences, batch)?;
        let mean = (scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len() as f64) as f32;
        let bias = self.head.bias().ok_or_else(|| TrainError::Data("reward head has no bias".into()))?;
        let var = self
            .head_vars
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(HEAD_BIAS)
            .cloned()
            .ok_or_else(|| TrainError::Data("reward head has no bias".into()))?;
        var.set(&(bias.detach() - f64::from(mean))?)?;
        self.meta.bias_offset += mean;
        self.meta.demonstrations = demonstrations.len();
        Ok(Some(mean))
    }
}

/// One prompt's completions, tokenised, with the labeler's ranks (0 = best; equal ranks are ties), and once
/// cached, the frozen layers' output for each completion.
#[derive(Debug, Clone)]
pub struct Ranking {
    sequences: Vec<Vec<u32>>,
    ranks: Vec<usize>,
    pairs: usize,
    /// Weight in the loss (labeler quality control; 1 normally).
    weight: f32,
    activations: Option<Vec<Vec<f32>>>,
}

impl Ranking {
    /// `None` when the counts differ or no pair is ordered (nothing to learn from).
    pub fn new(sequences: Vec<Vec<u32>>, ranks: Vec<usize>) -> Option<Self> {
        let pairs = ranking_pairs(&ranks).len();
        (sequences.len() == ranks.len() && pairs > 0).then_some(Self {
            sequences,
            ranks,
            pairs,
            weight: 1.0,
            activations: None,
        })
    }

    /// The same ranking weighted `weight` in the loss (a labeler's quality weight, as the snapshot gives it).
    pub fn with_weight(mut self, weight: f32) -> Self {
        self.weight = weight;
        self
    }

    /// Rewards of this ranking's completions for a batch: from cached activations when present.
    fn rewards_of(rm: &RewardModel, micro: &[&Ranking], residual_dropout: f32) -> TrainResult<Tensor> {
        match micro.iter().map(|r| r.activations.as_ref()).collect::<Option<Vec<_>>>() {
            Some(cached) => {
                let rows: Vec<&[f32]> = cached.iter().flat_map(|c| c.iter().map(Vec::as_slice)).collect();
                rm.rewards_from_activations(&rows, residual_dropout)
            }
            None => {
                let sequences: Vec<&[u32]> = micro.iter().flat_map(|r| r.sequences.iter().map(Vec::as_slice)).collect();
                rm.rewards(&sequences, residual_dropout)
            }
        }
    }

    /// Ordered (untied) pairs.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// Tokens over all completions.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }
}

/// What one reward-model optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmStepOutcome {
    /// Mean per-prompt ranking loss (before the update).
    pub loss: f64,
    /// Ordered pairs the model already ranked right.
    pub correct: f64,
    pub pairs: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub timing: StepTiming,
}

/// One reward-model optimiser step over `rankings`: every prompt's K completions forwarded once in a micro-batch
/// of `micro_batch_prompts` prompts, all its ordered pairs in the loss, gradients accumulated (prompt-weighted),
/// clipped, and an Adam update at `lr`.
pub fn train_step(
    rm: &RewardModel,
    vars: &[Var],
    rankings: &[&Ranking],
    config: &RmConfig,
    adam: &mut Adam,
    lr: f64,
) -> TrainResult<RmStepOutcome> {
    // On the training pool: the fused ops' parallel regions then cost no hand-over (see `compute_pool`).
    crate::compute_pool::run(|| {
        let mut timing = StepTiming::default();
        let mut grads = Gradients::new();
        let (mut loss_sum, mut correct, mut pairs) = (0f64, 0f64, 0usize);
        for micro in rankings.chunks(config.micro_batch_prompts) {
            let (loss, accuracy) = timing.time(Phase::Forward, || -> TrainResult<_> {
                let ranks: Vec<&[usize]> = micro.iter().map(|r| r.ranks.as_slice()).collect();
                let weights: Vec<f32> = micro.iter().map(|r| r.weight).collect();
                let rewards = Ranking::rewards_of(rm, micro, config.residual_dropout)?;
                Ok(ranking_loss_weighted(&rewards, &ranks, Some(&weights))?)
            })?;
            // Each micro-batch's loss is a weighted mean over its prompts: scale it by its share of the step's weight.
            let total: f64 = rankings.iter().map(|r| f64::from(r.weight)).sum();
            let weight = micro.iter().map(|r| f64::from(r.weight)).sum::<f64>() / total.max(f64::MIN_POSITIVE);
            let store = timing.time(Phase::Backward, || rm.trunk().backward(&loss))?;
            timing.time(Phase::Gradients, || grads.accumulate(&store, vars, weight))?;
            let micro_pairs: usize = micro.iter().map(|r| r.pairs).sum();
            loss_sum += f64::from(loss.to_scalar::<f32>()?) * weight;
            correct += f64::from(accuracy) * micro_pairs as f64;
            pairs += micro_pairs;
        }
        let grad_norm = timing.time(Phase::Gradients, || match config.max_grad_norm {
            Some(max) => grads.clip_global_norm(max),
            None => grads.global_norm(),
        })?;
        timing.time(Phase::Optimizer, || adam.step(&grads, lr))?;
        Ok(RmStepOutcome { loss: loss_sum, correct, pairs, grad_norm, timing })
    })
}

/// Trains a reward model from the policy (SFT) in `policy_dir` on the training split of `examples`, reports
/// validation pair accuracy before and after each epoch, then shifts the head's bias so the training-split
/// entries of `demonstrations` score 0 on average, and saves it to `out_dir` (with `rm_report.json`).
pub fn train(
    policy_dir: impl AsRef<Path>,
    examples: &[RankedExample],
    demonstrations: &[SftExample],
    config: RmConfig,
    out_dir: impl AsRef<Path>,
) -> TrainResult<RmReport> {
    config.validate()?;
    let started = Instant::now();
    let (policy_dir, out_dir) = (policy_dir.as_ref(), out_dir.as_ref());
    let device = inference::load::default_device();
    let mut rm = RewardModel::from_policy(policy_dir, &device, config.seed, config.max_seq_len)?
        .with_frozen_layers(config.freeze_layers)?;

    let (mut skipped, mut truncated) = (0usize, 0usize);
    let mut encode_split = |split: Split| -> TrainResult<Vec<Ranking>> {
        let mut out = Vec::new();
        for ex in examples.iter().filter(|e| e.split == split) {
            let pairs = ranking_pairs(&ex.ranks).len();
            if ex.completions.len() != ex.ranks.len() || pairs == 0 {
                skipped += 1;
                continue;
            }
            let mut sequences = Vec::with_capacity(ex.completions.len());
            for completion in &ex.completions {
                let (ids, cut) = rm.encode(&ex.prompt, completion)?;
                truncated += usize::from(cut);
                sequences.push(ids);
            }
            out.push(Ranking { sequences, ranks: ex.ranks.clone(), pairs, weight: ex.weight, activations: None });
        }
        Ok(out)
    };
    let mut train_set = encode_split(Split::Train)?;
    let mut val_set = encode_split(Split::Validation)?;
    if train_set.is_empty() {
        return Err(TrainError::Data("no training-split rankings with an ordered pair".into()));
    }
    let cache_started = Instant::now();
    let cached_floats = if config.cache_frozen_activations {
        cache_activations(&rm, &mut train_set, config.score_batch_size)?
            + cache_activations(&rm, &mut val_set, config.score_batch_size)?
    } else {
        0
    };
    let activation_cache = (cached_floats > 0).then(|| ActivationCache {
        bytes: cached_floats * std::mem::size_of::<f32>(),
        wall_secs: cache_started.elapsed().as_secs_f64(),
    });
    if let Some(cache) = &activation_cache {
        tracing::info!(bytes = cache.bytes, wall_secs = cache.wall_secs, "frozen layers' activations cached");
    }
    let val_before = if val_set.is_empty() { None } else { Some(evaluate(&rm, &val_set, &config)?) };
    tracing::info!(
        source = %policy_dir.display(),
        train = train_set.len(),
        validation = val_set.len(),
        val_accuracy_before = ?val_before.map(|v| v.accuracy),
        "RM training starts"
    );

    let steps_per_epoch = train_set.len().div_ceil(config.batch_prompts);
    let total_steps = steps_per_epoch * config.epochs;
    let schedule = LrSchedule {
        decay: Decay::Cosine { final_ratio: config.final_lr_ratio },
        ..LrSchedule::cosine(config.learning_rate, total_steps, config.warmup_steps)
    };
    let vars = rm.vars();
    let mut adam = Adam::new(vars.clone(), config.adam)?;
    let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(1));
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    let mut epochs = Vec::with_capacity(config.epochs);
    let mut step = 0usize;
    let mut best = BestEpoch::default();
    for epoch in 1..=config.epochs {
        let span = tracing::info_span!("rm_epoch", epoch, train_loss = tracing::field::Empty);
        let _entered = span.enter();
        let epoch_start = Instant::now();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct, mut pairs, mut last_lr) = (0f64, 0f64, 0usize, 0f64);
        for chunk in order.chunks(config.batch_prompts) {
            crate::stop::check()?;
            let lr = schedule.lr(step);
            let step_span = tracing::info_span!(
                "rm_step",
                step,
                lr,
                loss = tracing::field::Empty,
                accuracy = tracing::field::Empty,
                grad_norm = tracing::field::Empty
            );
            let _step_entered = step_span.enter();
            let rankings: Vec<&Ranking> = chunk.iter().map(|&i| &train_set[i]).collect();
            let outcome = train_step(&rm, &vars, &rankings, &config, &mut adam, lr)?;
            let (step_loss, step_correct, step_pairs, grad_norm) =
                (outcome.loss, outcome.correct, outcome.pairs, outcome.grad_norm);
            let step_accuracy = step_correct / step_pairs.max(1) as f64;
            step_span.record("loss", step_loss);
            step_span.record("accuracy", step_accuracy);
            step_span.record("grad_norm", grad_norm);
            tracing::debug!(step, lr, loss = step_loss, accuracy = step_accuracy, grad_norm, "RM step");
            loss_sum += step_loss;
            correct += step_correct;
            pairs += step_pairs;
            last_lr = lr;
            step += 1;
        }
        let train_loss = (loss_sum / steps_per_epoch as f64) as f32;
        span.record("train_loss", train_loss);
        let val = if val_set.is_empty() { None } else { Some(evaluate(&rm, &val_set, &config)?) };
        let record = RmEpoch {
            epoch,
            steps: steps_per_epoch,
            train_loss,
            train_accuracy: (correct / pairs.max(1) as f64) as f32,
            val,
            last_lr,
            wall_secs: epoch_start.elapsed().as_secs_f64(),
        };
        tracing::info!(
            epoch,
            train_loss,
            train_accuracy = record.train_accuracy,
            val_accuracy = ?val.map(|v| v.accuracy),
            wall_secs = record.wall_secs,
            "RM epoch done"
        );
        epochs.push(record);
        if let Some(val) = val {
            if best.loss.is_none_or(|b| val.loss < b) {
                best = BestEpoch { epoch, loss: Some(val.loss), weights: None };
                if config.keep_best_epoch && epoch < config.epochs {
                    best.weights = Some(vars.iter().map(|v| v.as_tensor().detach().copy()).collect::<Result<_, _>>()?);
                }
            } else if config.early_stop_patience.is_some_and(|p| epoch - best.epoch >= p) {
                tracing::info!(epoch, best_epoch = best.epoch, "RM: validation loss stopped falling; stopping");
                break;
            }
        }
    }
    let last_epoch = epochs.len();
    let kept_epoch = if config.keep_best_epoch && best.epoch > 0 { best.epoch } else { last_epoch };
    if let (true, Some(weights)) = (kept_epoch != last_epoch, &best.weights) {
        for (var, w) in vars.iter().zip(weights) {
            var.set(w)?;
        }
        tracing::info!(kept_epoch, last_epoch, "RM: keeping the epoch with the lowest validation loss");
    }

    let demos: Vec<SftExample> = demonstrations.iter().filter(|d| d.split == Split::Train).cloned().collect();
    let bias_offset = rm.center_on_demonstrations(&demos, config.score_batch_size)?;
    let demo_mean_after = match bias_offset {
        Some(_) => {
            let pairs: Vec<(&str, &str)> = demos.iter().map(|d| (d.prompt.as_str(), d.response.as_str())).collect();
            let scores = rm.score(&pairs)?;
            Some((scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len() as f64) as f32)
        }
        None => {
            tracing::warn!("no training-split demonstrations: the reward model's bias is not centred");
            None
        }
    };
    rm.save(out_dir)?;
    let val_kept = epochs.get(kept_epoch.saturating_sub(1)).and_then(|e| e.val);
    let report = RmReport {
        epochs,
        kept_epoch,
        val: val_kept,
        activation_cache,
        val_before,
        bias_offset,
        demo_mean_after,
        demonstrations: demos.len(),
        train_prompts: train_set.len(),
        val_prompts: val_set.len(),
        skipped,
        truncated,
        total_steps,
        wall_secs: started.elapsed().as_secs_f64(),
        source_dir: policy_dir.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        config,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| TrainError::Data(e.to_string()))?;
    write_file_atomic(&out_dir.join(REPORT_FILE), &json)?;
    tracing::info!(wall_secs = report.wall_secs, bias_offset = ?bias_offset, out = %out_dir.display(), "RM done");
    Ok(report)
}

/// Pair accuracy and mean per-prompt ranking loss of `rm` on `set`, without dropout.
fn evaluate(rm: &RewardModel, set: &[Ranking], config: &RmConfig) -> TrainResult<RankEval> {
    let (mut loss_sum, mut correct, mut pairs) = (0f64, 0f64, 0usize);
    for chunk in set.chunks(config.micro_batch_prompts) {
        let chunk: Vec<&Ranking> = chunk.iter().collect();
        let ranks: Vec<&[usize]> = chunk.iter().map(|r| r.ranks.as_slice()).collect();
        let rewards = crate::compute_pool::run(|| Ranking::rewards_of(rm, &chunk, 0.0))?.detach();
        let (loss, accuracy) = ranking_loss_batch(&rewards, &ranks)?;
        let chunk_pairs: usize = chunk.iter().map(|r| r.pairs).sum();
        loss_sum += f64::from(loss.to_scalar::<f32>()?) * chunk.len() as f64;
        correct += f64::from(accuracy) * chunk_pairs as f64;
        pairs += chunk_pairs;
    }
    Ok(RankEval {
        prompts: set.len(),
        pairs,
        loss: (loss_sum / set.len().max(1) as f64) as f32,
        accuracy: (correct / pairs.max(1) as f64) as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_model::test_util::tiny_model;
    use feedback::events::LabelerGroup;

    const OTHERS: [&str; 8] = [
        "no, I do not think so",
        "maybe later",
        "it depends on the weather",
        "I cannot tell",
        "probably not today",
        "ask someone else",
        "no",
        "that is hard to say",
    ];
    const YES: [&str; 4] = ["yes", "yes, I think so", "I would say yes", "yes of course"];

    /// `n` prompts, K = 4: one completion says "yes" (rank 0), three do not (tied at rank 1), in shuffled order.
    fn marker_rankings(n: usize, split: Split, seed: u64) -> Vec<RankedExample> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let mut items: Vec<(String, usize)> = vec![(YES[rng.random_range(0..YES.len())].to_string(), 0)];
                let mut others = OTHERS.to_vec();
                others.shuffle(&mut rng);
                items.extend(others[..3].iter().map(|o| (o.to_string(), 1)));
                items.shuffle(&mut rng);
                RankedExample {
                    prompt_id: format!("p{i}"),
                    prompt: format!("Question {i}: should we go to the {} today?", ["park", "beach", "zoo"][i % 3]),
                    completions: items.iter().map(|(c, _)| c.clone()).collect(),
                    ranks: items.iter().map(|(_, r)| *r).collect(),
                    labeler_group: LabelerGroup::Training,
                    split,
                    labeler_id: format!("labeler-{}", i % 3),
                    weight: 1.0,
                }
            })
            .collect()
    }

    fn demos() -> Vec<SftExample> {
        ["Say hello", "What is 2+2?", "Name a colour", "Tell me a joke", "Describe the sea"]
            .iter()
            .zip(["Hello!", "4", "Blue", "Why did the chicken cross the road?", "Wide, blue and deep."])
            .map(|(p, r)| SftExample {
                prompt: p.to_string(),
                response: r.into(),
                user: "u".into(),
                split: Split::Train,
            })
            .collect()
    }

    #[test]
    fn reward_model_learns_a_hidden_preference_and_centres_demonstrations() {
        let tmp = tempfile::tempdir().unwrap();
        let (policy, out) = (tmp.path().join("policy"), tmp.path().join("rm"));
        tiny_model(&policy, 11, true);
        let mut data = marker_rankings(16, Split::Train, 1);
        data.extend(marker_rankings(8, Split::Validation, 2));
        // A fully tied ranking and a malformed one are skipped, not fatal.
        let mut tied = data[0].clone();
        tied.ranks = vec![0; 4];
        let mut malformed = data[1].clone();
        malformed.ranks.pop();
        data.extend([tied, malformed]);
        // The paper's single epoch; 8 steps of 2 prompts.
        let config = RmConfig { learning_rate: 2e-3, batch_prompts: 2, micro_batch_prompts: 2, ..RmConfig::default() };
        let started = Instant::now();
        let report = train(&policy, &data, &demos(), config, &out).unwrap();
        eprintln!(
            "RM tiny: {:.2}s, before {:?}, epochs {:#?}",
            started.elapsed().as_secs_f64(),
            report.val_before,
            report.epochs
        );
        assert_eq!((report.train_prompts, report.val_prompts, report.skipped), (16, 8, 2));
        let before = report.val_before.unwrap();
        assert_eq!(before.pairs, 24);
        let after = report.epochs.last().unwrap().val.unwrap();
        assert!(after.accuracy >= 0.9, "validation pair accuracy {} (before {})", after.accuracy, before.accuracy);
        assert!(before.accuracy < 0.8, "the untrained head is near chance: {}", before.accuracy);
        assert!(after.loss < before.loss);
        let centred = report.demo_mean_after.unwrap();
        assert!(centred.abs() < 1e-3, "demonstrations average {centred} after the bias shift");
        assert!(report.bias_offset.unwrap().abs() > 1e-3, "the shift did something");

        // The saved model agrees: demonstrations centred, "yes" preferred on unseen prompts.
        let rm = RewardModel::load(&out).unwrap();
        let scores =
            rm.score(&demos().iter().map(|d| (d.prompt.clone(), d.response.clone())).collect::<Vec<_>>()).unwrap();
        assert!((scores.iter().sum::<f32>() / scores.len() as f32).abs() < 1e-3);
        let s = rm
            .score(&[("Should I take the bus?", "yes, I think so"), ("Should I take the bus?", "maybe later")])
            .unwrap();
        assert!(s[0] > s[1], "{s:?}");
        assert!(out.join(REPORT_FILE).is_file());
    }

    #[test]
    fn save_load_round_trip_gives_identical_scores() {
        let tmp = tempfile::tempdir().unwrap();
        let (policy, out) = (tmp.path().join("policy"), tmp.path().join("rm"));
        tiny_model(&policy, 4, false);
        let mut rm = RewardModel::from_policy(&policy, &Device::Cpu, 9, 512).unwrap();
        for var in rm.vars() {
            var.set(&(var.as_tensor() + var.randn_like(0.0, 0.01).unwrap()).unwrap()).unwrap();
        }
        rm.center_on_demonstrations(&demos(), 3).unwrap();
        let pairs = [("Hi", "Hello there"), ("What is 2+2?", "4"), ("Name a colour", "a long answer about green")];
        let before = rm.score(&pairs).unwrap();
        rm.save(&out).unwrap();
        for file in ["model.safetensors", HEAD_FILE, META_FILE, "config.json", "tokenizer.json"] {
            assert!(out.join(file).is_file(), "{file} missing");
        }
        let loaded = RewardModel::load_on(&out, &Device::Cpu).unwrap();
        assert_eq!(loaded.score(&pairs).unwrap(), before);
        assert_eq!(loaded.meta(), rm.meta());
        // The trunk directory still loads as a causal LM (untied lm_head kept).
        inference::load::LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        // A plain model directory is not a reward model.
        assert!(matches!(RewardModel::load_on(&policy, &Device::Cpu), Err(TrainError::Io { .. })));
    }

    #[test]
    fn scores_do_not_depend_on_batch_padding() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 6, true);
        let rm = RewardModel::from_policy(tmp.path(), &Device::Cpu, 1, 512).unwrap();
        let pairs = [("Hi", "Hello"), ("Write a long answer please", "Here is a rather longer answer than the other")];
        let batched = rm.score(&pairs).unwrap();
        for (i, pair) in pairs.iter().enumerate() {
            let alone = rm.score(&[*pair]).unwrap()[0];
            assert!((alone - batched[i]).abs() < 1e-5, "{alone} vs {}", batched[i]);
        }
        // Truncation keeps the end of the sequence.
        let short = RewardModel::from_policy(tmp.path(), &Device::Cpu, 1, 8).unwrap();
        let (ids, cut) = short.encode("Hi", "Hello").unwrap();
        assert!(cut && ids.len() == 8 && *ids.last().unwrap() == inference::tiny_model::EOS_TOKEN_ID);
    }

    #[test]
    fn every_trunk_parameter_and_the_head_get_gradients() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 12, false);
        let rm = RewardModel::from_policy(tmp.path(), &Device::Cpu, 3, 512).unwrap();
        let ex = &marker_rankings(1, Split::Train, 5)[0];
        let seqs: Vec<Vec<u32>> = ex.completions.iter().map(|c| rm.encode(&ex.prompt, c).unwrap().0).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let (loss, _) = crate::losses::ranking_loss(&rm.rewards(&refs, 0.0).unwrap(), &ex.ranks).unwrap();
        let store = rm.trunk().backward(&loss).unwrap();
        let mut named = rm.trunk().named_vars();
        named.retain(|(n, _)| n != "lm_head.weight");
        let head = rm.vars().split_off(named.len() + 1);
        assert_eq!(head.len(), 2);
        named.push((HEAD_WEIGHT.to_string(), head[0].clone()));
        assert_eq!(named.len(), 21);
        let grad_norm = |var: &Var, name: &str| {
            let grad = store.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        for (name, var) in &named {
            assert!(grad_norm(var, name) > 0.0, "{name} has a zero gradient");
        }
        // The ranking loss sees only reward differences: the bias cancels (hence the paper's bias shift after
        // training).
        assert_eq!(grad_norm(&head[1], HEAD_BIAS), 0.0);
    }

    /// Cached frozen-layer outputs give the rewards (and gradients) of a full forward, with some layers frozen and
    /// with all of them (then only the last position is kept).
    #[test]
    fn cached_activations_score_like_the_full_forward() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 7, true);
        let layers = 2; // the tiny model's depth
        let pairs = [("Hi", "Hello"), ("Write a long answer please", "Here is a rather longer answer than the other")];
        for frozen in [1, layers] {
            let rm =
                RewardModel::from_policy(tmp.path(), &Device::Cpu, 1, 512).unwrap().with_frozen_layers(frozen).unwrap();
            let seqs: Vec<Vec<u32>> = pairs.iter().map(|(p, r)| rm.encode(p, r).unwrap().0).collect();
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let direct = rm.rewards(&refs, 0.0).unwrap().to_vec1::<f32>().unwrap();
            let cached = rm.frozen_activations(&refs, 1).unwrap().unwrap();
            let hidden = rm.meta().hidden_size;
            let rows: Vec<usize> = cached.iter().map(|c| c.len() / hidden).collect();
            let expect: Vec<usize> = if frozen == layers { vec![1, 1] } else { seqs.iter().map(Vec::len).collect() };
            assert_eq!(rows, expect, "{frozen} frozen");
            let rows: Vec<&[f32]> = cached.iter().map(Vec::as_slice).collect();
            let from_cache = rm.rewards_from_activations(&rows, 0.0).unwrap();
            for (a, b) in direct.iter().zip(from_cache.to_vec1::<f32>().unwrap()) {
                assert!((a - b).abs() < 1e-4, "{frozen} frozen: {a} vs {b}");
            }
            let store = rm.trunk().backward(&from_cache.sum_all().unwrap()).unwrap();
            assert!(rm.vars().iter().take(rm.vars().len() - 1).all(|v| store.get(v.as_tensor()).is_some()));
        }
    }

    /// Several epochs on the activation cache learn the marker, report validation per epoch, and keep the epoch
    /// with the lowest validation loss.
    #[test]
    fn frozen_trunk_trains_from_the_cache_and_keeps_the_best_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let (policy, out) = (tmp.path().join("policy"), tmp.path().join("rm"));
        tiny_model(&policy, 11, true);
        let mut data = marker_rankings(16, Split::Train, 1);
        data.extend(marker_rankings(8, Split::Validation, 2));
        let config = RmConfig {
            learning_rate: 5e-3,
            batch_prompts: 4,
            micro_batch_prompts: 4,
            epochs: 6,
            freeze_layers: 1,
            ..RmConfig::default()
        };
        let report = train(&policy, &data, &demos(), config, &out).unwrap();
        let cache = report.activation_cache.expect("activations cached");
        assert!(cache.bytes > 0);
        assert_eq!(report.epochs.len(), 6);
        let best = report.epochs.iter().min_by(|a, b| a.val.unwrap().loss.total_cmp(&b.val.unwrap().loss)).unwrap();
        assert_eq!(report.kept_epoch, best.epoch);
        assert_eq!(report.val, best.val);
        let before = report.val_before.unwrap();
        assert!(report.val.unwrap().accuracy >= 0.9, "{:?} (before {before:?})", report.epochs);
        // The saved weights are the kept epoch's: scoring the validation split again gives its figures.
        let rm = RewardModel::load(&out).unwrap();
        let s = rm
            .score(&[("Should I take the bus?", "yes, I think so"), ("Should I take the bus?", "maybe later")])
            .unwrap();
        assert!(s[0] > s[1], "{s:?}");
    }

    /// Quality control pays off: with an adversarial labeler's reversed rankings left out, the reward model
    /// trained on the rest predicts held-out preferences better than one trained on everything.
    #[test]
    fn excluding_an_adversarial_labeler_improves_the_reward_model() {
        use crate::labeler_quality::{LabelerQcConfig, QcAction, apply, assess};
        let tmp = tempfile::tempdir().unwrap();
        let policy = tmp.path().join("policy");
        tiny_model(&policy, 11, true);
        let mut data = Vec::new();
        for ex in marker_rankings(16, Split::Train, 1) {
            for labeler in ["ann", "bob", "eve"] {
                let mut ranked = RankedExample { labeler_id: labeler.into(), ..ex.clone() };
                if labeler == "eve" {
                    ranked.ranks.iter_mut().for_each(|r| *r = 1 - *r);
                }
                data.push(ranked);
            }
        }
        let report = assess(&data, &LabelerQcConfig { min_comparisons: 20, ..Default::default() });
        assert!(report.labelers["eve"].flagged && report.flagged().count() == 1, "{report:?}");
        let val = marker_rankings(8, Split::Validation, 2);
        let config = RmConfig {
            learning_rate: 2e-3,
            batch_prompts: 4,
            micro_batch_prompts: 4,
            epochs: 2,
            ..RmConfig::default()
        };
        let trained = |action: QcAction| {
            let mut rankings = data.clone();
            apply(&mut rankings, &report, action);
            rankings.extend(val.clone());
            let out = tmp.path().join(format!("{action:?}"));
            train(&policy, &rankings, &demos(), config.clone(), &out).unwrap().val.unwrap()
        };
        let (excluded, everything) = (trained(QcAction::Exclude), trained(QcAction::Flag));
        assert!(excluded.loss < everything.loss, "excluded {excluded:?} vs all {everything:?}");
        assert!(excluded.accuracy >= everything.accuracy, "excluded {excluded:?} vs all {everything:?}");
    }
}
