//! The market wire protocol: versioned JSON messages over WebSocket text
//! frames (docs/PROTOCOL.md has an example of every message).
//!
//! Every frame is one JSON object with `v` (protocol version) and `type`.
//! Requests from a node also carry `id`, a client-chosen message id that the
//! coordinator remembers per node: a request whose id was already applied is
//! answered with a `duplicate_id` error carrying the original result, so a
//! client that retries after a lost reply never applies an operation twice.
//!
//! This module owns the shapes only: what each frame carries, its envelope
//! and its decoding. It must not decide anything about a task or a node
//! (the coordinator's book and the node's requester and provider do), and it
//! must not touch the network. The typed replies to each request are in
//! the `reply` module beside this one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crypto::keys::PublicIdentity;

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Default cap for control frames (everything except `payload` / `deliver`).
pub const DEFAULT_CONTROL_CAP: usize = 16 * 1024;
/// Default cap for frames carrying encrypted payloads or results.
pub const DEFAULT_PAYLOAD_CAP: usize = 4 * 1024 * 1024;
/// Longest client message id.
pub const MAX_ID_LEN: usize = 64;
/// Domain separation for the session signature.
pub const AUTH_CONTEXT: &str = "cmm-market-auth/1";

/// Why a frame was refused. Every rejection names one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not JSON, or a known message with missing or mistyped fields.
    Malformed,
    /// Frame larger than the cap for its kind.
    Oversized,
    /// A `type` this coordinator does not know.
    UnknownType,
    /// A `v` this coordinator does not speak.
    BadVersion,
    /// Anything but `hello` before the session is authenticated.
    NotAuthenticated,
    /// `hello` after the session is authenticated.
    AlreadyAuthenticated,
    /// The signature does not verify.
    BadSignature,
    /// The signed nonce is not the one this session was given.
    BadChallenge,
    /// The public identity is inconsistent (node id is not the key's hash).
    BadIdentity,
    /// A request without a usable `id`.
    MissingId,
    /// This message id was already applied (the original result is attached).
    DuplicateId,
    /// Too many frames per second from this node.
    RateLimited,
    /// A field is out of range.
    InvalidField,
    /// No such task or offer.
    NotFound,
    /// The task or offer belongs to another node.
    NotOwner,
    /// The task is not in a state that allows this message.
    WrongState,
    /// The attempt number is older (or newer) than the task's current one.
    StaleAttempt,
    /// Another provider already holds the lease.
    AlreadyTaken,
    /// The requester's balance cannot cover the escrow.
    InsufficientBalance,
    /// The provider has no active offer that fits the task.
    NoMatchingOffer,
    /// The provider's reputation is below the requester's minimum.
    ReputationTooLow,
    /// A bid may only go up.
    PriceTooLow,
    /// The requester is not connected, so no payload could reach a lease
    /// holder; the task is offered again when it returns.
    RequesterOffline,
    /// The provider gave up or lost a lease through its own fault recently
    /// and takes no new lease until its cool-down ends.
    CoolingDown,
    /// The provider held an earlier attempt of this task and failed it.
    AlreadyAttempted,
    /// The coordinator failed; nothing was changed.
    Internal,
    /// The coordinator cannot reach its database; nothing was changed.
    /// Retry, here later or on another replica.
    Unavailable,
    /// The requester rejected too many results: it may not post for now.
    Suspended,
}

