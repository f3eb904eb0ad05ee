//! Step 1 of a PPO iteration: the prompts it samples from (the training prompts in a seeded shuffle, reshuffled
//! whenever they run out) and the rollouts themselves, through the serving engine at the policy's current weights.

use inference::engine::Engine;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::episodes::{Episode, SampleSettings, sample};
use crate::policy_model::{TrainError, TrainResult};

use super::PpoConfig;

/// The training prompts in a shuffled order, taken in turn and reshuffled whenever they run out.
pub struct PromptCycle<'a> {
    prompts: &'a [String],
    order: Vec<usize>,
    cursor: usize,
}

impl<'a> PromptCycle<'a> {
    pub fn new(prompts: &'a [String], rng: &mut StdRng) -> Self {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.shuffle(rng);
        Self { prompts, order, cursor: 0 }
    }

    /// The next `n` prompts.
    pub fn take(&mut self, n: usize, rng: &mut StdRng) -> Vec<String> {
        (0..n)
            .map(|_| {
                if self.cursor == self.order.len() {
                    self.order.shuffle(rng);
                    self.cursor = 0;
                }
                self.cursor += 1;
                self.prompts[self.order[self.cursor - 1]].clone()
            })
            .collect()
    }
}

/// Samples one response per prompt (temperature and length from `config`, seeded per iteration). Prompts too long
/// to sample from are left out; none left is an error.
pub fn rollout(engine: &Engine, prompts: &[String], config: &PpoConfig, iteration: usize) -> TrainResult<Vec<Episode>> {
    let settings = SampleSettings {
        max_new_tokens: config.max_new_tokens,
        temperature: config.temperature,
        seed: config.seed.wrapping_mul(1_000_003).wrapping_add(iteration as u64 * 65_537),
        max_prompt_tokens: config.max_prompt_tokens,
    };
    let episodes = sample(engine, prompts, settings)?;
    if episodes.is_empty() {
        return Err(TrainError::Data(format!(
            "no prompt fits in max_prompt_tokens = {} to sample from",
            config.max_prompt_tokens
        )));
    }
    Ok(episodes)
}
