//! What connection tasks and the writer thread pass each other: the
//! commands a session sends the writer ([`Cmd`]), each session's bounded
//! send queue the writer pushes events into ([`Outbound`], read by the
//! session through [`Inbound`]), and the error frame both send.
//!
//! Sessions and the writer both depend on this module and never on each
//! other. It must not hold state of its own beyond the queues, nor know
//! about the database or sockets.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::crypto::keys::PublicIdentity;
use crate::market::protocol::{encode_event, Event, IdentityProof, Rejection, Request};

/// Answer to a login: (balance, granted now) or why it failed.
pub type LoginReply = oneshot::Sender<Result<(i64, i64), String>>;

/// What connection tasks ask of the writer.
pub enum Cmd {
    Login {
        identity: PublicIdentity,
        proof: IdentityProof,
        conn_id: u64,
        tx: Outbound,
        reply: LoginReply,
    },
    Request {
        node: String,
        id: String,
        req: Request,
        reply: oneshot::Sender<String>,
    },
    Gone {
        node: String,
        conn_id: u64,
    },
    /// Events another replica queued for sessions here (`replica::listen`).
    Relay(Vec<Relayed>),
    /// A `/metrics` scrape: read the book's gauges from the database, then
    /// answer (the sender is dropped unanswered if it cannot be reached).
    Gauges(oneshot::Sender<()>),
    Shutdown,
}

/// One event relayed from another replica: the frame for `node`, and with
/// `close`, the id of this replica's session of `node` to close after it
/// (the node logged in elsewhere).
pub struct Relayed {
    pub node: String,
    pub close: Option<u64>,
    pub frame: String,
}

/// The `error` frame for a refusal, naming the request it answers if any.
pub fn error_frame(re: Option<String>, r: Rejection) -> String {
    encode_event(&Event::Error {
        re,
        reason: r.reason,
        message: r.message,
        original: r.original,
    })
}

/// What the writer pushes to a session.
pub enum Out {
    Text(String),
    Close,
}

/// The bounds of one send queue, shared by both ends.
pub struct QueueState {
    bytes: AtomicUsize,
    max_bytes: usize,
    stopped: AtomicBool,
    /// Woken once when the queue overflows: the session must end.
    pub stop: Notify,
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
    pub async fn recv(&mut self) -> Option<Out> {
        let o = self.rx.recv().await;
        if let Some(Out::Text(t)) = &o {
            self.q.bytes.fetch_sub(t.len(), Ordering::Relaxed);
        }
        o
    }

    /// The queue's bounds, whose `stop` the session waits on.
    pub fn state(&self) -> Arc<QueueState> {
        self.q.clone()
    }
}
