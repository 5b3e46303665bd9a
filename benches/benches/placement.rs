//! ctl placement lookups (issue 3): top-1 and top-3 of weighted rendezvous hashing at 16, 128,
//! 1,024 and 8,192 nodes, pruned (what ctl uses) and unpruned (every node's score computed, the
//! baseline; both return the same nodes). Targets: <= 80 ns, <= 350 ns, <= 2 us, <= 15 us.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ctl::placement::{Key, Node, NodeId, Ranker};
use std::hint::black_box;

/// Relays of 8 shards each, with capacities spread over [1, 4) (a mixed fleet: no two equal).
fn ranker(n_nodes: usize) -> Ranker {
    let mut x = 0x5eed_u64;
    let nodes: Vec<Node> = (0..n_nodes)
        .map(|i| {
            x = splitmix64(x);
            let weight = 1.0 + 3.0 * (x >> 11) as f64 / (1u64 << 53) as f64;
            Node::serving(NodeId::shard(i as u64 / 8, (i % 8) as u16), weight)
        })
        .collect();
    Ranker::new(&nodes).expect("valid nodes")
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut y = z;
    y = (y ^ (y >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    y = (y ^ (y >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    y ^ (y >> 31)
}

/// A different key every iteration, cycling through 4,096, so that branch prediction cannot
/// learn one key's scan.
const N_KEYS: usize = 4_096;

fn lookups(c: &mut Criterion) {
    let keys: Vec<Key> = (0..N_KEYS as u64)
        .map(|i| Key::from_u64(i * 7_919))
        .collect();
    for k in [1usize, 3] {
        let mut g = c.benchmark_group(format!("placement_top{k}"));
        g.throughput(Throughput::Elements(1));
        for n in [16usize, 128, 1_024, 8_192] {
            let r = ranker(n);
            g.bench_with_input(BenchmarkId::new("pruned", n), &n, |b, _| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % N_KEYS;
                    r.top_k(black_box(keys[i]), k)
                })
            });
            g.bench_with_input(BenchmarkId::new("unpruned", n), &n, |b, _| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % N_KEYS;
                    r.top_k_unpruned(black_box(keys[i]), k)
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, lookups);
criterion_main!(benches);
