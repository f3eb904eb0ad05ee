//! The arena's state in Redis: open battles (two checkpoints' answers shown
//! to one user, identities hidden) and the votes that close them.
//!
//! A battle is a short-lived key holding which checkpoint wrote answer `a`
//! and which wrote `b`, and whose battle it is. Voting removes that key and
//! appends the vote to [`feedback::arena::STREAM`] in one Lua script, so a
//! battle takes one vote, exactly once, on any replica. Votes are read back
//! incrementally and kept in memory for the leaderboard.

use std::sync::Arc;
use std::time::Duration;

use feedback::arena::{ArenaVote, STREAM, VOTE_SCHEMA_VERSION, Verdict};
use feedback::events::{new_id, now_ms};
use feedback::{LinkError, RedisLink};
use serde::{Deserialize, Serialize};

use crate::keys::ApiKey;

/// `[gateway.arena]`: blind side-by-side votes and the leaderboard fitted to them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArenaConfig {
    /// Serve `POST /v1/playground/arena` (battles need two loaded checkpoints).
    pub enabled: bool,
    /// How long a battle waits for its vote.
    pub battle_ttl_secs: u64,
    /// Bootstrap resamples behind each confidence interval.
    pub bootstrap_rounds: usize,
    /// Coverage of the leaderboard's intervals (and of the vote gate's).
    pub confidence: f64,
    /// Promote a verified candidate once voters prefer it to the serving checkpoint
    /// (the lower bound of P(candidate beats serving) above 0.5), and refuse it
    /// once they prefer the serving one (the upper bound below 0.5).
    pub gate: bool,
    /// Votes involving a candidate before the vote gate decides anything.
    pub gate_min_votes: usize,
    /// How often each replica re-reads the votes and applies the gate.
    pub gate_interval_secs: u64,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            battle_ttl_secs: 3600,
            bootstrap_rounds: 200,
            confidence: 0.95,
            gate: false,
            gate_min_votes: 30,
            gate_interval_secs: 5,
        }
    }
}

impl ArenaConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.5..1.0).contains(&self.confidence) {
            return Err(format!("confidence must be in [0.5, 1), got {}", self.confidence));
        }
        if self.bootstrap_rounds < 20 {
            return Err(format!("bootstrap_rounds must be at least 20, got {}", self.bootstrap_rounds));
        }
        if self.battle_ttl_secs == 0 || self.gate_interval_secs == 0 {
            return Err("battle_ttl_secs and gate_interval_secs must be positive".into());
        }
        Ok(())
    }
}

/// What a battle key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Battle {
    user: String,
    checkpoint_a: String,
    checkpoint_b: String,
    created_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// Unknown, expired, already voted, or another user's (indistinguishable on purpose).
    #[error("no open battle '{0}' for this user: it expired, was already voted on, or never existed")]
    NoBattle(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("encoding an arena record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Removes the battle and appends the vote, or does nothing if the battle
/// changed or is gone. KEYS: battle, stream. ARGV: the battle's JSON as read,
/// then the entry's field/value pairs.
const VOTE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
redis.call('DEL', KEYS[1])
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
";

/// Votes already read, and where reading stopped.
#[derive(Default)]
struct VoteCache {
    last_id: Option<String>,
    votes: Vec<ArenaVote>,
}

pub struct Arena {
    link: Arc<RedisLink>,
    prefix: String,
    ttl: Duration,
    cache: tokio::sync::Mutex<VoteCache>,
}

impl Arena {
    pub fn new(link: Arc<RedisLink>, prefix: &str, ttl: Duration) -> Self {
        Self { link, prefix: format!("{prefix}:arena:battle"), ttl, cache: Default::default() }
    }

    fn battle_key(&self, id: &str) -> String {
        format!("{}:{id}", self.prefix)
    }

    /// Opens a battle for `user` between the checkpoints behind answers `a` and `b`; returns its id.
    pub async fn open(&self, user: &str, checkpoint_a: &str, checkpoint_b: &str) -> Result<String, ArenaError> {
        let id = new_id("bat");
        let battle = Battle {
            user: user.to_string(),
            checkpoint_a: checkpoint_a.to_string(),
            checkpoint_b: checkpoint_b.to_string(),
            created_at_ms: now_ms(),
        };
        let json = serde_json::to_string(&battle)?;
        let (key, ttl) = (self.battle_key(&id), self.ttl.as_secs().max(1));
        self.link
            .run(|mut c| async move {
                redis::cmd("SET").arg(key).arg(json).arg("EX").arg(ttl).query_async::<()>(&mut c).await
            })
            .await?;
        Ok(id)
    }

    /// Records `caller`'s verdict on battle `id` (once) and returns the vote, identities included.
    pub async fn vote(&self, id: &str, caller: &ApiKey, verdict: Verdict) -> Result<ArenaVote, ArenaError> {
        let key = self.battle_key(id);
        let read_key = key.clone();
        let stored: Option<String> =
            self.link.run(|mut c| async move { redis::cmd("GET").arg(read_key).query_async(&mut c).await }).await?;
        let no_battle = || ArenaError::NoBattle(id.to_string());
        let stored = stored.ok_or_else(no_battle)?;
        let battle: Battle = serde_json::from_str(&stored).map_err(|_| no_battle())?;
        if battle.user != caller.user {
            return Err(no_battle());
        }
        let vote = ArenaVote {
            schema_version: VOTE_SCHEMA_VERSION,
            battle_id: id.to_string(),
            checkpoint_a: battle.checkpoint_a,
            checkpoint_b: battle.checkpoint_b,
            verdict,
            user: caller.user.clone(),
            organization: caller.organization.clone(),
            key_id: caller.id.clone(),
            created_at_ms: now_ms(),
        };
        let fields = vote.fields()?;
        let appended: Option<String> = self
            .link
            .run(|mut c| async move {
                let mut script = redis::cmd("EVAL");
                script.arg(VOTE_SCRIPT).arg(2).arg(key).arg(STREAM).arg(stored);
                for (field, value) in fields {
                    script.arg(field).arg(value);
                }
                script.query_async(&mut c).await
            })
            .await?;
        // `None`: another request voted (or the battle expired) between the read and the script.
        appended.map(|_| vote).ok_or_else(no_battle)
    }

    /// Every vote so far, oldest first (new entries are read from where the last call stopped).
    pub async fn votes(&self) -> Result<Vec<ArenaVote>, LinkError> {
        let mut cache = self.cache.lock().await;
        loop {
            let start = cache.last_id.as_ref().map_or_else(|| "-".to_string(), |id| format!("({id}"));
            let reply: redis::streams::StreamRangeReply = self
                .link
                .run(|mut c| async move {
                    redis::cmd("XRANGE")
                        .arg(STREAM)
                        .arg(start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let Some(last) = reply.ids.last() else { break };
            cache.last_id = Some(last.id.clone());
            let full = reply.ids.len() == 1000;
            for entry in &reply.ids {
                let Some(event) = entry.get::<String>("event") else { continue };
                match ArenaVote::from_event(&event) {
                    Ok(Some(vote)) => cache.votes.push(vote),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(entry = %entry.id, error = %e, "unreadable arena vote skipped"),
                }
            }
            if !full {
                break;
            }
        }
        Ok(cache.votes.clone())
    }
}
