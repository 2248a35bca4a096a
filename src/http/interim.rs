//! Interim (1xx) responses on their way from an upstream to an HTTP/1.1 or HTTP/2 client.
//!
//! RFC 9110 15.2: a proxy forwards the 1xx responses it did not ask for (`103 Early Hints`, a
//! `102`, a `100` an upstream sends unprompted). The upstream client reads them while it waits
//! for the final head, deep inside the handler's future; the server that polls that future
//! (the HTTP/1 server inline in the connection's task, the h2 server in the stream's future)
//! sends them. They meet in a thread-local slot that is open only while a server polls an
//! HTTP/1.1 request's handler or an h2 stream's ([`Open`]): the client [`offer`]s each interim
//! head there, and the server takes them after the poll and sends them ahead of the response.
//! Nothing is threaded through the proxy's layers, and a request that gets no 1xx pays two
//! thread-local flag writes per poll. An exchange polled anywhere else (an HTTP/1.0 request)
//! finds the slot closed: its 1xx are skipped, as HTTP/1.0 clients must get none.

use std::cell::{Cell, RefCell};

use bytes::{BufMut, Bytes, BytesMut};
use http::StatusCode;

/// At most this many interim responses are forwarded per request; an upstream that sends more
/// has the rest skipped (each is still read), so that one cannot fill the client's send queue.
pub const MAX_FORWARDED: u8 = 16;

thread_local! {
    /// Open while the server polls an HTTP/1.1 request's handler.
    static OPEN: Cell<bool> = const { Cell::new(false) };
    /// A head was offered during the poll.
    static OFFERED: Cell<bool> = const { Cell::new(false) };
    /// Each head's status and its `name:value\r\n` field lines.
    static HEADS: RefCell<Vec<(StatusCode, Bytes)>> = const { RefCell::new(Vec::new()) };
}

/// The slot, open for one poll of an HTTP/1.1 request's handler: closed when dropped
/// (however the poll ends, a panic included). The poll happens in the caller, so that its
/// result (a whole response) is not moved through a function.
pub struct Open(());

impl Open {
    #[inline]
    pub fn new() -> Open {
        OPEN.set(true);
        Open(())
    }

    /// Closes the slot and hands `take` each head offered while it was open, oldest first, as
    /// an HTTP/1.1 head.
    #[inline]
    pub fn close(self, mut take: impl FnMut(Bytes)) {
        self.close_fields(|status, lines| take(h1_head(status, &lines)));
    }

    /// [`close`](Self::close), each head as its status and its `name:value\r\n` field lines.
    #[inline]
    pub fn close_fields(self, mut take: impl FnMut(StatusCode, Bytes)) {
        drop(self);
        if OFFERED.replace(false) {
            for (status, lines) in HEADS.take() {
                take(status, lines);
            }
        }
    }
}

impl Drop for Open {
    #[inline]
    fn drop(&mut self) {
        OPEN.set(false);
        // A poll that panicked leaves nothing for the next request on the thread.
        if std::thread::panicking() {
            OFFERED.set(false);
            drop(HEADS.take());
        }
    }
}

/// Offers a 1xx head for the client whose handler is being polled on this thread: `lines`
/// are its `name:value\r\n` fields, hop-by-hop fields already left out. False when there is
/// no such client (the head is skipped).
pub fn offer(status: StatusCode, lines: &[u8]) -> bool {
    if !OPEN.get() {
        return false;
    }
    let lines = Bytes::copy_from_slice(lines);
    HEADS.with_borrow_mut(|heads| heads.push((status, lines)));
    OFFERED.set(true);
    true
}

/// An interim head as an HTTP/1.1 client reads it.
fn h1_head(status: StatusCode, lines: &[u8]) -> Bytes {
    let reason = status.canonical_reason().unwrap_or("");
    let mut head = BytesMut::with_capacity(16 + reason.len() + lines.len());
    head.put_slice(b"HTTP/1.1 ");
    head.put_slice(status.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(reason.as_bytes());
    head.put_slice(b"\r\n");
    head.put_slice(lines);
    head.put_slice(b"\r\n");
    head.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_offered_during_the_poll_come_out_whole_and_in_order() {
        // Outside a poll nothing is taken.
        assert!(!offer(StatusCode::EARLY_HINTS, b""));
        let mut out = Vec::new();
        let open = Open::new();
        assert!(offer(
            StatusCode::EARLY_HINTS,
            b"link: </a.css>; rel=preload\r\n"
        ));
        assert!(offer(StatusCode::CONTINUE, b""));
        open.close(|h| out.push(h));
        assert_eq!(
            out,
            [
                &b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"[..],
                b"HTTP/1.1 100 Continue\r\n\r\n"
            ]
        );
        // The slot is closed again, and empty.
        assert!(!offer(StatusCode::PROCESSING, b""));
        let mut again = 0;
        Open::new().close(|_| again += 1);
        assert_eq!(again, 0);
    }
}
