//! Supervised fine-tuning (paper section 3.5, "SFT"): the policy learns the labelers' demonstrations.
//!
//! Each [`SftExample`] becomes `chat_template(user: prompt, generation prompt) ++ response ++ EOS` (see
//! [`encode_chat`]); the loss is the next-token negative log-likelihood of the response and EOS tokens only
//! ([`masked_nll`], token mean over the whole batch). Only the positions that carry loss go through the
//! vocabulary projection, so prompt and padding positions cost no `[T, V]` logits. Batches are right-padded; the
//! causal mask keeps real tokens from seeing the padding and padded positions carry no loss.
//!
//! Optimisation follows the paper: Adam β = (0.9, 0.95), cosine decay of the learning rate to 10% of the peak over
//! the whole run, residual dropout ([`PAPER_RESIDUAL_DROPOUT`] = 0.2 in the paper; the default here is 0 so short
//! runs and tests are deterministic), several epochs ([`PAPER_SFT_EPOCHS`] = 16). After every epoch the
//! validation-split loss is measured; the saved model is the epoch with the lowest validation loss, or, when the
//! caller passes an [`EpochSelector`] (the paper picks by reward-model score on validation prompts, since the SFT
//! model overfits in validation loss after one epoch while RM score keeps improving), the epoch it scores highest.
//!
//! CPU-sized defaults ([`SftConfig::default`]): 4 epochs, peak LR 5e-5, 8 examples per step. 5e-5 suits full
//! fine-tuning of SmolLM2-135M on a few hundred demonstrations; the tiny random test models use 1e-2.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use feedback::split::Split;
use inference::llama::Llama;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::losses::masked_nll;
use crate::optim::{Adam, AdamConfig, Decay, Gradients, LrSchedule, PAPER_FINAL_LR_RATIO};
use crate::policy_model::{ChatTokens, PolicyModel, TrainError, TrainResult, encode_chat, write_file_atomic};
use crate::snapshot::SftExample;
use crate::step_timing::{Phase, StepTiming};

/// Epochs of SFT in the paper.
pub const PAPER_SFT_EPOCHS: usize = 16;
/// Residual dropout of SFT in the paper.
pub const PAPER_RESIDUAL_DROPOUT: f32 = 0.2;
/// The training report written next to the model.
pub const REPORT_FILE: &str = "sft.json";

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
        }
    }
}

impl SftConfig {
    /// The paper's schedule (16 epochs, residual dropout 0.2) with the CPU-sized batch and learning rate.
    pub fn paper() -> Self {
        Self { epochs: PAPER_SFT_EPOCHS, residual_dropout: PAPER_RESIDUAL_DROPOUT, ..Self::default() }
    }

    fn validate(&self) -> TrainResult<()> {
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
        Ok(())
    }
}

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftEpoch {
    /// 1-based.
    pub epoch: usize,
    pub steps: usize,
    /// Token-mean NLL over the epoch's training batches (with dropout, weights changing along the way).
    pub train_loss: f32,
    /// Token-mean NLL on the validation split after the epoch; `None` without validation examples.
    pub val_loss: Option<f32>,
    /// The [`EpochSelector`]'s score, when one was given.
    pub score: Option<f64>,
    /// Learning rate of the epoch's last step.
    pub last_lr: f64,
    /// Loss-bearing (response + EOS) tokens trained on.
    pub train_tokens: usize,
    pub wall_secs: f64,
}

/// How the saved epoch was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    ValidationLoss,
    Selector,
    /// No validation examples and no selector.
    LastEpoch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftReport {
    pub epochs: Vec<SftEpoch>,
    /// The epoch whose weights were saved to `out_dir` (1-based).
    pub best_epoch: usize,
    pub selected_by: Selection,
    pub train_examples: usize,
    pub val_examples: usize,
    /// Examples whose response was cut at `max_seq_len`.
    pub truncated: usize,
    /// Examples left out because the prompt alone reached `max_seq_len`.
    pub skipped: usize,
    pub total_steps: usize,
    pub wall_secs: f64,
    pub source_dir: PathBuf,
    pub out_dir: PathBuf,
    pub config: SftConfig,
}

