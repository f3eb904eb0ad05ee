//! The Bradley-Terry model over pairwise votes, with bootstrap intervals.
//!
//! Each player (checkpoint) has a strength θ; the chance that `i` beats `j`
//! is σ(θᵢ − θⱼ). The fit maximises the log-likelihood of the votes (a tie
//! counts half a win each way) plus a weak Gaussian prior (λ/2 · Σθ²), which
//! keeps strengths finite when a player won or lost every vote and pins the
//! scale's origin at the mean. The penalised log-likelihood is concave, so
//! Newton's method converges in a handful of steps for the few dozen
//! checkpoints a leaderboard holds. Confidence intervals come from
//! resampling votes with replacement (the nonparametric bootstrap LMSYS's
//! Chatbot Arena reports), seeded so a table is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One vote between players `first` and `second` (indices).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub first: usize,
    pub second: usize,
    /// 1.0: `first` won; 0.0: `second` won; 0.5: a tie.
    pub score: f64,
}

/// The prior's weight λ: as if each player had drawn about 0.08 of a vote
/// against the average player (negligible once a player has a few votes).
pub const DEFAULT_PRIOR: f64 = 0.02;

/// Strengths on the natural-log odds scale, one per player.
pub fn fit(players: usize, outcomes: &[Outcome], prior: f64) -> Vec<f64> {
    let wins = win_matrix(players, outcomes.iter());
    fit_wins(&wins, prior)
}

/// A strength turned into an Elo-like rating: 400 points for 10:1 odds, 1000 at the mean.
pub fn rating(strength: f64) -> f64 {
    1000.0 + strength * 400.0 / std::f64::consts::LN_10
}

/// The probability that a player of strength `a` beats one of strength `b`.
pub fn win_probability(a: f64, b: f64) -> f64 {
    sigmoid(a - b)
}

/// Strengths refitted on resampled votes.
pub struct Bootstrap {
    /// `rounds` rows of one strength per player.
    pub samples: Vec<Vec<f64>>,
}

impl Bootstrap {
    /// Refits `rounds` times on votes drawn with replacement from `outcomes`.
    pub fn run(players: usize, outcomes: &[Outcome], prior: f64, rounds: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let samples = (0..rounds)
            .map(|_| {
                let draw = (0..outcomes.len()).map(|_| &outcomes[rng.random_range(0..outcomes.len())]);
                fit_wins(&win_matrix(players, draw), prior)
            })
            .collect();
        Self { samples }
    }

    /// The central `confidence` interval of player `i`'s strength.
    pub fn strength_interval(&self, i: usize, confidence: f64) -> (f64, f64) {
        interval(self.samples.iter().map(|s| s[i]).collect(), confidence)
    }

    /// The central `confidence` interval of the probability that `i` beats `j`.
    pub fn win_probability_interval(&self, i: usize, j: usize, confidence: f64) -> (f64, f64) {
        interval(self.samples.iter().map(|s| win_probability(s[i], s[j])).collect(), confidence)
    }
}

/// `wins[i][j]`: how many votes `i` won against `j` (ties add half to both).
fn win_matrix<'a>(players: usize, outcomes: impl Iterator<Item = &'a Outcome>) -> Vec<Vec<f64>> {
    let mut wins = vec![vec![0.0; players]; players];
    for o in outcomes {
        if o.first == o.second || o.first >= players || o.second >= players {
            continue;
        }
        wins[o.first][o.second] += o.score;
        wins[o.second][o.first] += 1.0 - o.score;
    }
    wins
}

fn fit_wins(wins: &[Vec<f64>], prior: f64) -> Vec<f64> {
    let players = wins.len();
    let mut theta = vec![0.0; players];
    for _ in 0..100 {
        // Gradient and the negated Hessian of the penalised log-likelihood.
        let mut gradient: Vec<f64> = theta.iter().map(|t| -prior * t).collect();
        let mut curvature = vec![vec![0.0; players]; players];
        for i in 0..players {
            curvature[i][i] = prior;
            for j in 0..players {
                let games = wins[i][j] + wins[j][i];
                if i == j || games == 0.0 {
                    continue;
                }
                let p = sigmoid(theta[i] - theta[j]);
                gradient[i] += wins[i][j] - games * p;
                let w = games * p * (1.0 - p);
                curvature[i][i] += w;
                curvature[i][j] -= w;
            }
        }
        let Some(step) = solve_spd(curvature, gradient) else { break };
        let size = step.iter().fold(0.0f64, |m, s| m.max(s.abs()));
        for (t, s) in theta.iter_mut().zip(&step) {
            *t += s;
        }
        if size < 1e-10 {
            break;
        }
    }
    theta
}

