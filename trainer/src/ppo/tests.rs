use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use inference::load::LoadedModel;

use super::*;
use crate::corpus::{CorpusConfig, PretrainCorpus};
use crate::policy_model::PolicyModel;
use crate::policy_model::test_util::tiny_model;
use crate::reward_model::RewardModel;

/// A tiny policy, a reward model on its trunk (random head), a small corpus.
fn setup(dir: &Path) -> (PathBuf, PathBuf, PretrainCorpus) {
    let policy = dir.join("policy");
    tiny_model(&policy, 11, true);
    let rm_dir = dir.join("rm");
    RewardModel::from_policy(&policy, &Device::Cpu, 3, 256).unwrap().save(&rm_dir).unwrap();
    let corpus_dir = dir.join("corpus");
    std::fs::create_dir_all(&corpus_dir).unwrap();
    std::fs::write(corpus_dir.join("text.txt"), "Now, fair Hippolyta, our nuptial hour draws on apace.\n".repeat(60))
        .unwrap();
    let model = PolicyModel::load(&policy, &Device::Cpu).unwrap();
    let config = CorpusConfig { dir: corpus_dir, seq_len: 24, held_out_percent: 10, max_tokens: 1 << 20 };
    let corpus = PretrainCorpus::load(&config, model.tokenizer()).unwrap();
    (policy, rm_dir, corpus)
}

fn small(iterations: usize) -> PpoConfig {
    PpoConfig {
        iterations,
        episodes_per_iteration: 6,
        minibatch_size: 3,
        max_new_tokens: 6,
        learning_rate: 3e-3,
        value_learning_rate: 3e-3,
        warmup_iterations: 1,
        ..PpoConfig::default()
    }
}

#[test]
fn ppo_ptx_runs_logs_every_iteration_and_saves_a_servable_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, rm, corpus) = setup(tmp.path());
    let prompts: Vec<String> = ["Say hi.", "Name a fruit.", "What is two plus two?"].map(String::from).to_vec();
    let out = tmp.path().join("out");
    let mut seen = Vec::new();
    let inputs = PpoInputs {
        policy_dir: &policy,
        reference_dir: &policy,
        reward_model_dir: &rm,
        prompts: &prompts,
        corpus: Some(&corpus),
    };
    let report = train(inputs, small(2), &out, &mut |it| seen.push(it.iteration)).unwrap();
    assert_eq!(seen, vec![1, 2]);
    let first = &report.iterations[0];
    // Policy and reference are the same weights before the first step: no KL yet.
    assert!(first.kl.abs() < 1e-3, "KL at the start {}", first.kl);
    assert!((first.lr - 3e-4).abs() < 1e-12, "warm-up starts at 1/10 of the peak: {}", first.lr);
    assert_eq!(report.iterations[1].lr, 3e-3);
    for it in &report.iterations {
        assert_eq!(it.episodes, 6);
        assert!(it.reward_mean.is_finite() && it.entropy > 0.0 && it.value_loss.is_finite());
        assert!(it.ptx_loss.is_some_and(|p| p > 0.0), "{it:?}");
        assert!((0.0..=1.0).contains(&it.clip_fraction));
    }
    assert!(report.iterations[1].kl.abs() > 1e-6, "the policy moved away from the reference");
    assert!(report.saved_ema && out.join(REPORT_FILE).is_file());
    // The saved policy loads for serving and differs from where it started.
    let saved = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    let start = LoadedModel::load(&policy, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 17, 40, 9]], &Device::Cpu).unwrap();
    let a = saved.model.forward_train(&ids, 0.0).unwrap();
    let b = start.model.forward_train(&ids, 0.0).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 1e-4, "weights unchanged ({diff})");
}

#[test]
fn ppo_raises_the_reward_models_score() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, rm, _) = setup(tmp.path());
    let prompts: Vec<String> = (0..6).map(|i| format!("Question {i}: say something.")).collect();
    let config = PpoConfig { ptx_coef: 0.0, ema_decay: None, kl_coef: 0.0, learning_rate: 1e-2, ..small(20) };
    let out = tmp.path().join("out");
    let inputs = PpoInputs {
        policy_dir: &policy,
        reference_dir: &policy,
        reward_model_dir: &rm,
        prompts: &prompts,
        corpus: None,
    };
    let report = train(inputs, config, &out, &mut |_| {}).unwrap();
    let rewards: Vec<f32> = report.iterations.iter().map(|i| i.reward_mean).collect();
    let mean = |r: &[f32]| r.iter().sum::<f32>() / r.len() as f32;
    let (early, late) = (mean(&rewards[..4]), mean(&rewards[16..]));
    assert!(late > early + 0.02, "reward should rise under PPO: {rewards:?}");
}

/// PPO with LoRA and gradient checkpointing: rollouts sample from the adapted policy, the EMA covers the
/// adapters, and the saved policy is a plain checkpoint (adapters merged) that moved away from the start.
#[test]
fn ppo_with_lora_and_checkpointing_saves_a_merged_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, rm, corpus) = setup(tmp.path());
    let prompts: Vec<String> = ["Say hi.", "Name a fruit.", "What is two plus two?"].map(String::from).to_vec();
    let out = tmp.path().join("out");
    let inputs = PpoInputs {
        policy_dir: &policy,
        reference_dir: &policy,
        reward_model_dir: &rm,
        prompts: &prompts,
        corpus: Some(&corpus),
    };
    let config = PpoConfig { lora_rank: 4, lora_alpha: 8.0, gradient_checkpointing: true, ..small(2) };
    let report = train(inputs, config, &out, &mut |_| {}).unwrap();
    assert!(report.iterations[0].kl.abs() < 1e-3, "B starts at zero: the policy starts as the reference");
    assert!(report.iterations[1].kl.abs() > 1e-6, "the adapters moved the sampled policy");
    let names = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(names.keys().all(|n| !n.contains("lora")), "adapters are merged, not saved");
    let saved = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    let start = LoadedModel::load(&policy, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 17, 40, 9]], &Device::Cpu).unwrap();
    let a = saved.model.forward_train(&ids, 0.0).unwrap();
    let b = start.model.forward_train(&ids, 0.0).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 1e-5, "merged weights unchanged ({diff})");
}
