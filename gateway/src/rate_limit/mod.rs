//! Per-key rate limits that hold across gateway replicas: GCRA buckets for
//! requests/min and tokens/min plus a concurrency cap.
//!
//! The shared truth lives in Redis: one Lua script (`shared.lua`) checks
//! both buckets and takes a concurrency slot atomically, in one round trip,
//! on Redis' clock. Tokens are charged up front (prompt + max_tokens × n) and
//! corrected when the request ends (`correct.lua`). In-process `governor`
//! limiters with the same quotas refuse early what this replica alone would
//! refuse, and decide alone while Redis is unreachable (`shared_mode` false,
//! reported in `/readyz` and the metrics).

mod local;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use feedback::RedisLink;
use serde::{Deserialize, Serialize};

use local::LocalLimits;

/// How long a concurrency slot outlives a replica that died holding it.
const SLOT_LEASE: Duration = Duration::from_secs(600);
const WINDOW: Duration = Duration::from_secs(60);

/// A key's limits; 0 in a field means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub max_concurrent: u32,
}

/// Values for the `x-ratelimit-*` headers (limit 0: unlimited, header omitted).
#[derive(Debug, Clone, Default)]
pub struct RateLimitHeaders {
    /// Whether remaining/reset are known for requests and for tokens: not
    /// while deciding locally (Redis away), except for the bucket that refused.
    pub requests_known: bool,
    pub tokens_known: bool,
    pub limit_requests: u32,
    pub remaining_requests: u32,
    pub reset_requests: Duration,
    pub limit_tokens: u32,
    pub remaining_tokens: u32,
    pub reset_tokens: Duration,
}

