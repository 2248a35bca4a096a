//! The proxy's forwarding policy: `X-Forwarded-For` (the client appended), `-Proto`, `-Host`,
//! `Forwarded` (RFC 7239) when the request carries one, and `Via` (RFC 9110 7.6.3). The HTTP/1.1 client writes them
//! straight into the request head ([`ExtraFields`]); HTTP/2 gets them through
//! [`add_forwarded`].

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::ConnInfo;
use crate::http::client::ExtraFields;
use crate::http::codec::is_tchar;
use crate::http::headers::{
    is_x_forwarded, put_header, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};

/// The `X-Forwarded-*` values a request carries upstream.
pub struct Forwarded<'a> {
    pub client_ip: &'a HeaderValue,
    pub proto: &'static str,
    pub host: Option<&'a HeaderValue>,
    /// This hop's `Via` element, after any the request came with; None: `proxy.via = false`.
    pub via: Option<&'static str>,
}

/// This hop's `Via` element for a request received over `version` (RFC 9110 7.6.3: the
/// protocol it was received with, then the proxy's pseudonym).
pub fn via(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "1.0 switchyard",
        Version::HTTP_2 => "2 switchyard",
        _ => "1.1 switchyard",
    }
}

impl<'a> Forwarded<'a> {
    pub fn new(
        conn: &'a ConnInfo,
        host: Option<&'a HeaderValue>,
        via: Option<&'static str>,
    ) -> Forwarded<'a> {
        Forwarded {
            client_ip: &conn.client_ip,
            proto: if conn.tls { "https" } else { "http" },
            host,
            via,
        }
    }

    /// `X-Forwarded-For`: the values the request came with, then the client. Empty list
    /// elements (an empty field, `, ,`) are left out: a sender must not write them (RFC 9110
    /// 5.6.1).
    pub fn forwarded_for(&self, headers: &HeaderMap) -> HeaderValue {
        let mut s = String::new();
        for v in headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            for e in v.split(',').map(|e| e.trim_matches([' ', '\t'])) {
                if !e.is_empty() {
                    s.push_str(e);
                    s.push_str(", ");
                }
            }
        }
        if s.is_empty() {
            // The usual case: the address formatted once per connection.
            return self.client_ip.clone();
        }
        s.push_str(self.client_ip.to_str().unwrap_or_default());
        HeaderValue::from_str(&s).unwrap_or_else(|_| self.client_ip.clone())
    }

    /// `Forwarded` (RFC 7239), under the same policy as `X-Forwarded-For`: a client's values
    /// are kept and the proxy's element goes last (`for`, `host`, `proto`), so the last element
    /// is always the proxy's. A client's value that is not RFC 7239's grammar is dropped whole
    /// (an unterminated quoted-string would take the proxy's element in as its own text), and
    /// its empty list elements are left out. None when the request carries no `Forwarded` (the
    /// proxy adds none of its own then; `X-Forwarded-*` say the same).
    pub fn forwarded(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let mut lines = headers.get_all(header::FORWARDED).iter().peekable();
        lines.peek()?;
        let mut s = Vec::new();
        for v in lines {
            if !forwarded_elements(v.as_bytes(), &mut s) {
                s.clear();
                break;
            }
        }
        if !s.is_empty() {
            s.extend_from_slice(b", ");
        }
        let ip = self.client_ip.to_str().unwrap_or("unknown");
        if ip.contains(':') {
            s.extend_from_slice(format!("for=\"[{ip}]\"").as_bytes());
        } else {
            s.extend_from_slice(format!("for={ip}").as_bytes());
        }
        if let Some(h) = self.host.and_then(|h| h.to_str().ok()) {
            s.extend_from_slice(format!(";host=\"{h}\"").as_bytes());
        }
        s.extend_from_slice(b";proto=");
        s.extend_from_slice(self.proto.as_bytes());
        HeaderValue::from_maybe_shared(Bytes::from(s)).ok()
    }
}