impl Reason {
    pub const ALL: &'static [Reason] = &[
        Reason::Malformed,
        Reason::Oversized,
        Reason::UnknownType,
        Reason::BadVersion,
        Reason::NotAuthenticated,
        Reason::AlreadyAuthenticated,
        Reason::BadSignature,
        Reason::BadChallenge,
        Reason::BadIdentity,
        Reason::MissingId,
        Reason::DuplicateId,
        Reason::RateLimited,
        Reason::InvalidField,
        Reason::NotFound,
        Reason::NotOwner,
        Reason::WrongState,
        Reason::StaleAttempt,
        Reason::AlreadyTaken,
        Reason::InsufficientBalance,
        Reason::NoMatchingOffer,
        Reason::ReputationTooLow,
        Reason::PriceTooLow,
        Reason::RequesterOffline,
        Reason::CoolingDown,
        Reason::AlreadyAttempted,
        Reason::Internal,
        Reason::Unavailable,
        Reason::Suspended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Oversized => "oversized",
            Reason::UnknownType => "unknown_type",
            Reason::BadVersion => "bad_version",
            Reason::NotAuthenticated => "not_authenticated",
            Reason::AlreadyAuthenticated => "already_authenticated",
            Reason::BadSignature => "bad_signature",
            Reason::BadChallenge => "bad_challenge",
            Reason::BadIdentity => "bad_identity",
            Reason::MissingId => "missing_id",
            Reason::DuplicateId => "duplicate_id",
            Reason::RateLimited => "rate_limited",
            Reason::InvalidField => "invalid_field",
            Reason::NotFound => "not_found",
            Reason::NotOwner => "not_owner",
            Reason::WrongState => "wrong_state",
            Reason::StaleAttempt => "stale_attempt",
            Reason::AlreadyTaken => "already_taken",
            Reason::InsufficientBalance => "insufficient_balance",
            Reason::NoMatchingOffer => "no_matching_offer",
            Reason::ReputationTooLow => "reputation_too_low",
            Reason::PriceTooLow => "price_too_low",
            Reason::RequesterOffline => "requester_offline",
            Reason::CoolingDown => "cooling_down",
            Reason::AlreadyAttempted => "already_attempted",
            Reason::Internal => "internal",
            Reason::Unavailable => "unavailable",
            Reason::Suspended => "suspended",
        }
    }
}

/// A message from a node, after the envelope (`v`, `id`) is taken off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answer to the challenge: identity plus a signature over
    /// [`auth_message`] (base64).
    Hello {
        identity: PublicIdentity,
        nonce: String,
        sig: String,
    },
    /// Advertise capacity.
    Offer {
        slots: u32,
        price: u64,
        models: Vec<String>,
        ttl_secs: u64,
    },
    Withdraw {
        offer_id: String,
    },
    /// Post a task: metadata and the payload's SHA-256 only.
    Post {
        model: String,
        max_tokens: u64,
        max_price: u64,
        payload_hash: String,
        deadline_secs: u64,
        #[serde(default)]
        max_attempts: Option<u32>,
        #[serde(default)]
        min_reputation: Option<f64>,
        /// Size of the payload in bytes, shown to providers deciding on it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload_bytes: Option<u64>,
        /// The task carries a workspace of this many bytes (its files'
        /// contents, inside the sealed payload).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workspace_bytes: Option<u64>,
        /// The Claude Code permission mode the task asks to run in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        permission_mode: Option<String>,
    },
    /// Raise an unfinished task's bid (never lower it).
    Raise {
        task_id: String,
        max_price: u64,
    },
    /// Provider takes the task; first valid accept wins the lease.
    Accept {
        task_id: String,
        attempt: u32,
    },
    /// Lease heartbeat from the provider holding it.
    Renew {
        task_id: String,
        attempt: u32,
    },
    /// Requester -> lease holder: the encrypted, signed payload (opaque),
    /// in `parts` frames sent in order (`part` 0, 1, ...) when it is
    /// larger than one frame may be.
    Payload {
        task_id: String,
        attempt: u32,
        data: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parts: Option<u32>,
    },
    /// Lease holder -> requester: the encrypted, signed result (opaque).
    Deliver {
        task_id: String,
        attempt: u32,
        data: String,
    },
    /// Requester confirms a delivered result: pay the provider its ask.
    Settle {
        task_id: String,
        attempt: u32,
    },
    /// Requester refuses a delivered result: a failure of the provider's;
    /// the task is offered again while attempts remain, else refunded.
    /// `reason_sha256` and `reason_bytes` name the requester's reason, whose
    /// text travels sealed to the provider in `data`.
    Reject {
        task_id: String,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_sha256: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    /// Lease holder -> requester: how the job is going (sealed, opaque).
    Progress {
        task_id: String,
        attempt: u32,
        data: String,
    },
    /// Balance, escrow, offers, tasks, reputation and totals.
    Status {},
    /// Any node's reputation (settled work only).
    Reputation {
        node_id: String,
    },
    /// A node's public identity with the login signature that binds its RSA
    /// key to its Ed25519 key (see [`IdentityProof`]).
    Identity {
        node_id: String,
    },
    /// Requester: read back a delivered (opaque, encrypted) result.
    Result {
        task_id: String,
    },
    /// Requester: where one of its tasks stands (state, attempt, lease
    /// holder, payload hash, deadlines), e.g. after being offline.
    Task {
        task_id: String,
    },
    /// Lease holder gives the task back before the lease lapses: the job
    /// failed (`data` carries the signed failure report for the requester)
    /// or the provider is stopping. The task is re-offered at once.
    Abandon {
        task_id: String,
        attempt: u32,
        reason: AbandonReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
}

/// Why a provider gave a lease back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbandonReason {
    /// The job ran and failed; counts against the provider's reputation.
    Failed,
    /// The provider is stopping (Ctrl-C, opt-out) before finishing.
    Withdrawn,
}

