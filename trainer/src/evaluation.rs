//! The evaluation gate: decides whether a candidate policy is offered to the
//! gateway for rollout, by comparing it with the policy now offered ("serving")
//! on held-out users' prompts (validation and test splits; users the candidate
//! never trained on).
//!
//! Measured, as the paper's evaluation does with labelers replaced by the
//! reward model:
//! - **win rate**: share of prompts where the RM scores the candidate's
//!   response above the serving policy's (ties count half);
//! - **mean reward** of both;
//! - **KL from SFT**: mean over the candidate's responses of
//!   `Σ_t log π_candidate(y_t) - log π_SFT(y_t)` (nats per response);
//! - **alignment tax**: the candidate's per-token NLL on held-out pre-training
//!   text minus the serving policy's (positive = the candidate got worse).
//!
//! Responses are sampled through the serving engine at the configured
//! temperature with fixed seeds, so two runs over the same checkpoints agree.
//! Thresholds in `[trainer.evaluation]` turn the numbers into a verdict; each
//! failed threshold is named in `reasons`. The win rate is judged by the lower
//! end of its confidence interval ([`WinRate`]), not the bare share, and never
//! on fewer than `min_prompts` prompts: noise does not pass.

use std::path::Path;

use candle_core::DType;
use inference::load::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::corpus::{PretrainCorpus, held_out_loss};
use crate::episodes::{SampleSettings, engine_for, response_logprobs, sample};
use crate::policy_model::TrainResult;
use crate::reward_model::RewardModel;
use crate::win_rate::WinRate;

/// `[trainer.evaluation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// Evaluate at all (false: every candidate is offered).
    pub enabled: bool,
    /// Held-out prompts used at most.
    pub max_prompts: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    /// The lower end of the win rate's confidence interval must exceed this (0.5: better than the serving
    /// policy with that confidence).
    pub min_win_rate: f64,
    /// Two-sided confidence level of the win-rate interval (Wilson score interval).
    pub confidence: f64,
    /// Fewer held-out prompts than this: the candidate is held back (too few to judge).
    pub min_prompts: usize,
    /// At most this KL from the SFT policy (nats per response); `None`: no limit.
    pub max_kl_from_sft: Option<f64>,
    /// At most this increase of held-out pre-training NLL (nats per token); `None`: no limit.
    pub max_alignment_tax: Option<f64>,
    /// Held-out pre-training windows measured.
    pub ptx_windows: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_prompts: 32,
            max_new_tokens: 48,
            temperature: 1.0,
            seed: 1234,
            min_win_rate: 0.5,
            confidence: 0.95,
            min_prompts: 16,
            max_kl_from_sft: Some(25.0),
            max_alignment_tax: Some(0.5),
            ptx_windows: 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub win_rate: f64,
    /// The win rate's confidence interval (`confidence` two-sided).
    pub win_rate_lower: f64,
    pub win_rate_upper: f64,
    pub confidence: f64,
    pub candidate_reward: f64,
    pub serving_reward: f64,
    pub kl_from_sft: f64,
    pub ptx_loss_candidate: Option<f64>,
    pub ptx_loss_serving: Option<f64>,
    pub alignment_tax: Option<f64>,
    /// Prompts compared.
    pub prompts: usize,
    /// Which users' prompts: "held_out" (validation + test) or "train" when no held-out prompt exists yet.
    pub prompt_split: String,
    pub passed: bool,
    /// The thresholds the candidate missed.
    pub reasons: Vec<String>,
    pub wall_secs: f64,
}

/// The models an evaluation compares.
pub struct GateInputs<'a> {
    pub candidate_dir: &'a Path,
    pub serving_dir: &'a Path,
    pub sft_dir: &'a Path,
    pub reward_model: &'a RewardModel,
    /// Held-out users' prompts (or training prompts, see `prompt_split`).
    pub prompts: &'a [String],
    pub prompt_split: &'a str,
    pub corpus: Option<&'a PretrainCorpus>,
}

impl GateConfig {
    /// How candidates are sampled: also how SFT epochs are scored once a reward model exists.
    pub fn sample_settings(&self) -> SampleSettings {
        SampleSettings {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            seed: self.seed,
            max_prompt_tokens: 512,
        }
    }
}

