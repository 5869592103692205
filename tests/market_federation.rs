//! A small federation on loopback: one coordinator, two providers and one
//! requester, each a separate process of our binary with its own
//! `CMM_HOME` and keys; the providers run the fake-`claude` test image on
//! the real Docker engine.

mod common;
#[path = "common/docker.rs"]
mod docker;
// The coordinator harness links the library: only market tests include it.
#[path = "common/market.rs"]
mod market;

use std::sync::Arc;
use std::time::{Duration, Instant};

use claude_max_market::crypto::keys::Identity;
use claude_max_market::market::client::Client;
use claude_max_market::market::protocol::{Reason, Request};
use claude_max_market::Paths;
use common::{docker_available, secs, wait_some, wait_until, Cmm, Spawned};
use docker::{containers_of_job, docker, market_image, started_jobs, TOKEN};
use market::{node_id_of, rt, Server};
use serde_json::Value;

/// `advertise --auto-accept` running the fake image.
struct Provider {
    home: Cmm,
    node_id: String,
    child: Spawned,
}

impl Provider {
    fn new(server: &Server, image: &str, setup: impl FnOnce(&Cmm)) -> Provider {
        Provider::with_slots(server, image, "1", setup)
    }

    fn with_slots(server: &Server, image: &str, slots: &str, setup: impl FnOnce(&Cmm)) -> Provider {
        // Serving other people's tasks needs an API key: a subscription
        // (OAuth) login serves only the user's own nodes.
        let home = Cmm::opted_in().env("ANTHROPIC_API_KEY", "sk-ant-api03-market-provider-not-a-secret");
        home.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
        home.run(&["config", "--set", "limits.maxTokensPerTask=40000"]).code(0);
        setup(&home);
        let node_id = node_id_of(&home);
        let child = home
            .cmd(&[
                "--json",
                "advertise",
                "--slots",
                slots,
                "--price",
                "5",
                "--auto-accept",
                "--image",
                image,
                "--endpoint",
                &server.endpoint,
            ])
            .spawn();
        let p = Provider { home, node_id, child };
        p.wait(20, "offer", |v| v["event"] == "offer");
        p
    }

    #[track_caller]
    fn wait(&self, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.child.expect_json(secs, what, pred)
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.child
            .json_lines()
            .into_iter()
            .filter(|v| v["event"] == name)
            .collect()
    }

    fn kill9(&mut self) {
        self.child.kill9();
    }

    /// Ctrl-C, and the exit code.
    fn interrupt(&mut self) -> i32 {
        self.child.signal(libc::SIGINT);
        self.child.wait_code()
    }

    fn stdout(&self) -> String {
        self.child.stdout_text()
    }

    fn stderr(&self) -> String {
        self.child.stderr_text()
    }
}

fn status(home: &Cmm, server: &Server) -> Value {
    let out = home.run(&["--json", "market", "status", "--endpoint", &server.endpoint]);
    out.code(0);
    out.json()["status"].clone()
}

#[track_caller]
fn audit_verifies(home: &Cmm) {
    home.run(&["audit", "verify"]).code(0);
}

fn bid<'a>(server: &'a Server, prompt: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--json",
        "bid",
        "--prompt",
        prompt,
        "--max-price",
        "20",
        "--max-tokens",
        "20000",
        "--wait",
        "--endpoint",
        &server.endpoint,
    ];
    args.extend_from_slice(extra);
    args
}

/// `bid --wait` in the background.
fn spawn_bid(requester: &Cmm, server: &Server, prompt: &str) -> Spawned {
    requester.cmd(&bid(server, prompt, &[])).spawn()
}

/// The task id from a `bid` progress line `posted t-...; N RUV locked ...`.
fn posted_task_id(bid: &Spawned) -> String {
    let posted = bid.expect_stderr(30, "posted", |l| l.starts_with("posted "));
    posted
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(';')
        .to_string()
}

fn canary(tag: &str) -> String {
    format!("cmmcanary{tag}{}", hex::encode(rand::random::<[u8; 6]>()))
}

/// Every byte under `dir`, searched for `needle`.
fn dir_contains(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for e in walk(dir) {
        if let Ok(bytes) = std::fs::read(&e) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(e.display().to_string());
            }
        }
    }
    hits
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn happy_path_settles_exactly_and_the_coordinator_never_sees_plaintext() {
    if !docker_available("happy_path_settles_exactly_and_the_coordinator_never_sees_plaintext") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let p2 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let secret = canary("prompt");
    let prompt = format!("scenario:echo {secret}");
    let out = requester.run(&bid(&server, &prompt, &[]));
    out.code(0);
    let v = out.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["status"], "completed");
    let result = v["result"]["result"].as_str().expect("result text");
    assert!(result.contains(&secret), "the job's result comes back: {result}");
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["settlement"]["paid"], 5);
    assert_eq!(v["settlement"]["refunded"], 15);
    for step in ["posted", "assigned to node", "running on node", "delivered", "settled"] {
        assert!(out.stderr.contains(step), "progress shows `{step}`:\n{}", out.stderr);
    }
    let (ran, idle) = if v["provider"] == p1.node_id.as_str() {
        (&p1, &p2)
    } else {
        (&p2, &p1)
    };
    assert_eq!(v["provider"], ran.node_id.as_str());
    ran.wait(10, "settled", |e| e["event"] == "settled");

    // Balances move exactly; escrow is empty; reputation counts the work.
    let rs = status(&requester, &server);
    assert_eq!(rs["balance"], 995, "requester pays the ask: {rs:#}");
    assert_eq!(rs["escrow"], 0);
    let ps = status(&ran.home, &server);
    assert_eq!(ps["balance"], 1005, "provider earns its ask");
    assert_eq!(ps["reputation"]["successes"], 1);
    assert_eq!(status(&idle.home, &server)["balance"], 1000);
    assert_eq!(rs["server"]["ledger"]["escrow"], 0);
    server.verify();

    // The job went through the pipeline on the provider, as a market job.
    let events = docker::audit_events(&ran.home);
    let started: Vec<_> = events.iter().filter(|e| e["event"] == "job.started").collect();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["source"], "market");
    assert!(events.iter().any(|e| e["event"] == "market.approved"));
    assert!(events.iter().any(|e| e["event"] == "market.delivered"));

    // Every node's log verifies.
    for h in [&requester, &p1.home, &p2.home] {
        audit_verifies(h);
    }
    // The coordinator (database, WAL, logs) and the providers' audit logs
    // never hold the prompt or the result.
    let result_marker = format!("echo:scenario:echo{secret}");
    assert!(result.contains(&result_marker));
    for needle in [&prompt, &secret, &result_marker] {
        let hits = dir_contains(server.home.path(), needle);
        assert!(hits.is_empty(), "coordinator files hold plaintext: {hits:?}");
        for p in [&p1, &p2] {
            assert!(!p.home.read("audit.jsonl").contains(needle.as_str()));
            assert!(!p.stderr().contains(needle.as_str()));
        }
        assert!(!requester.read("audit.jsonl").contains(needle.as_str()));
        // Nor any file of the provider that ran it (its job record keeps
        // hashes, not the requester's prompt or result).
        let hits = dir_contains(ran.home.path(), needle);
        assert!(hits.is_empty(), "provider files hold plaintext: {hits:?}");
    }
    assert!(!p1.stdout().contains(&secret));
}

