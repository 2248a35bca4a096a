//! A byte-level check under hyper's HTTP/1 parser for the two framing faults hyper accepts:
//! bare-LF line endings, and a request with both `Content-Length` and `Transfer-Encoding`.
//!
//! httparse reads a lone `\n` as a line end, and given both framing headers hyper drops
//! `Content-Length` before the service sees the request; neither can be turned off. [`H1Guard`]
//! wraps the client stream and follows HTTP/1.1 request framing on the bytes as they are read:
//! heads line by line, then bodies skipped by length or by chunk size exactly as hyper frames them.
//! On a fault it overwrites the offending `\n` with a NUL before hyper sees it. NUL is invalid
//! everywhere in a head, so hyper's own parser fails, answers `400 Bad Request` and closes the
//! connection: the request never reaches the service and nothing after it is read as a request.
//!
//! The guard only ever adds those two refusals. Wherever it cannot follow the stream exactly (the
//! h2 preface, an upgrade or CONNECT, a chunk size or framing header it cannot read, a framing
//! line longer than it keeps) it stops looking for the rest of the connection: fail open, hyper
//! stays the real parser.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;

/// What hyper-util's `auto` builder takes for HTTP/2 by prior knowledge.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes kept of a line split across reads: a header name and a framing header's value.
const KEEP: usize = 64 + 256;
/// Bytes kept of a request line's end: `" HTTP/1.1\r"`.
const TAIL: usize = 10;

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// A `\n` not preceded by `\r` in a request head.
    BareLf,
    /// Both `Content-Length` and `Transfer-Encoding` in one head.
    ClTe,
}

impl Reject {
    /// The `reason` label of `switchyard_rejected_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::BareLf => "bare_lf",
            Reject::ClTe => "cl_te",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The connection's first bytes while they may still be the h2 preface (how many matched).
    Preface(u8),
    Head,
    /// A `Content-Length` body: the bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Not looking any more: h2, a tunnel, or something the guard cannot follow exactly.
    Off,
}

/// hyper's chunked decoder states (`proto/h1/decode.rs`), one for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    Lws,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// A complete head line, as far as framing cares.
enum Line {
    /// The request line: whether it ends in `HTTP/1.x`, whether the method is CONNECT.
    Request {
        ok: bool,
        connect: bool,
    },
    /// `Content-Length`, with its value when it is whole and a plain number.
    ContentLength(Option<u64>),
    /// `Transfer-Encoding`, with whether the last coding is `chunked` when the value is whole.
    TransferEncoding(Option<bool>),
    Upgrade,
    Other,
}

/// The streaming framing tracker: fed every byte the client sends, in order, once.
pub struct Framing {
    state: State,
    /// The chunk size being read, then the chunk's data bytes left.
    size: u64,
    /// Whether the current head's request line has been read (empty lines before it are not).
    started: bool,
    content_length: Option<u64>,
    has_cl: bool,
    has_te: bool,
    chunked: bool,
    tunnel: bool,
    /// A framing header the guard cannot read: it stops after this head (the head itself is
    /// still checked).
    lost: bool,
    /// Bytes of the current line that arrived in earlier reads.
    line_len: usize,
    /// The first `KEEP` of them.
    kept: [u8; KEEP],
    /// The last `TAIL` of them.
    tail: [u8; TAIL],
}

impl Default for Framing {
    fn default() -> Self {
        Self::new()
    }
}

impl Framing {
    pub fn new() -> Framing {
        Framing {
            state: State::Preface(0),
            size: 0,
            started: false,
            content_length: None,
            has_cl: false,
            has_te: false,
            chunked: false,
            tunnel: false,
            lost: false,
            line_len: 0,
            kept: [0; KEEP],
            tail: [0; TAIL],
        }
    }

    /// Whether the tracker has stopped looking for the rest of the connection.
    pub fn is_off(&self) -> bool {
        self.state == State::Off
    }

