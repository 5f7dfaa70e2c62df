//! Bounded connections: each port keeps at most `max_connections` open (TLS handshakes
//! included), closes connections with no call in flight for `idle_timeout`, and at the limit
//! makes room for a new client by closing the longest-idle connection. Only when every
//! connection has a call in flight is the new one refused.
//!
//! A connection is busy while a call on it is in flight: from the request until its response
//! body (a stream, for Watch) is done. [`ActivityLayer`] marks that; HTTP/2 pings do not
//! count, so keepalive alone never keeps a connection open.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Limits of one port.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            idle_timeout: Some(Duration::from_secs(300)),
        }
    }
}

/// What happened to a port's connections, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub open: AtomicU64,
    /// Closed after `idle_timeout` without a call.
    pub closed_idle: AtomicU64,
    /// Closed to make room for a new connection.
    pub evicted: AtomicU64,
    /// New connections refused because every open one was busy.
    pub refused: AtomicU64,
}

/// One connection's activity, shared by its reader, its calls and the tracker.
pub struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last call's start or end (or the accept).
    last: AtomicU64,
    active: AtomicUsize,
    closed: AtomicBool,
    reader: Mutex<Option<Waker>>,
    /// Wakes a handshake in progress when the connection is closed.
    pub(crate) closing: Notify,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        let activity = Self {
            epoch,
            last: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            reader: Mutex::new(None),
            closing: Notify::new(),
        };
        activity.touch();
        activity
    }

    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self, now_ms: u64) -> Option<u64> {
        (self.active.load(Ordering::Relaxed) == 0)
            .then(|| now_ms.saturating_sub(self.last.load(Ordering::Relaxed)))
    }

    /// A call started; it ends when the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveCall {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ActiveCall(self.clone())
    }

    /// Closes the connection: its reader sees end-of-file, so the server drops it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.closing.notify_one();
        if let Some(waker) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            waker.wake();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Remembers the reader's waker, so [`Activity::close`] can wake it.
    pub(crate) fn park_reader(&self, cx: &Context<'_>) {
        let mut slot = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
    }
}

/// A call in flight on a connection.
pub struct ActiveCall(Arc<Activity>);

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A port's open connections.
pub struct Tracker {
    limits: ConnLimits,
    epoch: Instant,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Activity>>>,
    pub stats: Arc<ConnStats>,
}

/// A connection's place in the tracker; dropping it (when the connection closes) frees it.
pub struct Registration {
    tracker: Arc<Tracker>,
    id: u64,
    pub activity: Arc<Activity>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut conns = self.tracker.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.remove(&self.id).is_some() {
            self.tracker.stats.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Tracker {
    pub fn new(limits: ConnLimits, stats: Arc<ConnStats>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            stats,
        })
    }

    /// Makes room for a new connection: at the limit the longest-idle one is closed; when
    /// none is idle, `None` (refuse it).
    pub fn admit(self: &Arc<Self>) -> Option<Registration> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Connections already closed (and not yet dropped) do not count; below the limit
        // nothing is scanned.
        let max = self.limits.max_connections.max(1);
        if conns.len() >= max && conns.values().filter(|a| !a.is_closed()).count() >= max {
            let oldest = conns
                .values()
                .filter(|a| !a.is_closed())
                .filter_map(|a| a.idle_for(now_ms).map(|idle| (idle, a)))
                .max_by_key(|(idle, _)| *idle)
                .map(|(_, a)| a.clone());
            match oldest {
                Some(activity) => {
                    activity.close();
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.epoch));
        conns.insert(id, activity.clone());
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Registration {
            tracker: self.clone(),
            id,
            activity,
        })
    }

    /// How often [`Tracker::reap`] should run.
    pub fn reap_interval(&self) -> Duration {
        self.limits
            .idle_timeout
            .map_or(Duration::from_secs(3600), |t| {
                (t / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
            })
    }

    /// Closes every connection idle for longer than the idle timeout.
    pub fn reap(&self) {
        let Some(timeout) = self.limits.idle_timeout else {
            return;
        };
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let limit = timeout.as_millis() as u64;
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for activity in conns.values() {
            if !activity.is_closed() && activity.idle_for(now_ms).is_some_and(|idle| idle > limit) {
                activity.close();
                self.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Marks each call busy on its connection until its response body is done.
#[derive(Clone, Copy, Default)]
pub struct ActivityLayer;

impl<S> tower_layer::Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ActivityService { inner }
    }
}

#[derive(Clone)]
pub struct ActivityService<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for ActivityService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: http_body::Body + Unpin + Send + 'static,
{
    type Response = http::Response<Tracked<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = request
            .extensions()
            .get::<crate::incoming::ConnInfo>()
            .and_then(|info| info.activity.as_ref())
            .map(Activity::begin);
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| Tracked { body, _call: call }))
        })
    }
}

/// A response body that keeps its call marked busy until it is done or dropped.
pub struct Tracked<R> {
    body: R,
    _call: Option<ActiveCall>,
}

impl<R: http_body::Body + Unpin> http_body::Body for Tracked<R> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_the_longest_idle_goes_and_busy_ones_stay() {
        let tracker = Tracker::new(
            ConnLimits {
                max_connections: 2,
                idle_timeout: None,
            },
            Arc::default(),
        );
        let first = tracker.admit().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let second = tracker.admit().unwrap();
        let third = tracker.admit().unwrap();
        assert!(first.activity.is_closed(), "the oldest idle one is closed");
        assert!(!second.activity.is_closed());
        drop(first);
        // Both open ones busy: a new one is refused.
        let _busy = (second.activity.begin(), third.activity.begin());
        assert!(tracker.admit().is_none());
        assert_eq!(tracker.stats.refused.load(Ordering::Relaxed), 1);
        assert_eq!(tracker.stats.evicted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn idle_connections_are_reaped_and_busy_ones_are_not() {
        let tracker = Tracker::new(
            ConnLimits {
                max_connections: 10,
                idle_timeout: Some(Duration::from_millis(1)),
            },
            Arc::default(),
        );
        let idle = tracker.admit().unwrap();
        let busy = tracker.admit().unwrap();
        let _call = busy.activity.begin();
        std::thread::sleep(Duration::from_millis(10));
        tracker.reap();
        assert!(idle.activity.is_closed());
        assert!(!busy.activity.is_closed());
    }
}
