//! End-to-end tests of the gateway's defences against its own clients: the
//! real `instructd serve`, a private `redis-server`, and raw sockets or
//! `reqwest` (no Python needed). Revoked admin keys stay revoked everywhere
//! at once; slow, silent and non-reading clients are cut off; connections
//! are capped; invented methods add no metric series; feedback is rate
//! limited and size capped.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway::{ADMIN_KEY, Gateway, RedisServer, http, repo_root, tiny_model};
use serde_json::{Value, json};

const BOOTSTRAP: &str = "key_bootstrap_admin";

/// Sends a request; returns (status, parsed body or Null, headers).
fn call(
    gateway: &Gateway,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    gateway.call(method, path, key, body)
}

fn status(gateway: &Gateway, method: &str, path: &str, key: &str) -> u16 {
    call(gateway, method, path, key, None).0
}

fn create_key(gateway: &Gateway, body: Value) -> String {
    let (status, key, _) = call(gateway, "POST", "/admin/keys", ADMIN_KEY, Some(&body));
    assert_eq!(status, 201, "{key}");
    key["secret"].as_str().expect("a secret").to_string()
}

fn bootstrap_records(gateway: &Gateway, admin: &str) -> Vec<Value> {
    let (status, list, _) = call(gateway, "GET", "/admin/keys", admin, None);
    assert_eq!(status, 200, "{list}");
    list["data"].as_array().expect("a list").iter().filter(|k| k["id"] == BOOTSTRAP).cloned().collect()
}

#[test]
fn a_revoked_admin_key_stays_revoked_on_every_replica_and_after_rotation() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let a = Gateway::start(&redis.url(), &model, &[]);
    let b = Gateway::start(&redis.url(), &model, &[]);
    let other_admin = create_key(&a, json!({"user": "ops", "scopes": ["admin"]}));
    // Both replicas have the bootstrap key cached.
    assert_eq!(status(&a, "GET", "/admin/keys", ADMIN_KEY), 200);
    assert_eq!(status(&b, "GET", "/admin/keys", ADMIN_KEY), 200);

    assert_eq!(status(&a, "DELETE", &format!("/admin/keys/{BOOTSTRAP}"), ADMIN_KEY), 200);
    // At once, on the replica that revoked it and on the other one.
    assert_eq!(status(&a, "GET", "/admin/keys", ADMIN_KEY), 401, "revoked key still works on its own replica");
    assert_eq!(status(&b, "GET", "/admin/keys", ADMIN_KEY), 401, "revoked key still works on the other replica");
    drop((a, b));

    // A restart with another bootstrap secret resurrects nothing.
    let rotated = "sk-test-rotated-admin-key-0123456789abcdef";
    let c = Gateway::start(&redis.url(), &model, &[("INSTRUCTD_ADMIN_KEY", rotated)]);
    assert_eq!(status(&c, "GET", "/admin/keys", rotated), 401, "a new secret revived the revoked bootstrap key");
    assert_eq!(status(&c, "GET", "/admin/keys", ADMIN_KEY), 401, "the old secret works again");
    let records = bootstrap_records(&c, &other_admin);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], "revoked", "{records:?}");
}

#[test]
fn a_rotated_bootstrap_secret_stops_working() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let first = Gateway::start(&redis.url(), &model, &[]);
    assert_eq!(status(&first, "GET", "/admin/keys", ADMIN_KEY), 200);
    drop(first);
    let rotated = "sk-test-rotated-admin-key-0123456789abcdef";
    let second = Gateway::start(&redis.url(), &model, &[("INSTRUCTD_ADMIN_KEY", rotated)]);
    assert_eq!(status(&second, "GET", "/admin/keys", rotated), 200);
    assert_eq!(status(&second, "GET", "/admin/keys", ADMIN_KEY), 401, "the rotated-out secret still works");
    let records = bootstrap_records(&second, rotated);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], "active", "{records:?}");
}

