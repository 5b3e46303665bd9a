//! Remote commands over the system `ssh` (BatchMode: never a prompt), a tiny HTTP/1.1 client
//! for ctl, and a small JSON reader for its answers. Standard library only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::inventory::{Deploy, Host};
use crate::Result;

/// Quotes a string for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `ssh` command for a host, without the remote command.
fn ssh_cmd(d: &Deploy, h: &Host) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
        .args(["-o", &format!("ConnectTimeout={}", d.connect_timeout_s)])
        .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"])
        .args(["-p", &h.ssh_port.to_string()]);
    if let Some(id) = &d.identity_file {
        c.args(["-i", id, "-o", "IdentitiesOnly=yes"]);
    }
    if let Some(kh) = &d.known_hosts {
        c.args(["-o", &format!("UserKnownHostsFile={kh}")])
            .args(["-o", "StrictHostKeyChecking=yes"]);
    }
    c.arg(format!("{}@{}", h.ssh_user, h.address));
    c
}

/// Runs `script` with `sh -s` on the host (the script travels on stdin, so no quoting layer
/// of ssh's command line is involved); returns stdout. Fails with stderr on a nonzero exit.
pub fn run(d: &Deploy, h: &Host, script: &str) -> Result<String> {
    run_with_input(d, h, &format!("set -eu\n{script}"), None)
}

/// Streams a local file to `remote_path` on the host (`cat >`), creating it with mode 0644.
pub fn upload(d: &Deploy, h: &Host, local: &Path, remote_path: &str) -> Result {
    let script = format!("umask 022; cat > {}", sh_quote(remote_path));
    run_with_input(d, h, &script, Some(local)).map(drop)
}

fn run_with_input(d: &Deploy, h: &Host, script: &str, input: Option<&Path>) -> Result<String> {
    let mut cmd = ssh_cmd(d, h);
    // With a file on stdin the script goes on the command line (it is short and quoted).
    match input {
        Some(_) => cmd.arg(script),
        None => cmd.args(["sh", "-s"]),
    };
    let stdin = match input {
        Some(p) => {
            Stdio::from(std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        None => Stdio::piped(),
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ssh (apt-get install openssh-client): {e}"))?;
    if input.is_none() {
        let mut w = child.stdin.take().expect("stdin is piped");
        w.write_all(script.as_bytes())
            .map_err(|e| format!("{}: writing the script to ssh: {e}", h.name))?;
    }
    // A remote command that hangs must not hang the deploy: an upload gets 10 minutes, any
    // other step (a stop is bounded by its own 20 s timeout) 3 minutes.
    let limit = Duration::from_secs(if input.is_some() { 600 } else { 180 });
    let out = wait_bounded(child, limit).map_err(|e| format!("{}: ssh: {e}", h.name))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        // 255 is ssh's own failure (connection, authentication, host key).
        Some(255) => Err(format!(
            "{}: cannot reach {}@{}:{} over ssh: {}",
            h.name,
            h.ssh_user,
            h.address,
            h.ssh_port,
            if stderr.is_empty() {
                "ssh failed"
            } else {
                &stderr
            }
        )),
        _ => {
            // Tools such as `relay-service status` explain themselves on stdout.
            let stdout = String::from_utf8_lossy(&out.stdout);
            let why = if stderr.is_empty() {
                stdout.trim()
            } else {
                &stderr
            };
            Err(format!(
                "{}: remote command failed ({}): {why}",
                h.name, out.status
            ))
        }
    }
}

/// Waits for a child whose stdout and stderr are piped, killing it after `limit`.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> Result<std::process::Output> {
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {} s; killed", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// An HTTP answer.
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request to `base` (`http://host:port`) with `Connection: close`.
pub fn http(base: &str, method: &str, path: &str, token: Option<&str>) -> Result<Response> {
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// URL: {base}"))?;
    let addr: SocketAddr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{base}: {e}"))?
        .next()
        .ok_or_else(|| format!("{base}: no address"))?;
    let err = |e: std::io::Error| format!("{method} {base}{path}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(err)?;
    let mut resp = Vec::new();
    s.take(16 << 20).read_to_end(&mut resp).map_err(err)?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {base}{path}: malformed answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{method} {base}{path}: malformed status line"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// A JSON value (numbers as f64: ctl's ids are below 2^53).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> Result<Json> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("JSON: trailing data at byte {}", p.i));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map_or(&Json::Null, |(_, v)| v),
            _ => &Json::Null,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            _ => &[],
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json> {
        if depth > 64 {
            return Err("JSON: nested too deeply".into());
        }
        self.ws();
        let err = |i: usize| format!("JSON: unexpected input at byte {i}");
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return Err(err(self.i));
                    }
                    fields.push((k, self.value(depth + 1)?));
                    self.ws();
                    if self.eat("}") {
                        return Ok(Json::Obj(fields));
                    }
                    if !self.eat(",") {
                        return Err(err(self.i));
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat("]") {
                        return Ok(Json::Arr(items));
                    }
                    if !self.eat(",") {
                        return Err(err(self.i));
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            _ if self.eat("null") => Ok(Json::Null),
            _ if self.eat("true") => Ok(Json::Bool(true)),
            _ if self.eat("false") => Ok(Json::Bool(false)),
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-0123456789.eE".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .map(Json::Num)
                    .ok_or_else(|| err(start))
            }
        }
    }

    fn string(&mut self) -> Result<String> {
        if !self.eat("\"") {
            return Err(format!("JSON: expected a string at byte {}", self.i));
        }
        let mut out = Vec::new();
        while let Some(&b) = self.s.get(self.i) {
            self.i += 1;
            match b {
                b'"' => return String::from_utf8(out).map_err(|e| format!("JSON: {e}")),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("JSON: truncated escape")?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("JSON: bad \\u")?;
                            self.i += 4;
                            let c = std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .and_then(char::from_u32)
                                .unwrap_or('\u{fffd}');
                            out.extend_from_slice(c.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                other => out.push(other),
            }
        }
        Err("JSON: unterminated string".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn reads_ctl_answers() {
        let j = Json::parse(
            r#"{"relays": [{"relay_id": 7, "state": "serving", "rooms": [1, 2],
                "labels": {}, "x": null, "t": true, "s": "a\"\u00e9"}]}"#,
        )
        .unwrap();
        let r = &j.get("relays").as_array()[0];
        assert_eq!(r.get("relay_id").as_u64(), Some(7));
        assert_eq!(r.get("state").as_str(), Some("serving"));
        assert_eq!(r.get("rooms").as_array().len(), 2);
        assert_eq!(r.get("s").as_str(), Some("a\"é"));
        assert_eq!(r.get("missing"), &Json::Null);
        assert!(Json::parse("{\"a\": }").is_err());
        assert!(Json::parse("[1] x").is_err());
    }
}
