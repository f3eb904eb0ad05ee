//! Upstream processes the gateway starts itself (`[engine.openai_http.launch]`):
//! the command template filled in, a free port of the configured range, the
//! child's output in a log file, and its end (SIGTERM, then SIGKILL after
//! `stop_grace_secs`).
//!
//! Every child belongs to the gateway: on Linux it gets SIGKILL when the
//! gateway dies, however it dies (`PR_SET_PDEATHSIG`; the signal follows the
//! *thread* that forked, so one long-lived spawner thread forks them all), and
//! [`stop_all`] ends them in order on a graceful shutdown.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("no free port in [engine.openai_http.launch] ports {0}-{1}")]
    NoFreePort(u16, u16),
    #[error("[engine.openai_http.launch] ports {0:?} is not a range (first <= last)")]
    BadPorts([u16; 2]),
    #[error("cannot start the upstream {program:?}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("the upstream exited ({status}) before it was healthy; its log ({log}) ends with:\n{tail}")]
    Exited { status: ExitStatus, log: String, tail: String },
    #[error("the upstream was not healthy within {secs} s; its log ({log}) ends with:\n{tail}")]
    Unhealthy { secs: u64, log: String, tail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("converting the checkpoint for the upstream: {0}")]
    Convert(String),
}

/// What the command template's placeholders stand for.
pub struct Placeholders<'a> {
    /// The checkpoint exported to GGUF, when the template names `{gguf}`.
    pub gguf: Option<&'a Path>,
    pub dir: &'a Path,
    pub host: &'a str,
    pub port: u16,
    pub checkpoint: &'a str,
}

/// Whether the template needs a GGUF export of the checkpoint (llama-server).
pub fn needs_gguf(command: &[String]) -> bool {
    command.iter().any(|arg| arg.contains("{gguf}"))
}

/// The template with its placeholders filled in.
pub fn fill(command: &[String], values: &Placeholders<'_>) -> Vec<String> {
    let gguf = values.gguf.map(|p| p.display().to_string()).unwrap_or_default();
    let dir = values.dir.display().to_string();
    let port = values.port.to_string();
    command
        .iter()
        .map(|arg| {
            arg.replace("{gguf}", &gguf)
                .replace("{dir}", &dir)
                .replace("{host}", values.host)
                .replace("{port}", &port)
                .replace("{checkpoint}", values.checkpoint)
        })
        .collect()
}

type Shared = Arc<Mutex<Option<Child>>>;
/// Each running child by pid: its port, the child, its grace period.
type Registry = Mutex<BTreeMap<u32, (u16, Shared, Duration)>>;

/// Every running child by pid: for [`stop_all`], and so that no two launches pick the same port.
fn registry() -> &'static Registry {
    static LIVE: OnceLock<Registry> = OnceLock::new();
    LIVE.get_or_init(Mutex::default)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port of `range` (inclusive) that no child of this gateway uses and that can be bound now on `host`.
pub fn free_port(host: &str, range: [u16; 2]) -> Result<u16, LaunchError> {
    let [first, last] = range;
    if first > last || first == 0 {
        return Err(LaunchError::BadPorts(range));
    }
    let taken: Vec<u16> = lock(registry()).values().map(|(port, _, _)| *port).collect();
    (first..=last)
        .filter(|port| !taken.contains(port))
        .find(|port| std::net::TcpListener::bind((host, *port)).is_ok())
        .ok_or(LaunchError::NoFreePort(first, last))
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Forks children from one thread that lives as long as the gateway (see the module's doc).
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let spawned = std::thread::Builder::new().name("upstream-spawner".into()).spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the upstream spawner thread");
        }
        Mutex::new(tx)
    })
}

#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// One running upstream process. Dropping it stops the process (in the background: SIGTERM, then SIGKILL after
/// the grace period), so the pool that owns it decides its lifetime.
pub struct Process {
    pid: u32,
    port: u16,
    log: PathBuf,
    argv: Vec<String>,
    started: Instant,
    child: Shared,
}

