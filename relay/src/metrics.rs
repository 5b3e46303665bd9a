//! The control thread's Prometheus text endpoint: `/metrics` and `/health`.
//! Off the packet path: it reads counters the shards publish every 100 ms.

use crate::engine::DropReason;
use crate::io::link::LinkStats;
use crate::io::{Backend, ShardStats};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Renders every shard's counters in the Prometheus text format.
pub fn render(stats: &[Arc<ShardStats>], backend: Backend) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE relay_backend gauge");
    let _ = writeln!(out, "relay_backend{{io=\"{}\"}} 1", backend.as_str());
    family(
        &mut out,
        stats,
        &ShardStats::FIELDS,
        &["rooms", "participants"],
    );
    family(
        &mut out,
        stats,
        &ShardStats::CHAT_FIELDS,
        &[
            "chat_sessions",
            "chat_pending",
            "chat_chats",
            "chat_log_bytes",
            "chat_spill_depth",
        ],
    );
    // The whole process's heap (every shard, the sync threads, this thread): what the relay
    // holds, apart from RSS's fragmentation and code (perf/SOAK.md).
    if let Some((in_use, free)) = crate::io::sys::heap_bytes() {
        let _ = writeln!(out, "# TYPE relay_heap_in_use_bytes gauge");
        let _ = writeln!(out, "relay_heap_in_use_bytes {in_use}");
        let _ = writeln!(out, "# TYPE relay_heap_free_bytes gauge");
        let _ = writeln!(out, "relay_heap_free_bytes {free}");
    }
    let _ = writeln!(out, "# TYPE relay_drops_total counter");
    for (i, s) in stats.iter().enumerate() {
        for (reason, n) in DropReason::ALL.iter().zip(s.drops()) {
            let _ = writeln!(
                out,
                "relay_drops_total{{shard=\"{i}\",reason=\"{}\"}} {n}",
                reason.as_str()
            );
        }
    }
    out
}

/// One metric per field, one sample per shard; `gauges` are the fields that are not counters.
fn family(out: &mut String, stats: &[Arc<ShardStats>], fields: &[&str], gauges: &[&str]) {
    for field in fields {
        let gauge = gauges.contains(field);
        let (name, kind) = if gauge {
            (format!("relay_{field}"), "gauge")
        } else {
            (format!("relay_{field}_total"), "counter")
        };
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (i, s) in stats.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", s.get(field).unwrap_or(0));
        }
    }
}

/// Renders the link thread's counters (`relay_link_*`, PROTOCOL.md section 8).
pub fn render_links(l: &LinkStats) -> String {
    let mut out = String::new();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, v) in [
        ("relay_link_frames_out_total", "counter", get(&l.frames_out)),
        ("relay_link_writes_total", "counter", get(&l.writes)),
        ("relay_link_frames_in_total", "counter", get(&l.frames_in)),
        ("relay_link_refused_total", "counter", get(&l.refused)),
        ("relay_link_bad_frames_total", "counter", get(&l.bad_frames)),
        ("relay_link_bounced_total", "counter", get(&l.bounced)),
        ("relay_link_dropped_total", "counter", get(&l.dropped)),
        ("relay_link_ups_total", "counter", get(&l.ups)),
        ("relay_links_up", "gauge", get(&l.up_now)),
    ] {
        let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {v}");
    }
    out
}

/// Serves the endpoint on `listener` until the process ends. One request per connection, each
/// bounded by a 2 s timeout, so a slow client cannot hold the thread.
pub fn serve(
    listener: TcpListener,
    stats: Vec<Arc<ShardStats>>,
    backend: Backend,
    links: Option<Arc<LinkStats>>,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = respond(conn, &stats, backend, links.as_deref());
    }
}

fn respond(
    mut conn: TcpStream,
    stats: &[Arc<ShardStats>],
    backend: Backend,
    links: Option<&LinkStats>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut req = [0u8; 1024];
    let mut n = 0;
    while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut req[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let line = req[..n].split(|&b| b == b'\r').next().unwrap_or(&[]);
    let (status, body) = if line.starts_with(b"GET /metrics") {
        let mut text = render(stats, backend);
        text.extend(links.map(render_links));
        ("200 OK", text)
    } else if line.starts_with(b"GET /health") {
        ("200 OK", "ok\n".to_string())
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
