//! `instructd simulate-labelers` against the real gateway (tiny model) and a
//! private Redis: the simulated people's judgments land in
//! `instructd:feedback`, every ranking ordered by the hidden rule applied to
//! the logged samples, while the rule itself reaches no stream.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::collections::{HashMap, HashSet};
use std::process::Command;

use gateway::{ADMIN_KEY, Gateway, RedisServer, repo_root, tiny_model};
use serde_json::Value;

/// Runs the simulator; returns its JSON summary (the last stdout line).
fn simulate(url: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_instructd"))
        .arg("simulate-labelers")
        .args(["--url", url])
        .args(args)
        .current_dir(repo_root())
        .env("INSTRUCTD_ADMIN_KEY", ADMIN_KEY)
        .output()
        .expect("instructd runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "simulate-labelers failed:\n{stdout}\n{stderr}");
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).expect("a summary line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {line}\n{stderr}"))
}

/// Every entry of `stream`: its fields by name.
fn entries(conn: &mut redis::Connection, stream: &str) -> Vec<HashMap<String, String>> {
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(conn).unwrap();
    raw.into_iter().map(|(_, fields)| fields.chunks(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect()).collect()
}

fn events(conn: &mut redis::Connection, stream: &str, kind: &str) -> Vec<Value> {
    entries(conn, stream)
        .into_iter()
        .filter(|f| f.get("kind").map(String::as_str) == Some(kind))
        .map(|f| serde_json::from_str(&f["event"]).unwrap())
        .collect()
}

/// Whole-word, case-insensitive occurrences of `word` (written independently
/// of the simulator's own scoring).
fn word_count(text: &str, word: &str) -> f64 {
    text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| *w == word).count() as f64
}

fn ids(users: &Value) -> HashSet<String> {
    users.as_array().unwrap().iter().map(|u| u["user"].as_str().unwrap().to_string()).collect()
}

