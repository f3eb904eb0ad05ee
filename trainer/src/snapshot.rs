//! Immutable dataset snapshots built from the store, as the paper prepared
//! its data: prompts with personal data out, prompts sharing a long prefix
//! de-duplicated, at most N prompts per user, users split into train /
//! validation / test (the shared `feedback::split` functions, so the gateway
//! and the trainer agree), and withdrawn users' data dropped.
//!
//! A snapshot is a directory `<data_dir>/snapshots/<id>/` with `sft.jsonl`
//! (demonstrations), `rm.jsonl` (rankings and comparisons as rank groups; tied
//! pairs are dropped by the loss), `prompts.jsonl` (for PPO), `ratings.jsonl`
//! and `manifest.json` (source positions, counts, exclusions, file hashes,
//! labeler quality).
//!
//! One judgment counts per (labeler, prompt, kind): a labeler who ranks or
//! demonstrates the same prompt again replaces their earlier judgment (the
//! latest wins), so one key cannot multiply its weight by resubmitting. Then
//! labeler quality control ([`crate::labeler_quality`]) measures agreement on
//! prompts several labelers ranked and drops or down-weights those below the
//! bar.
//! Its id is a hash of the stream positions it covers and the filters, so
//! building again from the same data gives the same snapshot. It is written
//! to a temporary directory, fsynced and renamed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use feedback::events::{FeedbackEvent, FeedbackPayload, PromptEvent, now_ms};
use feedback::records::Record;
use feedback::split::{Split, SplitConfig, dedupe_key, split_for};
use feedback::streams;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::labeler_quality::{LabelerQcConfig, QcReport};
use crate::store::{DatasetStore, StoreError, StreamId};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// One demonstration: the SFT data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftExample {
    pub prompt: String,
    pub response: String,
    pub user: String,
    pub split: Split,
}

/// One prompt's ranked completions: the reward-model data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedExample {
    pub prompt_id: String,
    pub prompt: String,
    pub completions: Vec<String>,
    /// Rank group of each completion (0 = best; equal = tie).
    pub ranks: Vec<usize>,
    pub labeler_group: feedback::events::LabelerGroup,
    pub split: Split,
    /// Who ranked it (their labeler id: a user id for playground users).
    #[serde(default)]
    pub labeler_id: String,
    /// The ranking's weight in the reward model's loss (1; less for a down-weighted labeler).
    #[serde(default = "unit_weight")]
    pub weight: f32,
}