#[test]
fn a_failing_job_is_reported_reoffered_and_refunded_after_the_last_attempt() {
    if !docker_available("a_failing_job_is_reported_reoffered_and_refunded_after_the_last_attempt") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let p2 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let out = requester.run(&bid(&server, "scenario:auth", &["--max-attempts", "2"]));
    out.code(1);
    assert!(out.stderr.contains("attempt 1"), "{}", out.stderr);
    assert!(
        out.stderr.contains("authentication_failed") || out.stderr.contains("could not log in"),
        "the signed failure report is shown:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("attempt 2"), "{}", out.stderr);
    assert!(out.stderr.contains("refunded 20 RUV"), "{}", out.stderr);
    let rs = status(&requester, &server);
    assert_eq!(rs["balance"], 1000, "refunded in full");
    assert_eq!(rs["escrow"], 0);
    let failures: i64 = [&p1, &p2]
        .iter()
        .map(|p| status(&p.home, &server)["reputation"]["failures"].as_i64().unwrap())
        .sum();
    assert_eq!(failures, 2, "each failed attempt counts against its provider");
    let mut reported = 0;
    for p in [&p1, &p2] {
        assert_eq!(status(&p.home, &server)["balance"], 1000);
        let events = docker::audit_events(&p.home);
        reported += events
            .iter()
            .filter(|e| e["event"] == "market.abandoned" && e["reason"] == "failed")
            .count();
        audit_verifies(&p.home);
    }
    assert_eq!(reported, 2, "each failure is reported, not dropped");
    let events = docker::audit_events(&requester);
    assert!(events.iter().any(|e| e["event"] == "market.refunded"));
    audit_verifies(&requester);
    server.verify();
}

#[test]
fn provider_killed_mid_job_lapses_and_the_other_completes_attempt_two() {
    if !docker_available("provider_killed_mid_job_lapses_and_the_other_completes_attempt_two") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "3000"]);
    let mut p1 = Provider::new(&server, &img, |_| {});
    let mut p2 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let secret = canary("kill");
    let prompt = format!("scenario:slowecho {secret}");
    let child = spawn_bid(&requester, &server, &prompt);
    child.expect_stderr(30, "running", |l| l.contains("running on node"));
    // Whichever provider runs it is killed once its job has started.
    let first = wait_some(secs(20), || {
        if p1.events("running").len() == 1 {
            Some(1)
        } else if p2.events("running").len() == 1 {
            Some(2)
        } else {
            None
        }
    })
    .expect("no provider started the job");
    let (killed, other) = if first == 1 { (&mut p1, &p2) } else { (&mut p2, &p1) };
    let container = wait_some(secs(60), || {
        let job = started_jobs(&killed.home).into_iter().next()?;
        containers_of_job(&job).into_iter().next()
    });
    assert!(
        container.is_some(),
        "the job never got its container:\n{}\n{}\n{:?}",
        killed.stdout(),
        killed.stderr(),
        docker::audit_events(&killed.home)
    );
    killed.kill9();
    // Its orphaned job container is ours to remove.
    for e in docker::audit_events(&killed.home) {
        if e["event"] == "job.started" {
            for c in containers_of_job(e["job_id"].as_str().unwrap()) {
                docker(&["rm", "-f", &c]);
            }
        }
    }
    let out = child.wait();
    let stdout = out.stdout;
    assert_eq!(out.status, 0, "{stdout}\n{}", out.stderr);
    let v: Value = serde_json::from_str(&stdout).expect("bid --json");
    assert_eq!(v["attempt"], 2, "attempt 2 delivered the result");
    assert_eq!(v["provider"], other.node_id.as_str());
    assert!(v["result"]["result"].as_str().unwrap().contains(&secret));

    // A late result from attempt 1 is refused by the fence.
    let task_id = v["task_id"].as_str().unwrap().to_string();
    let paths = Paths::in_one_dir(killed.home.path().to_path_buf());
    let id = Identity::load(&paths).expect("killed provider's keys");
    let reason = rt().block_on(async {
        let c = Client::connect(&server.endpoint, &id).await.expect("reconnect");
        c.request(&Request::Deliver {
            task_id,
            attempt: 1,
            data: "bGF0ZQ==".into(),
        })
        .await
        .unwrap_err()
        .reason()
    });
    assert_eq!(reason, Some(Reason::StaleAttempt));
    assert_eq!(status(&requester, &server)["balance"], 995);
    assert_eq!(status(&other.home, &server)["balance"], 1005);
    assert_eq!(status(&killed.home, &server)["reputation"]["failures"], 1);
    server.verify();
}

#[test]
fn an_offline_requester_fetches_the_result_later() {
    if !docker_available("an_offline_requester_fetches_the_result_later") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let _p1 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let secret = canary("offline");
    let prompt = format!("scenario:slowecho {secret}");
    let mut child = spawn_bid(&requester, &server, &prompt);
    let task_id = posted_task_id(&child);
    child.expect_stderr(30, "running", |l| l.contains("running on node"));
    child.kill9();
    assert!(
        pending_file(&requester, &task_id).exists(),
        "an interrupted `bid --wait` leaves its prompt for `market result`"
    );
    // The result arrives while the requester is away.
    let mut st = Value::Null;
    assert!(
        wait_until(secs(30), || {
            st = status(&requester, &server);
            st["tasks"][0]["state"] == "delivered"
        }),
        "never delivered: {st:#}\nprovider: {}\n{}",
        _p1.stdout(),
        _p1.stderr()
    );
    let out = requester.run(&["--json", "market", "result", &task_id, "--endpoint", &server.endpoint]);
    out.code(0);
    let v = out.json();
    assert!(v["result"]["result"].as_str().unwrap().contains(&secret));
    assert_eq!(v["settlement"]["paid"], 5);
    let rs = status(&requester, &server);
    assert_eq!(rs["balance"], 995);
    assert_eq!(rs["escrow"], 0);
    assert!(!pending_file(&requester, &task_id).exists(), "deleted once settled");
    // Once settled the coordinator holds no result any more.
    let again = requester.run(&["--json", "market", "result", &task_id, "--endpoint", &server.endpoint]);
    assert_ne!(again.status, 0);
    audit_verifies(&requester);
    server.verify();
}

#[test]
fn a_provider_at_its_cap_declines_and_one_that_opted_out_gets_nothing() {
    if !docker_available("a_provider_at_its_cap_declines_and_one_that_opted_out_gets_nothing") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let capped = Provider::new(&server, &img, |h| {
        h.run(&["config", "--set", "limits.dailyTasks=0"]).code(0);
    });
    let mut gone = Provider::new(&server, &img, |_| {});
    // Opting out also stops every job container of ours on the engine; the
    // tests beside this one run theirs on the same engine, so this opt-out
    // is kept away from it (consent is what this test is about).
    gone.home
        .cmd(&["opt-out", "--yes"])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .run()
        .code(0);
    let code = wait_some(secs(10), || gone.child.exited()).expect("advertise did not stop on opt-out");
    assert_eq!(code, 3, "opt-out stops advertising (exit 3)");
    let requester = Cmm::new();
    let out = requester.run(&bid(&server, "scenario:echo capped", &["--deadline", "3"]));
    out.code(1);
    assert!(out.stderr.contains("refunded"), "{}", out.stderr);
    let offered = capped.wait(10, "declined offer", |e| e["event"] == "task_offered");
    assert_eq!(offered["accept"], false);
    assert!(offered["declined"].as_str().unwrap().contains("daily"), "{offered:#}");
    let events = docker::audit_events(&capped.home);
    assert!(events.iter().any(|e| e["event"] == "market.declined"));
    assert!(!events.iter().any(|e| e["event"] == "job.started"));
    assert!(
        gone.events("task_offered").is_empty(),
        "an opted-out node is told nothing"
    );
    assert_eq!(status(&requester, &server)["balance"], 1000);
    drop(capped);
    let _ = TOKEN;
}

