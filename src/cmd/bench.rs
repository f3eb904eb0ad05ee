//! `instructd bench`: prefill and decode throughput and latency of the engine
//! on one model directory, printed as a table (and optionally JSON).
//!
//! Decode runs `c` requests at once (each a distinct prompt, greedy, a fixed
//! number of tokens with EOS ignored), so the figure is the aggregate
//! throughput continuous batching gives at that concurrency.
//!
//! Every request gets a prompt no earlier request started with, so the
//! prefix cache never shortens a row's prefill, except in the prefix row:
//! there a fresh `--prefix-tokens` prefix is sent once (uncached) and then
//! again with another question after it (cached), alternating, and both
//! first-token times are reported.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use inference::engine::{Engine, EngineConfig, Event, GenerateRequest};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "models/smollm2-135m-instruct")]
    model: PathBuf,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Format of the projection weights (`[model] serve_dtype`): f32, bf16, q8_0 or q4_0.
    #[arg(long, default_value = "f32")]
    serve_dtype: inference::quant::ServeDtype,
    /// Prompt length of every request.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per request in the decode runs.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Concurrent requests for each decode run.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Rounds per decode row (the median round is reported); prefill runs 2 x rounds + 1 times.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Positions per KV block (`[engine] kv_block_tokens`); one block as long as
    /// the context attends over contiguous keys, as before the block pool.
    #[arg(long, default_value_t = inference::kv_pool::DEFAULT_BLOCK_TOKENS)]
    kv_block_tokens: usize,
    /// How cached keys and values are stored (`[engine] kv_dtype`): f32 or f16.
    #[arg(long, default_value = "f32")]
    kv_dtype: inference::kv_pool::KvDtype,
    /// Shared prefix of the prefix-cache row (0: no such row).
    #[arg(long, default_value_t = 512)]
    prefix_tokens: usize,
    /// Engine compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

const PASSAGE: &str = "The history of the printing press begins with the need to copy texts faster than \
scribes could. Movable type, ink that clung to metal, and a press adapted from those used for wine and \
olive oil came together in the fifteenth century. Within fifty years presses operated in hundreds of \
towns, books became cheaper, and ideas travelled further and faster than ever before. ";

#[derive(Debug, serde::Serialize)]
struct Row {
    workload: String,
    requests: usize,
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    /// Time per output token after the first, p50 over requests.
    tpot_p50_ms: f64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let load_start = Instant::now();
    let config = EngineConfig {
        max_running: 64,
        queue_capacity: 1024,
        compute_threads: args.threads,
        kv_block_tokens: args.kv_block_tokens,
        kv_dtype: args.kv_dtype,
        ..Default::default()
    };
    let threads = config.resolved_compute_threads();
    let engine = super::start_engine_as(&args.model, &args.dtype, args.serve_dtype, None, config)?;
    let load_s = load_start.elapsed().as_secs_f64();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut prompts = Prompts::new(&engine)?;

    runtime.block_on(async {
        // Warm-up: first-touch of weights and allocator pools.
        run_batch(&engine, &prompts.fresh(args.prompt_tokens, 1)?, 4).await?;
        let mut rows = Vec::new();
        let mut prefill = Vec::new();
        for _ in 0..args.rounds.max(1) * 2 + 1 {
            let timings = run_batch(&engine, &prompts.fresh(args.prompt_tokens, 1)?, 1).await?;
            prefill.push(timings[0].ttft);
        }
        prefill.sort();
        let ttft = percentile(&prefill, 50.0);
        rows.push(Row {
            workload: format!("prefill {} tokens", args.prompt_tokens),
            requests: 1,
            tokens_per_s: args.prompt_tokens as f64 / ttft.as_secs_f64(),
            ttft_p50_ms: ms(ttft),
            ttft_p99_ms: ms(percentile(&prefill, 99.0)),
            latency_p50_ms: ms(ttft),
            latency_p99_ms: ms(percentile(&prefill, 99.0)),
            tpot_p50_ms: f64::NAN,
        });
        for &c in &args.concurrency {
            // Several rounds; the one with the median throughput is reported,
            // so one noisy round does not decide the figure.
            let mut rounds = Vec::new();
            for _ in 0..args.rounds.max(1) {
                rounds.push(decode_round(&engine, &prompts.fresh(args.prompt_tokens, c)?, args.gen_tokens).await?);
            }
            rounds.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
            let mut row = rounds.swap_remove(rounds.len() / 2);
            row.workload = format!("decode {c} concurrent x {} tokens", args.gen_tokens);
            rows.push(row);
        }
        if args.prefix_tokens > 0 {
            rows.extend(prefix_rows(&engine, &mut prompts, args.prefix_tokens, args.rounds).await?);
        }
        print_report(&args, threads, load_s, &rows);
        anyhow::Ok(())
    })
}

