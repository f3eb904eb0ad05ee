//! The optimiser and learning-rate schedules of the InstructGPT recipe (Ouyang et al. 2022, appendix C).
//!
//! - [`Adam`]: Adam with the paper's β = (0.9, 0.95) (no weight decay unless asked for), updating candle
//!   [`Var`]s in place from a [`Gradients`] accumulator.
//! - [`Gradients`]: the gradients of the trainable variables only (a `GradStore` from `backward` also holds the
//!   gradient of every intermediate activation), summed over micro-batches with a weight each, so one optimiser
//!   step can cover a batch larger than fits in memory at once; optional clipping by global norm.
//! - [`LrSchedule`]: linear warm-up from a fraction of the peak, then either cosine decay to a floor (SFT and RM:
//!   "cosine learning-rate decay to 10% of the peak") or a constant rate (PPO: "warm-up over the first 10
//!   iterations from 1/10 of the peak, then constant").

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var};
use serde::{Deserialize, Serialize};

/// Adam's (β1, β2) in the paper, for SFT, the reward model and PPO alike.
pub const PAPER_BETAS: (f64, f64) = (0.9, 0.95);
/// Cosine decay ends at this fraction of the peak learning rate (SFT and RM).
pub const PAPER_FINAL_LR_RATIO: f64 = 0.1;

/// Adam's hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled (AdamW-style) weight decay; 0 (plain Adam) in the paper.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: PAPER_BETAS.0, beta2: PAPER_BETAS.1, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// What the learning rate does after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Half a cosine from the peak down to `final_ratio × peak`, reached at the last step.
    Cosine { final_ratio: f64 },
    /// Stay at the peak.
    Constant,
}

/// Learning rate per optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    /// Steps of linear warm-up from `warmup_start_ratio × peak` up to the peak (0: none).
    pub warmup_steps: usize,
    pub warmup_start_ratio: f64,
    /// All optimiser steps of the run, warm-up included (only cosine decay needs it).
    pub total_steps: usize,
    pub decay: Decay,
}

impl LrSchedule {
    /// SFT / RM: optional warm-up from 10% of the peak, then cosine decay to 10% of the peak at the last step.
    pub fn cosine(peak: f64, total_steps: usize, warmup_steps: usize) -> Self {
        Self {
            peak,
            warmup_steps,
            warmup_start_ratio: 0.1,
            total_steps,
            decay: Decay::Cosine { final_ratio: PAPER_FINAL_LR_RATIO },
        }
    }

    /// PPO: warm-up from 1/10 of the peak over `warmup_steps`, then constant.
    pub fn warmup_constant(peak: f64, warmup_steps: usize) -> Self {
        Self { peak, warmup_steps, warmup_start_ratio: 0.1, total_steps: 0, decay: Decay::Constant }
    }

    /// The learning rate of optimiser step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            let ramp = step as f64 / self.warmup_steps as f64;
            return self.peak * (self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * ramp);
        }
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Cosine { final_ratio } => {
                let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
                let progress = if decay_steps <= 1 {
                    0.0
                } else {
                    ((step - self.warmup_steps) as f64 / (decay_steps - 1) as f64).min(1.0)
                };
                let floor = self.peak * final_ratio;
                floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Gradients of a set of variables, accumulated over micro-batches.
///
/// Each [`Gradients::accumulate`] adds `weight × ∂loss/∂var` for every variable the loss reached. With
/// `weight = share of the batch this micro-batch holds` (tokens for SFT, prompts for the RM) the sum is the
/// gradient of the whole batch's mean loss.
#[derive(Debug, Default)]
pub struct Gradients {
    grads: HashMap<TensorId, Tensor>,
}

impl Gradients {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `weight ×` the gradients in `store` of the given variables (others, and activations, are ignored).
    pub fn accumulate(&mut self, store: &GradStore, vars: &[Var], weight: f64) -> Result<()> {
        for var in vars {
            let Some(grad) = store.get(var.as_tensor()) else { continue };
            let grad = if weight == 1.0 { grad.detach() } else { (grad.detach() * weight)? };
            let id = var.as_tensor().id();
            let sum = match self.grads.remove(&id) {
                Some(previous) => (previous + grad)?,
                None => grad,
            };
            self.grads.insert(id, sum);
        }
        Ok(())
    }

    /// The accumulated gradient of `var`, if any loss reached it.
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.grads.get(&var.as_tensor().id())
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Number of variables with a gradient.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// `sqrt(Σ ‖g‖²)` over every accumulated gradient.
    pub fn global_norm(&self) -> Result<f64> {
        let mut sum = 0f64;
        for grad in self.grads.values() {
            let grad = grad.to_dtype(DType::F32)?;
            sum += match inference::cpu_linear::with_host_f32(&grad, |g| {
                g.chunks(4096).map(|c| f64::from(inference::simd::dot(c, c))).sum::<f64>()
            }) {
                Ok(host) => host,
                Err(_) => f64::from(grad.sqr()?.sum_all()?.to_scalar::<f32>()?),
            };
        }
        Ok(sum.sqrt())
    }

    /// Scales every gradient down so the global norm is at most `max_norm`; returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        if norm.is_finite() && norm > max_norm && norm > 0.0 {
            let scale = max_norm / norm;
            for grad in self.grads.values_mut() {
                *grad = (&*grad * scale)?;
            }
        }
        Ok(norm)
    }
}

