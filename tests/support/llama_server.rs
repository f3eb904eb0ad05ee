//! The llama-server binary the external-engine tests run: built by
//! `scripts/build-llama-server.sh` (the llama.cpp sources the
//! llama-cpp-python sdist vendors) into `.cache/llama-server/`.

use std::path::PathBuf;

/// `LLAMA_SERVER`, else the build script's cache; `None` (the test skips) when it is missing, unless
/// INSTRUCTD_REQUIRE_LLAMA_SERVER is set (`make test` sets it and builds it).
pub fn llama_server() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = std::env::var_os("LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/llama-server/0.3.16/bin/llama-server"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("INSTRUCTD_REQUIRE_LLAMA_SERVER").is_none(),
        "INSTRUCTD_REQUIRE_LLAMA_SERVER is set but {} is missing (bash scripts/build-llama-server.sh builds it)",
        path.display()
    );
    eprintln!("SKIPPED: no llama-server at {}; `bash scripts/build-llama-server.sh` builds it", path.display());
    None
}
