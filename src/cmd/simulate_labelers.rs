//! `instructd simulate-labelers`: playground users and labelers driven through
//! the real HTTP API, judging by a hidden preference, so the loop can be
//! demonstrated and measured without people.
//!
//! With the admin key it creates the users' keys (scope `playground`) and the
//! labelers' keys (scope `labeler`; the last one in the `held_out` group when
//! there are two or more). Every user accepts the current training-use notice.
//! Prompts go round-robin to the users, who ask the playground for K samples;
//! for each logged prompt its user ranks the samples, or (every other prompt,
//! when there are labelers) a labeler takes it from `GET /v1/labeling/next`
//! and ranks it. A share of prompts also gets a demonstration, a share of
//! samples a Likert rating. The gateway and the trainer only ever see these
//! judgments, never the rule. Progress goes to stderr; stdout gets one JSON
//! summary.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::simulation::client::Api;
use crate::simulation::preference::{self, Preference, RULES_HELP};
use crate::simulation::{Rng, prompts};

#[derive(Args)]
#[command(after_help = RULES_HELP)]
pub struct SimulateLabelersArgs {
    /// The gateway's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin-scope key; used only to create the simulated users' and labelers' keys.
    #[arg(long, env = "INSTRUCTD_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    /// Playground users (each accepts the training-use notice).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    users: u32,
    /// Labelers; with two or more, the last one is in the held_out group. With any,
    /// every other prompt is ranked by a labeler instead of its user.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=1000))]
    labelers: u32,
    /// Playground prompts in total, spread round-robin over the users.
    #[arg(long, default_value_t = 40)]
    prompts: usize,
    /// Samples per prompt (K), all ranked.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(4..=9))]
    k: u32,
    /// Tokens per sample.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: u32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Fraction of prompts that also get a demonstration (0..1).
    #[arg(long, default_value_t = 0.5, value_parser = fraction)]
    demonstrations: f64,
    /// Fraction of samples that also get a Likert rating (0..1).
    #[arg(long, default_value_t = 0.25, value_parser = fraction)]
    ratings: f64,
    /// The hidden preference the simulated people judge by (rules below).
    #[arg(long)]
    preference: Preference,
    /// Makes the run reproducible: prompt order, sampling seeds, which prompts get
    /// demonstrations and ratings (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Instruction prompts, one per line ('#' comments) [default: configs/simulation_prompts.txt, else a built-in copy].
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// The model to ask (default: the first of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Labelers who rank each labeling task (overlap for quality control); the gateway's
    /// `[gateway.playground] labels_per_prompt` must allow as many.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    labels_per_prompt: u32,
    /// Training labelers who rank the rule's reverse (the first ones).
    #[arg(long, default_value_t = 0)]
    adversarial_labelers: u32,
    /// Training labelers who, with probability --labeler-noise, rank in a random order (the next ones).
    #[arg(long, default_value_t = 0)]
    noisy_labelers: u32,
    #[arg(long, default_value_t = 0.3, value_parser = fraction)]
    labeler_noise: f64,
}

/// How a simulated person judges.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) enum Behaviour {
    /// By the hidden rule.
    #[default]
    Honest,
    /// By the hidden rule, except a random order with this probability.
    Noisy(f64),
    /// The rule's ranking reversed.
    Adversarial,
}

impl Behaviour {
    fn name(self) -> &'static str {
        match self {
            Behaviour::Honest => "honest",
            Behaviour::Noisy(_) => "noisy",
            Behaviour::Adversarial => "adversarial",
        }
    }
}

fn fraction(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("expected a fraction between 0 and 1, got '{value}'")),
    }
}

/// A simulated person: their user id, key id and secret; labelers have a group.
pub(crate) struct Person {
    pub user: String,
    pub key_id: String,
    pub secret: String,
    pub labeler_group: Option<&'static str>,
    pub behaviour: Behaviour,
}

/// One playground prompt of the run.
#[derive(Clone)]
struct Job {
    index: usize,
    prompt: String,
    /// Ranked by a labeler (from the labeling queue) rather than by its user.
    by_labelers: bool,
    demonstrate: bool,
}

