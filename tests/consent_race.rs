//! End-to-end test of consent withdrawal (issue 13): withdrawals race
//! playground completions in flight against the real `instructd serve` and
//! `instructd train` on a private Redis, and afterwards nothing a withdrawn
//! user logged survives anywhere: the prompts stream, the gateway's spill, the
//! trainer's store, the snapshot written before the withdrawal and the next one.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::path::Path;
use std::time::{Duration, Instant};

use gateway::{ADMIN_KEY, Gateway, KillOnDrop, RedisServer, start_trainer, tiny_model};
use serde_json::json;

/// Users who withdraw while a completion of theirs runs, one race each (the withdrawal lands at a different
/// moment of the completion every time).
const RACERS: usize = 6;

fn create_key(gateway: &Gateway, user: &str) -> String {
    let body = json!({"user": user, "scopes": ["playground"]});
    let (status, key, _) = gateway.call("POST", "/admin/keys", ADMIN_KEY, Some(&body));
    assert_eq!(status, 201, "{key}");
    key["secret"].as_str().expect("a secret").to_string()
}

fn accept(gateway: &Gateway, key: &str) {
    let (_, notice, _) = gateway.call("GET", "/v1/playground/notice", key, None);
    let consent = json!({"action": "accept", "notice_version": notice["version"]});
    let (status, body, _) = gateway.call("POST", "/v1/playground/consent", key, Some(&consent));
    assert_eq!(status, 200, "{body}");
}

fn withdraw(gateway: &Gateway, key: &str) {
    let (status, body, _) = gateway.call("POST", "/v1/playground/consent", key, Some(&json!({"action": "withdraw"})));
    assert_eq!(status, 200, "{body}");
}

/// A playground completion whose prompt carries `marker`; returns whether the gateway says it logged it.
fn complete(gateway: &Gateway, key: &str, model: &str, marker: &str, max_tokens: u32) -> bool {
    let body = json!({"model": model, "prompt": format!("Tell me about {marker}."), "k": 2, "max_tokens": max_tokens});
    let (status, body, _) = gateway.call("POST", "/v1/playground/completions", key, Some(&body));
    assert_eq!(status, 200, "{body}");
    body["logged"].as_bool().expect("a logged flag")
}

/// Every file under `dir`, as text (lossy), with its path.
fn files_under(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for path in entries.flatten().map(|e| e.path()) {
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    out
}

fn snapshots(data: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(data.join("snapshots")) else { return Vec::new() };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("manifest.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every value of every entry in the prompts stream.
fn stream_text(redis_url: &str) -> String {
    let client = redis::Client::open(redis_url).expect("a Redis client");
    let mut connection = client.get_connection().expect("Redis answers");
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(feedback::streams::PROMPTS).arg("-").arg("+").query(&mut connection).expect("XRANGE");
    let values = reply.ids.iter().flat_map(|entry| entry.map.values());
    values.filter_map(|v| redis::from_redis_value_ref::<String>(v).ok()).collect::<Vec<_>>().join("\n")
}

#[test]
fn a_withdrawal_racing_a_completion_leaves_nothing_of_the_user_anywhere() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (data, spill) = (tmp.path().join("trainer"), tmp.path().join("spill"));
    let spill_env = spill.to_str().unwrap().to_string();
    let gateway = Gateway::start(
        &redis.url(),
        &tiny_model(tmp.path()),
        &[("INSTRUCTD__GATEWAY__PLAYGROUND__SPILL_DIR", &spill_env)],
    );
    let _trainer = KillOnDrop(start_trainer(
        &redis.url(),
        &data,
        &[
            ("INSTRUCTD__TRAINER__BLOCK_MS", "100"),
            ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "1"),
            ("INSTRUCTD__TRAINER__REFRESH__ENABLED", "false"),
        ],
    ));
    let (_, models, _) = gateway.call("GET", "/v1/models", ADMIN_KEY, None);
    let model = models["data"][0]["id"].as_str().expect("a model").to_string();

    // A user who stays, and the racers, each with a prompt logged (and snapshotted) before the race.
    let stayer = create_key(&gateway, "stayer");
    accept(&gateway, &stayer);
    assert!(complete(&gateway, &stayer, &model, "marker-stayer-0", 2));
    let racers: Vec<(String, String)> = (0..RACERS)
        .map(|i| {
            let key = create_key(&gateway, &format!("racer{i}"));
            accept(&gateway, &key);
            assert!(complete(&gateway, &key, &model, &format!("marker-racer{i}-early"), 2));
            (format!("marker-racer{i}"), key)
        })
        .collect();
    let everything = |data: &Path| files_under(data).into_iter().map(|(_, text)| text).collect::<String>();
    wait_for("a snapshot holding every early prompt", || {
        snapshots(&data).iter().any(|id| {
            let prompts =
                std::fs::read_to_string(data.join("snapshots").join(id).join("prompts.jsonl")).unwrap_or_default();
            (0..RACERS).all(|i| prompts.contains(&format!("marker-racer{i}-early")))
        })
    });

    // The races: a completion in flight, its user's withdrawal landing at a different moment each time.
    std::thread::scope(|scope| {
        for (i, (marker, key)) in racers.iter().enumerate() {
            let (gateway, model) = (&gateway, &model);
            let completion = scope.spawn(move || complete(gateway, key, model, &format!("{marker}-raced"), 24));
            std::thread::sleep(Duration::from_millis(15 * i as u64));
            withdraw(gateway, key);
            completion.join().expect("the completion thread");
        }
    });

    // One more prompt from the user who stayed: the next snapshot covers everything that came before.
    let before = snapshots(&data);
    assert!(complete(&gateway, &stayer, &model, "marker-stayer-1", 2));
    wait_for("the next snapshot", || {
        snapshots(&data).iter().any(|id| {
            !before.contains(id)
                && std::fs::read_to_string(data.join("snapshots").join(id).join("prompts.jsonl"))
                    .unwrap_or_default()
                    .contains("marker-stayer-1")
        })
    });
    std::thread::sleep(Duration::from_millis(500));

    let places = [
        ("the prompts stream", stream_text(&redis.url())),
        ("the gateway's spill", files_under(&spill).into_iter().map(|(_, t)| t).collect()),
        ("the trainer's store", everything(&data.join("store"))),
        ("the trainer's snapshots, old and new", everything(&data.join("snapshots"))),
    ];
    for (place, text) in &places {
        for (marker, _) in &racers {
            assert!(!text.contains(marker.as_str()), "{marker} survived the withdrawal in {place}");
        }
    }
    let (_, store) = &places[2];
    assert!(store.contains("marker-stayer-0") && store.contains("marker-stayer-1"), "the stayer's prompts are kept");
}
