//! The PyTorch training job (`deploy/trainer-job`, run by the external backend) against the in-process trainer on
//! the tiny model: from the same weights and the same batch, SFT, the reward model and PPO-ptx compute the same
//! first-step losses and gradient norms (within 1e-4 relative), and after a few steps on the same data the
//! checkpoints agree closely. Each side cross-checks the other's implementation of the recipe.

#[path = "support/gateway.rs"]
#[allow(dead_code, unused_imports)]
mod gateway;
#[path = "support/trainer_job.rs"]
mod trainer_job;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use feedback::events::LabelerGroup;
use feedback::split::Split;
use inference::checkpoint::Stage;
use inference::tiny_model::{TinySpec, init_tiny};
use serde_json::{Value, json};
use trainer::TrainerConfig;
use trainer::backend::{BackendConfig, BackendKind, External, InProcess, StageJob, TrainingBackend};
use trainer::episodes::{Episode, engine_sharing};
use trainer::optim::{Adam, LrSchedule};
use trainer::policy_model::{ChatTokens, PolicyModel, encode_chat};
use trainer::ppo;
use trainer::ppo::PpoConfig;
use trainer::reward_model::{Ranking, RewardModel};
use trainer::snapshot::{Dataset, RankedExample, SftExample};

use trainer_job::{job_command, job_python};

fn tiny(dir: &Path, seed: u64) -> PathBuf {
    init_tiny(dir, &TinySpec { seed, ..TinySpec::default() }).unwrap();
    dir.to_path_buf()
}

/// |a - b| relative to the larger magnitude.
fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

fn assert_rel(what: &str, rust: f64, job: f64, tolerance: f64) {
    let r = rel(rust, job);
    eprintln!("{what}: in-process {rust:.9}, job {job:.9}, relative difference {r:.2e}");
    assert!(r <= tolerance, "{what}: in-process {rust} vs job {job} (relative {r:.2e} > {tolerance:.0e})");
}

fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) {
    let text: String = rows.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

/// The largest absolute difference between two model files' tensors, and the largest magnitude seen.
fn weights_diff(a: &Path, b: &Path, file: &str) -> (f32, f32) {
    let a = candle_core::safetensors::load(a.join(file), &Device::Cpu).unwrap();
    let b: HashMap<String, Tensor> = candle_core::safetensors::load(b.join(file), &Device::Cpu).unwrap();
    let (mut diff, mut scale) = (0f32, 0f32);
    for (name, ta) in &a {
        let tb = b.get(name).unwrap_or_else(|| panic!("{name} missing from the job's {file}"));
        assert_eq!(ta.dims(), tb.dims(), "{name}");
        let d = (ta - tb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        diff = diff.max(d.to_scalar::<f32>().unwrap());
        scale = scale.max(ta.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap());
    }
    assert_eq!(a.len(), b.len(), "{file}: same tensors");
    (diff, scale)
}

fn external(python: &Path, config: &TrainerConfig, env: &[(&str, &str)]) -> External {
    let backend = BackendConfig { kind: BackendKind::External, command: job_command(python, env), timeout_secs: 600 };
    External { config: TrainerConfig { backend, ..config.clone() } }
}

fn demonstrations() -> Vec<SftExample> {
    let things = ["sky", "sea", "ocean", "lake", "river", "jeans", "sapphire", "flag"];
    things
        .iter()
        .enumerate()
        .map(|(i, thing)| SftExample {
            prompt: format!("What colour is the {thing}?"),
            response: if i % 2 == 0 { "blue".into() } else { format!("The {thing} is blue, mostly.") },
            user: format!("u{i}"),
            split: if i < 6 { Split::Train } else { Split::Validation },
        })
        .collect()
}

fn job<'a>(stage: Stage, snapshot: &'a Path, data: &'a Dataset, policy: &'a Path, out: &'a Path) -> StageJob<'a> {
    StageJob {
        stage,
        snapshot_dir: snapshot,
        data,
        policy_dir: policy,
        reference_dir: None,
        reward_model_dir: None,
        corpus: None,
        out_dir: out,
    }
}

/// The SFT tests' inputs: a tiny policy, a snapshot of demonstrations, and a config of `epochs` epochs with one
/// optimiser step each (every training example in the batch, so both sides see the same batches whatever order
/// their shuffles give), in two micro-batches (the token-weighted accumulation).
fn sft_fixture(epochs: usize) -> (tempfile::TempDir, PathBuf, PathBuf, Dataset, TrainerConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny(&tmp.path().join("policy"), 5);
    let snapshot = tmp.path().join("snapshot");
    std::fs::create_dir_all(&snapshot).unwrap();
    let data = Dataset { sft: demonstrations(), ..Dataset::default() };
    write_jsonl(&snapshot.join("sft.jsonl"), &data.sft);
    let mut config = TrainerConfig::default();
    config.sft.epochs = epochs;
    config.sft.batch_size = 8;
    config.sft.micro_batch_size = 4;
    (tmp, policy, snapshot, data, config)
}

#[test]
fn sft_matches_the_in_process_trainer() {
    let Some(python) = job_python() else { return };
    let (tmp, policy, snapshot, data, mut config) = sft_fixture(3);
    // The high learning rate makes the gradient clip (norm 1) act.
    config.sft.learning_rate = 1e-2;

    // The in-process first step on the training split.
    let model = PolicyModel::load(&policy, &Device::Cpu).unwrap();
    let encoded: Vec<ChatTokens> = data
        .sft
        .iter()
        .filter(|e| e.split == Split::Train)
        .map(|e| encode_chat(model.tokenizer(), &e.prompt, &e.response, true).unwrap())
        .collect();
    let batch: Vec<&ChatTokens> = encoded.iter().collect();
    let vars = model.vars();
    let mut adam = Adam::new(vars.clone(), config.sft.adam).unwrap();
    let lr = LrSchedule::cosine(config.sft.learning_rate, config.sft.epochs, 0).lr(0);
    let first = trainer::sft::train_step(&model, &vars, &batch, &config.sft, &mut adam, lr).unwrap();
    drop(model);

    let (rust_out, job_out) = (tmp.path().join("rust"), tmp.path().join("job"));
    for out in [&rust_out, &job_out] {
        std::fs::create_dir_all(out).unwrap();
    }
    InProcess { config: config.clone() }
        .run(&job(Stage::Sft, &snapshot, &data, &policy, &rust_out), &mut |_| {})
        .unwrap();
    let metrics = external(&python, &config, &[])
        .run(&job(Stage::Sft, &snapshot, &data, &policy, &job_out), &mut |_| {})
        .unwrap();
    assert_eq!(metrics["backend"], "external");
    let step = &metrics["steps"][0];
    assert_rel("SFT first-step loss", first.loss, step["loss"].as_f64().unwrap(), 1e-4);
    assert_rel("SFT first-step gradient norm", first.grad_norm, step["grad_norm"].as_f64().unwrap(), 1e-4);
    assert_eq!(first.tokens as u64, step["tokens"].as_u64().unwrap(), "the same loss-bearing tokens");

    // After three steps: the same validation losses, epoch by epoch, and nearly the same weights.
    let report: Value = serde_json::from_str(&std::fs::read_to_string(rust_out.join("sft.json")).unwrap()).unwrap();
    let job_report: Value = serde_json::from_str(&std::fs::read_to_string(job_out.join("sft.json")).unwrap()).unwrap();
    for (i, (a, b)) in
        report["epochs"].as_array().unwrap().iter().zip(job_report["epochs"].as_array().unwrap()).enumerate()
    {
        let what = format!("SFT epoch {} validation loss", i + 1);
        assert_rel(&what, a["val_loss"].as_f64().unwrap(), b["val_loss"].as_f64().unwrap(), 1e-3);
    }
    assert_eq!(report["best_epoch"], job_report["best_epoch"]);
    let (diff, scale) = weights_diff(&rust_out, &job_out, "model.safetensors");
    eprintln!("SFT checkpoints: largest weight difference {diff:.2e} (largest weight {scale:.2e})");
    assert!(diff < 1e-3, "SFT checkpoints differ by up to {diff}");
}

fn rankings() -> Vec<RankedExample> {
    let answers = ["yes, of course", "no", "maybe later", "I cannot tell"];
    (0..7)
        .map(|i| {
            // A tie (ranks 1, 1) in every ranking: dropped from the pairs on both sides.
            let ranks = match i % 3 {
                0 => vec![0, 1, 1, 2],
                1 => vec![2, 0, 1, 1],
                _ => vec![1, 1, 0, 2],
            };
            RankedExample {
                prompt_id: format!("p{i}"),
                prompt: format!("Question {i}: should we go to the {} today?", ["park", "beach", "zoo"][i % 3]),
                completions: answers.iter().map(|a| a.to_string()).collect(),
                ranks,
                labeler_group: LabelerGroup::Training,
                split: if i < 5 { Split::Train } else { Split::Validation },
                labeler_id: format!("labeler-{}", i % 2),
                weight: if i == 2 { 0.5 } else { 1.0 },
            }
        })
        .collect()
}

/// The reward-model tests' inputs: a tiny policy, a snapshot of demonstrations and rankings, and a config of
/// `epochs` epochs with one optimiser step each (every training ranking in the batch, two per micro-batch).
fn reward_model_fixture(epochs: usize) -> (tempfile::TempDir, PathBuf, PathBuf, Dataset, TrainerConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny(&tmp.path().join("policy"), 6);
    let snapshot = tmp.path().join("snapshot");
    std::fs::create_dir_all(&snapshot).unwrap();
    let data = Dataset { sft: demonstrations(), rm: rankings(), ..Dataset::default() };
    write_jsonl(&snapshot.join("sft.jsonl"), &data.sft);
    write_jsonl(&snapshot.join("rm.jsonl"), &data.rm);
    let mut config = TrainerConfig::default();
    config.reward_model.epochs = epochs;
    config.reward_model.learning_rate = 2e-3;
    config.reward_model.batch_prompts = 8;
    config.reward_model.micro_batch_prompts = 2;
    (tmp, policy, snapshot, data, config)
}

/// The training split's rankings encoded for `rm`, as the reward-model stage builds them.
fn train_rankings(rm: &RewardModel, data: &Dataset) -> Vec<Ranking> {
    data.rm
        .iter()
        .filter(|r| r.split == Split::Train)
        .map(|r| {
            let sequences = r.completions.iter().map(|c| rm.encode(&r.prompt, c).unwrap().0).collect();
            Ranking::new(sequences, r.ranks.clone()).unwrap().with_weight(r.weight)
        })
        .collect()
}

/// The reward-model stage run in process and by the job (from the head saved in `initial`), each into its own
/// directory under `tmp`; returns both directories and the job's metrics.
fn train_reward_model_both_ways(
    python: &Path,
    tmp: &Path,
    config: &TrainerConfig,
    snapshot: &Path,
    data: &Dataset,
    policy: &Path,
    initial: &Path,
) -> (PathBuf, PathBuf, Value) {
    let (rust_out, job_out) = (tmp.join("rust"), tmp.join("job"));
    for out in [&rust_out, &job_out] {
        std::fs::create_dir_all(out).unwrap();
    }
    InProcess { config: config.clone() }
        .run(&job(Stage::RewardModel, snapshot, data, policy, &rust_out), &mut |_| {})
        .unwrap();
    let head = initial.join("reward_head.safetensors");
    let metrics = external(python, config, &[("INSTRUCTD_RM_INITIAL_HEAD", head.to_str().unwrap())])
        .run(&job(Stage::RewardModel, snapshot, data, policy, &job_out), &mut |_| {})
        .unwrap();
    (rust_out, job_out, metrics)
}

#[test]
fn the_reward_model_matches_the_in_process_trainer() {
    let Some(python) = job_python() else { return };
    let (tmp, policy, snapshot, data, config) = reward_model_fixture(3);
    let rm_config = config.reward_model.clone();

    // The head both start from: the in-process trainer's seeded initialisation, handed to the job.
    let rm = RewardModel::from_policy(&policy, &Device::Cpu, rm_config.seed, rm_config.max_seq_len).unwrap();
    let initial = tmp.path().join("initial-rm");
    rm.save(&initial).unwrap();
    let ranked = train_rankings(&rm, &data);
    let refs: Vec<&Ranking> = ranked.iter().collect();
    let vars = rm.vars();
    let mut adam = Adam::new(vars.clone(), rm_config.adam).unwrap();
    let lr = LrSchedule::cosine(rm_config.learning_rate, rm_config.epochs, 0).lr(0);
    let first = trainer::reward_model::train_step(&rm, &vars, &refs, &rm_config, &mut adam, lr).unwrap();
    drop(rm);

    let (rust_out, job_out, metrics) =
        train_reward_model_both_ways(&python, tmp.path(), &config, &snapshot, &data, &policy, &initial);
    let step = &metrics["steps"][0];
    assert_rel("RM first-step loss", first.loss, step["loss"].as_f64().unwrap(), 1e-4);
    assert_rel("RM first-step gradient norm", first.grad_norm, step["grad_norm"].as_f64().unwrap(), 1e-4);
    assert_eq!(first.pairs as u64, step["pairs"].as_u64().unwrap(), "ties dropped alike");

    // Three epochs later: the same validation losses, kept epoch, demonstration bias and nearly the same weights;
    // the job's directory loads as this project's reward model (the backend checked that) and scores alike.
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(rust_out.join("rm_report.json")).unwrap()).unwrap();
    let job_report: Value =
        serde_json::from_str(&std::fs::read_to_string(job_out.join("rm_report.json")).unwrap()).unwrap();
    for (i, (a, b)) in
        report["epochs"].as_array().unwrap().iter().zip(job_report["epochs"].as_array().unwrap()).enumerate()
    {
        let what = format!("RM epoch {} validation loss", i + 1);
        assert_rel(&what, a["val"]["loss"].as_f64().unwrap(), b["val"]["loss"].as_f64().unwrap(), 1e-3);
    }
    assert_eq!(report["kept_epoch"], job_report["kept_epoch"]);
    let (a, b) = (report["bias_offset"].as_f64().unwrap(), job_report["bias_offset"].as_f64().unwrap());
    eprintln!("demonstration bias: in-process {a}, job {b}");
    assert!(rel(a, b) < 1e-3, "demonstration bias {a} vs {b}");
    for file in ["model.safetensors", "reward_head.safetensors"] {
        let (diff, scale) = weights_diff(&rust_out, &job_out, file);
        eprintln!("RM {file}: largest weight difference {diff:.2e} (largest weight {scale:.2e})");
        // Adam moves a weight whose gradient is ~0 by up to the learning rate per step whatever the gradient's
        // last bits, so a few such weights differ by a fraction of lr · steps (6e-3 here); the scores below agree
        // far tighter.
        assert!(diff < 3e-3, "RM {file} differs by up to {diff}");
    }
    let demos: Vec<(&str, &str)> = data.sft.iter().map(|d| (d.prompt.as_str(), d.response.as_str())).collect();
    let rust_scores = RewardModel::load_on(&rust_out, &Device::Cpu).unwrap().score(&demos).unwrap();
    let job_scores = RewardModel::load_on(&job_out, &Device::Cpu).unwrap().score(&demos).unwrap();
    // Within 0.5% of the scores' spread (a wrong head, bias or tokenization moves them by tens of percent). The
    // weights' noise above reaches the scores: measured 2.0e-3 on a spread of 0.97 on an AVX2-only CPU, whose float
    // summation order differs from the AVX-512 kernels' (under 1e-3 there).
    let spread =
        rust_scores.iter().fold(f32::MIN, |m, &s| m.max(s)) - rust_scores.iter().fold(f32::MAX, |m, &s| m.min(s));
    for (a, b) in rust_scores.iter().zip(&job_scores) {
        assert!((a - b).abs() < 5e-3 * spread.max(1e-3), "scores {rust_scores:?} vs {job_scores:?}");
    }
    let order = |scores: &[f32]| {
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
        idx
    };
    assert_eq!(order(&rust_scores), order(&job_scores), "the demonstrations rank alike");
}

/// The rank-gap margin (`margin_per_rank`): rankings with pairs up to three ranks apart (and a tie), trained with a
/// margin on both sides from the same head: the same first-step loss and gradient norm, and the same validation
/// losses (which carry the margin too) epoch by epoch. The margin must change the step, or the test would pass with
/// both sides ignoring it.
#[test]
fn the_reward_model_with_a_rank_gap_margin_matches_the_in_process_trainer() {
    let Some(python) = job_python() else { return };
    let (tmp, policy, snapshot, mut data, mut config) = reward_model_fixture(2);
    for (i, ranking) in data.rm.iter_mut().enumerate() {
        ranking.ranks = match i % 3 {
            0 => vec![0, 3, 1, 2],
            1 => vec![3, 0, 2, 1],
            _ => vec![1, 1, 0, 3],
        };
    }
    write_jsonl(&snapshot.join("rm.jsonl"), &data.rm);
    config.reward_model.margin_per_rank = 0.5;
    let rm_config = config.reward_model.clone();

    let rm = RewardModel::from_policy(&policy, &Device::Cpu, rm_config.seed, rm_config.max_seq_len).unwrap();
    let initial = tmp.path().join("initial-rm");
    rm.save(&initial).unwrap();
    let ranked = train_rankings(&rm, &data);
    let refs: Vec<&Ranking> = ranked.iter().collect();
    let lr = LrSchedule::cosine(rm_config.learning_rate, rm_config.epochs, 0).lr(0);
    // The first step without the margin, on a copy of the untouched weights, then with it.
    let plain = {
        let copy = RewardModel::load_on(&initial, &Device::Cpu).unwrap();
        let vars = copy.vars();
        let mut adam = Adam::new(vars.clone(), rm_config.adam).unwrap();
        let no_margin = trainer::reward_model::RmConfig { margin_per_rank: 0.0, ..rm_config.clone() };
        trainer::reward_model::train_step(&copy, &vars, &refs, &no_margin, &mut adam, lr).unwrap()
    };
    let vars = rm.vars();
    let mut adam = Adam::new(vars.clone(), rm_config.adam).unwrap();
    let first = trainer::reward_model::train_step(&rm, &vars, &refs, &rm_config, &mut adam, lr).unwrap();
    drop(rm);
    eprintln!("RM first-step loss: {} with the margin, {} without", first.loss, plain.loss);
    assert!(first.loss > plain.loss + 1e-3, "the margin raises the loss: {} vs {}", first.loss, plain.loss);

    let (rust_out, job_out, metrics) =
        train_reward_model_both_ways(&python, tmp.path(), &config, &snapshot, &data, &policy, &initial);
    let step = &metrics["steps"][0];
    assert_rel("RM first-step loss with a margin", first.loss, step["loss"].as_f64().unwrap(), 1e-4);
    let grad_norm = step["grad_norm"].as_f64().unwrap();
    assert_rel("RM first-step gradient norm with a margin", first.grad_norm, grad_norm, 1e-4);
    assert_eq!(first.pairs as u64, step["pairs"].as_u64().unwrap(), "ties dropped alike");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(rust_out.join("rm_report.json")).unwrap()).unwrap();
    let job_report: Value =
        serde_json::from_str(&std::fs::read_to_string(job_out.join("rm_report.json")).unwrap()).unwrap();
    assert_eq!(job_report["config"]["margin_per_rank"], 0.5, "the job got the margin");
    let (a, b) = (&report["val_before"], &job_report["val_before"]);
    assert_rel(
        "RM validation loss before training, with a margin",
        a["loss"].as_f64().unwrap(),
        b["loss"].as_f64().unwrap(),
        1e-4,
    );
    for (i, (a, b)) in
        report["epochs"].as_array().unwrap().iter().zip(job_report["epochs"].as_array().unwrap()).enumerate()
    {
        let what = format!("RM epoch {} validation loss with a margin", i + 1);
        assert_rel(&what, a["val"]["loss"].as_f64().unwrap(), b["val"]["loss"].as_f64().unwrap(), 1e-3);
    }
    assert_eq!(report["kept_epoch"], job_report["kept_epoch"]);
}

