//! PPO-ptx (paper section 3.5, "Reinforcement learning", eq. 2). The policy maximises
//!
//! ```text
//! objective(φ) = E_{(x,y) ~ π_RL}[ r_θ(x, y) - β · log(π_RL(y|x) / π_SFT(y|x)) ] + γ · E_{x ~ D_pretrain}[ log π_RL(x) ]
//! ```
//!
//! in a bandit environment (a prompt, one response, the reward model's score, episode over). The pieces:
//!
//! - **KL penalty** ([`kl_penalty`], [`shaped_rewards`]): the KL term is a per-token penalty against the SFT policy,
//!   estimated on the sampled tokens by `k1_t = log π_RL(y_t|·) - log π_SFT(y_t|·)`. Token `t` of the response gets
//!   reward `-β k1_t`, and the last response token also gets the RM score: `r_t = -β k1_t + [t = last] · r_θ(x, y)`.
//!   β = 0.02 in the paper ([`PAPER_KL_BETA`]).
//! - **GAE** ([`gae`]) with no discount (γ_GAE = 1, [`PAPER_GAE_GAMMA`]):
//!   `δ_t = r_t + γ V_{t+1} - V_t`, `A_t = δ_t + γλ A_{t+1}`, `R_t = A_t + V_t`, with `V` and `A` zero after the last
//!   response token (the episode ends there).
//! - **Whitening** ([`whiten`]): advantages are normalised to zero mean, unit variance over the batch's response
//!   tokens before the policy loss.
//! - **Clipped policy loss** ([`ppo_policy_loss`], Schulman et al. 2017 eq. 7, written as a loss to minimise):
//!   `ρ_t = exp(log π_new - log π_old)`, `L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε))`, ε = 0.2
//!   ([`PAPER_CLIP_RATIO`]).
//! - **Clipped value loss** ([`value_loss`]), as in OpenAI's `lm-human-preferences` (the codebase InstructGPT's RL
//!   descends from): `0.5 · mean_t max((V_t - R_t)², (clip(V_t, V_old - ε, V_old + ε) - R_t)²)`.
//! - **Pre-training mix** ([`ppo_ptx_total`]): maximising `γ E[log π_RL(x)]` is minimising `γ · NLL` on pre-training
//!   text, so `total = ppo_loss + γ · ptx_nll`; γ = 27.8 for "PPO-ptx" ([`PAPER_PTX_GAMMA`]), γ = 0 is plain "PPO".
//!   Adding the two losses and calling `backward` once gives the same gradient as the paper's "compute the PPO
//!   gradient and the pre-training gradient in turn and accumulate".
//!
//! Rewards, advantages, returns, old log-probabilities and old values are plain values: every function detaches
//! them. Only `new_logprobs` (policy loss), `values` (value loss) and the two loss arguments of the totals carry
//! gradients.
//!
//! Definitions of the two diagnostics follow `lm-human-preferences`: the clip fraction is the share of masked tokens
//! where the clipped term is strictly larger (the clip is active and the token's gradient is zero), and the
//! approximate KL is `0.5 · mean (log π_new - log π_old)²`.

use candle_core::{DType, Error, Result, Tensor};

use super::{check_same_shape, host_2d, mask_bool, masked_mean, masked_mean_f32};

/// KL penalty coefficient β of the paper.
pub const PAPER_KL_BETA: f64 = 0.02;
/// Pre-training loss coefficient γ of "PPO-ptx" (0 gives plain "PPO").
pub const PAPER_PTX_GAMMA: f64 = 27.8;
/// PPO clip ratio ε.
pub const PAPER_CLIP_RATIO: f64 = 0.2;
/// GAE discount: the paper uses no discount.
pub const PAPER_GAE_GAMMA: f32 = 1.0;

/// Per-token KL penalty estimate `k1 = logp_policy - logp_ref` on the sampled tokens, `[B, T]` -> `[B, T]` F32.
/// Plain values: both inputs are detached.
pub fn kl_penalty(policy_logprobs: &Tensor, ref_logprobs: &Tensor) -> Result<Tensor> {
    check_same_shape("kl_penalty", policy_logprobs.dims(), &[("ref_logprobs", ref_logprobs)])?;
    policy_logprobs.detach().to_dtype(DType::F32)? - ref_logprobs.detach().to_dtype(DType::F32)?
}

