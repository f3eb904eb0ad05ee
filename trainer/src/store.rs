//! The trainer's durable dataset store: one append-only JSON-lines file per
//! stream (`<data_dir>/store/<stream>.jsonl`), each line an entry's stream id
//! and fields. A batch is written and fsynced *before* its entries are
//! acknowledged in Redis, so an acknowledged entry is always on disk.
//!
//! Exactly once: the store keeps the set of ids it holds per stream and skips
//! an entry it already has, whatever its position: entries claimed from
//! another consumer (a second trainer, a renamed consumer) may be older than
//! the newest stored one and are kept, not dropped. Reads return entries in
//! stream-id order. A torn last line (a crash mid-write) is cut off when the
//! store opens; that entry was never acknowledged and comes back from Redis.
//! A complete line that does not parse (a disk fault, a hand edit) is skipped
//! with a warning and counted, so one bad line cannot keep the trainer from
//! starting.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use feedback::records::{Record, RecordError};
use feedback::streams;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A Redis stream id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self { ms: ms.parse().ok()?, seq: seq.parse().ok()? })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One stored stream entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEntry {
    pub stream: String,
    pub id: String,
    pub fields: HashMap<String, String>,
}

impl StoredEntry {
    /// The typed record the entry holds (the one reader of stream fields, shared with the gateway's writer).
    pub fn record(&self) -> Result<Record, RecordError> {
        Record::from_fields(&self.stream, &self.fields)
    }
}

pub struct DatasetStore {
    dir: PathBuf,
    files: HashMap<String, File>,
    last: HashMap<String, StreamId>,
    ids: HashMap<String, HashSet<StreamId>>,
    /// Complete lines that did not parse, per stream file (skipped).
    corrupt: usize,
    /// Consent withdrawals applied so far (persisted in `withdrawn.json`): whatever of these users' data arrives
    /// late (an entry claimed from another consumer, a redelivery) is not stored.
    withdrawn: Withdrawn,
}

/// Users who withdrew consent (with when) and the prompt ids of theirs that were forgotten.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Withdrawn {
    users: HashMap<String, u64>,
    prompts: HashSet<String>,
}

impl Withdrawn {
    /// Whether `record` is the data of a user who withdrew after it was made (their prompts, their judgments,
    /// anyone's judgments of their prompts). Withdrawal records themselves are kept: they are the tombstones.
    fn covers(&self, record: &Record) -> bool {
        let before = |user: &str, at: u64| self.users.get(user).is_some_and(|w| at <= *w);
        match record {
            Record::Prompt(p) => before(&p.user, p.created_at_ms) || self.prompts.contains(&p.prompt_id),
            Record::Feedback(f) => {
                before(&f.labeler_id, f.created_at_ms) || f.prompt_id.as_ref().is_some_and(|p| self.prompts.contains(p))
            }
            Record::Withdrawal(_) => false,
        }
    }
}