/// Scores the model after an epoch (higher is better), e.g. the mean reward-model score of its samples on
/// validation prompts. It sees the epoch's numbers (validation loss included) and the model as trained so far.
pub type EpochSelector<'a> = dyn FnMut(&SftEpoch, &PolicyModel) -> TrainResult<f64> + 'a;

/// Fine-tunes the model in `model_dir_in` on the training split of `examples`, measures the validation split
/// after each epoch, and writes the best epoch (lowest validation loss) to `out_dir` as a model directory, with
/// the report as `sft.json`. Test-split examples are ignored.
pub fn train(
    model_dir_in: impl AsRef<Path>,
    examples: &[SftExample],
    config: SftConfig,
    out_dir: impl AsRef<Path>,
) -> TrainResult<SftReport> {
    train_with_selector(model_dir_in, examples, config, out_dir, None)
}

/// [`train`], choosing the saved epoch by `selector`'s score instead of validation loss when one is given.
pub fn train_with_selector(
    model_dir_in: impl AsRef<Path>,
    examples: &[SftExample],
    config: SftConfig,
    out_dir: impl AsRef<Path>,
    mut selector: Option<&mut EpochSelector<'_>>,
) -> TrainResult<SftReport> {
    config.validate()?;
    let started = Instant::now();
    let (model_dir_in, out_dir) = (model_dir_in.as_ref(), out_dir.as_ref());
    let device = inference::load::default_device();
    let model = PolicyModel::load(model_dir_in, &device)?.with_frozen_layers(config.freeze_layers)?;
    let max_len = config.max_seq_len.min(model.llama().max_positions());

    let mut stats = EncodeStats::default();
    let train_set = encode_split(&model, examples, Split::Train, max_len, &mut stats)?;
    let val_set = encode_split(&model, examples, Split::Validation, max_len, &mut stats)?;
    if train_set.is_empty() {
        return Err(TrainError::Data("no training-split demonstrations to fine-tune on".into()));
    }
    let steps_per_epoch = train_set.len().div_ceil(config.batch_size);
    let total_steps = steps_per_epoch * config.epochs;
    let schedule = LrSchedule {
        decay: Decay::Cosine { final_ratio: config.final_lr_ratio },
        ..LrSchedule::cosine(config.learning_rate, total_steps, config.warmup_steps)
    };
    let vars = model.vars();
    let mut adam = Adam::new(vars.clone(), config.adam)?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    tracing::info!(
        source = %model_dir_in.display(),
        train = train_set.len(),
        validation = val_set.len(),
        total_steps,
        "SFT starts"
    );

    let selected_by = match (&selector, val_set.is_empty()) {
        (Some(_), _) => Selection::Selector,
        (None, false) => Selection::ValidationLoss,
        (None, true) => Selection::LastEpoch,
    };
    let mut epochs = Vec::with_capacity(config.epochs);
    let mut best: Option<(f64, usize, std::collections::HashMap<String, Tensor>)> = None;
    let mut step = 0usize;
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    for epoch in 1..=config.epochs {
        let span = tracing::info_span!("sft_epoch", epoch, train_loss = tracing::field::Empty);
        let _entered = span.enter();
        let epoch_start = Instant::now();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut tokens_sum, mut last_lr) = (0f64, 0usize, 0f64);
        for chunk in order.chunks(config.batch_size) {
            crate::stop::check()?;
            let lr = schedule.lr(step);
            let step_span = tracing::info_span!(
                "sft_step",
                step,
                lr,
                loss = tracing::field::Empty,
                grad_norm = tracing::field::Empty
            );
            let _step_entered = step_span.enter();
            let batch: Vec<&ChatTokens> = chunk.iter().map(|&i| &train_set[i]).collect();
            let outcome = train_step(&model, &vars, &batch, &config, &mut adam, lr)?;
            let (step_loss, grad_norm, total_tokens) = (outcome.loss, outcome.grad_norm, outcome.tokens);
            step_span.record("loss", step_loss);
            step_span.record("grad_norm", grad_norm);
            tracing::debug!(step, lr, loss = step_loss, grad_norm, "SFT step");
            loss_sum += step_loss * total_tokens as f64;
            tokens_sum += total_tokens;
            last_lr = lr;
            step += 1;
        }
        let train_loss = (loss_sum / tokens_sum.max(1) as f64) as f32;
        span.record("train_loss", train_loss);
        let val_loss =
            if val_set.is_empty() { None } else { Some(mean_loss(&model, &val_set, config.micro_batch_size)?) };
        let mut record = SftEpoch {
            epoch,
            steps: steps_per_epoch,
            train_loss,
            val_loss,
            score: None,
            last_lr,
            train_tokens: tokens_sum,
            wall_secs: 0.0,
        };
        let score = match selector.as_mut() {
            Some(select) => {
                let s = select(&record, &model)?;
                record.score = Some(s);
                s
            }
            None => val_loss.map_or(epoch as f64, |v| -f64::from(v)),
        };
        if best.as_ref().is_none_or(|(b, _, _)| score > *b) {
            best = Some((score, epoch, model.snapshot_weights()?));
        }
        if config.save_every_epoch {
            model.save(&out_dir.join(format!("epoch-{epoch:02}")))?;
        }
        record.wall_secs = epoch_start.elapsed().as_secs_f64();
        tracing::info!(
            epoch,
            train_loss,
            val_loss = ?val_loss,
            score = ?record.score,
            tokens_per_sec = tokens_sum as f64 / record.wall_secs.max(1e-9),
            wall_secs = record.wall_secs,
            "SFT epoch done"
        );
        epochs.push(record);
    }

    let (_, best_epoch, weights) = best.ok_or_else(|| TrainError::Data("no epoch ran".into()))?;
    model.restore_weights(&weights)?;
    drop(weights);
    model.save(out_dir)?;
    let report = SftReport {
        epochs,
        best_epoch,
        selected_by,
        train_examples: train_set.len(),
        val_examples: val_set.len(),
        truncated: stats.truncated,
        skipped: stats.skipped,
        total_steps,
        wall_secs: started.elapsed().as_secs_f64(),
        source_dir: model_dir_in.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        config,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| TrainError::Data(e.to_string()))?;
    write_file_atomic(&out_dir.join(REPORT_FILE), &json)?;
    tracing::info!(best_epoch, wall_secs = report.wall_secs, out = %out_dir.display(), "SFT done");
    Ok(report)
}

