//! What travels between requester and provider through the coordinator:
//! a payload or a result, encrypted to the one recipient and signed by the
//! sender together with the task id, the attempt number (the fencing
//! token) and the payload hash (docs/PROTOCOL.md, "Sealed payloads and
//! results", defines the exact bytes).
//!
//! Opening checks the binding and the outer signature first, then lets the
//! envelope check its own signature, and only then touches the private key:
//! altered or replayed bytes never reach RSA (SECURITY.md, RUSTSEC-2023-0071).
//!
//! Pure functions over bytes and keys: this module must not talk to the
//! market, write the audit log or decide what happens to a task whose
//! sealed message fails a check (the requester and provider do).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::envelope::{self, CryptoError};
use crate::crypto::keys::{Identity, PublicIdentity};
use crate::exit::{Exit, HasExit};

/// Domain separation for the signed statement over a payload.
pub const PAYLOAD_CONTEXT: &str = "cmm-market-payload/1";
/// Domain separation for the signed statement over a result.
pub const RESULT_CONTEXT: &str = "cmm-market-result/1";
/// Domain separation for a requester's reason for rejecting a delivery.
pub const REJECTION_CONTEXT: &str = "cmm-market-rejection/1";
/// Domain separation for a lease holder's progress report.
pub const PROGRESS_CONTEXT: &str = "cmm-market-progress/1";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Which task, attempt and payload a sealed message belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub task_id: String,
    pub attempt: u32,
    /// Hex SHA-256 of the prompt, as posted.
    pub payload_hash: String,
}

/// The wire form inside a `payload` / `deliver` / `abandon` frame's `data`
/// (base64 of this JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    kind: String,
    task_id: String,
    attempt: u32,
    payload_hash: String,
    /// `completed` or `failed` for results; absent for payloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    /// Base64 of the encrypted, signed envelope.
    envelope: String,
    /// Base64 Ed25519 signature over [`statement`].
    sig: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the sealed message is malformed: {0}")]
    Malformed(String),
    #[error("the sealed message is for {found}, not for {expected}")]
    WrongBinding { expected: String, found: String },
    #[error("the sender's signature over the task binding does not verify: the bytes were altered or forged")]
    BadSignature,
    #[error("the payload does not hash to the task's payload hash: it was altered or swapped")]
    HashMismatch,
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl HasExit for SealError {
    fn exit(&self) -> Exit {
        match self {
            SealError::Crypto(e) => e.exit(),
            _ => Exit::Integrity,
        }
    }
}

/// The exact bytes signed for a sealed message.
pub fn statement(context: &str, b: &Binding, status: Option<&str>, envelope_sha256: &str) -> Vec<u8> {
    let mut s = format!(
        "{context}\ntask_id={}\nattempt={}\npayload_hash={}\n",
        b.task_id, b.attempt, b.payload_hash
    );
    if let Some(st) = status {
        s.push_str(&format!("status={st}\n"));
    }
    s.push_str(&format!("envelope_sha256={envelope_sha256}\n"));
    s.into_bytes()
}

fn seal(
    kind: &str,
    context: &str,
    me: &Identity,
    to: &PublicIdentity,
    b: &Binding,
    status: Option<&str>,
    plaintext: &[u8],
) -> Result<String, SealError> {
    let env = envelope::encrypt_to(std::slice::from_ref(to), Some(me), plaintext)?;
    let env_hash = hex::encode(Sha256::digest(&env));
    let sig = me.sign(&statement(context, b, status, &env_hash));
    let wire = Wire {
        kind: kind.into(),
        task_id: b.task_id.clone(),
        attempt: b.attempt,
        payload_hash: b.payload_hash.clone(),
        status: status.map(str::to_string),
        envelope: B64.encode(&env),
        sig: B64.encode(sig.to_bytes()),
    };
    Ok(B64.encode(serde_json::to_vec(&wire).expect("wire serialises")))
}

