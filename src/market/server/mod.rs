//! `market serve`: the coordinator, wired together.
//!
//! One TCP port serves WebSocket sessions for nodes and plain HTTP
//! `GET /healthz` and `GET /metrics`, both through hyper ([`http`]), each
//! connection admitted under the connection limits first ([`admission`]).
//! Connection tasks do everything that needs no state (limits, frame caps,
//! parsing, rate limits, authentication: [`session`]); every state change
//! goes to one writer thread that owns the store's connection
//! ([`writer`]), over the commands and send queues of [`wire`]. The order
//! book's rules are [`book`], the money [`ledger`], the store interface and
//! its two engines (SQLite, PostgreSQL) [`store`]. On PostgreSQL, any
//! number of these processes share one database as replicas of one market
//! ([`replica`]).
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
pub mod replica;
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

use tokio::net::TcpListener;

use metrics::Metrics;
use replica::Replica;
use shared::Shared;
use store::{DbError, DbSpec, Store};
use wire::Cmd;

pub use options::{default_options, Limits, ServeOptions};
pub use writer::now_ms;

/// Why the coordinator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The cause is in the message, not chained, so a report says it once.
    #[error("cannot open the market database `{db}`: {error}")]
    Db { db: DbSpec, error: DbError },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl crate::exit::HasExit for ServeError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            ServeError::Listen { .. } => crate::exit::Exit::Unavailable,
            ServeError::Db { error, .. } if error.is_unreachable() => crate::exit::Exit::Unavailable,
            _ => crate::exit::Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ServeError::Listen { .. } => Some("pick another address with `--listen 127.0.0.1:PORT`".into()),
            ServeError::Db {
                db: DbSpec::Postgres(_),
                ..
            } => Some(
                "check that PostgreSQL is running and that the URL's user, host, port and database are right \
                 (a password goes in `CMM_MARKET_DB`, not on the command line)"
                    .into(),
            ),
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
    fn start(checkpointer: rusqlite::Connection) -> std::io::Result<Checkpoints> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("market-checkpoint".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let _ = store::sqlite::checkpoint(&checkpointer);
                }
                let _ = store::sqlite::checkpoint(&checkpointer);
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
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: opts.listen,
            source,
        })?;
    if opts.replica.is_empty() {
        opts.replica = listener.local_addr()?.to_string();
    }
    let witness = anchor::Witness::load_or_create(&opts.witness_key)?;
    let (conn, replica, checkpoints) = open_store(&opts).await?;
    let metrics = Arc::new(Metrics::new(&opts.replica));
    let (etx, erx) = std_mpsc::channel();
    let relay = match (&opts.db, &replica) {
        (DbSpec::Postgres(url), Some(r)) => {
            let (tx, listening) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(replica::listen(url.clone(), r.id, etx.clone(), tx));
            // Listening before the port opens, so no relayed event waits
            // for the once-a-second look (it retries by itself if not).
            let _ = tokio::time::timeout(Duration::from_secs(5), listening).await;
            Some(task)
        }
        _ => None,
    };
    let rules = opts.rules.clone();
    let m2 = metrics.clone();
    let engine = std::thread::Builder::new()
        .name("market-writer".into())
        .spawn(move || writer::writer(conn, rules, replica, erx, m2))?;
    let shared = Arc::new(Shared {
        admission: admission::Admission::new(opts.limits.clone(), metrics.clone()),
        http: http::http1(&opts.limits),
        opts: opts.clone(),
        engine: etx.clone(),
        metrics,
        next_conn: AtomicU64::new(1),
        witness,
    });
    let result = accept_until(listener, shared, ready, shutdown).await;
    // Let the writer finish its batch and commit before the process ends.
    let _ = etx.send(Cmd::Shutdown);
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    if let Some(l) = relay {
        l.abort();
    }
    if let Some(c) = checkpoints {
        c.stop().await;
    }
    result
}

/// Open the store and migrate it. SQLite: the file, with every offer put
/// in its grace period (no node is connected yet) and a checkpointer
/// thread. PostgreSQL: a connection, and this process registered as a new
/// replica. The blocking PostgreSQL client runs its own runtime, so it is
/// opened off this one.
async fn open_store(opts: &ServeOptions) -> Result<(writer::Conn, Option<Replica>, Option<Checkpoints>), ServeError> {
    let db_err = |error| ServeError::Db {
        db: opts.db.clone(),
        error,
    };
    match &opts.db {
        DbSpec::Sqlite(path) => {
            let lite = |r: rusqlite::Result<rusqlite::Connection>| r.map_err(|e| db_err(e.into()));
            let conn = lite(store::sqlite::open(path, opts.sync_full))?;
            book::all_disconnected(store::Db::Sqlite(&conn), now_ms()).map_err(db_err)?;
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(|e| db_err(e.into()))?;
            let checkpoints = Checkpoints::start(lite(store::sqlite::open(path, opts.sync_full))?)?;
            let conn = writer::Conn {
                store: Store::Sqlite(conn),
                reconnect: None,
            };
            Ok((conn, None, Some(checkpoints)))
        }
        DbSpec::Postgres(url) => {
            let (url, name) = (url.clone(), opts.replica.clone());
            let opened = tokio::task::spawn_blocking(move || {
                let pg = store::postgres::PgConn::open(&url)?;
                let replica = Replica::register(store::Db::Postgres(&pg), &name, now_ms())?;
                Ok::<_, DbError>((pg, replica, url))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            let (pg, replica, url) = opened.map_err(db_err)?;
            tracing::info!("replica {} ({}) joined the market", replica.id, replica.name);
            let conn = writer::Conn {
                store: Store::Postgres(Box::new(pg)),
                reconnect: Some(url),
            };
            Ok((conn, Some(replica), None))
        }
    }
}

/// Hand each admitted connection on `listener` to its own task until
/// `shutdown` completes.
async fn accept_until(
    listener: TcpListener,
    shared: Arc<Shared>,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
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
