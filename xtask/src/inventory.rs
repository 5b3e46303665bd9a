//! The deploy inventory: a small, documented subset of TOML parsed by hand (xtask stays
//! std-only), and its validation into [`Inventory`].
//!
//! The subset: `#` comments, `[deploy]`, repeated `[[host]]` tables, `key = value` with bare keys,
//! and values that are basic strings (`"..."` with `\" \\ \n \t` escapes), decimal integers
//! (`_` allowed), booleans and one-line arrays of strings. Anything else is an error with its
//! line number. Unknown tables and fields, missing required fields and duplicate hosts (same
//! name, same relay id, or same address, ssh port and root) are refused before any host is
//! contacted.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One parsed value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Strs(Vec<String>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Bool(_) => "a boolean",
            Value::Strs(_) => "an array of strings",
        }
    }
}

/// A table as written: its header line and its entries with their lines.
#[derive(Debug)]
pub struct Table {
    pub name: String,
    pub array: bool,
    pub line: usize,
    pub entries: Vec<(String, Value, usize)>,
}

/// Parses the TOML subset into tables (the keys before any header form a table named "").
pub fn parse_doc(text: &str) -> Result<Vec<Table>, String> {
    let mut tables = vec![Table {
        name: String::new(),
        array: false,
        line: 1,
        entries: Vec::new(),
    }];
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("[[") {
            let name = rest
                .strip_suffix("]]")
                .ok_or(format!("line {n}: malformed table header {line:?}"))?;
            tables.push(header(name, true, n)?);
        } else if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or(format!("line {n}: malformed table header {line:?}"))?;
            let t = header(name, false, n)?;
            if let Some(prev) = tables.iter().find(|p| !p.array && p.name == t.name) {
                return Err(format!(
                    "line {n}: table [{}] defined twice (first at line {})",
                    t.name, prev.line
                ));
            }
            tables.push(t);
        } else {
            let (key, value) = line
                .split_once('=')
                .ok_or(format!("line {n}: expected `key = value`, found {line:?}"))?;
            let key = key.trim();
            if !is_bare_key(key) {
                return Err(format!("line {n}: invalid key {key:?} (bare keys only)"));
            }
            let value = parse_value(value.trim()).map_err(|e| format!("line {n}: {e}"))?;
            let table = tables.last_mut().expect("the root table is always present");
            if let Some((_, _, first)) = table.entries.iter().find(|(k, _, _)| k == key) {
                return Err(format!(
                    "line {n}: field {key:?} set twice (first at line {first})"
                ));
            }
            table.entries.push((key.to_string(), value, n));
        }
    }
    Ok(tables)
}

fn header(name: &str, array: bool, line: usize) -> Result<Table, String> {
    let name = name.trim();
    if !is_bare_key(name) {
        return Err(format!("line {line}: invalid table name {name:?}"));
    }
    Ok(Table {
        name: name.to_string(),
        array,
        line,
        entries: Vec::new(),
    })
}

fn is_bare_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Cuts a `#` comment that is not inside a string.
fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

fn parse_value(v: &str) -> Result<Value, String> {
    if v.starts_with('"') {
        let (s, rest) = parse_string(v)?;
        if !rest.trim().is_empty() {
            return Err(format!(
                "unexpected text after the string: {:?}",
                rest.trim()
            ));
        }
        return Ok(Value::Str(s));
    }
    if let Some(inner) = v.strip_prefix('[') {
        let mut rest = inner.trim_start();
        let mut items = Vec::new();
        loop {
            if let Some(after) = rest.strip_prefix(']') {
                if !after.trim().is_empty() {
                    return Err("unexpected text after the array".into());
                }
                return Ok(Value::Strs(items));
            }
            if !rest.starts_with('"') {
                return Err("arrays hold strings only, on one line".into());
            }
            let (s, after) = parse_string(rest)?;
            items.push(s);
            rest = after.trim_start();
            if let Some(after) = rest.strip_prefix(',') {
                rest = after.trim_start();
            } else if !rest.starts_with(']') {
                return Err("expected `,` or `]` in the array".into());
            }
        }
    }
    match v {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    let digits = v.replace('_', "");
    digits
        .parse::<i64>()
        .map(Value::Int)
        .map_err(|_| format!("unsupported value {v:?} (strings need double quotes)"))
}

/// Parses a basic string at the start of `v`; returns it and the rest.
fn parse_string(v: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = v.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &v[i + 1..])),
            '\\' => match chars.next().map(|(_, c)| c) {
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                other => return Err(format!("unsupported escape \\{}", other.unwrap_or(' '))),
            },
            c => out.push(c),
        }
    }
    Err("unterminated string".into())
}