/// The PPO probe's inputs: a tiny policy, reference and reward model, the in-process trainer's own rollout of five
/// prompts, and pre-training windows (one minibatch's worth).
struct PpoProbe {
    tmp: tempfile::TempDir,
    policy_dir: PathBuf,
    reference_dir: PathBuf,
    rm_dir: PathBuf,
    ppo: PpoConfig,
    policy: PolicyModel,
    prompts: Vec<String>,
    episodes: Vec<Episode>,
    windows: Vec<Vec<u32>>,
}

impl PpoProbe {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let policy_dir = tiny(&tmp.path().join("policy"), 11);
        let reference_dir = tiny(&tmp.path().join("reference"), 12);
        let rm_dir = tmp.path().join("rm");
        RewardModel::from_policy(&policy_dir, &Device::Cpu, 3, 256).unwrap().save(&rm_dir).unwrap();
        let mut config = TrainerConfig::default();
        config.ppo.minibatch_size = 3;
        config.ppo.kl_coef = 0.1;
        config.ppo.ptx_coef = 0.5;
        config.ppo.ptx_micro_batch = 2;
        config.ppo.max_new_tokens = 8;
        let ppo = config.ppo.clone();

        let policy = PolicyModel::load(&policy_dir, &Device::Cpu).unwrap();
        let prompts: Vec<String> =
            ["Say hi.", "Name a fruit.", "What is two plus two?", "Describe the sea.", "Count to three."]
                .map(String::from)
                .to_vec();
        let engine = engine_sharing(&policy, "rollout", prompts.len()).unwrap();
        let episodes: Vec<Episode> = ppo::rollout(&engine, &prompts, &ppo, 1).unwrap();
        drop(engine);
        assert_eq!(episodes.len(), prompts.len());
        let text = "Now, fair Hippolyta, our nuptial hour draws on apace; four happy days bring in another moon.";
        let ids = policy.tokenizer().encode(&text.repeat(4), false).unwrap();
        let windows: Vec<Vec<u32>> = ids.chunks_exact(16).take(ppo.minibatch_size).map(<[u32]>::to_vec).collect();
        assert_eq!(windows.len(), ppo.minibatch_size);
        Self { tmp, policy_dir, reference_dir, rm_dir, ppo, policy, prompts, episodes, windows }
    }

    /// The probe's episodes file: the episodes and windows, the minibatch order, and `draws` window indices
    /// (cycling through the windows) for the minibatches' ptx terms.
    fn spec(&self, order: &[usize], draws: usize) -> Value {
        json!({
            "prompts": self.prompts,
            "episodes": self.episodes.iter().map(|e| json!({
                "prompt_index": e.prompt_index, "prompt_ids": e.prompt_ids, "response_ids": e.response_ids,
                "text": e.text, "stopped": e.stopped,
            })).collect::<Vec<_>>(),
            "order": order,
            "windows": self.windows,
            "window_indices": (0..draws).map(|i| i % self.windows.len()).collect::<Vec<_>>(),
        })
    }

    /// The job's `probe-ppo` on `spec` with `ppo`, on one process or on `processes` under
    /// `python -m torch.distributed.run --standalone` (gloo on the CPU); its JSON line.
    fn run(&self, python: &Path, spec: &Value, ppo: &PpoConfig, processes: usize, env: &[(&str, &str)]) -> Value {
        let spec_path = self.tmp.path().join(format!("episodes-{processes}.json"));
        std::fs::write(&spec_path, spec.to_string()).unwrap();
        let mut command = std::process::Command::new(python);
        if processes > 1 {
            let n = processes.to_string();
            command.args(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n.as_str()]);
        }
        let out = command
            .arg(trainer_job::job_script())
            .args(["probe-ppo", spec_path.to_str().unwrap()])
            .env("INSTRUCTD_STAGE", "ppo_ptx")
            .env("INSTRUCTD_SNAPSHOT_DIR", self.tmp.path())
            .env("INSTRUCTD_POLICY_DIR", &self.policy_dir)
            .env("INSTRUCTD_REFERENCE_DIR", &self.reference_dir)
            .env("INSTRUCTD_REWARD_MODEL_DIR", &self.rm_dir)
            .env("INSTRUCTD_OUTPUT_DIR", self.tmp.path().join("out"))
            .env("INSTRUCTD_HYPERPARAMETERS", serde_json::to_string(ppo).unwrap())
            .env("TRANSFORMERS_VERBOSITY", "error")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "probe-ppo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    }
}