/// What one worker did.
#[derive(Default)]
struct Tally {
    sent: u64,
    logged: u64,
    not_logged: u64,
    rankings_by_users: u64,
    rankings_by_labelers: u64,
    ratings: u64,
    demonstrations: u64,
    errors: u64,
    tasks_skipped: u64,
    samples_scored: u64,
    score_sum: f64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.logged += o.logged;
        self.not_logged += o.not_logged;
        self.rankings_by_users += o.rankings_by_users;
        self.rankings_by_labelers += o.rankings_by_labelers;
        self.ratings += o.ratings;
        self.demonstrations += o.demonstrations;
        self.errors += o.errors;
        self.tasks_skipped += o.tasks_skipped;
        self.samples_scored += o.samples_scored;
        self.score_sum += o.score_sum;
    }
}

/// Mixed into the seed for the judges' draws (ratings, demonstration phrasing).
const JUDGING_STREAM: u64 = 0x6A75_6467_696E_6721;

/// What every worker shares.
struct Run<'a> {
    api: &'a Api,
    args: &'a SimulateLabelersArgs,
    run_id: &'a str,
    seed: u64,
    model: &'a str,
    total: usize,
    /// Logged prompts waiting for labelers: prompt id -> its job and how many labelers are still to rank it.
    for_labelers: Mutex<HashMap<String, (Job, u32)>>,
}

