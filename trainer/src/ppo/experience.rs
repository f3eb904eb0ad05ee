//! Steps 2 and 3 of a PPO iteration, without gradients: the reward model's scores of the rollouts (optionally
//! normalised), the sampled tokens' log-probabilities under the policy ("old") and the SFT reference, the value
//! function's estimates ([`score`]); then the KL-shaped rewards, GAE and whitened advantages ([`advantages`]).

use candle_core::Tensor;
use inference::llama::Llama;

use crate::episodes::{Episode, EpisodeBatch, prompt_response_pairs};
use crate::kl_controller::RunningMoments;
use crate::losses::{PAPER_GAE_GAMMA, gae, kl_penalty, shaped_rewards, token_logprobs, whiten};
use crate::policy_model::TrainResult;
use crate::reward_model::RewardModel;

/// What the no-gradient passes measured on an iteration's episodes; every tensor is `[B, T]` over
/// [`EpisodeBatch`]'s positions.
pub struct Experience {
    pub batch: EpisodeBatch,
    /// Log-probabilities of the sampled tokens under the policy that sampled them.
    pub old_logprobs: Tensor,
    /// ... and under the SFT reference.
    pub ref_logprobs: Tensor,
    /// The value function's estimate before each token.
    pub old_values: Tensor,
}

/// The advantage of every response token and the value function's target.
pub struct Advantages {
    /// Per-token `log π_old - log π_SFT`.
    pub kl: Tensor,
    /// GAE, whitened over the iteration's episodes.
    pub advantages: Tensor,
    pub returns: Tensor,
}

/// The reward model's score of each episode's (prompt, response).
pub fn rewards(scorer: &RewardModel, prompts: &[String], episodes: &[Episode]) -> TrainResult<Vec<f32>> {
    scorer.score(&prompt_response_pairs(prompts, episodes))
}

/// Rewards normalised to mean 0 and variance 1 over the first iteration's rollouts (the starting policy's
/// samples, as Ziegler et al. 2019 did), fixed for the run ([`super::PpoConfig::normalize_rewards`]).
#[derive(Default)]
pub struct RewardNormaliser {
    moments: RunningMoments,
}

impl RewardNormaliser {
    /// Normalises `scores`; on the first iteration it first measures them and moves the value head (a copy of the
    /// RM) to the same scale, or its estimates would fight the normalised returns from the first step.
    pub fn normalise(&mut self, scores: &[f32], critic: &RewardModel, first_iteration: bool) -> TrainResult<Vec<f32>> {
        if first_iteration {
            self.moments.update(scores);
            let std = self.moments.std().max(1e-6);
            critic.rescale_head(1.0 / std, -self.moments.mean / std)?;
        }
        Ok(self.moments.normalise(scores))
    }
}

/// The old and reference log-probabilities and the values of `episodes`, `chunk` episodes per forward.
pub fn score(
    policy: &Llama,
    reference: &Llama,
    critic: &RewardModel,
    episodes: &[Episode],
    chunk: usize,
) -> TrainResult<Experience> {
    let refs: Vec<&Episode> = episodes.iter().collect();
    let batch = EpisodeBatch::new(&refs, critic.trunk().device())?;
    let logprobs = |model: &Llama| {
        in_chunks(&batch, chunk, |input, targets| Ok(token_logprobs(&model.forward_train(input, 0.0)?, targets)?))
    };
    let old_logprobs = logprobs(policy)?;
    let ref_logprobs = logprobs(reference)?;
    let old_values = in_chunks(&batch, chunk, |input, _| critic.values(input, 0.0))?;
    Ok(Experience { batch, old_logprobs, ref_logprobs, old_values })
}

/// Shaped rewards `-β (log π_old - log π_SFT)` per token plus `rewards` (one per episode) on the last one, GAE
/// with no discount and `λ = gae_lambda`, whitened over the episodes.
pub fn advantages(experience: &Experience, rewards: &[f32], beta: f64, gae_lambda: f32) -> TrainResult<Advantages> {
    let mask = &experience.batch.mask;
    let kl = kl_penalty(&experience.old_logprobs, &experience.ref_logprobs)?;
    let scores = Tensor::new(rewards, mask.device())?;
    let shaped = shaped_rewards(&scores, &kl, mask, beta)?;
    let (advantages, returns) = gae(&shaped, &experience.old_values, mask, PAPER_GAE_GAMMA, gae_lambda)?;
    let advantages = whiten(&advantages, mask)?;
    Ok(Advantages { kl, advantages, returns })
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