/// What one optimiser step did, with where its time went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Token-mean NLL of the batch (before the update).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Loss-bearing tokens in the batch.
    pub tokens: usize,
    pub timing: StepTiming,
}

/// One SFT optimiser step on `batch`: micro-batched forward and backward passes with token-weighted gradient
/// accumulation, clipping, and an Adam update at `lr`.
pub fn train_step(
    model: &PolicyModel,
    vars: &[candle_core::Var],
    batch: &[&ChatTokens],
    config: &SftConfig,
    adam: &mut Adam,
    lr: f64,
) -> TrainResult<StepOutcome> {
    // On the training pool: the fused ops' parallel regions then cost no hand-over (see `compute_pool`).
    crate::compute_pool::run(|| {
        let mut timing = StepTiming::default();
        let total_tokens: usize = batch.iter().map(|e| loss_tokens(e)).sum();
        let mut grads = Gradients::new();
        let mut step_loss = 0f64;
        for micro in batch.chunks(config.micro_batch_size) {
            let (loss, weight) = timing.time(Phase::Forward, || -> TrainResult<_> {
                let collated = Collated::new(micro, model.device())?;
                let loss = collated.loss(model.llama(), config.residual_dropout)?;
                Ok((loss, collated.tokens as f64 / total_tokens.max(1) as f64))
            })?;
            step_loss += f64::from(loss.to_scalar::<f32>()?) * weight;
            let store = timing.time(Phase::Backward, || model.backward(&loss))?;
            timing.time(Phase::Gradients, || grads.accumulate(&store, vars, weight))?;
        }
        let grad_norm = timing.time(Phase::Gradients, || match config.max_grad_norm {
            Some(max) => grads.clip_global_norm(max),
            None => grads.global_norm(),
        })?;
        timing.time(Phase::Optimizer, || adam.step(&grads, lr))?;
        Ok(StepOutcome { loss: step_loss, grad_norm, tokens: total_tokens, timing })
    })
}