/// Adam's moment estimates of one variable: host vectors for F32 variables on the CPU (one fused pass per step,
/// instead of a dozen tensor ops that each allocate a full-size temporary), tensors elsewhere.
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

struct AdamParam {
    var: Var,
    moments: Moments,
}

/// One variable's Adam update on the CPU, applied to the variable's own storage (no copy of the weights, no
/// temporaries), in parallel over chunks of the parameter.
struct HostUpdate<'a> {
    grad: Tensor,
    moments: std::sync::Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    beta1: f32,
    beta2: f32,
    correct1: f32,
    correct2: f32,
    lr: f32,
    eps: f32,
    /// `1 − lr·weight_decay`.
    keep: f32,
}

impl candle_core::InplaceOp1 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adam-host-update"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<()> {
        use rayon::prelude::*;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adam: the variable is not contiguous".into()))?;
        let candle_core::CpuStorage::F32(theta) = storage else {
            return Err(candle_core::Error::Msg("adam: host moments need an F32 variable".into()));
        };
        let theta = &mut theta[start..end];
        let (grad_storage, grad_layout) = self.grad.storage_and_layout();
        let (candle_core::Storage::Cpu(grad), Some((gs, ge))) = (&*grad_storage, grad_layout.contiguous_offsets())
        else {
            return Err(candle_core::Error::Msg("adam: the gradient is not a contiguous CPU tensor".into()));
        };
        let grad = &grad.as_slice::<f32>()?[gs..ge];
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *moments;
        if grad.len() != theta.len() || m.len() != theta.len() {
            return Err(candle_core::Error::Msg("adam: gradient and variable sizes differ".into()));
        }
        const CHUNK: usize = 1 << 16;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((theta, m), v), g)| {
                for i in 0..theta.len() {
                    m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g[i];
                    v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g[i] * g[i];
                    theta[i] = theta[i] * self.keep
                        - self.lr * (m[i] * self.correct1) / ((v[i] * self.correct2).sqrt() + self.eps);
                }
            });
        Ok(())
    }
}

/// Adam over a fixed list of variables. Variables without a gradient in a step are left untouched (their moments
/// too), so a frozen or unused weight (an untied `lm_head` in the reward model) never moves.
pub struct Adam {
    params: Vec<AdamParam>,
    config: AdamConfig,
    steps: usize,
}

impl Adam {
    /// Float variables only; moments start at zero.
    pub fn new(vars: Vec<Var>, config: AdamConfig) -> Result<Self> {
        Self::with_host_moments(vars, config, true)
    }

