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
#[path = "support/llama_server.rs"]
mod llama_server;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway::{Gateway, KillOnDrop, RedisServer, python, run_script};
use llama_server::llama_server;

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

/// A private CA and a server certificate for 127.0.0.1 it signed (openssl), in `dir`: `ca.pem`, and `server.pem`
/// (certificate then key, as HAProxy takes them).
fn private_ca(dir: &Path) {
    let openssl = |args: &[&str]| {
        let status =
            Command::new("openssl").args(args).current_dir(dir).stderr(Stdio::null()).status().expect("openssl runs");
        assert!(status.success(), "openssl {args:?} failed");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=instructd test CA"],
        ]
        .concat(),
    );
    openssl(&[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    let bundle =
        [std::fs::read(dir.join("server.crt")).unwrap(), std::fs::read(dir.join("server.key")).unwrap()].concat();
    std::fs::write(dir.join("server.pem"), bundle).unwrap();
}

/// HAProxy terminating TLS on `port` (the certificate in `dir/server.pem`) in front of `upstream_port`.
fn start_tls_proxy(dir: &Path, port: u16, upstream_port: u16) -> KillOnDrop {
    let config = format!(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\
         frontend tls\n  bind 127.0.0.1:{port} ssl crt {}\n  default_backend llama\n\
         backend llama\n  server s 127.0.0.1:{upstream_port}\n",
        dir.join("server.pem").display()
    );
    std::fs::write(dir.join("haproxy.cfg"), config).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(dir.join("haproxy.cfg"))
        .stdout(Stdio::null())
        .spawn()
        .expect("haproxy runs");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "haproxy did not listen within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    KillOnDrop(child)
}

/// The first upstream's health as `/readyz` reports it, once the first probe ran: (healthy, last_error).
fn upstream_health(gateway: &Gateway) -> (bool, String) {
    let started = Instant::now();
    loop {
        let (_, ready, _) = gateway.call("GET", "/readyz", "", None);
        let upstream = &ready["engine"]["upstreams"][0];
        let probed = upstream["last_probe_ms"].is_number() || upstream["last_error"].is_string();
        if probed || started.elapsed() > Duration::from_secs(30) {
            return (upstream["healthy"] == true, upstream["last_error"].as_str().unwrap_or_default().to_string());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An `https://` upstream (llama-server behind HAProxy terminating TLS with a private CA's certificate): the gateway
/// verifies the certificate, so without `ca_file` the upstream fails its health probe and requests are refused;
/// with the CA in `ca_file` a chat completion goes through.
#[test]
fn the_gateway_verifies_an_https_upstream() {
    let Some(binary) = llama_server() else { return };
    if Command::new("haproxy").arg("-v").stdout(Stdio::null()).status().is_err() {
        assert!(
            std::env::var_os("INSTRUCTD_REQUIRE_FLEET").is_none(),
            "INSTRUCTD_REQUIRE_FLEET is set but haproxy is missing"
        );
        eprintln!("SKIPPED: no haproxy (make test installs it)");
        return;
    }
    let scratch = tempfile::tempdir().expect("scratch");
    let model = gateway::tiny_model(&scratch.path().join("tiny"));
    let gguf = scratch.path().join("tiny.gguf");
    export_gguf(&model, &gguf);
    let port = free_port();
    let _upstream = start_llama_server(&binary, &gguf, port);
    private_ca(scratch.path());
    let tls_port = free_port();
    let _proxy = start_tls_proxy(scratch.path(), tls_port, port);
    let redis = RedisServer::start().expect("redis-server runs (make test installs it)");
    let upstreams = format!("[\"https://127.0.0.1:{tls_port}\"]");
    let settings = [
        ("INSTRUCTD__ENGINE__KIND", "openai_http"),
        ("INSTRUCTD__ENGINE__OPENAI_HTTP__UPSTREAMS", upstreams.as_str()),
        ("INSTRUCTD__ENGINE__OPENAI_HTTP__HEALTH_INTERVAL_SECS", "1"),
    ];

    let untrusting = Gateway::start(&redis.url(), &model, &settings);
    let (healthy, error) = upstream_health(&untrusting);
    assert!(!healthy, "an upstream whose certificate no trusted root signed must not pass its probe");
    assert!(error.to_lowercase().contains("certificate"), "the probe's error names the certificate: {error}");
    drop(untrusting);

    let ca = scratch.path().join("ca.pem");
    let trusting = Gateway::start(
        &redis.url(),
        &model,
        &[&settings[..], &[("INSTRUCTD__ENGINE__OPENAI_HTTP__CA_FILE", ca.to_str().unwrap())]].concat(),
    );
    let (healthy, error) = upstream_health(&trusting);
    assert!(healthy, "the upstream is healthy with its CA in ca_file: {error}");
    let (status, key, _) = trusting.call(
        "POST",
        "/admin/keys",
        gateway::ADMIN_KEY,
        Some(&serde_json::json!({"user": "tls", "scopes": ["completions"]})),
    );
    assert_eq!(status, 201, "{key}");
    let secret = key["secret"].as_str().expect("a secret");
    let (_, models, _) = trusting.call("GET", "/v1/models", secret, None);
    let body = serde_json::json!({
        "model": models["data"][0]["id"],
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let (status, answer, _) = trusting.call("POST", "/v1/chat/completions", secret, Some(&body));
    assert_eq!(status, 200, "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) >= 1, "{answer}");
}
