//! API keys: records in Redis, looked up by the SHA-256 of the secret.
//!
//! The secret itself is never stored; it is shown once, when the key is
//! created. Lookups are cached for [`CACHE_TTL`]; every status change is also
//! announced on a Redis channel that each replica follows, so a suspension or
//! revocation leaves every replica's cache at once (the TTL only bounds the
//! staleness while that channel is down). A revocation is final: a revoked
//! key stays refused from the cache, even while Redis is away. When Redis is
//! unreachable, keys seen before keep working from the cache (stale) and the
//! bootstrap admin key works from memory; unknown keys get a 503, since we
//! cannot tell whether they are valid.
//!
//! The bootstrap admin key (`INSTRUCTD_ADMIN_KEY`) is one record,
//! [`BOOTSTRAP_KEY_ID`], bound to one secret at a time: binding a new secret
//! unbinds the old one and never changes the record's status, so a revoked
//! bootstrap key stays revoked whatever secret a restart brings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use inference::engine::Tenant;

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
    /// Pin a request to a checkpoint other than the serving one (`model@ckpt`):
    /// the canary or a verified candidate. Admin keys have it implicitly.
    PinCheckpoints,
    /// Score completions with the serving reward model (`POST /v1/rewards`).
    Scoring,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Completions => "completions",
            Scope::Playground => "playground",
            Scope::Labeler => "labeler",
            Scope::Admin => "admin",
            Scope::PinCheckpoints => "pin_checkpoints",
            Scope::Scoring => "scoring",
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
    /// The key's organisation's share of the engine against other waiting
    /// organisations (records written before weights existed read as 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
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

    /// Whom the engine charges this key's work to: its organisation, so that
    /// one organisation's many keys share one fair share. Keys of one
    /// organisation with different weights: the latest request's weight applies.
    pub fn tenant(&self) -> Tenant {
        Tenant::new(format!("org:{}", self.organization), self.weight)
    }
}

/// Weights an operator may give a key: 1 (the default) up to this.
pub const MAX_WEIGHT: u32 = 1000;

fn default_weight() -> u32 {
    1
}

fn check_weight(weight: u32) -> Result<u32, KeyError> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(weight)
    } else {
        Err(KeyError::Invalid {
            param: Some("weight"),
            message: format!("'weight' must be between 1 and {MAX_WEIGHT}, got {weight}"),
        })
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
    /// Fair-sharing weight (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
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
    /// The change conflicts with the key's state (a revoked key's status is final).
    #[error("{0}")]
    Conflict(String),
}

impl From<LinkError> for KeyError {
    fn from(e: LinkError) -> Self {
        KeyError::Unavailable(e.to_string())
    }
}

/// Binds the bootstrap admin secret to its record, atomically. KEYS: the
/// record, the index, the presented secret's hash key, the pointer to the
/// bootstrap's bound hash key. ARGV: a fresh record (stored only when none
/// exists: an existing record keeps its status), its id. Returns the record.
const BIND_BOOTSTRAP: &str = r"
local previous = redis.call('GET', KEYS[4])
if previous and previous ~= KEYS[3] then redis.call('DEL', previous) end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SET', KEYS[4], KEYS[3])
return redis.call('GET', KEYS[1])
";

type Entries = HashMap<String, (Arc<ApiKey>, Instant)>;

/// Looked-up keys by secret hash. Revoked entries never expire.
#[derive(Default)]
struct Cache {
    entries: Mutex<Entries>,
    /// Bumped by every invalidation: a lookup that began before one does not fill the cache.
    epoch: AtomicU64,
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, hash: &str) -> Option<(Arc<ApiKey>, Instant)> {
        self.lock().get(hash).cloned()
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Caches a lookup unless an invalidation came in since it began at `epoch`.
    fn fill(&self, epoch: u64, hash: String, key: Arc<ApiKey>) {
        let mut entries = self.lock();
        if self.epoch() == epoch {
            entries.insert(hash, (key, Instant::now()));
        }
    }

    /// A key changed status: a revoked one is kept as revoked, any other is dropped.
    fn invalidate(&self, id: &str, status: Option<KeyStatus>) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if status == Some(KeyStatus::Revoked) {
            for (key, _) in entries.values_mut().filter(|(key, _)| key.id == id) {
                let mut revoked = (**key).clone();
                revoked.status = KeyStatus::Revoked;
                *key = Arc::new(revoked);
            }
        } else {
            entries.retain(|_, (key, _)| key.id != id);
        }
    }

    /// Forgets everything but revocations (changes may have been missed).
    fn clear(&self) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.retain(|_, (key, _)| key.status == KeyStatus::Revoked);
    }
}