/// First-token time of `prefix + question` with the prefix new (uncached) and
/// then seen before (cached), over `2 x rounds + 1` fresh prefixes, the two
/// cases alternating; the median of each, and the cached one's share.
async fn prefix_rows(
    engine: &Engine,
    prompts: &mut Prompts<'_>,
    prefix: usize,
    rounds: usize,
) -> anyhow::Result<Vec<Row>> {
    let question = |q: &str| engine.tokenizer().encode(q, false);
    let (first, second) =
        (question(" Question: who built the first press?")?, question(" Question: when did it spread?")?);
    // The prefix, a question and the first token must fit the model's context (a small model's is short).
    let room = engine.info().max_positions.saturating_sub(first.len().max(second.len()) + 1);
    let prefix = prefix.min(room);
    if prefix < inference::kv_pool::DEFAULT_BLOCK_TOKENS {
        eprintln!("no prefix-cache row: the model's context leaves no room for a cacheable prefix");
        return Ok(Vec::new());
    }
    let (mut uncached, mut cached) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) * 2 + 1 {
        let shared = prompts.fresh(prefix, 1)?.remove(0);
        for (question, times) in [(&first, &mut uncached), (&second, &mut cached)] {
            let prompt: Vec<u32> = shared.iter().chain(question.iter()).copied().collect();
            times.push(run_batch(engine, &[prompt], 1).await?[0].ttft);
        }
    }
    uncached.sort();
    cached.sort();
    let total = prefix + first.len().max(second.len());
    let row = |label: String, times: &[Duration]| {
        let ttft = percentile(times, 50.0);
        Row {
            workload: label,
            requests: 1,
            tokens_per_s: total as f64 / ttft.as_secs_f64(),
            ttft_p50_ms: ms(ttft),
            ttft_p99_ms: ms(percentile(times, 99.0)),
            latency_p50_ms: ms(ttft),
            latency_p99_ms: ms(percentile(times, 99.0)),
            tpot_p50_ms: f64::NAN,
        }
    };
    let share = 100.0 * ms(percentile(&cached, 50.0)) / ms(percentile(&uncached, 50.0));
    Ok(vec![
        row(format!("prefill {prefix}-token prefix + question, prefix uncached"), &uncached),
        row(format!("prefill {prefix}-token prefix + question, prefix cached ({share:.0}% of uncached TTFT)"), &cached),
    ])
}

/// `prompts.len()` concurrent requests of `gen_tokens` each, measured.
async fn decode_round(engine: &Engine, prompts: &[Vec<u32>], gen_tokens: usize) -> anyhow::Result<Row> {
    let start = Instant::now();
    let timings = run_batch(engine, prompts, gen_tokens).await?;
    let wall = start.elapsed().as_secs_f64();
    let generated: usize = timings.iter().map(|t| t.tokens).sum();
    let sorted = |f: &dyn Fn(&Timing) -> Duration| {
        let mut v: Vec<Duration> = timings.iter().map(f).collect();
        v.sort();
        v
    };
    let ttft = sorted(&|t| t.ttft);
    let latency = sorted(&|t| t.total);
    let tpot = sorted(&|t| (t.total - t.ttft) / (t.tokens.saturating_sub(1).max(1) as u32));
    Ok(Row {
        workload: String::new(),
        requests: prompts.len(),
        tokens_per_s: generated as f64 / wall,
        ttft_p50_ms: ms(percentile(&ttft, 50.0)),
        ttft_p99_ms: ms(percentile(&ttft, 99.0)),
        latency_p50_ms: ms(percentile(&latency, 50.0)),
        latency_p99_ms: ms(percentile(&latency, 99.0)),
        tpot_p50_ms: ms(percentile(&tpot, 50.0)),
    })
}

