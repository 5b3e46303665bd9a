//! Property tests of placement (issue 3, "What must be shown"). Every test is deterministic:
//! keys are `Key::from_u64(0..n)` and any other randomness comes from a seeded SplitMix64.
//! Run with `cargo test -p ctl --release --lib placement -- --nocapture` to see the numbers.

use super::rank::{pair_hash, unit_open};
use super::*;
use std::collections::{BTreeMap, BTreeSet};

const MILLION: u64 = 1_000_000;

/// SplitMix64: a tiny seeded generator, enough for test inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Nodes `(r, 0)` for `r` in `0..weights.len()` with these weights.
fn nodes(weights: &[f64]) -> Vec<Node> {
    (0..weights.len())
        .map(|r| Node::serving(NodeId::shard(r as u64, 0), weights[r]))
        .collect()
}

fn random_weights(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut rng = Rng(seed);
    (0..n).map(|_| rng.range_f64(lo, hi)).collect()
}

/// How many of keys `0..n_keys` each node wins, indexed like `nodes`.
fn win_counts(nodes: &[Node], n_keys: u64, winner: impl Fn(Key) -> NodeId) -> Vec<u64> {
    let index: BTreeMap<NodeId, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let mut counts = vec![0u64; nodes.len()];
    for k in 0..n_keys {
        counts[index[&winner(Key::from_u64(k))]] += 1;
    }
    counts
}

struct ShareError {
    /// The largest |share - w/W|, in percentage points.
    max_abs_pp: f64,
    /// The largest |share / (w/W) - 1| over nodes whose expected share is at least 10%, in %
    /// (`None` if there is no such node).
    max_rel_large_pct: Option<f64>,
    /// The same over all nodes, in %.
    max_rel_pct: f64,
}

fn share_error(nodes: &[Node], counts: &[u64]) -> ShareError {
    let total_w: f64 = nodes.iter().map(|n| n.weight).sum();
    let n_keys: u64 = counts.iter().sum();
    let mut e = ShareError {
        max_abs_pp: 0.0,
        max_rel_large_pct: None,
        max_rel_pct: 0.0,
    };
    for (node, &c) in nodes.iter().zip(counts) {
        let expected = node.weight / total_w;
        let share = c as f64 / n_keys as f64;
        let rel = (share / expected - 1.0).abs() * 100.0;
        e.max_abs_pp = e.max_abs_pp.max((share - expected).abs() * 100.0);
        e.max_rel_pct = e.max_rel_pct.max(rel);
        if expected >= 0.10 {
            e.max_rel_large_pct = Some(e.max_rel_large_pct.unwrap_or(0.0).max(rel));
        }
    }
    e
}

fn weight_vectors() -> Vec<(&'static str, Vec<f64>)> {
    let mut one_heavier = vec![1.0; 100];
    one_heavier[0] = 1.1;
    let mut two_among_nine = vec![1.0; 10];
    two_among_nine[0] = 2.0;
    vec![
        ("10 x 1", vec![1.0; 10]),
        ("2 among nine 1s", two_among_nine),
        ("1.1 among 99 1s", one_heavier),
        ("20 random in [1, 10)", random_weights(1, 20, 1.0, 10.0)),
        ("100 random in [1, 4)", random_weights(2, 100, 1.0, 4.0)),
    ]
}

/// DESIGN.md section 6: share within +-1% of w_i / W at 1M keys. "+-1%" is checked as an absolute
/// +-1 percentage point of share for every node, and, where the statistic allows it, as a
/// relative +-1% for every node whose expected share is at least 10% (at 1M keys the sampling
/// noise of a 10% share is 0.3% relative; for a 1% share it is 1%, so relative +-1% cannot be
/// promised there and is only printed).
#[test]
fn shares_match_weights_at_1m_keys() {
    for (name, weights) in weight_vectors() {
        let nodes = nodes(&weights);
        let ranker = Ranker::new(&nodes).unwrap();
        let counts = win_counts(&nodes, MILLION, |k| ranker.top1(k).unwrap());
        let e = share_error(&nodes, &counts);
        let total_w: f64 = weights.iter().sum();
        eprintln!(
            "shares [{name}] 1M keys: node 0 {:.3}% (expected {:.3}%); max |error| {:.3} pp; \
             max relative error {} over shares >= 10%, {:.2}% over all",
            counts[0] as f64 / MILLION as f64 * 100.0,
            weights[0] / total_w * 100.0,
            e.max_abs_pp,
            e.max_rel_large_pct
                .map_or("n/a (none)".to_string(), |r| format!("{r:.2}%")),
            e.max_rel_pct,
        );
        assert!(e.max_abs_pp <= 1.0, "[{name}] {:.3} pp", e.max_abs_pp);
        if let Some(rel) = e.max_rel_large_pct {
            assert!(rel <= 1.0, "[{name}] {rel:.2}%");
        }
    }
}

