//! Loss functions of the InstructGPT recipe (Ouyang et al. 2022, "Training language models to follow
//! instructions with human feedback"), written only with candle ops that have a backward pass.
//!
//! Shared building blocks live here; each training stage has its own file:
//! - [`sft`]: supervised fine-tuning, the next-token loss on demonstration tokens only.
//! - [`reward`]: the reward-model ranking loss (paper eq. 1).
//! - [`ppo`]: the PPO-ptx pieces (paper eq. 2): per-token KL penalty, shaped rewards, GAE, whitening, the clipped
//!   policy and value losses and the pre-training mix.
//!
//! # Log-softmax without the fused kernel
//!
//! candle's fused `softmax_last_dim` has no backward pass and detaches silently, so the log-probability of token
//! `k` is computed from primitives:
//!
//! ```text
//! log p_k = (x_k - m) - log Σ_j exp(x_j - m),        m = max_j x_j   (treated as a constant)
//! ```
//!
//! On the CPU in F32, [`token_logprobs`] runs the same formula as one fused kernel with its own backward
//! (`inference::llama::train_ops::token_logprobs`); the composition below is the reference and the path elsewhere.
//!
//! `m` is detached: the expression's derivative with respect to `m` is exactly `-1 + 1 = 0`, so detaching it
//! changes no gradient and only keeps ties in the max from splitting a (zero) gradient. Only the picked logit is
//! gathered, so no full `[B, T, V]` log-softmax tensor is materialised besides `exp(x - m)`.
//!
//! Entropy uses the same shift: `H = log S - Σ_j p_j (x_j - m)` with `S = Σ_j exp(x_j - m)`, `p_j = exp(x_j - m)/S`.
//!
//! # Masks
//!
//! Every `mask` is an `[B, T]` float tensor; a non-zero entry marks a position that counts. Masked means select
//! with `where_cond` (not a multiplication), so a NaN or infinity at a padded position cannot leak into the loss
//! value. An empty mask gives a zero loss that is still attached to the graph (its gradients are zero).
//!
//! All computations run in F32: inputs of another float dtype are converted (differentiably) first.

pub mod ppo;
pub mod reward;
pub mod sft;

use candle_core::{D, DType, Error, Result, Tensor};

pub use ppo::{
    PAPER_CLIP_RATIO, PAPER_GAE_GAMMA, PAPER_KL_BETA, PAPER_PTX_GAMMA, gae, kl_penalty, ppo_policy_loss, ppo_ptx_total,
    ppo_total, shaped_rewards, value_loss, whiten,
};
pub use reward::{
    RankingLossOptions, ranking_loss, ranking_loss_batch, ranking_loss_weighted, ranking_loss_with, ranking_pairs,
};
pub use sft::masked_nll;

/// Log-probabilities of the given tokens under `logits`: `log_softmax(logits)[.., token]`, through a numerically
/// stable differentiable log-softmax (`x - max - log(sum(exp(x - max)))`) and `gather`.
///
/// `logits` `[B, T, V]` (any float dtype), `tokens` `[B, T]` (any integer dtype; every id `< V`) -> `[B, T]` F32.
/// Alignment is the caller's: `tokens[b, t]` is scored by the distribution at `logits[b, t]` (for next-token
/// prediction pass the inputs shifted left by one).
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (tb, tt) = tokens.dims2()?;
    if (tb, tt) != (b, t) {
        return Err(Error::Msg(format!(
            "token_logprobs: tokens {:?} do not match logits {:?}",
            tokens.dims(),
            logits.dims()
        )));
    }
    let tokens = tokens.to_dtype(DType::U32)?;
    if let Some(&bad) = tokens.flatten_all()?.to_vec1::<u32>()?.iter().find(|&&id| id as usize >= v) {
        return Err(Error::Msg(format!("token_logprobs: token id {bad} out of range for vocabulary {v}")));
    }
    if inference::llama::train_ops::fused(logits) {
        let rows = inference::llama::train_ops::token_logprobs(&logits.reshape((b * t, v))?, &tokens.flatten_all()?)?;
        return rows.reshape((b, t));
    }
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&tokens.unsqueeze(2)?.contiguous()?, D::Minus1)?;
    (picked - log_sum)?.squeeze(2)
}