#[test]
fn a_provider_reserves_its_cap_when_it_takes_an_offer_so_two_offers_cannot_both_pass() {
    if !docker_available("a_provider_reserves_its_cap_when_it_takes_an_offer_so_two_offers_cannot_both_pass") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    // Room for one task today, and a job that takes a while: the second
    // offer arrives while the first task is held.
    let p = Provider::with_slots(&server, &img, "2", |h| {
        h.run(&["config", "--set", "limits.dailyTasks=1"]).code(0);
        h.run(&["config", "--set", "limits.concurrentJobs=2"]).code(0);
    });
    let (a, b) = (Cmm::new(), Cmm::new());
    let (out_a, out_b) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| a.run(&bid(&server, "scenario:slowecho first", &["--deadline", "8"])));
        let tb = sc.spawn(|| b.run(&bid(&server, "scenario:slowecho second", &["--deadline", "8"])));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let mut codes = [out_a.status, out_b.status];
    codes.sort();
    assert_eq!(
        codes,
        [0, 1],
        "one runs, the other is refunded:\n{}\n{}",
        out_a.stderr,
        out_b.stderr
    );
    let offered = p.events("task_offered");
    let taken: Vec<&Value> = offered.iter().filter(|e| e["accept"] == true).collect();
    let declined: Vec<&Value> = offered.iter().filter(|e| e["accept"] == false).collect();
    assert_eq!(taken.len(), 1, "{offered:#?}");
    assert!(!declined.is_empty(), "{offered:#?}");
    assert!(
        declined
            .iter()
            .all(|e| e["declined"].as_str().unwrap_or_default().contains("daily")),
        "declined at the cap: {declined:#?}"
    );
    // No attempt failed for want of room: the reservation held from the offer.
    assert!(p.events("abandoned").is_empty(), "{:#?}", p.events("abandoned"));
    let events = docker::audit_events(&p.home);
    assert_eq!(events.iter().filter(|e| e["event"] == "job.started").count(), 1);
    let usage = p.home.run(&["--json", "status"]).code(0).json();
    assert_eq!(
        usage["usage"]["reservations"],
        serde_json::json!([]),
        "nothing left reserved: {usage:#}"
    );
    assert_eq!(usage["usage"]["windows"][0]["tasks"], 1, "{usage:#}");
    audit_verifies(&p.home);
}

/// Which frames a [`TamperProxy`] alters.
#[derive(Clone, Copy, PartialEq)]
enum Tamper {
    /// The requester's `payload` request (client to coordinator, masked).
    Payload,
    /// The `delivered` event to the requester (coordinator to client).
    Result,
}

/// A TCP proxy in front of the coordinator for one node: passes the
/// WebSocket handshake through, then re-frames every frame, flipping one
/// byte of the sealed envelope inside the chosen frames (same length, so
/// only the cryptography can notice).
struct TamperProxy {
    endpoint: String,
    flipped: Arc<std::sync::atomic::AtomicUsize>,
}

impl TamperProxy {
    fn start(upstream: &str, what: Tamper) -> TamperProxy {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("ws://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("ws://").to_string();
        let flipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let f2 = flipped.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(down) = conn else { return };
                let Ok(up) = TcpStream::connect(&upstream) else { return };
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (fa, fb) = (f2.clone(), f2.clone());
                std::thread::spawn(move || pump(down, up, what == Tamper::Payload, "\"type\":\"payload\"", fa));
                std::thread::spawn(move || pump(u2, d2, what == Tamper::Result, "\"type\":\"delivered\"", fb));
            }
        });
        TamperProxy { endpoint, flipped }
    }

    fn flipped(&self) -> usize {
        self.flipped.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    tamper: bool,
    marker: &'static str,
    flipped: Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    // The HTTP upgrade head, byte by byte up to the blank line.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if from.read_exact(&mut b).is_err() {
            return;
        }
        head.push(b[0]);
    }
    if to.write_all(&head).is_err() {
        return;
    }
    loop {
        let mut h = [0u8; 2];
        if from.read_exact(&mut h).is_err() {
            let _ = to.shutdown(std::net::Shutdown::Both);
            return;
        }
        let mut header = h.to_vec();
        let masked = h[1] & 0x80 != 0;
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut x = [0u8; 2];
            from.read_exact(&mut x).unwrap();
            header.extend_from_slice(&x);
            len = u16::from_be_bytes(x) as u64;
        } else if len == 127 {
            let mut x = [0u8; 8];
            from.read_exact(&mut x).unwrap();
            header.extend_from_slice(&x);
            len = u64::from_be_bytes(x);
        }
        let mut mask = [0u8; 4];
        if masked {
            from.read_exact(&mut mask).unwrap();
            header.extend_from_slice(&mask);
        }
        let mut body = vec![0u8; len as usize];
        if from.read_exact(&mut body).is_err() {
            return;
        }
        if masked {
            for (i, x) in body.iter_mut().enumerate() {
                *x ^= mask[i % 4];
            }
        }
        if tamper && h[0] & 0x0f == 1 {
            if let Some(t) = flip_envelope(&body, marker) {
                body = t;
                flipped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        if masked {
            for (i, x) in body.iter_mut().enumerate() {
                *x ^= mask[i % 4];
            }
        }
        if to.write_all(&header).is_err() || to.write_all(&body).is_err() {
            return;
        }
    }
}

/// In a frame holding `marker`, flip one byte in the middle of the sealed
/// envelope inside `data` (base64 of JSON holding base64), keeping lengths.
fn flip_envelope(frame: &[u8], marker: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = std::str::from_utf8(frame).ok()?;
    if !text.contains(marker) {
        return None;
    }
    let start = text.find("\"data\":\"")? + 8;
    let end = start + text[start..].find('"')?;
    let wire: Value = serde_json::from_slice(&b64.decode(&text[start..end]).ok()?).ok()?;
    let mut env = b64.decode(wire["envelope"].as_str()?).ok()?;
    let mid = env.len() / 2;
    env[mid] ^= 0x01;
    let old_env = wire["envelope"].as_str()?.to_string();
    let new_env = b64.encode(&env);
    let inner = String::from_utf8(b64.decode(&text[start..end]).ok()?).ok()?;
    let inner = inner.replace(&old_env, &new_env);
    let outer = b64.encode(inner.as_bytes());
    assert_eq!(outer.len(), end - start, "same length");
    Some(format!("{}{}{}", &text[..start], outer, &text[end..]).into_bytes())
}

#[test]
fn a_payload_altered_in_transit_is_refused_before_decryption_and_nothing_settles() {
    if !docker_available("a_payload_altered_in_transit_is_refused_before_decryption_and_nothing_settles") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let proxy = TamperProxy::start(&server.endpoint, Tamper::Payload);
    let requester = Cmm::new();
    let secret = canary("tamperp");
    let prompt = format!("scenario:echo {secret}");
    let mut args = bid(&server, &prompt, &["--max-attempts", "1"]);
    let at = args.iter().position(|a| *a == server.endpoint).unwrap();
    args[at] = &proxy.endpoint;
    let out = requester.run(&args);
    out.code(1);
    assert!(proxy.flipped() >= 1, "the proxy altered the payload");
    assert!(out.stderr.contains("refunded 20 RUV"), "{}", out.stderr);
    assert!(!out.stdout.contains(&secret));
    let events = docker::audit_events(&p1.home);
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "market.payload_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{events:#?}");
    assert!(
        refused[0]["error"].as_str().unwrap().contains("signature"),
        "refused by signature: {}",
        refused[0]
    );
    assert!(!events.iter().any(|e| e["event"] == "job.started"), "nothing ran");
    assert_eq!(status(&requester, &server)["balance"], 1000, "nothing settled");
    assert_eq!(status(&p1.home, &server)["balance"], 1000);
    server.verify();
}