pub fn evaluate(inputs: GateInputs<'_>, config: &GateConfig) -> TrainResult<Evaluation> {
    let started = std::time::Instant::now();
    let prompts: Vec<String> = inputs.prompts.iter().take(config.max_prompts.max(1)).cloned().collect();
    let settings = config.sample_settings();
    // Each model is loaded once: its engine samples, then the same weights score.
    let device = inference::load::default_device();
    let candidate_model = LoadedModel::load(inputs.candidate_dir, DType::F32, &device)?;
    let candidate = sample(&engine_for(&candidate_model, "candidate", prompts.len())?, &prompts, settings)?;
    crate::stop::check()?;
    let serving_model = LoadedModel::load(inputs.serving_dir, DType::F32, &device)?;
    let serving = sample(&engine_for(&serving_model, "serving", prompts.len())?, &prompts, settings)?;

    // Compare on the prompts both answered (the same set unless lengths differ).
    let serving_by_prompt: std::collections::HashMap<usize, &str> =
        serving.iter().map(|e| (e.prompt_index, e.text.as_str())).collect();
    let (mut cand_pairs, mut serv_pairs) = (Vec::new(), Vec::new());
    for e in &candidate {
        if let Some(text) = serving_by_prompt.get(&e.prompt_index) {
            cand_pairs.push((prompts[e.prompt_index].as_str(), e.text.as_str()));
            serv_pairs.push((prompts[e.prompt_index].as_str(), *text));
        }
    }
    let cand_scores = inputs.reward_model.score(&cand_pairs)?;
    let serv_scores = inputs.reward_model.score(&serv_pairs)?;
    let win_rate = WinRate::from_outcomes(
        cand_scores.iter().zip(&serv_scores).map(|(c, s)| c.partial_cmp(s).unwrap_or(std::cmp::Ordering::Equal)),
        config.confidence,
    );
    let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64;

    crate::stop::check()?;
    let cand_lp = response_logprobs(&candidate_model.model, &candidate, 8)?;
    // An SFT candidate is its own reference (KL 0); only a PPO candidate loads its SFT policy.
    let sft_lp = if inputs.sft_dir == inputs.candidate_dir {
        cand_lp.clone()
    } else {
        let sft_model = LoadedModel::load(inputs.sft_dir, DType::F32, &device)?;
        response_logprobs(&sft_model.model, &candidate, 8)?
    };
    let kl_from_sft =
        cand_lp.iter().zip(&sft_lp).map(|(c, s)| f64::from(c - s)).sum::<f64>() / candidate.len().max(1) as f64;

    let (ptx_loss_candidate, ptx_loss_serving) = match inputs.corpus {
        Some(corpus) => {
            let windows = corpus.held_out(config.ptx_windows);
            let c = held_out_loss(&candidate_model.model, &windows, 4)?;
            let s = held_out_loss(&serving_model.model, &windows, 4)?;
            (Some(f64::from(c)), Some(f64::from(s)))
        }
        None => (None, None),
    };
    let alignment_tax = ptx_loss_candidate.zip(ptx_loss_serving).map(|(c, s)| c - s);

    let mut reasons = Vec::new();
    if cand_scores.len() < config.min_prompts.max(1) {
        reasons.push(format!(
            "only {} held-out prompts answered by both policies; at least {} are needed to judge",
            cand_scores.len(),
            config.min_prompts.max(1)
        ));
    } else if win_rate.lower <= config.min_win_rate {
        reasons.push(format!(
            "win rate {:.3} on {} prompts: the {:.0}% interval [{:.3}, {:.3}] does not lie above {:.3}",
            win_rate.rate,
            win_rate.n,
            win_rate.confidence * 100.0,
            win_rate.lower,
            win_rate.upper,
            config.min_win_rate
        ));
    }
    if let Some(max) = config.max_kl_from_sft.filter(|&max| kl_from_sft > max) {
        reasons.push(format!("KL from SFT {kl_from_sft:.2} nats exceeds {max:.2}"));
    }
    match (config.max_alignment_tax, alignment_tax) {
        (Some(max), Some(tax)) if tax > max => {
            reasons.push(format!("alignment tax {tax:.3} nats/token exceeds {max:.3}"));
        }
        (Some(_), None) => reasons.push("alignment tax not measured: no pre-training corpus".to_string()),
        _ => {}
    }
    let evaluation = Evaluation {
        win_rate: win_rate.rate,
        win_rate_lower: win_rate.lower,
        win_rate_upper: win_rate.upper,
        confidence: win_rate.confidence,
        candidate_reward: mean(&cand_scores),
        serving_reward: mean(&serv_scores),
        kl_from_sft,
        ptx_loss_candidate,
        ptx_loss_serving,
        alignment_tax,
        prompts: cand_scores.len(),
        prompt_split: inputs.prompt_split.to_string(),
        passed: reasons.is_empty(),
        reasons,
        wall_secs: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        win_rate = evaluation.win_rate,
        win_rate_lower = evaluation.win_rate_lower,
        prompts = evaluation.prompts,
        candidate_reward = evaluation.candidate_reward,
        serving_reward = evaluation.serving_reward,
        kl_from_sft = evaluation.kl_from_sft,
        alignment_tax = ?evaluation.alignment_tax,
        passed = evaluation.passed,
        "evaluation gate"
    );
    Ok(evaluation)
}
