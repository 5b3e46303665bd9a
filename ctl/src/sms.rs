//! Where sign-in codes go: one interface, two gateways (ctl/API.md, "Accounts").
//!
//! - **Outbox** (the default): one JSON line per message, `{"to": ..., "body": ..., "at": ...}`,
//!   appended to `DATA_DIR/sms-outbox.jsonl` (mode 0600). `cargo xtask demo` and the tests read
//!   their codes there; an operator without a provider can too.
//! - **Webhook** (`sms_webhook_url`): an HTTP POST of `{"to": ..., "body": ...}` to a
//!   provider's endpoint (or a bridge to one), with `Authorization: Bearer <sms_webhook_token>`
//!   when set; any 2xx answer means it was taken. 5 s at most.
#![forbid(unsafe_code)]

use crate::accounts::Sms;
use crate::config::Secret;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Time a webhook has to answer.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// An SMS gateway.
#[derive(Clone, Debug)]
pub enum Gateway {
    /// Lines appended to a file.
    Outbox(PathBuf),
    /// A POST to a provider.
    Webhook { url: String, token: Option<Secret> },
}

impl Gateway {
    /// Hands `sms` over (blocking: run it off the runtime's thread).
    pub fn send(&self, sms: &Sms, unix_s: u64) -> Result<(), String> {
        match self {
            Gateway::Outbox(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let line = serde_json::json!({"to": sms.to, "body": sms.body, "at": unix_s});
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                // One write per line: lines from concurrent sends never interleave.
                f.write_all(format!("{line}\n").as_bytes())
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Gateway::Webhook { url, token } => {
                let (base, path) = split_url(url)?;
                let body = serde_json::json!({"to": sms.to, "body": sms.body}).to_string();
                let auth = token.as_ref().map(|t| format!("Bearer {}", t.expose()));
                let mut headers = vec![("Content-Type", "application/json")];
                if let Some(a) = &auth {
                    headers.push(("Authorization", a));
                }
                let r = crate::client::request(
                    base,
                    "POST",
                    path,
                    &headers,
                    Some(body.as_bytes()),
                    WEBHOOK_TIMEOUT,
                )
                .map_err(|e| format!("SMS webhook: {e}"))?;
                if (200..300).contains(&r.status) {
                    Ok(())
                } else {
                    Err(format!("SMS webhook answered {}", r.status))
                }
            }
        }
    }
}

/// `http://host:port/path` as (`http://host:port`, `/path`).
fn split_url(url: &str) -> Result<(&str, &str), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("sms_webhook_url: only http:// URLs (a local bridge to the provider)")?;
    let cut = rest.find('/').map_or(url.len(), |i| "http://".len() + i);
    let (base, path) = url.split_at(cut);
    Ok((base, if path.is_empty() { "/" } else { path }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};

    fn sms() -> Sms {
        Sms {
            to: "+12025550143".into(),
            body: "Your sign-in code: 123456.".into(),
        }
    }

    #[test]
    fn the_outbox_gets_one_json_line_per_message() {
        let dir = std::env::temp_dir().join(format!("ctl-sms-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let g = Gateway::Outbox(dir.join("out.jsonl"));
        g.send(&sms(), 1).unwrap();
        g.send(&sms(), 2).unwrap();
        let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["to"], "+12025550143");
        assert_eq!(lines[1]["at"], 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A local HTTP receiver stands in for the provider: it gets the POST, its path, the
    /// credential and the message; a 500 from it is an error.
    #[test]
    fn the_webhook_posts_to_a_local_receiver_and_reports_its_refusals() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/sms/send", listener.local_addr().unwrap());
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            for status in ["200 OK", "500 Internal Server Error"] {
                let (s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let mut s = s;
                write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").unwrap();
                got.push((head, String::from_utf8(body).unwrap()));
            }
            got
        });
        let g = Gateway::Webhook {
            url,
            token: Some(Secret("provider-secret-0123".into())),
        };
        g.send(&sms(), 0).unwrap();
        assert!(g.send(&sms(), 0).unwrap_err().contains("500"));
        let got = receiver.join().unwrap();
        assert!(
            got[0].0.starts_with("POST /sms/send HTTP/1.1\r\n"),
            "{}",
            got[0].0
        );
        assert!(got[0]
            .0
            .contains("Authorization: Bearer provider-secret-0123"));
        let body: serde_json::Value = serde_json::from_str(&got[0].1).unwrap();
        assert_eq!(body["to"], "+12025550143");
        assert_eq!(body["body"], "Your sign-in code: 123456.");
    }
}
