//! Rate limiter tests against a private redis-server.

use std::sync::Arc;
use std::time::Duration;

use feedback::RedisLink;
use feedback::redis_server::RedisServer;

use super::*;

fn limiter(server: &RedisServer) -> RateLimiter {
    RateLimiter::new(Arc::new(RedisLink::new(&server.url()).unwrap()), "test:rl")
}

fn limits(requests: u32, tokens: u32, concurrent: u32) -> KeyLimits {
    KeyLimits { requests_per_minute: requests, tokens_per_minute: tokens, max_concurrent: concurrent }
}

#[tokio::test]
async fn gcra_admits_the_burst_then_refuses_with_retry_after() {
    let server = RedisServer::start().unwrap();
    let rl = limiter(&server);
    let l = limits(5, 0, 0);
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let admission = rl.admit("k", &l, 1).await.unwrap();
        remaining.push(admission.headers().remaining_requests);
        admission.finish(1).await;
    }
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
    assert!(rl.shared_mode());
    let rejection = rl.admit("k", &l, 1).await.err().unwrap();
    assert_eq!(rejection.reason, RejectReason::Requests);
    // One request's worth (12 s) must drain first; the local limiter may answer first.
    let retry = rejection.retry_after.as_secs_f64();
    assert!((11.0..=13.0).contains(&retry), "{retry}");
}

#[tokio::test]
async fn tokens_are_charged_up_front_and_refunded() {
    let server = RedisServer::start().unwrap();
    let rl = limiter(&server);
    let l = limits(0, 100, 0);
    let first = rl.admit("k", &l, 60).await.unwrap();
    assert_eq!(first.headers().remaining_tokens, 40);
    assert_eq!(rl.admit("k", &l, 60).await.err().unwrap().reason, RejectReason::Tokens);
    first.finish(10).await;
    let again = rl.admit("k", &l, 60).await.unwrap();
    assert!(again.headers().remaining_tokens <= 30);
    assert_eq!(rl.admit("k", &l, 101).await.err().unwrap().reason, RejectReason::TooLarge);
}

#[tokio::test]
async fn concurrency_cap_and_release_on_drop() {
    let server = RedisServer::start().unwrap();
    let rl = limiter(&server);
    let l = limits(0, 0, 2);
    let a = rl.admit("k", &l, 1).await.unwrap();
    let _b = rl.admit("k", &l, 1).await.unwrap();
    assert_eq!(rl.admit("k", &l, 1).await.err().unwrap().reason, RejectReason::Concurrency);
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    rl.admit("k", &l, 1).await.unwrap();
}

#[tokio::test]
async fn two_replicas_share_one_limit() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (limiter(&server), limiter(&server));
    let l = limits(10, 0, 0);
    let mut admitted = 0;
    for i in 0..30 {
        let replica = if i % 2 == 0 { &a } else { &b };
        if let Ok(admission) = replica.admit("shared", &l, 1).await {
            admitted += 1;
            admission.finish(1).await;
        }
    }
    assert_eq!(admitted, 10);
}

#[tokio::test]
async fn falls_back_to_local_limits_while_redis_is_down() {
    let mut server = RedisServer::start().unwrap();
    let rl = limiter(&server);
    let l = limits(5, 0, 0);
    rl.admit("warm", &l, 1).await.unwrap().finish(1).await;
    server.stop();
    let mut admitted = 0;
    for _ in 0..6 {
        if rl.admit("k", &l, 1).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);
    assert!(!rl.shared_mode());
    server.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    rl.admit("other", &l, 1).await.unwrap();
    assert!(rl.shared_mode());
}

#[tokio::test]
async fn zero_means_unlimited() {
    let server = RedisServer::start().unwrap();
    let rl = limiter(&server);
    for _ in 0..50 {
        let admission = rl.admit("k", &limits(0, 0, 0), 1_000_000).await.unwrap();
        assert_eq!(admission.headers().limit_requests, 0);
    }
}

#[tokio::test]
async fn a_refused_request_charges_nothing() {
    let server = RedisServer::start().unwrap();
    let rl = limiter(&server);
    let l = limits(5, 100, 1);
    let _held = rl.admit("k", &l, 10).await.unwrap();
    let refused = rl.admit("k", &l, 10).await.err().unwrap();
    assert_eq!(refused.reason, RejectReason::Concurrency);
    assert_eq!((refused.headers.remaining_requests, refused.headers.remaining_tokens), (4, 90));
}
