//! The SFT loop: epochs of shuffled batches, one optimiser step each ([`train_step`]), validation after every
//! epoch, and the best epoch saved with its report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use feedback::split::Split;
use serde::{Deserialize, Serialize};

use crate::optim::Adam;
use crate::policy_model::{ChatTokens, PolicyModel, TrainError, TrainResult};
use crate::snapshot::SftExample;
use crate::step::{EpochBatches, GradientStep, StepAt, cosine_schedule, write_report};
use crate::step_timing::StepTiming;

use super::batch::{Collated, EncodeStats, encode_split, loss_tokens};
use super::evaluate::mean_loss;
use super::{REPORT_FILE, SftConfig};

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
    selector: Option<&mut EpochSelector<'_>>,
) -> TrainResult<SftReport> {
    config.validate()?;
    let started = Instant::now();
    let (model_dir_in, out_dir) = (model_dir_in.as_ref(), out_dir.as_ref());
    let device = inference::load::default_device();
    let model = PolicyModel::load(model_dir_in, &device)?.with_cost_options(&config.cost_options())?;
    let data = Demonstrations::encode(&model, examples, &config)?;
    tracing::info!(
        source = %model_dir_in.display(),
        train = data.train.len(),
        validation = data.validation.len(),
        total_steps = data.total_steps(&config),
        "SFT starts"
    );
    let mut run = SftRun::new(&model, &data, &config, out_dir, selector)?;
    for epoch in 1..=config.epochs {
        let record = run.epoch(epoch)?;
        run.epochs.push(record);
    }
    let (best_epoch, selected_by, epochs) = run.restore_best()?;
    model.save(out_dir)?;
    let report = SftReport {
        epochs,
        best_epoch,
        selected_by,
        train_examples: data.train.len(),
        val_examples: data.validation.len(),
        truncated: data.stats.truncated,
        skipped: data.stats.skipped,
        total_steps: data.total_steps(&config),
        wall_secs: started.elapsed().as_secs_f64(),
        source_dir: model_dir_in.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        config,
    };
    write_report(&out_dir.join(REPORT_FILE), &report)?;
    tracing::info!(best_epoch, wall_secs = report.wall_secs, out = %out_dir.display(), "SFT done");
    Ok(report)
}

/// The training and validation splits, tokenised and cut to the model's context.
struct Demonstrations {
    train: Vec<ChatTokens>,
    validation: Vec<ChatTokens>,
    stats: EncodeStats,
}

impl Demonstrations {
    fn encode(model: &PolicyModel, examples: &[SftExample], config: &SftConfig) -> TrainResult<Self> {
        let max_len = config.max_seq_len.min(model.llama().max_positions());
        let mut stats = EncodeStats::default();
        let train = encode_split(model, examples, Split::Train, max_len, &mut stats)?;
        let validation = encode_split(model, examples, Split::Validation, max_len, &mut stats)?;
        if train.is_empty() {
            return Err(TrainError::Data("no training-split demonstrations to fine-tune on".into()));
        }
        Ok(Self { train, validation, stats })
    }

    fn total_steps(&self, config: &SftConfig) -> usize {
        self.train.len().div_ceil(config.batch_size) * config.epochs
    }
}

/// The epoch that scored highest so far, with a copy of its weights.
struct Best {
    score: f64,
    epoch: usize,
    weights: HashMap<String, Tensor>,
}

/// A run in progress: the model, its optimiser and batches, and the epochs so far.
struct SftRun<'a, 's> {
    model: &'a PolicyModel,
    data: &'a Demonstrations,
    config: &'a SftConfig,
    out_dir: &'a Path,
    selector: Option<&'a mut EpochSelector<'s>>,
    vars: Vec<Var>,
    adam: Adam,
    batches: EpochBatches,
    epochs: Vec<SftEpoch>,
    best: Option<Best>,
}

impl<'a, 's> SftRun<'a, 's> {
    fn new(
        model: &'a PolicyModel,
        data: &'a Demonstrations,
        config: &'a SftConfig,
        out_dir: &'a Path,
        selector: Option<&'a mut EpochSelector<'s>>,
    ) -> TrainResult<Self> {
        let vars = model.vars();
        let adam = Adam::new(vars.clone(), config.adam)?;
        let batches = EpochBatches::new(data.train.len(), config.batch_size, config.epochs, config.seed, |total| {
            cosine_schedule(config.learning_rate, config.final_lr_ratio, total, config.warmup_steps)
        });
        let epochs = Vec::with_capacity(config.epochs);
        Ok(Self { model, data, config, out_dir, selector, vars, adam, batches, epochs, best: None })
    }

