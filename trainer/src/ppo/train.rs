//! The PPO-ptx loop: per iteration, [`rollout`], [`score`], [`advantages`] and the minibatch [`ppo_step`]s, its
//! numbers logged and journaled; then the saved policy (the EMA of its weights when set) and its report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use inference::engine::Engine;
use inference::load::LoadedModel;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::corpus::PretrainCorpus;
use crate::episodes::{Episode, engine_sharing};
use crate::kl_controller::KlController;
use crate::optim::LrSchedule;
use crate::policy_model::{PolicyModel, TrainError, TrainResult};
use crate::reward_model::RewardModel;
use crate::step::write_report;

use super::experience::{Advantages, Experience, RewardNormaliser, advantages, rewards, score};
use super::rollout::{PromptCycle, rollout};
use super::update::{Ema, Learners, Minibatch, PolicyOutcome, ValueOutcome, ppo_step};
use super::{PpoConfig, REPORT_FILE};

/// One iteration's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoIteration {
    /// 1-based.
    pub iteration: usize,
    pub episodes: usize,
    /// Mean RM score of the iteration's rollouts.
    pub reward_mean: f32,
    pub reward_std: f32,
    /// β used for this iteration's penalty.
    pub kl_coef: f64,
    /// Mean over episodes of `Σ_t log π(y_t) - log π_SFT(y_t)` (nats per response).
    pub kl: f32,
    /// Mean per-token entropy of the policy on its responses.
    pub entropy: f32,
    pub clip_fraction: f32,
    pub approx_kl: f32,
    pub policy_loss: f32,
    pub value_loss: f32,
    /// Pre-training NLL per token; `None` when γ = 0.
    pub ptx_loss: Option<f32>,
    pub lr: f64,
    pub response_tokens_mean: f32,
    /// Share of rollouts that ended with end-of-sequence (rest hit `max_new_tokens`).
    pub stopped_fraction: f32,
    pub rollout_secs: f64,
    pub wall_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoReport {
    pub iterations: Vec<PpoIteration>,
    pub policy_dir: PathBuf,
    pub reference_dir: PathBuf,
    pub reward_model_dir: PathBuf,
    pub train_prompts: usize,
    pub saved_ema: bool,
    pub wall_secs: f64,
    pub config: PpoConfig,
}

/// What a PPO run starts from.
pub struct PpoInputs<'a> {
    /// The policy to improve (an SFT or earlier PPO checkpoint).
    pub policy_dir: &'a Path,
    /// The SFT policy of the KL penalty.
    pub reference_dir: &'a Path,
    /// The reward model: the scorer, and the value function's initialisation.
    pub reward_model_dir: &'a Path,
    /// Training prompts.
    pub prompts: &'a [String],
    /// Pre-training text; required when `ptx_coef > 0`.
    pub corpus: Option<&'a PretrainCorpus>,
}

/// Runs PPO-ptx and writes the policy to `out_dir` (with `ppo.json`). `progress` sees every iteration as it ends.
pub fn train(
    inputs: PpoInputs<'_>,
    config: PpoConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(&PpoIteration),
) -> TrainResult<PpoReport> {
    config.validate()?;
    if inputs.prompts.is_empty() {
        return Err(TrainError::Data("no training prompts to sample rollouts from".into()));
    }
    let corpus = match (config.ptx_coef > 0.0, inputs.corpus) {
        (true, None) => return Err(TrainError::Data("ptx_coef > 0 needs a pre-training corpus".into())),
        (true, Some(c)) => Some(c),
        (false, _) => None,
    };
    let started = Instant::now();
    let models = PpoModels::load(&inputs, &config)?;
    let engine = engine_sharing(&models.policy, "ppo-rollout", config.episodes_per_iteration)?;
    let mut run = PpoRun::new(&models, inputs.prompts, corpus, &config)?;
    tracing::info!(
        policy = %inputs.policy_dir.display(),
        reference = %inputs.reference_dir.display(),
        reward_model = %inputs.reward_model_dir.display(),
        prompts = inputs.prompts.len(),
        iterations = config.iterations,
        "PPO starts"
    );
    let mut iterations = Vec::with_capacity(config.iterations);
    for iteration in 1..=config.iterations {
        crate::stop::check()?;
        let record = run.iteration(&engine, iteration)?;
        progress(&record);
        iterations.push(record);
    }
    drop(engine);
    let ema = run.finish();

    let saved_ema = match ema {
        Some(ema) => {
            ema.restore(&models.policy)?;
            true
        }
        None => false,
    };
    models.policy.save(out_dir)?;
    let report = PpoReport {
        iterations,
        policy_dir: inputs.policy_dir.to_path_buf(),
        reference_dir: inputs.reference_dir.to_path_buf(),
        reward_model_dir: inputs.reward_model_dir.to_path_buf(),
        train_prompts: inputs.prompts.len(),
        saved_ema,
        wall_secs: started.elapsed().as_secs_f64(),
        config,
    };
    write_report(&out_dir.join(REPORT_FILE), &report)?;
    tracing::info!(wall_secs = report.wall_secs, out = %out_dir.display(), "PPO done");
    Ok(report)
}

