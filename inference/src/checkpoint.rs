//! Checkpoints: model directories in Hugging Face layout plus a
//! `manifest.json` (parent, stage, dataset snapshots, hyperparameters,
//! metrics, the sha256 of every file, time). The trainer publishes them; the
//! gateway verifies them before serving.
//!
//! Publishing writes into a temporary directory `.tmp-<id>-<unique>`, hashes
//! every file into the manifest, fsyncs files and directory, then renames the
//! directory into place, so a reader never sees a partial checkpoint. A
//! checkpoint whose files do not match their checksums is refused.
//!
//! Several processes may share one store (the trainer publishing, gateway
//! replicas fetching over HTTP into a shared volume): a temporary directory
//! is its writer's alone (a unique name), and opening the store removes only
//! those untouched for [`STALE_TMP`], which a crash left, never one another
//! process is still writing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "manifest.json";
pub const SCHEMA_VERSION: u32 = 1;
/// A temporary directory unmodified this long was left by a crashed writer.
pub const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Base,
    Sft,
    RewardModel,
    PpoPtx,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub id: String,
    pub parent: Option<String>,
    pub stage: Stage,
    /// Dataset snapshot ids the checkpoint was trained on.
    pub snapshots: Vec<String>,
    pub hyperparameters: serde_json::Value,
    pub metrics: serde_json::Value,
    /// Every file of the directory but the manifest, with its sha256.
    pub files: BTreeMap<String, String>,
    pub created_at_ms: u64,
}

impl Manifest {
    pub fn new(id: &str, parent: Option<&str>, stage: Stage) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            id: id.to_string(),
            parent: parent.map(str::to_string),
            stage,
            snapshots: Vec::new(),
            hyperparameters: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
            files: BTreeMap::new(),
            created_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {id}: {message}")]
    Invalid { id: String, message: String },
    #[error("invalid checkpoint id {0:?}")]
    BadId(String),
}

pub struct CheckpointStore {
    root: PathBuf,
}

/// Whether the directory `path` and everything directly in it were last
/// modified at least `age` ago (a writer touches its files as it goes).
fn untouched_for(path: &Path, age: std::time::Duration) -> bool {
    let recent = |p: &Path| {
        std::fs::metadata(p).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_none_or(|e| e < age)
    };
    if recent(path) {
        return false;
    }
    std::fs::read_dir(path).map(|entries| entries.flatten().all(|e| !recent(&e.path()))).unwrap_or(true)
}

