//! End-to-end tests of consent, playground logging and feedback capture:
//! the real `instructd serve`, a private `redis-server`, and the Python
//! scripts under `tests/e2e/` reading the streams back with a Redis client.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use gateway::{Gateway, RedisServer, python, run_script, tiny_model};

#[test]
fn consent_feedback_labeling_and_no_leaks() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    run_script(&python, "feedback_flow.py", &[("INSTRUCTD_URL", &gateway.url), ("INSTRUCTD_REDIS_URL", &redis.url())]);
}

#[test]
fn feedback_survives_a_redis_outage_exactly_once() {
    let Some(python) = python() else { return };
    let mut redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    let state = tmp.path().join("state.json");
    let redis_url = redis.url();
    let run = |phase: &str| {
        run_script(
            &python,
            "feedback_outage.py",
            &[
                ("INSTRUCTD_URL", &gateway.url),
                ("INSTRUCTD_REDIS_URL", &redis_url),
                ("PHASE", phase),
                ("INSTRUCTD_STATE_FILE", state.to_str().unwrap()),
            ],
        )
    };
    run("before");
    redis.stop();
    run("down");
    redis.restart().unwrap();
    run("up");
}
