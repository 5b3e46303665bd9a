//! Progress bars while the demo runs (redrawn in place on a terminal, a line per second
//! otherwise) and the summary table with its checks.

use crate::{chat, media};
use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const WIDTH: usize = 30;

pub struct Bars {
    duration: Duration,
    expected_copies: f64,
    tty: bool,
    drawn: std::cell::Cell<bool>,
    last_line: std::cell::Cell<Option<Instant>>,
}

fn bar(fraction: f64) -> String {
    let filled = ((fraction.clamp(0.0, 1.0)) * WIDTH as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(WIDTH - filled))
}

impl Bars {
    pub fn new(duration: Duration, expected_copies: f64) -> Self {
        Self {
            duration,
            expected_copies: expected_copies.max(1.0),
            tty: std::io::stderr().is_terminal(),
            drawn: false.into(),
            last_line: None.into(),
        }
    }

    /// Draws the media bar (time) and the chat bar (copies delivered of those expected).
    pub fn draw(
        &self,
        elapsed: Duration,
        m: &media::Live,
        c: &chat::Live,
        tx_before: &u64,
        tx_now: &u64,
    ) {
        let secs = elapsed
            .as_secs_f64()
            .min(self.duration.as_secs_f64())
            .max(0.001);
        let fwd = tx_now.saturating_sub(*tx_before) as f64 / secs;
        let delivered = c.delivered.load(Ordering::Relaxed);
        let media_line = format!(
            "media {} {:5.1}/{:.0} s  relay forwarded {:>8.0} pkt/s  received {}",
            bar(elapsed.as_secs_f64() / self.duration.as_secs_f64()),
            elapsed.as_secs_f64().min(self.duration.as_secs_f64()),
            self.duration.as_secs_f64(),
            fwd,
            m.received.load(Ordering::Relaxed),
        );
        let chat_line = format!(
            "chat  {} sent {}  delivered {}  read {}",
            bar(delivered as f64 / self.expected_copies),
            c.sent.load(Ordering::Relaxed),
            delivered,
            c.read.load(Ordering::Relaxed),
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn.get() {
                let _ = write!(err, "\x1b[2A");
            }
            let _ = write!(err, "\r\x1b[2K{media_line}\n\r\x1b[2K{chat_line}\n");
            self.drawn.set(true);
        } else if self
            .last_line
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            let _ = writeln!(err, "{media_line}\n{chat_line}");
            self.last_line.set(Some(Instant::now()));
        }
    }

    pub fn finish(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// The numbers the demo reports and the checks it makes on them.
pub struct Summary<'a> {
    pub rooms: usize,
    pub participants: usize,
    /// The relay's packet rate while the publishers were sending.
    pub forwarded_per_s: f64,
    /// Packets the relay sent in all (including the grace period).
    pub forwarded_total: u64,
    pub media: &'a media::Totals,
    pub chat: &'a chat::Totals,
    pub records_per_commit: f64,
    pub max_loss_percent: f64,
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1_000.0)
}

impl Summary<'_> {
    /// Prints the table and the checks; true when every check passed.
    pub fn print(&self) -> bool {
        let m = self.media;
        let c = self.chat;
        let lost_pkts = m.expected.saturating_sub(m.received);
        let loss = if m.expected == 0 {
            100.0
        } else {
            lost_pkts as f64 * 100.0 / m.expected as f64
        };
        let h = &m.latency_us;
        let rows: Vec<(&str, String)> = vec![
            (
                "rooms × participants",
                format!("{} × {}", self.rooms, self.participants),
            ),
            ("media packets published", m.sent.to_string()),
            (
                "relay forwarded packets/s",
                format!("{:.0}", self.forwarded_per_s),
            ),
            (
                "relay forwarded packets (all)",
                self.forwarded_total.to_string(),
            ),
            (
                "media packets received",
                format!("{} of {} expected", m.received, m.expected),
            ),
            ("media loss", format!("{loss:.3} % ({lost_pkts} packets)")),
            ("media duplicates", m.duplicates.to_string()),
            (
                "media packets from outside the room",
                m.misrouted.to_string(),
            ),
            (
                "binding requests (bind + refreshes), refused",
                format!("{}, {}", m.binding_requests, m.refusals),
            ),
            (
                "latency p50 / p99 / p99.9",
                format!(
                    "{} / {} / {}",
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.value_at_quantile(0.999))
                ),
            ),
            (
                "chat messages sent (durable)",
                format!("{} ({} unacknowledged)", c.sent, c.unacknowledged),
            ),
            (
                "chat copies delivered",
                format!("{} of {}", c.received, c.expected),
            ),
            (
                "messages with all DELIVERED receipts",
                format!("{} of {}", c.delivered, c.sent),
            ),
            (
                "messages with all READ receipts",
                format!("{} of {}", c.read, c.sent),
            ),
            ("chat messages lost", c.lost.to_string()),
            (
                "users who saw all members online",
                format!("{} of {}", c.presence_complete, c.users),
            ),
            ("chat duplicates", c.duplicates.to_string()),
            (
                "chat log records per fdatasync",
                format!("{:.1}", self.records_per_commit),
            ),
        ];
        let w = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        println!("\n| {:<w$} | value |", "demo summary");
        println!("|{}|---|", "-".repeat(w + 2));
        for (k, v) in &rows {
            println!("| {k:<w$} | {v} |");
        }
        let checks = [
            (
                "every participant received media",
                m.silent_receivers == 0 && m.received > 0,
            ),
            ("media loss within the bound", loss <= self.max_loss_percent),
            ("no media duplicates", m.duplicates == 0),
            ("no binding refresh refused", m.refusals == 0),
            (
                "no media from outside the room (or echoed)",
                m.misrouted == 0,
            ),
            (
                "every chat message was acknowledged as sent",
                c.unacknowledged == 0 && c.sent > 0,
            ),
            ("no chat message lost", c.lost == 0),
            ("no chat duplicates", c.duplicates == 0),
            (
                "every message has DELIVERED receipts",
                c.delivered == c.sent,
            ),
            ("every message has READ receipts", c.read == c.sent),
            (
                "presence: everyone saw everyone online",
                c.presence_complete == c.users,
            ),
        ];
        println!();
        let mut ok = true;
        for (what, pass) in checks {
            println!("{} {what}", if pass { "ok  " } else { "FAIL" });
            ok &= pass;
        }
        if ok {
            println!(
                "\nall checks passed (media loss bound: {} %)",
                self.max_loss_percent
            );
        }
        ok
    }
}
