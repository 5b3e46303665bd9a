//! The shard's per-packet forwarding decision for 1->1, 1->10 and 1->100 subscribers.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn forwarding(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_forward");
    for n in [1usize, 10, 100] {
        let (mut shard, src, packet) = benches::room(n, 100);
        let mut reply = [0u8; 512];
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("subscribers", n), &n, |b, &n| {
            b.iter(|| {
                let d = benches::forward_once(
                    &mut shard,
                    src,
                    std::hint::black_box(&packet),
                    &mut reply,
                );
                debug_assert_eq!(d, n);
                d
            })
        });
    }
    g.finish();
}

fn binding_refresh(c: &mut Criterion) {
    // A bound participant refreshing its binding: SHA-256 + HMAC-SHA1, no signature check.
    let (mut shard, src, _) = benches::room(1, 0);
    let req = benches::binding_request(&benches::token(1, 1));
    let mut reply = [0u8; 512];
    c.bench_function("engine_binding_refresh", |b| {
        b.iter(|| {
            matches!(
                shard.handle_datagram(benches::NOW, src, &req, &mut reply),
                relay::engine::Verdict::Reply(_)
            )
        })
    });
}

criterion_group!(benches, forwarding, binding_refresh);
criterion_main!(benches);
