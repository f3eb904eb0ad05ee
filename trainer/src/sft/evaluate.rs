//! Measuring an SFT model: the token-mean loss on demonstrations, without dropout.

use crate::policy_model::{ChatTokens, PolicyModel, TrainError, TrainResult};
use crate::snapshot::SftExample;

use super::batch::{Collated, EncodeStats, encode_example};

/// Token-mean SFT loss of `examples` (prompt, response) under `model`, without dropout: the validation measure,
/// usable on any model (e.g. a candidate against held-out demonstrations).
pub fn validation_loss(model: &PolicyModel, examples: &[SftExample], batch_size: usize) -> TrainResult<f32> {
    let max_len = model.llama().max_positions();
    let mut stats = EncodeStats::default();
    let encoded: Vec<ChatTokens> = examples
        .iter()
        .filter_map(|e| encode_example(model, e, max_len, &mut stats).transpose())
        .collect::<TrainResult<_>>()?;
    if encoded.is_empty() {
        return Err(TrainError::Data("no demonstrations to measure".into()));
    }
    mean_loss(model, &encoded, batch_size.max(1))
}

pub(super) fn mean_loss(model: &PolicyModel, set: &[ChatTokens], batch_size: usize) -> TrainResult<f32> {
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in set.chunks(batch_size) {
        let refs: Vec<&ChatTokens> = chunk.iter().collect();
        let collated = Collated::new(&refs, model.device())?;
        let loss = collated.loss(model.llama(), 0.0)?.detach().to_scalar::<f32>()?;
        sum += f64::from(loss) * collated.tokens as f64;
        tokens += collated.tokens;
    }
    Ok((sum / tokens.max(1) as f64) as f32)
}