/// The seed's `score = h * w` under the same check: the weight-2 node among nine weight-1 nodes
/// gets about 55% instead of 18.2%, and the 1.1 node among 100 about 9x its share. This is why
/// the score is `-w / ln(h)`.
#[test]
fn seed_formula_h_times_w_fails_the_same_check() {
    let seed_winner = |nodes: &[Node], key: Key| {
        let score = |n: &Node| unit_open(pair_hash(key.hash(), n.id.0)) * n.weight;
        nodes
            .iter()
            .max_by(|a, b| score(a).total_cmp(&score(b)))
            .unwrap()
            .id
    };
    for (name, weights) in weight_vectors().into_iter().skip(1).take(2) {
        let nodes = nodes(&weights);
        let counts = win_counts(&nodes, MILLION, |k| seed_winner(&nodes, k));
        let e = share_error(&nodes, &counts);
        let total_w: f64 = weights.iter().sum();
        let share = counts[0] as f64 / MILLION as f64;
        let expected = weights[0] / total_w;
        eprintln!(
            "seed h*w [{name}] 1M keys: node 0 {:.2}% (expected {:.2}%, {:.1}x); max |error| {:.2} pp",
            share * 100.0,
            expected * 100.0,
            share / expected,
            e.max_abs_pp,
        );
        assert!(
            share / expected > 3.0,
            "[{name}] the seed formula looked right"
        );
    }
    // And the absolute check fails outright for the 2-among-nine case.
    let two_among_nine = &weight_vectors()[1].1;
    let nodes = nodes(two_among_nine);
    let counts = win_counts(&nodes, MILLION, |k| seed_winner(&nodes, k));
    assert!(share_error(&nodes, &counts).max_abs_pp > 30.0);
}

/// Removing one of 100 nodes moves exactly that node's keys, spread over the others.
#[test]
fn removing_one_of_100_moves_only_its_keys() {
    let all = nodes(&random_weights(3, 100, 1.0, 4.0));
    let before = Ranker::new(&all).unwrap();
    let gone = all[37].id;
    let rest: Vec<Node> = all.iter().copied().filter(|n| n.id != gone).collect();
    let after = Ranker::new(&rest).unwrap();
    let (mut n_on_gone, mut n_moved, mut n_wrongly_moved) = (0u64, 0u64, 0u64);
    let mut destinations = BTreeSet::new();
    for k in 0..MILLION {
        let key = Key::from_u64(k);
        let (b, a) = (before.top1(key).unwrap(), after.top1(key).unwrap());
        if b == gone {
            n_on_gone += 1;
            destinations.insert(a);
        }
        if a != b {
            n_moved += 1;
            n_wrongly_moved += u64::from(b != gone);
        }
    }
    eprintln!(
        "remove 1 of 100 (1M keys): {n_on_gone} keys on the removed node, {n_moved} moved \
         ({:.3}%), {n_wrongly_moved} of them from other nodes; they went to {} of 99 nodes",
        n_moved as f64 / MILLION as f64 * 100.0,
        destinations.len()
    );
    assert_eq!(n_wrongly_moved, 0);
    assert_eq!(n_moved, n_on_gone);
    assert!(destinations.len() >= 95);
}

/// Adding a 101st node of equal weight moves about 1/101 of the keys, every one to the new node.
#[test]
fn adding_one_to_100_moves_about_one_in_101_all_to_it() {
    let mut all = nodes(&[1.0; 101]);
    let added = all.pop().unwrap().id;
    let before = Ranker::new(&all).unwrap();
    all.push(Node::serving(added, 1.0));
    let after = Ranker::new(&all).unwrap();
    let (mut n_moved, mut n_elsewhere) = (0u64, 0u64);
    for k in 0..MILLION {
        let key = Key::from_u64(k);
        let (b, a) = (before.top1(key).unwrap(), after.top1(key).unwrap());
        if a != b {
            n_moved += 1;
            n_elsewhere += u64::from(a != added);
        }
    }
    let fraction = n_moved as f64 / MILLION as f64;
    let expected = 1.0 / 101.0;
    eprintln!(
        "add a 101st node (1M keys): {n_moved} moved = {:.4}% (1/101 = {:.4}%, ratio {:.4}); \
         {n_elsewhere} moved anywhere but to the new node",
        fraction * 100.0,
        expected * 100.0,
        fraction / expected
    );
    assert_eq!(n_elsewhere, 0);
    // Sampling noise is about 1% relative (sqrt(9,900) keys); allow 5%.
    assert!((fraction / expected - 1.0).abs() < 0.05);
}

