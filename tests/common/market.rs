//! The market part of the harness: a real `market serve` process on a free
//! loopback port with its own database, nodes with their own `CMM_HOME`
//! that talk to it through the library's client, and requests and waits
//! shared by the market tests.
//!
//! `CMM_TEST_SERVE_BIN=PATH` runs another build of the binary as the
//! coordinator (to check that a test fails on an older build).
//!
//! `CMM_TEST_MARKET_STORE=postgres` gives every coordinator a fresh
//! database of the shared PostgreSQL cluster ([`postgres::shared`]) instead
//! of its SQLite file; the default (`sqlite`) is the file `market.db` in
//! the coordinator's home.
//!
//! It links the library (its client and keys), which the rest of the
//! harness does not: only the tests that need it include it, with
//! `#[path = "common/market.rs"] mod market;` beside `mod common;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use claude_max_market::crypto::keys::Identity;
use claude_max_market::market::client::Client;
use claude_max_market::market::protocol::{Event, Reason, Request};
use claude_max_market::Paths;
use serde_json::Value;

use crate::common::{wait_some, wait_until, Cmm, Spawned, BIN};

/// The PostgreSQL part, reached as `market::postgres` by the market tests.
#[path = "postgres.rs"]
pub mod postgres;

/// Does `CMM_TEST_MARKET_STORE` ask for PostgreSQL? Any value other than
/// `postgres` or `sqlite` is a mistake worth stopping for.
pub fn store_is_postgres() -> bool {
    match std::env::var("CMM_TEST_MARKET_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Ok("") | Err(_) => false,
        Ok(other) => panic!("CMM_TEST_MARKET_STORE={other}: say `sqlite` (the default) or `postgres`"),
    }
}

/// A coordinator process. Killed (SIGKILL) and reaped on drop.
pub struct Server {
    pub home: Cmm,
    /// The SQLite file (in `home`); on PostgreSQL nothing is there.
    pub db: PathBuf,
    /// What `--db` names: `db`, or a PostgreSQL URL.
    pub store: String,
    pub addr: String,
    pub endpoint: String,
    args: Vec<String>,
    child: Option<Spawned>,
}

impl Server {
    /// A closed test market: unless `extra` says otherwise, every node is
    /// credited 1000 RUV on its first login (`--initial-grant 1000`, the
    /// operator's opt-in; the coordinator's default is no grant), so the
    /// tests can post without a `market grant` per node. A test that
    /// involves reputation or abandons also gets no cool-down unless it
    /// sets one (`--cooldown-ms 0`), so one provider can serve several tasks
    /// in a row after a lapse; the attempt rule still applies.
    pub fn start(extra: &[&str]) -> Server {
        let mut args: Vec<&str> = Vec::new();
        if !extra.contains(&"--initial-grant") {
            args.extend(["--initial-grant", "1000"]);
        }
        if !extra.contains(&"--cooldown-ms") {
            args.extend(["--cooldown-ms", "0"]);
        }
        args.extend(extra);
        Server::start_bare(&args)
    }

