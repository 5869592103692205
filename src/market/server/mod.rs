//! `market serve`: the coordinator.
//!
//! One TCP port serves WebSocket sessions for nodes and plain HTTP
//! `GET /healthz` and `GET /metrics`. Connection tasks do everything that
//! needs no state (frame caps, parsing, rate limits, authentication); every
//! state change goes to one writer thread that owns the SQLite connection
//! and applies the requests of many nodes in one transaction (group commit),
//! replying only after that transaction is durable. A refused request rolls
//! back to its own savepoint, so it changes nothing while its neighbours in
//! the batch still commit.

pub mod book;
pub mod ledger;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use rand::RngCore;
use rusqlite::{Connection, TransactionBehavior};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::crypto::keys::PublicIdentity;
use crate::market::protocol::{
    self, auth_message, decode_request, encode_event, Event, IdentityProof, Reason, Rejection, Request,
};
use book::{Fail, Settings};

/// Everything `market serve` can be told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub db: PathBuf,
    pub settings: Settings,
    pub control_cap: usize,
    pub payload_cap: usize,
    /// Sustained frames per second per session, and the burst above it.
    pub rate: f64,
    pub burst: f64,
    pub sync_full: bool,
    /// How long a connection may take to authenticate.
    pub auth_timeout: Duration,
}

/// Why the coordinator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the market database `{path}`: {source}")]
    Db { path: String, source: rusqlite::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl crate::exit::HasExit for ServeError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            ServeError::Listen { .. } => crate::exit::Exit::Unavailable,
            _ => crate::exit::Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ServeError::Listen { .. } => Some("pick another address with `--listen 127.0.0.1:PORT`".into()),
            _ => None,
        }
    }
}

/// Counters and gauges behind `GET /metrics`.
#[derive(Default)]
pub struct Metrics {
    connections: AtomicI64,
    sessions: AtomicI64,
    connections_total: AtomicU64,
    frames_total: AtomicU64,
    rejects: [AtomicU64; 32],
    commits_total: AtomicU64,
    ops_committed_total: AtomicU64,
    book: Mutex<Gauges>,
}

#[derive(Default, Clone)]
struct Gauges {
    offers_active: i64,
    tasks: Vec<(String, i64)>,
    totals: ledger::Totals,
}

impl Metrics {
    fn reject(&self, r: Reason) {
        let i = Reason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejects[i].fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let g = self.book.lock().map(|g| g.clone()).unwrap_or_default();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, i64)>| {
            let _ = writeln!(s, "# HELP cmm_market_{name} {help}\n# TYPE cmm_market_{name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "cmm_market_{name}{labels} {v}");
            }
        };
        let one = |v: i64| vec![(String::new(), v)];
        metric(
            "connections",
            "gauge",
            "Open TCP connections",
            one(self.connections.load(Ordering::Relaxed)),
        );
        metric(
            "sessions",
            "gauge",
            "Authenticated sessions",
            one(self.sessions.load(Ordering::Relaxed)),
        );
        metric(
            "connections_total",
            "counter",
            "Connections accepted",
            one(self.connections_total.load(Ordering::Relaxed) as i64),
        );
        metric(
            "frames_total",
            "counter",
            "Frames received from nodes",
            one(self.frames_total.load(Ordering::Relaxed) as i64),
        );
        metric(
            "rejects_total",
            "counter",
            "Frames refused, by reason",
            Reason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        format!("{{reason=\"{}\"}}", r.as_str()),
                        self.rejects[i].load(Ordering::Relaxed) as i64,
                    )
                })
                .collect(),
        );
        metric(
            "commits_total",
            "counter",
            "Durable transactions",
            one(self.commits_total.load(Ordering::Relaxed) as i64),
        );
        metric(
            "ops_committed_total",
            "counter",
            "Operations committed",
            one(self.ops_committed_total.load(Ordering::Relaxed) as i64),
        );
        metric("offers_active", "gauge", "Active offers", one(g.offers_active));
        let open = g.tasks.iter().find(|(k, _)| k == "open").map(|x| x.1).unwrap_or(0);
        metric("tasks_open", "gauge", "Open tasks", one(open));
        metric(
            "tasks",
            "gauge",
            "Tasks by state",
            g.tasks
                .iter()
                .map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v))
                .collect(),
        );
        let settled = g.tasks.iter().find(|(k, _)| k == "settled").map(|x| x.1).unwrap_or(0);
        metric("settlements_total", "counter", "Settled tasks", one(settled));
        metric("ledger_issued", "gauge", "RUV issued", one(g.totals.issued));
        metric(
            "ledger_balances",
            "gauge",
            "RUV in node balances",
            one(g.totals.balances),
        );
        metric("ledger_escrow", "gauge", "RUV locked in escrow", one(g.totals.escrow));
        s
    }
}

