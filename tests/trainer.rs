//! End-to-end test of `instructd train`'s ingestion: killed with SIGKILL at
//! random points, restarted, it ends with every stream entry stored exactly
//! once and nothing left pending in the consumer group.

use std::path::Path;
#[path = "support/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::process::Child;
use std::time::{Duration, Instant};

use gateway::{RedisServer, start_trainer};

fn start(redis_url: &str, data: &Path) -> Child {
    start_trainer(
        redis_url,
        data,
        &[
            // Small batches: many points to be killed at (snapshots are tested elsewhere).
            ("INSTRUCTD__TRAINER__BATCH", "3"),
            ("INSTRUCTD__TRAINER__BLOCK_MS", "100"),
            ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "2000"),
        ],
    )
}

fn stored_ids(data: &Path, stream: &str) -> Vec<String> {
    let path = data.join("store").join(format!("{}.jsonl", stream.replace(':', "_")));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with('}'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn kill_9_at_any_point_loses_and_duplicates_nothing() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut expected = std::collections::HashMap::new();
    // Enough entries that ingestion (batches of 3, each fsynced then acknowledged) runs for seconds.
    for (stream, n) in [("instructd:prompts", 6000), ("instructd:feedback", 3000)] {
        let mut pipe = redis::pipe();
        for i in 0..n {
            pipe.cmd("XADD").arg(stream).arg("*").arg("kind").arg("test").arg("event").arg(format!("{{\"n\":{i}}}"));
        }
        let ids: Vec<String> = pipe.query(&mut conn).unwrap();
        expected.insert(stream, ids);
    }

    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let total: usize = expected.values().map(Vec::len).sum();
    let stored_total = || expected.keys().map(|s| stored_ids(&data, s).len()).sum::<usize>();
    let mut interrupted_mid_way = 0;
    for _ in 0..8 {
        let mut child = start(&redis.url(), &data);
        std::thread::sleep(Duration::from_millis(40 + next() % 160));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let stored = stored_total();
        if stored > 0 && stored < total {
            interrupted_mid_way += 1;
        }
    }
    assert!(interrupted_mid_way > 0, "no kill landed while ingestion was under way; the test proves nothing");
    let mut child = start(&redis.url(), &data);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = expected.iter().all(|(stream, ids)| stored_ids(&data, stream).len() >= ids.len());
        let pending: Vec<redis::Value> =
            redis::cmd("XPENDING").arg("instructd:prompts").arg("trainer").query(&mut conn).unwrap();
        if done && pending.first() == Some(&redis::Value::Int(0)) {
            break;
        }
        assert!(Instant::now() < deadline, "the trainer did not catch up within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for (stream, ids) in &expected {
        assert_eq!(&stored_ids(&data, stream), ids, "{stream}: every entry exactly once, in order");
        let pending: Vec<redis::Value> = redis::cmd("XPENDING").arg(*stream).arg("trainer").query(&mut conn).unwrap();
        assert_eq!(pending.first(), Some(&redis::Value::Int(0)), "{stream}: nothing left pending");
    }
}