pub fn run(args: SimulateLabelersArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let seed = args.seed.unwrap_or(now_ms);
    // Fresh names per run: users' consent, per-user caps and splits start clean.
    let run_id = format!("{:06x}", Rng::new(now_ms ^ seed.rotate_left(17)).next_u64() & 0xff_ffff);
    let pool = prompts::load(args.prompts_file.as_deref())?;
    let schedule = prompts::schedule(&pool, args.prompts, &mut Rng::new(seed));
    let api = Api::new(&args.url)?;

    let users = (0..args.users)
        .map(|i| create_key(&api, &args.admin_key, &format!("sim-{run_id}-user-{i}"), &["playground"], None))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let labelers = (0..args.labelers)
        .map(|i| {
            let group = if args.labelers >= 2 && i + 1 == args.labelers { "held_out" } else { "training" };
            create_key(&api, &args.admin_key, &format!("sim-{run_id}-labeler-{i}"), &["labeler"], Some(group))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut labelers = labelers;
    let training = labelers.iter().filter(|l| l.labeler_group == Some("training")).count();
    let (adversarial, noisy) = (args.adversarial_labelers as usize, args.noisy_labelers as usize);
    anyhow::ensure!(
        adversarial + noisy <= training,
        "{adversarial} adversarial and {noisy} noisy labelers, but only {training} training labelers"
    );
    for (i, labeler) in labelers.iter_mut().filter(|l| l.labeler_group == Some("training")).enumerate() {
        labeler.behaviour = if i < adversarial {
            Behaviour::Adversarial
        } else if i < adversarial + noisy {
            Behaviour::Noisy(args.labeler_noise)
        } else {
            Behaviour::Honest
        };
    }
    for user in &users {
        accept_notice(&api, user)?;
    }
    let model = match &args.model {
        Some(model) => model.clone(),
        None => first_model(&api, &users[0].secret)?,
    };
    eprintln!(
        "simulating {} users and {} labelers (run {run_id}, seed {seed}) on {model} at {}: {} prompts, K = {}",
        users.len(),
        labelers.len(),
        args.url,
        args.prompts,
        args.k
    );

    // Which prompts get a demonstration: an exact share, spread by the seed.
    let mut order: Vec<usize> = (0..schedule.len()).collect();
    Rng::derive(seed, u64::MAX).shuffle(&mut order);
    let demonstrated = (schedule.len() as f64 * args.demonstrations).round() as usize;
    let mut demonstrate = vec![false; schedule.len()];
    for &i in &order[..demonstrated] {
        demonstrate[i] = true;
    }
    let mut jobs: Vec<Vec<Job>> = (0..users.len()).map(|_| Vec::new()).collect();
    for (index, prompt) in schedule.into_iter().enumerate() {
        let job =
            Job { index, prompt, by_labelers: !labelers.is_empty() && index % 2 == 1, demonstrate: demonstrate[index] };
        jobs[index % users.len()].push(job);
    }

    let run = Run {
        api: &api,
        args: &args,
        run_id: &run_id,
        seed,
        model: &model,
        total: args.prompts,
        for_labelers: Mutex::new(HashMap::new()),
    };
    let mut tally = Tally::default();
    // The users work in parallel (the gateway batches their requests), then the labelers.
    let user_tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> =
            users.iter().zip(jobs).map(|(user, jobs)| s.spawn(|| playground_user(&run, user, jobs))).collect();
        handles.into_iter().map(|h| h.join().expect("a simulated user panicked")).collect()
    });
    let labeler_tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = labelers.iter().map(|labeler| s.spawn(|| labeler_work(&run, labeler))).collect();
        handles.into_iter().map(|h| h.join().expect("a simulated labeler panicked")).collect()
    });
    for t in user_tallies.iter().chain(&labeler_tallies) {
        tally.add(t);
    }
    let unlabeled = run.for_labelers.lock().expect("not poisoned").len() as u64;
    if unlabeled > 0 {
        eprintln!("{unlabeled} logged prompts never came to a simulated labeler (leased by someone else?)");
        tally.errors += unlabeled;
    }

    let people = |people: &[Person]| -> Vec<Value> {
        people
            .iter()
            .map(|p| {
                json!({"user": p.user, "key_id": p.key_id, "labeler_group": p.labeler_group,
                       "behaviour": p.behaviour.name()})
            })
            .collect()
    };
    let summary = json!({
        "object": "simulation.summary",
        "run_id": run_id,
        "url": args.url,
        "model": model,
        "preference": args.preference.to_string(),
        "seed": seed,
        "k": args.k,
        "prompts_sent": tally.sent,
        "logged": tally.logged,
        "not_logged": tally.not_logged,
        "rankings": tally.rankings_by_users + tally.rankings_by_labelers,
        "rankings_by_users": tally.rankings_by_users,
        "rankings_by_labelers": tally.rankings_by_labelers,
        "ratings": tally.ratings,
        "demonstrations": tally.demonstrations,
        "labeling_tasks_skipped": tally.tasks_skipped,
        "unlabeled": unlabeled,
        "errors": tally.errors,
        "retries": api.retries(),
        "mean_sample_score": if tally.samples_scored > 0 { Some(tally.score_sum / tally.samples_scored as f64) } else { None },
        "elapsed_secs": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        "users": people(&users),
        "labelers": people(&labelers),
    });
    println!("{summary}");
    anyhow::ensure!(tally.errors == 0, "{} submissions or requests failed (see above)", tally.errors);
    Ok(())
}

pub(crate) fn create_key(
    api: &Api,
    admin_key: &str,
    user: &str,
    scopes: &[&str],
    labeler_group: Option<&'static str>,
) -> anyhow::Result<Person> {
    let mut body = json!({
        "name": "instructd simulate-labelers",
        "user": user,
        "scopes": scopes,
        // Simulated people are not rate limited: a run measures the loop, not the limiter.
        "limits": {"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent": 0},
    });
    if let Some(group) = labeler_group {
        body["labeler_group"] = json!(group);
    }
    let reply = api.post("/admin/keys", admin_key, &body, None).context("creating a key (is --admin-key right?)")?;
    let field = |name: &str| {
        reply.body[name]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("POST /admin/keys answered without '{name}'"))
    };
    Ok(Person {
        user: user.to_string(),
        key_id: field("id")?,
        secret: field("secret")?,
        labeler_group,
        behaviour: Behaviour::Honest,
    })
}

