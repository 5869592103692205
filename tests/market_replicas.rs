//! Several `market serve` replicas on one PostgreSQL database act as one
//! market: tasks, leases, payloads and results cross replicas; two
//! providers racing on two replicas for one task never both win; replicas
//! killed with `kill -9` in the middle of a stream of operations lose no
//! acknowledged operation and apply none twice; and a database that goes
//! away for 10 s makes the replicas refuse writes with `unavailable`
//! (acknowledging nothing they did not commit) until it is back.
//!
//! Every test runs against a real PostgreSQL (a throwaway cluster of the
//! harness); without one it skips loudly, and `CMM_REQUIRE_POSTGRES=1`
//! makes that a failure.

mod common;
#[path = "common/market.rs"]
mod market;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use claude_max_market::market::client::{Client, ClientError};
use claude_max_market::market::protocol::{Event, Reason, Request};
use serde_json::Value;

use common::wait_until;
use market::{expect_event, offer, post, postgres, rt, Node, Server};

/// A fresh database of the shared cluster, or `None` (skipped loudly).
fn fresh_db(test: &str) -> Option<String> {
    postgres::available(test).then(|| postgres::shared().fresh_db())
}

/// `n` replicas on `url`, on 127.0.0.1, 127.0.0.2, ... with free ports.
fn replicas(url: &str, n: usize, extra: &[&str]) -> Vec<Server> {
    (0..n)
        .map(|i| Server::start_store(url, &format!("127.0.0.{}:0", i + 1), extra))
        .collect()
}

fn task_id(v: &Value) -> String {
    v["task"]["task_id"].as_str().expect("a task id").to_string()
}

async fn balance(c: &Client) -> i64 {
    c.request(&Request::Status {}).await.expect("status")["balance"]
        .as_i64()
        .expect("a balance")
}

/// A requester on replica A, providers on B and C: the task posted through
/// A is offered on B and C, B's accept is told to A and C, the payload sent
/// through A reaches B, B's result reaches A, and the settlement pays B.
#[test]
fn a_task_crosses_three_replicas_and_settles_with_exact_balances() {
    let Some(url) = fresh_db("a_task_crosses_three_replicas") else {
        return;
    };
    let rs = replicas(&url, 3, &[]);
    rt().block_on(async {
        let (r, p1, p2) = (Node::new(), Node::new(), Node::new());
        let mut rc = r.connect(&rs[0]).await;
        let mut c1 = p1.connect(&rs[1]).await;
        let mut c2 = p2.connect(&rs[2]).await;
        c1.request(&offer(5)).await.expect("offer on B");
        c2.request(&offer(7)).await.expect("offer on C");
        let v = rc.request(&post(20)).await.expect("post on A");
        let tid = task_id(&v);
        for (c, on) in [(&mut c1, "B"), (&mut c2, "C")] {
            expect_event(
                c,
                10,
                &format!("the task offered on {on}"),
                |e| matches!(e, Event::TaskOffered { task } if task.task_id == tid),
            )
            .await;
        }
        c1.request(&Request::Accept {
            task_id: tid.clone(),
            attempt: 1,
        })
        .await
        .expect("accept on B");
        let me = p1.node_id();
        expect_event(
            &mut rc,
            10,
            "the lease told on A",
            |e| matches!(e, Event::Assigned { provider, .. } if *provider == me),
        )
        .await;
        expect_event(
            &mut c2,
            10,
            "the task closed on C",
            |e| matches!(e, Event::TaskClosed { task_id } if *task_id == tid),
        )
        .await;
        rc.request(&Request::Payload {
            task_id: tid.clone(),
            attempt: 1,
            data: "cGF5bG9hZA==".into(),
            part: None,
            parts: None,
        })
        .await
        .expect("payload through A");
        expect_event(
            &mut c1,
            10,
            "the payload on B",
            |e| matches!(e, Event::Payload { data, .. } if data == "cGF5bG9hZA=="),
        )
        .await;
        c1.request(&Request::Deliver {
            task_id: tid.clone(),
            attempt: 1,
            data: "cmVzdWx0".into(),
        })
        .await
        .expect("deliver through B");
        expect_event(
            &mut rc,
            10,
            "the result on A",
            |e| matches!(e, Event::Delivered { task_id, .. } if *task_id == tid),
        )
        .await;
        let v = rc
            .request(&Request::Settle {
                task_id: tid.clone(),
                attempt: 1,
            })
            .await
            .expect("settle on A");
        assert_eq!(v["paid"], 5);
        expect_event(&mut c1, 10, "the payment told on B", |e| {
            matches!(e, Event::Settled { paid: 5, .. })
        })
        .await;
        assert_eq!(balance(&rc).await, 995, "the requester paid the ask, 5");
        assert_eq!(balance(&c1).await, 1005, "the provider on B earned 5");
        assert_eq!(balance(&c2).await, 1000, "the provider on C was not paid");
    });
    let v = rs[2].verify();
    assert_eq!(v["report"]["totals"]["issued"], 3000, "{v:#}");
    for r in &rs {
        let h = r.http_get("/healthz");
        assert!(h.contains("\"database\":\"up\""), "{h}");
        let m = r.http_get("/metrics");
        assert!(m.contains("cmm_market_db_up{replica="), "per-replica label: {m}");
        assert!(
            m.contains("cmm_market_db_batch_seconds_count{replica="),
            "database latency: {m}"
        );
    }
}

