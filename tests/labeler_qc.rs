//! Labeler quality control end to end: `instructd simulate-labelers` with an
//! adversarial and a noisy labeler among honest ones, every labeling task
//! ranked by three labelers, through the real gateway (tiny model) and a
//! private Redis; the trainer's dataset snapshot measures agreement and
//! flags, and leaves out, the adversary alone.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::process::Command;
use std::time::{Duration, Instant};

use gateway::{ADMIN_KEY, Gateway, KillOnDrop, RedisServer, repo_root, start_trainer, tiny_model};
use serde_json::Value;

#[test]
fn quality_control_finds_the_adversarial_labeler_and_excludes_only_them() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(
        &redis.url(),
        &tiny_model(tmp.path()),
        &[("INSTRUCTD__GATEWAY__PLAYGROUND__LABELS_PER_PROMPT", "3")],
    );

    let out = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .arg("simulate-labelers")
        .args(["--url", &gateway.url, "--users", "2", "--labelers", "4", "--prompts", "32", "--k", "4"])
        .args(["--max-tokens", "8", "--preference", "shorter", "--seed", "5", "--demonstrations", "0"])
        .args(["--labels-per-prompt", "3", "--adversarial-labelers", "1", "--noisy-labelers", "1"])
        .args(["--labeler-noise", "0.25"])
        .current_dir(repo_root())
        .env("INSTRUCTD_ADMIN_KEY", ADMIN_KEY)
        .output()
        .expect("instructd runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "simulate-labelers failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let behaviour = |b: &str| -> String {
        summary["labelers"].as_array().unwrap().iter().find(|l| l["behaviour"] == b).unwrap()["user"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (adversary, noisy) = (behaviour("adversarial"), behaviour("noisy"));
    assert_eq!(summary["rankings_by_labelers"], 48, "16 labeling tasks x 3 labelers: {summary}");

    // The trainer reads everything into one snapshot; no refresh (this test is about the data).
    let data_dir = tmp.path().join("data");
    let _trainer = KillOnDrop(start_trainer(
        &redis.url(),
        &data_dir,
        &[("INSTRUCTD__TRAINER__REFRESH__ENABLED", "false"), ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "1")],
    ));
    let started = Instant::now();
    let manifest = loop {
        let found = std::fs::read_dir(data_dir.join("snapshots")).ok().and_then(|dirs| {
            dirs.filter_map(Result::ok)
                .filter_map(|d| std::fs::read_to_string(d.path().join("manifest.json")).ok())
                .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
                .find(|m| m["counts"]["rm"].as_u64().unwrap_or(0) > 0)
        });
        if let Some(m) = found {
            break m;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no snapshot with rankings");
        std::thread::sleep(Duration::from_millis(200));
    };
    let quality = &manifest["labeler_quality"]["labelers"];
    eprintln!("{:#}", manifest["labeler_quality"]);
    assert_eq!(quality[&adversary]["flagged"], true, "the adversary is flagged: {quality:#}");
    assert!(quality[&adversary]["agreement"].as_f64().unwrap() < 0.3, "{quality:#}");
    let flagged: Vec<&String> =
        quality.as_object().unwrap().iter().filter(|(_, q)| q["flagged"] == true).map(|(id, _)| id).collect();
    assert_eq!(flagged, [&adversary], "only the adversary: the noisy labeler still agrees mostly: {quality:#}");
    assert!(quality[&noisy]["agreement"].as_f64().unwrap() > 0.6, "{quality:#}");
    // Its rankings are out of the snapshot (those with an ordered pair: a ranking all tied carries nothing).
    assert!(quality[&adversary]["rankings"].as_u64().unwrap() >= 8, "{quality:#}");
    assert_eq!(manifest["excluded"]["low_agreement_labeler"], quality[&adversary]["rankings"], "{manifest:#}");
    let rm =
        std::fs::read_to_string(data_dir.join("snapshots").join(manifest["id"].as_str().unwrap()).join("rm.jsonl"))
            .unwrap();
    assert!(rm.lines().all(|l| !l.contains(&adversary)), "no ranking of the adversary in rm.jsonl");
}
