//! Blue/green rollout on an external engine: the real gateway with
//! `[engine.openai_http.launch]` starts llama-server itself (the tiny model,
//! exported to GGUF), a checkpoint is announced on `instructd:checkpoints`
//! while several clients send completions, and the gateway exports it and
//! starts a second llama-server on it; once it is healthy an operator canaries
//! it at 50 %, promotes it (the first process is drained and stopped), then
//! rolls back (a third process on the start-up model, the second stopped).
//!
//! Checked: no request fails; every answer's `system_fingerprint` names the
//! weights that produced it (each checkpoint's greedy text is its own, so a
//! fingerprint on the other one's text would show); requests sent after a
//! switch completed are answered by the new checkpoint only, both answer
//! during the canary; each replaced process is gone afterwards, and the last
//! one dies with the gateway.
//!
//! Skipped with a message when llama-server is not built, unless
//! INSTRUCTD_REQUIRE_LLAMA_SERVER is set (`make test` sets it and builds it).

#[path = "support/gateway.rs"]
#[allow(dead_code, unused_imports)]
mod gateway;
#[path = "support/llama_server.rs"]
mod llama_server;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use inference::checkpoint::{CheckpointStore, Manifest, Stage};
use inference::tiny_model::{TinySpec, init_tiny};
use serde_json::{Value, json};

use gateway::{ADMIN_KEY, Gateway, RedisServer, http};
use llama_server::llama_server;

const CLIENTS: usize = 4;
const PROMPT: &str = "Once upon a time";
const TOKENS: u64 = 6;

/// One finished request: its fingerprint and text, or why it failed.
type Answer = Result<(String, String), String>;

