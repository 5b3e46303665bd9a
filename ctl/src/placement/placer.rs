//! The placer: ranking plus load, stickiness and failure handling.

#![forbid(unsafe_code)]

use super::rank::{valid_weight, Candidates, Ranker, MAX_K};
use super::{Key, Node, NodeId, NodeState, PlacementError};
use std::collections::BTreeMap;

/// How the placer trades hash affinity for balance.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct PlacerConfig {
    /// How many ranked candidates every placement keeps (k, 2..=[`MAX_K`]).
    pub n_candidates: usize,
    /// The bounded-load factor `c` (>= 1): a node is eligible for a new key only while its load
    /// is below `ceil(c * (L + 1) * w / W)`, its weighted share of the total load `L` with the new
    /// key, times `c`.
    pub load_cap: f64,
}

impl Default for PlacerConfig {
    fn default() -> Self {
        Self {
            n_candidates: 3,
            load_cap: 1.25,
        }
    }
}

/// Where a key lives, and the nodes ranked best for it when it was placed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Placement {
    pub node: NodeId,
    /// The top `n_candidates` serving nodes by hash alone at placement time, best first. `node`
    /// is usually the first or second of them (the load rule picks), rarely one further down
    /// when these are all at their cap.
    pub candidates: Candidates,
}

/// A key moved off a node that left.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Move {
    pub key: Key,
    pub from: NodeId,
    /// `None` if no serving node was left: the key is no longer placed.
    pub to: Option<NodeId>,
}

#[derive(Clone, Copy, Debug)]
struct NodeEntry {
    weight: f64,
    state: NodeState,
    /// The load in the node's last report, in keys (rooms, users).
    reported_load: u64,
    /// Keys this placer put on the node since that report.
    placed_since_report: u64,
    /// Keys released from the node since that report.
    released_since_report: u64,
}

impl NodeEntry {
    /// The last report corrected by what this ctl did since: a burst of placements inside one
    /// stale report sees its own earlier placements and does not herd onto one node.
    fn load(&self) -> u64 {
        self.reported_load
            .saturating_add(self.placed_since_report)
            .saturating_sub(self.released_since_report)
    }
}

/// What one ctl knows about placement: nodes, their load, and the sticky placements.
///
/// Deterministic: two placers given the same calls in the same order hold the same placements,
/// whatever order their node lists came in.
#[derive(Clone, Debug)]
pub struct Placer {
    config: PlacerConfig,
    nodes: BTreeMap<NodeId, NodeEntry>,
    /// The serving nodes; rebuilt on every membership or state change.
    ranker: Ranker,
    /// Ordered, so that a failed node's keys are re-placed in the same order everywhere.
    placements: BTreeMap<Key, Placement>,
    /// The sum of the serving nodes' loads.
    serving_load: u64,
}

impl Placer {
    /// An empty placer.
    pub fn new(config: PlacerConfig) -> Result<Self, PlacementError> {
        let valid = (2..=MAX_K).contains(&config.n_candidates)
            && config.load_cap.is_finite()
            && config.load_cap >= 1.0;
        if !valid {
            return Err(PlacementError::InvalidConfig);
        }
        Ok(Self {
            config,
            nodes: BTreeMap::new(),
            ranker: Ranker::new(&[])?,
            placements: BTreeMap::new(),
            serving_load: 0,
        })
    }

    /// A placer with these nodes, none loaded.
    pub fn with_nodes(config: PlacerConfig, nodes: &[Node]) -> Result<Self, PlacementError> {
        // Ranker::new checks the list as a whole (duplicates, weights) before anything changes.
        Ranker::new(nodes)?;
        let mut placer = Self::new(config)?;
        for node in nodes {
            placer.nodes.insert(node.id, NodeEntry::new(node));
        }
        placer.rebuild();
        Ok(placer)
    }

    /// Adds a node, or changes a known node's weight and state (its load and placements stay).
    pub fn upsert_node(&mut self, node: Node) -> Result<(), PlacementError> {
        if !valid_weight(node.weight) {
            return Err(PlacementError::InvalidWeight {
                id: node.id,
                weight: node.weight,
            });
        }
        let entry = self
            .nodes
            .entry(node.id)
            .or_insert_with(|| NodeEntry::new(&node));
        entry.weight = node.weight;
        entry.state = node.state;
        self.rebuild();
        Ok(())
    }

    /// Drains a node (it keeps its keys, gets no new ones), or puts it back in service.
    pub fn set_state(&mut self, id: NodeId, state: NodeState) -> Result<(), PlacementError> {
        let entry = self
            .nodes
            .get_mut(&id)
            .ok_or(PlacementError::UnknownNode(id))?;
        entry.state = state;
        self.rebuild();
        Ok(())
    }