#[test]
fn a_short_admin_secret_is_refused_at_start_up() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .arg("serve")
        .current_dir(repo_root())
        .env("INSTRUCTD_CONFIG", repo_root().join("configs/default.toml"))
        .env("INSTRUCTD_ADDR", "127.0.0.1:0")
        .env("INSTRUCTD_REDIS_URL", redis.url())
        .env("INSTRUCTD_MODEL", tiny_model(tmp.path()))
        .env("INSTRUCTD_ADMIN_KEY", "sk-short-admin-secret")
        .env("INSTRUCTD__GATEWAY__PLAYGROUND__SPILL_DIR", tmp.path().join("spill"))
        .env("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", tmp.path().join("checkpoints"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("instructd serve starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("waiting") {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("instructd serve kept running with a 21-character admin secret");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr readable");
    assert!(!exit.success());
    assert!(stderr.contains("at least 32"), "{stderr}");
}

fn address(gateway: &Gateway) -> String {
    gateway.url.trim_start_matches("http://").to_string()
}

/// Whether the server closed `stream` by `deadline` (reading and discarding what it sent).
fn closed_by(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).expect("a read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Reads until `needle` appears (or the deadline passes); returns what was read.
fn read_until(stream: &mut TcpStream, needle: &str, deadline: Instant) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).expect("a read timeout");
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn slow_silent_and_idle_connections_are_closed() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(
        &redis.url(),
        &tiny_model(tmp.path()),
        &[
            ("INSTRUCTD__GATEWAY__HEADER_READ_TIMEOUT_SECS", "2"),
            ("INSTRUCTD__GATEWAY__BODY_TIMEOUT_SECS", "2"),
            ("INSTRUCTD__GATEWAY__IDLE_TIMEOUT_SECS", "3"),
        ],
    );
    let addr = address(&gateway);
    let started = Instant::now();
    // Half a request head, then nothing (and one connection that sends nothing at all).
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connects");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Ag").expect("writes");
            s
        })
        .collect();
    slow.push(TcpStream::connect(&addr).expect("connects"));
    // A keep-alive connection that has had its answer and says no more.
    let mut idle = TcpStream::connect(&addr).expect("connects");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("writes");
    let answer = read_until(&mut idle, "\"ok\"}", Instant::now() + Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answered = Instant::now();
    // A body that stops half way.
    let mut body = TcpStream::connect(&addr).expect("connects");
    write!(
        body,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
    )
    .expect("writes");

    // The idle connection outlives the header timeout (2 s), not the idle one (3 s).
    assert!(!closed_by(&mut idle, answered + Duration::from_millis(2500)), "closed before its idle timeout");
    assert!(closed_by(&mut idle, answered + Duration::from_secs(6)), "an idle keep-alive connection stayed open");

    let deadline = started + Duration::from_secs(10);
    let open = slow.iter_mut().map(|s| closed_by(s, deadline)).filter(|closed| !closed).count();
    assert_eq!(open, 0, "{open} of 201 slow connections still open after 10 s (header timeout 2 s)");

    let refused = read_until(&mut body, "}}", Instant::now() + Duration::from_secs(6));
    assert!(refused.starts_with("HTTP/1.1 408"), "{refused}");
    assert!(refused.contains("\"code\":\"request_timeout\""), "{refused}");
}

#[test]
fn connections_past_the_cap_wait_for_a_free_slot() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(
        &redis.url(),
        &tiny_model(tmp.path()),
        &[("INSTRUCTD__GATEWAY__MAX_CONNECTIONS", "4"), ("INSTRUCTD__GATEWAY__HEADER_READ_TIMEOUT_SECS", "60")],
    );
    let addr = address(&gateway);
    let mut held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).expect("connects")).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut fifth = TcpStream::connect(&addr).expect("the backlog takes it");
    fifth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("writes");
    let early = read_until(&mut fifth, "\"ok\"}", Instant::now() + Duration::from_millis(1500));
    assert!(early.is_empty(), "a fifth connection was served past a cap of 4: {early}");
    held.pop();
    let late = read_until(&mut fifth, "\"ok\"}", Instant::now() + Duration::from_secs(5));
    assert!(late.starts_with("HTTP/1.1 200"), "the fifth connection was not served once a slot freed: {late}");
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_its_generation_cancelled() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway =
        Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[("INSTRUCTD__GATEWAY__WRITE_STALL_TIMEOUT_SECS", "1")]);
    let (_, models, _) = call(&gateway, "GET", "/v1/models", ADMIN_KEY, None);
    let model = models["data"][0]["id"].as_str().expect("a model").to_string();
    // Many long samples with logprobs: far more than the socket buffers hold.
    let body = json!({"model": model, "prompt": vec!["Tell me a long story."; 8], "n": 16, "max_tokens": 400,
        "logprobs": 5, "temperature": 1.0, "stream": true})
    .to_string();
    let mut stream = TcpStream::connect(address(&gateway)).expect("connects");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("writes");
    // Read nothing for a while.
    std::thread::sleep(Duration::from_secs(6));
    let received = read_until(&mut stream, "data: [DONE]", Instant::now() + Duration::from_secs(30));
    assert!(received.starts_with("HTTP/1.1 200"), "{}", &received[..received.len().min(300)]);
    assert!(!received.contains("data: [DONE]"), "the stream ran to its end for a client that stopped reading");
    let (_, _, _) = call(&gateway, "GET", "/healthz", ADMIN_KEY, None);
    let metrics = http().get(format!("{}/metrics", gateway.url)).send().and_then(|r| r.text()).unwrap_or_default();
    assert!(metrics.contains("instructd_connections_closed_total{reason=\"write_stall\"} 1"), "{metrics}");
    let running = metrics.lines().find(|l| l.starts_with("instructd_engine_running_sequences ")).unwrap_or_default();
    assert_eq!(running, "instructd_engine_running_sequences 0", "the generation was not cancelled");
}

