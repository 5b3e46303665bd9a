//! `relay --config relay.toml`: starts one shard per core and serves until SIGTERM/SIGINT.

use clap::Parser;
use relay::config::{Config, Flags};
use relay::runtime::Relay;
use std::process::ExitCode;

fn main() -> ExitCode {
    let flags = Flags::parse();
    match run(&flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: &Flags) -> Result<(), String> {
    let cfg = Config::load(flags)?;
    // Block the stop signals before any thread starts, so every thread inherits the mask and
    // only the main thread receives them, synchronously, in `wait_for_stop_signal`.
    let signals = relay::signals::block_stop_signals().map_err(|e| format!("sigprocmask: {e}"))?;
    let listener = match cfg.metrics {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot bind metrics {addr}: {e}"))?,
        ),
        None => None,
    };
    let relay = Relay::start(&cfg)?;
    eprintln!(
        "relay: backend {} ({})",
        relay.backend.as_str(),
        relay.backend_reason
    );
    let metrics = match listener {
        Some(l) => {
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            let (stats, backend) = (relay.stats.clone(), relay.backend);
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || relay::metrics::serve(l, stats, backend))
                .map_err(|e| e.to_string())?;
            addr.to_string()
        }
        None => "off".into(),
    };
    let (first, last) = (
        relay.addrs[0].port(),
        relay.addrs[relay.addrs.len() - 1].port(),
    );
    println!(
        "ready io={} shards={} ports={first}-{last} metrics={metrics}",
        relay.backend.as_str(),
        relay.addrs.len()
    );
    let signal = relay::signals::wait_for_stop_signal(&signals, || relay.any_shard_finished());
    eprintln!("relay: {signal}, stopping");
    relay.shutdown()?;
    eprintln!("relay: stopped");
    Ok(())
}
