//! Load tool for the market coordinator (loopback only, bounded in time).
//!
//! `cargo bench --bench market_load [-- --conns N --secs S --workers W --sync full|normal --close-idle
//!  --db sqlite|postgres|postgres://URL --replicas R --compare]`
//!
//! Starts its own `market serve` on 127.0.0.1 with a fresh database, then:
//! 1. opens N authenticated idle sessions (default 10,000) and reads the
//!    server's resident memory from /proc/<pid>/status;
//! 2. with those sessions still open (closed first with `--close-idle`),
//!    runs W concurrent post -> accept -> deliver -> settle cycles for S
//!    seconds against durable commits and reports cycles/s and latency
//!    percentiles.
//!
//! The store: a SQLite file in a temp dir (the default, `--sync` applies to
//! it), or `--db postgres://USER@HOST:PORT/DB`, or `--db postgres` for a
//! throwaway PostgreSQL cluster with its durable defaults (the tests'
//! harness part, tests/common/postgres.rs). `--replicas R` runs R
//! coordinators on distinct ports and the same PostgreSQL database: the
//! idle sessions go to them in turn, and each cycle's requester talks to
//! one replica and its provider to the next, so every cycle crosses
//! replicas. Memory and CPU are the sums over the replicas.
//!
//! `--compare` runs, one after the other, 1 coordinator on SQLite, 1 on
//! PostgreSQL and 3 on one PostgreSQL database (each on a fresh database;
//! of the server `--db` names, else of a throwaway cluster), and prints a
//! table: cycles/s, latency p50/p99, and the coordinators' total resident
//! memory with the idle sessions open.
//!
//! `CMM_BENCH_SERVER=PATH` runs another build of the binary as the server
//! (to compare two builds on one machine).
//!
//! Each session is a socket on both ends, so the open-files limit is raised
//! to the hard limit here (the server raises its own).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use claude_max_market::crypto::keys::PublicIdentity;
use claude_max_market::market::client::{Client, Signer};
use claude_max_market::market::protocol::Request;
use ed25519_dalek::{Signer as _, SigningKey};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

#[path = "../tests/common/postgres.rs"]
mod postgres;

struct LoadSigner {
    key: SigningKey,
    public: PublicIdentity,
}

/// One real RSA-3072 public key shared by every synthetic node: the
/// coordinator validates it, and generating 10,000 of them would take hours.
/// Node ids still come from each node's own Ed25519 key.
fn shared_rsa_pem() -> &'static str {
    static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PEM.get_or_init(|| {
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 3072).expect("RSA key");
        key.to_public_key().to_public_key_pem(LineEnding::LF).expect("PEM")
    })
}

impl LoadSigner {
    fn new() -> LoadSigner {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let vk = key.verifying_key();
        let public = PublicIdentity {
            node_id: hex::encode(Sha256::digest(vk.as_bytes())),
            ed25519: base64::engine::general_purpose::STANDARD.encode(vk.as_bytes()),
            rsa_public_pem: shared_rsa_pem().to_string(),
            created: chrono::Utc::now().to_rfc3339(),
        };
        LoadSigner { key, public }
    }
}

impl Signer for LoadSigner {
    fn public(&self) -> PublicIdentity {
        self.public.clone()
    }
    fn sign(&self, msg: &[u8]) -> ed25519_dalek::Signature {
        self.key.sign(msg)
    }
}

fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_cur
    }
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds used so far by the whole process and by its writer thread.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let ticks = |path: String| -> f64 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let after = text.rsplit(')').next().unwrap_or_default();
        let f: Vec<&str> = after.split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(11) + t(12)) / 100.0
    };
    let total = ticks(format!("/proc/{pid}/stat"));
    let mut writer = 0.0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim() == "market-writer" {
                writer = ticks(e.path().join("stat").display().to_string());
            }
        }
    }
    (total, writer)
}

/// CPU seconds used by this load tool so far.
fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

