//! The optimiser-step machinery every stage shares, written once: a step's micro-batched forward and backward
//! passes with weighted gradient accumulation ([`GradientStep`]), clipping and the Adam update, timed by phase
//! ([`StepTiming`]); and the epoch loop's shuffled batches with the stop check and the learning-rate schedule
//! ([`EpochBatches`]); and the stage report's atomic write. A stage supplies only its forward and its loss.

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::optim::{Adam, Decay, Gradients, LrSchedule};
use crate::policy_model::{PolicyModel, TrainResult};
use crate::step_timing::{Phase, StepTiming};

/// One optimiser step in the making: gradients of `vars` accumulated over micro-batches, each weighted by its
/// share of the step, and where the time went.
pub struct GradientStep<'a> {
    vars: &'a [Var],
    grads: Gradients,
    timing: StepTiming,
}

/// What applying a [`GradientStep`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Applied {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub timing: StepTiming,
}

impl<'a> GradientStep<'a> {
    pub fn new(vars: &'a [Var]) -> Self {
        Self { vars, grads: Gradients::new(), timing: StepTiming::default() }
    }

    /// Runs a micro-batch's forward pass and loss, timed as the forward phase.
    pub fn forward<T>(&mut self, f: impl FnOnce() -> TrainResult<T>) -> TrainResult<T> {
        self.timing.time(Phase::Forward, f)
    }

    /// Back-propagates `loss` through `model` and adds the gradients of the step's variables, scaled by `weight`.
    pub fn backward(&mut self, model: &PolicyModel, loss: &Tensor, weight: f64) -> TrainResult<()> {
        let store = self.timing.time(Phase::Backward, || model.backward(loss))?;
        self.timing.time(Phase::Gradients, || self.grads.accumulate(&store, self.vars, weight))?;
        Ok(())
    }

    /// Clips the accumulated gradient to `max_grad_norm` (or only measures its norm) and takes one Adam step at
    /// `lr`.
    pub fn apply(mut self, max_grad_norm: Option<f64>, adam: &mut Adam, lr: f64) -> TrainResult<Applied> {
        let grads = &mut self.grads;
        let grad_norm = self.timing.time(Phase::Gradients, || match max_grad_norm {
            Some(max) => grads.clip_global_norm(max),
            None => grads.global_norm(),
        })?;
        self.timing.time(Phase::Optimizer, || adam.step(&self.grads, lr))?;
        Ok(Applied { grad_norm, timing: self.timing })
    }
}

/// SFT's and the reward model's schedule: warm-up, then cosine decay to `final_ratio` of the peak at the last step.
pub fn cosine_schedule(peak: f64, final_ratio: f64, total_steps: usize, warmup_steps: usize) -> LrSchedule {
    LrSchedule { decay: Decay::Cosine { final_ratio }, ..LrSchedule::cosine(peak, total_steps, warmup_steps) }
}

/// The batches of an epoch loop: the examples in a fresh seeded shuffle each epoch, cut into batches of one
/// optimiser step each, with the step counter and its learning rate.
pub struct EpochBatches {
    order: Vec<usize>,
    batch_size: usize,
    rng: StdRng,
    schedule: LrSchedule,
    step: usize,
}

/// One optimiser step's place in the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepAt {
    /// 0-based, over the whole run.
    pub step: usize,
    pub lr: f64,
}

impl EpochBatches {
    /// `examples` examples, `batch_size` per step, `epochs` epochs on the cosine schedule built by `schedule`
    /// from the run's total steps.
    pub fn new(
        examples: usize,
        batch_size: usize,
        epochs: usize,
        seed: u64,
        schedule: impl FnOnce(usize) -> LrSchedule,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let total_steps = examples.div_ceil(batch_size) * epochs;
        Self {
            order: (0..examples).collect(),
            batch_size,
            rng: StdRng::seed_from_u64(seed),
            schedule: schedule(total_steps),
            step: 0,
        }
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// Runs one epoch: shuffles the examples, then for each batch stops if a stop was requested
    /// ([`crate::stop`]) and calls `step` with the batch's example indices. Returns the last step's learning rate.
    pub fn epoch(&mut self, mut step: impl FnMut(StepAt, &[usize]) -> TrainResult<()>) -> TrainResult<f64> {
        self.order.shuffle(&mut self.rng);
        let mut last_lr = 0.0;
        for chunk in self.order.chunks(self.batch_size) {
            crate::stop::check()?;
            let at = StepAt { step: self.step, lr: self.schedule.lr(self.step) };
            step(at, chunk)?;
            last_lr = at.lr;
            self.step += 1;
        }
        Ok(last_lr)
    }
}

/// Writes a stage's report as pretty JSON, atomically (the report lands whole or not at all).
pub fn write_report(path: &std::path::Path, report: &impl serde::Serialize) -> TrainResult<()> {
    let json = serde_json::to_vec_pretty(report).map_err(|e| crate::policy_model::TrainError::Data(e.to_string()))?;
    crate::policy_model::write_file_atomic(path, &json)
}