/// A run in progress: the models being trained with their optimisers, the schedules, the EMA, the prompt order,
/// the KL controller and the reward normaliser.
struct PpoRun<'a> {
    models: &'a PpoModels,
    config: &'a PpoConfig,
    corpus: Option<&'a PretrainCorpus>,
    learners: Learners<'a>,
    schedule: LrSchedule,
    value_schedule: LrSchedule,
    ema: Option<Ema>,
    /// Orders the prompts, the minibatches and the corpus windows.
    rng: StdRng,
    prompts: PromptCycle<'a>,
    kl_controller: KlController,
    normaliser: RewardNormaliser,
}

impl<'a> PpoRun<'a> {
    fn new(
        models: &'a PpoModels,
        prompts: &'a [String],
        corpus: Option<&'a PretrainCorpus>,
        config: &'a PpoConfig,
    ) -> TrainResult<Self> {
        let mut rng = StdRng::seed_from_u64(config.seed);
        Ok(Self {
            learners: Learners::new(&models.policy, &models.critic, config)?,
            schedule: LrSchedule::warmup_constant(config.learning_rate, config.warmup_iterations),
            value_schedule: LrSchedule::warmup_constant(config.value_learning_rate, config.warmup_iterations),
            ema: config.ema_decay.map(|decay| Ema::new(&models.policy, decay)).transpose()?,
            prompts: PromptCycle::new(prompts, &mut rng),
            rng,
            kl_controller: KlController::new(config.kl_coef, config.kl_target, config.kl_horizon),
            normaliser: RewardNormaliser::default(),
            models,
            config,
            corpus,
        })
    }

    /// One iteration (1-based): rollouts, scoring, advantages and the minibatch steps; its numbers, logged, and
    /// β adapted to the KL it measured.
    fn iteration(&mut self, engine: &Engine, iteration: usize) -> TrainResult<PpoIteration> {
        let span = tracing::info_span!("ppo_iteration", iteration);
        let _entered = span.enter();
        let it_start = Instant::now();
        let (config, models) = (self.config, self.models);
        let (lr, value_lr) = (self.schedule.lr(iteration - 1), self.value_schedule.lr(iteration - 1));

        // 1. Rollouts, on the engine's own pool.
        let prompts = self.prompts.take(config.episodes_per_iteration, &mut self.rng);
        let episodes = rollout(engine, &prompts, config, iteration)?;
        let rollout_secs = it_start.elapsed().as_secs_f64();

        // 2-4 run on the training pool (see `compute_pool`).
        let (scores, experience, advantages, stats) = crate::compute_pool::run(|| -> TrainResult<_> {
            // 2. Scores, old and reference log-probabilities, values.
            let scores = rewards(&models.scorer, &prompts, &episodes)?;
            let shaped_scores = if config.normalize_rewards {
                self.normaliser.normalise(&scores, &models.critic, iteration == 1)?
            } else {
                scores.clone()
            };
            let (policy, reference) = (models.policy.llama(), &models.reference.model);
            let experience = score(policy, reference, &models.critic, &episodes, config.minibatch_size)?;
            // 3. Shaped rewards, GAE, whitening.
            let advantages = advantages(&experience, &shaped_scores, self.kl_controller.beta(), config.gae_lambda)?;
            // 4. Optimisation.
            let stats = self.optimise(&experience, &advantages, lr, value_lr)?;
            Ok((scores, experience, advantages, stats))
        })?;
        let record = PpoIteration {
            kl_coef: self.kl_controller.beta(),
            lr,
            rollout_secs,
            wall_secs: it_start.elapsed().as_secs_f64(),
            ..summarise(iteration, &episodes, &scores, &experience, &advantages, &stats)?
        };
        tracing::info!(
            iteration,
            reward = record.reward_mean,
            kl = record.kl,
            entropy = record.entropy,
            clip_fraction = record.clip_fraction,
            value_loss = record.value_loss,
            ptx_loss = ?record.ptx_loss,
            lr,
            wall_secs = record.wall_secs,
            "PPO iteration done"
        );
        self.kl_controller.update(f64::from(record.kl), record.episodes);
        Ok(record)
    }

