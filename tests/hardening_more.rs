//! End-to-end tests of the gateway hardening of issue 13 against the real
//! `instructd serve` and a private `redis-server`: who may pin which
//! checkpoint, which checkpoints `/load` refuses, a failed load tried again,
//! stop-sequence caps, and cheap refusals before tokenization.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use inference::checkpoint::{CheckpointStore, Manifest, Stage};
use inference::tiny_model::{TinySpec, init_tiny};
use serde_json::{Value, json};

use gateway::{ADMIN_KEY, Gateway, RedisServer, http, tiny_model};

/// Sends a request; returns (status, parsed body or Null).
fn call(gateway: &Gateway, method: &str, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
    let (status, body, _) = gateway.call(method, path, key, body);
    (status, body)
}

fn create_key(gateway: &Gateway, body: Value) -> String {
    let (status, key) = call(gateway, "POST", "/admin/keys", ADMIN_KEY, Some(&body));
    assert_eq!(status, 201, "{key}");
    key["secret"].as_str().expect("a secret").to_string()
}

fn model_name(gateway: &Gateway) -> String {
    let (status, models) = call(gateway, "GET", "/v1/models", ADMIN_KEY, None);
    assert_eq!(status, 200, "{models}");
    models["data"][0]["id"].as_str().expect("a model id").to_string()
}

fn complete(gateway: &Gateway, key: &str, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "prompt": "Hello", "max_tokens": 2});
    call(gateway, "POST", "/v1/completions", key, Some(&body))
}

/// Publishes a tiny model (own seed) into `store` as checkpoint `id`.
fn publish(store: &CheckpointStore, scratch: &std::path::Path, id: &str, stage: Stage, metrics: Value, seed: u64) {
    let dir = scratch.join(format!("src-{id}"));
    init_tiny(&dir, &TinySpec { seed, ..Default::default() }).expect("a tiny model");
    let mut manifest = Manifest::new(id, None, stage);
    manifest.metrics = metrics;
    store.import_dir(&dir, manifest).expect("checkpoint imported");
}

