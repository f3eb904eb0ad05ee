//! Where training runs. The refresher decides *what* to train and publishes
//! the result; a [`TrainingBackend`] does the training of one stage into an
//! output directory and returns its metrics.
//!
//! - [`InProcess`] (the default) runs SFT, the reward model and PPO-ptx in this
//!   process with candle (CPU; CUDA with the `cuda` feature).
//! - [`External`] hands the stage to a command, e.g. a DeepSpeed or OpenRLHF
//!   job on a GPU cluster, so users who outgrow one machine keep the same
//!   loop: same dataset snapshots in (the snapshot's JSONL files), Hugging
//!   Face safetensors out. The command sees everything through environment
//!   variables (see [`External::run`]) and must leave a loadable model
//!   directory in `INSTRUCTD_OUTPUT_DIR` (a reward model as `rm.json` +
//!   `reward_head.safetensors` beside the trunk); an optional `metrics.json`
//!   there becomes the checkpoint's metrics. A failed command, a timeout or an
//!   output that does not load fails the refresh and publishes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use feedback::split::Split;
use inference::checkpoint::Stage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::TrainerConfig;
use crate::corpus::PretrainCorpus;
use crate::policy_model::{TrainError, TrainResult};
use crate::ppo::{self, PpoIteration};
use crate::reward_model::{self, RewardModel};
use crate::sft;
use crate::snapshot::Dataset;

/// `[trainer.backend]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    pub kind: BackendKind,
    /// The external command and its arguments (`kind = "external"`).
    pub command: Vec<String>,
    /// An external stage running longer is killed and the refresh fails.
    pub timeout_secs: u64,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self { kind: BackendKind::InProcess, command: Vec::new(), timeout_secs: 24 * 3600 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    InProcess,
    External,
}

/// One stage to train.
pub struct StageJob<'a> {
    pub stage: Stage,
    /// The dataset snapshot's directory (`sft.jsonl`, `rm.jsonl`, `prompts.jsonl`, `manifest.json`).
    pub snapshot_dir: &'a Path,
    pub data: &'a Dataset,
    /// The policy training starts from (SFT, PPO) or whose trunk the reward model takes.
    pub policy_dir: &'a Path,
    /// PPO's KL reference (the SFT policy).
    pub reference_dir: Option<&'a Path>,
    /// PPO's reward model.
    pub reward_model_dir: Option<&'a Path>,
    /// PPO's pre-training text (in-process; an external job gets its directory).
    pub corpus: Option<&'a PretrainCorpus>,
    pub out_dir: &'a Path,
}

pub trait TrainingBackend: Send {
    fn name(&self) -> &'static str;

    /// Trains `job.stage` into `job.out_dir`; returns the checkpoint's metrics. `progress` sees PPO iterations
    /// as they end (in-process only).
    fn run(&self, job: &StageJob<'_>, progress: &mut dyn FnMut(&PpoIteration)) -> TrainResult<Value>;
}

/// The backend `config` asks for.
pub fn from_config(config: &TrainerConfig) -> TrainResult<Box<dyn TrainingBackend>> {
    match config.backend.kind {
        BackendKind::InProcess => Ok(Box::new(InProcess { config: config.clone() })),
        BackendKind::External => {
            if config.backend.command.is_empty() {
                return Err(TrainError::Data("[trainer.backend] kind = \"external\" needs a command".into()));
            }
            Ok(Box::new(External { config: config.clone() }))
        }
    }
}

/// Training in this process with candle.
pub struct InProcess {
    pub config: TrainerConfig,
}

impl TrainingBackend for InProcess {
    fn name(&self) -> &'static str {
        "in_process"
    }

