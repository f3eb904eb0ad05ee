//! API keys: records in Redis, looked up by the SHA-256 of the secret.
//!
//! The secret itself is never stored; it is shown once, when the key is
//! created. Lookups are cached for [`CACHE_TTL`] so a suspension reaches every
//! replica within a second without a Redis round trip per request. When Redis
//! is unreachable, keys seen before keep working from the cache (stale) and
//! the bootstrap admin key works from memory; unknown keys get a 503, since
//! we cannot tell whether they are valid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::{Domain, UseCase};
use crate::rate_limit::KeyLimits;
use feedback::events::LabelerGroup;
use feedback::{LinkError, RedisLink};

/// How long a looked-up key is trusted before Redis is asked again.
pub const CACHE_TTL: Duration = Duration::from_millis(500);
/// Id of the key that `INSTRUCTD_ADMIN_KEY` bootstraps.
pub const BOOTSTRAP_KEY_ID: &str = "key_bootstrap_admin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Completions,
    Playground,
    Labeler,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Completions => "completions",
            Scope::Playground => "playground",
            Scope::Labeler => "labeler",
            Scope::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Suspended,
    Revoked,
}

/// A key as stored and as the admin API shows it (never with its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub user: String,
    pub organization: String,
    pub scopes: Vec<Scope>,
    /// Allowed use-case categories; empty allows all.
    pub use_cases: Vec<UseCase>,
    /// High-stakes domains this key is approved for.
    pub approved_domains: Vec<Domain>,
    pub limits: KeyLimits,
    /// For labeler keys: whether their judgments train models or only evaluate them.
    #[serde(default)]
    pub labeler_group: LabelerGroup,
    pub status: KeyStatus,
    pub status_reason: Option<String>,
    /// The secret's first characters, to recognise it in a list.
    pub secret_prefix: String,
    pub created_at: u64,
}

impl ApiKey {
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// What an admin asks for when creating a key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: String,
    pub user: String,
    #[serde(default)]
    pub organization: Option<String>,
    pub scopes: Vec<Scope>,
    #[serde(default)]
    pub use_cases: Vec<UseCase>,
    #[serde(default)]
    pub approved_domains: Vec<Domain>,
    pub limits: Option<KeyLimits>,
    #[serde(default)]
    pub labeler_group: LabelerGroup,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no such key")]
    NotFound,
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt key record {id}: {message}")]
    Corrupt { id: String, message: String },
    #[error("invalid key request: {message}")]
    Invalid { param: Option<&'static str>, message: String },
}

impl From<LinkError> for KeyError {
    fn from(e: LinkError) -> Self {
        KeyError::Unavailable(e.to_string())
    }
}

pub struct KeyStore {
    link: Arc<RedisLink>,
    prefix: String,
    default_limits: KeyLimits,
    bootstrap: Option<(String, ApiKey)>,
    cache: Mutex<HashMap<String, (Arc<ApiKey>, Instant)>>,
}

impl KeyStore {
    /// `admin_secret` is `INSTRUCTD_ADMIN_KEY`, if set.
    pub fn new(link: Arc<RedisLink>, prefix: &str, default_limits: KeyLimits, admin_secret: Option<&str>) -> Self {
        let bootstrap = admin_secret.filter(|s| !s.is_empty()).map(|secret| {
            let key = ApiKey {
                id: BOOTSTRAP_KEY_ID.into(),
                name: "bootstrap admin (INSTRUCTD_ADMIN_KEY)".into(),
                user: "admin".into(),
                organization: "instructd".into(),
                scopes: vec![Scope::Admin],
                use_cases: Vec::new(),
                approved_domains: Domain::ALL.to_vec(),
                limits: KeyLimits { requests_per_minute: 0, tokens_per_minute: 0, max_concurrent: 0 },
                labeler_group: LabelerGroup::Training,
                status: KeyStatus::Active,
                status_reason: None,
                secret_prefix: secret_prefix(secret),
                created_at: now_secs(),
            };
            (hash_secret(secret), key)
        });
        Self { link, prefix: prefix.to_string(), default_limits, bootstrap, cache: Mutex::new(HashMap::new()) }
    }