/// Per-token rewards for PPO, `[B, T]` F32: `-beta * kl` at every response token (where `mask` is non-zero), plus
/// the RM score `scores[b]` (`[B]` or `[B, 1]`) at the last response token of row `b`; 0 outside the mask. A row
/// with an empty mask gets no reward at all. Plain values (detached).
pub fn shaped_rewards(scores: &Tensor, kl: &Tensor, mask: &Tensor, beta: f64) -> Result<Tensor> {
    let (b, t, kl) = host_2d(kl)?;
    check_same_shape("shaped_rewards", &[b, t], &[("mask", mask)])?;
    let (_, _, mask_host) = host_2d(mask)?;
    if !matches!(scores.dims(), [n] | [n, 1] if *n == b) {
        return Err(Error::Msg(format!("shaped_rewards: scores {:?} do not match batch {b}", scores.dims())));
    }
    let scores_host = scores.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let beta = beta as f32;
    let mut out = vec![0f32; b * t];
    for (row, score) in scores_host.iter().enumerate() {
        let range = row * t..(row + 1) * t;
        let mut last = None;
        for i in range {
            if mask_host[i] != 0.0 {
                out[i] = -beta * kl[i];
                last = Some(i);
            }
        }
        if let Some(i) = last {
            out[i] += score;
        }
    }
    Tensor::from_vec(out, (b, t), mask.device())
}

/// Generalised advantage estimation over the masked positions of each row, right to left:
/// `δ_t = r_t + γ V_next - V_t`, `A_t = δ_t + γλ A_next`, returns `R_t = A_t + V_t`, where "next" is the next
/// masked-in position of the row (positions outside the mask are skipped) and `V_next = A_next = 0` after the last
/// one (the episode ends with the response). `rewards`, `values`, `mask` `[B, T]`; returns `(advantages, returns)`
/// `[B, T]` F32, 0 outside the mask. `values[b, t]` is the value estimate aligned with the token at `t`. The paper
/// uses `gamma = 1`. Plain values (detached; computed on the host, it is a scan).
pub fn gae(rewards: &Tensor, values: &Tensor, mask: &Tensor, gamma: f32, lambda: f32) -> Result<(Tensor, Tensor)> {
    let (b, t, rewards) = host_2d(rewards)?;
    check_same_shape("gae", &[b, t], &[("values", values), ("mask", mask)])?;
    let (_, _, values) = host_2d(values)?;
    let (_, _, mask_host) = host_2d(mask)?;
    let mut advantages = vec![0f32; b * t];
    let mut returns = vec![0f32; b * t];
    for row in 0..b {
        let (mut next_value, mut next_advantage) = (0f32, 0f32);
        for i in (row * t..(row + 1) * t).rev() {
            if mask_host[i] == 0.0 {
                continue;
            }
            let delta = rewards[i] + gamma * next_value - values[i];
            let advantage = delta + gamma * lambda * next_advantage;
            advantages[i] = advantage;
            returns[i] = advantage + values[i];
            next_value = values[i];
            next_advantage = advantage;
        }
    }
    let device = mask.device();
    Ok((Tensor::from_vec(advantages, (b, t), device)?, Tensor::from_vec(returns, (b, t), device)?))
}

/// Advantage whitening over the masked positions of the whole batch: `(A - mean) / sqrt(var + 1e-8)` with the
/// population variance (as `lm-human-preferences`), 0 outside the mask. `[B, T]` -> `[B, T]` F32, plain values.
pub fn whiten(advantages: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, adv) = host_2d(advantages)?;
    check_same_shape("whiten", &[b, t], &[("mask", mask)])?;
    let (_, _, mask_host) = host_2d(mask)?;
    let kept: Vec<f64> = adv.iter().zip(&mask_host).filter(|(_, m)| **m != 0.0).map(|(a, _)| f64::from(*a)).collect();
    let mut out = vec![0f32; b * t];
    if !kept.is_empty() {
        let n = kept.len() as f64;
        let mean = kept.iter().sum::<f64>() / n;
        let var = kept.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
        let scale = 1.0 / (var + 1e-8).sqrt();
        for ((o, a), m) in out.iter_mut().zip(&adv).zip(&mask_host) {
            if *m != 0.0 {
                *o = ((f64::from(*a) - mean) * scale) as f32;
            }
        }
    }
    Tensor::from_vec(out, (b, t), advantages.device())
}

