//! One node's WebSocket session, from the challenge to the last frame.
//!
//! Before `hello` the connection is held to small limits while its bytes are
//! read ([`Gate`]), and the whole login to `--auth-timeout-ms`. After it,
//! frames may use the payload cap, and everything the coordinator pushes to
//! the node goes through a bounded queue ([`Inbound`]): a node that stops
//! reading is disconnected, never buffered for without bound.
//!
//! A session does everything that needs no market state (caps, parsing,
//! rate limits, authentication, witnessing) and sends every state change to
//! the writer as a [`Cmd`]. It must not touch the database.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::admission::Slot;
use super::anchor;
use super::gate::{Gate, OverCap, MAX_HEADER};
use super::metrics::Closed;
use super::shared::Shared;
use super::wire::{error_frame, queue, Cmd, Inbound, Out, QueueState};
use crate::crypto::keys::PublicIdentity;
use crate::market::protocol::{
    self, auth_message, decode_request, encode_event, Event, IdentityProof, Reason, Rejection, Request,
};

/// Bad frames tolerated before authentication, then the connection closes.
pub const PRE_AUTH_STRIKES: u32 = 8;

type Ws = WebSocketStream<Gate<TokioIo<hyper::upgrade::Upgraded>>>;

/// A token bucket: `rate` frames per second with bursts up to `burst`.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How a session ends, when the coordinator ends it: the close frame, and
/// the cause counted in `cmm_market_connections_closed_total` (none for an
/// orderly end).
struct Ending {
    why: Option<Closed>,
    code: CloseCode,
    reason: String,
}

impl Ending {
    fn new(why: Closed, code: CloseCode, reason: impl Into<String>) -> Ending {
        Ending {
            why: Some(why),
            code,
            reason: reason.into(),
        }
    }

    fn oversized(reason: impl Into<String>) -> Ending {
        Ending::new(Closed::Oversized, CloseCode::Size, reason)
    }
}