fn accept_notice(api: &Api, user: &Person) -> anyhow::Result<()> {
    let notice = api.get("/v1/playground/notice", &user.secret)?;
    let version = notice.body["version"].as_str().context("GET /v1/playground/notice answered without 'version'")?;
    let body = json!({"action": "accept", "notice_version": version});
    let reply = api.post("/v1/playground/consent", &user.secret, &body, None)?;
    anyhow::ensure!(reply.body["logging"] == json!(true), "{} accepted the notice but logging is off", user.user);
    Ok(())
}

pub(crate) fn first_model(api: &Api, key: &str) -> anyhow::Result<String> {
    let models = api.get("/v1/models", key)?;
    models.body["data"][0]["id"].as_str().map(str::to_string).context("GET /v1/models lists no model")
}

/// One user's prompts, in order: K samples each, then their judgments (or a
/// hand-over to the labelers).
fn playground_user(run: &Run, user: &Person, jobs: Vec<Job>) -> Tally {
    let mut tally = Tally::default();
    for job in jobs {
        let index = job.index;
        let body = json!({
            "model": run.model,
            // As a chat turn: the trainer trains on prompts through the chat template, as chat serves them.
            "messages": [{"role": "user", "content": job.prompt}],
            "k": run.args.k,
            "max_tokens": run.args.max_tokens,
            "temperature": run.args.temperature,
            "seed": Rng::derive(run.seed, index as u64).next_u64() >> 1,
        });
        tally.sent += 1;
        let reply = match run.api.post("/v1/playground/completions", &user.secret, &body, None) {
            Ok(reply) => reply,
            Err(e) => {
                tally.errors += 1;
                eprintln!("[{}/{}] {}: {e:#}", index + 1, run.total, user.user);
                continue;
            }
        };
        let prompt_id = reply.body["prompt_id"].as_str().unwrap_or_default().to_string();
        if reply.body["logged"] != json!(true) || prompt_id.is_empty() {
            tally.not_logged += 1;
            eprintln!("[{}/{}] {}: not logged ({})", index + 1, run.total, user.user, reply.body["not_logged_reason"]);
            continue;
        }
        tally.logged += 1;
        let samples = samples_of(&reply.body);
        for (_, text) in &samples {
            tally.samples_scored += 1;
            tally.score_sum += preference::score(&run.args.preference, text);
        }
        if job.by_labelers {
            eprintln!("[{}/{}] {}: logged {prompt_id}; left to the labelers", index + 1, run.total, user.user);
            run.for_labelers.lock().expect("not poisoned").insert(prompt_id, (job, run.args.labels_per_prompt));
            continue;
        }
        let done = judge(run, user, &prompt_id, &job, &samples, &mut tally);
        eprintln!("[{}/{}] {}: logged {prompt_id}; {done}", index + 1, run.total, user.user);
    }
    tally
}

/// A labeler takes tasks from the queue until none of this run's are left,
/// passing over prompts that are not theirs to judge.
fn labeler_work(run: &Run, labeler: &Person) -> Tally {
    let mut tally = Tally::default();
    // Every pass leases a task for the queue's lease time, so the queue empties;
    // the cap only guards against a queue that is being refilled meanwhile.
    let cap = 50 * run.total + 1000;
    for _ in 0..cap {
        if run.for_labelers.lock().expect("not poisoned").is_empty() {
            break;
        }
        let task = match run.api.get("/v1/labeling/next", &labeler.secret) {
            Ok(reply) if reply.status == StatusCode::NO_CONTENT => break,
            Ok(reply) => reply.body,
            Err(e) => {
                tally.errors += 1;
                eprintln!("{}: {e:#}", labeler.user);
                break;
            }
        };
        let prompt_id = task["prompt_id"].as_str().unwrap_or_default();
        let job = {
            let mut waiting = run.for_labelers.lock().expect("not poisoned");
            let Some((job, left)) = waiting.get_mut(prompt_id) else {
                tally.tasks_skipped += 1;
                continue;
            };
            let mine = job.clone();
            // One demonstration per prompt: the first labeler writes it.
            job.demonstrate = false;
            *left -= 1;
            if *left == 0 {
                waiting.remove(prompt_id);
            }
            mine
        };
        let samples = samples_of(&task);
        let done = judge(run, labeler, prompt_id, &job, &samples, &mut tally);
        let group = labeler.labeler_group.unwrap_or("training");
        eprintln!("[{}/{}] {} ({group}): {prompt_id}; {done}", job.index + 1, run.total, labeler.user);
    }
    tally
}

