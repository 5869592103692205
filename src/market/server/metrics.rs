//! `GET /metrics`: counters kept by the connection tasks and the writer,
//! plus the order book's and ledger's gauges, which the writer reads from
//! the database once a second. Encoded by `prometheus-client` (OpenMetrics
//! text), every name prefixed `cmm_market_` and labelled with the replica
//! that serves it (`replica="..."`), so one scrape config covers all of a
//! market's replicas. The database's health and latency are the writer's
//! `db_up` and `db_batch_seconds`.
//!
//! It must not read the database itself: the writer hands it the gauges.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::ledger;
use crate::market::protocol::Reason;

/// One label, `name="value"`.
type Label = [(&'static str, &'static str); 1];

/// Why the coordinator refused a connection as it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `--max-connections` connections were open.
    Connections,
    /// `--max-unauth` connections had not authenticated yet.
    Unauthenticated,
    /// `--max-unauth-per-addr` connections from this address had not
    /// authenticated yet.
    PerAddress,
}

impl Refused {
    const ALL: [Refused; 3] = [Refused::Connections, Refused::Unauthenticated, Refused::PerAddress];
    fn as_str(self) -> &'static str {
        match self {
            Refused::Connections => "connections",
            Refused::Unauthenticated => "unauthenticated",
            Refused::PerAddress => "per_address",
        }
    }
}

/// Why the coordinator closed a connection it had accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No authenticated `hello` within `--auth-timeout-ms`.
    AuthTimeout,
    /// A plain HTTP connection outlived `--http-timeout-ms`.
    HttpTimeout,
    /// An HTTP request hyper or the coordinator refused (a malformed or
    /// oversized head, a WebSocket upgrade it does not speak).
    BadRequest,
    /// A frame over its cap, or more bytes before `hello` than its budget.
    Oversized,
    /// Too many bad frames before `hello`, or a failed login.
    BadLogin,
    /// Bytes that are not WebSocket frames.
    Malformed,
    /// The peer did not read: its send queue overflowed.
    SendQueueFull,
    /// The peer did not take a frame within `--send-timeout-ms`.
    SendTimeout,
}

impl Closed {
    const ALL: [Closed; 8] = [
        Closed::AuthTimeout,
        Closed::HttpTimeout,
        Closed::BadRequest,
        Closed::Oversized,
        Closed::BadLogin,
        Closed::Malformed,
        Closed::SendQueueFull,
        Closed::SendTimeout,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Closed::AuthTimeout => "auth_timeout",
            Closed::HttpTimeout => "http_timeout",
            Closed::BadRequest => "bad_request",
            Closed::Oversized => "oversized",
            Closed::BadLogin => "bad_login",
            Closed::Malformed => "malformed",
            Closed::SendQueueFull => "send_queue_full",
            Closed::SendTimeout => "send_timeout",
        }
    }
}

/// What the writer reads from the database for the gauges.
#[derive(Debug, Default, Clone)]
pub struct Book {
    pub offers_active: i64,
    pub tasks: Vec<(String, i64)>,
    pub totals: ledger::Totals,
}

/// The coordinator's metrics. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub sessions: Gauge,
    pub connections_accepted: Counter,
    pub frames: Counter,
    pub commits: Counter,
    pub ops_committed: Counter,
    /// Batches applied a second time, each step in its own savepoint,
    /// because a step of the first pass failed after writing.
    pub batches_replayed: Counter,
    /// Times this replica ran the order book's clock (on a replica set,
    /// the sum over replicas is one per tick).
    pub clock_ticks: Counter,
    /// 1 while the last batch reached the database, else 0.
    db_up: Gauge,
    /// Each batch's time in the database: begin, statements (and waits for
    /// rows other replicas hold), commit.
    db_batch: Histogram,
    rejects: Family<Label, Counter>,
    refused: Family<Label, Counter>,
    closed: Family<Label, Counter>,
    book: Arc<Mutex<Book>>,
}

/// Encodes the database gauges at scrape time.
#[derive(Debug)]
struct BookCollector(Arc<Mutex<Book>>);

