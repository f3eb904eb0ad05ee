//! Whether the Redis server keeps what it holds across its own restart.
//!
//! Feedback waits in Redis streams until the trainer stores it. A Redis that
//! neither appends to a log (`appendonly`) nor snapshots (`save`) loses that
//! backlog, silently, when it restarts. The gateway and the trainer call
//! [`check_persistence`] at start-up and warn loudly when it says `none`.

use serde::Serialize;

use crate::redis_link::{LinkError, RedisLink};

/// What the server's configuration says about keeping data on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Persistence {
    /// `appendonly yes`: every write is logged to the append-only file.
    pub appendonly: bool,
    /// A non-empty `save` schedule: the data set is snapshotted to disk.
    pub snapshots: bool,
}

impl Persistence {
    /// Whether anything survives a restart of the server.
    pub fn is_durable(&self) -> bool {
        self.appendonly || self.snapshots
    }

    /// `aof`, `rdb`, `aof+rdb` or `none`, as `/readyz` reports it.
    pub fn as_str(&self) -> &'static str {
        match (self.appendonly, self.snapshots) {
            (true, true) => "aof+rdb",
            (true, false) => "aof",
            (false, true) => "rdb",
            (false, false) => "none",
        }
    }
}

/// Asks the server (`CONFIG GET appendonly`, `CONFIG GET save`). Fails when
/// Redis is unreachable or refuses `CONFIG` (some managed services rename it):
/// the persistence is then unknown, not absent.
pub async fn check_persistence(link: &RedisLink) -> Result<Persistence, LinkError> {
    let get = |name: &'static str| {
        link.run(move |mut c| async move {
            let pairs: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut c).await?;
            Ok(pairs.get(1).cloned().unwrap_or_default())
        })
    };
    let appendonly = get("appendonly").await?;
    let save = get("save").await?;
    Ok(Persistence { appendonly: appendonly.eq_ignore_ascii_case("yes"), snapshots: !save.trim().is_empty() })
}

/// Checks the server and says so at start-up: a loud warning when it keeps nothing on disk (the backlog not yet
/// stored by the trainer would be lost on a Redis restart), a warning when it cannot tell. Returns whether the
/// data is durable (`None`: unknown), for the caller's gauge.
pub async fn check_at_start(link: &RedisLink, redis_url: &str) -> Option<bool> {
    match check_persistence(link).await {
        Ok(p) if p.is_durable() => {
            tracing::info!(persistence = p.as_str(), "Redis keeps its data on disk");
            Some(true)
        }
        Ok(_) => {
            tracing::warn!(
                url = %redis_url,
                "REDIS KEEPS NOTHING ON DISK (appendonly no, save \"\"): feedback the trainer has not stored yet is \
                 LOST if Redis restarts. Enable appendonly (or a save schedule) on this server."
            );
            Some(false)
        }
        Err(e) => {
            tracing::warn!(
                url = %redis_url, error = %e,
                "cannot tell whether Redis keeps its data on disk (CONFIG GET refused?); feedback may be lost on a \
                 Redis restart"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::RedisServer;

    #[tokio::test]
    async fn a_server_without_aof_or_snapshots_is_not_durable() {
        let Ok(server) = RedisServer::start() else { return };
        let link = RedisLink::new(&server.url()).unwrap_or_else(|e| panic!("{e}"));
        let none = check_persistence(&link).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((none.as_str(), none.is_durable()), ("none", false));
        // A snapshot schedule only: nothing is written until it comes due.
        link.run(|mut c| async move {
            redis::cmd("CONFIG").arg("SET").arg("save").arg("3600 1").query_async::<()>(&mut c).await
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let rdb = check_persistence(&link).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((rdb.as_str(), rdb.is_durable()), ("rdb", true));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unknown_not_absent() {
        let link = RedisLink::new("redis://127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"));
        assert!(check_persistence(&link).await.is_err());
    }
}
