//! Playground users' consent to the training-use notice, kept in Redis so
//! every replica sees an acceptance or a withdrawal at once.
//!
//! Only `Accepted` for the *current* notice version allows logging; a user
//! who accepted an older notice must accept again.

use std::sync::Arc;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::event_log::ConsentGuard;
use crate::events::now_ms;
use crate::redis_link::{LinkError, RedisLink};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    /// Never answered.
    None,
    Accepted,
    Withdrawn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub status: ConsentStatus,
    /// The notice version accepted (kept after a withdrawal, for the record).
    pub notice_version: Option<String>,
    pub accepted_at_ms: Option<u64>,
    pub withdrawn_at_ms: Option<u64>,
}

impl Consent {
    fn none() -> Self {
        Self { status: ConsentStatus::None, notice_version: None, accepted_at_ms: None, withdrawn_at_ms: None }
    }

    /// Whether prompts may be logged under `current_notice`.
    pub fn allows_logging(&self, current_notice: &str) -> bool {
        self.status == ConsentStatus::Accepted && self.notice_version.as_deref() == Some(current_notice)
    }
}

pub struct ConsentStore {
    link: Arc<RedisLink>,
    prefix: String,
}

impl ConsentStore {
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> Self {
        Self { link, prefix: prefix.to_string() }
    }

    fn key(&self, user: &str) -> String {
        format!("{}:consent:{user}", self.prefix)
    }

    /// The guard that makes an event-log write conditional on `user`'s consent to `notice_version`.
    pub fn guard(&self, user: &str, notice_version: &str) -> ConsentGuard {
        ConsentGuard { user: user.to_string(), key: self.key(user), notice_version: notice_version.to_string() }
    }

    pub async fn get(&self, user: &str) -> Result<Consent, LinkError> {
        let key = self.key(user);
        let json: Option<String> = self.link.run(|mut c| async move { c.get(key).await }).await?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_else(Consent::none))
    }

    pub async fn accept(&self, user: &str, notice_version: &str) -> Result<Consent, LinkError> {
        let consent = Consent {
            status: ConsentStatus::Accepted,
            notice_version: Some(notice_version.to_string()),
            accepted_at_ms: Some(now_ms()),
            withdrawn_at_ms: None,
        };
        self.put(user, &consent).await?;
        Ok(consent)
    }

    pub async fn withdraw(&self, user: &str) -> Result<Consent, LinkError> {
        let mut consent = self.get(user).await?;
        consent.status = ConsentStatus::Withdrawn;
        consent.withdrawn_at_ms = Some(now_ms());
        self.put(user, &consent).await?;
        Ok(consent)
    }

    async fn put(&self, user: &str, consent: &Consent) -> Result<(), LinkError> {
        let key = self.key(user);
        let json = serde_json::to_string(consent).unwrap_or_default();
        self.link.run(|mut c| async move { c.set::<_, _, ()>(key, json).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::RedisServer;

    #[tokio::test]
    async fn accept_withdraw_and_notice_versions() {
        let server = RedisServer::start().unwrap();
        let store = ConsentStore::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t");
        assert_eq!(store.get("u").await.unwrap().status, ConsentStatus::None);
        store.accept("u", "v1").await.unwrap();
        assert!(store.get("u").await.unwrap().allows_logging("v1"));
        assert!(!store.get("u").await.unwrap().allows_logging("v2"), "a new notice needs a new acceptance");
        let withdrawn = store.withdraw("u").await.unwrap();
        assert_eq!(withdrawn.notice_version.as_deref(), Some("v1"));
        assert!(!store.get("u").await.unwrap().allows_logging("v1"));
    }
}
