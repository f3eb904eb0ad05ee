//! The whole loop with `[trainer.backend] kind = "external"` running the PyTorch job of `deploy/trainer-job` on a
//! tiny model: playground data logged through the gateway, the trainer snapshots it, the job trains SFT, then
//! the reward model, then PPO-ptx; the trainer imports each output, the evaluation gate judges it, and the
//! gateway serves the result.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;
#[path = "support/trainer_job.rs"]
mod trainer_job;

use std::process::Command;
use std::time::{Duration, Instant};

use gateway::{Gateway, KillOnDrop, RedisServer, repo_root, start_trainer, tiny_model};
use serde_json::Value;

fn admin(url: &str, method: &str, path: &str) -> Value {
    let http = reqwest::blocking::Client::new();
    let request = match method {
        "GET" => http.get(format!("{url}{path}")),
        _ => http.post(format!("{url}{path}")).json(&serde_json::json!({})),
    };
    let response = request.bearer_auth(gateway::ADMIN_KEY).send().expect("the gateway answers");
    let status = response.status();
    let text = response.text().unwrap_or_default();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or_default()
}

/// Playground traffic: simulated users ask, simulated labelers demonstrate and rank (they like "blue").
fn simulate(url: &str, dir: &std::path::Path, round: usize, k: &str, demonstrations: &str) {
    let prompts = dir.join(format!("prompts-{round}.txt"));
    let topics = ["the sea", "a garden", "winter", "trains", "bread", "music"];
    let lines: Vec<String> =
        (0..48).map(|i| format!("Tell me about {} (round {round}, question {i}).", topics[i % topics.len()])).collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .args(["simulate-labelers", "--url", url, "--preference", "contains:blue", "--users", "8", "--labelers", "2"])
        .args(["--prompts", "48", "--k", k, "--max-tokens", "24", "--demonstrations", demonstrations])
        .args(["--seed", &round.to_string(), "--prompts-file", prompts.to_str().unwrap()])
        .current_dir(repo_root())
        .env("INSTRUCTD_ADMIN_KEY", gateway::ADMIN_KEY)
        .output()
        .expect("instructd runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "simulate-labelers failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap()).unwrap();
    assert_eq!(summary["errors"], 0, "{summary}");
}

