//! Reward-model ranking loss (paper section 3.5, "Reward modeling", eq. 1):
//!
//! ```text
//! loss(θ) = -1/C(K,2) · E_{(x, y_w, y_l) ~ D} [ log σ( r_θ(x, y_w) - r_θ(x, y_l) ) ]
//! ```
//!
//! A labeler ranks K = 4..9 completions of one prompt; every pair `(w, l)` with `w` ranked strictly better than
//! `l` is one comparison. All comparisons of one prompt form **one batch element**: each completion is forwarded
//! once (K rewards, not C(K,2) pairs of forwards), and the prompt's pair losses are averaged over its P pairs.
//! Tied completions form no pair (the recipe drops ties), so P = C(K,2) only without ties. A batch is the mean over
//! prompts of these per-prompt losses.
//!
//! # Rank-gap margin (optional, off by default)
//!
//! [`ranking_loss_with`] can ask pairs the labeler put far apart to be separated further:
//!
//! ```text
//! pair loss = -log σ( r_w - r_l - m · (gap - 1) ),      gap = ranks[l] - ranks[w] >= 1
//! ```
//!
//! with `m` = `margin_per_rank` >= 0. Adjacent ranks (gap 1) get no margin, so with `m = 0` (the paper's loss,
//! and the default) this is eq. 1 exactly. It is Llama 2's preference-strength margin (Touvron et al. 2023,
//! eq. 2) with the rank distance as the strength signal, since InstructGPT's rankings carry no rating. Pair
//! accuracy stays "r_w > r_l": the margin shapes the objective, not what counts as ranked right.
//!
//! `log σ(d)` is computed in a stable, differentiable form:
//! `log σ(d) = min(d, 0) - log(1 + e^{-|d|}) = (d - |d|)/2 - log(1 + e^{-|d|})`, which never exponentiates a
//! positive number. Its derivative is `σ(-d) = 1 - σ(d)`, so with `d = r_w - r_l - m_wl` (the pair's margin
//! `m_wl`, a constant) `∂loss/∂r_w = -(1 - σ(d))/P` per pair and `∂loss/∂r_l = +(1 - σ(d))/P`.

use candle_core::{DType, Error, Result, Tensor};

/// The ordered comparisons `(w, l)` of one ranking: every pair of completion indices with `ranks[w] < ranks[l]`
/// (0 = best; equal ranks are ties and produce no pair). Sorted by `w`, then `l`.
pub fn ranking_pairs(ranks: &[usize]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (w, &rw) in ranks.iter().enumerate() {
        for (l, &rl) in ranks.iter().enumerate() {
            if rw < rl {
                pairs.push((w, l));
            }
        }
    }
    pairs
}

/// InstructGPT reward-model loss for ONE prompt's K completions: `rewards` `[K]` (or `[K, 1]`, the scalar RM
/// outputs), `ranks[i]` the rank group of completion `i` (0 = best; equal ranks are ties). Over all P pairs
/// `(w, l)` with `ranks[w] < ranks[l]`: `loss = -1/P Σ log σ(r_w - r_l)`.
///
/// Returns the scalar loss (differentiable wrt `rewards`) and the pair accuracy, the fraction of pairs with
/// `r_w > r_l` strictly. Errors when the ranking has no ordered pair (all tied) or `ranks` does not match K.
pub fn ranking_loss(rewards: &Tensor, ranks: &[usize]) -> Result<(Tensor, f32)> {
    ranking_loss_batch(rewards, &[ranks])
}

/// Batch version of [`ranking_loss`]: the mean over prompts of the per-prompt losses, each prompt one batch
/// element as in the paper. `rewards` holds the completions of all prompts back to back (`[N]` or `[N, 1]`,
/// `N = Σ ranks[i].len()`; prompt `i` owns the next `ranks[i].len()` entries), so one RM forward over all
/// completions feeds it.
///
/// Prompts whose ranking has no ordered pair (everything tied) contribute nothing and are left out of the mean;
/// it errors only if no prompt has a pair. The accuracy is pooled over all pairs of the batch (correct pairs /
/// total pairs), as the paper reports comparison accuracy.
pub fn ranking_loss_batch<R: AsRef<[usize]>>(rewards: &Tensor, ranks: &[R]) -> Result<(Tensor, f32)> {
    ranking_loss_weighted(rewards, ranks, None)
}