    /// `inner_epochs` passes over the iteration's episodes in shuffled minibatches, one [`ppo_step`] each (with
    /// `ptx_per_episode` corpus windows per episode when there is a corpus) and the EMA after it.
    fn optimise(
        &mut self,
        experience: &Experience,
        advantages: &Advantages,
        lr: f64,
        value_lr: f64,
    ) -> TrainResult<IterationStats> {
        let config = self.config;
        let mut stats = IterationStats::default();
        let rows: Vec<usize> = (0..experience.batch.response_tokens.len()).collect();
        for _ in 0..config.inner_epochs {
            let mut shuffled = rows.clone();
            shuffled.shuffle(&mut self.rng);
            for rows in shuffled.chunks(config.minibatch_size) {
                crate::stop::check()?;
                let minibatch = Minibatch::select(experience, advantages, rows)?;
                let windows = self.corpus.map(|c| c.sample(&mut self.rng, config.ptx_per_episode.max(1) * rows.len()));
                let (policy, value) =
                    ppo_step(&mut self.learners, &minibatch, windows.as_deref(), config, lr, value_lr)?;
                if let Some(ema) = self.ema.as_mut() {
                    ema.update(self.learners.policy)?;
                }
                stats.add(&policy, &value);
            }
        }
        Ok(stats)
    }

    /// Ends the run, handing back the EMA of the policy weights (when kept).
    fn finish(self) -> Option<Ema> {
        self.ema
    }
}

/// The four models of a run: the policy being tuned, the SFT reference of the KL penalty, the reward model that
/// scores, and the value function (a second copy of the reward model, read at every position).
pub struct PpoModels {
    pub policy: PolicyModel,
    pub reference: LoadedModel,
    pub scorer: RewardModel,
    pub critic: RewardModel,
}

impl PpoModels {
    pub fn load(inputs: &PpoInputs<'_>, config: &PpoConfig) -> TrainResult<Self> {
        let device = inference::load::default_device();
        let policy = PolicyModel::load(inputs.policy_dir, &device)?.with_cost_options(&config.cost_options())?;
        let reference = LoadedModel::load(inputs.reference_dir, DType::F32, &device)?;
        let scorer = RewardModel::load_on(inputs.reward_model_dir, &device)?;
        let critic =
            RewardModel::load_on(inputs.reward_model_dir, &device)?.with_cost_options(&config.cost_options())?;
        if reference.files.config.vocab_size != policy.config().vocab_size {
            return Err(TrainError::Data("the reference policy's vocabulary differs from the policy's".into()));
        }
        Ok(Self { policy, reference, scorer, critic })
    }
}

/// Per-step statistics summed over an iteration.
#[derive(Default)]
struct IterationStats {
    steps: usize,
    policy_loss: f32,
    value_loss: f32,
    ptx_loss: Option<f32>,
    clip_fraction: f32,
    approx_kl: f32,
    entropy: f32,
}

impl IterationStats {
    fn add(&mut self, policy: &PolicyOutcome, value: &ValueOutcome) {
        self.steps += 1;
        self.policy_loss += policy.loss;
        self.value_loss += value.loss;
        if let Some(p) = policy.ptx_loss {
            *self.ptx_loss.get_or_insert(0.0) += p;
        }
        self.clip_fraction += policy.clip_fraction;
        self.approx_kl += policy.approx_kl;
        self.entropy += policy.entropy;
    }

    fn mean(&self, sum: f32) -> f32 {
        sum / self.steps.max(1) as f32
    }
}

/// The iteration's numbers from its episodes, scores and steps; β, the learning rate and the times are left 0 for
/// the caller to fill in.
fn summarise(
    iteration: usize,
    episodes: &[Episode],
    scores: &[f32],
    experience: &Experience,
    advantages: &Advantages,
    stats: &IterationStats,
) -> TrainResult<PpoIteration> {
    let n = episodes.len() as f32;
    let reward_mean = scores.iter().sum::<f32>() / n;
    let reward_std = (scores.iter().map(|s| (s - reward_mean).powi(2)).sum::<f32>() / n).sqrt();
    let kl_per_episode = experience.batch.response_sums(&advantages.kl)?;
    Ok(PpoIteration {
        iteration,
        episodes: episodes.len(),
        reward_mean,
        reward_std,
        kl_coef: 0.0,
        kl: kl_per_episode.iter().sum::<f32>() / n,
        entropy: stats.mean(stats.entropy),
        clip_fraction: stats.mean(stats.clip_fraction),
        approx_kl: stats.mean(stats.approx_kl),
        policy_loss: stats.mean(stats.policy_loss),
        value_loss: stats.mean(stats.value_loss),
        ptx_loss: stats.ptx_loss.map(|p| p / stats.steps.max(1) as f32),
        lr: 0.0,
        response_tokens_mean: experience.batch.response_tokens.iter().sum::<usize>() as f32 / n,
        stopped_fraction: episodes.iter().filter(|e| e.stopped).count() as f32 / n,
        rollout_secs: 0.0,
        wall_secs: 0.0,
    })
}
