//! One node's WebSocket session, from the challenge to the last frame.
//!
//! Before `hello` the connection is held to small limits while its bytes are
//! read ([`Gate`]): every frame to the control cap, checked on the frame's
//! header before its payload is buffered, all of them together to a byte
//! budget, and the whole login to `--auth-timeout-ms`. After it, frames may
//! use the payload cap, and everything the coordinator pushes to the node
//! goes through a bounded queue ([`Outbound`]): a node that stops reading is
//! disconnected, never buffered for without bound.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::http::Slot;
use super::metrics::Closed;
use super::writer::{error_frame, Cmd};
use super::Shared;
use crate::crypto::keys::PublicIdentity;
use crate::market::protocol::{
    self, auth_message, decode_request, encode_event, Event, IdentityProof, Reason, Rejection, Request,
};

/// Bad frames tolerated before authentication, then the connection closes.
pub const PRE_AUTH_STRIKES: u32 = 8;
/// Largest WebSocket frame header: 2 bytes, 8 of length, 4 of mask.
const MAX_HEADER: usize = 14;

type Ws = WebSocketStream<Gate<TokioIo<hyper::upgrade::Upgraded>>>;

/// What the writer pushes to a session.
pub enum Out {
    Text(String),
    Close,
}

struct QueueState {
    bytes: AtomicUsize,
    max_bytes: usize,
    stopped: AtomicBool,
    stop: Notify,
}

/// The writer's end of a session's send queue, bounded by frames (the
/// channel) and by bytes. Once either bound is hit the session is told to
/// stop and everything pushed after is dropped.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Out>,
    q: Arc<QueueState>,
}

/// The session's end of its send queue.
pub struct Inbound {
    rx: mpsc::Receiver<Out>,
    q: Arc<QueueState>,
}

pub fn queue(frames: usize, max_bytes: usize) -> (Outbound, Inbound) {
    let (tx, rx) = mpsc::channel(frames.max(1));
    let q = Arc::new(QueueState {
        bytes: AtomicUsize::new(0),
        max_bytes,
        stopped: AtomicBool::new(false),
        stop: Notify::new(),
    });
    (Outbound { tx, q: q.clone() }, Inbound { rx, q })
}