/// max/avg of load relative to weight, over the serving nodes.
fn max_over_avg(p: &Placer) -> f64 {
    let (mut total_load, mut total_w, mut max_util) = (0.0, 0.0, 0.0f64);
    for (node, load) in p.nodes() {
        total_load += load as f64;
        total_w += node.weight;
        max_util = max_util.max(load as f64 / node.weight);
    }
    max_util / (total_load / total_w)
}

/// With the bounded-load rule at about 100 rooms per node, max/avg load <= 1.10, where a node's
/// load is measured relative to its weight. Hash-only placement is printed for contrast.
#[test]
fn bounded_load_keeps_max_over_avg_within_1_10() {
    let cases = [
        ("100 x 1", vec![1.0; 100]),
        ("100 random in [1, 4)", random_weights(4, 100, 1.0, 4.0)),
    ];
    for (name, weights) in cases {
        let all = nodes(&weights);
        let n_rooms = 100 * all.len() as u64;
        let mut p = Placer::with_nodes(PlacerConfig::default(), &all).unwrap();
        for k in 0..n_rooms {
            p.place(Key::from_u64(k)).unwrap();
        }
        let placed = max_over_avg(&p);
        // Hash only, for contrast: the same keys by top1 alone.
        let counts = win_counts(&all, n_rooms, |k| p.ranker().top1(k).unwrap());
        let total_w: f64 = weights.iter().sum();
        let hash_only = all
            .iter()
            .zip(&counts)
            .map(|(n, &c)| c as f64 / n.weight)
            .fold(0.0, f64::max)
            / (n_rooms as f64 / total_w);
        eprintln!(
            "bounded load [{name}] {n_rooms} rooms: max/avg {placed:.3} (hash alone {hash_only:.3})"
        );
        assert!(placed <= 1.10, "[{name}] max/avg {placed}");
    }
}

/// The same with churn: rooms end and new ones start, and every node reports its load between
/// rounds (what the heartbeat does).
#[test]
fn bounded_load_holds_under_churn_and_reports() {
    let all = nodes(&[1.0; 100]);
    let mut p = Placer::with_nodes(PlacerConfig::default(), &all).unwrap();
    let mut rng = Rng(5);
    let mut live: Vec<u64> = (0..10_000).collect();
    let mut next_key = live.len() as u64;
    for &k in &live {
        p.place(Key::from_u64(k)).unwrap();
    }
    let mut worst = max_over_avg(&p);
    for _round in 0..20 {
        for _ in 0..1_000 {
            let i = rng.below(live.len() as u64) as usize;
            p.release(Key::from_u64(live.swap_remove(i))).unwrap();
        }
        for _ in 0..1_000 {
            p.place(Key::from_u64(next_key)).unwrap();
            live.push(next_key);
            next_key += 1;
        }
        let loads: Vec<(NodeId, u64)> = p.nodes().map(|(n, l)| (n.id, l)).collect();
        for (id, load) in loads {
            p.handle_load_report(id, load).unwrap();
        }
        worst = worst.max(max_over_avg(&p));
    }
    eprintln!("bounded load under churn (10,000 rooms, 20 rounds of 10% turnover): worst max/avg {worst:.3}");
    assert!(worst <= 1.10);
}