impl AbandonReason {
    pub fn as_str(self) -> &'static str {
        match self {
            AbandonReason::Failed => "failed",
            AbandonReason::Withdrawn => "withdrawn",
        }
    }
}

/// What `identity` returns: a node's public identity and the signature of
/// one of its logins. The login message ([`auth_message`]) names the SHA-256
/// of the RSA key and is signed by the Ed25519 key whose hash is the node id,
/// so a coordinator cannot hand out a different encryption key for a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityProof {
    pub identity: PublicIdentity,
    pub nonce: String,
    pub sig: String,
}

impl IdentityProof {
    /// The identity, if it is `node_id`'s and its login signature verifies.
    pub fn verified(&self, node_id: &str) -> Option<&PublicIdentity> {
        use base64::Engine as _;
        if self.identity.node_id != node_id || self.identity.validate().is_err() {
            return None;
        }
        let sig = base64::engine::general_purpose::STANDARD.decode(&self.sig).ok()?;
        let sig = ed25519_dalek::Signature::from_slice(&sig).ok()?;
        self.identity
            .verify(&auth_message(&self.nonce, &self.identity), &sig)
            .then_some(&self.identity)
    }
}

impl Request {
    /// Known message types, to tell `unknown_type` from `malformed`.
    pub const TYPES: &'static [&'static str] = &[
        "hello",
        "offer",
        "withdraw",
        "post",
        "raise",
        "accept",
        "renew",
        "payload",
        "deliver",
        "settle",
        "reject",
        "status",
        "reputation",
        "identity",
        "result",
        "task",
        "abandon",
        "progress",
    ];

    /// The wire name of this message's type.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Offer { .. } => "offer",
            Request::Withdraw { .. } => "withdraw",
            Request::Post { .. } => "post",
            Request::Raise { .. } => "raise",
            Request::Accept { .. } => "accept",
            Request::Renew { .. } => "renew",
            Request::Payload { .. } => "payload",
            Request::Deliver { .. } => "deliver",
            Request::Settle { .. } => "settle",
            Request::Reject { .. } => "reject",
            Request::Status {} => "status",
            Request::Reputation { .. } => "reputation",
            Request::Identity { .. } => "identity",
            Request::Result { .. } => "result",
            Request::Task { .. } => "task",
            Request::Abandon { .. } => "abandon",
            Request::Progress { .. } => "progress",
        }
    }

    /// Frames of these types may use the larger payload cap.
    pub fn carries_payload(kind: &str) -> bool {
        matches!(kind, "payload" | "deliver" | "abandon")
    }
}

