//! Stored responses of the Responses API (`store: true`): one JSON record per
//! response in Redis, under its owner (the API key's user) and with a TTL
//! (`[gateway] responses_ttl_secs`). The Redis key holds a hash of the owner,
//! so a key can only ever name its own owner's responses: another owner's id
//! is simply not found (404), never "forbidden".

use std::sync::Arc;
use std::time::Duration;

use feedback::{LinkError, RedisLink};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::openai::responses::TextMessage;

/// One stored response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub owner: String,
    /// The `response` object as it was answered.
    pub response: serde_json::Value,
    /// The conversation up to and including this response's output (without instructions): what a
    /// `previous_response_id` naming it continues.
    pub conversation: Vec<TextMessage>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("stored response {id} is not valid JSON: {message}")]
    Corrupt { id: String, message: String },
}

#[derive(Clone)]
pub struct ResponseStore {
    link: Arc<RedisLink>,
    prefix: String,
    ttl: Duration,
}

impl ResponseStore {
    pub fn new(link: Arc<RedisLink>, prefix: &str, ttl: Duration) -> Self {
        Self { link, prefix: format!("{prefix}:response"), ttl }
    }

    /// The Redis key of response `id` of `owner`. `id` is checked by the caller
    /// ([`check_response_id`](crate::openai::responses::check_response_id)).
    fn key(&self, owner: &str, id: &str) -> String {
        let owner = hex::encode(&Sha256::digest(owner.as_bytes())[..16]);
        format!("{}:{owner}:{id}", self.prefix)
    }

    pub async fn save(&self, id: &str, record: &StoredResponse) -> Result<(), StoreError> {
        let key = self.key(&record.owner, id);
        let text =
            serde_json::to_string(record).map_err(|e| StoreError::Corrupt { id: id.into(), message: e.to_string() })?;
        let seconds = self.ttl.as_secs().max(1);
        self.link
            .run(|mut c| async move {
                redis::cmd("SET").arg(&key).arg(text).arg("EX").arg(seconds).query_async::<()>(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// Response `id` of `owner`, if it is stored (and has not expired).
    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        let key = self.key(owner, id);
        let text: Option<String> =
            self.link.run(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await }).await?;
        let Some(text) = text else { return Ok(None) };
        let record: StoredResponse =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt { id: id.into(), message: e.to_string() })?;
        // The key already names the owner; a record of another owner would be a hash collision.
        Ok(Some(record).filter(|r| r.owner == owner))
    }

    /// Deletes response `id` of `owner`; whether it existed.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<bool, StoreError> {
        let key = self.key(owner, id);
        let removed: u64 =
            self.link.run(|mut c| async move { redis::cmd("DEL").arg(&key).query_async(&mut c).await }).await?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_owners() {
        let link = Arc::new(RedisLink::new("redis://127.0.0.1:1").unwrap());
        let store = ResponseStore::new(link, "p", Duration::from_secs(60));
        let (a, b) = (store.key("alice", "resp_1"), store.key("bob", "resp_1"));
        assert_ne!(a, b);
        assert!(a.starts_with("p:response:") && a.ends_with(":resp_1"));
        assert!(!a.contains("alice"), "owners are hashed: any characters are safe in a key");
    }
}
