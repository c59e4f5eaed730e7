//! The splitter's signing key for `--sign KEYFILE` (CIS, `docs/integrity.md`).
//!
//! The file holds the 32-byte Ed25519 secret as 64 hex digits and a newline. It is created with
//! mode 0600 on first use (from the operating system's random source) and never overwritten.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::proto::integrity::{ChunkSigner, hex, unhex};

/// Reads the key in `path`, or creates it. Returns the signer and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(ChunkSigner, bool), String> {
    let shown = path.display();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = unhex(text.trim())
                .ok_or_else(|| format!("--sign {shown}: not a key file (64 hex digits)"))?;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    "--sign {shown}: the key file can be read by other users (chmod 600 it)"
                );
            }
            Ok((ChunkSigner::from_secret(&secret), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| format!("--sign {shown}: no random source: {e}"))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("--sign {shown}: cannot create the key file: {e}"))?;
            f.write_all(format!("{}\n", hex(&secret)).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("--sign {shown}: cannot write the key file: {e}"))?;
            Ok((ChunkSigner::from_secret(&secret), true))
        }
        Err(e) => Err(format!("--sign {shown}: cannot read the key file: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_private_then_loaded_the_same() {
        let dir = std::env::temp_dir().join(format!("p2psp-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("splitter.key");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public_hex(), b.public_hex());
        std::fs::write(&path, "nonsense").unwrap();
        assert!(
            load_or_create(&path)
                .unwrap_err()
                .contains("not a key file")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