/// Token-mean SFT loss of `examples` (prompt, response) under `model`, without dropout: the validation measure,
/// usable on any model (e.g. a candidate against held-out demonstrations).
pub fn validation_loss(model: &PolicyModel, examples: &[SftExample], batch_size: usize) -> TrainResult<f32> {
    let max_len = model.llama().max_positions();
    let mut stats = EncodeStats::default();
    let encoded: Vec<ChatTokens> = examples
        .iter()
        .filter_map(|e| encode_example(model, e, max_len, &mut stats).transpose())
        .collect::<TrainResult<_>>()?;
    if encoded.is_empty() {
        return Err(TrainError::Data("no demonstrations to measure".into()));
    }
    mean_loss(model, &encoded, batch_size.max(1))
}

#[derive(Debug, Default)]
struct EncodeStats {
    truncated: usize,
    skipped: usize,
}

fn encode_split(
    model: &PolicyModel,
    examples: &[SftExample],
    split: Split,
    max_len: usize,
    stats: &mut EncodeStats,
) -> TrainResult<Vec<ChatTokens>> {
    examples
        .iter()
        .filter(|e| e.split == split)
        .filter_map(|e| encode_example(model, e, max_len, stats).transpose())
        .collect()
}

/// The example's tokens, cut to `max_len` (losing the end of the response), or `None` when the prompt alone
/// leaves no room for a response token.
fn encode_example(
    model: &PolicyModel,
    example: &SftExample,
    max_len: usize,
    stats: &mut EncodeStats,
) -> TrainResult<Option<ChatTokens>> {
    let mut tokens = encode_chat(model.tokenizer(), &example.prompt, &example.response, true)?;
    if tokens.prompt_len == 0 || tokens.prompt_len >= max_len {
        stats.skipped += 1;
        return Ok(None);
    }
    if tokens.ids.len() > max_len {
        tokens.ids.truncate(max_len);
        stats.truncated += 1;
    }
    Ok(Some(tokens))
}

/// Tokens that carry loss: every token after the prompt (response and EOS).
fn loss_tokens(t: &ChatTokens) -> usize {
    t.ids.len() - t.prompt_len
}

/// A right-padded micro-batch with the flat positions that carry loss and their targets.
struct Collated {
    /// `[B, T]` inputs: each sequence without its last token.
    input: Tensor,
    /// `[N]` indices into the flattened `[B·T]` positions whose next token is a response token.
    positions: Tensor,
    /// `[1, N]` the token each of those positions must predict.
    targets: Tensor,
    tokens: usize,
}

impl Collated {
    fn new(examples: &[&ChatTokens], device: &Device) -> TrainResult<Self> {
        let t = examples.iter().map(|e| e.ids.len() - 1).max().unwrap_or(0);
        let mut input = Vec::with_capacity(examples.len() * t);
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (b, e) in examples.iter().enumerate() {
            let n = e.ids.len() - 1;
            input.extend_from_slice(&e.ids[..n]);
            input.extend(std::iter::repeat_n(0u32, t - n));
            for pos in e.prompt_len - 1..n {
                positions.push((b * t + pos) as u32);
                targets.push(e.ids[pos + 1]);
            }
        }
        let tokens = targets.len();
        Ok(Self {
            input: Tensor::from_vec(input, (examples.len(), t), device)?,
            positions: Tensor::from_vec(positions, tokens, device)?,
            targets: Tensor::from_vec(targets, (1, tokens), device)?,
            tokens,
        })
    }

