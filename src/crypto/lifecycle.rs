//! The audited lifecycle of this node's keys: first creation, forced
//! regeneration, rotation, pruning of expired generations, and importing a
//! peer's public identity. Every change is logged (`key.*` events) and
//! re-signs the audit checkpoint with the key now current.
//!
//! Storage and the key material are `keys`; this module owns only the
//! changes and their audit events. `keys` must not append to the audit log.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::json;

use super::keys::{
    entry_of, expired, parse_time, rfc3339, rotation_days, Identity, Index, KeyError, KeyPair, Keyring, PublicIdentity,
    Store,
};
use crate::audit::{AuditLog, Event};
use crate::paths::Paths;

impl Identity {
    /// Load the keys, generating (and auditing `key.created`) on first need.
    pub fn load_or_generate(paths: &Paths) -> Result<Identity, KeyError> {
        let store = Store::new(paths);
        if store.read_index()?.is_some() {
            return Identity::load(paths);
        }
        let _lock = store.lock()?;
        // Another process may have generated while we waited for the lock.
        if store.read_index()?.is_some() {
            return Identity::load(paths);
        }
        let pair = create_first(&store, &AuditLog::new(paths), None)?;
        Ok(Identity {
            current: pair,
            older: Vec::new(),
        })
    }

    /// Generate fresh keys. Without `force`, refuses when keys exist; with it,
    /// every existing generation is discarded.
    pub fn generate(paths: &Paths, force: bool) -> Result<Identity, KeyError> {
        let store = Store::new(paths);
        let _lock = store.lock()?;
        let replaced = match store.read_index()? {
            Some(_) if !force => return Err(KeyError::Exists(store.dir.clone())),
            Some(index) => {
                for e in &index.keys {
                    store.remove_pair(&e.gen)?;
                }
                Some(
                    index
                        .keys
                        .iter()
                        .find(|e| e.gen == index.current)
                        .map(|e| e.node_id.clone()),
                )
            }
            None => None,
        };
        let pair = create_first(&store, &AuditLog::new(paths), replaced.flatten())?;
        Ok(Identity {
            current: pair,
            older: Vec::new(),
        })
    }

    /// Make new keys current; the old current key stays usable for
    /// decryption for `security.keyRotationDays`. Expired keys are removed first.
    pub fn rotate(paths: &Paths) -> Result<Rotation, KeyError> {
        let audit = &AuditLog::new(paths);
        let store = Store::new(paths);
        let days = rotation_days(paths)?;
        let _lock = store.lock()?;
        let now = Utc::now();
        let removed = prune_locked(&store, audit, days, now)?;
        let mut index = store
            .read_index()?
            .ok_or_else(|| KeyError::Missing(store.dir.clone()))?;
        let old = index.current.clone();
        let old_node = index
            .keys
            .iter()
            .find(|e| e.gen == old)
            .map(|e| e.node_id.clone())
            .unwrap_or_default();
        let pair = KeyPair::generate()?;
        store.write_pair(&pair)?;
        for e in index.keys.iter_mut().filter(|e| e.gen == old) {
            e.retired = Some(rfc3339(now));
        }
        index.keys.push(entry_of(&pair));
        index.current = pair.gen.clone();
        store.write_index(&index)?;
        audit.append(
            Event::KeyRotated,
            json!({
                "old_node_id": old_node,
                "node_id": pair.node_id,
                "key_id": hex::encode(pair.key_id),
                "old_usable_until": rfc3339(now + Duration::days(days)),
                "removed": removed,
            }),
        )?;
        // The last checkpoint is signed by the old key: sign one with the new.
        audit.resign_checkpoint()?;
        Ok(Rotation {
            old_node_id: old_node,
            new: pair.public(),
            old_usable_until: rfc3339(now + Duration::days(days)),
            removed,
        })
    }
}

/// What `keys rotate` did.
#[derive(Debug, Clone, Serialize)]
pub struct Rotation {
    pub old_node_id: String,
    pub new: PublicIdentity,
    pub old_usable_until: String,
    pub removed: usize,
}

fn create_first(store: &Store, audit: &AuditLog, replaced: Option<String>) -> Result<KeyPair, KeyError> {
    let pair = KeyPair::generate()?;
    // Logged first: keys on disk always imply a log that recorded them,
    // which is what stops a deleted log from silently starting afresh.
    audit.append(
        Event::KeyCreated,
        json!({
            "node_id": pair.node_id,
            "key_id": hex::encode(pair.key_id),
            "rsa_bits": super::params().rsa_bits,
            "replaced_node_id": replaced,
        }),
    )?;
    store.write_pair(&pair)?;
    store.write_index(&Index {
        v: 1,
        current: pair.gen.clone(),
        keys: vec![entry_of(&pair)],
    })?;
    // From now on checkpoints are signed; the last one may be unsigned or
    // signed by keys that are gone: sign one at the head with the new key
    // (after checking the chain since), whoever asked for the keys.
    audit.resign_checkpoint()?;
    Ok(pair)
}

/// Remove retired keys whose decryption window (`security.keyRotationDays`
/// after retirement) has passed. Returns how many generations were removed.
pub fn prune_expired(paths: &Paths, now: DateTime<Utc>) -> Result<usize, KeyError> {
    let store = Store::new(paths);
    if store.read_index()?.is_none() {
        return Ok(0);
    }
    let days = rotation_days(paths)?;
    let _lock = store.lock()?;
    prune_locked(&store, &AuditLog::new(paths), days, now)
}

fn prune_locked(store: &Store, audit: &AuditLog, days: i64, now: DateTime<Utc>) -> Result<usize, KeyError> {
    let Some(mut index) = store.read_index()? else {
        return Ok(0);
    };
    let (gone, keep): (Vec<_>, Vec<_>) = index
        .keys
        .into_iter()
        .partition(|e| e.gen != index.current && expired(e.retired.as_deref().and_then(parse_time), days, now));
    index.keys = keep;
    if gone.is_empty() {
        return Ok(0);
    }
    // Index first: a crash after it leaves stray files, never an index
    // that names missing keys.
    store.write_index(&index)?;
    for e in &gone {
        store.remove_pair(&e.gen)?;
        audit.append(Event::KeyRemoved, json!({ "node_id": e.node_id, "retired": e.retired }))?;
    }
    Ok(gone.len())
}

impl Keyring {
    /// `keys import`: add a peer's public identity under `name` (with
    /// `own`, as one of this user's own nodes, which may also mark a peer
    /// already imported), audited as `key.imported`.
    pub fn import_audited(
        &self,
        paths: &Paths,
        name: &str,
        public: &PublicIdentity,
        own: bool,
    ) -> Result<(), KeyError> {
        match self.import(name, public) {
            Ok(()) => {}
            // Marking a peer already in the keyring as one's own.
            Err(KeyError::DuplicatePeer(_))
                if own && self.get(name).is_ok_and(|have| have.node_id == public.node_id) => {}
            Err(e) => return Err(e),
        }
        if own {
            self.mark_own(name)?;
        }
        AuditLog::new(paths).append(
            Event::KeyImported,
            json!({ "name": name, "node_id": public.node_id, "own": own }),
        )?;
        Ok(())
    }
}
