//! End-to-end test of the arena and the leaderboard: the real gateway, a
//! private Redis and tiny checkpoints. Battles answer blind, a vote reveals
//! the checkpoints once, the leaderboard ranks by the votes, and the vote
//! gate promotes a candidate voters prefer and refuses one they don't.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::time::{Duration, Instant};

use inference::checkpoint::{CheckpointStore, Manifest, Stage};
use inference::tiny_model::{TinySpec, init_tiny};
use serde_json::{Value, json};

use gateway::{ADMIN_KEY, Gateway, RedisServer};

fn key(gateway: &Gateway, user: &str) -> String {
    let body = json!({"name": user, "user": user, "organization": "org", "scopes": ["playground"]});
    let (status, key, _) = gateway.call("POST", "/admin/keys", ADMIN_KEY, Some(&body));
    assert_eq!(status, 201, "{key}");
    key["secret"].as_str().expect("a secret").to_string()
}

/// A battle, or `None` when the arena is closed (fewer than two checkpoints loaded).
fn try_battle(gateway: &Gateway, key: &str) -> Option<Value> {
    let body = json!({"prompt": "Hello there", "max_tokens": 6, "temperature": 0});
    let (status, battle, _) = gateway.call("POST", "/v1/playground/arena", key, Some(&body));
    if status == 409 {
        assert_eq!(battle["error"]["code"], "arena_unavailable", "{battle}");
        return None;
    }
    assert_eq!(status, 200, "{battle}");
    Some(battle)
}

fn battle(gateway: &Gateway, key: &str) -> Value {
    try_battle(gateway, key).expect("the arena is open")
}

fn vote(gateway: &Gateway, key: &str, battle_id: &str, verdict: &str) -> (u16, Value) {
    let path = format!("/v1/playground/arena/{battle_id}/vote");
    let (status, body, _) = gateway.call("POST", &path, key, Some(&json!({"verdict": verdict})));
    (status, body)
}