    /// Removes a node that died or left, and re-places its keys: each goes where a new placement
    /// of it would go now, by the same rule as [`Self::place`], among the serving nodes. By the
    /// rendezvous property the hash's first choice for it is its next candidate from before, and
    /// these are independent per key, so the keys spread over the surviving nodes instead of
    /// landing on one neighbour. Keys on other nodes do not move. Returns the moves in key order.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Vec<Move>, PlacementError> {
        self.nodes
            .remove(&id)
            .ok_or(PlacementError::UnknownNode(id))?;
        self.rebuild();
        let orphans: Vec<Key> = self
            .placements
            .iter()
            .filter(|(_, p)| p.node == id)
            .map(|(&key, _)| key)
            .collect();
        let mut moves = Vec::with_capacity(orphans.len());
        for key in orphans {
            let to = match self.choose(key) {
                Ok(p) => {
                    self.commit(key, p);
                    Some(p.node)
                }
                Err(_) => {
                    self.placements.remove(&key);
                    None
                }
            };
            moves.push(Move { key, from: id, to });
        }
        Ok(moves)
    }

    /// Takes a node's load report (in keys: rooms, users), replacing the previous one; the
    /// counts of placements and releases since the last report start again from zero.
    pub fn handle_load_report(&mut self, id: NodeId, load: u64) -> Result<(), PlacementError> {
        self.update_load(id, |e| {
            e.reported_load = load;
            e.placed_since_report = 0;
            e.released_since_report = 0;
        })
    }

    /// Where `key` lives: where it already is if its node is still known (serving or
    /// draining), else a new placement. A new placement ranks the serving nodes by hash, keeps
    /// the first two that are under the bounded-load cap ([`PlacerConfig::load_cap`]), and takes
    /// the less loaded of them relative to weight (ties: the better ranked).
    pub fn place(&mut self, key: Key) -> Result<Placement, PlacementError> {
        if let Some(p) = self.placements.get(&key) {
            return Ok(*p);
        }
        let p = self.choose(key)?;
        self.commit(key, p);
        Ok(p)
    }

    /// Forgets `key` (its room ended), returning where it was.
    pub fn release(&mut self, key: Key) -> Option<Placement> {
        let p = self.placements.remove(&key)?;
        // The node may be gone already; then there is no load to correct.
        let _ = self.update_load(p.node, |e| e.released_since_report += 1);
        Some(p)
    }

    /// Where `key` is placed, if it is.
    pub fn placement(&self, key: Key) -> Option<&Placement> {
        self.placements.get(&key)
    }

    /// All placements, in key order.
    pub fn placements(&self) -> impl Iterator<Item = (Key, &Placement)> {
        self.placements.iter().map(|(&k, p)| (k, p))
    }

    /// The number of placed keys.
    pub fn n_placements(&self) -> usize {
        self.placements.len()
    }

    /// A node's load as the placer counts it: last report + placed - released since.
    pub fn load(&self, id: NodeId) -> Option<u64> {
        self.nodes.get(&id).map(NodeEntry::load)
    }

    /// Every known node with its load, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = (Node, u64)> + '_ {
        self.nodes.iter().map(|(&id, e)| (e.node(id), e.load()))
    }

    /// The ranking of the serving nodes.
    pub fn ranker(&self) -> &Ranker {
        &self.ranker
    }

    /// The placement rule, without side effects.
    fn choose(&self, key: Key) -> Result<Placement, PlacementError> {
        if self.ranker.is_empty() {
            return Err(PlacementError::NoServingNode);
        }
        let top = self.ranker.top_k(key, MAX_K);
        let candidates = Candidates::from_ranked(&top[..top.len().min(self.config.n_candidates)]);
        let mut picks = self.first_two_under_cap(&top);
        if picks[1].is_none() && self.ranker.len() > top.len() {
            // Rare: the first MAX_K are nearly all at their cap. Look further down the ranking.
            let ranking = self.ranker.ranking(key);
            picks = self.first_two_under_cap(&ranking);
        }
        let node = match picks {
            [Some(a), Some(b)] => {
                if self.utilization(b) < self.utilization(a) {
                    b
                } else {
                    a
                }
            }
            [Some(a), None] => a,
            // The caps sum to at least c * (L + 1) > L, so some node is under its cap; only
            // float rounding could get here, and then the hash's choice is as good as any.
            _ => top[0],
        };
        Ok(Placement { node, candidates })
    }

    fn first_two_under_cap(&self, ranked: &[NodeId]) -> [Option<NodeId>; 2] {
        let total_weight = self.ranker.total_weight();
        let scaled = self.config.load_cap * (self.serving_load as f64 + 1.0);
        let mut picks = [None; 2];
        let mut n = 0;
        for &id in ranked {
            let Some(e) = self.nodes.get(&id) else {
                continue;
            };
            let cap = (scaled * e.weight / total_weight).ceil();
            if (e.load() as f64) < cap {
                picks[n] = Some(id);
                n += 1;
                if n == 2 {
                    break;
                }
            }
        }
        picks
    }

    fn utilization(&self, id: NodeId) -> f64 {
        self.nodes
            .get(&id)
            .map_or(f64::INFINITY, |e| e.load() as f64 / e.weight)
    }

    fn commit(&mut self, key: Key, p: Placement) {
        self.placements.insert(key, p);
        // `choose` only names nodes of the ranker, which are all in `self.nodes`.
        let known = self.update_load(p.node, |e| e.placed_since_report += 1);
        debug_assert!(known.is_ok(), "placed on unknown node {}", p.node);
    }

    /// Changes a node's load counters, keeping `serving_load` in step.
    fn update_load(
        &mut self,
        id: NodeId,
        f: impl FnOnce(&mut NodeEntry),
    ) -> Result<(), PlacementError> {
        let e = self
            .nodes
            .get_mut(&id)
            .ok_or(PlacementError::UnknownNode(id))?;
        let before = e.load();
        f(e);
        if e.state == NodeState::Serving {
            self.serving_load = self.serving_load - before + e.load();
        }
        Ok(())
    }

    fn rebuild(&mut self) {
        let nodes: Vec<Node> = self.nodes.iter().map(|(&id, e)| e.node(id)).collect();
        // Every weight was checked on the way in and the map's keys are distinct.
        self.ranker = Ranker::new(&nodes).expect("placer nodes are valid");
        self.serving_load = self
            .nodes
            .values()
            .filter(|e| e.state == NodeState::Serving)
            .map(NodeEntry::load)
            .sum();
    }
}

