//! Market life cycle against a real coordinator on loopback: racing
//! accepts, leases and fencing, refunds, balances, and the client commands.

mod common;
// The coordinator harness links the library: only market tests include it.
#[path = "common/market.rs"]
mod market;

use std::time::Duration;

use claude_max_market::market::protocol::{Event, Reason, Request};
use common::Cmm;
use market::*;
use serde_json::Value;

fn task_id(v: &Value) -> String {
    v["task"]["task_id"].as_str().expect("task id").to_string()
}

#[test]
fn two_providers_race_and_exactly_one_wins_then_settles() {
    let server = Server::start(&[]);
    rt().block_on(async {
        let (r, p1, p2) = (Node::new(), Node::new(), Node::new());
        let mut rc = r.connect(&server).await;
        assert_eq!(rc.granted, 1000);
        let mut c1 = p1.connect(&server).await;
        let mut c2 = p2.connect(&server).await;
        c1.request(&offer(5)).await.unwrap();
        c2.request(&offer(7)).await.unwrap();
        let posted = rc.request(&post(20)).await.unwrap();
        let tid = task_id(&posted);
        for c in [&mut c1, &mut c2] {
            expect_event(c, 5, "task_offered", |e| matches!(e, Event::TaskOffered { .. })).await;
        }
        let accept = Request::Accept {
            task_id: tid.clone(),
            attempt: 1,
        };
        let (a1, a2) = tokio::join!(c1.request(&accept), c2.request(&accept));
        let wins = [&a1, &a2].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "exactly one accept wins: {a1:?} {a2:?}");
        let first_won = a1.is_ok();
        let loser_reason = if first_won { reason_of(a2) } else { reason_of(a1) };
        assert_eq!(loser_reason, Reason::AlreadyTaken);
        let (mut win, lose, win_node, ask) = if first_won { (c1, c2, &p1, 5) } else { (c2, c1, &p2, 7) };
        let ev = expect_event(&mut rc, 5, "assigned", |e| matches!(e, Event::Assigned { .. })).await;
        let Event::Assigned { provider, .. } = ev else {
            unreachable!()
        };
        assert_eq!(provider, win_node.node_id());

        // The loser may not deliver or renew; the requester relays the payload.
        let deliver = Request::Deliver {
            task_id: tid.clone(),
            attempt: 1,
            data: "cmVzdWx0".into(),
        };
        assert_eq!(reason_of(lose.request(&deliver).await), Reason::NotOwner);
        let settle = Request::Settle {
            task_id: tid.clone(),
            attempt: 1,
        };
        assert_eq!(
            reason_of(rc.request(&settle).await),
            Reason::WrongState,
            "settle before delivery"
        );
        rc.request(&Request::Payload {
            task_id: tid.clone(),
            attempt: 1,
            data: "ZW5jcnlwdGVk".into(),
            part: None,
            parts: None,
        })
        .await
        .unwrap();
        let ev = expect_event(&mut win, 5, "payload", |e| matches!(e, Event::Payload { .. })).await;
        assert!(matches!(ev, Event::Payload { ref data, .. } if data == "ZW5jcnlwdGVk"));
        win.request(&Request::Renew {
            task_id: tid.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
        win.request(&deliver).await.unwrap();
        let ev = expect_event(&mut rc, 5, "delivered", |e| matches!(e, Event::Delivered { .. })).await;
        assert!(matches!(ev, Event::Delivered { ref data, attempt: 1, .. } if data == "cmVzdWx0"));
        // Another node cannot settle the requester's task.
        assert_eq!(reason_of(lose.request(&settle).await), Reason::NotOwner);
        let s = rc.request(&settle).await.unwrap();
        assert_eq!(s["paid"], ask);
        assert_eq!(s["refunded"], 20 - ask);
        expect_event(&mut win, 5, "settled", |e| matches!(e, Event::Settled { .. })).await;
        assert_eq!(reason_of(rc.request(&settle).await), Reason::WrongState, "settles once");

        let st = rc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["balance"], 1000 - ask);
        assert_eq!(st["escrow"], 0);
        let ws = win.request(&Request::Status {}).await.unwrap();
        assert_eq!(ws["balance"], 1000 + ask);
        assert_eq!(ws["reputation"]["successes"], 1);
        assert!(ws["reputation"]["score"].as_f64().unwrap() > 1.0 / 3.0);
        assert_eq!(st["server"]["ledger"]["issued"], 3000);
        // Anyone can read a provider's reputation.
        let rep = rc
            .request(&Request::Reputation {
                node_id: win_node.node_id(),
            })
            .await
            .unwrap();
        assert_eq!(rep["successes"], 1);
        assert_eq!(rep["failures"], 0);
    });
    let v = server.verify();
    assert_eq!(v["report"]["totals"]["escrow"], 0);
}

