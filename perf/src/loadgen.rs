//! The load generator: participants' sockets, a paced publisher and a receiver that accounts
//! every packet. One measurement step runs the publisher on the calling thread and the
//! receiver on a scoped thread; both stay on the load-generator core the harness pinned.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::join::Credentials;
use crate::payload::{Stamp, STAMP_LEN};
use crate::stats::{Latency, StreamTracker};
use crate::sys::{self, Epoll, RecvBatch, SendBatch};
use crate::topology::Topology;

/// Packets per sendmmsg/recvmmsg.
const BATCH: usize = 64;
/// Pacing tick: the publisher wakes this often and sends what is due.
const TICK: Duration = Duration::from_micros(100);
/// Bindings are refreshed this often (the relay's default TTL is 10 s).
const REFRESH_NS: u64 = 2_000_000_000;
/// After the last send, the receiver stops once nothing arrived for this long...
const DRAIN_IDLE_NS: u64 = 100_000_000;
/// ...or at the latest after this long.
const DRAIN_MAX_NS: u64 = 1_000_000_000;
/// Load-generator sockets get buffers this large (forced past rmem_max where permitted), so
/// a loss is the contender's and not the load generator's.
const LOADGEN_BUFFER_BYTES: usize = 8 << 20;

/// One participant: its socket, connected to the contender once the contender is known.
pub struct Participant {
    /// Bound to 127.0.0.1 on an ephemeral port.
    pub sock: UdpSocket,
    /// Its local address, as the contender sees it.
    pub addr: SocketAddrV4,
    /// Present when the contender is the real relay.
    pub creds: Option<Credentials>,
}

/// Binds `n` participant sockets.
pub fn bind_participants(n: usize) -> anyhow::Result<Vec<Participant>> {
    (0..n)
        .map(|_| {
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sys::set_socket_buffers(sock.as_raw_fd(), LOADGEN_BUFFER_BYTES, true)?;
            let SocketAddr::V4(addr) = sock.local_addr()? else {
                anyhow::bail!("bound 127.0.0.1 but got an IPv6 address");
            };
            Ok(Participant {
                sock,
                addr,
                creds: None,
            })
        })
        .collect()
}

/// What one measurement step sends.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    /// Distinguishes this step's packets from stragglers of earlier ones.
    pub step_id: u32,
    /// Packets per second of each publisher.
    pub rate_pps: f64,
    /// How long each publisher sends.
    pub duration: Duration,
    /// RTP packet size, header included.
    pub packet_len: usize,
}

impl StepPlan {
    /// Packets each publisher sends.
    pub fn packets_per_publisher(&self) -> u64 {
        (self.rate_pps * self.duration.as_secs_f64()).ceil() as u64
    }
}

/// Everything a step observed.
#[derive(Clone, Debug, Default)]
pub struct StepOutcome {
    /// Packets the kernel accepted from each member (0 for non-publishers).
    pub sent: Vec<u64>,
    /// Sends the kernel refused.
    pub send_failures: u64,
    /// First to last send, ns.
    pub send_duration_ns: u64,
    /// Packets that should have arrived: each sent packet times its room's subscribers.
    pub expected: u64,
    /// RTP packets of this step that arrived, duplicates included.
    pub delivered: u64,
    /// Distinct (stream, sequence) pairs that arrived.
    pub unique: u64,
    /// Extra copies.
    pub duplicates: u64,
    /// Late arrivals within a stream.
    pub reordered: u64,
    /// Packets that reached a member that should not get them (other room, the sender).
    pub misrouted: u64,
    /// Packets of an earlier step, and unparseable or out-of-range payloads.
    pub stale_or_invalid: u64,
    /// Non-RTP datagrams (STUN responses).
    pub other: u64,
    /// One-way latency of every delivered packet.
    pub latency: Latency,
}

impl StepOutcome {
    /// Expected packets that never arrived.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.unique)
    }
}

/// Connects every participant to the contender address `target(member)` picks for it.
pub fn connect(
    parts: &[Participant],
    target: impl Fn(usize) -> SocketAddrV4,
) -> anyhow::Result<()> {
    for (i, p) in parts.iter().enumerate() {
        p.sock.connect(target(i))?;
    }
    Ok(())
}

/// Runs one step: publishes per `plan` while receiving, then drains.
pub fn run_step(parts: &[Participant], topo: &Topology, plan: StepPlan) -> StepOutcome {
    let done_at = AtomicU64::new(0);
    std::thread::scope(|s| {
        let receiver = s.spawn(|| receive(parts, topo, plan, &done_at));
        let (sent, send_failures, send_duration_ns) = publish(parts, topo, plan);
        done_at.store(sys::now_ns(), Ordering::Release);
        let mut out = receiver.join().expect("receiver thread does not panic");
        out.expected = expected(topo, &sent);
        out.sent = sent;
        out.send_failures = send_failures;
        out.send_duration_ns = send_duration_ns;
        out
    })
}

