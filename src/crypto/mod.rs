//! Node identity and end-to-end encryption (DESIGN.md section 7).
//!
//! - [`keys`]: the node's Ed25519 signing key and RSA-3072 encryption key,
//!   rotation, and the keyring of peers' public identities.
//! - [`envelope`]: the streaming hybrid envelope (RSA-OAEP-SHA256 wrapped
//!   file key, AES-256-GCM chunks in STREAM order, optional Ed25519 sender
//!   signatures), for files and for in-memory market payloads alike.
//!
//! Parameters come from the `"crypto"` section of `security-config.json`,
//! embedded at build time so the binary and the repository agree.

use std::sync::OnceLock;

use serde::Deserialize;

pub mod envelope;
pub mod files;
pub mod keys;
mod lifecycle;
pub use lifecycle::{prune_expired, Rotation};
mod pipeline;

pub use envelope::{decrypt, encrypt_to, CryptoError, Opened};
pub use keys::{Identity, KeyError, PublicIdentity};

/// The `"crypto"` section of `security-config.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    /// Suite name written into every envelope header.
    pub suite: String,
    /// RSA modulus size for new encryption keys (and the minimum accepted).
    pub rsa_bits: usize,
    /// Plaintext bytes per AES-GCM chunk in new envelopes.
    pub chunk_size: usize,
    /// Most recipients one envelope may carry.
    pub max_recipients: usize,
}

#[derive(Deserialize)]
struct SecurityConfig {
    crypto: Params,
}

const SECURITY_CONFIG: &str = include_str!("../../security-config.json");

/// The crypto parameters (parsed once).
pub fn params() -> &'static Params {
    static PARAMS: OnceLock<Params> = OnceLock::new();
    PARAMS.get_or_init(|| {
        // The file is embedded at build time and checked by a unit test, so
        // a parse failure here is a build defect, not a runtime condition.
        serde_json::from_str::<SecurityConfig>(SECURITY_CONFIG)
            .expect("security-config.json has a valid \"crypto\" section")
            .crypto
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_parameters_are_sane() {
        let p = super::params();
        assert!(p.rsa_bits >= 3072);
        assert!(p.chunk_size >= 1024 && p.chunk_size <= super::envelope::MAX_CHUNK_SIZE);
        assert!(p.max_recipients >= 1);
        assert_eq!(p.suite, super::envelope::SUITE);
    }
}