    /// Finds the key for a presented secret. `NotFound` covers unknown secrets.
    pub async fn authenticate(&self, secret: &str) -> Result<Arc<ApiKey>, KeyError> {
        let hash = hash_secret(secret);
        if let Some((key, at)) = self.cache_get(&hash)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(key);
        }
        match self.lookup(&hash).await {
            Ok(key) => {
                let key = Arc::new(key);
                self.cache_lock().insert(hash, (key.clone(), Instant::now()));
                Ok(key)
            }
            Err(KeyError::Unavailable(reason)) => {
                if let Some((key, _)) = self.cache_get(&hash) {
                    return Ok(key);
                }
                match &self.bootstrap {
                    Some((bootstrap_hash, key)) if *bootstrap_hash == hash => Ok(Arc::new(key.clone())),
                    _ => Err(KeyError::Unavailable(reason)),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn lookup(&self, hash: &str) -> Result<ApiKey, KeyError> {
        let hash_key = self.hash_key(hash);
        let id: Option<String> = self.link.run(|mut c| async move { c.get(hash_key).await }).await?;
        match id {
            Some(id) => self.get(&id).await,
            None => match &self.bootstrap {
                // First use of the bootstrap secret: store it so it can be listed and managed.
                Some((bootstrap_hash, key)) if bootstrap_hash == hash => {
                    self.store(key, Some(hash)).await?;
                    Ok(key.clone())
                }
                _ => Err(KeyError::NotFound),
            },
        }
    }

    pub async fn create(&self, new: NewKey) -> Result<(ApiKey, String), KeyError> {
        if new.user.trim().is_empty() {
            return Err(KeyError::Invalid { param: Some("user"), message: "'user' must be a non-empty string".into() });
        }
        if new.scopes.is_empty() {
            return Err(KeyError::Invalid {
                param: Some("scopes"),
                message: "'scopes' must name at least one scope".into(),
            });
        }
        let secret = format!("sk-instructd-{:032x}{:016x}", rand::random::<u128>(), rand::random::<u64>());
        let key = ApiKey {
            id: format!("key_{:020x}", rand::random::<u128>() >> 48),
            name: new.name,
            organization: new.organization.unwrap_or_else(|| new.user.clone()),
            user: new.user,
            scopes: new.scopes,
            use_cases: new.use_cases,
            approved_domains: new.approved_domains,
            limits: new.limits.unwrap_or(self.default_limits),
            labeler_group: new.labeler_group,
            status: KeyStatus::Active,
            status_reason: None,
            secret_prefix: secret_prefix(&secret),
            created_at: now_secs(),
        };
        self.store(&key, Some(&hash_secret(&secret))).await?;
        Ok((key, secret))
    }

    pub async fn get(&self, id: &str) -> Result<ApiKey, KeyError> {
        let record_key = self.record_key(id);
        let json: Option<String> = self.link.run(|mut c| async move { c.get(record_key).await }).await?;
        let json = json.ok_or(KeyError::NotFound)?;
        serde_json::from_str(&json).map_err(|e| KeyError::Corrupt { id: id.to_string(), message: e.to_string() })
    }

    pub async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        let index = self.index_key();
        let mut ids: Vec<String> = self.link.run(|mut c| async move { c.smembers(index).await }).await?;
        ids.sort();
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            match self.get(&id).await {
                Ok(key) => keys.push(key),
                Err(KeyError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        keys.sort_by_key(|k| k.created_at);
        Ok(keys)
    }

    /// Sets a key's status; a revoked key cannot be reinstated.
    pub async fn set_status(&self, id: &str, status: KeyStatus, reason: Option<String>) -> Result<ApiKey, KeyError> {
        let mut key = self.get(id).await?;
        if key.status == KeyStatus::Revoked && status != KeyStatus::Revoked {
            return Err(KeyError::Invalid {
                param: None,
                message: format!("key {id} is revoked; its status cannot change"),
            });
        }
        key.status = status;
        key.status_reason = reason;
        self.store(&key, None).await?;
        Ok(key)
    }

    async fn store(&self, key: &ApiKey, hash: Option<&str>) -> Result<(), KeyError> {
        let json =
            serde_json::to_string(key).map_err(|e| KeyError::Corrupt { id: key.id.clone(), message: e.to_string() })?;
        let record_key = self.record_key(&key.id);
        let index = self.index_key();
        let id = key.id.clone();
        let hash_key = hash.map(|h| self.hash_key(h));
        self.link
            .run(|mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic().set(record_key, json).ignore().sadd(index, &id).ignore();
                if let Some(hash_key) = hash_key {
                    pipe.set(hash_key, &id).ignore();
                }
                pipe.query_async::<()>(&mut c).await
            })
            .await?;
        Ok(())
    }

    fn record_key(&self, id: &str) -> String {
        format!("{}:key:{id}", self.prefix)
    }

    fn hash_key(&self, hash: &str) -> String {
        format!("{}:keyhash:{hash}", self.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}:keys", self.prefix)
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<ApiKey>, Instant)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache_get(&self, hash: &str) -> Option<(Arc<ApiKey>, Instant)> {
        self.cache_lock().get(hash).cloned()
    }
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn secret_prefix(secret: &str) -> String {
    secret.chars().take(16).collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use feedback::redis_server::RedisServer;

    fn limits() -> KeyLimits {
        KeyLimits { requests_per_minute: 60, tokens_per_minute: 10_000, max_concurrent: 4 }
    }

    fn new_key(scopes: Vec<Scope>) -> NewKey {
        NewKey {
            name: "test".into(),
            user: "alice".into(),
            organization: None,
            scopes,
            use_cases: vec![],
            approved_domains: vec![],
            limits: None,
            labeler_group: LabelerGroup::Training,
        }
    }

    #[tokio::test]
    async fn create_authenticate_suspend_revoke() {
        let server = RedisServer::start().unwrap();
        let store = KeyStore::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t", limits(), None);
        let (key, secret) = store.create(new_key(vec![Scope::Completions])).await.unwrap();
        assert_eq!(key.organization, "alice");
        assert_eq!(key.limits, limits());
        assert_eq!(store.authenticate(&secret).await.unwrap().id, key.id);
        assert!(matches!(store.authenticate("sk-wrong").await, Err(KeyError::NotFound)));

        // A second replica sees the suspension once its cache entry expires.
        let other = KeyStore::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t", limits(), None);
        assert_eq!(other.authenticate(&secret).await.unwrap().status, KeyStatus::Active);
        store.set_status(&key.id, KeyStatus::Suspended, Some("test".into())).await.unwrap();
        tokio::time::sleep(CACHE_TTL + Duration::from_millis(50)).await;
        assert_eq!(other.authenticate(&secret).await.unwrap().status, KeyStatus::Suspended);

        store.set_status(&key.id, KeyStatus::Revoked, None).await.unwrap();
        assert!(matches!(store.set_status(&key.id, KeyStatus::Active, None).await, Err(KeyError::Invalid { .. })));
        assert_eq!(store.list().await.unwrap().len(), 1);
        // The secret is not stored anywhere in Redis.
        let mut conn = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = conn.keys("*").await.unwrap();
        for k in keys {
            let value: String = conn.get(&k).await.unwrap_or_default();
            assert!(!value.contains(&secret) && !k.contains(&secret));
        }
    }

    #[tokio::test]
    async fn bootstrap_key_works_with_and_without_redis() {
        let mut server = RedisServer::start().unwrap();
        let store = KeyStore::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t", limits(), Some("sk-admin"));
        let key = store.authenticate("sk-admin").await.unwrap();
        assert!(key.has_scope(Scope::Completions));
        assert_eq!(store.list().await.unwrap()[0].id, BOOTSTRAP_KEY_ID);
        server.stop();
        let cold = KeyStore::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t", limits(), Some("sk-admin"));
        assert_eq!(cold.authenticate("sk-admin").await.unwrap().id, BOOTSTRAP_KEY_ID);
        assert!(matches!(cold.authenticate("sk-other").await, Err(KeyError::Unavailable(_))));
    }
}
