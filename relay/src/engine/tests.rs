//! Deterministic engine tests with virtual time.

use super::*;
use ed25519_dalek::SigningKey;
use proto::token::Claims;

const T0: Now = Now {
    mono_us: 1_000_000,
    unix_s: 1_700_000_000,
};

struct Fixture {
    key: SigningKey,
    shard: Shard,
    now: Now,
    /// The NONCE of the last STUN error answered, if it had one (a challenge).
    nonce: Option<Vec<u8>>,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Fixture {
    fn new(cfg: EngineConfig) -> Self {
        let key = SigningKey::from_bytes(&[9; 32]);
        let verifier = TokenVerifier::new(key.verifying_key(), 0);
        Self {
            shard: Shard::new(cfg, 0, verifier, T0),
            key,
            now: T0,
            nonce: None,
        }
    }

    fn token(&self, room: u64, participant: u64, permissions: Permissions) -> String {
        Claims {
            kind: TokenKind::Room,
            permissions,
            relay_id: 0,
            shard_idx: 0,
            expires_at: self.now.unix_s + 60,
            scope_id: room,
            participant_id: participant,
        }
        .sign_text(&self.key)
    }

    fn request(token: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        let key = proto::token::stun_key(token.as_bytes());
        let n = stun::write_binding_request(&mut buf, &[7; 12], token.as_bytes(), &key).unwrap();
        buf.truncate(n);
        buf
    }

    /// Binds `token` at `src` as a client does: a request, then (when the relay challenges a
    /// new address) the same request again with the cookie its 401 carried. Returns what
    /// [`Fixture::send`] returns for the last request.
    fn bind(&mut self, src: SocketAddr, token: &str) -> Result<Vec<u16>, String> {
        self.nonce = None;
        let first = self.send(src, &Self::request(token));
        match self.nonce.take() {
            Some(nonce) if first == Err("error 401".into()) => {
                self.send(src, &Self::request_with(token, Some(&nonce)))
            }
            _ => first,
        }
    }

    fn request_with(token: &str, nonce: Option<&[u8]>) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        let key = proto::token::stun_key(token.as_bytes());
        let n = stun::write_binding_request_with_nonce(
            &mut buf,
            &[7; 12],
            token.as_bytes(),
            nonce,
            &key,
        )
        .unwrap();
        buf.truncate(n);
        buf
    }

    /// Sends `data` from `src`; returns the forward list (sorted ports) or the verdict kind.
    fn send(&mut self, src: SocketAddr, data: &[u8]) -> Result<Vec<u16>, String> {
        let mut reply = [0u8; 512];
        let now = self.now;
        match self.shard.handle_datagram(now, src, data, &mut reply) {
            Verdict::Forward(d) => {
                let mut ports: Vec<u16> = d.iter().map(SocketAddr::port).collect();
                ports.sort_unstable();
                Ok(ports)
            }
            Verdict::Reply(n) => {
                assert!(n <= data.len(), "reply never larger than the request");
                let m = StunMessage::parse(&reply[..n]).expect("replies are valid STUN");
                match m.class() {
                    Class::Success => {
                        assert_eq!(m.xor_mapped_address(), Some(src));
                        Err("ok".into())
                    }
                    _ => {
                        self.nonce = m.attribute(stun::attr::NONCE).map(<[u8]>::to_vec);
                        Err(format!("error {}", m.error_code().unwrap().0))
                    }
                }
            }
            Verdict::Consumed => Err("consumed".into()),
            Verdict::Drop(r) => Err(r.as_str().into()),
        }
    }

    fn join(&mut self, port: u16, room: u64, participant: u64) {
        let t = self.token(
            room,
            participant,
            Permissions::PUBLISH | Permissions::SUBSCRIBE,
        );
        assert_eq!(self.bind(addr(port), &t), Err("ok".into()));
        self.shard.check_invariants();
    }
}

