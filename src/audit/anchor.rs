//! A witness's cosignature of an audit checkpoint, as the node keeps it in
//! `audit.anchors` (docs/PROTOCOL.md, "anchor"). The audit log owns this
//! record: it verifies the log against it. Asking a witness is the market
//! client's (`market::anchor`), answering is the coordinator's
//! (`market::server::anchor`); this module must not talk to either.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

/// What the witness returns (and the node keeps in `audit.anchors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cosignature {
    pub node_id: String,
    pub log_id: String,
    pub seq: u64,
    pub hash: String,
    /// When the witness saw it (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// The witness's Ed25519 public key (hex) and signature (hex) over
    /// [`Cosignature::signed_text`].
    pub witness: String,
    pub sig: String,
}

impl Cosignature {
    pub fn signed_text(&self) -> String {
        format!(
            "claude-max-market audit anchor v1\nnode {}\nlog {}\nseq {}\nhash {}\ntime {}\n",
            self.node_id, self.log_id, self.seq, self.hash, self.time
        )
    }

    /// Does the witness signature verify under the key it names?
    pub fn valid(&self) -> bool {
        let mut k = [0u8; 32];
        let mut s = [0u8; 64];
        if hex::decode_to_slice(&self.witness, &mut k).is_err() || hex::decode_to_slice(&self.sig, &mut s).is_err() {
            return false;
        }
        VerifyingKey::from_bytes(&k)
            .map(|vk| {
                vk.verify_strict(self.signed_text().as_bytes(), &ed25519_dalek::Signature::from_bytes(&s))
                    .is_ok()
            })
            .unwrap_or(false)
    }
}
