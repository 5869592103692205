//! Node keys: an Ed25519 signing key (the node's identity: node id = hex
//! SHA-256 of its public key) and an RSA encryption key others wrap file keys
//! to. Rotation keeps retired keys for decryption for
//! `security.keyRotationDays`, then [`prune_expired`] removes them.
//!
//! On disk, under `keys/` (directory 0700, files 0600):
//! - `keys.json`: which generation is current, and when each was created and retired;
//! - `<gen>.signing.pem`, `<gen>.encryption.pem`: PKCS#8 private keys;
//! - `peers/<name>.json`: public identities of peers (the keyring).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use rsa::pkcs8::{DecodePublicKey as _, EncodePublicKey as _, LineEnding};
use rsa::traits::PublicKeyParts as _;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::error::AuditError;
use crate::config::{Config, ConfigError};
use crate::exit::{Exit, HasExit};
use crate::fsutil::{self, FileLock};
use crate::paths::Paths;

/// Errors from key management.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no node keys yet in {}", .0.display())]
    Missing(PathBuf),
    #[error("node keys already exist in {}", .0.display())]
    Exists(PathBuf),
    #[error("invalid public identity: {0}")]
    Invalid(String),
    #[error("a peer named `{0}` is already in the keyring")]
    DuplicatePeer(String),
    #[error("no peer named `{0}` in the keyring")]
    UnknownPeer(String),
    #[error("invalid peer name `{0}`: use 1-64 letters, digits, `.`, `_` or `-`, not starting with `.`")]
    BadName(String),
    #[error("key file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("key I/O error on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl HasExit for KeyError {
    fn exit(&self) -> Exit {
        match self {
            KeyError::Missing(_) | KeyError::Io { .. } | KeyError::Generate(_) => Exit::Failed,
            KeyError::Exists(_)
            | KeyError::Invalid(_)
            | KeyError::DuplicatePeer(_)
            | KeyError::UnknownPeer(_)
            | KeyError::BadName(_) => Exit::Usage,
            KeyError::Corrupt { .. } => Exit::Integrity,
            KeyError::Config(e) => e.exit(),
            KeyError::Audit(e) => e.exit(),
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            KeyError::Missing(_) => Some("run `claude-max-market keys generate`".into()),
            KeyError::Exists(_) => Some(
                "use `keys rotate` to replace them keeping old files decryptable, or `--force` to discard them".into(),
            ),
            KeyError::Invalid(_) => {
                Some("ask the peer for the output of `claude-max-market keys export --public FILE`".into())
            }
            KeyError::DuplicatePeer(_) => Some("pick another name, or look at `claude-max-market keys list`".into()),
            KeyError::UnknownPeer(_) => {
                Some("see `claude-max-market keys list`, or pass a public identity FILE".into())
            }
            KeyError::Corrupt { .. } => Some(
                "restore the keys directory from a backup, or `keys generate --force` (old files become undecryptable)"
                    .into(),
            ),
            KeyError::Config(e) => e.hint(),
            KeyError::Audit(e) => e.hint(),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Hex SHA-256 of an Ed25519 public key: the node id.
pub fn node_id_of(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// SHA-256 of the RSA public key's SubjectPublicKeyInfo DER: the key id
/// envelopes name recipients by.
pub fn rsa_key_id(key: &RsaPublicKey) -> Result<[u8; 32], KeyError> {
    let der = key
        .to_public_key_der()
        .map_err(|e| KeyError::Invalid(format!("RSA public key does not encode: {e}")))?;
    Ok(Sha256::digest(der.as_bytes()).into())
}

/// A node's public identity: what peers import to encrypt to it and verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicIdentity {
    /// Hex SHA-256 of the Ed25519 public key.
    pub node_id: String,
    /// Base64 of the 32-byte Ed25519 public key.
    pub ed25519: String,
    /// RSA public key, SubjectPublicKeyInfo PEM.
    pub rsa_public_pem: String,
    /// When the keys were created (RFC 3339).
    pub created: String,
}

impl PublicIdentity {
    /// The Ed25519 verifying key (any encoding error is an invalid identity).
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.ed25519.trim())
            .map_err(|e| KeyError::Invalid(format!("`ed25519` is not base64: {e}")))?;
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| KeyError::Invalid("`ed25519` must be 32 bytes".into()))?;
        VerifyingKey::from_bytes(&raw).map_err(|e| KeyError::Invalid(format!("`ed25519` is not a valid point: {e}")))
    }

    /// The RSA public key, checked to be at least the configured size.
    pub fn rsa_public(&self) -> Result<RsaPublicKey, KeyError> {
        let key = RsaPublicKey::from_public_key_pem(self.rsa_public_pem.trim())
            .map_err(|e| KeyError::Invalid(format!("`rsa_public_pem` does not parse: {e}")))?;
        let bits = key.n().bits();
        let min = super::params().rsa_bits;
        if bits < min {
            return Err(KeyError::Invalid(format!(
                "RSA key has {bits} bits; at least {min} are required"
            )));
        }
        Ok(key)
    }

    /// Check that the node id matches the Ed25519 key, the RSA key parses and
    /// is large enough, and `created` is RFC 3339.
    pub fn validate(&self) -> Result<(), KeyError> {
        let vk = self.verifying_key()?;
        if node_id_of(&vk) != self.node_id {
            return Err(KeyError::Invalid(
                "`node_id` is not the SHA-256 of the `ed25519` key".into(),
            ));
        }
        self.rsa_public()?;
        DateTime::parse_from_rfc3339(&self.created)
            .map_err(|e| KeyError::Invalid(format!("`created` is not RFC 3339: {e}")))?;
        Ok(())
    }

    /// Verify an Ed25519 signature by this node (strict: rejects
    /// non-canonical and small-order encodings).
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        self.verifying_key().is_ok_and(|vk| vk.verify_strict(msg, sig).is_ok())
    }

    /// Hex key id of the RSA key (see [`rsa_key_id`]).
    pub fn key_id(&self) -> Result<String, KeyError> {
        Ok(hex::encode(rsa_key_id(&self.rsa_public()?)?))
    }
}