#[test]
fn pinning_needs_a_scope_and_load_refuses_what_must_not_serve() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let store = CheckpointStore::open(&tmp.path().join("checkpoints")).unwrap();
    publish(&store, tmp.path(), "cand", Stage::Sft, Value::Null, 11);
    publish(&store, tmp.path(), "rm", Stage::RewardModel, Value::Null, 12);
    publish(&store, tmp.path(), "gated", Stage::PpoPtx, json!({"evaluation": {"passed": false}}), 13);
    publish(&store, tmp.path(), "flaky", Stage::Sft, Value::Null, 14);
    let weights = store.path("flaky").join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x55;
    std::fs::write(&weights, &bad).unwrap();

    let gateway = Gateway::start(
        &redis.url(),
        &model,
        &[("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", store.root().to_str().unwrap())],
    );
    let name = model_name(&gateway);
    let (_, ready) = call(&gateway, "GET", "/readyz", ADMIN_KEY, None);
    let serving = ready["model"]["checkpoint"].as_str().expect("the serving checkpoint").to_string();
    let plain = create_key(&gateway, json!({"user": "u", "scopes": ["completions"]}));
    let pinner = create_key(&gateway, json!({"user": "p", "scopes": ["completions", "pin_checkpoints"]}));

    // A verified candidate: only a key with `pin_checkpoints` (or an admin key) may pin it.
    let (status, body) = call(&gateway, "POST", "/admin/checkpoints/cand/load", ADMIN_KEY, None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = complete(&gateway, &plain, &format!("{name}@cand"));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_scope", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("pin_checkpoints"), "{body}");
    let (status, body) = complete(&gateway, &pinner, &format!("{name}@cand"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["system_fingerprint"], "cand", "{body}");
    let (status, body) = complete(&gateway, ADMIN_KEY, &format!("{name}@cand"));
    assert_eq!(status, 200, "{body}");
    // The serving checkpoint stays open to every key.
    let (status, body) = complete(&gateway, &plain, &format!("{name}@{serving}"));
    assert_eq!(status, 200, "{body}");

    // A reward model is never loaded, forced or not.
    for force in [None, Some(json!({"force": true}))] {
        let (status, body) = call(&gateway, "POST", "/admin/checkpoints/rm/load", ADMIN_KEY, force.as_ref());
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "checkpoint_not_servable", "{body}");
    }
    let (status, body) = complete(&gateway, &pinner, &format!("{name}@rm"));
    assert_eq!(status, 404, "{body}");

    // An announced gate-failed policy is not loaded by the watcher (only an operator's forced /load may).
    let announcement = feedback::announcement::CheckpointAnnouncement {
        id: "gated".into(),
        stage: Some("ppo_ptx".into()),
        parent: None,
        source: None,
    };
    let mut xadd = redis::cmd("XADD");
    xadd.arg(feedback::streams::CHECKPOINTS).arg("*");
    for (field, value) in announcement.fields() {
        xadd.arg(field).arg(value);
    }
    let mut connection = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let _: String = xadd.query(&mut connection).unwrap();
    let role = |id: &str| {
        let (_, list) = call(&gateway, "GET", "/admin/checkpoints", ADMIN_KEY, None);
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| (c["role"].clone(), c["failure"].clone()))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (state, failure) = loop {
        match role("gated") {
            Some((state, failure)) if state == "failed" => break (state, failure),
            _ if std::time::Instant::now() > deadline => {
                panic!("the announced gate-failed policy: {:?}", role("gated"))
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    assert!(failure.as_str().unwrap_or("").contains("evaluation gate"), "{state} {failure}");
    assert_eq!(complete(&gateway, &pinner, &format!("{name}@gated")).0, 404);

    // A gate-failed policy loads only when an operator forces it.
    let (status, body) = call(&gateway, "POST", "/admin/checkpoints/gated/load", ADMIN_KEY, None);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "checkpoint_gate_failed", "{body}");
    assert_eq!(complete(&gateway, &pinner, &format!("{name}@gated")).0, 404);
    let force = json!({"force": true});
    let (status, body) = call(&gateway, "POST", "/admin/checkpoints/gated/load", ADMIN_KEY, Some(&force));
    assert_eq!(status, 200, "{body}");
    let (status, body) = complete(&gateway, &pinner, &format!("{name}@gated"));
    assert_eq!(status, 200, "{body}");

    // A candidate whose load failed is tried again once its files are fixed.
    let (status, body) = call(&gateway, "POST", "/admin/checkpoints/flaky/load", ADMIN_KEY, None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(complete(&gateway, &pinner, &format!("{name}@flaky")).0, 404);
    std::fs::write(&weights, &good).unwrap();
    let (status, body) = call(&gateway, "POST", "/admin/checkpoints/flaky/load", ADMIN_KEY, None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = complete(&gateway, &pinner, &format!("{name}@flaky"));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn stop_sequences_longer_than_the_cap_are_refused() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let gateway = Gateway::start(&redis.url(), &model, &[]);
    let name = model_name(&gateway);
    let long = "x".repeat(300);
    for (path, body) in [
        ("/v1/completions", json!({"model": name, "prompt": "Hi", "max_tokens": 2, "stop": [long]})),
        (
            "/v1/chat/completions",
            json!({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stop": long}),
        ),
    ] {
        let (status, body) = call(&gateway, "POST", path, ADMIN_KEY, Some(&body));
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], "stop", "{path}: {body}");
    }
    let ok = json!({"model": name, "prompt": "Hi", "max_tokens": 2, "stop": ["x".repeat(256)]});
    let (status, body) = call(&gateway, "POST", "/v1/completions", ADMIN_KEY, Some(&ok));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_limited_key_is_refused_before_its_prompt_is_tokenized() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let gateway = Gateway::start(&redis.url(), &model, &[("INSTRUCTD__GATEWAY__MAX_PROMPT_BYTES", "20000")]);
    let name = model_name(&gateway);
    let limits = json!({"requests_per_minute": 1, "tokens_per_minute": 0, "max_concurrent": 0});
    let key = create_key(&gateway, json!({"user": "l", "scopes": ["completions"], "limits": limits}));
    let (status, body) = complete(&gateway, &key, &name);
    assert_eq!(status, 200, "{body}");

    // Past its limit, a prompt far longer than the context (which only
    // tokenizing would reveal) is refused by the rate limit, not tokenized.
    let long = json!({"model": name, "prompt": "hello ".repeat(2000), "max_tokens": 2});
    let (status, body) = call(&gateway, "POST", "/v1/completions", &key, Some(&long));
    assert_eq!(status, 429, "{body}");
    let chat = json!({"model": name, "messages": [{"role": "user", "content": "hello ".repeat(2000)}]});
    let (status, body) = call(&gateway, "POST", "/v1/chat/completions", &key, Some(&chat));
    assert_eq!(status, 429, "{body}");

    // Cheap shape checks come before the rate limit.
    let huge = json!({"model": name, "prompt": "a".repeat(20001), "max_tokens": 2});
    let (status, body) = call(&gateway, "POST", "/v1/completions", &key, Some(&huge));
    assert_eq!(
        (status, &body["error"]["code"], &body["error"]["param"]),
        (400, &json!("string_above_max_length"), &json!("prompt")),
        "{body}"
    );
    let huge_chat = json!({"model": name, "messages": [{"role": "user", "content": "a".repeat(20001)}]});
    let (status, body) = call(&gateway, "POST", "/v1/chat/completions", &key, Some(&huge_chat));
    assert_eq!(
        (status, &body["error"]["code"], &body["error"]["param"]),
        (400, &json!("string_above_max_length"), &json!("messages")),
        "{body}"
    );
    let many = json!({"model": name, "prompt": vec!["a"; 33], "max_tokens": 2});
    let (status, body) = call(&gateway, "POST", "/v1/completions", &key, Some(&many));
    assert_eq!((status, &body["error"]["param"]), (400, &json!("prompt")), "{body}");
}

#[test]
fn readyz_says_whether_redis_keeps_anything_on_disk() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let gateway = Gateway::start(&redis.url(), &model, &[]);
    // The test server runs with `--save "" --appendonly no`.
    let (status, ready) = call(&gateway, "GET", "/readyz", ADMIN_KEY, None);
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["redis_persistence"], "none", "{ready}");
    let metrics = http().get(format!("{}/metrics", gateway.url)).send().and_then(|r| r.text()).unwrap();
    assert!(metrics.contains("instructd_redis_persistence 0"), "{metrics}");

    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_connection().unwrap();
    redis::cmd("CONFIG").arg("SET").arg("save").arg("3600 1").query::<()>(&mut connection).unwrap();
    let (_, ready) = call(&gateway, "GET", "/readyz", ADMIN_KEY, None);
    assert_eq!(ready["redis_persistence"], "rdb", "{ready}");
    let metrics = http().get(format!("{}/metrics", gateway.url)).send().and_then(|r| r.text()).unwrap();
    assert!(metrics.contains("instructd_redis_persistence 1"), "{metrics}");
}