    fn with_host_moments(vars: Vec<Var>, config: AdamConfig, allow_host: bool) -> Result<Self> {
        let params = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                let moments = if allow_host && var.device().is_cpu() && var.dtype() == DType::F32 {
                    let n = var.elem_count();
                    Moments::Host { m: vec![0.0; n], v: vec![0.0; n] }
                } else {
                    let m = var.as_tensor().zeros_like()?.detach();
                    Moments::Device { v: m.clone(), m }
                };
                Ok(AdamParam { var, moments })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, config, steps: 0 })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update at learning rate `lr`: bias-corrected moments, `θ ← θ − lr·m̂/(√v̂ + ε) − lr·wd·θ`.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        self.steps += 1;
        let AdamConfig { beta1, beta2, eps, weight_decay } = self.config;
        let t = self.steps as i32;
        let correct1 = 1.0 / (1.0 - beta1.powi(t));
        let correct2 = 1.0 / (1.0 - beta2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else { continue };
            match &mut p.moments {
                Moments::Host { m, v } => {
                    let update = HostUpdate {
                        grad: g.to_dtype(DType::F32)?.contiguous()?,
                        moments: std::sync::Mutex::new((m, v)),
                        beta1: beta1 as f32,
                        beta2: beta2 as f32,
                        correct1: correct1 as f32,
                        correct2: correct2 as f32,
                        lr: lr as f32,
                        eps: eps as f32,
                        keep: (1.0 - lr * weight_decay) as f32,
                    };
                    p.var.as_tensor().inplace_op1(&update)?;
                }
                Moments::Device { m, v } => {
                    let g = g.to_dtype(m.dtype())?;
                    *m = ((&*m * beta1)? + (&g * (1.0 - beta1))?)?;
                    *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let update = ((&*m * correct1)? / ((&*v * correct2)?.sqrt()? + eps)?)?;
                    let theta = p.var.as_tensor().detach();
                    let theta = if weight_decay > 0.0 { (&theta * (1.0 - lr * weight_decay))? } else { theta };
                    p.var.set(&(theta - (update * lr)?)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_ten_percent() {
        let s = LrSchedule::cosine(1.0, 12, 2);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(1) - 0.55).abs() < 1e-12);
        assert!((s.lr(2) - 1.0).abs() < 1e-12);
        assert!((s.lr(11) - 0.1).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12, "stays at the floor past the end");
        // Halfway through the decay: floor + (peak - floor) / 2.
        let mid = LrSchedule::cosine(2.0, 11, 0);
        assert!((mid.lr(5) - 1.1).abs() < 1e-12);
        let lrs: Vec<f64> = (2..12).map(|i| s.lr(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] < w[0]), "monotone decay: {lrs:?}");
        // A one-step run uses the peak.
        assert_eq!(LrSchedule::cosine(3.0, 1, 0).lr(0), 3.0);
    }

    #[test]
    fn warmup_constant_matches_ppo_recipe() {
        let s = LrSchedule::warmup_constant(1e-5, 10);
        assert!((s.lr(0) - 1e-6).abs() < 1e-18);
        assert!(s.lr(5) > s.lr(4));
        assert_eq!(s.lr(10), 1e-5);
        assert_eq!(s.lr(1000), 1e-5);
    }

    #[test]
    fn adam_first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        // With bias correction, the first Adam step is lr · g/(|g| + ε) ≈ lr · sign(g).
        let var = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let loss =
            (var.as_tensor() * &Tensor::new(&[3.0f32, -0.5, 0.0], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        let mut grads = Gradients::new();
        grads.accumulate(&loss.backward().unwrap(), std::slice::from_ref(&var), 1.0).unwrap();
        let mut adam = Adam::new(vec![var.clone()], AdamConfig::default()).unwrap();
        adam.step(&grads, 0.1).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6 && got[2] == 0.5, "{got:?}");
    }

    #[test]
    fn host_and_tensor_moments_give_the_same_updates() {
        let config = AdamConfig { weight_decay: 0.1, ..AdamConfig::default() };
        let init = Tensor::new(&[[0.5f32, -1.5, 2.0], [0.1, 0.25, -0.75]], &Device::Cpu).unwrap();
        let run = |host: bool| {
            let var = Var::from_tensor(&init).unwrap();
            let mut adam = Adam::with_host_moments(vec![var.clone()], config, host).unwrap();
            for step in 0..5 {
                let loss = (var.as_tensor().sqr().unwrap() * (step as f64 + 1.0)).unwrap().sum_all().unwrap();
                let mut grads = Gradients::new();
                grads.accumulate(&loss.backward().unwrap(), std::slice::from_ref(&var), 0.5).unwrap();
                adam.step(&grads, 0.05).unwrap();
            }
            var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (host, tensor) = (run(true), run(false));
        assert!(host.iter().zip(&tensor).all(|(a, b)| (a - b).abs() < 1e-6), "{host:?} vs {tensor:?}");
        assert!(host.iter().zip(init.flatten_all().unwrap().to_vec1::<f32>().unwrap()).all(|(a, b)| a != &b));
    }

    #[test]
    fn accumulated_weighted_gradients_equal_the_full_batch_gradient() {
        let var = Var::new(&[0.3f32, -0.7], &Device::Cpu).unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0], [3.0, -1.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        let loss_of = |rows: &Tensor| rows.broadcast_mul(var.as_tensor()).unwrap().sqr().unwrap().mean_all().unwrap();
        let vars = [var.clone()];
        let mut full = Gradients::new();
        full.accumulate(&loss_of(&x).backward().unwrap(), &vars, 1.0).unwrap();
        let mut parts = Gradients::new();
        parts.accumulate(&loss_of(&x.narrow(0, 0, 2).unwrap()).backward().unwrap(), &vars, 2.0 / 3.0).unwrap();
        parts.accumulate(&loss_of(&x.narrow(0, 2, 1).unwrap()).backward().unwrap(), &vars, 1.0 / 3.0).unwrap();
        let a = full.get(&var).unwrap().to_vec1::<f32>().unwrap();
        let b = parts.get(&var).unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6), "{a:?} vs {b:?}");

        let norm = parts.global_norm().unwrap();
        let before = parts.clip_global_norm(norm / 2.0).unwrap();
        assert!((before - norm).abs() < 1e-9);
        assert!((parts.global_norm().unwrap() - norm / 2.0).abs() < 1e-5);
    }
}