impl Process {
    /// Starts `argv` with its output appended to `log`.
    pub fn spawn(argv: Vec<String>, port: u16, log: &Path, grace: Duration) -> Result<Self, LaunchError> {
        let io = |source| LaunchError::Io { path: log.to_path_buf(), source };
        let program = argv.first().cloned().unwrap_or_default();
        let out = File::options().create(true).append(true).open(log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut command = Command::new(&program);
        command.args(&argv[1..]).stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut command);
        let (reply, answer) = mpsc::channel();
        let spawned = lock(spawner())
            .send((command, reply))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))
            .and_then(|()| answer.recv().map_err(|_| std::io::Error::other("the spawner thread is gone")))
            .and_then(|result| result);
        let child = spawned.map_err(|source| LaunchError::Spawn { program: program.clone(), source })?;
        let pid = child.id();
        let child: Shared = Arc::new(Mutex::new(Some(child)));
        lock(registry()).insert(pid, (port, child.clone(), grace));
        tracing::info!(pid, port, command = ?argv, log = %log.display(), "upstream process started");
        Ok(Self { pid, port, log: log.to_path_buf(), argv, started: Instant::now(), child })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How the process ended, if it has.
    pub fn exited(&self) -> Option<ExitStatus> {
        lock(&self.child).as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last lines of its log, for an error message.
    pub fn log_tail(&self) -> String {
        const TAIL: u64 = 1500;
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let length = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(length.saturating_sub(TAIL)));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// Its part of `/readyz`.
    pub fn status(&self) -> Value {
        json!({
            "pid": self.pid,
            "port": self.port,
            "command": self.argv,
            "log": self.log.display().to_string(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "running": self.exited().is_none(),
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let Some((_, child, grace)) = lock(registry()).remove(&self.pid) else { return };
        let Some(child) = lock(&child).take() else { return };
        let pid = self.pid;
        // Dropped on an async worker, possibly: waiting out the grace period belongs on a thread of its own.
        let stopping = std::thread::Builder::new().name(format!("upstream-stop-{pid}")).spawn(move || {
            let status = stop_children(vec![child], grace);
            tracing::info!(pid, status = ?status, "upstream process stopped");
        });
        if let Err(e) = stopping {
            tracing::error!(pid, error = %e, "cannot stop the upstream process");
        }
    }
}

/// SIGTERM to every child, then SIGKILL to those still running after `grace`; waits for all of them.
fn stop_children(mut children: Vec<Child>, grace: Duration) -> Vec<Option<ExitStatus>> {
    for child in &children {
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on the pid of a child not yet reaped (we hold its `Child`), so not a recycled pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + grace;
    let mut statuses = vec![None; children.len()];
    loop {
        for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = child.try_wait().ok().flatten();
            }
        }
        if statuses.iter().all(Option::is_some) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
        if status.is_none() {
            tracing::warn!(pid = child.id(), "upstream ignored SIGTERM; killing it");
            let _ = child.kill();
            *status = child.wait().ok();
        }
    }
    statuses
}

/// Stops every upstream this gateway started (a graceful shutdown), all at once, each with its grace period.
pub fn stop_all() {
    let live: Vec<(Shared, Duration)> =
        std::mem::take(&mut *lock(registry())).into_values().map(|(_, child, grace)| (child, grace)).collect();
    let grace = live.iter().map(|(_, grace)| *grace).max().unwrap_or_default();
    let children: Vec<Child> = live.iter().filter_map(|(child, _)| lock(child).take()).collect();
    if !children.is_empty() {
        tracing::info!(count = children.len(), "stopping the upstream processes");
        stop_children(children, grace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_gguf_detected() {
        let command: Vec<String> =
            ["serve", "-m", "{gguf}", "--port={port}", "{dir}", "{host}", "{checkpoint}"].map(String::from).into();
        assert!(needs_gguf(&command));
        assert!(!needs_gguf(&command[3..]));
        let values = Placeholders {
            gguf: Some(Path::new("/w/c1/model.gguf")),
            dir: Path::new("/store/c1"),
            host: "127.0.0.1",
            port: 18101,
            checkpoint: "c1",
        };
        let filled = fill(&command, &values);
        assert_eq!(filled, ["serve", "-m", "/w/c1/model.gguf", "--port=18101", "/store/c1", "127.0.0.1", "c1"]);
    }

    #[test]
    fn a_port_in_use_is_skipped_and_a_bad_range_refused() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(matches!(free_port("127.0.0.1", [port, port]), Err(LaunchError::NoFreePort(..))));
        assert!(matches!(free_port("127.0.0.1", [5, 4]), Err(LaunchError::BadPorts(_))));
    }

    /// A dropped process is stopped: SIGTERM first, SIGKILL when it ignores it past the grace period.
    #[cfg(target_os = "linux")]
    #[test]
    fn dropping_a_process_stops_it_even_when_it_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let argv: Vec<String> = ["sh", "-c", "trap '' TERM; echo ready; exec sleep 30"].map(String::from).into();
        let process = Process::spawn(argv, 1, &dir.path().join("log"), Duration::from_millis(300)).unwrap();
        let pid = process.pid();
        // SIGTERM before the trap is set would end it at once.
        let started = Instant::now();
        while !process.log_tail().contains("ready") {
            assert!(
                started.elapsed() < Duration::from_secs(10) && process.exited().is_none(),
                "the script did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        drop(process);
        // The pid is reaped by the stopping thread: /proc/<pid> disappears.
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "the process outlived its drop");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(started.elapsed() >= Duration::from_millis(250), "SIGTERM was ignored, so the grace period ran");
    }
}
