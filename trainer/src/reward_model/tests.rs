use std::time::Instant;

use candle_core::{DType, Device, Var};
use feedback::events::LabelerGroup;
use feedback::split::Split;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::model::{HEAD_BIAS, HEAD_WEIGHT};
use super::*;
use crate::policy_model::TrainError;
use crate::policy_model::test_util::tiny_model;
use crate::snapshot::{RankedExample, SftExample};

const OTHERS: [&str; 8] = [
    "no, I do not think so",
    "maybe later",
    "it depends on the weather",
    "I cannot tell",
    "probably not today",
    "ask someone else",
    "no",
    "that is hard to say",
];
const YES: [&str; 4] = ["yes", "yes, I think so", "I would say yes", "yes of course"];

/// `n` prompts, K = 4: one completion says "yes" (rank 0), three do not (tied at rank 1), in shuffled order.
fn marker_rankings(n: usize, split: Split, seed: u64) -> Vec<RankedExample> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let mut items: Vec<(String, usize)> = vec![(YES[rng.random_range(0..YES.len())].to_string(), 0)];
            let mut others = OTHERS.to_vec();
            others.shuffle(&mut rng);
            items.extend(others[..3].iter().map(|o| (o.to_string(), 1)));
            items.shuffle(&mut rng);
            RankedExample {
                prompt_id: format!("p{i}"),
                prompt: format!("Question {i}: should we go to the {} today?", ["park", "beach", "zoo"][i % 3]),
                completions: items.iter().map(|(c, _)| c.clone()).collect(),
                ranks: items.iter().map(|(_, r)| *r).collect(),
                labeler_group: LabelerGroup::Training,
                split,
                labeler_id: format!("labeler-{}", i % 3),
                weight: 1.0,
            }
        })
        .collect()
}

fn demos() -> Vec<SftExample> {
    ["Say hello", "What is 2+2?", "Name a colour", "Tell me a joke", "Describe the sea"]
        .iter()
        .zip(["Hello!", "4", "Blue", "Why did the chicken cross the road?", "Wide, blue and deep."])
        .map(|(p, r)| SftExample { prompt: p.to_string(), response: r.into(), user: "u".into(), split: Split::Train })
        .collect()
}

#[test]
fn reward_model_learns_a_hidden_preference_and_centres_demonstrations() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, out) = (tmp.path().join("policy"), tmp.path().join("rm"));
    tiny_model(&policy, 11, true);
    let mut data = marker_rankings(16, Split::Train, 1);
    data.extend(marker_rankings(8, Split::Validation, 2));
    // A fully tied ranking and a malformed one are skipped, not fatal.
    let mut tied = data[0].clone();
    tied.ranks = vec![0; 4];
    let mut malformed = data[1].clone();
    malformed.ranks.pop();
    data.extend([tied, malformed]);
    // The paper's single epoch; 8 steps of 2 prompts.
    let config = RmConfig { learning_rate: 2e-3, batch_prompts: 2, micro_batch_prompts: 2, ..RmConfig::default() };
    let started = Instant::now();
    let report = train(&policy, &data, &demos(), config, &out).unwrap();
    eprintln!(
        "RM tiny: {:.2}s, before {:?}, epochs {:#?}",
        started.elapsed().as_secs_f64(),
        report.val_before,
        report.epochs
    );
    assert_eq!((report.train_prompts, report.val_prompts, report.skipped), (16, 8, 2));
    let before = report.val_before.unwrap();
    assert_eq!(before.pairs, 24);
    let after = report.epochs.last().unwrap().val.unwrap();
    assert!(after.accuracy >= 0.9, "validation pair accuracy {} (before {})", after.accuracy, before.accuracy);
    assert!(before.accuracy < 0.8, "the untrained head is near chance: {}", before.accuracy);
    assert!(after.loss < before.loss);
    let centred = report.demo_mean_after.unwrap();
    assert!(centred.abs() < 1e-3, "demonstrations average {centred} after the bias shift");
    assert!(report.bias_offset.unwrap().abs() > 1e-3, "the shift did something");

    // The saved model agrees: demonstrations centred, "yes" preferred on unseen prompts.
    let rm = RewardModel::load(&out).unwrap();
    let scores = rm.score(&demos().iter().map(|d| (d.prompt.clone(), d.response.clone())).collect::<Vec<_>>()).unwrap();
    assert!((scores.iter().sum::<f32>() / scores.len() as f32).abs() < 1e-3);
    let s =
        rm.score(&[("Should I take the bus?", "yes, I think so"), ("Should I take the bus?", "maybe later")]).unwrap();
    assert!(s[0] > s[1], "{s:?}");
    assert!(out.join(REPORT_FILE).is_file());
}