/// A message from the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// First frame of every session.
    Challenge {
        nonce: String,
        control_cap: usize,
        payload_cap: usize,
    },
    Welcome {
        node_id: String,
        balance: i64,
        granted: i64,
    },
    /// The request `re` was applied (and committed) with this result.
    Ok {
        re: String,
        result: Value,
    },
    /// A frame was refused; nothing changed.
    Error {
        #[serde(default)]
        re: Option<String>,
        reason: Reason,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        original: Option<Value>,
    },
    /// A task that fits one of your offers is open.
    TaskOffered {
        task: Box<TaskView>,
    },
    /// A task you were told about was taken or closed.
    TaskClosed {
        task_id: String,
    },
    /// Your lease lapsed; anything for this attempt is now refused.
    LeaseLapsed {
        task_id: String,
        attempt: u32,
    },
    /// To the requester: a provider took the task.
    Assigned {
        task_id: String,
        attempt: u32,
        provider: String,
    },
    Payload {
        task_id: String,
        attempt: u32,
        data: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parts: Option<u32>,
    },
    Delivered {
        task_id: String,
        attempt: u32,
        data: String,
    },
    Settled {
        task_id: String,
        attempt: u32,
        paid: i64,
        refunded: i64,
    },
    Refunded {
        task_id: String,
        amount: i64,
        why: String,
    },
    /// To the requester: the provider gave the lease back (a failed job
    /// carries its signed report in `data`); the task is re-offered.
    Abandoned {
        task_id: String,
        attempt: u32,
        provider: String,
        reason: AbandonReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    /// To the provider: the requester rejected its delivery. The task is
    /// `open` again (another provider's attempt) or `refunded`; `data` is the
    /// requester's sealed reason, whose hash and size the coordinator keeps.
    Rejected {
        task_id: String,
        attempt: u32,
        state: String,
        #[serde(default)]
        reason_sha256: Option<String>,
        #[serde(default)]
        reason_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    /// To the requester: the lease holder's sealed progress report.
    Progress {
        task_id: String,
        attempt: u32,
        data: String,
    },
    /// Another login for this node id replaced this session.
    Replaced {},
}

/// How a requester has judged the results it received: settled and
/// rejected deliveries, and the score providers see.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RequesterStanding {
    pub settled: i64,
    pub rejected: i64,
    pub score: f64,
}

/// A requester's score: `(settled + 1) / (settled + rejected + 2)`, so a new
/// requester stands at 0.5 and every rejection pulls it down.
pub fn requester_score(settled: i64, rejected: i64) -> f64 {
    (settled.max(0) as f64 + 1.0) / ((settled.max(0) + rejected.max(0)) as f64 + 2.0)
}

/// Posting is suspended once a requester has judged at least this many
/// deliveries and rejected more than [`SUSPEND_RATE`] of them.
pub const SUSPEND_MIN_VERDICTS: i64 = 5;
/// See [`SUSPEND_MIN_VERDICTS`].
pub const SUSPEND_RATE: f64 = 0.5;

/// Whether a requester with this record may not post.
pub fn requester_suspended(settled: i64, rejected: i64) -> bool {
    let n = settled + rejected;
    n >= SUSPEND_MIN_VERDICTS && rejected as f64 > SUSPEND_RATE * n as f64
}

/// The coordinator's view of one task: what a provider is offered, what
/// `post` returns, and what a requester's `task` look-up answers.
///
/// Every field is always present on the wire (absent values are `null`), so
/// this serialises to exactly the JSON it was read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task_id: String,
    pub requester: String,
    pub model: String,
    pub max_tokens: u64,
    pub max_price: u64,
    pub payload_hash: String,
    /// RFC 3339; the task is refunded if unfinished by then.
    pub deadline: String,
    pub max_attempts: u32,
    pub min_reputation: f64,
    /// `open`, `assigned`, `delivered`, `settled` or `refunded`.
    pub state: String,
    pub attempt: u32,
    /// The current lease holder, if any.
    pub provider: Option<String>,
    /// The lease holder's asking price, if any.
    pub ask: Option<i64>,
    pub lease_deadline: Option<String>,
    /// Size of the payload in bytes, when the requester declared it.
    pub payload_bytes: Option<u64>,
    /// The task carries a workspace of this many bytes.
    #[serde(default)]
    pub workspace_bytes: Option<u64>,
    /// The permission mode the task asks for (`None`: Claude Code's default).
    #[serde(default)]
    pub permission_mode: Option<String>,
    /// How the requester has judged results so far (in offers).
    #[serde(default)]
    pub requester_standing: Option<RequesterStanding>,
}