struct Timing {
    ttft: Duration,
    total: Duration,
    tokens: usize,
}

/// Submits every prompt at once and waits for all of them.
async fn run_batch(engine: &Engine, prompts: &[Vec<u32>], max_tokens: usize) -> anyhow::Result<Vec<Timing>> {
    let start = Instant::now();
    let mut generations = Vec::new();
    for prompt in prompts {
        let mut request = GenerateRequest::new(prompt.clone(), max_tokens);
        request.sampling.temperature = 0.0;
        request.ignore_eos = true;
        generations.push(engine.submit(request, true)?);
    }
    let tasks = generations.into_iter().map(|mut generation| async move {
        let mut first = None;
        let mut tokens = 0;
        while let Some(event) = generation.next().await {
            match event {
                Event::Token { token: _, .. } => {
                    first.get_or_insert_with(|| start.elapsed());
                }
                Event::Finished { completion_tokens, .. } => {
                    tokens = completion_tokens;
                    break;
                }
                Event::Failed { message } => anyhow::bail!(message),
                Event::Prompt { .. } => {}
            }
        }
        let total = start.elapsed();
        Ok(Timing { ttft: first.unwrap_or(total), total, tokens })
    });
    futures_join_all(tasks).await
}

/// Polls the futures concurrently on the current task (they only await channel receives).
async fn futures_join_all<F, T>(futures: impl IntoIterator<Item = F>) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.context("benchmark task panicked")??);
    }
    Ok(out)
}

/// Prompts that start differently from every prompt made before (a request
/// number first), so none finds its start in the prefix cache.
struct Prompts<'e> {
    engine: &'e Engine,
    next: usize,
}

impl<'e> Prompts<'e> {
    fn new(engine: &'e Engine) -> anyhow::Result<Self> {
        Ok(Self { engine, next: 0 })
    }

    /// `count` new prompts of exactly `len` tokens.
    fn fresh(&mut self, len: usize, count: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        let tokenizer = self.engine.tokenizer();
        let passage = tokenizer.encode(&PASSAGE.repeat(len / 40 + 2), false)?;
        (0..count)
            .map(|_| {
                self.next += 1;
                let mut ids = tokenizer.encode(&format!("Request {}. ", self.next), false)?;
                ids.extend(passage.iter().copied());
                ids.truncate(len);
                anyhow::ensure!(ids.len() == len, "could not build a {len}-token prompt");
                Ok(ids)
            })
            .collect()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_report(args: &BenchArgs, threads: usize, load_s: f64, rows: &[Row]) {
    let cpu = super::cpu_name();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let peak_rss_mb = super::peak_rss_kb().map(|kb| kb as f64 / 1024.0);
    println!(
        "model {} ({}, serve_dtype {}, kv_dtype {}), {cpu}, {cores} cores, {threads} compute threads, load {load_s:.2}s",
        args.model.display(),
        args.dtype,
        args.serve_dtype,
        args.kv_dtype.name()
    );
    println!();
    println!("| workload | tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | TPOT p50 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let tpot = if r.tpot_p50_ms.is_nan() { "-".to_string() } else { format!("{:.1}", r.tpot_p50_ms) };
        println!(
            "| {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {tpot} |",
            r.workload, r.tokens_per_s, r.ttft_p50_ms, r.ttft_p99_ms, r.latency_p50_ms, r.latency_p99_ms
        );
    }
    println!();
    println!(
        "tok/s: prompt tokens per second for prefill; generated tokens over wall time (prefill included) for decode."
    );
    println!("TPOT: time per output token after the first, per request.");
    if let Some(mb) = peak_rss_mb {
        println!();
        println!("peak RSS {mb:.0} MB");
    }
    if args.json {
        let json = serde_json::json!({
            "engine": "instructd", "model": args.model, "dtype": args.dtype,
            "serve_dtype": args.serve_dtype, "kv_dtype": args.kv_dtype.name(), "cpu": cpu, "cores": cores,
            "threads": threads, "load_s": load_s, "peak_rss_mb": peak_rss_mb, "rows": rows,
        });
        println!("{json}");
    }
}