enum Out {
    Text(String),
    Close,
}

/// Answer to a login: (balance, granted now) or why it failed.
type LoginReply = oneshot::Sender<Result<(i64, i64), String>>;

enum Cmd {
    Login {
        identity: PublicIdentity,
        proof: IdentityProof,
        conn_id: u64,
        tx: mpsc::UnboundedSender<Out>,
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
    Shutdown,
}

struct Shared {
    opts: ServeOptions,
    engine: std_mpsc::Sender<Cmd>,
    metrics: Arc<Metrics>,
    next_conn: AtomicU64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Raise the soft open-files limit to the hard one: every session is a socket.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Run the coordinator until SIGINT or SIGTERM. `ready` is called with the
/// bound address once the port is open.
pub fn serve(opts: ServeOptions, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    raise_nofile();
    let db_err = |source| ServeError::Db {
        path: opts.db.display().to_string(),
        source,
    };
    let conn = store::open(&opts.db, opts.sync_full).map_err(db_err)?;
    book::all_disconnected(&conn, now_ms()).map_err(db_err)?;
    let metrics = Arc::new(Metrics::default());
    refresh_gauges(&conn, &metrics);
    conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(db_err)?;
    let checkpointer = store::open(&opts.db, opts.sync_full).map_err(db_err)?;
    let stop_checkpoints = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop_checkpoints.clone();
    let checkpoints = std::thread::Builder::new()
        .name("market-checkpoint".into())
        .spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let _ = store::checkpoint(&checkpointer);
            }
            let _ = store::checkpoint(&checkpointer);
        })?;
    let (etx, erx) = std_mpsc::channel();
    let settings = opts.settings.clone();
    let m2 = metrics.clone();
    let engine = std::thread::Builder::new()
        .name("market-writer".into())
        .spawn(move || writer(conn, settings, erx, m2))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shared = Arc::new(Shared {
        opts: opts.clone(),
        engine: etx.clone(),
        metrics,
        next_conn: AtomicU64::new(1),
    });
    let result = rt.block_on(async move {
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: opts.listen,
                source,
            })?;
        ready(listener.local_addr()?);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(connection(stream, shared.clone()));
                    }
                    // Out of descriptors or similar: back off instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        Ok::<(), ServeError>(())
    });
    // Let the writer finish its batch and commit before the process ends.
    let _ = etx.send(Cmd::Shutdown);
    let _ = engine.join();
    stop_checkpoints.store(true, Ordering::Relaxed);
    let _ = checkpoints.join();
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

fn refresh_gauges(c: &Connection, m: &Metrics) {
    let offers = c
        .query_row("SELECT COUNT(*) FROM offers WHERE state = 'active'", [], |r| r.get(0))
        .unwrap_or(0);
    let tasks = c
        .prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default();
    let totals = ledger::totals(c).unwrap_or_default();
    if let Ok(mut g) = m.book.lock() {
        *g = Gauges {
            offers_active: offers,
            tasks,
            totals,
        };
    }
}

const BATCH_MAX: usize = 512;
const TICK_EVERY: Duration = Duration::from_millis(100);
const GAUGES_EVERY: Duration = Duration::from_secs(1);

fn error_frame(re: Option<String>, r: Rejection) -> String {
    encode_event(&Event::Error {
        re,
        reason: r.reason,
        message: r.message,
        original: r.original,
    })
}

