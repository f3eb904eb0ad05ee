//! PPO-ptx (paper section 3.5, "Reinforcement learning"): the policy is tuned against the reward model in a
//! bandit environment (a prompt, one sampled response, the RM's score, episode over), with a per-token KL penalty
//! against the SFT policy and the pre-training loss mixed in.
//!
//! Each iteration:
//! 1. **Rollouts** through the serving engine ([`crate::episodes`]), at temperature 1, from the policy's current
//!    weights (the engine reads the trainable variables in place).
//! 2. **Scoring** without gradients: the RM's reward of each (prompt, response); log-probabilities of the sampled
//!    tokens under the policy ("old") and the SFT reference; the value function's estimates at every response
//!    position. The value function is a second copy of the reward model, read at every position
//!    ([`RewardModel::values`]): the paper initialises it from the RM.
//! 3. **Advantages**: shaped rewards `-β (log π_old - log π_SFT)` per token plus the RM score on the last one, GAE
//!    with no discount (λ configurable), whitened over the iteration's episodes ([`crate::losses`]).
//! 4. **One inner epoch** over shuffled minibatches: the clipped policy loss, then the pre-training NLL on
//!    `ptx_per_episode` corpus windows per episode weighted by γ (computed in turn, gradients accumulated, one Adam
//!    step), an EMA update of the policy weights, and the clipped value loss with its own Adam.
//!
//! The learning rate warms up over the first iterations from 1/10 of the peak, then stays constant. The saved
//! policy is the EMA of the weights when `ema_decay` is set. Every iteration logs reward, KL, entropy, clip
//! fraction, value loss and ptx loss (tracing and the report, `ppo.json`).
//!
//! Paper values ([`PpoConfig::paper`]): 512 episodes per iteration, minibatch 64, β = 0.02, γ = 27.8 with 8
//! pre-training examples per episode, clip 0.2, warm-up 10 iterations, EMA 0.992. The defaults are CPU-sized:
//! 16 episodes, minibatch 8, γ = 1 with one window per episode, EMA 0.9 (few steps run, and a 0.992 average
//! would hardly leave the starting weights).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use inference::load::LoadedModel;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::corpus::{PretrainCorpus, lm_loss};
use crate::episodes::{Episode, EpisodeBatch, SampleSettings, engine_sharing, prompt_response_pairs, sample};
use crate::kl_controller::{KlController, RunningMoments};
use crate::losses::{
    PAPER_CLIP_RATIO, PAPER_GAE_GAMMA, PAPER_KL_BETA, PAPER_PTX_GAMMA, entropy, gae, kl_penalty, masked_mean,
    ppo_policy_loss, shaped_rewards, token_logprobs, value_loss, whiten,
};
use crate::optim::{Adam, AdamConfig, Gradients, LrSchedule};
use crate::policy_model::{PolicyModel, TrainError, TrainResult, write_file_atomic};
use crate::reward_model::RewardModel;

/// The training report written next to the policy.
pub const REPORT_FILE: &str = "ppo.json";

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
        }
    }
}

impl PpoConfig {
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

    fn validate(&self) -> TrainResult<()> {
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
        Ok(())
    }
}

/// One iteration's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoIteration {
    /// 1-based.
    pub iteration: usize,
    pub episodes: usize,
    /// Mean RM score of the iteration's rollouts.
    pub reward_mean: f32,
    pub reward_std: f32,
    /// β used for this iteration's penalty.
    pub kl_coef: f64,
    /// Mean over episodes of `Σ_t log π(y_t) - log π_SFT(y_t)` (nats per response).
    pub kl: f32,
    /// Mean per-token entropy of the policy on its responses.
    pub entropy: f32,
    pub clip_fraction: f32,
    pub approx_kl: f32,
    pub policy_loss: f32,
    pub value_loss: f32,
    /// Pre-training NLL per token; `None` when γ = 0.
    pub ptx_loss: Option<f32>,
    pub lr: f64,
    pub response_tokens_mean: f32,
    /// Share of rollouts that ended with end-of-sequence (rest hit `max_new_tokens`).
    pub stopped_fraction: f32,
    pub rollout_secs: f64,
    pub wall_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoReport {
    pub iterations: Vec<PpoIteration>,
    pub policy_dir: PathBuf,
    pub reference_dir: PathBuf,
    pub reward_model_dir: PathBuf,
    pub train_prompts: usize,
    pub saved_ema: bool,
    pub wall_secs: f64,
    pub config: PpoConfig,
}