/// Send the close frame (briefly: a peer that does not read gets none).
async fn close(ws: &mut Ws, sh: &Shared, e: Option<Ending>) {
    let frame = e.map(|e| {
        if let Some(why) = e.why {
            sh.metrics.closed(why);
        }
        // A close reason is at most 123 bytes.
        let mut reason = e.reason;
        while reason.len() > 123 {
            reason.pop();
        }
        CloseFrame {
            code: e.code,
            reason: reason.into(),
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(frame)).await;
}

/// Send one frame, giving up after the send timeout.
async fn send(ws: &mut Ws, sh: &Shared, text: String) -> Result<(), Option<Ending>> {
    match tokio::time::timeout(sh.opts.limits.send_timeout, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        // The peer is gone.
        Ok(Err(_)) => Err(None),
        Err(_) => Err(Some(Ending::new(
            Closed::SendTimeout,
            CloseCode::Policy,
            "the node did not read for too long",
        ))),
    }
}

/// The WebSocket configuration: tungstenite's caps are the payload cap;
/// the control cap before `hello` is the [`Gate`]'s.
fn ws_config(payload_cap: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(payload_cap + 4096))
        .max_frame_size(Some(payload_cap + 4096))
}

/// Serve one upgraded connection until it ends. `deadline` bounds the
/// login; `slot` is the connection's place under the connection limits.
pub async fn run(upgraded: hyper::upgrade::Upgraded, sh: Arc<Shared>, slot: Arc<Slot>, deadline: Instant) {
    let o = &sh.opts;
    let budget = (PRE_AUTH_STRIKES as usize + 1) * (o.control_cap + MAX_HEADER);
    let gate = Gate::new(TokioIo::new(upgraded), o.control_cap, budget);
    let mut ws = WebSocketStream::from_raw_socket(gate, Role::Server, Some(ws_config(o.payload_cap))).await;
    let login = match tokio::time::timeout_at(deadline.into(), authenticate(&mut ws, &sh)).await {
        Ok(Ok(login)) => login,
        Ok(Err(e)) => return close(&mut ws, &sh, e).await,
        Err(_) => {
            let secs = o.limits.auth_timeout.as_secs_f64();
            let e = Ending::new(
                Closed::AuthTimeout,
                CloseCode::Policy,
                format!("no valid `hello` within {secs} s"),
            );
            return close(&mut ws, &sh, Some(e)).await;
        }
    };
    ws.get_mut().open();
    let (identity, nonce, sig) = login;
    let conn_id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
    let node = identity.node_id.clone();
    let (out_tx, mut out_rx) = queue(o.limits.send_queue_frames, o.limits.send_queue_bytes);
    let (reply_tx, reply_rx) = oneshot::channel();
    let login = Cmd::Login {
        proof: IdentityProof {
            identity: identity.clone(),
            nonce,
            sig,
        },
        identity,
        conn_id,
        tx: out_tx,
        reply: reply_tx,
    };
    if sh.engine.send(login).is_err() {
        return;
    }
    let (balance, granted) = match reply_rx.await {
        Ok(Ok(r)) => r,
        _ => {
            let f = error_frame(None, Rejection::new(Reason::Internal, "login failed"));
            let _ = send(&mut ws, &sh, f).await;
            return close(&mut ws, &sh, None).await;
        }
    };
    slot.authenticated();
    sh.metrics.sessions.inc();
    let welcome = Event::Welcome {
        node_id: node.clone(),
        balance,
        granted,
    };
    let end = match send(&mut ws, &sh, encode_event(&welcome)).await {
        Ok(()) => authenticated(&mut ws, &sh, &node, &mut out_rx).await,
        Err(e) => Err(e),
    };
    sh.metrics.sessions.dec();
    let _ = sh.engine.send(Cmd::Gone { node, conn_id });
    if let Err(e) = end {
        close(&mut ws, &sh, e).await;
    }
}

/// Why a read failed, as the coordinator ends the session for it.
fn read_error(sh: &Shared, e: tungstenite::Error) -> (Option<String>, Option<Ending>) {
    let m = &sh.metrics;
    let over = match &e {
        tungstenite::Error::Capacity(c) => Some(c.to_string()),
        tungstenite::Error::Io(io) => io
            .get_ref()
            .and_then(|i| i.downcast_ref::<OverCap>())
            .map(|o| o.to_string()),
        _ => None,
    };
    if let Some(why) = over {
        m.reject(Reason::Oversized);
        let f = error_frame(None, Rejection::new(Reason::Oversized, why.clone()));
        return (Some(f), Some(Ending::oversized(why)));
    }
    if matches!(
        e,
        tungstenite::Error::Utf8
            | tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::InvalidOpcode(_)
                    | tungstenite::error::ProtocolError::NonZeroReservedBits
                    | tungstenite::error::ProtocolError::UnmaskedFrameFromClient
                    | tungstenite::error::ProtocolError::FragmentedControlFrame
                    | tungstenite::error::ProtocolError::ControlFrameTooBig
            )
    ) {
        // A broken frame (a peer that merely hung up is not counted).
        m.reject(Reason::Malformed);
        let e = Ending::new(Closed::Malformed, CloseCode::Protocol, "not a valid WebSocket frame");
        return (None, Some(e));
    }
    (None, None)
}

type Login = (PublicIdentity, String, String);