impl RateLimitHeaders {
    /// From each bucket's TAT minus now (how full it is).
    fn from_fill(limits: &KeyLimits, requests_fill: Duration, tokens_fill: Duration) -> Self {
        let remaining = |limit: u32, fill: Duration| -> u32 {
            if limit == 0 {
                return 0;
            }
            let free = WINDOW.saturating_sub(fill).as_secs_f64() / WINDOW.as_secs_f64();
            ((free * f64::from(limit)) + 1e-9).floor() as u32
        };
        Self {
            requests_known: true,
            tokens_known: true,
            limit_requests: limits.requests_per_minute,
            remaining_requests: remaining(limits.requests_per_minute, requests_fill),
            reset_requests: if limits.requests_per_minute > 0 { requests_fill } else { Duration::ZERO },
            limit_tokens: limits.tokens_per_minute,
            remaining_tokens: remaining(limits.tokens_per_minute, tokens_fill),
            reset_tokens: if limits.tokens_per_minute > 0 { tokens_fill } else { Duration::ZERO },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Requests,
    Tokens,
    Concurrency,
    /// One request asks for more tokens than a whole minute allows.
    TooLarge,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Requests => "requests",
            RejectReason::Tokens => "tokens",
            RejectReason::Concurrency => "concurrency",
            RejectReason::TooLarge => "too_large",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: RejectReason,
    pub retry_after: Duration,
    pub headers: RateLimitHeaders,
    pub message: String,
}

impl Rejection {
    /// The refusal of a request that needs more tokens than the key may use in a minute.
    pub fn too_large(limits: &KeyLimits, tokens: u64) -> Self {
        let headers = RateLimitHeaders::from_fill(limits, Duration::ZERO, Duration::ZERO);
        Self::new(RejectReason::TooLarge, Duration::ZERO, limits, headers, tokens)
    }

    fn new(
        reason: RejectReason,
        retry_after: Duration,
        limits: &KeyLimits,
        headers: RateLimitHeaders,
        tokens: u64,
    ) -> Self {
        let message = match reason {
            RejectReason::Requests => format!(
                "Rate limit reached for requests: {} per minute for this key. Retry after {:.1} s.",
                limits.requests_per_minute,
                retry_after.as_secs_f64()
            ),
            RejectReason::Tokens => format!(
                "Rate limit reached for tokens: {} per minute for this key; this request needs {tokens} (prompt + \
                 max_tokens per sample). Retry after {:.1} s.",
                limits.tokens_per_minute,
                retry_after.as_secs_f64()
            ),
            RejectReason::Concurrency => {
                format!("Too many concurrent requests: at most {} at once for this key.", limits.max_concurrent)
            }
            RejectReason::TooLarge => format!(
                "This request needs {tokens} tokens (prompt + max_tokens per sample), more than this key's limit of {} \
                 tokens per minute. Reduce max_tokens or n.",
                limits.tokens_per_minute
            ),
        };
        metrics::counter!("instructd_rate_limit_rejections_total", "reason" => reason.as_str()).increment(1);
        Self { reason, retry_after, headers, message }
    }
}

struct Inner {
    link: Arc<RedisLink>,
    prefix: String,
    admit_script: redis::Script,
    correct_script: redis::Script,
    local: LocalLimits,
    shared: AtomicBool,
}

pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl RateLimiter {
    pub fn new(link: Arc<RedisLink>, key_prefix: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                link,
                prefix: key_prefix.to_string(),
                admit_script: redis::Script::new(include_str!("shared.lua")),
                correct_script: redis::Script::new(include_str!("correct.lua")),
                local: LocalLimits::default(),
                shared: AtomicBool::new(true),
            }),
        }
    }

    /// Whether the last decision was made in Redis (false: local limits only).
    pub fn shared_mode(&self) -> bool {
        self.inner.shared.load(Ordering::Relaxed)
    }

    /// Admits one request for `key_id`, charging `tokens` up front.
    pub async fn admit(&self, key_id: &str, limits: &KeyLimits, tokens: u64) -> Result<Admission, Rejection> {
        let inner = &self.inner;
        if limits.tokens_per_minute > 0 && tokens > u64::from(limits.tokens_per_minute) {
            return Err(Rejection::new(
                RejectReason::TooLarge,
                Duration::ZERO,
                limits,
                RateLimitHeaders::from_fill(limits, Duration::ZERO, Duration::ZERO),
                tokens,
            ));
        }
        if let Err(refusal) = inner.local.check(key_id, limits, None) {
            let headers = local_headers(limits, Some(&refusal));
            return Err(Rejection::new(refusal.reason, refusal.retry_after, limits, headers, tokens));
        }
        if limits.requests_per_minute == 0 && limits.tokens_per_minute == 0 && limits.max_concurrent == 0 {
            // Nothing to count: no round trip.
            return Ok(Admission::new(
                inner.clone(),
                self.keys(key_id),
                None,
                None,
                *limits,
                tokens,
                RateLimitHeaders::default(),
            ));
        }
        let slot = format!("{:016x}", rand::random::<u64>());
        let keys = self.keys(key_id);
        let script = inner.admit_script.clone();
        let call_keys = keys.clone();
        let call_slot = slot.clone();
        let limits_copy = *limits;
        let result = inner
            .link
            .run(move |mut conn| async move {
                script
                    .key(&call_keys[0])
                    .key(&call_keys[1])
                    .key(&call_keys[2])
                    .arg(limits_copy.requests_per_minute)
                    .arg(limits_copy.tokens_per_minute)
                    .arg(limits_copy.max_concurrent)
                    .arg(tokens)
                    .arg(&call_slot)
                    .arg(SLOT_LEASE.as_millis() as u64)
                    .invoke_async::<Vec<i64>>(&mut conn)
                    .await
            })
            .await;
        match result {
            Ok(reply) if reply.len() == 5 => {
                inner.set_shared(true);
                let fill = |us: i64| Duration::from_micros(us.max(0) as u64);
                let headers = RateLimitHeaders::from_fill(limits, fill(reply[3]), fill(reply[4]));
                if reply[0] == 1 {
                    let counter = inner.local.acquire(key_id, limits, false).ok();
                    Ok(Admission::new(inner.clone(), keys, Some(slot), counter, *limits, tokens, headers))
                } else {
                    let reason = match reply[1] {
                        1 => RejectReason::Requests,
                        2 => RejectReason::Tokens,
                        _ => RejectReason::Concurrency,
                    };
                    Err(Rejection::new(reason, fill(reply[2]), limits, headers, tokens))
                }
            }
            other => {
                match other {
                    Err(e) if e.is_unavailable() => {
                        if inner.set_shared(false) {
                            tracing::warn!(error = %e, "Redis unreachable: rate limits are local to this replica");
                        }
                    }
                    Err(e) => {
                        inner.set_shared(false);
                        tracing::error!(error = %e, "shared rate-limit script failed: using local limits");
                    }
                    Ok(reply) => {
                        inner.set_shared(false);
                        tracing::error!(?reply, "shared rate-limit script returned an unexpected reply");
                    }
                }
                let refuse = |refusal: local::LocalRefusal| {
                    Rejection::new(
                        refusal.reason,
                        refusal.retry_after,
                        limits,
                        local_headers(limits, Some(&refusal)),
                        tokens,
                    )
                };
                inner.local.check_tokens(key_id, limits, tokens).map_err(refuse)?;
                let counter = inner.local.acquire(key_id, limits, true).map_err(|refusal| {
                    Rejection::new(
                        refusal.reason,
                        refusal.retry_after,
                        limits,
                        local_headers(limits, Some(&refusal)),
                        tokens,
                    )
                })?;
                Ok(Admission::new(
                    inner.clone(),
                    keys,
                    None,
                    Some(counter),
                    *limits,
                    tokens,
                    local_headers(limits, None),
                ))
            }
        }
    }

    fn keys(&self, key_id: &str) -> [String; 3] {
        let p = &self.inner.prefix;
        [format!("{p}:{key_id}:req"), format!("{p}:{key_id}:tok"), format!("{p}:{key_id}:conc")]
    }
}