/// PPO clipped policy loss: mean over masked tokens of `max(-A ρ, -A clip(ρ, 1-clip, 1+clip))`,
/// `ρ = exp(new_logprobs - old_logprobs)`. All inputs `[B, T]`; differentiable wrt `new_logprobs` only (old
/// log-probabilities and advantages are detached). Where the clipped term is the larger one the ratio lies outside
/// the range and the token's gradient is zero; elsewhere the gradient is that of `-A ρ`.
///
/// Returns `(loss, clip_fraction, approx_kl)`: the fraction of masked tokens where the clip is active, and
/// `0.5 · mean (new - old)²`.
pub fn ppo_policy_loss(
    new_logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<(Tensor, f32, f32)> {
    check_clip("ppo_policy_loss", clip)?;
    let dims = new_logprobs.dims();
    check_same_shape("ppo_policy_loss", dims, &[("old_logprobs", old_logprobs), ("advantages", advantages)])?;
    mask_bool(mask, dims, "ppo_policy_loss")?;
    let new = new_logprobs.to_dtype(DType::F32)?;
    let old = old_logprobs.detach().to_dtype(DType::F32)?;
    let neg_adv = advantages.detach().to_dtype(DType::F32)?.neg()?;

    let log_ratio = (&new - &old)?;
    let ratio = log_ratio.exp()?;
    let unclipped = (&neg_adv * &ratio)?;
    // The clipped term only wins where the ratio is outside the range, where it is a constant: detached.
    let clipped = (&neg_adv * ratio.detach().clamp(1.0 - clip, 1.0 + clip)?)?;
    let clip_active = clipped.gt(&unclipped.detach())?;
    let per_token = clip_active.where_cond(&clipped, &unclipped)?;

    let loss = masked_mean(&per_token, mask)?;
    let clip_fraction = masked_mean_f32(&clip_active.to_dtype(DType::F32)?, mask)?;
    let approx_kl = 0.5 * masked_mean_f32(&log_ratio.sqr()?, mask)?;
    Ok((loss, clip_fraction, approx_kl))
}

/// Clipped value loss: `0.5 · mean over masked tokens of max((v - R)², (clip(v, v_old - clip, v_old + clip) - R)²)`.
/// All inputs `[B, T]`; differentiable wrt `values` only (`old_values` and `returns` are detached). Where the
/// clipped error is the larger one and `v` is outside the band, the token's gradient is zero.
pub fn value_loss(values: &Tensor, old_values: &Tensor, returns: &Tensor, mask: &Tensor, clip: f64) -> Result<Tensor> {
    check_clip("value_loss", clip)?;
    let dims = values.dims();
    check_same_shape("value_loss", dims, &[("old_values", old_values), ("returns", returns)])?;
    mask_bool(mask, dims, "value_loss")?;
    let v = values.to_dtype(DType::F32)?;
    let old = old_values.detach().to_dtype(DType::F32)?;
    let ret = returns.detach().to_dtype(DType::F32)?;

    let (low, high) = ((&old - clip)?, (&old + clip)?);
    let v_plain = v.detach();
    let above = v_plain.gt(&high)?.where_cond(&high, &v)?;
    let v_clipped = v_plain.lt(&low)?.where_cond(&low, &above)?;

    let unclipped = (&v - &ret)?.sqr()?;
    let clipped = (&v_clipped - &ret)?.sqr()?;
    let per_token = clipped.detach().gt(&unclipped.detach())?.where_cond(&clipped, &unclipped)?;
    masked_mean(&per_token, mask)? * 0.5
}

/// PPO loss of one minibatch: `policy_loss + vf_coef * value_loss` (the value function is a separate network
/// initialised from the reward model, so `vf_coef` only scales its learning signal).
pub fn ppo_total(policy_loss: &Tensor, value_loss: &Tensor, vf_coef: f64) -> Result<Tensor> {
    policy_loss + (value_loss * vf_coef)?
}

/// PPO-ptx objective as a loss: `total = ppo_loss + gamma * ptx_nll`, where `ptx_nll` is the LM loss (mean NLL,
/// see [`super::masked_nll`]) on pre-training text. Maximising `γ E[log π(x)]` is minimising `γ · NLL`; the
/// paper's γ is [`PAPER_PTX_GAMMA`] (0 gives plain PPO).
pub fn ppo_ptx_total(ppo_loss: &Tensor, ptx_nll: &Tensor, gamma: f64) -> Result<Tensor> {
    ppo_loss + (ptx_nll * gamma)?
}

fn check_clip(what: &str, clip: f64) -> Result<()> {
    if clip.is_finite() && clip >= 0.0 {
        Ok(())
    } else {
        Err(Error::Msg(format!("{what}: clip must be a finite non-negative number, got {clip}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::*;
    use crate::losses::{masked_nll, token_logprobs};
    use candle_core::{Device, Var};

    #[test]
    fn kl_and_shaped_rewards_hand_case() {
        // B = 1, T = 4, mask [0, 1, 1, 1] (position 0 is the prompt), beta 0.1, RM score 2.0.
        let policy = t2(&[&[-1.0, -0.5, -1.2, -0.3]]);
        let reference = t2(&[&[-1.1, -0.7, -1.0, -0.8]]);
        let kl = kl_penalty(&policy, &reference).unwrap();
        // k1 = policy - ref = [0.1, 0.2, -0.2, 0.5].
        assert_close(&v1(&kl), &[0.1, 0.2, -0.2, 0.5], 1e-6);
        let rewards = shaped_rewards(&t1(&[2.0]), &kl, &t2(&[&[0.0, 1.0, 1.0, 1.0]]), 0.1).unwrap();
        // pos 0: outside the mask -> 0; pos 1: -0.1·0.2 = -0.02; pos 2: -0.1·(-0.2) = +0.02;
        // pos 3 (last response token): -0.1·0.5 + 2.0 = 1.95.
        assert_close(&v1(&rewards), &[0.0, -0.02, 0.02, 1.95], 1e-6);
    }

    #[test]
    fn shaped_rewards_puts_score_on_each_rows_last_response_token() {
        let kl = t2(&[&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]]);
        let mask = t2(&[&[0.0, 1.0, 1.0, 0.0], &[1.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]]);
        let scores = t1(&[3.0, -1.0, 5.0]).unsqueeze(1).unwrap();
        let rewards = shaped_rewards(&scores, &kl, &mask, 0.5).unwrap();
        assert_close(&v1(&rewards), &[0.0, -0.5, 2.5, 0.0, -1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1e-6);
        assert!(shaped_rewards(&t1(&[1.0, 2.0]), &kl, &mask, 0.5).is_err());
    }

    #[test]
    fn gae_hand_case_gamma_one() {
        // Response tokens at positions 1..=3 (mask [0, 1, 1, 1, 0]); the 9s outside the mask must be ignored.
        // rewards r = [0.0, -0.1, 1.0], values V = [0.5, 0.4, 0.8], gamma 1, lambda 0.95, V after the end = 0.
        // t=3: δ = 1.0 + 0 - 0.8 = 0.2;            A = 0.2;                   R = 0.2 + 0.8 = 1.0
        // t=2: δ = -0.1 + 0.8 - 0.4 = 0.3;         A = 0.3 + 0.95·0.2 = 0.49;  R = 0.49 + 0.4 = 0.89
        // t=1: δ = 0.0 + 0.4 - 0.5 = -0.1;         A = -0.1 + 0.95·0.49 = 0.3655; R = 0.3655 + 0.5 = 0.8655
        let rewards = t2(&[&[9.0, 0.0, -0.1, 1.0, 9.0]]);
        let values = t2(&[&[9.0, 0.5, 0.4, 0.8, 9.0]]);
        let mask = t2(&[&[0.0, 1.0, 1.0, 1.0, 0.0]]);
        let (adv, ret) = gae(&rewards, &values, &mask, 1.0, 0.95).unwrap();
        assert_close(&v1(&adv), &[0.0, 0.3655, 0.49, 0.2, 0.0], 1e-6);
        assert_close(&v1(&ret), &[0.0, 0.8655, 0.89, 1.0, 0.0], 1e-6);

        // Same case with gamma 0.9 (γλ = 0.855):
        // t=3: δ = 0.2, A = 0.2; t=2: δ = -0.1 + 0.9·0.8 - 0.4 = 0.22, A = 0.22 + 0.855·0.2 = 0.391;
        // t=1: δ = 0.9·0.4 - 0.5 = -0.14, A = -0.14 + 0.855·0.391 = 0.194305.
        let (adv, _) = gae(&rewards, &values, &mask, 0.9, 0.95).unwrap();
        assert_close(&v1(&adv), &[0.0, 0.194_305, 0.391, 0.2, 0.0], 1e-6);
    }

    #[test]
    fn gae_lambda_one_gamma_one_is_monte_carlo_return() {
        // With γ = λ = 1 the return R_t is the plain sum of future rewards.
        let rewards = t2(&[&[0.5, -0.25, 2.0], &[1.0, 0.0, 0.0]]);
        let values = t2(&[&[0.1, 0.2, 0.3], &[0.7, 0.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0], &[1.0, 0.0, 0.0]]);
        let (adv, ret) = gae(&rewards, &values, &mask, 1.0, 1.0).unwrap();
        assert_close(&v1(&ret), &[2.25, 1.75, 2.0, 1.0, 0.0, 0.0], 1e-6);
        assert_close(&v1(&adv), &[2.15, 1.55, 1.7, 0.3, 0.0, 0.0], 1e-6);
    }

    #[test]
    fn whiten_hand_case() {
        // Masked values [1, 2, 3]: mean 2, population variance 2/3, so ±1/sqrt(2/3) = ±1.2247449.
        let adv = t2(&[&[100.0, 1.0, 2.0, 3.0, -100.0]]);
        let mask = t2(&[&[0.0, 1.0, 1.0, 1.0, 0.0]]);
        let got = v1(&whiten(&adv, &mask).unwrap());
        assert_close(&got, &[0.0, -1.224_744_9, 0.0, 1.224_744_9, 0.0], 1e-5);
        let empty = t2(&[&[0.0; 5]]);
        assert_close(&v1(&whiten(&adv, &empty).unwrap()), &[0.0; 5], 0.0);
    }

    /// Old log-probability -1 everywhere; new = old + ln ρ. Tokens (ε = 0.2):
    /// 0: A = +1, ρ = 1.1 (inside):              max(-1.1, -1.1) = -1.1  not clipped, ∂/∂logp = -Aρ = -1.1
    /// 1: A = +1, ρ = 1.5 (above, favourable):   max(-1.5, -1.2) = -1.2  clipped, gradient 0
    /// 2: A = -2, ρ = 0.5 (below, favourable):   max( 1.0,  1.6) =  1.6  clipped, gradient 0
    /// 3: A = -2, ρ = 1.5 (above, unfavourable): max( 3.0,  2.4) =  3.0  not clipped, ∂/∂logp = 3.0
    /// 4: A = +1, ρ = 0.5 (below, unfavourable): max(-0.5, -0.8) = -0.5  not clipped, ∂/∂logp = -0.5
    /// 5: masked out (A = 100, ρ = 3).
    /// loss = (-1.1 - 1.2 + 1.6 + 3.0 - 0.5) / 5 = 1.8 / 5 = 0.36; clip fraction 2/5 = 0.4.
    fn policy_case() -> (Vec<f32>, Tensor, Tensor, Tensor) {
        let ratios = [1.1f32, 1.5, 0.5, 1.5, 0.5, 3.0];
        let new: Vec<f32> = ratios.iter().map(|r| -1.0 + r.ln()).collect();
        let old = t2(&[&[-1.0; 6]]);
        let adv = t2(&[&[1.0, 1.0, -2.0, -2.0, 1.0, 100.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]);
        (new, old, adv, mask)
    }

    #[test]
    fn ppo_policy_loss_hand_case() {
        let (new, old, adv, mask) = policy_case();
        let new = Tensor::from_vec(new, (1, 6), &Device::Cpu).unwrap();
        let (loss, clip_fraction, approx_kl) = ppo_policy_loss(&new, &old, &adv, &mask, 0.2).unwrap();
        assert!((scalar(&loss) - 0.36).abs() < 1e-5, "{}", scalar(&loss));
        assert!((clip_fraction - 0.4).abs() < 1e-6);
        // approx_kl = 0.5 · (ln²1.1 + ln²1.5 + ln²0.5 + ln²1.5 + ln²0.5) / 5
        //           = 0.5 · (0.0090840 + 0.1644020 + 0.4804530 + 0.1644020 + 0.4804530) / 5 = 0.1298794
        assert!((approx_kl - 0.129_879_4).abs() < 1e-5, "{approx_kl}");
    }

    #[test]
    fn ppo_policy_loss_gradient_zero_only_where_clipped() {
        let (new, old, adv, mask) = policy_case();
        let var = Var::from_vec(new, (1, 6), &Device::Cpu).unwrap();
        let (loss, _, _) = ppo_policy_loss(var.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());
        assert_close(&grad, &[-1.1 / 5.0, 0.0, 0.0, 3.0 / 5.0, -0.5 / 5.0, 0.0], 1e-6);
    }

    #[test]
    fn ppo_policy_loss_at_ratio_one_is_minus_mean_advantage() {
        // First PPO step: new == old, ρ = 1 everywhere, the loss is -mean(A) and ∂/∂logp_t = -A_t / N.
        let logp = t2(&[&[-0.3, -2.0, -1.0]]);
        let var = Var::from_tensor(&logp).unwrap();
        let adv = t2(&[&[0.5, -1.0, 2.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0]]);
        let (loss, clip_fraction, approx_kl) = ppo_policy_loss(var.as_tensor(), &logp, &adv, &mask, 0.2).unwrap();
        assert!((scalar(&loss) + 0.5).abs() < 1e-6);
        assert_eq!((clip_fraction, approx_kl), (0.0, 0.0));
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());
        assert_close(&grad, &[-0.5 / 3.0, 1.0 / 3.0, -2.0 / 3.0], 1e-6);
    }

    #[test]
    fn ppo_policy_loss_backpropagates_to_logits() {
        // logits [1, 3, 4] -> token_logprobs -> policy loss: the logits get a non-zero gradient.
        let logits =
            Tensor::new(&[[[0.1f32, 0.4, -0.3, 1.0], [0.0, 0.0, 0.5, -1.0], [2.0, 1.0, 0.0, -2.0]]], &Device::Cpu)
                .unwrap();
        let var = Var::from_tensor(&logits).unwrap();
        let tokens = Tensor::new(&[[3u32, 2, 0]], &Device::Cpu).unwrap();
        let old = (token_logprobs(&logits, &tokens).unwrap() - 0.1).unwrap();
        let adv = t2(&[&[1.0, -0.5, 0.7]]);
        let mask = t2(&[&[1.0, 1.0, 1.0]]);
        let new = token_logprobs(var.as_tensor(), &tokens).unwrap();
        let (loss, _, _) = ppo_policy_loss(&new, &old, &adv, &mask, 0.2).unwrap();
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());
        assert!(grad.iter().all(|g| g.is_finite()));
        assert!(grad.iter().filter(|g| g.abs() > 1e-4).count() >= 9, "{grad:?}");
    }

    #[test]
    fn value_loss_hand_case_and_gradient() {
        // ε = 0.2, old values 0.5 (band [0.3, 0.7]):
        // t0: v = 0.55 inside, R = 1: (0.55-1)² = 0.2025 both ways -> 0.2025, ∂ = 0.5·2·(0.55-1)/3 = -0.15
        // t1: v = 0.8 -> clipped 0.7, R = 1: max(0.04, 0.09) = 0.09 (clipped term, gradient 0)
        // t2: v = 0.8 -> clipped 0.7, R = 0: max(0.64, 0.49) = 0.64 (unclipped), ∂ = 0.5·2·0.8/3 = 0.2666667
        // t3: masked out.
        // loss = 0.5 · (0.2025 + 0.09 + 0.64) / 3 = 0.5 · 0.9325 / 3 = 0.1554167
        let var = Var::new(&[[0.55f32, 0.8, 0.8, 5.0]], &Device::Cpu).unwrap();
        let old = t2(&[&[0.5, 0.5, 0.5, 0.0]]);
        let returns = t2(&[&[1.0, 1.0, 0.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0, 0.0]]);
        let loss = value_loss(var.as_tensor(), &old, &returns, &mask, 0.2).unwrap();
        assert!((scalar(&loss) - 0.155_416_7).abs() < 1e-6, "{}", scalar(&loss));
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());
        assert_close(&grad, &[-0.15, 0.0, 0.266_666_7, 0.0], 1e-6);

        // Below the band: v = 0.1 -> clipped 0.3, R = 0.5: max(0.16, 0.04) = 0.16, gradient 0.5·2·(0.1-0.5) = -0.4.
        let var = Var::new(&[[0.1f32]], &Device::Cpu).unwrap();
        let loss = value_loss(var.as_tensor(), &t2(&[&[0.5]]), &t2(&[&[0.5]]), &t2(&[&[1.0]]), 0.2).unwrap();
        assert!((scalar(&loss) - 0.08).abs() < 1e-6);
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());
        assert_close(&grad, &[-0.4], 1e-6);
        assert!(value_loss(var.as_tensor(), &t2(&[&[0.5]]), &t2(&[&[0.5]]), &t2(&[&[1.0]]), -1.0).is_err());
    }

    #[test]
    fn totals_combine_and_carry_gradients() {
        // policy loss from one Var, the ptx NLL from logits: total = ppo + γ·nll, ∂total/∂ppo_input unchanged and
        // ∂total/∂logits = γ·∂nll/∂logits.
        let logp = Var::new(&[[-1.0f32, -2.0]], &Device::Cpu).unwrap();
        let old = t2(&[&[-1.0, -2.0]]);
        let adv = t2(&[&[1.0, 1.0]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let (policy, _, _) = ppo_policy_loss(logp.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        let values = Var::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
        let vloss = value_loss(values.as_tensor(), &t2(&[&[0.0, 1.0]]), &t2(&[&[1.0, 1.0]]), &mask, 0.2).unwrap();
        let ppo = ppo_total(&policy, &vloss, 0.5).unwrap();
        // policy = -1, value loss = 0.5·(1 + 0)/2 = 0.25 -> ppo = -1 + 0.5·0.25 = -0.875;
        // ∂ppo/∂v_0 = vf_coef · 0.5 · 2·(0 - 1)/2 = -0.25.
        assert!((scalar(&ppo) + 0.875).abs() < 1e-6);

        let logits = Var::new(&[[[0.0f32, 1.0, -1.0], [0.5, 0.5, 0.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        let nll = masked_nll(logits.as_tensor(), &targets, &mask).unwrap();
        let total = ppo_ptx_total(&ppo, &nll, PAPER_PTX_GAMMA).unwrap();
        assert!((scalar(&total) - (scalar(&ppo) + 27.8 * scalar(&nll))).abs() < 1e-4);

        let grads = total.backward().unwrap();
        assert_close(&v1(grads.get(logp.as_tensor()).unwrap()), &[-0.5, -0.5], 1e-6);
        assert_close(&v1(grads.get(values.as_tensor()).unwrap()), &[-0.25, 0.0], 1e-6);
        let nll_grad = v1(nll.backward().unwrap().get(logits.as_tensor()).unwrap());
        let want: Vec<f32> = nll_grad.iter().map(|g| g * 27.8).collect();
        assert_close(&v1(grads.get(logits.as_tensor()).unwrap()), &want, 1e-5);
        assert!(want.iter().all(|g| g.abs() > 1e-3));
    }

    #[test]
    fn shape_mismatches_are_errors() {
        let a = t2(&[&[1.0, 2.0]]);
        let b = t2(&[&[1.0, 2.0, 3.0]]);
        assert!(kl_penalty(&a, &b).is_err());
        assert!(gae(&a, &b, &a, 1.0, 0.95).is_err());
        assert!(whiten(&a, &b).is_err());
        assert!(ppo_policy_loss(&a, &a, &a, &b, 0.2).is_err());
        assert!(value_loss(&a, &a, &b, &a, 0.2).is_err());
        assert!(value_loss(&a, &a, &a, &b, 0.2).is_err());
    }
}
