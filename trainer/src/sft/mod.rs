//! Supervised fine-tuning (paper section 3.5, "SFT"): the policy learns the labelers' demonstrations.
//!
//! Each [`SftExample`] becomes `chat_template(user: prompt, generation prompt) ++ response ++ EOS` (see
//! [`encode_chat`]); the loss is the next-token negative log-likelihood of the response and EOS tokens only
//! ([`masked_nll`], token mean over the whole batch). Only the positions that carry loss go through the
//! vocabulary projection, so prompt and padding positions cost no `[T, V]` logits. Batches are right-padded; the
//! causal mask keeps real tokens from seeing the padding and padded positions carry no loss.
//!
//! Optimisation follows the paper: Adam β = (0.9, 0.95), cosine decay of the learning rate to 10% of the peak over
//! the whole run, residual dropout ([`PAPER_RESIDUAL_DROPOUT`] = 0.2 in the paper; the default here is 0 so short
//! runs and tests are deterministic), several epochs ([`PAPER_SFT_EPOCHS`] = 16). After every epoch the
//! validation-split loss is measured; the saved model is the epoch with the lowest validation loss, or, when the
//! caller passes an [`EpochSelector`] (the paper picks by reward-model score on validation prompts, since the SFT
//! model overfits in validation loss after one epoch while RM score keeps improving), the epoch it scores highest.
//!
//! CPU-sized defaults ([`SftConfig::default`]): 4 epochs, peak LR 5e-5, 8 examples per step. 5e-5 suits full
//! fine-tuning of SmolLM2-135M on a few hundred demonstrations; the tiny random test models use 1e-2.
//!
//! Layout: `config` (the serde config), `batch` (tokenised demonstrations and the micro-batch whose forward is the
//! loss), `train` (the run in small steps and [`train_step`], on the shared [`crate::step`] machinery),
//! `evaluate` (validation loss).

mod batch;
mod config;
mod evaluate;
#[cfg(test)]
mod tests;
mod train;

pub use config::{PAPER_RESIDUAL_DROPOUT, PAPER_SFT_EPOCHS, SftConfig};
pub use evaluate::validation_loss;
pub use train::{EpochSelector, Selection, SftEpoch, SftReport, StepOutcome, train, train_step, train_with_selector};

/// The training report written next to the model.
pub const REPORT_FILE: &str = "sft.json";