pub struct KeyStore {
    link: Arc<RedisLink>,
    prefix: String,
    default_limits: KeyLimits,
    bootstrap: Option<(String, ApiKey)>,
    cache: Arc<Cache>,
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
                weight: 1,
                labeler_group: LabelerGroup::Training,
                status: KeyStatus::Active,
                status_reason: None,
                secret_prefix: secret_prefix(secret),
                created_at: now_secs(),
            };
            (hash_secret(secret), key)
        });
        Self { link, prefix: prefix.to_string(), default_limits, bootstrap, cache: Arc::new(Cache::default()) }
    }

    /// Finds the key for a presented secret. `NotFound` covers unknown secrets.
    pub async fn authenticate(&self, secret: &str) -> Result<Arc<ApiKey>, KeyError> {
        let hash = hash_secret(secret);
        if let Some((key, at)) = self.cache.get(&hash)
            && (key.status == KeyStatus::Revoked || at.elapsed() < CACHE_TTL)
        {
            return Ok(key);
        }
        let epoch = self.cache.epoch();
        match self.lookup(&hash).await {
            Ok(key) => {
                let key = Arc::new(key);
                self.cache.fill(epoch, hash, key.clone());
                Ok(key)
            }
            Err(KeyError::Unavailable(reason)) => {
                if let Some((key, _)) = self.cache.get(&hash) {
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
        let keys = [hash_key.clone(), self.bootstrap_pointer()];
        let (id, bound): (Option<String>, Option<String>) =
            self.link.run(|mut c| async move { redis::cmd("MGET").arg(&keys[..]).query_async(&mut c).await }).await?;
        // The bootstrap record answers only to the secret bound last.
        let id = id.filter(|id| id != BOOTSTRAP_KEY_ID || bound.as_deref() == Some(hash_key.as_str()));
        match (id, &self.bootstrap) {
            (Some(id), _) => self.get(&id).await,
            // This replica's bootstrap secret, not bound yet: bind it (first use, or a rotated secret).
            (None, Some((bootstrap_hash, key))) if bootstrap_hash == hash => self.bind_bootstrap(key, hash).await,
            (None, _) => Err(KeyError::NotFound),
        }
    }

    /// Binds `hash` to the bootstrap record (created if missing, its status
    /// untouched if not) and unbinds the secret bound before.
    async fn bind_bootstrap(&self, key: &ApiKey, hash: &str) -> Result<ApiKey, KeyError> {
        let json =
            serde_json::to_string(key).map_err(|e| KeyError::Corrupt { id: key.id.clone(), message: e.to_string() })?;
        let keys = [self.record_key(&key.id), self.index_key(), self.hash_key(hash), self.bootstrap_pointer()];
        let id = key.id.clone();
        let stored: Option<String> = self
            .link
            .run(|mut c| async move {
                let script = redis::Script::new(BIND_BOOTSTRAP);
                let mut invocation = script.prepare_invoke();
                for k in &keys {
                    invocation.key(k);
                }
                invocation.arg(json).arg(&id).invoke_async(&mut c).await
            })
            .await?;
        self.announce(&key.id, None).await;
        let stored = stored.ok_or(KeyError::NotFound)?;
        let record: ApiKey = serde_json::from_str(&stored)
            .map_err(|e| KeyError::Corrupt { id: key.id.clone(), message: e.to_string() })?;
        if record.status != KeyStatus::Active {
            tracing::warn!(
                status = ?record.status,
                "INSTRUCTD_ADMIN_KEY is bound to the bootstrap admin key, which is not active; it grants nothing"
            );
        }
        Ok(record)
    }

    /// Tells every replica (this one at once) that key `id` changed.
    async fn announce(&self, id: &str, status: Option<KeyStatus>) {
        self.cache.invalidate(id, status);
        let channel = self.channel();
        let message = format!("{id} {}", status.map_or("changed", status_name));
        let published = self
            .link
            .run(
                |mut c| async move { redis::cmd("PUBLISH").arg(channel).arg(message).query_async::<i64>(&mut c).await },
            )
            .await;
        if let Err(e) = published {
            tracing::warn!(key = %id, error = %e, "key change not announced; other replicas see it within the cache TTL");
        }
    }

    /// Follows the changes every replica announces and applies them to this
    /// replica's cache; reconnects while Redis is away. Spawned once per process.
    pub fn spawn_invalidations(&self) -> tokio::task::JoinHandle<()> {
        let cache = self.cache.clone();
        let url = self.link.url().to_string();
        let channel = self.channel();
        tokio::spawn(async move {
            loop {
                if let Err(e) = follow_changes(&url, &channel, &cache).await {
                    tracing::debug!(error = %e, "key change channel lost; reconnecting");
                }
                tokio::time::sleep(feedback::redis_link::RETRY_INTERVAL).await;
            }
        })
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
        let weight = check_weight(new.weight.unwrap_or(1))?;
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
            weight,
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
            return Err(KeyError::Conflict(format!("Key {id} is revoked; its status cannot change.")));
        }
        key.status = status;
        key.status_reason = reason;
        self.store(&key, None).await?;
        self.announce(id, Some(status)).await;
        Ok(key)
    }

    /// Sets a key's fair-sharing weight; every replica's cache drops the key.
    pub async fn set_weight(&self, id: &str, weight: u32) -> Result<ApiKey, KeyError> {
        let weight = check_weight(weight)?;
        let mut key = self.get(id).await?;
        key.weight = weight;
        self.store(&key, None).await?;
        self.announce(id, None).await;
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

    /// Holds the hash key of the secret the bootstrap record is bound to.
    fn bootstrap_pointer(&self) -> String {
        format!("{}:bootstrap_keyhash", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:keys:changed", self.prefix)
    }
}

fn status_name(status: KeyStatus) -> &'static str {
    match status {
        KeyStatus::Active => "active",
        KeyStatus::Suspended => "suspended",
        KeyStatus::Revoked => "revoked",
    }
}

/// Subscribes to the change channel and applies each `"<id> <status>"` message.
async fn follow_changes(url: &str, channel: &str, cache: &Cache) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut pubsub = tokio::time::timeout(feedback::redis_link::TIMEOUT * 2, client.get_async_pubsub())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    pubsub.subscribe(channel).await.map_err(|e| e.to_string())?;
    // Changes announced while nobody listened are unknown: look everything up afresh.
    cache.clear();
    let mut messages = std::pin::pin!(pubsub.on_message());
    while let Some(message) = messages.next().await {
        let Ok(payload) = message.get_payload::<String>() else { continue };
        if let Some((id, status)) = payload.split_once(' ') {
            cache.invalidate(id, (status == "revoked").then_some(KeyStatus::Revoked));
        }
    }
    Err("subscription ended".into())
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
            weight: None,
            labeler_group: LabelerGroup::Training,
        }
    }

    #[tokio::test]
    async fn weights_default_to_one_are_checked_and_name_the_organisation() {
        let server = RedisServer::start().unwrap();
        let store = KeyStore::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "t", limits(), None);
        let (key, _) = store.create(new_key(vec![Scope::Completions])).await.unwrap();
        assert_eq!(key.tenant(), Tenant::new("org:alice", 1));
        assert!(matches!(
            store.create(NewKey { weight: Some(0), ..new_key(vec![Scope::Completions]) }).await,
            Err(KeyError::Invalid { param: Some("weight"), .. })
        ));
        assert_eq!(store.set_weight(&key.id, 5).await.unwrap().weight, 5);
        assert!(store.set_weight(&key.id, MAX_WEIGHT + 1).await.is_err());
        assert_eq!(store.get(&key.id).await.unwrap().tenant().weight, 5);
        // Records written before weights existed read as weight 1.
        let mut old = serde_json::to_value(&key).unwrap();
        old.as_object_mut().unwrap().remove("weight");
        assert_eq!(serde_json::from_value::<ApiKey>(old).unwrap().weight, 1);
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
        assert!(matches!(store.set_status(&key.id, KeyStatus::Active, None).await, Err(KeyError::Conflict(_))));
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

    const ADMIN_A: &str = "sk-admin-a-0123456789abcdef0123456789";
    const ADMIN_B: &str = "sk-admin-b-0123456789abcdef0123456789";

    #[tokio::test]
    async fn a_rebound_bootstrap_secret_keeps_the_record_status() {
        let server = RedisServer::start().unwrap();
        let link = || Arc::new(RedisLink::new(&server.url()).unwrap());
        let first = KeyStore::new(link(), "t", limits(), Some(ADMIN_A));
        assert_eq!(first.authenticate(ADMIN_A).await.unwrap().status, KeyStatus::Active);
        first.set_status(BOOTSTRAP_KEY_ID, KeyStatus::Revoked, None).await.unwrap();
        assert_eq!(first.authenticate(ADMIN_A).await.unwrap().status, KeyStatus::Revoked);

        let rotated = KeyStore::new(link(), "t", limits(), Some(ADMIN_B));
        assert_eq!(rotated.authenticate(ADMIN_B).await.unwrap().status, KeyStatus::Revoked);
        assert!(matches!(rotated.authenticate(ADMIN_A).await, Err(KeyError::NotFound)));
        let keys = rotated.list().await.unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].status, KeyStatus::Revoked);
    }

    #[tokio::test]
    async fn a_revocation_reaches_another_replica_before_the_cache_ttl() {
        let server = RedisServer::start().unwrap();
        let link = || Arc::new(RedisLink::new(&server.url()).unwrap());
        let store = KeyStore::new(link(), "t", limits(), None);
        let other = KeyStore::new(link(), "t", limits(), None);
        let listener = other.spawn_invalidations();
        let (key, secret) = store.create(new_key(vec![Scope::Completions])).await.unwrap();
        assert_eq!(other.authenticate(&secret).await.unwrap().status, KeyStatus::Active);
        // Let the subscription start (it clears the cache when it does).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(other.authenticate(&secret).await.unwrap().status, KeyStatus::Active);
        let revoked_at = Instant::now();
        store.set_status(&key.id, KeyStatus::Revoked, None).await.unwrap();
        loop {
            if other.authenticate(&secret).await.unwrap().status == KeyStatus::Revoked {
                break;
            }
            assert!(revoked_at.elapsed() < CACHE_TTL / 5, "the revocation waited for the cache TTL");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Final, even with Redis gone.
        drop(server);
        assert_eq!(other.authenticate(&secret).await.unwrap().status, KeyStatus::Revoked);
        listener.abort();
    }
}
