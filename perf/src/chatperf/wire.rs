//! Pure protocol pieces: NATS core and RESP (Redis) parsing and encoding, the timestamped
//! message body, Prometheus text and `/proc` parsing, and percentile extraction.

use hdrhistogram::Histogram;

/// Finds the first `\r\n` in `buf`.
fn crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A server-to-client NATS core operation.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsOp<'a> {
    /// `MSG subject sid [reply] n` and its payload.
    Msg(&'a [u8]),
    /// Keepalive from the server (answer PONG).
    Ping,
    /// Answer to our PING.
    Pong,
    /// `+OK` (verbose mode).
    Ok,
    /// `-ERR '...'`.
    Err(String),
    /// `INFO {...}`.
    Info,
}

/// Splits the first complete NATS operation off `buf`: `Ok(None)` when more bytes are needed.
pub fn nats_parse(buf: &[u8]) -> Result<Option<(NatsOp<'_>, usize)>, String> {
    let Some(eol) = crlf(buf) else {
        if buf.len() > 4096 {
            return Err("NATS control line longer than 4 KiB".into());
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let head = eol + 2;
    let text = std::str::from_utf8(line).map_err(|_| "NATS line is not UTF-8".to_string())?;
    let mut words = text.split_ascii_whitespace();
    let op = words.next().unwrap_or("").to_ascii_uppercase();
    let single = |o| Ok(Some((o, head)));
    match op.as_str() {
        "MSG" => {
            let rest: Vec<&str> = words.collect();
            if !(3..=4).contains(&rest.len()) {
                return Err(format!("bad MSG line {text:?}"));
            }
            let n: usize = rest[rest.len() - 1]
                .parse()
                .map_err(|_| format!("bad MSG size in {text:?}"))?;
            if buf.len() < head + n + 2 {
                return Ok(None);
            }
            if &buf[head + n..head + n + 2] != b"\r\n" {
                return Err("MSG payload not followed by CRLF".into());
            }
            Ok(Some((NatsOp::Msg(&buf[head..head + n]), head + n + 2)))
        }
        "PING" => single(NatsOp::Ping),
        "PONG" => single(NatsOp::Pong),
        "+OK" => single(NatsOp::Ok),
        "-ERR" => single(NatsOp::Err(text[4..].trim().to_string())),
        "INFO" => single(NatsOp::Info),
        _ => Err(format!("unknown NATS operation {text:?}")),
    }
}

/// Appends `PUB subject n\r\npayload\r\n`.
pub fn nats_pub(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// A RESP value (the subset Redis pub/sub uses).
#[derive(Debug, PartialEq, Eq)]
pub enum Resp<'a> {
    /// `+text`.
    Simple(&'a [u8]),
    /// `-text`.
    Error(&'a [u8]),
    /// `:n`.
    Int(i64),
    /// `$n` bulk string, `None` for `$-1`.
    Bulk(Option<&'a [u8]>),
    /// `*n` array.
    Array(Vec<Resp<'a>>),
}

/// Splits the first complete RESP value off `buf`: `Ok(None)` when more bytes are needed.
pub fn resp_parse(buf: &[u8]) -> Result<Option<(Resp<'_>, usize)>, String> {
    let Some(eol) = crlf(buf) else {
        return Ok(None);
    };
    if eol == 0 {
        return Err("empty RESP line".into());
    }
    let line = &buf[1..eol];
    let head = eol + 2;
    let num = || -> Result<i64, String> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad RESP number {:?}", String::from_utf8_lossy(line)))
    };
    match buf[0] {
        b'+' => Ok(Some((Resp::Simple(line), head))),
        b'-' => Ok(Some((Resp::Error(line), head))),
        b':' => Ok(Some((Resp::Int(num()?), head))),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok(Some((Resp::Bulk(None), head)));
            }
            let n = n as usize;
            if buf.len() < head + n + 2 {
                return Ok(None);
            }
            Ok(Some((Resp::Bulk(Some(&buf[head..head + n])), head + n + 2)))
        }
        b'*' => {
            let n = num()?;
            let mut items = Vec::with_capacity(n.max(0) as usize);
            let mut at = head;
            for _ in 0..n.max(0) {
                match resp_parse(&buf[at..])? {
                    Some((v, used)) => {
                        items.push(v);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Resp::Array(items), at)))
        }
        t => Err(format!("unknown RESP type byte 0x{t:02x}")),
    }
}

/// Appends a RESP command (an array of bulk strings).
pub fn resp_cmd(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The payload of a pub/sub `message` push (`["message", channel, payload]`), if `v` is one.
pub fn resp_message<'a>(v: &Resp<'a>) -> Option<&'a [u8]> {
    match v {
        Resp::Array(items) => match items.as_slice() {
            [Resp::Bulk(Some(b"message")), _, Resp::Bulk(Some(p))] => Some(p),
            _ => None,
        },
        _ => None,
    }
}

/// The entries of an XREADGROUP reply (`[[stream, [[id, [field, value]], ...]]]`) as
/// (id, value) pairs; `None` if `v` is not one.
pub fn resp_stream_entries<'a>(v: &Resp<'a>) -> Option<Vec<(&'a [u8], &'a [u8])>> {
    let Resp::Array(streams) = v else {
        return None;
    };
    let mut out = Vec::new();
    for stream in streams {
        let Resp::Array(pair) = stream else {
            return None;
        };
        let [Resp::Bulk(Some(_)), Resp::Array(entries)] = pair.as_slice() else {
            return None;
        };
        for entry in entries {
            let Resp::Array(e) = entry else {
                return None;
            };
            let [Resp::Bulk(Some(id)), Resp::Array(fields)] = e.as_slice() else {
                return None;
            };
            let [Resp::Bulk(Some(_)), Resp::Bulk(Some(value))] = fields.as_slice() else {
                return None;
            };
            out.push((*id, *value));
        }
    }
    Some(out)
}

/// Fills `body` (at least 16 bytes) with the send time (ns since the run's epoch) and a
/// sequence number, then a filler.
pub fn stamp(body: &mut [u8], t_ns: u64, seq: u64) {
    body[..8].copy_from_slice(&t_ns.to_le_bytes());
    body[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in body[16..].iter_mut().enumerate() {
        *b = b'a' + (i % 26) as u8;
    }
}

/// The send time and sequence number written by [`stamp`].
pub fn read_stamp(body: &[u8]) -> Option<(u64, u64)> {
    let t = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let s = u64::from_le_bytes(body.get(8..16)?.try_into().ok()?);
    Some((t, s))
}

/// Sums every sample of the Prometheus text whose name is `name` (any labels).
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let base = key.split('{').next()?;
            (base == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .sum()
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes.
pub fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `write_bytes` of a `/proc/PID/io` text: bytes the process caused to be written to storage.
pub fn io_write_bytes(io: &str) -> Option<u64> {
    let line = io.lines().find(|l| l.starts_with("write_bytes:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// TCP socket memory in pages from `/proc/net/sockstat` (`TCP: inuse .. mem N`).
pub fn sockstat_tcp_pages(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse().ok();
        }
    }
    None
}

/// The `metrics=` and `chat=` fields of the relay's `ready ...` line.
pub fn ready_fields(line: &str) -> Option<(std::net::SocketAddr, u16)> {
    let mut metrics = None;
    let mut chat = None;
    for w in line.split_whitespace() {
        if let Some(m) = w.strip_prefix("metrics=") {
            metrics = m.parse().ok();
        } else if let Some(c) = w.strip_prefix("chat=") {
            chat = c.split('-').next()?.parse().ok();
        }
    }
    Some((metrics?, chat?))
}

/// p50, p99 and max of a latency histogram in microseconds (recorded in nanoseconds).
pub fn percentiles_us(h: &Histogram<u64>) -> (f64, f64, f64) {
    if h.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    (
        us(h.value_at_quantile(0.50)),
        us(h.value_at_quantile(0.99)),
        us(h.max()),
    )
}

/// A latency histogram: 1 ns to 60 s, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_ops_split_and_wait_for_payload() {
        let buf =
            b"INFO {\"a\":1}\r\nPING\r\nMSG p.1 1 5\r\nhello\r\nMSG p.2 7 r.x 2\r\nhi\r\n+OK\r\n";
        let mut at = 0;
        let mut ops = Vec::new();
        while let Some((op, n)) = nats_parse(&buf[at..]).unwrap() {
            ops.push(format!("{op:?}"));
            at += n;
        }
        assert_eq!(at, buf.len());
        assert_eq!(
            ops,
            [
                "Info",
                "Ping",
                "Msg([104, 101, 108, 108, 111])",
                "Msg([104, 105])",
                "Ok"
            ]
        );
        assert_eq!(nats_parse(b"MSG p.1 1 5\r\nhel").unwrap(), None);
        assert_eq!(nats_parse(b"MSG p.1 1 5").unwrap(), None);
        assert!(nats_parse(b"WHAT\r\n").is_err());
        assert_eq!(
            nats_parse(b"-ERR 'Slow Consumer'\r\n").unwrap(),
            Some((NatsOp::Err("'Slow Consumer'".into()), 22))
        );
        let mut out = Vec::new();
        nats_pub(&mut out, "p.3", b"xyz");
        assert_eq!(out, b"PUB p.3 3\r\nxyz\r\n");
    }

    #[test]
    fn resp_values_and_pubsub_messages() {
        let mut out = Vec::new();
        resp_cmd(&mut out, &[b"PUBLISH", b"c.1", b"a\r\nb"]);
        assert_eq!(out, b"*3\r\n$7\r\nPUBLISH\r\n$3\r\nc.1\r\n$4\r\na\r\nb\r\n");
        let push = b"*3\r\n$7\r\nmessage\r\n$3\r\nc.1\r\n$4\r\na\r\nb\r\n:1\r\n";
        let (v, n) = resp_parse(push).unwrap().unwrap();
        assert_eq!(resp_message(&v), Some(&b"a\r\nb"[..]));
        assert_eq!(resp_parse(&push[n..]).unwrap(), Some((Resp::Int(1), 4)));
        for cut in 0..n {
            assert_eq!(resp_parse(&push[..cut]).unwrap(), None, "cut {cut}");
        }
        let sub = b"*3\r\n$9\r\nsubscribe\r\n$3\r\nc.1\r\n:1\r\n";
        let (v, _) = resp_parse(sub).unwrap().unwrap();
        assert_eq!(resp_message(&v), None);
        assert_eq!(resp_parse(b"$-1\r\n").unwrap(), Some((Resp::Bulk(None), 5)));
        assert_eq!(
            resp_parse(b"-ERR x\r\n").unwrap(),
            Some((Resp::Error(b"ERR x"), 8))
        );
        assert!(resp_parse(b"?\r\n").is_err());
    }

    #[test]
    fn stamps_round_trip() {
        let mut body = [0u8; 100];
        stamp(&mut body, 123_456_789, 42);
        assert_eq!(read_stamp(&body), Some((123_456_789, 42)));
        assert_eq!(read_stamp(&body[..10]), None);
    }

    #[test]
    fn metrics_sum_over_shards() {
        let text = "# TYPE relay_chat_records_total counter\n\
                    relay_chat_records_total{shard=\"0\"} 10\n\
                    relay_chat_records_total{shard=\"1\"} 32\n\
                    relay_chat_records_totalx{shard=\"1\"} 99\n\
                    relay_chat_commits_total{shard=\"0\"} 4\n";
        assert_eq!(metric_sum(text, "relay_chat_records_total"), 42);
        assert_eq!(metric_sum(text, "relay_chat_commits_total"), 4);
        assert_eq!(metric_sum(text, "absent"), 0);
    }

    #[test]
    fn proc_and_ready_lines() {
        assert_eq!(vm_rss("Name:\trelay\nVmRSS:\t    2048 kB\n"), Some(2 << 20));
        let io =
            "rchar: 10\nwchar: 20\nread_bytes: 0\nwrite_bytes: 409600\ncancelled_write_bytes: 0\n";
        assert_eq!(io_write_bytes(io), Some(409_600));
        assert_eq!(io_write_bytes("rchar: 1\n"), None);
        assert_eq!(
            sockstat_tcp_pages("sockets: used 5\nTCP: inuse 3 orphan 0 tw 1 alloc 4 mem 17\n"),
            Some(17)
        );
        let line =
            "ready io=batch shards=2 ports=40000-40001 metrics=127.0.0.1:9100 chat=7000-7001";
        assert_eq!(
            ready_fields(line),
            Some(("127.0.0.1:9100".parse().unwrap(), 7000))
        );
        assert_eq!(ready_fields("ready io=batch"), None);
    }

    #[test]
    fn percentiles_from_histogram() {
        let mut h = new_hist();
        assert_eq!(percentiles_us(&h), (0.0, 0.0, 0.0));
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let (p50, p99, max) = percentiles_us(&h);
        assert!((p50 - 500.0).abs() < 1.0, "{p50}");
        assert!((p99 - 990.0).abs() < 1.5, "{p99}");
        assert!((max - 1000.0).abs() < 1.5, "{max}");
    }

    #[test]
    fn stream_entries_of_an_xreadgroup_reply() {
        let reply =
            b"*1\r\n*2\r\n$3\r\ns.0\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nm\r\n$2\r\nhi\r\n\
                      *2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nm\r\n$3\r\nyou\r\n";
        let (v, n) = resp_parse(reply).unwrap().unwrap();
        assert_eq!(n, reply.len());
        assert_eq!(
            resp_stream_entries(&v),
            Some(vec![(&b"1-0"[..], &b"hi"[..]), (&b"1-1"[..], &b"you"[..])])
        );
        assert_eq!(resp_stream_entries(&Resp::Int(1)), None);
        let (xadd, _) = resp_parse(b"$3\r\n1-0\r\n").unwrap().unwrap();
        assert_eq!(resp_stream_entries(&xadd), None);
    }
}
