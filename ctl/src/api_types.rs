//! Request and response bodies of the HTTP API (see `ctl/API.md`). Requests refuse unknown
//! fields, so a misspelt field is an error rather than silently ignored.
#![forbid(unsafe_code)]

use crate::commands::Command;
use crate::membership::{Liveness, ShardLoad};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Answer to a relay heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// ctl's Ed25519 public key, hex.
    pub public_key: String,
    pub heartbeat_ms: u64,
    /// How long from sending this heartbeat the relay may take new joins, milliseconds; 0
    /// while it has rooms to close first (it came back after they moved).
    pub lease_ms: u64,
    /// For a relay with a link port, once the cluster has formed and ctl has it on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// What a linked relay needs to serve chat as one of a cluster (PROTOCOL.md section 8).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The chat owners, fixed: owner index -> shard address (relay number * 256 + shard).
    pub owners: Vec<u16>,
    /// Where the other linked relays listen for links: relay number -> "host:port".
    pub links: BTreeMap<u32, String>,
    /// This relay's link credential: a token of kind "relay" naming it, signed by ctl.
    pub link_token: String,
}

/// Answer to a relay's command poll.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandsAnswer {
    pub commands: Vec<Command>,
}

/// `POST /v1/meetings` body.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMeeting {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub host_name: Option<String>,
}

/// Answer to meeting creation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub meeting_id: u64,
    /// The join code as shown to people, `abc-defg-hjk`.
    pub code: String,
    pub join_link: String,
    pub host_participant_id: u64,
    /// The host's credential for removing participants and ending the meeting (64 hex digits).
    /// Shown once; ctl keeps only its hash.
    pub host_secret: String,
    /// The host's own admission, if a relay was serving.
    pub join: Option<Joined>,
}

/// `POST /v1/join` body.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub code: String,
    #[serde(default)]
    pub name: Option<String>,
    /// A previous join token for this meeting: join again as the same participant (after a
    /// relay failure moved the room, or when the token nears expiry).
    #[serde(default)]
    pub rejoin_token: Option<String>,
}

/// Where a client's chat goes: the relay's host and its TCP chat port (`null` until relays
/// report one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatEndpoint {
    pub host: String,
    pub port: Option<u16>,
}

/// Answer to a successful join: where to send media and the token to bind with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    pub meeting_id: u64,
    pub participant_id: u64,
    pub is_host: bool,
    pub relay_id: u32,
    pub relay_host: String,
    /// `udp_base_port + shard_idx` of the relay.
    pub udp_port: u16,
    pub shard_idx: u16,
    /// Join token (134 characters of base64url), kind room.
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub chat: ChatEndpoint,
}

/// Answer to leave, remove and end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub meeting_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_id: Option<u64>,
    pub status: String,
}

/// A user's chat home.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserHome {
    pub user_id: u64,
    pub relay_id: u32,
    pub host: String,
    pub shard_idx: u16,
    /// The relay's TCP chat port; `null` until relays report one.
    pub chat_port: Option<u16>,
    /// Token of kind user, permission chat.
    pub token: String,
    pub expires_at: u64,
}

/// One shard in the relay list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardView {
    #[serde(flatten)]
    pub reported: ShardLoad,
    /// Rooms placed here by ctl (sticky placements on record).
    pub placed_rooms: u64,
    pub placed_users: u64,
}

/// One relay in the relay list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayView {
    pub relay_id: u32,
    pub host: String,
    pub udp_base_port: u16,
    pub shards: u16,
    pub nic_gbps: f64,
    pub labels: BTreeMap<String, String>,
    pub chat_port: Option<u16>,
    pub state: Liveness,
    pub drain_requested: bool,
    pub last_seen_ms: u64,
    pub load: Vec<ShardView>,
    /// Meeting ids of the rooms placed on this relay.
    pub rooms: Vec<u64>,
}

/// `GET /v1/relays`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayList {
    pub relays: Vec<RelayView>,
}

/// One meeting in the room list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomView {
    pub meeting_id: u64,
    pub code: String,
    pub title: String,
    pub created_at: u64,
    pub participants: usize,
    /// `null` while not placed.
    pub relay_id: Option<u32>,
    pub shard_idx: Option<u16>,
    /// Serving, draining or dead; `null` while the relay is unknown.
    pub relay_state: Option<Liveness>,
    pub candidates: Vec<crate::core::Slot>,
}

/// `GET /v1/rooms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomList {
    pub rooms: Vec<RoomView>,
}

/// `GET /health`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub relays_alive: usize,
    pub meetings: usize,
    /// True for `dead_after` after start, while membership is re-learned from heartbeats.
    pub relearning: bool,
}

/// `POST /v1/verification/sessions` body.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVerification {
    /// The phone number, with its country code (`+1 202 555 0143`).
    pub number: String,
}

/// A verification session started.
#[derive(Clone, Debug, Serialize)]
pub struct VerificationStarted {
    pub session_id: String,
    /// The number in E.164.
    pub number: String,
    /// Whether a code went out now (else the number waits for its schedule: resend later).
    pub code_sent: bool,
    /// Seconds until the number may get another code.
    pub next_code_in_s: u64,
    pub expires_in_s: u64,
}

/// A code sent again.
#[derive(Clone, Debug, Serialize)]
pub struct CodeResent {
    pub next_code_in_s: u64,
}

/// `POST /v1/verification/sessions/{id}/verify` body.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyCode {
    pub code: String,
}

/// A device signed in.
#[derive(Clone, Debug, Serialize)]
pub struct SignedIn {
    pub user_id: u64,
    /// The device's credential: `Authorization: Bearer <it>` on the `/v1/me` routes. Shown
    /// once; ctl keeps only its SHA-256.
    pub device_credential: String,
    /// Whether this sign-in created the account.
    pub new_account: bool,
}

/// `POST /v1/contacts/discover` body.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverContacts {
    /// Phone numbers from the address book, with country codes (at most 500).
    pub numbers: Vec<String>,
}

/// A number that is a user.
#[derive(Clone, Debug, Serialize)]
pub struct Contact {
    /// E.164.
    pub number: String,
    pub user_id: u64,
}

/// Which numbers are users.
#[derive(Clone, Debug, Serialize)]
pub struct Discovered {
    pub users: Vec<Contact>,
    /// Entries that were not valid numbers (not charged).
    pub invalid: usize,
    /// Lookups left today.
    pub budget_left: u32,
}
