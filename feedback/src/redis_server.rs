//! A private `redis-server` child process on a free port, for tests.
//!
//! Tests never touch a Redis the machine may already run: each starts its
//! own (the Debian `redis-server` binary), with persistence off, and the
//! process is killed when the handle drops. `stop` and `start` again on the
//! same port let tests simulate Redis going away and coming back.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    binary: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` (from `$REDIS_SERVER` or `PATH`) on a free port
    /// and waits until it accepts connections.
    pub fn start() -> std::io::Result<Self> {
        let binary = std::env::var_os("REDIS_SERVER").map(PathBuf::from).unwrap_or_else(|| "redis-server".into());
        let port = free_port()?;
        let mut server = Self { port, child: None, binary };
        server.restart()?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server; the port stays reserved for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (a no-op while it runs).
    pub fn restart(&mut self) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting {}: {e} (apt-get install redis-server)", self.binary.display()),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "redis-server did not start within 10 s"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