    /// Trains one epoch, measures the validation loss, scores the epoch and keeps its weights when best so far
    /// (and saves them when every epoch is saved).
    fn epoch(&mut self, epoch: usize) -> TrainResult<SftEpoch> {
        let span = tracing::info_span!("sft_epoch", epoch, train_loss = tracing::field::Empty);
        let _entered = span.enter();
        let epoch_start = Instant::now();
        let (train_loss, train_tokens, last_lr) = self.train_epoch()?;
        span.record("train_loss", train_loss);
        let val_loss = self.validation_loss()?;
        let mut record = SftEpoch {
            epoch,
            steps: self.batches.steps_per_epoch(),
            train_loss,
            val_loss,
            score: None,
            last_lr,
            train_tokens,
            wall_secs: 0.0,
        };
        self.keep_if_best(&mut record)?;
        if self.config.save_every_epoch {
            self.model.save(&self.out_dir.join(format!("epoch-{epoch:02}")))?;
        }
        record.wall_secs = epoch_start.elapsed().as_secs_f64();
        tracing::info!(
            epoch,
            train_loss,
            val_loss = ?val_loss,
            score = ?record.score,
            tokens_per_sec = train_tokens as f64 / record.wall_secs.max(1e-9),
            wall_secs = record.wall_secs,
            "SFT epoch done"
        );
        Ok(record)
    }

    /// One pass over the shuffled training split: the token-mean loss, the loss-bearing tokens and the last
    /// learning rate.
    fn train_epoch(&mut self) -> TrainResult<(f32, usize, f64)> {
        let (mut loss_sum, mut tokens_sum) = (0f64, 0usize);
        let Self { model, data, config, vars, adam, batches, .. } = self;
        let last_lr = batches.epoch(|at, chunk| {
            let StepAt { step, lr } = at;
            let step_span = tracing::info_span!(
                "sft_step",
                step,
                lr,
                loss = tracing::field::Empty,
                grad_norm = tracing::field::Empty
            );
            let _step_entered = step_span.enter();
            let batch: Vec<&ChatTokens> = chunk.iter().map(|&i| &data.train[i]).collect();
            let outcome = train_step(model, vars, &batch, config, adam, lr)?;
            step_span.record("loss", outcome.loss);
            step_span.record("grad_norm", outcome.grad_norm);
            tracing::debug!(step, lr, loss = outcome.loss, grad_norm = outcome.grad_norm, "SFT step");
            loss_sum += outcome.loss * outcome.tokens as f64;
            tokens_sum += outcome.tokens;
            Ok(())
        })?;
        Ok(((loss_sum / tokens_sum.max(1) as f64) as f32, tokens_sum, last_lr))
    }

    fn validation_loss(&self) -> TrainResult<Option<f32>> {
        if self.data.validation.is_empty() {
            return Ok(None);
        }
        Ok(Some(mean_loss(self.model, &self.data.validation, self.config.micro_batch_size)?))
    }

    /// Scores the epoch (the selector's score, else minus the validation loss, else the epoch number: the last
    /// wins) and keeps a copy of its weights when it beats every earlier epoch.
    fn keep_if_best(&mut self, record: &mut SftEpoch) -> TrainResult<()> {
        let score = match self.selector.as_mut() {
            Some(select) => {
                let s = select(record, self.model)?;
                record.score = Some(s);
                s
            }
            None => record.val_loss.map_or(record.epoch as f64, |v| -f64::from(v)),
        };
        if self.best.as_ref().is_none_or(|b| score > b.score) {
            self.best = Some(Best { score, epoch: record.epoch, weights: self.model.snapshot_weights()? });
        }
        Ok(())
    }

    /// Puts the best epoch's weights back; returns it, how it was chosen, and every epoch's numbers.
    fn restore_best(self) -> TrainResult<(usize, Selection, Vec<SftEpoch>)> {
        let selected_by = match (&self.selector, self.data.validation.is_empty()) {
            (Some(_), _) => Selection::Selector,
            (None, false) => Selection::ValidationLoss,
            (None, true) => Selection::LastEpoch,
        };
        let best = self.best.ok_or_else(|| TrainError::Data("no epoch ran".into()))?;
        self.model.restore_weights(&best.weights)?;
        Ok((best.epoch, selected_by, self.epochs))
    }
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
    vars: &[Var],
    batch: &[&ChatTokens],
    config: &SftConfig,
    adam: &mut Adam,
    lr: f64,
) -> TrainResult<StepOutcome> {
    // On the training pool: the fused ops' parallel regions then cost no hand-over (see `compute_pool`).
    crate::compute_pool::run(|| {
        let total_tokens: usize = batch.iter().map(|e| loss_tokens(e)).sum();
        let mut step = GradientStep::new(vars);
        let mut step_loss = 0f64;
        for micro in batch.chunks(config.micro_batch_size) {
            let (loss, weight) = step.forward(|| {
                let collated = Collated::new(micro, model.device())?;
                let loss = collated.loss(model.llama(), config.residual_dropout)?;
                Ok((loss, collated.tokens as f64 / total_tokens.max(1) as f64))
            })?;
            step_loss += f64::from(loss.to_scalar::<f32>()?) * weight;
            step.backward(model, &loss, weight)?;
        }
        let applied = step.apply(config.max_grad_norm, adam, lr)?;
        Ok(StepOutcome { loss: step_loss, grad_norm: applied.grad_norm, tokens: total_tokens, timing: applied.timing })
    })
}