    /// Follows `data`, the next bytes from the client. On a fault, returns the index in `data`
    /// of the `\n` where it was found (always in `data`) and turns itself off.
    pub fn feed(&mut self, data: &[u8]) -> Option<(usize, Reject)> {
        let mut pos = 0;
        while pos < data.len() {
            pos = match self.state {
                State::Off => return None,
                State::Preface(matched) => self.preface(data, pos, usize::from(matched)),
                State::Head => match self.head(data, pos) {
                    Ok(p) => p,
                    Err(fault) => {
                        self.state = State::Off;
                        return Some(fault);
                    }
                },
                State::Length(left) => {
                    let avail = (data.len() - pos) as u64;
                    if left > avail {
                        self.state = State::Length(left - avail);
                        data.len()
                    } else {
                        self.state = State::Head;
                        // `left <= avail`, which is a usize.
                        pos + left as usize
                    }
                }
                State::Chunked(c) => self.chunked(data, pos, c),
            };
        }
        None
    }

    fn preface(&mut self, data: &[u8], pos: usize, matched: usize) -> usize {
        let want = &PREFACE[matched..];
        let have = &data[pos..];
        let n = want.len().min(have.len());
        let same = have[..n]
            .iter()
            .zip(want)
            .take_while(|(a, b)| a == b)
            .count();
        if same == n {
            self.state = if matched + n == PREFACE.len() {
                State::Off
            } else {
                State::Preface((matched + n) as u8)
            };
            return pos + n;
        }
        // HTTP/1: what matched so far is the start of the first head. The preface has no bare LF
        // and no framing header, so reading it can find no fault.
        self.state = State::Head;
        let replay = self.head(&PREFACE[..matched + same], 0);
        debug_assert!(replay.is_ok());
        pos + same
    }

    fn head(&mut self, data: &[u8], mut pos: usize) -> Result<usize, (usize, Reject)> {
        while let Some(off) = find_lf(&data[pos..]) {
            let nl = pos + off;
            // Most header lines: whole in this read, ended by CRLF, and not named like a framing
            // header (first letter and colon position). Nothing more to look at.
            if self.started && self.line_len == 0 && off >= 2 && data[nl - 1] == b'\r' {
                let colon = match data[pos] | 0x20 {
                    b'c' => b"content-length".len(),
                    b't' => b"transfer-encoding".len(),
                    b'u' => b"upgrade".len(),
                    _ => 0,
                };
                if colon == 0 || colon >= off || data[pos + colon] != b':' {
                    pos = nl + 1;
                    continue;
                }
            }
            self.line(&data[pos..nl], nl)?;
            pos = nl + 1;
            if self.state != State::Head {
                return Ok(pos);
            }
        }
        self.keep(&data[pos..]);
        Ok(data.len())
    }

    /// Keeps part of a line that continues in a later read.
    fn keep(&mut self, part: &[u8]) {
        if part.is_empty() {
            return;
        }
        let at = self.line_len.min(KEEP);
        let n = part.len().min(KEEP - at);
        self.kept[at..at + n].copy_from_slice(&part[..n]);
        if part.len() >= TAIL {
            self.tail.copy_from_slice(&part[part.len() - TAIL..]);
        } else {
            self.tail.copy_within(part.len().., 0);
            self.tail[TAIL - part.len()..].copy_from_slice(part);
        }
        self.line_len = self.line_len.saturating_add(part.len());
    }