/// [`ranking_loss_batch`] with a weight per prompt (labeler quality control down-weights some labelers): the
/// weighted mean over prompts of the per-prompt losses. `None` weighs every prompt 1.
pub fn ranking_loss_weighted<R: AsRef<[usize]>>(
    rewards: &Tensor,
    ranks: &[R],
    prompt_weights: Option<&[f32]>,
) -> Result<(Tensor, f32)> {
    ranking_loss_with(rewards, ranks, RankingLossOptions { prompt_weights, margin_per_rank: 0.0 })
}

/// The options of [`ranking_loss_with`]; the default is the paper's loss over unweighted prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RankingLossOptions<'a> {
    /// One weight per prompt (see [`ranking_loss_weighted`]); `None` weighs every prompt 1.
    pub prompt_weights: Option<&'a [f32]>,
    /// The rank-gap margin `m` (see the module doc): a pair `gap` ranks apart must win by `m · (gap - 1)`.
    /// 0 (the paper) adds nothing; negative or non-finite is an error.
    pub margin_per_rank: f64,
}

/// [`ranking_loss_weighted`] with the optional rank-gap margin: the most general form of the ranking loss.
pub fn ranking_loss_with<R: AsRef<[usize]>>(
    rewards: &Tensor,
    ranks: &[R],
    options: RankingLossOptions<'_>,
) -> Result<(Tensor, f32)> {
    let RankingLossOptions { prompt_weights, margin_per_rank } = options;
    if prompt_weights.is_some_and(|w| w.len() != ranks.len()) {
        return Err(Error::Msg("ranking_loss: one weight per ranked prompt".into()));
    }
    if !(margin_per_rank.is_finite() && margin_per_rank >= 0.0) {
        return Err(Error::Msg(format!("ranking_loss: margin_per_rank {margin_per_rank} must be finite and >= 0")));
    }
    let total: usize = ranks.iter().map(|r| r.as_ref().len()).sum();
    let flat = match rewards.dims() {
        [n] | [n, 1] if *n == total => rewards.flatten_all()?.to_dtype(DType::F32)?,
        dims => {
            return Err(Error::Msg(format!(
                "ranking_loss: rewards {dims:?} do not match the {total} ranked completions"
            )));
        }
    };

    let mut winners = Vec::new();
    let mut losers = Vec::new();
    let mut weights = Vec::new();
    let mut margins = Vec::new();
    let mut prompts_with_pairs = 0usize;
    let mut weight_sum = 0f64;
    let mut offset = 0usize;
    for (i, ranking) in ranks.iter().enumerate() {
        let ranking = ranking.as_ref();
        let pairs = ranking_pairs(ranking);
        if !pairs.is_empty() {
            prompts_with_pairs += 1;
            let prompt_weight = prompt_weights.map_or(1.0, |w| w[i].max(0.0));
            weight_sum += f64::from(prompt_weight);
            let weight = prompt_weight / pairs.len() as f32;
            for (w, l) in pairs {
                winners.push((offset + w) as u32);
                losers.push((offset + l) as u32);
                weights.push(weight);
                // Computed in f64 and rounded once, as the PyTorch job does, so both see the same margin.
                margins.push((margin_per_rank * (ranking[l] - ranking[w] - 1) as f64) as f32);
            }
        }
        offset += ranking.len();
    }
    if prompts_with_pairs == 0 {
        return Err(Error::Msg(
            "ranking_loss: no ordered pair (every ranking is fully tied or has fewer than 2 completions)".into(),
        ));
    }

    let device = flat.device();
    let n_pairs = winners.len();
    let winners = Tensor::from_vec(winners, n_pairs, device)?;
    let losers = Tensor::from_vec(losers, n_pairs, device)?;
    // All weights 0 (every prompt's labeler down-weighted to nothing): a zero loss, not a division by zero.
    let weights = (Tensor::from_vec(weights, n_pairs, device)? / weight_sum.max(f64::MIN_POSITIVE))?;

    let diff = (flat.index_select(&winners, 0)? - flat.index_select(&losers, 0)?)?;
    // Without a margin the graph is exactly the paper's loss (no subtraction of zeros).
    let separated =
        if margin_per_rank > 0.0 { (&diff - Tensor::from_vec(margins, n_pairs, device)?)? } else { diff.clone() };
    let loss = (log_sigmoid(&separated)? * weights)?.sum_all()?.neg()?;

    let correct = diff.detach().gt(0.0)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok((loss, correct / n_pairs as f32))
}

