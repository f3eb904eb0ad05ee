//! One shared, self-healing connection to Redis.
//!
//! Every replica must keep serving when Redis goes away, so nothing here
//! waits long: connecting and each command time out quickly, a failed
//! connect is retried at most once per [`RETRY_INTERVAL`], and
//! [`RedisLink::is_reachable`] tells `/readyz` and the metrics how the last
//! exchange went. Once connected, redis-rs' `ConnectionManager` reconnects by
//! itself; it is cheap to clone, so callers take a clone per command.
//!
//! A password may come inside the URL (`redis://:secret@host`) or apart from
//! it ([`with_password`], `[redis] password`); the URL is never logged or put
//! in an error with it ([`redact`]). TLS (`rediss://`) needs the redis crate's
//! TLS support compiled in.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How long a connect attempt or a command may take before Redis counts as down.
pub const TIMEOUT: Duration = Duration::from_millis(500);
/// Minimum pause between two connect attempts while Redis is down.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("Redis is unreachable at {url}: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("Redis command failed: {0}")]
    Command(#[from] redis::RedisError),
}

impl LinkError {
    /// Whether the failure means Redis itself is away (as opposed to a bad
    /// command or a script error).
    pub fn is_unavailable(&self) -> bool {
        match self {
            LinkError::Unavailable { .. } => true,
            LinkError::Command(e) => is_connection_error(e),
        }
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// `url` with `password` as its password (percent-encoded), unless it already carries one. An empty password
/// changes nothing.
pub fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    if password.is_empty() {
        return url.to_string();
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => return url.to_string(),
        Some((user, host)) => (user, host),
        None => ("", authority),
    };
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{scheme}://{user}:{encoded}@{host}{path}")
}

/// `url` with its password (if any) replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

pub struct RedisLink {
    client: redis::Client,
    /// The URL to connect with (it may hold the password): never logged.
    url: String,
    /// The URL as logs and errors show it.
    shown: String,
    connection: Mutex<Option<ConnectionManager>>,
    connecting: tokio::sync::Mutex<Option<Instant>>,
    reachable: AtomicBool,
    /// When a command last failed for want of Redis: for [`RETRY_INTERVAL`]
    /// after that, commands fail at once instead of each waiting out a timeout.
    down_since: Mutex<Option<Instant>>,
    /// How long a command may take (longer for links made for blocking reads).
    response_timeout: Duration,
}

impl RedisLink {
    /// Parses the URL; does not connect (the first command does).
    pub fn new(url: &str) -> Result<Self, LinkError> {
        Self::with_response_timeout(url, TIMEOUT)
    }

    /// A link for blocking reads (`XREAD BLOCK`, `XREADGROUP BLOCK`) of up to
    /// `max_block`. A blocking command holds its connection, so such readers
    /// need a link of their own, never the one request paths share.
    pub fn for_blocking_reads(url: &str, max_block: Duration) -> Result<Self, LinkError> {
        Self::with_response_timeout(url, max_block + TIMEOUT)
    }

    fn with_response_timeout(url: &str, response_timeout: Duration) -> Result<Self, LinkError> {
        let client = redis::Client::open(url)
            .map_err(|e| LinkError::Unavailable { url: redact(url), reason: format!("invalid URL: {e}") })?;
        Ok(Self {
            client,
            url: url.to_string(),
            shown: redact(url),
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
            reachable: AtomicBool::new(false),
            down_since: Mutex::new(None),
            response_timeout,
        })
    }

    /// The URL to connect with, password included: for opening another connection, never for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with its password hidden, for logs and errors.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Whether the last exchange with Redis succeeded.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// A connection, establishing one if needed.
    pub async fn connection(&self) -> Result<ConnectionManager, LinkError> {
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let mut last_attempt = self.connecting.lock().await;
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        if last_attempt.is_some_and(|at| at.elapsed() < RETRY_INTERVAL) {
            return Err(self.unavailable("not connected; retrying shortly"));
        }
        *last_attempt = Some(Instant::now());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(1);
        match tokio::time::timeout(TIMEOUT * 2, ConnectionManager::new_with_config(self.client.clone(), config)).await {
            Ok(Ok(connection)) => {
                *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(connection.clone());
                self.reachable.store(true, Ordering::Relaxed);
                tracing::info!(url = %self.shown, "connected to Redis");
                Ok(connection)
            }
            Ok(Err(e)) => {
                self.reachable.store(false, Ordering::Relaxed);
                Err(self.unavailable(&e.to_string()))
            }
            Err(_) => {
                self.reachable.store(false, Ordering::Relaxed);
                Err(self.unavailable("connect timed out"))
            }
        }
    }