/// A burst of 1,000 placements inside one stale load report: no node gets more than 3x its fair
/// share (1,000 * w / W) of the burst, because the placer counts its own placements since the
/// report.
#[test]
fn a_burst_inside_one_stale_report_does_not_herd() {
    let random = random_weights(6, 100, 1.0, 4.0);
    let mut one_fresh = vec![100; 100];
    one_fresh[0] = 0;
    let cases = [
        ("100 x 1, all reported 100", vec![1.0; 100], vec![100; 100]),
        (
            "100 x 1, one fresh node reported 0, others 100",
            vec![1.0; 100],
            one_fresh,
        ),
        ("10 x 1, all reported 0", vec![1.0; 10], vec![0; 10]),
        (
            "100 random in [1, 4), reported 40 x weight",
            random.clone(),
            random.iter().map(|w| (40.0 * w) as u64).collect(),
        ),
    ];
    for (name, weights, reported) in cases {
        let all = nodes(&weights);
        let mut p = Placer::with_nodes(PlacerConfig::default(), &all).unwrap();
        for (n, &load) in all.iter().zip(&reported) {
            p.handle_load_report(n.id, load).unwrap();
        }
        let mut burst: BTreeMap<NodeId, u64> = BTreeMap::new();
        for k in 0..1_000 {
            *burst
                .entry(p.place(Key::from_u64(k)).unwrap().node)
                .or_default() += 1;
        }
        let total_w: f64 = weights.iter().sum();
        let worst = all
            .iter()
            .map(|n| *burst.get(&n.id).unwrap_or(&0) as f64 / (1_000.0 * n.weight / total_w))
            .fold(0.0, f64::max);
        let max_rooms = burst.values().max().unwrap();
        eprintln!(
            "burst of 1,000 in one stale report [{name}]: most on one node {max_rooms}, \
             worst {worst:.2}x its fair share"
        );
        assert!(worst <= 3.0, "[{name}] {worst:.2}x");
    }
}

/// When a node dies, only its keys move, and they spread over many survivors.
#[test]
fn a_dead_nodes_keys_spread_over_the_survivors() {
    let all = nodes(&[1.0; 100]);
    let mut p = Placer::with_nodes(PlacerConfig::default(), &all).unwrap();
    for k in 0..10_000 {
        p.place(Key::from_u64(k)).unwrap();
    }
    let before: BTreeMap<Key, NodeId> = p.placements().map(|(k, pl)| (k, pl.node)).collect();
    let dead = all[13].id;
    let n_on_dead = before.values().filter(|&&n| n == dead).count();
    let moves = p.remove_node(dead).unwrap();
    assert_eq!(moves.len(), n_on_dead);
    let mut destinations = BTreeSet::new();
    for m in &moves {
        assert_eq!(m.from, dead);
        let to = m.to.unwrap();
        destinations.insert(to);
        // The hash's next candidate among the live nodes, or the one after it (load rule).
        let top2 = p.ranker().top_k(m.key, 2);
        assert!(top2.contains(&to));
    }
    let n_other_moved = p
        .placements()
        .filter(|(k, pl)| before[k] != dead && before[k] != pl.node)
        .count();
    eprintln!(
        "node death (100 nodes, 10,000 rooms): {} rooms moved to {} distinct nodes; \
         {n_other_moved} other rooms moved; max/avg after {:.3}",
        moves.len(),
        destinations.len(),
        max_over_avg(&p)
    );
    assert_eq!(n_other_moved, 0);
    assert!(destinations.len() >= 50);
}

/// Two placement instances built from the same nodes given in different orders agree on 1M keys
/// (top 3), and the pruned scan equals the unpruned one.
#[test]
fn independent_instances_agree_on_1m_keys() {
    let all = nodes(&random_weights(7, 100, 1.0, 4.0));
    let mut shuffled = all.clone();
    let mut rng = Rng(8);
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let a = Ranker::new(&all).unwrap();
    let b = Ranker::new(&shuffled).unwrap();
    let mut n_disagree = 0u64;
    for k in 0..MILLION {
        let key = Key::from_u64(k);
        n_disagree += u64::from(a.top_k(key, 3) != b.top_k(key, 3));
    }
    eprintln!(
        "two instances, 100 nodes in different orders: {n_disagree} of 1M keys disagree (top 3)"
    );
    assert_eq!(n_disagree, 0);
}

#[test]
fn pruned_scan_equals_unpruned() {
    let mut n_checked = 0u64;
    let cases = [
        (9u64, 1usize),
        (10, 3),
        (11, 16),
        (12, 33),
        (13, 128),
        (14, 1_024),
        (0, 100),
    ];
    for (seed, n) in cases {
        // Seed 0: equal weights, where only the hash decides.
        let (lo, hi) = if seed == 0 { (1.0, 1.0) } else { (0.5, 8.0) };
        let all = nodes(&random_weights(seed, n, lo, hi));
        let r = Ranker::new(&all).unwrap();
        let n_keys = 2_000_000 / n as u64;
        for k in 0..n_keys {
            let key = Key::from_u64(k);
            for kk in [1, 3, MAX_K] {
                assert_eq!(r.top_k(key, kk), r.top_k_unpruned(key, kk), "n {n} key {k}");
            }
            let full = r.ranking(key);
            assert_eq!(
                &full[..full.len().min(MAX_K)],
                r.top_k(key, MAX_K).as_slice()
            );
            n_checked += 1;
        }
    }
    eprintln!("pruned == unpruned == full sort on {n_checked} (key, node set) pairs, k = 1, 3, 8");
}

