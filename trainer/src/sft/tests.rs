use std::path::Path;
use std::time::Instant;

use candle_core::{D, Device, IndexOp, Tensor};
use feedback::split::Split;
use inference::llama::Llama;
use inference::load::LoadedModel;

use super::batch::{Collated, EncodeStats, encode_example};
use super::evaluate::mean_loss;
use super::*;
use crate::optim::{Adam, AdamConfig, Gradients};
use crate::policy_model::test_util::tiny_model;
use crate::policy_model::{ChatTokens, PolicyModel, TrainError, TrainResult, encode_chat};
use crate::snapshot::SftExample;

fn example(prompt: &str, response: &str, split: Split) -> SftExample {
    SftExample { prompt: prompt.into(), response: response.into(), user: "u".into(), split }
}

/// Eight "Q: colour? A: blue"-style demonstrations, two validation ones.
fn colour_data() -> Vec<SftExample> {
    let things = ["sky", "sea", "ocean", "lake", "river", "jeans", "sapphire", "ice", "whale", "flag"];
    things
        .iter()
        .enumerate()
        .map(|(i, thing)| {
            let split = if i < 8 { Split::Train } else { Split::Validation };
            example(&format!("What colour is the {thing}?"), "blue", split)
        })
        .collect()
}

fn greedy(model: &Llama, tokens: &ChatTokens, max_new: usize, eos: u32) -> Vec<u32> {
    let mut ids = tokens.ids[..tokens.prompt_len].to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward_train(&input, 0.0).unwrap();
        let next = logits.i((0, ids.len() - 1)).unwrap().argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
        out.push(next);
        if next == eos {
            break;
        }
        ids.push(next);
    }
    out
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_in_one_sft_step() {
    let tmp = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let dir = tmp.path().join(format!("tied-{tied}"));
        tiny_model(&dir, 5, tied);
        let model = PolicyModel::load(&dir, &Device::Cpu).unwrap();
        let data = colour_data();
        let mut stats = EncodeStats::default();
        let encoded: Vec<ChatTokens> =
            data[..3].iter().map(|e| encode_example(&model, e, 512, &mut stats).unwrap().unwrap()).collect();
        let refs: Vec<&ChatTokens> = encoded.iter().collect();
        let loss = Collated::new(&refs, &Device::Cpu).unwrap().loss(model.llama(), 0.2).unwrap();
        let store = model.backward(&loss).unwrap();
        let named = model.named_vars();
        assert_eq!(named.len(), if tied { 20 } else { 21 });
        for (name, var) in &named {
            let grad = store.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
        // One optimiser step moves every parameter.
        let before = model.snapshot_weights().unwrap();
        let vars = model.vars();
        let mut grads = Gradients::new();
        grads.accumulate(&store, &vars, 1.0).unwrap();
        Adam::new(vars, AdamConfig::default()).unwrap().step(&grads, 1e-3).unwrap();
        for (name, var) in &named {
            let moved = (var.as_tensor() - &before[name]).unwrap().abs().unwrap().max_all().unwrap();
            assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "{name} did not move");
        }
    }
}

#[test]
fn padding_and_micro_batching_do_not_change_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 2, true);
    let model = PolicyModel::load(tmp.path(), &Device::Cpu).unwrap();
    let data = [
        example("Hi", "Hello! How can I help you today?", Split::Train),
        example("Name a fruit with a long name please", "banana", Split::Train),
        example("2+2?", "4", Split::Train),
    ];
    let mut stats = EncodeStats::default();
    let enc: Vec<ChatTokens> =
        data.iter().map(|e| encode_example(&model, e, 512, &mut stats).unwrap().unwrap()).collect();
    // Token-weighted mean of single-example losses == the padded batch's loss.
    let (mut sum, mut n) = (0f64, 0usize);
    for e in &enc {
        let c = Collated::new(&[e], &Device::Cpu).unwrap();
        sum += f64::from(c.loss(model.llama(), 0.0).unwrap().to_scalar::<f32>().unwrap()) * c.tokens as f64;
        n += c.tokens;
    }
    let refs: Vec<&ChatTokens> = enc.iter().collect();
    let batched = Collated::new(&refs, &Device::Cpu).unwrap().loss(model.llama(), 0.0).unwrap();
    let batched = batched.to_scalar::<f32>().unwrap();
    assert!((batched - (sum / n as f64) as f32).abs() < 1e-5, "{batched} vs {}", sum / n as f64);
    assert!((mean_loss(&model, &enc, 2).unwrap() - batched).abs() < 1e-5);
}

