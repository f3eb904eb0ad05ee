//! The reward-model loop: rankings encoded (and the frozen layers' output cached), epochs of shuffled batches of
//! prompts with one optimiser step each ([`train_step`]), validation per epoch, the best epoch kept, the bias
//! centred on demonstrations, and the model saved with its report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use feedback::split::Split;
use serde::{Deserialize, Serialize};

use crate::losses::{RankingLossOptions, ranking_loss_with, ranking_pairs};
use crate::optim::Adam;
use crate::policy_model::{TrainError, TrainResult};
use crate::snapshot::{RankedExample, SftExample};
use crate::step::{EpochBatches, GradientStep, StepAt, cosine_schedule, write_report};
use crate::step_timing::StepTiming;

use super::evaluate::{RankEval, evaluate};
use super::ranking::{ActivationCache, cache_activations};
use super::{REPORT_FILE, Ranking, RewardModel, RmConfig};

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
        .with_cost_options(&config.cost_options())?;
    let mut data = Rankings::encode(&rm, examples)?;
    let activation_cache = data.cache_activations(&rm, &config)?;
    let val_before = data.evaluate(&rm, &config)?;
    tracing::info!(
        source = %policy_dir.display(),
        train = data.train.len(),
        validation = data.validation.len(),
        val_accuracy_before = ?val_before.map(|v| v.accuracy),
        "RM training starts"
    );

    let mut run = RmRun::new(&rm, &data, &config)?;
    for epoch in 1..=config.epochs {
        let record = run.epoch(epoch)?;
        let go_on = run.track_best(&record)?;
        run.epochs.push(record);
        if !go_on {
            break;
        }
    }
    let total_steps = run.total_steps;
    let (kept_epoch, epochs) = run.restore_kept()?;

    let demos: Vec<SftExample> = demonstrations.iter().filter(|d| d.split == Split::Train).cloned().collect();
    let (bias_offset, demo_mean_after) = center(&mut rm, &demos, &config)?;
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
        train_prompts: data.train.len(),
        val_prompts: data.validation.len(),
        skipped: data.skipped,
        truncated: data.truncated,
        total_steps,
        wall_secs: started.elapsed().as_secs_f64(),
        source_dir: policy_dir.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        config,
    };
    write_report(&out_dir.join(REPORT_FILE), &report)?;
    tracing::info!(wall_secs = report.wall_secs, bias_offset = ?bias_offset, out = %out_dir.display(), "RM done");
    Ok(report)
}

/// The training and validation rankings, tokenised, with what was left out or cut.
struct Rankings {
    train: Vec<Ranking>,
    validation: Vec<Ranking>,
    /// No ordered pair, or completions and ranks of different lengths.
    skipped: usize,
    /// Sequences cut to `max_seq_len`.
    truncated: usize,
}

impl Rankings {
    fn encode(rm: &RewardModel, examples: &[RankedExample]) -> TrainResult<Self> {
        let mut data = Self { train: Vec::new(), validation: Vec::new(), skipped: 0, truncated: 0 };
        data.train = data.encode_split(rm, examples, Split::Train)?;
        data.validation = data.encode_split(rm, examples, Split::Validation)?;
        if data.train.is_empty() {
            return Err(TrainError::Data("no training-split rankings with an ordered pair".into()));
        }
        Ok(data)
    }

    fn encode_split(
        &mut self,
        rm: &RewardModel,
        examples: &[RankedExample],
        split: Split,
    ) -> TrainResult<Vec<Ranking>> {
        let mut out = Vec::new();
        for ex in examples.iter().filter(|e| e.split == split) {
            let pairs = ranking_pairs(&ex.ranks).len();
            if ex.completions.len() != ex.ranks.len() || pairs == 0 {
                self.skipped += 1;
                continue;
            }
            let mut sequences = Vec::with_capacity(ex.completions.len());
            for completion in &ex.completions {
                let (ids, cut) = rm.encode(&ex.prompt, completion)?;
                self.truncated += usize::from(cut);
                sequences.push(ids);
            }
            out.push(Ranking { sequences, ranks: ex.ranks.clone(), pairs, weight: ex.weight, activations: None });
        }
        Ok(out)
    }

