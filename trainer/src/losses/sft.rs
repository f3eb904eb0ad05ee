//! Supervised fine-tuning loss (paper section 3.5, "SFT"): next-token negative log-likelihood on the
//! demonstration (response) tokens only; prompt and padding tokens carry no loss.
//!
//! ```text
//! L_SFT = -1/N Σ_{(b,t): mask[b,t] ≠ 0} log π(targets[b,t] | logits[b,t]),   N = number of masked-in tokens
//! ```
//!
//! The mean is over tokens of the whole batch (not per sequence), so a long demonstration weighs in proportion to
//! its length. The same function is the pre-training (ptx) term of PPO-ptx: there the mask covers all real tokens.

use candle_core::{Result, Tensor};

use super::{masked_mean, token_logprobs};

/// SFT loss: mean negative log-likelihood of `targets` `[B, T]` under `logits` `[B, T, V]` over the positions
/// where `mask` `[B, T]` is non-zero (1.0 on response tokens). `targets[b, t]` is the token the distribution at
/// position `t` must predict (the input ids shifted left by one). Scalar F32, differentiable wrt `logits`.
pub fn masked_nll(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    masked_mean(&token_logprobs(logits, targets)?, mask)?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::*;
    use candle_core::{Device, Var};

    fn logits() -> Tensor {
        // B = 1, T = 3, V = 2.
        Tensor::new(&[[[0.0f32, 0.0], [2.0, 0.0], [0.0, 1.0]]], &Device::Cpu).unwrap()
    }

    #[test]
    fn masked_nll_ignores_masked_tokens() {
        let targets = Tensor::new(&[[1u32, 0, 0]], &Device::Cpu).unwrap();
        let mask = t2(&[&[0.0, 1.0, 1.0]]);
        let got = scalar(&masked_nll(&logits(), &targets, &mask).unwrap());
        // Position 0 (masked out) would add ln 2. Position 1: -log σ(2) = ln(1 + e^-2);
        // position 2: -log(e^0 / (e^0 + e^1)) = ln(1 + e).
        let want = ((1.0 + (-2.0f32).exp()).ln() + (1.0 + 1f32.exp()).ln()) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");

        // Changing the target at the masked-out position changes nothing.
        let other = Tensor::new(&[[0u32, 0, 0]], &Device::Cpu).unwrap();
        assert_eq!(got, scalar(&masked_nll(&logits(), &other, &mask).unwrap()));
    }

    #[test]
    fn masked_nll_gradient_only_on_masked_in_positions() {
        let var = Var::from_tensor(&logits()).unwrap();
        let targets = Tensor::new(&[[1u32, 0, 0]], &Device::Cpu).unwrap();
        let mask = t2(&[&[0.0, 1.0, 1.0]]);
        let grads = masked_nll(var.as_tensor(), &targets, &mask).unwrap().backward().unwrap();
        let g = v1(grads.get(var.as_tensor()).unwrap());
        assert_eq!(&g[0..2], &[0.0, 0.0]);
        // d(-log p_k)/dx_j = (p_j - 1[j=k]) / N with N = 2.
        let s2 = 1.0 / (1.0 + (-2.0f32).exp());
        let s1 = 1.0 / (1.0 + (-1.0f32).exp());
        assert_close(&g[2..], &[(s2 - 1.0) / 2.0, (1.0 - s2) / 2.0, (1.0 - s1 - 1.0) / 2.0, s1 / 2.0], 1e-6);
    }
}