#[test]
fn sft_learns_a_tiny_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("sft"));
    tiny_model(&src, 7, true);
    let data = colour_data();
    let target: Vec<(String, String)> = vec![("What colour is the sky?".into(), "blue".into())];
    let held_out: Vec<(String, String)> = vec![("What colour is the flag?".into(), "blue".into())];
    let before = PolicyModel::load(&src, &Device::Cpu).unwrap();
    let (lp_before, held_before) =
        (before.response_logprobs(&target).unwrap()[0], before.response_logprobs(&held_out).unwrap()[0]);

    let config = SftConfig {
        epochs: PAPER_SFT_EPOCHS,
        learning_rate: 1e-2,
        batch_size: 4,
        micro_batch_size: 2,
        save_every_epoch: true,
        ..SftConfig::default()
    };
    let started = Instant::now();
    let report = train(&src, &data, config, &out).unwrap();
    eprintln!("SFT tiny: {:.2}s, epochs {:?}", started.elapsed().as_secs_f64(), report.epochs);
    assert_eq!((report.train_examples, report.val_examples, report.total_steps), (8, 2, 32));
    assert_eq!(report.selected_by, Selection::ValidationLoss);
    let first = &report.epochs[0];
    let last = report.epochs.last().unwrap();
    assert!(last.train_loss < 0.3 * first.train_loss, "train loss {} -> {}", first.train_loss, last.train_loss);
    let best = &report.epochs[report.best_epoch - 1];
    assert!(report.epochs.iter().all(|e| e.val_loss.unwrap() >= best.val_loss.unwrap()));
    assert!((last.last_lr - 1e-3).abs() < 1e-12, "cosine ends at 10% of the peak: {}", last.last_lr);
    assert!(out.join("epoch-16").join("model.safetensors").is_file());
    assert!(out.join(REPORT_FILE).is_file());

    // The saved (best) model, loaded as serving loads it, prefers the demonstrated answer.
    let after = PolicyModel::load(&out, &Device::Cpu).unwrap();
    let (lp_after, held_after) =
        (after.response_logprobs(&target).unwrap()[0], after.response_logprobs(&held_out).unwrap()[0]);
    eprintln!("log p(blue<|im_end|>): train prompt {lp_before} -> {lp_after}, held-out {held_before} -> {held_after}");
    assert!(lp_after > lp_before + 5.0 && lp_after > -2.0, "{lp_before} -> {lp_after}");
    assert!(held_after > held_before + 5.0, "generalises to the held-out prompt: {held_before} -> {held_after}");
    let served = LoadedModel::load(&out, candle_core::DType::F32, &Device::Cpu).unwrap();
    let tokens = encode_chat(&served.tokenizer, "What colour is the sea?", "", false).unwrap();
    let answer = greedy(&served.model, &tokens, 8, inference::tiny_model::EOS_TOKEN_ID);
    assert_eq!(served.tokenizer.decode(&answer, false).unwrap(), "blue<|im_end|>");
}

#[test]
fn a_selector_chooses_the_saved_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("sft"));
    tiny_model(&src, 8, true);
    let data = colour_data();
    let probe = [("What colour is the ice?", "blue")];
    let mut seen = Vec::new();
    let mut prefer_second = |epoch: &SftEpoch, model: &PolicyModel| -> TrainResult<f64> {
        seen.push((epoch.epoch, model.response_logprobs(&probe)?[0]));
        Ok(-((epoch.epoch as f64) - 2.0).powi(2))
    };
    let config = SftConfig { epochs: 3, learning_rate: 2e-3, batch_size: 8, ..SftConfig::default() };
    let report =
        train_with_selector(&src, &data, config, &out, Some(&mut prefer_second as &mut EpochSelector<'_>)).unwrap();
    assert_eq!((report.best_epoch, report.selected_by), (2, Selection::Selector));
    assert_eq!(report.epochs[1].score, Some(0.0));
    let saved = PolicyModel::load(&out, &Device::Cpu).unwrap().response_logprobs(&probe).unwrap()[0];
    assert!((saved - seen[1].1).abs() < 1e-4, "saved model is epoch 2's: {saved} vs {seen:?}");
}

#[test]
fn refuses_data_without_a_training_split() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 0, true);
    let data = [example("a", "b", Split::Validation)];
    let err = train(tmp.path(), &data, SftConfig::default(), tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, TrainError::Data(_)), "{err}");
}

