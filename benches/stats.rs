//! Hot-path and read-path costs of `switchyard::stats`.
// This bench times threads itself with the wall clock; nothing here runs on tokio's clock.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::Window;

/// 1024 latencies spread log-uniformly over ~50 µs .. ~5 s, so records hit
/// many different buckets.
fn latencies() -> Vec<Duration> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..1024)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let f = (x >> 33) as f64 / (1u64 << 31) as f64;
            Duration::from_micros((50.0 * 1e5f64.powf(f)) as u64)
        })
        .collect()
}

fn record(c: &mut Criterion) {
    let lats = latencies();
    let mut g = c.benchmark_group("record");

    g.bench_function("1thread", |b| {
        let w = Window::new(600);
        w.prepare(9);
        let mut i = 0usize;
        b.iter(|| {
            let lat = lats[i & 1023];
            i = i.wrapping_add(1);
            w.record(black_box(10), lat, i & 15 == 0);
        });
    });

    // Both threads record into the same slot at once; the figure is the time
    // each thread needs per record while contending with the other.
    g.bench_function("2threads", |b| {
        let w = Window::new(600);
        w.prepare(9);
        b.iter_custom(|iters| {
            let barrier = Barrier::new(2);
            let run = |offset: usize| {
                barrier.wait();
                let start = Instant::now();
                for i in 0..iters as usize {
                    let lat = lats[(i + offset) & 1023];
                    w.record(black_box(10), lat, i & 15 == 0);
                }
                start.elapsed()
            };
            std::thread::scope(|s| {
                let other = s.spawn(|| run(512));
                let mine = run(0);
                let theirs = other.join().unwrap_or(mine);
                mine.max(theirs)
            })
        });
    });
    g.finish();
}

fn p95(c: &mut Criterion) {
    let lats = latencies();
    let w = Window::new(600);
    let now = 1000u64;
    for epoch in now - 119..=now {
        for (i, &lat) in lats.iter().enumerate() {
            w.record(epoch, lat, i % 50 == 0);
        }
    }
    c.bench_function("p95/120s_full_window", |b| {
        b.iter(|| black_box(w.summary(black_box(now), 120)).p95());
    });
}

criterion_group!(benches, record, p95);
criterion_main!(benches);
