//! The trainer's record of what it did, for people and dashboards: every
//! event as one JSON line in `<data_dir>/training.jsonl` (append-only, one
//! `write` per line so a crash never leaves half a record behind a good one),
//! and the same numbers as Prometheus metrics (`instructd train` serves them
//! on `[trainer] metrics_addr`).
//!
//! Events: `snapshot`, `stage_started`, `stage_finished`, `stage_failed`,
//! `ppo_iteration`, `evaluation`. Each carries `ts_ms` and its own fields.

use std::io::Write;
use std::path::{Path, PathBuf};

use metrics::{counter, gauge};
use serde_json::{Value, json};

use crate::evaluation::Evaluation;
use crate::ppo::PpoIteration;

pub const JOURNAL_FILE: &str = "training.jsonl";

pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(data_dir: &Path) -> Self {
        Self { path: data_dir.join(JOURNAL_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `{"ts_ms", "event", ...fields}`. A journal that cannot be written is logged, never fatal:
    /// training goes on.
    pub fn record(&self, event: &str, fields: Value) {
        let mut line = json!({"ts_ms": feedback::events::now_ms(), "event": event});
        if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(&bytes));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "training journal not written");
        }
    }

    pub fn snapshot(&self, id: &str, counts: &std::collections::BTreeMap<String, usize>) {
        for (kind, n) in counts {
            gauge!("instructd_trainer_snapshot_examples", "kind" => kind.clone()).set(*n as f64);
        }
        counter!("instructd_trainer_snapshots_total").increment(1);
        self.record("snapshot", json!({"snapshot": id, "counts": counts}));
    }

    pub fn stage_started(&self, stage: &str, checkpoint: &str) {
        gauge!("instructd_trainer_stage_running", "stage" => stage.to_string()).set(1.0);
        self.record("stage_started", json!({"stage": stage, "checkpoint": checkpoint}));
    }

    pub fn stage_finished(&self, stage: &str, checkpoint: &str, wall_secs: f64, metrics: &Value, offered: bool) {
        gauge!("instructd_trainer_stage_running", "stage" => stage.to_string()).set(0.0);
        gauge!("instructd_trainer_stage_seconds", "stage" => stage.to_string()).set(wall_secs);
        counter!("instructd_trainer_refreshes_total", "stage" => stage.to_string(), "outcome" => "published")
            .increment(1);
        let numbers =
            [("val_loss", "instructd_trainer_sft_val_loss"), ("val_accuracy", "instructd_trainer_rm_val_accuracy")];
        for (field, name) in numbers {
            if let Some(v) = metrics.get(field).and_then(Value::as_f64) {
                gauge!(name).set(v);
            }
        }
        // Staleness and labeler agreement of the data the stage learned from (`data` in the manifest).
        let data = metrics.get("data").unwrap_or(&Value::Null);
        let data_numbers = [
            ("newest_judgment_age_secs", "instructd_trainer_feedback_age_seconds"),
            ("labeler_agreement", "instructd_trainer_labeler_agreement"),
        ];
        for (field, name) in data_numbers {
            if let Some(v) = data.get(field).and_then(Value::as_f64) {
                gauge!(name, "stage" => stage.to_string()).set(v);
            }
        }
        if let Some(flagged) = data.get("labelers_flagged").and_then(Value::as_array) {
            gauge!("instructd_trainer_labelers_flagged").set(flagged.len() as f64);
        }
        self.record(
            "stage_finished",
            json!({"stage": stage, "checkpoint": checkpoint, "wall_secs": wall_secs, "offered": offered,
                   "metrics": metrics}),
        );
    }

    pub fn stage_failed(&self, stage: &str, checkpoint: &str, error: &str) {
        gauge!("instructd_trainer_stage_running", "stage" => stage.to_string()).set(0.0);
        counter!("instructd_trainer_refreshes_total", "stage" => stage.to_string(), "outcome" => "failed").increment(1);
        self.record("stage_failed", json!({"stage": stage, "checkpoint": checkpoint, "error": error}));
    }

    pub fn ppo_iteration(&self, checkpoint: &str, it: &PpoIteration) {
        gauge!("instructd_trainer_ppo_iteration").set(it.iteration as f64);
        gauge!("instructd_trainer_ppo_reward").set(f64::from(it.reward_mean));
        gauge!("instructd_trainer_ppo_kl").set(f64::from(it.kl));
        gauge!("instructd_trainer_ppo_entropy").set(f64::from(it.entropy));
        gauge!("instructd_trainer_ppo_clip_fraction").set(f64::from(it.clip_fraction));
        gauge!("instructd_trainer_ppo_value_loss").set(f64::from(it.value_loss));
        if let Some(ptx) = it.ptx_loss {
            gauge!("instructd_trainer_ppo_ptx_loss").set(f64::from(ptx));
        }
        counter!("instructd_trainer_ppo_iterations_total").increment(1);
        self.record("ppo_iteration", json!({"checkpoint": checkpoint, "iteration": it}));
    }

    pub fn evaluation(&self, checkpoint: &str, evaluation: &Evaluation) {
        gauge!("instructd_trainer_eval_win_rate").set(evaluation.win_rate);
        gauge!("instructd_trainer_eval_win_rate_lower").set(evaluation.win_rate_lower);
        gauge!("instructd_trainer_eval_win_rate_upper").set(evaluation.win_rate_upper);
        gauge!("instructd_trainer_eval_prompts").set(evaluation.prompts as f64);
        gauge!("instructd_trainer_eval_candidate_reward").set(evaluation.candidate_reward);
        gauge!("instructd_trainer_eval_kl_from_sft").set(evaluation.kl_from_sft);
        if let Some(tax) = evaluation.alignment_tax {
            gauge!("instructd_trainer_eval_alignment_tax").set(tax);
        }
        gauge!("instructd_trainer_eval_passed").set(if evaluation.passed { 1.0 } else { 0.0 });
        self.record("evaluation", json!({"checkpoint": checkpoint, "evaluation": evaluation}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_is_one_json_line() {
        let tmp = tempfile::tempdir().unwrap();
        let journal = Journal::new(tmp.path());
        journal.stage_started("sft", "sft-1");
        journal.stage_finished("sft", "sft-1", 2.5, &json!({"val_loss": 1.0}), true);
        journal.stage_failed("ppo_ptx", "ppo-2", "no prompts");
        let text = std::fs::read_to_string(journal.path()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["event"], "stage_started");
        assert_eq!(lines[1]["metrics"]["val_loss"], 1.0);
        assert_eq!(lines[2]["error"], "no prompts");
        assert!(lines.iter().all(|l| l["ts_ms"].as_u64().is_some()));
    }
}
