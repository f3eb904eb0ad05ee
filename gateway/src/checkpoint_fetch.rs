//! Fetching an announced checkpoint over HTTP into this gateway's own
//! checkpoint store (`[gateway.rollout] fetch = "http"`), so a replica never
//! needs the trainer's disk. The manifest comes first; every file it lists is
//! streamed into a temporary directory with its sha256 computed on the way
//! and compared with the manifest's, under a total size cap and a per-file
//! timeout; only a complete, matching set is renamed into place (and the
//! rollout verifies it again before loading, as for any checkpoint).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use inference::checkpoint::{MANIFEST, Manifest};
use sha2::{Digest, Sha256};

/// Largest manifest accepted.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not a plain file or checkpoint name")]
    BadName(String),
    #[error("invalid source URL {0:?}")]
    BadUrl(String),
    #[error("GET {url}: {message}")]
    Http { url: String, message: String },
    #[error("the checkpoint is larger than fetch_max_bytes ({0} bytes)")]
    TooLarge(u64),
    #[error("the fetched manifest: {0}")]
    Manifest(String),
    #[error("{name}: checksum mismatch (the manifest says {expected}, the bytes hash to {actual})")]
    Checksum { name: String, expected: String, actual: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// How long each file may take and how many bytes a checkpoint may have.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub max_bytes: u64,
}

/// A name the store could have written: one path segment, no leading dot.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io { path: path.display().to_string(), source }
}

/// Fetches checkpoint `id` from `source` (the base URL the trainer announced) into `root/<id>`. Does nothing when
/// that directory exists already.
pub fn fetch(root: &Path, source: &str, id: &str, limits: Limits) -> Result<(), FetchError> {
    if !plain_name(id) {
        return Err(FetchError::BadName(id.to_string()));
    }
    let target = root.join(id);
    if target.exists() {
        return Ok(());
    }
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(limits.timeout)
        // A redirect could send the fetch anywhere: the announced source serves the files itself.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| FetchError::Http { url: source.to_string(), message: e.to_string() })?;
    let base = reqwest::Url::parse(source).map_err(|_| FetchError::BadUrl(source.to_string()))?;
    if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
        return Err(FetchError::BadUrl(source.to_string()));
    }
    let url = |name: &str| {
        let mut url = base.clone();
        url.path_segments_mut()
            .map(|mut p| {
                p.pop_if_empty().extend(["checkpoints", id, name]);
            })
            .map_err(|()| FetchError::BadUrl(source.to_string()))?;
        Ok::<_, FetchError>(url)
    };

    let mut manifest_bytes = Vec::new();
    get(&client, url(MANIFEST)?, MAX_MANIFEST_BYTES, &mut manifest_bytes)?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| FetchError::Manifest(e.to_string()))?;
    if manifest.id != id {
        return Err(FetchError::Manifest(format!("it names checkpoint {:?}, not {id:?}", manifest.id)));
    }
    if let Some(bad) = manifest.files.keys().find(|name| !plain_name(name) || *name == MANIFEST) {
        return Err(FetchError::BadName(bad.clone()));
    }

    // This fetch's own directory (replicas may fetch into one shared volume); the store removes it once stale.
    let tmp = inference::checkpoint::temporary_dir(root, &format!("fetch-{id}"));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        let mut budget = limits.max_bytes;
        for (name, expected) in &manifest.files {
            let path = tmp.join(name);
            let mut file = HashingFile { file: File::create(&path).map_err(io(&path))?, hasher: Sha256::new() };
            let written = get(&client, url(name)?, budget, &mut file)?;
            budget -= written;
            file.file.sync_all().map_err(io(&path))?;
            let actual = hex::encode(file.hasher.finalize());
            if &actual != expected {
                return Err(FetchError::Checksum { name: name.clone(), expected: expected.clone(), actual });
            }
        }
        let path = tmp.join(MANIFEST);
        let mut file = File::create(&path).map_err(io(&path))?;
        file.write_all(&manifest_bytes).and_then(|()| file.sync_all()).map_err(io(&path))?;
        File::open(&tmp).and_then(|d| d.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        File::open(root).and_then(|d| d.sync_all()).map_err(io(root))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if result.is_ok() {
        tracing::info!(checkpoint = id, source, "checkpoint fetched");
    }
    result
}

