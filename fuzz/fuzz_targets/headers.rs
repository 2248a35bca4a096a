//! Arbitrary header lists through the proxy's header rewriting: no panic, no hop-by-hop header
//! survives, and the X-Forwarded-* headers always say what they should.
//!
//! Input: byte 0 picks TLS and the client address, the rest is `name:value` lines split on
//! `\n`; lines that are not a valid header are skipped (hyper would have refused them).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use switchyard::{add_forwarded, strip_hop_by_hop, ConnInfo, Forwarded, Mode};

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    // Every header any Connection line names must go too.
    let named: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    let host = headers.get("host").cloned();

    strip_hop_by_hop(&mut headers);
    for name in HOP_BY_HOP {
        assert!(!headers.contains_key(name), "{name} survived");
    }
    for name in &named {
        assert!(
            !headers.contains_key(name),
            "{name} (named by Connection) survived"
        );
    }

    let ip = if flags & 2 == 0 {
        IpAddr::V4(Ipv4Addr::new(10, 0, flags, 1))
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(flags)))
    };
    let conn = ConnInfo::new(SocketAddr::new(ip, 40000), flags & 1 == 1, Mode::Live);
    add_forwarded(&mut headers, &Forwarded::new(&conn, host.as_ref()));
    let xff = headers
        .get_all("x-forwarded-for")
        .iter()
        .collect::<Vec<_>>();
    assert_eq!(xff.len(), 1, "one X-Forwarded-For line");
    let xff = xff[0].to_str().expect("X-Forwarded-For is visible ASCII");
    assert!(xff.ends_with(&ip.to_string()), "client not last in {xff:?}");
    let proto = headers.get("x-forwarded-proto").map(|v| v.as_bytes());
    let want: &[u8] = if conn.tls { b"https" } else { b"http" };
    assert_eq!(proto, Some(want));
    assert_eq!(headers.get("x-forwarded-host"), host.as_ref());
    for name in HOP_BY_HOP {
        assert!(!headers.contains_key(name), "{name} came back");
    }
});