    /// Runs the frozen layers once over every completion and keeps their output
    /// ([`RmConfig::cache_frozen_activations`]); `None` when nothing was cached.
    fn cache_activations(&mut self, rm: &RewardModel, config: &RmConfig) -> TrainResult<Option<ActivationCache>> {
        if !config.cache_frozen_activations {
            return Ok(None);
        }
        let started = Instant::now();
        let floats = cache_activations(rm, &mut self.train, config.score_batch_size)?
            + cache_activations(rm, &mut self.validation, config.score_batch_size)?;
        let cache = (floats > 0).then(|| ActivationCache {
            bytes: floats * std::mem::size_of::<f32>(),
            wall_secs: started.elapsed().as_secs_f64(),
        });
        if let Some(cache) = &cache {
            tracing::info!(bytes = cache.bytes, wall_secs = cache.wall_secs, "frozen layers' activations cached");
        }
        Ok(cache)
    }

    /// The validation split's ranking quality; `None` without validation rankings.
    fn evaluate(&self, rm: &RewardModel, config: &RmConfig) -> TrainResult<Option<RankEval>> {
        if self.validation.is_empty() {
            return Ok(None);
        }
        Ok(Some(evaluate(rm, &self.validation, config)?))
    }
}

/// The epoch with the lowest validation loss so far and, while later epochs may still replace the weights, a
/// copy of its trainable weights.
#[derive(Default)]
struct BestEpoch {
    epoch: usize,
    loss: Option<f32>,
    weights: Option<Vec<Tensor>>,
}

/// A run in progress: the model, its optimiser and batches, the epochs so far and the best of them.
struct RmRun<'a> {
    rm: &'a RewardModel,
    data: &'a Rankings,
    config: &'a RmConfig,
    vars: Vec<Var>,
    adam: Adam,
    batches: EpochBatches,
    total_steps: usize,
    epochs: Vec<RmEpoch>,
    best: BestEpoch,
}

impl<'a> RmRun<'a> {
    fn new(rm: &'a RewardModel, data: &'a Rankings, config: &'a RmConfig) -> TrainResult<Self> {
        let vars = rm.vars();
        let adam = Adam::new(vars.clone(), config.adam)?;
        let mut total_steps = 0;
        let batches = EpochBatches::new(
            data.train.len(),
            config.batch_prompts,
            config.epochs,
            config.seed.wrapping_add(1),
            |t| {
                total_steps = t;
                cosine_schedule(config.learning_rate, config.final_lr_ratio, t, config.warmup_steps)
            },
        );
        let epochs = Vec::with_capacity(config.epochs);
        Ok(Self { rm, data, config, vars, adam, batches, total_steps, epochs, best: BestEpoch::default() })
    }

