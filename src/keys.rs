//! The keys Haven trusts, read from configuration.
//!
//! Each configured issuer brings PEM public keys (with the algorithm named next to them) or a
//! JWKS file (each key's algorithm from its `alg`, or from its key type when absent). The
//! algorithm is fixed per key here, at start-up; a token's header never chooses it. HS256 is
//! accepted only from the explicit `dev_hs256_secret` setting.

use std::path::PathBuf;

use anyhow::Context;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use signaling::TrustedKey;

/// One trusted issuer in the configuration file:
///
/// ```toml
/// [[issuers]]
/// issuer = "scheduler.example-program"
/// jwks_file = "/etc/haven/scheduler-jwks.json"
///
/// [[issuers]]
/// issuer = "ehr.example"
/// pem_file = "/etc/haven/ehr-es256.pem"
/// algorithm = "ES256"
/// kid = "2026-12"
/// ```
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    pub issuer: String,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default)]
    pub pem_file: Option<PathBuf>,
    /// For `pem_file`: `RS256`, `ES256` or `EdDSA`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// For `pem_file`: the `kid` tokens signed with it carry, if any.
    #[serde(default)]
    pub kid: Option<String>,
}

/// Reads every configured key; all problems are reported together.
pub fn load(issuers: &[IssuerConfig]) -> anyhow::Result<Vec<TrustedKey>> {
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    for cfg in issuers {
        match load_issuer(cfg) {
            Ok(mut k) => keys.append(&mut k),
            Err(e) => problems.push(format!("issuer {:?}: {e:#}", cfg.issuer)),
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("invalid issuer keys:\n  {}", problems.join("\n  "));
    }
    Ok(keys)
}

fn load_issuer(cfg: &IssuerConfig) -> anyhow::Result<Vec<TrustedKey>> {
    match (&cfg.jwks_file, &cfg.pem_file) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a JWKS", path.display()))?;
            let mut keys = Vec::new();
            for jwk in &set.keys {
                let algorithm = jwk_algorithm(jwk).with_context(|| {
                    format!(
                        "key {:?} in {}: no supported algorithm",
                        jwk.common.key_id,
                        path.display()
                    )
                })?;
                let key = DecodingKey::from_jwk(jwk)
                    .with_context(|| format!("key {:?} is not usable", jwk.common.key_id))?;
                keys.push(TrustedKey {
                    issuer: cfg.issuer.clone(),
                    algorithm,
                    key,
                    kid: jwk.common.key_id.clone(),
                });
            }
            if keys.is_empty() {
                anyhow::bail!("{} holds no keys", path.display());
            }
            Ok(keys)
        }
        (None, Some(path)) => {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let (algorithm, key) = match cfg.algorithm.as_deref() {
                Some("RS256") => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)),
                Some("ES256") => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)),
                Some("EdDSA") => (Algorithm::EdDSA, DecodingKey::from_ed_pem(&pem)),
                other => {
                    anyhow::bail!("algorithm {other:?}: use RS256, ES256 or EdDSA with pem_file")
                }
            };
            let key = key.with_context(|| {
                format!("{} is not a public key for {algorithm:?}", path.display())
            })?;
            Ok(vec![TrustedKey {
                issuer: cfg.issuer.clone(),
                algorithm,
                key,
                kid: cfg.kid.clone(),
            }])
        }
        _ => anyhow::bail!("give exactly one of jwks_file and pem_file"),
    }
}

/// The one algorithm a JWK may verify: its `alg`, else what its key type implies. Symmetric
/// keys are never accepted from a JWKS.
fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    match (jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
        (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(_)) => {
            Some(Algorithm::ES256)
        }
        (Some(KeyAlgorithm::EdDSA), AlgorithmParameters::OctetKeyPair(_)) => Some(Algorithm::EdDSA),
        (None, AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
        (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        (None, AlgorithmParameters::OctetKeyPair(_)) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issuer_needs_exactly_one_key_source_and_a_known_algorithm() {
        let none = IssuerConfig {
            issuer: "i".into(),
            jwks_file: None,
            pem_file: None,
            algorithm: None,
            kid: None,
        };
        assert!(load(&[none]).is_err());

        let dir = tempfile::tempdir().expect("temp dir");
        let pem = dir.path().join("k.pem");
        std::fs::write(&pem, "not a key").expect("write");
        let hs = IssuerConfig {
            issuer: "i".into(),
            jwks_file: None,
            pem_file: Some(pem),
            algorithm: Some("HS256".into()),
            kid: None,
        };
        let Err(err) = load(&[hs]) else {
            panic!("HS256 is not a PEM algorithm")
        };
        assert!(err.to_string().contains("RS256, ES256 or EdDSA"), "{err}");
    }
}