/// The challenge, then nothing but a valid `hello` is accepted.
async fn authenticate(ws: &mut Ws, sh: &Shared) -> Result<Login, Option<Ending>> {
    let m = &sh.metrics;
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let nonce = hex::encode(nonce);
    let challenge = Event::Challenge {
        nonce: nonce.clone(),
        control_cap: sh.opts.control_cap,
        payload_cap: sh.opts.payload_cap,
    };
    send(ws, sh, encode_event(&challenge)).await?;
    let strikes_out = || {
        Some(Ending::new(
            Closed::BadLogin,
            CloseCode::Policy,
            format!("{PRE_AUTH_STRIKES} bad frames before authentication"),
        ))
    };
    let mut strikes = 0;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                m.frames.inc();
                m.reject(Reason::Malformed);
                let f = error_frame(None, Rejection::new(Reason::Malformed, "text frames only"));
                send(ws, sh, f).await?;
                strikes += 1;
                if strikes >= PRE_AUTH_STRIKES {
                    return Err(strikes_out());
                }
                continue;
            }
            Some(Ok(Message::Close(_))) | None => return Err(None),
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                let (frame, end) = read_error(sh, e);
                if let Some(f) = frame {
                    let _ = send(ws, sh, f).await;
                }
                return Err(end);
            }
        };
        m.frames.inc();
        let refuse = |id: Option<String>, r: Rejection| {
            m.reject(r.reason);
            error_frame(id, r)
        };
        // (The gate refuses larger frames while they are read; a message
        // in several frames is checked here.)
        if text.len() > sh.opts.control_cap {
            let why = format!("frame over the {} byte control cap", sh.opts.control_cap);
            send(ws, sh, refuse(None, Rejection::new(Reason::Oversized, why.clone()))).await?;
            return Err(Some(Ending::oversized(why)));
        }
        match decode_request(text.as_str()) {
            Ok((
                _,
                Request::Hello {
                    identity,
                    nonce: signed,
                    sig,
                },
            )) => {
                if let Err(r) = check_hello(&nonce, &identity, &signed, &sig) {
                    let reason = r.reason.as_str();
                    send(ws, sh, refuse(None, r)).await?;
                    return Err(Some(Ending::new(Closed::BadLogin, CloseCode::Policy, reason)));
                }
                return Ok((identity, nonce, sig));
            }
            Ok((id, _)) => {
                let r = Rejection::new(Reason::NotAuthenticated, "authenticate with `hello` first");
                send(ws, sh, refuse(id, r)).await?;
            }
            Err((id, r)) => send(ws, sh, refuse(id, r)).await?,
        }
        strikes += 1;
        if strikes >= PRE_AUTH_STRIKES {
            return Err(strikes_out());
        }
    }
}

/// A `hello` answers this session's challenge `nonce` when it signed that
/// nonce, its identity is well formed, and the signature verifies.
fn check_hello(nonce: &str, identity: &PublicIdentity, signed: &str, sig: &str) -> Result<(), Rejection> {
    if signed != nonce {
        return Err(Rejection::new(
            Reason::BadChallenge,
            "the signed nonce is not this session's challenge",
        ));
    }
    if let Err(e) = identity.validate() {
        return Err(Rejection::new(Reason::BadIdentity, e.to_string()));
    }
    let parsed = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .ok()
        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok());
    match parsed {
        Some(s) if identity.verify(&auth_message(nonce, identity), &s) => Ok(()),
        _ => Err(Rejection::new(
            Reason::BadSignature,
            "the session signature does not verify",
        )),
    }
}

/// An authenticated session: requests in, replies and pushed events out.
async fn authenticated(ws: &mut Ws, sh: &Shared, node: &str, out: &mut Inbound) -> Result<(), Option<Ending>> {
    let m = &sh.metrics;
    let mut bucket = Bucket {
        tokens: sh.opts.burst,
        last: Instant::now(),
    };
    let full = || {
        Some(Ending::new(
            Closed::SendQueueFull,
            CloseCode::Policy,
            "the node does not read: its send queue is full",
        ))
    };
    let q = out.state();
    loop {
        tokio::select! {
            biased;
            _ = q.stop.notified() => return Err(full()),
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        m.frames.inc();
                        m.reject(Reason::Malformed);
                        let f = error_frame(None, Rejection::new(Reason::Malformed, "text frames only"));
                        send_or_stop(ws, sh, &q, f).await?;
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None => return Err(None),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let (frame, end) = read_error(sh, e);
                        if let Some(f) = frame {
                            let _ = send(ws, sh, f).await;
                        }
                        return Err(end);
                    }
                };
                m.frames.inc();
                match handle_frame(text.as_str(), sh, node, &mut bucket).await {
                    Reply::Frame(f) => send_or_stop(ws, sh, &q, f).await?,
                    Reply::Close(f, why) => {
                        send_or_stop(ws, sh, &q, f).await?;
                        return Err(Some(Ending::oversized(why)));
                    }
                }
            }
            o = out.recv() => match o {
                Some(Out::Text(t)) => send_or_stop(ws, sh, &q, t).await?,
                Some(Out::Close) | None => return Err(Some(Ending {
                    why: None,
                    code: CloseCode::Normal,
                    reason: "replaced by another login of this node".into(),
                })),
            }
        }
    }
}