    /// Trains one epoch and measures the validation split.
    fn epoch(&mut self, epoch: usize) -> TrainResult<RmEpoch> {
        let span = tracing::info_span!("rm_epoch", epoch, train_loss = tracing::field::Empty);
        let _entered = span.enter();
        let epoch_start = Instant::now();
        let steps = self.batches.steps_per_epoch();
        let (loss_sum, correct, pairs, last_lr) = self.train_epoch()?;
        let train_loss = (loss_sum / steps as f64) as f32;
        span.record("train_loss", train_loss);
        let val = self.data.evaluate(self.rm, self.config)?;
        let record = RmEpoch {
            epoch,
            steps,
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
        Ok(record)
    }

    /// One pass over the shuffled training rankings: the summed step losses, pairs ranked right, pairs, and the
    /// last learning rate.
    fn train_epoch(&mut self) -> TrainResult<(f64, f64, usize, f64)> {
        let (mut loss_sum, mut correct, mut pairs) = (0f64, 0f64, 0usize);
        let Self { rm, data, config, vars, adam, batches, .. } = self;
        let last_lr = batches.epoch(|at, chunk| {
            let StepAt { step, lr } = at;
            let step_span = tracing::info_span!(
                "rm_step",
                step,
                lr,
                loss = tracing::field::Empty,
                accuracy = tracing::field::Empty,
                grad_norm = tracing::field::Empty
            );
            let _step_entered = step_span.enter();
            let rankings: Vec<&Ranking> = chunk.iter().map(|&i| &data.train[i]).collect();
            let outcome = train_step(rm, vars, &rankings, config, adam, lr)?;
            let accuracy = outcome.correct / outcome.pairs.max(1) as f64;
            step_span.record("loss", outcome.loss);
            step_span.record("accuracy", accuracy);
            step_span.record("grad_norm", outcome.grad_norm);
            tracing::debug!(step, lr, loss = outcome.loss, accuracy, grad_norm = outcome.grad_norm, "RM step");
            loss_sum += outcome.loss;
            correct += outcome.correct;
            pairs += outcome.pairs;
            Ok(())
        })?;
        Ok((loss_sum, correct, pairs, last_lr))
    }

    /// Remembers `record` when its validation loss is the lowest so far (with a copy of the weights if later
    /// epochs may replace them); `false` when early stopping ends the run here.
    fn track_best(&mut self, record: &RmEpoch) -> TrainResult<bool> {
        let Some(val) = record.val else { return Ok(true) };
        let epoch = record.epoch;
        if self.best.loss.is_none_or(|b| val.loss < b) {
            self.best = BestEpoch { epoch, loss: Some(val.loss), weights: None };
            if self.config.keep_best_epoch && epoch < self.config.epochs {
                let copy = self.vars.iter().map(|v| v.as_tensor().detach().copy()).collect::<Result<_, _>>()?;
                self.best.weights = Some(copy);
            }
        } else if self.config.early_stop_patience.is_some_and(|p| epoch - self.best.epoch >= p) {
            tracing::info!(epoch, best_epoch = self.best.epoch, "RM: validation loss stopped falling; stopping");
            return Ok(false);
        }
        Ok(true)
    }

    /// Puts the kept epoch's weights back ([`RmConfig::keep_best_epoch`]); returns it and every epoch's numbers.
    fn restore_kept(self) -> TrainResult<(usize, Vec<RmEpoch>)> {
        let last_epoch = self.epochs.len();
        let best = self.best.epoch;
        let kept_epoch = if self.config.keep_best_epoch && best > 0 { best } else { last_epoch };
        if let (true, Some(weights)) = (kept_epoch != last_epoch, &self.best.weights) {
            for (var, w) in self.vars.iter().zip(weights) {
                var.set(w)?;
            }
            tracing::info!(kept_epoch, last_epoch, "RM: keeping the epoch with the lowest validation loss");
        }
        Ok((kept_epoch, self.epochs))
    }
}

/// Shifts the head's bias so `demos` score 0 on average: the mean before (what was subtracted) and after.
fn center(rm: &mut RewardModel, demos: &[SftExample], config: &RmConfig) -> TrainResult<(Option<f32>, Option<f32>)> {
    let bias_offset = rm.center_on_demonstrations(demos, config.score_batch_size)?;
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
    Ok((bias_offset, demo_mean_after))
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
        let mut step = GradientStep::new(vars);
        let (mut loss_sum, mut correct, mut pairs) = (0f64, 0f64, 0usize);
        // Each micro-batch's loss is a weighted mean over its prompts: it counts by its share of the step's weight.
        let total: f64 = rankings.iter().map(|r| f64::from(r.weight)).sum();
        for micro in rankings.chunks(config.micro_batch_prompts) {
            let (loss, accuracy) = step.forward(|| {
                let ranks: Vec<&[usize]> = micro.iter().map(|r| r.ranks.as_slice()).collect();
                let weights: Vec<f32> = micro.iter().map(|r| r.weight).collect();
                let rewards = Ranking::rewards_of(rm, micro, config.residual_dropout)?;
                let options =
                    RankingLossOptions { prompt_weights: Some(&weights), margin_per_rank: config.margin_per_rank };
                Ok(ranking_loss_with(&rewards, &ranks, options)?)
            })?;
            let weight = micro.iter().map(|r| f64::from(r.weight)).sum::<f64>() / total.max(f64::MIN_POSITIVE);
            step.backward(rm.trunk(), &loss, weight)?;
            let micro_pairs: usize = micro.iter().map(|r| r.pairs).sum();
            loss_sum += f64::from(loss.to_scalar::<f32>()?) * weight;
            correct += f64::from(accuracy) * micro_pairs as f64;
            pairs += micro_pairs;
        }
        let applied = step.apply(config.max_grad_norm, adam, lr)?;
        Ok(RmStepOutcome { loss: loss_sum, correct, pairs, grad_norm: applied.grad_norm, timing: applied.timing })
    })
}
