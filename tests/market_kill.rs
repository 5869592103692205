//! `kill -9` of the coordinator at random points during a stream of
//! operations, then restart: no money lost or duplicated, no task left
//! without a lease or a refund, and the ledger verifies every time.

mod common;
// The coordinator harness links the library: only market tests include it.
#[path = "common/market.rs"]
mod market;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use claude_max_market::market::client::{Client, ClientError};
use claude_max_market::market::protocol::{Reason, Request};
use market::*;
use rand::Rng;

const NODES: usize = 4;
const GRANT: i64 = 1000;

/// Posts by (node index, message id): `Some(task id)` once acknowledged.
type Posts = BTreeMap<(usize, String), Option<String>>;

enum Stop {
    /// The connection died (the server was killed): go restart it.
    Down,
}

fn transient(e: &ClientError) -> bool {
    e.is_transient() || e.reason() == Some(Reason::Internal)
}

async fn resolve_post(c: &Client, posts: &mut Posts, key: (usize, String)) -> Result<(), Stop> {
    match c.request_with_id(&key.1, &post(10)).await {
        Ok(v) => {
            let tid = v["task"]["task_id"].as_str().expect("task id").to_string();
            posts.insert(key, Some(tid));
            Ok(())
        }
        Err(e) if transient(&e) => Err(Stop::Down),
        Err(e) => {
            // Refused now (e.g. short balance), so it was never applied:
            // a first application would have been answered as a duplicate.
            assert_eq!(e.reason(), Some(Reason::InsufficientBalance), "unexpected refusal: {e}");
            posts.remove(&key);
            Ok(())
        }
    }
}

/// Run post -> accept -> deliver -> settle cycles (every fifth lease is
/// left to lapse) until the connection dies.
async fn drive(endpoint: &str, nodes: &[Node], posts: &mut Posts, counter: &mut u64) -> Result<(), Stop> {
    let mut clients = Vec::new();
    for n in nodes {
        match Client::connect(endpoint, &n.id).await {
            Ok(c) => clients.push(c),
            Err(_) => return Err(Stop::Down),
        }
    }
    for (i, c) in clients.iter().enumerate() {
        if let Err(e) = c.request(&offer(3 + i as u64)).await {
            return if transient(&e) {
                Err(Stop::Down)
            } else {
                panic!("offer refused: {e}")
            };
        }
    }
    // Settle what an earlier kill left uncertain, under the same ids.
    let uncertain: Vec<_> = posts
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k.clone())
        .collect();
    for key in uncertain {
        resolve_post(&clients[key.0], posts, key).await?;
    }
    loop {
        *counter += 1;
        let n = *counter as usize;
        let (ri, pi) = (n % NODES, (n + 1) % NODES);
        let key = (ri, format!("post-{n}"));
        posts.insert(key.clone(), None);
        resolve_post(&clients[ri], posts, key.clone()).await?;
        let Some(Some(tid)) = posts.get(&key).cloned() else {
            continue;
        };
        let step = |r: Result<serde_json::Value, ClientError>| match r {
            Ok(_) => Ok(true),
            Err(e) if transient(&e) => Err(Stop::Down),
            // The state moved on (a lapse, a race with the clock): fine.
            Err(_) => Ok(false),
        };
        if !step(
            clients[pi]
                .request(&Request::Accept {
                    task_id: tid.clone(),
                    attempt: 1,
                })
                .await,
        )? {
            continue;
        }
        if n.is_multiple_of(5) {
            continue;
        }
        let deliver = Request::Deliver {
            task_id: tid.clone(),
            attempt: 1,
            data: "cmVzdWx0".into(),
        };
        if !step(clients[pi].request(&deliver).await)? {
            continue;
        }
        step(
            clients[ri]
                .request(&Request::Settle {
                    task_id: tid,
                    attempt: 1,
                })
                .await,
        )?;
    }
}

#[test]
fn kill_9_during_a_stream_of_operations_loses_no_money() {
    let kills: usize = std::env::var("CMM_TEST_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut server = Server::start(&["--lease-ms", "400", "--grace-ms", "2000", "--initial-grant", "1000"]);
    let nodes: Vec<Node> = (0..NODES).map(|_| Node::new()).collect();
    let rt = rt();
    let mut posts = Posts::new();
    let mut counter = 0u64;
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    let mut done = 0;
    while done < kills {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "kill test over its time budget after {done} kills"
        );
        let pid = server.pid() as i32;
        let delay = Duration::from_millis(rng.gen_range(20..350));
        let killer = std::thread::spawn(move || {
            // A sleep by design: the random moment of the kill is the test.
            std::thread::sleep(delay);
            // SAFETY: signalling our own child, which is reaped only after this thread is joined.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let _ = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                drive(&server.endpoint, &nodes, &mut posts, &mut counter),
            )
            .await
        });
        killer.join().unwrap();
        server.kill9();
        done += 1;
        server.spawn();
        verify_db(&server.store);
    }
    // Resolve the last uncertain posts, then let the clock lapse stale leases.
    rt.block_on(async {
        let mut clients = Vec::new();
        for n in &nodes {
            clients.push(n.connect(&server).await);
        }
        let uncertain: Vec<_> = posts
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        for key in uncertain {
            assert!(resolve_post(&clients[key.0], &mut posts, key).await.is_ok());
        }
    });
    // A sleep by design: stale leases must lapse on the coordinator's clock.
    std::thread::sleep(Duration::from_millis(1200));
    let v = server.verify();
    let totals = &v["report"]["totals"];
    assert_eq!(
        totals["issued"],
        GRANT * NODES as i64,
        "one grant per node, no money created: {v:#}"
    );
    assert_eq!(
        totals["balances"].as_i64().unwrap() + totals["escrow"].as_i64().unwrap(),
        GRANT * NODES as i64
    );
    let acked: Vec<String> = posts.values().map(|t| t.clone().expect("resolved")).collect();
    assert_eq!(
        v["report"]["tasks"].as_u64().unwrap() as usize,
        acked.len(),
        "every post applied exactly once"
    );
    // Each acknowledged task's row, read straight from the SQLite file. On
    // PostgreSQL only this look into the file is skipped: the ledger check
    // above counted the tasks there.
    let states: Vec<(String, i64)> = if server.on_postgres() {
        Vec::new()
    } else {
        let db = rusqlite::Connection::open_with_flags(&server.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        for tid in &acked {
            let n: i64 = db
                .query_row("SELECT COUNT(*) FROM tasks WHERE task_id = ?1", [tid], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 1, "acknowledged task {tid} survived");
        }
        let now = chrono::Utc::now().timestamp_millis();
        let stuck: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM tasks WHERE state = 'assigned' AND lease_deadline < ?1",
                [now - 1000],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stuck, 0, "no task keeps a dead lease");
        let states = db
            .prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        states
    };
    eprintln!(
        "{done} kills in {:?}; {} tasks: {states:?}; totals {totals}",
        started.elapsed(),
        acked.len()
    );
    assert!(done >= kills);
    assert!(acked.len() >= kills, "operations ran between kills");
}