/// Two placers fed the same events, built from differently ordered node lists, end up with the
/// same placements, including after a node death.
#[test]
fn two_placers_agree_through_the_same_events() {
    let all = nodes(&random_weights(13, 50, 1.0, 4.0));
    let mut reversed = all.clone();
    reversed.reverse();
    let mut a = Placer::with_nodes(PlacerConfig::default(), &all).unwrap();
    let mut b = Placer::with_nodes(PlacerConfig::default(), &reversed).unwrap();
    for p in [&mut a, &mut b] {
        for k in 0..5_000 {
            p.place(Key::from_u64(k)).unwrap();
        }
        for (i, n) in all.iter().enumerate() {
            p.handle_load_report(n.id, 90 + i as u64 % 20).unwrap();
        }
        p.remove_node(all[7].id).unwrap();
        for k in 5_000..7_000 {
            p.place(Key::from_u64(k)).unwrap();
        }
    }
    assert!(a.placements().eq(b.placements()));
}

/// The cross-version contract. These winners were computed once, by this implementation, and are
/// pinned: a change of the hash, of its input layout, of the (0, 1) mapping, of `ln`, of the cost
/// formula or of the tie-break would re-place rooms when a ctl is upgraded next to an older
/// replica (or restarted on stored placements), and must fail here first. Do not "fix" the
/// expected values; if a change is intended, it needs a migration plan.
#[test]
fn golden_vector_pins_the_ranking() {
    let nodes = [
        Node::serving(NodeId::shard(1, 0), 1.0),
        Node::serving(NodeId::shard(1, 1), 1.0),
        Node::serving(NodeId::shard(2, 0), 2.0),
        Node::serving(NodeId::shard(3, 0), 0.5),
        Node::serving(NodeId::shard(4, 0), 4.0),
        Node::serving(NodeId::shard(4, 1), 4.0),
        Node::serving(NodeId(0xdead_beef_0000_0007), 1.5),
    ];
    let ranker = Ranker::new(&nodes).unwrap();
    let keys = [
        Key::from_u64(0),
        Key::from_u64(1),
        Key::from_u64(42),
        Key::from_u64(u64::MAX),
        Key::from_bytes(b"room-standup"),
        Key::from_bytes(b"user:alice@example.org"),
        Key::from_bytes(b""),
        Key::from_u64(0x0123_4567_89ab_cdef),
    ];
    let got: Vec<(u64, [u64; 3])> = keys
        .iter()
        .map(|&k| {
            let top = ranker.top_k(k, 3);
            (k.hash(), [top[0].0, top[1].0, top[2].0])
        })
        .collect();
    for (h, top) in &got {
        eprintln!("golden: key hash {h:#018x} -> {top:#x?}");
    }
    assert_eq!(got, GOLDEN);
    // `h` for a fixed pair, to the bit.
    let h = unit_open(pair_hash(Key::from_u64(42).hash(), NodeId::shard(2, 0).0));
    assert_eq!(ln(h).to_bits(), GOLDEN_LN_BITS, "ln(h) = {:e}", ln(h));
}

const GOLDEN: &[(u64, [u64; 3])] = &[
    (0xc77b3abb6f87acd9, [0x40000, 0x20000, 0x40001]),
    (0x2fbc593564db792e, [0x40001, 0x40000, 0x20000]),
    (0xd5a6f8c838df27c8, [0x20000, 0x10000, 0x40000]),
    (0x5111c7e47d784413, [0x40001, 0x40000, 0x10001]),
    (0x6665b73b9b13bdf1, [0x40000, 0x10000, 0x10001]),
    (0x2eda438b22cfcdc5, [0x40001, 0x20000, 0x40000]),
    (0x2d06800538d394c2, [0x40001, 0x20000, 0x10001]),
    (0xb78df414284277a6, [0x10001, 0x20000, 0xdeadbeef00000007]),
];
/// `ln(h)` for key 42 and node 2/0: -0.036536815534989386.
const GOLDEN_LN_BITS: u64 = 0xbfa2b4f417a54158;

#[test]
fn key_of_a_number_is_the_key_of_its_bytes() {
    assert_eq!(Key::from_u64(7), Key::from_bytes(&7u64.to_le_bytes()));
    let id = NodeId::shard(0xabcd, 3);
    assert_eq!((id.relay_id(), id.shard_idx()), (0xabcd, 3));
    assert_eq!(id.to_string(), "43981/3");
}