    /// Token-mean NLL of the loss-bearing positions, differentiable wrt every weight.
    fn loss(&self, model: &Llama, residual_dropout: f32) -> TrainResult<Tensor> {
        let hidden = model.hidden_states(&self.input, residual_dropout)?;
        let (b, t, h) = hidden.dims3()?;
        let picked = hidden.reshape((b * t, h))?.index_select(&self.positions, 0)?;
        let logits = model.lm_head(&picked)?.unsqueeze(0)?;
        let mask = Tensor::ones((1, self.tokens), candle_core::DType::F32, logits.device())?;
        Ok(masked_nll(&logits, &self.targets, &mask)?)
    }
}

fn mean_loss(model: &PolicyModel, set: &[ChatTokens], batch_size: usize) -> TrainResult<f32> {
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in set.chunks(batch_size) {
        let refs: Vec<&ChatTokens> = chunk.iter().collect();
        let collated = Collated::new(&refs, model.device())?;
        let loss = collated.loss(model.llama(), 0.0)?.detach().to_scalar::<f32>()?;
        sum += f64::from(loss) * collated.tokens as f64;
        tokens += collated.tokens;
    }
    Ok((sum / tokens.max(1) as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_model::test_util::tiny_model;
    use candle_core::{D, IndexOp};
    use inference::load::LoadedModel;

    fn example(prompt: &str, response: &str, split: Split) -> SftExample {
        SftExample { prompt: prompt.into(), response: response.into(), user: "u".into(), split }
    }

    /// Eight "Q: colour? A: blue"-style demonstrations, two validation ones.
    fn colour_data() -> Vec<SftExample> {
        let things = ["sky", "sea", "ocean", "lake", "river", "jeans", "sapphire", "ice", "whale", "flag"];
        things
            .iter()
            .enumerate()
            .map(|(i, thing)| {
                let split = if i < 8 { Split::Train } else { Split::Validation };
                example(&format!("What colour is the {thing}?"), "blue", split)
            })
            .collect()
    }

    fn greedy(model: &Llama, tokens: &ChatTokens, max_new: usize, eos: u32) -> Vec<u32> {
        let mut ids = tokens.ids[..tokens.prompt_len].to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward_train(&input, 0.0).unwrap();
            let next = logits.i((0, ids.len() - 1)).unwrap().argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
            out.push(next);
            if next == eos {
                break;
            }
            ids.push(next);
        }
        out
    }

    #[test]
    fn every_parameter_gets_a_nonzero_gradient_in_one_sft_step() {
        let tmp = tempfile::tempdir().unwrap();
        for tied in [true, false] {
            let dir = tmp.path().join(format!("tied-{tied}"));
            tiny_model(&dir, 5, tied);
            let model = PolicyModel::load(&dir, &Device::Cpu).unwrap();
            let data = colour_data();
            let mut stats = EncodeStats::default();
            let encoded: Vec<ChatTokens> =
                data[..3].iter().map(|e| encode_example(&model, e, 512, &mut stats).unwrap().unwrap()).collect();
            let refs: Vec<&ChatTokens> = encoded.iter().collect();
            let loss = Collated::new(&refs, &Device::Cpu).unwrap().loss(model.llama(), 0.2).unwrap();
            let store = model.backward(&loss).unwrap();
            let named = model.named_vars();
            assert_eq!(named.len(), if tied { 20 } else { 21 });
            for (name, var) in &named {
                let grad = store.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
                let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 0.0, "{name} has a zero gradient");
            }
            // One optimiser step moves every parameter.
            let before = model.snapshot_weights().unwrap();
            let vars = model.vars();
            let mut grads = Gradients::new();
            grads.accumulate(&store, &vars, 1.0).unwrap();
            Adam::new(vars, AdamConfig::default()).unwrap().step(&grads, 1e-3).unwrap();
            for (name, var) in &named {
                let moved = (var.as_tensor() - &before[name]).unwrap().abs().unwrap().max_all().unwrap();
                assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "{name} did not move");
            }
        }
    }

    #[test]
    fn padding_and_micro_batching_do_not_change_the_loss() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 2, true);
        let model = PolicyModel::load(tmp.path(), &Device::Cpu).unwrap();
        let data = [
            example("Hi", "Hello! How can I help you today?", Split::Train),
            example("Name a fruit with a long name please", "banana", Split::Train),
            example("2+2?", "4", Split::Train),
        ];
        let mut stats = EncodeStats::default();
        let enc: Vec<ChatTokens> =
            data.iter().map(|e| encode_example(&model, e, 512, &mut stats).unwrap().unwrap()).collect();
        // Token-weighted mean of single-example losses == the padded batch's loss.
        let (mut sum, mut n) = (0f64, 0usize);
        for e in &enc {
            let c = Collated::new(&[e], &Device::Cpu).unwrap();
            sum += f64::from(c.loss(model.llama(), 0.0).unwrap().to_scalar::<f32>().unwrap()) * c.tokens as f64;
            n += c.tokens;
        }
        let refs: Vec<&ChatTokens> = enc.iter().collect();
        let batched = Collated::new(&refs, &Device::Cpu).unwrap().loss(model.llama(), 0.0).unwrap();
        let batched = batched.to_scalar::<f32>().unwrap();
        assert!((batched - (sum / n as f64) as f32).abs() < 1e-5, "{batched} vs {}", sum / n as f64);
        assert!((mean_loss(&model, &enc, 2).unwrap() - batched).abs() < 1e-5);
    }

    #[test]
    fn sft_learns_a_tiny_dataset() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, out) = (tmp.path().join("src"), tmp.path().join("sft"));
        tiny_model(&src, 7, true);
        let data = colour_data();
        let target: Vec<(String, String)> = vec![("What colour is the sky?".into(), "blue".into())];
        let held_out: Vec<(String, String)> = vec![("What colour is the flag?".into(), "blue".into())];
        let before = PolicyModel::load(&src, &Device::Cpu).unwrap();
        let (lp_before, held_before) =
            (before.response_logprobs(&target).unwrap()[0], before.response_logprobs(&held_out).unwrap()[0]);

        let config = SftConfig {
            epochs: PAPER_SFT_EPOCHS,
            learning_rate: 1e-2,
            batch_size: 4,
            micro_batch_size: 2,
            save_every_epoch: true,
            ..SftConfig::default()
        };
        let started = Instant::now();
        let report = train(&src, &data, config, &out).unwrap();
        eprintln!("SFT tiny: {:.2}s, epochs {:?}", started.elapsed().as_secs_f64(), report.epochs);
        assert_eq!((report.train_examples, report.val_examples, report.total_steps), (8, 2, 32));
        assert_eq!(report.selected_by, Selection::ValidationLoss);
        let first = &report.epochs[0];
        let last = report.epochs.last().unwrap();
        assert!(last.train_loss < 0.3 * first.train_loss, "train loss {} -> {}", first.train_loss, last.train_loss);
        let best = &report.epochs[report.best_epoch - 1];
        assert!(report.epochs.iter().all(|e| e.val_loss.unwrap() >= best.val_loss.unwrap()));
        assert!((last.last_lr - 1e-3).abs() < 1e-12, "cosine ends at 10% of the peak: {}", last.last_lr);
        assert!(out.join("epoch-16").join("model.safetensors").is_file());
        assert!(out.join(REPORT_FILE).is_file());

        // The saved (best) model, loaded as serving loads it, prefers the demonstrated answer.
        let after = PolicyModel::load(&out, &Device::Cpu).unwrap();
        let (lp_after, held_after) =
            (after.response_logprobs(&target).unwrap()[0], after.response_logprobs(&held_out).unwrap()[0]);
        eprintln!(
            "log p(blue<|im_end|>): train prompt {lp_before} -> {lp_after}, held-out {held_before} -> {held_after}"
        );
        assert!(lp_after > lp_before + 5.0 && lp_after > -2.0, "{lp_before} -> {lp_after}");
        assert!(held_after > held_before + 5.0, "generalises to the held-out prompt: {held_before} -> {held_after}");
        let served = LoadedModel::load(&out, candle_core::DType::F32, &Device::Cpu).unwrap();
        let tokens = encode_chat(&served.tokenizer, "What colour is the sea?", "", false).unwrap();
        let answer = greedy(&served.model, &tokens, 8, inference::tiny_model::EOS_TOKEN_ID);
        assert_eq!(served.tokenizer.decode(&answer, false).unwrap(), "blue<|im_end|>");
    }

    #[test]
    fn a_selector_chooses_the_saved_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, out) = (tmp.path().join("src"), tmp.path().join("sft"));
        tiny_model(&src, 8, true);
        let data = colour_data();
        let probe = [("What colour is the ice?", "blue")];
        let mut seen = Vec::new();
        let mut prefer_second = |epoch: &SftEpoch, model: &PolicyModel| -> TrainResult<f64> {
            seen.push((epoch.epoch, model.response_logprobs(&probe)?[0]));
            Ok(-((epoch.epoch as f64) - 2.0).powi(2))
        };
        let config = SftConfig { epochs: 3, learning_rate: 2e-3, batch_size: 8, ..SftConfig::default() };
        let report =
            train_with_selector(&src, &data, config, &out, Some(&mut prefer_second as &mut EpochSelector<'_>)).unwrap();
        assert_eq!((report.best_epoch, report.selected_by), (2, Selection::Selector));
        assert_eq!(report.epochs[1].score, Some(0.0));
        let saved = PolicyModel::load(&out, &Device::Cpu).unwrap().response_logprobs(&probe).unwrap()[0];
        assert!((saved - seen[1].1).abs() < 1e-4, "saved model is epoch 2's: {saved} vs {seen:?}");
    }

    #[test]
    fn refuses_data_without_a_training_split() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_model(tmp.path(), 0, true);
        let data = [example("a", "b", Split::Validation)];
        let err = train(tmp.path(), &data, SftConfig::default(), tmp.path().join("out")).unwrap_err();
        assert!(matches!(err, TrainError::Data(_)), "{err}");
    }

    /// Training speed on the real SmolLM2-135M (when `models/smollm2-135m-instruct` exists):
    /// `cargo test -p trainer --lib sft::tests::smollm2_step_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs models/smollm2-135m-instruct; measures speed"]
    fn smollm2_step_timing() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/smollm2-135m-instruct");
        if !dir.join("model.safetensors").is_file() {
            eprintln!("skipped: {} not found", dir.display());
            return;
        }
        let t0 = Instant::now();
        let model = PolicyModel::load(&dir, &Device::Cpu).unwrap();
        eprintln!("load as vars: {:.2}s", t0.elapsed().as_secs_f64());
        let data: Vec<SftExample> = (0..8)
            .map(|i| {
                example(
                    &format!("Write one sentence about the number {i}."),
                    &format!("The number {i} is a small whole number that comes right after {}.", i + 1),
                    Split::Train,
                )
            })
            .collect();
        let mut stats = EncodeStats::default();
        let enc: Vec<ChatTokens> =
            data.iter().map(|e| encode_example(&model, e, 512, &mut stats).unwrap().unwrap()).collect();
        let vars = model.vars();
        let mut adam = Adam::new(vars.clone(), AdamConfig::default()).unwrap();
        for micro in [1usize, 4, 8] {
            let refs: Vec<&ChatTokens> = enc[..micro].iter().collect();
            let seq_tokens: usize = refs.iter().map(|e| e.ids.len() - 1).sum();
            for rep in 0..2 {
                let t = Instant::now();
                let c = Collated::new(&refs, &Device::Cpu).unwrap();
                let loss = c.loss(model.llama(), 0.0).unwrap();
                let t_fwd = t.elapsed().as_secs_f64();
                let store = model.backward(&loss).unwrap();
                let t_bwd = t.elapsed().as_secs_f64();
                let mut grads = Gradients::new();
                grads.accumulate(&store, &vars, 1.0).unwrap();
                drop(store);
                adam.step(&grads, 1e-5).unwrap();
                let t_all = t.elapsed().as_secs_f64();
                eprintln!(
                    "batch {micro} ({seq_tokens} tokens, {} loss tokens) rep {rep}: forward {t_fwd:.2}s, \
                     +backward {t_bwd:.2}s, +adam {t_all:.2}s total; loss {:.3}",
                    c.tokens,
                    loss.to_scalar::<f32>().unwrap()
                );
            }
        }
    }
}
