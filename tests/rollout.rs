//! End-to-end test of checkpoint rollout: the real gateway, a private Redis,
//! checkpoints published into a store, announced on `instructd:checkpoints`,
//! canaried, promoted and rolled back while clients send completions.

#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use inference::checkpoint::{CheckpointStore, Manifest, Stage};
use inference::tiny_model::{TinySpec, init_tiny};

use gateway::{Gateway, RedisServer, python, run_script};

#[test]
fn ten_swaps_under_load_drop_nothing() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    init_tiny(&base, &TinySpec { seed: 1, ..Default::default() }).unwrap();
    let store = CheckpointStore::open(&tmp.path().join("checkpoints")).unwrap();
    let mut parent: Option<String> = None;
    for i in 1..=10 {
        // Each checkpoint has its own weights, so its greedy text is its own.
        let dir = tmp.path().join(format!("m{i}"));
        init_tiny(&dir, &TinySpec { seed: 100 + i, ..Default::default() }).unwrap();
        let id = format!("ckpt-{i}");
        store.import_dir(&dir, Manifest::new(&id, parent.as_deref(), Stage::Sft)).unwrap();
        parent = Some(id);
    }
    let corrupt = tmp.path().join("corrupt");
    init_tiny(&corrupt, &TinySpec { seed: 99, ..Default::default() }).unwrap();
    store.import_dir(&corrupt, Manifest::new("ckpt-corrupt", None, Stage::PpoPtx)).unwrap();
    let weights = store.path("ckpt-corrupt").join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&weights, bytes).unwrap();

    let gateway = Gateway::start(
        &redis.url(),
        &base,
        &[("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", store.root().to_str().unwrap())],
    );
    run_script(&python, "rollout.py", &[("INSTRUCTD_URL", &gateway.url), ("INSTRUCTD_REDIS_URL", &redis.url())]);
}