#[test]
fn invented_methods_add_no_metric_series() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    let scrape = || http().get(format!("{}/metrics", gateway.url)).send().and_then(|r| r.text()).unwrap_or_default();
    assert_eq!(status(&gateway, "GET", "/healthz", ""), 200);
    let before = scrape().lines().count();
    for i in 1..=300 {
        let answer = status(&gateway, &format!("M{i}"), "/healthz", "");
        assert_eq!(answer, 405);
        let answer = status(&gateway, "GET", &format!("/no/such/path/{i}"), "");
        assert_eq!(answer, 404);
    }
    let after = scrape();
    assert!(!after.contains("method=\"M"), "invented methods became label values");
    assert!(!after.contains("/no/such/path"), "invented paths became label values");
    let grown = after.lines().count().saturating_sub(before);
    assert!(grown < 60, "600 invented requests added {grown} lines to /metrics");
}

#[test]
fn feedback_is_rate_limited_and_size_capped() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    let (_, models, _) = call(&gateway, "GET", "/v1/models", ADMIN_KEY, None);
    let model = models["data"][0]["id"].as_str().expect("a model").to_string();
    let user = create_key(
        &gateway,
        json!({"user": "pat", "scopes": ["playground"],
            "limits": {"requests_per_minute": 4, "tokens_per_minute": 0, "max_concurrent": 0}}),
    );
    let (_, notice, _) = call(&gateway, "GET", "/v1/playground/notice", &user, None);
    let consent = json!({"action": "accept", "notice_version": notice["version"]});
    assert_eq!(call(&gateway, "POST", "/v1/playground/consent", &user, Some(&consent)).0, 200);
    let prompt = json!({"model": model, "prompt": "Write a haiku.", "k": 4, "max_tokens": 4});
    let (code, logged, _) = call(&gateway, "POST", "/v1/playground/completions", &user, Some(&prompt));
    assert_eq!(code, 200, "{logged}");
    let generation = logged["samples"][0]["generation_id"].as_str().expect("a generation id").to_string();

    // One playground request and three judgments use up 4 requests per minute.
    for score in [3, 4, 5] {
        let rating = json!({"type": "rating", "generation_id": generation, "score": score});
        let (code, body, _) = call(&gateway, "POST", "/v1/feedback", &user, Some(&rating));
        assert_eq!(code, 201, "{body}");
    }
    let rating = json!({"type": "rating", "generation_id": generation, "score": 6});
    let (code, body, headers) = call(&gateway, "POST", "/v1/feedback", &user, Some(&rating));
    assert_eq!(code, 429, "a fifth request within the minute was accepted: {body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert!(headers.contains_key("retry-after"));

    // Size caps, for a labeler without limits.
    let labeler = create_key(
        &gateway,
        json!({"user": "lee", "scopes": ["labeler"],
            "limits": {"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent": 0}}),
    );
    let long_comment = json!({"type": "rating", "generation_id": generation, "score": 4, "comment": "a".repeat(5000)});
    let (code, body, _) = call(&gateway, "POST", "/v1/feedback", &labeler, Some(&long_comment));
    assert_eq!((code, &body["error"]["param"]), (400, &json!("comment")), "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let huge = json!({"type": "demonstration", "prompt": "Explain tides.", "response": "b".repeat(200_000)});
    let (code, body, _) = call(&gateway, "POST", "/v1/feedback", &labeler, Some(&huge));
    assert_eq!((code, &body["error"]["code"]), (413, &json!("request_too_large")), "{body}");
    let fine = json!({"type": "rating", "generation_id": generation, "score": 4, "comment": "clear and short"});
    assert_eq!(call(&gateway, "POST", "/v1/feedback", &labeler, Some(&fine)).0, 201);
}
