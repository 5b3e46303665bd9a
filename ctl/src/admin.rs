//! Admin subcommands: talk to a running ctl over HTTP and print what it says.
//!
//! The ctl is `--ctl URL`, else `$CTL_URL`, else `http://127.0.0.1:8080`; the admin token, if
//! the daemon has one, comes from `$CTL_ADMIN_TOKEN` (not a flag: flags show in `ps`).

use crate::Flags;
use anyhow::{bail, Context, Result};
use ctl::api_types::{RelayList, RoomList, UserHome};
use ctl::client;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:8080";

pub fn run(cmd: &str, args: &[String]) -> Result<()> {
    let needs_arg = matches!(cmd, "home" | "drain" | "undrain");
    let (arg, rest) = match (needs_arg, args.split_first()) {
        (true, Some((a, rest))) if !a.starts_with("--") => (Some(a.as_str()), rest),
        (true, _) => bail!("usage: ctl {cmd} ID [--ctl URL] [--json]"),
        (false, _) => (None, args),
    };
    let flags = Flags::parse(rest, &["ctl"], &["json"])?;
    let base = match flags.get("ctl") {
        Some(u) => u.to_string(),
        None => std::env::var("CTL_URL").unwrap_or_else(|_| DEFAULT_URL.to_string()),
    };
    let raw = flags.get("json").is_some();
    let id = |what: &str| -> Result<u64> {
        let a = arg.unwrap_or_default();
        a.parse()
            .with_context(|| format!("{what} must be a number, not {a:?}"))
    };
    match cmd {
        "relays" => show(&call(&base, "GET", "/v1/relays")?, raw, print_relays),
        "rooms" => show(&call(&base, "GET", "/v1/rooms")?, raw, print_rooms),
        "home" => {
            let path = format!("/v1/users/{}/home", id("USER")?);
            show(&call(&base, "GET", &path)?, raw, print_home)
        }
        _ => {
            let path = format!("/v1/relays/{}/{cmd}", id("RELAY_ID")?);
            let body = call(&base, "POST", &path)?;
            println!("{body}");
            Ok(())
        }
    }
}

fn call(base: &str, method: &str, path: &str) -> Result<String> {
    let token = std::env::var("CTL_ADMIN_TOKEN").ok();
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let body = (method == "POST").then_some(&b""[..]);
    let r = client::request(base, method, path, &headers, body, Duration::from_secs(10))
        .with_context(|| format!("cannot reach ctl at {base}"))?;
    if !(200..300).contains(&r.status) {
        bail!("ctl answered {}: {}", r.status, r.text());
    }
    Ok(r.text())
}

fn show<T: serde::de::DeserializeOwned>(body: &str, raw: bool, print: fn(T)) -> Result<()> {
    if raw {
        println!("{body}");
        return Ok(());
    }
    print(serde_json::from_str(body).context("unexpected answer from ctl")?);
    Ok(())
}

fn print_relays(list: RelayList) {
    println!(
        "{:>8}  {:<9} {:<21} {:>6} {:>7} {:>7} {:>6} {:>8}",
        "RELAY", "STATE", "HOST:UDP", "SHARDS", "ROOMS", "PARTS", "PLACED", "SEEN_MS"
    );
    for r in list.relays {
        let rooms: u32 = r.load.iter().map(|l| l.reported.rooms).sum();
        let parts: u32 = r.load.iter().map(|l| l.reported.participants).sum();
        println!(
            "{:>8}  {:<9} {:<21} {:>6} {:>7} {:>7} {:>6} {:>8}",
            r.relay_id,
            format!("{:?}", r.state).to_lowercase(),
            format!("{}:{}", r.host, r.udp_base_port),
            r.shards,
            rooms,
            parts,
            r.rooms.len(),
            r.last_seen_ms
        );
    }
}

fn print_rooms(list: RoomList) {
    println!(
        "{:>16}  {:<12} {:>5} {:>8} {:>5}  TITLE",
        "MEETING", "CODE", "PARTS", "RELAY", "SHARD"
    );
    for r in list.rooms {
        let dash = || "-".to_string();
        println!(
            "{:>16}  {:<12} {:>5} {:>8} {:>5}  {}",
            r.meeting_id,
            r.code,
            r.participants,
            r.relay_id.map_or_else(dash, |v| v.to_string()),
            r.shard_idx.map_or_else(dash, |v| v.to_string()),
            r.title
        );
    }
}

fn print_home(h: UserHome) {
    let port = h
        .chat_port
        .map_or_else(|| "none yet".to_string(), |p| p.to_string());
    println!(
        "user {} -> relay {} shard {} host {} chat port {port}",
        h.user_id, h.relay_id, h.shard_idx, h.host
    );
    println!("token {} (expires {})", h.token, h.expires_at);
}
