//! Meetings: ids, join codes, participants and host credentials. Pure state; randomness comes
//! in as arguments so that tests replay.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// Letters of a join code: lower case without the easily confused `i`, `l` and `o`.
const CODE_ALPHABET: &[u8; 23] = b"abcdefghjkmnpqrstuvwxyz";
/// Letters in a join code (23^10, about 45 bits), shown as `abc-defg-hjk`.
const CODE_LETTERS: usize = 10;
/// Meeting ids stay below 2^53 so that JavaScript clients read them exactly.
pub const MAX_MEETING_ID: u64 = (1 << 53) - 1;
/// Bytes of a host secret (shown as 64 hex digits).
pub const HOST_SECRET_LEN: usize = 32;
/// Longest meeting title or participant name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A participant of a meeting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    pub name: String,
    pub host: bool,
    pub joined_at: u64,
}

/// A meeting, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meeting {
    pub id: u64,
    /// Canonical join code: ten letters, no dashes.
    pub code: String,
    pub title: String,
    pub created_at: u64,
    /// SHA-256 of the host secret, hex. Only the host holds the secret itself.
    pub host_secret_sha256: String,
    pub host_participant: u64,
    pub next_participant: u64,
    pub participants: BTreeMap<u64, Participant>,
    /// Unix seconds of the last join or rejoin; an idle meeting expires (`meeting_idle_s`).
    #[serde(default)]
    pub last_active: u64,
    /// The account that created it; 0 for one an operator created (admin credential).
    #[serde(default)]
    pub owner: u64,
}

impl Meeting {
    /// Whether `secret` (hex, as given to the host) is this meeting's host secret.
    pub fn is_host_secret(&self, secret: &str) -> bool {
        // Both sides are hashes, so comparing them leaks nothing useful through timing.
        sha256_hex(secret.trim().as_bytes()) == self.host_secret_sha256
    }

    /// Adds a participant and returns its id.
    pub fn add_participant(&mut self, name: String, host: bool, now_unix_s: u64) -> u64 {
        let id = self.next_participant;
        self.next_participant += 1;
        self.last_active = self.last_active.max(now_unix_s);
        let p = Participant {
            name,
            host,
            joined_at: now_unix_s,
        };
        self.participants.insert(id, p);
        id
    }

    /// The join code as shown to people: `abc-defg-hjk`.
    pub fn display_code(&self) -> String {
        display_code(&self.code)
    }
}

/// Why a meeting operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MeetingError {
    UnknownMeeting,
    UnknownParticipant,
    MeetingFull,
    TooManyMeetings,
}

/// All meetings, indexed by id and by join code.
#[derive(Debug, Default)]
pub struct Meetings {
    by_id: BTreeMap<u64, Meeting>,
    by_code: HashMap<String, u64>,
    /// Open meetings per owning account (accounts with none are absent).
    owned: HashMap<u64, usize>,
}

/// Random inputs of [`Meetings::create`], drawn by the caller.
pub struct Seeds {
    pub id: u64,
    pub code: [u8; CODE_LETTERS],
    pub host_secret: [u8; HOST_SECRET_LEN],
}

impl Seeds {
    /// Fresh seeds from the operating system's generator.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut b = [0u8; 8 + CODE_LETTERS + HOST_SECRET_LEN];
        getrandom::getrandom(&mut b)?;
        let id = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        Ok(Self {
            id,
            code: b[8..8 + CODE_LETTERS].try_into().expect("code bytes"),
            host_secret: b[8 + CODE_LETTERS..].try_into().expect("secret bytes"),
        })
    }
}

impl Meetings {
    /// Creates a meeting with its host as participant 1. Returns the meeting id and the host
    /// secret (hex), which is not stored anywhere but in the caller's answer. On an id or code
    /// collision the caller draws new seeds (`None`).
    pub fn create(
        &mut self,
        seeds: &Seeds,
        title: String,
        host_name: String,
        now_unix_s: u64,
    ) -> Option<(u64, String)> {
        let id = seeds.id & MAX_MEETING_ID;
        // 256 = 11 * 23 + 3, so the letters a, b, c are 12/11 as likely as the others: a loss
        // of well under a bit over ten letters, which the address-based guess limit dwarfs.
        let code: String = seeds
            .code
            .iter()
            .map(|b| CODE_ALPHABET[usize::from(*b) % CODE_ALPHABET.len()] as char)
            .collect();
        if id == 0 || self.by_id.contains_key(&id) || self.by_code.contains_key(&code) {
            return None;
        }
        let secret = proto::token::hex(&seeds.host_secret);
        let mut m = Meeting {
            id,
            code,
            title,
            created_at: now_unix_s,
            host_secret_sha256: sha256_hex(secret.as_bytes()),
            host_participant: 1,
            next_participant: 1,
            participants: BTreeMap::new(),
            last_active: now_unix_s,
            owner: 0,
        };
        m.add_participant(host_name, true, now_unix_s);
        self.insert(m);
        Some((id, secret))
    }

