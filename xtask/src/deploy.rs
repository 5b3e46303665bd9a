//! `cargo xtask deploy --inventory FILE [--tarball relay-V.tar.gz] [--dry-run]`: installs a
//! release on bare-metal hosts over ssh and rolls the relays one at a time.
//!
//! 1. Parse and validate the inventory (no host is contacted on an error).
//! 2. Pre-flight: ctl answers, and every host is reachable, authenticates, has a writable
//!    root and the tools deploy needs. Any failure stops here: nothing changed anywhere.
//! 3. Install on every host: upload and unpack `releases/V`, copy the default configuration
//!    when absent, the units and the sysctl drop-in; enable the unit (systemd). The running
//!    relay is untouched.
//! 4. Roll, host after host: drain through ctl (no new rooms), wait until ctl lists no room on
//!    the relay or `drain_timeout_s` passes, write `relay.env`, switch `current` atomically,
//!    restart, health-check (`/health` on the relay's metrics address, run on the host, then a
//!    fresh heartbeat in ctl's relay list), undrain. On a failure: point `current` back, restore
//!    `relay.env`, restart, undrain, stop and exit non-zero; later hosts are not touched.
//!
//! ctl's host (`ctl = true`) is rolled first: its ctl is restarted and must answer `/health`
//! before its relay restarts; pre-flight accepts a silent ctl when the inventory deploys it.
//!
//! A rollback restores `current` and `relay.env` (and `ctl.env`); the units, the sysctl drop-in and the
//! unpacked releases installed in step 3 stay (they are shared by releases). Run one deploy at
//! a time per inventory: hosts are not locked.
//!
//! Host layout under the host's `root` (`/` on real hosts): `opt/relay/releases/V/`,
//! `opt/relay/current -> releases/V`, `etc/relay/{relay.toml,ctl.toml,relay.env}`,
//! `etc/systemd/system/{relay,ctl}.service`, `etc/sysctl.d/60-relay.conf`, `var/lib/relay/`
//! (chat logs, kept across releases), and with the pidfile manager `run/relay/relay.pid` and
//! `var/log/relay/relay.log`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::dist;
use crate::inventory::{self, Deploy, Host, Inventory, Service};
use crate::ssh::{self, sh_quote, Json};
use crate::Result;

/// What pre-flight learned about a host.
#[derive(Clone, Debug, Default)]
struct HostState {
    /// The release `current` pointed to, if any.
    previous: Option<String>,
    /// The relay was running.
    running: bool,
}

struct Options {
    inventory: PathBuf,
    tarball: Option<PathBuf>,
    dry_run: bool,
}

fn options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        inventory: PathBuf::new(),
        tarball: None,
        dry_run: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--inventory" => o.inventory = it.next().ok_or("--inventory needs a file")?.into(),
            "--tarball" => o.tarball = Some(it.next().ok_or("--tarball needs a file")?.into()),
            "--dry-run" => o.dry_run = true,
            other => return Err(format!("deploy: unknown argument {other:?}")),
        }
    }
    if o.inventory.as_os_str().is_empty() {
        return Err(
            "usage: cargo xtask deploy --inventory FILE [--tarball relay-V.tar.gz] [--dry-run]"
                .into(),
        );
    }
    Ok(o)
}

