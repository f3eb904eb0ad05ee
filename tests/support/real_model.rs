//! Where the tests find the real default model. Shared by the workspace's
//! end-to-end tests (`tests/`) and the inference crate's (`inference/tests/`)
//! through `#[path]`.

use std::path::{Path, PathBuf};

/// `INSTRUCTD_TEST_MODEL`, or `models/smollm2-135m-instruct` in the nearest
/// ancestor of the crate that has one. Panics with the fix when it is missing.
pub fn real_model_dir() -> PathBuf {
    let dir = std::env::var_os("INSTRUCTD_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|a| a.join("models/smollm2-135m-instruct"))
            .find(|d| d.is_dir())
            .unwrap_or_else(|| PathBuf::from("models/smollm2-135m-instruct"))
    });
    assert!(
        dir.join("config.json").is_file(),
        "the real model is missing at {}: run `make test` (it fetches and imports it) or set INSTRUCTD_TEST_MODEL",
        dir.display()
    );
    dir
}
