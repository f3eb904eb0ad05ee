//! Step 4 of a PPO iteration, the optimisation: one minibatch of the iteration's experience ([`Minibatch`]) and
//! the PPO-ptx step on it ([`ppo_step`]): the clipped policy loss and the γ-weighted pre-training NLL, one Adam step
//! on the policy ([`policy_update`]); then the clipped value loss, one on the value function ([`value_update`]);
//! and the EMA of the policy weights ([`Ema`]).

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::corpus::lm_loss;
use crate::losses::{entropy, masked_mean, ppo_policy_loss, token_logprobs, value_loss};
use crate::optim::Adam;
use crate::policy_model::{PolicyModel, TrainResult};
use crate::reward_model::RewardModel;
use crate::step::GradientStep;
use crate::step_timing::StepTiming;

use super::PpoConfig;
use super::experience::{Advantages, Experience};

/// The rows of one minibatch: `[M, T]` each.
pub struct Minibatch {
    pub input: Tensor,
    pub targets: Tensor,
    pub mask: Tensor,
    pub old_logprobs: Tensor,
    pub advantages: Tensor,
    pub old_values: Tensor,
    pub returns: Tensor,
    /// Episodes in it.
    pub episodes: usize,
}

impl Minibatch {
    /// The episodes `rows` of the iteration's experience.
    pub fn select(experience: &Experience, advantages: &Advantages, rows: &[usize]) -> TrainResult<Self> {
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), experience.batch.input.device())?;
        let pick = |t: &Tensor| -> TrainResult<Tensor> { Ok(t.index_select(&idx, 0)?) };
        Ok(Self {
            input: pick(&experience.batch.input)?,
            targets: pick(&experience.batch.targets)?,
            mask: pick(&experience.batch.mask)?,
            old_logprobs: pick(&experience.old_logprobs)?,
            advantages: pick(&advantages.advantages)?,
            old_values: pick(&experience.old_values)?,
            returns: pick(&advantages.returns)?,
            episodes: rows.len(),
        })
    }
}

/// The policy and the value function being trained, each with its variables and Adam.
pub struct Learners<'a> {
    pub policy: &'a PolicyModel,
    pub policy_vars: Vec<Var>,
    pub policy_adam: Adam,
    pub critic: &'a RewardModel,
    pub critic_vars: Vec<Var>,
    pub critic_adam: Adam,
}

impl<'a> Learners<'a> {
    pub fn new(policy: &'a PolicyModel, critic: &'a RewardModel, config: &PpoConfig) -> TrainResult<Self> {
        let (policy_vars, critic_vars) = (policy.vars(), critic.vars());
        Ok(Self {
            policy_adam: Adam::new(policy_vars.clone(), config.adam)?,
            critic_adam: Adam::new(critic_vars.clone(), config.adam)?,
            policy,
            policy_vars,
            critic,
            critic_vars,
        })
    }
}

/// What the policy's step measured (before its update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyOutcome {
    /// The clipped surrogate loss.
    pub loss: f32,
    pub clip_fraction: f32,
    pub approx_kl: f32,
    /// Mean per-token entropy on the minibatch's responses.
    pub entropy: f32,
    /// Pre-training NLL per token of the windows; `None` without windows.
    pub ptx_loss: Option<f32>,
    /// Global norm of the combined gradient before clipping.
    pub grad_norm: f64,
    pub timing: StepTiming,
}

/// What the value function's step measured (before its update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueOutcome {
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub timing: StepTiming,
}

/// One PPO-ptx optimiser step on `minibatch`: [`policy_update`] with the pre-training `windows`, then
/// [`value_update`].
pub fn ppo_step(
    learners: &mut Learners<'_>,
    minibatch: &Minibatch,
    windows: Option<&[&[u32]]>,
    config: &PpoConfig,
    lr: f64,
    value_lr: f64,
) -> TrainResult<(PolicyOutcome, ValueOutcome)> {
    let policy = policy_update(learners, minibatch, windows, config, lr)?;
    let value = value_update(learners, minibatch, config, value_lr)?;
    Ok((policy, value))
}