fn rtp(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut buf = vec![0u8; 200];
    let n = proto::rtp::write_packet(&mut buf, 96, seq, 0, ssrc, false, &[0xab; 100]).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn forwards_to_every_other_member_of_the_room_only() {
    let mut f = Fixture::new(EngineConfig::default());
    for (port, pid) in [(1, 1), (2, 2), (3, 3), (4, 4)] {
        f.join(port, 10, pid);
    }
    f.join(5, 20, 1); // another room, same participant id
    assert_eq!(f.send(addr(1), &rtp(111, 1)), Ok(vec![2, 3, 4]));
    assert_eq!(f.send(addr(5), &rtp(222, 1)), Err("no_route".into()));
    assert_eq!(f.shard.n_rooms(), 2);
    assert_eq!(f.shard.n_participants(), 5);
    assert_eq!(f.shard.counters().fwd_packets, 3);
}

#[test]
fn unbound_and_garbage_are_dropped_and_counted() {
    let mut f = Fixture::new(EngineConfig::default());
    assert_eq!(f.send(addr(9), &rtp(1, 1)), Err("unbound".into()));
    assert_eq!(f.send(addr(9), &[0x80, 200, 0, 1]), Err("unbound".into()));
    assert_eq!(f.send(addr(9), &[0xff; 30]), Err("malformed".into()));
    assert_eq!(f.send(addr(9), &[]), Err("malformed".into()));
    assert_eq!(f.send(addr(9), &[22; 40]), Err("dtls".into()));
    assert_eq!(f.shard.counters().dropped(DropReason::Unbound), 2);
}

#[test]
fn refuses_forged_expired_and_foreign_tokens_without_amplification() {
    let mut f = Fixture::new(EngineConfig::default());
    let forged = Claims {
        kind: TokenKind::Room,
        permissions: Permissions::ALL,
        relay_id: 0,
        shard_idx: 0,
        expires_at: f.now.unix_s + 60,
        scope_id: 10,
        participant_id: 1,
    };
    let other_key = SigningKey::from_bytes(&[1; 32]);
    let t = forged.sign_text(&other_key);
    assert_eq!(f.bind(addr(1), &t), Err("error 401".into()));
    let expired = Claims {
        expires_at: f.now.unix_s,
        ..forged
    }
    .sign_text(&f.key);
    assert_eq!(f.bind(addr(1), &expired), Err("error 401".into()));
    let other_shard = Claims {
        shard_idx: 1,
        ..forged
    }
    .sign_text(&f.key);
    assert_eq!(f.bind(addr(1), &other_shard), Err("error 403".into()));
    let chat = Claims {
        kind: TokenKind::User,
        ..forged
    }
    .sign_text(&f.key);
    assert_eq!(f.bind(addr(1), &chat), Err("error 403".into()));
    // A valid token with a wrong integrity key.
    let good = f.token(10, 1, Permissions::ALL);
    let mut buf = [0u8; 512];
    let n = stun::write_binding_request(&mut buf, &[1; 12], good.as_bytes(), b"wrong").unwrap();
    assert_eq!(f.send(addr(1), &buf[..n]), Err("error 401".into()));
    let nonce = f.nonce.take().expect("a new address is challenged first");
    let n = stun::write_binding_request_with_nonce(
        &mut buf,
        &[1; 12],
        good.as_bytes(),
        Some(&nonce),
        b"wrong",
    )
    .unwrap();
    assert_eq!(f.send(addr(1), &buf[..n]), Err("error 401".into()));
    assert!(
        f.nonce.is_none(),
        "a failed integrity check is no challenge"
    );
    // Nothing got bound, and nothing is forwarded from that address.
    assert_eq!(f.shard.n_participants(), 0);
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Err("unbound".into()));
    let c = f.shard.counters();
    assert_eq!(c.dropped(DropReason::BadToken), 1);
    assert_eq!(c.dropped(DropReason::ExpiredToken), 1);
    assert_eq!(c.dropped(DropReason::WrongScope), 2);
    assert_eq!(c.dropped(DropReason::BadIntegrity), 1);
}