/// The first PPO-ptx optimiser step on the same episodes, corpus windows and minibatch: the in-process trainer's
/// own PPO steps (`ppo::rollout`, `ppo::rewards`, `ppo::score`, `ppo::advantages`, `ppo::ppo_step`, the ones
/// `ppo::train` runs) against the job's `probe-ppo`, which runs its real update loop on the given episodes.
#[test]
fn ppo_ptx_first_step_matches_the_in_process_trainer() {
    let Some(python) = job_python() else { return };
    let probe = PpoProbe::new();
    let (ppo, policy, prompts, episodes, windows) =
        (&probe.ppo, &probe.policy, &probe.prompts, &probe.episodes, &probe.windows);
    let dev = Device::Cpu;
    let order = [3usize, 0, 4, 1, 2];

    // In-process, the trainer's own steps: scores, old/reference log-probabilities and values, shaped rewards,
    // GAE and whitening, then the first minibatch's PPO-ptx step (clipped policy loss and γ·ptx NLL, one Adam
    // step; clipped value loss, one Adam step), as ppo::train runs them.
    let reference = PolicyModel::load(&probe.reference_dir, &dev).unwrap();
    let scorer = RewardModel::load_on(&probe.rm_dir, &dev).unwrap();
    let critic = RewardModel::load_on(&probe.rm_dir, &dev).unwrap();
    let scores = ppo::rewards(&scorer, prompts, episodes).unwrap();
    let experience = ppo::score(policy.llama(), reference.llama(), &critic, episodes, ppo.minibatch_size).unwrap();
    let advantages = ppo::advantages(&experience, &scores, ppo.kl_coef, ppo.gae_lambda).unwrap();
    let minibatch = ppo::Minibatch::select(&experience, &advantages, &order[..ppo.minibatch_size]).unwrap();
    let window_refs: Vec<&[u32]> = windows.iter().map(Vec::as_slice).collect();
    let mut learners = ppo::Learners::new(policy, &critic, ppo).unwrap();
    let (lr, value_lr) = (ppo.learning_rate, ppo.value_learning_rate);
    let (policy_step, value_step) =
        ppo::ppo_step(&mut learners, &minibatch, Some(&window_refs), ppo, lr, value_lr).unwrap();

    // The job, on the same episodes. The whole iteration runs in the probe: windows for the later minibatches too
    // (only the first is compared).
    let spec = probe.spec(&order, episodes.len());
    let out = probe.run(&python, &spec, ppo, 1, &[]);
    let step = &out["steps"][0];
    let reward_mean = f64::from(scores.iter().sum::<f32>()) / scores.len() as f64;
    assert_rel("PPO reward mean", reward_mean, out["iteration"]["reward_mean"].as_f64().unwrap(), 1e-4);
    let kl_sum: f32 = experience.batch.response_sums(&advantages.kl).unwrap().iter().sum();
    let kl_mean = f64::from(kl_sum) / episodes.len() as f64;
    assert_rel("PPO KL from the reference", kl_mean, out["iteration"]["kl"].as_f64().unwrap(), 1e-4);
    let policy_loss = f64::from(policy_step.loss);
    assert_rel("PPO first-step policy loss", policy_loss, step["policy_loss"].as_f64().unwrap(), 1e-4);
    let ptx_loss = f64::from(policy_step.ptx_loss.unwrap());
    assert_rel("PPO first-step ptx loss", ptx_loss, step["ptx_loss"].as_f64().unwrap(), 1e-4);
    let grad_norm = policy_step.grad_norm;
    assert_rel("PPO first-step policy gradient norm", grad_norm, step["grad_norm"].as_f64().unwrap(), 1e-4);
    let v_loss = f64::from(value_step.loss);
    assert_rel("PPO first-step value loss", v_loss, step["value_loss"].as_f64().unwrap(), 1e-4);
    let value_grad_norm = value_step.grad_norm;
    assert_rel("PPO first-step value gradient norm", value_grad_norm, step["value_grad_norm"].as_f64().unwrap(), 1e-4);
}