/// Appends the non-empty elements of one `Forwarded` field line to `out`, each after `", "`
/// when `out` has some already; false (and `out` partly written) when the line is not
/// RFC 7239 section 4's grammar: `1#forwarded-element` (elements separated by `,` with OWS
/// around it, empty ones allowed to a recipient, RFC 9110 5.6.1), `forwarded-element =
/// [pair] *(";" [pair])`, `pair = token "=" (token / quoted-string)`, a quoted-string with
/// quoted-pairs (RFC 9110 5.6.4).
fn forwarded_elements(line: &[u8], out: &mut Vec<u8>) -> bool {
    let ows = |i: &mut usize| {
        while line.get(*i).is_some_and(|&b| b == b' ' || b == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while line.get(*i).copied().is_some_and(is_tchar) {
            *i += 1;
        }
        *i > start
    };
    let mut i = 0;
    loop {
        ows(&mut i);
        let start = i;
        // One element: pairs, each of them optional, separated by `;`.
        loop {
            if token(&mut i) {
                if line.get(i) != Some(&b'=') {
                    return false;
                }
                i += 1;
                if line.get(i) == Some(&b'"') {
                    i += 1;
                    loop {
                        match line.get(i) {
                            Some(b'"') => break,
                            // quoted-pair: `\` and HTAB / SP / VCHAR / obs-text.
                            Some(b'\\') => match line.get(i + 1) {
                                Some(&b) if b == b'\t' || (b >= b' ' && b != 0x7f) => i += 2,
                                _ => return false,
                            },
                            // qdtext: HTAB / SP / VCHAR but `"` and `\` / obs-text.
                            Some(&b) if b == b'\t' || (b >= b' ' && b != 0x7f) => i += 1,
                            _ => return false,
                        }
                    }
                    i += 1;
                } else if !token(&mut i) {
                    return false;
                }
            }
            if line.get(i) == Some(&b';') {
                i += 1;
            } else {
                break;
            }
        }
        let element = line.get(start..i).unwrap_or_default();
        ows(&mut i);
        match line.get(i) {
            None | Some(b',') => {
                if !element.is_empty() {
                    if !out.is_empty() {
                        out.extend_from_slice(b", ");
                    }
                    out.extend_from_slice(element);
                }
                if i == line.len() {
                    return true;
                }
                i += 1;
            }
            Some(_) => return false,
        }
    }
}

/// What the HTTP/1.1 client writes into the head: the request's own forwarding fields are left
/// out and written again here, the proxy's element last.
impl ExtraFields for Forwarded<'_> {
    #[inline]
    fn replaces(&self, name: &HeaderName) -> bool {
        name == header::FORWARDED || is_x_forwarded(name)
    }

    fn write(&self, headers: &HeaderMap, replaced: bool, out: &mut BytesMut) {
        // Without a prior field (the usual case) nothing is looked up.
        // The client's address as it is (no clone of the shared value) unless the request
        // carried a list to extend.
        let joined;
        let xff = if replaced {
            joined = self.forwarded_for(headers);
            &joined
        } else {
            self.client_ip
        };
        put_header(out, b"x-forwarded-for", xff.as_bytes());
        put_header(out, b"x-forwarded-proto", self.proto.as_bytes());
        if let Some(host) = self.host {
            put_header(out, b"x-forwarded-host", host.as_bytes());
        }
        if replaced {
            if let Some(v) = self.forwarded(headers) {
                put_header(out, b"forwarded", v.as_bytes());
            }
        }
        // A line of its own after the request's own `Via` lines: the list keeps its order.
        if let Some(via) = self.via {
            put_header(out, b"via", via.as_bytes());
        }
    }

    fn len_hint(&self) -> usize {
        self.client_ip.len() + self.host.map_or(0, |h| h.len()) + 24
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, this hop to `Via`, and sets `X-Forwarded-Proto` /
/// `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    if let Some(v) = fwd.forwarded(headers) {
        headers.insert(header::FORWARDED, v);
    }
    let xff = fwd.forwarded_for(headers);
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(fwd.proto),
    );
    match fwd.host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    if let Some(via) = fwd.via {
        headers.append(header::VIA, HeaderValue::from_static(via));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `forwarded_elements` makes of one line: the elements kept, or None when refused.
    fn elements(line: &str) -> Option<String> {
        let mut out = Vec::new();
        forwarded_elements(line.as_bytes(), &mut out)
            .then(|| String::from_utf8_lossy(&out).into_owned())
    }

    /// RFC 7239 section 4: well-formed lines are kept as they are, but for empty elements and
    /// the whitespace around commas.
    #[test]
    fn well_formed_forwarded_values_are_kept() {
        for (line, kept) in [
            ("for=192.0.2.1", "for=192.0.2.1"),
            (
                "for=192.0.2.43, for=198.51.100.17;by=203.0.113.60;proto=http;host=example.com",
                "for=192.0.2.43, for=198.51.100.17;by=203.0.113.60;proto=http;host=example.com",
            ),
            (
                "for=\"[2001:db8:cafe::17]:4711\"",
                "for=\"[2001:db8:cafe::17]:4711\"",
            ),
            ("For=\"_gazonk\";proto=https", "For=\"_gazonk\";proto=https"),
            // A quoted-string may hold `,`, `;`, `=`, spaces and quoted-pairs.
            (
                "for=a;host=\"x, y;z=\\\"q\\\\\"",
                "for=a;host=\"x, y;z=\\\"q\\\\\"",
            ),
            ("for=\"\"", "for=\"\""),
            // Pairs are optional on either side of `;`.
            ("for=a;;proto=http;", "for=a;;proto=http;"),
            // Empty list elements and OWS around commas (RFC 9110 5.6.1).
            ("  for=a ,\tfor=b\t", "for=a, for=b"),
            (",, for=a ,, ,for=b,", "for=a, for=b"),
            ("", ""),
            (" , ,\t", ""),
        ] {
            assert_eq!(elements(line).as_deref(), Some(kept), "{line:?}");
        }
    }

    #[test]
    fn malformed_forwarded_values_are_refused() {
        for line in [
            // The reviewer's two: an unterminated quoted-string, a quoted-pair cut short.
            "for=\"1.2.3.4",
            "for=1.2.3.4;proto=https;by=\"\\",
            "for=\"a\\\"",
            "for",
            "for=",
            "=a",
            "for=a b",
            "for = a",
            "for=a ;proto=http",
            "for=a; proto=http",
            "for=[2001:db8::1]",
            "for=\"a\"b",
            "for=a=b",
            "for=a;\"x\"",
            "for=a,,\"",
            "for=\"a\tb\x7f\"",
            "for=\u{e9}",
        ] {
            assert_eq!(elements(line), None, "{line:?}");
        }
    }

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// The proxy's element is always the last one, alone after a malformed or empty client
    /// value; no empty list element is written.
    #[test]
    fn the_proxys_element_stays_last_and_alone_after_garbage() {
        let ip = HeaderValue::from_static("127.0.0.1");
        let host = HeaderValue::from_static("a");
        let fwd = Forwarded {
            client_ip: &ip,
            proto: "http",
            host: Some(&host),
            via: None,
        };
        let own = "for=127.0.0.1;host=\"a\";proto=http";
        let got = |pairs: &[(&'static str, &'static str)]| {
            let v = fwd.forwarded(&fields(pairs));
            v.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        assert_eq!(got(&[]), None);
        for malformed in [
            &[("forwarded", "for=\"1.2.3.4")][..],
            &[("forwarded", "for=1.2.3.4;proto=https;by=\"\\")],
            // One bad line of two drops both.
            &[("forwarded", "for=192.0.2.1"), ("forwarded", "for=\"x")],
            &[("forwarded", "")],
            &[("forwarded", " , ")],
        ] {
            assert_eq!(got(malformed).as_deref(), Some(own), "{malformed:?}");
        }
        assert_eq!(
            got(&[
                ("forwarded", "for=192.0.2.1,"),
                ("forwarded", ""),
                ("forwarded", "for=\"x,y\"")
            ])
            .as_deref(),
            Some(format!("for=192.0.2.1, for=\"x,y\", {own}").as_str())
        );

        let xff = |pairs: &[(&'static str, &'static str)]| {
            String::from_utf8_lossy(fwd.forwarded_for(&fields(pairs)).as_bytes()).into_owned()
        };
        assert_eq!(xff(&[]), "127.0.0.1");
        assert_eq!(xff(&[("x-forwarded-for", "")]), "127.0.0.1");
        assert_eq!(xff(&[("x-forwarded-for", " ,\t, ")]), "127.0.0.1");
        assert_eq!(
            xff(&[
                ("x-forwarded-for", "192.0.2.1,, 192.0.2.2 ,"),
                ("x-forwarded-for", "")
            ]),
            "192.0.2.1, 192.0.2.2, 127.0.0.1"
        );
    }
}
