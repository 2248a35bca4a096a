//! I/O shared by the server and the client: the adaptive read into a growing buffer, the
//! vectored write of a queue of buffers, a stream with bytes already read off it in front, and
//! a stream whose stalled writes time out, and a connection's write half that can end it with
//! a reset.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::body::IdleTimer;

/// Reads what `io` has into `buf`; `Ok(0)` is end of stream. The buffer gets room for `want`
/// bytes when less than a quarter of that is left (so a peer sending a few bytes at a time does
/// not make a new buffer per read), and `read_size` doubles, up to `max`, each time a read
/// fills all the room there was: a socket with more than was asked for is asked for more.
/// Through `AsyncRead`, which clears the socket's readiness on a short read, so the next wait
/// does not start with a read that can only say EAGAIN.
#[inline]
pub fn poll_fill<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut BytesMut,
    want: usize,
    read_size: &mut usize,
    max: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want.div_ceil(4) {
        buf.reserve(want);
    }
    let room = buf.capacity() - buf.len();
    let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, buf))?;
    if n == room && *read_size < max {
        *read_size *= 2;
    }
    Poll::Ready(Ok(n))
}

/// One `writev` of the front of `out` (at most `SLICES` buffers); what was written is taken off
/// the queue and its length returned. `Ok(0)`: the peer takes nothing more.
#[inline]
pub fn poll_write_queue<const SLICES: usize, W: AsyncWrite + Unpin + ?Sized>(
    io: &mut W,
    out: &mut VecDeque<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut slices = [IoSlice::new(&[]); SLICES];
    let n = out.len().min(slices.len());
    for (s, b) in slices.iter_mut().zip(out.iter()) {
        *s = IoSlice::new(b);
    }
    let written = ready!(Pin::new(io).poll_write_vectored(cx, &slices[..n]))?;
    let mut left = written;
    while left > 0 {
        let Some(front) = out.front_mut() else {
            break;
        };
        let k = left.min(front.len());
        front.advance(k);
        left -= k;
        if front.is_empty() {
            out.pop_front();
        }
    }
    Poll::Ready(Ok(written))
}

/// A stream with bytes already read off it in front (a sniffed preface, a head's leftovers).
pub struct Prefixed<S> {
    pub read: Bytes,
    pub io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(out.remaining());
            out.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

/// `AsyncWrite` for a wrapper that changes only how a connection is read: every call goes
/// to its `io` field. `write_through!([S: AsyncWrite + Unpin] Prefixed<S>)`; `[]` for no
/// generics.
macro_rules! write_through {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> tokio::io::AsyncWrite for $ty {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use write_through;

write_through!([S: AsyncWrite + Unpin] Prefixed<S>);

/// A stream whose writes fail with `TimedOut` once one has made no progress for `timeout`
/// (the peer stopped reading: its TCP window is shut). Reads pass through. Client sockets
/// (`client_send_timeout`) and HTTP/2 upstream connections (`upstream_send_timeout`).
pub struct SendTimeout<S> {
    io: S,
    timer: IdleTimer,
}

impl<S> SendTimeout<S> {
    pub fn new(io: S, timeout: Duration) -> SendTimeout<S> {
        SendTimeout {
            io,
            timer: IdleTimer::new(timeout),
        }
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.timer.progressed();
                Poll::Ready(r)
            }
            Poll::Pending if self.timer.poll_expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "send timeout: the peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, r)
    }
}

/// A connection's write half, as the HTTP/1 server holds it.
pub trait WriteHalf: AsyncWrite + Send + Unpin {
    /// Ends the connection with a reset (TCP RST) rather than an orderly close, where the
    /// transport has one: its peer then sees the cut of a response whose end is the close
    /// (a close-delimited body), which a FIN would pass off as complete. Writes fail after.
    fn abort(&mut self) {}
}

/// Over TLS a cut is told by the missing close_notify; a test's in-memory pipe has no reset.
impl<T: AsyncRead + AsyncWrite + Send> WriteHalf for tokio::io::WriteHalf<T> {}

/// What an upgraded connection's writer is replaced with once handed over.
impl WriteHalf for tokio::io::Sink {}

impl<S: WriteHalf> WriteHalf for SendTimeout<S> {
    fn abort(&mut self) {
        self.io.abort();
    }
}

/// A plain TCP connection's write half, which [`WriteHalf::abort`] can reset: tokio's own
/// sends a FIN when dropped.
pub struct TcpWrite {
    half: Option<tokio::net::tcp::OwnedWriteHalf>,
}

impl TcpWrite {
    pub fn new(half: tokio::net::tcp::OwnedWriteHalf) -> TcpWrite {
        TcpWrite { half: Some(half) }
    }

    fn half(&mut self) -> io::Result<&mut tokio::net::tcp::OwnedWriteHalf> {
        self.half
            .as_mut()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

impl WriteHalf for TcpWrite {
    fn abort(&mut self) {
        if let Some(half) = self.half.take() {
            // A zero linger makes the close a reset; `forget` leaves out the FIN dropping the
            // half would send. The socket closes when its read half goes.
            let _ = socket2::SockRef::from(half.as_ref()).set_linger(Some(Duration::ZERO));
            half.forget();
        }
    }
}

impl AsyncWrite for TcpWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.half()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.half()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.half()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.half()?).poll_shutdown(cx)
    }
}
