//! Stream retention: trims a stream only below what its consumers have
//! acknowledged, so that Redis memory stays bounded without a blind `MAXLEN`
//! ever dropping a label the trainer has not yet taken.
//!
//! The safe point is the smallest, over the named consumer groups, of: the
//! group's lowest pending id if it has pending entries (delivered, not yet
//! acknowledged), else its last-delivered-id + 1. `XTRIM MINID <safe>` removes
//! exactly the entries with smaller ids: every one of them was delivered to and
//! acknowledged by every group; a pending or undelivered entry stays. The whole
//! computation and the trim run in one Lua script (`trim.lua`), atomically, so
//! a group created or rewound (`XGROUP SETID`) meanwhile cannot be overtaken.
//!
//! A group created at `$` counts the entries before its creation as delivered:
//! it chose to skip them.

use crate::redis_link::{LinkError, RedisLink};

/// Trims `stream` to drop only entries every one of `groups` (e.g.
/// `["trainer"]`) has both been delivered and acknowledged. If the stream or
/// any of the groups does not exist yet, or `groups` is empty, nothing is
/// trimmed (data waits for the trainer). Returns how many entries went.
pub async fn trim_acknowledged(link: &RedisLink, stream: &str, groups: &[&str]) -> Result<u64, LinkError> {
    if groups.is_empty() {
        return Ok(0);
    }
    let script = redis::Script::new(include_str!("trim.lua"));
    let stream = stream.to_string();
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    link.run(|mut c| async move { script.key(stream).arg(groups).invoke_async::<u64>(&mut c).await }).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::RedisServer;

    const STREAM: &str = "t:stream";

    async fn cmd<T: redis::FromRedisValue + Send + 'static>(link: &RedisLink, args: &[&str]) -> T {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        link.run(|mut c| async move { command.query_async(&mut c).await }).await.unwrap()
    }

    /// A stream of ten entries; returns their ids.
    async fn ten_entries(link: &RedisLink) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(cmd::<String>(link, &["XADD", STREAM, "*", "n", &i.to_string()]).await);
        }
        ids
    }

    /// Creates `group` at 0, reads `read` entries and acks the first `ack`.
    async fn consume(link: &RedisLink, group: &str, ids: &[String], read: usize, ack: usize) {
        cmd::<()>(link, &["XGROUP", "CREATE", STREAM, group, "0"]).await;
        if read > 0 {
            let count = read.to_string();
            let args = ["XREADGROUP", "GROUP", group, "c1", "COUNT", &count, "STREAMS", STREAM, ">"];
            cmd::<redis::Value>(link, &args).await;
        }
        for id in &ids[..ack] {
            assert_eq!(cmd::<u64>(link, &["XACK", STREAM, group, id]).await, 1);
        }
    }

    async fn remaining(link: &RedisLink) -> Vec<String> {
        let reply: redis::streams::StreamRangeReply = cmd(link, &["XRANGE", STREAM, "-", "+"]).await;
        reply.ids.into_iter().map(|id| id.id).collect()
    }

    #[tokio::test]
    async fn trims_exactly_the_acknowledged_prefix() {
        let server = RedisServer::start().unwrap();
        let link = RedisLink::new(&server.url()).unwrap();
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 0, "no stream yet");
        let ids = ten_entries(&link).await;
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 0, "no group yet");
        assert_eq!(trim_acknowledged(&link, STREAM, &[]).await.unwrap(), 0);

        consume(&link, "trainer", &ids, 6, 4).await;
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 4);
        assert_eq!(remaining(&link).await, ids[4..], "pending 5 and 6 and undelivered 7..10 stay");
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 0, "idempotent");

        // Everything delivered is acked: the last delivered entry goes too.
        for id in &ids[4..6] {
            cmd::<u64>(&link, &["XACK", STREAM, "trainer", id]).await;
        }
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 2);
        assert_eq!(remaining(&link).await, ids[6..], "the undelivered stay");
    }

    #[tokio::test]
    async fn a_group_that_never_read_keeps_everything() {
        let server = RedisServer::start().unwrap();
        let link = RedisLink::new(&server.url()).unwrap();
        let ids = ten_entries(&link).await;
        consume(&link, "trainer", &ids, 0, 0).await;
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 0);
        assert_eq!(remaining(&link).await, ids);
    }

    #[tokio::test]
    async fn the_slowest_group_wins() {
        let server = RedisServer::start().unwrap();
        let link = RedisLink::new(&server.url()).unwrap();
        let ids = ten_entries(&link).await;
        consume(&link, "trainer", &ids, 6, 4).await;
        // "audit" read two and acked both: no pending, last delivered = 2nd.
        consume(&link, "audit", &ids, 2, 2).await;
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer", "audit"]).await.unwrap(), 2);
        assert_eq!(remaining(&link).await, ids[2..]);
        // A group named but missing holds everything back.
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer", "missing"]).await.unwrap(), 0);
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 2);
        assert_eq!(remaining(&link).await, ids[4..]);
    }

    #[tokio::test]
    async fn a_sequence_carry_is_exact() {
        let server = RedisServer::start().unwrap();
        let link = RedisLink::new(&server.url()).unwrap();
        let max = "18446744073709551615";
        let ids = vec![format!("5-{max}"), "6-0".to_string(), "6-1".to_string()];
        for id in &ids {
            cmd::<String>(&link, &["XADD", STREAM, id, "n", "x"]).await;
        }
        consume(&link, "trainer", &ids, 1, 1).await;
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 1);
        assert_eq!(remaining(&link).await, ids[1..]);
        // Sequence 9 + 1 carries into a longer number (compared as decimals).
        let more = ["7-9", "7-10", "7-11"];
        for id in more {
            cmd::<String>(&link, &["XADD", STREAM, id, "n", "x"]).await;
        }
        let args = ["XREADGROUP", "GROUP", "trainer", "c1", "COUNT", "3", "STREAMS", STREAM, ">"];
        cmd::<redis::Value>(&link, &args).await;
        for id in ["6-0", "6-1", "7-9"] {
            cmd::<u64>(&link, &["XACK", STREAM, "trainer", id]).await;
        }
        assert_eq!(trim_acknowledged(&link, STREAM, &["trainer"]).await.unwrap(), 3);
        assert_eq!(remaining(&link).await, ["7-10", "7-11"]);
    }
}
