//! The `anchor` request: the coordinator as a witness of nodes' audit logs
//! (docs/PROTOCOL.md, "anchor"). In the spirit of RFC 6962 signed tree heads
//! and C2SP witness cosignatures, at our scale: a node sends its latest
//! signed audit checkpoint (log id, sequence, hash), the coordinator checks
//! that the node's own key signed it and countersigns it with the time, and
//! the node keeps the cosignature. Later, anyone who trusts the
//! coordinator's witness key (in `/healthz`) can check that the node's log
//! still extends what was anchored, even against someone holding the node's
//! key. The witness keeps no state: it attests what it saw and when.
//!
//! Answered in the session task without touching the market database.
//! It must not keep state between requests nor reach the writer.

use std::io;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::audit::Checkpoint;
pub use crate::audit::Cosignature;
use crate::crypto::keys::node_id_of;
use crate::fsutil;
use crate::market::protocol::{self, encode_event, Event, Reason, Rejection};

/// The request `type`.
pub const TYPE: &str = "anchor";

/// An `anchor` request: the node's checkpoint, as in `audit.checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorRequest {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub v: Option<u32>,
    #[serde(default)]
    pub id: Option<String>,
    pub checkpoint: Checkpoint,
}

/// The coordinator's witness key.
pub struct Witness {
    key: SigningKey,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Witness({})", self.public_hex())
    }
}

/// Where the witness key of the coordinator whose database is `db` lives.
pub fn key_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".witness-key");
    db.with_file_name(name)
}

impl Witness {
    /// Load the key from `path` (see [`key_path`]), creating it (0600) on
    /// first start.
    pub fn load_or_create(path: &Path) -> io::Result<Witness> {
        let path = path.to_path_buf();
        match std::fs::read(&path) {
            Ok(b) => {
                let seed: [u8; 32] = b.as_slice().try_into().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} is not a 32-byte Ed25519 seed", path.display()),
                    )
                })?;
                Ok(Witness {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let seed: [u8; 32] = rand::random();
                fsutil::atomic_write(&path, &seed)?;
                Ok(Witness {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) => Err(e),
        }
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Countersign `cp` for `node` (the session's authenticated node id).
    pub fn cosign(&self, node: &str, cp: &Checkpoint) -> Result<Cosignature, Rejection> {
        let bad = |m: String| Rejection::new(Reason::Malformed, m);
        let key_hex = cp
            .key
            .as_deref()
            .ok_or_else(|| bad("the checkpoint is unsigned; generate node keys and run `audit verify` first".into()))?;
        let mut k = [0u8; 32];
        hex::decode_to_slice(key_hex, &mut k).map_err(|_| bad("`checkpoint.key` is not 64 hex digits".into()))?;
        let vk = VerifyingKey::from_bytes(&k).map_err(|_| bad("`checkpoint.key` is not an Ed25519 key".into()))?;
        if node_id_of(&vk) != node {
            return Err(Rejection::new(
                Reason::BadSignature,
                "the checkpoint is signed by another node's key",
            ));
        }
        if cp.signature_valid() != Some(true) {
            return Err(Rejection::new(
                Reason::BadSignature,
                "the checkpoint's signature does not verify",
            ));
        }
        if cp.hash.len() != 64 || hex::decode(&cp.hash).is_err() || cp.log_id.len() > 64 {
            return Err(bad("`checkpoint.hash` must be 64 hex digits".into()));
        }
        let mut c = Cosignature {
            node_id: node.to_string(),
            log_id: cp.log_id.clone(),
            seq: cp.seq,
            hash: cp.hash.clone(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            witness: self.public_hex(),
            sig: String::new(),
        };
        c.sig = hex::encode(self.key.sign(c.signed_text().as_bytes()).to_bytes());
        Ok(c)
    }
}

/// Answer one `anchor` frame from authenticated `node`.
pub fn handle(text: &str, witness: &Witness, node: &str) -> Result<String, (Option<String>, Rejection)> {
    let req: AnchorRequest = serde_json::from_str(text).map_err(|e| {
        (
            None,
            Rejection::new(Reason::Malformed, format!("`anchor` request: {e}")),
        )
    })?;
    let id = req.id.clone();
    if req.v.is_some_and(|v| v != protocol::VERSION) {
        return Err((id, Rejection::new(Reason::BadVersion, "unsupported protocol version")));
    }
    let Some(re) = id.clone() else {
        return Err((None, Rejection::new(Reason::MissingId, "requests need an `id`")));
    };
    let c = witness.cosign(node, &req.checkpoint).map_err(|r| (id, r))?;
    Ok(encode_event(&Event::Ok {
        re,
        result: serde_json::to_value(&c).expect("cosignatures serialise"),
    }))
}

/// The request frame a node sends.
pub fn encode_request(id: &str, cp: &Checkpoint) -> String {
    let mut v: Value = json!({ "type": TYPE, "id": id, "checkpoint": cp });
    v["v"] = Value::from(protocol::VERSION);
    v.to_string()
}