/// `(generation_id, text)` of a playground answer's or a labeling task's samples.
fn samples_of(body: &Value) -> Vec<(String, String)> {
    body["samples"]
        .as_array()
        .map(|samples| {
            samples
                .iter()
                .map(|s| {
                    let field = |name: &str| s[name].as_str().unwrap_or_default().to_string();
                    (field("generation_id"), field("text"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `who` ranks the samples of a logged prompt by the hidden rule, rates some
/// of them and, when the job says so, writes a demonstration. Returns what was
/// done, for the progress line.
fn judge(
    run: &Run,
    who: &Person,
    prompt_id: &str,
    job: &Job,
    samples: &[(String, String)],
    tally: &mut Tally,
) -> String {
    let rule = &run.args.preference;
    // Distinct from the stream the sampling seed came from, and per judge.
    let judge_stream = who.user.bytes().fold(JUDGING_STREAM, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut rng = Rng::derive(run.seed ^ judge_stream, job.index as u64);
    let mut done = Vec::new();
    let mut submit = |kind: &str, body: Value, idempotency: String| -> bool {
        match run.api.post("/v1/feedback", &who.secret, &body, Some(&idempotency)) {
            Ok(_) => true,
            Err(e) => {
                tally.errors += 1;
                eprintln!("{} {kind} on {prompt_id}: {e:#}", who.user);
                false
            }
        }
    };
    let pairs: Vec<(&str, &str)> = samples.iter().map(|(id, text)| (id.as_str(), text.as_str())).collect();
    let mut ranking = rule.rank(&pairs);
    match who.behaviour {
        Behaviour::Honest => {}
        Behaviour::Adversarial => ranking.reverse(),
        Behaviour::Noisy(rate) => {
            if rng.next_f64() < rate {
                let mut shuffled: Vec<&str> = pairs.iter().map(|(id, _)| *id).collect();
                rng.shuffle(&mut shuffled);
                ranking = shuffled.into_iter().map(|id| vec![id]).collect();
            }
        }
    }
    let groups = ranking.len();
    let body = json!({"type": "ranking", "prompt_id": prompt_id, "ranking": ranking});
    let ranked = submit("ranking", body, format!("sim-{}-{prompt_id}-ranking", run.run_id));
    if ranked {
        done.push(format!("ranked in {groups} group{}", if groups == 1 { "" } else { "s" }));
    }
    let mut rated = 0;
    for (id, text) in samples {
        if rng.next_f64() < run.args.ratings {
            let body = json!({"type": "rating", "generation_id": id, "score": rule.likert(text)});
            rated += u64::from(submit("rating", body, format!("sim-{}-{id}-rating", run.run_id)));
        }
    }
    if rated > 0 {
        done.push(format!("{rated} rated"));
    }
    let mut demonstrated = false;
    if job.demonstrate {
        let response = rule.demonstrate(&job.prompt, rng.below(1 << 16));
        let body = json!({"type": "demonstration", "prompt_id": prompt_id, "response": response});
        demonstrated = submit("demonstration", body, format!("sim-{}-{prompt_id}-demonstration", run.run_id));
        if demonstrated {
            done.push("demonstrated".to_string());
        }
    }
    if ranked {
        if who.labeler_group.is_some() {
            tally.rankings_by_labelers += 1;
        } else {
            tally.rankings_by_users += 1;
        }
    }
    tally.ratings += rated;
    tally.demonstrations += u64::from(demonstrated);
    if done.is_empty() { "nothing recorded".to_string() } else { done.join(", ") }
}
