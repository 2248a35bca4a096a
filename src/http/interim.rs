//! Interim (1xx) responses on their way from an upstream to an HTTP/1.1 client.
//!
//! RFC 9110 15.2: a proxy forwards the 1xx responses it did not ask for (`103 Early Hints`, a
//! `100` an upstream sends unprompted, `102`). The upstream client reads them while it waits
//! for the final head, deep inside the handler's future; the HTTP/1 server writes them. The
//! two meet here: the client pushes each interim head, written out whole, and the server, which
//! polls the handler's future inline in the connection's task, takes them after every poll of
//! that future and queues them ahead of the final response. HTTP/1.0 clients get none (a server
//! must not send them a 1xx), and neither do h2 clients (hyper's server cannot send one).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use crossbeam_queue::SegQueue;
use http::StatusCode;

/// At most this many interim responses are forwarded per request; an upstream that sends more
/// has the rest skipped (each is still read), so that one cannot fill the client's send queue.
pub const MAX_FORWARDED: u8 = 16;

/// The interim heads of one client connection's request in flight, oldest first. Lock-free;
/// it allocates only once a head is pushed.
#[derive(Default)]
pub struct Interim {
    heads: SegQueue<Bytes>,
}

impl Interim {
    pub fn new() -> Arc<Interim> {
        Arc::new(Interim::default())
    }

    /// Queues a 1xx head for the client: `lines` are its `name:value\r\n` fields, hop-by-hop
    /// fields already left out.
    pub fn push(&self, status: StatusCode, lines: &[u8]) {
        let reason = status.canonical_reason().unwrap_or("");
        let mut head = BytesMut::with_capacity(16 + reason.len() + lines.len());
        head.put_slice(b"HTTP/1.1 ");
        head.put_slice(status.as_str().as_bytes());
        head.put_u8(b' ');
        head.put_slice(reason.as_bytes());
        head.put_slice(b"\r\n");
        head.put_slice(lines);
        head.put_slice(b"\r\n");
        self.heads.push(head.freeze());
    }

    /// The oldest head not yet taken.
    pub fn pop(&self) -> Option<Bytes> {
        self.heads.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_come_out_whole_and_in_order() {
        let i = Interim::new();
        assert!(i.pop().is_none());
        i.push(StatusCode::EARLY_HINTS, b"link: </a.css>; rel=preload\r\n");
        i.push(StatusCode::CONTINUE, b"");
        assert_eq!(
            i.pop().as_deref(),
            Some(&b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"[..])
        );
        assert_eq!(
            i.pop().as_deref(),
            Some(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
        );
        assert!(i.pop().is_none());
    }
}