impl Outbound {
    /// Queue a frame for the node. False if the session is gone or was told
    /// to stop (now or before).
    pub fn push(&self, text: String) -> bool {
        if self.q.stopped.load(Ordering::Relaxed) {
            return false;
        }
        let n = text.len();
        if self.q.bytes.fetch_add(n, Ordering::Relaxed) + n > self.q.max_bytes {
            self.overflow();
            return false;
        }
        match self.tx.try_send(Out::Text(text)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Close the session after what is queued (another login replaced it).
    pub fn close(&self) {
        if self.tx.try_send(Out::Close).is_err() {
            self.overflow();
        }
    }

    fn overflow(&self) {
        if !self.q.stopped.swap(true, Ordering::Relaxed) {
            self.q.stop.notify_one();
        }
    }
}

impl Inbound {
    async fn recv(&mut self) -> Option<Out> {
        let o = self.rx.recv().await;
        if let Some(Out::Text(t)) = &o {
            self.q.bytes.fetch_sub(t.len(), Ordering::Relaxed);
        }
        o
    }
}

/// A frame over its cap, or more bytes before `hello` than the budget.
#[derive(Debug)]
pub struct OverCap(String);

impl std::fmt::Display for OverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OverCap {}

/// Reads a connection's bytes under the pre-authentication limits.
///
/// tungstenite's own caps are set once per connection, for the payload cap;
/// this holds each frame of the login phase to the control cap by reading
/// its header (with tungstenite's parser) as the bytes arrive, so a frame
/// over it is refused before its payload is buffered. [`Gate::open`] ends
/// the login phase.
pub struct Gate<S> {
    inner: S,
    open: bool,
    frame_cap: u64,
    budget: usize,
    header: [u8; MAX_HEADER],
    have: usize,
    skip: u64,
}

impl<S> Gate<S> {
    pub fn new(inner: S, frame_cap: usize, budget: usize) -> Gate<S> {
        Gate {
            inner,
            open: false,
            frame_cap: frame_cap as u64,
            budget,
            header: [0; MAX_HEADER],
            have: 0,
            skip: 0,
        }
    }

    /// Authenticated: let every byte through.
    pub fn open(&mut self) {
        self.open = true;
    }

    fn inspect(&mut self, mut data: &[u8]) -> Result<(), OverCap> {
        if data.len() > self.budget {
            return Err(OverCap(
                "more bytes before authentication than the login allows".to_string(),
            ));
        }
        self.budget -= data.len();
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let before = self.have;
            let take = (MAX_HEADER - before).min(data.len());
            self.header[before..before + take].copy_from_slice(&data[..take]);
            self.have += take;
            let mut cur = Cursor::new(&self.header[..self.have]);
            match FrameHeader::parse(&mut cur) {
                Ok(Some((_, len))) => {
                    if len > self.frame_cap {
                        return Err(OverCap(format!(
                            "a {len} byte frame before authentication, over the {} byte control cap",
                            self.frame_cap
                        )));
                    }
                    data = &data[cur.position() as usize - before..];
                    self.have = 0;
                    self.skip = len;
                }
                Ok(None) => data = &data[take..],
                // Not a frame header: tungstenite refuses the same bytes.
                Err(_) => {
                    self.open = true;
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.open {
            if let Err(e) = this.inspect(&buf.filled()[start..]) {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

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
                let fatal = if signed != nonce {
                    Some(Rejection::new(
                        Reason::BadChallenge,
                        "the signed nonce is not this session's challenge",
                    ))
                } else if let Err(e) = identity.validate() {
                    Some(Rejection::new(Reason::BadIdentity, e.to_string()))
                } else {
                    let parsed = base64::engine::general_purpose::STANDARD
                        .decode(&sig)
                        .ok()
                        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok());
                    match parsed {
                        Some(s) if identity.verify(&auth_message(&nonce, &identity), &s) => None,
                        _ => Some(Rejection::new(
                            Reason::BadSignature,
                            "the session signature does not verify",
                        )),
                    }
                };
                if let Some(r) = fatal {
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
    let q = out.q.clone();
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
    if kind == super::anchor::TYPE {
        return match super::anchor::handle(text, &sh.witness, node) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u64) -> Vec<u8> {
        let mut v = Vec::new();
        let h = FrameHeader {
            mask: Some([1, 2, 3, 4]),
            ..FrameHeader::default()
        };
        h.format(len, &mut v).unwrap();
        v
    }

    #[test]
    fn the_gate_refuses_a_frame_over_the_cap_on_its_header() {
        let mut g = Gate::new((), 100, usize::MAX);
        let mut ok = header(100);
        ok.extend(std::iter::repeat_n(b'x', 100));
        // Split anywhere, including inside the header.
        for cut in 0..ok.len() {
            let mut g2 = Gate::new((), 100, usize::MAX);
            g2.inspect(&ok[..cut]).unwrap();
            g2.inspect(&ok[cut..]).unwrap();
            assert_eq!((g2.have, g2.skip), (0, 0));
        }
        g.inspect(&ok).unwrap();
        let big = header(4 * 1024 * 1024 - 1);
        let e = g.inspect(&big[..3]).and_then(|_| g.inspect(&big[3..])).unwrap_err();
        assert!(e.to_string().contains("over the 100 byte control cap"), "{e}");
    }

    #[test]
    fn the_gate_holds_the_login_to_its_byte_budget_and_opens_after_it() {
        let mut g = Gate::new((), 100, 250);
        let mut f = header(90);
        f.extend(std::iter::repeat_n(b'x', 90));
        g.inspect(&f).unwrap();
        g.inspect(&f).unwrap();
        assert!(g.inspect(&f).is_err(), "a third frame is over the budget");
        let mut g = Gate::new((), 100, 250);
        g.open();
        assert!(g.open);
    }
}
