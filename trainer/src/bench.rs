//! Timed training steps on batches of exact shapes, for `instructd bench-train` and its side-by-side comparison
//! with PyTorch (`bench/train/compare.sh`).
//!
//! Each measurement calls the stage's own step ([`crate::sft::train_step`], [`crate::reward_model::train_step`],
//! [`crate::ppo::train`]), so the figures are the trainer's, not a stand-in's. The token ids come from real text
//! through the model's tokenizer; only their grouping into prompts and responses is synthetic.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use crate::corpus::{CorpusConfig, PretrainCorpus};
use crate::optim::{Adam, AdamConfig};
use crate::policy_model::{ChatTokens, CostOptions, PolicyModel, TrainError, TrainResult};
use crate::ppo::{PpoConfig, PpoInputs, PpoIteration};
use crate::reward_model::{self, Ranking, RewardModel, RmConfig};
use crate::sft::{self, SftConfig};
use crate::step_timing::StepTiming;

/// Text the synthetic batches are cut from.
const PASSAGE: &str = "The history of the printing press begins with the need to copy texts faster than scribes \
could. Movable type, ink that clung to metal, and a press adapted from those used for wine and olive oil came \
together in the fifteenth century. Within fifty years presses operated in hundreds of towns, books became cheaper, \
and ideas travelled further and faster than ever before. ";

/// One measured step (or PPO iteration).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measured {
    pub secs: f64,
    pub forward: f64,
    pub backward: f64,
    pub gradients: f64,
    pub optimizer: f64,
    /// PPO only: sampling the episodes through the engine.
    pub rollout: f64,
    /// CPU seconds of this process (all threads) during the step.
    pub cpu: f64,
}

impl Measured {
    fn from_timing(t: &StepTiming, cpu: f64) -> Self {
        Self {
            secs: t.total(),
            forward: t.forward,
            backward: t.backward,
            gradients: t.gradients,
            optimizer: t.optimizer,
            rollout: 0.0,
            cpu,
        }
    }
}

/// User + system CPU seconds of this process so far (Linux; 0 elsewhere).
pub fn cpu_secs() -> f64 {
    let read = || -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    };
    read().unwrap_or(0.0)
}

/// `count` distinct token sequences of exactly `len` tokens of text.
pub fn text_sequences(model: &PolicyModel, len: usize, count: usize) -> TrainResult<Vec<Vec<u32>>> {
    let tokenizer = model.tokenizer();
    let passage = tokenizer.encode(&PASSAGE.repeat(len / 40 + 2), false)?;
    (0..count)
        .map(|i| {
            let mut ids = tokenizer.encode(&format!("Example {i}. "), false)?;
            ids.extend(passage.iter().copied());
            ids.truncate(len);
            if ids.len() != len {
                return Err(TrainError::Data(format!("could not build a {len}-token sequence")));
            }
            Ok(ids)
        })
        .collect()
}

/// Adam over the model's trainable variables, as the stages build it.
fn adam_for(vars: &[candle_core::Var]) -> TrainResult<Adam> {
    Ok(Adam::new(vars.to_vec(), AdamConfig::default())?)
}

/// SFT steps on `sequences` examples of `seq_len` input tokens each (the first quarter prompt, the rest response
/// carrying loss), all in one micro-batch; `warmup + rounds` steps, the first `warmup` not reported.
pub fn sft_steps(
    model_dir: &Path,
    sequences: usize,
    seq_len: usize,
    options: &CostOptions,
    warmup: usize,
    rounds: usize,
) -> TrainResult<Vec<Measured>> {
    let model = PolicyModel::load(model_dir, &Device::Cpu)?.with_cost_options(options)?;
    let batch: Vec<ChatTokens> = text_sequences(&model, seq_len + 1, sequences)?
        .into_iter()
        .map(|ids| ChatTokens { ids, prompt_len: (seq_len / 4).max(1) })
        .collect();
    let refs: Vec<&ChatTokens> = batch.iter().collect();
    let config = SftConfig { batch_size: sequences, micro_batch_size: sequences, ..SftConfig::default() };
    let vars = model.vars();
    let mut adam = adam_for(&vars)?;
    let mut out = Vec::new();
    for round in 0..warmup + rounds {
        let cpu = cpu_secs();
        let outcome = sft::train_step(&model, &vars, &refs, &config, &mut adam, 1e-6)?;
        if round >= warmup {
            out.push(Measured::from_timing(&outcome.timing, cpu_secs() - cpu));
        }
    }
    Ok(out)
}