#[test]
fn a_result_altered_in_transit_is_rejected_never_printed_and_nothing_settles() {
    if !docker_available("a_result_altered_in_transit_is_rejected_never_printed_and_nothing_settles") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let proxy = TamperProxy::start(&server.endpoint, Tamper::Result);
    let requester = Cmm::new();
    let secret = canary("tamperr");
    let prompt = format!("scenario:echo {secret}");
    // One attempt: a rejected result is refunded at once (with attempts
    // left the task would be offered again).
    let mut args = bid(&server, &prompt, &["--max-attempts", "1"]);
    let at = args.iter().position(|a| *a == server.endpoint).unwrap();
    args[at] = &proxy.endpoint;
    let out = requester.run(&args);
    out.code(5);
    assert_eq!(proxy.flipped(), 1, "the proxy altered the result");
    assert!(out.stdout.contains("signature"), "refused by signature: {}", out.stdout);
    assert!(
        !out.stdout.contains(&secret) && !out.stderr.contains(&secret),
        "never printed"
    );
    let events = docker::audit_events(&requester);
    assert!(events.iter().any(|e| e["event"] == "market.result_rejected"));
    assert!(!events.iter().any(|e| e["event"] == "market.settled"));
    let rs = status(&requester, &server);
    assert_eq!(rs["balance"], 1000, "nothing paid: {rs:#}");
    assert_eq!(rs["escrow"], 0);
    assert_eq!(status(&p1.home, &server)["balance"], 1000);
    server.verify();
}

#[test]
fn ctrl_c_gives_the_lease_back_and_the_task_is_reoffered_at_once() {
    if !docker_available("ctrl_c_gives_the_lease_back_and_the_task_is_reoffered_at_once") {
        return;
    }
    let img = market_image();
    // A lease long enough that only a clean give-back explains a quick re-offer.
    let server = Server::start(&["--lease-ms", "30000"]);
    let mut p1 = Provider::new(&server, &img, |_| {});
    let mut p2 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let secret = canary("ctrlc");
    let prompt = format!("scenario:slowecho {secret}");
    let started = Instant::now();
    let child = spawn_bid(&requester, &server, &prompt);
    child.expect_stderr(30, "running", |l| l.contains("running on node"));
    let first = wait_some(secs(20), || {
        if !p1.events("running").is_empty() {
            Some(1)
        } else if !p2.events("running").is_empty() {
            Some(2)
        } else {
            None
        }
    })
    .expect("no provider started the job");
    let (stopped, other) = if first == 1 { (&mut p1, &p2) } else { (&mut p2, &p1) };
    assert_eq!(stopped.interrupt(), 0, "Ctrl-C is a clean stop: {}", stopped.stderr());
    // (The reader thread may still be draining the pipe.)
    let gave_back = stopped.wait(5, "abandoned", |e| e["event"] == "abandoned");
    assert_eq!(gave_back["reason"], "withdrawn", "the lease is given back");
    stopped.wait(5, "withdrawn", |e| e["event"] == "withdrawn");
    assert_eq!(stopped.events("abandoned").len(), 1);
    let out = child.wait();
    let v: Value = serde_json::from_str(&out.stdout).expect("bid --json");
    assert_eq!(out.status, 0);
    assert_eq!(v["attempt"], 2);
    assert_eq!(v["provider"], other.node_id.as_str());
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "re-offered at once, not after the 30 s lease: {:?}",
        started.elapsed()
    );
    // No container of the stopped job is left behind; its log verifies.
    for e in docker::audit_events(&stopped.home) {
        if e["event"] == "job.started" {
            assert!(containers_of_job(e["job_id"].as_str().unwrap()).is_empty());
        }
    }
    audit_verifies(&stopped.home);
    // Giving a lease back is counted against the provider, whatever the
    // reason: otherwise a node could take and drop every attempt for free.
    assert_eq!(status(&stopped.home, &server)["reputation"]["failures"], 1);
    server.verify();
}

#[test]
fn a_delivered_result_nobody_settles_is_settled_after_the_ttl() {
    use claude_max_market::market::protocol::Event;
    use market::{expect_event, offer, post, Node};
    let server = Server::start(&["--settle-ttl-ms", "1000"]);
    let (req, prov) = (Node::new(), Node::new());
    rt().block_on(async {
        let r = req.connect(&server).await;
        let mut p = prov.connect(&server).await;
        p.request(&offer(5)).await.unwrap();
        let t = r.request(&post(20)).await.unwrap();
        let task_id = t["task"]["task_id"].as_str().unwrap().to_string();
        p.request(&Request::Accept {
            task_id: task_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
        p.request(&Request::Deliver {
            task_id: task_id.clone(),
            attempt: 1,
            data: "c2VhbGVk".into(),
        })
        .await
        .unwrap();
        // Held for the requester until then: only the requester may read it.
        let held = r
            .request(&Request::Result {
                task_id: task_id.clone(),
            })
            .await
            .unwrap();
        assert_eq!(held["data"], "c2VhbGVk");
        assert_eq!(held["provider"], prov.node_id().as_str());
        let other = p
            .request(&Request::Result {
                task_id: task_id.clone(),
            })
            .await;
        assert_eq!(market::reason_of(other), Reason::NotOwner);
        let ev = expect_event(&mut p, 10, "settled", |e| matches!(e, Event::Settled { .. })).await;
        assert!(matches!(
            ev,
            Event::Settled {
                paid: 5,
                refunded: 15,
                ..
            }
        ));
        // Settled: the stored bytes are gone.
        let gone = r.request(&Request::Result { task_id }).await;
        assert_eq!(market::reason_of(gone), Reason::WrongState);
        let st = r.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["balance"], 995);
        assert_eq!(st["escrow"], 0);
    });
    server.verify();
}

#[test]
fn a_provider_that_failed_an_attempt_is_not_given_the_next_attempt_of_the_same_task() {
    if !docker_available("a_provider_that_failed_an_attempt_is_not_given_the_next_attempt_of_the_same_task") {
        return;
    }
    // A task's attempts do not all go to one node: after p1 fails attempt 1,
    // attempt 2 waits for another provider, and with none the task is
    // refunded at its deadline.
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let out = requester.run(&bid(
        &server,
        "scenario:auth",
        &["--max-attempts", "2", "--deadline", "10"],
    ));
    out.code(1);
    assert!(out.stderr.contains("refunded"), "{}", out.stderr);
    let failed: Vec<Value> = docker::audit_events(&p1.home)
        .into_iter()
        .filter(|e| e["event"] == "market.abandoned")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0]["reason"], "failed");
    assert_eq!(status(&p1.home, &server)["reputation"]["failures"], 1);
    assert_eq!(status(&requester, &server)["balance"], 1000);
    server.verify();
}

/// `bid` without `--wait`: post, print the task id, keep the prompt.
fn post_only<'a>(server: &'a Server, prompt: &'a str) -> Vec<&'a str> {
    let mut args = bid(server, prompt, &[]);
    args.retain(|a| *a != "--wait");
    args
}