    fn run(&self, job: &StageJob<'_>, progress: &mut dyn FnMut(&PpoIteration)) -> TrainResult<Value> {
        match job.stage {
            Stage::Sft => {
                let config = self.config.sft.clone();
                let report = match job.reward_model_dir {
                    // The paper picks the SFT epoch by reward-model score on validation prompts.
                    Some(rm_dir) => {
                        let scorer = RewardModel::load(rm_dir)?;
                        let prompts = validation_prompts(job.data, self.config.evaluation.max_prompts);
                        let mut select = |epoch: &sft::SftEpoch, model: &crate::policy_model::PolicyModel| {
                            let score = mean_reward(model, &scorer, &prompts, &self.config.evaluation)?;
                            tracing::info!(epoch = epoch.epoch, score, "SFT epoch scored by the reward model");
                            Ok(score)
                        };
                        sft::train_with_selector(job.policy_dir, &job.data.sft, config, job.out_dir, Some(&mut select))?
                    }
                    None => sft::train(job.policy_dir, &job.data.sft, config, job.out_dir)?,
                };
                Ok(json!({
                    "selected_by": report.selected_by,
                    "epoch_scores": report.epochs.iter().map(|e| e.score).collect::<Vec<_>>(),
                    "best_epoch": report.best_epoch,
                    "val_loss": report.epochs.get(report.best_epoch.saturating_sub(1)).and_then(|e| e.val_loss),
                    "train_loss": report.epochs.last().map(|e| e.train_loss),
                    "train_examples": report.train_examples,
                    "wall_secs": report.wall_secs,
                }))
            }
            Stage::RewardModel => {
                let config = self.config.reward_model.clone();
                let report = reward_model::train(job.policy_dir, &job.data.rm, &job.data.sft, config, job.out_dir)?;
                Ok(json!({
                    "val_accuracy_before": report.val_before.as_ref().map(|v| v.accuracy),
                    "val_accuracy": report.val.as_ref().map(|v| v.accuracy),
                    "val_pairs": report.val.as_ref().map(|v| v.pairs),
                    "val_accuracy_per_epoch":
                        report.epochs.iter().map(|e| e.val.as_ref().map(|v| v.accuracy)).collect::<Vec<_>>(),
                    "train_accuracy_per_epoch": report.epochs.iter().map(|e| e.train_accuracy).collect::<Vec<_>>(),
                    "kept_epoch": report.kept_epoch,
                    "activation_cache_secs": report.activation_cache.map(|c| c.wall_secs),
                    "demonstration_bias": report.bias_offset,
                    "train_prompts": report.train_prompts,
                    "val_prompts": report.val_prompts,
                    "wall_secs": report.wall_secs,
                }))
            }
            Stage::PpoPtx => {
                let (Some(reference_dir), Some(reward_model_dir)) = (job.reference_dir, job.reward_model_dir) else {
                    return Err(TrainError::Data("PPO needs a reference policy and a reward model".into()));
                };
                let prompts = train_prompts(job.data);
                let inputs = ppo::PpoInputs {
                    policy_dir: job.policy_dir,
                    reference_dir,
                    reward_model_dir,
                    prompts: &prompts,
                    corpus: job.corpus,
                };
                let report = ppo::train(inputs, self.config.ppo.clone(), job.out_dir, progress)?;
                Ok(json!({
                    "iterations": report.iterations,
                    "saved_ema": report.saved_ema,
                    "train_prompts": report.train_prompts,
                    "wall_secs": report.wall_secs,
                }))
            }
            Stage::Base => Err(TrainError::Data("the base model is not trained".into())),
        }
    }
}

/// Held-out users' prompts (validation split, else test), at most `max`: what SFT epochs are scored on.
fn validation_prompts(data: &Dataset, max: usize) -> Vec<String> {
    let of = |split: Split| data.prompts.iter().filter(move |p| p.split == split).map(|p| p.prompt.clone());
    let mut prompts: Vec<String> = of(Split::Validation).collect();
    if prompts.is_empty() {
        prompts = of(Split::Test).collect();
    }
    prompts.truncate(max.max(1));
    prompts
}

