//! The SFT model's input: demonstrations tokenised through the chat template, and the right-padded micro-batch
//! whose forward gives the token-mean NLL of the response and EOS tokens.

use candle_core::{Device, Tensor};
use feedback::split::Split;
use inference::llama::Llama;

use crate::losses::masked_nll;
use crate::policy_model::{ChatTokens, PolicyModel, TrainResult, encode_chat};
use crate::snapshot::SftExample;

#[derive(Debug, Default)]
pub(super) struct EncodeStats {
    pub(super) truncated: usize,
    pub(super) skipped: usize,
}

pub(super) fn encode_split(
    model: &PolicyModel,
    examples: &[SftExample],
    split: Split,
    max_len: usize,
    stats: &mut EncodeStats,
) -> TrainResult<Vec<ChatTokens>> {
    examples
        .iter()
        .filter(|e| e.split == split)
        .filter_map(|e| encode_example(model, e, max_len, stats).transpose())
        .collect()
}

/// The example's tokens, cut to `max_len` (losing the end of the response), or `None` when the prompt alone
/// leaves no room for a response token.
pub(super) fn encode_example(
    model: &PolicyModel,
    example: &SftExample,
    max_len: usize,
    stats: &mut EncodeStats,
) -> TrainResult<Option<ChatTokens>> {
    let mut tokens = encode_chat(model.tokenizer(), &example.prompt, &example.response, true)?;
    if tokens.prompt_len == 0 || tokens.prompt_len >= max_len {
        stats.skipped += 1;
        return Ok(None);
    }
    if tokens.ids.len() > max_len {
        tokens.ids.truncate(max_len);
        stats.truncated += 1;
    }
    Ok(Some(tokens))
}

/// Tokens that carry loss: every token after the prompt (response and EOS).
pub(super) fn loss_tokens(t: &ChatTokens) -> usize {
    t.ids.len() - t.prompt_len
}

/// A right-padded micro-batch with the flat positions that carry loss and their targets.
pub(super) struct Collated {
    /// `[B, T]` inputs: each sequence without its last token.
    pub(super) input: Tensor,
    /// `[N]` indices into the flattened `[B·T]` positions whose next token is a response token.
    pub(super) positions: Tensor,
    /// `[1, N]` the token each of those positions must predict.
    pub(super) targets: Tensor,
    pub(super) tokens: usize,
}

impl Collated {
    pub(super) fn new(examples: &[&ChatTokens], device: &Device) -> TrainResult<Self> {
        let t = examples.iter().map(|e| e.ids.len() - 1).max().unwrap_or(0);
        let mut input = Vec::with_capacity(examples.len() * t);
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (b, e) in examples.iter().enumerate() {
            let n = e.ids.len() - 1;
            input.extend_from_slice(&e.ids[..n]);
            input.extend(std::iter::repeat_n(0u32, t - n));
            for pos in e.prompt_len - 1..n {
                positions.push((b * t + pos) as u32);
                targets.push(e.ids[pos + 1]);
            }
        }
        let tokens = targets.len();
        Ok(Self {
            input: Tensor::from_vec(input, (examples.len(), t), device)?,
            positions: Tensor::from_vec(positions, tokens, device)?,
            targets: Tensor::from_vec(targets, (1, tokens), device)?,
            tokens,
        })
    }

    /// Token-mean NLL of the loss-bearing positions, differentiable wrt every weight.
    pub(super) fn loss(&self, model: &Llama, residual_dropout: f32) -> TrainResult<Tensor> {
        let hidden = model.hidden_states(&self.input, residual_dropout)?;
        let (b, t, h) = hidden.dims3()?;
        let picked = hidden.reshape((b * t, h))?.index_select(&self.positions, 0)?;
        let logits = model.lm_head(&picked)?.unsqueeze(0)?;
        let mask = Tensor::ones((1, self.tokens), candle_core::DType::F32, logits.device())?;
        Ok(masked_nll(&logits, &self.targets, &mask)?)
    }
}