/// One generation of private keys.
pub struct KeyPair {
    pub(crate) gen: String,
    pub(crate) node_id: String,
    pub(crate) signing: SigningKey,
    pub(crate) rsa: RsaPrivateKey,
    pub(crate) key_id: [u8; 32],
    pub(crate) created: DateTime<Utc>,
    pub(crate) retired: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for KeyPair {
    // Never print private key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("gen", &self.gen)
            .field("node_id", &self.node_id)
            .field("created", &self.created)
            .field("retired", &self.retired)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Assemble a pair from existing keys (fixtures, tests, fuzzing).
    pub fn from_parts(signing: SigningKey, rsa: RsaPrivateKey, created: DateTime<Utc>) -> Result<KeyPair, KeyError> {
        let node_id = node_id_of(&signing.verifying_key());
        let key_id = rsa_key_id(&rsa.to_public_key())?;
        Ok(KeyPair {
            gen: node_id[..16].to_string(),
            node_id,
            signing,
            rsa,
            key_id,
            created,
            retired: None,
        })
    }

    pub(super) fn generate() -> Result<KeyPair, KeyError> {
        let signing = SigningKey::generate(&mut OsRng);
        let rsa =
            RsaPrivateKey::new(&mut OsRng, super::params().rsa_bits).map_err(|e| KeyError::Generate(e.to_string()))?;
        KeyPair::from_parts(signing, rsa, Utc::now())
    }

    pub fn public(&self) -> PublicIdentity {
        let pem = self
            .rsa
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            // Encoding a key we hold in memory cannot fail: it is a valid
            // RSA key and the encoder only fails on malformed input.
            .expect("RSA public key encodes");
        PublicIdentity {
            node_id: self.node_id.clone(),
            ed25519: base64::engine::general_purpose::STANDARD.encode(self.signing.verifying_key().as_bytes()),
            rsa_public_pem: pem,
            created: rfc3339(self.created),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The raw Ed25519 public key.
    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The RSA key id this pair receives envelopes under.
    pub fn key_id(&self) -> &[u8; 32] {
        &self.key_id
    }

    pub(crate) fn rsa_private(&self) -> &RsaPrivateKey {
        &self.rsa
    }
}

/// The node's private keys: the current pair, plus retired pairs still
/// within `security.keyRotationDays` of their retirement (decryption only).
#[derive(Debug)]
pub struct Identity {
    pub(super) current: KeyPair,
    pub(super) older: Vec<KeyPair>,
}

/// `keys.json`: the index of generations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Index {
    pub(super) v: u32,
    pub(super) current: String,
    pub(super) keys: Vec<IndexEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct IndexEntry {
    pub(super) gen: String,
    pub(super) node_id: String,
    pub(super) created: String,
    pub(super) retired: Option<String>,
}

pub(super) struct Store {
    pub(super) dir: PathBuf,
}

impl Store {
    pub(super) fn new(paths: &Paths) -> Store {
        Store { dir: paths.keys_dir() }
    }
    pub(super) fn index_path(&self) -> PathBuf {
        self.dir.join("keys.json")
    }
    pub(super) fn signing_path(&self, gen: &str) -> PathBuf {
        self.dir.join(format!("{gen}.signing.pem"))
    }
    pub(super) fn encryption_path(&self, gen: &str) -> PathBuf {
        self.dir.join(format!("{gen}.encryption.pem"))
    }
    pub(super) fn peers_dir(&self) -> PathBuf {
        self.dir.join("peers")
    }
    pub(super) fn lock(&self) -> Result<FileLock, KeyError> {
        fsutil::ensure_private_dir(&self.dir).map_err(io_err(&self.dir))?;
        let p = self.dir.join(".lock");
        FileLock::exclusive(&p).map_err(io_err(&p))
    }

    pub(super) fn read_index(&self) -> Result<Option<Index>, KeyError> {
        let p = self.index_path();
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| KeyError::Corrupt {
                path: p,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    pub(super) fn write_index(&self, index: &Index) -> Result<(), KeyError> {
        let p = self.index_path();
        let bytes = serde_json::to_vec_pretty(index).expect("index serialises");
        fsutil::atomic_write(&p, &bytes).map_err(io_err(&p))
    }

    pub(super) fn write_pair(&self, pair: &KeyPair) -> Result<(), KeyError> {
        let sp = self.signing_path(&pair.gen);
        let spem = pair
            .signing
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Generate(format!("encoding the signing key: {e}")))?;
        fsutil::atomic_write(&sp, spem.as_bytes()).map_err(io_err(&sp))?;
        let ep = self.encryption_path(&pair.gen);
        let epem = rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&pair.rsa, LineEnding::LF)
            .map_err(|e| KeyError::Generate(format!("encoding the encryption key: {e}")))?;
        fsutil::atomic_write(&ep, epem.as_bytes()).map_err(io_err(&ep))
    }

    pub(super) fn read_pair(&self, e: &IndexEntry) -> Result<KeyPair, KeyError> {
        let corrupt = |path: &Path, reason: String| KeyError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let sp = self.signing_path(&e.gen);
        let s = fs::read_to_string(&sp).map_err(io_err(&sp))?;
        let signing = SigningKey::from_pkcs8_pem(&s).map_err(|err| corrupt(&sp, err.to_string()))?;
        let ep = self.encryption_path(&e.gen);
        let s = fs::read_to_string(&ep).map_err(io_err(&ep))?;
        let rsa = <RsaPrivateKey as rsa::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&s)
            .map_err(|err| corrupt(&ep, err.to_string()))?;
        let created = parse_time(&e.created).ok_or_else(|| corrupt(&self.index_path(), "bad `created`".into()))?;
        let mut pair = KeyPair::from_parts(signing, rsa, created)?;
        if pair.node_id != e.node_id {
            return Err(corrupt(
                &sp,
                "the signing key does not match the node id in keys.json".into(),
            ));
        }
        pair.gen = e.gen.clone();
        pair.retired = match &e.retired {
            Some(t) => Some(parse_time(t).ok_or_else(|| corrupt(&self.index_path(), "bad `retired`".into()))?),
            None => None,
        };
        Ok(pair)
    }

    pub(super) fn remove_pair(&self, gen: &str) -> Result<(), KeyError> {
        for p in [self.signing_path(gen), self.encryption_path(gen)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(())
    }
}

pub(super) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

pub(super) fn entry_of(pair: &KeyPair) -> IndexEntry {
    IndexEntry {
        gen: pair.gen.clone(),
        node_id: pair.node_id.clone(),
        created: rfc3339(pair.created),
        retired: pair.retired.map(rfc3339),
    }
}

pub(super) fn rotation_days(paths: &Paths) -> Result<i64, KeyError> {
    Ok(Config::load(paths)?.settings().security.key_rotation_days)
}

/// Is a retired key past its decryption window?
pub(super) fn expired(retired: Option<DateTime<Utc>>, days: i64, now: DateTime<Utc>) -> bool {
    retired.is_some_and(|r| now >= r + Duration::days(days))
}

impl Identity {
    /// Load the node's keys (current plus unexpired retired ones).
    pub fn load(paths: &Paths) -> Result<Identity, KeyError> {
        let store = Store::new(paths);
        let index = store
            .read_index()?
            .ok_or_else(|| KeyError::Missing(store.dir.clone()))?;
        let days = rotation_days(paths)?;
        Identity::from_index(&store, &index, days, Utc::now())
    }

    fn from_index(store: &Store, index: &Index, days: i64, now: DateTime<Utc>) -> Result<Identity, KeyError> {
        let mut current = None;
        let mut older = Vec::new();
        for e in &index.keys {
            if e.gen == index.current {
                current = Some(store.read_pair(e)?);
            } else {
                let retired = e.retired.as_deref().and_then(parse_time);
                if !expired(retired, days, now) {
                    older.push(store.read_pair(e)?);
                }
            }
        }
        let current = current.ok_or_else(|| KeyError::Corrupt {
            path: store.index_path(),
            reason: format!("the current generation `{}` is not listed", index.current),
        })?;
        // Newest first: the likeliest match for an old file is the last key.
        older.sort_by_key(|p| std::cmp::Reverse(p.created));
        Ok(Identity { current, older })
    }

    pub fn node_id(&self) -> &str {
        &self.current.node_id
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.current.signing.sign(msg)
    }

    pub fn public(&self) -> PublicIdentity {
        self.current.public()
    }

    /// The current pair.
    pub fn current(&self) -> &KeyPair {
        &self.current
    }

    /// Every pair that may decrypt: current first, then retired ones.
    pub fn decryption_keys(&self) -> impl Iterator<Item = &KeyPair> {
        std::iter::once(&self.current).chain(self.older.iter())
    }

    /// Build from parts (tests and fixtures).
    pub fn from_pairs(current: KeyPair, older: Vec<KeyPair>) -> Identity {
        Identity { current, older }
    }

    /// When the current key was created.
    pub fn created(&self) -> DateTime<Utc> {
        self.current.created
    }
}

/// Summary of one generation, for `keys list`.
#[derive(Debug, Clone, Serialize)]
pub struct KeySummary {
    pub node_id: String,
    pub created: String,
    pub retired: Option<String>,
    pub current: bool,
    /// When a retired key stops decrypting.
    pub usable_until: Option<String>,
}

/// The node's own generations (no private material is read).
pub fn own_keys(paths: &Paths) -> Result<Vec<KeySummary>, KeyError> {
    let store = Store::new(paths);
    let Some(index) = store.read_index()? else {
        return Ok(Vec::new());
    };
    let days = rotation_days(paths)?;
    Ok(index
        .keys
        .iter()
        .map(|e| KeySummary {
            node_id: e.node_id.clone(),
            created: e.created.clone(),
            retired: e.retired.clone(),
            current: e.gen == index.current,
            usable_until: e
                .retired
                .as_deref()
                .and_then(parse_time)
                .map(|r| rfc3339(r + Duration::days(days))),
        })
        .collect())
}

/// Creation time of the current key, if any (for `health`).
pub fn current_key_created(paths: &Paths) -> Result<Option<DateTime<Utc>>, KeyError> {
    let store = Store::new(paths);
    let Some(index) = store.read_index()? else {
        return Ok(None);
    };
    Ok(index
        .keys
        .iter()
        .find(|e| e.gen == index.current)
        .and_then(|e| parse_time(&e.created)))
}

/// The keyring of peers' public identities.
pub struct Keyring {
    dir: PathBuf,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Keyring {
    pub fn new(paths: &Paths) -> Keyring {
        Keyring {
            dir: Store::new(paths).peers_dir(),
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, KeyError> {
        if !valid_name(name) {
            return Err(KeyError::BadName(name.into()));
        }
        Ok(self.dir.join(format!("{name}.json")))
    }

    /// Add a validated identity under `name`; duplicate names are refused.
    pub fn import(&self, name: &str, id: &PublicIdentity) -> Result<(), KeyError> {
        id.validate()?;
        let p = self.path(name)?;
        fsutil::ensure_private_dir(&self.dir).map_err(io_err(&self.dir))?;
        let _lock = FileLock::exclusive(&self.dir.join(".lock")).map_err(io_err(&self.dir))?;
        if p.exists() {
            return Err(KeyError::DuplicatePeer(name.into()));
        }
        let bytes = serde_json::to_vec_pretty(id).expect("identity serialises");
        fsutil::atomic_write(&p, &bytes).map_err(io_err(&p))
    }

    pub fn get(&self, name: &str) -> Result<PublicIdentity, KeyError> {
        let p = self.path(name)?;
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(KeyError::UnknownPeer(name.into())),
            Err(e) => return Err(io_err(&p)(e)),
        };
        let id: PublicIdentity = serde_json::from_slice(&bytes).map_err(|e| KeyError::Corrupt {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        id.validate().map_err(|e| KeyError::Corrupt {
            path: p,
            reason: e.to_string(),
        })?;
        Ok(id)
    }

    /// Every peer, sorted by name.
    pub fn list(&self) -> Result<Vec<(String, PublicIdentity)>, KeyError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io_err(&self.dir))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".json").filter(|n| valid_name(n)) {
                out.push((name.to_string(), self.get(name)?));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Mark the peer `name` as one of this user's own nodes (`keys import
    /// --own`): a marker `<name>.own` beside its identity, naming its node id.
    pub fn mark_own(&self, name: &str) -> Result<(), KeyError> {
        let id = self.get(name)?;
        let p = self.dir.join(format!("{name}.own"));
        fsutil::atomic_write(&p, id.node_id.as_bytes()).map_err(io_err(&p))
    }

    /// Node ids of the peers marked as this user's own nodes. A marker whose
    /// node id differs from the identity beside it counts for nothing.
    pub fn own_node_ids(&self) -> Vec<String> {
        self.list()
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, id)| {
                fs::read_to_string(self.dir.join(format!("{name}.own"))).is_ok_and(|m| m.trim() == id.node_id)
            })
            .map(|(_, id)| id.node_id)
            .collect()
    }

    /// The name a node id is known under, if any.
    pub fn name_of(&self, node_id: &str) -> Option<String> {
        self.list()
            .ok()?
            .into_iter()
            .find(|(_, id)| id.node_id == node_id)
            .map(|(n, _)| n)
    }
}

/// Read a public identity from a file (the `keys export --public` format,
/// or `keys show --json` output) and validate it.
pub fn read_public_file(path: &Path) -> Result<PublicIdentity, KeyError> {
    // A public identity is about 1 KiB; 64 KiB bounds the read of anything
    // else (`/dev/zero`, a runaway pipe).
    const LIMIT: u64 = 64 << 10;
    let bytes = fsutil::read_file_capped(path, LIMIT).map_err(|e| match e {
        fsutil::ReadCapError::Io(e) => io_err(path)(e),
        too_large => KeyError::Invalid(format!("{} is not a public identity: {too_large}", path.display())),
    })?;
    let id: PublicIdentity = serde_json::from_slice(&bytes)
        .map_err(|e| KeyError::Invalid(format!("{} is not a public identity: {e}", path.display())))?;
    id.validate()?;
    Ok(id)
}

/// Resolve a `--recipient` / `--require-signer` value: `self` (this node),
/// a keyring name, or a public identity file.
pub fn resolve_peer(paths: &Paths, me: &PublicIdentity, spec: &str) -> Result<PublicIdentity, KeyError> {
    if spec == "self" {
        return Ok(me.clone());
    }
    let ring = Keyring::new(paths);
    if valid_name(spec) {
        match ring.get(spec) {
            Ok(id) => return Ok(id),
            Err(KeyError::UnknownPeer(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let path = Path::new(spec);
    if path.is_file() {
        return read_public_file(path);
    }
    Err(KeyError::UnknownPeer(spec.into()))
}

/// How to show a node id to a person: `self`, its keyring name, or the id.
pub fn describe_node(paths: &Paths, me: &Identity, node_id: &str) -> String {
    if me.decryption_keys().any(|k| k.node_id == node_id) {
        return format!("self ({node_id})");
    }
    match Keyring::new(paths).name_of(node_id) {
        Some(name) => format!("{name} ({node_id})"),
        None => format!("unknown node {node_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_keys_expire_after_the_window() {
        let t = Utc::now();
        assert!(!expired(None, 30, t));
        assert!(!expired(Some(t), 30, t + Duration::days(29)));
        assert!(expired(Some(t), 30, t + Duration::days(30)));
    }

    #[test]
    fn peer_names() {
        assert!(valid_name("alice"));
        assert!(valid_name("bob-2.node_x"));
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