/// Per-token entropy `-Σ_v p_v log p_v` of the distributions given by `logits` `[B, T, V]` -> `[B, T]` F32.
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    logits.dims3()?;
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let probs = exp.broadcast_div(&sum)?;
    let expected_shifted = (probs * &shifted)?.sum_keepdim(D::Minus1)?;
    (sum.log()? - expected_shifted)?.squeeze(2)
}

/// Mean of `values` over the positions where `mask` is non-zero, as a scalar F32 tensor (differentiable wrt
/// `values`). Zero, still attached to the graph, when the mask is empty.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let values = values.to_dtype(DType::F32)?;
    let keep = mask_bool(mask, values.dims(), "masked_mean")?;
    let count = keep.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    let kept = keep.where_cond(&values, &values.zeros_like()?)?;
    kept.sum_all()? / f64::from(count.max(1.0))
}

/// Host-side masked mean of a plain (detached) tensor, for statistics; 0 when the mask is empty.
pub(crate) fn masked_mean_f32(values: &Tensor, mask: &Tensor) -> Result<f32> {
    masked_mean(&values.detach(), mask)?.to_scalar::<f32>()
}

/// `mask != 0` as a U8 tensor, after checking that the mask has the expected shape.
pub(crate) fn mask_bool(mask: &Tensor, dims: &[usize], what: &str) -> Result<Tensor> {
    if mask.dims() != dims {
        return Err(Error::Msg(format!("{what}: mask {:?} does not match values {dims:?}", mask.dims())));
    }
    mask.detach().to_dtype(DType::F32)?.ne(0.0)
}

/// Errors unless every tensor has the shape `dims`.
pub(crate) fn check_same_shape(what: &str, dims: &[usize], tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if t.dims() != dims {
            return Err(Error::Msg(format!("{what}: {name} {:?} does not match {dims:?}", t.dims())));
        }
    }
    Ok(())
}

