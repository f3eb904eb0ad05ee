//! Ingestion: reads `instructd:prompts` and `instructd:feedback` with the
//! consumer group, writes each batch durably to the [`DatasetStore`], and
//! only then acknowledges it.
//!
//! On start the consumer first re-reads its own pending entries (delivered
//! before a crash, never acknowledged), then takes over entries other
//! consumers left pending too long, then reads new ones. Entries deleted from
//! the stream while pending (consent withdrawn) come back without fields and
//! are acknowledged without being stored. Kill the process at any point and
//! the store ends with every entry exactly once.

use std::collections::HashMap;
use std::sync::Arc;

use feedback::records::Record;
use feedback::{LinkError, RedisLink, streams};
use redis::Value;

use crate::config::TrainerConfig;
use crate::store::{DatasetStore, StoreError, StoredEntry};

/// The streams the trainer consumes.
pub const STREAMS: [&str; 2] = [streams::PROMPTS, streams::FEEDBACK];

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Redis(#[from] LinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

pub struct Ingestor {
    link: Arc<RedisLink>,
    config: TrainerConfig,
    /// Whether this consumer's own pending entries were drained since start.
    recovered: bool,
}

/// What one step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    pub stored: usize,
    pub acknowledged: usize,
}

type Batch = Vec<(String, Vec<(String, Option<HashMap<String, String>>)>)>;

impl Ingestor {
    pub fn new(link: Arc<RedisLink>, config: TrainerConfig) -> Self {
        Self { link, config, recovered: false }
    }

