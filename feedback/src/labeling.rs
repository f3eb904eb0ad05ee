//! The labeling queue: logged prompts waiting for labelers' judgments.
//!
//! A sorted set holds prompt ids scored by when they are next available. A
//! labeler claims the first available prompt they have not labeled; the
//! claim leases it (its score moves to now + lease), so two labelers do not
//! get the same task at once, and an abandoned lease simply expires. A
//! prompt leaves the queue once enough labelers have judged it: one, or for
//! a configured fraction of prompts (chosen by a hash of the prompt id, so
//! every replica agrees) several, whose judgments quality control compares.

use std::sync::Arc;
use std::time::Duration;

use crate::events::now_ms;
use crate::redis_link::{LinkError, RedisLink};

/// Candidates looked at per claim (labelers skip prompts they already judged).
const SCAN: usize = 200;

const CLAIM: &str = r"
local candidates = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[5]))
for _, prompt in ipairs(candidates) do
  if redis.call('SISMEMBER', ARGV[4] .. prompt, ARGV[3]) == 0 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), prompt)
    return prompt
  end
end
return false
";

/// How many labelers judge each prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overlap {
    /// Judgments every prompt needs.
    pub labels_per_prompt: u32,
    /// The share of prompts that go to `overlap_labels` labelers instead.
    pub fraction: f64,
    pub overlap_labels: u32,
}

/// Keeps the overlap choice independent of the train/validation split's hash.
const OVERLAP_SALT: &[u8] = b"instructd/labeling-overlap/v1\0";

impl Overlap {
    /// Judgments `prompt_id` needs before it leaves the queue.
    pub fn needed(&self, prompt_id: &str) -> u32 {
        let base = self.labels_per_prompt.max(1);
        if self.fraction > 0.0 && crate::split::salted_unit_hash(OVERLAP_SALT, prompt_id) < self.fraction {
            base.max(self.overlap_labels)
        } else {
            base
        }
    }
}

pub struct LabelingQueue {
    link: Arc<RedisLink>,
    prefix: String,
    lease: Duration,
    overlap: Overlap,
    claim: redis::Script,
}

/// A claimed task: the prompt id and when the lease ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub prompt_id: String,
    pub expires_at_ms: u64,
}

impl LabelingQueue {
    pub fn new(link: Arc<RedisLink>, prefix: &str, lease: Duration, overlap: Overlap) -> Self {
        Self { link, prefix: prefix.to_string(), lease, overlap, claim: redis::Script::new(CLAIM) }
    }

    fn queue_key(&self) -> String {
        format!("{}:labeling:queue", self.prefix)
    }

    fn labeled_prefix(&self) -> String {
        format!("{}:labeling:done:", self.prefix)
    }

    /// Makes a logged prompt available to labelers.
    pub async fn push(&self, prompt_id: &str) -> Result<(), LinkError> {
        let (queue, prompt_id) = (self.queue_key(), prompt_id.to_string());
        self.link
            .run(|mut c| async move {
                redis::cmd("ZADD").arg(queue).arg(now_ms()).arg(prompt_id).query_async::<()>(&mut c).await
            })
            .await
    }

    /// Leases the next prompt `labeler` has not judged, if any.
    pub async fn claim(&self, labeler: &str) -> Result<Option<Lease>, LinkError> {
        let now = now_ms();
        let lease_ms = self.lease.as_millis() as u64;
        let (script, queue, done, labeler) =
            (self.claim.clone(), self.queue_key(), self.labeled_prefix(), labeler.to_string());
        let prompt: Option<String> = self
            .link
            .run(|mut c| async move {
                script.key(queue).arg(now).arg(lease_ms).arg(labeler).arg(done).arg(SCAN).invoke_async(&mut c).await
            })
            .await?;
        Ok(prompt.map(|prompt_id| Lease { prompt_id, expires_at_ms: now + lease_ms }))
    }

