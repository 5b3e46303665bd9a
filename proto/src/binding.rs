//! The client side of a media binding (PROTOCOL.md section 3), sans-IO: when to send a Binding
//! request, what its answer means, and when the binding is due for a refresh.
//!
//! A relay forgets a binding that was not refreshed within its TTL (30 s by default), so a
//! client that binds once stops receiving after that long. [`Binding`] keeps one alive: it asks
//! for a request when the binding is new, every `ttl / 3` after the last success (the period
//! PROTOCOL.md asks for, which leaves two more tries before the relay gives up on it), and again
//! every [`RETRANSMIT_US`] while a request is unanswered. Time is an argument (monotonic
//! microseconds); the caller owns the socket:
//!
//! ```
//! # use proto::binding::Binding;
//! # let (token, key) = ("t", [0u8; 20]);
//! let mut b = Binding::new(token.as_bytes(), &key, 7, 30_000_000);
//! let mut buf = [0u8; 512];
//! let now = 0;
//! if let Some(n) = b.poll_transmit(now, &mut buf) {
//!     // sock.send(&buf[..n])
//! #   assert!(n > 0);
//! }
//! // on every STUN datagram received: b.handle_response(now, datagram)
//! // sleep at most until b.poll_timeout()
//! # assert_eq!(b.poll_timeout(), now + proto::binding::RETRANSMIT_US);
//! ```

use crate::stun::{self, Class, StunMessage};

/// How long an unanswered request waits before it is sent again.
pub const RETRANSMIT_US: u64 = 500_000;

/// What an answer to one of our requests said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The relay bound (or refreshed) the binding.
    Bound,
    /// The relay refused with this STUN error code (PROTOCOL.md section 3: 401 for an expired
    /// or bad token, 403 for a wrong scope or a full room, 503 to retry later).
    Refused(u16),
    /// The relay asked for its return-routability cookie (401 or 438 with a NONCE): the
    /// request goes again at once with it.
    Challenged,
}

/// The longest NONCE a relay may hand out that a client keeps.
const MAX_NONCE: usize = 64;

/// One binding's refresh schedule and its outstanding transaction.
#[derive(Clone, Debug)]
pub struct Binding {
    token: Vec<u8>,
    key: [u8; 20],
    refresh_every_us: u64,
    /// The transaction id of the request in flight; its last 4 bytes count requests.
    txid: [u8; 12],
    /// Whether `txid` is waiting for an answer.
    outstanding: bool,
    /// When the next request is due.
    next_us: u64,
    /// When the relay last confirmed the binding.
    bound_at_us: Option<u64>,
    /// Requests sent so far.
    sent: u32,
    /// The relay's return-routability cookie for our address, echoed in every request.
    nonce: Option<Vec<u8>>,
    /// Whether the last answer was a challenge (a second one in a row waits a retransmit).
    challenged: bool,
}

impl Binding {
    /// A binding for `token` (its text; `key` is `token::stun_key` of it), to a relay whose
    /// TTL is `ttl_us`. `id` makes transaction ids unique across a client's bindings (a
    /// participant id will do). The first request is due at once.
    pub fn new(token: &[u8], key: &[u8; 20], id: u64, ttl_us: u64) -> Self {
        let mut txid = [0u8; 12];
        txid[..8].copy_from_slice(&id.to_le_bytes());
        Self {
            token: token.to_vec(),
            key: *key,
            refresh_every_us: (ttl_us / 3).max(1),
            txid,
            outstanding: false,
            next_us: 0,
            bound_at_us: None,
            sent: 0,
            nonce: None,
            challenged: false,
        }
    }

    /// Replaces the token (a renewed one, PROTOCOL.md section 3) and asks for a request with
    /// it at once. A request in flight with the old token is forgotten.
    pub fn set_token(&mut self, token: &[u8], key: &[u8; 20]) {
        self.token = token.to_vec();
        self.key = *key;
        self.outstanding = false;
        self.next_us = 0;
    }

    /// When [`Binding::poll_transmit`] has something to send next.
    pub fn poll_timeout(&self) -> u64 {
        self.next_us
    }

    /// Writes a Binding request into `buf` if one is due at `now_us`; returns its length.
    /// `buf` must hold a request with the token (512 bytes hold one with a 134-byte token).
    pub fn poll_transmit(&mut self, now_us: u64, buf: &mut [u8]) -> Option<usize> {
        if now_us < self.next_us {
            return None;
        }
        self.txid[8..].copy_from_slice(&self.sent.to_le_bytes());
        let nonce = self.nonce.as_deref();
        let n =
            stun::write_binding_request_with_nonce(buf, &self.txid, &self.token, nonce, &self.key)
                .ok()?;
        self.sent = self.sent.wrapping_add(1);
        self.outstanding = true;
        self.next_us = now_us + RETRANSMIT_US;
        Some(n)
    }

