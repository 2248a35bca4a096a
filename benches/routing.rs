//! One routing decision as the request path makes it: snapshot load, service match (host and
//! path prefix, first match in file order), and the upstream pick (power of two choices).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::build_snapshot;
use switchyard::Metrics;

fn config() -> switchyard::config::Config {
    let mut text = String::new();
    // Ten services; the benchmarked request matches the last, the worst case for the scan.
    for i in 0..10 {
        text.push_str(&format!(
            r#"
[[services]]
name = "svc{i}"
hosts = ["svc{i}.example.com"]
path_prefix = "/v{i}"
blue = {{ upstreams = ["127.0.0.1:{a}", "127.0.0.1:{b}", "127.0.0.1:{c}", "127.0.0.1:{d}"] }}
green = {{ upstreams = ["127.0.0.1:{e}"] }}
"#,
            a = 3000 + i * 10,
            b = 3001 + i * 10,
            c = 3002 + i * 10,
            d = 3003 + i * 10,
            e = 4000 + i,
        ));
    }
    match switchyard::config::from_toml_str_with_env(&text, Some(HashMap::new())) {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    }
}

fn routing(c: &mut Criterion) {
    let metrics = Metrics::new();
    let snap = build_snapshot(Arc::new(config()), &HashMap::new(), None, &metrics);
    let routes = ArcSwap::from_pointee(snap);
    c.bench_function("routing/decision_10_services", |b| {
        b.iter(|| {
            let snap = routes.load();
            let svc = snap.route(
                black_box(Some("svc9.example.com")),
                black_box("/v9/items/42"),
            );
            let up = svc.and_then(|s| s.live().pick()).map(|u| u.addr);
            black_box(up)
        })
    });
    c.bench_function("routing/decision_first_service", |b| {
        b.iter(|| {
            let snap = routes.load();
            let svc = snap.route(
                black_box(Some("svc0.example.com")),
                black_box("/v0/items/42"),
            );
            let up = svc.and_then(|s| s.live().pick()).map(|u| u.addr);
            black_box(up)
        })
    });
}

criterion_group!(benches, routing);
criterion_main!(benches);