#[test]
fn tiny_requests_get_no_reply_larger_than_themselves() {
    let mut f = Fixture::new(EngineConfig::default());
    let mut buf = [0u8; 64];
    // A bare Binding request without USERNAME: 20 bytes, the error would be larger.
    let n = stun::StunWriter::new(&mut buf, Class::Request, stun::METHOD_BINDING, &[3; 12])
        .unwrap()
        .finish();
    assert_eq!(f.send(addr(1), &buf[..n]), Err("reply_suppressed".into()));
    assert_eq!(f.shard.counters().dropped(DropReason::BadToken), 1);
}

#[test]
fn bindings_expire_unless_refreshed() {
    let cfg = EngineConfig {
        binding_ttl_us: 10_000_000,
        ..EngineConfig::default()
    };
    let mut f = Fixture::new(cfg);
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    let t1 = f.token(10, 1, Permissions::PUBLISH | Permissions::SUBSCRIBE);
    for _ in 0..5 {
        f.now.mono_us += 4_000_000;
        f.shard.handle_timeout(f.now);
        // Participant 1 refreshes; participant 2 stays silent.
        assert_eq!(f.bind(addr(1), &t1), Err("ok".into()));
        f.shard.check_invariants();
    }
    assert_eq!(f.shard.n_participants(), 1);
    assert_eq!(f.shard.counters().bindings_expired, 1);
    assert_eq!(f.send(addr(2), &rtp(5, 1)), Err("unbound".into()));
    assert_eq!(f.send(addr(1), &rtp(6, 1)), Err("no_route".into()));
    assert!(f.shard.poll_timeout() > f.now.mono_us);
}

#[test]
fn participant_moving_to_a_new_address_keeps_one_binding() {
    let mut f = Fixture::new(EngineConfig::default());
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    f.join(3, 10, 2); // participant 2 reconnects from port 3
    assert_eq!(f.shard.n_participants(), 2);
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Ok(vec![3]));
    assert_eq!(f.send(addr(2), &rtp(2, 1)), Err("unbound".into()));
}

#[test]
fn limits_rooms_participants_and_rates() {
    let cfg = EngineConfig {
        max_rooms: 2,
        max_participants_per_room: 2,
        participant_pps: 10,
        ..EngineConfig::default()
    };
    let mut f = Fixture::new(cfg);
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    let t = f.token(10, 3, Permissions::ALL);
    assert_eq!(f.bind(addr(3), &t), Err("error 403".into()));
    f.join(4, 20, 1);
    let t = f.token(30, 1, Permissions::ALL);
    assert_eq!(f.bind(addr(5), &t), Err("error 403".into()));
    assert_eq!(
        f.shard.n_rooms(),
        2,
        "a refused join leaves no empty room behind"
    );
    let sent: Vec<_> = (0..20).map(|i| f.send(addr(1), &rtp(1, i))).collect();
    assert_eq!(
        sent.iter().filter(|r| r.is_ok()).count(),
        10,
        "burst of 10 at 10 pps"
    );
    f.now.mono_us += 1_000_000;
    assert!(
        f.send(addr(1), &rtp(1, 99)).is_ok(),
        "refilled after a second"
    );
    let c = f.shard.counters();
    assert_eq!(c.dropped(DropReason::RoomLimit), 1);
    assert_eq!(c.dropped(DropReason::ParticipantLimit), 1);
    assert_eq!(c.dropped(DropReason::RateLimited), 10);
    f.shard.check_invariants();
}

#[test]
fn subscriber_without_publish_permission_cannot_send_media() {
    let mut f = Fixture::new(EngineConfig::default());
    f.join(1, 10, 1);
    let t = f.token(10, 2, Permissions::SUBSCRIBE);
    assert_eq!(f.bind(addr(2), &t), Err("ok".into()));
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Ok(vec![2]));
    assert_eq!(f.send(addr(2), &rtp(2, 1)), Err("not_permitted".into()));
}

