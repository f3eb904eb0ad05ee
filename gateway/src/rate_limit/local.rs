//! The in-process side of rate limiting: per-key `governor` limiters with
//! the same quotas as the shared ones, and per-key concurrency counters.
//!
//! They pre-filter (a request this replica alone would refuse is refused
//! without a Redis round trip: this replica's own traffic is a subset of the
//! key's traffic) and they are the whole decision while Redis is away.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};

use super::{KeyLimits, RejectReason};

struct KeyState {
    limits: KeyLimits,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    in_flight: Arc<AtomicU32>,
}

impl KeyState {
    fn new(limits: KeyLimits, in_flight: Arc<AtomicU32>) -> Self {
        let per_minute = |n: u32| NonZeroU32::new(n).map(|n| DefaultDirectRateLimiter::direct(Quota::per_minute(n)));
        Self {
            limits,
            requests: per_minute(limits.requests_per_minute),
            tokens: per_minute(limits.tokens_per_minute),
            in_flight,
        }
    }
}

#[derive(Default)]
pub struct LocalLimits {
    keys: Mutex<HashMap<String, KeyState>>,
}

/// A local refusal: which limit and how long until it would pass.
pub struct LocalRefusal {
    pub reason: RejectReason,
    pub retry_after: Duration,
}

impl LocalLimits {
    /// Charges one request against the key's local request bucket and, when
    /// `tokens` is given, `tokens` against its token bucket. Token charges are
    /// only made locally while Redis is away: governor cannot refund the
    /// unused part of an up-front charge, so a local token bucket would drift
    /// stricter than the shared one.
    pub fn check_tokens(&self, key_id: &str, limits: &KeyLimits, tokens: u64) -> Result<(), LocalRefusal> {
        self.check_inner(key_id, limits, None, Some(tokens))
    }

    pub fn check(&self, key_id: &str, limits: &KeyLimits, tokens: Option<u64>) -> Result<(), LocalRefusal> {
        self.check_inner(key_id, limits, Some(()), tokens)
    }

    fn check_inner(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        request: Option<()>,
        tokens: Option<u64>,
    ) -> Result<(), LocalRefusal> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state(&mut keys, key_id, limits);
        let clock = DefaultClock::default();
        if let (Some(requests), Some(())) = (&state.requests, request)
            && let Err(not_until) = requests.check()
        {
            return Err(LocalRefusal {
                reason: RejectReason::Requests,
                retry_after: not_until.wait_time_from(clock.now()),
            });
        }
        if let (Some(bucket), Some(tokens)) = (&state.tokens, tokens) {
            let cost = NonZeroU32::new(tokens.min(u64::from(u32::MAX)) as u32);
            if let Some(cost) = cost {
                match bucket.check_n(cost) {
                    Ok(Ok(())) => {}
                    Ok(Err(not_until)) => {
                        return Err(LocalRefusal {
                            reason: RejectReason::Tokens,
                            retry_after: not_until.wait_time_from(clock.now()),
                        });
                    }
                    Err(_) => {
                        return Err(LocalRefusal { reason: RejectReason::TooLarge, retry_after: Duration::ZERO });
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes a local concurrency slot; `enforce` refuses above the cap (only
    /// while Redis is away: otherwise the shared slot set decides).
    pub fn acquire(&self, key_id: &str, limits: &KeyLimits, enforce: bool) -> Result<Arc<AtomicU32>, LocalRefusal> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let counter = self.state(&mut keys, key_id, limits).in_flight.clone();
        let current = counter.fetch_add(1, Ordering::AcqRel);
        if enforce && limits.max_concurrent > 0 && current >= limits.max_concurrent {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Err(LocalRefusal { reason: RejectReason::Concurrency, retry_after: Duration::from_secs(1) });
        }
        Ok(counter)
    }

    fn state<'a>(&self, keys: &'a mut HashMap<String, KeyState>, key_id: &str, limits: &KeyLimits) -> &'a mut KeyState {
        let state =
            keys.entry(key_id.to_string()).or_insert_with(|| KeyState::new(*limits, Arc::new(AtomicU32::new(0))));
        if state.limits != *limits {
            // The key's limits changed: start its buckets afresh with the new quotas.
            *state = KeyState::new(*limits, state.in_flight.clone());
        }
        state
    }
}