/// The job on two processes (data parallel over gloo, `torch.distributed.run`) trains the same reward model as on
/// one: each process takes every other micro-batch of a step, so the step's gradient is the same sum, and the save
/// gathers the weights through Accelerate (the path FSDP needs) with the main process writing.
#[test]
fn the_reward_model_on_two_processes_matches_one_process() {
    let Some(python) = job_python() else { return };
    let (tmp, policy, snapshot, data, config) = reward_model_fixture(2);

    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let mut metrics = Vec::new();
    for (out, processes) in [(&one, 1), (&two, 2)] {
        std::fs::create_dir_all(out).unwrap();
        let mut command = job_command(&python, &[("OMP_NUM_THREADS", "1")]);
        if processes > 1 {
            // `python -m torch.distributed.run --standalone --nproc_per_node 2 train.py`
            let script = command.len() - 1;
            command.splice(
                script..script,
                ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"].map(String::from),
            );
        }
        let backend = BackendConfig { kind: BackendKind::External, command, timeout_secs: 600 };
        let external = External { config: TrainerConfig { backend, ..config.clone() } };
        metrics.push(external.run(&job(Stage::RewardModel, &snapshot, &data, &policy, out), &mut |_| {}).unwrap());
    }
    let engine = |m: &Value| m["engine"].as_str().unwrap_or_default().to_string();
    assert!(engine(&metrics[1]).contains("2 process"), "ran on two processes: {}", engine(&metrics[1]));
    for (a, b) in metrics[0]["steps"].as_array().unwrap().iter().zip(metrics[1]["steps"].as_array().unwrap()) {
        assert_rel("RM step loss, 1 vs 2 processes", a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap(), 1e-5);
        let (ga, gb) = (a["grad_norm"].as_f64().unwrap(), b["grad_norm"].as_f64().unwrap());
        assert_rel("RM gradient norm, 1 vs 2 processes", ga, gb, 1e-5);
    }
    for file in ["model.safetensors", "reward_head.safetensors"] {
        let (diff, scale) = weights_diff(&one, &two, file);
        eprintln!("RM {file}, 1 vs 2 processes: largest weight difference {diff:.2e} (largest weight {scale:.2e})");
        assert!(diff < 1e-4, "RM {file} differs by up to {diff} between one and two processes");
    }
}

