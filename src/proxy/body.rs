//! The request body on its way upstream: the client's body as its server delivered it, ended
//! with [`BodyError::Idle`] when it stalls past `body_idle_timeout`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use tokio::time::Instant;

use crate::http::body::IdleTimer;
use crate::http::codec::InvalidChunked;
use crate::http::h2_server;
use crate::http::server;
use crate::http::BoxError;

/// The client's request body as its server delivered it.
pub enum ClientBody {
    /// No body: a request rebuilt for another upstream (a bodiless HTTP/2 retry).
    Empty,
    /// From the HTTP/1.1 server: none, whole, or read off the connection as it is polled.
    H1(server::RequestBody),
    /// An h2 stream's body.
    H2(h2_server::RequestBody),
}

impl From<server::RequestBody> for ClientBody {
    fn from(b: server::RequestBody) -> ClientBody {
        ClientBody::H1(b)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// The request body on its way upstream: the client's body, ended with an error when no frame
/// arrives for `idle` (a slow or stalled upload), so the upstream sees an aborted body instead
/// of holding the request open. The timer is allocated only once the body first waits.
pub struct RequestBody {
    inner: ClientBody,
    idle: IdleTimer,
    /// Where the upload stands, for `request_timeout` ([`RequestBody::track`]).
    upload: Option<Arc<UploadClock>>,
}

/// How far a request's upload has come, so that `request_timeout` (the wait for the upstream's
/// answer) counts from the end of the upload and not through a long one: a client sending a
/// large body at a steady pace is not an upstream too slow to answer. One word: the
/// milliseconds (since `start`, plus one) of the last frame read from the client, and whether
/// the body has ended or is waiting on the client now.
///
/// It also says how the client's body failed, if it did: an h2 pool's client (hyper) turns a
/// request body's error into a reset of its own, which would otherwise read as the upstream's
/// failure.
pub struct UploadClock {
    start: Instant,
    /// `body_idle_timeout` is on: without it nothing else bounds a stalled upload, and
    /// `request_timeout` keeps counting from the start.
    moves: bool,
    state: AtomicU64,
}

const UPLOAD_DONE: u64 = 1 << 63;
const UPLOAD_WAITING: u64 = 1 << 62;
const UPLOAD_IDLE: u64 = 1 << 61;
const UPLOAD_FAILED: u64 = 1 << 60;
const UPLOAD_MALFORMED: u64 = 1 << 59;
const UPLOAD_AT: u64 = UPLOAD_MALFORMED - 1;

impl UploadClock {
    fn mark(&self, done: bool) {
        let at = (self.start.elapsed().as_millis() as u64 + 1).min(UPLOAD_AT);
        let done = if done { UPLOAD_DONE } else { 0 };
        self.state.store(at | done, Ordering::Relaxed);
    }

    /// When the wait for the answer ends, asked at `now` once `timeout` has run from the
    /// request's start (and at each deadline this returned since): `None` if it has ended. A
    /// body still read from the client (waiting on it, or a frame from it within `timeout`)
    /// moves the deadline on; a finished one ends it `timeout` after its last frame; a body
    /// the upstream stopped taking (the proxy no longer asks the client for more) ends it
    /// `timeout` after the last frame that moved.
    pub fn deadline(&self, now: Instant, timeout: Duration) -> Option<Instant> {
        if !self.moves {
            return None;
        }
        let state = self.state.load(Ordering::Relaxed);
        let last = self.start + Duration::from_millis((state & UPLOAD_AT).saturating_sub(1));
        if state & UPLOAD_DONE == 0 && state & UPLOAD_WAITING != 0 {
            return Some(now + timeout);
        }
        let end = last + timeout;
        (end > now).then_some(end)
    }

    /// How the client's body failed, if it did.
    pub fn failed(&self) -> Option<UploadFailure> {
        let state = self.state.load(Ordering::Relaxed);
        if state & UPLOAD_IDLE != 0 {
            Some(UploadFailure::Idle)
        } else if state & UPLOAD_MALFORMED != 0 {
            Some(UploadFailure::Malformed)
        } else if state & UPLOAD_FAILED != 0 {
            Some(UploadFailure::Other)
        } else {
            None
        }
    }
}

/// How a client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFailure {
    /// Stalled past `body_idle_timeout`.
    Idle,
    /// Its chunked framing was broken ([`InvalidChunked`]).
    Malformed,
    /// Reset, or the client closed the connection mid-body.
    Other,
}

/// Whether `e` (or an error behind it) is a broken chunked framing of the client's body.
pub fn invalid_chunked(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // An `io::Error` hides the error it carries from `source()`.
        let carried = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if err.is::<InvalidChunked>() || carried.is_some_and(|c| c.is::<InvalidChunked>()) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Why a request body ended early.
#[derive(Debug)]
pub enum BodyError {
    /// No frame for `body_idle_timeout`.
    Idle,
    /// The client's stream failed (reset, closed, malformed chunk).
    Client(BoxError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Idle => f.write_str("request body idle timeout"),
            BodyError::Client(e) => write!(f, "request body failed: {e}"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Idle => None,
            BodyError::Client(e) => Some(e.as_ref()),
        }
    }
}

impl RequestBody {
    /// `idle` zero turns the timeout off.
    pub fn new(inner: ClientBody, idle: Duration) -> RequestBody {
        RequestBody {
            inner,
            idle: IdleTimer::new(idle),
            upload: None,
        }
    }

    /// The clock of this body's upload, `start`ed with the request; None for a body already
    /// ended.
    #[inline]
    pub fn track(&mut self, start: Instant) -> Option<Arc<UploadClock>> {
        if self.inner.is_end_stream() {
            return None;
        }
        self.track_upload(start)
    }

    /// Out of line: most requests have no body.
    #[inline(never)]
    fn track_upload(&mut self, start: Instant) -> Option<Arc<UploadClock>> {
        let clock = Arc::new(UploadClock {
            start,
            moves: !self.idle.duration().is_zero(),
            state: AtomicU64::new(0),
        });
        self.upload = Some(clock.clone());
        Some(clock)
    }

    /// The `body_idle_timeout` this body runs with (the response gets the same).
    pub fn idle_timeout(&self) -> Duration {
        self.idle.duration()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.idle.progressed();
            if let Some(u) = &this.upload {
                u.mark(frame.is_none() || this.inner.is_end_stream());
                if let Some(Err(e)) = &frame {
                    let malformed = if invalid_chunked(e.as_ref()) {
                        UPLOAD_MALFORMED
                    } else {
                        0
                    };
                    u.state
                        .fetch_or(UPLOAD_FAILED | malformed, Ordering::Relaxed);
                }
            }
            return Poll::Ready(frame.map(|r| r.map_err(BodyError::Client)));
        }
        if let Some(u) = &this.upload {
            u.state.fetch_or(UPLOAD_WAITING, Ordering::Relaxed);
        }
        if this.idle.poll_expired(cx) {
            if let Some(u) = &this.upload {
                u.state.fetch_or(UPLOAD_IDLE, Ordering::Relaxed);
            }
            return Poll::Ready(Some(Err(BodyError::Idle)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`BodyError`] behind an error, when the request failed on the client's side.
pub fn client_body_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<BodyError>() {
            return Some(b);
        }
        cur = err.source();
    }
    None
}

pin_project_lite::pin_project! {
    /// `attempt` (the request to the upstream, until its answer's head) within `timeout`, as
    /// `tokio::time::timeout`, except that with a body still coming the deadline moves as
    /// [`UploadClock::deadline`] says. A struct built in place rather than an `async fn`
    /// around the attempt: that moved the request's whole future once more (600 instructions
    /// of `memcpy` per request).
    pub struct WithinRequestTimeout<F> {
        #[pin]
        attempt: F,
        #[pin]
        sleep: tokio::time::Sleep,
        timeout: Duration,
        upload: Option<Arc<UploadClock>>,
    }
}

/// See [`WithinRequestTimeout`]; its output is None once past the deadline. `start`: when the
/// request began, already read (one clock read fewer per request than `sleep(timeout)`).
pub fn within_request_timeout<F: std::future::Future>(
    attempt: F,
    start: Instant,
    timeout: Duration,
    upload: Option<Arc<UploadClock>>,
) -> WithinRequestTimeout<F> {
    WithinRequestTimeout {
        attempt,
        // As `sleep`: a timeout too long to add is as good as none.
        sleep: tokio::time::sleep_until(
            start
                .checked_add(timeout)
                .unwrap_or_else(|| start + Duration::from_secs(86400 * 365 * 30)),
        ),
        timeout,
        upload,
    }
}

impl<F: std::future::Future> std::future::Future for WithinRequestTimeout<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.attempt.poll(cx) {
            return Poll::Ready(Some(out));
        }
        loop {
            std::task::ready!(this.sleep.as_mut().poll(cx));
            let next = this
                .upload
                .as_ref()
                .and_then(|u| u.deadline(Instant::now(), *this.timeout));
            match next {
                Some(at) => this.sleep.as_mut().reset(at),
                None => return Poll::Ready(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(state: u64) -> UploadClock {
        UploadClock {
            start: Instant::now(),
            moves: true,
            state: AtomicU64::new(state),
        }
    }

    /// Waiting on the client moves the deadline on; a finished upload, or one the upstream
    /// stopped taking, ends the wait `timeout` after its last frame.
    #[test]
    fn the_answer_is_waited_for_from_the_end_of_the_upload() {
        let t = Duration::from_secs(1);
        let c = clock(UPLOAD_WAITING | 501);
        let now = c.start + Duration::from_secs(5);
        assert_eq!(c.deadline(now, t), Some(now + t));
        // Ended at 0.5 s: past at 5 s, not at 1.2 s.
        let c = clock(UPLOAD_DONE | 501);
        assert_eq!(c.deadline(c.start + Duration::from_secs(5), t), None);
        let at = c.start + Duration::from_millis(1200);
        assert_eq!(
            c.deadline(at, t),
            Some(c.start + Duration::from_millis(1500))
        );
        // Not asked for more since 0.5 s (the upstream stopped reading): past at 1.5 s.
        let c = clock(501);
        assert_eq!(c.deadline(c.start + Duration::from_secs(2), t), None);
        // Never asked for at all: past at `timeout`.
        let c = clock(0);
        assert_eq!(c.deadline(c.start + t, t), None);
        // Without `body_idle_timeout` nothing else bounds a stall: `timeout` from the start.
        let mut c = clock(UPLOAD_WAITING | 501);
        c.moves = false;
        assert_eq!(c.deadline(c.start + t, t), None);
        // A failure is the client's, whatever the pool's client made of it.
        let c = clock(UPLOAD_IDLE | UPLOAD_WAITING | 501);
        assert_eq!(
            (c.failed(), c.deadline(c.start + t, t)),
            (Some(UploadFailure::Idle), Some(c.start + t + t))
        );
        assert_eq!(
            clock(UPLOAD_FAILED | 501).failed(),
            Some(UploadFailure::Other)
        );
        assert_eq!(
            clock(UPLOAD_FAILED | UPLOAD_MALFORMED | 501).failed(),
            Some(UploadFailure::Malformed)
        );
        assert_eq!(clock(UPLOAD_DONE | 501).failed(), None);
    }
}