    /// One complete line: `seg` is its part in this read, `nl` the index of its `\n`.
    fn line(&mut self, seg: &[u8], nl: usize) -> Result<(), (usize, Reject)> {
        let earlier = self.line_len;
        let cr = match seg.last() {
            Some(&b) => b == b'\r',
            None => earlier > 0 && self.tail[TAIL - 1] == b'\r',
        };
        if earlier > 0 {
            self.keep(seg);
        }
        let total = earlier + seg.len();
        self.line_len = 0;
        let len = total - usize::from(cr);
        if len == 0 {
            if !cr {
                return Err((nl, Reject::BareLf));
            }
            if self.started {
                self.end_head();
            }
            // Else an empty line before the request line, which hyper skips.
            return Ok(());
        }
        let kind = {
            let line: &[u8] = if earlier == 0 {
                seg
            } else {
                &self.kept[..total.min(KEEP)]
            };
            let content = &line[..len.min(line.len())];
            if !self.started {
                let end: &[u8] = if len <= line.len() {
                    content
                } else if cr {
                    &self.tail[..TAIL - 1]
                } else {
                    &self.tail[1..]
                };
                Line::Request {
                    ok: end.ends_with(b" HTTP/1.1") || end.ends_with(b" HTTP/1.0"),
                    connect: content.starts_with(b"CONNECT "),
                }
            } else {
                // However the line arrived, so the verdict does not depend on how reads split.
                header(content, len <= KEEP)
            }
        };
        self.started = true;
        match kind {
            Line::Request { ok: false, .. } => {
                // Not a request line hyper accepts: it refuses the request itself.
                self.state = State::Off;
                return Ok(());
            }
            Line::Request { connect, .. } => self.tunnel |= connect,
            Line::ContentLength(v) => {
                if self.has_te {
                    return Err((nl, Reject::ClTe));
                }
                self.has_cl = true;
                match (v, self.content_length) {
                    (Some(n), None) => self.content_length = Some(n),
                    (Some(n), Some(prev)) if n == prev => {}
                    // Unreadable, or two lengths (hyper answers 400 to those itself).
                    _ => self.lost = true,
                }
            }
            Line::TransferEncoding(v) => {
                if self.has_cl {
                    return Err((nl, Reject::ClTe));
                }
                self.has_te = true;
                match v {
                    // As hyper: the last Transfer-Encoding line decides.
                    Some(chunked) => self.chunked = chunked,
                    None => self.lost = true,
                }
            }
            Line::Upgrade => self.tunnel = true,
            Line::Other => {}
        }
        if cr {
            Ok(())
        } else {
            Err((nl, Reject::BareLf))
        }
    }

    /// The empty line that ends a head: on to the body as hyper frames it.
    fn end_head(&mut self) {
        self.state = if self.tunnel || self.lost {
            // What follows a 101 or a CONNECT's 2xx is not HTTP; a lost body cannot be skipped.
            State::Off
        } else if self.has_te {
            if self.chunked {
                State::Chunked(Chunk::Start)
            } else {
                // hyper refuses a Transfer-Encoding that does not end in chunked.
                State::Off
            }
        } else {
            match self.content_length {
                Some(n) if n > 0 => State::Length(n),
                _ => State::Head,
            }
        };
        self.started = false;
        self.content_length = None;
        self.has_cl = false;
        self.has_te = false;
        self.chunked = false;
        self.tunnel = false;
        self.lost = false;
    }