/// The bytes a node signs to authenticate a session.
pub fn auth_message(nonce: &str, id: &PublicIdentity) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let rsa = hex::encode(Sha256::digest(id.rsa_public_pem.as_bytes()));
    format!(
        "{AUTH_CONTEXT}\nnonce={nonce}\nnode_id={}\ned25519={}\nrsa_sha256={rsa}\ncreated={}\n",
        id.node_id, id.ed25519, id.created
    )
    .into_bytes()
}

/// Encode a request with its envelope.
pub fn encode_request(id: Option<&str>, req: &Request) -> String {
    let mut v = serde_json::to_value(req).expect("requests serialise");
    if let Value::Object(m) = &mut v {
        m.insert("v".into(), VERSION.into());
        if let Some(id) = id {
            m.insert("id".into(), id.into());
        }
    }
    v.to_string()
}

/// Encode an event with its envelope. Written straight to text: the
/// writer encodes every reply and event, and building a `Value` first
/// copied each result once more.
pub fn encode_event(ev: &Event) -> String {
    #[derive(Serialize)]
    struct Envelope<'a> {
        #[serde(flatten)]
        ev: &'a Event,
        v: u32,
    }
    serde_json::to_string(&Envelope { ev, v: VERSION }).expect("events serialise")
}

/// A refused frame, before it becomes an `error` event.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
    pub original: Option<Value>,
}

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            message: message.into(),
            original: None,
        }
    }
}

/// Decode a node's frame: envelope checks, then the typed body.
/// Returns the message id (if any) and the request.
pub fn decode_request(text: &str) -> Result<(Option<String>, Request), (Option<String>, Rejection)> {
    let mut v: Value =
        serde_json::from_str(text).map_err(|e| (None, Rejection::new(Reason::Malformed, format!("not JSON: {e}"))))?;
    let Value::Object(m) = &mut v else {
        return Err((None, Rejection::new(Reason::Malformed, "a frame must be a JSON object")));
    };
    let id = match m.remove("id") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => Some(s),
        Some(_) => {
            return Err((
                None,
                Rejection::new(
                    Reason::MissingId,
                    format!("`id` must be a string of 1..={MAX_ID_LEN} characters"),
                ),
            ))
        }
    };
    match m.remove("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION as u64) => {}
        other => {
            return Err((
                id,
                Rejection::new(
                    Reason::BadVersion,
                    format!("protocol version {other:?} is not {VERSION}"),
                ),
            ))
        }
    }
    let kind = match m.get("type") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err((id, Rejection::new(Reason::Malformed, "missing `type`"))),
    };
    if !Request::TYPES.contains(&kind.as_str()) {
        return Err((
            id,
            Rejection::new(Reason::UnknownType, format!("unknown message type `{kind}`")),
        ));
    }
    let req: Request = serde_json::from_value(v).map_err(|e| {
        (
            id.clone(),
            Rejection::new(Reason::Malformed, format!("bad `{kind}`: {e}")),
        )
    })?;
    if !matches!(req, Request::Hello { .. }) && id.is_none() {
        return Err((
            None,
            Rejection::new(Reason::MissingId, format!("`{kind}` needs an `id`")),
        ));
    }
    Ok((id, req))
}