/// Batches of different replicas run at once, each holding only the rows it
/// decides on. While another transaction holds a task's row (as another
/// replica's batch would), an accept of that task waits for it and, past
/// the lock wait, is refused as `unavailable` with nothing changed, while
/// a post of another task goes through at once; sent again once the row
/// is free, the accept applies.
#[test]
fn a_request_kept_waiting_for_a_row_is_refused_as_unavailable_while_other_work_goes_on() {
    let Some(url) = fresh_db("a_request_kept_waiting_for_a_row") else {
        return;
    };
    let rs = replicas(&url, 2, &[]);
    rt().block_on(async {
        let (r, p) = (Node::new(), Node::new());
        let rc = r.connect(&rs[0]).await;
        let mut pc = p.connect(&rs[1]).await;
        pc.request(&offer(1)).await.expect("offer");
        let tid = task_id(&rc.request(&post(2)).await.expect("post"));
        expect_event(
            &mut pc,
            10,
            "the task offered",
            |e| matches!(e, Event::TaskOffered { task } if task.task_id == tid),
        )
        .await;
        // Hold the task's row in a transaction of our own.
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let holder = {
            let (url, tid) = (url.clone(), tid.clone());
            std::thread::spawn(move || {
                let mut db = postgres::connect(&url).expect("connect");
                let mut tx = db.transaction().expect("begin");
                tx.query_one("SELECT attempt FROM tasks WHERE task_id = $1 FOR UPDATE", &[&tid])
                    .expect("lock the task's row");
                held_tx.send(()).unwrap();
                let _ = release.recv();
                tx.rollback().expect("rollback");
            })
        };
        held.recv().expect("the row is held");
        let accept = Request::Accept {
            task_id: tid.clone(),
            attempt: 1,
        };
        let started = Instant::now();
        let (waited, other) = tokio::join!(pc.request(&accept), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let t = Instant::now();
            let v = rc.request(&post(2)).await.expect("another post meanwhile");
            (v, t.elapsed())
        });
        let e = waited.expect_err("the accept cannot have the row");
        assert_eq!(e.reason(), Some(Reason::Unavailable), "{e}");
        assert!(e.to_string().contains("send it again"), "says what to do: {e}");
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "it waited for the row first ({:?})",
            started.elapsed()
        );
        assert!(
            other.1 < Duration::from_millis(400),
            "a post of another task did not wait for the held row ({:?})",
            other.1
        );
        assert_ne!(task_id(&other.0), tid);
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        let t = rc
            .request(&Request::Task { task_id: tid.clone() })
            .await
            .expect("the task");
        assert_eq!(t["state"], "open", "the refused accept changed nothing: {t}");
        let v = pc.request(&accept).await.expect("the accept, sent again");
        assert_eq!(v["attempt"], 1);
        let t = rc
            .request(&Request::Task { task_id: tid.clone() })
            .await
            .expect("the task");
        assert_eq!(t["state"], "assigned", "{t}");
    });
    rs[0].verify();
}

