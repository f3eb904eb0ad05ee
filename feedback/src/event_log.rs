//! The durable event log: appends feedback events to their Redis stream
//! exactly once, and keeps them safe on disk while Redis is away.
//!
//! Human labels are expensive and cannot be asked for again, so the rule is
//! never lose a label and never count one twice:
//!
//! * **Exactly once.** Every event has a dedupe id (a retried submission or a
//!   spill replay carries the same one). One Lua script (`append.lua`)
//!   atomically sets a marker `{prefix}:{event_id}` (`SET NX EX ttl`) and, only
//!   if that set it, `XADD`s the entry and stores the new stream id in the
//!   marker; otherwise it answers the stored id ([`Appended::Duplicate`]). If
//!   the `XADD` itself fails the marker is deleted again, so a failed append
//!   never poses as a written one.
//! * **Never lost.** When Redis is unreachable (or refuses writes for a while:
//!   loading, out of memory, read-only) the entry goes to the [`Spill`]
//!   (fsynced before [`EventLog::append`] returns [`Appended::Spilled`]), and
//!   [`EventLog::replay`] (or the task of [`EventLog::spawn_replayer`]) writes
//!   it later through the same script. A command that timed out may still
//!   have run in Redis; its spilled copy then replays as a duplicate, and so
//!   does an entry replayed just before a crash that kept it in the spill.
//! * **In order.** While the spill holds anything, new entries go to the spill
//!   too, even if Redis is back, so that a stream receives events in the order
//!   they were submitted (replay order = submit order). Such an append answers
//!   `Spilled` and reaches Redis with the next replay. Concurrent submissions
//!   have no order among themselves; sequential ones keep theirs.
//!
//! A spilled entry that Redis refuses for a reason other than connectivity
//! (say, the stream key holds another type) stops replay at that entry and is
//! reported as [`AppendError::Redis`] on every attempt: the entries behind it
//! wait rather than overtake it or be dropped.

use std::sync::Arc;
use std::time::Duration;

use crate::redis_link::{LinkError, RedisLink};
use crate::spill::{Spill, SpillError};

/// Entries replayed between two removals from the spill, at least (a quarter of
/// the spill when that is more, to bound how often the file is rewritten). A
/// crash in between replays at most this many again, harmlessly, as duplicates.
const REPLAY_BATCH: usize = 512;

/// One event to append: the stream, a dedupe id (unique per logical event; a
/// retried submission or a spill replay carries the same id), and the
/// field/value pairs of the stream entry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Entry {
    pub stream: String,
    pub event_id: String,
    pub fields: Vec<(String, String)>,
    /// When set, the entry is written only while this consent holds, checked
    /// atomically with the write (now, or at replay from the spill).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<ConsentGuard>,
}

