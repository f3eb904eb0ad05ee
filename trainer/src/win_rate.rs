//! Win rates with a confidence interval, so a verdict is not read off a handful of prompts.
//!
//! The gate and the `win-rate` command compare two policies prompt by prompt (a tie counts half a win). A bare
//! share is noise on a few prompts (0.50 on 3 prompts says nothing); the Wilson score interval says how far the
//! true rate may be from it. Wilson rather than the normal approximation because it stays inside [0, 1] and is
//! honest at small n and near 0 or 1 (Brown, Cai & DasGupta 2001 recommend it for n < 40).

use serde::{Deserialize, Serialize};

/// A win rate over `n` comparisons and its two-sided confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    /// Wins plus half the ties, over `n`.
    pub rate: f64,
    pub n: usize,
    pub lower: f64,
    pub upper: f64,
    /// The interval's confidence level (e.g. 0.95).
    pub confidence: f64,
}

impl WinRate {
    /// From `wins` (ties already counted as halves) out of `n`, with a two-sided `confidence` interval. With
    /// `n = 0` the rate is 0.5 and the interval all of [0, 1].
    pub fn new(wins: f64, n: usize, confidence: f64) -> Self {
        if n == 0 {
            return Self { rate: 0.5, n, lower: 0.0, upper: 1.0, confidence };
        }
        let nf = n as f64;
        let p = (wins / nf).clamp(0.0, 1.0);
        let z = normal_quantile(0.5 + confidence.clamp(0.0, 0.999_999) / 2.0);
        let z2 = z * z;
        let centre = (p + z2 / (2.0 * nf)) / (1.0 + z2 / nf);
        let half = z / (1.0 + z2 / nf) * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt();
        Self { rate: p, n, lower: (centre - half).max(0.0), upper: (centre + half).min(1.0), confidence }
    }

    /// Counts each comparison: `Greater` a win, `Equal` half a win.
    pub fn from_outcomes(outcomes: impl IntoIterator<Item = std::cmp::Ordering>, confidence: f64) -> Self {
        let (mut wins, mut n) = (0.0, 0usize);
        for o in outcomes {
            n += 1;
            wins += match o {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            };
        }
        Self::new(wins, n, confidence)
    }
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -39.696_830_286_653_76,
        220.946_098_424_520_5,
        -275.928_510_446_968_7,
        138.357_751_867_269,
        -30.664_798_066_147_16,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -54.476_098_798_224_06,
        161.585_836_858_040_9,
        -155.698_979_859_886_6,
        66.801_311_887_719_72,
        -13.280_681_552_885_72,
    ];
    const C: [f64; 6] = [
        -0.007_784_894_002_430_293,
        -0.322_396_458_041_136_5,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [0.007_784_695_709_041_462, 0.322_467_129_070_039_8, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantiles_match_tables() {
        for (p, z) in [(0.975, 1.959_964), (0.5, 0.0), (0.95, 1.644_854), (0.005, -2.575_829), (0.999, 3.090_232)] {
            assert!((normal_quantile(p) - z).abs() < 1e-5, "{p}: {}", normal_quantile(p));
        }
    }

    #[test]
    fn wilson_interval_matches_published_values() {
        // 95%: 8 of 10 → [0.490, 0.943]; 0 of 10 → [0, 0.278] (Newcombe 1998, table I).
        let w = WinRate::new(8.0, 10, 0.95);
        assert!((w.lower - 0.4902).abs() < 1e-3 && (w.upper - 0.9433).abs() < 1e-3, "{w:?}");
        let w = WinRate::new(0.0, 10, 0.95);
        assert!(w.lower == 0.0 && (w.upper - 0.2775).abs() < 1e-3, "{w:?}");
    }

    #[test]
    fn a_coin_flip_on_three_prompts_proves_nothing() {
        let w = WinRate::from_outcomes(
            [std::cmp::Ordering::Greater, std::cmp::Ordering::Less, std::cmp::Ordering::Equal],
            0.95,
        );
        assert_eq!(w.rate, 0.5);
        assert!(w.lower < 0.15 && w.upper > 0.85, "{w:?}");
        // 45 wins of 60 is clearly better than even.
        assert!(WinRate::new(45.0, 60, 0.95).lower > 0.6);
        assert_eq!(WinRate::new(0.0, 0, 0.95).lower, 0.0);
    }
}
