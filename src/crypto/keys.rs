//! Minimal node identity; replaced by the full key store.
//!
//! Ed25519 only: the signing key lives in `keys/ed25519.key` (0600, written
//! atomically). The node id is the hex SHA-256 of the public key bytes.

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::AuditLog;
use crate::exit::{Exit, HasExit};
use crate::fsutil;
use crate::paths::Paths;

/// Why a key could not be loaded, created or trusted.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write the node key: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node key file is corrupt: {0}")]
    Corrupt(String),
    #[error("invalid public identity: {0}")]
    Invalid(String),
}

impl HasExit for KeyError {
    fn exit(&self) -> Exit {
        match self {
            KeyError::Io(_) => Exit::Failed,
            KeyError::Corrupt(_) | KeyError::Invalid(_) => Exit::Integrity,
        }
    }
}

/// This node's private identity.
pub struct Identity {
    signing: SigningKey,
    node_id: String,
    created: String,
}

/// What other nodes and the coordinator may know about a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicIdentity {
    pub node_id: String,
    /// Base64 of the 32 Ed25519 public key bytes.
    pub ed25519: String,
    pub rsa_public_pem: String,
    pub created: String,
}

fn node_id_of(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Identity {
    pub fn load_or_generate(paths: &Paths, audit: &AuditLog) -> Result<Identity, KeyError> {
        let file = paths.keys_dir().join("ed25519.key");
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let mut lines = text.lines();
                let key = lines.next().unwrap_or_default();
                let created = lines.next().unwrap_or_default().to_string();
                let bytes: [u8; 32] = hex::decode(key.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| KeyError::Corrupt(file.display().to_string()))?;
                let signing = SigningKey::from_bytes(&bytes);
                let node_id = node_id_of(&signing.verifying_key());
                Ok(Identity {
                    signing,
                    node_id,
                    created,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fsutil::ensure_private_dir(&paths.keys_dir())?;
                let signing = SigningKey::generate(&mut rand::rngs::OsRng);
                let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let text = format!("{}\n{created}\n", hex::encode(signing.to_bytes()));
                fsutil::atomic_write(&file, text.as_bytes())?;
                let node_id = node_id_of(&signing.verifying_key());
                audit
                    .append("keys.created", serde_json::json!({ "node_id": node_id }))
                    .map_err(|e| KeyError::Io(std::io::Error::other(e.to_string())))?;
                Ok(Identity {
                    signing,
                    node_id,
                    created,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.signing.sign(msg)
    }

    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            node_id: self.node_id.clone(),
            ed25519: base64::engine::general_purpose::STANDARD.encode(self.signing.verifying_key().as_bytes()),
            rsa_public_pem: String::new(),
            created: self.created.clone(),
        }
    }
}

impl PublicIdentity {
    fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(&self.ed25519)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::Invalid("ed25519 key is not 32 base64 bytes".into()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Invalid("ed25519 key is not a curve point".into()))
    }

    /// The node id must be the hash of the signing key it claims.
    pub fn validate(&self) -> Result<(), KeyError> {
        let key = self.verifying_key()?;
        if node_id_of(&key) != self.node_id {
            return Err(KeyError::Invalid("node id does not match the signing key".into()));
        }
        Ok(())
    }

    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        self.verifying_key().is_ok_and(|k| k.verify(msg, sig).is_ok())
    }
}
