//! Where one optimiser step's time went, by phase: measured on every step of every stage (a few clock reads),
//! logged with the step and printed by `instructd bench-train`.

use std::time::Instant;

/// Seconds of one step by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTiming {
    /// Forward passes and losses (every micro-batch).
    pub forward: f64,
    pub backward: f64,
    /// Gradient accumulation over micro-batches and clipping.
    pub gradients: f64,
    pub optimizer: f64,
}

/// A phase of [`StepTiming`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
    Gradients,
    Optimizer,
}

impl StepTiming {
    pub fn total(&self) -> f64 {
        self.forward + self.backward + self.gradients + self.optimizer
    }

    /// Runs `f`, adding its wall time to `phase`.
    pub fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let secs = start.elapsed().as_secs_f64();
        *match phase {
            Phase::Forward => &mut self.forward,
            Phase::Backward => &mut self.backward,
            Phase::Gradients => &mut self.gradients,
            Phase::Optimizer => &mut self.optimizer,
        } += secs;
        out
    }

    /// Adds another step's (or micro-batch's) phases to these.
    pub fn add(&mut self, other: &StepTiming) {
        self.forward += other.forward;
        self.backward += other.backward;
        self.gradients += other.gradients;
        self.optimizer += other.optimizer;
    }
}
