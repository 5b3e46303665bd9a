//! Network namespaces for `demo up` when run as root: relay i lives in its own namespace at
//! `10.N.i.2`, joined by a veth pair to a bridge on this side at `10.N.0.1` (N depends on the
//! process id and the bridge's number, so that two `up`s, or tests of one process, do not
//! collide). The relay's integration tests use this file too (`relay/tests/relay.rs`). The bridge switches between namespaces, so
//! relays reach each other (their links) without IP forwarding on this host; they reach ctl
//! at the bridge's address, and people on this host reach the relays directly. Dropping a
//! namespace removes it; dropping the bridge (after them) removes it.

use std::process::{Command, Stdio};

pub struct Netns {
    name: String,
    veth: String,
    /// The bridge's address: the relay's gateway, where ctl listens.
    pub host_ip: String,
    /// The relay's address inside the namespace.
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether namespaces can be made here: root and iproute2 present.
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } == 0)
        && Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// The bridge namespaces hang off.
pub struct Bridge {
    name: String,
    /// Its number in this process.
    k: u32,
    /// The second octet of its network, 10.N.0.0/16.
    net: u32,
    /// Its address: the namespaces' gateway.
    pub ip: String,
}

impl Bridge {
    /// The bridge of this process.
    pub fn create() -> Result<Self, String> {
        Self::numbered(0)
    }

    /// Bridge `k` (0..10) of this process: several may exist at once.
    pub fn numbered(k: u32) -> Result<Self, String> {
        let net = 200 + (std::process::id() * 10 + k) % 50;
        let br = Self {
            name: format!("rubr{}x{k}", std::process::id() % 100_000),
            k,
            net,
            ip: format!("10.{net}.0.1"),
        };
        ip(&["link", "add", &br.name, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/16", br.ip), "dev", &br.name])?;
        ip(&["link", "set", &br.name, "up"])?;
        Ok(br)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

impl Netns {
    /// Namespace `i` (1-based) for this process, on `bridge`.
    pub fn create(bridge: &Bridge, i: u32) -> Result<Self, String> {
        let pid = std::process::id();
        let k = bridge.k;
        let ns = Self {
            name: format!("relay-up-{pid}-{k}-{i}"),
            veth: format!("ru{}{k}h{i}", pid % 10_000),
            host_ip: bridge.ip.clone(),
            ns_ip: format!("10.{}.{i}.2", bridge.net),
        };
        let peer = format!("ru{}{k}n{i}", pid % 10_000);
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop cleans up whatever was made.
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&["link", "set", &ns.veth, "master", &bridge.name])?;
        ip(&["link", "set", &ns.veth, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/16", ns.ns_ip), "dev", &peer])?;
        inside(&["link", "set", &peer, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["route", "add", "default", "via", &ns.host_ip])?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.veth]);
    }
}