pub fn deploy(args: &[String]) -> Result {
    let o = options(args)?;
    let shown = o.inventory.display();
    let text = std::fs::read_to_string(&o.inventory).map_err(|e| format!("{shown}: {e}"))?;
    let mut inv =
        Inventory::parse(&text).map_err(|e| format!("{shown}: {e}; nothing was changed"))?;
    // ctl's host goes first: the other relays' drains and health checks need the new ctl.
    inv.hosts.sort_by_key(|h| !h.ctl);
    let tarball = match &o.tarball {
        Some(t) => t.clone(),
        None => dist::build_tarball(
            &dist::default_version(),
            &dist::target_dir().join("dist"),
            true,
        )?,
    };
    if !tarball.is_file() {
        return Err(format!("{}: no such tarball", tarball.display()));
    }
    let version = dist::version_of(&tarball)?;
    println!(
        "deploy: release {version} to {} hosts, ctl {}:\n{}",
        inv.hosts.len(),
        inv.deploy.ctl,
        inventory::summary(&inv)
    );
    let states = preflight(&inv)?;
    if o.dry_run {
        for (h, s) in inv.hosts.iter().zip(&states) {
            println!(
                "deploy: {}: current {}, relay {}",
                h.name,
                s.previous.as_deref().unwrap_or("none"),
                if s.running { "running" } else { "stopped" }
            );
        }
        println!("deploy: dry run, nothing changed");
        return Ok(());
    }
    install_all(&inv, &tarball, &version)?;
    for (i, (h, s)) in inv.hosts.iter().zip(&states).enumerate() {
        if let Err(e) = roll(&inv.deploy, h, s, &version) {
            let rest: Vec<&str> = inv.hosts[i + 1..].iter().map(|h| h.name.as_str()).collect();
            let back = rollback(&inv.deploy, h, s);
            let back = match (&s.previous, back) {
                (Some(p), Ok(())) => format!("rolled back to {p}, which is healthy"),
                (None, Ok(())) => "no previous release: stopped".into(),
                (_, Err(b)) => format!("ROLLBACK FAILED: {b}"),
            };
            return Err(format!(
                "deploy stopped at host {}: {e}\n  {}: {back}\n  not rolled: {}",
                h.name,
                h.name,
                if rest.is_empty() {
                    "none".to_string()
                } else {
                    rest.join(", ")
                }
            ));
        }
        prune(&inv.deploy, h, s)?;
    }
    println!("deploy: {version} is live on every host");
    Ok(())
}

/// Checks ctl and every host (in parallel) without changing anything.
fn preflight(inv: &Inventory) -> Result<Vec<HostState>> {
    let mut errors = Vec::new();
    let ctl_host = inv.hosts.iter().find(|h| h.ctl);
    let mut ctl_up = false;
    match (ssh::http(&inv.deploy.ctl, "GET", "/health", None), ctl_host) {
        (Ok(r), _) if r.status == 200 => ctl_up = true,
        (Ok(r), None) => errors.push(format!(
            "ctl {}: /health answered {}",
            inv.deploy.ctl, r.status
        )),
        (Err(e), None) => errors.push(format!("ctl is unreachable: {e}")),
        (_, Some(h)) => println!(
            "deploy: ctl is not answering at {}; host {} will (re)start it first",
            inv.deploy.ctl, h.name
        ),
    }
    if ctl_up {
        // Drains go through the admin API: a wrong or missing admin token fails here, not
        // half-way through the roll.
        match admin(&inv.deploy, "GET", "/v1/relays") {
            Ok(r) if r.status == 200 => {}
            Ok(r) => errors.push(format!(
                "ctl refused its admin API ({}): {} (ctl_admin_token in [deploy])",
                r.status,
                r.body.trim()
            )),
            Err(e) => errors.push(e),
        }
    }
    let results: Vec<Result<HostState>> = std::thread::scope(|s| {
        let handles: Vec<_> = inv
            .hosts
            .iter()
            .map(|h| s.spawn(|| preflight_host(&inv.deploy, h)))
            .collect();
        handles
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("pre-flight panicked".into()))
            })
            .collect()
    });
    let mut states = Vec::new();
    for r in results {
        match r {
            Ok(s) => states.push(s),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        println!("deploy: pre-flight passed on every host");
        Ok(states)
    } else {
        Err(format!(
            "pre-flight failed, nothing was changed on any host:\n  - {}",
            errors.join("\n  - ")
        ))
    }
}

fn preflight_host(d: &Deploy, h: &Host) -> Result<HostState> {
    let script = preflight_script(h);
    let out = ssh::run(d, h, &script)?;
    let mut st = HostState::default();
    for line in out.lines() {
        if let Some(c) = line.strip_prefix("current=") {
            st.previous = (!c.is_empty()).then(|| c.to_string());
        }
        st.running |= line == "running=1";
    }
    Ok(st)
}

