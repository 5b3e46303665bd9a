//! Sign-in by phone number (DESIGN.md section 9; ctl/API.md, "Accounts"): verification
//! sessions with one-time codes, and the limits that keep them from being guessed or used to
//! pump SMS. Sans-IO: time comes in as [`Instant`]s, randomness as arguments, and the codes to
//! send go out as [`Sms`] values for the server to hand to a gateway.
//!
//! Numbers (all in ctl/API.md):
//! - a code is 6 random digits, valid for [`CODE_TTL`] after it was sent;
//! - a number's codes go out at most on Signal's schedule: the first at once, then after 1, 2,
//!   5 and 10 minutes ([`RESEND_WAIT`]), then every 10 minutes; per number, not per session, so
//!   that new sessions do not reset it;
//! - a session takes [`CHECKS_PER_SESSION`] wrong codes, then is gone;
//! - a number takes [`FAILS_PER_NUMBER`] wrong codes per hour over all its sessions, then is
//!   locked for [`LOCKOUT`]; a client address takes [`FAILS_PER_ADDRESS`] per hour;
//! - at most [`MAX_SESSIONS`] sessions and [`MAX_TRACKED`] numbers and addresses are held;
//!   sessions end [`SESSION_TTL`] after they were made.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub const CODE_TTL: Duration = Duration::from_secs(10 * 60);
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// Wait before the n-th code to one number (n = 0, 1, ...); the last repeats.
pub const RESEND_WAIT: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(600),
];
pub const CHECKS_PER_SESSION: u32 = 5;
pub const FAILS_PER_NUMBER: u32 = 10;
pub const FAILS_PER_ADDRESS: u32 = 30;
pub const LOCKOUT: Duration = Duration::from_secs(60 * 60);
const WINDOW: Duration = Duration::from_secs(60 * 60);
pub const MAX_SESSIONS: usize = 100_000;
pub const MAX_TRACKED: usize = 200_000;

/// A code to send, for the server to hand to the SMS gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sms {
    pub to: String,
    pub body: String,
}

/// Why a verification step was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid phone number (with why).
    InvalidNumber(String),
    /// No such session (never made, ended, or used up).
    UnknownSession,
    /// Too early, or too many: retry after this many seconds.
    RetryAfter(u64),
    /// The code does not match (this many checks left in the session).
    WrongCode(u32),
    /// The session's code has expired: ask for a new one.
    CodeExpired,
    /// Too many sessions or numbers held right now.
    Full,
}

struct Session {
    number: String,
    code: [u8; 6],
    code_until: Instant,
    ends: Instant,
    checks_left: u32,
}

/// Failures counted in a fixed one-hour window that starts at the first failure.
#[derive(Clone, Copy)]
struct Window {
    since: Instant,
    fails: u32,
}

impl Window {
    fn count(w: &mut Option<Window>, now: Instant) -> u32 {
        let cur = w.get_or_insert(Window {
            since: now,
            fails: 0,
        });
        if now.duration_since(cur.since) >= WINDOW {
            *cur = Window {
                since: now,
                fails: 0,
            };
        }
        cur.fails += 1;
        cur.fails
    }
}

#[derive(Default)]
struct NumberState {
    /// Codes sent so far (for the schedule), and when the next may go.
    sent: usize,
    next_send: Option<Instant>,
    fails: Option<Window>,
    locked_until: Option<Instant>,
    /// When this record may be forgotten.
    last_used: Option<Instant>,
}

/// Normalises `input` to E.164 (`+` and digits), or says why it is not a number. A number
/// without a `+` country code is refused: ctl does not guess a region.
pub fn normalize(input: &str) -> Result<String, Refusal> {
    let bad = |why: &str| Refusal::InvalidNumber(why.to_string());
    if input.len() > 64 {
        return Err(bad("longer than 64 characters"));
    }
    if !input.trim_start().starts_with('+') {
        return Err(bad(
            "give the number with its country code, starting with +",
        ));
    }
    let n = phonenumber::parse(None, input).map_err(|e| bad(&e.to_string()))?;
    if !phonenumber::is_valid(&n) {
        return Err(bad("not a valid number for its country"));
    }
    Ok(n.format().mode(phonenumber::Mode::E164).to_string())
}