    fn chunked(&mut self, data: &[u8], mut pos: usize, mut c: Chunk) -> usize {
        use Chunk::*;
        while pos < data.len() {
            match c {
                Data => {
                    let avail = (data.len() - pos) as u64;
                    if self.size > avail {
                        self.size -= avail;
                        pos = data.len();
                    } else {
                        // `size <= avail`, which is a usize.
                        pos += self.size as usize;
                        self.size = 0;
                        c = DataCr;
                    }
                    continue;
                }
                Trailer => {
                    match data[pos..].iter().position(|&b| b == b'\r') {
                        Some(i) => {
                            pos += i + 1;
                            c = TrailerLf;
                        }
                        None => pos = data.len(),
                    }
                    continue;
                }
                Ext => {
                    match data[pos..].iter().position(|&b| b == b'\r' || b == b'\n') {
                        Some(i) if data[pos + i] == b'\r' => {
                            pos += i + 1;
                            c = SizeLf;
                        }
                        // hyper refuses a newline in a chunk extension.
                        Some(_) => return self.off(data),
                        None => pos = data.len(),
                    }
                    continue;
                }
                _ => {}
            }
            let b = data[pos];
            pos += 1;
            c = match (c, b) {
                (Start, _) => match hex(b) {
                    Some(d) => {
                        self.size = d;
                        Size
                    }
                    None => return self.off(data),
                },
                (Size, b'\t' | b' ') | (Lws, b'\t' | b' ') => Lws,
                (Size | Lws, b';') => Ext,
                (Size | Lws, b'\r') => SizeLf,
                (Size, _) => match hex(b)
                    .and_then(|d| self.size.checked_mul(16).and_then(|s| s.checked_add(d)))
                {
                    Some(s) => {
                        self.size = s;
                        Size
                    }
                    None => return self.off(data),
                },
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Start,
                (EndCr, b'\r') => EndLf,
                (EndCr, _) => Trailer,
                (TrailerLf, b'\n') => EndCr,
                (EndLf, b'\n') => {
                    self.state = State::Head;
                    return pos;
                }
                // Anything else is a chunked framing error: hyper fails the body and closes.
                _ => return self.off(data),
            };
        }
        self.state = State::Chunked(c);
        pos
    }

    fn off(&mut self, data: &[u8]) -> usize {
        self.state = State::Off;
        data.len()
    }
}

