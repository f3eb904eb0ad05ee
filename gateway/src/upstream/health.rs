//! Health probes of the upstreams: `GET {base}/health` (llama-server, vLLM and
//! SGLang all answer it; 200 only once the model is loaded), falling back to
//! `GET {base}/v1/models` for servers without it. A failing upstream gets no
//! new requests while a healthy one is left; `/readyz` is 503 when none is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Pool;
use super::stats::Upstream;

/// Probes every upstream once, all at once.
pub async fn probe_all(pool: &Pool) {
    futures_util::future::join_all(pool.upstreams.iter().map(|u| probe(pool, u))).await;
}

/// Probes every `health_interval_secs` until the pool is dropped.
pub fn spawn(pool: &Arc<Pool>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(pool);
    let every = Duration::from_secs(pool.config.health_interval_secs.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(pool) = weak.upgrade() else { return };
            probe_all(&pool).await;
        }
    })
}

async fn probe(pool: &Pool, upstream: &Upstream) {
    let started = Instant::now();
    let timeout = Duration::from_secs(pool.config.connect_timeout_secs.max(1) * 2);
    let result = match get(pool, &format!("{}/health", upstream.base), timeout).await {
        Ok(404) => get(pool, &format!("{}/v1/models", upstream.base), timeout).await,
        other => other,
    };
    let (healthy, error) = match result {
        Ok(status) if (200..300).contains(&status) => (true, None),
        Ok(status) => (false, Some(format!("health probe answered {status}"))),
        Err(e) => (false, Some(format!("health probe failed: {}", super::call::causes(&e)))),
    };
    upstream.record_probe(healthy, started.elapsed(), error);
}

async fn get(pool: &Pool, url: &str, timeout: Duration) -> Result<u16, reqwest::Error> {
    let mut request = pool.client.get(url).timeout(timeout);
    if !pool.config.api_key.is_empty() {
        request = request.bearer_auth(&pool.config.api_key);
    }
    Ok(request.send().await?.status().as_u16())
}
