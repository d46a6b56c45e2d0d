//! The development signing key.
//!
//! On first start Haven creates an Ed25519 key in the data directory so that `haven token`
//! can mint join links without a scheduling system. The server trusts it only in
//! development mode: when no issuer keys are configured.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use jsonwebtoken::{DecodingKey, EncodingKey};

pub const DEV_KEY_FILE: &str = "dev-signing-key.pem";
pub const DEV_ISSUER: &str = "haven-dev";
pub const DEV_AUDIENCE: &str = "haven";

pub struct DevKey {
    /// Where the key lives, for messages that point the operator at it.
    #[allow(dead_code)]
    pub path: PathBuf,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
}

/// Loads the key, creating it (and the data directory) when missing.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<DevKey> {
    let path = data_dir.join(DEV_KEY_FILE);
    if !path.exists() {
        create(&path)?;
    }
    load(&path)
}

/// Loads an existing key; used by `haven token`, which must not invent a key the server
/// does not know.
pub fn load(path: &Path) -> anyhow::Result<DevKey> {
    let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let block =
        pem::parse(&text).with_context(|| format!("{} is not a PEM file", path.display()))?;
    let pair = Ed25519KeyPair::from_pkcs8(block.contents())
        .map_err(|_| anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key", path.display()))?;
    Ok(DevKey {
        path: path.to_owned(),
        encoding: EncodingKey::from_ed_der(block.contents()),
        decoding: DecodingKey::from_ed_der(pair.public_key().as_ref()),
    })
}

fn create(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let doc = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
    // PKCS#8 v1, as `openssl genpkey -algorithm ED25519` writes it: every JWT library and
    // OpenSSL-based tool reads it (some refuse v2 with its embedded public key).
    let text = pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec()));

    // Written to a temporary file and renamed, so a crash never leaves half a key; readable
    // by the owner only.
    let tmp = path.with_extension("pem.tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}