    /// Handles a datagram that may answer our request. Anything else (another transaction,
    /// an answer without our integrity, not STUN at all) is ignored and gives `None`.
    pub fn handle_response(&mut self, now_us: u64, datagram: &[u8]) -> Option<Answer> {
        let msg = StunMessage::parse(datagram).ok()?;
        if !self.outstanding
            || msg.method() != stun::METHOD_BINDING
            || msg.transaction_id() != &self.txid
        {
            return None;
        }
        let answer = match msg.class() {
            Class::Success => {
                // A success must prove the relay knows the key; an error cannot (the relay
                // answers errors before it trusts the token), so it only ends the transaction.
                msg.verify_integrity(&self.key).ok()?;
                self.challenged = false;
                self.bound_at_us = Some(now_us);
                self.next_us = now_us + self.refresh_every_us;
                Answer::Bound
            }
            Class::Error => {
                let code = msg.error_code().map_or(0, |(c, _)| c);
                let nonce = msg
                    .attribute(stun::attr::NONCE)
                    .filter(|n| !n.is_empty() && n.len() <= MAX_NONCE);
                if let (401 | 438, Some(n)) = (code, nonce) {
                    // Our address proved: ask again at once with the cookie (after a second
                    // challenge in a row, a retransmit period later).
                    self.nonce = Some(n.to_vec());
                    self.next_us = if self.challenged {
                        now_us + RETRANSMIT_US
                    } else {
                        now_us
                    };
                    self.challenged = true;
                    self.outstanding = false;
                    return Some(Answer::Challenged);
                }
                self.challenged = false;
                // 503 asks us to come back later; the others will not change by retrying
                // soon, so wait a refresh period (a renewed token asks again at once).
                self.next_us = now_us
                    + if code == 503 {
                        RETRANSMIT_US
                    } else {
                        self.refresh_every_us
                    };
                Answer::Refused(code)
            }
            _ => return None,
        };
        self.outstanding = false;
        Some(answer)
    }

    /// When the relay last confirmed the binding, if it ever did.
    pub fn bound_at(&self) -> Option<u64> {
        self.bound_at_us
    }

    /// Binding requests sent so far (first ones, refreshes and retransmissions).
    pub fn requests_sent(&self) -> u32 {
        self.sent
    }
}