/// Decode and check everything that needs no private key: the shape, the
/// binding against what we expect, and the sender's signature.
fn check(
    kind: &str,
    context: &str,
    from: &PublicIdentity,
    expect: &Binding,
    data: &str,
) -> Result<(Wire, Vec<u8>), SealError> {
    let raw = B64
        .decode(data.trim())
        .map_err(|e| SealError::Malformed(format!("not base64: {e}")))?;
    let wire: Wire = serde_json::from_slice(&raw).map_err(|e| SealError::Malformed(e.to_string()))?;
    if wire.kind != kind {
        return Err(SealError::Malformed(format!("expected a {kind}, got a {}", wire.kind)));
    }
    let found = Binding {
        task_id: wire.task_id.clone(),
        attempt: wire.attempt,
        payload_hash: wire.payload_hash.clone(),
    };
    if &found != expect {
        return Err(SealError::WrongBinding {
            expected: describe(expect),
            found: describe(&found),
        });
    }
    let env = B64
        .decode(&wire.envelope)
        .map_err(|e| SealError::Malformed(format!("envelope is not base64: {e}")))?;
    let sig = B64
        .decode(&wire.sig)
        .ok()
        .and_then(|s| ed25519_dalek::Signature::from_slice(&s).ok())
        .ok_or(SealError::BadSignature)?;
    let env_hash = hex::encode(Sha256::digest(&env));
    if !from.verify(&statement(context, expect, wire.status.as_deref(), &env_hash), &sig) {
        return Err(SealError::BadSignature);
    }
    Ok((wire, env))
}

fn describe(b: &Binding) -> String {
    format!(
        "task {} attempt {} payload {}",
        b.task_id,
        b.attempt,
        &b.payload_hash[..b.payload_hash.len().min(12)]
    )
}

/// Requester: encrypt the prompt to the lease holder and sign it.
pub fn seal_payload(me: &Identity, to: &PublicIdentity, b: &Binding, prompt: &[u8]) -> Result<String, SealError> {
    seal("payload", PAYLOAD_CONTEXT, me, to, b, None, prompt)
}

/// Provider: verify the requester's signature and the binding to our lease,
/// then decrypt, then check the prompt against the posted payload hash.
pub fn open_payload(me: &Identity, from: &PublicIdentity, expect: &Binding, data: &str) -> Result<Vec<u8>, SealError> {
    let (_, env) = check("payload", PAYLOAD_CONTEXT, from, expect, data)?;
    let opened = envelope::decrypt(me, &env, Some(from))?;
    if hex::encode(Sha256::digest(&opened.plaintext)) != expect.payload_hash {
        return Err(SealError::HashMismatch);
    }
    Ok(opened.plaintext)
}

/// Provider: encrypt the result document to the requester, signed with the
/// task, attempt, payload hash and status.
pub fn seal_result(
    me: &Identity,
    to: &PublicIdentity,
    b: &Binding,
    status: &str,
    body: &[u8],
) -> Result<String, SealError> {
    seal("result", RESULT_CONTEXT, me, to, b, Some(status), body)
}

/// Requester: verify the provider's signature and the binding to our task,
/// attempt and payload, then decrypt. Returns (status, body).
pub fn open_result(
    me: &Identity,
    from: &PublicIdentity,
    expect: &Binding,
    data: &str,
) -> Result<(String, Vec<u8>), SealError> {
    let (wire, env) = check("result", RESULT_CONTEXT, from, expect, data)?;
    let opened = envelope::decrypt(me, &env, Some(from))?;
    Ok((wire.status.unwrap_or_default(), opened.plaintext))
}

/// Requester: the reason for rejecting a delivery, encrypted to its
/// provider and signed with task, attempt and payload hash, so the provider
/// holds evidence of what the requester said.
pub fn seal_rejection(me: &Identity, to: &PublicIdentity, b: &Binding, reason: &[u8]) -> Result<String, SealError> {
    seal("rejection", REJECTION_CONTEXT, me, to, b, None, reason)
}