/// How a host's processes are started and stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// systemd units (`systemctl`); real hosts.
    Systemd,
    /// The `relay-service` script shipped in the tarball: pid files under the host root.
    /// For machines without systemd (containers, the integration test).
    Pidfile,
}

/// Settings shared by every host (`[deploy]`).
#[derive(Clone, Debug)]
pub struct Deploy {
    pub ctl: String,
    pub ctl_admin_token: Option<String>,
    /// Where a deployed ctl listens (`--listen`); default: the host and port of `ctl`.
    pub ctl_listen: String,
    pub identity_file: Option<String>,
    pub known_hosts: Option<String>,
    pub connect_timeout_s: u64,
    pub drain_timeout_s: u64,
    pub health_timeout_s: u64,
    pub keep_releases: u64,
}

/// One bare-metal host running a relay (`[[host]]`).
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub address: String,
    pub relay_id: u32,
    pub ssh_user: String,
    pub ssh_port: u16,
    pub root: String,
    pub service: Service,
    pub advertise_host: String,
    pub bind: Option<String>,
    pub base_port: Option<u16>,
    pub chat_port: Option<u16>,
    pub metrics: String,
    pub shards: Option<u32>,
    pub cpu_affinity: Option<String>,
    pub extra_args: Vec<String>,
    /// This host also runs ctl (at most one host); deploy rolls it first.
    pub ctl: bool,
    /// Line of the host's `[[host]]` header.
    pub line: usize,
}

impl Host {
    /// `path` (absolute) under the host's root, for remote commands.
    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.root.trim_end_matches('/'))
    }
}

#[derive(Clone, Debug)]
pub struct Inventory {
    pub deploy: Deploy,
    pub hosts: Vec<Host>,
}

const DEPLOY_FIELDS: &[(&str, bool)] = &[
    ("ctl", true),
    ("ctl_admin_token", false),
    ("ctl_listen", false),
    ("ssh_user", false),
    ("ssh_port", false),
    ("identity_file", false),
    ("known_hosts", false),
    ("connect_timeout_s", false),
    ("service", false),
    ("root", false),
    ("drain_timeout_s", false),
    ("health_timeout_s", false),
    ("keep_releases", false),
];

const HOST_FIELDS: &[(&str, bool)] = &[
    ("name", true),
    ("address", true),
    ("relay_id", true),
    ("ssh_user", false),
    ("ssh_port", false),
    ("root", false),
    ("service", false),
    ("advertise_host", false),
    ("bind", false),
    ("base_port", false),
    ("chat_port", false),
    ("metrics", false),
    ("shards", false),
    ("cpu_affinity", false),
    ("extra_args", false),
    ("ctl", false),
];

/// A table's fields after checking names, presence and types.
struct Fields<'a> {
    what: String,
    line: usize,
    map: BTreeMap<&'a str, (&'a Value, usize)>,
}