    /// A coordinator with exactly these flags (its own defaults otherwise).
    pub fn start_bare(extra: &[&str]) -> Server {
        let home = Cmm::new();
        let db = home.file("market.db");
        let store = if store_is_postgres() {
            if let Err(why) = postgres::bin_dir() {
                if std::env::var_os("CMM_TEST_POSTGRES_URL").is_none() {
                    panic!("CMM_TEST_MARKET_STORE=postgres, but {why}");
                }
            }
            postgres::shared().fresh_db()
        } else {
            db.to_str().expect("UTF-8 db path").to_string()
        };
        let mut s = Server {
            home,
            db,
            store,
            addr: "127.0.0.1:0".into(),
            endpoint: String::new(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        s.spawn();
        s
    }

    /// A replica on the store `store` (a PostgreSQL URL shared with other
    /// replicas), listening on `listen` (`127.0.0.x:0` picks a free port).
    /// The same defaults as [`Server::start`] unless `extra` sets them.
    pub fn start_store(store: &str, listen: &str, extra: &[&str]) -> Server {
        let mut args: Vec<String> = Vec::new();
        if !extra.contains(&"--initial-grant") {
            args.extend(["--initial-grant".into(), "1000".into()]);
        }
        if !extra.contains(&"--cooldown-ms") {
            args.extend(["--cooldown-ms".into(), "0".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let home = Cmm::new();
        let db = home.file("market.db");
        let mut s = Server {
            home,
            db,
            store: store.to_string(),
            addr: listen.to_string(),
            endpoint: String::new(),
            args,
            child: None,
        };
        s.spawn();
        s
    }

    /// (Re)start on the same address and database. A restart may find
    /// the old process's port not yet free: it tries again until it binds.
    pub fn spawn(&mut self) {
        let mut last = String::new();
        let started = wait_some(Duration::from_secs(20), || {
            let bin = std::env::var("CMM_TEST_SERVE_BIN").unwrap_or_else(|_| BIN.to_string());
            let mut args = vec!["market", "serve", "--listen", &self.addr, "--db", &self.store];
            args.extend(self.args.iter().map(String::as_str));
            let mut child = self.home.cmd_of(&bin, &args).spawn();
            // The first line names the address it listens on; no line means
            // it exited (the port is still taken).
            let line = child.stdout_line(Duration::from_secs(20), |_| true).unwrap_or_default();
            match line.find("ws://") {
                Some(i) => Some((
                    line[i..].split_whitespace().next().unwrap_or_default().to_string(),
                    child,
                )),
                None => {
                    child.kill9();
                    last = format!("{line}{}", child.stderr_text());
                    None
                }
            }
        });
        let (ep, child) = started.unwrap_or_else(|| panic!("market serve did not start: {last}"));
        self.addr = ep.trim_start_matches("ws://").to_string();
        self.endpoint = ep;
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Is the store a PostgreSQL database (`CMM_TEST_MARKET_STORE=postgres`)?
    pub fn on_postgres(&self) -> bool {
        self.store.starts_with("postgres://") || self.store.starts_with("postgresql://")
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let c = self.child.take().expect("running server");
        c.signal(libc::SIGTERM);
        c.wait().status
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.exited().is_none())
    }

    /// What the coordinator printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.child.as_ref().map(|c| c.stderr_text()).unwrap_or_default()
    }

    pub fn http_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).expect("connect for HTTP");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    }

    /// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Sockets the coordinator holds open (its descriptors that are sockets).
    pub fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.flatten()
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
                    .count()
            })
            .unwrap_or(0)
    }

    /// CPU seconds the coordinator has used so far.
    pub fn cpu_secs(&self) -> f64 {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = text.rsplit(')').next().unwrap_or_default();
        let f: Vec<&str> = after.split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (t(11) + t(12)) / hz
    }

    /// Wait up to `secs` for `pred` to hold.
    pub fn wait_for(&self, secs: u64, pred: impl Fn(&Server) -> bool) -> bool {
        wait_until(Duration::from_secs(secs), || pred(self))
    }

    /// Ask `/healthz` every 200 ms from a thread until the prober is
    /// stopped, keeping the slowest answer.
    pub fn probe_health(&self) -> HealthProbe {
        let addr = self.addr.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let (mut asked, mut failed) = (0, 0);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let ok = healthz(&addr, Duration::from_secs(5));
                asked += 1;
                if !ok {
                    failed += 1;
                }
                worst = worst.max(t.elapsed());
                // A sleep by design: the probe asks at a steady rate.
                std::thread::sleep(Duration::from_millis(200));
            }
            Health { worst, asked, failed }
        });
        HealthProbe {
            stop,
            thread: Some(thread),
        }
    }

    /// `/metrics` with the replica label taken off every series.
    pub fn metrics_text(&self) -> String {
        self.http_get("/metrics")
            .lines()
            .map(without_replica)
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn metric(&self, name: &str) -> i64 {
        let text = self.http_get("/metrics");
        metric_in(&text, name).unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// A metric, or `None` if `/metrics` did not answer with it (the
    /// coordinator may refuse the connection while it is at its limits).
    pub fn try_metric(&self, name: &str) -> Option<i64> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        metric_in(&text, name)
    }

    /// `market ledger --verify --json` of the store; asserts it verifies.
    #[track_caller]
    pub fn verify(&self) -> Value {
        verify_db(&self.store)
    }
}

fn metric_in(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .map(without_replica)
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next().map(str::to_string))
        .and_then(|v| v.parse().ok())
}

/// A metrics line without its `replica="..."` label (every series has
/// one), so tests name a series as on a single coordinator:
/// `x{replica="a",why="b"} 1` reads `x{why="b"} 1`, `x{replica="a"} 1`
/// reads `x 1`.
pub fn without_replica(line: &str) -> String {
    let Some(i) = line.find("replica=\"") else {
        return line.to_string();
    };
    let Some(j) = line[i + 9..].find('"') else {
        return line.to_string();
    };
    let rest = &line[i + 10 + j..];
    let rest = rest.strip_prefix(',').unwrap_or(rest);
    let head = &line[..i];
    let joined = format!("{head}{rest}");
    joined.replace(",}", "}").replace("{}", "")
}

/// One `GET /healthz`: true if it answered `{"ok":true}` within `wait`.
fn healthz(addr: &str, wait: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(wait));
    if write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"ok\":true")
}

/// What [`Server::probe_health`] saw.
#[derive(Debug)]
pub struct Health {
    pub worst: Duration,
    pub asked: u32,
    pub failed: u32,
}

pub struct HealthProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Health>>,
}

impl HealthProbe {
    pub fn stop(mut self) -> Health {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("health probe"))
            .expect("probe running")
    }
}

