//! ctl's API and the relay's metrics through ctl's own HTTP client (`ctl::client`), with the
//! answers the demo needs: JSON values and summed Prometheus samples.

use ctl::client;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// `method path` with an optional JSON body; the status and the JSON answer (`Null` if none).
pub fn call(
    ctl: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    call_as(ctl, method, path, body, None)
}

/// [`call`] with `Authorization: Bearer <credential>` when one is given.
pub fn call_as(
    ctl: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    credential: Option<&str>,
) -> Result<(u16, Value), String> {
    let body = body.map(Value::to_string);
    let auth = credential.map(|c| format!("Bearer {c}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let r = client::request(
        &format!("http://{ctl}"),
        method,
        path,
        &headers,
        body.as_deref().map(str::as_bytes),
        Duration::from_secs(10),
    )
    .map_err(|e| format!("ctl {method} {path}: {e}"))?;
    Ok((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    ))
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

/// `GET path` with `Authorization: Bearer <credential>`; anything but 200 is an error.
pub fn get_as(ctl: SocketAddr, path: &str, credential: &str) -> Result<Value, String> {
    let auth = format!("Bearer {credential}");
    let r = client::request(
        &format!("http://{ctl}"),
        "GET",
        path,
        &[("Authorization", &auth)],
        None,
        Duration::from_secs(10),
    )
    .map_err(|e| format!("ctl GET {path}: {e}"))?;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    match r.status {
        200 => Ok(v),
        status => Err(format!("ctl GET {path}: {status} {v}")),
    }
}

/// The sum of every sample of metric `name` on a Prometheus text endpoint.
pub fn metric_sum(addr: SocketAddr, name: &str) -> Result<u64, String> {
    let r = client::request(
        &format!("http://{addr}"),
        "GET",
        "/metrics",
        &[],
        None,
        Duration::from_secs(5),
    )
    .map_err(|e| format!("metrics {addr}: {e}"))?;
    Ok(r.text()
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum())
}
