//! The node side of the protocol: connect, authenticate, and match replies
//! to requests by message id. Events the coordinator pushes (task offers,
//! lease lapses, deliveries) arrive on [`Client::events`].
//!
//! [`Client::call`] reads each reply into its typed [`Reply`];
//! [`Client::request`] hands back the raw JSON for tools that speak the wire
//! directly. This module owns the session and nothing above it: it must not
//! decide on tasks, write the audit log or print.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::crypto::keys::{Identity, PublicIdentity};
use crate::exit::{Exit, HasExit};
use crate::market::protocol::{self, auth_message, encode_request, Event, Reason, Request};
use crate::market::reply::Reply;

/// How long a request waits for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What signs a session: the node identity, or a throwaway key in load tests.
pub trait Signer: Send + Sync {
    fn public(&self) -> PublicIdentity;
    fn sign(&self, msg: &[u8]) -> ed25519_dalek::Signature;
}

impl Signer for Identity {
    fn public(&self) -> PublicIdentity {
        Identity::public(self)
    }
    fn sign(&self, msg: &[u8]) -> ed25519_dalek::Signature {
        Identity::sign(self, msg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the market at `{endpoint}`: {detail}")]
    Unavailable { endpoint: String, detail: String },
    #[error("the market connection closed")]
    Closed,
    #[error("the market did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the market refused: {message} ({})", reason.as_str())]
    Rejected { reason: Reason, message: String },
    #[error("unexpected message from the market: {0}")]
    Protocol(String),
    #[error("market endpoint `{0}` is not a ws:// or wss:// URL")]
    BadEndpoint(String),
}

impl ClientError {
    pub fn reason(&self) -> Option<Reason> {
        match self {
            ClientError::Rejected { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Worth retrying on a fresh connection.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable { .. } | ClientError::Closed | ClientError::Timeout(_)
        ) || matches!(self.reason(), Some(Reason::RateLimited | Reason::Unavailable))
    }
}

impl HasExit for ClientError {
    fn exit(&self) -> Exit {
        match self {
            ClientError::Unavailable { .. } | ClientError::Closed | ClientError::Timeout(_) => Exit::Unavailable,
            ClientError::Protocol(_) => Exit::Failed,
            ClientError::BadEndpoint(_) => Exit::Usage,
            ClientError::Rejected { reason, .. } => match reason {
                Reason::InsufficientBalance | Reason::ReputationTooLow | Reason::NoMatchingOffer => Exit::Refused,
                Reason::BadSignature | Reason::BadChallenge | Reason::BadIdentity => Exit::Integrity,
                Reason::RateLimited | Reason::Internal | Reason::Unavailable => Exit::Unavailable,
                Reason::InvalidField | Reason::NotFound | Reason::NotOwner | Reason::PriceTooLow => Exit::Usage,
                _ => Exit::Failed,
            },
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ClientError::Unavailable { .. } => Some(
                "start a coordinator with `claude-max-market market serve`, or point `--endpoint` / `market.endpoint` at one"
                    .into(),
            ),
            ClientError::BadEndpoint(_) => {
                Some("set it with `claude-max-market config --set market.endpoint=ws://HOST:PORT`".into())
            }
            ClientError::Rejected {
                reason: Reason::InsufficientBalance,
                ..
            } => Some("lower `--max-price` or check your balance with `claude-max-market market status`".into()),
            _ => None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Event>>>>;

/// One authenticated session.
pub struct Client {
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    /// Events pushed by the coordinator (and errors not tied to a request).
    pub events: mpsc::UnboundedReceiver<Event>,
    pub node_id: String,
    /// Balance at login, and what this login granted (first login only).
    pub balance: i64,
    pub granted: i64,
    prefix: String,
    counter: AtomicU64,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(protocol::DEFAULT_PAYLOAD_CAP + 4096))
        .max_frame_size(Some(protocol::DEFAULT_PAYLOAD_CAP + 4096))
}

fn parse_event(text: &str) -> Result<Event, ClientError> {
    serde_json::from_str(text).map_err(|e| ClientError::Protocol(format!("{e}: {}", truncate(text))))
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(ws: &mut RawWs) -> Result<Event, ClientError> {
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, ws.next()).await {
            Err(_) => return Err(ClientError::Timeout(CONNECT_TIMEOUT)),
            Ok(None) | Ok(Some(Err(_))) => return Err(ClientError::Closed),
            Ok(Some(Ok(Message::Text(t)))) => return parse_event(t.as_str()),
            Ok(Some(Ok(Message::Close(_)))) => return Err(ClientError::Closed),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

impl Client {
    /// Connect to `endpoint` (`ws://host:port`) and authenticate as `signer`.
    pub async fn connect(endpoint: &str, signer: &dyn Signer) -> Result<Client, ClientError> {
        let unavailable = |detail: String| ClientError::Unavailable {
            endpoint: endpoint.to_string(),
            detail,
        };
        let (mut ws, _) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(endpoint, Some(ws_config()), true),
        )
        .await
        .map_err(|_| unavailable("timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
        let nonce = match next_text(&mut ws).await? {
            Event::Challenge { nonce, .. } => nonce,
            other => return Err(ClientError::Protocol(format!("expected a challenge, got {other:?}"))),
        };
        let identity = signer.public();
        let sig = signer.sign(&auth_message(&nonce, &identity));
        let hello = Request::Hello {
            identity,
            nonce,
            sig: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
        };
        ws.send(Message::text(encode_request(None, &hello)))
            .await
            .map_err(|_| ClientError::Closed)?;
        let (node_id, balance, granted) = match next_text(&mut ws).await? {
            Event::Welcome {
                node_id,
                balance,
                granted,
            } => (node_id, balance, granted),
            Event::Error { reason, message, .. } => return Err(ClientError::Rejected { reason, message }),
            other => return Err(ClientError::Protocol(format!("expected welcome, got {other:?}"))),
        };
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let close = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || close {
                    break;
                }
            }
        });
        let p2 = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let Message::Text(t) = m else { continue };
                let Ok(ev) = serde_json::from_str::<Event>(t.as_str()) else {
                    continue;
                };
                let re = match &ev {
                    Event::Ok { re, .. } => Some(re.clone()),
                    Event::Error { re: Some(re), .. } => Some(re.clone()),
                    _ => None,
                };
                let waiter = re.and_then(|re| p2.lock().ok().and_then(|mut p| p.remove(&re)));
                match waiter {
                    Some(w) => {
                        let _ = w.send(ev);
                    }
                    None => {
                        if ev_tx.send(ev).is_err() {
                            // Nobody reads events; keep routing replies.
                        }
                    }
                }
            }
            // Connection gone: wake every waiter with `Closed`.
            if let Ok(mut p) = p2.lock() {
                p.clear();
            }
        });
        let mut prefix = [0u8; 6];
        rand::thread_rng().fill(&mut prefix);
        Ok(Client {
            out: out_tx,
            pending,
            events: ev_rx,
            node_id,
            balance,
            granted,
            prefix: hex::encode(prefix),
            counter: AtomicU64::new(1),
        })
    }

    /// A fresh message id, unique to this client.
    pub fn next_id(&self) -> String {
        format!("{}-{}", self.prefix, self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Send a request with a fresh id and wait for its committed result.
    pub async fn request(&self, req: &Request) -> Result<Value, ClientError> {
        let id = self.next_id();
        self.request_with_id(&id, req).await
    }

    /// Send a request under a chosen id. Retrying with the same id is safe:
    /// if the first try was applied, the coordinator answers `duplicate_id`
    /// with the original result, which this returns as success.
    pub async fn request_with_id(&self, id: &str, req: &Request) -> Result<Value, ClientError> {
        match self.exchange(id, &encode_request(Some(id), req)).await? {
            Event::Ok { result, .. } => Ok(result),
            Event::Error {
                reason: Reason::DuplicateId,
                original: Some(original),
                ..
            } => Ok(original),
            Event::Error { reason, message, .. } => Err(ClientError::Rejected { reason, message }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Send a request with a fresh id and read its committed result as the
    /// reply type of that request.
    pub async fn call<R: Reply>(&self, req: &Request) -> Result<R, ClientError> {
        let id = self.next_id();
        self.call_with_id(&id, req).await
    }

    /// [`Client::call`] under a chosen id (see [`Client::request_with_id`]).
    pub async fn call_with_id<R: Reply>(&self, id: &str, req: &Request) -> Result<R, ClientError> {
        debug_assert_eq!(req.kind(), R::ANSWERS, "a reply type read for another request");
        let v = self.request_with_id(id, req).await?;
        serde_json::from_value(v)
            .map_err(|e| ClientError::Protocol(format!("a `{}` reply that does not parse: {e}", req.kind())))
    }

    /// Send raw text under id `id` and return whatever answers it (tests of
    /// hostile input use this).
    pub async fn exchange(&self, id: &str, text: &str) -> Result<Event, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| ClientError::Closed)?
            .insert(id.to_string(), tx);
        if self.out.send(Message::text(text.to_string())).is_err() {
            return Err(ClientError::Closed);
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(id);
                }
                Err(ClientError::Timeout(REQUEST_TIMEOUT))
            }
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(ev)) => Ok(ev),
        }
    }

    /// Send raw text without waiting for anything.
    pub fn send_raw(&self, text: &str) -> Result<(), ClientError> {
        self.out
            .send(Message::text(text.to_string()))
            .map_err(|_| ClientError::Closed)
    }

    /// Send a WebSocket ping (keeps NAT and proxies from dropping an idle session).
    pub fn ping(&self) -> Result<(), ClientError> {
        self.out
            .send(Message::Ping(Default::default()))
            .map_err(|_| ClientError::Closed)
    }

    /// Next pushed event, or `None` after `wait` or when the session ended.
    pub async fn next_event(&mut self, wait: Duration) -> Option<Event> {
        tokio::time::timeout(wait, self.events.recv()).await.ok().flatten()
    }

    /// Close the session.
    pub fn close(&self) {
        let _ = self.out.send(Message::Close(None));
    }
}

/// The coordinator URL: `flag`, else `configured` (`market.endpoint`, env
/// and file already folded in); it must be a WebSocket URL.
pub fn endpoint(flag: Option<String>, configured: &str) -> Result<String, ClientError> {
    let e = flag.unwrap_or_else(|| configured.to_string());
    if e.starts_with("ws://") || e.starts_with("wss://") {
        Ok(e)
    } else {
        Err(ClientError::BadEndpoint(e))
    }
}

/// Send one request on its own session, retrying on a fresh connection
/// under the same message id if the connection fails, so a lost reply
/// never applies it twice.
pub async fn call_once<R: Reply>(endpoint: &str, signer: &dyn Signer, req: &Request) -> Result<R, ClientError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut msg_id = None;
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = async {
            let client = Client::connect(endpoint, signer).await?;
            let mid = msg_id.get_or_insert_with(|| client.next_id()).clone();
            let r = client.call_with_id(&mid, req).await;
            client.close();
            r
        };
        match attempt.await {
            Err(e) if e.is_transient() && tries < 4 && msg_id.is_some() => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}

/// Exponential backoff with full jitter, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { attempt: 0, base, cap }
    }

    /// The next delay: uniform in [0, min(cap, base * 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let top = exp.min(self.cap).as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(0..=top.max(1)))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..40 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
