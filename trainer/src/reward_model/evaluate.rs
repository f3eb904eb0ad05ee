//! Measuring a reward model: ranking loss and pair accuracy on a set of rankings, without dropout.

use serde::{Deserialize, Serialize};

use crate::losses::{RankingLossOptions, ranking_loss_with};
use crate::policy_model::TrainResult;

use super::{Ranking, RewardModel, RmConfig};

/// Ranking quality on a set of prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankEval {
    pub prompts: usize,
    pub pairs: usize,
    /// Mean over prompts of the per-prompt ranking loss, with the configured `margin_per_rank` (the objective
    /// training minimises, so the kept epoch is the one best at it; not comparable across margins).
    pub loss: f32,
    /// Fraction of pairs the RM orders like the labeler (strictly).
    pub accuracy: f32,
}

/// Pair accuracy and mean per-prompt (unweighted) ranking loss of `rm` on `set`, without dropout.
pub(super) fn evaluate(rm: &RewardModel, set: &[Ranking], config: &RmConfig) -> TrainResult<RankEval> {
    let (mut loss_sum, mut correct, mut pairs) = (0f64, 0f64, 0usize);
    for chunk in set.chunks(config.micro_batch_prompts) {
        let chunk: Vec<&Ranking> = chunk.iter().collect();
        let ranks: Vec<&[usize]> = chunk.iter().map(|r| r.ranks.as_slice()).collect();
        let rewards = crate::compute_pool::run(|| Ranking::rewards_of(rm, &chunk, 0.0))?.detach();
        let options = RankingLossOptions { prompt_weights: None, margin_per_rank: config.margin_per_rank };
        let (loss, accuracy) = ranking_loss_with(&rewards, &ranks, options)?;
        let chunk_pairs: usize = chunk.iter().map(|r| r.pairs).sum();
        loss_sum += f64::from(loss.to_scalar::<f32>()?) * chunk.len() as f64;
        correct += f64::from(accuracy) * chunk_pairs as f64;
        pairs += chunk_pairs;
    }
    Ok(RankEval {
        prompts: set.len(),
        pairs,
        loss: (loss_sum / set.len().max(1) as f64) as f32,
        accuracy: (correct / pairs.max(1) as f64) as f32,
    })
}