#[test]
fn save_load_round_trip_gives_identical_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, out) = (tmp.path().join("policy"), tmp.path().join("rm"));
    tiny_model(&policy, 4, false);
    let mut rm = RewardModel::from_policy(&policy, &Device::Cpu, 9, 512).unwrap();
    for var in rm.vars() {
        var.set(&(var.as_tensor() + var.randn_like(0.0, 0.01).unwrap()).unwrap()).unwrap();
    }
    rm.center_on_demonstrations(&demos(), 3).unwrap();
    let pairs = [("Hi", "Hello there"), ("What is 2+2?", "4"), ("Name a colour", "a long answer about green")];
    let before = rm.score(&pairs).unwrap();
    rm.save(&out).unwrap();
    for file in ["model.safetensors", HEAD_FILE, META_FILE, "config.json", "tokenizer.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let loaded = RewardModel::load_on(&out, &Device::Cpu).unwrap();
    assert_eq!(loaded.score(&pairs).unwrap(), before);
    assert_eq!(loaded.meta(), rm.meta());
    // The trunk directory still loads as a causal LM (untied lm_head kept).
    inference::load::LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    // A plain model directory is not a reward model.
    assert!(matches!(RewardModel::load_on(&policy, &Device::Cpu), Err(TrainError::Io { .. })));
}

#[test]
fn scores_do_not_depend_on_batch_padding() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 6, true);
    let rm = RewardModel::from_policy(tmp.path(), &Device::Cpu, 1, 512).unwrap();
    let pairs = [("Hi", "Hello"), ("Write a long answer please", "Here is a rather longer answer than the other")];
    let batched = rm.score(&pairs).unwrap();
    for (i, pair) in pairs.iter().enumerate() {
        let alone = rm.score(&[*pair]).unwrap()[0];
        assert!((alone - batched[i]).abs() < 1e-5, "{alone} vs {}", batched[i]);
    }
    // Truncation keeps the end of the sequence.
    let short = RewardModel::from_policy(tmp.path(), &Device::Cpu, 1, 8).unwrap();
    let (ids, cut) = short.encode("Hi", "Hello").unwrap();
    assert!(cut && ids.len() == 8 && *ids.last().unwrap() == inference::tiny_model::EOS_TOKEN_ID);
}

#[test]
fn every_trunk_parameter_and_the_head_get_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 12, false);
    let rm = RewardModel::from_policy(tmp.path(), &Device::Cpu, 3, 512).unwrap();
    let ex = &marker_rankings(1, Split::Train, 5)[0];
    let seqs: Vec<Vec<u32>> = ex.completions.iter().map(|c| rm.encode(&ex.prompt, c).unwrap().0).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (loss, _) = crate::losses::ranking_loss(&rm.rewards(&refs, 0.0).unwrap(), &ex.ranks).unwrap();
    let store = rm.trunk().backward(&loss).unwrap();
    let mut named = rm.trunk().named_vars();
    named.retain(|(n, _)| n != "lm_head.weight");
    let head = rm.vars().split_off(named.len() + 1);
    assert_eq!(head.len(), 2);
    named.push((HEAD_WEIGHT.to_string(), head[0].clone()));
    assert_eq!(named.len(), 21);
    let grad_norm = |var: &Var, name: &str| {
        let grad = store.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    };
    for (name, var) in &named {
        assert!(grad_norm(var, name) > 0.0, "{name} has a zero gradient");
    }
    // The ranking loss sees only reward differences: the bias cancels (hence the paper's bias shift after
    // training).
    assert_eq!(grad_norm(&head[1], HEAD_BIAS), 0.0);
}

/// Cached frozen-layer outputs give the rewards (and gradients) of a full forward, with some layers frozen and
/// with all of them (then only the last position is kept).
#[test]
fn cached_activations_score_like_the_full_forward() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 7, true);
    let layers = 2; // the tiny model's depth
    let pairs = [("Hi", "Hello"), ("Write a long answer please", "Here is a rather longer answer than the other")];
    for frozen in [1, layers] {
        let rm =
            RewardModel::from_policy(tmp.path(), &Device::Cpu, 1, 512).unwrap().with_frozen_layers(frozen).unwrap();
        let seqs: Vec<Vec<u32>> = pairs.iter().map(|(p, r)| rm.encode(p, r).unwrap().0).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let direct = rm.rewards(&refs, 0.0).unwrap().to_vec1::<f32>().unwrap();
        let cached = rm.frozen_activations(&refs, 1).unwrap().unwrap();
        let hidden = rm.meta().hidden_size;
        let rows: Vec<usize> = cached.iter().map(|c| c.len() / hidden).collect();
        let expect: Vec<usize> = if frozen == layers { vec![1, 1] } else { seqs.iter().map(Vec::len).collect() };
        assert_eq!(rows, expect, "{frozen} frozen");
        let rows: Vec<&[f32]> = cached.iter().map(Vec::as_slice).collect();
        let from_cache = rm.rewards_from_activations(&rows, 0.0).unwrap();
        for (a, b) in direct.iter().zip(from_cache.to_vec1::<f32>().unwrap()) {
            assert!((a - b).abs() < 1e-4, "{frozen} frozen: {a} vs {b}");
        }
        let store = rm.trunk().backward(&from_cache.sum_all().unwrap()).unwrap();
        assert!(rm.vars().iter().take(rm.vars().len() - 1).all(|v| store.get(v.as_tensor()).is_some()));
    }
}