/// Solves `a x = b` for a symmetric positive definite `a` (Cholesky); `None` if `a` is not.
fn solve_spd(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for j in 0..n {
        let diagonal = a[j][j] - (0..j).map(|k| a[j][k] * a[j][k]).sum::<f64>();
        if diagonal <= 0.0 || !diagonal.is_finite() {
            return None;
        }
        a[j][j] = diagonal.sqrt();
        for i in j + 1..n {
            a[i][j] = (a[i][j] - (0..j).map(|k| a[i][k] * a[j][k]).sum::<f64>()) / a[j][j];
        }
    }
    // L y = b, then Lᵀ x = y, in place.
    for i in 0..n {
        b[i] = (b[i] - (0..i).map(|k| a[i][k] * b[k]).sum::<f64>()) / a[i][i];
    }
    for i in (0..n).rev() {
        b[i] = (b[i] - (i + 1..n).map(|k| a[k][i] * b[k]).sum::<f64>()) / a[i][i];
    }
    Some(b)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The central interval of `values` covering `confidence` (percentiles, linear between samples).
fn interval(mut values: Vec<f64>, confidence: f64) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence.clamp(0.0, 1.0)) / 2.0;
    (percentile(&values, tail), percentile(&values, 1.0 - tail))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn votes(first: usize, second: usize, first_wins: usize, second_wins: usize, ties: usize) -> Vec<Outcome> {
        let mut out = vec![Outcome { first, second, score: 1.0 }; first_wins];
        out.extend(vec![Outcome { first, second, score: 0.0 }; second_wins]);
        out.extend(vec![Outcome { first, second, score: 0.5 }; ties]);
        out
    }

    #[test]
    fn two_players_recover_the_observed_odds() {
        // 75 wins to 25: the maximum-likelihood strength gap is ln 3 (the prior moves it slightly).
        let theta = fit(2, &votes(0, 1, 75, 25, 0), 1e-9);
        assert!(((theta[0] - theta[1]) - 3f64.ln()).abs() < 1e-6, "{theta:?}");
        assert!((win_probability(theta[0], theta[1]) - 0.75).abs() < 1e-6);
    }

    #[test]
    fn ties_count_half_and_the_order_of_a_pair_does_not_matter() {
        let a = fit(2, &votes(0, 1, 10, 0, 10), DEFAULT_PRIOR);
        let b = fit(2, &votes(1, 0, 0, 10, 10), DEFAULT_PRIOR);
        assert!((a[0] - b[0]).abs() < 1e-9 && (a[1] - b[1]).abs() < 1e-9);
        // 15 of 20 points: odds 3:1.
        assert!((win_probability(a[0], a[1]) - 0.75).abs() < 0.01);
    }

    #[test]
    fn a_clean_sweep_stays_finite_and_strengths_are_transitive() {
        let mut all = votes(0, 1, 20, 0, 0);
        all.extend(votes(1, 2, 15, 5, 0));
        let theta = fit(3, &all, DEFAULT_PRIOR);
        assert!(theta.iter().all(|t| t.is_finite()));
        assert!(theta[0] > theta[1] && theta[1] > theta[2], "{theta:?}");
        // Players 0 and 2 never met; the model still orders them.
        assert!(win_probability(theta[0], theta[2]) > 0.9);
        // The prior centres the scale.
        assert!(theta.iter().sum::<f64>().abs() < 1e-6);
    }

    #[test]
    fn a_player_without_votes_sits_at_the_mean() {
        let theta = fit(3, &votes(0, 1, 5, 5, 0), DEFAULT_PRIOR);
        assert!(theta[2].abs() < 1e-12);
        assert!((rating(theta[2]) - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn bootstrap_intervals_cover_the_fit_and_shrink_with_more_votes() {
        let few = votes(0, 1, 12, 8, 0);
        let many: Vec<Outcome> = few.iter().cycle().take(few.len() * 20).copied().collect();
        let width = |outcomes: &[Outcome]| {
            let boot = Bootstrap::run(2, outcomes, DEFAULT_PRIOR, 300, 7);
            let (low, high) = boot.win_probability_interval(0, 1, 0.95);
            let theta = fit(2, outcomes, DEFAULT_PRIOR);
            let p = win_probability(theta[0], theta[1]);
            assert!(low <= p && p <= high, "{low} {p} {high}");
            high - low
        };
        let (narrow, wide) = (width(&many), width(&few));
        assert!(narrow < wide / 2.0, "{narrow} vs {wide}");
        // 12:8 in 20 votes is not enough to call it; 240:160 in 400 is.
        let boot = Bootstrap::run(2, &few, DEFAULT_PRIOR, 300, 7);
        assert!(boot.win_probability_interval(0, 1, 0.95).0 < 0.5);
        let boot = Bootstrap::run(2, &many, DEFAULT_PRIOR, 300, 7);
        assert!(boot.win_probability_interval(0, 1, 0.95).0 > 0.5);
    }

    #[test]
    fn the_same_seed_gives_the_same_intervals() {
        let all = votes(0, 1, 9, 4, 2);
        let a = Bootstrap::run(2, &all, DEFAULT_PRIOR, 50, 3).strength_interval(0, 0.9);
        let b = Bootstrap::run(2, &all, DEFAULT_PRIOR, 50, 3).strength_interval(0, 0.9);
        assert_eq!(a, b);
    }

    #[test]
    fn out_of_range_and_self_votes_are_ignored() {
        let theta =
            fit(2, &[Outcome { first: 0, second: 0, score: 1.0 }, Outcome { first: 5, second: 1, score: 1.0 }], 0.1);
        assert_eq!(theta, vec![0.0, 0.0]);
    }
}
