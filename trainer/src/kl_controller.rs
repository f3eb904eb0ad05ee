//! The KL coefficient β of PPO's per-token penalty against the SFT policy: fixed (the paper's 0.02), or adapted
//! towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2).
//!
//! The adaptive rule: after each iteration with measured KL `k` (nats per response, summed over its tokens),
//! `e = clip(k / target - 1, -0.2, 0.2)` and `β ← β (1 + e · episodes / horizon)`. A policy drifting past the
//! target gets a growing penalty; one that stays close is let go further. Ziegler et al. used target 6 nats and
//! horizon 10,000 episodes; with CPU-sized iterations of a few dozen episodes a shorter horizon moves β within a
//! run.

use serde::{Deserialize, Serialize};

/// How β moves (`[trainer.ppo] kl_target`, `kl_horizon`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlController {
    beta: f64,
    target: Option<f64>,
    horizon: f64,
}

/// The clip on the proportional error, as in Ziegler et al.
const MAX_ERROR: f64 = 0.2;

impl KlController {
    /// β fixed at `beta` when `target` is `None`; otherwise starting at `beta` and adapted.
    pub fn new(beta: f64, target: Option<f64>, horizon: usize) -> Self {
        Self { beta, target, horizon: horizon.max(1) as f64 }
    }

    /// The β to use now.
    pub fn beta(&self) -> f64 {
        self.beta
    }

    /// Moves β after an iteration of `episodes` episodes whose mean KL from the reference was `kl`.
    pub fn update(&mut self, kl: f64, episodes: usize) {
        let Some(target) = self.target.filter(|t| *t > 0.0) else {
            return;
        };
        if !kl.is_finite() {
            return;
        }
        let error = (kl / target - 1.0).clamp(-MAX_ERROR, MAX_ERROR);
        self.beta *= 1.0 + error * episodes as f64 / self.horizon;
    }
}

/// Mean and variance of rewards, updated batch by batch (Chan et al.'s parallel update), for normalising the RM's
/// scores so the advantage scale does not depend on how far apart this RM happens to spread its scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMoments {
    pub count: f64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    m2: f64,
}

impl RunningMoments {
    pub fn update(&mut self, values: &[f32]) {
        if values.is_empty() {
            return;
        }
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let m2 = values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>();
        let total = self.count + n;
        let delta = mean - self.mean;
        self.m2 += m2 + delta * delta * self.count * n / total;
        self.mean += delta * n / total;
        self.count = total;
    }

    pub fn std(&self) -> f64 {
        if self.count < 2.0 { 1.0 } else { (self.m2 / (self.count - 1.0)).sqrt() }
    }

    /// `(v - mean) / std` with the moments so far.
    pub fn normalise(&self, values: &[f32]) -> Vec<f32> {
        let std = self.std().max(1e-6);
        values.iter().map(|&v| ((f64::from(v) - self.mean) / std) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_beta_never_moves() {
        let mut c = KlController::new(0.02, None, 100);
        c.update(50.0, 64);
        assert_eq!(c.beta(), 0.02);
    }

    #[test]
    fn adaptive_beta_follows_the_target_with_a_clipped_step() {
        let mut c = KlController::new(0.1, Some(6.0), 100);
        c.update(12.0, 10); // error clipped to +0.2: β × 1.02
        assert!((c.beta() - 0.102).abs() < 1e-12, "{}", c.beta());
        c.update(3.0, 10); // error -0.5 clipped to -0.2: β × 0.98
        assert!((c.beta() - 0.102 * 0.98).abs() < 1e-12);
        c.update(6.6, 50); // error +0.1: β × 1.05
        assert!((c.beta() - 0.102 * 0.98 * 1.05).abs() < 1e-12);
        c.update(f64::NAN, 50);
        assert!((c.beta() - 0.102 * 0.98 * 1.05).abs() < 1e-12);
    }

    #[test]
    fn running_moments_match_the_whole_sample() {
        let all: Vec<f32> = (0..20).map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0).collect();
        let mut m = RunningMoments::default();
        for chunk in all.chunks(6) {
            m.update(chunk);
        }
        let mean = all.iter().map(|&v| f64::from(v)).sum::<f64>() / 20.0;
        let var = all.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / 19.0;
        assert!((m.mean - mean).abs() < 1e-9 && (m.std() - var.sqrt()).abs() < 1e-9);
        let z = m.normalise(&all);
        assert!(z.iter().map(|&v| f64::from(v)).sum::<f64>().abs() < 1e-4);
    }
}
