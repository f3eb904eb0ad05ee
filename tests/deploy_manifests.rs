//! `deploy/` checked offline, no cluster: every Kubernetes overlay rendered
//! and validated against the Kubernetes schemas and its own references
//! (`deploy/validate_manifests.py`), the systemd units through
//! `systemd-analyze verify` where it exists, and the container image's
//! Dockerfile against what the rest of the repository provides.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

// Each test binary uses only part of the shared helpers.
#[allow(dead_code, unused_imports)]
#[path = "support/gateway.rs"]
mod gateway;

use gateway::{python_with, repo_root};

fn python_with_validator() -> Option<PathBuf> {
    python_with("kubernetes_validate, yaml", "kubernetes-validate")
}

#[test]
fn kubernetes_overlays_render_and_validate_offline() {
    let Some(python) = python_with_validator() else { return };
    let out = Command::new(python).arg(repo_root().join("deploy/validate_manifests.py")).output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("overlays/cpu") && stdout.contains("overlays/gpu"), "both overlays checked");
    assert!(stdout.contains("trainer-job/launch"), "the trainer job's templates checked");
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("SKIPPED: no systemd-analyze on this machine");
        return;
    }
    // `verify` insists that every ExecStart binary exists: point them at this build's binary and the local Redis.
    let redis = which("redis-server").unwrap_or_else(|| PathBuf::from("/bin/true"));
    let units = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("deploy/systemd")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(".service") || name.ends_with(".target")) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())
            .unwrap()
            .replace("/usr/local/bin/instructd", env!("CARGO_BIN_EXE_instructd"))
            .replace("/usr/bin/redis-server", redis.to_str().unwrap());
        std::fs::write(units.path().join(&name), text).unwrap();
        names.push(name);
    }
    names.sort();
    assert_eq!(
        names,
        ["instructd-gateway.service", "instructd-redis.service", "instructd-trainer.service", "instructd.target"]
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(names.iter().map(|n| units.path().join(n)))
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings (exit status 0): any line about our units is a failure.
    let ours: Vec<&str> = stderr.lines().filter(|l| names.iter().any(|n| l.contains(n.as_str()))).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{stderr}");
    for name in names.iter().filter(|n| n.ends_with(".service")) {
        let text = std::fs::read_to_string(units.path().join(name)).unwrap();
        for hardening in ["ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure", "CapabilityBoundingSet="]
        {
            assert!(text.contains(hardening), "{name} lacks {hardening}");
        }
        assert!(text.contains("DynamicUser=yes") || text.contains("User=instructd"), "{name} runs as a service user");
    }
}

#[test]
fn the_dockerfile_builds_the_release_binary_as_a_non_root_user_with_assets_baked_in() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("deploy/container/Dockerfile")).unwrap();
    let instructions: Vec<(String, String)> = logical_lines(&dockerfile)
        .into_iter()
        .filter_map(|line| line.split_once(' ').map(|(op, rest)| (op.to_ascii_uppercase(), rest.trim().to_string())))
        .collect();
    let known = ["FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD"];
    for (op, _) in &instructions {
        assert!(known.contains(&op.as_str()), "unknown Dockerfile instruction {op}");
    }
    let stages: Vec<&str> = instructions.iter().filter(|(op, _)| op == "FROM").map(|(_, rest)| rest.as_str()).collect();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    let runs: String = instructions.iter().filter(|(op, _)| op == "RUN").map(|(_, r)| r.as_str()).collect();
    assert!(runs.contains("cargo build --release --locked --bin instructd"), "the release profile");
    assert!(runs.contains("${FEATURES:+--features ${FEATURES}}"), "the cuda feature through FEATURES");
    assert!(runs.contains("model fetch-default") && runs.contains("model fetch-corpus"), "assets at build time");
    assert!(instructions.iter().any(|(op, rest)| op == "ARG" && rest.starts_with("FEATURES")));
    let user = instructions.iter().rev().find(|(op, _)| op == "USER").map(|(_, u)| u.as_str());
    assert!(user.is_some_and(|u| !u.starts_with("root") && !u.starts_with("0")), "runs as a non-root user: {user:?}");
    // The last stage never downloads anything at start: its command is the binary itself.
    let last_from = instructions.iter().rposition(|(op, _)| op == "FROM").unwrap();
    assert!(!instructions[last_from..].iter().any(|(op, r)| op == "RUN" && r.contains("fetch")));
    // What the image copies from the build context exists and is not excluded by .dockerignore.
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for (_, rest) in instructions.iter().filter(|(op, rest)| op == "COPY" && !rest.starts_with("--from")) {
        let source = rest.split_whitespace().next().unwrap();
        if source != "." {
            assert!(root.join(source).exists(), "COPY {source}: not in the repository");
            assert!(
                !ignored.iter().any(|i| i.trim_end_matches('/') == source),
                "COPY {source}: excluded by .dockerignore"
            );
        }
    }
    for needed in ["target/", "models/", ".cache/", ".git/"] {
        assert!(ignored.contains(&needed), ".dockerignore keeps {needed} out of the build context");
    }
}

/// The Dockerfile's instructions, continuation lines joined, comments and blank lines dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    lines.push(std::mem::take(&mut current));
                }
                current.clear();
            }
        }
    }
    lines
}

fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|p| p.join(binary)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|p| Path::new(p).is_file())
}
