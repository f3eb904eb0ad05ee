//! The contract gate: schemathesis (from the test venv) runs every operation
//! of `openapi.yaml` against the real `instructd serve` on the tiny model and a
//! private Redis, with `tests/e2e/schemathesis.toml` (fixed seed, bounded
//! examples), and the test fails with its report on any finding: a 5xx, a
//! response the spec does not describe, a schema-valid request refused, or an
//! invalid one accepted.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway::{ADMIN_KEY, Gateway, RedisServer, publish_reward_model, repo_root, tiny_model};
use inference::checkpoint::CheckpointStore;

/// Far more than the run needs (it takes a few minutes on two cores); a hung
/// run fails here instead of holding up `make test`.
const RUN_LIMIT: Duration = Duration::from_secs(900);

/// The venv's Python and its `schemathesis`, or `None` (skip) when no test venv is configured.
fn schemathesis() -> Option<(PathBuf, PathBuf)> {
    let Some(python) = std::env::var_os("INSTRUCTD_TEST_PYTHON").map(PathBuf::from) else {
        eprintln!("SKIPPED: INSTRUCTD_TEST_PYTHON is unset; `make test` installs schemathesis into .cache/test-venv");
        return None;
    };
    let cli = python.with_file_name("schemathesis");
    assert!(
        cli.is_file(),
        "INSTRUCTD_TEST_PYTHON={} has no schemathesis beside it ({}); run `make test-venv`",
        python.display(),
        cli.display()
    );
    Some((python, cli))
}

#[test]
fn the_server_keeps_the_openapi_contract() {
    let Some((python, cli)) = schemathesis() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // A reward model in the gateway's checkpoint store, loaded at start-up, so `POST /v1/rewards` scores.
    let store = CheckpointStore::open(&tmp.path().join("checkpoints")).expect("checkpoint store");
    publish_reward_model(&store, &model, tmp.path(), "rm-contract", 3);
    let checkpoints = store.root().to_str().expect("a UTF-8 path").to_string();
    let gateway =
        Gateway::start(&redis.url(), &model, &[("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", &checkpoints)]);

    // Every scope the spec names but `admin`, read with the venv's PyYAML (a schemathesis dependency).
    let scopes = Command::new(&python)
        .args([
            "-c",
            "import sys, yaml, json; spec = yaml.safe_load(open(sys.argv[1])); \
                      print(json.dumps([s for s in spec['components']['schemas']['Scope']['enum'] if s != 'admin']))",
        ])
        .arg(repo_root().join("openapi.yaml"))
        .output()
        .expect("python runs");
    assert!(scopes.status.success(), "reading the scopes: {}", String::from_utf8_lossy(&scopes.stderr));
    let scopes: serde_json::Value = serde_json::from_slice(&scopes.stdout).expect("the scopes as JSON");

    // An ordinary key for every non-admin route, with limits the run cannot
    // reach (the gateway's limits stay on: they are the key's own).
    let (status, key, _) = gateway.call(
        "POST",
        "/admin/keys",
        ADMIN_KEY,
        Some(&serde_json::json!({
            "name": "schemathesis",
            "user": "schemathesis",
            "scopes": scopes,
            "approved_domains": ["medical_diagnosis", "protected_characteristics", "credit_eligibility",
                "employment_eligibility", "housing_eligibility", "political_advertising", "law_enforcement"],
            "limits": {"requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000, "max_concurrent": 64},
        })),
    );
    assert_eq!(status, 201, "creating the run's key: {key}");
    let secret = key["secret"].as_str().expect("a secret").to_string();
    let own_keys = format!("key_bootstrap_admin,{}", key["id"].as_str().expect("a key id"));
    // The deployment's facts the spec cannot state, for tests/e2e/schemathesis_hooks.py.
    let (_, models, _) = gateway.call("GET", "/v1/models", &secret, None);
    let model_id = models["data"][0]["id"].as_str().expect("the served model's id").to_string();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).expect("the model's config"))
            .expect("config.json is JSON");
    let vocab_size = config["vocab_size"].as_u64().expect("vocab_size").to_string();

    let mut child = Command::new(&cli)
        .arg("--config-file")
        .arg(repo_root().join("tests/e2e/schemathesis.toml"))
        .args(["run", "--no-color", "--report", "junit", "--report-dir"])
        .arg(tmp.path().join("report"))
        .arg(repo_root().join("openapi.yaml"))
        .env("INSTRUCTD_URL", &gateway.url)
        .env("INSTRUCTD_API_KEY", &secret)
        .env("INSTRUCTD_ADMIN_KEY", ADMIN_KEY)
        .env("INSTRUCTD_MODEL_ID", &model_id)
        .env("INSTRUCTD_VOCAB_SIZE", &vocab_size)
        .env("INSTRUCTD_OWN_KEY_IDS", &own_keys)
        .env("INSTRUCTD_SCHEMATHESIS_HOOKS", repo_root().join("tests/e2e/schemathesis_hooks.py"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("schemathesis starts");
    // Drain both pipes while waiting, so a long report cannot block the child.
    let stdout = child.stdout.take().expect("stdout piped");
    let stderr = child.stderr.take().expect("stderr piped");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let (stdout, stderr) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for schemathesis") {
            break Some(status);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    println!("{stdout}\n{stderr}");
    println!("schemathesis took {:.0} s", started.elapsed().as_secs_f64());
    let Some(status) = status else { panic!("schemathesis ran past {RUN_LIMIT:?}:\n{stdout}\n{stderr}") };
    assert!(status.success(), "schemathesis found contract violations ({status}):\n{stdout}\n{stderr}");

    // The run neither crashed the gateway nor got its own key suspended.
    let (status, _, _) = gateway.call("GET", "/v1/models", &secret, None);
    assert_eq!(status, 200, "the run's key still works after the run");
}