/// The clipped policy loss on `minibatch` plus `ptx_coef` times the pre-training NLL of `windows`
/// (`ptx_micro_batch` windows per pass), gradients accumulated, clipped, and one Adam step at `lr`.
pub fn policy_update(
    learners: &mut Learners<'_>,
    minibatch: &Minibatch,
    windows: Option<&[&[u32]]>,
    config: &PpoConfig,
    lr: f64,
) -> TrainResult<PolicyOutcome> {
    let policy = learners.policy;
    let mut step = GradientStep::new(&learners.policy_vars);
    let (loss, clip_fraction, approx_kl, step_entropy) = step.forward(|| {
        let logits = policy.llama().forward_train(&minibatch.input, 0.0)?;
        let new_lp = token_logprobs(&logits, &minibatch.targets)?;
        let (loss, clip_fraction, approx_kl) = ppo_policy_loss(
            &new_lp,
            &minibatch.old_logprobs,
            &minibatch.advantages,
            &minibatch.mask,
            config.clip_ratio,
        )?;
        let step_entropy = masked_mean(&entropy(&logits.detach())?, &minibatch.mask)?.to_scalar::<f32>()?;
        Ok((loss, clip_fraction, approx_kl, step_entropy))
    })?;
    step.backward(policy, &loss, 1.0)?;
    let ptx_loss = match windows {
        Some(windows) => {
            let mut loss_sum = 0f64;
            for micro in windows.chunks(config.ptx_micro_batch) {
                let share = micro.len() as f64 / windows.len() as f64;
                let nll = step.forward(|| lm_loss(policy.llama(), micro, policy.device()))?;
                loss_sum += f64::from(nll.to_scalar::<f32>()?) * share;
                step.backward(policy, &nll, config.ptx_coef * share)?;
            }
            Some(loss_sum as f32)
        }
        None => None,
    };
    let applied = step.apply(config.max_grad_norm, &mut learners.policy_adam, lr)?;
    Ok(PolicyOutcome {
        loss: loss.to_scalar::<f32>()?,
        clip_fraction,
        approx_kl,
        entropy: step_entropy,
        ptx_loss,
        grad_norm: applied.grad_norm,
        timing: applied.timing,
    })
}

/// The clipped value loss on `minibatch`, scaled by `vf_coef`, clipped, and one Adam step at `lr`.
pub fn value_update(
    learners: &mut Learners<'_>,
    minibatch: &Minibatch,
    config: &PpoConfig,
    lr: f64,
) -> TrainResult<ValueOutcome> {
    let critic = learners.critic;
    let mut step = GradientStep::new(&learners.critic_vars);
    let loss = step.forward(|| {
        let values = critic.values(&minibatch.input, 0.0)?;
        Ok(value_loss(&values, &minibatch.old_values, &minibatch.returns, &minibatch.mask, config.value_clip)?)
    })?;
    step.backward(critic.trunk(), &loss, config.vf_coef)?;
    let applied = step.apply(config.max_grad_norm, &mut learners.critic_adam, lr)?;
    Ok(ValueOutcome { loss: loss.to_scalar::<f32>()?, grad_norm: applied.grad_norm, timing: applied.timing })
}

/// An exponential moving average of the policy weights ([`PpoConfig::ema_decay`]), saved instead of the last
/// weights.
pub struct Ema {
    decay: f64,
    weights: HashMap<String, Tensor>,
}

impl Ema {
    /// Starts from the policy's current weights.
    pub fn new(policy: &PolicyModel, decay: f64) -> TrainResult<Self> {
        Ok(Self { decay, weights: policy.snapshot_weights()? })
    }

    /// `ema ← decay · ema + (1 - decay) · w` for every policy weight.
    pub fn update(&mut self, policy: &PolicyModel) -> TrainResult<()> {
        for (name, var) in policy.named_vars() {
            if let Some(avg) = self.weights.get_mut(&name) {
                *avg = ((&*avg * self.decay)? + (var.as_tensor().detach() * (1.0 - self.decay))?)?;
            }
        }
        Ok(())
    }

    /// Puts the averaged weights into the policy.
    pub fn restore(self, policy: &PolicyModel) -> TrainResult<()> {
        policy.restore_weights(&self.weights)
    }
}
