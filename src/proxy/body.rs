//! The request body on its way upstream: the client's body as its server delivered it, ended
//! with [`BodyError::Idle`] when it stalls past `body_idle_timeout`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::http::body::IdleTimer;
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
        }
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
            return Poll::Ready(frame.map(|r| r.map_err(BodyError::Client)));
        }
        if this.idle.poll_expired(cx) {
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