/// Reputation with a pessimistic prior: a newcomer starts as if it had one
/// success and two failures (1/3), so a score is earned by settled work.
/// `clients` is the number of distinct requesters that paid the node for a
/// settled task, not the number of settled tasks: the same two identities
/// trading with each other add one, however often they trade.
pub fn reputation(clients: i64, failures: i64) -> f64 {
    (clients as f64 + 1.0) / ((clients + failures) as f64 + 3.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_classifies_rejections() {
        assert_eq!(decode_request("{").unwrap_err().1.reason, Reason::Malformed);
        assert_eq!(decode_request("[1]").unwrap_err().1.reason, Reason::Malformed);
        assert_eq!(
            decode_request(r#"{"v":2,"type":"status","id":"a"}"#)
                .unwrap_err()
                .1
                .reason,
            Reason::BadVersion
        );
        assert_eq!(
            decode_request(r#"{"v":1,"type":"nope","id":"a"}"#)
                .unwrap_err()
                .1
                .reason,
            Reason::UnknownType
        );
        assert_eq!(
            decode_request(r#"{"v":1,"type":"accept","id":"a"}"#)
                .unwrap_err()
                .1
                .reason,
            Reason::Malformed
        );
        assert_eq!(
            decode_request(r#"{"v":1,"type":"status"}"#).unwrap_err().1.reason,
            Reason::MissingId
        );
        let (id, req) = decode_request(r#"{"v":1,"type":"status","id":"a"}"#).unwrap();
        assert_eq!(id.as_deref(), Some("a"));
        assert!(matches!(req, Request::Status {}));
    }

    #[test]
    fn events_carry_their_fields_their_type_and_the_version() {
        let events = [
            Event::Ok {
                re: "m1".into(),
                result: serde_json::json!({"task": {"task_id": "t-1", "n": [1, 2]}, "s": "\"q\""}),
            },
            Event::Error {
                re: None,
                reason: Reason::DuplicateId,
                message: "seen".into(),
                original: Some(serde_json::json!({"a": 1})),
            },
            Event::Replaced {},
        ];
        for ev in events {
            let text = encode_event(&ev);
            let mut want = serde_json::to_value(&ev).unwrap();
            want.as_object_mut().unwrap().insert("v".into(), VERSION.into());
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), want, "{text}");
            let back: Event = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&ev).unwrap());
        }
    }

    #[test]
    fn requests_round_trip() {
        let r = Request::Accept {
            task_id: "t".into(),
            attempt: 2,
        };
        let text = encode_request(Some("m1"), &r);
        let (id, back) = decode_request(&text).unwrap();
        assert_eq!(id.as_deref(), Some("m1"));
        assert!(matches!(back, Request::Accept { attempt: 2, .. }));
    }

    #[test]
    fn every_request_type_is_known_and_named() {
        let r = Request::Task { task_id: "t-1".into() };
        assert!(Request::TYPES.contains(&r.kind()));
        let (_, back) = decode_request(&encode_request(Some("m2"), &r)).unwrap();
        assert!(matches!(back, Request::Task { ref task_id } if task_id == "t-1"));
        assert_eq!(
            decode_request(r#"{"v":1,"type":"task","id":"a"}"#)
                .unwrap_err()
                .1
                .reason,
            Reason::Malformed
        );
    }

    #[test]
    fn an_identity_proof_binds_the_keys_to_the_node() {
        use base64::Engine as _;
        let id = crate::crypto::envelope::tests::vector_identity();
        let nonce = "ab".repeat(32);
        let sig = id.sign(&auth_message(&nonce, &id.public()));
        let proof = IdentityProof {
            identity: id.public(),
            nonce: nonce.clone(),
            sig: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
        };
        assert!(proof.verified(id.node_id()).is_some());
        assert!(proof.verified(&"0".repeat(64)).is_none(), "another node's id");
        // Any change to what the login signed (the RSA key's hash among it) fails.
        let mut changed = proof.clone();
        changed.identity.created = "2030-01-01T00:00:00Z".into();
        assert!(changed.verified(id.node_id()).is_none());
        let mut changed = proof.clone();
        changed.nonce = "cd".repeat(32);
        assert!(changed.verified(id.node_id()).is_none());
    }

    #[test]
    fn reputation_prior_is_pessimistic() {
        assert!(reputation(0, 0) < 0.5);
        assert!(reputation(10, 0) > reputation(0, 0));
        assert!(reputation(0, 3) < reputation(0, 0));
    }
}