/// Reads a host without changing it: `current=<release>` and `running=1`.
fn preflight_script(h: &Host) -> String {
    let root = sh_quote(&h.root);
    let tools = match h.service {
        Service::Systemd => "tar gzip systemctl",
        Service::Pidfile => "tar gzip setsid",
    };
    let running = match h.service {
        Service::Systemd => "systemctl is-active --quiet relay.service".to_string(),
        Service::Pidfile => format!(
            "[ -x {r}/opt/relay/current/libexec/relay-service ] && \
             {r}/opt/relay/current/libexec/relay-service {r} status relay >/dev/null",
            r = sh_quote(h.root.trim_end_matches('/'))
        ),
    };
    format!(
        r#"R={root}
[ -d "$R" ] || {{ echo "root $R does not exist" >&2; exit 3; }}
[ -w "$R" ] || {{ echo "root $R is not writable" >&2; exit 3; }}
for t in {tools}; do command -v "$t" >/dev/null || {{ echo "$t is not installed" >&2; exit 3; }}; done
cur=$(readlink "$R/opt/relay/current" 2>/dev/null || true)
echo "current=${{cur#releases/}}"
if {running}; then echo running=1; fi
"#
    )
}

/// Uploads and unpacks the release on every host; installs configuration, units and sysctl.
fn install_all(inv: &Inventory, tarball: &std::path::Path, version: &str) -> Result {
    let results: Vec<Result> = std::thread::scope(|s| {
        let handles: Vec<_> = inv
            .hosts
            .iter()
            .map(|h| s.spawn(|| install(&inv.deploy, h, tarball, version)))
            .collect();
        handles
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err("install panicked".into())))
            .collect()
    });
    let errors: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
    if errors.is_empty() {
        println!("deploy: {version} installed on every host (not yet current)");
        Ok(())
    } else {
        Err(format!(
            "install failed; no relay was restarted:\n  - {}",
            errors.join("\n  - ")
        ))
    }
}

fn install(d: &Deploy, h: &Host, tarball: &std::path::Path, version: &str) -> Result {
    let releases = h.path("/opt/relay/releases");
    ssh::run(d, h, &format!("mkdir -p {}", sh_quote(&releases)))?;
    let upload = format!("{releases}/.upload-{version}.tar.gz");
    ssh::upload(d, h, tarball, &upload)?;
    ssh::run(d, h, &install_script(h, version))?;
    // The host's tuning, as a warning: the release's own xtask reads the host's /proc and /sys.
    let tune = format!(
        "{} tune --check 2>&1 | tail -n 1 || true",
        sh_quote(&h.path(&format!("/opt/relay/releases/{version}/bin/xtask")))
    );
    match ssh::run(d, h, &tune) {
        Ok(out) if out.contains("differ") => println!(
            "deploy: {}: host tuning: {}; see `/opt/relay/current/bin/xtask tune --check` there",
            h.name,
            out.trim()
                .trim_start_matches("xtask: error: ")
                .split(" (")
                .next()
                .unwrap_or_default()
        ),
        _ => {}
    }
    Ok(())
}