/// The first `\n` in `hay`, eight bytes a step. A head's lines are short: a plain word-at-a-time
/// scan costs less there than memchr's vector setup on every line.
#[inline]
fn find_lf(hay: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const LF: u64 = LO * b'\n' as u64;
    let mut words = hay.chunks_exact(8);
    let mut base = 0;
    for w in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(w);
        let x = u64::from_le_bytes(bytes) ^ LF;
        // The lowest byte of x that is zero sets its top bit here (higher ones may be spurious).
        let zero = x.wrapping_sub(LO) & !x & HI;
        if zero != 0 {
            return Some(base + (zero.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| base + i)
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

/// A header line (without its line end); framing values are read only when `readable`.
fn header(content: &[u8], readable: bool) -> Line {
    // httparse allows nothing between a request header's name and its colon.
    fn named(content: &[u8], name: &[u8]) -> bool {
        content.len() > name.len()
            && content[name.len()] == b':'
            && content[..name.len()].eq_ignore_ascii_case(name)
    }
    let value = |name: &[u8]| readable.then(|| trim(&content[name.len() + 1..]));
    match content[0] | 0x20 {
        b'c' if named(content, b"content-length") => {
            Line::ContentLength(value(b"content-length").and_then(digits))
        }
        b't' if named(content, b"transfer-encoding") => {
            Line::TransferEncoding(value(b"transfer-encoding").map(|v| {
                // As hyper's `is_chunked_`: only the last coding counts.
                let last = v.rsplit(|&b| b == b',').next().unwrap_or(v);
                trim(last).eq_ignore_ascii_case(b"chunked")
            }))
        }
        b'u' if named(content, b"upgrade") => Line::Upgrade,
        _ => Line::Other,
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !ws(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    &v[start..end]
}

/// hyper's `from_digits`: ASCII digits only, no sign, no overflow.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// The client stream with the framing check on its reads; writes pass straight through.
pub struct H1Guard<S> {
    inner: S,
    framing: Framing,
    metrics: Option<Arc<Metrics>>,
}

impl<S> H1Guard<S> {
    pub fn new(inner: S) -> H1Guard<S> {
        H1Guard {
            inner,
            framing: Framing::new(),
            metrics: None,
        }
    }

    /// Counts refusals in `switchyard_rejected_requests_total`.
    pub fn counted(mut self, metrics: Arc<Metrics>) -> H1Guard<S> {
        self.metrics = Some(metrics);
        self
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.framing.is_off() {
            return Poll::Ready(Ok(()));
        }
        let new = &mut buf.filled_mut()[before..];
        if let Some((at, why)) = this.framing.feed(new) {
            // hyper's parser fails on the NUL, answers 400 and closes the connection.
            new[at] = 0;
            tracing::debug!(reason = why.as_str(), "refused an ambiguous HTTP/1 request");
            if let Some(m) = &this.metrics {
                m.rejected_requests_total
                    .with_label_values(&[why.as_str()])
                    .inc();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Feeds `data` in pieces of `step` bytes; the fault's index is in `data` as a whole.
    fn run_in(data: &[u8], step: usize) -> (Option<(usize, Reject)>, Framing) {
        let mut f = Framing::new();
        for (i, piece) in data.chunks(step).enumerate() {
            if let Some((at, why)) = f.feed(piece) {
                return (Some((i * step + at, why)), f);
            }
        }
        (None, f)
    }

    /// The verdict, checked to be the same however the bytes are split, one at a time included.
    fn run(data: &[u8]) -> (Option<(usize, Reject)>, Framing) {
        let (whole, f) = run_in(data, data.len().max(1));
        for step in [1, 2, 3, 5, 7, 13, 24, 64] {
            let (v, g) = run_in(data, step);
            assert_eq!(v, whole, "split every {step} bytes");
            assert_eq!(g.state, f.state, "split every {step} bytes");
        }
        (whole, f)
    }

    fn at(data: &[u8], needle: &[u8]) -> usize {
        data.windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + needle.len() - 1)
            .unwrap_or_else(|| panic!("{needle:?} not in {data:?}"))
    }

    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";

    #[test]
    fn find_lf_finds_the_first_newline_at_every_offset() {
        for len in 0..40 {
            for at in 0..=len {
                let mut hay: Vec<u8> = (0..len).map(|i| b"\x0b\x09\x8a\xff a\r"[i % 7]).collect();
                if at < len {
                    hay[at] = b'\n';
                    // A second one after it must not be found first.
                    if at + 1 < len {
                        hay[at + 1] = b'\n';
                    }
                }
                let want = hay.iter().position(|&b| b == b'\n');
                assert_eq!(find_lf(&hay), want, "len {len}, at {at}");
            }
        }
    }

    #[test]
    fn the_state_is_small_and_fixed() {
        // README: the guard adds under 0.5 KiB per connection, allocated with it.
        assert!(std::mem::size_of::<Framing>() < 512);
    }

    #[test]
    fn crlf_heads_pass_and_stay_in_sync() {
        let (v, f) = run(GET);
        assert_eq!(v, None);
        assert_eq!(f.state, State::Head);
        // hyper skips empty lines before a request line.
        let (v, f) = run(b"\r\n\r\nGET /x HTTP/1.0\r\nHost: a\r\nX-A: b\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(v, None);
        assert_eq!(f.state, State::Head);
    }

    #[test]
    fn only_the_framing_headers_themselves_count() {
        let mut d = b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade-Insecure-Requests: 1\r\nContent-Type: x\r\n\
            Content-Length-X: 5\r\nTE: trailers\r\nTransfer-Encodings: chunked\r\nUser-Agent: u\r\n\r\n"
            .to_vec();
        let (v, f) = run(&d);
        assert_eq!((v, f.state), (None, State::Head));
        d.extend_from_slice(b"GET /y HTTP/1.1\r\nHost: a\n\r\n");
        assert_eq!(run(&d).0, Some((d.len() - 3, Reject::BareLf)));
    }

    #[test]
    fn bare_lf_is_refused_in_the_request_line_a_header_and_the_blank_line() {
        let d = b"GET /x HTTP/1.1\nHost: a\r\n\r\n";
        assert_eq!(run(d).0, Some((15, Reject::BareLf)));
        let d = b"GET /x HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n";
        assert_eq!(run(d).0, Some((at(d, b"a\n"), Reject::BareLf)));
        let d = b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\n";
        assert_eq!(run(d).0, Some((d.len() - 1, Reject::BareLf)));
        let d = b"GET /x HTTP/1.1\nHost: a\nX-A: b\n\n";
        assert_eq!(run(d).0, Some((15, Reject::BareLf)));
        // A lone LF before the request line, too.
        let d = b"\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(run(d).0, Some((0, Reject::BareLf)));
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused_in_either_order() {
        let d = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(run(d).0, Some((at(d, b"chunked\r\n"), Reject::ClTe)));
        let d = b"POST /x HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\nX-A: b\r\ncontent-LENGTH: 5\r\n\r\n0\r\n\r\n";
        assert_eq!(run(d).0, Some((at(d, b": 5\r\n"), Reject::ClTe)));
        // Whatever the values: hyper ignores a Content-Length after Transfer-Encoding unread.
        let d = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: nope\r\n\r\n";
        assert_eq!(run(d).0, Some((at(d, b"nope\r\n"), Reject::ClTe)));
    }

    #[test]
    fn a_length_body_with_newlines_is_skipped_and_the_next_request_is_read() {
        let mut d =
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\na\nb\n\n\r\nc\n".to_vec();
        d.extend_from_slice(GET);
        let (v, f) = run(&d);
        assert_eq!(v, None);
        assert_eq!(f.state, State::Head);
        // Still in step: a bare LF in the next head is found where it is.
        let n = d.len();
        d.extend_from_slice(b"GET /y HTTP/1.1\r\nHost: a\n\r\n");
        assert_eq!(run(&d).0, Some((n + 24, Reject::BareLf)));
    }

    #[test]
    fn a_chunked_body_with_extensions_and_trailers_is_followed_exactly() {
        let mut d = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
            5;name=\"v\\nx\"\r\nab\ncd\r\nA ; x=1\r\n0123456789\r\n0;last\r\nX-Sum: 1\r\nX-T: a\nb\r\n\r\n"
            .to_vec();
        d.extend_from_slice(GET);
        let (v, f) = run(&d);
        assert_eq!(v, None);
        assert_eq!(f.state, State::Head);
        let n = d.len();
        d.extend_from_slice(b"GET /y HTTP/1.1\nHost: a\r\n\r\n");
        assert_eq!(run(&d).0, Some((n + 15, Reject::BareLf)));
        // Without trailers.
        let d = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na\nb\r\n0\r\n\r\nGET / HTTP/1.1\nHost: a\r\n\r\n";
        assert_eq!(run(d).0, Some((at(d, b"GET / HTTP/1.1\n"), Reject::BareLf)));
    }

    #[test]
    fn a_bare_lf_request_after_a_valid_one_is_refused() {
        let mut d = GET.to_vec();
        d.extend_from_slice(b"GET /y HTTP/1.1\r\nHost: a\r\n\n");
        assert_eq!(run(&d).0, Some((d.len() - 1, Reject::BareLf)));
    }

    #[test]
    fn the_h2_preface_turns_the_guard_off() {
        let mut d = PREFACE.to_vec();
        d.extend_from_slice(
            b"\x00\x00\x0a\x04\x00\x00\x00\x00\x00\n\n\n\x00\x00\x00\x00\x00\x00\x00",
        );
        let (v, f) = run(&d);
        assert_eq!(v, None);
        assert!(f.is_off());
        // Its start alone is not h2: `PRI` is a method like another.
        let d = b"PRI /x HTTP/1.1\r\nHost: a\nX: y\r\n\r\n";
        assert_eq!(run(d).0, Some((at(d, b"a\n"), Reject::BareLf)));
        let d = b"PRI * HTTP/2.0\r\n\r\nSX\n\n";
        let (v, f) = run(d);
        assert_eq!(v, None, "hyper refuses HTTP/2.0 itself");
        assert!(f.is_off());
    }

    #[test]
    fn upgrades_connect_and_what_the_guard_cannot_read_turn_it_off() {
        for d in [
            &b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hi\nthere\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nbinary\n\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET / HTTP/1.1\nHost: a\n\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n\n\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nGET / HTTP/1.1\nHost: a\n\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab\n\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nab\n\n",
            b"GET /x HTTP/2.0\nHost: a\n\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
        ] {
            let (v, f) = run(d);
            assert_eq!(v, None, "{:?}", String::from_utf8_lossy(d));
            assert!(f.is_off(), "{:?}", String::from_utf8_lossy(d));
        }
    }

    #[test]
    fn long_lines_are_kept_as_far_as_needed() {
        // A request line longer than what is kept: its end is still checked.
        let long = "a".repeat(3 * KEEP);
        let d = format!("GET /{long} HTTP/1.1\nHost: a\r\n\r\n");
        assert_eq!(
            run(d.as_bytes()).0,
            Some((5 + long.len() + 9, Reject::BareLf))
        );
        // A long header that is not about framing changes nothing.
        let mut d = format!("POST /x HTTP/1.1\r\nCookie: {long}\r\nContent-Length: 2\r\n\r\nab")
            .into_bytes();
        d.extend_from_slice(GET);
        let (v, f) = run(&d);
        assert_eq!((v, f.state), (None, State::Head));
        // A framing header too long to read: the guard steps aside.
        let d = format!(
            "POST /x HTTP/1.1\r\nContent-Length: {}1\r\n\r\nab\n\n",
            "0".repeat(KEEP)
        );
        let (v, f) = run(d.as_bytes());
        assert_eq!(v, None);
        assert!(f.is_off());
        // ...but its name alone is enough for CL+TE.
        let d = format!(
            "POST /x HTTP/1.1\r\nTransfer-Encoding: {}chunked\r\nContent-Length: 2\r\n\r\n",
            " ".repeat(KEEP)
        );
        assert_eq!(run(d.as_bytes()).0, Some((d.len() - 3, Reject::ClTe)));
    }

    #[tokio::test]
    async fn the_nul_lands_on_the_offending_newline_and_is_counted() {
        let data = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\nHost: a\nX: b\r\n\r\n";
        let bad = at(data, b"a\nX") - 1;
        for step in [1, 4, data.len()] {
            let metrics = Arc::new(Metrics::new());
            let mut g = H1Guard::new(&data[..]).counted(metrics.clone());
            let mut out = Vec::new();
            let mut buf = vec![0u8; step];
            loop {
                let n = g.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            let mut want = data.to_vec();
            want[bad] = 0;
            assert_eq!(out, want, "reads of {step}");
            let c = metrics
                .rejected_requests_total
                .with_label_values(&["bare_lf"])
                .get();
            assert_eq!(c, 1);
        }
    }

    /// A random valid request: GET, or POST with a length body or a chunked body (extensions,
    /// trailers), bodies full of CR and LF, and header names that only look like framing ones.
    fn random_request(rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut r = Vec::new();
        let decoys = [
            "Content-Lengthy: 3",
            "Transfer-Encodings: gzip",
            "Upgrade-Insecure-Requests: 1",
            "X-Content-Length: 9",
            "Accept: */*",
            "Cookie: a=b; c=d",
        ];
        let method = rng.u8(..3);
        r.extend_from_slice(if method == 0 {
            b"GET /a?b=c HTTP/1.1\r\n"
        } else {
            b"POST /u HTTP/1.1\r\n"
        });
        r.extend_from_slice(b"Host: example.com\r\n");
        for _ in 0..rng.usize(..4) {
            r.extend_from_slice(decoys[rng.usize(..decoys.len())].as_bytes());
            r.extend_from_slice(b"\r\n");
        }
        let noise = |rng: &mut fastrand::Rng, n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| b"\r\nab0;:\x00\xff"[rng.usize(..9)])
                .collect()
        };
        match method {
            0 => r.extend_from_slice(b"\r\n"),
            1 => {
                let n = rng.usize(..300);
                let body = noise(rng, n);
                r.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                r.extend_from_slice(&body);
            }
            _ => {
                r.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for _ in 0..rng.usize(..4) {
                    let n = rng.usize(1..100);
                    let data = noise(rng, n);
                    r.extend_from_slice(format!("{:x}", data.len()).as_bytes());
                    if rng.bool() {
                        r.extend_from_slice(b";ext=\"v\"");
                    }
                    r.extend_from_slice(b"\r\n");
                    r.extend_from_slice(&data);
                    r.extend_from_slice(b"\r\n");
                }
                r.extend_from_slice(b"0\r\n");
                if rng.bool() {
                    r.extend_from_slice(b"X-Checksum: 1\r\n");
                }
                r.extend_from_slice(b"\r\n");
            }
        }
        r
    }

    /// Feeds `data` in random-sized pieces.
    fn run_random(data: &[u8], rng: &mut fastrand::Rng) -> (Option<(usize, Reject)>, Framing) {
        let mut f = Framing::new();
        let mut at = 0;
        while at < data.len() {
            let n = rng.usize(1..=64).min(data.len() - at);
            if let Some((i, why)) = f.feed(&data[at..at + n]) {
                return (Some((at + i, why)), f);
            }
            at += n;
        }
        (None, f)
    }

    /// Random keep-alive streams of valid requests pass whole and in random pieces, and the
    /// guard ends them in step; one fault planted in a random request is found at the same byte
    /// however the stream is split.
    #[test]
    fn random_request_streams_pass_and_planted_faults_are_found_at_the_same_byte() {
        let mut rng = fastrand::Rng::with_seed(0x9a4d);
        for _ in 0..20_000 {
            let reqs: Vec<Vec<u8>> = (0..rng.usize(1..6))
                .map(|_| random_request(&mut rng))
                .collect();
            let stream = reqs.concat();
            let (verdict, f) = run_random(&stream, &mut rng);
            assert_eq!(verdict, None, "{:?}", String::from_utf8_lossy(&stream));
            assert_eq!(
                f.state,
                State::Head,
                "{:?}",
                String::from_utf8_lossy(&stream)
            );

            // Plant a fault in one request's head.
            let victim = rng.usize(..reqs.len());
            let mut bad = reqs.clone();
            let head_end = bad[victim]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or(0);
            let kind = if rng.bool() {
                // A bare LF: drop the CR of one line end in the head.
                let crs: Vec<usize> = (0..=head_end)
                    .filter(|&i| bad[victim][i] == b'\r')
                    .collect();
                bad[victim].remove(crs[rng.usize(..crs.len())]);
                Reject::BareLf
            } else {
                let has = |req: &[u8], name: &[u8]| {
                    req[..head_end].split(|b| *b == b'\n').any(|l| {
                        l.iter()
                            .position(|b| *b == b':')
                            .is_some_and(|c| l[..c].eq_ignore_ascii_case(name))
                    })
                };
                let plant: &[u8] = match (
                    has(&bad[victim], b"content-length"),
                    has(&bad[victim], b"transfer-encoding"),
                ) {
                    (true, _) => b"Transfer-Encoding: chunked\r\n",
                    (_, true) => b"Content-Length: 1\r\n",
                    // A GET: give it both.
                    _ => b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
                };
                let host_end = bad[victim]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .unwrap_or(0)
                    + 2;
                bad[victim].splice(host_end..host_end, plant.iter().copied());
                Reject::ClTe
            };
            let stream = bad.concat();
            let (whole, _) = run_in(&stream, stream.len());
            let (pieces, _) = run_random(&stream, &mut rng);
            assert_eq!(whole, pieces, "{:?}", String::from_utf8_lossy(&stream));
            let (i, why) =
                whole.unwrap_or_else(|| panic!("missed: {:?}", String::from_utf8_lossy(&stream)));
            assert_eq!(why, kind, "{:?}", String::from_utf8_lossy(&stream));
            assert_eq!(stream[i], b'\n');
            let start: usize = bad[..victim].iter().map(Vec::len).sum();
            assert!(
                (start..start + bad[victim].len()).contains(&i),
                "found outside the planted request"
            );
        }
    }
}
