//! The fleet on one machine, as `deploy/` runs it: Redis with AOF and a
//! password, three `instructd serve` replicas with separate checkpoint
//! directories behind HAProxy (health-checking `/readyz`), and one
//! `instructd train` serving its checkpoints over HTTP. It shows, with the real
//! binaries: (1) per-key limits hold across replicas through the balancer;
//! (5) a suspension is refused by every replica within a second; (2) a
//! checkpoint the trainer publishes is fetched, verified, loaded and promoted
//! on every replica (each names it in `system_fingerprint`), and a rollback
//! reaches every replica; (4) Redis killed and restarted from its AOF under
//! feedback load loses and duplicates nothing, and keys and consent survive;
//! (3) `kill -9` of a replica under steady load fails only requests in flight
//! on it, and the balancer routes around it. The figures are printed.
//!
//! Needs `haproxy` and `redis-server` (`make test` installs both); skipped
//! with a message when `haproxy` is missing and INSTRUCTD_REQUIRE_FLEET is unset.

#[path = "support/gateway.rs"]
#[allow(dead_code, unused_imports)]
mod gateway;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use gateway::{ADMIN_KEY, Gateway, KillOnDrop, repo_root, tiny_model};

const REDIS_PASSWORD: &str = "fleet-test-password-0123456789";
const REPLICAS: usize = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `redis-server` with AOF (`appendfsync everysec`) and a password, in its own directory, restartable on the same
/// port from its files.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut redis = Self { port: free_port(), dir: dir.to_path_buf(), child: None };
        redis.restart();
        redis
    }

    fn restart(&mut self) {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--dir", self.dir.to_str().unwrap()])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .args(["--requirepass", REDIS_PASSWORD])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (make test installs it)");
        self.child = Some(child);
        wait_for("redis-server listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// SIGKILL: nothing is flushed on the way out.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The URL without its password: the processes get the password apart (`INSTRUCTD_REDIS_PASSWORD`).
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> redis::Connection {
        let url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}", self.port);
        redis::Client::open(url).unwrap().get_connection().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// HAProxy in front of the replicas: round robin, `/readyz` checked every 250 ms, a connection refused retried on
/// another replica; each response names its replica in `x-served-by`.
fn start_haproxy(dir: &Path, port: u16, replicas: &[&Gateway]) -> KillOnDrop {
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(i, g)| format!("  server r{i} {} check\n", g.url.trim_start_matches("http://")))
        .collect();
    let config = format!(
        "global\n  maxconn 1024\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  \
         retries 3\n  option redispatch 1\n\
         frontend api\n  bind 127.0.0.1:{port}\n  default_backend gateways\n\
         backend gateways\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n  \
         default-server inter 250ms fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down\n  http-reuse never\n  http-response set-header x-served-by %s\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .expect("haproxy runs");
    KillOnDrop(child)
}

/// One request: the status (0: no HTTP answer), the JSON body, and the replica that served it.
fn call(base: &str, method: &str, path: &str, key: &str, body: Option<&Value>) -> (u16, Value, String) {
    call_with(base, method, path, key, body, &[])
}

fn call_with(
    base: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (u16, Value, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = gateway::http().request(method, format!("{base}{path}")).bearer_auth(key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    match request.send() {
        Ok(response) => {
            let status = response.status().as_u16();
            let served_by =
                response.headers().get("x-served-by").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let text = response.text().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null), served_by)
        }
        Err(_) => (0, Value::Null, String::new()),
    }
}

fn create_key(lb: &str, user: &str, limits: Value) -> (String, String) {
    let body = json!({"user": user, "scopes": ["playground", "completions"], "limits": limits});
    let (status, key, _) = call(lb, "POST", "/admin/keys", ADMIN_KEY, Some(&body));
    assert_eq!(status, 201, "{key}");
    (key["id"].as_str().unwrap().to_string(), key["secret"].as_str().unwrap().to_string())
}

fn unlimited() -> Value {
    json!({"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent": 0})
}

fn accept_consent(base: &str, secret: &str) {
    let (_, notice, _) = call(base, "GET", "/v1/playground/notice", secret, None);
    let body = json!({"action": "accept", "notice_version": notice["version"]});
    let (status, consent, _) = call(base, "POST", "/v1/playground/consent", secret, Some(&body));
    assert!(status == 200 && consent["logging"] == true, "{status} {consent}");
}

fn completion(base: &str, secret: &str, model: &str, max_tokens: u32) -> (u16, Value, String) {
    let body = json!({"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0});
    call(base, "POST", "/v1/completions", secret, Some(&body))
}

fn serving(replica: &Gateway) -> String {
    let (_, ready, _) = call(&replica.url, "GET", "/readyz", "", None);
    ready["model"]["checkpoint"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_fleet_behind_a_balancer_shares_limits_checkpoints_and_survives_losses() {
    if Command::new("haproxy").arg("-v").stdout(Stdio::null()).status().is_err() {
        assert!(std::env::var_os("INSTRUCTD_REQUIRE_FLEET").is_none(), "haproxy is missing");
        eprintln!("SKIPPED: no haproxy (`make test` installs it)");
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let mut redis = Redis::start(&tmp.path().join("redis"));
    let password = [("INSTRUCTD_REDIS_PASSWORD", REDIS_PASSWORD)];

    // The trainer serves its checkpoint directory over HTTP and announces that URL; no replica can see the
    // directory itself.
    let trainer_port = free_port();
    let trainer_url = format!("http://127.0.0.1:{trainer_port}");
    let trainer_checkpoints = tmp.path().join("trainer-checkpoints");
    let (model_dir, trainer_checkpoints_dir) =
        (model.to_str().unwrap().to_string(), trainer_checkpoints.to_str().unwrap().to_string());
    let trainer_env = [
        ("INSTRUCTD_MODEL", model_dir.as_str()),
        ("INSTRUCTD_REDIS_PASSWORD", REDIS_PASSWORD),
        ("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", trainer_checkpoints_dir.as_str()),
        ("INSTRUCTD__TRAINER__METRICS_ADDR", &format!("127.0.0.1:{trainer_port}")),
        ("INSTRUCTD__TRAINER__CHECKPOINTS_URL", trainer_url.as_str()),
        ("INSTRUCTD__TRAINER__BLOCK_MS", "200"),
        ("INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS", "20"),
        ("INSTRUCTD__TRAINER__REFRESH__MIN_NEW_DEMONSTRATIONS", "4"),
        ("INSTRUCTD__TRAINER__SFT__EPOCHS", "2"),
    ];
    let mut trainer = Command::new(env!("CARGO_BIN_EXE_instructd"));
    trainer
        .arg("train")
        .current_dir(repo_root())
        .env("INSTRUCTD_CONFIG", repo_root().join("configs/default.toml"))
        .env("INSTRUCTD_REDIS_URL", redis.url())
        .env("INSTRUCTD__TRAINER__DATA_DIR", tmp.path().join("trainer-data"))
        .envs(trainer_env)
        .stdout(Stdio::null());
    let _trainer = KillOnDrop(trainer.spawn().expect("instructd train starts"));

    let dirs: Vec<String> =
        (0..REPLICAS).map(|i| tmp.path().join(format!("replica-{i}")).to_str().unwrap().to_string()).collect();
    let replicas: Vec<Gateway> = dirs
        .iter()
        .map(|dir| {
            Gateway::start(
                &redis.url(),
                &model,
                &[
                    password[0],
                    ("INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR", dir.as_str()),
                    ("INSTRUCTD__GATEWAY__ROLLOUT__FETCH", "http"),
                    ("INSTRUCTD__GATEWAY__ROLLOUT__AUTO_PROMOTE", "true"),
                    // The stream must keep every event for the exactly-once count below.
                    ("INSTRUCTD__GATEWAY__PLAYGROUND__TRIM_INTERVAL_SECS", "3600"),
                    ("INSTRUCTD_LOG_FORMAT", "json"),
                ],
            )
        })
        .collect();
    let lb_port = free_port();
    let lb = format!("http://127.0.0.1:{lb_port}");
    let _haproxy = start_haproxy(tmp.path(), lb_port, &replicas.iter().collect::<Vec<_>>());
    let (_, models, _) = call(&replicas[0].url, "GET", "/v1/models", ADMIN_KEY, None);
    let model_id = models["data"][0]["id"].as_str().unwrap().to_string();
    let initial = serving(&replicas[0]);
    let mut seen = BTreeSet::new();
    wait_for("every replica up behind the balancer", Duration::from_secs(30), || {
        let (status, _, served_by) = call(&lb, "GET", "/v1/models", ADMIN_KEY, None);
        if status == 200 {
            seen.insert(served_by);
        }
        seen.len() == REPLICAS
    });
    wait_for("the trainer's HTTP endpoint", Duration::from_secs(30), || {
        gateway::http().get(format!("{trainer_url}/metrics")).send().is_ok_and(|r| r.status().is_success())
    });
    println!("fleet: up in {:.1} s", started.elapsed().as_secs_f64());

    // (1) One key's limit, through the balancer, across replicas.
    let (_, limited) = create_key(
        &lb,
        "fleet-limited",
        json!({"requests_per_minute": 10, "tokens_per_minute": 0, "max_concurrent": 0}),
    );
    let mut admitted = 0;
    let mut by_replica = BTreeMap::<String, usize>::new();
    for _ in 0..24 {
        let (status, _, served_by) = completion(&lb, &limited, &model_id, 1);
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
        *by_replica.entry(served_by).or_default() += 1;
    }
    assert_eq!(admitted, 10, "the replicas together admit exactly the key's limit");
    assert_eq!(by_replica.len(), REPLICAS, "the balancer spread the requests: {by_replica:?}");
    println!("fleet (1): 24 requests through the balancer, {admitted} admitted (limit 10), spread {by_replica:?}");

    // (5) A suspension reaches every replica within a second.
    let (victim_id, victim) = create_key(&lb, "fleet-victim", unlimited());
    for replica in &replicas {
        assert_eq!(completion(&replica.url, &victim, &model_id, 1).0, 200);
    }
    let (status, _, _) = call(&lb, "POST", &format!("/admin/keys/{victim_id}/suspend"), ADMIN_KEY, None);
    assert_eq!(status, 200);
    let suspended_at = Instant::now();
    let mut refused_after = Vec::new();
    for replica in &replicas {
        wait_for("the suspension on every replica", Duration::from_secs(1), || {
            completion(&replica.url, &victim, &model_id, 1).0 == 403
        });
        refused_after.push(format!("{:.0} ms", suspended_at.elapsed().as_secs_f64() * 1000.0));
    }
    assert!(
        suspended_at.elapsed() < Duration::from_secs(1),
        "every replica refused within a second: {refused_after:?}"
    );
    println!("fleet (5): suspended key refused by the three replicas after {refused_after:?}");

    // (2) Playground data in through the balancer; the trainer's SFT checkpoint reaches every replica over HTTP.
    let mut users = Vec::new();
    for i in 0..12 {
        let (_, secret) = create_key(&lb, &format!("fleet-user-{i}"), unlimited());
        accept_consent(&lb, &secret);
        let body = json!({"model": model_id, "prompt": format!("Question {i}: what colour is the sky?"), "k": 2,
                          "max_tokens": 6, "temperature": 1.0});
        let (status, p, _) = call(&lb, "POST", "/v1/playground/completions", &secret, Some(&body));
        assert!(status == 200 && p["logged"] == true, "{status} {p}");
        let demo = json!({"type": "demonstration", "prompt_id": p["prompt_id"], "response": "Blue."});
        let (status, res, _) = call(&lb, "POST", "/v1/feedback", &secret, Some(&demo));
        assert_eq!(status, 201, "{res}");
        users.push((secret, p));
    }
    let published_at = Instant::now();
    wait_for("the refreshed checkpoint served by every replica", Duration::from_secs(240), || {
        replicas.iter().all(|r| serving(r) != initial)
    });
    let refreshed = serving(&replicas[0]);
    assert!(refreshed.starts_with("sft-"), "{refreshed}");
    for (replica, dir) in replicas.iter().zip(&dirs) {
        assert_eq!(serving(replica), refreshed, "every replica serves the same checkpoint");
        let (_, c, _) = completion(&replica.url, &users[0].0, &model_id, 2);
        assert_eq!(c["system_fingerprint"], refreshed.as_str(), "{c}");
        // Fetched into the replica's own directory and verified against the manifest there.
        let copy = Path::new(dir).join(&refreshed);
        inference::checkpoint::verify_dir(&copy).unwrap_or_else(|e| panic!("{}: {e}", copy.display()));
    }
    assert!(trainer_checkpoints.join(&refreshed).is_dir());
    println!(
        "fleet (2): {refreshed} published by the trainer, fetched, verified and promoted on all {REPLICAS} replicas \
         {:.1} s after the demonstrations",
        published_at.elapsed().as_secs_f64()
    );
    // One fleet-wide rollback through the balancer reaches every replica.
    let rolled_back_at = Instant::now();
    let (status, body, _) = call(&lb, "POST", "/admin/checkpoints/rollback", ADMIN_KEY, Some(&json!({"fleet": true})));
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["restored"].as_str(), body["fleet"]["announced"].as_bool()), (Some(initial.as_str()), Some(true)));
    for replica in &replicas {
        let deadline = Instant::now() + Duration::from_secs(60);
        while serving(replica) != initial {
            assert!(Instant::now() < deadline, "the fleet-wide rollback never reached {}", replica.url);
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, c, _) = completion(&replica.url, &users[0].0, &model_id, 2);
        assert_eq!(c["system_fingerprint"], initial.as_str(), "{c}");
    }
    println!(
        "fleet (2): one fleet-wide rollback returned all {REPLICAS} replicas to {initial} in {:.1} s",
        rolled_back_at.elapsed().as_secs_f64()
    );

    // (4) Redis killed and restarted from its AOF under feedback load.
    let (feeder_id, feeder) = create_key(&lb, "fleet-feeder", unlimited());
    accept_consent(&lb, &feeder);
    let body = json!({"model": model_id, "prompt": "Rate me.", "k": 2, "max_tokens": 4, "temperature": 1.0});
    let (_, logged, _) = call(&lb, "POST", "/v1/playground/completions", &feeder, Some(&body));
    let generation = logged["samples"][0]["generation_id"].as_str().unwrap().to_string();
    // Every replica has looked the key up (its cache authenticates it while Redis is away).
    for replica in &replicas {
        assert_eq!(call(&replica.url, "GET", "/v1/playground/consent", &feeder, None).0, 200);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<(u16, Value)>::new()));
    let feeders: Vec<_> = (0..4)
        .map(|t| {
            let (lb, feeder, generation) = (lb.clone(), feeder.clone(), generation.clone());
            let (stop, accepted, refused) = (stop.clone(), accepted.clone(), refused.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let idempotency = format!("fleet-{t}-{n}");
                    let rating = json!({"type": "rating", "generation_id": generation, "score": 1 + n % 7});
                    // A request that got no answer is retried with the same key, as a client would.
                    let mut answer = (0, Value::Null, String::new());
                    for _ in 0..3 {
                        let headers = [("Idempotency-Key", idempotency.as_str())];
                        answer = call_with(&lb, "POST", "/v1/feedback", &feeder, Some(&rating), &headers);
                        if answer.0 != 0 && answer.0 < 500 {
                            break;
                        }
                    }
                    match answer {
                        (200 | 201, body, _) => accepted.lock().unwrap().push(body["id"].as_str().unwrap().into()),
                        (status, body, _) => refused.lock().unwrap().push((status, body)),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    let feedback_ids = |redis: &Redis| -> Vec<String> {
        let entries: Vec<(String, BTreeMap<String, String>)> =
            redis::cmd("XRANGE").arg("instructd:feedback").arg("-").arg("+").query(&mut redis.connection()).unwrap();
        entries
            .iter()
            .filter_map(|(_, fields)| serde_json::from_str::<Value>(fields.get("event")?).ok())
            .filter_map(|event| event["event_id"].as_str().map(str::to_string))
            .collect()
    };
    std::thread::sleep(Duration::from_millis(1500));
    let before = feedback_ids(&redis).len();
    let accepted_before = accepted.lock().unwrap().len();
    redis.kill();
    std::thread::sleep(Duration::from_millis(1000));
    redis.restart();
    std::thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::Relaxed);
    for feeder in feeders {
        feeder.join().unwrap();
    }
    let accepted: BTreeSet<String> = accepted.lock().unwrap().iter().cloned().collect();
    let mut refusals = BTreeMap::<String, usize>::new();
    for (status, body) in refused.lock().unwrap().iter() {
        *refusals.entry(format!("{status} {}", body["error"]["code"].as_str().unwrap_or("-"))).or_default() += 1;
    }
    let mut in_stream = Vec::new();
    wait_for("every accepted event in the stream (spills replayed)", Duration::from_secs(30), || {
        in_stream = feedback_ids(&redis);
        accepted.iter().all(|id| in_stream.contains(id))
    });
    std::thread::sleep(Duration::from_millis(1500));
    in_stream = feedback_ids(&redis);
    let ours: Vec<&String> = in_stream.iter().filter(|id| accepted.contains(*id)).collect();
    assert_eq!(ours.len(), accepted.len(), "every accepted event is in the stream exactly once");
    let (_, keys, _) = call(&lb, "GET", "/admin/keys", ADMIN_KEY, None);
    let key_ids: Vec<&str> = keys["data"].as_array().unwrap().iter().filter_map(|k| k["id"].as_str()).collect();
    assert!(key_ids.contains(&feeder_id.as_str()) && key_ids.contains(&victim_id.as_str()), "keys survive");
    let (_, consent, _) = call(&lb, "GET", "/v1/playground/consent", &feeder, None);
    assert_eq!(consent["logging"], true, "consent survives: {consent}");
    println!(
        "fleet (4): Redis killed and restarted from its AOF under feedback load: {} events accepted ({accepted_before} \
         before the kill), refused {refusals:?} (while Redis was away; clients retry those); the stream held {before} \
         feedback events before the kill and {} after, every accepted one exactly once; keys and consent intact",
        accepted.len(),
        in_stream.len()
    );

    // (3) kill -9 of one replica under steady completions load.
    let stop = Arc::new(AtomicBool::new(false));
    let (_, loader) = create_key(&lb, "fleet-loader", unlimited());
    let log = Arc::new(Mutex::new(Vec::<(Instant, Instant, u16, String)>::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (lb, loader, model_id, stop, log) =
                (lb.clone(), loader.clone(), model_id.clone(), stop.clone(), log.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let (status, _, served_by) = completion(&lb, &loader, &model_id, 16);
                    log.lock().unwrap().push((sent, Instant::now(), status, served_by));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2000));
    let victim_pid = replicas[1].pid();
    let killed_at = Instant::now();
    let _ = Command::new("kill").args(["-9", &victim_pid.to_string()]).status();
    // Gone once its port refuses connections (its threads may still hold the sockets briefly after the kill).
    let victim_addr = replicas[1].url.trim_start_matches("http://").to_string();
    let dead = || std::net::TcpStream::connect(&victim_addr).is_err();
    wait_for("the killed replica gone", Duration::from_secs(5), dead);
    let dead_at = Instant::now();
    std::thread::sleep(Duration::from_millis(4000));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let log = log.lock().unwrap();
    let failures: Vec<_> = log.iter().filter(|(_, _, status, _)| *status != 200).collect();
    for (sent, done, status, _) in &failures {
        let relative = |t: &Instant| {
            t.saturating_duration_since(killed_at).as_secs_f64() - killed_at.saturating_duration_since(*t).as_secs_f64()
        };
        assert!(
            *sent <= dead_at && *done >= killed_at,
            "a request failed ({status}) that was not in flight at the kill: sent {:+.3} s, answered {:+.3} s, dead at \
             {:+.3} s",
            relative(sent),
            relative(done),
            relative(&dead_at)
        );
    }
    assert!(failures.len() <= 4, "at most the in-flight requests fail: {}", failures.len());
    let after: Vec<_> = log.iter().filter(|(sent, _, _, _)| *sent > dead_at).collect();
    assert!(after.len() > 20 && after.iter().all(|(_, _, status, _)| *status == 200), "traffic continues");
    assert!(after.iter().all(|(_, _, _, served_by)| served_by != "r1"), "nothing is sent to the dead replica");
    let served: BTreeSet<&str> = after.iter().map(|(_, _, _, s)| s.as_str()).collect();
    println!(
        "fleet (3): {} completions under load, replica r1 killed with SIGKILL: {} failed (in flight on it), {} sent \
         after the kill all answered by {served:?}",
        log.len(),
        failures.len(),
        after.len()
    );
    println!("fleet: whole test {:.1} s", started.elapsed().as_secs_f64());
}