/// What a PPO run starts from.
pub struct PpoInputs<'a> {
    /// The policy to improve (an SFT or earlier PPO checkpoint).
    pub policy_dir: &'a Path,
    /// The SFT policy of the KL penalty.
    pub reference_dir: &'a Path,
    /// The reward model: the scorer, and the value function's initialisation.
    pub reward_model_dir: &'a Path,
    /// Training prompts.
    pub prompts: &'a [String],
    /// Pre-training text; required when `ptx_coef > 0`.
    pub corpus: Option<&'a PretrainCorpus>,
}

/// Runs PPO-ptx and writes the policy to `out_dir` (with `ppo.json`). `progress` sees every iteration as it ends.
pub fn train(
    inputs: PpoInputs<'_>,
    config: PpoConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(&PpoIteration),
) -> TrainResult<PpoReport> {
    config.validate()?;
    if inputs.prompts.is_empty() {
        return Err(TrainError::Data("no training prompts to sample rollouts from".into()));
    }
    let corpus = match (config.ptx_coef > 0.0, inputs.corpus) {
        (true, None) => return Err(TrainError::Data("ptx_coef > 0 needs a pre-training corpus".into())),
        (true, Some(c)) => Some(c),
        (false, _) => None,
    };
    let started = Instant::now();
    let device = inference::load::default_device();
    let policy = PolicyModel::load(inputs.policy_dir, &device)?.with_frozen_layers(config.freeze_layers)?;
    let reference = LoadedModel::load(inputs.reference_dir, DType::F32, &device)?;
    let scorer = RewardModel::load_on(inputs.reward_model_dir, &device)?;
    let critic = RewardModel::load_on(inputs.reward_model_dir, &device)?.with_frozen_layers(config.freeze_layers)?;
    if reference.files.config.vocab_size != policy.config().vocab_size {
        return Err(TrainError::Data("the reference policy's vocabulary differs from the policy's".into()));
    }
    let engine = engine_sharing(&policy, "ppo-rollout", config.episodes_per_iteration)?;
    let policy_vars = policy.vars();
    let critic_vars = critic.vars();
    let mut policy_adam = Adam::new(policy_vars.clone(), config.adam)?;
    let mut critic_adam = Adam::new(critic_vars.clone(), config.adam)?;
    let schedule = LrSchedule::warmup_constant(config.learning_rate, config.warmup_iterations);
    let value_schedule = LrSchedule::warmup_constant(config.value_learning_rate, config.warmup_iterations);
    let mut ema = match config.ema_decay {
        Some(_) => Some(policy.snapshot_weights()?),
        None => None,
    };
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..inputs.prompts.len()).collect();
    order.shuffle(&mut rng);
    let mut cursor = 0usize;
    let mut kl_controller = KlController::new(config.kl_coef, config.kl_target, config.kl_horizon);
    let mut reward_moments = RunningMoments::default();
    tracing::info!(
        policy = %inputs.policy_dir.display(),
        reference = %inputs.reference_dir.display(),
        reward_model = %inputs.reward_model_dir.display(),
        prompts = inputs.prompts.len(),
        iterations = config.iterations,
        "PPO starts"
    );

    let mut iterations = Vec::with_capacity(config.iterations);
    for iteration in 1..=config.iterations {
        crate::stop::check()?;
        let span = tracing::info_span!("ppo_iteration", iteration);
        let _entered = span.enter();
        let it_start = Instant::now();
        let lr = schedule.lr(iteration - 1);
        let value_lr = value_schedule.lr(iteration - 1);

        // 1. Rollouts.
        let prompts: Vec<String> = (0..config.episodes_per_iteration)
            .map(|_| {
                if cursor == order.len() {
                    order.shuffle(&mut rng);
                    cursor = 0;
                }
                cursor += 1;
                inputs.prompts[order[cursor - 1]].clone()
            })
            .collect();
        let settings = SampleSettings {
            max_new_tokens: config.max_new_tokens,
            temperature: config.temperature,
            seed: config.seed.wrapping_mul(1_000_003).wrapping_add(iteration as u64 * 65_537),
            max_prompt_tokens: config.max_prompt_tokens,
        };
        let episodes = sample(&engine, &prompts, settings)?;
        let rollout_secs = it_start.elapsed().as_secs_f64();
        if episodes.is_empty() {
            return Err(TrainError::Data(format!(
                "no prompt fits in max_prompt_tokens = {} to sample from",
                config.max_prompt_tokens
            )));
        }

        // 2-4 run on the training pool (see `compute_pool`); rollouts above ran on the engine's own.
        let (scores, batch, kl_per_episode, sums) = crate::compute_pool::run(|| -> TrainResult<_> {
            // 2. Scores, old log-probabilities, reference log-probabilities, values.
            let scores = scorer.score(&prompt_response_pairs(&prompts, &episodes))?;
            let shaped_scores = if config.normalize_rewards {
                if iteration == 1 {
                    // Ziegler et al.: mean 0 and variance 1 over the starting policy's samples, fixed for the
                    // run; the value head (a copy of the RM) moves to the same scale, or its estimates would
                    // fight the normalised returns from the first step.
                    reward_moments.update(&scores);
                    let std = reward_moments.std().max(1e-6);
                    critic.rescale_head(1.0 / std, -reward_moments.mean / std)?;
                }
                reward_moments.normalise(&scores)
            } else {
                scores.clone()
            };
            let refs: Vec<&Episode> = episodes.iter().collect();
            let batch = EpisodeBatch::new(&refs, &device)?;
            let logprobs = |model: &inference::llama::Llama| {
                in_chunks(&batch, config.minibatch_size, |input, targets| {
                    Ok(token_logprobs(&model.forward_train(input, 0.0)?, targets)?)
                })
            };
            let old_lp = logprobs(policy.llama())?;
            let ref_lp = logprobs(&reference.model)?;
            let old_values = in_chunks(&batch, config.minibatch_size, |input, _| critic.values(input, 0.0))?;

            // 3. Shaped rewards, GAE, whitening.
            let kl = kl_penalty(&old_lp, &ref_lp)?;
            let score_tensor = Tensor::new(shaped_scores.as_slice(), &device)?;
            let rewards = shaped_rewards(&score_tensor, &kl, &batch.mask, kl_controller.beta())?;
            let (advantages, returns) = gae(&rewards, &old_values, &batch.mask, PAPER_GAE_GAMMA, config.gae_lambda)?;
            let advantages = whiten(&advantages, &batch.mask)?;
            let kl_per_episode = batch.response_sums(&kl)?;

            // 4. Optimisation.
            let mut sums = Sums::default();
            let rows: Vec<usize> = (0..episodes.len()).collect();
            for _ in 0..config.inner_epochs {
                let mut shuffled = rows.clone();
                shuffled.shuffle(&mut rng);
                for minibatch in shuffled.chunks(config.minibatch_size) {
                    crate::stop::check()?;
                    let idx = Tensor::new(minibatch.iter().map(|&r| r as u32).collect::<Vec<_>>(), &device)?;
                    let pick = |t: &Tensor| -> TrainResult<Tensor> { Ok(t.index_select(&idx, 0)?) };
                    let (input, mb_targets, mask) = (pick(&batch.input)?, pick(&batch.targets)?, pick(&batch.mask)?);

                    let mut grads = Gradients::new();
                    let logits = policy.llama().forward_train(&input, 0.0)?;
                    let new_lp = token_logprobs(&logits, &mb_targets)?;
                    let (policy_loss, clip_fraction, approx_kl) =
                        ppo_policy_loss(&new_lp, &pick(&old_lp)?, &pick(&advantages)?, &mask, config.clip_ratio)?;
                    let step_entropy = masked_mean(&entropy(&logits.detach())?, &mask)?.to_scalar::<f32>()?;
                    grads.accumulate(&policy.backward(&policy_loss)?, &policy_vars, 1.0)?;
                    drop((logits, new_lp));

                    let mut ptx_loss = None;
                    if let Some(corpus) = corpus {
                        let windows = corpus.sample(&mut rng, config.ptx_per_episode.max(1) * minibatch.len());
                        let mut loss_sum = 0f64;
                        for micro in windows.chunks(config.ptx_micro_batch) {
                            let share = micro.len() as f64 / windows.len() as f64;
                            let nll = lm_loss(policy.llama(), micro, &device)?;
                            loss_sum += f64::from(nll.to_scalar::<f32>()?) * share;
                            grads.accumulate(&policy.backward(&nll)?, &policy_vars, config.ptx_coef * share)?;
                        }
                        ptx_loss = Some(loss_sum as f32);
                    }
                    match config.max_grad_norm {
                        Some(max) => grads.clip_global_norm(max)?,
                        None => grads.global_norm()?,
                    };
                    policy_adam.step(&grads, lr)?;
                    drop(grads);
                    if let (Some(decay), Some(ema)) = (config.ema_decay, ema.as_mut()) {
                        update_ema(ema, &policy, decay)?;
                    }

                    let values = critic.values(&input, 0.0)?;
                    let v_loss = value_loss(&values, &pick(&old_values)?, &pick(&returns)?, &mask, config.value_clip)?;
                    let mut value_grads = Gradients::new();
                    value_grads.accumulate(&critic.trunk().backward(&v_loss)?, &critic_vars, config.vf_coef)?;
                    if let Some(max) = config.max_grad_norm {
                        value_grads.clip_global_norm(max)?;
                    }
                    critic_adam.step(&value_grads, value_lr)?;

                    sums.add(
                        policy_loss.to_scalar::<f32>()?,
                        v_loss.to_scalar::<f32>()?,
                        ptx_loss,
                        clip_fraction,
                        approx_kl,
                        step_entropy,
                    );
                }
            }
            Ok((scores, batch, kl_per_episode, sums))
        })?;

        let n = episodes.len() as f32;
        let reward_mean = scores.iter().sum::<f32>() / n;
        let reward_std = (scores.iter().map(|s| (s - reward_mean).powi(2)).sum::<f32>() / n).sqrt();
        let record = PpoIteration {
            iteration,
            episodes: episodes.len(),
            reward_mean,
            reward_std,
            kl_coef: kl_controller.beta(),
            kl: kl_per_episode.iter().sum::<f32>() / n,
            entropy: sums.mean(sums.entropy),
            clip_fraction: sums.mean(sums.clip_fraction),
            approx_kl: sums.mean(sums.approx_kl),
            policy_loss: sums.mean(sums.policy_loss),
            value_loss: sums.mean(sums.value_loss),
            ptx_loss: sums.ptx_loss.map(|p| p / sums.steps.max(1) as f32),
            lr,
            response_tokens_mean: batch.response_tokens.iter().sum::<usize>() as f32 / n,
            stopped_fraction: episodes.iter().filter(|e| e.stopped).count() as f32 / n,
            rollout_secs,
            wall_secs: it_start.elapsed().as_secs_f64(),
        };
        tracing::info!(
            iteration,
            reward = record.reward_mean,
            kl = record.kl,
            entropy = record.entropy,
            clip_fraction = record.clip_fraction,
            value_loss = record.value_loss,
            ptx_loss = ?record.ptx_loss,
            lr,
            wall_secs = record.wall_secs,
            "PPO iteration done"
        );
        kl_controller.update(f64::from(record.kl), record.episodes);
        progress(&record);
        iterations.push(record);
    }
    drop(engine);

    let saved_ema = match ema {
        Some(weights) => {
            policy.restore_weights(&weights)?;
            true
        }
        None => false,
    };
    policy.save(out_dir)?;
    let report = PpoReport {
        iterations,
        policy_dir: inputs.policy_dir.to_path_buf(),
        reference_dir: inputs.reference_dir.to_path_buf(),
        reward_model_dir: inputs.reward_model_dir.to_path_buf(),
        train_prompts: inputs.prompts.len(),
        saved_ema,
        wall_secs: started.elapsed().as_secs_f64(),
        config,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| TrainError::Data(e.to_string()))?;
    write_file_atomic(&out_dir.join(REPORT_FILE), &json)?;
    tracing::info!(wall_secs = report.wall_secs, out = %out_dir.display(), "PPO done");
    Ok(report)
}

