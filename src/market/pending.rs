//! Prompts of posted tasks that still need sending: a requester that posts
//! and goes away (`bid` without `--wait`, or an interrupted `bid --wait`)
//! keeps the prompt here, encrypted to and signed by its own identity, so
//! `market result TASK_ID` can seal it to whichever provider holds the lease
//! later. One file per task, `market/pending/<task_id>.cmme`, 0600 in a 0700
//! directory; removed once the task settles or is refunded.
//!
//! This module owns those files and nothing else: it must not decide when a
//! prompt may be sent (the `collect` operation checks it against the posted
//! hash first) and must not talk to the market.

use std::io;
use std::path::PathBuf;

use crate::crypto::{envelope, CryptoError, Identity};
use crate::exit::{Exit, HasExit};
use crate::fsutil;
use crate::paths::Paths;

#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error("`{0}` is not a task id")]
    BadTaskId(String),
    #[error("cannot store the prompt at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the stored prompt at {} does not open: {source}", path.display())]
    Crypto { path: PathBuf, source: CryptoError },
    #[error("the stored prompt at {} was not sealed by this node (signer {signer})", path.display())]
    NotMine { path: PathBuf, signer: String },
}

impl HasExit for PendingError {
    fn exit(&self) -> Exit {
        match self {
            PendingError::BadTaskId(_) => Exit::Usage,
            PendingError::Io { .. } => Exit::Failed,
            PendingError::Crypto { .. } | PendingError::NotMine { .. } => Exit::Integrity,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            PendingError::BadTaskId(_) => Some("pass the task id `bid` printed (`t-` and hex digits)".into()),
            PendingError::Crypto { path, .. } | PendingError::NotMine { path, .. } => Some(format!(
                "nothing was sent; remove {} to give up on sending this task's prompt",
                path.display()
            )),
            PendingError::Io { .. } => None,
        }
    }
}

/// Task ids are the coordinator's (`t-` and hex); anything else never
/// becomes a file name, so a hostile id cannot point outside the directory.
fn checked(task_id: &str) -> Result<&str, PendingError> {
    let ok = !task_id.is_empty()
        && task_id.len() <= 64
        && task_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(task_id)
    } else {
        Err(PendingError::BadTaskId(task_id.to_string()))
    }
}

/// Where the prompt of `task_id` is kept.
pub fn path(paths: &Paths, task_id: &str) -> Result<PathBuf, PendingError> {
    Ok(paths.pending_dir().join(format!("{}.cmme", checked(task_id)?)))
}

/// Keep `prompt` for `task_id`, encrypted to and signed by `me`.
pub fn store(paths: &Paths, me: &Identity, task_id: &str, prompt: &[u8]) -> Result<PathBuf, PendingError> {
    let file = path(paths, task_id)?;
    let io_err = |source| PendingError::Io {
        path: file.clone(),
        source,
    };
    let sealed = envelope::encrypt_to(&[me.public()], Some(me), prompt).map_err(|source| PendingError::Crypto {
        path: file.clone(),
        source,
    })?;
    let market_dir = paths.pending_dir().parent().map(PathBuf::from).unwrap_or_default();
    fsutil::ensure_private_dir(&market_dir).map_err(io_err)?;
    fsutil::ensure_private_dir(&paths.pending_dir()).map_err(io_err)?;
    fsutil::atomic_write(&file, &sealed).map_err(io_err)?;
    Ok(file)
}

/// The kept prompt of `task_id`, if there is one. It must open with one of
/// our keys and carry one of our signatures.
pub fn load(paths: &Paths, me: &Identity, task_id: &str) -> Result<Option<Vec<u8>>, PendingError> {
    let file = path(paths, task_id)?;
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PendingError::Io { path: file, source }),
    };
    let opened = envelope::decrypt(me, &bytes, None).map_err(|source| PendingError::Crypto {
        path: file.clone(),
        source,
    })?;
    let signer = opened.signer.unwrap_or_default();
    if !me.decryption_keys().any(|k| k.public().node_id == signer) {
        return Err(PendingError::NotMine { path: file, signer });
    }
    Ok(Some(opened.plaintext))
}

/// Forget the prompt of `task_id` (done with it). Missing is fine.
pub fn remove(paths: &Paths, task_id: &str) -> Result<(), PendingError> {
    let file = path(paths, task_id)?;
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PendingError::Io { path: file, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_task_id_never_becomes_a_path() {
        let paths = Paths::in_one_dir(PathBuf::from("/nonexistent"));
        for bad in ["", "../x", "a/b", "t-..", "x y", &"a".repeat(65)] {
            assert!(path(&paths, bad).is_err(), "{bad:?}");
        }
        assert!(path(&paths, "t-0123abcd")
            .unwrap()
            .ends_with("market/pending/t-0123abcd.cmme"));
    }
}