    /// Runs one command (or script, or pipeline) and records whether Redis answered.
    pub async fn run<T, F, Fut>(&self, command: F) -> Result<T, LinkError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.down_since.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|at| at.elapsed() < RETRY_INTERVAL) {
            return Err(self.unavailable("unreachable moments ago; retrying shortly"));
        }
        let connection = self.connection().await?;
        let result = tokio::time::timeout(self.response_timeout + TIMEOUT, command(connection)).await;
        match result {
            Ok(Ok(value)) => {
                self.mark(true);
                Ok(value)
            }
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    self.mark(false);
                }
                Err(LinkError::Command(e))
            }
            Err(_) => {
                self.mark(false);
                Err(self.unavailable("command timed out"))
            }
        }
    }

    /// PING; refreshes [`is_reachable`](Self::is_reachable).
    pub async fn ping(&self) -> bool {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await }).await.is_ok()
    }

    fn mark(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
        *self.down_since.lock().unwrap_or_else(|e| e.into_inner()) =
            if reachable { None } else { Some(Instant::now()) };
    }

    fn cached(&self) -> Option<ConnectionManager> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn unavailable(&self, reason: &str) -> LinkError {
        LinkError::Unavailable { url: self.shown.clone(), reason: reason.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_added_encoded_and_never_shown() {
        assert_eq!(with_password("redis://h:6379/0", "p@ss:w/rd"), "redis://:p%40ss%3Aw%2Frd@h:6379/0");
        assert_eq!(with_password("rediss://default@h:6380", "s3"), "rediss://default:s3@h:6380");
        assert_eq!(with_password("redis://:inurl@h", "other"), "redis://:inurl@h");
        assert_eq!(with_password("redis://h", ""), "redis://h");
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://default:secret@h"), "rediss://default:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        let link = RedisLink::new(&with_password("redis://127.0.0.1:6379", "p@ss")).unwrap();
        assert!(!link.shown_url().contains("p@ss") && !link.shown_url().contains("p%40ss"));
        assert!(link.url().contains("p%40ss"));
    }

    /// A `redis-server` listening for TLS only, with a fresh self-signed certificate; `None` (skipped) without
    /// `openssl` or a `redis-server` built with TLS.
    fn tls_server(dir: &std::path::Path) -> Option<(std::process::Child, u16)> {
        use std::process::{Command, Stdio};
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let mut child = Command::new(std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()))
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--tls-auth-clients", "no", "--tls-cert-file", cert.to_str()?, "--tls-key-file", key.to_str()?])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .filter(|_| made)?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some((child, port));
            }
            if child.try_wait().ok().flatten().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        None
    }

    #[tokio::test]
    async fn rediss_urls_speak_tls_and_check_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let Some((mut server, port)) = tls_server(dir.path()) else {
            eprintln!("SKIPPED: no openssl or no redis-server with TLS");
            return;
        };
        // The certificate is self-signed: refused unless verification is explicitly off.
        let verified = RedisLink::new(&format!("rediss://127.0.0.1:{port}")).unwrap();
        let unverified = RedisLink::new(&format!("rediss://127.0.0.1:{port}/#insecure")).unwrap();
        let plain = RedisLink::new(&format!("redis://127.0.0.1:{port}")).unwrap();
        let (verified, unverified, plain) = (verified.ping().await, unverified.ping().await, plain.ping().await);
        let _ = server.kill();
        let _ = server.wait();
        assert!(unverified, "PING over TLS");
        assert!(!verified, "a certificate no root vouches for is refused");
        assert!(!plain, "a plain connection to a TLS port fails");
    }
}
