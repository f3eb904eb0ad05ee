//! One upstream server as the gateway tracks it: its concurrency slots, its
//! health (from the probe), and its requests, errors and latency for
//! `/readyz` and `/metrics`.
//!
//! Metric labels name the upstream by its configured base URL: a closed set
//! the operator wrote, so no request can add series.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

pub struct Upstream {
    /// Base URL without a trailing slash.
    pub base: String,
    /// At most `max_concurrency` requests run on this upstream at once.
    pub slots: std::sync::Arc<Semaphore>,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Milliseconds from sending a request to its first token, last seen.
    last_first_token_ms: AtomicU64,
    /// Milliseconds the last health probe took.
    last_probe_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// How one upstream call ended, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Could not connect, or a timeout / 5xx / 429 before the first token (retried elsewhere when allowed).
    Unavailable,
    /// Refused the request (4xx) or sent something unreadable.
    Rejected,
    /// Broke off after tokens were streamed.
    Broken,
    /// The client went away first.
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Unavailable => "unavailable",
            Outcome::Rejected => "rejected",
            Outcome::Broken => "broken",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl Upstream {
    /// `healthy`: whether it is tried before its first probe answers (a static upstream is: the gateway starts
    /// with a probe round anyway; a launched one is not, it is probed until healthy before it serves).
    pub fn new(base: &str, max_concurrency: usize, healthy: bool) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            slots: std::sync::Arc::new(Semaphore::new(max_concurrency.max(1))),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(healthy),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_first_token_ms: AtomicU64::new(0),
            last_probe_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call in flight until the guard drops.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        gauge!("instructd_upstream_in_flight", "upstream" => self.base.clone()).increment(1.0);
        InFlight(self)
    }

    pub fn record_first_token(&self, elapsed: Duration) {
        self.last_first_token_ms.store(elapsed.as_millis() as u64, Ordering::Relaxed);
        histogram!("instructd_upstream_time_to_first_token_seconds", "upstream" => self.base.clone())
            .record(elapsed.as_secs_f64());
    }

    pub fn record_outcome(&self, outcome: Outcome, error: Option<&str>) {
        counter!("instructd_upstream_requests_total", "upstream" => self.base.clone(), "outcome" => outcome.as_str())
            .increment(1);
        if let Some(error) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        }
    }

    pub fn record_probe(&self, healthy: bool, elapsed: Duration, error: Option<String>) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            tracing::warn!(upstream = %self.base, healthy, error = error.as_deref().unwrap_or(""), "upstream health changed");
        }
        self.last_probe_ms.store(elapsed.as_millis() as u64, Ordering::Relaxed);
        gauge!("instructd_upstream_healthy", "upstream" => self.base.clone()).set(if healthy { 1.0 } else { 0.0 });
        histogram!("instructd_upstream_probe_seconds", "upstream" => self.base.clone()).record(elapsed.as_secs_f64());
        if let Some(error) = error {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        }
    }

    /// This upstream's part of `/readyz`.
    pub fn status(&self) -> Value {
        json!({
            "url": self.base,
            "healthy": self.is_healthy(),
            "in_flight": self.in_flight(),
            "requests": self.requests.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "last_time_to_first_token_ms": self.last_first_token_ms.load(Ordering::Relaxed),
            "last_probe_ms": self.last_probe_ms.load(Ordering::Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }
}

pub struct InFlight<'a>(&'a Upstream);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        gauge!("instructd_upstream_in_flight", "upstream" => self.0.base.clone()).decrement(1.0);
    }
}