/// The consent a logged prompt depends on: the user's consent record (its Redis
/// key, from [`crate::consent::ConsentStore::guard`]) must say `accepted` for
/// `notice_version` when the entry is written.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ConsentGuard {
    pub user: String,
    pub key: String,
    pub notice_version: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Appended {
    /// Written now.
    Written { stream_id: String },
    /// The same event id was written before, as `stream_id`.
    Duplicate { stream_id: String },
    /// Redis is away (or older entries still wait): the entry is durably in the
    /// spill file and will be replayed.
    Spilled,
    /// The entry's consent guard no longer holds (withdrawn, or another notice):
    /// nothing was written, and a spilled copy is dropped at replay.
    NoConsent,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Redis is away and the spill file is full: the entry is not kept.
    #[error("Redis is unreachable and the spill file is full ({capacity_bytes} bytes)")]
    SpillFull { capacity_bytes: u64 },
    #[error("spill file I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// A Redis error other than connectivity, e.g. a script error.
    #[error("Redis refused the event: {0}")]
    Redis(String),
    /// The entry can never be written (no stream, no event id or no fields):
    /// refused before it reaches Redis or the spill.
    #[error("invalid event: {0}")]
    InvalidEntry(&'static str),
}

impl From<SpillError> for AppendError {
    fn from(e: SpillError) -> Self {
        match e {
            SpillError::Full { capacity_bytes } => AppendError::SpillFull { capacity_bytes },
            SpillError::Io(e) => AppendError::Io(e),
        }
    }
}

pub struct EventLog {
    link: Arc<RedisLink>,
    spill: Arc<Spill>,
    prefix: String,
    ttl_secs: u64,
    script: redis::Script,
    /// One replay at a time: two would both remove what each replayed.
    replaying: tokio::sync::Mutex<()>,
}

impl EventLog {
    /// `dedupe_prefix`: Redis key prefix for dedupe markers (e.g.
    /// "instructd:event"); `dedupe_ttl`: how long an event id is remembered
    /// (e.g. 7 days; at least one second); `spill`: the on-disk spill.
    pub fn new(link: Arc<RedisLink>, spill: Spill, dedupe_prefix: &str, dedupe_ttl: Duration) -> Self {
        Self {
            link,
            spill: Arc::new(spill),
            prefix: dedupe_prefix.to_string(),
            ttl_secs: dedupe_ttl.as_secs().max(1),
            script: redis::Script::new(include_str!("append.lua")),
            replaying: tokio::sync::Mutex::new(()),
        }
    }

    /// Appends exactly once (see the module docs): written now, a duplicate of
    /// an earlier append, or spilled to disk while Redis is away or while older
    /// entries still wait in the spill.
    pub async fn append(&self, entry: Entry) -> Result<Appended, AppendError> {
        validate(&entry)?;
        if !self.spill.is_empty() {
            self.spill_entry(entry).await?;
            return Ok(Appended::Spilled);
        }
        match self.write(&entry).await {
            Ok(appended) => Ok(appended),
            Err(e) if redis_away(&e) => {
                tracing::warn!(error = %e, stream = %entry.stream, "Redis unavailable: spilling the event to disk");
                self.spill_entry(entry).await?;
                Ok(Appended::Spilled)
            }
            Err(e) => Err(AppendError::Redis(e.to_string())),
        }
    }

    /// Replays the spill into Redis in order, each entry through the same
    /// exactly-once script, removing replayed entries from the spill. Returns
    /// how many were written (duplicates, e.g. entries replayed before a crash,
    /// leave the spill but do not count). Stops at the first error that means
    /// Redis is away (unreachable, loading, out of memory...) and leaves the
    /// rest; any other Redis error is returned, the entry left in place.
    pub async fn replay(&self) -> Result<usize, AppendError> {
        let _one_at_a_time = self.replaying.lock().await;
        let mut written = 0;
        loop {
            let batch = self.spill.front((self.spill.len() / 4).max(REPLAY_BATCH));
            if batch.is_empty() {
                return Ok(written);
            }
            let mut done = 0;
            let mut failure = None;
            for entry in &batch {
                match self.write(entry).await {
                    Ok(Appended::Written { .. }) => {
                        written += 1;
                        done += 1;
                    }
                    Ok(_) => done += 1,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if done > 0 {
                let spill = self.spill.clone();
                tokio::task::spawn_blocking(move || spill.remove_first(done)).await.map_err(join_error)??;
            }
            match failure {
                None => {}
                Some(e) if redis_away(&e) => return Ok(written),
                Some(e) => return Err(AppendError::Redis(e.to_string())),
            }
        }
    }

    /// Spawns a task calling [`replay`](Self::replay) every `every` while the
    /// spill is non-empty. The task ends when the log is dropped (or when the
    /// handle is aborted).
    pub fn spawn_replayer(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(log) = log.upgrade() else { return };
                if log.spill.is_empty() {
                    continue;
                }
                match log.replay().await {
                    Ok(written) => {
                        let left = log.spilled();
                        if written > 0 || left == 0 {
                            tracing::info!(written, left, "replayed spilled events into Redis");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, left = log.spilled(), "replaying spilled events failed"),
                }
            }
        })
    }

    /// Drops `user`'s entries waiting in the spill (their consent was withdrawn);
    /// one at a time with replay, so a replay in flight cannot write them after.
    pub async fn drop_user(&self, user: &str) -> Result<usize, AppendError> {
        let _one_at_a_time = self.replaying.lock().await;
        let (spill, user) = (self.spill.clone(), user.to_string());
        Ok(tokio::task::spawn_blocking(move || spill.remove_user(&user)).await.map_err(join_error)??)
    }

    /// Entries currently waiting in the spill.
    pub fn spilled(&self) -> usize {
        self.spill.len()
    }

    pub fn spill(&self) -> &Spill {
        &self.spill
    }

    /// Runs the exactly-once script for one entry.
    async fn write(&self, entry: &Entry) -> Result<Appended, LinkError> {
        let marker = format!("{}:{}", self.prefix, entry.event_id);
        let stream = entry.stream.clone();
        let fields: Vec<&str> = entry.fields.iter().flat_map(|(f, v)| [f.as_str(), v.as_str()]).collect();
        let (script, ttl) = (self.script.clone(), self.ttl_secs);
        let consent = entry.consent.as_ref().map(|c| (c.key.clone(), c.notice_version.clone()));
        let (fresh, stream_id): (i64, String) = self
            .link
            .run(|mut c| async move {
                let mut invocation = script.key(marker);
                invocation.key(stream);
                let notice = match &consent {
                    Some((key, notice)) => {
                        invocation.key(key);
                        notice.as_str()
                    }
                    None => "",
                };
                invocation.arg(ttl).arg(notice).arg(fields).invoke_async(&mut c).await
            })
            .await?;
        Ok(match fresh {
            1 => Appended::Written { stream_id },
            2 => Appended::NoConsent,
            _ => Appended::Duplicate { stream_id },
        })
    }

    async fn spill_entry(&self, entry: Entry) -> Result<(), AppendError> {
        let spill = self.spill.clone();
        tokio::task::spawn_blocking(move || spill.append(&entry)).await.map_err(join_error)??;
        Ok(())
    }
}

/// Whether Redis cannot take the event now but will later: unreachable, or
/// refusing writes for a while (loading its dataset, busy with a script, out of
/// memory until trimmed, a replica during failover). Such a refusal has
/// written nothing, so the entry can safely wait in the spill.
fn redis_away(e: &LinkError) -> bool {
    const LATER: [&str; 7] = ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "READONLY", "OOM"];
    match e {
        LinkError::Command(command) if !e.is_unavailable() => command.code().is_some_and(|code| LATER.contains(&code)),
        _ => e.is_unavailable(),
    }
}