#[test]
fn lapsed_lease_reoffers_with_a_new_attempt_and_fences_the_old_one() {
    let server = Server::start(&["--lease-ms", "800"]);
    rt().block_on(async {
        let (r, p1, p2) = (Node::new(), Node::new(), Node::new());
        let rc = r.connect(&server).await;
        let mut c1 = p1.connect(&server).await;
        c1.request(&offer(5)).await.unwrap();
        let tid = task_id(&rc.request(&post(20)).await.unwrap());
        c1.request(&Request::Accept {
            task_id: tid.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
        // Heartbeats keep the lease past its first deadline. A sleep by
        // design: the time between heartbeats is what is tested.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            c1.request(&Request::Renew {
                task_id: tid.clone(),
                attempt: 1,
            })
            .await
            .unwrap();
        }
        // Then p1 goes quiet: the lease lapses and the task is offered again.
        let mut c2 = p2.connect(&server).await;
        c2.request(&offer(6)).await.unwrap();
        expect_event(&mut c1, 5, "lease_lapsed", |e| {
            matches!(e, Event::LeaseLapsed { attempt: 1, .. })
        })
        .await;
        let ev = expect_event(
            &mut c2,
            5,
            "re-offer",
            |e| matches!(e, Event::TaskOffered { task } if task.attempt == 2),
        )
        .await;
        assert!(matches!(ev, Event::TaskOffered { .. }));
        // Everything from attempt 1 is refused now.
        let old = Request::Deliver {
            task_id: tid.clone(),
            attempt: 1,
            data: "eA==".into(),
        };
        assert_eq!(reason_of(c1.request(&old).await), Reason::StaleAttempt);
        assert_eq!(
            reason_of(
                c1.request(&Request::Renew {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::StaleAttempt
        );
        assert_eq!(
            reason_of(
                c2.request(&Request::Accept {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::StaleAttempt
        );
        c2.request(&Request::Accept {
            task_id: tid.clone(),
            attempt: 2,
        })
        .await
        .unwrap();
        c2.request(&Request::Deliver {
            task_id: tid.clone(),
            attempt: 2,
            data: "eQ==".into(),
        })
        .await
        .unwrap();
        assert_eq!(
            reason_of(
                rc.request(&Request::Settle {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::StaleAttempt
        );
        let s = rc
            .request(&Request::Settle {
                task_id: tid.clone(),
                attempt: 2,
            })
            .await
            .unwrap();
        assert_eq!(s["paid"], 6);
        let st1 = c1.request(&Request::Status {}).await.unwrap();
        assert_eq!(st1["reputation"]["failures"], 1, "a lapse counts against the provider");
        assert_eq!(st1["balance"], 1000);
    });
    server.verify();
}

#[test]
fn a_task_waits_for_its_requester_and_a_lease_without_payload_is_recalled_free() {
    let server = Server::start(&[]);
    rt().block_on(async {
        let (r, p1) = (Node::new(), Node::new());
        let rc = r.connect(&server).await;
        let mut c1 = p1.connect(&server).await;
        c1.request(&offer(5)).await.unwrap();
        let posted = rc.request(&post(20)).await.unwrap();
        let tid = task_id(&posted);
        let max_attempts = posted["task"]["max_attempts"].as_u64().unwrap();
        c1.request(&Request::Accept {
            task_id: tid.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
        // The requester leaves before sending the payload: the lease is
        // recalled, and the attempt it used is given back.
        rc.close();
        expect_event(&mut c1, 5, "recall", |e| {
            matches!(e, Event::LeaseLapsed { attempt: 1, .. })
        })
        .await;
        // While it is away the task is not offered, and cannot be taken.
        assert_eq!(
            reason_of(
                c1.request(&Request::Accept {
                    task_id: tid.clone(),
                    attempt: 2
                })
                .await
            ),
            Reason::RequesterOffline
        );
        // Back again: the task is offered at once, with its attempts intact.
        let rc = r.connect(&server).await;
        let ev = expect_event(
            &mut c1,
            5,
            "offer on the requester's return",
            |e| matches!(e, Event::TaskOffered { task } if task.task_id == tid),
        )
        .await;
        let Event::TaskOffered { task } = ev else {
            unreachable!()
        };
        assert_eq!(task.attempt, 2);
        assert_eq!(
            Some(u64::from(task.max_attempts)),
            Some(max_attempts + 1),
            "the recall used no attempt"
        );
        c1.request(&Request::Accept {
            task_id: tid.clone(),
            attempt: 2,
        })
        .await
        .unwrap();
        // Once the payload is relayed, the requester may go: the job goes on.
        rc.request(&Request::Payload {
            task_id: tid.clone(),
            attempt: 2,
            data: "eA==".into(),
            part: None,
            parts: None,
        })
        .await
        .unwrap();
        rc.close();
        // Delivered once the coordinator has seen the requester go (its
        // session count drops just before it queues the goodbye).
        assert!(tokio::task::block_in_place(
            || server.wait_for(10, |s| s.try_metric("cmm_market_sessions") == Some(1))
        ));
        c1.request(&Request::Deliver {
            task_id: tid.clone(),
            attempt: 2,
            data: "eQ==".into(),
        })
        .await
        .unwrap();
        let st = c1.request(&Request::Status {}).await.unwrap();
        assert_eq!(
            st["reputation"]["failures"], 0,
            "a recall does not count against the provider"
        );
    });
    server.verify();
}

#[test]
fn the_last_lapsed_attempt_refunds_the_requester() {
    let server = Server::start(&["--lease-ms", "200"]);
    rt().block_on(async {
        let (r, p, p2) = (Node::new(), Node::new(), Node::new());
        let mut rc = r.connect(&server).await;
        let mut pc = p.connect(&server).await;
        let mut p2c = p2.connect(&server).await;
        pc.request(&offer(5)).await.unwrap();
        p2c.request(&offer(5)).await.unwrap();
        let mut req = post(30);
        if let Request::Post { max_attempts, .. } = &mut req {
            *max_attempts = Some(2);
        }
        let tid = task_id(&rc.request(&req).await.unwrap());
        assert_eq!(rc.request(&Request::Status {}).await.unwrap()["balance"], 970);
        // Each attempt to another provider: a node that lost an attempt of a
        // task gets no later attempt of it.
        for (attempt, c) in [(1, &mut pc), (2, &mut p2c)] {
            c.request(&Request::Accept {
                task_id: tid.clone(),
                attempt,
            })
            .await
            .unwrap();
            expect_event(c, 5, "lease_lapsed", |e| matches!(e, Event::LeaseLapsed { .. })).await;
        }
        let ev = expect_event(&mut rc, 5, "refunded", |e| matches!(e, Event::Refunded { .. })).await;
        assert!(matches!(ev, Event::Refunded { amount: 30, .. }));
        let st = rc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["balance"], 1000);
        assert_eq!(st["escrow"], 0);
        assert_eq!(st["tasks"][0]["state"], "refunded");
        assert_eq!(
            reason_of(
                pc.request(&Request::Accept {
                    task_id: tid.clone(),
                    attempt: 2
                })
                .await
            ),
            Reason::WrongState
        );
        // An open task nobody takes expires at its deadline, refunded too.
        let mut req = post(10);
        if let Request::Post { deadline_secs, .. } = &mut req {
            *deadline_secs = 1;
        }
        pc.request(&Request::Withdraw {
            offer_id: pc.request(&Request::Status {}).await.unwrap()["offers"][0]["offer_id"]
                .as_str()
                .unwrap()
                .into(),
        })
        .await
        .unwrap();
        let tid2 = task_id(&rc.request(&req).await.unwrap());
        let ev = expect_event(
            &mut rc,
            5,
            "expiry",
            |e| matches!(e, Event::Refunded { task_id, .. } if *task_id == tid2),
        )
        .await;
        assert!(matches!(ev, Event::Refunded { amount: 10, .. }));
        let st = rc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["balance"], 1000);
        assert_eq!(st["tasks"][0]["state"], "expired");
    });
    server.verify();
}

#[test]
fn short_balance_is_refused_and_bids_only_go_up() {
    let server = Server::start(&["--initial-grant", "50"]);
    rt().block_on(async {
        let r = Node::new();
        let rc = r.connect(&server).await;
        assert_eq!(reason_of(rc.request(&post(60)).await), Reason::InsufficientBalance);
        let tid = task_id(&rc.request(&post(30)).await.unwrap());
        let raise = |p| Request::Raise {
            task_id: tid.clone(),
            max_price: p,
        };
        assert_eq!(reason_of(rc.request(&raise(25)).await), Reason::PriceTooLow);
        assert_eq!(reason_of(rc.request(&raise(81)).await), Reason::InsufficientBalance);
        let v = rc.request(&raise(45)).await.unwrap();
        assert_eq!(v["escrow_added"], 15);
        let st = rc.request(&Request::Status {}).await.unwrap();
        assert_eq!((st["balance"].as_i64(), st["escrow"].as_i64()), (Some(5), Some(45)));
        // The refused requests changed nothing.
        assert_eq!(st["tasks"].as_array().unwrap().len(), 1);
    });
    server.verify();
    // The command line says why, with exit 3.
    let t = Cmm::new();
    let out = t.run(&[
        "bid",
        "--prompt",
        "p",
        "--max-price",
        "90",
        "--endpoint",
        &server.endpoint,
    ]);
    out.code(3).stderr_has("insufficient_balance");
}

#[test]
fn client_commands_post_raise_show_status_and_need_consent_to_advertise() {
    let server = Server::start(&["--lease-ms", "200"]);
    let ep = server.endpoint.as_str();
    let req = Cmm::new();
    let out = req.run(&[
        "bid",
        "--prompt",
        "summarise this",
        "--max-price",
        "20",
        "--endpoint",
        ep,
    ]);
    out.code(0);
    let tid = out.stdout.trim().to_string();
    assert!(tid.starts_with("t-"), "prints the task id: {tid}");
    req.run(&["bid", "--task-id", &tid, "--max-price", "25", "--endpoint", ep])
        .code(0);
    req.run(&["bid", "--task-id", &tid, "--max-price", "10", "--endpoint", ep])
        .code(2)
        .stderr_has("price_too_low");
    let st = req
        .run(&["--json", "market", "status", "--endpoint", ep])
        .code(0)
        .json();
    assert_eq!(st["status"]["balance"], 975);
    assert_eq!(st["status"]["escrow"], 25);
    assert_eq!(st["status"]["tasks"][0]["task_id"], tid.as_str());
    let audit = req.read("audit.jsonl");
    assert!(audit.contains("\"market.bid\"") && audit.contains("\"market.raise\""));
    assert!(
        !audit.contains("summarise this"),
        "the prompt never reaches the audit log"
    );
    req.run(&["market", "status", "--endpoint", ep])
        .code(0)
        .stdout_has("Balance: 975 RUV");
    // Bids above `market.maxBidPrice` are refused locally.
    req.run(&["bid", "--prompt", "x", "--max-price", "101", "--endpoint", ep])
        .code(3);

    let prov = Cmm::new();
    prov.run(&[
        "advertise",
        "--slots",
        "1",
        "--price",
        "5",
        "--endpoint",
        ep,
        "--for",
        "1",
    ])
    .code(3)
    .stderr_has("opt-in");
    prov.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    // A task is offered only while its requester is connected (only it can
    // send the payload): keep a session of the requester's open.
    let online = tokio::runtime::Runtime::new().unwrap();
    let requester_session = online.block_on(async {
        let paths = claude_max_market::Paths::in_one_dir(req.path().to_path_buf());
        let id = claude_max_market::crypto::keys::Identity::load(&paths).unwrap();
        claude_max_market::market::client::Client::connect(ep, &id)
            .await
            .unwrap()
    });
    let out = prov.run(&[
        "--json",
        "advertise",
        "--slots",
        "1",
        "--price",
        "5",
        "--endpoint",
        ep,
        "--for",
        "2",
        "--auto-accept",
    ]);
    out.code(0);
    let events: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for k in ["connected", "offer", "task_offered", "lease_won", "withdrawn"] {
        assert!(kinds.contains(&k), "advertise shows {k}: {kinds:?}");
    }
    assert!(prov.read("audit.jsonl").contains("\"market.accept\""));
    requester_session.close();

    // No coordinator: exit 4 with a hint.
    let dead = Cmm::new();
    dead.run(&[
        "bid",
        "--prompt",
        "x",
        "--max-price",
        "1",
        "--endpoint",
        "ws://127.0.0.1:1",
    ])
    .code(4)
    .stderr_has("market serve");
    server.verify();
}

#[test]
fn offers_outlive_a_short_disconnect_but_not_the_grace_period_and_logins_replace() {
    let server = Server::start(&["--grace-ms", "1500"]);
    rt().block_on(async {
        let p = Node::new();
        let c = p.connect(&server).await;
        c.request(&offer(5)).await.unwrap();
        c.close();
        drop(c);
        // Back once the coordinator has seen it go.
        assert!(tokio::task::block_in_place(
            || server.wait_for(10, |s| s.try_metric("cmm_market_sessions") == Some(0))
        ));
        let c = p.connect(&server).await;
        assert_eq!(
            c.request(&Request::Status {}).await.unwrap()["offers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // A second login for the same node replaces the first session.
        let mut old = c;
        let new = p.connect(&server).await;
        expect_event(&mut old, 5, "replaced", |e| matches!(e, Event::Replaced {})).await;
        new.close();
        drop(new);
        // A sleep by design: the grace period (1.5 s) must run out.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let c = p.connect(&server).await;
        let st = c.request(&Request::Status {}).await.unwrap();
        assert_eq!(
            st["offers"].as_array().unwrap().len(),
            0,
            "withdrawn after the grace period"
        );
        assert_eq!(st["balance"], 1000, "granted once, however many logins");
    });
    server.verify();
}

#[test]
fn server_reports_health_and_metrics_and_stops_cleanly_on_sigterm() {
    let mut server = Server::start(&[]);
    assert!(server.http_get("/healthz").contains("\"ok\":true"));
    let raw = server.http_get("/metrics");
    assert!(
        raw.contains(&format!("cmm_market_connections{{replica=\"{}\"}}", server.addr)),
        "every series names the replica, by default its address:\n{raw}"
    );
    let m = server.metrics_text();
    for name in [
        "cmm_market_connections",
        "cmm_market_offers_active",
        "cmm_market_tasks_open",
        "cmm_market_settlements_total",
        "cmm_market_rejects_total{reason=\"malformed\"}",
        "cmm_market_ledger_issued",
        "cmm_market_ledger_escrow",
    ] {
        assert!(m.contains(name), "metrics has {name}:\n{m}");
    }
    assert_eq!(server.terminate(), 0);
}

#[test]
fn the_gauges_follow_each_step_of_a_cycle() {
    // The book's gauges are read when /metrics is asked for (there is no
    // timer: were a scrape not to read them, they would never move). A
    // scrape soon after a reading may show the last values, so each step
    // is waited for.
    let server = Server::start(&[]);
    let book = |s: &Server| (s.metric("cmm_market_tasks_open"), s.metric("cmm_market_ledger_escrow"));
    assert_eq!(book(&server), (0, 0));
    rt().block_on(full_cycle_watched(&server, |step| {
        let want = match step {
            "offer" => {
                let active = server.wait_for(10, |s| s.metric("cmm_market_offers_active") == 1);
                assert!(active, "after the offer");
                return;
            }
            "post" => (1, 20),
            "accept" | "deliver" => (0, 20),
            _ => (0, 0),
        };
        let shown = server.wait_for(10, |s| book(s) == want);
        assert!(shown, "after {step}: {:?}, not {want:?}", book(&server));
    }));
    server.verify();
}

#[test]
fn advertise_reconnects_after_the_coordinator_restarts() {
    let mut server = Server::start(&["--grace-ms", "5000"]);
    let prov = Cmm::new();
    prov.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    // Create the node's keys now: RSA key generation on first use would eat
    // into the window in which the coordinator is killed.
    prov.run(&["keys", "generate"]).code(0);
    let child = prov
        .cmd(&[
            "--json",
            "advertise",
            "--slots",
            "1",
            "--price",
            "5",
            "--endpoint",
            &server.endpoint,
            "--for",
            "6",
        ])
        .spawn();
    // Killed once advertise is connected and its offer registered.
    child.expect_json(20, "the first offer", |v| v["event"] == "offer");
    server.kill9();
    // Restarted once advertise has seen the coordinator go.
    child.expect_json(20, "the disconnect", |v| v["event"] == "disconnected");
    server.spawn();
    let out = child.wait_within(Duration::from_secs(60), "advertise ends by itself");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let text = &out.stdout;
    let kinds: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["event"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "connected").count(),
        2,
        "reconnected once: {kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "disconnected"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("withdrawn"), "{kinds:?}");
    // Read straight from the SQLite file: skipped on PostgreSQL, where the
    // events above and the ledger check stand for it.
    if !server.on_postgres() {
        let db = rusqlite::Connection::open(&server.db).unwrap();
        let active: i64 = db
            .query_row("SELECT COUNT(*) FROM offers WHERE state = 'active'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            active, 0,
            "the first session's offer was replaced, the second withdrawn"
        );
    }
    server.verify();
}

#[test]
fn opting_out_stops_advertise_and_withdraws_the_offer() {
    let server = Server::start(&[]);
    let prov = Cmm::new();
    prov.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    let child = prov
        .cmd(&[
            "--json",
            "advertise",
            "--slots",
            "1",
            "--price",
            "5",
            "--endpoint",
            &server.endpoint,
            "--for",
            "30",
        ])
        .spawn();
    child.expect_json(20, "the offer", |v| v["event"] == "offer");
    prov.run(&["opt-out", "--yes"]).code(0);
    let started = std::time::Instant::now();
    let out = child.wait_within(Duration::from_secs(30), "advertise stops");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped promptly");
    assert_eq!(out.status, 3, "{}", out.stderr);
    assert!(out.stdout.contains("\"withdrawn\""));
    // Read straight from the SQLite file: skipped on PostgreSQL, where the
    // `withdrawn` event above and the ledger check stand for it.
    if !server.on_postgres() {
        let db = rusqlite::Connection::open(&server.db).unwrap();
        let active: i64 = db
            .query_row("SELECT COUNT(*) FROM offers WHERE state = 'active'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(active, 0);
    }
    server.verify();
}

/// A TCP proxy in front of the coordinator that holds back everything a
/// client sends for `delay` (what the coordinator sends comes at once):
/// a provider whose requests are slow to arrive.
fn slow_uplink(upstream: &str, delay: Duration) -> String {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("ws://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("ws://").to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let (Ok(mut down), Ok(mut up)) = (conn, TcpStream::connect(&upstream)) else {
                return;
            };
            let (mut down2, mut up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut down2);
                let _ = down2.shutdown(std::net::Shutdown::Both);
            });
            // Each read is passed on `delay` after it arrived, in order.
            let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
            std::thread::spawn(move || {
                for (at, bytes) in rx {
                    std::thread::sleep(delay.saturating_sub(at.elapsed()));
                    if up.write_all(&bytes).is_err() {
                        break;
                    }
                }
                let _ = up.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = down.read(&mut buf) {
                    if tx.send((std::time::Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
        }
    });
    endpoint
}

#[test]
fn a_lease_recalled_before_its_payload_frees_the_providers_one_job_at_once_for_the_offer_that_follows() {
    // A requester that leaves before sending the payload has its task's
    // lease recalled, and the task is offered again the moment it is back.
    // The provider, capped at one job, must take it: the recalled lease
    // held no job, so its cap reservation is given back when the recall
    // arrives, not after the provider's (here slow) give-back reaches the
    // coordinator. Otherwise the offer is declined and, offered once, the
    // task waits for its deadline.
    let server = Server::start(&[]);
    let via = slow_uplink(&server.endpoint, Duration::from_millis(600));
    let prov = Cmm::opted_in().env("ANTHROPIC_API_KEY", "sk-ant-api03-market-provider-not-a-secret");
    prov.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    prov.run(&["config", "--set", "limits.concurrentJobs=1"]).code(0);
    let provider_id = node_id_of(&prov);
    let mut advertise = prov
        .cmd(&[
            "--json",
            "advertise",
            "--slots",
            "1",
            "--price",
            "5",
            "--auto-accept",
            "--endpoint",
            &via,
        ])
        .spawn();
    advertise.expect_json(20, "offer", |v| v["event"] == "offer");
    let rounds = 3;
    rt().block_on(async {
        let r = Node::new();
        let mut c = r.connect(&server).await;
        let tid = task_id(&c.request(&post(20)).await.unwrap());
        for attempt in 1..=rounds + 1 {
            let what = format!("attempt {attempt} assigned");
            expect_event(&mut c, 15, &what, |e| {
                matches!(e, Event::Assigned { task_id, attempt: a, provider }
                         if *task_id == tid && *a == attempt && *provider == provider_id)
            })
            .await;
            if attempt > rounds {
                // The give-backs of the recalled attempts arrived late and
                // were refused: the current lease stands.
                let v = c.request(&Request::Task { task_id: tid.clone() }).await.unwrap();
                assert_eq!(
                    (v["state"].as_str(), v["attempt"].as_u64()),
                    (Some("assigned"), Some(attempt as u64)),
                    "{v}"
                );
                break;
            }
            // Leave without sending the payload, and come back as soon as
            // the coordinator has seen it go (the provider's session stays).
            c.close();
            drop(c);
            let gone = tokio::task::block_in_place(|| {
                common::wait_until_every(Duration::from_secs(10), Duration::from_millis(5), || {
                    server.try_metric("cmm_market_sessions") == Some(1)
                })
            });
            assert!(gone, "the coordinator never saw the requester go");
            c = r.connect(&server).await;
        }
        c.close();
    });
    advertise.signal(libc::SIGINT);
    advertise.wait_code();
    let offered: Vec<Value> = advertise
        .json_lines()
        .into_iter()
        .filter(|v| v["event"] == "task_offered")
        .collect();
    assert_eq!(offered.len(), rounds as usize + 1, "{}", advertise.stdout_text());
    for v in &offered {
        assert_eq!(v["accept"], true, "{v}");
    }
    // (The last lease lapses too, when the requester leaves at the end.)
    let lapsed: Vec<u64> = advertise
        .json_lines()
        .iter()
        .filter(|v| v["event"] == "lease_lapsed")
        .filter_map(|v| v["attempt"].as_u64())
        .collect();
    assert!(
        (1..=rounds as u64).all(|a| lapsed.contains(&a)),
        "{}",
        advertise.stdout_text()
    );
    server.verify();
}