impl<'a> Fields<'a> {
    fn new(t: &'a Table, what: String, known: &[(&str, bool)]) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (k, v, line) in &t.entries {
            if !known.iter().any(|(name, _)| name == k) {
                let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "line {line}: unknown field {k:?} in {what} (known: {})",
                    names.join(", ")
                ));
            }
            map.insert(k.as_str(), (v, *line));
        }
        for (name, required) in known {
            if *required && !map.contains_key(name) {
                return Err(format!(
                    "line {}: {what} is missing required field {name:?}",
                    t.line
                ));
            }
        }
        Ok(Self {
            what,
            line: t.line,
            map,
        })
    }

    fn type_err(&self, key: &str, want: &str, v: &Value, line: usize) -> String {
        format!(
            "line {line}: {key:?} in {} must be {want}, found {}",
            self.what,
            v.kind()
        )
    }

    fn str(&self, key: &str) -> Result<Option<String>, String> {
        match self.map.get(key) {
            None => Ok(None),
            Some((Value::Str(s), _)) => Ok(Some(s.clone())),
            Some((v, line)) => Err(self.type_err(key, "a string", v, *line)),
        }
    }

    fn int(&self, key: &str, max: u64) -> Result<Option<u64>, String> {
        match self.map.get(key) {
            None => Ok(None),
            Some((Value::Int(i), line)) => match u64::try_from(*i) {
                Ok(u) if u <= max => Ok(Some(u)),
                _ => Err(format!(
                    "line {line}: {key:?} in {} must be between 0 and {max}, found {i}",
                    self.what
                )),
            },
            Some((v, line)) => Err(self.type_err(key, "an integer", v, *line)),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, String> {
        match self.map.get(key) {
            None => Ok(false),
            Some((Value::Bool(b), _)) => Ok(*b),
            Some((v, line)) => Err(self.type_err(key, "a boolean", v, *line)),
        }
    }

    fn strs(&self, key: &str) -> Result<Vec<String>, String> {
        match self.map.get(key) {
            None => Ok(Vec::new()),
            Some((Value::Strs(s), _)) => Ok(s.clone()),
            Some((v, line)) => Err(self.type_err(key, "an array of strings", v, *line)),
        }
    }

    fn line_of(&self, key: &str) -> usize {
        self.map.get(key).map_or(self.line, |(_, l)| *l)
    }

    fn service(&self, default: Service) -> Result<Service, String> {
        match self.str("service")?.as_deref() {
            None => Ok(default),
            Some("systemd") => Ok(Service::Systemd),
            Some("pidfile") => Ok(Service::Pidfile),
            Some(other) => Err(format!(
                "line {}: service must be \"systemd\" or \"pidfile\", found {other:?}",
                self.line_of("service")
            )),
        }
    }
}

impl Inventory {
    /// Parses and validates an inventory; errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let tables = parse_doc(text)?;
        let mut deploy_table = None;
        let mut host_tables = Vec::new();
        for t in &tables {
            match (t.name.as_str(), t.array) {
                ("", _) => {
                    if let Some((k, _, line)) = t.entries.first() {
                        return Err(format!(
                            "line {line}: field {k:?} outside a table (put it under [deploy] or [[host]])"
                        ));
                    }
                }
                ("deploy", false) => deploy_table = Some(t),
                ("host", true) => host_tables.push(t),
                ("host", false) => {
                    return Err(format!(
                        "line {}: hosts are an array of tables: write [[host]]",
                        t.line
                    ))
                }
                (name, _) => {
                    return Err(format!(
                        "line {}: unknown table {name:?} (known: [deploy], [[host]])",
                        t.line
                    ))
                }
            }
        }
        let d = deploy_table.ok_or("missing the [deploy] table (it holds at least `ctl`)")?;
        let d = Fields::new(d, "[deploy]".into(), DEPLOY_FIELDS)?;
        let ctl = d.str("ctl")?.expect("required");
        if !ctl.starts_with("http://") {
            return Err(format!(
                "line {}: ctl must be an http://host:port URL, found {ctl:?}",
                d.line_of("ctl")
            ));
        }
        let deploy = Deploy {
            ctl: ctl.trim_end_matches('/').to_string(),
            ctl_admin_token: d.str("ctl_admin_token")?,
            ctl_listen: match d.str("ctl_listen")? {
                Some(l) => l,
                None => ctl["http://".len()..].trim_end_matches('/').to_string(),
            },
            identity_file: d.str("identity_file")?,
            known_hosts: d.str("known_hosts")?,
            connect_timeout_s: d.int("connect_timeout_s", 600)?.unwrap_or(5).max(1),
            drain_timeout_s: d.int("drain_timeout_s", 86_400)?.unwrap_or(300),
            health_timeout_s: d.int("health_timeout_s", 3600)?.unwrap_or(30).max(1),
            keep_releases: d.int("keep_releases", 100)?.unwrap_or(3).max(1),
        };
        let default_user = d.str("ssh_user")?.unwrap_or_else(|| "root".into());
        let default_port = d.int("ssh_port", 65535)?.unwrap_or(22) as u16;
        let default_root = d.str("root")?.unwrap_or_else(|| "/".into());
        let default_service = d.service(Service::Systemd)?;
        if host_tables.is_empty() {
            return Err("no [[host]] in the inventory".into());
        }
        let mut hosts: Vec<Host> = Vec::new();
        for t in host_tables {
            let f = Fields::new(t, format!("[[host]] at line {}", t.line), HOST_FIELDS)?;
            let relay_id = f.int("relay_id", u64::from(u32::MAX))?.expect("required") as u32;
            if relay_id == 0 {
                return Err(format!(
                    "line {}: relay_id must be nonzero",
                    f.line_of("relay_id")
                ));
            }
            let address = f.str("address")?.expect("required");
            let host = Host {
                name: f.str("name")?.expect("required"),
                advertise_host: f.str("advertise_host")?.unwrap_or_else(|| address.clone()),
                address,
                relay_id,
                ssh_user: f.str("ssh_user")?.unwrap_or_else(|| default_user.clone()),
                ssh_port: f.int("ssh_port", 65535)?.map_or(default_port, |p| p as u16),
                root: f.str("root")?.unwrap_or_else(|| default_root.clone()),
                service: f.service(default_service)?,
                bind: f.str("bind")?,
                base_port: f.int("base_port", 65535)?.map(|p| p as u16),
                chat_port: f.int("chat_port", 65535)?.map(|p| p as u16),
                metrics: f.str("metrics")?.unwrap_or_else(|| "127.0.0.1:9100".into()),
                shards: f.int("shards", 1024)?.map(|s| s as u32),
                cpu_affinity: f.str("cpu_affinity")?,
                ctl: f.bool("ctl")?,
                extra_args: f.strs("extra_args")?,
                line: t.line,
            };
            check_host(&host, &f)?;
            if let Some(prev) = hosts.iter().find(|h| h.name == host.name) {
                return Err(format!(
                    "line {}: duplicate host {:?} (first defined at line {})",
                    t.line, host.name, prev.line
                ));
            }
            if let Some(prev) = hosts.iter().find(|h| h.relay_id == host.relay_id) {
                return Err(format!(
                    "line {}: host {:?} has relay_id {}, already used by host {:?} (line {})",
                    t.line, host.name, host.relay_id, prev.name, prev.line
                ));
            }
            if let Some(prev) = hosts.iter().find(|h| {
                h.address == host.address && h.ssh_port == host.ssh_port && h.root == host.root
            }) {
                return Err(format!(
                    "line {}: host {:?} is the same machine as host {:?} (line {}): {}:{} root {}",
                    t.line, host.name, prev.name, prev.line, host.address, host.ssh_port, host.root
                ));
            }
            if let Some(prev) = hosts.iter().find(|h| h.ctl && host.ctl) {
                return Err(format!(
                    "line {}: ctl = true on host {:?} and on host {:?} (line {}): one ctl per inventory",
                    f.line_of("ctl"),
                    host.name,
                    prev.name,
                    prev.line
                ));
            }
            hosts.push(host);
        }
        if hosts.iter().any(|h| h.ctl) && !is_shell_safe(&deploy.ctl_listen) {
            return Err("ctl_listen may hold only letters, digits and -_.:/,=@+%[]".into());
        }
        Ok(Self { deploy, hosts })
    }
}

