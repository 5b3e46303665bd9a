//! One JSON request to ctl over a fresh TCP connection (HTTP/1.1, `Connection: close`).

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `method path` with an optional JSON body; the status and the JSON answer (`Null` if none).
pub fn call(
    ctl: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let fail = |e: std::io::Error| format!("ctl {method} {path}: {e}");
    let mut s = TcpStream::connect_timeout(&ctl, Duration::from_secs(2)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(fail)?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ctl\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(fail)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(fail)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("ctl {method} {path}: not an HTTP answer"))?;
    let json = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(json).unwrap_or(Value::Null)))
}

/// Like [`call`], but anything other than `want` is an error carrying ctl's answer.
pub fn expect(
    ctl: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    want: u16,
) -> Result<Value, String> {
    let (status, v) = call(ctl, method, path, body)?;
    if status == want {
        Ok(v)
    } else {
        Err(format!("ctl {method} {path}: {status} {v}"))
    }
}

/// The sum of every sample of metric `name` on a Prometheus text endpoint.
pub fn metric_sum(addr: SocketAddr, name: &str) -> Result<u64, String> {
    let fail = |e: std::io::Error| format!("metrics {addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(fail)?;
    Ok(resp
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum())
}