/// Mean reward-model score of the policy's samples (the gate's sampling settings) on `prompts`; 0 without
/// prompts, so every epoch ties and the last one is kept.
fn mean_reward(
    policy: &crate::policy_model::PolicyModel,
    scorer: &RewardModel,
    prompts: &[String],
    settings: &crate::evaluation::GateConfig,
) -> TrainResult<f64> {
    if prompts.is_empty() {
        return Ok(0.0);
    }
    let engine = crate::episodes::engine_sharing(policy, "sft-selection", prompts.len())?;
    let episodes = crate::episodes::sample(&engine, prompts, settings.sample_settings())?;
    let pairs = crate::episodes::prompt_response_pairs(prompts, &episodes);
    let scores = scorer.score(&pairs)?;
    Ok(scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len().max(1) as f64)
}

/// The training split's prompts: what PPO samples rollouts from.
pub fn train_prompts(data: &Dataset) -> Vec<String> {
    data.prompts.iter().filter(|p| p.split == Split::Train).map(|p| p.prompt.clone()).collect()
}

/// Training by a configured command.
pub struct External {
    pub config: TrainerConfig,
}

impl External {
    /// Runs the command with:
    /// - `INSTRUCTD_STAGE`: `sft`, `reward_model` or `ppo_ptx`;
    /// - `INSTRUCTD_SNAPSHOT_DIR`: the dataset snapshot (JSONL files, manifest);
    /// - `INSTRUCTD_POLICY_DIR`: the starting policy (HF layout); `INSTRUCTD_REFERENCE_DIR` and
    ///   `INSTRUCTD_REWARD_MODEL_DIR` for PPO; `INSTRUCTD_CORPUS_DIR`: the pre-training text;
    /// - `INSTRUCTD_HYPERPARAMETERS`: this stage's `[trainer.*]` section as JSON;
    /// - `INSTRUCTD_CORPUS`: `[trainer.corpus]` as JSON (window length, held-out share: PPO-ptx's windows);
    /// - `INSTRUCTD_EVALUATION`: `[trainer.evaluation]` as JSON (the sampling settings SFT scores epochs with);
    /// - `INSTRUCTD_OUTPUT_DIR`: where the trained model must be written.
    fn command(&self, job: &StageJob<'_>) -> TrainResult<Command> {
        let (program, args) = self
            .config
            .backend
            .command
            .split_first()
            .ok_or_else(|| TrainError::Data("the external backend has no command".into()))?;
        let (stage, hyperparameters) = match job.stage {
            Stage::Sft => ("sft", json!(self.config.sft)),
            Stage::RewardModel => ("reward_model", json!(self.config.reward_model)),
            Stage::PpoPtx => ("ppo_ptx", json!(self.config.ppo)),
            Stage::Base => return Err(TrainError::Data("the base model is not trained".into())),
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .env("INSTRUCTD_STAGE", stage)
            .env("INSTRUCTD_SNAPSHOT_DIR", absolute(job.snapshot_dir))
            .env("INSTRUCTD_POLICY_DIR", absolute(job.policy_dir))
            .env("INSTRUCTD_CORPUS_DIR", absolute(&self.config.corpus.dir))
            .env("INSTRUCTD_HYPERPARAMETERS", hyperparameters.to_string())
            .env("INSTRUCTD_CORPUS", json!(self.config.corpus).to_string())
            .env("INSTRUCTD_EVALUATION", json!(self.config.evaluation).to_string())
            .env("INSTRUCTD_OUTPUT_DIR", absolute(job.out_dir))
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(dir) = job.reference_dir {
            command.env("INSTRUCTD_REFERENCE_DIR", absolute(dir));
        }
        if let Some(dir) = job.reward_model_dir {
            command.env("INSTRUCTD_REWARD_MODEL_DIR", absolute(dir));
        }
        Ok(command)
    }
}

/// Lines of the job's stderr kept for the error when it fails (its reason is usually the last line).
const STDERR_TAIL: usize = 5;

/// Copies the job's stderr to the trainer's, line by line, and returns its last [`STDERR_TAIL`] lines.
fn relay_stderr(stderr: std::process::ChildStderr) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tail = std::collections::VecDeque::with_capacity(STDERR_TAIL);
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if !line.trim().is_empty() {
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        tail.into()
    })
}