/// Several epochs on the activation cache learn the marker, report validation per epoch, and keep the epoch
/// with the lowest validation loss.
#[test]
fn frozen_trunk_trains_from_the_cache_and_keeps_the_best_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, out) = (tmp.path().join("policy"), tmp.path().join("rm"));
    tiny_model(&policy, 11, true);
    let mut data = marker_rankings(16, Split::Train, 1);
    data.extend(marker_rankings(8, Split::Validation, 2));
    let config = RmConfig {
        learning_rate: 5e-3,
        batch_prompts: 4,
        micro_batch_prompts: 4,
        epochs: 6,
        freeze_layers: 1,
        ..RmConfig::default()
    };
    let report = train(&policy, &data, &demos(), config, &out).unwrap();
    let cache = report.activation_cache.expect("activations cached");
    assert!(cache.bytes > 0);
    assert_eq!(report.epochs.len(), 6);
    let best = report.epochs.iter().min_by(|a, b| a.val.unwrap().loss.total_cmp(&b.val.unwrap().loss)).unwrap();
    assert_eq!(report.kept_epoch, best.epoch);
    assert_eq!(report.val, best.val);
    let before = report.val_before.unwrap();
    assert!(report.val.unwrap().accuracy >= 0.9, "{:?} (before {before:?})", report.epochs);
    // The saved weights are the kept epoch's: scoring the validation split again gives its figures.
    let rm = RewardModel::load(&out).unwrap();
    let s =
        rm.score(&[("Should I take the bus?", "yes, I think so"), ("Should I take the bus?", "maybe later")]).unwrap();
    assert!(s[0] > s[1], "{s:?}");
}

/// Quality control pays off: with an adversarial labeler's reversed rankings left out, the reward model
/// trained on the rest predicts held-out preferences better than one trained on everything.
#[test]
fn excluding_an_adversarial_labeler_improves_the_reward_model() {
    use crate::labeler_quality::{LabelerQcConfig, QcAction, apply, assess};
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy");
    tiny_model(&policy, 11, true);
    let mut data = Vec::new();
    for ex in marker_rankings(16, Split::Train, 1) {
        for labeler in ["ann", "bob", "eve"] {
            let mut ranked = RankedExample { labeler_id: labeler.into(), ..ex.clone() };
            if labeler == "eve" {
                ranked.ranks.iter_mut().for_each(|r| *r = 1 - *r);
            }
            data.push(ranked);
        }
    }
    let report = assess(&data, &LabelerQcConfig { min_comparisons: 20, ..Default::default() });
    assert!(report.labelers["eve"].flagged && report.flagged().count() == 1, "{report:?}");
    let val = marker_rankings(8, Split::Validation, 2);
    let config =
        RmConfig { learning_rate: 2e-3, batch_prompts: 4, micro_batch_prompts: 4, epochs: 2, ..RmConfig::default() };
    let trained = |action: QcAction| {
        let mut rankings = data.clone();
        apply(&mut rankings, &report, action);
        rankings.extend(val.clone());
        let out = tmp.path().join(format!("{action:?}"));
        train(&policy, &rankings, &demos(), config.clone(), &out).unwrap().val.unwrap()
    };
    let (excluded, everything) = (trained(QcAction::Exclude), trained(QcAction::Flag));
    assert!(excluded.loss < everything.loss, "excluded {excluded:?} vs all {everything:?}");
    assert!(excluded.accuracy >= everything.accuracy, "excluded {excluded:?} vs all {everything:?}");
}

/// LoRA on the trainable layer above a frozen one (with the activation cache): the adapters and the head learn
/// the marker, the kept epoch's adapters are merged into the saved trunk, and the saved model scores as trained.
#[test]
fn lora_reward_model_learns_and_saves_merged_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, out) = (tmp.path().join("policy"), tmp.path().join("rm"));
    tiny_model(&policy, 11, true);
    let mut data = marker_rankings(16, Split::Train, 1);
    data.extend(marker_rankings(8, Split::Validation, 2));
    let config = RmConfig {
        learning_rate: 5e-3,
        batch_prompts: 4,
        micro_batch_prompts: 4,
        epochs: 4,
        freeze_layers: 1,
        lora_rank: 4,
        lora_alpha: 8.0,
        ..RmConfig::default()
    };
    let report = train(&policy, &data, &demos(), config, &out).unwrap();
    assert!(report.activation_cache.is_some(), "the frozen layer's output is still cached");
    assert!(report.val.unwrap().accuracy >= 0.8, "{:?}", report.epochs);
    let names = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(names.keys().all(|n| !n.contains("lora")), "adapters are merged, not saved");
    let rm = RewardModel::load(&out).unwrap();
    let s =
        rm.score(&[("Should I take the bus?", "yes, I think so"), ("Should I take the bus?", "maybe later")]).unwrap();
    assert!(s[0] > s[1], "{s:?}");
}