/// Provider: verify and open the requester's reason for a rejection.
pub fn open_rejection(
    me: &Identity,
    from: &PublicIdentity,
    expect: &Binding,
    data: &str,
) -> Result<Vec<u8>, SealError> {
    let (_, env) = check("rejection", REJECTION_CONTEXT, from, expect, data)?;
    Ok(envelope::decrypt(me, &env, Some(from))?.plaintext)
}

/// Lease holder: a progress report, encrypted to the requester.
pub fn seal_progress(me: &Identity, to: &PublicIdentity, b: &Binding, report: &[u8]) -> Result<String, SealError> {
    seal("progress", PROGRESS_CONTEXT, me, to, b, None, report)
}

/// Requester: verify and open the lease holder's progress report.
pub fn open_progress(me: &Identity, from: &PublicIdentity, expect: &Binding, data: &str) -> Result<Vec<u8>, SealError> {
    let (_, env) = check("progress", PROGRESS_CONTEXT, from, expect, data)?;
    Ok(envelope::decrypt(me, &env, Some(from))?.plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::envelope::tests::vector_identity;

    fn binding(attempt: u32) -> Binding {
        Binding {
            task_id: "t-1".into(),
            attempt,
            payload_hash: hex::encode(Sha256::digest(b"the prompt")),
        }
    }

    /// Alter one byte inside the envelope, keeping everything else.
    fn flip(data: &str) -> String {
        let mut wire: Wire = serde_json::from_slice(&B64.decode(data).unwrap()).unwrap();
        let mut env = B64.decode(&wire.envelope).unwrap();
        let mid = env.len() / 2;
        env[mid] ^= 1;
        wire.envelope = B64.encode(&env);
        B64.encode(serde_json::to_vec(&wire).unwrap())
    }

    #[test]
    fn payload_round_trips_and_is_bound_to_task_attempt_and_hash() {
        let me = vector_identity();
        let data = seal_payload(me, &me.public(), &binding(1), b"the prompt").unwrap();
        assert_eq!(
            open_payload(me, &me.public(), &binding(1), &data).unwrap(),
            b"the prompt"
        );
        // Another attempt (the fence) or task is refused before decryption.
        assert!(matches!(
            open_payload(me, &me.public(), &binding(2), &data),
            Err(SealError::WrongBinding { .. })
        ));
        // A prompt that does not hash to the posted hash is refused.
        let other = seal_payload(me, &me.public(), &binding(1), b"another prompt").unwrap();
        assert!(matches!(
            open_payload(me, &me.public(), &binding(1), &other),
            Err(SealError::HashMismatch)
        ));
    }

    #[test]
    fn an_altered_envelope_fails_the_outer_signature() {
        let me = vector_identity();
        let data = seal_result(me, &me.public(), &binding(1), "completed", b"{}").unwrap();
        assert!(open_result(me, &me.public(), &binding(1), &data).is_ok());
        assert!(matches!(
            open_result(me, &me.public(), &binding(1), &flip(&data)),
            Err(SealError::BadSignature)
        ));
    }

    #[test]
    fn the_signed_status_cannot_be_changed() {
        let me = vector_identity();
        let data = seal_result(me, &me.public(), &binding(1), "failed", b"{}").unwrap();
        let mut wire: Wire = serde_json::from_slice(&B64.decode(&data).unwrap()).unwrap();
        wire.status = Some("completed".into());
        let forged = B64.encode(serde_json::to_vec(&wire).unwrap());
        assert!(matches!(
            open_result(me, &me.public(), &binding(1), &forged),
            Err(SealError::BadSignature)
        ));
    }

    #[test]
    fn statement_bytes_are_the_documented_ones() {
        let b = binding(3);
        let s = String::from_utf8(statement(RESULT_CONTEXT, &b, Some("completed"), "ab")).unwrap();
        assert_eq!(
            s,
            format!(
                "cmm-market-result/1\ntask_id=t-1\nattempt=3\npayload_hash={}\nstatus=completed\nenvelope_sha256=ab\n",
                b.payload_hash
            )
        );
    }
}
