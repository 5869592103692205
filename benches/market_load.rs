//! Load tool for the market coordinator (loopback only, bounded in time).
//!
//! `cargo bench --bench market_load [-- --conns N --secs S --workers W --sync full|normal --close-idle]`
//!
//! Starts its own `market serve` on 127.0.0.1 with a fresh database, then:
//! 1. opens N authenticated idle sessions (default 10,000) and reads the
//!    server's resident memory from /proc/<pid>/status;
//! 2. with those sessions still open (closed first with `--close-idle`),
//!    runs W concurrent post -> accept -> deliver -> settle cycles for S
//!    seconds against durable commits and reports cycles/s and latency
//!    percentiles.
//!
//! `CMM_BENCH_SERVER=PATH` runs another build of the binary as the server
//! (to compare two builds on one machine).
//!
//! Each session is a socket on both ends, so the open-files limit is raised
//! to the hard limit here (the server raises its own).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use claude_max_market::crypto::keys::PublicIdentity;
use claude_max_market::market::client::{Client, Signer};
use claude_max_market::market::protocol::Request;
use ed25519_dalek::{Signer as _, SigningKey};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

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

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
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
    let mut s = std::net::TcpStream::connect(addr).expect("metrics");
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

fn main() {
    let conns: usize = arg("--conns", "10000").parse().expect("--conns N");
    let secs: u64 = arg("--secs", "10").parse().expect("--secs S");
    let workers: usize = arg("--workers", "48").parse().expect("--workers W");
    let sync = arg("--sync", "full");
    let close_idle = std::env::args().any(|a| a == "--close-idle");
    let server_bin =
        std::env::var("CMM_BENCH_SERVER").unwrap_or_else(|_| env!("CARGO_BIN_EXE_claude-max-market").to_string());
    let limit = raise_nofile();
    println!("open-files limit: {limit}");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("market.db");
    let mut child = Command::new(&server_bin)
        .env("CMM_HOME", dir.path())
        .args([
            "market",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--initial-grant",
            "1000000",
            "--sync",
            &sync,
            "--db",
        ])
        .arg(&db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start market serve");
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let endpoint = line[line.find("ws://").expect("listening line")..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let addr = endpoint.trim_start_matches("ws://").to_string();
    println!(
        "server pid {pid} at {endpoint} (sync={sync}); idle RSS {} KiB",
        proc_status(pid, "VmRSS:")
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Phase 1: idle authenticated sessions.
        let t0 = Instant::now();
        let signers: Vec<Arc<LoadSigner>> = (0..conns).map(|_| Arc::new(LoadSigner::new())).collect();
        let ep = endpoint.clone();
        let mut failures = 0;
        let mut clients = Vec::with_capacity(conns);
        let mut stream = futures_util::stream::iter(signers.into_iter().map(|s| {
            let ep = ep.clone();
            async move { Client::connect(&ep, s.as_ref()).await }
        }))
        .buffer_unordered(256);
        while let Some(r) = stream.next().await {
            match r {
                Ok(c) => clients.push(c),
                Err(_) => failures += 1,
            }
            if t0.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
        drop(stream);
        let took = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sessions = metric(&addr, "cmm_market_sessions");
        let rss = proc_status(pid, "VmRSS:");
        let hwm = proc_status(pid, "VmHWM:");
        println!(
            "idle sessions: {} open ({} failed) in {:.1}s; server sessions metric {sessions}; server RSS {} MiB (peak {} MiB)",
            clients.len(),
            failures,
            took.as_secs_f64(),
            rss / 1024,
            hwm / 1024
        );
        let idle = if close_idle {
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

        // Phase 2: full cycles, each worker with its own requester, provider and model.
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let ready = Arc::new(tokio::sync::Barrier::new(workers + 1));
        for w in 0..workers {
            let ep = endpoint.clone();
            let stop = stop.clone();
            let ready = ready.clone();
            handles.push(tokio::spawn(async move {
                let (rs, ps) = (LoadSigner::new(), LoadSigner::new());
                let r = Client::connect(&ep, &rs).await.expect("requester connects");
                let p = Client::connect(&ep, &ps).await.expect("provider connects");
                let model = format!("model-{w}");
                p.request(&Request::Offer { slots: 64, price: 1, models: vec![model.clone()], ttl_secs: 3600 })
                    .await
                    .expect("offer");
                ready.wait().await;
                let mut lat = Vec::new();
                let mut errors = 0u64;
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
                                payload_bytes: None,
                            })
                            .await?;
                        let tid = v["task"]["task_id"].as_str().unwrap_or_default().to_string();
                        p.request(&Request::Accept { task_id: tid.clone(), attempt: 1 }).await?;
                        p.request(&Request::Deliver { task_id: tid.clone(), attempt: 1, data: "cmVzdWx0".into() })
                            .await?;
                        r.request(&Request::Settle { task_id: tid, attempt: 1 }).await
                    };
                    match cycle.await {
                        Ok(_) => lat.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            }));
        }
        ready.wait().await;
        let cpu0 = cpu_secs(pid);
        let tool0 = self_cpu();
        let t1 = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut errors = 0;
        for h in handles {
            let (l, e) = h.await.unwrap();
            all.extend(l);
            errors += e;
        }
        let elapsed = t1.elapsed().as_secs_f64();
        let cpu1 = cpu_secs(pid);
        let tool = self_cpu() - tool0;
        let n = all.len().max(1) as f64;
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
            "cycles: {} in {:.1}s = {:.0} cycles/s ({} errors) with {workers} concurrent; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
            all.len(),
            elapsed,
            all.len() as f64 / elapsed,
            errors,
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(1.0)
        );
        println!(
            "server: commits {} ops {}; RSS {} MiB",
            metric(&addr, "cmm_market_commits_total"),
            metric(&addr, "cmm_market_ops_committed_total"),
            proc_status(pid, "VmRSS:") / 1024
        );
        drop(idle);
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let out = Command::new(env!("CARGO_BIN_EXE_claude-max-market"))
        .args(["market", "ledger", "--verify", "--db"])
        .arg(&db)
        .output()
        .expect("verify");
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
}