/// The single writer: batches requests into one durable transaction.
fn writer(mut conn: Connection, s: Settings, rx: std_mpsc::Receiver<Cmd>, metrics: Arc<Metrics>) {
    let mut sessions: HashMap<String, (u64, mpsc::UnboundedSender<Out>)> = HashMap::new();
    let mut next_tick = Instant::now();
    let mut next_gauges = Instant::now() + GAUGES_EVERY;
    let mut stopping = false;
    while !stopping {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let mut batch = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(c) => batch.push(c),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let now = now_ms();
        let tick_due = Instant::now() >= next_tick;
        let mut replies: Vec<(oneshot::Sender<String>, String)> = Vec::new();
        let mut logins: Vec<(LoginReply, (i64, i64))> = Vec::new();
        let mut out: book::Outbox = Vec::new();
        let mut ops = 0u64;
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                fail_batch(batch, &e.to_string(), &metrics, &mut stopping);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        for cmd in batch {
            match cmd {
                Cmd::Shutdown => stopping = true,
                Cmd::Login {
                    identity,
                    proof,
                    conn_id,
                    tx: out_tx,
                    reply,
                } => match book::login(&tx, &s, &identity, &proof, now) {
                    Ok(r) => {
                        if let Some((old_id, old)) = sessions.insert(identity.node_id.clone(), (conn_id, out_tx)) {
                            if old_id != conn_id {
                                let _ = old.send(Out::Text(encode_event(&Event::Replaced {})));
                                let _ = old.send(Out::Close);
                            }
                        }
                        // Its open tasks were held back while it was away.
                        let online = |n: &str| sessions.contains_key(n);
                        let _ = book::requester_back(&tx, &identity.node_id, now, &online, &mut out);
                        ops += 1;
                        logins.push((reply, r));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                },
                Cmd::Gone { node, conn_id } => {
                    if sessions.get(&node).is_some_and(|(id, _)| *id == conn_id) {
                        sessions.remove(&node);
                        let _ = book::disconnected(&tx, &node, now, &mut out);
                    }
                }
                Cmd::Request { node, id, req, reply } => {
                    let frame = apply_one(&tx, &s, &node, &id, req, now, &sessions, &mut out, &metrics);
                    if frame.1 {
                        ops += 1;
                    }
                    replies.push((reply, frame.0));
                }
            }
        }
        if tick_due {
            next_tick = Instant::now() + TICK_EVERY;
            if let Ok(sp) = tx.unchecked_transaction_savepoint() {
                let online = |n: &str| sessions.contains_key(n);
                let mut tick_out = Vec::new();
                match book::tick(&sp, &s, now, &online, &mut tick_out) {
                    Ok(_) => {
                        if sp.commit().is_ok() {
                            out.extend(tick_out);
                        }
                    }
                    Err(_) => drop(sp),
                }
            }
        }
        match tx.commit() {
            Ok(()) => {
                metrics.commits_total.fetch_add(1, Ordering::Relaxed);
                metrics.ops_committed_total.fetch_add(ops, Ordering::Relaxed);
                for (reply, frame) in replies {
                    let _ = reply.send(frame);
                }
                for (reply, r) in logins {
                    let _ = reply.send(Ok(r));
                }
                for (node, ev) in out {
                    if let Some((_, tx)) = sessions.get(&node) {
                        let _ = tx.send(Out::Text(encode_event(&ev)));
                    }
                }
            }
            Err(e) => {
                for (reply, _) in replies {
                    metrics.reject(Reason::Internal);
                    let _ = reply.send(error_frame(
                        None,
                        Rejection::new(Reason::Internal, format!("commit failed: {e}")),
                    ));
                }
                for (reply, _) in logins {
                    let _ = reply.send(Err(format!("commit failed: {e}")));
                }
            }
        }
        if Instant::now() >= next_gauges {
            next_gauges = Instant::now() + GAUGES_EVERY;
            refresh_gauges(&conn, &metrics);
        }
    }
    refresh_gauges(&conn, &metrics);
}

fn fail_batch(batch: Vec<Cmd>, why: &str, metrics: &Metrics, stopping: &mut bool) {
    for cmd in batch {
        match cmd {
            Cmd::Request { id, reply, .. } => {
                metrics.reject(Reason::Internal);
                let _ = reply.send(error_frame(Some(id), Rejection::new(Reason::Internal, why)));
            }
            Cmd::Login { reply, .. } => {
                let _ = reply.send(Err(why.to_string()));
            }
            Cmd::Shutdown => *stopping = true,
            Cmd::Gone { .. } => {}
        }
    }
}

/// A savepoint on a shared transaction reference. rusqlite's `savepoint()`
/// wants `&mut`; the writer holds the transaction across the whole batch, so
/// it opens savepoints by hand.
trait SavepointExt {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>>;
}

struct Savepoint<'a> {
    conn: &'a Connection,
    done: bool,
}

