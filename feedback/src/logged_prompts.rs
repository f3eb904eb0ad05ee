//! What the gateway remembers about each logged playground prompt, so that
//! feedback can be checked (every generation id exists and belongs to its
//! prompt; a playground user only judges their own prompts) and consent
//! withdrawal can find a user's entries.
//!
//! Records live in Redis; the replica that logged a prompt also keeps it in a
//! bounded in-memory cache, so feedback on recent prompts can still be
//! checked (and spilled) while Redis is away.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::redis_link::{LinkError, RedisLink};

/// Prompts kept in memory per replica.
const CACHE_CAPACITY: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub prompt_id: String,
    pub user: String,
    pub organization: String,
    pub generation_ids: Vec<String>,
    /// The entry id in `instructd:prompts`, once written (absent while spilled).
    pub stream_id: Option<String>,
    pub has_pii: bool,
    pub created_at_ms: u64,
    /// What a labeler is shown: prompt, messages, use case and samples.
    #[serde(default)]
    pub task: Option<serde_json::Value>,
}

#[derive(Default)]
struct Cache {
    prompts: HashMap<String, PromptRecord>,
    generations: HashMap<String, String>,
    order: VecDeque<String>,
}

pub struct LoggedPrompts {
    link: Arc<RedisLink>,
    prefix: String,
    cache: Mutex<Cache>,
}

impl LoggedPrompts {
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> Self {
        Self { link, prefix: prefix.to_string(), cache: Mutex::new(Cache::default()) }
    }

    fn record_key(&self, prompt_id: &str) -> String {
        format!("{}:prompt:{prompt_id}", self.prefix)
    }

    fn generation_key(&self, generation_id: &str) -> String {
        format!("{}:generation:{generation_id}", self.prefix)
    }

    fn user_key(&self, user: &str) -> String {
        format!("{}:user_prompts:{user}", self.prefix)
    }

    /// Stores a record (cache first, then Redis).
    pub async fn insert(&self, record: &PromptRecord) -> Result<(), LinkError> {
        self.remember(record);
        let json = serde_json::to_string(record).unwrap_or_default();
        let record_key = self.record_key(&record.prompt_id);
        let generation_keys: Vec<String> = record.generation_ids.iter().map(|g| self.generation_key(g)).collect();
        let user_key = self.user_key(&record.user);
        let prompt_id = record.prompt_id.clone();
        self.link
            .run(|mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic().set(&record_key, json).ignore();
                for key in &generation_keys {
                    pipe.set(key, &prompt_id).ignore();
                }
                pipe.sadd(&user_key, &prompt_id).ignore();
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }

    /// The record of `prompt_id`: Redis, else this replica's cache when Redis is away.
    pub async fn get(&self, prompt_id: &str) -> Result<Option<PromptRecord>, LinkError> {
        let key = self.record_key(prompt_id);
        match self.link.run(|mut c| async move { c.get::<_, Option<String>>(key).await }).await {
            Ok(json) => Ok(json.and_then(|j| serde_json::from_str(&j).ok())),
            Err(e) if e.is_unavailable() => match self.cached(prompt_id) {
                Some(record) => Ok(Some(record)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The prompt a generation id belongs to.
    pub async fn prompt_of(&self, generation_id: &str) -> Result<Option<PromptRecord>, LinkError> {
        let key = self.generation_key(generation_id);
        match self.link.run(|mut c| async move { c.get::<_, Option<String>>(key).await }).await {
            Ok(Some(prompt_id)) => self.get(&prompt_id).await,
            Ok(None) => Ok(None),
            Err(e) if e.is_unavailable() => {
                let prompt_id = self.lock().generations.get(generation_id).cloned();
                match prompt_id.and_then(|p| self.cached(&p)) {
                    Some(record) => Ok(Some(record)),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Every record of `user`.
    pub async fn user_records(&self, user: &str) -> Result<Vec<PromptRecord>, LinkError> {
        let user_key = self.user_key(user);
        let ids: Vec<String> = self.link.run(|mut c| async move { c.smembers(&user_key).await }).await?;
        let mut records = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(record) = self.get(id).await? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Removes every record of `user` and returns them (consent withdrawal).
    /// Callers delete the user's stream entries first (found through
    /// [`user_records`](Self::user_records)), so a failure in between can be retried.
    pub async fn take_user(&self, user: &str) -> Result<Vec<PromptRecord>, LinkError> {
        let records = self.user_records(user).await?;
        let mut keys = vec![self.user_key(user)];
        for record in &records {
            keys.push(self.record_key(&record.prompt_id));
            keys.extend(record.generation_ids.iter().map(|g| self.generation_key(g)));
        }
        self.link.run(|mut c| async move { c.del::<_, ()>(keys).await }).await?;
        let mut cache = self.lock();
        cache.prompts.retain(|_, r| r.user != user);
        Ok(records)
    }

    fn remember(&self, record: &PromptRecord) {
        let mut cache = self.lock();
        for generation in &record.generation_ids {
            cache.generations.insert(generation.clone(), record.prompt_id.clone());
        }
        if cache.prompts.insert(record.prompt_id.clone(), record.clone()).is_none() {
            cache.order.push_back(record.prompt_id.clone());
        }
        while cache.order.len() > CACHE_CAPACITY {
            if let Some(old) = cache.order.pop_front()
                && let Some(evicted) = cache.prompts.remove(&old)
            {
                for generation in evicted.generation_ids {
                    cache.generations.remove(&generation);
                }
            }
        }
    }

    fn cached(&self, prompt_id: &str) -> Option<PromptRecord> {
        self.lock().prompts.get(prompt_id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::RedisServer;

    fn record(id: &str, user: &str) -> PromptRecord {
        PromptRecord {
            prompt_id: id.into(),
            user: user.into(),
            organization: "org".into(),
            generation_ids: vec![format!("{id}-g0"), format!("{id}-g1")],
            stream_id: Some("1-0".into()),
            has_pii: false,
            created_at_ms: 1,
            task: None,
        }
    }

    #[tokio::test]
    async fn records_resolve_by_prompt_and_generation_even_without_redis() {
        let mut server = RedisServer::start().unwrap();
        let store = LoggedPrompts::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t");
        store.insert(&record("p1", "alice")).await.unwrap();
        store.insert(&record("p2", "bob")).await.unwrap();
        assert_eq!(store.get("p1").await.unwrap().unwrap().user, "alice");
        assert_eq!(store.prompt_of("p2-g1").await.unwrap().unwrap().prompt_id, "p2");
        assert!(store.prompt_of("nope").await.unwrap().is_none());

        // Another replica (empty cache) reads the same records from Redis.
        let other = LoggedPrompts::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t");
        assert_eq!(other.prompt_of("p1-g0").await.unwrap().unwrap().prompt_id, "p1");

        server.stop();
        assert_eq!(store.prompt_of("p1-g0").await.unwrap().unwrap().prompt_id, "p1", "served from the cache");
        assert!(other.get("p9").await.is_err(), "unknown while Redis is away is an error, not 'absent'");
        // The test server keeps nothing across a restart: store again, then withdraw.
        server.restart().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        store.insert(&record("p1", "alice")).await.unwrap();
        let taken = store.take_user("alice").await.unwrap();
        assert_eq!(taken.len(), 1);
        assert!(store.take_user("alice").await.unwrap().is_empty());
        assert!(other.get("p1").await.unwrap().is_none(), "a withdrawn user's records are gone");
    }
}
