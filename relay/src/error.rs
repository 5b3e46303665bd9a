//! Why the relay could not start, or had to stop, typed by who is to blame (rustls's
//! `Error` is the model: the variant says whose move it is). The process exits with a code
//! from `sysexits.h` per blame, so that a supervisor can tell "fix the config" from "try
//! again": `dist/relay.service` does not restart on [`Error::Config`] or
//! [`Error::CtlRefused`], where a restart cannot help.
//!
//! What a *peer* does wrong never stops the relay: the engines answer it (a STUN error, a chat
//! ERROR frame) and count it; see `engine::BindRefusal` and `proto::chat::code`.

use std::fmt;
use std::io;

/// A reason the relay stops.
#[derive(Debug)]
pub enum Error {
    /// The operator's configuration, flags or environment (a bad value, a missing key). Fix
    /// it and start again. Exit code 78 (`EX_CONFIG`).
    Config(String),
    /// ctl refused this relay: its credentials, or an identity that conflicts with ctl's.
    /// Exit code 77 (`EX_NOPERM`).
    CtlRefused(String),
    /// ctl could not be reached in time, or answered what is not its protocol. Worth a
    /// restart. Exit code 69 (`EX_UNAVAILABLE`).
    CtlUnavailable(String),
    /// The host refused a resource: an address in use, descriptors, memory, io_uring, a
    /// thread. Exit code 71 (`EX_OSERR`).
    Host {
        /// What the relay was doing.
        what: String,
        /// What the system said.
        source: io::Error,
    },
    /// A shard's chat storage failed (an fsync, a full disk) or holds records that do not
    /// replay (`chat::ReplayError`, kind `InvalidData`): acknowledging without durability is
    /// not an option, so the shard stopped. Exit code 74 (`EX_IOERR`).
    Storage {
        /// The shard.
        shard: u16,
        /// What the storage said.
        source: io::Error,
    },
    /// A shard's I/O failed in a way the loop cannot go on from (its socket or ring).
    /// Exit code 71 (`EX_OSERR`).
    Transport {
        /// The shard.
        shard: u16,
        /// What the system said.
        source: io::Error,
    },
    /// A shard thread panicked: a bug. Exit code 70 (`EX_SOFTWARE`).
    Bug(String),
}

impl Error {
    /// The host refused something while the relay was doing `what`.
    pub fn host(what: impl Into<String>, source: io::Error) -> Self {
        Self::Host {
            what: what.into(),
            source,
        }
    }

    /// The process's exit code for this error (`sysexits.h`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 78,
            Self::CtlRefused(_) => 77,
            Self::CtlUnavailable(_) => 69,
            Self::Host { .. } | Self::Transport { .. } => 71,
            Self::Storage { .. } => 74,
            Self::Bug(_) => 70,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(m) | Self::CtlRefused(m) | Self::CtlUnavailable(m) | Self::Bug(m) => {
                f.write_str(m)
            }
            Self::Host { what, source } => write!(f, "{what}: {source}"),
            Self::Storage { shard, source } => {
                write!(f, "shard {shard}: chat storage: {source}")
            }
            Self::Transport { shard, source } => write!(f, "shard {shard}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Host { source, .. }
            | Self::Storage { source, .. }
            | Self::Transport { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// How a shard's loop ended in error: its transport, or its chat storage.
#[derive(Debug)]
pub enum ShardError {
    /// The socket, ring or epoll failed.
    Transport(io::Error),
    /// The chat log failed, or did not open or replay.
    Storage(io::Error),
}

impl ShardError {
    /// As the process's error, for shard `shard`.
    pub fn into_error(self, shard: u16) -> Error {
        match self {
            Self::Transport(source) => Error::Transport { shard, source },
            Self::Storage(source) => Error::Storage { shard, source },
        }
    }
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "transport: {e}"),
            Self::Storage(e) => write!(f, "chat storage: {e}"),
        }
    }
}

impl std::error::Error for ShardError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervisor must tell "fix it" (config, refused credentials) from "try again": the
    /// codes differ, and the ones `dist/relay.service` does not restart on are exactly those.
    #[test]
    fn blame_decides_the_exit_code() {
        let e = || io::Error::other("x");
        let codes: Vec<u8> = [
            Error::Config(String::new()),
            Error::CtlRefused(String::new()),
            Error::CtlUnavailable(String::new()),
            Error::host("bind", e()),
            Error::Storage {
                shard: 0,
                source: e(),
            },
            Error::Bug(String::new()),
        ]
        .iter()
        .map(Error::exit_code)
        .collect();
        assert_eq!(codes, [78, 77, 69, 71, 74, 70]);
        let unit = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/relay.service"),
        )
        .expect("dist/relay.service");
        let line = unit
            .lines()
            .find(|l| l.starts_with("RestartPreventExitStatus="))
            .expect("the unit names the codes a restart cannot fix");
        assert_eq!(line, "RestartPreventExitStatus=77 78");
    }
}
