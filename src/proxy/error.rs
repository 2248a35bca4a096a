//! Every way a request ends without the upstream's own response, and the proxy's answer to
//! each: one [`ProxyError`], mapped to its status, text and failure kind in one `match`.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use super::body::{client_body_error, invalid_chunked, BodyError, UploadClock, UploadFailure};
use super::outcome::RecordedBody;
use crate::http::client::ClientError;
use crate::http::{plain, CloseConnection};
use crate::upstream::FailureKind;

/// Upstream bodies stream through untouched (recording the request when they end); the proxy's
/// own answers are small and whole.
pub type ProxyBody = Either<RecordedBody, Full<Bytes>>;

/// Why the proxy answers a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's doing, found before routing: the request is refused and its connection
    /// closes (whatever the client pipelined behind it is not run).
    #[error("CONNECT is not supported")]
    ConnectMethod,
    #[error("malformed request: {}", .0.trim_end())]
    Malformed(&'static str),
    /// More header fields than `max_headers` (HTTP/2; an HTTP/1 head is refused as it is read).
    #[error("too many header fields")]
    TooManyHeaders,
    /// Routing: nothing to send the request to.
    #[error("no service matches the request")]
    NoService,
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("invalid request target")]
    InvalidTarget,
    /// The client's side of the body failed: not the upstream's fault, not a failure.
    #[error("request body idle")]
    BodyIdle,
    #[error("request body failed")]
    BodyFailed,
    /// The client's chunked framing of its body was broken (a chunk-size line, the CRLF after
    /// a chunk, the trailers).
    #[error("invalid chunked framing in the request body")]
    BodyMalformed,
    /// The upstream's doing: counted against it.
    #[error("upstream timed out")]
    Timeout,
    #[error(transparent)]
    Upstream(ClientError),
    /// A `101` the client did not ask for, or for another protocol (RFC 9110 7.8).
    #[error("upstream switched protocols unasked")]
    UnaskedUpgrade,
    #[error("upstream switched to a protocol the client did not ask for")]
    OtherProtocol,
}

/// The proxy's answer to a [`ProxyError`].
pub struct Answer {
    pub status: StatusCode,
    pub text: &'static str,
    /// What it counts as against the upstream (`None`: not its failure, or no upstream).
    pub failure: Option<FailureKind>,
    /// The connection closes after the answer.
    pub close: bool,
}

impl ProxyError {
    /// An upstream exchange's error: the client's body when that is what failed, else the
    /// upstream's.
    /// `upload` knows it too where the error lost it (an h2 pool resets the stream).
    pub fn from_client(e: ClientError, upload: Option<&UploadClock>) -> ProxyError {
        match (client_body_error(&e), upload.and_then(UploadClock::failed)) {
            (Some(BodyError::Idle), _) | (None, Some(UploadFailure::Idle)) => ProxyError::BodyIdle,
            (Some(BodyError::Client(b)), _) if invalid_chunked(b.as_ref()) => {
                ProxyError::BodyMalformed
            }
            (None, Some(UploadFailure::Malformed)) => ProxyError::BodyMalformed,
            (Some(BodyError::Client(_)), _) | (None, Some(UploadFailure::Other)) => {
                ProxyError::BodyFailed
            }
            (None, None) => ProxyError::Upstream(e),
        }
    }

    /// The one place that says what each error answers. The texts never name internal
    /// addresses.
    pub fn answer(&self) -> Answer {
        use ProxyError::*;
        let (status, text, failure, close) = match self {
            ConnectMethod => (
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported\n",
                None,
                true,
            ),
            Malformed(text) => (StatusCode::BAD_REQUEST, *text, None, true),
            TooManyHeaders => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields\n",
                None,
                true,
            ),
            NoService => (
                StatusCode::NOT_FOUND,
                "no service matches this request\n",
                None,
                false,
            ),
            NoHealthyUpstream => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream is available for this service\n",
                None,
                false,
            ),
            InvalidTarget => (
                StatusCode::BAD_REQUEST,
                "invalid request target\n",
                None,
                false,
            ),
            BodyIdle => (
                StatusCode::REQUEST_TIMEOUT,
                "request body timed out\n",
                None,
                false,
            ),
            BodyFailed => (
                StatusCode::BAD_REQUEST,
                "request body was not received\n",
                None,
                false,
            ),
            // The connection's framing is lost: it closes.
            BodyMalformed => (
                StatusCode::BAD_REQUEST,
                "invalid chunked framing in the request body\n",
                None,
                true,
            ),
            Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream timed out\n",
                Some(FailureKind::Timeout),
                false,
            ),
            Upstream(e) if e.is_connect() => (
                StatusCode::BAD_GATEWAY,
                "upstream connection failed\n",
                Some(FailureKind::Connect),
                false,
            ),
            Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream sent no valid response\n",
                Some(FailureKind::Reset),
                false,
            ),
            UnaskedUpgrade => (
                StatusCode::BAD_GATEWAY,
                "upstream switched protocols unasked\n",
                None,
                false,
            ),
            OtherProtocol => (
                StatusCode::BAD_GATEWAY,
                "upstream switched to a protocol the client did not ask for\n",
                None,
                false,
            ),
        };
        Answer {
            status,
            text,
            failure,
            close,
        }
    }

    /// The answer as a response.
    pub fn response(&self) -> Response<ProxyBody> {
        let a = self.answer();
        let mut resp = text(a.status, a.text);
        if let ProxyError::ConnectMethod = self {
            // A 405 names the methods the target does take (RFC 9110 15.5.6): every other one
            // is passed on.
            resp.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static(super::validate::ALLOWED_METHODS),
            );
        }
        if a.close {
            resp.extensions_mut().insert(CloseConnection);
        }
        resp
    }
}

/// The proxy's own short plain-text answers.
pub fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    plain(status, body).map(Either::Right)
}

/// The failure kind of an upstream attempt that got no response.
pub fn attempt_failure(e: &ClientError) -> FailureKind {
    if e.is_connect() {
        FailureKind::Connect
    } else {
        FailureKind::Reset
    }
}