impl TrainingBackend for External {
    fn name(&self) -> &'static str {
        "external"
    }

    fn run(&self, job: &StageJob<'_>, _progress: &mut dyn FnMut(&PpoIteration)) -> TrainResult<Value> {
        let started = Instant::now();
        let program = self.config.backend.command.join(" ");
        tracing::info!(stage = ?job.stage, command = %program, "external training job starts");
        let mut child =
            self.command(job)?.spawn().map_err(|source| TrainError::Io { path: program.clone().into(), source })?;
        let stderr = child.stderr.take().map(relay_stderr);
        let timeout = Duration::from_secs(self.config.backend.timeout_secs);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(TrainError::Data(format!(
                        "external job `{program}` ran past {} s and was stopped",
                        timeout.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(200)),
                Err(source) => return Err(TrainError::Io { path: program.into(), source }),
            }
        };
        let last_lines = stderr.and_then(|relay| relay.join().ok()).unwrap_or_default();
        if !status.success() {
            let tail = if last_lines.is_empty() { String::new() } else { format!(": {}", last_lines.join(" | ")) };
            return Err(TrainError::Data(format!("external job `{program}` failed with {status}{tail}")));
        }
        // The output must be what the rest of the loop can use.
        match job.stage {
            Stage::RewardModel => drop(RewardModel::load(job.out_dir)?),
            _ => drop(inference::load::LoadedModel::load(
                job.out_dir,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?),
        }
        let metrics_path = job.out_dir.join("metrics.json");
        let mut metrics = match std::fs::read_to_string(&metrics_path) {
            Ok(text) => serde_json::from_str::<Value>(&text).map_err(|e| TrainError::Checkpoint {
                path: metrics_path.clone(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(_) => json!({}),
        };
        if let Some(object) = metrics.as_object_mut() {
            object.insert("backend".into(), json!("external"));
            object.entry("wall_secs").or_insert(json!(started.elapsed().as_secs_f64()));
        }
        tracing::info!(stage = ?job.stage, wall_secs = started.elapsed().as_secs_f64(), "external training job done");
        Ok(metrics)
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_model::test_util::tiny_model;

    fn external(script: &str) -> External {
        let backend = BackendConfig {
            kind: BackendKind::External,
            command: vec!["bash".into(), "-c".into(), script.into()],
            timeout_secs: 60,
        };
        External { config: TrainerConfig { backend, ..TrainerConfig::default() } }
    }

    fn job<'a>(stage: Stage, dirs: &'a (PathBuf, PathBuf, PathBuf), data: &'a Dataset) -> StageJob<'a> {
        StageJob {
            stage,
            snapshot_dir: &dirs.0,
            data,
            policy_dir: &dirs.1,
            reference_dir: Some(&dirs.1),
            reward_model_dir: None,
            corpus: None,
            out_dir: &dirs.2,
        }
    }

    fn dirs() -> (tempfile::TempDir, (PathBuf, PathBuf, PathBuf)) {
        let tmp = tempfile::tempdir().unwrap();
        let snapshot = tmp.path().join("snap");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("sft.jsonl"), "{\"prompt\":\"p\",\"response\":\"r\"}\n").unwrap();
        let policy = tmp.path().join("policy");
        tiny_model(&policy, 4, true);
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        (tmp, (snapshot, policy, out))
    }

    #[test]
    fn with_a_reward_model_sft_keeps_the_epoch_it_scores_highest() {
        use crate::snapshot::{PromptExample, SftExample};
        let (_tmp, d) = dirs();
        let rm_dir = d.2.with_file_name("rm");
        RewardModel::from_policy(&d.1, &candle_core::Device::Cpu, 1, 128).unwrap().save(&rm_dir).unwrap();
        let example = |i: usize, split| SftExample {
            prompt: format!("Question {i}?"),
            response: "Blue.".into(),
            user: format!("u{i}"),
            split,
        };
        let data = Dataset {
            sft: (0..6).map(|i| example(i, if i < 5 { Split::Train } else { Split::Validation })).collect(),
            prompts: (0..3)
                .map(|i| PromptExample {
                    prompt_id: format!("p{i}"),
                    prompt: format!("Validation question {i}?"),
                    user: "v".into(),
                    split: Split::Validation,
                })
                .collect(),
            ..Dataset::default()
        };
        let mut config = TrainerConfig::default();
        config.sft.epochs = 2;
        config.sft.learning_rate = 1e-2;
        config.evaluation.max_new_tokens = 4;
        let job = StageJob { reward_model_dir: Some(&rm_dir), ..job(Stage::Sft, &d, &data) };
        let metrics = InProcess { config }.run(&job, &mut |_| {}).unwrap();
        assert_eq!(metrics["selected_by"], "selector", "{metrics}");
        let scores = metrics["epoch_scores"].as_array().unwrap();
        assert_eq!(scores.len(), 2);
        assert!(scores.iter().all(|s| s.as_f64().is_some_and(f64::is_finite)), "{metrics}");
        let best = metrics["best_epoch"].as_u64().unwrap() as usize;
        let top = scores.iter().map(|s| s.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!(scores[best - 1].as_f64().unwrap(), top, "the saved epoch is the best scored: {metrics}");
    }

    #[test]
    fn an_external_job_gets_the_snapshot_and_its_model_is_imported() {
        let (_tmp, d) = dirs();
        // Stands in for a cluster job: reads the data, "trains" by copying the policy, reports a metric.
        let script = r#"set -e
            test "$INSTRUCTD_STAGE" = sft
            test -s "$INSTRUCTD_SNAPSHOT_DIR/sft.jsonl"
            echo "$INSTRUCTD_HYPERPARAMETERS" | grep -q learning_rate
            echo "$INSTRUCTD_CORPUS" | grep -q seq_len
            echo "$INSTRUCTD_EVALUATION" | grep -q max_new_tokens
            cp "$INSTRUCTD_POLICY_DIR"/* "$INSTRUCTD_OUTPUT_DIR"/
            echo '{"train_loss": 1.25}' > "$INSTRUCTD_OUTPUT_DIR/metrics.json""#;
        let data = Dataset::default();
        let metrics = external(script).run(&job(Stage::Sft, &d, &data), &mut |_| {}).unwrap();
        assert_eq!(metrics["train_loss"], 1.25);
        assert_eq!(metrics["backend"], "external");
    }

    #[test]
    fn a_failing_or_useless_external_job_fails_the_stage() {
        let (_tmp, d) = dirs();
        let data = Dataset::default();
        let err = external("exit 3").run(&job(Stage::Sft, &d, &data), &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("failed") && err.contains('3'), "{err}");
        let err = external("echo not a model > \"$INSTRUCTD_OUTPUT_DIR/model.safetensors\"")
            .run(&job(Stage::Sft, &d, &data), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json") || err.contains("safetensors"), "{err}");
        let err = external("cp \"$INSTRUCTD_POLICY_DIR\"/* \"$INSTRUCTD_OUTPUT_DIR\"/")
            .run(&job(Stage::RewardModel, &d, &data), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("rm.json"), "a policy is not a reward model: {err}");
        let mut slow = external("sleep 5");
        slow.config.backend.timeout_secs = 0;
        let err = slow.run(&job(Stage::Sft, &d, &data), &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("stopped"), "{err}");
    }
}