impl SavepointExt for Connection {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>> {
        self.prepare_cached("SAVEPOINT op")?.execute([])?;
        Ok(Savepoint {
            conn: self,
            done: false,
        })
    }
}

impl Savepoint<'_> {
    fn commit(mut self) -> rusqlite::Result<()> {
        self.done = true;
        self.conn.prepare_cached("RELEASE op")?.execute([]).map(|_| ())
    }
}

impl std::ops::Deref for Savepoint<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .conn
                .prepare_cached("ROLLBACK TO op")
                .and_then(|mut s| s.execute([]));
            let _ = self.conn.prepare_cached("RELEASE op").and_then(|mut s| s.execute([]));
        }
    }
}

/// Apply one request in its own savepoint. Returns the reply frame and
/// whether state changed.
#[allow(clippy::too_many_arguments)]
fn apply_one(
    tx: &Connection,
    s: &Settings,
    node: &str,
    id: &str,
    req: Request,
    now: i64,
    sessions: &HashMap<String, (u64, mpsc::UnboundedSender<Out>)>,
    out: &mut book::Outbox,
    metrics: &Metrics,
) -> (String, bool) {
    let refuse = |r: Rejection| {
        metrics.reject(r.reason);
        (error_frame(Some(id.to_string()), r), false)
    };
    let seen: rusqlite::Result<Option<String>> = tx
        .prepare_cached("SELECT result FROM requests WHERE node_id = ?1 AND msg_id = ?2")
        .and_then(|mut st| {
            use rusqlite::OptionalExtension;
            st.query_row([node, id], |r| r.get(0)).optional()
        });
    match seen {
        Ok(Some(original)) => {
            let mut r = Rejection::new(Reason::DuplicateId, format!("message id `{id}` was already applied"));
            r.original = serde_json::from_str(&original).ok();
            return refuse(r);
        }
        Ok(None) => {}
        Err(e) => return refuse(Rejection::new(Reason::Internal, e.to_string())),
    }
    // Read-only requests are not remembered: replaying them changes nothing.
    let remember = !matches!(
        req,
        Request::Status {}
            | Request::Reputation { .. }
            | Request::Identity { .. }
            | Request::Result { .. }
            | Request::Task { .. }
    );
    let sp = match tx.unchecked_transaction_savepoint() {
        Ok(sp) => sp,
        Err(e) => return refuse(Rejection::new(Reason::Internal, e.to_string())),
    };
    let online = |n: &str| sessions.contains_key(n);
    let mark = out.len();
    let result = book::apply(&sp, s, node, req, now, &online, out).and_then(|v| {
        if remember {
            sp.prepare_cached("INSERT INTO requests(node_id, msg_id, result, ts) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![node, id, v.to_string(), now])?;
        }
        Ok(v)
    });
    match result {
        Ok(v) => match sp.commit() {
            Ok(()) => (
                encode_event(&Event::Ok {
                    re: id.to_string(),
                    result: v,
                }),
                remember,
            ),
            Err(e) => {
                out.truncate(mark);
                refuse(Rejection::new(Reason::Internal, e.to_string()))
            }
        },
        Err(f) => {
            out.truncate(mark);
            drop(sp);
            match f {
                Fail::Reject(r) => refuse(r),
                Fail::Sql(e) => refuse(Rejection::new(Reason::Internal, e.to_string())),
            }
        }
    }
}

struct ConnGuard(Arc<Metrics>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

struct SessionGuard(Arc<Metrics>);
impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
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

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn send_frame(ws: &mut Ws, text: String) -> bool {
    ws.send(Message::text(text)).await.is_ok()
}

async fn connection(stream: TcpStream, sh: Arc<Shared>) {
    sh.metrics.connections.fetch_add(1, Ordering::Relaxed);
    sh.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(sh.metrics.clone());
    // Peek at the request line: plain HTTP probes and WebSocket upgrades
    // share the port.
    let mut head = [0u8; 13];
    let deadline = Instant::now() + sh.opts.auth_timeout;
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.peek(&mut head)).await {
            Ok(Ok(n)) if n >= head.len() => break,
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    if head.starts_with(b"GET /healthz") || head.starts_with(b"GET /metrics") {
        http(stream, &head, &sh).await;
        return;
    }
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(sh.opts.payload_cap + 4096))
        .max_frame_size(Some(sh.opts.payload_cap + 4096));
    let ws = match tokio::time::timeout_at(
        deadline.into(),
        tokio_tungstenite::accept_async_with_config(stream, Some(cfg)),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        _ => return,
    };
    session(ws, sh, deadline).await;
}

async fn http(mut stream: TcpStream, head: &[u8], sh: &Shared) {
    // Read (and ignore) the rest of the request head, bounded.
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    while have < buf.len() {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[have..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                have += n;
                if buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let (ctype, body) = if head.starts_with(b"GET /healthz") {
        ("application/json", "{\"ok\":true}\n".to_string())
    } else {
        ("text/plain; version=0.0.4", sh.metrics.render())
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Bad frames tolerated before authentication, then the connection closes.
const PRE_AUTH_STRIKES: u32 = 8;

async fn session(mut ws: Ws, sh: Arc<Shared>, deadline: Instant) {
    let m = sh.metrics.clone();
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let nonce = hex::encode(nonce);
    let challenge = Event::Challenge {
        nonce: nonce.clone(),
        control_cap: sh.opts.control_cap,
        payload_cap: sh.opts.payload_cap,
    };
    if !send_frame(&mut ws, encode_event(&challenge)).await {
        return;
    }
    // Authentication: nothing but a valid `hello` is accepted.
    let mut strikes = 0;
    let (identity, sig) = loop {
        let msg = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                read_error(&mut ws, &m, e).await;
                return;
            }
            _ => return,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return,
            Message::Binary(_) => {
                m.frames_total.fetch_add(1, Ordering::Relaxed);
                m.reject(Reason::Malformed);
                let _ = send_frame(
                    &mut ws,
                    error_frame(None, Rejection::new(Reason::Malformed, "text frames only")),
                )
                .await;
                strikes += 1;
                if strikes >= PRE_AUTH_STRIKES {
                    return;
                }
                continue;
            }
            _ => continue,
        };
        m.frames_total.fetch_add(1, Ordering::Relaxed);
        let refuse = |id: Option<String>, r: Rejection| {
            m.reject(r.reason);
            error_frame(id, r)
        };
        if text.len() > sh.opts.control_cap {
            let f = refuse(
                None,
                Rejection::new(
                    Reason::Oversized,
                    format!("frame over the {} byte control cap", sh.opts.control_cap),
                ),
            );
            let _ = send_frame(&mut ws, f).await;
            return;
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
                    let sig = base64::engine::general_purpose::STANDARD
                        .decode(&sig)
                        .ok()
                        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok());
                    match sig {
                        Some(sig) if identity.verify(&auth_message(&nonce, &identity), &sig) => None,
                        _ => Some(Rejection::new(
                            Reason::BadSignature,
                            "the session signature does not verify",
                        )),
                    }
                };
                if let Some(r) = fatal {
                    let f = refuse(None, r);
                    let _ = send_frame(&mut ws, f).await;
                    let _ = ws.close(None).await;
                    return;
                }
                break (identity, sig);
            }
            Ok((id, _)) => {
                let f = refuse(
                    id,
                    Rejection::new(Reason::NotAuthenticated, "authenticate with `hello` first"),
                );
                let _ = send_frame(&mut ws, f).await;
            }
            Err((id, r)) => {
                let f = refuse(id, r);
                let _ = send_frame(&mut ws, f).await;
            }
        }
        strikes += 1;
        if strikes >= PRE_AUTH_STRIKES {
            return;
        }
    };
    let conn_id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
    let node = identity.node_id.clone();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let (reply_tx, reply_rx) = oneshot::channel();
    if sh
        .engine
        .send(Cmd::Login {
            proof: IdentityProof {
                identity: identity.clone(),
                nonce: nonce.clone(),
                sig,
            },
            identity,
            conn_id,
            tx: out_tx,
            reply: reply_tx,
        })
        .is_err()
    {
        return;
    }
    let (balance, granted) = match reply_rx.await {
        Ok(Ok(r)) => r,
        _ => {
            let _ = send_frame(
                &mut ws,
                error_frame(None, Rejection::new(Reason::Internal, "login failed")),
            )
            .await;
            return;
        }
    };
    m.sessions.fetch_add(1, Ordering::Relaxed);
    let _session = SessionGuard(m.clone());
    let welcome = Event::Welcome {
        node_id: node.clone(),
        balance,
        granted,
    };
    if send_frame(&mut ws, encode_event(&welcome)).await {
        authenticated(&mut ws, &sh, &node, &mut out_rx).await;
    }
    let _ = sh.engine.send(Cmd::Gone { node, conn_id });
}