impl DatasetStore {
    /// Opens (creating) the store and recovers each stream file's last id.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("store");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        let withdrawn_path = dir.join(WITHDRAWN_FILE);
        let withdrawn = match std::fs::read(&withdrawn_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Io { path: withdrawn_path.clone(), source: std::io::Error::other(e) })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Withdrawn::default(),
            Err(source) => return Err(StoreError::Io { path: withdrawn_path, source }),
        };
        let mut store =
            Self { dir, files: HashMap::new(), last: HashMap::new(), ids: HashMap::new(), corrupt: 0, withdrawn };
        let entries =
            std::fs::read_dir(&store.dir).map_err(|source| StoreError::Io { path: store.dir.clone(), source })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "jsonl") {
                store.recover(&path)?;
            }
        }
        Ok(store)
    }

    fn file_path(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{}.jsonl", stream.replace([':', '/'], "_")))
    }

    /// Reads a stream file, truncating a torn tail, and remembers its last id.
    fn recover(&mut self, path: &Path) -> Result<(), StoreError> {
        let io = |source| StoreError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let mut reader = BufReader::new(file);
        let mut good_len = 0u64;
        let mut line = String::new();
        let mut number = 0;
        let mut stream = None;
        let mut last = StreamId::default();
        let mut ids = HashSet::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line).map_err(io)?;
            if read == 0 {
                break;
            }
            number += 1;
            if !line.ends_with('\n') {
                tracing::warn!(path = %path.display(), "cutting off a torn last line (it was never acknowledged)");
                break;
            }
            good_len += read as u64;
            let entry: StoredEntry = match serde_json::from_str(&line) {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = number, error = %e, "skipping a corrupt store line");
                    self.corrupt += 1;
                    continue;
                }
            };
            if let Some(id) = StreamId::parse(&entry.id) {
                last = last.max(id);
                ids.insert(id);
            }
            stream = Some(entry.stream);
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        if file.metadata().map_err(io)?.len() != good_len {
            file.set_len(good_len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        if let Some(stream) = stream {
            self.last.insert(stream.clone(), last);
            self.ids.insert(stream.clone(), ids);
            self.files.insert(stream, file);
        }
        Ok(())
    }

    /// The newest entry id stored for `stream`.
    pub fn last_id(&self, stream: &str) -> StreamId {
        self.last.get(stream).copied().unwrap_or_default()
    }

    pub fn count(&self, stream: &str) -> usize {
        self.ids.get(stream).map_or(0, HashSet::len)
    }

    /// Complete lines skipped because they did not parse.
    pub fn corrupt_lines(&self) -> usize {
        self.corrupt
    }

    /// Appends the entries not stored yet and fsyncs; returns how many were new.
    pub fn append(&mut self, stream: &str, entries: &[StoredEntry]) -> Result<usize, StoreError> {
        let path = self.file_path(stream);
        let io = |source| StoreError::Io { path: path.clone(), source };
        let mut last = self.last_id(stream);
        let mut buffer = Vec::new();
        let mut fresh = Vec::new();
        let known = self.ids.get(stream);
        for entry in entries {
            let Some(id) = StreamId::parse(&entry.id) else { continue };
            if known.is_some_and(|ids| ids.contains(&id)) || fresh.contains(&id) {
                continue;
            }
            if entry.record().is_ok_and(|r| self.withdrawn.covers(&r)) {
                continue;
            }
            last = last.max(id);
            fresh.push(id);
            serde_json::to_writer(&mut buffer, entry).map_err(|e| io(std::io::Error::other(e)))?;
            buffer.push(b'\n');
        }
        let new = fresh.len();
        if new == 0 {
            return Ok(0);
        }
        if !self.files.contains_key(stream) {
            let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
            self.files.insert(stream.to_string(), file);
        }
        let file = self.files.get_mut(stream).ok_or_else(|| io(std::io::Error::other("file vanished")))?;
        file.seek(SeekFrom::End(0)).map_err(io)?;
        file.write_all(&buffer).map_err(io)?;
        file.sync_data().map_err(io)?;
        self.last.insert(stream.to_string(), last);
        self.ids.entry(stream.to_string()).or_default().extend(fresh);
        Ok(new)
    }

    /// Applies `user`'s consent withdrawal made at `withdrawn_at_ms`: every record of theirs made until then, and
    /// every judgment of their prompts, leaves the store files (rewritten, fsynced and renamed), whatever its
    /// stream position, and is refused if it arrives later. Returns the prompt ids forgotten (for the snapshots).
    pub fn forget_user(&mut self, user: &str, withdrawn_at_ms: u64) -> Result<Vec<String>, StoreError> {
        let at = self.withdrawn.users.entry(user.to_string()).or_default();
        *at = (*at).max(withdrawn_at_ms);
        let mut forgotten = Vec::new();
        for entry in self.read(streams::PROMPTS)? {
            if let Ok(record @ Record::Prompt(_)) = entry.record()
                && self.withdrawn.covers(&record)
                && let Record::Prompt(p) = record
            {
                forgotten.push(p.prompt_id.clone());
                self.withdrawn.prompts.insert(p.prompt_id);
            }
        }
        let path = self.dir.join(WITHDRAWN_FILE);
        let json = serde_json::to_vec(&self.withdrawn)
            .map_err(|e| StoreError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
        write_replacing(&path, &json)?;
        for stream in [streams::PROMPTS, streams::FEEDBACK] {
            self.rewrite_without(stream)?;
        }
        Ok(forgotten)
    }

    /// Rewrites `stream`'s file without the entries withdrawals cover.
    fn rewrite_without(&mut self, stream: &str) -> Result<(), StoreError> {
        let entries = self.read(stream)?;
        let (kept, gone): (Vec<StoredEntry>, Vec<StoredEntry>) =
            entries.into_iter().partition(|e| !e.record().is_ok_and(|r| self.withdrawn.covers(&r)));
        if gone.is_empty() {
            return Ok(());
        }
        let path = self.file_path(stream);
        let mut text = Vec::new();
        for entry in &kept {
            serde_json::to_writer(&mut text, entry)
                .map_err(|e| StoreError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
            text.push(b'\n');
        }
        write_replacing(&path, &text)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        self.files.insert(stream.to_string(), file);
        if let Some(ids) = self.ids.get_mut(stream) {
            for entry in &gone {
                if let Some(id) = StreamId::parse(&entry.id) {
                    ids.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// Every stored entry of `stream`, in order.
    pub fn read(&self, stream: &str) -> Result<Vec<StoredEntry>, StoreError> {
        let path = self.file_path(stream);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let mut out: Vec<(StreamId, StoredEntry)> = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| StoreError::Io { path: path.clone(), source })?;
            // Corrupt lines were counted when the store opened; a torn tail was cut off then.
            if let Ok(entry) = serde_json::from_str::<StoredEntry>(&line) {
                out.push((StreamId::parse(&entry.id).unwrap_or_default(), entry));
            }
        }
        // Entries claimed from other consumers may have been appended after newer ones.
        out.sort_by_key(|(id, _)| *id);
        Ok(out.into_iter().map(|(_, e)| e).collect())
    }
}

const WITHDRAWN_FILE: &str = "withdrawn.json";

/// Replaces `path` with `bytes` atomically: a temporary file, fsynced, renamed over it, the directory fsynced.
pub(crate) fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> StoredEntry {
        StoredEntry { stream: "s".into(), id: id.into(), fields: HashMap::from([("event".into(), "{}".into())]) }
    }

    #[test]
    fn appends_once_and_recovers_after_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DatasetStore::open(dir.path()).unwrap();
        assert_eq!(store.append("s", &[entry("1-0"), entry("2-0")]).unwrap(), 2);
        // Redelivered after a crash between fsync and ack: skipped.
        assert_eq!(store.append("s", &[entry("2-0"), entry("3-0")]).unwrap(), 1);
        drop(store);
        let path = dir.path().join("store/s.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"stream":"s","id":"4-0","fie"#).unwrap();
        let mut store = DatasetStore::open(dir.path()).unwrap();
        assert_eq!(store.last_id("s"), StreamId { ms: 3, seq: 0 });
        assert_eq!(store.append("s", &[entry("4-0")]).unwrap(), 1);
        let ids: Vec<String> = store.read("s").unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["1-0", "2-0", "3-0", "4-0"]);
        assert_eq!(store.count("s"), 4);
    }

    /// A second trainer (or a renamed consumer) claims entries older than the newest one stored here: they are
    /// kept, once, and reads come back in stream order.
    #[test]
    fn older_entries_claimed_later_are_stored_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DatasetStore::open(dir.path()).unwrap();
        assert_eq!(store.append("s", &[entry("5-0"), entry("7-0")]).unwrap(), 2);
        assert_eq!(store.append("s", &[entry("3-0"), entry("6-0"), entry("7-0"), entry("3-0")]).unwrap(), 2);
        assert_eq!(store.last_id("s"), StreamId { ms: 7, seq: 0 });
        drop(store);
        let mut store = DatasetStore::open(dir.path()).unwrap();
        assert_eq!(store.append("s", &[entry("3-0"), entry("6-0")]).unwrap(), 0, "known after a restart too");
        let ids: Vec<String> = store.read("s").unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["3-0", "5-0", "6-0", "7-0"]);
        assert_eq!(store.count("s"), 4);
    }

    /// One complete line that does not parse is skipped and counted; the store still opens and appends.
    #[test]
    fn a_corrupt_line_does_not_stop_the_store_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DatasetStore::open(dir.path()).unwrap();
        store.append("s", &[entry("1-0")]).unwrap();
        drop(store);
        let path = dir.path().join("store/s.jsonl");
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{not json at all}\n").unwrap();
        let mut store = DatasetStore::open(dir.path()).unwrap();
        assert_eq!(store.corrupt_lines(), 1);
        assert_eq!(store.append("s", &[entry("2-0")]).unwrap(), 1);
        let ids: Vec<String> = store.read("s").unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["1-0", "2-0"]);
    }

    #[test]
    fn stream_ids_order_like_redis() {
        assert!(StreamId::parse("10-0").unwrap() > StreamId::parse("9-5").unwrap());
        assert!(StreamId::parse("9-10").unwrap() > StreamId::parse("9-9").unwrap());
        assert!(StreamId::parse("x").is_none());
    }
}
