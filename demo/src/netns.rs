//! Network namespaces for `demo up` when run as root: relay i lives in its own namespace,
//! joined to this one by a veth pair, `10.N.i.1` on this side and `10.N.i.2` inside, where N
//! depends on the process id so that two `up`s do not collide. Relays reach ctl through their
//! default route; people on this host reach the relays directly. Dropping one removes it.

use std::process::{Command, Stdio};

pub struct Netns {
    name: String,
    veth: String,
    /// This side of the veth pair: the relay's gateway (and where ctl listens for relay 1).
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

impl Netns {
    /// Namespace `i` (1-based) for this process.
    pub fn create(i: u32) -> Result<Self, String> {
        let pid = std::process::id();
        let net = 200 + pid % 50;
        let ns = Self {
            name: format!("relay-up-{pid}-{i}"),
            veth: format!("ru{}h{i}", pid % 100_000),
            host_ip: format!("10.{net}.{i}.1"),
            ns_ip: format!("10.{net}.{i}.2"),
        };
        let peer = format!("ru{}n{i}", pid % 100_000);
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop cleans up whatever was made.
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_ip),
            "dev",
            &ns.veth,
        ])?;
        ip(&["link", "set", &ns.veth, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/24", ns.ns_ip), "dev", &peer])?;
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
