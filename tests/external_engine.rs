//! The gateway in front of an external engine: llama.cpp's `llama-server`
//! (built by `scripts/build-llama-server.sh` from the llama.cpp sources the
//! llama-cpp-python sdist vendors) serving the tiny model, exported to GGUF by
//! `instructd model export-gguf`, and `instructd serve` with
//! `[engine] kind = "openai_http"` in front of it. `tests/e2e/external_engine.py`
//! drives it with the openai SDK (see its docstring for what it checks).
//!
//! Skipped with a message when llama-server is not built, unless
//! INSTRUCTD_REQUIRE_LLAMA_SERVER is set (`make test` sets it and builds it).

#[path = "support/gateway.rs"]
#[allow(dead_code, unused_imports)]
mod gateway;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway::{Gateway, KillOnDrop, RedisServer, python, repo_root, run_script};

/// The llama-server binary: `LLAMA_SERVER`, else the build script's cache.
fn llama_server() -> Option<PathBuf> {
    let path = std::env::var_os("LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/llama-server/0.3.16/bin/llama-server"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("INSTRUCTD_REQUIRE_LLAMA_SERVER").is_none(),
        "INSTRUCTD_REQUIRE_LLAMA_SERVER is set but {} is missing (bash scripts/build-llama-server.sh builds it)",
        path.display()
    );
    eprintln!("SKIPPED: no llama-server at {}; `bash scripts/build-llama-server.sh` builds it", path.display());
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn export_gguf(model: &Path, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .args(["model", "export-gguf"])
        .arg(model)
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .expect("instructd runs");
    assert!(status.success(), "export-gguf failed");
}

/// Starts llama-server on `gguf` and waits until `/health` answers 200 (the model is loaded).
fn start_llama_server(binary: &Path, gguf: &Path, port: u16) -> KillOnDrop {
    let child = Command::new(binary)
        .arg("-m")
        .arg(gguf)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--threads", "1", "--parallel", "4"])
        .args(["--ctx-size", "2048", "--no-webui"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server starts");
    let server = KillOnDrop(child);
    let started = Instant::now();
    let health = format!("http://127.0.0.1:{port}/health");
    while gateway::http().get(&health).send().map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(started.elapsed() < Duration::from_secs(60), "llama-server did not become healthy within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

#[test]
fn the_gateway_serves_through_llama_server() {
    let Some(binary) = llama_server() else { return };
    let Some(python) = python() else { return };
    let scratch = tempfile::tempdir().expect("scratch");
    // Wider than `tiny_model` (8 layers of 512): llama-server then takes ~1 s for the long answer the kill lands
    // in, instead of a few milliseconds. Still random weights, 32 MB.
    let model = scratch.path().join("tiny-wide");
    let status = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .args(["model", "init-tiny", "--seed", "7", "--layers", "8", "--hidden", "512"])
        .arg(&model)
        .stdout(Stdio::null())
        .status()
        .expect("instructd runs");
    assert!(status.success(), "init-tiny failed");
    let gguf = scratch.path().join("tiny.gguf");
    export_gguf(&model, &gguf);
    let port = free_port();
    let upstream = start_llama_server(&binary, &gguf, port);
    let redis = RedisServer::start().expect("redis-server runs (make test installs it)");
    let upstreams = format!("[\"http://127.0.0.1:{port}\"]");
    let gateway = Gateway::start(
        &redis.url(),
        &model,
        &[
            ("INSTRUCTD__ENGINE__KIND", "openai_http"),
            ("INSTRUCTD__ENGINE__OPENAI_HTTP__UPSTREAMS", &upstreams),
            ("INSTRUCTD__ENGINE__OPENAI_HTTP__HEALTH_INTERVAL_SECS", "1"),
        ],
    );
    let pid = upstream.0.id().to_string();
    run_script(
        &python,
        "external_engine.py",
        &[
            ("INSTRUCTD_URL", &gateway.url),
            ("INSTRUCTD_REDIS_URL", &redis.url()),
            ("EXPECT_CHECKPOINT", "tiny-wide"),
            ("UPSTREAM_PID", &pid),
            // A long greedy answer (the model's whole context), so the kill lands while it streams.
            ("LONG_TOKENS", "480"),
        ],
    );
    drop(upstream);
}