fn pending_file(home: &Cmm, task_id: &str) -> std::path::PathBuf {
    home.path().join("market/pending").join(format!("{task_id}.cmme"))
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_task_posted_without_waiting_is_sent_and_collected_by_market_result() {
    if !docker_available("a_task_posted_without_waiting_is_sent_and_collected_by_market_result") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let secret = canary("nowait");
    let prompt = format!("scenario:echo {secret}");
    let out = requester.run(&post_only(&server, &prompt));
    out.code(0);
    let v = out.json();
    let task_id = v["task_id"].as_str().expect("task id").to_string();
    assert_eq!(v["pending"], true, "{v:#}");
    // The prompt is kept for `market result`, private and never in plaintext.
    let kept = pending_file(&requester, &task_id);
    assert_eq!(mode(&kept), 0o600);
    assert_eq!(mode(kept.parent().unwrap()), 0o700);
    let bytes = std::fs::read(&kept).unwrap();
    for needle in [&prompt, &secret] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the kept prompt is encrypted"
        );
    }
    // The provider, offered the task while the post was in flight, does not
    // keep it once the requester has gone, since no payload could reach it:
    // either its accept comes too late (`requester_offline`) or the lease it
    // won is recalled (`lease_lapsed`) without using up an attempt.
    let gone = p1.wait(20, "let go of the task", |e| {
        (e["event"] == "accept_refused" && e["reason"] == "requester_offline")
            || (e["event"] == "lease_lapsed" && e["task_id"] == task_id.as_str())
    });
    let attempt = if gone["event"] == "lease_lapsed" { 2 } else { 1 };
    // A sleep by design: nothing may happen in this window.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        p1.events("task_offered").len(),
        1,
        "not offered again while the requester is away"
    );
    let out = requester.run(&["--json", "market", "result", &task_id, "--endpoint", &server.endpoint]);
    out.code(0);
    let v = out.json();
    assert_eq!(v["status"], "completed");
    let result = v["result"]["result"].as_str().expect("result text");
    assert!(result.contains(&secret), "the job's result comes back: {result}");
    assert_eq!(v["attempt"], attempt);
    assert_eq!(v["provider"], p1.node_id.as_str());
    assert_eq!(v["settlement"]["paid"], 5);
    assert_eq!(v["settlement"]["refunded"], 15);
    for step in ["assigned to node", "running on node", "delivered", "settled"] {
        assert!(out.stderr.contains(step), "progress shows `{step}`:\n{}", out.stderr);
    }
    p1.wait(10, "settled", |e| e["event"] == "settled");
    let rs = status(&requester, &server);
    assert_eq!(rs["balance"], 995, "requester pays the ask: {rs:#}");
    assert_eq!(rs["escrow"], 0);
    assert_eq!(status(&p1.home, &server)["balance"], 1005, "provider earns its ask");
    assert!(!kept.exists(), "the kept prompt is deleted once settled");
    assert!(!requester.read("audit.jsonl").contains(&secret));
    let events = docker::audit_events(&requester);
    assert!(events.iter().any(|e| e["event"] == "market.settled"));
    audit_verifies(&requester);
    server.verify();
}

#[test]
fn market_result_no_wait_on_an_undelivered_task_exits_1_with_a_hint() {
    // No provider: the task stays open.
    let server = Server::start(&[]);
    let requester = Cmm::new();
    let out = requester.run(&post_only(&server, "scenario:echo later"));
    out.code(0);
    let task_id = out.json()["task_id"].as_str().unwrap().to_string();
    let human = requester.run(&[
        "market",
        "result",
        &task_id,
        "--no-wait",
        "--endpoint",
        &server.endpoint,
    ]);
    human.code(1);
    human.stderr_has(&format!("task {task_id} is open"));
    human.stderr_has("no provider holds it yet");
    human.stderr_has(&format!("market result {task_id}` without `--no-wait`"));
    assert!(human.stdout.is_empty(), "no result: {}", human.stdout);
    let json = requester.run(&[
        "--json",
        "market",
        "result",
        &task_id,
        "--no-wait",
        "--endpoint",
        &server.endpoint,
    ]);
    json.code(1);
    let v = json.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["state"], "open");
    assert_eq!(v["task"]["attempt"], 1);
    assert_eq!(v["pending"], true);
    assert_eq!(v["payload_sent"], false);
    assert!(pending_file(&requester, &task_id).exists(), "still kept");

    // A kept prompt that is not the one posted is never sent (exit 5).
    let paths = Paths::in_one_dir(requester.path().to_path_buf());
    let id = Identity::load(&paths).unwrap();
    claude_max_market::market::pending::store(&paths, &id, &task_id, b"scenario:echo swapped").unwrap();
    let swapped = requester.run(&["market", "result", &task_id, "--endpoint", &server.endpoint]);
    swapped.code(5);
    swapped.stderr_has("not to the");

    // Without a kept prompt there is nothing to send from here.
    std::fs::remove_file(pending_file(&requester, &task_id)).unwrap();
    let none = requester.run(&["market", "result", &task_id, "--endpoint", &server.endpoint]);
    none.code(1);
    none.stderr_has("its prompt is not kept on this node");

    // A hostile task id never reaches the file system.
    requester
        .run(&["market", "result", "../../x", "--endpoint", &server.endpoint])
        .code(2);
    server.verify();
}

#[test]
fn only_the_requester_looks_up_a_task() {
    use market::{post, Node};
    let server = Server::start(&[]);
    let (req, other) = (Node::new(), Node::new());
    rt().block_on(async {
        let r = req.connect(&server).await;
        let o = other.connect(&server).await;
        let t = r.request(&post(20)).await.unwrap();
        let task_id = t["task"]["task_id"].as_str().unwrap().to_string();
        let v = r
            .request(&Request::Task {
                task_id: task_id.clone(),
            })
            .await
            .unwrap();
        assert_eq!(v["state"], "open");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["payload_hash"], market::hash("a prompt"));
        assert!(v["provider"].is_null());
        assert!(v["deadline"].is_string());
        let theirs = o.request(&Request::Task { task_id }).await;
        assert_eq!(market::reason_of(theirs), Reason::NotOwner);
        let unknown = r
            .request(&Request::Task {
                task_id: "t-000000000000000000000000".into(),
            })
            .await;
        assert_eq!(market::reason_of(unknown), Reason::NotFound);
    });
    server.verify();
}

#[test]
fn an_interrupted_bid_wait_is_resumed_by_market_result() {
    if !docker_available("an_interrupted_bid_wait_is_resumed_by_market_result") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let requester = Cmm::new();
    let secret = canary("resume");
    let prompt = format!("scenario:echo {secret}");
    // Posted, then killed before any provider is there.
    let mut child = spawn_bid(&requester, &server, &prompt);
    let task_id = posted_task_id(&child);
    child.kill9();
    assert!(pending_file(&requester, &task_id).exists());
    // `market result` picks the open task up and follows it: a provider
    // that comes online takes it, gets the payload, and delivers.
    let child = requester
        .cmd(&[
            "--json",
            "market",
            "result",
            &task_id,
            "--timeout",
            "60",
            "--endpoint",
            &server.endpoint,
        ])
        .spawn();
    let p1 = Provider::new(&server, &img, |_| {});
    let out = child.wait();
    let stderr = out.stderr;
    assert_eq!(out.status, 0, "{stderr}");
    let v: Value = serde_json::from_str(&out.stdout).expect("market result --json");
    assert!(v["result"]["result"].as_str().unwrap().contains(&secret));
    assert_eq!(v["provider"], p1.node_id.as_str());
    assert_eq!(v["settlement"]["paid"], 5);
    for step in ["assigned to node", "running on node", "delivered"] {
        assert!(stderr.contains(step), "progress shows `{step}`:\n{stderr}");
    }
    assert!(!pending_file(&requester, &task_id).exists());
    assert_eq!(status(&requester, &server)["balance"], 995);
    audit_verifies(&requester);
    server.verify();
}