impl Inner {
    /// Records the mode; returns true when it changed.
    fn set_shared(&self, shared: bool) -> bool {
        metrics::gauge!("instructd_rate_limit_shared").set(if shared { 1.0 } else { 0.0 });
        self.shared.swap(shared, Ordering::Relaxed) != shared
    }
}

/// Headers of a local decision: the limits are known, and for a refusing
/// bucket that nothing is left until `retry_after`; the rest is not known.
fn local_headers(limits: &KeyLimits, refusal: Option<&local::LocalRefusal>) -> RateLimitHeaders {
    let mut headers = RateLimitHeaders {
        limit_requests: limits.requests_per_minute,
        limit_tokens: limits.tokens_per_minute,
        ..Default::default()
    };
    match refusal.map(|r| r.reason) {
        Some(RejectReason::Requests) => {
            headers.requests_known = true;
            headers.reset_requests = refusal.map_or(Duration::ZERO, |r| r.retry_after);
        }
        Some(RejectReason::Tokens) => {
            headers.tokens_known = true;
            headers.reset_tokens = refusal.map_or(Duration::ZERO, |r| r.retry_after);
        }
        _ => {}
    }
    headers
}

/// A request's hold on its key's limits. Dropping it releases the
/// concurrency slot; [`finish`](Self::finish) also corrects the token charge.
pub struct Admission {
    inner: Arc<Inner>,
    keys: [String; 3],
    /// The shared concurrency slot, when admitted through Redis.
    slot: Option<String>,
    local_slot: Option<Arc<AtomicU32>>,
    limits: KeyLimits,
    charged: u64,
    headers: RateLimitHeaders,
}

impl Admission {
    fn new(
        inner: Arc<Inner>,
        keys: [String; 3],
        slot: Option<String>,
        local_slot: Option<Arc<AtomicU32>>,
        limits: KeyLimits,
        charged: u64,
        headers: RateLimitHeaders,
    ) -> Self {
        Self { inner, keys, slot, local_slot, limits, charged, headers }
    }

    pub fn headers(&self) -> &RateLimitHeaders {
        &self.headers
    }

    /// Settles the token charge with the request's real usage and releases the slot.
    pub async fn finish(mut self, actual_tokens: u64) {
        self.release_local();
        let Some(slot) = self.slot.take() else { return };
        let delta =
            (actual_tokens.min(i64::MAX as u64) as i64).saturating_sub(self.charged.min(i64::MAX as u64) as i64);
        settle(self.inner.clone(), self.keys.clone(), slot, self.limits, delta).await;
    }

    fn release_local(&mut self) {
        if let Some(counter) = self.local_slot.take() {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release_local();
        if let Some(slot) = self.slot.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Not finished (the request failed or was cancelled): free the slot, keep the charge.
            runtime.spawn(settle(self.inner.clone(), self.keys.clone(), slot, self.limits, 0));
        }
    }
}

async fn settle(inner: Arc<Inner>, keys: [String; 3], slot: String, limits: KeyLimits, delta: i64) {
    let script = inner.correct_script.clone();
    let result = inner
        .link
        .run(move |mut conn| async move {
            script
                .key(&keys[1])
                .key(&keys[2])
                .arg(limits.tokens_per_minute)
                .arg(delta)
                .arg(&slot)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await;
    if let Err(e) = result {
        // The slot's lease expires by itself; the charge stays as made.
        tracing::warn!(error = %e, "could not settle a rate-limit charge");
    }
}

#[cfg(test)]
mod tests;