/// [`send`], cut short when the send queue overflows meanwhile.
async fn send_or_stop(ws: &mut Ws, sh: &Shared, q: &QueueState, text: String) -> Result<(), Option<Ending>> {
    tokio::select! {
        biased;
        _ = q.stop.notified() => Err(Some(Ending::new(
            Closed::SendQueueFull,
            CloseCode::Policy,
            "the node does not read: its send queue is full",
        ))),
        r = send(ws, sh, text) => r,
    }
}

/// The envelope fields read before the full decode.
#[derive(Default, serde::Deserialize)]
struct Light {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// The answer to a frame: a reply, or a refusal that ends the session.
enum Reply {
    Frame(String),
    Close(String, String),
}

async fn handle_frame(text: &str, sh: &Shared, node: &str, bucket: &mut Bucket) -> Reply {
    let m = &sh.metrics;
    let refuse = |id: Option<String>, r: Rejection| {
        m.reject(r.reason);
        Reply::Frame(error_frame(id, r))
    };
    let oversized = |id: Option<String>, why: String| {
        m.reject(Reason::Oversized);
        Reply::Close(error_frame(id, Rejection::new(Reason::Oversized, why.clone())), why)
    };
    if text.len() > sh.opts.payload_cap {
        return oversized(None, format!("frame over the {} byte payload cap", sh.opts.payload_cap));
    }
    // A light first look (id and type only) so that refusals for rate and
    // size can still name the request they refuse.
    let light: Light = serde_json::from_str(text).unwrap_or_default();
    let light_id = light.id.filter(|i| !i.is_empty() && i.len() <= protocol::MAX_ID_LEN);
    if !bucket.take(sh.opts.rate, sh.opts.burst) {
        return refuse(
            light_id,
            Rejection::new(
                Reason::RateLimited,
                format!("more than {} frames per second", sh.opts.rate),
            ),
        );
    }
    let kind = light.kind.unwrap_or_default();
    if text.len() > sh.opts.control_cap && !Request::carries_payload(&kind) {
        return oversized(
            light_id,
            format!("frame over the {} byte control cap", sh.opts.control_cap),
        );
    }
    // Witnessing needs no market state: answered here, never queued.
    if kind == anchor::TYPE {
        return match anchor::handle(text, &sh.witness, node) {
            Ok(frame) => Reply::Frame(frame),
            Err((id, r)) => refuse(id, r),
        };
    }
    let (id, req) = match decode_request(text) {
        Ok(x) => x,
        Err((id, r)) => return refuse(id, r),
    };
    if matches!(req, Request::Hello { .. }) {
        return refuse(
            id,
            Rejection::new(Reason::AlreadyAuthenticated, "this session is already authenticated"),
        );
    }
    let Some(id) = id else {
        return refuse(None, Rejection::new(Reason::MissingId, "requests need an `id`"));
    };
    let (tx, rx) = oneshot::channel();
    let cmd = Cmd::Request {
        node: node.to_string(),
        id: id.clone(),
        req,
        reply: tx,
    };
    if sh.engine.send(cmd).is_err() {
        return refuse(
            Some(id),
            Rejection::new(Reason::Internal, "the coordinator is shutting down"),
        );
    }
    match rx.await {
        Ok(frame) => Reply::Frame(frame),
        Err(_) => refuse(
            Some(id),
            Rejection::new(Reason::Internal, "the coordinator is shutting down"),
        ),
    }
}