impl Drop for HealthProbe {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One honest post -> accept -> deliver -> settle cycle between two new
/// nodes; panics on any failure.
pub async fn full_cycle(s: &Server) {
    full_cycle_watched(s, |_| {}).await
}

/// [`full_cycle`], calling `after` with each step's name once it is
/// answered: "offer", "post", "accept", "deliver", "settle".
pub async fn full_cycle_watched(s: &Server, after: impl Fn(&str)) {
    let (r, p) = (Node::new(), Node::new());
    let rc = r.connect(s).await;
    let pc = p.connect(s).await;
    pc.request(&offer(5)).await.expect("offer");
    after("offer");
    let v = rc.request(&post(20)).await.expect("post");
    after("post");
    let tid = v["task"]["task_id"].as_str().expect("a task id").to_string();
    pc.request(&Request::Accept {
        task_id: tid.clone(),
        attempt: 1,
    })
    .await
    .expect("accept");
    after("accept");
    pc.request(&Request::Deliver {
        task_id: tid.clone(),
        attempt: 1,
        data: "cmVzdWx0".into(),
    })
    .await
    .expect("deliver");
    after("deliver");
    let v = rc
        .request(&Request::Settle {
            task_id: tid,
            attempt: 1,
        })
        .await
        .expect("settle");
    assert_eq!(v["state"], "settled");
    after("settle");
    rc.close();
    pc.close();
}

/// `market ledger --verify --json --db STORE` (a SQLite path or a
/// PostgreSQL URL); asserts it verifies.
#[track_caller]
pub fn verify_db(db: impl AsRef<Path>) -> Value {
    let t = Cmm::new();
    let db = db.as_ref().to_str().expect("UTF-8 store").to_string();
    let out = t.run(&["--json", "market", "ledger", "--verify", "--db", &db]);
    let v = out.json();
    assert_eq!(v["ok"], true, "ledger does not verify: {v:#}");
    out.code(0);
    v
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The node id of the node whose home is `home` (its keys are made on
/// first use).
pub fn node_id_of(home: &Cmm) -> String {
    let paths = Paths::in_one_dir(home.path().to_path_buf());
    Identity::load_or_generate(&paths)
        .expect("node identity")
        .node_id()
        .to_string()
}

/// A node with its own `CMM_HOME` and identity.
pub struct Node {
    pub home: Cmm,
    pub id: Identity,
}

impl Node {
    pub fn new() -> Node {
        let home = Cmm::new();
        let paths = Paths::in_one_dir(home.path().to_path_buf());
        let id = Identity::load_or_generate(&paths).expect("node identity");
        Node { home, id }
    }

    pub fn node_id(&self) -> String {
        self.id.node_id().to_string()
    }

    pub async fn connect(&self, s: &Server) -> Client {
        Client::connect(&s.endpoint, &self.id)
            .await
            .expect("connect and authenticate")
    }
}

pub fn hash(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

pub fn post(max_price: u64) -> Request {
    Request::Post {
        model: "sonnet".into(),
        max_tokens: 1000,
        max_price,
        payload_hash: hash("a prompt"),
        deadline_secs: 600,
        max_attempts: None,
        min_reputation: None,
        payload_bytes: None,
        workspace_bytes: None,
        permission_mode: None,
    }
}

pub fn offer(price: u64) -> Request {
    Request::Offer {
        slots: 4,
        price,
        models: vec!["sonnet".into()],
        ttl_secs: 3600,
    }
}

/// Wait for an event matching `pred`, failing after `secs`.
pub async fn expect_event(c: &mut Client, secs: u64, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_event(left).await {
            Some(ev) if pred(&ev) => return ev,
            Some(_) => continue,
            None => panic!("no {what} event within {secs}s"),
        }
    }
}

#[track_caller]
pub fn reason_of(r: Result<Value, claude_max_market::market::client::ClientError>) -> Reason {
    match r {
        Ok(v) => panic!("expected a rejection, got {v}"),
        Err(e) => e.reason().unwrap_or_else(|| panic!("expected a rejection, got {e}")),
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Standbys of one market: coordinators on the same store, one after another.
impl Server {
    /// A loopback address nothing listens on now: for a replica started
    /// later, or one that stays dead. Picked below the kernel's ephemeral
    /// range, so a coordinator another test starts on port 0 meanwhile
    /// cannot be handed the same port.
    pub fn free_addr() -> String {
        for _ in 0..1000 {
            let port = rand::random::<u16>() % 12_000 + 20_000;
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr().expect("its address").to_string();
            }
        }
        panic!("no free loopback port between 20000 and 32000");
    }

    /// Another coordinator on this one's store (its standby), listening on
    /// `addr`, with the same flags. On SQLite, start it once this one is
    /// gone: coordinators on one SQLite file do not run side by side.
    pub fn standby(&self, addr: &str) -> Server {
        let mut s = Server {
            home: Cmm::new(),
            db: self.db.clone(),
            store: self.store.clone(),
            addr: addr.to_string(),
            endpoint: String::new(),
            args: self.args.clone(),
            child: None,
        };
        s.spawn();
        s
    }
}
