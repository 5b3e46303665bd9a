//! `ctl`: the control daemon and its command-line tools.
//!
//! ```text
//! ctl serve [--config ctl.toml] [--listen ADDR] [--internal-listen ADDR] [--data-dir DIR]
//!           [--public-url URL]        run the daemon (prints `ready listen=ADDR` first)
//! ctl relays | rooms | home USER | drain RELAY | undrain RELAY  [--ctl URL] [--json]
//!                                     ask a running ctl (admin token: $CTL_ADMIN_TOKEN)
//! ctl credential admin | relay ID [--config ctl.toml] [--data-dir DIR]
//!                                     print the admin credential, or relay ID's (ctl_token)
//! ctl keygen --key ctl.key            create a key pair (secret seed, hex) and print the public key
//! ctl pubkey --key ctl.key            print the public key (hex) relays need
//! ctl token --key ctl.key --room R --participant P [--shard S] [--relay N] [--ttl SECONDS]
//!           [--perms publish,subscribe,chat,host] [--user]
//!                                     print a signed join token (base64url)
//! ```

mod admin;

use anyhow::{bail, Context, Result};
use ctl::config::Config;
use ctl::keys;
use proto::token::{Claims, Permissions, TokenKind};
use std::path::PathBuf;
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
    let (cmd, rest) = args.split_first().context(
        "usage: ctl serve|relays|rooms|home|drain|undrain|credential|keygen|pubkey|token ... \
         (see --help)",
    )?;
    match cmd.as_str() {
        "serve" => serve(rest)?,
        "relays" | "rooms" | "home" | "drain" | "undrain" => admin::run(cmd, rest)?,
        "keygen" => {
            let flags = Flags::parse(rest, &["key"], &[])?;
            let key = keys::generate(&flags.key_path()?)?;
            println!("{}", keys::public_hex(&key));
        }
        "pubkey" => {
            let flags = Flags::parse(rest, &["key"], &[])?;
            println!("{}", keys::public_hex(&keys::read(&flags.key_path()?)?));
        }
        "token" => token(rest)?,
        "credential" => credential(rest)?,
        "-h" | "--help" | "help" => println!("{}", include_str!("usage.txt")),
        other => bail!("unknown command {other:?}; try `ctl --help`"),
    }
    Ok(())
}

/// `ctl credential admin | relay ID [--config F] [--data-dir D]`: prints the admin
/// credential, or relay ID's, derived from the key in the data directory (or, with
/// `redis_url` in the configuration, the cluster's key in Redis).
fn credential(args: &[String]) -> Result<()> {
    let usage = "usage: ctl credential admin | relay ID [--config ctl.toml] [--data-dir DIR]";
    let (what, rest) = args.split_first().context(usage)?;
    let (relay, rest) = match what.as_str() {
        "admin" => (None, rest),
        "relay" => {
            let (id, rest) = rest.split_first().context(usage)?;
            let id: u32 = id
                .parse()
                .ok()
                .filter(|&i| i > 0)
                .with_context(|| format!("relay id: not a number in 1..=4294967295: {id:?}"))?;
            (Some(id), rest)
        }
        _ => bail!("{usage}"),
    };
    let flags = Flags::parse(rest, &["config", "data-dir"], &[])?;
    let cfg = config(&flags)?;
    let key = match &cfg.redis_url {
        Some(url) => ctl::ha::stored_key(url.expose())?,
        None => keys::read(&cfg.data_dir.join(keys::KEY_FILE))
            .context("no key: start ctl once first (or name its --data-dir)")?,
    };
    if relay.is_none() && cfg.admin_token.is_some() {
        bail!("ctl.toml sets admin_token: that is the admin credential");
    }
    match relay {
        Some(id) => println!("{}", keys::relay_credential(&key, id)),
        None => println!("{}", keys::admin_credential(&key)),
    }
    Ok(())
}

/// The configuration file named by `--config` (or the defaults), then `--data-dir` over it.
fn config(flags: &Flags) -> Result<Config> {
    let mut cfg = match flags.get("config") {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            Config::from_toml(&text).with_context(|| path.to_string())?
        }
        None => Config::default(),
    };
    if let Some(v) = flags.get("data-dir") {
        cfg.data_dir = PathBuf::from(v);
    }
    Ok(cfg)
}

/// `ctl serve`: the configuration file, then flags over it.
fn serve(args: &[String]) -> Result<()> {
    let flags = Flags::parse(
        args,
        &[
            "config",
            "listen",
            "internal-listen",
            "data-dir",
            "public-url",
        ],
        &[],
    )?;
    let mut cfg = match flags.get("config") {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            Config::from_toml(&text).with_context(|| path.to_string())?
        }
        None => Config::default(),
    };
    if let Some(v) = flags.get("listen") {
        cfg.listen = v
            .parse()
            .with_context(|| format!("--listen: not an address: {v:?}"))?;
    }
    if let Some(v) = flags.get("internal-listen") {
        cfg.internal_listen = Some(
            v.parse()
                .with_context(|| format!("--internal-listen: not an address: {v:?}"))?,
        );
    }
    if let Some(v) = flags.get("data-dir") {
        cfg.data_dir = PathBuf::from(v);
    }
    if let Some(v) = flags.get("public-url") {
        cfg.public_url = Some(v.to_string());
    }
    cfg.validate()?;
    // ctl is not on the packet path: one thread serves every request.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(ctl::server::serve(cfg))
}

fn token(args: &[String]) -> Result<()> {
    let known = [
        "key",
        "room",
        "participant",
        "shard",
        "relay",
        "ttl",
        "perms",
    ];
    let flags = Flags::parse(args, &known, &["user"])?;
    let key = keys::read(&flags.key_path()?)?;
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
        let key = keys::read(&path).unwrap();
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