/// Stable differentiable `log σ(d) = (d - |d|)/2 - log(1 + e^{-|d|})`.
fn log_sigmoid(d: &Tensor) -> Result<Tensor> {
    let abs = d.abs()?;
    let min_d_0 = ((d - &abs)? * 0.5)?;
    let softplus_neg_abs = (abs.neg()?.exp()? + 1.0)?.log()?;
    min_d_0 - softplus_neg_abs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::*;
    use candle_core::{Device, Var};

    fn log_sig(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    fn sigma(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn pairs_drop_ties() {
        assert_eq!(ranking_pairs(&[0, 1, 1, 2]), vec![(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]);
        assert_eq!(ranking_pairs(&[0, 1, 2, 3]).len(), 6);
        assert_eq!(ranking_pairs(&[2, 0, 1]), vec![(1, 0), (1, 2), (2, 0)]);
        assert!(ranking_pairs(&[1, 1, 1]).is_empty());
    }

    #[test]
    fn k4_with_a_tie_hand_computed() {
        // rewards [2, 1, 1, -1], ranks [0, 1, 1, 2]: completions 1 and 2 are tied, so the pairs are
        // (0,1): 2-1 = 1, (0,2): 2-1 = 1, (0,3): 2-(-1) = 3, (1,3): 1-(-1) = 2, (2,3): 1-(-1) = 2; P = 5.
        // loss = -1/5 [log σ(1) + log σ(1) + log σ(3) + log σ(2) + log σ(2)]
        //      = 1/5 [2·ln(1+e^-1) + ln(1+e^-3) + 2·ln(1+e^-2)]
        //      = 1/5 [2·0.3132617 + 0.0485874 + 2·0.1269280] = 0.9289667 / 5 = 0.1857933
        let (loss, acc) = ranking_loss(&t1(&[2.0, 1.0, 1.0, -1.0]), &[0, 1, 1, 2]).unwrap();
        let formula = -(2.0 * log_sig(1.0) + log_sig(3.0) + 2.0 * log_sig(2.0)) / 5.0;
        assert!((formula - 0.185_793_35).abs() < 1e-7);
        assert!((f64::from(scalar(&loss)) - 0.185_793_35).abs() < 1e-5, "{}", scalar(&loss));
        assert_eq!(acc, 1.0);
    }

    #[test]
    fn k4_without_ties_uses_all_six_pairs_and_wrong_order_lowers_accuracy() {
        // rewards [3, 2, 1, 0], ranks [0, 1, 2, 3]: C(4,2) = 6 pairs with differences 1, 2, 3, 1, 2, 1.
        // loss = 1/6 [3·ln(1+e^-1) + 2·ln(1+e^-2) + ln(1+e^-3)]
        //      = 1/6 [0.9397851 + 0.2538560 + 0.0485874] = 1.2422284 / 6 = 0.2070381
        let rewards = t1(&[3.0, 2.0, 1.0, 0.0]);
        let (loss, acc) = ranking_loss(&rewards, &[0, 1, 2, 3]).unwrap();
        assert!((scalar(&loss) - 0.207_038_07).abs() < 1e-5, "{}", scalar(&loss));
        assert_eq!(acc, 1.0);

        // Labeler says completion 3 beats completion 2 but r_3 = 0 < r_2 = 1: one of six pairs is wrong,
        // and its term becomes ln(1+e^1) instead of ln(1+e^-1).
        let (wrong, acc) = ranking_loss(&rewards, &[0, 1, 3, 2]).unwrap();
        assert!((acc - 5.0 / 6.0).abs() < 1e-6);
        let want = -(2.0 * log_sig(1.0) + log_sig(-1.0) + 2.0 * log_sig(2.0) + log_sig(3.0)) / 6.0;
        assert!((f64::from(scalar(&wrong)) - want).abs() < 1e-5);
        assert!(scalar(&wrong) > scalar(&loss));

        // An exact tie in rewards is not counted as correct.
        let (_, acc) = ranking_loss(&t1(&[1.0, 1.0]), &[0, 1]).unwrap();
        assert_eq!(acc, 0.0);
    }

    #[test]
    fn gradient_matches_hand_derivation_and_finite_differences() {
        let r = [2.0f64, 1.0, 1.0, -1.0];
        let ranks = [0, 1, 1, 2];
        let var = Var::new(&[2.0f32, 1.0, 1.0, -1.0], &Device::Cpu).unwrap();
        let (loss, _) = ranking_loss(var.as_tensor(), &ranks).unwrap();
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());

        // ∂loss/∂r_i = -1/P Σ_{(i,l)} (1 - σ(r_i - r_l)) + 1/P Σ_{(w,i)} (1 - σ(r_w - r_i)).
        let pairs = ranking_pairs(&ranks);
        let p = pairs.len() as f64;
        let mut want = [0.0f64; 4];
        for &(w, l) in &pairs {
            let g = (1.0 - sigma(r[w] - r[l])) / p;
            want[w] -= g;
            want[l] += g;
        }
        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        assert_close(&grad, &want, 1e-6);
        assert!(grad.iter().all(|g| g.abs() > 1e-3));

        // Central finite differences on the loss value.
        let h = 1e-3f32;
        for i in 0..4 {
            let mut plus = [2.0f32, 1.0, 1.0, -1.0];
            let mut minus = plus;
            plus[i] += h;
            minus[i] -= h;
            let lp = scalar(&ranking_loss(&t1(&plus), &ranks).unwrap().0);
            let lm = scalar(&ranking_loss(&t1(&minus), &ranks).unwrap().0);
            let fd = (lp - lm) / (2.0 * h);
            assert!((fd - grad[i]).abs() < 1e-3, "index {i}: fd {fd} vs autograd {}", grad[i]);
        }
    }

    #[test]
    fn gradient_at_zero_difference_is_half() {
        // d/dd log σ(d) at d = 0 is σ(0) = 1/2: the |d| kink must not bias it.
        let var = Var::new(&[0.5f32, 0.5], &Device::Cpu).unwrap();
        let (loss, _) = ranking_loss(var.as_tensor(), &[0, 1]).unwrap();
        assert!((scalar(&loss) - 2f32.ln()).abs() < 1e-6);
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());
        assert_close(&grad, &[-0.5, 0.5], 1e-6);
    }

    #[test]
    fn stable_for_large_differences() {
        let (loss, acc) = ranking_loss(&t1(&[100.0, -100.0]), &[0, 1]).unwrap();
        assert!(scalar(&loss).abs() < 1e-6);
        assert_eq!(acc, 1.0);
        let (loss, acc) = ranking_loss(&t1(&[-100.0, 100.0]), &[0, 1]).unwrap();
        assert!((scalar(&loss) - 200.0).abs() < 1e-3);
        assert_eq!(acc, 0.0);
    }

    #[test]
    fn batch_is_mean_over_prompts_and_skips_fully_tied_prompts() {
        let a = [2.0f32, 1.0, 1.0, -1.0];
        let b = [3.0f32, 2.0, 1.0, 0.0, 4.0];
        let c = [0.3f32, 0.1];
        let flat: Vec<f32> = a.iter().chain(&b).chain(&c).copied().collect();
        let ranks: Vec<Vec<usize>> = vec![vec![0, 1, 1, 2], vec![0, 1, 2, 3, 4], vec![0, 0]];
        let (loss, acc) = ranking_loss_batch(&t1(&flat), &ranks).unwrap();
        let (la, _) = ranking_loss(&t1(&a), &ranks[0]).unwrap();
        let (lb, acc_b) = ranking_loss(&t1(&b), &ranks[1]).unwrap();
        // Prompt c is fully tied: no pair, left out of the mean.
        assert!((scalar(&loss) - (scalar(&la) + scalar(&lb)) / 2.0).abs() < 1e-6);
        // Pooled accuracy: prompt a 5/5, prompt b: completion 4 (reward 4) is ranked last, so its 4 pairs are
        // wrong, 6/10 right; pooled (5 + 6) / 15.
        assert!((acc_b - 0.6).abs() < 1e-6);
        assert!((acc - 11.0 / 15.0).abs() < 1e-6);

        // [N, 1] rewards (a scalar head's output) are accepted.
        let column = t1(&flat).unsqueeze(1).unwrap();
        assert_eq!(scalar(&ranking_loss_batch(&column, &ranks).unwrap().0), scalar(&loss));
    }

    fn with_margin(rewards: &Tensor, ranks: &[usize], margin_per_rank: f64) -> (Tensor, f32) {
        ranking_loss_with(rewards, &[ranks], RankingLossOptions { prompt_weights: None, margin_per_rank }).unwrap()
    }

    #[test]
    fn zero_margin_is_the_paper_loss_bit_for_bit() {
        let var = Var::new(&[0.7f32, -0.2, 1.3, 0.1, -0.9], &Device::Cpu).unwrap();
        let ranks: Vec<Vec<usize>> = vec![vec![0, 2, 1], vec![1, 0]];
        let weights = [1.0f32, 0.5];
        let (plain, plain_acc) = ranking_loss_weighted(var.as_tensor(), &ranks, Some(&weights)).unwrap();
        let options = RankingLossOptions { prompt_weights: Some(&weights), margin_per_rank: 0.0 };
        let (zero, zero_acc) = ranking_loss_with(var.as_tensor(), &ranks, options).unwrap();
        assert_eq!(scalar(&plain).to_bits(), scalar(&zero).to_bits());
        assert_eq!(plain_acc, zero_acc);
        let g_plain = v1(plain.backward().unwrap().get(var.as_tensor()).unwrap());
        let g_zero = v1(zero.backward().unwrap().get(var.as_tensor()).unwrap());
        assert_eq!(g_plain, g_zero);
        assert_eq!(RankingLossOptions::default().margin_per_rank, 0.0);
    }

    #[test]
    fn margin_grows_with_the_rank_gap_hand_computed() {
        // rewards [3, 2, 1, 0], ranks [0, 1, 2, 3], m = 0.5: pairs (w,l) with gap g get the margin 0.5·(g - 1):
        // (0,1) g1: 1 - 0 = 1; (0,2) g2: 2 - 0.5 = 1.5; (0,3) g3: 3 - 1 = 2;
        // (1,2) g1: 1;         (1,3) g2: 2 - 0.5 = 1.5; (2,3) g1: 1.
        // loss = -1/6 [3·log σ(1) + 2·log σ(1.5) + log σ(2)]
        //      = 1/6 [3·0.3132617 + 2·0.2014133 + 0.1269280] = 1.4695397 / 6 = 0.2449233
        let rewards = t1(&[3.0, 2.0, 1.0, 0.0]);
        let (loss, acc) = with_margin(&rewards, &[0, 1, 2, 3], 0.5);
        let want = -(3.0 * log_sig(1.0) + 2.0 * log_sig(1.5) + log_sig(2.0)) / 6.0;
        assert!((want - 0.244_923_3).abs() < 1e-6, "{want}");
        assert!((f64::from(scalar(&loss)) - want).abs() < 1e-6, "{}", scalar(&loss));
        // Higher than without the margin (0.2070381): far-apart pairs must be separated further.
        assert!(scalar(&loss) > scalar(&ranking_loss(&rewards, &[0, 1, 2, 3]).unwrap().0) + 0.03);
        // Accuracy is "r_w > r_l", margin or not: (0,3) wins by 3 but would miss a margin of 10·2 = 20.
        assert_eq!(acc, 1.0);
        assert_eq!(with_margin(&rewards, &[0, 1, 2, 3], 10.0).1, 1.0);
    }

    #[test]
    fn adjacent_ranks_and_ties_get_no_margin() {
        // Two rank groups: every pair is adjacent (gap 1), so any margin changes nothing (to the bit), and the
        // tied completions 1..3 still form no pair among themselves.
        let rewards = t1(&[2.0, 1.0, 1.0, -1.0]);
        let two_groups = [0, 1, 1, 1];
        let (p2, _) = ranking_loss(&rewards, &two_groups).unwrap();
        let (m2, _) = with_margin(&rewards, &two_groups, 3.0);
        assert_eq!(scalar(&p2).to_bits(), scalar(&m2).to_bits());
        assert_eq!(ranking_pairs(&two_groups).len(), 3);
        // Ranks [0, 1, 1, 2]: pairs (0,1), (0,2), (1,3), (2,3) are adjacent and only (0,3) is two ranks apart, so
        // only its term moves: log σ(3) becomes log σ(3 - 0.25).
        let ranks = [0, 1, 1, 2];
        let (plain, _) = ranking_loss(&rewards, &ranks).unwrap();
        let (m, _) = with_margin(&rewards, &ranks, 0.25);
        let want = f64::from(scalar(&plain)) + (log_sig(3.0) - log_sig(2.75)) / 5.0;
        assert!((f64::from(scalar(&m)) - want).abs() < 1e-6, "{} vs {want}", scalar(&m));
        // A fully tied ranking still has no pair to put a margin on.
        assert!(
            ranking_loss_with(
                &t1(&[1.0, 2.0]),
                &[[0, 0]],
                RankingLossOptions { margin_per_rank: 1.0, ..Default::default() }
            )
            .is_err()
        );
    }

    #[test]
    fn margin_gradient_matches_hand_derivation_and_finite_differences() {
        let r = [0.4f64, 1.1, -0.3, 0.9, 0.2];
        let r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
        let ranks = [0, 3, 1, 1, 4];
        let m = 0.3;
        let var = Var::new(r32.as_slice(), &Device::Cpu).unwrap();
        let (loss, _) = with_margin(var.as_tensor(), &ranks, m);
        let grad = v1(loss.backward().unwrap().get(var.as_tensor()).unwrap());

        // ∂loss/∂r_w = -(1 - σ(d))/P, ∂loss/∂r_l = +(1 - σ(d))/P with d = r_w - r_l - m·(gap - 1).
        let pairs = ranking_pairs(&ranks);
        let p = pairs.len() as f64;
        let mut want_loss = 0.0;
        let mut want = [0.0f64; 5];
        for &(w, l) in &pairs {
            let d = r[w] - r[l] - m * (ranks[l] - ranks[w] - 1) as f64;
            want_loss -= log_sig(d) / p;
            let g = (1.0 - sigma(d)) / p;
            want[w] -= g;
            want[l] += g;
        }
        assert!((f64::from(scalar(&loss)) - want_loss).abs() < 1e-6);
        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        assert_close(&grad, &want, 1e-6);
        // The margin moved the gradient: the paper loss's is different.
        let (plain, _) = ranking_loss(var.as_tensor(), &ranks).unwrap();
        let g_plain = v1(plain.backward().unwrap().get(var.as_tensor()).unwrap());
        assert!(grad.iter().zip(&g_plain).any(|(a, b)| (a - b).abs() > 1e-3));

        let h = 1e-3f32;
        for i in 0..5 {
            let mut plus = r32.clone();
            let mut minus = r32.clone();
            plus[i] += h;
            minus[i] -= h;
            let lp = scalar(&with_margin(&t1(&plus), &ranks, m).0);
            let lm = scalar(&with_margin(&t1(&minus), &ranks, m).0);
            let fd = (lp - lm) / (2.0 * h);
            assert!((fd - grad[i]).abs() < 1e-3, "index {i}: fd {fd} vs autograd {}", grad[i]);
        }
    }

    #[test]
    fn margin_must_be_finite_and_non_negative() {
        for m in [-0.1, f64::NAN, f64::INFINITY] {
            let options = RankingLossOptions { prompt_weights: None, margin_per_rank: m };
            assert!(ranking_loss_with(&t1(&[1.0, 0.0]), &[[0, 1]], options).is_err(), "{m}");
        }
    }

    #[test]
    fn errors_on_mismatch_or_no_pairs() {
        assert!(ranking_loss(&t1(&[1.0, 2.0, 3.0]), &[0, 1]).is_err());
        assert!(ranking_loss(&t1(&[1.0, 2.0]), &[0, 0]).is_err());
        assert!(ranking_loss(&t1(&[1.0]), &[0]).is_err());
    }
}