/// PPO-ptx data parallel: the probe's whole iteration on the same episodes on one process and on two
/// (`torch.distributed.run`, gloo). Each process scores and evaluates every other episode; the reward
/// normalisation, whitening and reported means are over both processes' episodes, and each minibatch's losses are
/// scaled by its whole token count so the summed gradients are one process's: every step's losses and gradient
/// norms agree.
#[test]
fn ppo_ptx_on_two_processes_matches_one_process() {
    let Some(python) = job_python() else { return };
    let probe = PpoProbe::new();
    let mut ppo = probe.ppo.clone();
    ppo.minibatch_size = 2;
    ppo.ptx_micro_batch = 1;
    ppo.inner_epochs = 2;
    ppo.normalize_rewards = true;
    // Process 0 holds episodes 0, 2 and 4, process 1 episodes 1 and 3: minibatch {0, 2} is process 0's alone,
    // {1, 4} is shared, {3} is process 1's alone while its ptx window is process 0's.
    let order = [0usize, 2, 1, 4, 3];
    let spec = probe.spec(&order, ppo.inner_epochs * probe.episodes.len());
    let threads = [("OMP_NUM_THREADS", "1")];
    let one = probe.run(&python, &spec, &ppo, 1, &threads);
    let two = probe.run(&python, &spec, &ppo, 2, &threads);
    assert_eq!(two["processes"], 2, "ran on two processes");

    let number = |v: &Value, what: &str| v[what].as_f64().unwrap_or_else(|| panic!("{what}: {v}"));
    for what in ["reward_mean", "reward_std", "kl", "policy_loss", "value_loss", "ptx_loss", "entropy"] {
        let (a, b) = (number(&one["iteration"], what), number(&two["iteration"], what));
        assert_rel(&format!("PPO iteration {what}, 1 vs 2 processes"), a, b, 1e-5);
    }
    assert_eq!(one["iteration"]["episodes"], two["iteration"]["episodes"]);
    let (steps_one, steps_two) = (one["steps"].as_array().unwrap(), two["steps"].as_array().unwrap());
    assert_eq!(steps_one.len(), 6, "two passes over three minibatches");
    assert_eq!(steps_one.len(), steps_two.len());
    for (i, (a, b)) in steps_one.iter().zip(steps_two).enumerate() {
        for what in ["policy_loss", "ptx_loss", "grad_norm", "value_loss", "value_grad_norm"] {
            let what_step = format!("PPO step {i} {what}, 1 vs 2 processes");
            assert_rel(&what_step, number(a, what), number(b, what), 1e-5);
        }
    }
}