// ---------------------------------------------------------------------------
// Tasks that carry a workspace and come back as changes the requester checks.

/// A small project with a canary file whose content must never reach the
/// coordinator.
fn project(canary: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("README.md"), "the project\n").unwrap();
    std::fs::write(d.path().join("canary.txt"), format!("{canary}\n")).unwrap();
    std::fs::create_dir(d.path().join("src")).unwrap();
    std::fs::write(d.path().join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    d
}

/// `bid --wait --workspace DIR` for the fake's `scenario:answer` (two turns).
fn workspace_bid<'a>(server: &'a Server, dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--json",
        "bid",
        "--prompt",
        "scenario:answer",
        "--max-price",
        "20",
        "--max-tokens",
        "30000",
        "--wait",
        "--endpoint",
        &server.endpoint,
        "--workspace",
        dir,
    ];
    args.extend_from_slice(extra);
    args
}

/// A requester whose runner image (for its acceptance commands) is `img`.
fn requester_using(img: &str) -> Cmm {
    let requester = Cmm::new();
    requester
        .run(&["config", "--set", &format!("docker.image={img}")])
        .code(0);
    requester
}

/// `bid --workspace DIR --accept-cmd CMD` without `--wait`: the task id.
fn post_without_waiting(requester: &Cmm, server: &Server, dir: &str, cmd: &str) -> String {
    let mut args = workspace_bid(server, dir, &["--accept-cmd", cmd]);
    args.retain(|a| *a != "--wait");
    let out = requester.run(&args);
    out.code(0);
    out.json()["task_id"].as_str().expect("task id").to_string()
}

/// `market result TASK --apply --json`.
fn collect_applied(requester: &Cmm, server: &Server, task_id: &str) -> common::Output {
    requester.run(&[
        "--json",
        "market",
        "result",
        task_id,
        "--apply",
        "--endpoint",
        &server.endpoint,
    ])
}

/// A node's balance and escrow at the coordinator, exactly.
#[track_caller]
fn balance_is(home: &Cmm, server: &Server, balance: i64, escrow: i64) {
    let rs = status(home, server);
    assert_eq!(
        (rs["balance"].as_i64(), rs["escrow"].as_i64()),
        (Some(balance), Some(escrow)),
        "{rs:#}"
    );
}

/// Nothing was paid or tested: no settlement or acceptance in the
/// requester's log, its balance whole and no escrow left.
#[track_caller]
fn nothing_paid(requester: &Cmm, server: &Server) {
    let events = docker::audit_events(requester);
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "market.settled" || e["event"] == "market.acceptance"),
        "{events:#?}"
    );
    balance_is(requester, server, 1000, 0);
}