/// Two providers on two replicas accept one task at the same moment, 200
/// times: exactly one wins each time, and the ledger holds.
#[test]
fn two_providers_racing_on_two_replicas_never_both_win() {
    let Some(url) = fresh_db("two_providers_racing_on_two_replicas") else {
        return;
    };
    let rs = replicas(&url, 3, &["--initial-grant", "100000"]);
    rt().block_on(async {
        let (r, p1, p2) = (Node::new(), Node::new(), Node::new());
        let rc = r.connect(&rs[0]).await;
        let c1 = p1.connect(&rs[1]).await;
        let c2 = p2.connect(&rs[2]).await;
        c1.request(&offer(1)).await.expect("offer on B");
        c2.request(&offer(1)).await.expect("offer on C");
        let (mut wins1, mut wins2) = (0, 0);
        for race in 0..200 {
            let tid = task_id(&rc.request(&post(2)).await.expect("post"));
            let accept = Request::Accept {
                task_id: tid.clone(),
                attempt: 1,
            };
            let (a1, a2) = tokio::join!(c1.request(&accept), c2.request(&accept));
            let winner = match (&a1, &a2) {
                (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                    assert_eq!(
                        e.reason(),
                        Some(Reason::AlreadyTaken),
                        "race {race}: the loser is told why: {e}"
                    );
                    if a1.is_ok() {
                        wins1 += 1;
                        &c1
                    } else {
                        wins2 += 1;
                        &c2
                    }
                }
                _ => panic!("race {race}: exactly one accept must win: {a1:?} / {a2:?}"),
            };
            winner
                .request(&Request::Deliver {
                    task_id: tid.clone(),
                    attempt: 1,
                    data: "cmVzdWx0".into(),
                })
                .await
                .expect("deliver");
            rc.request(&Request::Settle {
                task_id: tid,
                attempt: 1,
            })
            .await
            .expect("settle");
        }
        assert_eq!(wins1 + wins2, 200);
        assert_eq!(balance(&rc).await, 100_000 - 200, "one ask paid per race");
        assert_eq!(balance(&c1).await + balance(&c2).await, 200_000 + 200);
        eprintln!("races won: {wins1} on B, {wins2} on C");
    });
    rs[0].verify();
}

/// A client of the kill test: one node that sends each request until a
/// replica acknowledges it, under one message id, moving to the next
/// replica when its connection is lost.
struct Sticky<'a> {
    node: &'a Node,
    endpoints: Vec<String>,
    at: usize,
    client: Option<Client>,
    reconnects: u32,
}