fn check_host(h: &Host, f: &Fields) -> Result<(), String> {
    let bad = |key: &str, why: &str| Err(format!("line {}: {key}: {why}", f.line_of(key)));
    if !h.root.starts_with('/') {
        return bad("root", "must be an absolute path");
    }
    if h.service == Service::Systemd && !h.root.trim_end_matches('/').is_empty() {
        return bad(
            "service",
            "systemd units use absolute paths, so service = \"systemd\" needs root = \"/\"",
        );
    }
    if h.metrics.parse::<std::net::SocketAddr>().is_err() {
        return bad("metrics", "must be an IP:port address");
    }
    if h.cpu_affinity.is_some() && h.service != Service::Systemd {
        return bad("cpu_affinity", "is applied through systemd only");
    }
    let shell_safe = is_shell_safe;
    for (key, v) in [
        ("name", &h.name),
        ("address", &h.address),
        ("root", &h.root),
        ("ssh_user", &h.ssh_user),
        ("advertise_host", &h.advertise_host),
    ] {
        if !shell_safe(v) {
            return bad(key, "may hold only letters, digits and -_.:/,=@+%");
        }
    }
    if let Some(a) = h.extra_args.iter().find(|a| !shell_safe(a)) {
        return bad(
            "extra_args",
            &format!("{a:?} may hold only letters, digits and -_.:/,=@+%"),
        );
    }
    Ok(())
}

/// Values that go into remote command lines unquoted (relay.env) must not need quoting.
fn is_shell_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/,=@+%[]".contains(&b))
}