/// Binds `token` at `relay` from `sock` once, blocking until the relay confirms (a challenge
/// and the request again with its cookie included) or refuses, or `within` passes: for tools
/// and tests that need a binding and nothing more. Other datagrams arriving meanwhile are
/// dropped. `sock` must be connected to `relay` or bound so that `send_to` reaches it.
pub fn bind_blocking(
    sock: &std::net::UdpSocket,
    relay: std::net::SocketAddr,
    token: &str,
    within: std::time::Duration,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    let now = || start.elapsed().as_micros() as u64;
    let key = crate::token::stun_key(token.as_bytes());
    let mut b = Binding::new(token.as_bytes(), &key, 1, 30_000_000);
    let (mut out, mut buf) = ([0u8; 512], [0u8; 1500]);
    let old_timeout = sock.read_timeout().map_err(|e| e.to_string())?;
    let result = loop {
        if start.elapsed() >= within {
            break Err(format!(
                "no answer to the binding from {relay} in {within:?}"
            ));
        }
        if let Some(n) = b.poll_transmit(now(), &mut out) {
            sock.send_to(&out[..n], relay).map_err(|e| e.to_string())?;
        }
        let wait = b.poll_timeout().saturating_sub(now()).clamp(1_000, 100_000);
        sock.set_read_timeout(Some(std::time::Duration::from_micros(wait)))
            .map_err(|e| e.to_string())?;
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        match b.handle_response(now(), &buf[..n]) {
            Some(Answer::Bound) => break Ok(()),
            Some(Answer::Refused(code)) => break Err(format!("the relay refused with {code}")),
            Some(Answer::Challenged) | None => {}
        }
    };
    sock.set_read_timeout(old_timeout)
        .map_err(|e| e.to_string())?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::StunWriter;

    const TTL: u64 = 30_000_000;
    const KEY: [u8; 20] = [3; 20];

    /// The relay's answer to `request`: success with integrity under `key`, or an error.
    fn answer(request: &[u8], key: &[u8], error: Option<u16>) -> Vec<u8> {
        let req = StunMessage::parse(request).unwrap();
        let mut out = vec![0u8; 512];
        let class = if error.is_some() {
            Class::Error
        } else {
            Class::Success
        };
        let mut w =
            StunWriter::new(&mut out, class, stun::METHOD_BINDING, req.transaction_id()).unwrap();
        match error {
            Some(code) => {
                w.error_code(code, "no").unwrap();
                let n = w.finish();
                out.truncate(n);
            }
            None => {
                w.xor_mapped_address("127.0.0.1:5000".parse().unwrap())
                    .unwrap();
                w.integrity(key).unwrap();
                let n = w.finish_with_fingerprint().unwrap();
                out.truncate(n);
            }
        }
        out
    }

    #[test]
    fn refreshes_every_third_of_the_ttl_after_each_success() {
        let mut b = Binding::new(b"token", &KEY, 1, TTL);
        let mut buf = [0u8; 512];
        let n = b
            .poll_transmit(0, &mut buf)
            .expect("the first request is due at once");
        assert_eq!(b.poll_transmit(1, &mut buf), None, "one request at a time");
        let ok = answer(&buf[..n], &KEY, None);
        assert_eq!(b.handle_response(2_000, &ok), Some(Answer::Bound));
        assert_eq!(b.bound_at(), Some(2_000));
        assert_eq!(b.poll_timeout(), 2_000 + TTL / 3);
        assert_eq!(b.poll_transmit(2_000 + TTL / 3 - 1, &mut buf), None);
        // Over a long session the binding is refreshed well within every TTL.
        let mut now = 2_000;
        for _ in 0..100 {
            now = b.poll_timeout();
            let n = b.poll_transmit(now, &mut buf).expect("due");
            let ok = answer(&buf[..n], &KEY, None);
            assert_eq!(b.handle_response(now + 500, &ok), Some(Answer::Bound));
            assert!(b.poll_timeout() - b.bound_at().unwrap() < TTL);
        }
        assert!(
            now > 100 * TTL / 3,
            "100 refreshes cover 100 thirds of the TTL"
        );
        assert_eq!(b.requests_sent(), 101);
    }

    #[test]
    fn an_unanswered_request_is_sent_again_with_a_new_transaction() {
        let mut b = Binding::new(b"token", &KEY, 1, TTL);
        let mut first = [0u8; 512];
        let n = b.poll_transmit(0, &mut first).unwrap();
        let mut second = [0u8; 512];
        assert_eq!(b.poll_transmit(RETRANSMIT_US - 1, &mut second), None);
        let m = b
            .poll_transmit(RETRANSMIT_US, &mut second)
            .expect("retransmitted");
        let (t1, t2) = (
            *StunMessage::parse(&first[..n]).unwrap().transaction_id(),
            *StunMessage::parse(&second[..m]).unwrap().transaction_id(),
        );
        assert_ne!(t1, t2);
        // A late answer to the first one is not ours any more.
        assert_eq!(
            b.handle_response(RETRANSMIT_US + 1, &answer(&first[..n], &KEY, None)),
            None
        );
        assert_eq!(
            b.handle_response(RETRANSMIT_US + 2, &answer(&second[..m], &KEY, None)),
            Some(Answer::Bound)
        );
    }

    #[test]
    fn a_success_without_our_key_and_foreign_datagrams_are_ignored() {
        let mut b = Binding::new(b"token", &KEY, 1, TTL);
        let mut buf = [0u8; 512];
        let n = b.poll_transmit(0, &mut buf).unwrap();
        assert_eq!(
            b.handle_response(1, &answer(&buf[..n], &[9; 20], None)),
            None
        );
        assert_eq!(b.handle_response(1, &[0x80, 96, 0, 1]), None, "RTP");
        assert_eq!(b.handle_response(1, &[]), None);
        assert_eq!(b.bound_at(), None);
        assert_eq!(
            b.handle_response(2, &answer(&buf[..n], &KEY, None)),
            Some(Answer::Bound)
        );
    }

    #[test]
    fn refusals_end_the_transaction_and_a_renewed_token_asks_at_once() {
        let mut b = Binding::new(b"token", &KEY, 1, TTL);
        let mut buf = [0u8; 512];
        let n = b.poll_transmit(0, &mut buf).unwrap();
        assert_eq!(
            b.handle_response(10, &answer(&buf[..n], &KEY, Some(503))),
            Some(Answer::Refused(503))
        );
        assert_eq!(b.poll_timeout(), 10 + RETRANSMIT_US, "503: retry soon");
        let n = b.poll_transmit(b.poll_timeout(), &mut buf).unwrap();
        let at = RETRANSMIT_US + 20;
        assert_eq!(
            b.handle_response(at, &answer(&buf[..n], &KEY, Some(401))),
            Some(Answer::Refused(401))
        );
        assert_eq!(b.poll_timeout(), at + TTL / 3, "401: not again soon");
        b.set_token(b"renewed", &[4; 20]);
        let n = b
            .poll_transmit(at + 1, &mut buf)
            .expect("a new token is sent at once");
        let req = StunMessage::parse(&buf[..n]).unwrap();
        assert_eq!(req.username(), Some(&b"renewed"[..]));
        req.verify_integrity(&[4; 20]).unwrap();
    }
}