/// Verification sessions and their limits.
#[derive(Default)]
pub struct Verifier {
    sessions: HashMap<String, Session>,
    numbers: HashMap<String, NumberState>,
    addresses: HashMap<IpAddr, Option<Window>>,
}

impl Verifier {
    /// A new session for `number` (E.164), with id `id` and first code `code` (both random,
    /// from the caller); the code to send if the number's schedule allows one now, else the
    /// session waits for [`Verifier::resend`].
    pub fn start(
        &mut self,
        now: Instant,
        number: &str,
        id: String,
        code: [u8; 6],
    ) -> Result<(Option<Sms>, u64), Refusal> {
        self.sweep(now);
        if self.sessions.len() >= MAX_SESSIONS || self.numbers.len() >= MAX_TRACKED {
            return Err(Refusal::Full);
        }
        let st = self.numbers.entry(number.to_string()).or_default();
        if let Some(until) = st.locked_until.filter(|&u| now < u) {
            return Err(Refusal::RetryAfter(secs(until - now)));
        }
        st.last_used = Some(now);
        self.sessions.insert(
            id.clone(),
            Session {
                number: number.to_string(),
                code,
                code_until: now,
                ends: now + SESSION_TTL,
                checks_left: CHECKS_PER_SESSION,
            },
        );
        let sms = self.send(now, &id).ok();
        let wait = self.next_send_in(now, number);
        Ok((sms, wait))
    }

    /// Sends session `id` a new code `code`, if its number's schedule allows it now.
    pub fn resend(&mut self, now: Instant, id: &str, code: [u8; 6]) -> Result<(Sms, u64), Refusal> {
        let s = self
            .sessions
            .get_mut(id)
            .filter(|s| now < s.ends)
            .ok_or(Refusal::UnknownSession)?;
        let old = std::mem::replace(&mut s.code, code);
        let number = s.number.clone();
        match self.send(now, id) {
            Ok(sms) => Ok((sms, self.next_send_in(now, &number))),
            Err(e) => {
                if let Some(s) = self.sessions.get_mut(id) {
                    s.code = old;
                }
                Err(e)
            }
        }
    }

    /// The session's current code, sent now if the number's schedule allows.
    fn send(&mut self, now: Instant, id: &str) -> Result<Sms, Refusal> {
        let s = self.sessions.get_mut(id).ok_or(Refusal::UnknownSession)?;
        let st = self.numbers.entry(s.number.clone()).or_default();
        if let Some(at) = st.next_send.filter(|&at| now < at) {
            return Err(Refusal::RetryAfter(secs(at - now)));
        }
        st.sent += 1;
        st.next_send = Some(now + RESEND_WAIT[st.sent.min(RESEND_WAIT.len() - 1)]);
        st.last_used = Some(now);
        s.code_until = now + CODE_TTL;
        let code: String = s.code.iter().map(|d| char::from(b'0' + d % 10)).collect();
        Ok(Sms {
            to: s.number.clone(),
            body: format!("Your sign-in code: {code}. Do not give it to anyone."),
        })
    }

    /// Seconds until `number` may get its next code.
    fn next_send_in(&self, now: Instant, number: &str) -> u64 {
        self.numbers
            .get(number)
            .and_then(|st| st.next_send)
            .map_or(0, |at| secs(at.saturating_duration_since(now)))
    }

    /// Checks `code` for session `id` from client address `from`; the verified number on a
    /// match (the session is then used up).
    pub fn check(
        &mut self,
        now: Instant,
        id: &str,
        code: &str,
        from: IpAddr,
    ) -> Result<String, Refusal> {
        if let Some(Some(w)) = self.addresses.get(&from) {
            if w.fails >= FAILS_PER_ADDRESS && now.duration_since(w.since) < WINDOW {
                return Err(Refusal::RetryAfter(secs(
                    WINDOW - now.duration_since(w.since),
                )));
            }
        }
        let s = self
            .sessions
            .get_mut(id)
            .filter(|s| now < s.ends)
            .ok_or(Refusal::UnknownSession)?;
        let st = self.numbers.entry(s.number.clone()).or_default();
        if let Some(until) = st.locked_until.filter(|&u| now < u) {
            return Err(Refusal::RetryAfter(secs(until - now)));
        }
        if now >= s.code_until {
            return Err(Refusal::CodeExpired);
        }
        let given = code.as_bytes();
        let want: Vec<u8> = s.code.iter().map(|d| b'0' + d % 10).collect();
        if given.len() == want.len() && constant_time_eq(given, &want) {
            let number = s.number.clone();
            self.sessions.remove(id);
            if let Some(st) = self.numbers.get_mut(&number) {
                st.fails = None;
            }
            return Ok(number);
        }
        s.checks_left -= 1;
        let left = s.checks_left;
        if left == 0 {
            self.sessions.remove(id);
        }
        if Window::count(&mut st.fails, now) >= FAILS_PER_NUMBER {
            st.locked_until = Some(now + LOCKOUT);
        }
        if self.addresses.len() < MAX_TRACKED || self.addresses.contains_key(&from) {
            Window::count(self.addresses.entry(from).or_default(), now);
        }
        Err(Refusal::WrongCode(left))
    }

