//! The HTTP/1.1 client toward upstreams: per upstream, a lock-free stack of idle keep-alive
//! connections.
//!
//! hyper-util's pooled client keeps every host's idle connections in one map behind a mutex and
//! hashes the pool key on each request; this pool belongs to its upstream (no key, no map) and
//! is an `ArrayQueue`, so a checkout is one atomic pop. A connection goes back when the
//! response body has been read to its end; one whose response was abandoned, upgraded or broken
//! is dropped, and hyper closes it.
//!
//! Retries: a request that hyper never wrote to a reused connection (it was closed by the
//! upstream while idle) is tried again on another one, whatever its method: the upstream never
//! saw it. A request that was written is never retried.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::proxy::RequestBody;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect or HTTP handshake failed (or timed out).
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed while sending the request or reading the response head.
    #[error(transparent)]
    Request(#[from] hyper::Error),
    /// From hyper-util's pooled client (HTTP/2 pools).
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

impl ClientError {
    pub fn is_connect(&self) -> bool {
        match self {
            ClientError::Connect(_) => true,
            ClientError::Request(_) => false,
            ClientError::Pooled(e) => e.is_connect(),
        }
    }
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// The idle connections of one upstream.
pub struct ConnPool {
    addr: SocketAddr,
    idle: ArrayQueue<Idle>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl ConnPool {
    pub fn new(
        addr: SocketAddr,
        max_idle: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<ConnPool> {
        Arc::new(ConnPool {
            addr,
            idle: ArrayQueue::new(max_idle.max(1)),
            connect_timeout,
            idle_timeout,
        })
    }

    /// Sends `req` on an idle connection, or a new one.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, ClientError> {
        while let Some(Idle { mut sender, since }) = self.idle.pop() {
            if sender.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            if !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection went stale while idle. Try another.
                    Some(back) => req = back,
                    None => return Err(ClientError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        Ok(self.wrap(resp, sender))
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, ClientError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .map_err(|_| ClientError::Connect("timed out".to_string()))?
        .map_err(|e| ClientError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    fn wrap(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<RequestBody>,
    ) -> Response<PooledBody> {
        let pool = self.clone();
        resp.map(|inner| PooledBody {
            inner,
            ret: Some((pool, sender)),
        })
    }

    fn put_back(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        // A full pool drops the connection: at most `upstream_max_idle` stay open.
        let _ = self.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }
}

/// An upstream response body that returns its connection to the pool once read to the end.
pub struct PooledBody {
    inner: Incoming,
    ret: Option<(Arc<ConnPool>, SendRequest<RequestBody>)>,
}

impl PooledBody {
    /// A body whose connection is not pooled here (HTTP/2, or an upgraded connection).
    pub fn unpooled(inner: Incoming) -> PooledBody {
        PooledBody { inner, ret: None }
    }

    /// Keeps the connection out of the pool (a 101 hands it over to a tunnel).
    pub fn detach(&mut self) {
        self.ret = None;
    }

    fn give_back(&mut self) {
        if let Some((pool, sender)) = self.ret.take() {
            pool.put_back(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.ret = None,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body known to be complete (empty, or its last frame read) frees the connection even
        // if nobody polled it to None; anything else leaves it to close.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