#[test]
fn ssrc_owned_by_another_publisher_is_rejected() {
    let mut f = Fixture::new(EngineConfig::default());
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    assert!(f.send(addr(1), &rtp(7, 1)).is_ok());
    assert_eq!(f.send(addr(2), &rtp(7, 1)), Err("ssrc_rejected".into()));
    for ssrc in 100..107 {
        assert!(f.send(addr(1), &rtp(ssrc, 1)).is_ok());
    }
    assert_eq!(
        f.send(addr(1), &rtp(999, 1)),
        Err("ssrc_rejected".into()),
        "8 SSRCs at most"
    );
}

fn rtcp(write: impl FnOnce(&mut [u8]) -> Option<usize>) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let n = write(&mut buf).expect("fits");
    buf.truncate(n);
    buf
}

#[test]
fn rtcp_reports_and_feedback_reach_the_right_side() {
    use proto::rtcp;
    let mut f = Fixture::new(EngineConfig::default());
    for (port, pid) in [(1, 1), (2, 2), (3, 3)] {
        f.join(port, 10, pid);
    }
    assert!(f.send(addr(1), &rtp(1111, 1)).is_ok());
    let sr = rtcp(|b| rtcp::write_sr(b, 1111, 1, 2, 3, 4));
    assert_eq!(f.send(addr(1), &sr), Ok(vec![2, 3]));
    let pli = rtcp(|b| rtcp::write_pli(b, 2222, 1111));
    assert_eq!(f.send(addr(2), &pli), Ok(vec![1]));
    assert_eq!(
        f.send(addr(3), &pli),
        Err("pli_throttled".into()),
        "second PLI within 500 ms"
    );
    let nack = rtcp(|b| rtcp::write_nack(b, 2222, 1111, &[5, 6, 9]));
    assert_eq!(
        f.send(addr(2), &nack),
        Ok(vec![1]),
        "NACKs are never throttled"
    );
    f.now.mono_us += 600_000;
    let fir = rtcp(|b| rtcp::write_fir(b, 2222, &[(1111, 1)]));
    assert_eq!(f.send(addr(3), &fir), Ok(vec![1]));
    let unknown = rtcp(|b| rtcp::write_pli(b, 2222, 4242));
    assert_eq!(f.send(addr(2), &unknown), Err("no_route".into()));
    assert_eq!(f.send(addr(2), &[0x80, 201, 0, 9]), Err("malformed".into()));
}

#[test]
fn subscription_control_selects_publishers() {
    use proto::rtcp;
    let mut f = Fixture::new(EngineConfig::default());
    for (port, pid) in [(1, 1), (2, 2), (3, 3)] {
        f.join(port, 10, pid);
    }
    // Participant 3 receives only participant 2.
    let only = rtcp(|b| {
        rtcp::write_app(
            b,
            0,
            SUBSCRIBE_ONLY,
            SUBSCRIPTION_APP_NAME,
            &2u64.to_be_bytes(),
        )
    });
    assert_eq!(f.send(addr(3), &only), Err("consumed".into()));
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Ok(vec![2]));
    assert_eq!(f.send(addr(2), &rtp(2, 1)), Ok(vec![1, 3]));
    let all = rtcp(|b| rtcp::write_app(b, 0, SUBSCRIBE_ALL, SUBSCRIPTION_APP_NAME, &[]));
    assert_eq!(f.send(addr(3), &all), Err("consumed".into()));
    assert_eq!(f.send(addr(1), &rtp(1, 2)), Ok(vec![2, 3]));
    assert!(f.shard.remove_participant(10, 2));
    assert_eq!(f.send(addr(1), &rtp(1, 3)), Ok(vec![3]));
    assert_eq!(f.send(addr(2), &rtp(2, 2)), Err("unbound".into()));
}

