//! The reward model's training data: one prompt's tokenised completions with the labeler's ranks, and the frozen
//! layers' cached output for them.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::losses::ranking_pairs;
use crate::policy_model::TrainResult;

use super::RewardModel;

/// One prompt's completions, tokenised, with the labeler's ranks (0 = best; equal ranks are ties), and once
/// cached, the frozen layers' output for each completion.
#[derive(Debug, Clone)]
pub struct Ranking {
    pub(super) sequences: Vec<Vec<u32>>,
    pub(super) ranks: Vec<usize>,
    pub(super) pairs: usize,
    /// Weight in the loss (labeler quality control; 1 normally).
    pub(super) weight: f32,
    pub(super) activations: Option<Vec<Vec<f32>>>,
}

impl Ranking {
    /// `None` when the counts differ or no pair is ordered (nothing to learn from).
    pub fn new(sequences: Vec<Vec<u32>>, ranks: Vec<usize>) -> Option<Self> {
        let pairs = ranking_pairs(&ranks).len();
        (sequences.len() == ranks.len() && pairs > 0).then_some(Self {
            sequences,
            ranks,
            pairs,
            weight: 1.0,
            activations: None,
        })
    }

    /// The same ranking weighted `weight` in the loss (a labeler's quality weight, as the snapshot gives it).
    pub fn with_weight(mut self, weight: f32) -> Self {
        self.weight = weight;
        self
    }

    /// Rewards of this ranking's completions for a batch: from cached activations when present.
    pub(super) fn rewards_of(rm: &RewardModel, micro: &[&Ranking], residual_dropout: f32) -> TrainResult<Tensor> {
        match micro.iter().map(|r| r.activations.as_ref()).collect::<Option<Vec<_>>>() {
            Some(cached) => {
                let rows: Vec<&[f32]> = cached.iter().flat_map(|c| c.iter().map(Vec::as_slice)).collect();
                rm.rewards_from_activations(&rows, residual_dropout)
            }
            None => {
                let sequences: Vec<&[u32]> = micro.iter().flat_map(|r| r.sequences.iter().map(Vec::as_slice)).collect();
                rm.rewards(&sequences, residual_dropout)
            }
        }
    }

    /// Ordered (untied) pairs.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// Tokens over all completions.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }
}

/// The frozen layers' output kept across epochs ([`RmConfig::cache_frozen_activations`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActivationCache {
    pub bytes: usize,
    /// Time to compute it (the frozen layers' one forward over every completion).
    pub wall_secs: f64,
}

/// Computes and attaches the frozen layers' output to every ranking of `set`; returns the floats kept (0 when
/// no layer is frozen).
pub(super) fn cache_activations(rm: &RewardModel, set: &mut [Ranking], batch: usize) -> TrainResult<usize> {
    let sequences: Vec<&[u32]> = set.iter().flat_map(|r| r.sequences.iter().map(Vec::as_slice)).collect();
    let Some(activations) = rm.frozen_activations(&sequences, batch)? else {
        return Ok(0);
    };
    let floats = activations.iter().map(Vec::len).sum();
    let mut activations = activations.into_iter();
    for ranking in set.iter_mut() {
        ranking.activations = Some(activations.by_ref().take(ranking.sequences.len()).collect());
    }
    Ok(floats)
}
