//! SIGTERM during a stage: `instructd train` stops at the next step boundary
//! (not after the stage: Kubernetes allows 30 s), publishes nothing partial,
//! and a restart trains the same data again.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use gateway::{ADMIN_KEY, Gateway, KillOnDrop, RedisServer, repo_root, start_trainer, tiny_model};
use serde_json::Value;

fn journal(data: &Path) -> Vec<Value> {
    std::fs::read_to_string(data.join("training.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Published checkpoint directories (the store's temporary ones start with a dot).
fn published(checkpoints: &Path) -> Vec<String> {
    std::fs::read_dir(checkpoints)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("sft-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigterm_stops_a_stage_at_a_step_and_a_restart_trains_it_again() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let gateway = Gateway::start(&redis.url(), &model, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .args(["simulate-labelers", "--url", &gateway.url, "--users", "6", "--labelers", "0", "--prompts", "12"])
        .args(["--k", "4", "--max-tokens", "8", "--preference", "contains:the", "--seed", "3", "--demonstrations", "1"])
        .current_dir(repo_root())
        .env("INSTRUCTD_ADMIN_KEY", ADMIN_KEY)
        .output()
        .expect("instructd runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (data, checkpoints) = (tmp.path().join("data"), tmp.path().join("checkpoints"));
    let checkpoints_env = checkpoints.to_str().unwrap().to_string();
    let model_dir = model.to_str().unwrap().to_string();
    let trainer = |epochs: &str| -> Child {
        start_trainer(
            &redis.url(),
            &data,
            &[
                ("INSTRUCTD_MODEL", &model_dir),
                ("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", &checkpoints_env),
                ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "1"),
                ("INSTRUCTD__TRAINER__BATCH", "100000"),
                ("INSTRUCTD__TRAINER__REFRESH__MIN_NEW_RANKINGS", "1000000"),
                // Users are split by a hash of their (random) names: any training-split demonstration starts SFT.
                ("INSTRUCTD__TRAINER__REFRESH__MIN_NEW_DEMONSTRATIONS", "1"),
                ("INSTRUCTD__TRAINER__SFT__EPOCHS", epochs),
            ],
        )
    };
    // An SFT stage of a million epochs: it only ends by being stopped.
    let mut first = KillOnDrop(trainer("1000000"));
    wait_for("the SFT stage to start", Duration::from_secs(120), || {
        journal(&data).iter().any(|e| e["event"] == "stage_started" && e["stage"] == "sft")
    });
    std::thread::sleep(Duration::from_millis(500));
    let stopping = Instant::now();
    // SIGTERM, as Kubernetes sends it.
    assert!(Command::new("kill").args(["-TERM", &first.0.id().to_string()]).status().unwrap().success());
    let mut status = None;
    wait_for("the trainer to exit after SIGTERM", Duration::from_secs(30), || {
        status = first.0.try_wait().unwrap();
        status.is_some()
    });
    eprintln!("stopped {:?} after SIGTERM, {status:?}", stopping.elapsed());
    assert!(status.unwrap().success(), "a requested stop is a clean exit: {status:?}");
    assert!(published(&checkpoints).is_empty(), "nothing partial published: {:?}", published(&checkpoints));

    // The restart finds the same data in its store and trains it (here with one epoch).
    let _second = KillOnDrop(trainer("1"));
    wait_for("the restarted trainer to publish SFT", Duration::from_secs(120), || !published(&checkpoints).is_empty());
}