/// Checks what one run left in the streams against its summary and the rule.
/// `strong` says whether a demonstration satisfies the rule strongly.
fn check_run(
    conn: &mut redis::Connection,
    summary: &Value,
    score: impl Fn(&str) -> f64,
    strong: impl Fn(&str) -> bool,
) {
    let n = |field: &str| summary[field].as_u64().unwrap_or_else(|| panic!("summary lacks {field}: {summary}"));
    let users = ids(&summary["users"]);
    let labelers = ids(&summary["labelers"]);
    let group_of: HashMap<&str, &str> = summary["labelers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["user"].as_str().unwrap(), l["labeler_group"].as_str().unwrap()))
        .collect();
    assert_eq!(n("errors"), 0, "{summary}");
    assert_eq!(n("logged"), n("prompts_sent"), "every user consented: {summary}");

    // The run's logged prompts, with their samples' texts.
    let prompts: HashMap<String, Value> = events(conn, "instructd:prompts", "prompt")
        .into_iter()
        .filter(|e| users.contains(e["user"].as_str().unwrap()))
        .map(|e| (e["prompt_id"].as_str().unwrap().to_string(), e))
        .collect();
    assert_eq!(prompts.len() as u64, n("logged"), "{summary}");

    let feedback: Vec<Value> = events(conn, "instructd:feedback", "ranking")
        .into_iter()
        .chain(events(conn, "instructd:feedback", "demonstration"))
        .chain(events(conn, "instructd:feedback", "rating"))
        .filter(|e| e["prompt_id"].as_str().is_some_and(|p| prompts.contains_key(p)))
        .collect();
    let of_type = |t: &str| feedback.iter().filter(|e| e["payload"]["type"] == t).collect::<Vec<_>>();

    let rankings = of_type("ranking");
    assert_eq!(rankings.len() as u64, n("logged"), "one ranking per logged prompt");
    assert_eq!(rankings.len() as u64, n("rankings"));
    let ranked: HashSet<&str> = rankings.iter().map(|e| e["prompt_id"].as_str().unwrap()).collect();
    assert_eq!(ranked.len(), prompts.len(), "every logged prompt ranked once");
    let mut by_labelers = 0;
    for event in &rankings {
        let prompt = &prompts[event["prompt_id"].as_str().unwrap()];
        let texts: HashMap<&str, &str> = prompt["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["generation_id"].as_str().unwrap(), s["text"].as_str().unwrap()))
            .collect();
        let groups: Vec<Vec<&str>> = event["payload"]["ranking"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_array().unwrap().iter().map(|id| id.as_str().unwrap()).collect())
            .collect();
        let listed: HashSet<&str> = groups.iter().flatten().copied().collect();
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 4, "{event}");
        assert_eq!(listed, texts.keys().copied().collect(), "the ranking lists the prompt's 4 samples: {event}");
        let scores: Vec<Vec<f64>> = groups.iter().map(|g| g.iter().map(|id| score(texts[id])).collect()).collect();
        for group in &scores {
            assert!(group.iter().all(|s| *s == group[0]), "a tie group holds equal scores: {scores:?} {event}");
        }
        for pair in scores.windows(2) {
            assert!(pair[0][0] > pair[1][0], "groups are best first, ties merged: {scores:?} {event}");
        }
        let judge = event["labeler_id"].as_str().unwrap();
        if labelers.contains(judge) {
            by_labelers += 1;
            assert_eq!(event["labeler_group"], group_of[judge], "{event}");
        } else {
            assert_eq!(judge, prompt["user"].as_str().unwrap(), "users rank their own prompts");
        }
    }
    assert_eq!(by_labelers, n("rankings_by_labelers"), "{summary}");
    if !labelers.is_empty() {
        assert!(by_labelers > 0, "labelers took prompts from the queue: {summary}");
    }

    let demonstrations = of_type("demonstration");
    assert!(!demonstrations.is_empty(), "demonstrations were written");
    assert_eq!(demonstrations.len() as u64, n("demonstrations"));
    for event in &demonstrations {
        let response = event["payload"]["response"].as_str().unwrap();
        assert!(strong(response), "a demonstration satisfies the rule strongly: {event}");
    }
    assert_eq!(of_type("rating").len() as u64, n("ratings"));
}

#[test]
fn simulated_users_and_labelers_judge_by_a_hidden_rule() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&redis.url(), &tiny_model(tmp.path()), &[]);
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();

    let common = ["--prompts", "6", "--k", "4", "--max-tokens", "8"];
    let contains = ["--users", "3", "--labelers", "1", "--preference", "contains:the", "--seed", "1"];
    let summary = simulate(&gateway.url, &[&common[..], &contains].concat());
    assert_eq!(summary["prompts_sent"], 6, "{summary}");
    assert_eq!(summary["users"].as_array().unwrap().len(), 3);
    assert_eq!(summary["labelers"][0]["labeler_group"], "training");
    check_run(&mut conn, &summary, |text| word_count(text, "the"), |demo| word_count(demo, "the") >= 3.0);

    // A rule that separates the tiny model's samples (lengths differ), with a held-out labeler.
    let shorter = ["--users", "2", "--labelers", "2", "--preference", "shorter", "--seed", "2"];
    let summary = simulate(&gateway.url, &[&common[..], &shorter].concat());
    assert_eq!(summary["labelers"][1]["labeler_group"], "held_out", "{summary}");
    check_run(&mut conn, &summary, |text| -(text.trim().chars().count() as f64), |demo| demo.chars().count() <= 8);

    // The gateway never heard the rules: no stream entry mentions them.
    for stream in ["instructd:prompts", "instructd:feedback", "instructd:audit"] {
        for fields in entries(&mut conn, stream) {
            for value in fields.values() {
                assert!(!value.contains("contains:the") && !value.contains("shorter"), "{stream}: {value}");
            }
        }
    }
}
