//! PPO-ptx (paper section 3.5, "Reinforcement learning"): the policy is tuned against the reward model in a
//! bandit environment (a prompt, one sampled response, the RM's score, episode over), with a per-token KL penalty
//! against the SFT policy and the pre-training loss mixed in.
//!
//! Each iteration ([`train`]), in named steps that tests and benchmarks can call one by one:
//! 1. **Rollouts** ([`rollout`]) through the serving engine ([`crate::episodes`]), at temperature 1, from the
//!    policy's current weights (the engine reads the trainable variables in place).
//! 2. **Scoring** without gradients: the RM's reward of each (prompt, response) ([`rewards`], optionally
//!    normalised by [`RewardNormaliser`]); log-probabilities of the sampled tokens under the policy ("old") and
//!    the SFT reference and the value function's estimates at every response position ([`score`]). The value
//!    function is a second copy of the reward model, read at every position
//!    ([`RewardModel::values`](crate::reward_model::RewardModel::values)): the paper initialises it from the RM.
//! 3. **Advantages** ([`advantages`]): shaped rewards `-β (log π_old - log π_SFT)` per token plus the RM score on
//!    the last one, GAE with no discount (λ configurable), whitened over the iteration's episodes
//!    ([`crate::losses`]).
//! 4. **One inner epoch** over shuffled minibatches ([`Minibatch`]), one [`ppo_step`] each: the clipped policy
//!    loss, then the pre-training NLL on `ptx_per_episode` corpus windows per episode weighted by γ (computed in
//!    turn, gradients accumulated, one Adam step: [`policy_update`]), the clipped value loss with its own Adam
//!    ([`value_update`]), and an EMA update of the policy weights ([`Ema`]).
//!
//! The learning rate warms up over the first iterations from 1/10 of the peak, then stays constant. The saved
//! policy is the EMA of the weights when `ema_decay` is set. Every iteration logs reward, KL, entropy, clip
//! fraction, value loss and ptx loss (tracing and the report, `ppo.json`).
//!
//! Paper values ([`PpoConfig::paper`]): 512 episodes per iteration, minibatch 64, β = 0.02, γ = 27.8 with 8
//! pre-training examples per episode, clip 0.2, warm-up 10 iterations, EMA 0.992. The defaults are CPU-sized:
//! 16 episodes, minibatch 8, γ = 1 with one window per episode, EMA 0.9 (few steps run, and a 0.992 average
//! would hardly leave the starting weights).
//!
//! Layout: `config` (the serde config), `rollout` (step 1), `experience` (steps 2 and 3), `update` (step 4, on the
//! shared [`crate::step`] machinery), `train` (the iteration loop, the models it loads, its report).

mod config;
mod experience;
mod rollout;
#[cfg(test)]
mod tests;
mod train;
mod update;

pub use config::PpoConfig;
pub use experience::{Advantages, Experience, RewardNormaliser, advantages, rewards, score};
pub use rollout::{PromptCycle, rollout};
pub use train::{PpoInputs, PpoIteration, PpoModels, PpoReport, train};
pub use update::{Ema, Learners, Minibatch, PolicyOutcome, ValueOutcome, policy_update, ppo_step, value_update};

/// The training report written next to the policy.
pub const REPORT_FILE: &str = "ppo.json";