/// A greedy completion of `PROMPT`, streamed or whole: (fingerprint, text).
fn complete(url: &str, key: &str, model: &str, stream: bool) -> Answer {
    let body = json!({"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "stream": stream});
    let response = http()
        .post(format!("{url}/v1/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .map_err(|e| format!("no answer: {e}"))?;
    let status = response.status().as_u16();
    let text = response.text().map_err(|e| format!("body broke off: {e}"))?;
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    if !stream {
        let value: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        let fingerprint = value["system_fingerprint"].as_str().unwrap_or_default().to_string();
        return Ok((fingerprint, value["choices"][0]["text"].as_str().unwrap_or_default().to_string()));
    }
    let (mut fingerprints, mut streamed, mut done) = (Vec::<String>::new(), String::new(), false);
    for data in text.lines().filter_map(|line| line.strip_prefix("data: ")) {
        if data.trim() == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if chunk.get("error").is_some() {
            return Err(format!("error event: {chunk}"));
        }
        fingerprints.push(chunk["system_fingerprint"].as_str().unwrap_or_default().to_string());
        streamed += chunk["choices"][0]["text"].as_str().unwrap_or_default();
    }
    fingerprints.dedup();
    match (done, fingerprints.as_slice()) {
        (true, [fingerprint]) => Ok((fingerprint.clone(), streamed)),
        _ => Err(format!("stream ended badly (done: {done}, fingerprints: {fingerprints:?}): {text}")),
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "{what} did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(gateway: &Gateway, path: &str) -> Value {
    gateway.call("GET", path, ADMIN_KEY, None).1
}

/// The pid of the upstream process the serving engine forwards to.
fn upstream_pid(gateway: &Gateway) -> u32 {
    let ready = get(gateway, "/readyz");
    let pid = ready["engine"]["upstreams"][0]["process"]["pid"].as_u64();
    pid.unwrap_or_else(|| panic!("/readyz names no launched upstream: {ready}")) as u32
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn serving(gateway: &Gateway) -> String {
    get(gateway, "/admin/checkpoints")["serving"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_published_checkpoint_rolls_out_blue_green_on_llama_server_and_back() {
    let Some(binary) = llama_server() else { return };
    let scratch = tempfile::tempdir().expect("scratch");
    // Untied embeddings: each seed's greedy answer is its own (tied ones tend to repeat the prompt).
    let spec = |seed| TinySpec { seed, tie_word_embeddings: false, ..Default::default() };
    let base = scratch.path().join("base");
    init_tiny(&base, &spec(1)).expect("tiny model");
    let store = CheckpointStore::open(&scratch.path().join("checkpoints")).expect("store");
    let next = scratch.path().join("next");
    init_tiny(&next, &spec(2)).expect("tiny model");
    store.import_dir(&next, Manifest::new("ckpt-b", Some("base"), Stage::Sft)).expect("checkpoint published");

    let command: Vec<String> = [
        binary.to_str().expect("a UTF-8 path"),
        "-m",
        "{gguf}",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--threads",
        "1",
        "--parallel",
        "4",
        "--ctx-size",
        "2048",
        "--no-webui",
    ]
    .map(String::from)
    .into();
    let command = serde_json::to_string(&command).expect("JSON");
    let redis = RedisServer::start().expect("redis-server runs (make test installs it)");
    let gateway = Gateway::start(
        &redis.url(),
        &base,
        &[
            ("INSTRUCTD__ENGINE__KIND", "openai_http"),
            ("INSTRUCTD__ENGINE__OPENAI_HTTP__LAUNCH__COMMAND", &command),
            ("INSTRUCTD__ENGINE__OPENAI_HTTP__LAUNCH__STOP_GRACE_SECS", "5"),
            ("INSTRUCTD__ENGINE__OPENAI_HTTP__HEALTH_INTERVAL_SECS", "1"),
            ("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", store.root().to_str().expect("a UTF-8 path")),
        ],
    );
    let unlimited = json!({"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent": 0});
    let body = json!({"name": "load", "user": "load", "organization": "org", "scopes": ["completions"],
                      "limits": unlimited});
    let (status, key, _) = gateway.call("POST", "/admin/keys", ADMIN_KEY, Some(&body));
    assert_eq!(status, 201, "{key}");
    let key = key["secret"].as_str().expect("a secret").to_string();
    let models = gateway.call("GET", "/v1/models", &key, None).1;
    let model = models["data"][0]["id"].as_str().unwrap_or_else(|| panic!("no model: {models}")).to_string();
    let first_pid = upstream_pid(&gateway);
    let mut expected = BTreeMap::new();
    let (fingerprint, text) = complete(&gateway.url, &key, &model, false).expect("the launched upstream answers");
    assert_eq!(fingerprint, "base");
    expected.insert(fingerprint, text);

    // Steady load from several clients for the whole rollout and rollback; each answer with when it was sent and
    // when it came back.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (url, key, model, stop) = (gateway.url.clone(), key.clone(), model.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let answer = complete(&url, &key, &model, (answers.len() + client) % 2 == 1);
                    answers.push((sent, Instant::now(), answer));
                }
                answers
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let announcement = feedback::announcement::CheckpointAnnouncement {
        id: "ckpt-b".into(),
        stage: Some("sft".into()),
        parent: None,
        source: None,
    };
    let mut xadd = redis::cmd("XADD");
    xadd.arg(feedback::streams::CHECKPOINTS).arg("*");
    for (field, value) in announcement.fields() {
        xadd.arg(field).arg(value);
    }
    let mut connection = redis::Client::open(redis.url()).expect("redis").get_connection().expect("redis");
    let _: String = xadd.query(&mut connection).expect("announced");
    // Exported, launched on its own process, healthy and smoke-tested: a candidate waiting for the operator.
    wait_until("ckpt-b ready on its upstream", Duration::from_secs(60), || {
        let list = get(&gateway, "/admin/checkpoints");
        let rows = list["data"].as_array().cloned().unwrap_or_default();
        let role = rows.iter().find(|c| c["id"] == "ckpt-b").map(|c| c["role"].clone());
        assert_ne!(role, Some(json!("failed")), "{list}");
        role == Some(json!("ready"))
    });
    let canary_sent = Instant::now();
    let canary = json!({"percent": 50});
    let (status, body, _) = gateway.call("POST", "/admin/checkpoints/ckpt-b/canary", ADMIN_KEY, Some(&canary));
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(800));
    let promote_sent = Instant::now();
    let (status, body, _) = gateway.call("POST", "/admin/checkpoints/ckpt-b/promote", ADMIN_KEY, None);
    assert_eq!(status, 200, "{body}");
    let promoted = Instant::now();
    assert_eq!(serving(&gateway), "ckpt-b");
    let (fingerprint, text) = complete(&gateway.url, &key, &model, false).expect("the new upstream answers");
    assert_eq!(fingerprint, "ckpt-b");
    assert_ne!(text, expected["base"], "the two checkpoints must answer differently for this test to mean anything");
    expected.insert(fingerprint, text);
    let second_pid = upstream_pid(&gateway);
    assert_ne!(second_pid, first_pid, "a new process serves the new checkpoint");
    wait_until("the end of the first upstream", Duration::from_secs(20), || !alive(first_pid));
    std::thread::sleep(Duration::from_millis(500));

    // Rollback: the previous checkpoint's upstream is started again, the same way.
    let rollback_sent = Instant::now();
    let (status, body, _) = gateway.call("POST", "/admin/checkpoints/rollback", ADMIN_KEY, None);
    assert_eq!((status, body["restored"].as_str()), (200, Some("base")), "{body}");
    let rolled_back = Instant::now();
    assert_eq!(serving(&gateway), "base");
    let third_pid = upstream_pid(&gateway);
    assert!(third_pid != first_pid && third_pid != second_pid, "a new process serves the restored checkpoint");
    wait_until("the end of the second upstream", Duration::from_secs(20), || !alive(second_pid));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);

    // Per phase: [base before the canary, base during it, ckpt-b during it, ckpt-b promoted, base rolled back].
    let mut phases = [0usize; 5];
    for (client, answers) in clients.into_iter().map(|c| c.join().expect("client thread")).enumerate() {
        for (sent, back, answer) in answers {
            let (fingerprint, text) = answer.unwrap_or_else(|e| panic!("client {client}: a request failed: {e}"));
            // The fingerprint names the weights that produced the text.
            let produced_by = expected.get(&fingerprint);
            assert_eq!(produced_by, Some(&text), "client {client}: fingerprint {fingerprint:?} on text {text:?}");
            let base = fingerprint == "base";
            let must_be = |phase: usize, want_base: bool| {
                assert_eq!(base, want_base, "client {client}: {fingerprint} answered in phase {phase}");
                phase
            };
            let phase = if back < canary_sent {
                must_be(0, true)
            } else if sent > rolled_back {
                must_be(4, true)
            } else if sent > promoted && back < rollback_sent {
                must_be(3, false)
            } else if sent > canary_sent && back < promote_sent {
                if base { 1 } else { 2 }
            } else {
                // Straddles a switch: either checkpoint, as long as the fingerprint matched the text.
                continue;
            };
            phases[phase] += 1;
        }
    }
    eprintln!("answers per phase (base, canary: base, canary: ckpt-b, ckpt-b, base again): {phases:?}");
    assert!(phases.iter().all(|n| *n > 0), "every phase served requests under load: {phases:?}");

    // The last upstream is the gateway's child: it goes with it, even when the gateway is killed.
    drop(gateway);
    wait_until("the end of the last upstream with the gateway", Duration::from_secs(10), || !alive(third_pid));
}
