//! Who is in which room, who publishes and who subscribes; and the rooms file through which the
//! harness hands member addresses to the baselines (they have no signalling of their own).
//!
//! Rooms file: one room per line, its members' addresses separated by spaces; `#` starts a
//! comment line. A packet from a member goes to every other member of its room.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddrV4;

/// One participant of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Index of the room it is in.
    pub room_idx: usize,
    /// Position within the room's member list.
    pub position: usize,
    /// Whether it sends media.
    pub publishes: bool,
    /// Whether it receives the media of the others.
    pub subscribes: bool,
}

/// The participants of a scenario, grouped by room.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    /// Every participant; its index is its identity in the harness.
    pub members: Vec<Member>,
    /// Member indices of each room.
    pub rooms: Vec<Vec<usize>>,
}

impl Topology {
    /// One room: a publisher (member 0) and `n_subscribers` receive-only members.
    pub fn fanout(n_subscribers: usize) -> Self {
        let mut t = Self::default();
        t.push_room((0..=n_subscribers).map(|i| (i == 0, i != 0)));
        t
    }

    /// `n_rooms` rooms of `room_size` members who all publish and all subscribe.
    pub fn rooms(n_rooms: usize, room_size: usize) -> Self {
        let mut t = Self::default();
        for _ in 0..n_rooms {
            t.push_room((0..room_size).map(|_| (true, true)));
        }
        t
    }

    fn push_room(&mut self, roles: impl Iterator<Item = (bool, bool)>) {
        let room_idx = self.rooms.len();
        let mut ids = Vec::new();
        for (position, (publishes, subscribes)) in roles.enumerate() {
            ids.push(self.members.len());
            self.members.push(Member {
                room_idx,
                position,
                publishes,
                subscribes,
            });
        }
        self.rooms.push(ids);
    }

    /// Largest room, the stride of the (subscriber, publisher) stream table.
    pub fn max_room_size(&self) -> usize {
        self.rooms.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Whether `subscriber` should receive what `publisher` sends.
    pub fn should_receive(&self, subscriber: usize, publisher: usize) -> bool {
        let (s, p) = (self.members[subscriber], self.members[publisher]);
        subscriber != publisher && s.room_idx == p.room_idx && s.subscribes && p.publishes
    }

    /// Indices of the members that publish.
    pub fn publishers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(|&i| self.members[i].publishes)
    }
}

/// Renders rooms as a rooms file.
pub fn write_rooms_file(rooms: &[Vec<SocketAddrV4>]) -> String {
    let mut out = String::from("# one room per line: member addresses\n");
    for room in rooms {
        let line: Vec<String> = room.iter().map(ToString::to_string).collect();
        out.push_str(&line.join(" "));
        out.push('\n');
    }
    out
}

/// Parses a rooms file.
pub fn parse_rooms_file(text: &str) -> anyhow::Result<Vec<Vec<SocketAddrV4>>> {
    let mut rooms = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let room = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<SocketAddrV4>, _>>()
            .map_err(|e| anyhow::anyhow!("rooms file line {}: {e}", n + 1))?;
        rooms.push(room);
    }
    Ok(rooms)
}

/// For each member address, the addresses of the other members of its room.
pub fn destinations(rooms: &[Vec<SocketAddrV4>]) -> HashMap<SocketAddrV4, Vec<SocketAddrV4>> {
    let mut map = HashMap::new();
    for room in rooms {
        for &from in room {
            let others = room.iter().copied().filter(|&a| a != from).collect();
            map.insert(from, others);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_and_rooms_roles() {
        let f = Topology::fanout(10);
        assert_eq!((f.members.len(), f.max_room_size()), (11, 11));
        assert_eq!(f.publishers().collect::<Vec<_>>(), vec![0]);
        assert!(f.should_receive(3, 0));
        assert!(!f.should_receive(0, 3), "subscribers do not publish");
        assert!(!f.should_receive(0, 0));

        let r = Topology::rooms(50, 4);
        assert_eq!((r.members.len(), r.rooms.len()), (200, 50));
        assert!(r.should_receive(1, 2));
        assert!(!r.should_receive(3, 4), "4 is in the next room");
        assert_eq!(r.members[7].position, 3);
    }

    #[test]
    fn rooms_file_round_trips_and_maps_destinations() {
        let a = |p| SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, p);
        let rooms = vec![vec![a(1), a(2), a(3)], vec![a(4), a(5)]];
        let parsed = parse_rooms_file(&write_rooms_file(&rooms)).unwrap();
        assert_eq!(parsed, rooms);
        let d = destinations(&parsed);
        assert_eq!(d[&a(2)], vec![a(1), a(3)]);
        assert_eq!(d[&a(5)], vec![a(4)]);
        assert!(parse_rooms_file("127.0.0.1:1 nonsense").is_err());
    }
}
