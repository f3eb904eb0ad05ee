//! The playground page (`GET /playground`) in a real browser: headless
//! Chromium driven by Selenium (`tests/e2e/playground_browser.py`) against the
//! real `instructd serve` and a private `redis-server`. The script enters a
//! key, accepts the notice, generates K=4 samples, ranks them by keyboard and
//! drag and drop, rates and flags one, submits, and reads the events back from
//! `instructd:feedback`; then it walks the labeler mode and a withdrawal.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's `chromium`
//! and `chromium-driver`; or INSTRUCTD_CHROMIUM / INSTRUCTD_CHROMEDRIVER),
//! `redis-cli`, and `selenium` in the test Python (`make test-venv`). Without
//! them the test prints SKIPPED and passes, unless INSTRUCTD_REQUIRE_BROWSER=1.
//!
//! A second test (`tests/e2e/arena_browser.py`) walks the playground's arena
//! (a blind battle between two loaded checkpoints and a vote) and the admin
//! page's leaderboard and labeler quality table.

// Each test binary uses only part of the shared helpers.
#[allow(dead_code)]
#[path = "support/gateway.rs"]
mod gateway;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gateway::{ADMIN_KEY, Gateway, RedisServer, python, run_script, tiny_model};
use inference::checkpoint::{CheckpointStore, Manifest, Stage};
use inference::tiny_model::{TinySpec, init_tiny};

fn required() -> bool {
    std::env::var("INSTRUCTD_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

fn tool(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| default.into())
}

/// Why the browser test cannot run here, if it cannot.
fn missing(python: Option<&Path>) -> Option<String> {
    let Some(python) = python else {
        return Some("no Python with the `openai` package (`make test-venv` installs one)".into());
    };
    for (var, default, package) in [
        ("INSTRUCTD_CHROMIUM", "/usr/bin/chromium", "chromium"),
        ("INSTRUCTD_CHROMEDRIVER", "/usr/bin/chromedriver", "chromium-driver"),
    ] {
        let path = tool(var, default);
        if !path.is_file() {
            return Some(format!("{} is absent (apt-get install -y {package})", path.display()));
        }
    }
    let runs = |program: &Path, args: &[&str]| {
        Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    };
    if !runs(Path::new("redis-cli"), &["--version"]) {
        return Some("redis-cli is absent".into());
    }
    if !runs(python, &["-c", "import selenium"]) {
        return Some(format!("{} lacks the `selenium` package (`make test-venv` installs it)", python.display()));
    }
    None
}

/// The test Python when everything the browser tests need is here; `None` (the test passes as skipped) when
/// something is missing, which fails instead under INSTRUCTD_REQUIRE_BROWSER=1.
fn browser_python() -> Option<PathBuf> {
    let python = python();
    if let Some(reason) = missing(python.as_deref()) {
        assert!(!required(), "INSTRUCTD_REQUIRE_BROWSER=1 but {reason}");
        eprintln!("SKIPPED: {reason}");
        return None;
    }
    python
}

#[test]
fn playground_page_in_a_browser() {
    let Some(python) = browser_python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    run_script(
        &python,
        "playground_browser.py",
        &[("INSTRUCTD_URL", &gateway.url), ("INSTRUCTD_REDIS_URL", &redis.url())],
    );
}

#[test]
fn arena_and_admin_pages_in_a_browser() {
    let Some(python) = browser_python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let spec = |seed| TinySpec { seed, tie_word_embeddings: false, ..Default::default() };
    let base = tmp.path().join("base");
    init_tiny(&base, &spec(1)).unwrap();
    let store = CheckpointStore::open(&tmp.path().join("checkpoints")).unwrap();
    let candidate = tmp.path().join("candidate");
    init_tiny(&candidate, &spec(2)).unwrap();
    store.import_dir(&candidate, Manifest::new("sft-candidate", None, Stage::Sft)).unwrap();
    // A refresh whose manifest carries labeler quality figures, as the trainer writes them.
    let mut measured = Manifest::new("sft-measured", None, Stage::Sft);
    measured.metrics = serde_json::json!({"data": {"labeler_agreement": 0.7, "labelers_flagged": ["eve"], "labelers": [
        {"labeler_id": "ann", "rankings": 40, "comparisons": 90, "agreement": 0.78,
         "gold_comparisons": 0, "gold_agreement": null, "gold": false, "flagged": false},
        {"labeler_id": "eve", "rankings": 30, "comparisons": 70, "agreement": 0.31,
         "gold_comparisons": 12, "gold_agreement": 0.25, "gold": false, "flagged": true}]}});
    store.import_dir(&candidate, measured).unwrap();
    let gateway = Gateway::start(
        &redis.url(),
        &base,
        &[("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", store.root().to_str().unwrap())],
    );
    let (status, body, _) = gateway.call("POST", "/admin/checkpoints/sft-candidate/load", ADMIN_KEY, None);
    assert_eq!(status, 200, "{body}");
    run_script(
        &python,
        "arena_browser.py",
        &[("INSTRUCTD_URL", &gateway.url), ("INSTRUCTD_ARENA_CANDIDATE", "sft-candidate")],
    );
}