fn unit_weight() -> f32 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptExample {
    pub prompt_id: String,
    pub prompt: String,
    pub user: String,
    pub split: Split,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exclusions {
    pub personal_data: usize,
    pub duplicate_prefix: usize,
    pub over_user_cap: usize,
    pub withdrawn: usize,
    pub unparseable: usize,
    pub feedback_without_prompt: usize,
    /// Judgments replaced by the same labeler's later one on the same prompt.
    #[serde(default)]
    pub superseded: usize,
    /// Rankings of labelers quality control excluded.
    #[serde(default)]
    pub low_agreement_labeler: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub id: String,
    pub created_at_ms: u64,
    /// The last stream id covered, per stream.
    pub source: BTreeMap<String, String>,
    pub counts: BTreeMap<String, usize>,
    pub excluded: Exclusions,
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub labeler_quality: QcReport,
}

/// The snapshot's content, before it is written.
#[derive(Debug, Default)]
pub struct Dataset {
    pub sft: Vec<SftExample>,
    pub rm: Vec<RankedExample>,
    pub prompts: Vec<PromptExample>,
    pub ratings: Vec<serde_json::Value>,
    pub excluded: Exclusions,
    pub labeler_quality: QcReport,
    /// When the oldest and the newest judgment it holds were made (ms since the epoch; `None` without any).
    pub judgments_oldest_ms: Option<u64>,
    pub judgments_newest_ms: Option<u64>,
}

/// Filters applied when building.
#[derive(Debug, Clone)]
pub struct Filters {
    pub max_prompts_per_user: usize,
    /// Normalised characters two prompts must share to count as duplicates.
    pub dedupe_prefix_chars: usize,
    pub split: SplitConfig,
    pub labeler_qc: LabelerQcConfig,
}

/// Builds the dataset from everything in the store.
pub fn build(store: &DatasetStore, filters: &Filters) -> Result<Dataset, SnapshotError> {
    let mut data = Dataset::default();
    // Withdrawals apply to the user's prompts logged before them.
    let mut prompts: Vec<(StreamId, PromptEvent)> = Vec::new();
    let mut withdrawn_at: HashMap<String, StreamId> = HashMap::new();
    for entry in store.read(streams::PROMPTS)? {
        let id = StreamId::parse(&entry.id).unwrap_or_default();
        match entry.record() {
            Ok(Record::Prompt(p)) => prompts.push((id, p)),
            Ok(Record::Withdrawal(w)) => {
                withdrawn_at.insert(w.user, id);
            }
            Ok(Record::Feedback(_)) | Err(_) => data.excluded.unparseable += 1,
        }
    }
    let mut kept: HashMap<String, PromptEvent> = HashMap::new();
    let mut seen_prefixes = HashSet::new();
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for (id, prompt) in prompts {
        if withdrawn_at.get(&prompt.user).is_some_and(|w| id < *w) {
            data.excluded.withdrawn += 1;
            continue;
        }
        if !prompt.pii.is_empty() {
            data.excluded.personal_data += 1;
            continue;
        }
        if !seen_prefixes.insert(dedupe_key(&prompt.prompt, filters.dedupe_prefix_chars)) {
            data.excluded.duplicate_prefix += 1;
            continue;
        }
        let count = per_user.entry(prompt.user.clone()).or_default();
        if *count >= filters.max_prompts_per_user {
            data.excluded.over_user_cap += 1;
            continue;
        }
        *count += 1;
        let split = split_for(&prompt.user, &filters.split);
        data.prompts.push(PromptExample {
            prompt_id: prompt.prompt_id.clone(),
            prompt: prompt.prompt.clone(),
            user: prompt.user.clone(),
            split,
        });
        kept.insert(prompt.prompt_id.clone(), prompt);
    }
    let mut events = Vec::new();
    for entry in store.read(streams::FEEDBACK)? {
        match entry.record() {
            Ok(Record::Feedback(event)) => events.push(event),
            Ok(Record::Prompt(_) | Record::Withdrawal(_)) | Err(_) => data.excluded.unparseable += 1,
        }
    }
    let before = events.len();
    let events = latest_judgments(events);
    data.excluded.superseded = before - events.len();
    data.judgments_oldest_ms = events.iter().map(|e| e.created_at_ms).min();
    data.judgments_newest_ms = events.iter().map(|e| e.created_at_ms).max();
    for event in events {
        let prompt = event.prompt_id.as_ref().and_then(|id| kept.get(id));
        if event.prompt_id.is_some() && prompt.is_none() {
            data.excluded.feedback_without_prompt += 1;
            continue;
        }
        match (&event.payload, prompt) {
            (FeedbackPayload::Ranking { ranking, .. }, Some(p)) => {
                if let Some(example) = ranked(p, ranking, &event, &filters.split) {
                    data.rm.push(example);
                }
            }
            (FeedbackPayload::Comparison { better, worse, .. }, Some(p)) => {
                let ranking = vec![vec![better.clone()], vec![worse.clone()]];
                if let Some(example) = ranked(p, &ranking, &event, &filters.split) {
                    data.rm.push(example);
                }
            }
            (FeedbackPayload::Demonstration { response, .. }, Some(p)) => data.sft.push(SftExample {
                prompt: p.prompt.clone(),
                response: response.clone(),
                user: p.user.clone(),
                split: split_for(&p.user, &filters.split),
            }),
            (FeedbackPayload::Demonstration { prompt: Some(text), response, .. }, None) => {
                // A labeler-written prompt: split by the labeler.
                data.sft.push(SftExample {
                    prompt: text.clone(),
                    response: response.clone(),
                    user: event.labeler_id.clone(),
                    split: split_for(&event.labeler_id, &filters.split),
                })
            }
            (FeedbackPayload::Rating { generation_id, score, flags, .. }, Some(p)) => data.ratings.push(json!({
                "prompt_id": p.prompt_id, "generation_id": generation_id, "score": score, "flags": flags,
                "labeler_group": event.labeler_group, "split": split_for(&p.user, &filters.split),
            })),
            _ => data.excluded.feedback_without_prompt += 1,
        }
    }
    data.labeler_quality = crate::labeler_quality::assess(&data.rm, &filters.labeler_qc);
    data.excluded.low_agreement_labeler =
        crate::labeler_quality::apply(&mut data.rm, &data.labeler_quality, filters.labeler_qc.action);
    Ok(data)
}

fn ranked(
    p: &PromptEvent,
    ranking: &[Vec<String>],
    event: &FeedbackEvent,
    split: &SplitConfig,
) -> Option<RankedExample> {
    let mut completions = Vec::new();
    let mut ranks = Vec::new();
    for (rank, group) in ranking.iter().enumerate() {
        for id in group {
            let sample = p.samples.iter().find(|s| &s.generation_id == id)?;
            completions.push(sample.text.clone());
            ranks.push(rank);
        }
    }
    // A ranking that is one big tie says nothing.
    if ranks.iter().all(|r| *r == ranks[0]) {
        return None;
    }
    Some(RankedExample {
        prompt_id: p.prompt_id.clone(),
        prompt: p.prompt.clone(),
        completions,
        ranks,
        labeler_group: event.labeler_group,
        split: split_for(&p.user, split),
        labeler_id: event.labeler_id.clone(),
        weight: 1.0,
    })
}

/// What makes two judgments "the same" for [`latest_judgments`]: labeler, prompt and kind (a rating also by the
/// sample it rates, a comparison by its pair). Labeler-written prompts have no prompt id and are all kept.
fn judgment_key(event: &FeedbackEvent) -> Option<(String, String, String)> {
    let prompt = event.prompt_id.clone()?;
    let kind = match &event.payload {
        FeedbackPayload::Ranking { .. } => "ranking".to_string(),
        FeedbackPayload::Comparison { better, worse, .. } => {
            let (a, b) = if better < worse { (better, worse) } else { (worse, better) };
            format!("comparison:{a}:{b}")
        }
        FeedbackPayload::Demonstration { .. } => "demonstration".to_string(),
        FeedbackPayload::Rating { generation_id, .. } => format!("rating:{generation_id}"),
    };
    Some((event.labeler_id.clone(), prompt, kind))
}

/// `events` (in stream order) with each (labeler, prompt, kind) judgment kept only in its latest version.
fn latest_judgments(events: Vec<FeedbackEvent>) -> Vec<FeedbackEvent> {
    let mut last: HashMap<(String, String, String), usize> = HashMap::new();
    for (i, event) in events.iter().enumerate() {
        if let Some(key) = judgment_key(event) {
            last.insert(key, i);
        }
    }
    events
        .into_iter()
        .enumerate()
        .filter(|(i, e)| judgment_key(e).is_none_or(|k| last.get(&k) == Some(i)))
        .map(|(_, e)| e)
        .collect()
}

/// Writes `data` as a snapshot (or finds the identical one) and returns its manifest.
pub fn write(
    store: &DatasetStore,
    data_dir: &Path,
    data: &Dataset,
    filters: &Filters,
) -> Result<SnapshotManifest, SnapshotError> {
    let mut source = BTreeMap::new();
    for stream in [streams::PROMPTS, streams::FEEDBACK] {
        source.insert(stream.to_string(), store.last_id(stream).to_string());
    }
    let identity = json!({"source": source, "max_prompts_per_user": filters.max_prompts_per_user,
        "dedupe_prefix_chars": filters.dedupe_prefix_chars,
        "validation": filters.split.validation, "test": filters.split.test, "labeler_qc": filters.labeler_qc});
    let id = format!("snap-{}", &hex::encode(Sha256::digest(identity.to_string().as_bytes()))[..16]);
    let root = data_dir.join("snapshots");
    let dir = root.join(&id);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { path, source }
    };
    if dir.join("manifest.json").is_file() {
        let text = std::fs::read_to_string(dir.join("manifest.json")).map_err(io(&dir))?;
        if let Ok(manifest) = serde_json::from_str(&text) {
            return Ok(manifest);
        }
    }
    let tmp = root.join(format!(".tmp-{id}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut files = BTreeMap::new();
    let mut counts = BTreeMap::new();
    write_jsonl(&tmp, "sft.jsonl", &data.sft, &mut files, &mut counts)?;
    write_jsonl(&tmp, "rm.jsonl", &data.rm, &mut files, &mut counts)?;
    write_jsonl(&tmp, "prompts.jsonl", &data.prompts, &mut files, &mut counts)?;
    write_jsonl(&tmp, "ratings.jsonl", &data.ratings, &mut files, &mut counts)?;
    let manifest = SnapshotManifest {
        id: id.clone(),
        created_at_ms: now_ms(),
        source,
        counts,
        excluded: data.excluded.clone(),
        files,
        labeler_quality: data.labeler_quality.clone(),
    };
    let path = tmp.join("manifest.json");
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| io(&path)(std::io::Error::other(e)))?;
    write_synced(&path, &text)?;
    sync_dir(&tmp)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    sync_dir(&root)?;
    Ok(manifest)
}

/// Takes a user's data out of every snapshot already written (a consent withdrawal reaches the old ones too):
/// rows whose `user` or `labeler_id` is `user` or whose `prompt_id` is one of `prompt_ids` leave each file, and the
/// manifest's counts and hashes follow. Returns how many rows went.
pub fn forget_user(data_dir: &Path, user: &str, prompt_ids: &[String]) -> Result<usize, SnapshotError> {
    let root = data_dir.join("snapshots");
    let Ok(dirs) = std::fs::read_dir(&root) else { return Ok(0) };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { path, source }
    };
    let prompts: HashSet<&str> = prompt_ids.iter().map(String::as_str).collect();
    let is_theirs = |row: &serde_json::Value| {
        let field = |name: &str| row.get(name).and_then(|v| v.as_str());
        field("user") == Some(user)
            || field("labeler_id") == Some(user)
            || field("prompt_id").is_some_and(|p| prompts.contains(p))
    };
    let mut removed = 0;
    for dir in dirs.flatten().map(|d| d.path()) {
        let manifest_path = dir.join("manifest.json");
        let Ok(text) = std::fs::read_to_string(&manifest_path) else { continue };
        let Ok(mut manifest) = serde_json::from_str::<SnapshotManifest>(&text) else { continue };
        let mut changed = false;
        for name in manifest.files.keys().cloned().collect::<Vec<_>>() {
            let path = dir.join(&name);
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let mut kept = Vec::new();
            let mut rows = 0;
            for line in text.lines() {
                if serde_json::from_str::<serde_json::Value>(line).is_ok_and(|row| is_theirs(&row)) {
                    removed += 1;
                    changed = true;
                    continue;
                }
                kept.extend_from_slice(line.as_bytes());
                kept.push(b'\n');
                rows += 1;
            }
            if kept.len() != text.len() {
                crate::store::write_replacing(&path, &kept).map_err(|e| SnapshotError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                manifest.files.insert(name.clone(), hex::encode(Sha256::digest(&kept)));
                manifest.counts.insert(name.trim_end_matches(".jsonl").to_string(), rows);
            }
        }
        if changed {
            let text = serde_json::to_vec_pretty(&manifest)
                .map_err(|e| SnapshotError::Io { path: manifest_path.clone(), source: std::io::Error::other(e) })?;
            crate::store::write_replacing(&manifest_path, &text).map_err(|e| SnapshotError::Io {
                path: manifest_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
    }
    Ok(removed)
}

fn write_jsonl<T: Serialize>(
    dir: &Path,
    name: &str,
    rows: &[T],
    files: &mut BTreeMap<String, String>,
    counts: &mut BTreeMap<String, usize>,
) -> Result<(), SnapshotError> {
    let mut text = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut text, row)
            .map_err(|e| SnapshotError::Io { path: dir.join(name), source: std::io::Error::other(e) })?;
        text.push(b'\n');
    }
    write_synced(&dir.join(name), &text)?;
    files.insert(name.to_string(), hex::encode(Sha256::digest(&text)));
    counts.insert(name.trim_end_matches(".jsonl").to_string(), rows.len());
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::create(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SnapshotError::Io { path: dir.to_path_buf(), source })
}

#[cfg(test)]
mod tests;
