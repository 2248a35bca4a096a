//! The proxy's forwarding policy: `X-Forwarded-For` (the client appended), `-Proto`, `-Host`,
//! `Forwarded` (RFC 7239) when the request carries one, and `Via` (RFC 9110 7.6.3). The HTTP/1.1 client writes them
//! straight into the request head ([`ExtraFields`]); HTTP/2 gets them through
//! [`add_forwarded`].

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::ConnInfo;
use crate::http::client::ExtraFields;
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

    /// `X-Forwarded-For`: the values the request came with, then the client.
    pub fn forwarded_for(&self, headers: &HeaderMap) -> HeaderValue {
        let mut prior = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        if prior.peek().is_none() {
            // The usual case: the address formatted once per connection.
            return self.client_ip.clone();
        }
        let mut s = prior.collect::<Vec<_>>().join(", ");
        s.push_str(", ");
        s.push_str(self.client_ip.to_str().unwrap_or_default());
        HeaderValue::from_str(&s).unwrap_or_else(|_| self.client_ip.clone())
    }

    /// `Forwarded` (RFC 7239), under the same policy as `X-Forwarded-For`: a client's values
    /// are kept and the proxy's element goes last (`for`, `host`, `proto`), so the last element
    /// is always the proxy's. None when the request carries no `Forwarded` (the proxy adds none
    /// of its own then; `X-Forwarded-*` say the same).
    pub fn forwarded(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let mut prior = headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        prior.peek()?;
        let mut s = prior.collect::<Vec<_>>().join(", ");
        let ip = self.client_ip.to_str().unwrap_or("unknown");
        if ip.contains(':') {
            s.push_str(&format!(", for=\"[{ip}]\""));
        } else {
            s.push_str(&format!(", for={ip}"));
        }
        if let Some(h) = self.host.and_then(|h| h.to_str().ok()) {
            s.push_str(&format!(";host=\"{h}\""));
        }
        s.push_str(";proto=");
        s.push_str(self.proto);
        HeaderValue::from_str(&s).ok()
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