fn expected(topo: &Topology, sent: &[u64]) -> u64 {
    let n = topo.members.len();
    (0..n)
        .flat_map(|s| (0..n).map(move |p| (s, p)))
        .filter(|&(s, p)| topo.should_receive(s, p))
        .map(|(_, p)| sent[p])
        .sum()
}

/// How many of `total` packets paced at `rate_pps` from `start_ns` are due at `now_ns`.
pub fn due(now_ns: u64, start_ns: u64, rate_pps: f64, total: u64) -> u64 {
    if now_ns < start_ns {
        return 0;
    }
    let elapsed_s = (now_ns - start_ns) as f64 / 1e9;
    ((elapsed_s * rate_pps) as u64 + 1).min(total)
}

/// Sends every publisher's packets on schedule. Publishers are spread evenly over one packet
/// interval so that many low-rate publishers do not fire in lockstep. Returns per-member sent
/// counts, refused sends, and the send duration.
fn publish(parts: &[Participant], topo: &Topology, plan: StepPlan) -> (Vec<u64>, u64, u64) {
    sys::set_timer_slack_ns(1_000);
    let pubs: Vec<usize> = topo.publishers().collect();
    let total = plan.packets_per_publisher();
    let interval_ns = 1e9 / plan.rate_pps;
    let start_ns = sys::now_ns() + 1_000_000;
    let phase: Vec<u64> = (0..pubs.len())
        .map(|k| start_ns + (k as f64 * interval_ns / pubs.len() as f64) as u64)
        .collect();
    let mut seq = vec![0u64; pubs.len()];
    let mut sent = vec![0u64; parts.len()];
    let (mut failures, mut last_send_ns) = (0, start_ns);
    let mut writer = PacketWriter::new(plan);
    let mut next_refresh_ns = 0;
    loop {
        let now = sys::now_ns();
        if now >= next_refresh_ns {
            refresh_bindings(parts, now);
            next_refresh_ns = now + REFRESH_NS;
        }
        let mut finished = true;
        for (k, &m) in pubs.iter().enumerate() {
            let due = due(now, phase[k], plan.rate_pps, total);
            while seq[k] < due {
                let n = (due - seq[k]).min(BATCH as u64) as usize;
                let ok = writer.send(&parts[m].sock, m, seq[k], n, now);
                sent[m] += ok as u64;
                failures += (n - ok) as u64;
                seq[k] += n as u64;
                last_send_ns = now;
            }
            finished &= seq[k] == total;
        }
        if finished {
            return (sent, failures, last_send_ns.saturating_sub(start_ns));
        }
        std::thread::sleep(TICK);
    }
}

/// Sends a fresh Binding request for every participant that has relay credentials. The
/// responses arrive at the receiver, which counts them as `other`.
fn refresh_bindings(parts: &[Participant], now_ns: u64) {
    let mut buf = [0u8; sys::MAX_DATAGRAM];
    // The counter only has to differ between refreshes; the clock in 100 ms units does that.
    let counter = (now_ns / 100_000_000) as u32 | 0x8000_0000;
    for p in parts {
        if let Some(creds) = &p.creds {
            let n = crate::join::binding_request(creds, counter, &mut buf);
            let _ = p.sock.send(&buf[..n]);
        }
    }
}

/// Builds stamped RTP packets into a reusable buffer and sends them in one sendmmsg.
struct PacketWriter {
    plan: StepPlan,
    bufs: Vec<u8>,
    filler: Vec<u8>,
    tx: SendBatch,
}

impl PacketWriter {
    fn new(plan: StepPlan) -> Self {
        let payload_len = plan.packet_len - proto::rtp::RTP_HEADER_LEN;
        assert!(payload_len >= STAMP_LEN, "packet too small for the stamp");
        Self {
            plan,
            bufs: vec![0; BATCH * plan.packet_len],
            filler: vec![0; payload_len],
            tx: SendBatch::default(),
        }
    }

    /// Sends packets `first_seq..first_seq + n` of `member`; returns how many the kernel took.
    fn send(
        &mut self,
        sock: &UdpSocket,
        member: usize,
        first_seq: u64,
        n: usize,
        now: u64,
    ) -> usize {
        let len = self.plan.packet_len;
        for (i, buf) in self.bufs.chunks_mut(len).take(n).enumerate() {
            let seq = first_seq + i as u64;
            let ssrc = member as u32 + 1;
            let ts = (seq as u32).wrapping_mul(960);
            proto::rtp::write_packet(buf, 96, seq as u16, ts, ssrc, false, &self.filler)
                .expect("buffer sized to the packet");
            let stamp = Stamp {
                seq,
                sent_ns: now,
                step_id: self.plan.step_id,
                publisher_idx: member as u32,
            };
            stamp
                .encode(&mut buf[proto::rtp::RTP_HEADER_LEN..])
                .expect("payload holds the stamp");
        }
        let msgs = self.bufs.chunks(len).take(n).map(|b| (b, None));
        self.tx.send(sock.as_raw_fd(), msgs).0
    }
}

