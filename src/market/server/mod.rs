//! `market serve`: the coordinator, wired together.
//!
//! One TCP port serves WebSocket sessions for nodes and plain HTTP
//! `GET /healthz` and `GET /metrics`, both through hyper ([`http`]), each
//! connection admitted under the connection limits first ([`admission`]).
//! Connection tasks do everything that needs no state (limits, frame caps,
//! parsing, rate limits, authentication: [`session`]); every state change
//! goes to one writer thread that owns the SQLite connection ([`writer`]),
//! over the commands and send queues of [`wire`]. The order book's rules
//! are [`book`], the money [`ledger`], the schema [`store`].
//!
//! This module only starts the pieces, accepts connections until the
//! caller's shutdown future completes, and stops the pieces in order. It
//! must not listen for signals (the caller decides when to stop) nor build
//! a runtime (it runs on the caller's).

mod admission;
pub mod anchor;
pub mod book;
mod gate;
mod http;
pub mod ledger;
mod metrics;
mod options;
mod savepoint;
mod session;
mod shared;
pub mod store;
mod wire;
mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::net::TcpListener;

use metrics::Metrics;
use shared::Shared;
use wire::Cmd;

pub use options::{default_options, Limits, ServeOptions};
pub use writer::now_ms;

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

/// Raise the soft open-files limit to the hard one (every session is a
/// socket) and return the soft limit in force.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

/// Descriptors kept for everything but connections (database, WAL,
/// listener, runtime).
const RESERVED_FDS: u64 = 64;

/// Hold the connection limit below the open-files limit: a connection over
/// the descriptor limit could not be accepted at all, so refusals stay
/// orderly.
fn fit_connections(limits: &mut Limits) {
    let nofile = raise_nofile();
    let fit = nofile.saturating_sub(RESERVED_FDS).max(1) as usize;
    if limits.max_connections > fit {
        tracing::warn!(
            "--max-connections {} is over what the open-files limit ({nofile}) allows; using {fit}",
            limits.max_connections
        );
        limits.max_connections = fit;
    }
}

/// The thread that checkpoints the WAL four times a second (the writer's
/// connection never does), and once more when it is stopped.
struct Checkpoints {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Checkpoints {
    fn start(checkpointer: Connection) -> std::io::Result<Checkpoints> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("market-checkpoint".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let _ = store::checkpoint(&checkpointer);
                }
                let _ = store::checkpoint(&checkpointer);
            })?;
        Ok(Checkpoints { stop, thread })
    }

    /// Stop after one last checkpoint, and wait for it.
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Run the coordinator until `shutdown` completes. `ready` is called with
/// the bound address once the port is open.
///
/// On shutdown the writer finishes its batch and commits, and the WAL is
/// checkpointed, before this returns. Sessions still open are tasks on the
/// caller's runtime: the caller ends them by shutting the runtime down.
pub async fn serve(
    mut opts: ServeOptions,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    fit_connections(&mut opts.limits);
    let db_err = |source| ServeError::Db {
        path: opts.db.display().to_string(),
        source,
    };
    let conn = store::open(&opts.db, opts.sync_full).map_err(db_err)?;
    let witness = anchor::Witness::load_or_create(&opts.db)?;
    book::all_disconnected(&conn, now_ms()).map_err(db_err)?;
    let metrics = Arc::new(Metrics::default());
    writer::refresh_gauges(&conn, &metrics);
    conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(db_err)?;
    let checkpoints = Checkpoints::start(store::open(&opts.db, opts.sync_full).map_err(db_err)?)?;
    let (etx, erx) = std_mpsc::channel();
    let rules = opts.rules.clone();
    let m2 = metrics.clone();
    let engine = std::thread::Builder::new()
        .name("market-writer".into())
        .spawn(move || writer::writer(conn, rules, erx, m2))?;
    let shared = Arc::new(Shared {
        admission: admission::Admission::new(opts.limits.clone(), metrics.clone()),
        http: http::http1(&opts.limits),
        opts: opts.clone(),
        engine: etx.clone(),
        metrics,
        next_conn: AtomicU64::new(1),
        witness,
    });
    let result = accept_until(opts.listen, shared, ready, shutdown).await;
    // Let the writer finish its batch and commit before the process ends.
    let _ = etx.send(Cmd::Shutdown);
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    checkpoints.stop().await;
    result
}

/// Bind `listen` and hand each admitted connection to its own task until
/// `shutdown` completes.
async fn accept_until(
    listen: SocketAddr,
    shared: Arc<Shared>,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen { addr: listen, source })?;
    ready(listener.local_addr()?);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    shared.metrics.connections_accepted.inc();
                    match shared.admission.admit(peer.ip()) {
                        Ok(slot) => {
                            tokio::spawn(http::connection(stream, shared.clone(), slot));
                        }
                        // Closed at once: nothing of it is read.
                        Err(why) => shared.metrics.refused(why),
                    }
                }
                // Out of descriptors or similar: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            _ = &mut shutdown => break,
        }
    }
    Ok(())
}