    /// Inserts or replaces a meeting (creation, and replay from the store).
    pub fn insert(&mut self, m: Meeting) {
        self.by_code.insert(m.code.clone(), m.id);
        if m.owner != 0 {
            *self.owned.entry(m.owner).or_default() += 1;
        }
        if let Some(old) = self.by_id.insert(m.id, m) {
            self.disown(old.owner);
        }
    }

    /// Removes a meeting.
    pub fn remove(&mut self, id: u64) -> Option<Meeting> {
        let m = self.by_id.remove(&id)?;
        self.by_code.remove(&m.code);
        self.disown(m.owner);
        Some(m)
    }

    fn disown(&mut self, owner: u64) {
        if let Some(n) = self.owned.get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.owned.remove(&owner);
            }
        }
    }

    /// How many open meetings account `owner` created.
    pub fn owned_by(&self, owner: u64) -> usize {
        self.owned.get(&owner).copied().unwrap_or(0)
    }

    pub fn get(&self, id: u64) -> Option<&Meeting> {
        self.by_id.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Meeting> {
        self.by_id.get_mut(&id)
    }

    /// The meeting with join code `code`, given with or without dashes, in any case.
    pub fn by_code(&self, code: &str) -> Option<&Meeting> {
        let canon = canonical_code(code)?;
        self.by_code.get(&canon).and_then(|id| self.by_id.get(id))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Meeting> {
        self.by_id.values()
    }
}

/// `abcdefghjk` as `abc-defg-hjk`.
pub fn display_code(code: &str) -> String {
    match (code.get(..3), code.get(3..7), code.get(7..)) {
        (Some(a), Some(b), Some(c)) => format!("{a}-{b}-{c}"),
        _ => code.to_string(),
    }
}

/// A code as typed, reduced to its canonical letters; `None` if it cannot be a code.
pub fn canonical_code(typed: &str) -> Option<String> {
    if typed.len() > 2 * CODE_LETTERS {
        return None;
    }
    let canon: String = typed
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let ok = canon.len() == CODE_LETTERS && canon.bytes().all(|b| CODE_ALPHABET.contains(&b));
    ok.then_some(canon)
}

fn sha256_hex(bytes: &[u8]) -> String {
    proto::token::hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(n: u8) -> Seeds {
        Seeds {
            id: u64::from(n) << 56 | u64::from(n),
            code: [n; CODE_LETTERS],
            host_secret: [n; HOST_SECRET_LEN],
        }
    }

    #[test]
    fn create_then_find_by_code_in_any_spelling() {
        let mut ms = Meetings::default();
        let (id, secret) = ms.create(&seeds(1), "t".into(), "h".into(), 5).unwrap();
        assert!(id <= MAX_MEETING_ID && id != 0);
        let m = ms.get(id).unwrap();
        assert_eq!(m.code, "bbbbbbbbbb");
        assert_eq!(m.display_code(), "bbb-bbbb-bbb");
        assert_eq!(ms.by_code("BBB-bbbb-bbb").unwrap().id, id);
        assert!(ms.by_code("bbb").is_none());
        assert!(m.is_host_secret(&secret));
        assert!(!m.is_host_secret("00"));
        assert!(m.participants[&1].host);
        assert!(
            ms.create(&seeds(1), "t".into(), "h".into(), 5).is_none(),
            "collision"
        );
        assert!(ms.remove(id).is_some());
        assert!(ms.by_code("bbbbbbbbbb").is_none());
    }

    #[test]
    fn canonical_codes_reject_foreign_letters() {
        assert_eq!(
            canonical_code(" abc-defg-hjk ").as_deref(),
            Some("abcdefghjk")
        );
        assert!(
            canonical_code("abc-defg-hjl").is_none(),
            "l is not in the alphabet"
        );
        assert!(canonical_code(&"a".repeat(100)).is_none());
    }
}