/// The inventory as a one-line-per-host summary (for the deploy plan).
pub fn summary(inv: &Inventory) -> String {
    let mut s = String::new();
    for h in &inv.hosts {
        let _ = writeln!(
            s,
            "  {} ({}@{}:{}, root {}, relay {}{}, {:?})",
            h.name,
            h.ssh_user,
            h.address,
            h.ssh_port,
            h.root,
            h.relay_id,
            if h.ctl { " and ctl" } else { "" },
            h.service
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
# a comment
[deploy]
ctl = "http://10.0.0.1:8080"   # trailing comment
drain_timeout_s = 1_200

[[host]]
name = "a"
address = "10.0.0.11"
relay_id = 1
extra_args = ["--io", "batch"]

[[host]]
name = "b"
address = "10.0.0.12"
relay_id = 2
ssh_port = 2222
"#;

    #[test]
    fn parses_the_subset() {
        let inv = Inventory::parse(GOOD).unwrap();
        assert_eq!(inv.deploy.ctl, "http://10.0.0.1:8080");
        assert_eq!(inv.deploy.drain_timeout_s, 1200);
        assert_eq!(inv.hosts.len(), 2);
        assert_eq!(inv.hosts[0].extra_args, ["--io", "batch"]);
        assert_eq!(inv.hosts[0].advertise_host, "10.0.0.11");
        assert_eq!(inv.hosts[1].ssh_port, 2222);
        assert_eq!(inv.hosts[0].service, Service::Systemd);
        assert_eq!(inv.hosts[1].path("/etc/relay"), "/etc/relay");
        assert_eq!(inv.deploy.ctl_listen, "10.0.0.1:8080");
        assert!(!inv.hosts[0].ctl);
    }

    #[test]
    fn the_example_inventory_parses() {
        let text = include_str!("../inventory.example.toml");
        Inventory::parse(text).unwrap();
    }

    fn err(text: &str) -> String {
        Inventory::parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let e = err(&GOOD.replace("relay_id = 2", "relay_id = 2\ncolour = \"red\""));
        assert!(
            e.starts_with("line 17: unknown field \"colour\" in [[host]]"),
            "{e}"
        );
        let e = err(&GOOD.replace("relay_id = 2\n", ""));
        assert!(
            e.contains("line 13: [[host]] at line 13 is missing required field \"relay_id\""),
            "{e}"
        );
        let e = err(&GOOD.replace("name = \"b\"", "name = \"a\""));
        assert!(
            e.contains("line 13: duplicate host \"a\" (first defined at line 7)"),
            "{e}"
        );
        let e = err(&GOOD.replace("relay_id = 2", "relay_id = 1"));
        assert!(e.contains("relay_id 1, already used by host \"a\""), "{e}");
        let e = err(&GOOD
            .replace("10.0.0.12", "10.0.0.11")
            .replace("ssh_port = 2222", ""));
        assert!(e.contains("is the same machine as host \"a\""), "{e}");
        let e = err(&GOOD.replace("relay_id = 1", "relay_id = \"1\""));
        assert!(
            e.contains(
                "line 10: \"relay_id\" in [[host]] at line 7 must be an integer, found a string"
            ),
            "{e}"
        );
        let e = err(&GOOD.replace("[deploy]", "[deploy]\nctl = \"x\""));
        assert!(
            e.contains("line 5: field \"ctl\" set twice (first at line 4)"),
            "{e}"
        );
        assert!(err(&GOOD.replace("[deploy]", "[deplo]")).contains("unknown table \"deplo\""));
        assert!(err("[deploy]\nctl = \"http://x:1\"\n").contains("no [[host]]"));
        assert!(err("[[host]]\nname = \"a\"").contains("missing the [deploy] table"));
        assert!(err(&GOOD.replace("= 1_200", "= 1.5")).contains("line 5: unsupported value"));
        assert!(err(&GOOD.replace("\"10.0.0.11\"", "\"10.0.0.11")).contains("unterminated"));
        let e = err(&GOOD.replace("relay_id = 2", "relay_id = 2\nroot = \"/tmp/x\""));
        assert!(e.contains("needs root = \"/\""), "{e}");
        let e = err(&GOOD
            .replace("relay_id = 1\n", "relay_id = 1\nctl = true\n")
            .replace("relay_id = 2\n", "relay_id = 2\nctl = true\n"));
        assert!(e.contains("one ctl per inventory"), "{e}");
        let e = err(&GOOD.replace("relay_id = 1\n", "relay_id = 1\nctl = \"yes\"\n"));
        assert!(
            e.contains("\"ctl\" in [[host]] at line 7 must be a boolean"),
            "{e}"
        );
        let e = err(&GOOD.replace("\"batch\"", "\"batch; rm -rf /\""));
        assert!(e.contains("extra_args"), "{e}");
    }

    #[test]
    fn strings_keep_hashes_and_escapes() {
        let t = parse_doc("[deploy]\nx = \"a#b \\\"q\\\" \\\\\" # c\n").unwrap();
        assert_eq!(t[1].entries[0].1, Value::Str("a#b \"q\" \\".into()));
    }
}
