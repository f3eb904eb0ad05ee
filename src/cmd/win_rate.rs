//! `instructd win-rate`: how often one checkpoint's answers beat another's
//! under a hidden preference, on prompts no simulated user ever sent (a
//! held-out prompt file), measured through the real API with each request
//! pinned to its checkpoint (`model: "<name>@<checkpoint>"`).
//!
//! This is the loop's ground truth: the reward model only approximates the
//! hidden rule, this applies the rule itself. Each prompt gets `--samples`
//! chat completions from both checkpoints with the same seeds; the prompt is a
//! win when the candidate's mean score under the rule is higher, a tie counts
//! half. Prints one JSON line.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::cmd::simulate_labelers::{create_key, first_model};
use crate::simulation::client::Api;
use crate::simulation::preference::{Preference, RULES_HELP};
use crate::simulation::prompts;

#[derive(Args)]
#[command(after_help = RULES_HELP)]
pub struct WinRateArgs {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The gateway serving the baseline, when another one does (default: --url).
    #[arg(long)]
    baseline_url: Option<String>,
    /// An admin-scope key; used only to create a completions key for the run.
    #[arg(long, env = "INSTRUCTD_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    /// The hidden preference to judge by.
    #[arg(long)]
    preference: Preference,
    /// The checkpoint under test (it must be loaded: serving, canary or a verified candidate).
    #[arg(long)]
    candidate: String,
    /// The checkpoint it is compared with.
    #[arg(long)]
    baseline: String,
    /// Held-out prompts, one per line [default: configs/evaluation_prompts.txt].
    #[arg(long, default_value = "configs/evaluation_prompts.txt")]
    prompts_file: PathBuf,
    /// Prompts used at most.
    #[arg(long, default_value_t = 32)]
    prompts: usize,
    /// Samples per prompt and checkpoint.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    samples: u32,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompts in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrency: u32,
    /// The model name (default: the first of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
}

pub fn run(args: WinRateArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.url)?;
    let baseline_api = match &args.baseline_url {
        Some(url) => Api::new(url)?,
        None => Api::new(&args.url)?,
    };
    let pool = prompts::load(Some(&args.prompts_file))?;
    anyhow::ensure!(!pool.is_empty(), "{} holds no prompts", args.prompts_file.display());
    // Candidates are often not the serving checkpoint yet (a verified candidate, a canary): pinning
    // those needs `pin_checkpoints`.
    let key = create_key(&api, &args.admin_key, "instructd-win-rate", &["completions", "pin_checkpoints"], None)?;
    // Keys live in Redis: a second gateway on the same Redis knows this one.
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&api, &key.secret)?,
    };
    // Prompts are independent: `--concurrency` of them in flight lets the gateway batch them.
    let prompts: Vec<&String> = pool.iter().take(args.prompts.max(1)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let scored: Vec<anyhow::Result<Answered>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(prompt) = prompts.get(i) else { break out };
                        let seed = args.seed.wrapping_add(i as u64);
                        let pinned = |checkpoint: &str| format!("{model}@{checkpoint}");
                        out.push(answers(&api, &key.secret, &pinned(&args.candidate), prompt, seed, &args).and_then(
                            |c| {
                                let b =
                                    answers(&baseline_api, &key.secret, &pinned(&args.baseline), prompt, seed, &args)?;
                                Ok((i, c, b))
                            },
                        ));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    let mut scored = scored.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    scored.sort_by_key(|(i, _, _)| *i);
    let (mut wins, mut ties, mut losses) = (0usize, 0usize, 0usize);
    let (mut candidate_sum, mut baseline_sum) = (0f64, 0f64);
    let mut examples = Vec::new();
    for (i, candidate, baseline) in &scored {
        let prompt = prompts[*i];
        let mean = |texts: &[String]| texts.iter().map(|t| args.preference.score(t)).sum::<f64>() / texts.len() as f64;
        let (c, b) = (mean(candidate), mean(baseline));
        candidate_sum += c;
        baseline_sum += b;
        match c.partial_cmp(&b) {
            Some(std::cmp::Ordering::Greater) => wins += 1,
            Some(std::cmp::Ordering::Less) => losses += 1,
            _ => ties += 1,
        }
        if examples.len() < 3 {
            examples.push(json!({"prompt": prompt, "candidate": candidate[0], "baseline": baseline[0]}));
        }
        eprintln!("prompt {:>3}: candidate {c:+.2}  baseline {b:+.2}", i + 1);
    }
    let n = (wins + ties + losses).max(1) as f64;
    let interval = trainer::win_rate::WinRate::new(wins as f64 + 0.5 * ties as f64, wins + ties + losses, 0.95);
    let summary = json!({
        "preference": args.preference.to_string(),
        "candidate": args.candidate,
        "baseline": args.baseline,
        "prompts": wins + ties + losses,
        "samples_per_prompt": args.samples,
        "win_rate": interval.rate,
        "win_rate_lower": interval.lower,
        "win_rate_upper": interval.upper,
        "confidence": interval.confidence,
        "wins": wins, "ties": ties, "losses": losses,
        "candidate_score_mean": candidate_sum / n,
        "baseline_score_mean": baseline_sum / n,
        "examples": examples,
    });
    println!("{summary}");
    Ok(())
}

/// One prompt's answers: its index, the candidate's and the baseline's texts.
type Answered = (usize, Vec<String>, Vec<String>);

/// `--samples` chat completions of `prompt` from the pinned `model`.
fn answers(
    api: &Api,
    key: &str,
    model: &str,
    prompt: &str,
    seed: u64,
    args: &WinRateArgs,
) -> anyhow::Result<Vec<String>> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "n": args.samples,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": seed,
    });
    let reply = api.post("/v1/chat/completions", key, &body, None)?;
    let fingerprint = reply.body["system_fingerprint"].as_str().unwrap_or_default();
    let checkpoint = model.split_once('@').map_or("", |(_, c)| c);
    anyhow::ensure!(fingerprint == checkpoint, "asked for {checkpoint}, answered by {fingerprint}");
    reply.body["choices"]
        .as_array()
        .context("a chat completion without choices")?
        .iter()
        .map(|c| c["message"]["content"].as_str().map(str::to_string).context("a choice without content"))
        .collect()
}