fn checkpoints(gateway: &Gateway) -> Value {
    gateway.call("GET", "/admin/checkpoints", ADMIN_KEY, None).1
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Plays battles until `votes` were cast or the arena closed (the gate decided), always for the answer
/// `favourite` wrote (recognised by its greedy text, learned from the reveal of the first battle).
fn vote_for(gateway: &Gateway, key: &str, favourite: &str, votes: usize) {
    let mut favourite_text: Option<String> = None;
    let mut cast = 0;
    while cast < votes {
        let Some(battle) = try_battle(gateway, key) else { return };
        let id = battle["battle_id"].as_str().unwrap();
        let texts: Vec<&str> =
            battle["answers"].as_array().unwrap().iter().map(|a| a["text"].as_str().unwrap()).collect();
        let verdict = match &favourite_text {
            Some(text) if texts[0] == text => "a",
            Some(text) if texts[1] == text => "b",
            _ => "tie",
        };
        let (status, revealed) = vote(gateway, key, id, verdict);
        assert_eq!(status, 200, "{revealed}");
        if favourite_text.is_none() {
            let slot = if revealed["a"]["checkpoint"] == favourite { 0 } else { 1 };
            assert!(revealed[["a", "b"][slot]]["checkpoint"] == favourite, "{revealed}");
            assert_ne!(texts[0], texts[1], "the two checkpoints must answer differently for this test");
            favourite_text = Some(texts[slot].to_string());
        }
        cast += 1;
    }
}

#[test]
fn blind_votes_rank_checkpoints_and_the_vote_gate_promotes_and_refuses() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    // Untied embeddings: a tied tiny model greedily repeats its prompt, whatever its seed; these answer by seed.
    let spec = |seed| TinySpec { seed, tie_word_embeddings: false, ..Default::default() };
    init_tiny(&base, &spec(1)).unwrap();
    let store = CheckpointStore::open(&tmp.path().join("checkpoints")).unwrap();
    for (id, seed) in [("liked", 101), ("disliked", 102)] {
        let dir = tmp.path().join(id);
        init_tiny(&dir, &spec(seed)).unwrap();
        store.import_dir(&dir, Manifest::new(id, None, Stage::Sft)).unwrap();
    }
    let gateway = Gateway::start(
        &redis.url(),
        &base,
        &[
            ("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", store.root().to_str().unwrap()),
            ("INSTRUCTD__GATEWAY__ARENA__GATE", "true"),
            ("INSTRUCTD__GATEWAY__ARENA__GATE_MIN_VOTES", "10"),
            ("INSTRUCTD__GATEWAY__ARENA__GATE_INTERVAL_SECS", "1"),
        ],
    );
    let alice = key(&gateway, "alice");
    let mallory = key(&gateway, "mallory");
    let start = checkpoints(&gateway)["serving"].as_str().unwrap().to_string();

    // One checkpoint loaded: nothing to compare.
    let body = json!({"prompt": "Hi", "max_tokens": 2});
    let (status, error, _) = gateway.call("POST", "/v1/playground/arena", &alice, Some(&body));
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("arena_unavailable")), "{error}");

    let (status, loaded, _) = gateway.call("POST", "/admin/checkpoints/liked/load", ADMIN_KEY, None);
    assert_eq!(status, 200, "{loaded}");
    wait_for("the candidate to load", || {
        checkpoints(&gateway)["data"].as_array().unwrap().iter().any(|c| c["id"] == "liked" && c["role"] == "ready")
    });

    // A battle hides who answered; the vote reveals it, once, to the battle's own user only.
    let first = battle(&gateway, &alice);
    let shown = first.to_string();
    assert!(!shown.contains("liked") && !shown.contains(&start), "identities leak: {shown}");
    assert_eq!(first["answers"][0]["slot"], "a");
    let id = first["battle_id"].as_str().unwrap();
    assert_eq!(vote(&gateway, &mallory, id, "a").0, 404);
    let (status, error) = vote(&gateway, &alice, id, "c");
    assert_eq!(status, 400, "{error}");
    let (status, revealed) = vote(&gateway, &alice, id, "tie");
    assert_eq!(status, 200, "{revealed}");
    let mut pair = [revealed["a"]["checkpoint"].as_str().unwrap(), revealed["b"]["checkpoint"].as_str().unwrap()];
    pair.sort();
    let mut expected = ["liked", start.as_str()];
    expected.sort();
    assert_eq!(pair, expected);
    assert_eq!(vote(&gateway, &alice, id, "a").0, 404, "a battle takes one vote");
    assert_eq!(vote(&gateway, &alice, "bat_../../x", "a").0, 404);

    // Alice prefers `liked`: the gate promotes it once the interval clears 0.5.
    vote_for(&gateway, &alice, "liked", 30);
    wait_for("the vote gate to promote 'liked'", || checkpoints(&gateway)["serving"] == "liked");
    let (status, board, _) = gateway.call("GET", "/admin/leaderboard", ADMIN_KEY, None);
    assert_eq!(status, 200, "{board}");
    assert!(board["votes"].as_u64().unwrap() >= 10, "{board}");
    assert_eq!(board["data"][0]["checkpoint"], "liked", "{board}");
    assert!(board["data"][0]["rating_low"].as_f64().unwrap() > 1000.0, "{board}");
    assert_eq!(gateway.call("GET", "/admin/leaderboard", &alice, None).0, 403);

    // Now she prefers the serving `liked` to `disliked`: the gate refuses the newcomer.
    let (status, loaded, _) = gateway.call("POST", "/admin/checkpoints/disliked/load", ADMIN_KEY, None);
    assert_eq!(status, 200, "{loaded}");
    vote_for(&gateway, &alice, "liked", 30);
    wait_for("the vote gate to refuse 'disliked'", || {
        checkpoints(&gateway)["data"].as_array().unwrap().iter().any(|c| {
            c["id"] == "disliked"
                && c["role"] == "failed"
                && c["failure"].as_str().is_some_and(|f| f.contains("voters preferred the serving checkpoint"))
        })
    });
    assert_eq!(checkpoints(&gateway)["serving"], "liked");
    // With the loser gone the arena is closed again.
    let (status, _, _) = gateway.call("POST", "/v1/playground/arena", &alice, Some(&body));
    assert_eq!(status, 409);
}
