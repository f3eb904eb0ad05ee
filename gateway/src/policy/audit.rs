//! The audit trail of policy decisions: refusals and key status changes go
//! to the `instructd:audit` stream, and refusals are counted per key in a
//! sliding window so that a key probing the policy is suspended.
//!
//! The count lives in Redis (a sorted set per key, scored by time) so every
//! replica sees the same number. Redis trouble never fails a request: it is
//! logged and the refusal simply goes uncounted.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use feedback::RedisLink;
use feedback::streams::AUDIT;

use super::Refusal;
use super::classifier::Classification;

/// Approximate cap on the audit stream: it is an operations record, not
/// training data, and must not grow without bound.
pub const AUDIT_MAXLEN: u64 = 100_000;

/// Prefix of the per-key sorted sets of recent refusal times.
pub const REFUSALS_PREFIX: &str = "instructd:refusals";

pub struct AuditLog {
    link: Arc<RedisLink>,
    max_refusals: u32,
    window: Duration,
}

impl AuditLog {
    /// `max_refusals` refusals within `window` make
    /// [`record_refusal`](Self::record_refusal) answer true; 0 disables auto-suspension.
    pub fn new(link: Arc<RedisLink>, max_refusals: u32, window: Duration) -> Self {
        Self { link, max_refusals, window }
    }

    /// XADDs the refusal and returns true when this key has reached
    /// `max_refusals` refusals within the window; the caller then suspends
    /// the key and calls [`record_status_change`](Self::record_status_change).
    /// True again for every further refusal while the count stays at or over
    /// the limit (suspending twice is harmless; missing a suspension is not).
    /// Redis errors are logged and answer false.
    pub async fn record_refusal(
        &self,
        key_id: &str,
        user: &str,
        org: &str,
        classification: &Classification,
        refusal: &Refusal,
    ) -> bool {
        let now = now_ms();
        let mut fields: Vec<(&str, String)> = vec![
            ("kind", "refusal".into()),
            ("key_id", key_id.into()),
            ("user", user.into()),
            ("org", org.into()),
            ("use_case", classification.use_case.as_str().into()),
        ];
        if let Refusal::HighStakesDomain { domain } = refusal {
            fields.push(("domain", domain.as_str().into()));
        }
        fields.extend([("code", refusal.code().into()), ("message", refusal.message()), ("time_ms", now.to_string())]);

        let mut pipe = redis::pipe();
        // MULTI/EXEC: the count read back includes this refusal and no
        // other replica's half-done update.
        pipe.atomic();
        pipe.cmd("XADD").arg(AUDIT).arg("MAXLEN").arg("~").arg(AUDIT_MAXLEN).arg("*").arg(&fields).ignore();
        let counting = self.max_refusals > 0;
        if counting {
            let set = refusals_key(key_id);
            let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX).max(1);
            // A random suffix keeps two refusals in the same millisecond
            // (from two replicas) as two members.
            let member = format!("{now}-{:016x}", rand::random::<u64>());
            pipe.cmd("ZADD").arg(&set).arg(now).arg(member).ignore();
            pipe.cmd("ZREMRANGEBYSCORE").arg(&set).arg("-inf").arg(now.saturating_sub(window_ms)).ignore();
            pipe.cmd("ZCARD").arg(&set);
            // The set dies with its last refusal's window: no sweeper needed.
            pipe.cmd("PEXPIRE").arg(&set).arg(window_ms).ignore();
        }
        let result = self
            .link
            .run(|mut connection| async move {
                if counting {
                    pipe.query_async::<(u64,)>(&mut connection).await.map(|(count,)| count)
                } else {
                    pipe.query_async::<()>(&mut connection).await.map(|()| 0)
                }
            })
            .await;
        match result {
            Ok(count) => counting && count >= u64::from(self.max_refusals),
            Err(error) => {
                tracing::warn!(key = key_id, %error, "could not record a policy refusal; it goes uncounted");
                false
            }
        }
    }

    /// XADDs a key status change: `kind=key_suspended` for a suspension,
    /// `kind=key_status_changed` otherwise, with status, reason and who did it.
    pub async fn record_status_change(&self, key_id: &str, status: &str, reason: &str, actor: &str) {
        let kind = if status == "suspended" { "key_suspended" } else { "key_status_changed" };
        let fields: [(&str, String); 6] = [
            ("kind", kind.into()),
            ("key_id", key_id.into()),
            ("status", status.into()),
            ("reason", reason.into()),
            ("actor", actor.into()),
            ("time_ms", now_ms().to_string()),
        ];
        let result = self
            .link
            .run(|mut connection| async move {
                redis::cmd("XADD")
                    .arg(AUDIT)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(AUDIT_MAXLEN)
                    .arg("*")
                    .arg(&fields)
                    .query_async::<String>(&mut connection)
                    .await
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(key = key_id, status, %error, "could not record a key status change in the audit stream");
        }
    }

    /// Forgets a key's recent refusals, so a key an administrator reinstates
    /// is not suspended again by its next refusal.
    pub async fn reset_refusals(&self, key_id: &str) -> Result<(), feedback::LinkError> {
        let set = refusals_key(key_id);
        self.link
            .run(|mut connection| async move { redis::cmd("DEL").arg(set).query_async::<()>(&mut connection).await })
            .await
    }
}