fn wait_for(url: &str, what: &str, done: &dyn Fn(&[Value]) -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = admin(url, "GET", "/admin/checkpoints");
        let rows = status["data"].as_array().cloned().unwrap_or_default();
        let failed: Vec<_> = rows.iter().filter(|r| r["role"] == "failed").collect();
        assert!(failed.is_empty(), "{failed:?}");
        if let Some(found) = done(&rows) {
            return found;
        }
        assert!(Instant::now() < deadline, "no {what} within 600 s: {status}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Trained by the job, not in process.
fn assert_trained_by_the_job(row: &Value) {
    assert_eq!(row["metrics"]["backend"], "external", "{row}");
    let engine = row["metrics"]["engine"].as_str().unwrap_or_default();
    assert!(engine.starts_with("torch "), "the PyTorch job trained it: {row}");
}

#[test]
fn a_refresh_trains_sft_rm_and_ppo_in_the_pytorch_job() {
    let Some(python) = trainer_job::job_python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let checkpoints = tmp.path().join("checkpoints");
    let shared = [("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", checkpoints.to_str().unwrap())];
    let gateway = Gateway::start(&redis.url(), &model, &shared);
    let url = gateway.url.clone();
    let initial = admin(&url, "GET", "/admin/checkpoints")["serving"].as_str().unwrap().to_string();

    let command = trainer_job::job_command(&python, &[]);
    let command_toml = format!("[{}]", command.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", "));
    let corpus = repo_root().join("tests/data/corpus");
    let (model_dir, corpus_dir) = (model.to_str().unwrap(), corpus.to_str().unwrap());
    let mut env = vec![
        ("INSTRUCTD_MODEL", model_dir),
        ("INSTRUCTD__TRAINER__BACKEND__KIND", "external"),
        ("INSTRUCTD__TRAINER__BACKEND__COMMAND", command_toml.as_str()),
        ("INSTRUCTD__TRAINER__BACKEND__TIMEOUT_SECS", "600"),
        ("INSTRUCTD__TRAINER__CORPUS__DIR", corpus_dir),
        ("INSTRUCTD__TRAINER__CORPUS__SEQ_LEN", "64"),
        ("INSTRUCTD__TRAINER__BATCH", "100000"),
        ("INSTRUCTD__TRAINER__BLOCK_MS", "200"),
        ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "1"),
        ("INSTRUCTD__TRAINER__REFRESH__MIN_NEW_RANKINGS", "4"),
        // Tiny random models learn at rates a real model would not survive (as in tests/loop.rs).
        ("INSTRUCTD__TRAINER__SFT__LEARNING_RATE", "0.01"),
        ("INSTRUCTD__TRAINER__SFT__EPOCHS", "16"),
        ("INSTRUCTD__TRAINER__REWARD_MODEL__LEARNING_RATE", "0.002"),
        ("INSTRUCTD__TRAINER__REWARD_MODEL__EPOCHS", "3"),
        ("INSTRUCTD__TRAINER__REWARD_MODEL__BATCH_PROMPTS", "4"),
        ("INSTRUCTD__TRAINER__REWARD_MODEL__FREEZE_LAYERS", "1"),
        ("INSTRUCTD__TRAINER__PPO__FREEZE_LAYERS", "0"),
        ("INSTRUCTD__TRAINER__PPO__EPISODES_PER_ITERATION", "8"),
        ("INSTRUCTD__TRAINER__PPO__MINIBATCH_SIZE", "4"),
        ("INSTRUCTD__TRAINER__PPO__ITERATIONS", "4"),
        ("INSTRUCTD__TRAINER__PPO__LEARNING_RATE", "0.002"),
        ("INSTRUCTD__TRAINER__PPO__VALUE_LEARNING_RATE", "0.003"),
        ("INSTRUCTD__TRAINER__PPO__PTX_COEF", "0.01"),
        ("INSTRUCTD__TRAINER__PPO__KL_COEF", "0.1"),
        ("INSTRUCTD__TRAINER__PPO__MAX_NEW_TOKENS", "24"),
        ("INSTRUCTD__TRAINER__EVALUATION__MAX_NEW_TOKENS", "24"),
        ("INSTRUCTD__TRAINER__EVALUATION__MAX_KL_FROM_SFT", "60"),
    ];
    env.extend(shared);
    let data_dir = tmp.path().join("data");

    // Round one: demonstrations (the start-up model's samples tie in every ranking): SFT by the job, verified,
    // promoted and served.
    simulate(&url, tmp.path(), 1, "4", "1");
    let trainer = KillOnDrop(start_trainer(&redis.url(), &data_dir, &env));
    let sft = wait_for(&url, "verified SFT policy", &|rows| {
        rows.iter().find(|r| r["stage"] == "sft" && r["role"] == "ready").cloned()
    });
    assert_trained_by_the_job(&sft);
    let sft_id = sft["id"].as_str().unwrap().to_string();
    admin(&url, "POST", &format!("/admin/checkpoints/{sft_id}/promote"));
    assert_eq!(admin(&url, "GET", "/admin/checkpoints")["serving"], sft_id.as_str());
    drop(trainer);

    // Round two, sampled from the SFT policy: the reward model, then PPO-ptx from SFT, both by the job.
    simulate(&url, tmp.path(), 2, "6", "0");
    let _trainer = KillOnDrop(start_trainer(&redis.url(), &data_dir, &env));
    let ppo = wait_for(&url, "PPO-ptx refresh", &|rows| rows.iter().find(|r| r["stage"] == "ppo_ptx").cloned());
    let status = admin(&url, "GET", "/admin/checkpoints");
    let rm = status["data"].as_array().unwrap().iter().find(|r| r["stage"] == "reward_model").cloned();
    let rm = rm.expect("a reward model was trained");
    assert_trained_by_the_job(&rm);
    assert_trained_by_the_job(&ppo);
    assert!(rm["metrics"]["train_prompts"].as_u64().unwrap() > 0, "{rm}");
    assert_eq!(ppo["hyperparameters"]["reward_model"], rm["id"], "PPO used the reward model");
    assert_eq!(ppo["parent"], sft_id.as_str());
    assert_eq!(ppo["metrics"]["iterations"].as_array().map(Vec::len), Some(4), "{ppo}");
    // The gate judged the job's policy with the in-process checks (win rate against SFT, KL from SFT, alignment
    // tax on held-out text).
    let evaluation = &ppo["metrics"]["evaluation"];
    for field in ["win_rate", "kl_from_sft", "alignment_tax", "passed"] {
        assert!(!evaluation[field].is_null(), "{field} missing from {evaluation}");
    }
    // The gate decides, as in tests/loop.rs: a policy the reward model prefers to SFT (the lower end of the win
    // rate's interval above 0.5) within the KL and alignment-tax limits is verified and served; otherwise it is held
    // back with its reasons and the job's SFT policy stays served.
    let ppo_id = ppo["id"].as_str().unwrap().to_string();
    let served = if evaluation["passed"] == true {
        wait_for(&url, "verified PPO policy", &|rows| {
            rows.iter().find(|r| r["id"] == ppo_id.as_str() && r["role"] == "ready").cloned()
        });
        admin(&url, "POST", &format!("/admin/checkpoints/{ppo_id}/promote"));
        ppo_id
    } else {
        eprintln!("the evaluation gate held the job's PPO policy back: {evaluation}");
        assert!(evaluation["reasons"].as_array().is_some_and(|r| !r.is_empty()), "{evaluation}");
        sft_id
    };
    let status = admin(&url, "GET", "/admin/checkpoints");
    assert_eq!(status["serving"], served.as_str(), "{status}");
    assert_ne!(served, initial);
    // And it answers.
    let model_name = admin(&url, "GET", "/v1/models")["data"][0]["id"].as_str().unwrap().to_string();
    let reply: Value = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/completions"))
        .bearer_auth(gateway::ADMIN_KEY)
        .json(&serde_json::json!({"model": model_name, "prompt": "Hello", "max_tokens": 4}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(reply["system_fingerprint"], served.as_str(), "{reply}");
}
