//! Errors at the API edge: each names who is to blame (the caller: 4xx; ctl's situation: 503)
//! and maps to one HTTP status and one stable machine-readable code.
#![forbid(unsafe_code)]

use proto::token::TokenError;
use std::fmt;

/// Every way an API call can fail. `code()` is the stable string clients match on.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ApiError {
    /// The body is not valid JSON of the expected shape (the string says where).
    BadJson(String),
    /// The body is larger than the configured limit.
    BodyTooLarge(usize),
    /// A path segment or query parameter is malformed.
    BadRequest(String),
    /// A field is out of range.
    Invalid(String),
    UnknownMeeting,
    UnknownParticipant,
    UnknownRelay,
    NotFound,
    MethodNotAllowed,
    /// No `Authorization: Bearer ...` where one is required.
    Unauthenticated,
    /// A host secret or admin token that does not match.
    BadCredentials,
    /// A token that does not verify (forged, damaged, wrong kind).
    BadToken(TokenError),
    /// A token that verified but has expired.
    TokenExpired,
    /// A valid token for another meeting.
    WrongMeeting,
    /// Authenticated, but not as the meeting's host.
    NotHost,
    /// The host cannot be removed; the meeting is ended instead.
    CannotRemoveHost,
    MeetingFull,
    TooManyMeetings,
    /// This account has `meetings_per_account` meetings open; it ends one first.
    AccountMeetingLimit(usize),
    /// No relay takes new rooms right now.
    NoRelay,
    /// The membership table is full.
    TooManyRelays,
    /// The store could not make a change durable; nothing was changed.
    Storage,
    /// The request (its body, usually) took longer than the request deadline.
    Timeout,
    /// Too many failed join-code lookups from this address; retry in a minute.
    TooManyRequests,
    /// ctl on Redis: no ctl process holds the lease now (Redis unreachable, or a takeover
    /// under way).
    NoLeader,
    /// Not a phone number ctl takes (with why).
    InvalidNumber(String),
    /// No such verification session (never made, over, or used up).
    UnknownSession,
    /// Too early or too many; retry after this many seconds.
    RetryAfter(u64),
    /// The code does not match; this many checks are left in the session.
    WrongCode(u32),
    /// The session's code has expired; ask for another.
    CodeExpired,
    /// Too many verification sessions under way.
    TooManySessions,
    /// The SMS gateway did not take the code.
    SmsGateway,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        use ApiError::*;
        match self {
            BadJson(_) | BadRequest(_) | Invalid(_) | CannotRemoveHost | InvalidNumber(_) => 400,
            Unauthenticated | BadCredentials | BadToken(_) | TokenExpired | WrongCode(_) => 401,
            WrongMeeting | NotHost => 403,
            UnknownMeeting | UnknownParticipant | UnknownRelay | NotFound | UnknownSession => 404,
            CodeExpired => 410,
            MethodNotAllowed => 405,
            Timeout => 408,
            MeetingFull | TooManyMeetings => 409,
            TooManyRequests | RetryAfter(_) | AccountMeetingLimit(_) => 429,
            SmsGateway => 502,
            BodyTooLarge(_) => 413,
            NoRelay | TooManyRelays | Storage | NoLeader | TooManySessions => 503,
        }
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            BadJson(_) => "bad_json",
            BodyTooLarge(_) => "body_too_large",
            BadRequest(_) => "bad_request",
            Invalid(_) => "invalid",
            UnknownMeeting => "unknown_meeting",
            UnknownParticipant => "unknown_participant",
            UnknownRelay => "unknown_relay",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Unauthenticated => "unauthenticated",
            BadCredentials => "bad_credentials",
            BadToken(_) => "bad_token",
            TokenExpired => "token_expired",
            WrongMeeting => "wrong_meeting",
            NotHost => "not_host",
            CannotRemoveHost => "cannot_remove_host",
            MeetingFull => "meeting_full",
            TooManyMeetings => "too_many_meetings",
            AccountMeetingLimit(_) => "account_meeting_limit",
            NoRelay => "no_relay",
            TooManyRelays => "too_many_relays",
            Storage => "storage",
            Timeout => "timeout",
            TooManyRequests => "too_many_requests",
            NoLeader => "no_leader",
            InvalidNumber(_) => "invalid_number",
            UnknownSession => "unknown_session",
            RetryAfter(_) => "retry_later",
            WrongCode(_) => "wrong_code",
            CodeExpired => "code_expired",
            TooManySessions => "too_many_sessions",
            SmsGateway => "sms_gateway",
        }
    }

    /// The JSON error body, `{"error": "...", "code": "..."}`.
    pub fn body(&self) -> String {
        let mut v = serde_json::json!({"error": self.to_string(), "code": self.code()});
        match self {
            ApiError::RetryAfter(s) => v["retry_after_s"] = (*s).into(),
            ApiError::WrongCode(left) => v["checks_left"] = (*left).into(),
            _ => {}
        }
        v.to_string()
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => Self::TokenExpired,
            other => Self::BadToken(other),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ApiError::*;
        match self {
            BadJson(why) => write!(f, "malformed JSON body: {why}"),
            BodyTooLarge(max) => write!(f, "request body larger than {max} bytes"),
            BadRequest(why) | Invalid(why) => f.write_str(why),
            UnknownMeeting => f.write_str("no such meeting"),
            UnknownParticipant => f.write_str("no such participant in this meeting"),
            UnknownRelay => f.write_str("no such relay"),
            NotFound => f.write_str("no such route"),
            MethodNotAllowed => f.write_str("method not allowed on this route"),
            Unauthenticated => f.write_str("missing Authorization: Bearer credential"),
            BadCredentials => f.write_str("credential does not match"),
            BadToken(e) => write!(f, "token refused: {e}"),
            TokenExpired => f.write_str("token expired"),
            WrongMeeting => f.write_str("token is for another meeting"),
            NotHost => f.write_str("only the meeting's host may do this"),
            CannotRemoveHost => f.write_str("the host cannot be removed; end the meeting instead"),
            MeetingFull => f.write_str("meeting is full"),
            TooManyMeetings => f.write_str("too many meetings"),
            AccountMeetingLimit(n) => write!(
                f,
                "this account has {n} meetings open, its limit: end one (DELETE \
                 /v1/meetings/{{id}}) before creating another"
            ),
            NoRelay => f.write_str("no relay is serving; retry shortly"),
            TooManyRelays => f.write_str("relay table full"),
            Storage => f.write_str("could not store the change; retry shortly"),
            Timeout => f.write_str("request took too long"),
            TooManyRequests => {
                f.write_str("too many unknown join codes from this address; retry in a minute")
            }
            NoLeader => f.write_str("no ctl process is acting now (Redis unreachable or a takeover under way); retry shortly"),
            InvalidNumber(why) => write!(f, "not a phone number: {why}"),
            UnknownSession => f.write_str("no such verification session (over or used up): start a new one"),
            RetryAfter(s) => write!(f, "too early or too many attempts; retry in {s} s"),
            WrongCode(left) => write!(f, "wrong code; {left} checks left in this session"),
            CodeExpired => f.write_str("the code has expired; ask for a new one"),
            TooManySessions => f.write_str("too many verifications under way; retry shortly"),
            SmsGateway => f.write_str("the SMS gateway did not take the code; retry shortly"),
        }
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_json_with_error_and_code() {
        let e = ApiError::NotHost;
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["code"], "not_host");
        assert_eq!(e.status(), 403);
        assert_eq!(ApiError::from(TokenError::Expired), ApiError::TokenExpired);
    }
}
