//! `relay --config relay.toml`: starts one shard per core and serves until SIGTERM/SIGINT.

use clap::Parser;
use relay::config::{Config, Flags};
use relay::error::Error;
use relay::runtime::Relay;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What registering with ctl gives: ctl, what the relay reports, and the registration's lease
/// (sent no later than this instant; milliseconds).
type Registered = (
    relay::ctl_client::Ctl,
    relay::ctl_client::Identity,
    Option<(Instant, u64)>,
    Option<relay::ctl_client::ClusterView>,
);

/// Registers with ctl before the shards start; takes ctl's public key when none is configured.
fn register_with_ctl(cfg: &mut Config, url: &str) -> Result<Registered, Error> {
    let ctl = relay::ctl_client::Ctl::new(url, cfg.ctl_token.clone()).map_err(Error::Config)?;
    let shards = if cfg.shards == 0 {
        relay::io::sys::available_cpus()
    } else {
        cfg.shards
    };
    let identity = relay::ctl_client::Identity {
        relay_id: cfg.relay_id,
        host: cfg
            .advertise_host
            .clone()
            .unwrap_or_else(|| cfg.bind.to_string()),
        udp_base_port: cfg.base_port,
        shards,
        nic_gbps: cfg.nic_gbps,
        labels: cfg.labels.clone(),
        chat_port: cfg.chat.port,
        link_port: cfg.chat.link_port,
    };
    let mut sent = Instant::now();
    let mut reply = relay::ctl_client::register(&ctl, &identity, sent + Duration::from_secs(30))?;
    // A linked relay serves chat only as one of its cluster: it waits for ctl to form it.
    if cfg.chat.link_port.is_some() {
        let deadline = sent + Duration::from_secs(600);
        let mut said = false;
        while reply.cluster.is_none() {
            if Instant::now() >= deadline {
                return Err(Error::CtlUnavailable(
                    "ctl formed no cluster in 10 minutes (ctl's cluster_relays: how many \
                     linked relays it waits for)"
                        .into(),
                ));
            }
            if !said {
                eprintln!("relay: waiting for ctl to form the cluster");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(200));
            sent = Instant::now();
            reply = relay::ctl_client::register(&ctl, &identity, sent + Duration::from_secs(30))?;
        }
    }
    let cluster = reply.cluster.clone();
    let lease = reply.lease_ms.map(|ms| (sent, ms));
    match &cfg.public_key {
        Some(k) if !k.trim().eq_ignore_ascii_case(reply.public_key.trim()) => {
            return Err(Error::CtlRefused(
                "the configured public key differs from ctl's".into(),
            ));
        }
        Some(_) => {}
        None => cfg.public_key = Some(reply.public_key),
    }
    eprintln!(
        "relay: registered with ctl at {} as relay {}",
        ctl.addr(),
        cfg.relay_id
    );
    Ok((ctl, identity, lease, cluster))
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    match run(&flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(flags: &Flags) -> Result<(), Error> {
    let mut cfg = Config::load(flags).map_err(Error::Config)?;
    // Every chat connection takes a descriptor (batch) or a registered-file slot (uring, where
    // the limit applies per ring): the soft limit alone would cap chat near 1,024 connections.
    relay::io::sys::raise_nofile_limit();
    // Block the stop signals before any thread starts, so every thread inherits the mask and
    // only the main thread receives them, synchronously, in `wait_for_stop_signal`.
    let signals =
        relay::signals::block_stop_signals().map_err(|e| Error::host("sigprocmask", e))?;
    let listener = match cfg.metrics {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| Error::host(format!("cannot bind metrics {addr}"), e))?,
        ),
        None => None,
    };
    let ctl = match cfg.ctl.clone() {
        Some(url) => Some(register_with_ctl(&mut cfg, &url)?),
        None => None,
    };
    let cluster = ctl.as_ref().and_then(|c| c.3.as_ref());
    let mut relay = Relay::start(&cfg, cluster)?;
    let stop_ctl = Arc::new(AtomicBool::new(false));
    if let Some((ctl, identity, first_lease, _)) = ctl {
        let ctl_loop = relay::ctl_client::CtlLoop {
            ctl,
            identity,
            stats: relay.stats.clone(),
            commands: std::mem::take(&mut relay.commands),
            stop: stop_ctl.clone(),
            origin: relay.origin,
            first_lease,
            links: relay.links.as_ref().map(|(dir, _)| dir.clone()),
        };
        std::thread::Builder::new()
            .name("ctl".into())
            .spawn(move || ctl_loop.run())
            .map_err(|e| Error::host("cannot spawn the ctl thread", e))?;
    }
    eprintln!(
        "relay: backend {} ({})",
        relay.backend.as_str(),
        relay.backend_reason
    );
    let metrics = match listener {
        Some(l) => {
            let addr = l
                .local_addr()
                .map_err(|e| Error::host("metrics address", e))?;
            let (stats, backend) = (relay.stats.clone(), relay.backend);
            let links = relay.links.as_ref().map(|(_, s)| s.clone());
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || relay::metrics::serve(l, stats, backend, links))
                .map_err(|e| Error::host("cannot spawn the metrics thread", e))?;
            addr.to_string()
        }
        None => "off".into(),
    };
    let (first, last) = (
        relay.addrs[0].port(),
        relay.addrs[relay.addrs.len() - 1].port(),
    );
    let chat = match cfg.chat.port {
        Some(p) => format!(" chat={p}-{}", usize::from(p) + relay.addrs.len() - 1),
        None => String::new(),
    };
    println!(
        "ready io={} shards={} ports={first}-{last} metrics={metrics}{chat}",
        relay.backend.as_str(),
        relay.addrs.len()
    );
    let signal = relay::signals::wait_for_stop_signal(&signals, || relay.any_shard_finished());
    eprintln!("relay: {signal}, stopping");
    stop_ctl.store(true, Ordering::Relaxed);
    relay.shutdown()?;
    eprintln!("relay: stopped");
    Ok(())
}