/// The fake image with `FAKE_ANSWER=wrong`: its jobs write the wrong answer.
fn wrong_answer_image(base: &str) -> String {
    use std::io::Write;
    let tag = format!("{base}-wrong");
    let mut child = std::process::Command::new("docker")
        .args(["build", "-q", "-t", &tag, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker build");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("FROM {base}\nENV FAKE_ANSWER=wrong\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "build {tag}");
    tag
}

#[test]
fn a_workspace_task_comes_back_as_changes_that_pass_the_acceptance_command_then_settle_and_apply() {
    if !docker_available(
        "a_workspace_task_comes_back_as_changes_that_pass_the_acceptance_command_then_settle_and_apply",
    ) {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let secret = canary("workspace");
    let dir = project(&secret);
    let ws = dir.path().to_str().unwrap();
    let out = requester.run(&workspace_bid(
        &server,
        ws,
        &[
            "--accept-cmd",
            "grep -qx right answer.txt && test -f canary.txt",
            "--accept-image",
            &img,
            "--apply",
        ],
    ));
    out.code(0);
    let v = out.json();
    assert_eq!(v["settlement"]["paid"], 5, "{v:#}");
    let w = &v["workspace"];
    assert_eq!(w["acceptance"]["passed"], true, "{v:#}");
    assert_eq!(w["acceptance"]["exit_code"], 0);
    let mut changed: Vec<(String, String)> = w["changes"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["change"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    changed.sort();
    assert_eq!(
        changed,
        vec![
            ("README.md".into(), "modified".into()),
            ("answer.txt".into(), "added".into())
        ],
        "{v:#}"
    );
    assert_eq!(w["files_in"], 3);
    // Applied to DIR, which had not changed since the bid.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("answer.txt")).unwrap(),
        "right\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("README.md")).unwrap(),
        "the project\nanswered by the job\n"
    );
    let patch = std::fs::read_to_string(w["patch"].as_str().expect("patch saved")).unwrap();
    assert!(patch.contains("+right"), "{patch}");
    // The remote job's progress reached the requester as it happened.
    assert!(out.stderr.contains("tokens so far"), "{}", out.stderr);
    assert!(out.stderr.contains("2 files changed"), "{}", out.stderr);
    assert!(out.stderr.contains("grep -qx right"), "{}", out.stderr);
    p1.wait(10, "settled", |e| e["event"] == "settled");
    balance_is(&requester, &server, 995, 0);
    assert_eq!(status(&p1.home, &server)["balance"], 1005);
    server.verify();
    // The provider's job ran on the workspace in the mode the task asked for.
    let events = docker::audit_events(&p1.home);
    let started: Vec<_> = events.iter().filter(|e| e["event"] == "job.started").collect();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["permission_mode"], "acceptEdits");
    assert_eq!(started[0]["workspace_files"], 3);
    let ended: Vec<_> = events.iter().filter(|e| e["event"] == "job.completed").collect();
    assert_eq!(ended[0]["files_changed"], 2, "{:#}", ended[0]);
    // The requester's records say what came in and what was checked.
    let events = docker::audit_events(&requester);
    let settled: Vec<_> = events.iter().filter(|e| e["event"] == "market.settled").collect();
    assert_eq!(settled[0]["files_changed"], 2, "{:#}", settled[0]);
    assert_eq!(settled[0]["acceptance"]["passed"], true);
    assert!(events.iter().any(|e| e["event"] == "market.acceptance"));
    for h in [&requester, &p1.home] {
        audit_verifies(h);
    }
    // The coordinator's database, WAL and logs never hold a workspace file's content.
    let hits = dir_contains(server.home.path(), &secret);
    assert!(hits.is_empty(), "coordinator files hold workspace content: {hits:?}");
    assert!(!server.stderr().contains(&secret));
    assert!(!requester.read("audit.jsonl").contains(&secret));
}

#[test]
fn a_failed_acceptance_rejects_attempt_one_and_the_next_provider_is_paid() {
    if !docker_available("a_failed_acceptance_rejects_attempt_one_and_the_next_provider_is_paid") {
        return;
    }
    let img = market_image();
    let wrong = wrong_answer_image(&img);
    let server = Server::start(&["--lease-ms", "10000"]);
    // Only the wrong provider is there for attempt 1.
    let bad = Provider::new(&server, &wrong, |_| {});
    let requester = requester_using(&img);
    let dir = project(&canary("reject"));
    let ws = dir.path().to_str().unwrap().to_string();
    let child = requester
        .cmd(&workspace_bid(
            &server,
            &ws,
            &["--accept-cmd", "cat answer.txt; grep -qx right answer.txt"],
        ))
        .spawn();
    bad.wait(60, "rejected", |e| e["event"] == "rejected");
    let good = Provider::new(&server, &img, |_| {});
    let out = child.wait();
    out.code(0);
    let v = out.json();
    assert_eq!(v["attempt"], 2, "{v:#}");
    assert_eq!(v["provider"], good.node_id.as_str());
    assert_eq!(v["workspace"]["acceptance"]["passed"], true);
    let stderr = &out.stderr;
    assert!(
        stderr.contains("attempt 1 on node") && stderr.contains("rejected"),
        "{stderr}"
    );
    good.wait(10, "settled", |e| e["event"] == "settled");
    // Exact balances: the first provider is not paid, the second is.
    balance_is(&requester, &server, 995, 0);
    let bs = status(&bad.home, &server);
    assert_eq!(bs["balance"], 1000);
    assert_eq!(bs["reputation"]["failures"], 1, "{bs:#}");
    let gs = status(&good.home, &server);
    assert_eq!(gs["balance"], 1005);
    assert_eq!(gs["reputation"]["successes"], 1);
    // The requester's standing counts one rejection and one settlement.
    let me = node_id_of(&requester);
    let standing = claude_max_market_reputation(&server, &me);
    assert_eq!(
        (standing["settled"].as_i64(), standing["rejected"].as_i64()),
        (Some(1), Some(1)),
        "{standing:#}"
    );
    assert!((standing["score"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    // The reason: exit code and last lines, in full in both nodes' logs,
    // verified as the requester's on the provider's side.
    let got: Vec<_> = docker::audit_events(&bad.home)
        .into_iter()
        .filter(|e| e["event"] == "market.rejection_received")
        .collect();
    assert_eq!(got.len(), 1, "{got:#?}");
    let reason = got[0]["reason"].as_str().unwrap();
    assert!(reason.contains("exited 1") && reason.contains("wrong"), "{reason}");
    assert_eq!(got[0]["verified"], true);
    let sent: Vec<_> = docker::audit_events(&requester)
        .into_iter()
        .filter(|e| e["event"] == "market.rejected")
        .collect();
    assert_eq!(sent[0]["reason"].as_str(), Some(reason));
    assert_eq!(sent[0]["reason_sha256"], got[0]["reason_sha256"]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("answer.txt")).ok(),
        None,
        "no --apply"
    );
    for h in [&requester, &bad.home, &good.home] {
        audit_verifies(h);
    }
    server.verify();
}

/// A node's standing as a requester, as the coordinator reports it.
fn claude_max_market_reputation(server: &Server, node: &str) -> Value {
    rt().block_on(async {
        let asker = market::Node::new();
        let c = asker.connect(server).await;
        let v = c
            .request(&Request::Reputation {
                node_id: node.to_string(),
            })
            .await
            .unwrap();
        v["as_requester"].clone()
    })
}

#[test]
fn a_provider_declines_a_workspace_too_big_or_a_mode_it_does_not_allow_before_any_download() {
    if !docker_available("a_provider_declines_a_workspace_too_big_or_a_mode_it_does_not_allow_before_any_download") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p = Provider::new(&server, &img, |h| {
        h.run(&["config", "--set", "market.maxWorkspaceBytes=6m"]).code(0);
    });
    let requester = Cmm::new();
    let big = project("big");
    let blob: Vec<u8> = (0..7 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(big.path().join("data.bin"), blob).unwrap();
    let out = requester.run(&workspace_bid(
        &server,
        big.path().to_str().unwrap(),
        &["--deadline", "3"],
    ));
    out.code(1);
    let small = project("small");
    let out = requester.run(&workspace_bid(
        &server,
        small.path().to_str().unwrap(),
        &["--deadline", "3", "--permission-mode", "bypassPermissions"],
    ));
    out.code(1);
    // A floor on the requester's standing (a new requester stands at 0.5).
    p.home
        .run(&["config", "--set", "market.minRequesterReputation=0.6"])
        .code(0);
    let out = requester.run(&workspace_bid(
        &server,
        small.path().to_str().unwrap(),
        &["--deadline", "3"],
    ));
    out.code(1);
    let events = docker::audit_events(&p.home);
    let declined: Vec<_> = events.iter().filter(|e| e["event"] == "market.declined").collect();
    assert_eq!(declined.len(), 3, "{declined:#?}");
    assert!(
        declined[0]["reason"]
            .as_str()
            .unwrap()
            .contains("market.maxWorkspaceBytes"),
        "{:#}",
        declined[0]
    );
    assert!(
        declined[1]["reason"].as_str().unwrap().contains("bypassPermissions"),
        "{:#}",
        declined[1]
    );
    let floor = declined[2]["reason"].as_str().unwrap();
    assert!(floor.contains("market.minRequesterReputation"), "{floor}");
    // Declined before the accept: no lease, so no payload was ever sent.
    assert!(!events.iter().any(|e| e["event"] == "market.accept"), "{events:#?}");
    assert!(p.events("payload_unexpected").is_empty());
    balance_is(&requester, &server, 1000, 0);
    server.verify();
}

#[test]
fn a_workspace_result_altered_in_transit_is_refused_before_it_is_applied_or_tested() {
    if !docker_available("a_workspace_result_altered_in_transit_is_refused_before_it_is_applied_or_tested") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let _p = Provider::new(&server, &img, |_| {});
    let proxy = TamperProxy::start(&server.endpoint, Tamper::Result);
    let requester = Cmm::new();
    let dir = project(&canary("tamperw"));
    let ws = dir.path().to_str().unwrap();
    let marker = dir
        .path()
        .join("..")
        .join(format!("tested-{}", hex::encode(rand::random::<[u8; 4]>())));
    let cmd = format!("touch {}", marker.display());
    let mut args = workspace_bid(
        &server,
        ws,
        &[
            "--max-attempts",
            "1",
            "--accept-cmd",
            &cmd,
            "--accept-image",
            &img,
            "--apply",
        ],
    );
    let at = args.iter().position(|a| *a == server.endpoint).unwrap();
    args[at] = &proxy.endpoint;
    let out = requester.run(&args);
    out.code(5);
    assert_eq!(proxy.flipped(), 1, "the proxy altered the result");
    assert!(out.stdout.contains("signature"), "{}", out.stdout);
    assert!(!out.stderr.contains("rebuilding"), "never tested: {}", out.stderr);
    assert!(!dir.path().join("answer.txt").exists(), "nothing applied");
    nothing_paid(&requester, &server);
    server.verify();
}

#[test]
fn a_workspace_task_posted_without_waiting_is_checked_and_applied_by_market_result() {
    if !docker_available("a_workspace_task_posted_without_waiting_is_checked_and_applied_by_market_result") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let requester = requester_using(&img);
    let dir = project(&canary("later"));
    let ws = dir.path().to_str().unwrap();
    let task_id = post_without_waiting(&requester, &server, ws, "grep -qx right answer.txt");
    // The acceptance command and DIR come from this node's own `market.bid`.
    let out = collect_applied(&requester, &server, &task_id);
    assert_eq!(
        out.status,
        0,
        "{}\n{}\n--- the provider's events\n{}",
        out.stdout,
        out.stderr,
        p1.stdout()
    );
    let v = out.json();
    assert_eq!(v["workspace"]["acceptance"]["passed"], true, "{v:#}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("answer.txt")).unwrap(),
        "right\n"
    );
    p1.wait(10, "settled", |e| e["event"] == "settled");
    balance_is(&requester, &server, 995, 0);
    audit_verifies(&requester);
    server.verify();
}

#[test]
fn a_workspace_result_signed_by_another_node_is_refused_before_it_is_rebuilt_tested_or_applied() {
    use claude_max_market::market::protocol::{Event, IdentityProof};
    use claude_max_market::market::sealed::{self, Binding};
    let server = Server::start(&[]);
    let requester = Cmm::new();
    let dir = project(&canary("forged"));
    let ws = dir.path().to_str().unwrap().to_string();
    let marker = tempfile::tempdir().unwrap();
    let cmd = format!("touch {}/tested", marker.path().display());
    let bid = requester
        .cmd(&workspace_bid(
            &server,
            &ws,
            &["--max-attempts", "1", "--accept-cmd", &cmd, "--apply"],
        ))
        .spawn();
    let requester_id = node_id_of(&requester);
    rt().block_on(async {
        let (provider, forger) = (market::Node::new(), market::Node::new());
        let mut c = provider.connect(&server).await;
        c.request(&market::offer(5)).await.unwrap();
        let ev = market::expect_event(&mut c, 30, "offer", |e| matches!(e, Event::TaskOffered { .. })).await;
        let Event::TaskOffered { task } = ev else {
            unreachable!()
        };
        assert!(task.workspace_bytes.is_some(), "{task:?}");
        let lease = c
            .request(&Request::Accept {
                task_id: task.task_id.clone(),
                attempt: 1,
            })
            .await
            .unwrap();
        market::expect_event(&mut c, 30, "payload", |e| matches!(e, Event::Payload { .. })).await;
        let proof: IdentityProof = serde_json::from_value(
            c.request(&Request::Identity {
                node_id: requester_id.clone(),
            })
            .await
            .unwrap(),
        )
        .unwrap();
        let binding = Binding {
            task_id: task.task_id.clone(),
            attempt: 1,
            payload_hash: lease["payload_hash"].as_str().unwrap().to_string(),
        };
        // A well-formed result with changes, sealed by a node that does not
        // hold the lease.
        let body = serde_json::json!({ "status": "completed", "result": "forged",
            "workspace": { "delta": "Q01NREVMVEE=" } });
        let data = sealed::seal_result(
            &forger.id,
            &proof.identity,
            &binding,
            "completed",
            body.to_string().as_bytes(),
        )
        .unwrap();
        c.request(&Request::Deliver {
            task_id: task.task_id.clone(),
            attempt: 1,
            data,
        })
        .await
        .unwrap();
    });
    let out = bid.wait();
    out.code(5);
    assert!(out.stdout.contains("signature"), "{}", out.stdout);
    assert!(
        !out.stderr.contains("rebuilding"),
        "never rebuilt or tested: {}",
        out.stderr
    );
    assert!(
        !marker.path().join("tested").exists(),
        "the acceptance command never ran"
    );
    assert!(!dir.path().join("answer.txt").exists());
    nothing_paid(&requester, &server);
    server.verify();
}

#[test]
fn a_workspace_result_this_node_cannot_test_is_neither_paid_nor_rejected() {
    if !docker_available("a_workspace_result_this_node_cannot_test_is_neither_paid_nor_rejected") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let requester = Cmm::new();
    let dir = project(&canary("untested"));
    let ws = dir.path().to_str().unwrap();
    let out = requester.run(&workspace_bid(
        &server,
        ws,
        &["--accept-cmd", "true", "--accept-image", "cmm-no-such-image:missing"],
    ));
    out.code(1);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("neither paid nor rejected"), "{all}");
    assert!(all.contains("cmm-no-such-image:missing"), "the image is named: {all}");
    assert!(all.contains("market result"), "says what to do: {all}");
    // The provider did its work: no failure counts against it, and the
    // result stays held, its escrow locked.
    let ps = status(&p1.home, &server);
    assert_eq!(ps["reputation"]["failures"], 0, "{ps:#}");
    let rs = status(&requester, &server);
    assert_eq!(
        (rs["balance"].as_i64(), rs["escrow"].as_i64()),
        (Some(980), Some(20)),
        "{rs:#}"
    );
    let tasks = rs["tasks"].as_array().unwrap();
    assert!(tasks.iter().any(|t| t["state"] == "delivered"), "{rs:#}");
    assert!(p1.events("rejected").is_empty());
    server.verify();
}

#[test]
fn a_workspace_that_changed_since_the_bid_keeps_the_paid_patch_and_exits_3() {
    if !docker_available("a_workspace_that_changed_since_the_bid_keeps_the_paid_patch_and_exits_3") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let p1 = Provider::new(&server, &img, |_| {});
    let requester = requester_using(&img);
    let dir = project(&canary("changed"));
    let ws = dir.path().to_str().unwrap();
    let task_id = post_without_waiting(&requester, &server, ws, "grep -qx right answer.txt");
    // DIR changes after the bid: the result is checked against what was
    // sent (kept with the task), paid for, and not applied.
    std::fs::write(dir.path().join("README.md"), "edited meanwhile\n").unwrap();
    let out = collect_applied(&requester, &server, &task_id);
    out.code(3);
    let v = out.json();
    assert_eq!(v["workspace"]["acceptance"]["passed"], true, "{v:#}");
    let why = v["workspace"]["apply_error"].as_str().expect("why nothing was applied");
    let patch = v["workspace"]["patch"].as_str().expect("the patch is kept");
    assert!(why.contains(patch), "{why}");
    assert!(std::fs::read_to_string(patch).unwrap().contains("+right"));
    assert!(!dir.path().join("answer.txt").exists(), "nothing applied");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("README.md")).unwrap(),
        "edited meanwhile\n"
    );
    p1.wait(10, "settled", |e| e["event"] == "settled");
    balance_is(&requester, &server, 995, 0);
    server.verify();
}

#[test]
fn the_approval_prompt_shows_the_workspace_the_permission_mode_and_the_requesters_standing() {
    if !docker_available("the_approval_prompt_shows_the_workspace_the_permission_mode_and_the_requesters_standing") {
        return;
    }
    let img = market_image();
    let server = Server::start(&["--lease-ms", "10000"]);
    let requester = requester_using(&img);
    let dir = project(&canary("prompt"));
    let ws = dir.path().to_str().unwrap().to_string();
    let bid = requester
        .cmd(&workspace_bid(
            &server,
            &ws,
            &["--accept-cmd", "grep -qx right answer.txt"],
        ))
        .spawn();
    bid.expect_stderr(30, "posted", |l| l.starts_with("posted "));
    // A provider with no standing rule, on a terminal: it is asked, and says yes.
    let prov = Cmm::opted_in().env("ANTHROPIC_API_KEY", "sk-ant-api03-market-provider-not-a-secret");
    prov.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    prov.run(&["config", "--set", "limits.maxTokensPerTask=40000"]).code(0);
    let shown = prov.on_terminal(
        &["[y/N]=y"],
        &[
            "advertise",
            "--for",
            "15",
            "--slots",
            "1",
            "--price",
            "5",
            "--image",
            &img,
            "--endpoint",
            &server.endpoint,
        ],
    );
    let text = &shown.stdout;
    assert!(text.contains("with a workspace of"), "{text}");
    assert!(text.contains("permission mode `acceptEdits`"), "{text}");
    assert!(text.contains("as a requester 0.500: 0 settled, 0 rejected"), "{text}");
    let out = bid.wait();
    out.code(0);
    assert_eq!(out.json()["workspace"]["acceptance"]["passed"], true);
    let events = docker::audit_events(&prov);
    let approved: Vec<_> = events.iter().filter(|e| e["event"] == "market.approved").collect();
    assert_eq!(approved[0]["approved_by"], "tty", "{:#}", approved[0]);
    server.verify();
}