/// Receives on every subscriber until the publisher is done and the contender has drained.
fn receive(
    parts: &[Participant],
    topo: &Topology,
    plan: StepPlan,
    done_at: &AtomicU64,
) -> StepOutcome {
    let mut epoll = Epoll::new(parts.len()).expect("epoll_create1 succeeds with free fds");
    for (i, p) in parts.iter().enumerate() {
        if topo.members[i].subscribes {
            epoll
                .add(p.sock.as_raw_fd(), i as u64)
                .expect("a fresh socket can be added to epoll");
        }
    }
    let mut acc = Accounting::new(topo, plan);
    let mut batch = RecvBatch::new(BATCH);
    let mut ready = Vec::with_capacity(parts.len());
    let mut last_rx_ns = sys::now_ns();
    loop {
        ready.clear();
        ready.extend(epoll.wait(10).expect("epoll_wait on a valid set"));
        for &i in &ready {
            let fd = parts[i as usize].sock.as_raw_fd();
            // Drain this socket in batches; a full batch means more may be queued.
            while let Ok(n @ 1..) = batch.recv(fd, libc::MSG_DONTWAIT) {
                let now = sys::now_ns();
                (0..n).for_each(|k| acc.handle_datagram(i as usize, batch.data(k), now));
                last_rx_ns = now;
                if n < BATCH {
                    break;
                }
            }
        }
        let done = done_at.load(Ordering::Acquire);
        let now = sys::now_ns();
        if done != 0
            && (now.saturating_sub(last_rx_ns.max(done)) > DRAIN_IDLE_NS
                || now - done > DRAIN_MAX_NS)
        {
            return acc.finish();
        }
    }
}

/// Per-stream bookkeeping of the receiver.
struct Accounting<'t> {
    topo: &'t Topology,
    plan: StepPlan,
    stride: usize,
    streams: Vec<Option<StreamTracker>>,
    out: StepOutcome,
}

impl<'t> Accounting<'t> {
    fn new(topo: &'t Topology, plan: StepPlan) -> Self {
        let stride = topo.max_room_size();
        Self {
            topo,
            plan,
            stride,
            streams: vec![None; topo.members.len() * stride],
            out: StepOutcome::default(),
        }
    }

    fn handle_datagram(&mut self, subscriber: usize, data: &[u8], now_ns: u64) {
        if proto::demux::classify(data) != proto::demux::PacketKind::Rtp {
            self.out.other += 1;
            return;
        }
        let stamp = proto::rtp::RtpPacket::parse(data)
            .ok()
            .and_then(|p| Stamp::decode(p.payload()));
        let Some(stamp) = stamp.filter(|s| s.step_id == self.plan.step_id) else {
            self.out.stale_or_invalid += 1;
            return;
        };
        let publisher = stamp.publisher_idx as usize;
        if publisher >= self.topo.members.len() || !self.topo.should_receive(subscriber, publisher)
        {
            self.out.misrouted += 1;
            return;
        }
        let slot = subscriber * self.stride + self.topo.members[publisher].position;
        let limit = self.plan.packets_per_publisher();
        self.streams[slot]
            .get_or_insert_with(|| StreamTracker::new(limit))
            .record(stamp.seq);
        self.out.delivered += 1;
        self.out.latency.record(stamp.sent_ns, now_ns);
    }

    fn finish(mut self) -> StepOutcome {
        for t in self.streams.iter().flatten() {
            self.out.unique += t.unique;
            self.out.duplicates += t.duplicates;
            self.out.reordered += t.reordered;
            self.out.stale_or_invalid += t.invalid;
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_is_due_one_per_interval_and_bounded() {
        let start = 1_000;
        assert_eq!(due(999, start, 1000.0, 10), 0);
        assert_eq!(
            due(start, start, 1000.0, 10),
            1,
            "first packet at the start"
        );
        assert_eq!(due(start + 999_999, start, 1000.0, 10), 1);
        assert_eq!(due(start + 1_000_000, start, 1000.0, 10), 2);
        assert_eq!(due(start + 60_000_000_000, start, 1000.0, 10), 10);
    }

    #[test]
    fn expected_counts_each_subscriber_of_each_publisher() {
        let f = Topology::fanout(10);
        let mut sent = vec![0; 11];
        sent[0] = 5;
        assert_eq!(expected(&f, &sent), 50);
        let r = Topology::rooms(2, 4);
        assert_eq!(expected(&r, &[1; 8]), 2 * 4 * 3);
    }

    #[test]
    fn a_loopback_step_through_an_echo_free_path_counts_everything_lost() {
        // Nobody forwards: every expected packet is lost, nothing is misattributed.
        let topo = Topology::fanout(2);
        let parts = bind_participants(3).unwrap();
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(sink_addr) = sink.local_addr().unwrap() else {
            unreachable!()
        };
        connect(&parts, |_| sink_addr).unwrap();
        let plan = StepPlan {
            step_id: 1,
            rate_pps: 1000.0,
            duration: Duration::from_millis(20),
            packet_len: 160,
        };
        let out = run_step(&parts, &topo, plan);
        assert_eq!(out.sent[0], 20);
        assert_eq!((out.expected, out.lost(), out.delivered), (40, 40, 0));
    }
}
