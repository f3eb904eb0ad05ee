//! The accept loop: HTTP/1.1 connections served by hyper with the limits an
//! open port needs. A cap on open connections (past it, new ones wait in the
//! listen backlog), a deadline for a request's head once its first byte
//! arrived (and for a new connection's first request), an idle deadline
//! between keep-alive requests, and a write-stall deadline: a client that
//! reads nothing for that long is cut off, which drops its response body and
//! so cancels its generation. Request bodies have their own deadline where
//! they are read (`json.rs`).
//!
//! Graceful shutdown: on the signal the listener closes, idle connections
//! close, and requests in flight (streams included) run to their end.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::Response;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

use crate::metrics;

/// What one connection may do; `None` disables a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub write_stall_timeout: Option<Duration>,
}

impl Limits {
    /// How often a connection's deadlines are checked: a quarter of the
    /// shortest one, between 50 ms and 1 s.
    fn tick(&self) -> Duration {
        [self.header_read_timeout, self.idle_timeout, self.write_stall_timeout]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(1), |d| d / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for
/// every connection to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS) as u32;
    let permits = Arc::new(Semaphore::new(max as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our own deadlines (below) replace hyper's header timer, which would
    // also cut idle keep-alive connections at the header deadline.
    builder.header_read_timeout(None::<Duration>);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors or similar: wait rather than spin.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, router.clone(), limits, builder.clone(), stop_rx.clone(), permit));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it ends.
    let _ = permits.acquire_many(max).await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    builder: hyper::server::conn::http1::Builder,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _open = OpenGauge::new();
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = TokioIo::new(Watched { stream, activity: activity.clone() });
    let service = ConnectionService { router, activity: activity.clone() };
    let mut conn = std::pin::pin!(builder.serve_connection(io, service));
    let mut tick = tokio::time::interval(limits.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => match activity.verdict(&limits, Instant::now()) {
                Verdict::Keep => {}
                Verdict::Close(reason) => {
                    if !closing {
                        metrics::record_connection_closed(reason);
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                Verdict::Abort(reason) => {
                    tracing::info!(reason, "connection dropped");
                    metrics::record_connection_closed(reason);
                    // Dropping the connection drops any response body with it.
                    return;
                }
            },
        }
    }
}

/// Counts open connections in `instructd_connections_open`.
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        metrics::connection_opened();
        Self
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::connection_closed();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Close once nothing is in flight (graceful).
    Close(&'static str),
    /// Drop the connection now.
    Abort(&'static str),
}

/// What a connection is doing, as its deadlines need it.
struct Activity(Mutex<ActivityState>);

struct ActivityState {
    /// Requests whose response has not been fully handed to the socket.
    in_flight: usize,
    /// When the connection last had nothing in flight.
    idle_since: Instant,
    /// When the head of the next request began to arrive (the opening, for the first).
    head_started: Option<Instant>,
    /// Since when a write has been waiting for the client to read.
    write_blocked_since: Option<Instant>,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self(Mutex::new(ActivityState {
            in_flight: 0,
            idle_since: now,
            head_started: Some(now),
            write_blocked_since: None,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn received(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
        }
    }

    fn wrote(&self, blocked: bool) {
        let mut state = self.lock();
        if !blocked {
            state.write_blocked_since = None;
        } else if state.write_blocked_since.is_none() {
            state.write_blocked_since = Some(Instant::now());
        }
    }

    fn request_started(&self) {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
    }

    fn request_ended(&self) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
    }

    fn verdict(&self, limits: &Limits, now: Instant) -> Verdict {
        let state = self.lock();
        let past = |since: Option<Instant>, limit: Option<Duration>| match (since, limit) {
            (Some(since), Some(limit)) => now.saturating_duration_since(since) >= limit,
            _ => false,
        };
        if past(state.write_blocked_since, limits.write_stall_timeout) {
            return Verdict::Abort("write_stall");
        }
        if state.in_flight > 0 {
            return Verdict::Keep;
        }
        if state.head_started.is_some() {
            if past(state.head_started, limits.header_read_timeout) {
                return Verdict::Abort("header_timeout");
            }
        } else if past(Some(state.idle_since), limits.idle_timeout) {
            return Verdict::Close("idle_timeout");
        }
        Verdict::Keep
    }
}

/// The socket, reporting reads and blocked writes to the connection's [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.received();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, data);
        this.activity.wrote(result.is_pending());
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.activity.wrote(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router as hyper calls it, counting each request in flight until its
/// response body is done.
struct ConnectionService {
    router: Router,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = InFlight::new(self.activity.clone());
        let router = self.router.clone();
        Box::pin(async move {
            let response: Response = router.oneshot(request).await?;
            Ok(response.map(|body| TrackedBody { body, _guard: guard }))
        })
    }
}

/// One request in flight; dropped with its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.request_started();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that keeps its request counted in flight.
pub struct TrackedBody {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 8,
            header_read_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
            write_stall_timeout: Some(Duration::from_secs(30)),
        }
    }

    #[test]
    fn a_silent_new_connection_meets_the_header_deadline() {
        let start = Instant::now();
        let activity = Activity::new(start);
        assert_eq!(activity.verdict(&limits(), start + Duration::from_secs(9)), Verdict::Keep);
        assert_eq!(activity.verdict(&limits(), start + Duration::from_secs(10)), Verdict::Abort("header_timeout"));
    }

    #[test]
    fn idle_keep_alive_closes_and_requests_in_flight_never_time_out() {
        let start = Instant::now();
        let activity = Activity::new(start);
        activity.request_started();
        // A long generation: nothing read or written for minutes is fine.
        assert_eq!(activity.verdict(&limits(), start + Duration::from_secs(600)), Verdict::Keep);
        activity.request_ended();
        let idle = activity.lock().idle_since;
        assert_eq!(activity.verdict(&limits(), idle + Duration::from_secs(59)), Verdict::Keep);
        assert_eq!(activity.verdict(&limits(), idle + Duration::from_secs(60)), Verdict::Close("idle_timeout"));
        // A new head started: the header deadline applies instead.
        activity.received();
        let started = activity.lock().head_started.unwrap();
        assert_eq!(activity.verdict(&limits(), started + Duration::from_secs(10)), Verdict::Abort("header_timeout"));
    }

    #[test]
    fn a_blocked_write_past_the_stall_deadline_aborts() {
        let start = Instant::now();
        let activity = Activity::new(start);
        activity.request_started();
        activity.wrote(true);
        let blocked = activity.lock().write_blocked_since.unwrap();
        assert_eq!(activity.verdict(&limits(), blocked + Duration::from_secs(29)), Verdict::Keep);
        assert_eq!(activity.verdict(&limits(), blocked + Duration::from_secs(30)), Verdict::Abort("write_stall"));
        activity.wrote(false);
        assert_eq!(activity.verdict(&limits(), blocked + Duration::from_secs(31)), Verdict::Keep);
    }

    #[test]
    fn disabled_deadlines_never_fire() {
        let off =
            Limits { max_connections: 1, header_read_timeout: None, idle_timeout: None, write_stall_timeout: None };
        let start = Instant::now();
        let activity = Activity::new(start);
        assert_eq!(activity.verdict(&off, start + Duration::from_secs(86_400)), Verdict::Keep);
        assert_eq!(off.tick(), Duration::from_secs(1));
        assert_eq!(limits().tick(), Duration::from_millis(2500).min(Duration::from_secs(1)));
    }
}
