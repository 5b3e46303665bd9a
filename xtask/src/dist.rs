//! `cargo xtask dist [--version V] [--out DIR] [--no-build]`: the release tarball.
//!
//! `relay-V.tar.gz` holds one directory, `relay-V/`, laid out as it is installed under
//! `/opt/relay/releases/V` (the `etc/` part is copied to the host's `/etc` by deploy):
//!
//! ```text
//! VERSION
//! bin/relay bin/ctl                 the daemons
//! bin/xtask                         `xtask tune --check` on the host itself
//! libexec/relay-service             the pidfile service manager (hosts without systemd)
//! etc/relay/relay.toml ctl.toml     default configuration (installed when absent)
//! etc/systemd/system/relay.service ctl.service
//! etc/sysctl.d/60-relay.conf        rendered from tune::SYSCTLS
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{build_release, root, Result};

/// Static assets from the workspace's `dist/` directory: (source, path in the release, mode).
const ASSETS: &[(&str, &str, u32)] = &[
    ("relay.service", "etc/systemd/system/relay.service", 0o644),
    ("ctl.service", "etc/systemd/system/ctl.service", 0o644),
    ("relay.toml", "etc/relay/relay.toml", 0o644),
    ("ctl.toml", "etc/relay/ctl.toml", 0o644),
    ("relay-service", "libexec/relay-service", 0o755),
];

/// Binaries from `target/release`.
const BINARIES: &[&str] = &["relay", "ctl", "xtask"];

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// `0.1.0-g1a2b3c4`, with `-dirty.<unix seconds>` for a tree with uncommitted changes, so that
/// two different builds never share a release directory.
pub fn default_version() -> String {
    let pkg = env!("CARGO_PKG_VERSION");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(hash) = git(&["rev-parse", "--short=8", "HEAD"]) else {
        return pkg.to_string();
    };
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("{pkg}-g{hash}-dirty.{now}")
    } else {
        format!("{pkg}-g{hash}")
    }
}

/// A version is a directory name on every host: keep it plain.
pub fn check_version(v: &str) -> Result {
    let ok = !v.is_empty()
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("version {v:?}: use letters, digits and ._-+ only"))
    }
}

/// Builds the binaries (unless `build` is false) and writes `out/relay-V.tar.gz`.
pub fn build_tarball(version: &str, out: &Path, build: bool) -> Result<PathBuf> {
    check_version(version)?;
    if build {
        build_release(&["relay", "ctl", "xtask"])?;
    }
    let name = format!("relay-{version}");
    let stage = out.join(&name);
    let _ = fs::remove_dir_all(&stage);
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    for bin in BINARIES {
        let from = target_dir().join("release").join(bin);
        if !from.exists() {
            return Err(format!(
                "{} is missing (cargo build --release -p relay -p ctl -p xtask)",
                from.display()
            ));
        }
        copy(&from, &stage.join("bin").join(bin), 0o755)?;
    }
    for (src, dst, mode) in ASSETS {
        copy(&root().join("dist").join(src), &stage.join(dst), *mode)?;
    }
    let sysctl = stage.join("etc/sysctl.d/60-relay.conf");
    fs::create_dir_all(sysctl.parent().expect("has a parent")).map_err(|e| io(&sysctl, e))?;
    fs::write(&sysctl, crate::tune::sysctl_dropin()).map_err(|e| io(&sysctl, e))?;
    fs::write(stage.join("VERSION"), format!("{version}\n")).map_err(|e| io(&stage, e))?;
    let tarball = out.join(format!("{name}.tar.gz"));
    let status = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
        .arg(&tarball)
        .arg("-C")
        .arg(out)
        .arg(&name)
        .status()
        .map_err(|e| format!("tar: {e}"))?;
    if !status.success() {
        return Err(format!("tar failed: {status}"));
    }
    let _ = fs::remove_dir_all(&stage);
    Ok(tarball)
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result {
    use std::os::unix::fs::PermissionsExt;
    let err = |e: std::io::Error| format!("copy {} -> {}: {e}", from.display(), to.display());
    fs::create_dir_all(to.parent().expect("has a parent")).map_err(err)?;
    fs::copy(from, to).map_err(err)?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode)).map_err(err)
}

/// The version of a tarball named `relay-V.tar.gz`.
pub fn version_of(tarball: &Path) -> Result<String> {
    let name = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let v = name
        .strip_prefix("relay-")
        .and_then(|n| n.strip_suffix(".tar.gz"))
        .ok_or_else(|| {
            format!(
                "{}: expected a file named relay-VERSION.tar.gz",
                tarball.display()
            )
        })?;
    check_version(v)?;
    Ok(v.to_string())
}

/// `dist [--version V] [--out DIR] [--no-build]`.
pub fn dist(args: &[String]) -> Result {
    let mut version = None;
    let mut out = target_dir().join("dist");
    let mut build = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--version" => version = Some(it.next().ok_or("--version needs a value")?.clone()),
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--no-build" => build = false,
            other => return Err(format!("dist: unknown argument {other:?}")),
        }
    }
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let out = out
        .canonicalize()
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let version = version.unwrap_or_else(default_version);
    let tarball = build_tarball(&version, &out, build)?;
    println!("{}", tarball.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_plain_names() {
        assert!(check_version("0.1.0-g1a2b3c4-dirty.17").is_ok());
        assert!(check_version("../x").is_err());
        assert!(check_version(".hidden").is_err());
        assert_eq!(
            version_of(Path::new("/x/relay-0.1.0-gabc.tar.gz")).unwrap(),
            "0.1.0-gabc"
        );
        assert!(version_of(Path::new("/x/other.tar.gz")).is_err());
    }

    /// The units carry what an operator of a media server expects; `systemd-analyze verify`
    /// checks their syntax where it exists (see the deploy integration test).
    #[test]
    fn units_have_the_required_keys() {
        let relay = fs::read_to_string(root().join("dist/relay.service")).unwrap();
        for key in [
            "ExecStart=/opt/relay/current/bin/relay $RELAY_ARGS",
            "EnvironmentFile=/etc/relay/relay.env",
            "LimitMEMLOCK=infinity",
            "CPUAffinity=",
            "Restart=on-failure",
            "RestartPreventExitStatus=77 78",
            "KillSignal=SIGTERM",
            "KillMode=mixed",
            "TimeoutStopSec=",
            "StateDirectory=relay",
            "WantedBy=multi-user.target",
        ] {
            assert!(
                relay.lines().any(|l| l.starts_with(key)),
                "relay.service: {key}"
            );
        }
        let ctl = fs::read_to_string(root().join("dist/ctl.service")).unwrap();
        for key in [
            "ExecStart=/opt/relay/current/bin/ctl serve --config /etc/relay/ctl.toml",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "StateDirectory=relay-ctl",
        ] {
            assert!(
                ctl.lines().any(|l| l.starts_with(key)),
                "ctl.service: {key}"
            );
        }
        let script = fs::read_to_string(root().join("dist/relay-service")).unwrap();
        assert!(script.contains("serve --config \"$root/etc/relay/ctl.toml\" $CTL_ARGS"));
        assert!(script.contains("\"$bin\" $RELAY_ARGS"));
    }
}