/// Issue 17 item 5: each subscription change rebuilds the room's fan-out lists (O(n²)), so a
/// participant's flood of them (up to its 5,000 packets a second) is cut to
/// `SUBSCRIPTION_CHANGES_PER_S`: the rest are dropped as rate-limited, and media still flows.
#[test]
fn a_flood_of_subscription_changes_costs_a_few_rebuilds() {
    use proto::rtcp;
    let mut f = Fixture::new(EngineConfig::default());
    for (port, pid) in [(1, 1), (2, 2), (3, 3)] {
        f.join(port, 10, pid);
    }
    let all = rtcp(|b| rtcp::write_app(b, 0, SUBSCRIBE_ALL, SUBSCRIPTION_APP_NAME, &[]));
    let limit = rtcp_route::SUBSCRIPTION_CHANGES_PER_S;
    let (mut consumed, mut limited) = (0, 0);
    for _ in 0..1_000 {
        match f.send(addr(3), &all) {
            Err(e) if e == "consumed" => consumed += 1,
            Err(e) if e == "rate_limited" => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((consumed, limited), (limit, 1_000 - limit));
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Ok(vec![2, 3]));
    // A second later the participant may change its subscription again.
    f.now.mono_us += 1_000_000;
    assert_eq!(f.send(addr(3), &all), Err("consumed".into()));
}

/// Random datagrams from bound and unbound sources never panic, never amplify, and keep the
/// engine's invariants. Replays from its seed.
#[test]
fn random_datagrams_keep_invariants() {
    let mut f = Fixture::new(EngineConfig::default());
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    let valid = Fixture::request(&f.token(10, 3, Permissions::ALL));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut reply = [0u8; 512];
    for _ in 0..20_000 {
        let len = (next() % 300) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        match next() % 4 {
            0 if !data.is_empty() => data[0] = 0x80,
            1 if !data.is_empty() => data[0] = 0,
            2 => {
                // A valid request with one flipped byte.
                data = valid.clone();
                let i = (next() as usize) % data.len();
                data[i] ^= 1 << (next() % 8);
            }
            _ => {}
        }
        let src = addr((next() % 4) as u16 + 1);
        let now = f.now;
        if let Verdict::Reply(n) = f.shard.handle_datagram(now, src, &data, &mut reply) {
            assert!(n <= data.len());
        }
        f.now.mono_us += 100;
    }
    f.shard.check_invariants();
    assert!(f.shard.n_participants() >= 2);
}

#[test]
fn commands_remove_close_and_drain() {
    let mut f = Fixture::new(EngineConfig::default());
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    f.join(3, 10, 3);
    f.join(4, 20, 1);
    f.shard.handle_command(Command::RemoveParticipant {
        room: 10,
        participant: 3,
    });
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Ok(vec![2]));
    f.shard
        .handle_command(Command::CloseRoom { room: 10, fence: 0 });
    assert_eq!(f.send(addr(1), &rtp(1, 2)), Err("unbound".into()));
    assert_eq!((f.shard.n_rooms(), f.shard.n_participants()), (1, 1));
    f.shard.handle_command(Command::SetDraining(true));
    let t = f.token(30, 1, Permissions::ALL);
    assert_eq!(f.bind(addr(5), &t), Err("error 403".into()), "no new rooms");
    f.join(6, 20, 2); // existing rooms still take participants
    f.shard.handle_command(Command::SetDraining(false));
    f.join(5, 30, 1);
    f.shard.check_invariants();
}

/// Fencing: a shard whose lease from ctl lapsed takes no new participant and no new room
/// (ctl may have moved the room), but keeps its participants: their refreshes, a NAT
/// rebinding and their media go on. A renewed lease lifts it.
#[test]
fn without_a_lease_a_shard_takes_no_new_join_but_keeps_its_participants() {
    let mut f = Fixture::new(EngineConfig::default());
    let both = Permissions::PUBLISH | Permissions::SUBSCRIBE;
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    let until_us = f.now.mono_us + 1_000_000;
    f.shard.handle_command(Command::Lease { until_us });
    f.join(3, 10, 3);
    f.now.mono_us = until_us;
    let t4 = f.token(10, 4, both);
    assert_eq!(
        f.bind(addr(4), &t4),
        Err("error 503".into()),
        "no new participant"
    );
    let t5 = f.token(30, 1, both);
    assert_eq!(f.bind(addr(5), &t5), Err("error 503".into()), "no new room");
    assert_eq!(
        f.shard.counters().drops[DropReason::RoomLimit as usize],
        2,
        "counted as a limit"
    );
    let t1 = f.token(10, 1, both);
    assert_eq!(f.bind(addr(1), &t1), Err("ok".into()), "a refresh");
    let t2 = f.token(10, 2, both);
    assert_eq!(f.bind(addr(7), &t2), Err("ok".into()), "a NAT rebinding");
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Ok(vec![3, 7]));
    // An older grant arriving late does not shorten the lease; a new one lifts the fence.
    f.shard.handle_command(Command::Lease { until_us: 5 });
    f.shard.handle_command(Command::Lease {
        until_us: f.now.mono_us + 1_000_000,
    });
    f.join(4, 10, 4);
    f.shard.check_invariants();
}

