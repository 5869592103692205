//! The node side of the protocol: connect, authenticate, and match replies
//! to requests by message id. Events the coordinator pushes (task offers,
//! lease lapses, deliveries) arrive on [`Client::events`].
//!
//! A node may know several coordinator replicas ([`Endpoints`], the one
//! parser of `market.endpoint` and `--endpoint`): [`Failover`] connects to
//! the first that answers, in list order, and after a lost session starts
//! with the one after it. [`Link`] is the session a long-lived node is on
//! now, so work that outlives one connection (a held lease) carries on on
//! the next.
//!
//! [`Client::call`] reads each reply into its typed [`Reply`];
//! [`Client::request`] hands back the raw JSON for tools that speak the wire
//! directly. This module owns the session and nothing above it: it must not
//! decide on tasks, write the audit log or print.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
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
    #[error("market endpoint list `{list}` has an empty item (item {position})")]
    EmptyEndpoint { list: String, position: usize },
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
            ClientError::BadEndpoint(_) | ClientError::EmptyEndpoint { .. } => Exit::Usage,
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
            ClientError::BadEndpoint(_) | ClientError::EmptyEndpoint { .. } => Some(
                "set it with `claude-max-market config --set market.endpoint=ws://HOST:PORT` (several replicas: \
                 `ws://HOST1:PORT,ws://HOST2:PORT`, tried in that order)"
                    .into(),
            ),
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
    /// Cleared when the connection is gone (no reply will come).
    alive: Arc<AtomicBool>,
    /// The endpoint this session is connected to.
    pub endpoint: String,
    /// Events pushed by the coordinator (and errors not tied to a request).
    pub events: mpsc::UnboundedReceiver<Event>,
    pub node_id: String,
    /// Balance at login, and what this login granted (first login only).
    pub balance: i64,
    pub granted: i64,
    /// The coordinator's cap on a payload frame (from its challenge).
    pub payload_cap: usize,
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
        let (nonce, payload_cap) = match next_text(&mut ws).await? {
            Event::Challenge { nonce, payload_cap, .. } => (nonce, payload_cap),
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
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let close = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || close {
                    break;
                }
            }
        });
        let p2 = pending.clone();
        let alive2 = alive.clone();
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
            // Connection gone: wake every waiter with `Closed` (a request
            // sent from now on sees `alive` cleared).
            alive2.store(false, Ordering::SeqCst);
            if let Ok(mut p) = p2.lock() {
                p.clear();
            }
        });
        let mut prefix = [0u8; 6];
        rand::thread_rng().fill(&mut prefix);
        Ok(Client {
            out: out_tx,
            pending,
            alive,
            endpoint: endpoint.to_string(),
            events: ev_rx,
            node_id,
            balance,
            granted,
            payload_cap: payload_cap.min(protocol::DEFAULT_PAYLOAD_CAP),
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
        // Registered before the check: the reader clears `alive` before it
        // drops the waiters, so a waiter it missed sees the flag here.
        if !self.alive.load(Ordering::SeqCst) || self.out.send(Message::text(text.to_string())).is_err() {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(id);
            }
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

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        !self.alive.load(Ordering::SeqCst)
    }
}

/// The coordinator replicas a node uses, in the order it tries them:
/// `market.endpoint` or `--endpoint`, one `ws://` / `wss://` URL or a
/// comma-separated list of them (spaces around commas allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints(Vec<String>);

impl Endpoints {
    /// Parse a list; an empty item or a non-WebSocket URL is refused,
    /// naming it.
    pub fn parse(text: &str) -> Result<Endpoints, ClientError> {
        let mut urls = Vec::new();
        for (i, item) in text.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                return Err(ClientError::EmptyEndpoint {
                    list: text.to_string(),
                    position: i + 1,
                });
            }
            let rest = item
                .strip_prefix("ws://")
                .or_else(|| item.strip_prefix("wss://"))
                .unwrap_or_default();
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if host.is_empty() || item.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ClientError::BadEndpoint(item.to_string()));
            }
            urls.push(item.to_string());
        }
        Ok(Endpoints(urls))
    }

    /// `flag`, else `configured` (`market.endpoint`, env and file already
    /// folded in).
    pub fn resolve(flag: Option<String>, configured: &str) -> Result<Endpoints, ClientError> {
        Endpoints::parse(flag.as_deref().unwrap_or(configured))
    }

    /// The URLs, in the order they are tried (never empty).
    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Which replica to try next: connects to the first of the list that