/// Reward-model steps on one prompt's `k` completions of `seq_len` tokens each (all `k(k-1)/2` pairs ordered).
pub fn rm_steps(
    model_dir: &Path,
    k: usize,
    seq_len: usize,
    options: &CostOptions,
    warmup: usize,
    rounds: usize,
) -> TrainResult<Vec<Measured>> {
    let rm = RewardModel::from_policy(model_dir, &Device::Cpu, 0, seq_len)?.with_cost_options(options)?;
    let sequences = text_sequences(rm.trunk(), seq_len, k)?;
    let ranking = Ranking::new(sequences, (0..k).collect())
        .ok_or_else(|| TrainError::Data("a ranking needs at least two completions".into()))?;
    let config = RmConfig { batch_prompts: 1, micro_batch_prompts: 1, ..RmConfig::default() };
    let vars = rm.vars();
    let mut adam = adam_for(&vars)?;
    let mut out = Vec::new();
    for round in 0..warmup + rounds {
        let cpu = cpu_secs();
        let outcome = reward_model::train_step(&rm, &vars, &[&ranking], &config, &mut adam, 1e-6)?;
        if round >= warmup {
            out.push(Measured::from_timing(&outcome.timing, cpu_secs() - cpu));
        }
    }
    Ok(out)
}

/// What a PPO-ptx iteration benchmark runs on.
#[derive(Debug, Clone)]
pub struct PpoBench {
    pub model_dir: PathBuf,
    pub corpus_dir: PathBuf,
    /// Scratch space for the reward model (made from the policy) and the saved policy.
    pub work_dir: PathBuf,
    pub episodes: usize,
    pub minibatch: usize,
    pub max_new_tokens: usize,
    pub freeze_layers: usize,
    /// LoRA rank (0: full fine-tune), with the stage's default alpha and targets.
    pub lora_rank: usize,
    pub gradient_checkpointing: bool,
}

/// `warmup + rounds` PPO-ptx iterations (rollouts, the four scoring forwards, the policy, ptx and value
/// updates) from the model against a reward model initialised from it.
pub fn ppo_iterations(bench: &PpoBench, warmup: usize, rounds: usize) -> TrainResult<Vec<Measured>> {
    let rm_dir = bench.work_dir.join("reward-model");
    RewardModel::from_policy(&bench.model_dir, &Device::Cpu, 0, 512)?.save(&rm_dir)?;
    let policy = PolicyModel::load(&bench.model_dir, &Device::Cpu)?;
    let corpus = PretrainCorpus::load(
        &CorpusConfig { dir: bench.corpus_dir.clone(), ..CorpusConfig::default() },
        policy.tokenizer(),
    )?;
    drop(policy);
    let prompts: Vec<String> =
        (0..bench.episodes).map(|i| format!("Write a few sentences about printing, part {i}.")).collect();
    let config = PpoConfig {
        iterations: warmup + rounds,
        episodes_per_iteration: bench.episodes,
        minibatch_size: bench.minibatch,
        max_new_tokens: bench.max_new_tokens,
        ema_decay: None,
        freeze_layers: bench.freeze_layers,
        lora_rank: bench.lora_rank,
        gradient_checkpointing: bench.gradient_checkpointing,
        ..PpoConfig::default()
    };
    let inputs = PpoInputs {
        policy_dir: &bench.model_dir,
        reference_dir: &bench.model_dir,
        reward_model_dir: &rm_dir,
        prompts: &prompts,
        corpus: Some(&corpus),
    };
    let mut measured = Vec::new();
    let mut cpu = cpu_secs();
    let mut record = |it: &PpoIteration| {
        let now = cpu_secs();
        let used = now - std::mem::replace(&mut cpu, now);
        if it.iteration > warmup {
            measured.push(Measured {
                secs: it.wall_secs,
                forward: 0.0,
                backward: 0.0,
                gradients: 0.0,
                optimizer: 0.0,
                rollout: it.rollout_secs,
                cpu: used,
            });
        }
    };
    crate::ppo::train(inputs, config, &bench.work_dir.join("policy"), &mut record)?;
    Ok(measured)
}

/// Forward + backward FLOPs of one pass over `tokens` tokens: the transformer's matmuls (6 per weight per token,
/// the usual estimate), causal attention over `seq_len` positions (`6·T·D` per head per token: half of the
/// `T` keys on average, two products, backward twice the forward) and the vocabulary projection of
/// `head_tokens` positions.
pub fn train_flops(model: &inference::config::LlamaConfig, tokens: usize, seq_len: usize, head_tokens: usize) -> f64 {
    let (h, i, l) = (model.hidden_size as f64, model.intermediate_size as f64, model.num_hidden_layers as f64);
    let (heads, kv, d) = (model.num_attention_heads as f64, model.num_kv_heads() as f64, model.head_dim() as f64);
    let per_layer = h * heads * d * 2.0 + h * kv * d * 2.0 + 3.0 * h * i;
    let matmuls = 6.0 * per_layer * l * tokens as f64;
    let attention = 6.0 * seq_len as f64 * d * heads * l * tokens as f64;
    let head = 6.0 * h * model.vocab_size as f64 * head_tokens as f64;
    matmuls + attention + head
}