fn metric(addr: &str, name: &str) -> i64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return -1;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    // Every series carries the replica's label: `name{replica="..."} v`.
    body.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with("{replica=\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

fn args() -> Vec<String> {
    std::env::args().collect()
}

fn arg(name: &str, default: &str) -> String {
    let args = args();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn flag(name: &str) -> bool {
    args().iter().any(|a| a == name)
}

fn number<T: std::str::FromStr>(name: &str, default: &str) -> Result<T, String> {
    let v = arg(name, default);
    v.parse().map_err(|_| format!("{name} {v}: expected a whole number"))
}

struct Opts {
    conns: usize,
    secs: u64,
    workers: usize,
    sync: String,
    close_idle: bool,
    server_bin: String,
}

/// Where the coordinators keep the market.
#[derive(Clone)]
enum Store {
    /// A fresh SQLite file in the run's temp dir.
    Sqlite,
    /// This PostgreSQL database.
    Postgres(String),
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Sqlite => "SQLite",
            Store::Postgres(_) => "PostgreSQL",
        }
    }
}

/// What one configuration measured.
struct Outcome {
    label: String,
    cycles_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    idle_rss_kib: u64,
}

/// One `market serve` process; killed and reaped on drop.
struct Replica {
    child: Child,
    endpoint: String,
    addr: String,
    /// The last lines it wrote on stderr (also copied to ours).
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Replica {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_text(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM, and wait for it to finish its writes and exit.
    fn stop(mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Start replica `n` on `--db store` with `extra` flags; waits for the
/// line naming its address. A coordinator that exits first (a store it
/// refuses, a database it cannot reach) fails the run with what it said.
fn start_replica(opts: &Opts, home: &Path, n: usize, db: &str, extra: &[&str]) -> Result<Replica, String> {
    std::fs::create_dir_all(home).map_err(|e| format!("cannot create {}: {e}", home.display()))?;
    let mut child = Command::new(&opts.server_bin)
        .env("CMM_HOME", home)
        .args([
            "market",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--initial-grant",
            "1000000",
        ])
        .args(extra)
        .arg("--db")
        .arg(db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {} market serve: {e}", opts.server_bin))?;
    let stderr = Arc::new(Mutex::new(VecDeque::new()));
    let err_pipe = child.stderr.take().expect("piped stderr");
    let keep = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
            eprintln!("[replica {n}] {line}");
            let mut k = keep.lock().unwrap_or_else(|e| e.into_inner());
            k.push_back(line);
            if k.len() > 40 {
                k.pop_front();
            }
        }
    });
    let out_pipe = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out_pipe).lines();
        let _ = tx.send(lines.next().and_then(Result::ok));
        // Keep reading, so that the coordinator never blocks on a full pipe.
        for _ in lines.map_while(Result::ok) {}
    });
    let mut r = Replica {
        child,
        endpoint: String::new(),
        addr: String::new(),
        stderr,
    };
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(line)) => line,
        Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let status = r.child.wait().map(|s| s.to_string()).unwrap_or_default();
            // Let the stderr thread take the last lines.
            let _ = (0..50).find(|_| {
                std::thread::sleep(Duration::from_millis(20));
                !r.stderr_text().is_empty()
            });
            return Err(format!(
                "market serve (replica {n}, --db {db}) exited ({status}) before listening:\n{}",
                r.stderr_text()
            ));
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!(
                "market serve (replica {n}, --db {db}) did not listen within 60 s:\n{}",
                r.stderr_text()
            ));
        }
    };
    let Some(at) = line.find("ws://") else {
        return Err(format!("market serve (replica {n}) printed `{line}`, not its address"));
    };
    r.endpoint = line[at..].split_whitespace().next().unwrap_or_default().to_string();
    r.addr = r.endpoint.trim_start_matches("ws://").to_string();
    Ok(r)
}

fn sum_status(replicas: &[Replica], field: &str) -> u64 {
    replicas.iter().map(|r| proc_status(r.pid(), field)).sum()
}

fn sum_metric(replicas: &[Replica], name: &str) -> i64 {
    replicas.iter().map(|r| metric(&r.addr, name)).sum()
}

