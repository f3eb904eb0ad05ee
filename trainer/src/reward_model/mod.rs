//! The reward model (paper section 3.5, "Reward modeling"): the SFT model with its unembedding replaced by a
//! scalar head, trained on labelers' rankings.
//!
//! - Input: the prompt through the chat template, the response, then EOS (see
//!   [`encode_chat`](crate::policy_model::encode_chat)); the reward is `head(hidden state at the last token)`, the
//!   final-norm hidden state of the EOS token, which attends to the whole prompt and response. Sequences longer
//!   than `max_seq_len` keep their last `max_seq_len` tokens (the response and EOS matter most).
//! - Loss ([`ranking_loss_batch`]): each prompt's K completions are forwarded once, in one batch, and all its
//!   C(K,2) comparisons (ties dropped) form one batch element; a step averages over prompts. Optionally
//!   (`margin_per_rank`, off as in the paper) pairs ranked far apart must win by a rank-gap margin.
//! - One epoch by default (the paper: more overfit), Adam β = (0.9, 0.95), cosine decay to 10% of the peak
//!   (paper peak: 9e-6 at 6B; here 1e-5 for SmolLM2-135M, and 2e-3 for the tiny random test models).
//! - Afterwards the head's bias is shifted so the labelers' demonstrations (training split) score 0 on average.
//!
//! On disk an RM is a model directory: the trunk as `model.safetensors` (HF names; an untied `lm_head.weight` is
//! kept, unused, so the directory still loads as a causal LM), `config.json` and the tokenizer files, plus
//! `reward_head.safetensors` (`score.weight` `[1, hidden]`, `score.bias` `[1]`) and `rm.json` ([`RmMeta`]).
//!
//! Layout: `config` (the serde config), `model` ([`RewardModel`]: trunk and head, its forward, scoring, save and
//! load), `ranking` (the training data and the frozen layers' activation cache), `train` (the run in small steps
//! and [`train_step`], on the shared [`crate::step`] machinery), `evaluate` (pair accuracy and loss).

mod config;
mod evaluate;
mod model;
mod ranking;
#[cfg(test)]
mod tests;
mod train;

pub use config::{PAPER_RM_EPOCHS, PAPER_RM_LR, RmConfig};
pub use evaluate::RankEval;
pub use model::{HEAD_FILE, META_FILE, RewardModel, RmMeta};
pub use ranking::{ActivationCache, Ranking};
pub use train::{RmEpoch, RmReport, RmStepOutcome, train, train_step};

/// The training report written next to the model.
pub const REPORT_FILE: &str = "rm_report.json";