impl NodeEntry {
    fn new(node: &Node) -> Self {
        Self {
            weight: node.weight,
            state: node.state,
            reported_load: 0,
            placed_since_report: 0,
            released_since_report: 0,
        }
    }

    fn node(&self, id: NodeId) -> Node {
        Node {
            id,
            weight: self.weight,
            state: self.state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: u64) -> Vec<Node> {
        (0..n)
            .map(|r| Node::serving(NodeId::shard(r, 0), 1.0))
            .collect()
    }

    #[test]
    fn placements_are_sticky_and_released() {
        let mut p = Placer::with_nodes(PlacerConfig::default(), &cluster(10)).unwrap();
        let key = Key::from_u64(42);
        let first = p.place(key).unwrap();
        assert_eq!(first.candidates.len(), 3);
        assert!(first.candidates.contains(&first.node));
        // Load reports and new nodes do not move a placed key.
        p.handle_load_report(first.node, 1_000).unwrap();
        p.upsert_node(Node::serving(NodeId::shard(99, 0), 50.0))
            .unwrap();
        assert_eq!(p.place(key).unwrap(), first);
        assert_eq!(p.load(first.node), Some(1_000));
        assert_eq!(p.release(key), Some(first));
        assert_eq!(p.load(first.node), Some(999));
        assert_eq!(p.n_placements(), 0);
    }

    #[test]
    fn draining_nodes_keep_their_keys_and_get_none() {
        let mut p = Placer::with_nodes(PlacerConfig::default(), &cluster(4)).unwrap();
        let keys: Vec<Key> = (0..400).map(Key::from_u64).collect();
        let before: Vec<NodeId> = keys.iter().map(|&k| p.place(k).unwrap().node).collect();
        let drained = NodeId::shard(2, 0);
        p.set_state(drained, NodeState::Draining).unwrap();
        for (k, &node) in keys.iter().zip(&before) {
            assert_eq!(p.place(*k).unwrap().node, node);
        }
        for i in 1_000..2_000 {
            let placed = p.place(Key::from_u64(i)).unwrap();
            assert_ne!(placed.node, drained);
            assert!(!placed.candidates.contains(&drained));
        }
    }

    #[test]
    fn the_last_node_leaving_unplaces_its_keys() {
        let mut p = Placer::with_nodes(PlacerConfig::default(), &cluster(1)).unwrap();
        let key = Key::from_u64(7);
        p.place(key).unwrap();
        let moves = p.remove_node(NodeId::shard(0, 0)).unwrap();
        assert_eq!(
            moves,
            vec![Move {
                key,
                from: NodeId::shard(0, 0),
                to: None
            }]
        );
        assert_eq!(p.place(key), Err(PlacementError::NoServingNode));
    }

    #[test]
    fn bad_input_is_an_error() {
        let bad = PlacerConfig {
            n_candidates: 1,
            load_cap: 1.25,
        };
        assert_eq!(Placer::new(bad).err(), Some(PlacementError::InvalidConfig));
        let mut p = Placer::new(PlacerConfig::default()).unwrap();
        let id = NodeId::shard(1, 0);
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-310] {
            assert!(matches!(
                p.upsert_node(Node::serving(id, w)),
                Err(PlacementError::InvalidWeight { .. })
            ));
        }
        assert_eq!(
            p.handle_load_report(id, 3),
            Err(PlacementError::UnknownNode(id))
        );
        let dup = [Node::serving(id, 1.0), Node::serving(id, 2.0)];
        assert_eq!(
            Placer::with_nodes(PlacerConfig::default(), &dup).err(),
            Some(PlacementError::DuplicateNode(id))
        );
    }
}