    /// Creates the consumer group on every stream (from the beginning) if missing.
    pub async fn ensure_groups(&self) -> Result<(), LinkError> {
        for stream in STREAMS {
            let group = self.config.group.clone();
            let result = self
                .link
                .run(|mut c| async move {
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(stream)
                        .arg(group)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            match result {
                Ok(()) => tracing::info!(stream, group = %self.config.group, "created consumer group"),
                Err(LinkError::Command(e)) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One round: pending entries first (after a restart), then stale ones of
    /// other consumers, then new ones (waiting up to `block_ms`).
    pub async fn step(&mut self, store: &mut DatasetStore) -> Result<Ingested, IngestError> {
        if !self.recovered {
            let batch = self.read("0", None).await?;
            if batch.iter().all(|(_, entries)| entries.is_empty()) {
                self.recovered = true;
            } else {
                return self.commit(store, batch).await;
            }
        }
        let claimed = self.claim_stale().await?;
        if claimed.iter().any(|(_, entries)| !entries.is_empty()) {
            return self.commit(store, claimed).await;
        }
        let batch = self.read(">", Some(self.config.block_ms)).await?;
        self.commit(store, batch).await
    }

    /// Writes, fsyncs, then acknowledges.
    async fn commit(&self, store: &mut DatasetStore, batch: Batch) -> Result<Ingested, IngestError> {
        let mut done = Ingested::default();
        for (stream, entries) in batch {
            if entries.is_empty() {
                continue;
            }
            let stored: Vec<StoredEntry> = entries
                .iter()
                .filter_map(|(id, fields)| {
                    fields.as_ref().map(|f| StoredEntry { stream: stream.clone(), id: id.clone(), fields: f.clone() })
                })
                .collect();
            done.stored += store.append(&stream, &stored)?;
            // A withdrawal reaches everything of the user's the trainer holds before it is acknowledged.
            for entry in &stored {
                if let Ok(Record::Withdrawal(w)) = entry.record() {
                    let prompts = store.forget_user(&w.user, w.created_at_ms)?;
                    let rows = crate::snapshot::forget_user(&self.config.data_dir, &w.user, &prompts)?;
                    tracing::info!(user = %w.user, prompts = prompts.len(), snapshot_rows = rows, "consent withdrawal applied");
                }
            }
            let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
            let group = self.config.group.clone();
            let count = ids.len();
            let acked: usize =
                self.link
                    .run(|mut c| async move {
                        redis::cmd("XACK").arg(&stream).arg(group).arg(ids).query_async(&mut c).await
                    })
                    .await?;
            if acked != count {
                tracing::debug!(acked, count, "some entries were acknowledged already");
            }
            done.acknowledged += count;
        }
        Ok(done)
    }

    async fn read(&self, from: &str, block_ms: Option<u64>) -> Result<Batch, LinkError> {
        let (group, consumer, count) = (self.config.group.clone(), self.config.consumer.clone(), self.config.batch);
        let from = from.to_string();
        let value: Value = self
            .link
            .run(|mut c| async move {
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
                if let Some(ms) = block_ms {
                    cmd.arg("BLOCK").arg(ms);
                }
                cmd.arg("STREAMS").arg(&STREAMS[..]);
                for _ in STREAMS {
                    cmd.arg(&from);
                }
                cmd.query_async(&mut c).await
            })
            .await?;
        Ok(parse_read(&value))
    }

    /// Takes over entries other consumers have left pending for `claim_idle_ms`.
    async fn claim_stale(&self) -> Result<Batch, LinkError> {
        let mut batch = Vec::new();
        for stream in STREAMS {
            let (group, consumer, idle, count) =
                (self.config.group.clone(), self.config.consumer.clone(), self.config.claim_idle_ms, self.config.batch);
            let value: Value = self
                .link
                .run(|mut c| async move {
                    redis::cmd("XAUTOCLAIM")
                        .arg(stream)
                        .arg(group)
                        .arg(consumer)
                        .arg(idle)
                        .arg("0-0")
                        .arg("COUNT")
                        .arg(count)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            // Reply: [next-cursor, [entries...], [deleted ids...]].
            if let Value::Array(parts) = value {
                let entries = parts.get(1).map(parse_entries).unwrap_or_default();
                let mut entries = entries;
                if let Some(Value::Array(deleted)) = parts.get(2) {
                    entries.extend(deleted.iter().filter_map(as_string).map(|id| (id, None)));
                }
                entries.sort_by_key(|(id, _)| crate::store::StreamId::parse(id));
                batch.push((stream.to_string(), entries));
            }
        }
        Ok(batch)
    }
}

fn as_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `[[id, [field, value, ...] | nil], ...]`.
fn parse_entries(value: &Value) -> Vec<(String, Option<HashMap<String, String>>)> {
    let Value::Array(items) = value else { return Vec::new() };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else { return None };
            let id = as_string(pair.first()?)?;
            let fields = match pair.get(1) {
                Some(Value::Array(kv)) => Some(
                    kv.chunks(2)
                        .filter_map(|c| Some((as_string(c.first()?)?, as_string(c.get(1)?)?)))
                        .collect::<HashMap<_, _>>(),
                ),
                _ => None,
            };
            Some((id, fields))
        })
        .collect()
}

/// XREADGROUP's reply: `[[stream, entries], ...]` (RESP2) or a map (RESP3); nil when nothing came.
fn parse_read(value: &Value) -> Batch {
    let pairs: Vec<(&Value, &Value)> = match value {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => Some((&pair[0], &pair[1])),
                _ => None,
            })
            .collect(),
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        _ => Vec::new(),
    };
    pairs.into_iter().filter_map(|(name, entries)| Some((as_string(name)?, parse_entries(entries)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use feedback::redis_server::RedisServer;

    async fn xadd(link: &RedisLink, stream: &'static str, n: usize) {
        for i in 0..n {
            link.run(|mut c| async move {
                redis::cmd("XADD")
                    .arg(stream)
                    .arg("*")
                    .arg("event")
                    .arg(format!("{{\"n\":{i}}}"))
                    .query_async::<String>(&mut c)
                    .await
            })
            .await
            .unwrap();
        }
    }

    fn config(consumer: &str) -> TrainerConfig {
        TrainerConfig { consumer: consumer.into(), batch: 4, block_ms: 50, claim_idle_ms: 100, ..Default::default() }
    }

    #[tokio::test]
    async fn pending_entries_are_stored_once_after_a_crash() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let ingestor = Ingestor::new(link.clone(), config("t1"));
        ingestor.ensure_groups().await.unwrap();
        xadd(&link, streams::PROMPTS, 10).await;
        xadd(&link, streams::FEEDBACK, 3).await;

        // A "crashed" consumer: read a batch (now pending) but never stored or acknowledged it.
        let crashed = Ingestor::new(link.clone(), config("t1"));
        let lost = crashed.read(">", None).await.unwrap();
        assert!(lost.iter().any(|(_, e)| !e.is_empty()));

        let mut store = DatasetStore::open(dir.path()).unwrap();
        let mut ingestor = Ingestor::new(link.clone(), config("t1"));
        for _ in 0..20 {
            ingestor.step(&mut store).await.unwrap();
        }
        assert_eq!(store.count(streams::PROMPTS), 10);
        assert_eq!(store.count(streams::FEEDBACK), 3);
        let pending: Value = link
            .run(|mut c| async move {
                redis::cmd("XPENDING").arg(streams::PROMPTS).arg("trainer").query_async(&mut c).await
            })
            .await
            .unwrap();
        assert!(matches!(&pending, Value::Array(v) if v.first() == Some(&Value::Int(0))), "{pending:?}");
    }

    #[tokio::test]
    async fn stale_entries_of_another_consumer_are_taken_over_and_deleted_ones_acked() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        Ingestor::new(link.clone(), config("gone")).ensure_groups().await.unwrap();
        xadd(&link, streams::PROMPTS, 3).await;
        let gone = Ingestor::new(link.clone(), config("gone"));
        let read = gone.read(">", None).await.unwrap();
        // One of them is withdrawn (deleted) while pending.
        let first = read.iter().find(|(s, _)| s == streams::PROMPTS).unwrap().1[0].0.clone();
        link.run(|mut c| async move {
            redis::cmd("XDEL").arg(streams::PROMPTS).arg(first).query_async::<u64>(&mut c).await
        })
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let mut store = DatasetStore::open(dir.path()).unwrap();
        let mut ingestor = Ingestor::new(link.clone(), config("t2"));
        for _ in 0..6 {
            ingestor.step(&mut store).await.unwrap();
        }
        assert_eq!(store.count(streams::PROMPTS), 2, "the deleted entry is not stored");
    }
}