async fn read_error(ws: &mut Ws, m: &Metrics, e: tungstenite::Error) {
    if matches!(e, tungstenite::Error::Capacity(_)) {
        m.reject(Reason::Oversized);
        let _ = send_frame(ws, error_frame(None, Rejection::new(Reason::Oversized, e.to_string()))).await;
        let _ = ws.close(None).await;
    } else if matches!(
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
    }
}

async fn authenticated(ws: &mut Ws, sh: &Shared, node: &str, out_rx: &mut mpsc::UnboundedReceiver<Out>) {
    let m = &sh.metrics;
    let mut bucket = Bucket {
        tokens: sh.opts.burst,
        last: Instant::now(),
    };
    loop {
        tokio::select! {
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        m.frames_total.fetch_add(1, Ordering::Relaxed);
                        m.reject(Reason::Malformed);
                        if !send_frame(ws, error_frame(None, Rejection::new(Reason::Malformed, "text frames only"))).await {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        read_error(ws, m, e).await;
                        return;
                    }
                };
                m.frames_total.fetch_add(1, Ordering::Relaxed);
                let frame = handle_frame(text.as_str(), sh, node, &mut bucket).await;
                if !send_frame(ws, frame).await {
                    return;
                }
            }
            o = out_rx.recv() => match o {
                Some(Out::Text(t)) => {
                    if !send_frame(ws, t).await {
                        return;
                    }
                }
                Some(Out::Close) | None => {
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
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

async fn handle_frame(text: &str, sh: &Shared, node: &str, bucket: &mut Bucket) -> String {
    let m = &sh.metrics;
    let refuse = |id: Option<String>, r: Rejection| {
        m.reject(r.reason);
        error_frame(id, r)
    };
    if text.len() > sh.opts.payload_cap {
        return refuse(
            None,
            Rejection::new(
                Reason::Oversized,
                format!("frame over the {} byte payload cap", sh.opts.payload_cap),
            ),
        );
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
        return refuse(
            light_id,
            Rejection::new(
                Reason::Oversized,
                format!("frame over the {} byte control cap", sh.opts.control_cap),
            ),
        );
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
        Ok(frame) => frame,
        Err(_) => refuse(
            Some(id),
            Rejection::new(Reason::Internal, "the coordinator is shutting down"),
        ),
    }
}

/// Defaults for `market serve`.
pub fn default_options(db: PathBuf) -> ServeOptions {
    ServeOptions {
        listen: "127.0.0.1:7700".parse().expect("literal address parses"),
        db,
        settings: Settings::default(),
        control_cap: protocol::DEFAULT_CONTROL_CAP,
        payload_cap: protocol::DEFAULT_PAYLOAD_CAP,
        rate: 200.0,
        burst: 400.0,
        sync_full: true,
        auth_timeout: Duration::from_secs(10),
    }
}
