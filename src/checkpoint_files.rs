//! The trainer's checkpoint directory served read-only over HTTP
//! (`GET /checkpoints/<id>/<file>`), so gateways on other machines fetch
//! announced checkpoints without the trainer's path (`[gateway.rollout] fetch = "http"`).
//! Only plain files of published checkpoints: a name that could leave the
//! directory, or a temporary directory being written, is a 404.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncReadExt;

/// Bytes read from disk per chunk of a response.
const CHUNK: usize = 1 << 20;

/// `/checkpoints/{id}/{file}` over the store at `root`.
pub fn router(root: &Path) -> axum::Router {
    axum::Router::new()
        .route("/checkpoints/{id}/{file}", axum::routing::get(file))
        .with_state(Arc::new(root.to_path_buf()))
}

/// A single path segment the store could have written: no separators, no leading dot (temporary directories, `..`).
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

async fn file(State(root): State<Arc<PathBuf>>, UrlPath((id, name)): UrlPath<(String, String)>) -> Response {
    if !plain_name(&id) || !plain_name(&name) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = root.join(&id).join(&name);
    let opened = match tokio::fs::File::open(&path).await {
        Ok(file) => file.metadata().await.map(|m| (file, m)),
        Err(e) => Err(e),
    };
    let (file, metadata) = match opened {
        Ok((file, metadata)) if metadata.is_file() => (file, metadata),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let chunks = futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buffer = vec![0u8; CHUNK];
        let n = file.read(&mut buffer).await?;
        buffer.truncate(n);
        Ok::<_, std::io::Error>((n > 0).then(|| (Bytes::from(buffer), file)))
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, metadata.len().to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::plain_name;

    #[test]
    fn only_plain_names_are_served() {
        for ok in ["sft-1-abc", "model.safetensors", "config.json"] {
            assert!(plain_name(ok), "{ok}");
        }
        for bad in ["", "..", ".tmp-sft-1", "a/b", "a\\b", "%2e%2e", "x y"] {
            assert!(!plain_name(bad), "{bad}");
        }
    }
}