fn sum_cpu(replicas: &[Replica]) -> (f64, f64) {
    replicas
        .iter()
        .map(|r| cpu_secs(r.pid()))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Run both phases against `replicas` coordinators on `store`.
fn run_config(opts: &Opts, store: &Store, replicas: usize, label: &str) -> Result<Outcome, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let sqlite = dir.path().join("market.db");
    let (db, extra): (String, Vec<&str>) = match store {
        Store::Sqlite => (
            sqlite.to_str().ok_or("the temp dir is not UTF-8")?.to_string(),
            vec!["--sync", &opts.sync],
        ),
        Store::Postgres(url) => (url.clone(), Vec::new()),
    };
    println!("== {label}: {replicas} coordinator(s) on {} ({db})", store.name());
    let mut servers = Vec::new();
    for n in 0..replicas {
        let home = dir.path().join(format!("replica-{n}"));
        servers.push(start_replica(opts, &home, n, &db, &extra)?);
    }
    for (n, r) in servers.iter().enumerate() {
        println!(
            "server {n} pid {} at {}{}; idle RSS {} KiB",
            r.pid(),
            r.endpoint,
            match store {
                Store::Sqlite => format!(" (sync={})", opts.sync),
                Store::Postgres(_) => String::new(),
            },
            proc_status(r.pid(), "VmRSS:")
        );
    }
    let endpoints: Vec<String> = servers.iter().map(|r| r.endpoint.clone()).collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let outcome = rt.block_on(async {
        // Phase 1: idle authenticated sessions, spread over the replicas.
        let t0 = Instant::now();
        let signers: Vec<Arc<LoadSigner>> = (0..opts.conns).map(|_| Arc::new(LoadSigner::new())).collect();
        let mut failures = 0;
        let mut first_failure = None;
        let mut clients = Vec::with_capacity(opts.conns);
        let mut stream = futures_util::stream::iter(signers.into_iter().enumerate().map(|(i, s)| {
            let ep = endpoints[i % endpoints.len()].clone();
            async move { Client::connect(&ep, s.as_ref()).await }
        }))
        .buffer_unordered(256);
        while let Some(r) = stream.next().await {
            match r {
                Ok(c) => clients.push(c),
                Err(e) => {
                    failures += 1;
                    first_failure.get_or_insert_with(|| e.to_string());
                }
            }
            if t0.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
        drop(stream);
        let took = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sessions = sum_metric(&servers, "cmm_market_sessions");
        let rss = sum_status(&servers, "VmRSS:");
        let hwm = sum_status(&servers, "VmHWM:");
        println!(
            "idle sessions: {} open ({} failed{}) in {:.1}s; server sessions metric {sessions}; server RSS {} MiB (peak {} MiB)",
            clients.len(),
            failures,
            first_failure.map(|e| format!(", first: {e}")).unwrap_or_default(),
            took.as_secs_f64(),
            rss / 1024,
            hwm / 1024
        );
        let idle = if opts.close_idle {
            for c in &clients {
                c.close();
            }
            drop(clients);
            tokio::time::sleep(Duration::from_secs(2)).await;
            Vec::new()
        } else {
            clients
        };
        println!("cycles run with {} idle sessions open", idle.len());

        // Phase 2: full cycles, each worker with its own requester, provider
        // and model; with several replicas the two talk to different ones.
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let ready = Arc::new(tokio::sync::Barrier::new(opts.workers + 1));
        for w in 0..opts.workers {
            let rep = endpoints[w % endpoints.len()].clone();
            let pep = endpoints[(w + 1) % endpoints.len()].clone();
            let stop = stop.clone();
            let ready = ready.clone();
            handles.push(tokio::spawn(async move {
                let setup = async {
                    let (rs, ps) = (LoadSigner::new(), LoadSigner::new());
                    let r = Client::connect(&rep, &rs)
                        .await
                        .map_err(|e| format!("a requester cannot connect to {rep}: {e}"))?;
                    let p = Client::connect(&pep, &ps)
                        .await
                        .map_err(|e| format!("a provider cannot connect to {pep}: {e}"))?;
                    let model = format!("model-{w}");
                    p.request(&Request::Offer { slots: 64, price: 1, models: vec![model.clone()], ttl_secs: 3600 })
                        .await
                        .map_err(|e| format!("an offer on {pep} failed: {e}"))?;
                    Ok::<_, String>((r, p, model))
                };
                let set = setup.await;
                // Every worker reaches the barrier, ready or not, so none waits forever.
                ready.wait().await;
                let (r, p, model) = set?;
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                let hash = hex::encode(Sha256::digest(b"payload"));
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let cycle = async {
                        let v = r
                            .request(&Request::Post {
                                model: model.clone(),
                                max_tokens: 100,
                                max_price: 2,
                                payload_hash: hash.clone(),
                                deadline_secs: 600,
                                max_attempts: None,
                                min_reputation: None,
                                payload_bytes: None, workspace_bytes: None, permission_mode: None, })
                            .await?;
                        let tid = v["task"]["task_id"].as_str().unwrap_or_default().to_string();
                        p.request(&Request::Accept { task_id: tid.clone(), attempt: 1 }).await?;
                        p.request(&Request::Deliver { task_id: tid.clone(), attempt: 1, data: "cmVzdWx0".into() })
                            .await?;
                        r.request(&Request::Settle { task_id: tid, attempt: 1 }).await
                    };
                    match cycle.await {
                        Ok(_) => lat.push(t.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                Ok::<_, String>((lat, errors, first_error))
            }));
        }
        ready.wait().await;
        let cpu0 = sum_cpu(&servers);
        let tool0 = self_cpu();
        let t1 = Instant::now();
        tokio::time::sleep(Duration::from_secs(opts.secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut errors = 0;
        let mut first_error = None;
        for h in handles {
            match h.await {
                Ok(Ok((l, e, first))) => {
                    all.extend(l);
                    errors += e;
                    if first_error.is_none() {
                        first_error = first;
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(format!("a cycle worker failed: {e}")),
            }
        }
        let elapsed = t1.elapsed().as_secs_f64();
        let cpu1 = sum_cpu(&servers);
        let tool = self_cpu() - tool0;
        if all.is_empty() {
            return Err(format!(
                "no cycle completed in {elapsed:.1}s ({errors} failed{})",
                first_error.map(|e| format!("; the first: {e}")).unwrap_or_default()
            ));
        }
        let n = all.len() as f64;
        println!(
            "CPU during cycles: server {:.0}% of one core (writer thread {:.0}%), load tool {:.0}%; \
             per cycle: server {:.2} ms (writer {:.2} ms), load tool {:.2} ms",
            (cpu1.0 - cpu0.0) / elapsed * 100.0,
            (cpu1.1 - cpu0.1) / elapsed * 100.0,
            tool / elapsed * 100.0,
            (cpu1.0 - cpu0.0) / n * 1000.0,
            (cpu1.1 - cpu0.1) / n * 1000.0,
            tool / n * 1000.0
        );
        all.sort();
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
        println!(
            "cycles: {} in {:.1}s = {:.0} cycles/s ({} errors{}) with {} concurrent; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
            all.len(),
            elapsed,
            all.len() as f64 / elapsed,
            errors,
            first_error.map(|e| format!(", the first: {e}")).unwrap_or_default(),
            opts.workers,
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(1.0)
        );
        println!(
            "server: commits {} ops {}; RSS {} MiB",
            sum_metric(&servers, "cmm_market_commits_total"),
            sum_metric(&servers, "cmm_market_ops_committed_total"),
            sum_status(&servers, "VmRSS:") / 1024
        );
        drop(idle);
        Ok(Outcome {
            label: label.to_string(),
            cycles_per_s: all.len() as f64 / elapsed,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            errors,
            idle_rss_kib: rss,
        })
    });
    drop(rt);
    for r in servers {
        r.stop();
    }
    let outcome = outcome?;
    let out = Command::new(env!("CARGO_BIN_EXE_claude-max-market"))
        .env("CMM_HOME", dir.path())
        .args(["market", "ledger", "--verify", "--db", &db])
        .output()
        .map_err(|e| format!("cannot run market ledger --verify: {e}"))?;
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() {
        return Err(format!(
            "the ledger of {db} does not verify ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(outcome)
}

/// Where PostgreSQL databases come from: the server `--db` names (whose
/// user may create databases), or a throwaway cluster started here.
enum PgSource {
    Url(String),
    Cluster(postgres::Cluster),
}

impl PgSource {
    fn start() -> Result<PgSource, String> {
        println!("starting a throwaway PostgreSQL cluster");
        let c = postgres::Cluster::start_with(postgres::DURABLE_SETTINGS)?;
        println!("PostgreSQL at {} (data in {})", c.url(), c.data_dir().display());
        Ok(PgSource::Cluster(c))
    }

    fn fresh_db(&self) -> Result<String, String> {
        match self {
            PgSource::Url(u) => postgres::create_db(u),
            PgSource::Cluster(c) => postgres::create_db(&c.url()),
        }
    }
}

fn is_pg_url(v: &str) -> bool {
    v.starts_with("postgres://") || v.starts_with("postgresql://")
}

fn run() -> Result<(), String> {
    let opts = Opts {
        conns: number("--conns", "10000")?,
        secs: number("--secs", "10")?,
        workers: number::<usize>("--workers", "48")?.max(1),
        sync: arg("--sync", "full"),
        close_idle: flag("--close-idle"),
        server_bin: std::env::var("CMM_BENCH_SERVER")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_claude-max-market").to_string()),
    };
    let replicas: usize = number("--replicas", "1")?;
    if replicas == 0 {
        return Err("--replicas 0: at least one coordinator is needed".into());
    }
    let db = arg("--db", "sqlite");
    if !(db == "sqlite" || db == "postgres" || is_pg_url(&db)) {
        return Err(format!(
            "--db {db}: say `sqlite` (a fresh file, the default), `postgres` (a throwaway cluster) \
             or a postgres://USER@HOST:PORT/DB URL"
        ));
    }
    let limit = raise_nofile();
    println!("open-files limit: {limit}");

    if flag("--compare") {
        let pg = if is_pg_url(&db) {
            PgSource::Url(db.clone())
        } else {
            PgSource::start()?
        };
        // One after the other: each has the machine to itself.
        let rows = vec![
            run_config(&opts, &Store::Sqlite, 1, "1 x SQLite")?,
            run_config(&opts, &Store::Postgres(pg.fresh_db()?), 1, "1 x PostgreSQL")?,
            run_config(&opts, &Store::Postgres(pg.fresh_db()?), 3, "3 x PostgreSQL")?,
        ];
        println!(
            "\n{} idle sessions, {} concurrent cycles for {} s{}:",
            opts.conns,
            opts.workers,
            opts.secs,
            if opts.close_idle {
                " (idle sessions closed first)"
            } else {
                ""
            }
        );
        println!(
            "{:<16} {:>10} {:>8} {:>8} {:>8} {:>26}",
            "coordinators", "cycles/s", "p50 ms", "p99 ms", "errors", "RSS with idle sessions MiB"
        );
        for r in &rows {
            println!(
                "{:<16} {:>10.0} {:>8.1} {:>8.1} {:>8} {:>26.1}",
                r.label,
                r.cycles_per_s,
                r.p50_ms,
                r.p99_ms,
                r.errors,
                r.idle_rss_kib as f64 / 1024.0
            );
        }
        return Ok(());
    }

    let (store, _cluster) = match db.as_str() {
        "sqlite" => (Store::Sqlite, None),
        "postgres" => {
            let pg = PgSource::start()?;
            (Store::Postgres(pg.fresh_db()?), Some(pg))
        }
        url => (Store::Postgres(url.to_string()), None),
    };
    if replicas > 1 && matches!(store, Store::Sqlite) {
        return Err(format!(
            "--replicas {replicas} needs a store the replicas share: add --db postgres (a throwaway cluster) \
             or --db postgres://..."
        ));
    }
    let label = format!("{replicas} x {}", store.name());
    run_config(&opts, &store, replicas, &label).map(drop)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