/// A temporary directory under the store `root` for writing checkpoint
/// `label` (`.tmp-<label>-<pid>-<nanos>-<n>`): no other writer, process or
/// thread, uses the same name, and the store's open cleans it up only once
/// it is stale.
pub fn temporary_dir(root: &Path, label: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    root.join(format!(".tmp-{label}-{}-{nanos}-{n}", std::process::id()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

impl CheckpointStore {
    /// Opens (creating) the store and removes temporary directories a crash
    /// left (untouched for [`STALE_TMP`]).
    pub fn open(root: &Path) -> Result<Self, CheckpointError> {
        Self::open_removing_stale(root, STALE_TMP)
    }

    fn open_removing_stale(root: &Path, stale: std::time::Duration) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        for entry in std::fs::read_dir(root).map_err(io(root))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") && untouched_for(&entry.path(), stale) {
                tracing::info!(path = %entry.path().display(), "removing a checkpoint a crashed writer left");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn check_id(id: &str) -> Result<(), CheckpointError> {
        let ok = !id.is_empty()
            && !id.starts_with('.')
            && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok { Ok(()) } else { Err(CheckpointError::BadId(id.to_string())) }
    }

    /// Publishes a checkpoint whose files `write_files` puts in the directory
    /// it is given (it may also fill the manifest's metrics).
    pub fn publish(
        &self,
        mut manifest: Manifest,
        write_files: impl FnOnce(&Path, &mut Manifest) -> Result<(), CheckpointError>,
    ) -> Result<Manifest, CheckpointError> {
        Self::check_id(&manifest.id)?;
        let target = self.path(&manifest.id);
        if target.exists() {
            return Err(CheckpointError::Invalid { id: manifest.id, message: "already exists".into() });
        }
        let tmp = temporary_dir(&self.root, &manifest.id);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let result = (|| {
            write_files(&tmp, &mut manifest)?;
            manifest.files.clear();
            for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == MANIFEST || !entry.path().is_file() {
                    continue;
                }
                let path = entry.path();
                File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
                manifest.files.insert(name, sha256_file(&path)?);
            }
            let path = tmp.join(MANIFEST);
            let text = serde_json::to_vec_pretty(&manifest).map_err(|e| io(&path)(std::io::Error::other(e)))?;
            let mut file = File::create(&path).map_err(io(&path))?;
            file.write_all(&text).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
            sync_dir(&tmp)?;
            std::fs::rename(&tmp, &target).map_err(io(&target))?;
            sync_dir(&self.root)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|()| manifest)
    }

    /// Registers an existing model directory (e.g. the starting model) as a checkpoint.
    pub fn import_dir(&self, src: &Path, manifest: Manifest) -> Result<Manifest, CheckpointError> {
        self.publish(manifest, |dir, _| {
            for entry in std::fs::read_dir(src).map_err(io(src))?.flatten() {
                let name = entry.file_name();
                if entry.path().is_file() && name != MANIFEST {
                    std::fs::copy(entry.path(), dir.join(&name)).map_err(io(&entry.path()))?;
                }
            }
            Ok(())
        })
    }

    /// Reads the manifest and checks every file against it.
    pub fn verify(&self, id: &str) -> Result<Manifest, CheckpointError> {
        Self::check_id(id)?;
        verify_dir(&self.path(id))
    }

    /// Every checkpoint whose manifest parses, oldest first, and those that do not.
    pub fn list(&self) -> (Vec<Manifest>, Vec<(String, String)>) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else { return (good, bad) };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            match read_manifest(&entry.path()) {
                Ok(manifest) => good.push(manifest),
                Err(e) => bad.push((name, e.to_string())),
            }
        }
        good.sort_by_key(|m| (m.created_at_ms, m.id.clone()));
        (good, bad)
    }

    /// The chain from `id` back to its root ancestor.
    pub fn lineage(&self, id: &str) -> Result<Vec<Manifest>, CheckpointError> {
        let mut chain = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next {
            if chain.iter().any(|m: &Manifest| m.id == id) {
                break;
            }
            Self::check_id(&id)?;
            let manifest = read_manifest(&self.path(&id))?;
            next = manifest.parent.clone();
            chain.push(manifest);
        }
        Ok(chain)
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Invalid { id, message: format!("{MANIFEST}: {e}") })
}

/// Verifies a checkpoint directory: manifest, every listed file's sha256, no
/// unlisted weights, and the files a model needs.
pub fn verify_dir(dir: &Path) -> Result<Manifest, CheckpointError> {
    let manifest = read_manifest(dir)?;
    let invalid = |message: String| CheckpointError::Invalid { id: manifest.id.clone(), message };
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if manifest.id != dir_name {
        return Err(invalid(format!("the manifest names checkpoint {:?} but sits in {dir_name:?}", manifest.id)));
    }
    for required in ["config.json", "tokenizer.json"] {
        if !manifest.files.contains_key(required) {
            return Err(invalid(format!("{required} is missing from the manifest")));
        }
    }
    for (name, expected) in &manifest.files {
        // A manifest may only name plain files inside its own directory.
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
            return Err(invalid(format!("the manifest lists an invalid file name {name:?}")));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(invalid(format!("{name} is missing")));
        }
        let actual = sha256_file(&path)?;
        if &actual != expected {
            return Err(invalid(format!(
                "{name}: checksum mismatch (expected {}…, found {}…)",
                expected.chars().take(12).collect::<String>(),
                &actual[..12]
            )));
        }
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !manifest.files.contains_key(&name) {
            return Err(invalid(format!("{name} is not listed in the manifest")));
        }
    }
    Ok(manifest)
}

pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let file = File::open(path).map_err(io(path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_model::{TinySpec, init_tiny};

    fn store_with_base() -> (tempfile::TempDir, CheckpointStore) {
        let tmp = tempfile::tempdir().unwrap();
        init_tiny(&tmp.path().join("tiny"), &TinySpec::default()).unwrap();
        let store = CheckpointStore::open(&tmp.path().join("checkpoints")).unwrap();
        store.import_dir(&tmp.path().join("tiny"), Manifest::new("base", None, Stage::Base)).unwrap();
        (tmp, store)
    }

    #[test]
    fn publish_verify_and_lineage() {
        let (tmp, store) = store_with_base();
        let base = store.verify("base").unwrap();
        assert!(base.files.contains_key("model.safetensors") && base.files.contains_key("config.json"));
        let src = store.path("base");
        store
            .publish(Manifest::new("sft-1", Some("base"), Stage::Sft), |dir, _| {
                for name in base.files.keys() {
                    std::fs::copy(src.join(name), dir.join(name)).unwrap();
                }
                Ok(())
            })
            .unwrap();
        let chain: Vec<String> = store.lineage("sft-1").unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(chain, ["sft-1", "base"]);
        assert_eq!(store.list().0.len(), 2);
        assert!(
            !std::fs::read_dir(store.root()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp"))
        );
        crate::load::LoadedModel::load(store.path("sft-1"), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        drop(tmp);
    }

    /// Another process's publish in progress survives a store opened beside
    /// it; a temporary directory left long ago is cleaned up.
    #[test]
    fn opening_the_store_keeps_a_live_writers_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkpoints");
        let live = root.join(".tmp-sft-2-4242-1-0");
        std::fs::create_dir_all(&live).unwrap();
        std::fs::write(live.join("model.safetensors"), b"half written").unwrap();
        CheckpointStore::open(&root).unwrap();
        assert!(live.join("model.safetensors").is_file(), "a live writer's directory must survive");
        std::thread::sleep(std::time::Duration::from_millis(20));
        CheckpointStore::open_removing_stale(&root, std::time::Duration::from_millis(10)).unwrap();
        assert!(!live.exists(), "a directory untouched past the limit is a crash's leftover");
    }

    #[test]
    fn corrupt_partial_and_stray_files_are_refused() {
        let (_tmp, store) = store_with_base();
        let weights = store.path("base").join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&weights, &bytes).unwrap();
        let error = store.verify("base").unwrap_err().to_string();
        assert!(error.contains("model.safetensors") && error.contains("checksum"), "{error}");
        bytes[last] ^= 1;
        std::fs::write(&weights, &bytes).unwrap();
        store.verify("base").unwrap();

        std::fs::write(store.path("base").join("extra.safetensors"), b"x").unwrap();
        assert!(store.verify("base").unwrap_err().to_string().contains("not listed"));
        std::fs::remove_file(store.path("base").join("extra.safetensors")).unwrap();
        std::fs::remove_file(store.path("base").join("tokenizer.json")).unwrap();
        assert!(store.verify("base").unwrap_err().to_string().contains("tokenizer.json is missing"));
        std::fs::write(store.path("base").join(MANIFEST), b"{not json").unwrap();
        assert!(store.verify("base").is_err());
        assert_eq!(store.list().1.len(), 1, "an unreadable manifest is listed as invalid");

        // A publish that fails part-way leaves nothing behind.
        let failed = store.publish(Manifest::new("broken", None, Stage::Sft), |_, _| {
            Err(CheckpointError::Invalid { id: "broken".into(), message: "trainer died".into() })
        });
        assert!(failed.is_err() && !store.path("broken").exists());
        assert!(
            !std::fs::read_dir(store.root()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp"))
        );
        assert!(matches!(store.verify("../etc"), Err(CheckpointError::BadId(_))));

        // A manifest copied into another checkpoint's directory, or naming files outside it, is refused.
        std::fs::write(store.path("base").join(MANIFEST), b"{not json").unwrap();
        let (_t2, other) = store_with_base();
        let mut manifest: Manifest =
            serde_json::from_str(&std::fs::read_to_string(other.path("base").join(MANIFEST)).unwrap()).unwrap();
        manifest.id = "elsewhere".into();
        std::fs::write(other.path("base").join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        assert!(other.verify("base").unwrap_err().to_string().contains("sits in"));
        manifest.id = "base".into();
        manifest.files.insert("../escape".into(), "00".into());
        std::fs::write(other.path("base").join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        assert!(other.verify("base").unwrap_err().to_string().contains("invalid file name"));
    }
}