fn validate(entry: &Entry) -> Result<(), AppendError> {
    if entry.stream.is_empty() {
        return Err(AppendError::InvalidEntry("the stream name is empty"));
    }
    if entry.event_id.is_empty() {
        return Err(AppendError::InvalidEntry("the event id is empty"));
    }
    if entry.fields.is_empty() {
        return Err(AppendError::InvalidEntry("a stream entry needs at least one field"));
    }
    Ok(())
}

fn join_error(e: tokio::task::JoinError) -> std::io::Error {
    std::io::Error::other(format!("spill task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::RedisServer;

    const STREAM: &str = "t:feedback";

    fn entry(id: &str) -> Entry {
        Entry {
            stream: STREAM.to_string(),
            event_id: id.to_string(),
            fields: vec![("event_id".to_string(), id.to_string()), ("kind".to_string(), "rating".to_string())],
            consent: None,
        }
    }

    fn log(link: &Arc<RedisLink>, spill: Spill) -> EventLog {
        EventLog::new(link.clone(), spill, "t:event", Duration::from_secs(3600))
    }

    /// The `event_id` field of each entry of the stream, in stream order.
    async fn stream_events(link: &RedisLink) -> Vec<String> {
        let reply: redis::streams::StreamRangeReply = link
            .run(|mut c| async move { redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+").query_async(&mut c).await })
            .await
            .unwrap();
        reply.ids.iter().map(|id| id.get::<String>("event_id").unwrap()).collect()
    }

    async fn wait_reachable(link: &RedisLink) {
        for _ in 0..100 {
            if link.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Redis did not come back");
    }

    #[tokio::test]
    async fn appends_once_and_answers_duplicates_with_the_same_id() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let log = log(&link, Spill::open(&dir.path().join("spill"), 1 << 20).unwrap());

        let Appended::Written { stream_id } = log.append(entry("e1")).await.unwrap() else { panic!("not written") };
        assert_eq!(log.append(entry("e1")).await.unwrap(), Appended::Duplicate { stream_id: stream_id.clone() });
        assert_eq!(stream_events(&link).await, ["e1"]);
        let ttl: i64 = link
            .run(|mut c| async move { redis::cmd("TTL").arg("t:event:e1").query_async(&mut c).await })
            .await
            .unwrap();
        assert!(ttl > 3500 && ttl <= 3600, "the marker expires: {ttl}");
        assert!(matches!(log.append(Entry { fields: vec![], ..entry("e2") }).await, Err(AppendError::InvalidEntry(_))));
    }

    #[tokio::test]
    async fn an_outage_spills_in_order_and_replay_writes_each_once() {
        let mut server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        // Room for exactly four spilled records (the ids have the same length).
        let record = {
            let probe = Spill::open(&dir.path().join("probe"), 1 << 20).unwrap();
            probe.append(&entry("e0")).unwrap();
            probe.bytes()
        };
        let log = log(&link, Spill::open(&path, record * 4).unwrap());
        assert!(matches!(log.append(entry("e1")).await.unwrap(), Appended::Written { .. }));

        server.stop();
        assert_eq!(log.append(entry("e2")).await.unwrap(), Appended::Spilled);
        assert_eq!(log.append(entry("e3")).await.unwrap(), Appended::Spilled);
        // A client retrying e2 while Redis is away: a second copy, same event id.
        assert_eq!(log.append(entry("e2")).await.unwrap(), Appended::Spilled);
        assert_eq!(log.append(entry("e4")).await.unwrap(), Appended::Spilled);
        let full = log.append(entry("e5")).await;
        assert!(matches!(full, Err(AppendError::SpillFull { capacity_bytes }) if capacity_bytes == record * 4));
        assert_eq!(log.spilled(), 4);
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert_eq!(on_disk.lines().count(), 4, "the file has them: {on_disk}");
        assert!(on_disk.lines().all(|line| line.contains(r#""event_id":"e"#)));
        let ids: Vec<String> = log.spill().pending().into_iter().map(|e| e.event_id).collect();
        assert_eq!(ids, ["e2", "e3", "e2", "e4"]);

        // The test Redis keeps nothing across a restart: e1 is gone with it.
        server.restart().unwrap();
        wait_reachable(&link).await;
        assert_eq!(log.replay().await.unwrap(), 3, "e2, e3, e4 written; the second e2 is a duplicate");
        assert_eq!(log.spilled(), 0);
        assert_eq!(stream_events(&link).await, ["e2", "e3", "e4"]);
        assert_eq!(log.replay().await.unwrap(), 0);
        assert_eq!(stream_events(&link).await, ["e2", "e3", "e4"]);
        // The refused e5, retried by its client, now goes straight in.
        assert!(matches!(log.append(entry("e5")).await.unwrap(), Appended::Written { .. }));
        assert!(matches!(log.append(entry("e3")).await.unwrap(), Appended::Duplicate { .. }));

        // While anything waits in the spill, new events queue behind it even
        // though Redis answers.
        server.stop();
        assert_eq!(log.append(entry("e6")).await.unwrap(), Appended::Spilled);
        server.restart().unwrap();
        wait_reachable(&link).await;
        assert_eq!(log.append(entry("e7")).await.unwrap(), Appended::Spilled);
        assert_eq!(log.replay().await.unwrap(), 2);
        assert_eq!(stream_events(&link).await, ["e6", "e7"]);
    }

    #[tokio::test]
    async fn a_crash_between_xadd_and_spill_removal_still_writes_once() {
        let mut server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        let log = log(&link, Spill::open(&path, 1 << 20).unwrap());
        server.stop();
        for id in ["e1", "e2", "e3"] {
            assert_eq!(log.append(entry(id)).await.unwrap(), Appended::Spilled);
        }
        server.restart().unwrap();
        wait_reachable(&link).await;
        // Replay got as far as writing e1, then the process died before the
        // spill was cut.
        let first = log.spill().front(1).remove(0);
        assert!(matches!(log.write(&first).await.unwrap(), Appended::Written { .. }));
        drop(log);

        let log = self::log(&link, Spill::open(&path, 1 << 20).unwrap());
        assert_eq!(log.spilled(), 3, "the spill survived the restart");
        assert_eq!(log.replay().await.unwrap(), 2, "e1 was already written");
        assert_eq!(stream_events(&link).await, ["e1", "e2", "e3"]);
        assert_eq!(log.spilled(), 0);
        drop(log);
        assert!(Spill::open(&path, 1 << 20).unwrap().is_empty(), "the removal is on disk");
    }

    #[tokio::test]
    async fn the_replayer_drains_the_spill_after_an_outage() {
        let mut server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(log(&link, Spill::open(&dir.path().join("spill"), 1 << 20).unwrap()));
        let replayer = log.spawn_replayer(Duration::from_millis(50));
        server.stop();
        assert_eq!(log.append(entry("e1")).await.unwrap(), Appended::Spilled);
        assert_eq!(log.append(entry("e2")).await.unwrap(), Appended::Spilled);
        server.restart().unwrap();
        for _ in 0..100 {
            if log.spilled() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(log.spilled(), 0);
        assert_eq!(stream_events(&link).await, ["e1", "e2"]);
        drop(log);
        tokio::time::timeout(Duration::from_secs(2), replayer).await.unwrap().unwrap();
    }

    /// Consent is checked in the same atomic step as the write, at append and at replay, and a withdrawal
    /// takes the user's entries out of the spill.
    #[tokio::test]
    async fn a_guarded_entry_is_written_only_while_its_consent_holds() {
        let mut server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let log = log(&link, Spill::open(&dir.path().join("spill"), 1 << 20).unwrap());
        let consent = crate::consent::ConsentStore::new(link.clone(), "t");
        let guarded = |id: &str, user: &str| Entry { consent: Some(consent.guard(user, "v1")), ..entry(id) };

        assert_eq!(log.append(guarded("e1", "ann")).await.unwrap(), Appended::NoConsent, "never accepted");
        consent.accept("ann", "v1").await.unwrap();
        consent.accept("bob", "v1").await.unwrap();
        assert!(matches!(log.append(guarded("e2", "ann")).await.unwrap(), Appended::Written { .. }));
        consent.withdraw("ann").await.unwrap();
        assert_eq!(log.append(guarded("e3", "ann")).await.unwrap(), Appended::NoConsent);
        assert!(matches!(log.append(entry("e4")).await.unwrap(), Appended::Written { .. }), "unguarded: as before");

        // Spilled while Redis is away: ann's entries leave the spill on withdrawal, and one that is still there
        // when ann's consent no longer holds is dropped at replay instead of written.
        consent.accept("ann", "v1").await.unwrap();
        server.stop();
        for (id, user) in [("e5", "ann"), ("e6", "bob"), ("e7", "ann")] {
            assert_eq!(log.append(guarded(id, user)).await.unwrap(), Appended::Spilled);
        }
        assert_eq!(log.drop_user("ann").await.unwrap(), 2);
        let left: Vec<String> = log.spill().pending().into_iter().map(|e| e.event_id).collect();
        assert_eq!(left, ["e6"]);
        assert!(!std::fs::read_to_string(dir.path().join("spill")).unwrap().contains("\"e5\""), "gone from disk");
        assert_eq!(log.append(guarded("e8", "ann")).await.unwrap(), Appended::Spilled);
        server.restart().unwrap();
        wait_reachable(&link).await;
        // The restarted test Redis forgot every consent: only bob's is given again.
        consent.accept("bob", "v1").await.unwrap();
        assert_eq!(log.replay().await.unwrap(), 1);
        assert_eq!(log.spilled(), 0);
        assert_eq!(stream_events(&link).await, ["e6"]);
    }

    #[tokio::test]
    async fn a_refused_xadd_leaves_no_marker_behind() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let log = log(&link, Spill::open(&dir.path().join("spill"), 1 << 20).unwrap());
        link.run(
            |mut c| async move { redis::cmd("SET").arg(STREAM).arg("not a stream").query_async::<()>(&mut c).await },
        )
        .await
        .unwrap();
        assert!(matches!(log.append(entry("e1")).await, Err(AppendError::Redis(_))));
        assert_eq!(log.spilled(), 0, "a refusal is not an outage");
        link.run(|mut c| async move { redis::cmd("DEL").arg(STREAM).query_async::<()>(&mut c).await }).await.unwrap();
        assert!(matches!(log.append(entry("e1")).await.unwrap(), Appended::Written { .. }));
        assert_eq!(stream_events(&link).await, ["e1"]);
    }

    #[tokio::test]
    async fn a_redis_out_of_memory_spills_instead_of_refusing() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let log = log(&link, Spill::open(&dir.path().join("spill"), 1 << 20).unwrap());
        let maxmemory = |bytes: &'static str| {
            let link = link.clone();
            async move {
                link.run(|mut c| async move {
                    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(bytes).query_async::<()>(&mut c).await
                })
                .await
                .unwrap()
            }
        };
        maxmemory("1").await;
        assert_eq!(log.append(entry("e1")).await.unwrap(), Appended::Spilled);
        maxmemory("0").await;
        assert_eq!(log.replay().await.unwrap(), 1);
        assert_eq!(stream_events(&link).await, ["e1"]);
    }
}