/// A `[B, T]` tensor as F32 host rows (detached copy): `(B, T, row-major values)`.
pub(crate) fn host_2d(t: &Tensor) -> Result<(usize, usize, Vec<f32>)> {
    let (b, n) = t.dims2()?;
    Ok((b, n, t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    pub fn t1(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    pub fn t2(rows: &[&[f32]]) -> Tensor {
        let b = rows.len();
        let t = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap()
    }

    pub fn v1(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    pub fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "index {i}: got {g}, want {w} (got {got:?}, want {want:?})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use candle_core::{Device, Var};

    fn softmax_host(row: &[f32]) -> Vec<f32> {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = row.iter().map(|x| f64::from(x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| (x / s) as f32).collect()
    }

    /// Reference log-softmax in f64 (an f32 softmax underflows to a subnormal for the large-logit row).
    fn log_softmax_host(row: &[f32]) -> Vec<f32> {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = row.iter().map(|x| f64::from(x - m).exp()).sum();
        row.iter().map(|x| (f64::from(x - m) - s.ln()) as f32).collect()
    }

    fn sample_logits() -> (Vec<f32>, Tensor) {
        // B = 2, T = 2, V = 3; the last row has a large logit to exercise the max shift.
        let raw = vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 0.2, 0.2, 0.2, 100.0, 0.0, -5.0];
        let t = Tensor::from_vec(raw.clone(), (2, 2, 3), &Device::Cpu).unwrap();
        (raw, t)
    }

    #[test]
    fn token_logprobs_equals_log_of_independent_softmax() {
        let (raw, logits) = sample_logits();
        let tokens = Tensor::new(&[[1u32, 2], [0, 1]], &Device::Cpu).unwrap();
        let got = v1(&token_logprobs(&logits, &tokens).unwrap());
        let picks = [1, 2, 0, 1];
        let want: Vec<f32> = (0..4).map(|i| log_softmax_host(&raw[i * 3..i * 3 + 3])[picks[i]]).collect();
        assert_close(&got, &want, 1e-5);
        // The large-logit row: log p(1) = -100 - log(1 + e^-100 + e^-105) ≈ -100, no overflow.
        assert!((got[3] + 100.0).abs() < 1e-4);
    }

    #[test]
    fn token_logprobs_accepts_i64_tokens_and_rejects_out_of_range() {
        let (_, logits) = sample_logits();
        let i64_tokens = Tensor::new(&[[1i64, 2], [0, 1]], &Device::Cpu).unwrap();
        let u32_tokens = Tensor::new(&[[1u32, 2], [0, 1]], &Device::Cpu).unwrap();
        assert_close(
            &v1(&token_logprobs(&logits, &i64_tokens).unwrap()),
            &v1(&token_logprobs(&logits, &u32_tokens).unwrap()),
            0.0,
        );
        let bad = Tensor::new(&[[1u32, 3], [0, 1]], &Device::Cpu).unwrap();
        assert!(token_logprobs(&logits, &bad).is_err());
        let wrong_shape = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        assert!(token_logprobs(&logits, &wrong_shape).is_err());
    }

    #[test]
    fn token_logprobs_gradient_is_onehot_minus_softmax() {
        let (raw, logits) = sample_logits();
        let var = Var::from_tensor(&logits).unwrap();
        let tokens = Tensor::new(&[[1u32, 2], [0, 1]], &Device::Cpu).unwrap();
        let grads = token_logprobs(var.as_tensor(), &tokens).unwrap().sum_all().unwrap().backward().unwrap();
        let got = v1(grads.get(var.as_tensor()).unwrap());
        let picks = [1, 2, 0, 1];
        let mut want = Vec::new();
        for (i, &pick) in picks.iter().enumerate() {
            let p = softmax_host(&raw[i * 3..i * 3 + 3]);
            want.extend((0..3).map(|j| f32::from(j == pick) - p[j]));
        }
        assert_close(&got, &want, 1e-5);
        assert!(got.iter().any(|g| g.abs() > 0.1));
    }

    #[test]
    fn entropy_matches_host_and_has_gradient() {
        let (raw, logits) = sample_logits();
        let got = v1(&entropy(&logits).unwrap());
        let want: Vec<f32> = (0..4)
            .map(|i| {
                -softmax_host(&raw[i * 3..i * 3 + 3])
                    .iter()
                    .map(|p| if *p > 0.0 { p * p.ln() } else { 0.0 })
                    .sum::<f32>()
            })
            .collect();
        assert_close(&got, &want, 1e-5);
        // Uniform row (0.2, 0.2, 0.2): entropy ln 3.
        assert!((got[2] - 3f32.ln()).abs() < 1e-6);

        let var = Var::from_tensor(&logits).unwrap();
        let grads = entropy(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g = v1(grads.get(var.as_tensor()).unwrap());
        // dH/dx_j = -p_j (log p_j + H): non-zero on the non-uniform first row.
        let p = softmax_host(&raw[0..3]);
        let want_g: Vec<f32> = p.iter().map(|pj| -pj * (pj.ln() + want[0])).collect();
        assert_close(&g[0..3], &want_g, 1e-5);
        assert!(g[0..3].iter().any(|x| x.abs() > 1e-3));
    }

    #[test]
    fn masked_mean_ignores_nan_at_masked_positions_and_handles_empty_mask() {
        let x = t2(&[&[1.0, f32::NAN, 3.0], &[5.0, 7.0, f32::INFINITY]]);
        let mask = t2(&[&[1.0, 0.0, 1.0], &[0.0, 1.0, 0.0]]);
        assert!((scalar(&masked_mean(&x, &mask).unwrap()) - 11.0 / 3.0).abs() < 1e-6);
        let empty = t2(&[&[0.0, 0.0, 0.0], &[0.0, 0.0, 0.0]]);
        assert_eq!(scalar(&masked_mean(&x, &empty).unwrap()), 0.0);
        assert!(masked_mean(&x, &t1(&[1.0, 1.0])).is_err());
    }
}
