//! The HTTP layer: what Switchyard speaks on the wire, knowing nothing of the proxy above it.
//!
//! - [`headers`]: the hop-by-hop set and its removal, what trailers may carry, the cached
//!   `Date`, and the forwarding header names;
//! - [`codec`]: HTTP/1.1 framing (lengths, the framing decision, chunked decoding and encoding,
//!   header spans shared with the parsed head);
//! - [`fields`]: a response's header fields as the upstream wrote them, relayed without a map;
//! - [`interim`]: 1xx responses on their way from the upstream client to the HTTP/1 server;
//! - [`io`]: the adaptive reader, the vectored writer, a stream with bytes read ahead in front;
//! - [`path`]: the path a target means (decoded, dot segments and repeated slashes resolved),
//!   for matching routes and critical paths;
//! - [`body`]: the idle timer bodies use between frames;
//! - [`server`]: the client side of HTTP/1.1, calling a [`server::Handler`] per request inline;
//! - [`h2_server`]: the client side of HTTP/2, the `h2` crate driven directly, each stream
//!   handed to an executor as one future;
//! - [`client`]: the HTTP/1.1 client toward upstreams, the one hyper-util client builder, and
//!   the one-shot fetch of the proxy's own calls (`ctl`, analysis probes and queries).
//!
//! Nothing here names `crate::` outside `crate::http` (checked by `tests/layers.rs`).

pub mod body;
pub mod client;
pub mod codec;
pub mod fields;
pub mod h2_server;
pub mod headers;
pub mod interim;
pub mod io;
pub mod path;
pub mod server;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// The boxed error bodies carry between layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Marks a response after which the HTTP/1 connection closes (a refused request: whatever the
/// client sent behind it is not run).
#[derive(Clone, Copy, Debug)]
pub struct CloseConnection;

/// A short plain-text answer: the server's own refusals and the proxy's answers share it.
pub fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