#[test]
fn removed_participants_and_closed_rooms_cannot_bind_again_with_their_tokens() {
    let mut f = Fixture::new(EngineConfig::default());
    f.join(1, 10, 1);
    f.join(2, 10, 2);
    f.join(3, 20, 1);
    let t2 = f.token(10, 2, Permissions::PUBLISH | Permissions::SUBSCRIBE);
    f.shard.handle_command(Command::RemoveParticipant {
        room: 10,
        participant: 2,
    });
    assert_eq!(
        f.bind(addr(2), &t2),
        Err("error 403".into()),
        "no way back in"
    );
    assert_eq!(f.send(addr(1), &rtp(1, 1)), Err("no_route".into()));
    let t = f.token(20, 5, Permissions::ALL);
    let fence = f.now.unix_s + 60;
    f.shard
        .handle_command(Command::CloseRoom { room: 20, fence });
    assert_eq!(
        f.bind(addr(5), &t),
        Err("error 403".into()),
        "a closed room refuses a token issued before it closed, even one never seen here"
    );
    // The room comes back here later (its other relay died): ctl's fresh tokens expire after
    // the fence and bind, while the old ones stay refused.
    f.now.unix_s += 5;
    f.now.mono_us += 5_000_000;
    f.shard.handle_timeout(f.now);
    let fresh = f.token(20, 6, Permissions::ALL);
    assert!(fresh != t);
    assert_eq!(
        f.bind(addr(6), &fresh),
        Err("ok".into()),
        "a token issued after the close binds"
    );
    assert_eq!(
        f.bind(addr(5), &t),
        Err("error 403".into()),
        "the old one is still refused"
    );
    // Once the refused tokens would have expired anyway, the ids are free again.
    f.now.unix_s += 61;
    f.now.mono_us += 1_000_000;
    f.shard.handle_timeout(f.now);
    f.join(2, 10, 2);
    f.shard.check_invariants();
}

/// A refused Binding names who is to blame: a peer's fault is a 4xx that tells the client what
/// to fix (a new token, another shard); a limit is never a 401, so that a client at a full room
/// or a busy shard does not fetch tokens in a loop.
#[test]
fn bind_refusals_blame_the_peer_or_a_limit() {
    use super::BindRefusal::*;
    let all = [
        NoUsername,
        BadToken,
        BadIntegrity,
        Expired,
        WrongRelay,
        WrongShard,
        Removed,
        RateLimited,
        RoomFull,
        ShardFull,
        Draining,
    ];
    for r in all {
        let (code, text) = r.stun_error();
        assert!(!text.is_empty());
        if r.peer_fault() {
            assert!((400..500).contains(&code), "{r:?}: {code}");
        } else {
            assert!(matches!(code, 403 | 503), "{r:?}: {code}");
            assert!(matches!(
                r.drop_reason(),
                DropReason::RateLimited | DropReason::ParticipantLimit | DropReason::RoomLimit
            ));
        }
    }
}