/// The cost options: with `gradient_checkpointing` both sides recompute activations in the backward pass and still
/// take the same first SFT step; `lora_rank > 0`, which only the in-process trainer implements, is refused by the
/// job by name instead of being trained as a full fine-tune.
#[test]
fn the_job_checkpoints_activations_and_refuses_lora() {
    let Some(python) = job_python() else { return };
    let (tmp, policy, snapshot, data, mut config) = sft_fixture(1);
    config.sft.gradient_checkpointing = true;

    let (rust_out, job_out) = (tmp.path().join("rust"), tmp.path().join("job"));
    for out in [&rust_out, &job_out] {
        std::fs::create_dir_all(out).unwrap();
    }
    InProcess { config: config.clone() }
        .run(&job(Stage::Sft, &snapshot, &data, &policy, &rust_out), &mut |_| {})
        .unwrap();
    external(&python, &config, &[]).run(&job(Stage::Sft, &snapshot, &data, &policy, &job_out), &mut |_| {}).unwrap();
    // One step (the whole training split in one batch): its loss, and the validation loss after it.
    let epoch = |dir: &Path| -> Value {
        let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("sft.json")).unwrap()).unwrap();
        report["epochs"][0].clone()
    };
    let (a, b) = (epoch(&rust_out), epoch(&job_out));
    for field in ["train_loss", "val_loss"] {
        let what = format!("SFT {field}, checkpointed");
        assert_rel(&what, a[field].as_f64().unwrap(), b[field].as_f64().unwrap(), 1e-4);
    }

    config.sft.gradient_checkpointing = false;
    config.sft.lora_rank = 8;
    let refused = external(&python, &config, &[])
        .run(&job(Stage::Sft, &snapshot, &data, &policy, &tmp.path().join("lora")), &mut |_| {})
        .expect_err("the job does not implement LoRA");
    assert!(refused.to_string().contains("lora_rank"), "refused by name: {refused}");
}
