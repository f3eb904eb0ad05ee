//! Starts the real `instructd serve` and `instructd train` binaries for
//! end-to-end tests, against a private `redis-server`, and runs the Python
//! scripts under `tests/e2e/`
//! (which drive it with the unmodified `openai` client) against it.
//! Each test binary uses a different part of it (hence `allow(dead_code)` where it is included).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub use feedback::redis_server::RedisServer;

pub const ADMIN_KEY: &str = "sk-test-admin-0123456789abcdef0123456789";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a reward model on the tiny policy `policy` (its head seeded by `seed`) into `store` as checkpoint `id`,
/// the way the trainer publishes one (the gateway loads the newest at start-up, or when it is announced).
pub fn publish_reward_model(
    store: &inference::checkpoint::CheckpointStore,
    policy: &Path,
    scratch: &Path,
    id: &str,
    seed: u64,
) {
    use inference::checkpoint::{Manifest, Stage};
    let dir = scratch.join(format!("src-{id}"));
    let model = trainer::reward_model::RewardModel::from_policy(policy, &inference::load::default_device(), seed, 4096)
        .expect("a reward model");
    model.save(&dir).expect("reward model saved");
    store.import_dir(&dir, Manifest::new(id, None, Stage::RewardModel)).expect("checkpoint imported");
}

/// A tiny random-weight model written by `instructd model init-tiny`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    let status = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .args(["model", "init-tiny", out.to_str().unwrap(), "--seed", "7"])
        .stdout(Stdio::null())
        .status()
        .expect("instructd runs");
    assert!(status.success(), "init-tiny failed");
    out
}

/// Starts `instructd train` on the default config against `redis_url`, keeping its data in `data_dir` and its
/// metrics on a free port; `env` adds or overrides settings (the model, batch sizes, hyperparameters).
/// A child process killed when the test ends, passed or not (a failed assertion must leave nothing running).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_trainer(redis_url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_instructd"))
        .arg("train")
        .current_dir(repo_root())
        .env("INSTRUCTD_CONFIG", repo_root().join("configs/default.toml"))
        .env("INSTRUCTD_REDIS_URL", redis_url)
        .env("INSTRUCTD__TRAINER__DATA_DIR", data_dir)
        .env("INSTRUCTD__TRAINER__METRICS_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .expect("instructd train starts")
}

pub struct Gateway {
    child: Child,
    pub url: String,
    /// This gateway's own spill and checkpoint directories (removed on drop).
    _scratch: tempfile::TempDir,
}

/// A blocking HTTP client with a generous timeout (a test never waits forever on a broken gateway).
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().expect("an HTTP client")
}

impl Gateway {
    /// Sends `method path` with `key` as the bearer and `body` as JSON; returns the status, the parsed body (Null
    /// when it is not JSON) and the headers.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut request = http().request(method, format!("{}{path}", self.url)).bearer_auth(key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().expect("the gateway answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null), headers)
    }

    /// Starts a gateway on a free port; `env` adds or overrides settings.
    pub fn start(redis_url: &str, model: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_instructd"));
        // Files a gateway writes stay in its own scratch directory, never the
        // repository's; `env` may still point them elsewhere.
        let scratch = tempfile::tempdir().expect("scratch directory");
        command
            .arg("serve")
            .current_dir(repo_root())
            .env("INSTRUCTD__GATEWAY__PLAYGROUND__SPILL_DIR", scratch.path().join("spill"))
            .env("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", scratch.path().join("checkpoints"))
            .env("INSTRUCTD_CONFIG", repo_root().join("configs/default.toml"))
            .env("INSTRUCTD_ADDR", "127.0.0.1:0")
            .env("INSTRUCTD_REDIS_URL", redis_url)
            .env("INSTRUCTD_MODEL", model)
            .env("INSTRUCTD_ADMIN_KEY", ADMIN_KEY)
            .env("INSTRUCTD__ENGINE__COMPUTE_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("instructd serve starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("instructd gateway listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("the gateway did not report its address within 180 s");
            }
        };
        Self { child, url, _scratch: scratch }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().expect("gateway exits")
    }

    /// Sends SIGTERM and waits for a graceful exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("gateway exits")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python with the `openai` package: `INSTRUCTD_TEST_PYTHON` (the venv
/// `make test` builds), else `python3`. `None` when it lacks the package.
pub fn python() -> Option<PathBuf> {
    python_with("openai, httpx", "the `openai` package")
}

/// `INSTRUCTD_TEST_PYTHON` (the venv `make test` builds), else `python3`, when it imports `modules` (a Python
/// import list); `None` (the test skips) when `python3` lacks them, a failure when the test venv does.
pub fn python_with(modules: &str, what: &str) -> Option<PathBuf> {
    let required = std::env::var_os("INSTRUCTD_TEST_PYTHON").is_some();
    python_importing("INSTRUCTD_TEST_PYTHON", required, modules, &format!("{what} (tests/e2e/requirements.txt)"))
}

/// The Python `$var` names (else `python3`) when it imports `modules`; otherwise `None` (the test skips), or a
/// failure naming what it lacks (`what`) when `required` (`make test` provides it).
pub fn python_importing(var: &str, required: bool, modules: &str, what: &str) -> Option<PathBuf> {
    let python = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    assert!(!required, "{var}={} lacks {what}", python.display());
    eprintln!("SKIPPED: no Python with {what} (set {var}); `make test` installs it");
    None
}

/// Runs `tests/e2e/<script>` with the gateway's address in the environment;
/// panics with its output when it fails.
pub fn run_script(python: &Path, script: &str, env: &[(&str, &str)]) {
    let mut command = Command::new(python);
    command.arg(repo_root().join("tests/e2e").join(script)).env("INSTRUCTD_ADMIN_KEY", ADMIN_KEY);
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
}