/// Writes into a file while hashing what it writes.
struct HashingFile {
    file: File,
    hasher: Sha256,
}

impl Write for HashingFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// GETs `url` into `out`, refusing a body longer than `max_bytes`; returns the bytes written.
fn get(
    client: &reqwest::blocking::Client,
    url: reqwest::Url,
    max_bytes: u64,
    out: &mut impl Write,
) -> Result<u64, FetchError> {
    let failed = |message: String| FetchError::Http { url: url.to_string(), message };
    let response = client.get(url.clone()).send().map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("status {}", response.status())));
    }
    if response.content_length().is_some_and(|n| n > max_bytes) {
        return Err(FetchError::TooLarge(max_bytes));
    }
    // One byte past the cap tells a body that is too long from one that fits exactly.
    let mut body = response.take(max_bytes + 1);
    let written = std::io::copy(&mut body, out).map_err(|e| failed(e.to_string()))?;
    if written > max_bytes {
        return Err(FetchError::TooLarge(max_bytes));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `files` (name -> bytes) under `/checkpoints/<id>/` on a free port, from a thread of its own.
    fn serve(id: &str, files: Vec<(String, Vec<u8>)>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut app = axum::Router::new();
        for (name, bytes) in files {
            app = app.route(&format!("/checkpoints/{id}/{name}"), axum::routing::get(move || async move { bytes }));
        }
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        url
    }

    fn manifest(id: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut manifest = Manifest::new(id, None, inference::checkpoint::Stage::Sft);
        for (name, bytes) in files {
            manifest.files.insert(name.to_string(), hex::encode(Sha256::digest(bytes)));
        }
        serde_json::to_vec(&manifest).unwrap()
    }

    const LIMITS: Limits = Limits { timeout: Duration::from_secs(10), max_bytes: 1 << 20 };

    #[test]
    fn a_matching_checkpoint_lands_whole_and_a_tampered_or_oversized_one_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let good = manifest("good", &[("config.json", b"{}"), ("weights.bin", b"0123")]);
        let url = serve(
            "good",
            vec![
                ("manifest.json".into(), good.clone()),
                ("config.json".into(), b"{}".to_vec()),
                ("weights.bin".into(), b"0123".to_vec()),
            ],
        );
        fetch(root.path(), &url, "good", LIMITS).unwrap();
        assert_eq!(std::fs::read(root.path().join("good/weights.bin")).unwrap(), b"0123");
        assert_eq!(std::fs::read(root.path().join("good").join(MANIFEST)).unwrap(), good);

        let tampered = manifest("bad", &[("weights.bin", b"0123")]);
        let url = serve("bad", vec![("manifest.json".into(), tampered), ("weights.bin".into(), b"0124".to_vec())]);
        assert!(matches!(fetch(root.path(), &url, "bad", LIMITS), Err(FetchError::Checksum { .. })));

        let big = vec![7u8; 2 << 20];
        let oversized = manifest("big", &[("weights.bin", &big)]);
        let url = serve("big", vec![("manifest.json".into(), oversized), ("weights.bin".into(), big)]);
        assert!(matches!(fetch(root.path(), &url, "big", LIMITS), Err(FetchError::TooLarge(_))));

        let escaping = manifest("esc", &[("../outside", b"x")]);
        let url = serve("esc", vec![("manifest.json".into(), escaping)]);
        assert!(matches!(fetch(root.path(), &url, "esc", LIMITS), Err(FetchError::BadName(_))));

        let other = manifest("someone-else", &[]);
        let url = serve("named", vec![("manifest.json".into(), other)]);
        assert!(matches!(fetch(root.path(), &url, "named", LIMITS), Err(FetchError::Manifest(_))));

        let left: Vec<String> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(left, ["good"], "refused fetches leave no directory behind");
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        let limits = Limits { timeout: Duration::from_secs(1), max_bytes: 1 };
        let root = tempfile::tempdir().unwrap();
        for id in ["..", ".tmp-x", "a/b", ""] {
            assert!(
                matches!(fetch(root.path(), "http://127.0.0.1:1", id, limits), Err(FetchError::BadName(_))),
                "{id}"
            );
        }
        assert!(matches!(fetch(root.path(), "file:///etc", "x", limits), Err(FetchError::BadUrl(_))));
        assert!(plain_name("model-00001-of-00002.safetensors") && !plain_name("../config.json"));
    }
}
