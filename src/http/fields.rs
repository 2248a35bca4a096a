//! A response's header fields kept as the upstream wrote them: the HTTP/1 server copies them to
//! its client in one piece, and a [`HeaderMap`] is built only where one is needed (an HTTP/2
//! client, whose server takes a map; a `101`, whose fields the proxy reads).
//!
//! Building a map for every response and writing it out again cost ~3k instructions per
//! request (a `HeaderName` lookup, a shared `HeaderValue`, a hashed insert and a drop per
//! field), an eighth of the whole request path; the fields themselves are relayed unchanged.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{Either, Full};

/// Header lines, each `name:value\r\n` with the name lowercased and the value as the upstream
/// sent it (its leading whitespace kept, its trailing whitespace dropped), less the hop-by-hop
/// and framing fields; `Content-Length` is kept aside for answers without a body.
#[derive(Clone, Debug, Default)]
pub struct Fields {
    lines: Bytes,
    /// The upstream's `Content-Length` (written for `HEAD` and `304`, where no body says it).
    length: Option<u64>,
    /// A `Date` line is among them (the server writes its own otherwise).
    date: bool,
}

impl Fields {
    /// `lines` must be whole `name:value\r\n` lines with valid, lowercase names and valid
    /// values (as [`crate::http::client`] writes them from a parsed head).
    pub(crate) fn new(lines: Bytes, length: Option<u64>, date: bool) -> Fields {
        Fields {
            lines,
            length,
            date,
        }
    }

    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    pub fn length(&self) -> Option<u64> {
        self.length
    }

    pub fn has_date(&self) -> bool {
        self.date
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.length.is_none()
    }

    /// Each line's name and value (without the line end).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines.split(|b| *b == b'\n').filter_map(|line| {
            let line = line.strip_suffix(b"\r")?;
            let colon = line.iter().position(|b| *b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii_start()))
        })
    }

    /// Writes the lines to an HTTP/1 head, leaving out names that `map` has (the map's fields
    /// replace the upstream's). The map's names (a few: the proxy's own, a request id) are
    /// first looked for in the lines as a whole (the lines' names are lowercase, as a
    /// `HeaderName` is); only when one is there are the lines gone through one by one.
    pub fn write_to(&self, head: &mut BytesMut, map: &HeaderMap) {
        let lines = &self.lines[..];
        if map
            .keys()
            .all(|name| !has_line_named(lines, name.as_str().as_bytes()))
        {
            head.put_slice(lines);
            return;
        }
        let mut rest = lines;
        while let Some(end) = memchr::memchr(b'\n', rest) {
            let (line, after) = rest.split_at(end + 1);
            let name = &line[..memchr::memchr(b':', line).unwrap_or(line.len())];
            let replaced = std::str::from_utf8(name).is_ok_and(|n| map.contains_key(n));
            if !replaced {
                head.put_slice(line);
            }
            rest = after;
        }
    }

    /// Moves the fields into `map`, after the names it already has (which replace the
    /// upstream's), `Content-Length` included.
    pub fn into_map(self, map: &mut HeaderMap) {
        if self.is_empty() {
            return;
        }
        let had: Vec<HeaderName> = map.keys().cloned().collect();
        let keep = |name: &HeaderName| !had.contains(name);
        for (name, value) in self.iter() {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.lines.slice_ref(value)),
            ) else {
                continue;
            };
            if keep(&name) {
                map.append(name, value);
            }
        }
        if let Some(n) = self.length {
            if keep(&header::CONTENT_LENGTH) {
                map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
    }
}

/// Whether one of `lines` (`name:value\r\n` each) is named `name`: a look at each line's
/// start (a `memmem` finder costs more to build than a few lines take to read).
fn has_line_named(lines: &[u8], name: &[u8]) -> bool {
    let mut rest = lines;
    loop {
        if rest.get(name.len()) == Some(&b':') && rest.starts_with(name) {
            return true;
        }
        match memchr::memchr(b'\n', rest) {
            Some(end) => rest = &rest[end + 1..],
            None => return false,
        }
    }
}

/// A response body that may carry its response's header fields as [`Fields`].
pub trait BodyFields {
    fn fields(&self) -> Option<&Fields> {
        None
    }
}

impl BodyFields for Full<Bytes> {}

impl<L: BodyFields, R: BodyFields> BodyFields for Either<L, R> {
    fn fields(&self) -> Option<&Fields> {
        match self {
            Either::Left(l) => l.fields(),
            Either::Right(r) => r.fields(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(lines: &'static [u8]) -> Fields {
        Fields::new(Bytes::from_static(lines), Some(12), true)
    }

    #[test]
    fn lines_read_back_as_names_and_values() {
        let f = fields(b"server:nginx\r\nx-a:  spaced value\r\nx-empty:\r\n");
        let got: Vec<_> = f.iter().collect();
        assert_eq!(
            got,
            vec![
                (&b"server"[..], &b"nginx"[..]),
                (&b"x-a"[..], &b"spaced value"[..]),
                (&b"x-empty"[..], &b""[..]),
            ]
        );
    }

    #[test]
    fn the_map_replaces_lines_of_its_names() {
        let f = fields(b"x-request-id: upstream\r\nserver: nginx\r\nx-request-id: again\r\n");
        let mut map = HeaderMap::new();
        let mut head = BytesMut::new();
        f.write_to(&mut head, &map);
        assert_eq!(&head[..], f.lines());

        map.insert("x-request-id", HeaderValue::from_static("ours"));
        let mut head = BytesMut::new();
        f.write_to(&mut head, &map);
        assert_eq!(&head[..], b"server: nginx\r\n");
        // More names than are compared one by one: looked up in the map.
        let mut many = map.clone();
        for name in ["a", "b", "c", "d", "server"] {
            many.insert(name, HeaderValue::from_static("x"));
        }
        let mut head = BytesMut::new();
        f.write_to(&mut head, &many);
        assert!(head.is_empty(), "{head:?}");

        f.into_map(&mut map);
        let ids: Vec<_> = map.get_all("x-request-id").iter().collect();
        assert_eq!(ids, vec!["ours"]);
        assert_eq!(map["server"], "nginx");
        assert_eq!(map[header::CONTENT_LENGTH], "12");
    }

    #[test]
    fn repeated_names_all_reach_the_map() {
        let f = fields(b"set-cookie: a=1\r\nset-cookie: b=2\r\n");
        let mut map = HeaderMap::new();
        f.into_map(&mut map);
        let cookies: Vec<_> = map.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, vec!["a=1", "b=2"]);
    }
}