impl Collector for BookCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let b = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        let count = |state: &str| b.tasks.iter().find(|(k, _)| k == state).map(|x| x.1).unwrap_or(0);
        let mut gauge = |name: &str, help: &str, v: i64| -> Result<(), std::fmt::Error> {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m)
        };
        gauge("offers_active", "Active offers.", b.offers_active)?;
        gauge("tasks_open", "Open tasks.", count("open"))?;
        gauge("ledger_issued", "RUV issued.", b.totals.issued)?;
        gauge("ledger_balances", "RUV in node balances.", b.totals.balances)?;
        gauge("ledger_escrow", "RUV locked in escrow.", b.totals.escrow)?;
        let mut m = enc.encode_descriptor("tasks", "Tasks by state.", None, MetricType::Gauge)?;
        for (state, n) in &b.tasks {
            let labels = [("state", state.as_str())];
            ConstGauge::new(*n).encode(m.encode_family(&labels)?)?;
        }
        let m = enc.encode_descriptor("settlements", "Settled tasks.", None, MetricType::Counter)?;
        ConstCounter::new(count("settled").max(0) as u64).encode(m)
    }
}

impl Metrics {
    /// The metrics of the replica called `replica`.
    pub fn new(replica: &str) -> Self {
        let (rejects, refused, closed) = (Family::default(), Family::default(), Family::default());
        // Every label value is shown from the start, at 0, so a scrape
        // never misses a series that has not happened yet.
        for r in Reason::ALL {
            let _ = rejects.get_or_create(&[("reason", r.as_str())]);
        }
        for r in Refused::ALL {
            let _ = refused.get_or_create(&[("why", r.as_str())]);
        }
        for c in Closed::ALL {
            let _ = closed.get_or_create(&[("why", c.as_str())]);
        }
        let m = Metrics {
            registry: Registry::with_prefix_and_labels(
                "cmm_market",
                [(
                    std::borrow::Cow::Borrowed("replica"),
                    std::borrow::Cow::Owned(replica.to_string()),
                )]
                .into_iter(),
            ),
            connections: Gauge::default(),
            sessions: Gauge::default(),
            connections_accepted: Counter::default(),
            frames: Counter::default(),
            commits: Counter::default(),
            ops_committed: Counter::default(),
            batches_replayed: Counter::default(),
            clock_ticks: Counter::default(),
            db_up: Gauge::default(),
            db_batch: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            rejects,
            refused,
            closed,
            book: Arc::default(),
        };
        let mut r = m.registry;
        r.register("connections", "Open TCP connections", m.connections.clone());
        r.register("sessions", "Authenticated sessions", m.sessions.clone());
        r.register(
            "connections_accepted",
            "Connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused on arrival, by the limit they were over",
            m.refused.clone(),
        );
        r.register(
            "connections_closed",
            "Connections the coordinator closed, by cause",
            m.closed.clone(),
        );
        r.register("frames", "Frames received from nodes", m.frames.clone());
        r.register("rejects", "Frames refused, by reason", m.rejects.clone());
        r.register("commits", "Durable transactions", m.commits.clone());
        r.register("ops_committed", "Operations committed", m.ops_committed.clone());
        r.register(
            "batches_replayed",
            "Writer batches applied again with a savepoint per request, after one failed having written",
            m.batches_replayed.clone(),
        );
        r.register(
            "clock_ticks",
            "Ticks of the order book's clock run by this replica",
            m.clock_ticks.clone(),
        );
        r.register("db_up", "1 while the market database answers, else 0", m.db_up.clone());
        r.register(
            "db_batch_seconds",
            "Time of each writer batch in the database, lock and commit included",
            m.db_batch.clone(),
        );
        r.register_collector(Box::new(BookCollector(m.book.clone())));
        m.db_up.set(1);
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    pub fn set_db_up(&self, up: bool) {
        self.db_up.set(up as i64);
    }

    pub fn db_up(&self) -> bool {
        self.db_up.get() == 1
    }

    pub fn observe_db(&self, d: std::time::Duration) {
        self.db_batch.observe(d.as_secs_f64());
    }

    pub fn reject(&self, r: Reason) {
        self.rejects.get_or_create(&[("reason", r.as_str())]).inc();
    }

    pub fn refused(&self, r: Refused) {
        self.refused.get_or_create(&[("why", r.as_str())]).inc();
    }

    pub fn closed(&self, c: Closed) {
        self.closed.get_or_create(&[("why", c.as_str())]).inc();
    }

    pub fn set_book(&self, b: Book) {
        if let Ok(mut g) = self.book.lock() {
            *g = b;
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// The `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
