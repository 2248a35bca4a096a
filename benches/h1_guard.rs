//! The HTTP/1 framing guard on the request hot path: a typical bodiless GET head on a keep-alive
//! connection, and a POST whose 64 KiB body is skipped by its length.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use switchyard::h1_guard::Framing;

/// 97 bytes, four lines: what a typical API client sends.
const GET: &[u8] = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

fn guard(c: &mut Criterion) {
    let mut f = Framing::new();
    // Past the h2-preface check, as on a keep-alive connection.
    assert!(f.feed(GET).is_none());
    let mut g = c.benchmark_group("h1_guard");
    g.throughput(Throughput::Bytes(GET.len() as u64));
    g.bench_function("get_head", |b| b.iter(|| f.feed(black_box(GET))));

    let mut post = b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/octet-stream\r\nContent-Length: 65536\r\n\r\n".to_vec();
    post.extend((0..65536u32).map(|i| (i % 251) as u8));
    g.throughput(Throughput::Bytes(post.len() as u64));
    g.bench_function("post_64k_body", |b| b.iter(|| f.feed(black_box(&post))));
    g.finish();
}

criterion_group!(benches, guard);
criterion_main!(benches);