/// Unpacks the uploaded release and installs configuration (when absent), units and sysctl.
fn install_script(h: &Host, version: &str) -> String {
    let systemd = match h.service {
        Service::Systemd => {
            let affinity = match &h.cpu_affinity {
                Some(cpus) => format!(
                    "mkdir -p /etc/systemd/system/relay.service.d\n\
                     printf '[Service]\\nCPUAffinity=\\nCPUAffinity=%s\\n' {} \
                     > /etc/systemd/system/relay.service.d/10-deploy.conf\n",
                    sh_quote(cpus)
                ),
                None => "rm -f /etc/systemd/system/relay.service.d/10-deploy.conf\n".into(),
            };
            let units = if h.ctl {
                "relay.service ctl.service"
            } else {
                "relay.service"
            };
            format!(
                "{affinity}systemctl daemon-reload\nsystemctl enable --quiet {units}\n\
                 sysctl -q -p /etc/sysctl.d/60-relay.conf || \
                 echo 'warning: some sysctls were not applied (cargo xtask tune --check)' >&2\n"
            )
        }
        // systemd creates /var/lib/relay itself (StateDirectory, owned by the dynamic user).
        Service::Pidfile => "mkdir -p \"$R/var/lib/relay\"\n".into(),
    };
    format!(
        r#"R={root}
V={v}
cd "$R/opt/relay/releases"
if [ "$(readlink ../current 2>/dev/null)" = "releases/$V" ]; then
    echo "release $V is already current; kept"
else
    rm -rf ".tmp-$V"
    mkdir ".tmp-$V"
    tar -xzf ".upload-$V.tar.gz" -C ".tmp-$V" --strip-components=1
    rm -rf "$V"
    mv ".tmp-$V" "$V"
fi
rm -f ".upload-$V.tar.gz"
mkdir -p "$R/etc/relay" "$R/etc/systemd/system" "$R/etc/sysctl.d"
for f in relay.toml ctl.toml; do
    [ -e "$R/etc/relay/$f" ] || cp "$V/etc/relay/$f" "$R/etc/relay/$f"
done
cp "$V/etc/systemd/system/relay.service" "$V/etc/systemd/system/ctl.service" "$R/etc/systemd/system/"
cp "$V/etc/sysctl.d/60-relay.conf" "$R/etc/sysctl.d/"
{systemd}"#,
        root = sh_quote(h.root.trim_end_matches('/')),
        v = sh_quote(version),
    )
}

/// The relay's command line on this host (the unit's and relay-service's `$RELAY_ARGS`).
pub fn relay_args(d: &Deploy, h: &Host) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--config".into(),
        h.path("/etc/relay/relay.toml"),
        "--relay-id".into(),
        h.relay_id.to_string(),
        "--ctl".into(),
        d.ctl.clone(),
        "--advertise-host".into(),
        h.advertise_host.clone(),
        "--metrics".into(),
        h.metrics.clone(),
        "--data-dir".into(),
        h.path("/var/lib/relay/chat"),
    ];
    let opt = |a: &mut Vec<String>, flag: &str, v: Option<String>| {
        if let Some(v) = v {
            a.push(flag.into());
            a.push(v);
        }
    };
    opt(&mut a, "--bind", h.bind.clone());
    opt(&mut a, "--base-port", h.base_port.map(|p| p.to_string()));
    opt(&mut a, "--chat-port", h.chat_port.map(|p| p.to_string()));
    opt(&mut a, "--shards", h.shards.map(|s| s.to_string()));
    a.extend(h.extra_args.iter().cloned());
    a
}

fn service_cmd(h: &Host, action: &str, name: &str) -> String {
    match h.service {
        // A unit that kept failing may have hit its start limit; a restart (also the
        // rollback's) must not be refused for that.
        Service::Systemd if action == "restart" => format!(
            "systemctl reset-failed {name}.service 2>/dev/null || true\n\
             systemctl restart {name}.service"
        ),
        Service::Systemd => format!("systemctl {action} {name}.service"),
        Service::Pidfile => {
            let r = sh_quote(h.root.trim_end_matches('/'));
            format!("{r}/opt/relay/current/libexec/relay-service {r} {action} {name}")
        }
    }
}

/// Drains, switches, restarts and checks one host.
fn roll(d: &Deploy, h: &Host, st: &HostState, version: &str) -> Result {
    println!("deploy: {}: rolling to {version}", h.name);
    if st.running {
        drain(d, h)?;
    }
    ssh::run(d, h, &switch_script(d, h, version))?;
    restart_and_check(d, h)?;
    println!("deploy: {}: {version} is serving", h.name);
    Ok(())
}

