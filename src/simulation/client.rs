//! A small blocking client for the gateway's HTTP API, as the simulated users
//! and labelers call it: bearer keys, JSON bodies, an `Idempotency-Key` on
//! feedback, and bounded retries of 429 / 503 after `Retry-After`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder};
use serde_json::Value;

/// Attempts per call (the first one included) while the gateway answers 429 or 503.
const MAX_ATTEMPTS: u32 = 8;
/// The longest wait honoured from one `Retry-After`.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub struct Api {
    http: Client,
    base: String,
    retries: AtomicU64,
}

/// A successful answer: its status (200, 201, 204...) and JSON body (`Null` when empty).
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Api {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = Client::builder()
            .timeout(Duration::from_secs(600))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("instructd-simulate-labelers/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { http, base: base.trim_end_matches('/').to_string(), retries: AtomicU64::new(0) })
    }

    /// Retries taken so far (429 / 503 answers and refused connections).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn get(&self, path: &str, key: &str) -> anyhow::Result<Reply> {
        self.send("GET", path, || self.http.get(format!("{}{path}", self.base)).bearer_auth(key))
    }

    /// POSTs `body`; `idempotency_key` makes a retried submission count once.
    pub fn post(&self, path: &str, key: &str, body: &Value, idempotency_key: Option<&str>) -> anyhow::Result<Reply> {
        self.send("POST", path, || {
            let request = self.http.post(format!("{}{path}", self.base)).bearer_auth(key).json(body);
            match idempotency_key {
                Some(k) => request.header("Idempotency-Key", k),
                None => request,
            }
        })
    }

    fn send(&self, method: &str, path: &str, build: impl Fn() -> RequestBuilder) -> anyhow::Result<Reply> {
        let mut attempt = 1;
        loop {
            let response = match build().send() {
                Ok(response) => response,
                // Refused connections never reached the gateway: safe to repeat even without an idempotency key.
                Err(e) if e.is_connect() && attempt < MAX_ATTEMPTS => {
                    self.wait(attempt, Duration::from_millis(250 << attempt.min(6)));
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("{method} {path}"))),
            };
            let status = response.status();
            if (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
                && attempt < MAX_ATTEMPTS
            {
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map_or(Duration::from_secs(1), Duration::from_secs_f64);
                self.wait(attempt, after);
                attempt += 1;
                continue;
            }
            let text = response.text().with_context(|| format!("{method} {path}: reading the response"))?;
            let body =
                if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
            if status.is_success() {
                return Ok(Reply { status, body });
            }
            let message = body["error"]["message"].as_str().map_or_else(|| text.trim().to_string(), str::to_string);
            anyhow::bail!("{method} {path}: {status}: {message}");
        }
    }

    fn wait(&self, attempt: u32, after: Duration) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(attempt, wait_ms = after.as_millis() as u64, "retrying");
        std::thread::sleep(after.min(MAX_WAIT));
    }
}