    /// Forgets ended sessions and numbers and addresses with nothing left to remember.
    pub fn sweep(&mut self, now: Instant) {
        self.sessions.retain(|_, s| now < s.ends);
        self.numbers.retain(|_, st| {
            st.locked_until.is_some_and(|u| now < u)
                || st.next_send.is_some_and(|at| now < at)
                || st.last_used.is_some_and(|t| now.duration_since(t) < WINDOW)
        });
        self.addresses
            .retain(|_, w| w.is_some_and(|w| now.duration_since(w.since) < WINDOW));
    }

    /// Sessions held now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Compares two byte strings of equal length in time that depends only on that length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Numbers one contact-discovery request may carry (well inside the 16 KiB default body).
pub const DISCOVERY_BATCH: usize = 500;
/// Numbers one account may look up per day (ctl/API.md, "Accounts", says why this many).
pub const DISCOVERY_PER_DAY: u32 = 5_000;
const DAY: Duration = Duration::from_secs(24 * 3600);

/// What each account has spent of its daily contact-discovery budget (in memory).
#[derive(Default)]
pub struct DiscoveryBudget {
    spent: HashMap<u64, (Instant, u32)>,
}

impl DiscoveryBudget {
    /// Spends `n` lookups of `user`'s day; what is left, or when to retry if `n` do not fit
    /// (then nothing is spent).
    pub fn spend(&mut self, now: Instant, user: u64, n: u32) -> Result<u32, Refusal> {
        if self.spent.len() >= MAX_TRACKED {
            self.spent
                .retain(|_, (since, _)| now.duration_since(*since) < DAY);
        }
        let (since, used) = self.spent.entry(user).or_insert((now, 0));
        if now.duration_since(*since) >= DAY {
            (*since, *used) = (now, 0);
        }
        if used.saturating_add(n) > DISCOVERY_PER_DAY {
            return Err(Refusal::RetryAfter(secs(DAY - now.duration_since(*since))));
        }
        *used += n;
        Ok(DISCOVERY_PER_DAY - *used)
    }
}

/// A change to the accounts, as the journal (or Redis) keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountRecord {
    /// A number's account, created by its first sign-in: its user id, for good.
    Created { number: String, user_id: u64 },
    /// The account's device credential (its SHA-256, hex); a new one replaces the old.
    Device {
        user_id: u64,
        credential_sha256: String,
    },
    /// The account is gone: its number, its user id, its device.
    Deleted { user_id: u64 },
}

/// The accounts: who a number is, and which device credential is theirs.
#[derive(Default)]
pub struct Accounts {
    user_of: HashMap<String, u64>,
    number_of: HashMap<u64, String>,
    device_of: HashMap<u64, [u8; 32]>,
    by_device: HashMap<[u8; 32], u64>,
}

impl Accounts {
    pub fn apply(&mut self, r: &AccountRecord) {
        match r {
            AccountRecord::Created { number, user_id } => {
                self.user_of.insert(number.clone(), *user_id);
                self.number_of.insert(*user_id, number.clone());
            }
            AccountRecord::Device {
                user_id,
                credential_sha256,
            } => {
                let Some(hash) = proto::token::hex_decode::<32>(credential_sha256) else {
                    return;
                };
                if let Some(old) = self.device_of.insert(*user_id, hash) {
                    self.by_device.remove(&old);
                }
                self.by_device.insert(hash, *user_id);
            }
            AccountRecord::Deleted { user_id } => {
                if let Some(n) = self.number_of.remove(user_id) {
                    self.user_of.remove(&n);
                }
                if let Some(h) = self.device_of.remove(user_id) {
                    self.by_device.remove(&h);
                }
            }
        }
    }