/// Restarts ctl (on its host) and waits for its API, then the relay and waits for its health;
/// undrains it.
fn restart_and_check(d: &Deploy, h: &Host) -> Result {
    if h.ctl {
        ssh::run(d, h, &service_cmd(h, "restart", "ctl"))?;
        ctl_healthy(d)?;
    }
    ssh::run(d, h, &service_cmd(h, "restart", "relay"))?;
    healthy(d, h)?;
    undrain(d, h)
}

/// Writes relay.env (and ctl.env on ctl's host), keeping the previous ones, and switches
/// `current` to the release.
fn switch_script(d: &Deploy, h: &Host, version: &str) -> String {
    let mut envs = vec![(
        "relay.env",
        format!(
            "# Written by `cargo xtask deploy` from the inventory (host {:?}); edit relay.toml \
             for\n# anything else. The flags override relay.toml.\nRELAY_ARGS=\"{}\"\n",
            h.name,
            relay_args(d, h).join(" ")
        ),
    )];
    if h.ctl {
        envs.push((
            "ctl.env",
            format!(
                "# Written by `cargo xtask deploy` (ctl_listen in the inventory); edit ctl.toml \
                 for\n# anything else.\nCTL_ARGS=\"--listen {} --data-dir {}\"\n",
                d.ctl_listen,
                h.path("/var/lib/relay-ctl")
            ),
        ));
    }
    let mut script = format!(
        "R={}\ncd \"$R/etc/relay\"\n",
        sh_quote(h.root.trim_end_matches('/'))
    );
    for (file, text) in envs {
        script += &format!(
            "if [ -f {file} ]; then cp -p {file} {file}.prev; else rm -f {file}.prev; fi\n\
             printf '%s' {} > {file}.new\nmv {file}.new {file}\n",
            sh_quote(&text)
        );
    }
    script
        + &format!(
            "ln -sfn {} \"$R/opt/relay/current.new\"\n\
             mv -T \"$R/opt/relay/current.new\" \"$R/opt/relay/current\"\n",
            sh_quote(&format!("releases/{version}"))
        )
}

/// Puts the previous release back (or stops the services when there was none).
fn rollback(d: &Deploy, h: &Host, st: &HostState) -> Result {
    eprintln!("deploy: {}: rolling back", h.name);
    ssh::run(d, h, &rollback_script(h, st.previous.as_deref()))?;
    match st.previous {
        Some(_) => restart_and_check(d, h),
        None => undrain(d, h).or(Ok(())),
    }
}

/// Points `current` back at `previous` with the previous env files, or stops the services
/// when there is no previous release.
fn rollback_script(h: &Host, previous: Option<&str>) -> String {
    match previous {
        Some(prev) => format!(
            r#"R={root}
cd "$R/etc/relay"
for f in relay.env ctl.env; do
    if [ -f "$f.prev" ]; then mv "$f.prev" "$f"; fi
done
ln -sfn {target} "$R/opt/relay/current.new"
mv -T "$R/opt/relay/current.new" "$R/opt/relay/current"
"#,
            root = sh_quote(h.root.trim_end_matches('/')),
            target = sh_quote(&format!("releases/{prev}")),
        ),
        None if h.ctl => format!(
            "{}\n{}\n",
            service_cmd(h, "stop", "relay"),
            service_cmd(h, "stop", "ctl")
        ),
        None => service_cmd(h, "stop", "relay"),
    }
}

