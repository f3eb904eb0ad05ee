//! The whole loop on a tiny model: gateway, trainer and Redis as separate
//! processes; playground data in, a refreshed checkpoint out and serving.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::process::Command;

use gateway::{Gateway, KillOnDrop, RedisServer, python, repo_root, run_script, start_trainer, tiny_model};

#[test]
fn demonstrations_become_a_served_sft_checkpoint() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let checkpoints = tmp.path().join("checkpoints");
    let shared = [
        ("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", checkpoints.to_str().unwrap()),
        ("INSTRUCTD__GATEWAY__ROLLOUT__AUTO_PROMOTE", "true"),
    ];
    let gateway = Gateway::start(&redis.url(), &model, &shared);
    let model_dir = model.to_str().unwrap();
    let mut env = vec![
        ("INSTRUCTD_MODEL", model_dir),
        ("INSTRUCTD__TRAINER__BLOCK_MS", "200"),
        ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "20"),
        ("INSTRUCTD__TRAINER__REFRESH__MIN_NEW_DEMONSTRATIONS", "4"),
        ("INSTRUCTD__TRAINER__SFT__EPOCHS", "2"),
    ];
    env.extend(shared);
    let mut trainer = start_trainer(&redis.url(), &tmp.path().join("data"), &env);
    run_script(&python, "loop_sft.py", &[("INSTRUCTD_URL", &gateway.url), ("INSTRUCTD_REDIS_URL", &redis.url())]);
    let _ = trainer.kill();
    let _ = trainer.wait();
}

/// GET or POST (with a JSON body) as the admin; the JSON answer.
fn admin(url: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let http = reqwest::blocking::Client::new();
    let request = match method {
        "GET" => http.get(format!("{url}{path}")),
        _ => http.post(format!("{url}{path}")).json(&body.unwrap_or_default()),
    };
    let response = request.bearer_auth(gateway::ADMIN_KEY).send().expect("the gateway answers");
    let status = response.status();
    let text = response.text().unwrap_or_default();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or_default()
}

