//! `ctl`: the control daemon. This first cut holds the key material and mints join tokens, so
//! that relays can be used and tested before placement and the meetings API exist.
//!
//! ```text
//! ctl keygen --key ctl.key            create a key pair (secret seed, hex) and print the public key
//! ctl pubkey --key ctl.key            print the public key (hex) relays need
//! ctl token --key ctl.key --room R --participant P [--shard S] [--relay N] [--ttl SECONDS]
//!           [--perms publish,subscribe,chat,host] [--user]
//!                                     print a signed join token (base64url)
//! ```

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use proto::token::{Claims, Permissions, TokenKind};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("ctl: error: {e:#}");
        std::process::exit(2);
    }
}

/// Parsed `--name value` flags, each allowed once; anything else is an error.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String], known: &[&str], switches: &[&str]) -> Result<Self> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {a:?}"))?;
            if out.iter().any(|(n, _)| n == name) {
                bail!("--{name} given twice");
            }
            if switches.contains(&name) {
                out.push((name.to_string(), String::new()));
            } else if known.contains(&name) {
                let v = it
                    .next()
                    .with_context(|| format!("--{name} needs a value"))?;
                out.push((name.to_string(), v.clone()));
            } else {
                bail!("unknown flag --{name}");
            }
        }
        Ok(Self(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T> {
        match self.get(name) {
            Some(v) => v
                .parse()
                .ok()
                .with_context(|| format!("--{name}: not a number: {v:?}")),
            None => default.with_context(|| format!("--{name} is required")),
        }
    }

    fn key_path(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(
            self.get("key").context("--key FILE is required")?,
        ))
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let (cmd, rest) = args
        .split_first()
        .context("usage: ctl keygen|pubkey|token ... (see --help)")?;
    match cmd.as_str() {
        "keygen" => {
            let flags = Flags::parse(rest, &["key"], &[])?;
            let path = flags.key_path()?;
            if path.exists() {
                bail!("{} exists; refusing to overwrite a key", path.display());
            }
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let key = SigningKey::from_bytes(&seed);
            write_secret(&path, &proto::token::hex(&seed))?;
            println!("{}", proto::token::hex(key.verifying_key().as_bytes()));
        }
        "pubkey" => {
            let flags = Flags::parse(rest, &["key"], &[])?;
            let key = read_key(&flags.key_path()?)?;
            println!("{}", proto::token::hex(key.verifying_key().as_bytes()));
        }
        "token" => {
            let known = [
                "key",
                "room",
                "participant",
                "shard",
                "relay",
                "ttl",
                "perms",
            ];
            let flags = Flags::parse(rest, &known, &["user"])?;
            let key = read_key(&flags.key_path()?)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let claims = Claims {
                kind: if flags.get("user").is_some() {
                    TokenKind::User
                } else {
                    TokenKind::Room
                },
                permissions: parse_perms(flags.get("perms").unwrap_or("publish,subscribe"))?,
                relay_id: flags.num("relay", Some(0))?,
                shard_idx: flags.num("shard", Some(0))?,
                expires_at: now + flags.num::<u64>("ttl", Some(3600))?,
                scope_id: flags.num("room", None)?,
                participant_id: flags.num("participant", None)?,
            };
            println!("{}", claims.sign_text(&key));
        }
        "-h" | "--help" | "help" => println!("{}", include_str!("usage.txt")),
        other => bail!("unknown command {other:?}; try `ctl --help`"),
    }
    Ok(())
}

fn parse_perms(list: &str) -> Result<Permissions> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .try_fold(Permissions::default(), |acc, p| {
            Ok(acc
                | match p {
                    "publish" => Permissions::PUBLISH,
                    "subscribe" => Permissions::SUBSCRIBE,
                    "chat" => Permissions::CHAT,
                    "host" => Permissions::HOST,
                    other => bail!("unknown permission {other:?} (publish, subscribe, chat, host)"),
                })
        })
}

fn read_key(path: &Path) -> Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    proto::token::signing_key_from_hex(&text)
        .with_context(|| format!("{}: not a 64-hex-digit Ed25519 secret key", path.display()))
}

fn write_secret(path: &Path, hex: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{hex}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_permissions_and_rejects_unknown() {
        assert_eq!(
            parse_perms("publish,subscribe").unwrap(),
            Permissions::PUBLISH | Permissions::SUBSCRIBE
        );
        assert!(parse_perms("fly").is_err());
    }

    #[test]
    fn flags_reject_duplicates_and_unknowns() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(Flags::parse(&a(&["--room", "1", "--room", "2"]), &["room"], &[]).is_err());
        assert!(Flags::parse(&a(&["--nope", "1"]), &["room"], &[]).is_err());
        assert!(Flags::parse(&a(&["--room"]), &["room"], &[]).is_err());
        let f = Flags::parse(&a(&["--room", "7", "--user"]), &["room"], &["user"]).unwrap();
        assert_eq!(f.num::<u64>("room", None).unwrap(), 7);
        assert!(f.get("user").is_some());
    }

    #[test]
    fn keygen_then_token_verifies() {
        let dir = std::env::temp_dir().join(format!("ctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let _ = std::fs::remove_file(&path);
        run(vec![
            "keygen".into(),
            "--key".into(),
            path.display().to_string(),
        ])
        .unwrap();
        assert!(
            run(vec![
                "keygen".into(),
                "--key".into(),
                path.display().to_string()
            ])
            .is_err(),
            "no overwrite"
        );
        let key = read_key(&path).unwrap();
        let v = proto::token::TokenVerifier::new(key.verifying_key(), 0);
        let claims = Claims {
            kind: TokenKind::Room,
            permissions: Permissions::PUBLISH,
            relay_id: 0,
            shard_idx: 0,
            expires_at: u64::MAX,
            scope_id: 1,
            participant_id: 2,
        };
        assert_eq!(
            v.verify_text(claims.sign_text(&key).as_bytes(), 0),
            Ok(claims)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
