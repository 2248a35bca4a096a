//! The client-side HTTP/1.1 request head parse on the hot path: a typical bodiless GET (97
//! bytes, four lines) into method, target and a `HeaderMap` sharing the read buffer, with the
//! smuggling checks (bare LF, framing headers).

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use switchyard::{parse_head, Limits};

/// 97 bytes, four lines: what a typical API client sends.
const GET: &[u8] = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

fn parse(c: &mut Criterion) {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        max_headers: 100,
        max_header_bytes: 64 * 1024,
    };
    let mut g = c.benchmark_group("h1_server");
    g.throughput(Throughput::Bytes(GET.len() as u64));
    g.bench_function("parse_get_head", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(GET));
            parse_head(&mut buf, &limits)
                .ok()
                .flatten()
                .map(|h| h.headers.len())
        })
    });
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