    /// Every account as records that rebuild it (for a compaction).
    pub fn records(&self) -> impl Iterator<Item = AccountRecord> + '_ {
        self.number_of.iter().flat_map(|(&user_id, number)| {
            let device = self.device_of.get(&user_id).map(|h| AccountRecord::Device {
                user_id,
                credential_sha256: proto::token::hex(h),
            });
            std::iter::once(AccountRecord::Created {
                number: number.clone(),
                user_id,
            })
            .chain(device)
        })
    }

    /// The user id of `number`, if it has an account.
    pub fn user(&self, number: &str) -> Option<u64> {
        self.user_of.get(number).copied()
    }

    /// Whether `user_id` belongs to an account.
    pub fn exists(&self, user_id: u64) -> bool {
        self.number_of.contains_key(&user_id)
    }

    /// The account whose device credential is `credential`. The lookup is by the
    /// credential's SHA-256: a credential is 256 random bits, so nothing about it can be learnt
    /// from how long a lookup of another takes.
    pub fn by_credential(&self, credential: &str) -> Option<u64> {
        self.by_device.get(&credential_hash(credential)).copied()
    }

    pub fn len(&self) -> usize {
        self.number_of.len()
    }

    /// Records a rewrite of the accounts holds (an account and its device each).
    pub fn record_count(&self) -> usize {
        self.number_of.len() + self.device_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.number_of.is_empty()
    }
}