/// answers, in order; after a lost session, from the one after it.
#[derive(Debug, Clone)]
pub struct Failover {
    endpoints: Endpoints,
    next: usize,
    current: Option<usize>,
}

impl Failover {
    pub fn new(endpoints: Endpoints) -> Failover {
        Failover {
            endpoints,
            next: 0,
            current: None,
        }
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The endpoint of the last session made.
    pub fn current(&self) -> Option<&str> {
        self.current.map(|i| self.endpoints.0[i].as_str())
    }

    /// One round: each endpoint once, from the next one, moving on at once
    /// when one is unreachable. A refusal that is not about reachability
    /// (a bad signature, ...) ends the round: every replica would say it.
    /// When all fail, the error names each.
    pub async fn connect(&mut self, signer: &dyn Signer) -> Result<Client, ClientError> {
        let urls = &self.endpoints.0;
        let mut failures = Vec::new();
        for k in 0..urls.len() {
            let i = (self.next + k) % urls.len();
            match Client::connect(&urls[i], signer).await {
                Ok(c) => {
                    self.current = Some(i);
                    self.next = i;
                    return Ok(c);
                }
                Err(e) if e.is_transient() => failures.push(e),
                Err(e) => return Err(e),
            }
        }
        if failures.len() == 1 {
            return Err(failures.remove(0));
        }
        let detail = failures
            .iter()
            .map(|e| match e {
                ClientError::Unavailable { endpoint, detail } => format!("{endpoint}: {detail}"),
                e => e.to_string(),
            })
            .collect::<Vec<_>>()
            .join("; ");
        Err(ClientError::Unavailable {
            endpoint: self.endpoints.to_string(),
            detail: format!("no replica answered ({detail})"),
        })
    }

    /// The last session was lost: the next round starts after its endpoint,
    /// so a replica that just went away is not the first tried again.
    pub fn lost(&mut self) {
        if let Some(i) = self.current {
            self.next = (i + 1) % self.endpoints.0.len();
        }
    }
}

/// Send one request on its own session, retrying on a fresh connection
/// (the next replica first) under the same message id if the connection
/// fails, so a lost reply never applies it twice.
pub async fn call_once<R: Reply>(endpoints: &Endpoints, signer: &dyn Signer, req: &Request) -> Result<R, ClientError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut failover = Failover::new(endpoints.clone());
    let mut msg_id = None;
    let mut tries = 0;
    loop {
        tries += 1;
        let client = match failover.connect(signer).await {
            Ok(c) => c,
            Err(e) if e.is_transient() && tries < 4 && msg_id.is_some() => {
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mid = msg_id.get_or_insert_with(|| client.next_id()).clone();
        let r = client.call_with_id(&mid, req).await;
        client.close();
        match r {
            Err(e) if e.is_transient() && tries < 4 => {
                if e.reason().is_none() {
                    // The connection failed, not the request: the next replica
                    // is tried at once, the same one after a pause.
                    failover.lost();
                    if endpoints.urls().len() > 1 {
                        continue;
                    }
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}

/// The session a long-lived node is on now, replaced on each reconnect
/// (`None` between sessions). Work that outlives one connection calls
/// through it and carries on on the next session.
#[derive(Clone)]
pub struct Link(Arc<watch::Sender<Option<Arc<Client>>>>);

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

impl Link {
    pub fn new() -> Link {
        Link(Arc::new(watch::channel(None).0))
    }

    /// Put `client` in use (`None`: the session is gone).
    pub fn set(&self, client: Option<Arc<Client>>) {
        self.0.send_replace(client);
    }

    /// The session in use, if it is still connected.
    pub fn current(&self) -> Option<Arc<Client>> {
        self.0.borrow().clone().filter(|c| !c.is_closed())
    }

    /// Hears of every change of session.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Client>>> {
        self.0.subscribe()
    }

    /// A connected session, waiting until `until` for one.
    async fn session(&self, until: tokio::time::Instant) -> Result<Arc<Client>, ClientError> {
        let mut rx = self.subscribe();
        let live = rx.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed()));
        let got = match tokio::time::timeout_at(until, live).await {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        };
        got.ok_or(ClientError::Closed)
    }

    /// Call `req` under one message id on the session in use; if that
    /// session is lost before the answer, send it again under the same id
    /// on the next one, for up to `wait`: it applies once whichever
    /// replica answers.
    pub async fn call<R: Reply>(&self, req: &Request, wait: Duration) -> Result<R, ClientError> {
        let until = tokio::time::Instant::now() + wait;
        let mut msg_id = None;
        loop {
            let client = self.session(until).await?;
            let mid = msg_id.get_or_insert_with(|| client.next_id()).clone();
            match client.call_with_id(&mid, req).await {
                Err(e) if e.is_transient() && tokio::time::Instant::now() < until => {
                    if !client.is_closed() {
                        // Rate limited or slow, on a live session: pause before asking again.
                        let pause = tokio::time::Instant::now() + Duration::from_millis(250);
                        tokio::time::sleep_until(pause.min(until)).await;
                    }
                }
                other => return other,
            }
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

    #[test]
    fn an_endpoint_list_parses_in_order_and_refuses_bad_items_by_name() {
        let e = Endpoints::parse("ws://a:1").unwrap();
        assert_eq!(e.urls(), ["ws://a:1"]);
        let e = Endpoints::parse(" ws://a:1 , wss://b:2/x,ws://c:3").unwrap();
        assert_eq!(e.urls(), ["ws://a:1", "wss://b:2/x", "ws://c:3"]);
        assert_eq!(e.to_string(), "ws://a:1,wss://b:2/x,ws://c:3");
        for (bad, item) in [
            ("http://a:1", "http://a:1"),
            ("ws://a:1,http://b:2", "http://b:2"),
            ("ws://a:1, ftp://x", "ftp://x"),
            ("ws://", "ws://"),
            ("ws:///path", "ws:///path"),
        ] {
            match Endpoints::parse(bad) {
                Err(ClientError::BadEndpoint(i)) => assert_eq!(i, item, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        for (bad, position) in [("", 1), ("ws://a:1,", 2), ("ws://a:1,,ws://b:2", 2), (" , ws://a:1", 1)] {
            let e = Endpoints::parse(bad).unwrap_err();
            assert!(
                matches!(e, ClientError::EmptyEndpoint { position: p, .. } if p == position),
                "{bad}: {e:?}"
            );
            assert_eq!(e.exit(), Exit::Usage);
            assert!(e.to_string().contains(&format!("item {position}")), "{e}");
        }
        assert_eq!(Endpoints::parse("x").unwrap_err().exit(), Exit::Usage);
        // The flag wins over the configured value.
        let e = Endpoints::resolve(Some("ws://flag:1".into()), "ws://cfg:2").unwrap();
        assert_eq!(e.urls(), ["ws://flag:1"]);
        let e = Endpoints::resolve(None, "ws://cfg:2, ws://cfg:3").unwrap();
        assert_eq!(e.urls().len(), 2);
    }

    #[test]
    fn a_lost_session_moves_the_next_round_past_its_endpoint() {
        let mut f = Failover::new(Endpoints::parse("ws://a:1,ws://b:2,ws://c:3").unwrap());
        assert_eq!(f.current(), None);
        f.lost();
        assert_eq!(f.next, 0, "nothing lost before a first session");
        f.current = Some(2);
        f.lost();
        assert_eq!(f.next, 0, "wraps around");
        f.current = Some(0);
        f.lost();
        assert_eq!(f.next, 1);
    }
}