fn refusals_key(key_id: &str) -> String {
    format!("{REFUSALS_PREFIX}:{key_id}")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use feedback::redis_server::RedisServer;
    use redis::streams::StreamRangeReply;

    use super::*;
    use crate::policy::{Domain, UseCase};

    fn refusal() -> (Classification, Refusal) {
        let classification = Classification {
            use_case: UseCase::OpenQa,
            domains: vec![Domain::MedicalDiagnosis],
            declared_accepted: None,
        };
        (classification, Refusal::HighStakesDomain { domain: Domain::MedicalDiagnosis })
    }

    async fn audit_entries(link: &RedisLink) -> Vec<HashMap<String, String>> {
        let reply: StreamRangeReply = link
            .run(|mut c| async move { redis::cmd("XRANGE").arg(AUDIT).arg("-").arg("+").query_async(&mut c).await })
            .await
            .unwrap();
        reply
            .ids
            .iter()
            .map(|entry| entry.map.keys().map(|k| (k.clone(), entry.get::<String>(k).unwrap())).collect())
            .collect()
    }

    #[tokio::test]
    async fn third_refusal_within_window_suspends() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let audit = AuditLog::new(link.clone(), 3, Duration::from_secs(60));
        let (classification, refusal) = refusal();
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(audit.record_refusal("key_1", "alice", "acme", &classification, &refusal).await);
        }
        assert_eq!(answers, [false, false, true]);
        // Another key's count is its own.
        assert!(!audit.record_refusal("key_2", "bob", "acme", &classification, &refusal).await);

        let entries = audit_entries(&link).await;
        assert_eq!(entries.len(), 4);
        let first = &entries[0];
        assert_eq!(first["kind"], "refusal");
        assert_eq!(first["key_id"], "key_1");
        assert_eq!(first["user"], "alice");
        assert_eq!(first["org"], "acme");
        assert_eq!(first["use_case"], "open_qa");
        assert_eq!(first["domain"], "medical_diagnosis");
        assert_eq!(first["code"], "use_case_not_allowed");
        assert_eq!(first["message"], refusal.message());
        assert!(first["time_ms"].parse::<u64>().unwrap() > 0);
        assert_eq!(entries.iter().filter(|e| e["key_id"] == "key_1").count(), 3);

        audit.record_status_change("key_1", "suspended", "3 refusals", "policy").await;
        let entries = audit_entries(&link).await;
        let last = entries.last().unwrap();
        assert_eq!(
            (last["kind"].as_str(), last["status"].as_str(), last["reason"].as_str(), last["actor"].as_str()),
            ("key_suspended", "suspended", "3 refusals", "policy")
        );

        audit.reset_refusals("key_1").await.unwrap();
        assert!(!audit.record_refusal("key_1", "alice", "acme", &classification, &refusal).await);
    }

    #[tokio::test]
    async fn refusals_outside_the_window_are_forgotten() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let audit = AuditLog::new(link, 2, Duration::from_millis(150));
        let (classification, refusal) = refusal();
        assert!(!audit.record_refusal("k", "u", "o", &classification, &refusal).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!audit.record_refusal("k", "u", "o", &classification, &refusal).await);
        assert!(audit.record_refusal("k", "u", "o", &classification, &refusal).await);
    }

    #[tokio::test]
    async fn redis_down_never_suspends() {
        let mut server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        server.stop();
        let audit = AuditLog::new(link, 1, Duration::from_secs(60));
        let (classification, refusal) = refusal();
        assert!(!audit.record_refusal("k", "u", "o", &classification, &refusal).await);
        audit.record_status_change("k", "suspended", "test", "admin").await;
    }
}