fn instructd(args: &[&str], envs: &[(&str, &str)]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .args(args)
        .current_dir(repo_root())
        .env("INSTRUCTD_ADMIN_KEY", gateway::ADMIN_KEY)
        .envs(envs.iter().copied())
        .output()
        .expect("instructd runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "instructd {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).expect("a summary line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Response length everywhere in the loop test: long enough for every demonstration template to reach the word
/// (the tiny model's tokenizer spells "blue" in four tokens, some templates say it only after twenty).
const RESPONSE_TOKENS: &str = "32";

/// The whole recipe on a tiny model, in two rounds as the paper runs it.
/// Simulated users and labelers like answers that say "blue" (a rule the
/// gateway and trainer never see).
///
/// 1. Round one: the start-up model's samples never say "blue", so every
///    ranking is one big tie (no signal) but the demonstrations teach the
///    word: an SFT refresh is announced, verified and promoted, and beats
///    the start-up model under the hidden rule.
/// 2. Round two: the SFT policy's samples differ in how often they say it,
///    so the rankings carry signal: a reward-model refresh, then PPO-ptx
///    from the SFT policy, judged by the evaluation gate against it.
/// 3. The offered policy beats the start-up model under the hidden rule on
///    held-out prompts, is canaried and promoted; every response names the
///    checkpoint that produced it.
#[test]
fn a_hidden_preference_is_learned_through_sft_rm_and_ppo() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let checkpoints = tmp.path().join("checkpoints");
    let shared = [("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", checkpoints.to_str().unwrap())];
    let gateway = Gateway::start(&redis.url(), &model, &shared);
    let url = gateway.url.clone();
    let initial = admin(&url, "GET", "/admin/checkpoints", None)["serving"].as_str().unwrap().to_string();
    // The start-up model stays served here, for ground truth against it.
    let baseline = Gateway::start(&redis.url(), &model, &[]);
    // The hidden rule itself, on prompts no simulated user sent: the checkpoint `url` serves against the
    // start-up model.
    let judge = |candidate: &str| {
        instructd(
            &[
                "win-rate",
                "--url",
                &url,
                "--baseline-url",
                &baseline.url,
                "--preference",
                "contains:blue",
                "--candidate",
                candidate,
                "--baseline",
                &initial,
                "--prompts",
                "16",
                "--samples",
                "2",
                "--max-tokens",
                RESPONSE_TOKENS,
            ],
            &[],
        )
    };

    let corpus = repo_root().join("tests/data/corpus");
    // The trainer runs between the rounds' traffic: each start reads the whole round in one batch (one
    // snapshot), and the restart shows the trainer picking up where it left off.
    let (model_dir, corpus_dir) = (model.to_str().unwrap(), corpus.to_str().unwrap());
    let mut env = vec![
        ("INSTRUCTD_MODEL", model_dir),
        ("INSTRUCTD__TRAINER__CORPUS__DIR", corpus_dir),
        ("INSTRUCTD__TRAINER__BATCH", "100000"),
        ("INSTRUCTD__TRAINER__BLOCK_MS", "200"),
        ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "1"),
        ("INSTRUCTD__TRAINER__REFRESH__MIN_NEW_RANKINGS", "4"),
        // Tiny random models learn at rates a real model would not survive.
        ("INSTRUCTD__TRAINER__SFT__LEARNING_RATE", "0.01"),
        ("INSTRUCTD__TRAINER__SFT__EPOCHS", "24"),
        ("INSTRUCTD__TRAINER__REWARD_MODEL__LEARNING_RATE", "0.002"),
        ("INSTRUCTD__TRAINER__REWARD_MODEL__EPOCHS", "4"),
        ("INSTRUCTD__TRAINER__REWARD_MODEL__BATCH_PROMPTS", "4"),
        // The default freezes 28 layers for SmolLM2; of the tiny model's two, the lower one is frozen and cached.
        ("INSTRUCTD__TRAINER__REWARD_MODEL__FREEZE_LAYERS", "1"),
        ("INSTRUCTD__TRAINER__PPO__FREEZE_LAYERS", "0"),
        ("INSTRUCTD__TRAINER__PPO__EPISODES_PER_ITERATION", "16"),
        ("INSTRUCTD__TRAINER__PPO__NORMALIZE_REWARDS", "false"),
        ("INSTRUCTD__TRAINER__PPO__LEARNING_RATE", "0.002"),
        ("INSTRUCTD__TRAINER__PPO__VALUE_LEARNING_RATE", "0.003"),
        ("INSTRUCTD__TRAINER__PPO__ITERATIONS", "12"),
        // The tiny model never saw pre-training text, so γ pulls it towards the corpus (a new task, not an
        // anchor) and away from SFT: at 0.05 that drift alone erased the learned word in some runs.
        ("INSTRUCTD__TRAINER__PPO__PTX_COEF", "0.01"),
        ("INSTRUCTD__TRAINER__PPO__KL_COEF", "0.1"),
        ("INSTRUCTD__TRAINER__PPO__MAX_NEW_TOKENS", RESPONSE_TOKENS),
        ("INSTRUCTD__TRAINER__CORPUS__SEQ_LEN", "64"),
        ("INSTRUCTD__TRAINER__EVALUATION__MAX_NEW_TOKENS", RESPONSE_TOKENS),
        // A tiny model drifts further per nat of reward than a real one.
        ("INSTRUCTD__TRAINER__EVALUATION__MAX_KL_FROM_SFT", "60"),
    ];
    env.extend(shared);
    let data_dir = tmp.path().join("data");
    let start_trainer = || KillOnDrop(start_trainer(&redis.url(), &data_dir, &env));
    // Each round asks its own prompts (the snapshot drops prompts sharing a long prefix with earlier ones).
    let topics = ["the sea", "a garden", "winter", "trains", "bread", "music", "a forest", "the moon"];
    let asks = ["Describe", "Write a line about", "Tell me something about", "Give advice about", "Explain"];
    let round_prompts = |round: usize| {
        let path = tmp.path().join(format!("prompts-{round}.txt"));
        let lines: Vec<String> = (0..48)
            .map(|i| {
                format!("{} {} (round {round}, question {i}).", asks[i % asks.len()], topics[(i / 5) % topics.len()])
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    };
    let simulate = |round: usize, k: &str, demonstrations: &str| {
        let prompts = round_prompts(round);
        let people = instructd(
            &[
                "simulate-labelers",
                "--url",
                &url,
                "--preference",
                "contains:blue",
                "--users",
                "12",
                "--labelers",
                "2",
                "--prompts",
                "48",
                "--k",
                k,
                "--max-tokens",
                RESPONSE_TOKENS,
                "--demonstrations",
                demonstrations,
                "--seed",
                &round.to_string(),
                "--prompts-file",
                prompts.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(people["errors"], 0, "{people}");
    };
    let wait_for = |what: &str, done: &dyn Fn(&[serde_json::Value]) -> Option<serde_json::Value>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            let status = admin(&url, "GET", "/admin/checkpoints", None);
            let rows = status["data"].as_array().cloned().unwrap_or_default();
            let failed: Vec<_> = rows.iter().filter(|r| r["role"] == "failed").collect();
            assert!(failed.is_empty(), "{failed:?}");
            if let Some(found) = done(&rows) {
                return found;
            }
            assert!(std::time::Instant::now() < deadline, "no {what} within 600 s: {status}");
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    };

    // Round one.
    simulate(1, "4", "1");
    let trainer = start_trainer();
    let sft = wait_for("verified SFT policy", &|rows| {
        rows.iter().find(|r| r["stage"] == "sft" && r["role"] == "ready").cloned()
    });
    let sft_id = sft["id"].as_str().unwrap().to_string();
    assert!(sft["parent"].as_str().unwrap().starts_with("base:"), "{sft}");
    // Judged while it is a verified candidate, not yet serving: `win-rate` pins a checkpoint that is not the
    // serving one, which needs the `pin_checkpoints` scope on its key (the SmolLM2 loop bench lost its PPO rows
    // to a 403 here).
    assert_clearly_beats_start_up_model(&judge(&sft_id), "the SFT policy");
    canary_then_promote(&url, &initial, &sft_id);
    drop(trainer);

    // Round two, sampled from the SFT policy; no new demonstrations.
    simulate(2, "8", "0");
    let _trainer = start_trainer();
    let ppo = wait_for("PPO-ptx refresh", &|rows| rows.iter().find(|r| r["stage"] == "ppo_ptx").cloned());
    let status = admin(&url, "GET", "/admin/checkpoints", None);
    let rows = status["data"].as_array().unwrap();
    let rm = rows.iter().find(|r| r["stage"] == "reward_model").expect("a reward model was trained");
    assert!(rm["metrics"]["train_prompts"].as_u64().unwrap() > 0, "{rm}");
    assert_eq!(ppo["hyperparameters"]["reward_model"], rm["id"], "PPO used the reward model");
    assert_eq!(ppo["hyperparameters"]["reference"], sft_id.as_str(), "the KL reference is the SFT policy");
    assert_eq!(ppo["parent"], sft_id.as_str());
    let iterations = ppo["metrics"]["iterations"].as_array().expect("PPO logs its iterations");
    assert_eq!(iterations.len(), 12, "{ppo}");
    for it in iterations {
        for field in ["reward_mean", "kl", "entropy", "clip_fraction", "value_loss", "ptx_loss"] {
            assert!(it[field].is_number(), "{field} missing from {it}");
        }
    }
    let evaluation = &ppo["metrics"]["evaluation"];
    for field in [
        "win_rate",
        "win_rate_lower",
        "win_rate_upper",
        "candidate_reward",
        "serving_reward",
        "kl_from_sft",
        "alignment_tax",
    ] {
        assert!(evaluation[field].is_number(), "{field} missing from {evaluation}");
    }
    let (lower, upper) =
        (evaluation["win_rate_lower"].as_f64().unwrap(), evaluation["win_rate_upper"].as_f64().unwrap());
    assert!(lower <= evaluation["win_rate"].as_f64().unwrap() && upper >= lower, "{evaluation}");
    // Data freshness and the reward model's per-epoch validation ride along in the manifests and the report.
    assert!(ppo["metrics"]["data"]["newest_judgment_age_secs"].is_number(), "{ppo}");
    assert!(rm["metrics"]["val_accuracy_per_epoch"].as_array().is_some_and(|a| !a.is_empty()), "{rm}");
    let report = admin(&url, "GET", "/admin/training/report", None);
    let row = report["table"].as_array().unwrap().iter().find(|r| r["id"] == ppo["id"]).expect("PPO in the report");
    assert_eq!(row["headline"]["win_rate_lower"], evaluation["win_rate_lower"], "{row}");
    // The gate decides: a PPO policy the reward model prefers to SFT within the KL and alignment-tax limits is
    // offered (announced, verified, canaried, promoted); otherwise SFT stays the offered policy.
    let ppo_id = ppo["id"].as_str().unwrap().to_string();
    let offered = if evaluation["passed"] == true {
        wait_for("verified PPO policy", &|rows| {
            rows.iter().find(|r| r["id"] == ppo_id.as_str() && r["role"] == "ready").cloned()
        });
        canary_then_promote(&url, &sft_id, &ppo_id);
        ppo_id
    } else {
        eprintln!("the evaluation gate held PPO back: {evaluation}");
        sft_id
    };

    let judged = judge(&offered);
    assert_clearly_beats_start_up_model(&judged, &format!("the offered policy (PPO evaluation: {evaluation})"));
}

/// Under the hidden rule, on 16 prompts: a win rate of at least 0.6 and at least four wins per loss.
fn assert_clearly_beats_start_up_model(judged: &serde_json::Value, what: &str) {
    assert_eq!(judged["prompts"], 16, "{judged}");
    let (wins, losses) = (judged["wins"].as_u64().unwrap(), judged["losses"].as_u64().unwrap());
    assert!(
        judged["win_rate"].as_f64().unwrap() >= 0.6 && wins >= 4 * losses.max(1),
        "{what} should clearly beat the start-up model under the hidden rule: {judged}"
    );
}

/// Sends half the traffic to `candidate`, checks that responses come from both and name their checkpoint,
/// then promotes it.
fn canary_then_promote(url: &str, serving: &str, candidate: &str) {
    admin(url, "POST", &format!("/admin/checkpoints/{candidate}/canary"), Some(serde_json::json!({"percent": 50})));
    let model_name = admin(url, "GET", "/v1/models", None)["data"][0]["id"].as_str().unwrap().to_string();
    let client = reqwest::blocking::Client::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..24 {
        let body = serde_json::json!({"model": model_name, "prompt": format!("Hello {i}"), "max_tokens": 2});
        let r: serde_json::Value = client
            .post(format!("{url}/v1/completions"))
            .bearer_auth(gateway::ADMIN_KEY)
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        seen.insert(r["system_fingerprint"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(seen, [serving.to_string(), candidate.to_string()].into(), "a 50% canary serves both");
    admin(url, "POST", &format!("/admin/checkpoints/{candidate}/promote"), None);
    assert_eq!(admin(url, "GET", "/admin/checkpoints", None)["serving"], candidate);
}
