//! End-to-end tests of the `instructd` binary: the commands an operator runs.

#[path = "support/real_model.rs"]
mod support;

use std::process::{Command, Output};

use support::real_model_dir;

fn instructd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_instructd")).args(args).output().expect("instructd runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn generate_answers_paris_with_the_default_model() {
    let model = real_model_dir();
    let out = instructd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--max-tokens",
        "24",
        "What is the capital of France?",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Paris"), "stdout: {}", text(&out.stdout));
}

#[test]
fn init_tiny_then_generate_and_bench() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let out = instructd(&["model", "init-tiny", dir.to_str().unwrap(), "--seed", "3"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let out = instructd(&["generate", "--model", dir.to_str().unwrap(), "--max-tokens", "8", "hello"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let out = instructd(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--concurrency",
        "1,2",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("| decode 2 concurrent x 4 tokens |"), "{stdout}");
    let json = stdout.lines().last().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(json).unwrap();
    // Prefill, two decode rows, and the prefix cache's uncached / cached pair (its prefix cut to the tiny context).
    let rows = parsed["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{json}");
    assert!(stdout.contains("prefix cached ("), "{stdout}");
}

#[test]
fn bad_model_directories_fail_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = instructd(&["generate", "--model", tmp.path().to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("config.json"), "stderr: {}", text(&out.stderr));

    let dir = tmp.path().join("tiny");
    assert!(instructd(&["model", "init-tiny", dir.to_str().unwrap()]).status.success());
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    let out = instructd(&["generate", "--model", dir.to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("model.safetensors"), "stderr: {}", text(&out.stderr));

    let out = instructd(&["model", "import-gguf", tmp.path().join("nope.gguf").to_str().unwrap(), "out"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nope.gguf"), "stderr: {}", text(&out.stderr));
}