impl<'a> Sticky<'a> {
    fn new(node: &'a Node, endpoints: Vec<String>, at: usize) -> Sticky<'a> {
        Sticky {
            node,
            endpoints,
            at,
            client: None,
            reconnects: 0,
        }
    }

    /// Apply `req` exactly once: the result, or the original result of an
    /// earlier try that was applied but whose answer was lost.
    async fn once(&mut self, req: &Request) -> Result<Value, ClientError> {
        let id = format!("m-{}", rand_id());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "no replica acknowledged {req:?} in 60 s");
            if self.client.is_none() {
                match Client::connect(&self.endpoints[self.at], &self.node.id).await {
                    Ok(c) => self.client = Some(c),
                    Err(_) => {
                        self.at = (self.at + 1) % self.endpoints.len();
                        self.reconnects += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let c = self.client.as_ref().expect("connected");
            match c.request_with_id(&id, req).await {
                // A retry of an applied request answers with the
                // original result.
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    self.client = None;
                    self.at = (self.at + 1) % self.endpoints.len();
                    self.reconnects += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn rand_id() -> String {
    let b: [u8; 12] = rand::random();
    hex::encode(b)
}

/// 30 times: a stream of post -> accept -> deliver -> settle cycles runs
/// while one replica is killed with `kill -9` and started again. Every
/// operation is retried under its message id until acknowledged, so each
/// is applied exactly once: the ledger verifies after every kill, and at
/// the end every task is settled and the balances are exactly what the
/// cycles paid.
#[test]
fn kill_9_of_replicas_in_a_stream_loses_nothing_acknowledged_and_applies_nothing_twice() {
    let Some(url) = fresh_db("kill_9_of_replicas_in_a_stream") else {
        return;
    };
    let mut rs = replicas(&url, 3, &["--initial-grant", "100000"]);
    let endpoints: Vec<String> = rs.iter().map(|s| s.endpoint.clone()).collect();
    let (r, p) = (Node::new(), Node::new());
    let runtime = rt();
    let mut cycles = 0u64;
    let mut tasks = BTreeSet::new();
    let (mut rq, mut pv) = (
        Sticky::new(&r, endpoints.clone(), 0),
        Sticky::new(&p, endpoints.clone(), 1),
    );
    runtime.block_on(async {
        pv.once(&offer(1)).await.expect("offer");
    });
    for kill in 0..30 {
        let victim = kill % rs.len();
        // The kill lands somewhere inside this round's cycles.
        let pid = rs[victim].pid();
        let delay = Duration::from_millis(20 + (kill as u64 * 37) % 200);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: a signal to a child process of this test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        runtime.block_on(async {
            for _ in 0..6 {
                let tid = task_id(&rq.once(&post(2)).await.expect("post"));
                assert!(tasks.insert(tid.clone()), "task {tid} posted twice");
                let accept = Request::Accept {
                    task_id: tid.clone(),
                    attempt: 1,
                };
                // The requester must be seen online for the accept: it
                // may be reconnecting to another replica right now.
                let mut tries = 0;
                loop {
                    match pv.once(&accept).await {
                        Ok(_) => break,
                        Err(e) if e.reason() == Some(Reason::RequesterOffline) && tries < 100 => {
                            tries += 1;
                            let _ = rq.once(&Request::Status {}).await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => {
                            let st = pv.once(&Request::Status {}).await;
                            panic!("accept of {tid} in round {kill}: {e}\nprovider: {st:#?}");
                        }
                    }
                }
                pv.once(&Request::Deliver {
                    task_id: tid.clone(),
                    attempt: 1,
                    data: "cmVzdWx0".into(),
                })
                .await
                .expect("deliver");
                rq.once(&Request::Settle {
                    task_id: tid,
                    attempt: 1,
                })
                .await
                .expect("settle");
                cycles += 1;
            }
        });
        killer.join().expect("killer");
        rs[victim].kill9();
        rs[victim].spawn();
        // The restarted replica listens where it did, so clients find it.
        assert_eq!(rs[victim].endpoint, endpoints[victim], "a replica came back elsewhere");
        let v = rs[(victim + 1) % rs.len()].verify();
        assert_eq!(v["ok"], true, "after kill {kill}: {v:#}");
    }
    let (paid, earned, states) = runtime.block_on(async {
        let status = rq.once(&Request::Status {}).await.expect("status");
        let earned = pv.once(&Request::Status {}).await.expect("status")["balance"]
            .as_i64()
            .unwrap();
        let mut states = BTreeMap::new();
        for t in &tasks {
            let v = rq.once(&Request::Task { task_id: t.clone() }).await.expect("task");
            *states
                .entry(v["state"].as_str().unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
        (status["balance"].as_i64().unwrap(), earned, states)
    });
    assert_eq!(
        states,
        BTreeMap::from([("settled".to_string(), cycles)]),
        "every task settled, none stuck"
    );
    assert_eq!(paid, 100_000 - cycles as i64, "each settle paid once");
    assert_eq!(earned, 100_000 + cycles as i64, "each settle earned once");
    eprintln!(
        "{cycles} cycles over 30 kills; reconnects: requester {}, provider {}",
        rq.reconnects, pv.reconnects
    );
}

/// PostgreSQL stops for 10 s under load: the replicas refuse every write
/// with `unavailable` and report the database unreachable, acknowledge
/// nothing they did not commit, and serve again by themselves once it is
/// back, with every acknowledged operation in the ledger.
#[test]
fn a_database_outage_is_refused_as_unavailable_and_recovered_from_by_itself() {
    if !postgres::programs_available("a_database_outage_is_refused_as_unavailable") {
        return;
    }
    let mut cluster = postgres::Cluster::start();
    let url = cluster.fresh_db();
    let rs = replicas(&url, 2, &["--initial-grant", "100000"]);
    let (r, p) = (Node::new(), Node::new());
    let runtime = rt();
    let (acked_before, acked_after) = runtime.block_on(async {
        let rc = r.connect(&rs[0]).await;
        let pc = p.connect(&rs[1]).await;
        pc.request(&offer(1)).await.expect("offer");
        let mut acked = Vec::new();
        for _ in 0..20 {
            acked.push(task_id(&rc.request(&post(2)).await.expect("post before the outage")));
        }
        cluster.stop();
        let stopped = Instant::now();
        // A session that ends while the database is away: the book must
        // still hear of it once the database is back.
        pc.close();
        let mut refused = 0;
        let mut ok_during = 0;
        while stopped.elapsed() < Duration::from_secs(10) {
            match rc.request(&post(2)).await {
                Ok(v) => {
                    ok_during += 1;
                    acked.push(task_id(&v));
                }
                Err(e) => {
                    assert_eq!(e.reason(), Some(Reason::Unavailable), "refused as unavailable: {e}");
                    refused += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(refused > 10, "posts were refused during the outage ({refused})");
        assert_eq!(ok_during, 0, "nothing can be acknowledged without the database");
        for s in &rs {
            let h = s.http_get("/healthz");
            assert!(h.contains("\"database\":\"unreachable\""), "{h}");
        }
        cluster.start_again();
        let before = acked.len();
        let back = wait_until(Duration::from_secs(20), || {
            rs.iter()
                .all(|s| s.http_get("/healthz").contains("\"database\":\"up\""))
        });
        assert!(back, "the replicas did not see the database again");
        let gone = wait_until(Duration::from_secs(10), || {
            // The blocking client must not run on this runtime's thread.
            postgres::off_runtime(|| {
                let mut db = postgres::connect(&url).expect("connect");
                let n: i64 = db
                    .query_one("SELECT COUNT(*) FROM presence WHERE node_id = $1", &[&p.node_id()])
                    .expect("presence")
                    .get(0);
                n == 0
            })
        });
        assert!(gone, "the session that ended during the outage is still counted online");
        // The old sessions may have been closed by the outage: new ones.
        let rc = r.connect(&rs[0]).await;
        let pc = p.connect(&rs[1]).await;
        for _ in 0..5 {
            let tid = task_id(&rc.request(&post(2)).await.expect("post after the outage"));
            pc.request(&Request::Accept {
                task_id: tid.clone(),
                attempt: 1,
            })
            .await
            .expect("accept after the outage");
            pc.request(&Request::Deliver {
                task_id: tid.clone(),
                attempt: 1,
                data: "cmVzdWx0".into(),
            })
            .await
            .expect("deliver after the outage");
            rc.request(&Request::Settle {
                task_id: tid.clone(),
                attempt: 1,
            })
            .await
            .expect("settle after the outage");
            acked.push(tid);
        }
        let mut found = 0;
        for t in &acked {
            if rc.request(&Request::Task { task_id: t.clone() }).await.is_ok() {
                found += 1;
            }
        }
        assert_eq!(found, acked.len(), "every acknowledged post is in the book");
        (before, acked.len())
    });
    let v = rs[0].verify();
    assert_eq!(
        v["report"]["tasks"], acked_after as i64,
        "no unacknowledged post was applied: {v:#}"
    );
    eprintln!("{acked_before} posts acknowledged before and during the outage, {acked_after} in all");
    assert!(rs[0].metric("cmm_market_rejects_total{reason=\"unavailable\"}") > 0);
}

/// Three replicas started at the same moment on an empty database: one
/// creates the schema while the others wait for it (the migration lock),
/// and all three serve one market.
#[test]
fn replicas_starting_together_migrate_once() {
    let Some(url) = fresh_db("replicas_starting_together_migrate_once") else {
        return;
    };
    let rs: Vec<Server> = std::thread::scope(|s| {
        let started: Vec<_> = (1..=3)
            .map(|i| {
                let url = &url;
                s.spawn(move || Server::start_store(url, &format!("127.0.0.{i}:0"), &[]))
            })
            .collect();
        started
            .into_iter()
            .map(|h| h.join().expect("a replica started"))
            .collect()
    });
    rt().block_on(async {
        for s in &rs {
            market::full_cycle(s).await;
        }
    });
    let mut db = postgres::connect(&url).expect("connect");
    let version: i64 = db.query_one("SELECT version FROM cmm_schema", &[]).unwrap().get(0);
    assert_eq!(version, 3, "every migration ran");
    let rows: i64 = db.query_one("SELECT COUNT(*) FROM cmm_schema", &[]).unwrap().get(0);
    assert_eq!(rows, 1, "one schema version row");
    rs[1].verify();
}

/// The order book's clock runs once per tick across the replicas, not
/// once per replica: over a few seconds the replicas' tick counts add up
/// to about one per 100 ms, and the clock still lapses a lease exactly
/// once.
#[test]
fn the_clock_runs_once_per_tick_across_replicas() {
    let Some(url) = fresh_db("the_clock_runs_once_per_tick_across_replicas") else {
        return;
    };
    let rs = replicas(&url, 3, &["--lease-ms", "1000"]);
    let ticks = |rs: &[Server]| -> i64 { rs.iter().map(|s| s.metric("cmm_market_clock_ticks_total")).sum() };
    let before = ticks(&rs);
    let started = Instant::now();
    rt().block_on(async {
        let (r, p) = (Node::new(), Node::new());
        let rc = r.connect(&rs[0]).await;
        let mut pc = p.connect(&rs[1]).await;
        pc.request(&offer(5)).await.expect("offer");
        let tid = task_id(&rc.request(&post(20)).await.expect("post"));
        pc.request(&Request::Accept {
            task_id: tid.clone(),
            attempt: 1,
        })
        .await
        .expect("accept");
        rc.request(&Request::Payload {
            task_id: tid.clone(),
            attempt: 1,
            data: "cGF5bG9hZA==".into(),
            part: None,
            parts: None,
        })
        .await
        .expect("payload");
        // No renewal: the lease lapses once (told to the provider on B),
        // and the task is open again under attempt 2.
        expect_event(
            &mut pc,
            15,
            "the lease lapsed",
            |e| matches!(e, Event::LeaseLapsed { task_id, attempt: 1 } if *task_id == tid),
        )
        .await;
        // A second lapse, if the clock ran once per replica, would come
        // within a tick or two.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v = rc.request(&Request::Task { task_id: tid.clone() }).await.expect("task");
        assert_eq!(v["attempt"], 2, "lapsed once, not once per replica: {v}");
        let rep = pc
            .request(&Request::Reputation { node_id: p.node_id() })
            .await
            .expect("reputation");
        assert_eq!(rep["failures"], 1, "one failure counted: {rep}");
    });
    let elapsed = started.elapsed().as_millis() as i64;
    let ran = ticks(&rs) - before;
    let per_tick = elapsed / 100;
    assert!(
        ran <= per_tick + per_tick / 2 + 5,
        "{ran} ticks ran in {elapsed} ms over 3 replicas: about {per_tick} expected, not {}",
        3 * per_tick
    );
    assert!(ran >= per_tick / 2, "the clock ran only {ran} times in {elapsed} ms");
}

/// A store that cannot be used is refused with what was wrong and what to
/// do, and a password in the URL is never shown.
#[test]
fn bad_stores_are_refused_with_what_to_do_and_no_password_shown() {
    let home = common::Cmm::new();
    // Nothing listens on port 1: the database cannot be reached (exit 4).
    home.run(&[
        "market",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        "postgres://cmm:hunter2@127.0.0.1:1/market",
    ])
    .code(4)
    .stderr_has("cannot open the market database `postgres://cmm:***@127.0.0.1:1/market`")
    .stderr_has("check that PostgreSQL is running");
    let out = home.run(&["market", "ledger", "--db", "postgres://cmm:hunter2@127.0.0.1:1/market"]);
    out.code(4);
    assert!(!out.stderr.contains("hunter2"), "the password leaked: {}", out.stderr);
    // The store from CMM_MARKET_DB when there is no --db.
    home.cmd(&["market", "ledger", "--verify"])
        .env("CMM_MARKET_DB", "postgres://cmm:hunter2@127.0.0.1:1/market")
        .run()
        .code(4)
        .stderr_has("postgres://cmm:***@127.0.0.1:1/market");
    let Some(url) = fresh_db("bad_stores_are_refused") else {
        return;
    };
    // A reachable database that holds no market yet.
    home.run(&["market", "ledger", "--verify", "--db", &url])
        .code(1)
        .stderr_has("holds no market yet");
}
