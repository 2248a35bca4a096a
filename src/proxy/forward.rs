//! Step 4 of the request path: the request to the upstream picked and, while it cannot take
//! the request, to others of the same pool.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;

use super::body::{ClientBody, RequestBody};
use super::error::attempt_failure;
use super::forwarded::Forwarded;
use super::UpstreamBody;
use crate::config::Protocol;
use crate::http::client::{ClientError, Failed, PooledBody, Prepared, Timeouts};
use crate::http::headers::strip_hop_by_hop;
use crate::upstream::{Pool, Upstream};

/// Sends the request on the pool's protocol: HTTP/1.1 through the upstream's own connection
/// pool, HTTP/2 on its multiplexed connection. A request the upstream cannot have acted on
/// (see [`Failed::unsent`]; for HTTP/2, a bodiless request whose connect failed or that the
/// upstream did not process: REFUSED_STREAM, or a stream its GOAWAY left out), or an idempotent
/// bodiless one whose connection or stream failed before its answer's head, goes to another
/// healthy upstream of the pool, at most `retries` times; each failed attempt counts against
/// its upstream (failure counter, passive health; not a GOAWAY's stream: a connection closing is
/// no failure) but not in the window, where the request is recorded once, on `up`, the
/// upstream of the last attempt. An HTTP/2 request the upstream did not process that no other
/// upstream takes is sent once more to the same one (on a new connection after a GOAWAY).
///
/// `host_from_upstream`: the request's `Host` is the first upstream's address (the client sent
/// none, see `rewrite`); every other attempt carries its own upstream's. `live`: false on the
/// preview listener (its failed attempts count in the preview failure series too).
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    pool: &Pool,
    up: &mut Arc<Upstream>,
    req: Request<RequestBody>,
    fwd: &Forwarded<'_>,
    timeouts: Timeouts,
    retries: u32,
    host_from_upstream: bool,
    live: bool,
) -> Result<Response<UpstreamBody>, ClientError> {
    let mut tried: Vec<Arc<Upstream>> = Vec::new();
    match pool.protocol {
        Protocol::Http1 => {
            let mut req = Prepared::new(req, fwd, timeouts);
            loop {
                let in_flight = up.begin();
                let Failed { error, unsent } = match up.conns.send_prepared(req).await {
                    Ok(resp) => return Ok(resp),
                    Err(failed) => failed,
                };
                drop(in_flight);
                match unsent {
                    Some(unsent) if tried.len() < retries as usize => {
                        if !next_attempt(pool, up, &mut tried, &error, live) {
                            return Err(error);
                        }
                        req = if host_from_upstream {
                            unsent.with_host(up.authority.as_str().as_bytes())
                        } else {
                            unsent
                        };
                    }
                    _ => return Err(error),
                }
            }
        }
        Protocol::H2 => {
            // A bodiless request can be rebuilt: for another upstream, or for the same one on a
            // new connection; one with a body cannot (its bytes went to the first stream).
            let replay = req.body().is_end_stream().then(|| {
                let mut copy = Request::new(());
                *copy.method_mut() = req.method().clone();
                *copy.uri_mut() = req.uri().clone();
                *copy.version_mut() = req.version();
                *copy.headers_mut() = req.headers().clone();
                (copy, req.body().idle_timeout())
            });
            let mut req = req;
            // One more try on the same upstream, for a request it did not process where no
            // other upstream takes it.
            let mut again = true;
            loop {
                let in_flight = up.begin();
                // Boxed: hyper's h2 request future is several times the HTTP/1.1 path's, and
                // inline it would size every request's future (and its copies) for h2.
                let error = match Box::pin(forward_h2(up, req, timeouts.send)).await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => e,
                };
                drop(in_flight);
                let Some((copy, idle)) = &replay else {
                    return Err(error);
                };
                let unprocessed = error.is_refused();
                // Lost before its head (the upstream crashed, closed or reset): an idempotent
                // request may go to another upstream, as on an HTTP/1.1 pool.
                let lost = crate::http::client::is_idempotent(copy.method()) && error.is_lost();
                if !(error.is_connect() || unprocessed || lost) {
                    return Err(error);
                }
                if tried.len() < retries as usize
                    && next_attempt(pool, up, &mut tried, &error, live)
                {
                    req = replay_h2(copy, *idle);
                    if host_from_upstream {
                        retarget_h2(&mut req, up);
                    }
                } else if unprocessed && again {
                    // On a new connection when the upstream's GOAWAY left it out (the stream
                    // was refused on a live one: that one again).
                    again = false;
                    // Counted as `next_attempt` counts it: a refused stream is a failed attempt
                    // whatever the pool's size; a stream the GOAWAY left out is not.
                    if !error.is_goaway_unprocessed() {
                        up.count_failure_of(attempt_failure(&error), live);
                        up.passive_failure(&pool.passive);
                    }
                    tracing::debug!(upstream = %up.addr, error = %error, "upstream did not process the request; sending it once more");
                    req = replay_h2(copy, *idle);
                    if host_from_upstream {
                        retarget_h2(&mut req, up);
                    }
                } else {
                    return Err(error);
                }
            }
        }
    }
}

