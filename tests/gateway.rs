//! End-to-end tests of `instructd serve`: the real binary, a private
//! `redis-server`, and the unmodified Python `openai` client (scripts under
//! `tests/e2e/`). The model is a tiny random-weight one, so these test the
//! API and its controls, not text quality (see `chat_answers_with_the_default_model`).

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;
#[path = "support/real_model.rs"]
mod real_model;

use gateway::{Gateway, RedisServer, python, run_script, tiny_model};

#[test]
fn openai_client_surface() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    run_script(&python, "openai_api.py", &[("INSTRUCTD_URL", &gateway.url)]);
    assert!(gateway.stop().success(), "the gateway exits cleanly on SIGTERM");
}

#[test]
fn every_error_case() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    run_script(&python, "errors.py", &[("INSTRUCTD_URL", &gateway.url)]);
}

#[test]
fn repeated_refusals_auto_suspend_the_key() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[("INSTRUCTD__GATEWAY__MAX_REFUSALS", "3")]);
    run_script(&python, "auto_suspend.py", &[("INSTRUCTD_URL", &gateway.url)]);
}

#[test]
fn two_replicas_share_limits_and_suspensions() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let a = Gateway::start(&redis.url(), &model, &[]);
    let b = Gateway::start(&redis.url(), &model, &[]);
    run_script(&python, "replicas.py", &[("INSTRUCTD_URL", &a.url), ("INSTRUCTD_URL_B", &b.url)]);
}

#[test]
fn serves_through_a_redis_outage() {
    let Some(python) = python() else { return };
    let mut redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    let state = tmp.path().join("state");
    let env = |phase: &'static str| {
        vec![
            ("INSTRUCTD_URL", gateway.url.clone()),
            ("PHASE", phase.to_string()),
            ("INSTRUCTD_STATE_FILE", state.display().to_string()),
        ]
    };
    let run = |phase: &'static str| {
        let env = env(phase);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_script(&python, "redis_outage.py", &env);
    };
    run("before");
    redis.stop();
    run("down");
    redis.restart().unwrap();
    run("up");
}

#[test]
fn graceful_shutdown_finishes_streams_and_exports_traces() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let spans = tmp.path().join("spans.log");
    let mut sink = std::process::Command::new(&python)
        .arg(gateway::repo_root().join("tests/e2e/otlp_sink.py"))
        .args(["0", spans.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(sink.stdout.take().unwrap()), &mut port).unwrap();
    let endpoint = format!("http://127.0.0.1:{}", port.trim());
    // The real model, so that generation outlasts the signal by seconds.
    let model = real_model::real_model_dir();
    let gateway = Gateway::start(&redis.url(), &model, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    let pid = gateway.pid().to_string();
    run_script(&python, "graceful_shutdown.py", &[("INSTRUCTD_URL", &gateway.url), ("INSTRUCTD_PID", &pid)]);
    assert!(gateway.wait().success(), "the gateway exits cleanly after SIGTERM");
    let _ = sink.kill();
    let _ = sink.wait();
    let exported = std::fs::read_to_string(&spans).unwrap_or_default();
    assert!(
        exported.lines().any(|l| l.starts_with("/v1/traces ") && !l.contains(" 0 ")),
        "no spans reached the OTLP endpoint: {exported:?}"
    );
}

#[test]
fn chat_answers_with_the_default_model() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let gateway = Gateway::start(&redis.url(), &real_model::real_model_dir(), &[]);
    run_script(&python, "real_model_chat.py", &[("INSTRUCTD_URL", &gateway.url)]);
}

#[test]
fn a_flooding_key_cannot_starve_another_organisation() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // One request at a time, so that the fixed flood queues and a step is
    // one token for the client to read; a queue with room for all of it
    // (each organisation may fill half: 512 samples).
    let env = [("INSTRUCTD__ENGINE__MAX_RUNNING", "1"), ("INSTRUCTD__ENGINE__QUEUE_CAPACITY", "1024")];
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &env);
    run_script(&python, "fairness.py", &[("INSTRUCTD_URL", &gateway.url)]);
}