/// Training speed on the real SmolLM2-135M (when `models/smollm2-135m-instruct` exists):
/// `cargo test -p trainer --lib sft::tests::smollm2_step_timing -- --ignored --nocapture`.
#[test]
#[ignore = "needs models/smollm2-135m-instruct; measures speed"]
fn smollm2_step_timing() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/smollm2-135m-instruct");
    if !dir.join("model.safetensors").is_file() {
        eprintln!("skipped: {} not found", dir.display());
        return;
    }
    let t0 = Instant::now();
    let model = PolicyModel::load(&dir, &Device::Cpu).unwrap();
    eprintln!("load as vars: {:.2}s", t0.elapsed().as_secs_f64());
    let data: Vec<SftExample> = (0..8)
        .map(|i| {
            example(
                &format!("Write one sentence about the number {i}."),
                &format!("The number {i} is a small whole number that comes right after {}.", i + 1),
                Split::Train,
            )
        })
        .collect();
    let mut stats = EncodeStats::default();
    let enc: Vec<ChatTokens> =
        data.iter().map(|e| encode_example(&model, e, 512, &mut stats).unwrap().unwrap()).collect();
    let vars = model.vars();
    let mut adam = Adam::new(vars.clone(), AdamConfig::default()).unwrap();
    for micro in [1usize, 4, 8] {
        let refs: Vec<&ChatTokens> = enc[..micro].iter().collect();
        let seq_tokens: usize = refs.iter().map(|e| e.ids.len() - 1).sum();
        for rep in 0..2 {
            let t = Instant::now();
            let c = Collated::new(&refs, &Device::Cpu).unwrap();
            let loss = c.loss(model.llama(), 0.0).unwrap();
            let t_fwd = t.elapsed().as_secs_f64();
            let store = model.backward(&loss).unwrap();
            let t_bwd = t.elapsed().as_secs_f64();
            let mut grads = Gradients::new();
            grads.accumulate(&store, &vars, 1.0).unwrap();
            drop(store);
            adam.step(&grads, 1e-5).unwrap();
            let t_all = t.elapsed().as_secs_f64();
            eprintln!(
                "batch {micro} ({seq_tokens} tokens, {} loss tokens) rep {rep}: forward {t_fwd:.2}s, \
                 +backward {t_bwd:.2}s, +adam {t_all:.2}s total; loss {:.3}",
                c.tokens,
                loss.to_scalar::<f32>().unwrap()
            );
        }
    }
}

/// SFT with LoRA (and gradient checkpointing): the loss falls, and the saved model (adapters merged) prefers the
/// demonstrated answer more than before. (Slower than the full fine-tune here: the tiny random model's tied
/// embedding, which LoRA freezes, dominates its logits.)
#[test]
fn sft_with_lora_learns_and_saves_merged_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("sft"));
    tiny_model(&src, 7, true);
    let target: Vec<(String, String)> = vec![("What colour is the sky?".into(), "blue".into())];
    let lp_before = PolicyModel::load(&src, &Device::Cpu).unwrap().response_logprobs(&target).unwrap()[0];
    let config = SftConfig {
        epochs: 8,
        learning_rate: 1e-2,
        batch_size: 4,
        micro_batch_size: 2,
        lora_rank: 8,
        gradient_checkpointing: true,
        ..SftConfig::default()
    };
    let report = train(&src, &colour_data(), config, &out).unwrap();
    let (first, last) = (&report.epochs[0], report.epochs.last().unwrap());
    assert!(last.train_loss < 0.9 * first.train_loss, "train loss {} -> {}", first.train_loss, last.train_loss);
    let lp_after = PolicyModel::load(&out, &Device::Cpu).unwrap().response_logprobs(&target).unwrap()[0];
    assert!(lp_after > lp_before + 0.5, "{lp_before} -> {lp_after}");
    let paper = SftConfig { gradient_checkpointing: true, ..SftConfig::paper() };
    assert!(train(&src, &colour_data(), paper, tmp.path().join("refused")).is_err(), "checkpointing with dropout");
}