/// Issue 17 item 1: a Binding request whose source address never proved it receives (a
/// spoofed one) binds nothing and puts that address in no fan-out: the relay answers a new
/// address with a 401 carrying a cookie only that address receives, and binds only a request
/// that echoes it. Another address's cookie, or one from two windows ago, is refused (438
/// with a fresh one). The challenge is never larger than the request.
#[test]
fn a_new_address_must_echo_its_cookie_before_it_receives_anything() {
    let mut f = Fixture::new(EngineConfig::default());
    f.join(1, 10, 1); // a publisher
    let t = f.token(10, 2, Permissions::ALL);
    // The spoofer's request "from" the victim (port 2): a challenge, no binding.
    assert_eq!(
        f.send(addr(2), &Fixture::request(&t)),
        Err("error 401".into())
    );
    let victims_cookie = f.nonce.take().expect("the challenge carries a cookie");
    assert_eq!(f.shard.n_participants(), 1);
    assert_eq!(f.send(addr(1), &rtp(111, 1)), Err("no_route".into()));
    // The spoofer's own address gets its own cookie, which is worth nothing for the victim's.
    assert_eq!(
        f.send(addr(3), &Fixture::request(&t)),
        Err("error 401".into())
    );
    let own = f.nonce.take().unwrap();
    assert_ne!(own, victims_cookie);
    let replayed = Fixture::request_with(&t, Some(&own));
    assert_eq!(f.send(addr(2), &replayed), Err("error 438".into()));
    assert!(
        f.nonce.take().is_some(),
        "438 carries the address's fresh cookie"
    );
    assert_eq!(f.shard.n_participants(), 1);
    assert_eq!(f.send(addr(1), &rtp(111, 2)), Err("no_route".into()));
    // The victim's own cookie binds (whoever holds it received it at that address).
    assert_eq!(
        f.send(addr(2), &Fixture::request_with(&t, Some(&victims_cookie))),
        Err("ok".into())
    );
    assert_eq!(f.send(addr(1), &rtp(111, 3)), Ok(vec![2]));
    // A cookie lives for its window and the next: two windows on, it is stale.
    let t3 = f.token(10, 3, Permissions::ALL);
    assert_eq!(
        f.send(addr(4), &Fixture::request(&t3)),
        Err("error 401".into())
    );
    let cookie = f.nonce.take().unwrap();
    f.now.mono_us += 2 * COOKIE_WINDOW_US;
    f.now.unix_s += 2 * COOKIE_WINDOW_US / 1_000_000;
    let stale = Fixture::request_with(&t3, Some(&cookie));
    assert_eq!(f.send(addr(4), &stale), Err("error 438".into()));
    // (The cookie is the address's: a token made now, t3's having run out, uses it.)
    let fresh = f.nonce.take().unwrap();
    let t3 = f.token(10, 3, Permissions::ALL);
    let again = Fixture::request_with(&t3, Some(&fresh));
    assert_eq!(f.send(addr(4), &again), Err("ok".into()));
    // The publisher's, the victim's, the spoofer's, the replay, t3's and its stale one.
    assert_eq!(f.shard.counters().challenges, 6);
    f.shard.check_invariants();
}

/// Issue 17 item 5: spoofed Binding requests cost the shard's signature budget nothing. A
/// flood of 50,000 requests with valid tokens from never-seen addresses (as a spoofer sends
/// them) is answered with challenges, and a legitimate client binds at once afterwards,
/// while the budget (`new_binding_rate`, 2,000 a second) would have refused it before.
#[test]
fn a_spoofed_flood_does_not_spend_the_binding_budget() {
    let mut f = Fixture::new(EngineConfig::default());
    let t = f.token(10, 9, Permissions::ALL);
    let req = Fixture::request(&t);
    let mut reply = [0u8; 512];
    for i in 0..50_000u32 {
        let src = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 5000));
        let now = f.now;
        let v = f.shard.handle_datagram(now, src, &req, &mut reply);
        assert!(
            matches!(v, Verdict::Reply(n) if n < req.len()),
            "challenged"
        );
    }
    assert_eq!(f.shard.n_participants(), 0);
    assert_eq!(f.shard.counters().dropped(DropReason::RateLimited), 0);
    assert_eq!(
        f.bind(addr(7), &f.token(20, 1, Permissions::ALL)),
        Err("ok".into())
    );
    assert_eq!(f.shard.n_participants(), 1);
}
