//! Where one request's outcome is recorded, exactly once: at once for the proxy's own answers
//! (502, 504, ...), and for an upstream's response when its body ends, fails or is dropped, so
//! that a body the upstream cuts counts as the failure it is (`kind="reset"`, or `"timeout"`
//! when it stalls past `body_idle_timeout`), in the window, the critical-path counters and the
//! failure counters alike.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::UpstreamBody;
use crate::http::client::ClientError;
use crate::http::fields::{BodyFields, Fields};
use crate::http::h2_server::Replaced;
use crate::passive::is_gateway_error;
use crate::stats::Clock;
use crate::upstream::{FailureKind, Pool, Upstream};

/// One request's destination and when it started.
pub struct Outcome {
    pub pool: Arc<Pool>,
    pub up: Arc<Upstream>,
    /// Matched against the critical paths only when the request failed.
    pub path: Option<PathAndQuery>,
    pub start: Instant,
    pub clock: Clock,
    /// Preview traffic is counted in the Prometheus counters (and in their
    /// `switchyard_preview_*` share) but kept out of the window stats and critical-path
    /// counters: smoke tests of the idle color must never feed a rollback trigger once that
    /// color goes live.
    pub live: bool,
    /// The service generation the request was routed under: a live request counts in the
    /// window and the critical-path counters only while its color is still live under it
    /// ([`Pool::live_at`]); one begun in an earlier live period of the color never counts in a
    /// later one.
    pub generation: u64,
}

impl Outcome {
    /// A few relaxed atomic adds: window slot, status counter, histogram, failure counters,
    /// passive health. `elapsed` is the latency the window keeps (to the response head, or to
    /// the failure).
    pub fn record(&self, end: Instant, elapsed: Duration, code: u16, failure: Option<FailureKind>) {
        let Outcome { pool, up, .. } = self;
        let epoch = self.clock.epoch_at(end);
        // In the window of the live period it was routed in, or in none.
        let windowed = self.live && pool.live_at(self.generation);
        if windowed {
            up.window.record(epoch, elapsed, failure.is_some());
        }
        up.count_status(code);
        if !self.live {
            up.count_preview_status(code);
        }
        pool.observe(elapsed, self.live);
        // Passive health counts what says the upstream could not serve: no answer, or a
        // gateway error. A 500 is the application's answer, and ends a run of failures.
        match failure {
            Some(FailureKind::Status5xx) if !is_gateway_error(code) => up.passive.success(),
            Some(_) => up.passive_failure(&pool.passive),
            None => up.passive.success(),
        }
        if let Some(kind) = failure {
            up.count_failure_of(kind, self.live);
            if windowed {
                let path = self.path.as_ref().map(|p| p.path()).unwrap_or("/");
                count_critical(pool, epoch, path);
            }
        }
    }
}

/// A live request answered 503 because its pool had no healthy upstream: a failed request of
/// the live color like any other (contract: a failure is one that got no response), so that
/// `error_rate` and `critical_5xx` see a color whose every upstream is down. The color's
/// window is the sum of its upstreams' (the triggers, `/api/status` and the metrics read it
/// so), and no upstream was picked: the request goes into the window of one drawn at random,
/// as balancing would have spread it, with no latency sample (its time is not an upstream's,
/// and a run of near-zero samples would hide a slow pool's p95). An empty pool (a name that
/// resolved to no address) has no window to count it in. `generation`: the one it was routed
/// under; a color live again under another since counts it in no window.
pub fn record_unavailable(pool: &Pool, generation: u64, epoch: u64, path: &str) {
    let n = pool.upstreams.len();
    if n == 0 || !pool.live_at(generation) {
        return;
    }
    if let Some(up) = pool.upstreams.get(fastrand::usize(..n)) {
        up.window.record_unsent_failure(epoch);
    }
    count_critical(pool, epoch, path);
}

/// One failure on `path` in each critical-path counter of `pool` that matches it.
fn count_critical(pool: &Pool, epoch: u64, path: &str) {
    if pool.critical.is_empty() {
        return;
    }
    // Once, for every trigger: matched as the upstream resolves it.
    let path = crate::http::path::normalized(path);
    for c in &pool.critical {
        if c.matches(&path) {
            c.counter.add(epoch, 1);
        }
    }
}

/// An upstream response body that records its request when it ends: cleanly (the status
/// decides), with an error (an upstream failure, unless the client's own upload failed), or
/// dropped unfinished (the client went away: not the upstream's fault).
pub struct RecordedBody {
    inner: UpstreamBody,
    /// Boxed: the response is moved whole some ten times on its way to the client; with the
    /// record inline it was 392 bytes, and `memcpy` took its long path each time (one
    /// allocation costs less, tuning log row 57).
    pending: Option<Box<Pending>>,
}

struct Pending {
    outcome: Outcome,
    /// Latency to the response head.
    head_elapsed: Duration,
    code: u16,
    /// The client got another answer in its place ([`Replaced`]): `code` is that answer's.
    replaced: bool,
}

impl RecordedBody {
    pub fn new(inner: UpstreamBody, outcome: Outcome, head_elapsed: Duration, code: u16) -> Self {
        RecordedBody {
            inner,
            pending: Some(Box::new(Pending {
                outcome,
                head_elapsed,
                code,
                replaced: false,
            })),
        }
    }

    fn finish(&mut self, error: Option<&ClientError>) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let now = Instant::now();
        // A replaced head is the server's answer, not the upstream's: it answered.
        let by_status = (p.code >= 500 && !p.replaced).then_some(FailureKind::Status5xx);
        match error.and_then(upstream_fault) {
            Some(kind) => {
                let elapsed = now.saturating_duration_since(p.outcome.start);
                p.outcome.record(now, elapsed, p.code, Some(kind));
            }
            None => p.outcome.record(now, p.head_elapsed, p.code, by_status),
        }
    }
}

/// The failure kind of a body error that is the upstream's doing.
fn upstream_fault(e: &ClientError) -> Option<FailureKind> {
    match e {
        // The client's upload failed while the response streamed (an upstream reading and
        // answering at once): the client's doing.
        ClientError::Body(_) => None,
        ClientError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            Some(FailureKind::Timeout)
        }
        _ => Some(FailureKind::Reset),
    }
}

impl Body for RecordedBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(None),
            Poll::Ready(Some(Err(e))) => this.finish(Some(e)),
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl BodyFields for RecordedBody {
    fn fields(&self) -> Option<&Fields> {
        self.inner.fields()
    }
}

/// The h2 server sent `status` in place of the upstream's head (one over the client's
/// SETTINGS_MAX_HEADER_LIST_SIZE): the status counters say what the client got, and the
/// request is not a failure of the upstream, which answered (the limit is the client's own, so
/// no client can push a color's error rate into a rollback by announcing a small one).
impl Replaced for RecordedBody {
    fn replaced(&mut self, status: http::StatusCode) {
        if let Some(p) = self.pending.as_mut() {
            p.code = status.as_u16();
            p.replaced = true;
        }
    }
}

impl Drop for RecordedBody {
    fn drop(&mut self) {
        // Ended without an error seen here: complete, or abandoned by the client.
        self.finish(None);
    }
}