/// `f(input rows, target rows)` over the batch `chunk` rows at a time, detached and concatenated back to `[B, T]`:
/// the no-gradient scoring passes, bounded in memory.
fn in_chunks(
    batch: &EpisodeBatch,
    chunk: usize,
    f: impl Fn(&Tensor, &Tensor) -> TrainResult<Tensor>,
) -> TrainResult<Tensor> {
    let rows = batch.input.dim(0)?;
    let mut parts = Vec::new();
    for start in (0..rows).step_by(chunk.max(1)) {
        let len = chunk.max(1).min(rows - start);
        parts.push(f(&batch.input.narrow(0, start, len)?, &batch.targets.narrow(0, start, len)?)?.detach());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// `ema ← decay · ema + (1 - decay) · w` for every policy weight.
fn update_ema(ema: &mut HashMap<String, Tensor>, policy: &PolicyModel, decay: f64) -> TrainResult<()> {
    for (name, var) in policy.named_vars() {
        if let Some(avg) = ema.get_mut(&name) {
            *avg = ((&*avg * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?;
        }
    }
    Ok(())
}

/// Per-step statistics summed over an iteration.
#[derive(Default)]
struct Sums {
    steps: usize,
    policy_loss: f32,
    value_loss: f32,
    ptx_loss: Option<f32>,
    clip_fraction: f32,
    approx_kl: f32,
    entropy: f32,
}

impl Sums {
    fn add(&mut self, policy: f32, value: f32, ptx: Option<f32>, clip: f32, approx_kl: f32, entropy: f32) {
        self.steps += 1;
        self.policy_loss += policy;
        self.value_loss += value;
        if let Some(p) = ptx {
            *self.ptx_loss.get_or_insert(0.0) += p;
        }
        self.clip_fraction += clip;
        self.approx_kl += approx_kl;
        self.entropy += entropy;
    }

    fn mean(&self, sum: f32) -> f32 {
        sum / self.steps.max(1) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::CorpusConfig;
    use crate::policy_model::test_util::tiny_model;
    use candle_core::Device;

    /// A tiny policy, a reward model on its trunk (random head), a small corpus.
    fn setup(dir: &Path) -> (PathBuf, PathBuf, PretrainCorpus) {
        let policy = dir.join("policy");
        tiny_model(&policy, 11, true);
        let rm_dir = dir.join("rm");
        RewardModel::from_policy(&policy, &Device::Cpu, 3, 256).unwrap().save(&rm_dir).unwrap();
        let corpus_dir = dir.join("corpus");
        std::fs::create_dir_all(&corpus_dir).unwrap();
        std::fs::write(
            corpus_dir.join("text.txt"),
            "Now, fair Hippolyta, our nuptial hour draws on apace.\n".repeat(60),
        )
        .unwrap();
        let model = PolicyModel::load(&policy, &Device::Cpu).unwrap();
        let config = CorpusConfig { dir: corpus_dir, seq_len: 24, held_out_percent: 10, max_tokens: 1 << 20 };
        let corpus = PretrainCorpus::load(&config, model.tokenizer()).unwrap();
        (policy, rm_dir, corpus)
    }

    fn small(iterations: usize) -> PpoConfig {
        PpoConfig {
            iterations,
            episodes_per_iteration: 6,
            minibatch_size: 3,
            max_new_tokens: 6,
            learning_rate: 3e-3,
            value_learning_rate: 3e-3,
            warmup_iterations: 1,
            ..PpoConfig::default()
        }
    }

    #[test]
    fn ppo_ptx_runs_logs_every_iteration_and_saves_a_servable_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let (policy, rm, corpus) = setup(tmp.path());
        let prompts: Vec<String> = ["Say hi.", "Name a fruit.", "What is two plus two?"].map(String::from).to_vec();
        let out = tmp.path().join("out");
        let mut seen = Vec::new();
        let inputs = PpoInputs {
            policy_dir: &policy,
            reference_dir: &policy,
            reward_model_dir: &rm,
            prompts: &prompts,
            corpus: Some(&corpus),
        };
        let report = train(inputs, small(2), &out, &mut |it| seen.push(it.iteration)).unwrap();
        assert_eq!(seen, vec![1, 2]);
        let first = &report.iterations[0];
        // Policy and reference are the same weights before the first step: no KL yet.
        assert!(first.kl.abs() < 1e-3, "KL at the start {}", first.kl);
        assert!((first.lr - 3e-4).abs() < 1e-12, "warm-up starts at 1/10 of the peak: {}", first.lr);
        assert_eq!(report.iterations[1].lr, 3e-3);
        for it in &report.iterations {
            assert_eq!(it.episodes, 6);
            assert!(it.reward_mean.is_finite() && it.entropy > 0.0 && it.value_loss.is_finite());
            assert!(it.ptx_loss.is_some_and(|p| p > 0.0), "{it:?}");
            assert!((0.0..=1.0).contains(&it.clip_fraction));
        }
        assert!(report.iterations[1].kl.abs() > 1e-6, "the policy moved away from the reference");
        assert!(report.saved_ema && out.join(REPORT_FILE).is_file());
        // The saved policy loads for serving and differs from where it started.
        let saved = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        let start = LoadedModel::load(&policy, DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[3u32, 17, 40, 9]], &Device::Cpu).unwrap();
        let a = saved.model.forward_train(&ids, 0.0).unwrap();
        let b = start.model.forward_train(&ids, 0.0).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 1e-4, "weights unchanged ({diff})");
    }

    #[test]
    fn ppo_raises_the_reward_models_score() {
        let tmp = tempfile::tempdir().unwrap();
        let (policy, rm, _) = setup(tmp.path());
        let prompts: Vec<String> = (0..6).map(|i| format!("Question {i}: say something.")).collect();
        let config = PpoConfig { ptx_coef: 0.0, ema_decay: None, kl_coef: 0.0, learning_rate: 1e-2, ..small(20) };
        let out = tmp.path().join("out");
        let inputs = PpoInputs {
            policy_dir: &policy,
            reference_dir: &policy,
            reward_model_dir: &rm,
            prompts: &prompts,
            corpus: None,
        };
        let report = train(inputs, config, &out, &mut |_| {}).unwrap();
        let rewards: Vec<f32> = report.iterations.iter().map(|i| i.reward_mean).collect();
        let mean = |r: &[f32]| r.iter().sum::<f32>() / r.len() as f32;
        let (early, late) = (mean(&rewards[..4]), mean(&rewards[16..]));
        assert!(late > early + 0.02, "reward should rise under PPO: {rewards:?}");
    }
}