/// The SHA-256 of a device credential (what is stored).
pub fn credential_hash(credential: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(credential.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_spends_a_daily_budget_and_refuses_past_it_whole() {
        let t = Instant::now();
        let mut b = DiscoveryBudget::default();
        assert_eq!(b.spend(t, 1, 1_000), Ok(4_000));
        assert_eq!(b.spend(t, 1, 4_000), Ok(0));
        assert_eq!(b.spend(t, 1, 1), Err(Refusal::RetryAfter(24 * 3600)));
        assert_eq!(b.spend(t, 2, 10), Ok(4_990), "per account");
        let later = t + DAY - Duration::from_secs(10);
        assert_eq!(b.spend(later, 1, 1), Err(Refusal::RetryAfter(10)));
        assert_eq!(b.spend(t + DAY, 1, 5_000), Ok(0), "a new day");
    }

    const NUMBER: &str = "+12025550143";
    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn code_of(sms: &Sms) -> String {
        sms.body.chars().filter(char::is_ascii_digit).collect()
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn numbers_are_normalised_to_e164_or_refused() {
        assert_eq!(normalize("+1 (202) 555-0143").unwrap(), NUMBER);
        assert_eq!(normalize("+44 20 7946 0958").unwrap(), "+442079460958");
        for bad in ["2025550143", "+1 555", "+999 1234567", "hello", "", "+"] {
            assert!(
                matches!(normalize(bad), Err(Refusal::InvalidNumber(_))),
                "{bad:?}"
            );
        }
        assert!(normalize(&format!("+1{}", "2".repeat(80))).is_err());
    }

    #[test]
    fn a_code_verifies_once_and_a_wrong_one_counts_down() {
        let t = Instant::now();
        let mut v = Verifier::default();
        let (sms, wait) = v.start(t, NUMBER, "s1".into(), [1, 2, 3, 4, 5, 6]).unwrap();
        let sms = sms.unwrap();
        assert_eq!(sms.to, NUMBER);
        assert_eq!(code_of(&sms), "123456");
        assert_eq!(wait, 60, "the next code waits a minute");
        assert_eq!(
            v.check(t, "s1", "000000", HOME),
            Err(Refusal::WrongCode(CHECKS_PER_SESSION - 1))
        );
        assert_eq!(v.check(t, "s1", "12345", HOME), Err(Refusal::WrongCode(3)));
        assert_eq!(v.check(t, "s1", "123456", HOME), Ok(NUMBER.to_string()));
        assert_eq!(
            v.check(t, "s1", "123456", HOME),
            Err(Refusal::UnknownSession),
            "single use"
        );
    }

    #[test]
    fn codes_expire_and_sessions_end_after_their_checks() {
        let t = Instant::now();
        let mut v = Verifier::default();
        v.start(t, NUMBER, "s1".into(), [0; 6]).unwrap();
        assert_eq!(
            v.check(t + CODE_TTL, "s1", "000000", HOME),
            Err(Refusal::CodeExpired)
        );
        v.start(t, "+12025550144", "s2".into(), [0; 6]).unwrap();
        for left in (0..CHECKS_PER_SESSION).rev() {
            assert_eq!(
                v.check(t, "s2", "999999", HOME),
                Err(Refusal::WrongCode(left))
            );
        }
        assert_eq!(
            v.check(t, "s2", "000000", HOME),
            Err(Refusal::UnknownSession)
        );
    }

    #[test]
    fn resends_follow_the_schedule_per_number_not_per_session() {
        let t = Instant::now();
        let mut v = Verifier::default();
        v.start(t, NUMBER, "a".into(), [0; 6]).unwrap();
        // A second session for the same number gets no code before the wait.
        let (sms, wait) = v.start(t, NUMBER, "b".into(), [1; 6]).unwrap();
        assert_eq!((sms, wait), (None, 60));
        assert_eq!(v.resend(t, "b", [1; 6]), Err(Refusal::RetryAfter(60)));
        let mut at = t;
        for (n, wait) in [(1, 120), (2, 300), (3, 600), (4, 600), (5, 600)] {
            at += RESEND_WAIT[n.min(4)];
            let (sms, next) = v.resend(at, "b", [n as u8; 6]).unwrap();
            assert_eq!(code_of(&sms), format!("{n}").repeat(6));
            assert_eq!(next, wait, "after code {n}");
        }
        // A refused resend keeps the code that was sent.
        assert!(v.resend(at, "b", [9; 6]).is_err());
        assert_eq!(v.check(at, "b", "555555", HOME), Ok(NUMBER.to_string()));
    }

    #[test]
    fn a_number_is_locked_after_its_failures_and_an_address_is_limited() {
        let t0 = Instant::now();
        let mut v = Verifier::default();
        let mut fails = 0;
        let mut s = 0;
        // Sessions a schedule's wait apart, each sent its code; their wrong codes add up.
        let mut t = t0;
        while fails < FAILS_PER_NUMBER {
            s += 1;
            t = t0 + RESEND_WAIT[s.min(4) - 1] * 2;
            let (sms, _) = v.start(t, NUMBER, format!("s{s}"), [0; 6]).unwrap();
            assert!(sms.is_some());
            for _ in 0..CHECKS_PER_SESSION.min(FAILS_PER_NUMBER - fails) {
                let r = v.check(t, &format!("s{s}"), "111111", HOME);
                assert!(matches!(r, Err(Refusal::WrongCode(_))), "{r:?}");
                fails += 1;
            }
        }
        // Locked: even the right code is refused, and so is a new session, for an hour.
        v.start(t, "+12025550199", "other".into(), [0; 6]).unwrap();
        assert_eq!(
            v.start(t, NUMBER, "late".into(), [0; 6]),
            Err(Refusal::RetryAfter(3600))
        );
        // The address made 10 failures; 20 more on other numbers, then it is refused.
        for i in 0..(FAILS_PER_ADDRESS - FAILS_PER_NUMBER) {
            let n = format!("+1202555{:04}", 1000 + i);
            v.start(t, &n, format!("x{i}"), [0; 6]).unwrap();
            assert!(matches!(
                v.check(t, &format!("x{i}"), "111111", HOME),
                Err(Refusal::WrongCode(_))
            ));
        }
        assert!(matches!(
            v.check(t, "other", "000000", HOME),
            Err(Refusal::RetryAfter(_))
        ));
        let elsewhere: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            v.check(t, "other", "000000", elsewhere),
            Ok("+12025550199".into())
        );
        // An hour on, the number takes a session and a code again.
        assert_eq!(
            v.start(t + LOCKOUT, NUMBER, "later".into(), [0; 6])
                .map(|r| r.0.is_some()),
            Ok(true)
        );
    }

    #[test]
    fn everything_held_is_bounded_and_swept() {
        let t = Instant::now();
        let mut v = Verifier::default();
        v.start(t, NUMBER, "s".into(), [0; 6]).unwrap();
        v.sweep(t + SESSION_TTL);
        assert_eq!(v.sessions(), 0);
        v.sweep(t + SESSION_TTL + WINDOW);
        assert!(v.numbers.is_empty() && v.addresses.is_empty());
    }
}
