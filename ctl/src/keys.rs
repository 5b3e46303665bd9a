//! ctl's Ed25519 key pair on disk: the secret seed as 64 hex digits and a newline, in a file of
//! mode 0600 (the format `ctl keygen` writes).
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use std::path::Path;

/// Name of the key file inside the data directory.
pub const KEY_FILE: &str = "ctl.key";

/// Creates a new key at `path`, refusing to overwrite an existing file.
pub fn generate(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        bail!("{} exists; refusing to overwrite a key", path.display());
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    write_secret(path, &proto::token::hex(&seed))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads the key at `path`.
pub fn read(path: &Path) -> Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    proto::token::signing_key_from_hex(&text)
        .with_context(|| format!("{}: not a 64-hex-digit Ed25519 secret key", path.display()))
}

/// Reads the key at `path`, creating it first if there is none (a daemon's first start).
pub fn load_or_create(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        read(path)
    } else {
        generate(path)
    }
}

/// The public key in the hex form relays take (`--public-key`, heartbeat answers).
pub fn public_hex(key: &SigningKey) -> String {
    proto::token::hex(key.verifying_key().as_bytes())
}

pub use proto::token::{admin_credential, relay_credential};

fn write_secret(path: &Path, hex: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{hex}")?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_read_back_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("ctl-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(generate(&path).is_err(), "never overwrites");
        assert_eq!(public_hex(&a).len(), 64);
        // Credentials: stable for one key, distinct per relay and per key.
        let other = generate(&dir.join("other.key")).unwrap();
        assert_eq!(admin_credential(&a), admin_credential(&b));
        assert_ne!(admin_credential(&a), admin_credential(&other));
        assert_ne!(relay_credential(&a, 1), relay_credential(&a, 2));
        assert_ne!(relay_credential(&a, 1), admin_credential(&a));
        assert_eq!(relay_credential(&a, 7).len(), 64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
