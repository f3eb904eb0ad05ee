//! The whole loop on a tiny model: gateway, trainer and Redis as separate
//! processes; playground data in, a refreshed checkpoint out and serving.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::process::{Command, Stdio};

use gateway::{Gateway, RedisServer, python, repo_root, run_script, tiny_model};

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
    let mut trainer = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .arg("train")
        .current_dir(repo_root())
        .env("INSTRUCTD_CONFIG", repo_root().join("configs/default.toml"))
        .env("INSTRUCTD_REDIS_URL", redis.url())
        .env("INSTRUCTD_MODEL", &model)
        .env("INSTRUCTD__TRAINER__DATA_DIR", tmp.path().join("data"))
        .env("INSTRUCTD__TRAINER__BLOCK_MS", "200")
        .env("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "20")
        .env("INSTRUCTD__TRAINER__REFRESH__MIN_NEW_DEMONSTRATIONS", "4")
        .env("INSTRUCTD__TRAINER__SFT__EPOCHS", "2")
        .envs(shared)
        .stdout(Stdio::null())
        .spawn()
        .expect("instructd train starts");
    run_script(&python, "loop_sft.py", &[("INSTRUCTD_URL", &gateway.url), ("INSTRUCTD_REDIS_URL", &redis.url())]);
    let _ = trainer.kill();
    let _ = trainer.wait();
}