    /// Records `labeler`'s judgment of `prompt_id`: the prompt leaves the queue
    /// once it has enough, else its lease is released for the next labeler.
    pub async fn mark_labeled(&self, prompt_id: &str, labeler: &str) -> Result<(), LinkError> {
        let done = format!("{}{prompt_id}", self.labeled_prefix());
        let needed = self.overlap.needed(prompt_id);
        let (queue, prompt_id, labeler) = (self.queue_key(), prompt_id.to_string(), labeler.to_string());
        self.link
            .run(|mut c| async move {
                let (_, count): ((), u32) =
                    redis::pipe().atomic().sadd(&done, &labeler).scard(&done).query_async(&mut c).await?;
                if count >= needed {
                    redis::cmd("ZREM").arg(&queue).arg(&prompt_id).query_async::<()>(&mut c).await
                } else {
                    redis::cmd("ZADD")
                        .arg(&queue)
                        .arg("XX")
                        .arg(now_ms())
                        .arg(&prompt_id)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await
    }

    /// Takes prompts out of the queue (consent withdrawn).
    pub async fn remove(&self, prompt_ids: &[String]) -> Result<(), LinkError> {
        if prompt_ids.is_empty() {
            return Ok(());
        }
        let (queue, ids) = (self.queue_key(), prompt_ids.to_vec());
        self.link
            .run(|mut c| async move { redis::cmd("ZREM").arg(queue).arg(ids).query_async::<()>(&mut c).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::RedisServer;

    #[tokio::test]
    async fn leases_skip_judged_prompts_and_expire() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let overlap = Overlap { labels_per_prompt: 2, fraction: 0.0, overlap_labels: 0 };
        let queue = LabelingQueue::new(link, "t", Duration::from_millis(300), overlap);
        queue.push("p1").await.unwrap();
        queue.push("p2").await.unwrap();
        let a = queue.claim("ann").await.unwrap().unwrap();
        let b = queue.claim("bob").await.unwrap().unwrap();
        assert_ne!(a.prompt_id, b.prompt_id, "a leased prompt is not handed out twice");
        assert!(queue.claim("cid").await.unwrap().is_none(), "both are leased");

        queue.mark_labeled(&a.prompt_id, "ann").await.unwrap();
        // Released for a second labeler, but never back to ann.
        assert!(queue.claim("ann").await.unwrap().is_none());
        assert_eq!(queue.claim("cid").await.unwrap().unwrap().prompt_id, a.prompt_id);
        queue.mark_labeled(&a.prompt_id, "cid").await.unwrap();

        // bob's lease on the other prompt expires and it comes back.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(queue.claim("ann").await.unwrap().unwrap().prompt_id, b.prompt_id);
        queue.remove(std::slice::from_ref(&b.prompt_id)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(queue.claim("zed").await.unwrap().is_none(), "two labels took p1 out; p2 was removed");
    }

    #[test]
    fn the_overlap_fraction_picks_that_share_of_prompts_and_every_replica_agrees() {
        let overlap = Overlap { labels_per_prompt: 1, fraction: 0.25, overlap_labels: 3 };
        let needs: Vec<u32> = (0..4000).map(|i| overlap.needed(&format!("prm_{i:024x}"))).collect();
        let shared = needs.iter().filter(|&&n| n == 3).count();
        assert!(needs.iter().all(|&n| n == 1 || n == 3));
        assert!((900..1100).contains(&shared), "{shared} of 4000 prompts overlap; expected about 1000");
        // The same prompt, the same answer (a pure function of its id).
        assert_eq!(overlap.needed("prm_7"), overlap.needed("prm_7"));
        // Never fewer than the base, and no overlap when the fraction is 0.
        let none = Overlap { fraction: 0.0, ..overlap };
        assert!((0..100).all(|i| none.needed(&i.to_string()) == 1));
        let small = Overlap { labels_per_prompt: 4, fraction: 1.0, overlap_labels: 2 };
        assert_eq!(small.needed("x"), 4);
    }

    #[tokio::test]
    async fn an_overlapping_prompt_stays_queued_until_enough_labelers_judged_it() {
        let server = RedisServer::start().unwrap();
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        let overlap = Overlap { labels_per_prompt: 1, fraction: 1.0, overlap_labels: 2 };
        let queue = LabelingQueue::new(link, "t", Duration::from_secs(60), overlap);
        queue.push("p").await.unwrap();
        let first = queue.claim("ann").await.unwrap().unwrap();
        queue.mark_labeled(&first.prompt_id, "ann").await.unwrap();
        assert_eq!(queue.claim("bob").await.unwrap().unwrap().prompt_id, "p", "a second labeler gets it");
        queue.mark_labeled("p", "bob").await.unwrap();
        assert!(queue.claim("cid").await.unwrap().is_none(), "two judgments took it out");
    }
}
