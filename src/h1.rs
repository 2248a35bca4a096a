//! HTTP/1.1 framing shared by the client side (`h1_server`) and the upstream side (`client`):
//! lengths, chunked bodies and their trailers, header lines. Errors are short reasons that the
//! caller turns into its own error (a 400 toward clients, a 502 toward upstreams).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::proxy::{is_hop_by_hop, Forwarded};

/// Longest chunk-size line (with extensions).
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section after a chunked body.
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Most fields in one trailer section.
const MAX_TRAILER_FIELDS: usize = 128;

pub fn parse_length(v: &[u8]) -> Result<u64, &'static str> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err("invalid Content-Length");
    }
    let n = v.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    // Past 2^63 - 1 many parsers (signed 64-bit) read another length: refused, not relayed.
    if n > i64::MAX as u64 {
        return Err("invalid Content-Length");
    }
    Ok(n)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What one step of chunked decoding produced.
pub enum Chunked {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

/// Decodes chunked framing off the front of `buf`.
pub fn decode_chunked(buf: &mut BytesMut, st: &mut ChunkState) -> Result<Chunked, &'static str> {
    loop {
        match *st {
            ChunkState::Size => {
                let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(Chunked::NeedMore);
                };
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                // chunk-size [BWS ";" extensions]: nothing else may follow the size.
                let rest = &line[digits..];
                let rest = &rest[rest
                    .iter()
                    .take_while(|b| matches!(b, b' ' | b'\t'))
                    .count()..];
                let significant = line[..digits].iter().skip_while(|d| **d == b'0').count();
                if digits == 0
                    || significant > 15
                    || !(rest.is_empty() || rest[0] == b';')
                    || rest.contains(&b'\r')
                {
                    return Err("invalid chunk size");
                }
                let size = line[..digits].iter().fold(0u64, |acc, d| {
                    acc * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
                });
                *st = if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(left) => {
                if buf.is_empty() {
                    return Ok(Chunked::NeedMore);
                }
                let take = (buf.len() as u64).min(left) as usize;
                let data = buf.split_to(take).freeze();
                *st = if left == take as u64 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left - take as u64)
                };
                return Ok(Chunked::Data(data));
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Chunked::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk not followed by CRLF");
                }
                buf.advance(2);
                *st = ChunkState::Size;
            }
            ChunkState::Trailers => return take_trailers(buf),
        }
    }
}

/// The trailer section after the last chunk, taken only once it is complete (up to its empty
/// line), so that nothing is consumed from a section still arriving.
pub fn take_trailers(buf: &mut BytesMut) -> Result<Chunked, &'static str> {
    if buf.len() < 2 {
        return Ok(Chunked::NeedMore);
    }
    if &buf[..2] == b"\r\n" {
        buf.advance(2);
        return Ok(Chunked::End);
    }
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_TRAILERS {
            return Err("trailers too large");
        }
        return Ok(Chunked::NeedMore);
    };
    if end + 4 > MAX_TRAILERS {
        return Err("trailers too large");
    }
    let section = buf.split_to(end + 4).freeze();
    let mut trailers = HeaderMap::new();
    for raw in section[..end + 2].split_inclusive(|b| *b == b'\n') {
        let line = raw
            .strip_suffix(b"\r\n")
            .filter(|l| !l.contains(&b'\r'))
            .ok_or("trailer line not ended by CRLF")?;
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or("invalid trailer")?;
        let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| "invalid trailer name")?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
            .map_err(|_| "invalid trailer value")?;
        if trailers.len() >= MAX_TRAILER_FIELDS {
            return Err("too many trailers");
        }
        trailers.append(name, value);
    }
    Ok(Chunked::Trailers(trailers))
}

/// Takes one CRLF-terminated line (without the CRLF) off `buf`; `None` if incomplete.
pub fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, &'static str> {
    match memchr::memchr(b'\n', buf) {
        Some(i) => {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err("line not ended by CRLF");
            }
            let line = buf.split_to(i + 1).freeze();
            Ok(Some(line.slice(..i - 1)))
        }
        None if buf.len() > max => Err("line too long"),
        None => Ok(None),
    }
}

/// Trailers may not carry framing, routing or forwarding headers (RFC 9110 6.5.1): some
/// upstreams merge trailers into the header section, which would bypass the proxy's rewriting.
pub fn trailer_allowed(name: &HeaderName) -> bool {
    !(is_hop_by_hop(name)
        || name == header::CONTENT_LENGTH
        || name == header::HOST
        || name == header::TRAILER
        || name == header::EXPECT
        || Forwarded::replaces(name))
}

pub fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// The `Date` field (RFC 9110 6.6.1) for responses that come without one, formatted at most
/// once a second per thread.
pub fn put_date(out: &mut BytesMut) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    // httpdate formats 1970 to 9999 only (and panics outside): a clock outside that range
    // has no date worth sending (RFC 9110 6.6.1 asks for none without a reliable clock).
    const YEAR_10000: u64 = 253_402_300_800;
    let now = SystemTime::now();
    let Ok(since) = now.duration_since(UNIX_EPOCH) else {
        return;
    };
    let secs = since.as_secs();
    if secs >= YEAR_10000 {
        return;
    }
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            // IMF-fixdate is 29 bytes for every year httpdate formats.
            let Ok(fixed) = <[u8; 29]>::try_from(httpdate::fmt_http_date(now).as_bytes()) else {
                return;
            };
            *c = (secs, fixed);
        }
        put_header(out, b"date", &c.1);
    });
}