/// Counts the failed attempt against `up` and moves `up` to another upstream of the pool;
/// false when there is none left to try.
fn next_attempt(
    pool: &Pool,
    up: &mut Arc<Upstream>,
    tried: &mut Vec<Arc<Upstream>>,
    error: &ClientError,
    live: bool,
) -> bool {
    tried.push(up.clone());
    let Some(next) = pool.pick_retry(tried) else {
        return false;
    };
    // A stream the upstream's GOAWAY left out: it is closing a connection (idle timeout,
    // restart), not failing; the request goes on elsewhere.
    if !error.is_goaway_unprocessed() {
        up.count_failure_of(attempt_failure(error), live);
        up.passive_failure(&pool.passive);
    }
    tracing::debug!(upstream = %up.addr, next = %next.addr, error = %error, "upstream could not take the request; trying another");
    *up = next.clone();
    true
}

/// A bodiless HTTP/2 request again (for another upstream: the connection, not the URI, says
/// which).
fn replay_h2(copy: &Request<()>, idle: Duration) -> Request<RequestBody> {
    let mut req = Request::new(RequestBody::new(ClientBody::Empty, idle));
    *req.method_mut() = copy.method().clone();
    *req.uri_mut() = copy.uri().clone();
    *req.version_mut() = copy.version();
    *req.headers_mut() = copy.headers().clone();
    req
}

/// A replayed HTTP/2 request whose authority the proxy filled in from the first upstream's
/// address: the next upstream's address instead, in `Host` and `:authority`.
fn retarget_h2(req: &mut Request<RequestBody>, up: &Upstream) {
    if let Ok(v) = http::HeaderValue::from_str(up.authority.as_str()) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let mut parts = req.uri().clone().into_parts();
    parts.authority = Some(up.authority.clone());
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// One HTTP/2 exchange on the upstream's multiplexed connection. h2 itself refuses responses
/// with connection-specific fields or `Transfer-Encoding` (RFC 9113 8.2.2); a `TE` that got
/// through is dropped like the HTTP/1.1 client drops hop-by-hop fields.
async fn forward_h2(
    up: &Upstream,
    req: Request<RequestBody>,
    send_timeout: Duration,
) -> Result<Response<UpstreamBody>, ClientError> {
    let idle = req.body().idle_timeout();
    let head = req.method() == http::Method::HEAD;
    let mut resp = up.conns.send_h2(req, send_timeout).await?;
    strip_hop_by_hop(resp.headers_mut());
    if resp.status().as_u16() > 599 {
        return Err(ClientError::Protocol("invalid status code"));
    }
    // The length the body is held to; none where no body follows (RFC 9110 6.4.1).
    let status = resp.status();
    let length = if head
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
    {
        None
    } else {
        resp.headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Ok(resp.map(|body| PooledBody::unpooled(body, idle, length)))
}