/// Waits until ctl answers `/health`.
fn ctl_healthy(d: &Deploy) -> Result {
    let deadline = Instant::now() + Duration::from_secs(d.health_timeout_s);
    loop {
        let last = match ssh::http(&d.ctl, "GET", "/health", None) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("/health answered {}", r.status),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "ctl not healthy within health_timeout_s = {}: {last}",
                d.health_timeout_s
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn admin(d: &Deploy, method: &str, path: &str) -> Result<ssh::Response> {
    ssh::http(&d.ctl, method, path, d.ctl_admin_token.as_deref())
}

/// ctl's view of one relay, if it knows it.
fn relay_view(d: &Deploy, id: u32) -> Result<Option<Json>> {
    let r = admin(d, "GET", "/v1/relays")?;
    if r.status != 200 {
        return Err(format!(
            "ctl GET /v1/relays answered {}: {}",
            r.status, r.body
        ));
    }
    let j = Json::parse(&r.body)?;
    Ok(j.get("relays")
        .as_array()
        .iter()
        .find(|v| v.get("relay_id").as_u64() == Some(u64::from(id)))
        .cloned())
}

/// Asks ctl to stop placing on the relay and waits for its rooms to end (bounded).
fn drain(d: &Deploy, h: &Host) -> Result {
    let r = match admin(d, "POST", &format!("/v1/relays/{}/drain", h.relay_id)) {
        Err(e) if h.ctl => {
            println!("deploy: {}: no drain, ctl is down ({e})", h.name);
            return Ok(());
        }
        r => r?,
    };
    match r.status {
        200 => {}
        404 => {
            println!(
                "deploy: {}: ctl does not know relay {}; no drain",
                h.name, h.relay_id
            );
            return Ok(());
        }
        s => return Err(format!("ctl refused the drain ({s}): {}", r.body)),
    }
    let deadline = Instant::now() + Duration::from_secs(d.drain_timeout_s);
    loop {
        let rooms = relay_view(d, h.relay_id)?.map_or(0, |v| v.get("rooms").as_array().len());
        if rooms == 0 {
            println!("deploy: {}: drained, no rooms left", h.name);
            return Ok(());
        }
        if Instant::now() >= deadline {
            println!(
                "deploy: {}: {rooms} rooms still open after drain_timeout_s = {}; restarting \
                 anyway (their participants rejoin through ctl)",
                h.name, d.drain_timeout_s
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn undrain(d: &Deploy, h: &Host) -> Result {
    let r = admin(d, "POST", &format!("/v1/relays/{}/undrain", h.relay_id))?;
    match r.status {
        200 | 404 => Ok(()),
        s => Err(format!("ctl refused the undrain ({s}): {}", r.body)),
    }
}

/// Waits until the relay is up on the host (`/health` on its metrics address) and ctl has a
/// fresh heartbeat from it.
fn healthy(d: &Deploy, h: &Host) -> Result {
    let check = health_script(h);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(d.health_timeout_s);
    let mut last = String::new();
    while Instant::now() < deadline {
        match ssh::run(d, h, &check) {
            Ok(_) => match relay_view(d, h.relay_id) {
                Ok(Some(v))
                    if v.get("state").as_str() != Some("dead")
                        && v.get("last_seen_ms")
                            .as_u64()
                            .is_some_and(|ms| Duration::from_millis(ms) < started.elapsed()) =>
                {
                    println!(
                        "deploy: {}: healthy after {:.1} s",
                        h.name,
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                Ok(_) => last = "ctl has no fresh heartbeat from it".into(),
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = match h.service {
        Service::Systemd => "journalctl -u relay.service -n 5 --no-pager -o cat".to_string(),
        Service::Pidfile => format!(
            "tail -n 5 {}",
            sh_quote(&h.path("/var/log/relay/relay.log"))
        ),
    };
    let tail = ssh::run(d, h, &log).unwrap_or_default();
    Err(format!(
        "relay {} not healthy within health_timeout_s = {}: {last}\n  last lines of its log:\n    {}",
        h.relay_id,
        d.health_timeout_s,
        tail.trim().replace('\n', "\n    ")
    ))
}

/// Succeeds when the relay runs and answers `/health` on its metrics address (curl, else bash).
fn health_script(h: &Host) -> String {
    let (ip, port) = h
        .metrics
        .rsplit_once(':')
        .expect("validated as a socket address");
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let ip = match ip {
        "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        ip => ip,
    };
    let url_host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    format!(
        r#"{status} >/dev/null
if command -v curl >/dev/null 2>&1; then
    curl -fsS -m 2 http://{url_host}:{port}/health
else
    timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}; printf "GET /health HTTP/1.0\r\n\r\n" >&3; cat <&3' | grep -qx ok
fi
"#,
        status = match h.service {
            Service::Systemd => "systemctl is-active relay.service".to_string(),
            Service::Pidfile => service_cmd(h, "status", "relay"),
        },
    )
}

/// Keeps the newest `keep_releases` releases plus the current and previous ones.
fn prune(d: &Deploy, h: &Host, st: &HostState) -> Result {
    ssh::run(d, h, &prune_script(d, h, st)).map(drop)
}

fn prune_script(d: &Deploy, h: &Host, st: &HostState) -> String {
    format!(
        r#"cd {releases}
cur=$(readlink ../current); cur=${{cur#releases/}}
n=0
for v in $(ls -1t); do
    n=$((n + 1))
    if [ "$n" -gt {keep} ] && [ "$v" != "$cur" ] && [ "$v" != {prev} ]; then rm -rf "./$v"; fi
done
"#,
        releases = sh_quote(&h.path("/opt/relay/releases")),
        keep = d.keep_releases,
        prev = sh_quote(st.previous.as_deref().unwrap_or("")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every remote script parses (`sh -n`) for both service managers; the systemd ones are
    /// never run by the integration test, which has no systemd.
    #[test]
    fn remote_scripts_are_valid_sh() {
        let inv = Inventory::parse(
            r#"[deploy]
ctl = "http://10.0.0.1:8080"
[[host]]
name = "a"
address = "10.0.0.11"
relay_id = 1
cpu_affinity = "2-7"
ctl = true
[[host]]
name = "b"
address = "10.0.0.12"
relay_id = 2
service = "pidfile"
root = "/srv/b"
metrics = "0.0.0.0:9100"
"#,
        )
        .unwrap();
        let st = HostState {
            previous: Some("v0".into()),
            running: true,
        };
        for h in &inv.hosts {
            let scripts = [
                preflight_script(h),
                install_script(h, "v1"),
                switch_script(&inv.deploy, h, "v1"),
                rollback_script(h, Some("v0")),
                rollback_script(h, None),
                health_script(h),
                prune_script(&inv.deploy, h, &st),
            ];
            for script in scripts {
                let out = std::process::Command::new("sh")
                    .args(["-n", "-c", &script])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}: {}\n{script}",
                    h.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let sw = switch_script(&inv.deploy, &inv.hosts[0], "v1");
        assert!(sw.contains("CTL_ARGS=\"--listen 10.0.0.1:8080 --data-dir /var/lib/relay-ctl\""));
        assert!(!switch_script(&inv.deploy, &inv.hosts[1], "v1").contains("ctl.env"));
        let a = install_script(&inv.hosts[0], "v1");
        assert!(
            a.contains("CPUAffinity=%s")
                && a.contains("systemctl enable --quiet relay.service ctl.service")
        );
        assert!(health_script(&inv.hosts[1]).contains("http://127.0.0.1:9100/health"));
        let mut v6 = inv.hosts[1].clone();
        v6.metrics = "[::]:9100".into();
        assert!(health_script(&v6).contains("http://[::1]:9100/health"));
    }

    #[test]
    fn relay_args_follow_the_inventory() {
        let inv = Inventory::parse(
            r#"[deploy]
ctl = "http://10.0.0.1:8080"
service = "pidfile"
root = "/srv/a"
[[host]]
name = "a"
address = "10.0.0.11"
relay_id = 3
chat_port = 41000
extra_args = ["--io", "batch"]
"#,
        )
        .unwrap();
        let a = relay_args(&inv.deploy, &inv.hosts[0]).join(" ");
        assert_eq!(
            a,
            "--config /srv/a/etc/relay/relay.toml --relay-id 3 --ctl http://10.0.0.1:8080 \
             --advertise-host 10.0.0.11 --metrics 127.0.0.1:9100 --data-dir \
             /srv/a/var/lib/relay/chat --chat-port 41000 --io batch"
        );
        assert_eq!(
            service_cmd(&inv.hosts[0], "restart", "relay"),
            "'/srv/a'/opt/relay/current/libexec/relay-service '/srv/a' restart relay"
        );
    }
}
