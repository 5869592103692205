//! What a peer can game in the market, against a real coordinator on
//! loopback: minting RUV with fresh identities, farming reputation with
//! self-trades, sniping every attempt of a task, framing a provider, and
//! serving other people's tasks on a subscription login.

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

fn accept(task_id: &str, attempt: u32) -> Request {
    Request::Accept {
        task_id: task_id.into(),
        attempt,
    }
}

fn abandon(task_id: &str, attempt: u32) -> Request {
    Request::Abandon {
        task_id: task_id.into(),
        attempt,
        reason: claude_max_market::market::protocol::AbandonReason::Withdrawn,
        data: None,
    }
}

async fn settle(rc: &claude_max_market::market::client::Client, tid: String) {
    rc.request(&Request::Settle {
        task_id: tid,
        attempt: 1,
    })
    .await
    .expect("settle");
}

fn post_with(max_price: u64, f: impl FnOnce(&mut Request)) -> Request {
    let mut r = post(max_price);
    f(&mut r);
    r
}

/// Item 5: a fresh identity is credited nothing by default; RUV enter the
/// market only through `market grant`, one ledger entry each.
#[test]
fn fresh_identities_mint_nothing_and_only_an_operator_grant_funds_a_node() {
    // The coordinator's own defaults: no `--initial-grant`.
    let server = Server::start_bare(&[]);
    let nodes: Vec<Node> = (0..5).map(|_| Node::new()).collect();
    let ids: Vec<String> = nodes.iter().map(Node::node_id).collect();
    rt().block_on(async {
        for n in &nodes {
            let c = n.connect(&server).await;
            assert_eq!((c.balance, c.granted), (0, 0), "a new identity is granted nothing");
            assert_eq!(reason_of(c.request(&post(20)).await), Reason::InsufficientBalance);
            c.close();
        }
    });
    let v = server.verify();
    assert_eq!(
        v["report"]["totals"]["issued"], 0,
        "five identities minted nothing: {v:#}"
    );

    // The operator funds one node, beside the running coordinator.
    let op = Cmm::new();
    let db = server.store.as_str();
    let out = op.run(&["--json", "market", "grant", &ids[0], "300", "--db", db]);
    out.code(0);
    assert_eq!(out.json()["balance"], 300);
    assert!(
        op.read("audit.jsonl").contains("\"market.granted\""),
        "the grant is audited"
    );
    // Refused: an id that never logged in, a malformed id, a zero amount.
    op.run(&["market", "grant", &"ab".repeat(32), "5", "--db", db])
        .code(2)
        .stderr_has("has logged in");
    op.run(&["market", "grant", "xyz\u{1b}", "5", "--db", db])
        .code(2)
        .stderr_has("64 hex digits");
    op.run(&["market", "grant", &ids[1], "0", "--db", db]).code(2);
    rt().block_on(async {
        let c = nodes[0].connect(&server).await;
        assert_eq!(c.request(&Request::Status {}).await.unwrap()["balance"], 300);
        c.request(&post(20)).await.expect("a funded node posts");
        let other = nodes[1].connect(&server).await;
        assert_eq!(other.request(&Request::Status {}).await.unwrap()["balance"], 0);
    });
    let v = server.verify();
    assert_eq!(v["report"]["totals"]["issued"], 300);
}

/// Reputation counts distinct paying requesters: one identity settling
/// with another over and over earns it one client, not a high score.
#[test]
fn repeated_self_trades_do_not_build_reputation() {
    let server = Server::start(&[]);
    rt().block_on(async {
        let (a, b, p) = (Node::new(), Node::new(), Node::new());
        let (ac, bc, pc) = (
            a.connect(&server).await,
            b.connect(&server).await,
            p.connect(&server).await,
        );
        pc.request(&offer(5)).await.unwrap();
        let fresh = pc.request(&Request::Reputation { node_id: p.node_id() }).await.unwrap();
        assert!((fresh["score"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9, "{fresh}");
        for _ in 0..4 {
            let tid = task_id(&ac.request(&post(20)).await.unwrap());
            pc.request(&accept(&tid, 1)).await.unwrap();
            pc.request(&Request::Deliver {
                task_id: tid.clone(),
                attempt: 1,
                data: "eQ==".into(),
            })
            .await
            .unwrap();
            settle(&ac, tid).await;
        }
        let rep = pc.request(&Request::Reputation { node_id: p.node_id() }).await.unwrap();
        assert_eq!(rep["successes"], 4);
        assert_eq!(rep["clients"], 1);
        assert!(
            (rep["score"].as_f64().unwrap() - 0.5).abs() < 1e-9,
            "four tasks from one requester score as one: {rep}"
        );
        let tid = task_id(&bc.request(&post(20)).await.unwrap());
        pc.request(&accept(&tid, 1)).await.unwrap();
        pc.request(&Request::Deliver {
            task_id: tid.clone(),
            attempt: 1,
            data: "eQ==".into(),
        })
        .await
        .unwrap();
        settle(&bc, tid).await;
        let rep = pc.request(&Request::Status {}).await.unwrap()["reputation"].clone();
        assert_eq!(rep["clients"], 2);
        assert!((rep["score"].as_f64().unwrap() - 0.6).abs() < 1e-9, "{rep}");
    });
    server.verify();
}

/// Item 6: a price-0 offer that takes and drops a lease pays for it: a
/// failure, a cool-down, and the next attempt goes to another node.
#[test]
fn abandoning_a_lease_costs_reputation_and_a_cool_down() {
    // The default cool-down (a minute); the closed market's grant.
    let server = Server::start_bare(&["--initial-grant", "1000"]);
    rt().block_on(async {
        let (r, sniper, honest) = (Node::new(), Node::new(), Node::new());
        let rc = r.connect(&server).await;
        let mut sc = sniper.connect(&server).await;
        let mut hc = honest.connect(&server).await;
        sc.request(&offer(0)).await.unwrap();
        hc.request(&offer(5)).await.unwrap();
        let tid = task_id(&rc.request(&post(20)).await.unwrap());
        sc.request(&accept(&tid, 1)).await.unwrap();
        rc.request(&Request::Payload {
            task_id: tid.clone(),
            attempt: 1,
            data: "eA==".into(),
            part: None,
            parts: None,
        })
        .await
        .unwrap();
        // (The offer of attempt 1, sent when the task was posted.)
        while sc.next_event(Duration::from_millis(200)).await.is_some() {}
        let v = sc.request(&abandon(&tid, 1)).await.unwrap();
        assert_eq!(v["state"], "open");
        let st = sc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["reputation"]["failures"], 1, "giving a lease back counts: {st}");
        assert!(st["reputation"]["score"].as_f64().unwrap() < 1.0 / 3.0);
        assert!(st["cooldown_until"].is_string(), "{st}");
        // The honest provider is offered attempt 2; the sniper is not, and
        // cannot take it or any other task while it cools down.
        expect_event(
            &mut hc,
            5,
            "re-offer",
            |e| matches!(e, Event::TaskOffered { task } if task.attempt == 2),
        )
        .await;
        assert_eq!(reason_of(sc.request(&accept(&tid, 2)).await), Reason::CoolingDown);
        let tid2 = task_id(&rc.request(&post(20)).await.unwrap());
        assert_eq!(reason_of(sc.request(&accept(&tid2, 1)).await), Reason::CoolingDown);
        while let Some(ev) = sc.next_event(Duration::from_millis(300)).await {
            assert!(
                !matches!(ev, Event::TaskOffered { .. }),
                "a cooling provider is offered nothing: {ev:?}"
            );
        }
        hc.request(&accept(&tid, 2)).await.unwrap();
        let st = hc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["reputation"]["failures"], 0);
    });
    server.verify();
}

/// Item 6: whoever failed an attempt of a task gets no later attempt of it.
#[test]
fn a_tasks_attempts_do_not_all_go_to_one_node() {
    // No cool-down here (the test support's default), to see the attempt rule alone.
    let server = Server::start(&["--lease-ms", "300"]);
    rt().block_on(async {
        let (r, p1, p2) = (Node::new(), Node::new(), Node::new());
        let rc = r.connect(&server).await;
        let mut c1 = p1.connect(&server).await;
        let c2 = p2.connect(&server).await;
        c1.request(&offer(0)).await.unwrap();
        let tid = task_id(&rc.request(&post(20)).await.unwrap());
        c1.request(&accept(&tid, 1)).await.unwrap();
        rc.request(&Request::Payload {
            task_id: tid.clone(),
            attempt: 1,
            data: "eA==".into(),
            part: None,
            parts: None,
        })
        .await
        .unwrap();
        // p1 never renews: its lease lapses.
        expect_event(&mut c1, 5, "lease_lapsed", |e| {
            matches!(e, Event::LeaseLapsed { attempt: 1, .. })
        })
        .await;
        assert_eq!(reason_of(c1.request(&accept(&tid, 2)).await), Reason::AlreadyAttempted);
        c2.request(&offer(5)).await.unwrap();
        c2.request(&accept(&tid, 2))
            .await
            .expect("another node takes attempt 2");
        // A new task is p1's to take again.
        let tid2 = task_id(&rc.request(&post(20)).await.unwrap());
        c1.request(&accept(&tid2, 1)).await.unwrap();
    });
    server.verify();
}

/// Item 7: a requester that never sends the payload, or posts a deadline
/// too short to work in, costs the provider nothing.
#[test]
fn a_requester_cannot_frame_a_provider() {
    let server = Server::start_bare(&["--initial-grant", "1000", "--payload-grace-ms", "300"]);
    rt().block_on(async {
        let (r, p) = (Node::new(), Node::new());
        let mut rc = r.connect(&server).await;
        let pc = p.connect(&server).await;
        pc.request(&offer(5)).await.unwrap();
        // A 2 s deadline and no payload: the lease ends at the deadline.
        let tid = task_id(
            &rc.request(&post_with(20, |r| {
                if let Request::Post { deadline_secs, .. } = r {
                    *deadline_secs = 2;
                }
            }))
            .await
            .unwrap(),
        );
        pc.request(&accept(&tid, 1)).await.unwrap();
        expect_event(
            &mut rc,
            10,
            "refund at the deadline",
            |e| matches!(e, Event::Refunded { task_id, .. } if *task_id == tid),
        )
        .await;
        let st = pc.request(&Request::Status {}).await.unwrap();
        assert_eq!(
            st["reputation"]["failures"], 0,
            "the deadline was the requester's: {st}"
        );
        assert!(st["cooldown_until"].is_null(), "{st}");
        // No payload within the grace: the provider gives the lease back free
        // and may take the task again.
        let tid = task_id(&rc.request(&post(20)).await.unwrap());
        pc.request(&accept(&tid, 1)).await.unwrap();
        // A sleep by design: the payload grace (300 ms) must run out.
        tokio::time::sleep(Duration::from_millis(500)).await;
        pc.request(&abandon(&tid, 1)).await.unwrap();
        let st = pc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["reputation"]["failures"], 0, "no payload was sent: {st}");
        assert!(st["cooldown_until"].is_null(), "{st}");
        pc.request(&accept(&tid, 2)).await.expect("not excluded from the task");
        // A rejected delivery counts, but cannot bench the provider.
        pc.request(&Request::Deliver {
            task_id: tid.clone(),
            attempt: 2,
            data: "eQ==".into(),
        })
        .await
        .unwrap();
        rc.request(&Request::Reject {
            task_id: tid.clone(),
            attempt: 2,
            reason_sha256: None,
            reason_bytes: None,
            data: None,
        })
        .await
        .unwrap();
        let st = pc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["reputation"]["failures"], 1, "{st}");
        assert!(
            st["cooldown_until"].is_null(),
            "no cool-down from a requester's verdict: {st}"
        );
        let tid = task_id(&rc.request(&post(20)).await.unwrap());
        pc.request(&accept(&tid, 1))
            .await
            .expect("a rejected provider keeps working");
    });
    server.verify();
}

/// Item 8: on a subscription (OAuth) login, `advertise` serves only this
/// user's own nodes and declines, audited, everyone else; on an API key it
/// serves anyone its standing rules allow.
#[test]
fn a_subscription_login_serves_only_the_users_own_nodes() {
    let server = Server::start(&[]);
    let (stranger, own_cfg, own_key) = (Node::new(), Node::new(), Node::new());
    let prov = Cmm::new();
    prov.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    prov.run(&["config", "--set", "limits.concurrentJobs=4"]).code(0);
    prov.run(&["config", "--set", &format!("market.ownNodes={}", own_cfg.node_id())])
        .code(0);
    let exported = own_key.home.file("own.json");
    own_key
        .home
        .run(&["keys", "export", "--public", exported.to_str().unwrap()])
        .code(0);
    // Imported first as a peer, then marked as one's own.
    prov.run(&["keys", "import", "laptop", exported.to_str().unwrap()])
        .code(0);
    prov.run(&["keys", "import", "--own", "laptop", exported.to_str().unwrap()])
        .code(0);
    let peers = prov.run(&["--json", "keys", "list"]).json();
    assert_eq!(peers["peers"][0]["own"], true, "{peers}");
    let rt = rt();
    let (_sessions, tasks) = rt.block_on(async {
        let mut sessions = Vec::new();
        let mut tasks = Vec::new();
        for n in [&stranger, &own_cfg, &own_key] {
            let c = n.connect(&server).await;
            tasks.push(task_id(&c.request(&post(20)).await.unwrap()));
            sessions.push(c);
        }
        (sessions, tasks)
    });
    let advertise = |env: (&str, &str)| {
        prov.cmd(&[
            "--json",
            "advertise",
            "--slots",
            "4",
            "--price",
            "5",
            "--auto-accept",
            "--endpoint",
            &server.endpoint,
            "--for",
            "3",
        ])
        .env(env.0, env.1)
        .run()
    };
    let decisions = |out: &common::Output| -> Vec<(String, bool, String)> {
        out.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "task_offered")
            .map(|v| {
                (
                    v["task"]["task_id"].as_str().unwrap_or_default().to_string(),
                    v["accept"] == true,
                    v["declined"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let oauth = ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-test-token-not-a-secret");
    let out = advertise(oauth);
    out.code(0).stderr_has("subscription");
    let d = decisions(&out);
    let of = |tid: &str| {
        d.iter()
            .find(|x| x.0 == tid)
            .cloned()
            .unwrap_or_else(|| panic!("{tid} not offered: {d:?}"))
    };
    let (_, took, why) = of(&tasks[0]);
    assert!(!took, "a stranger's task is declined on a subscription login");
    assert!(why.contains("subscription") && why.contains("own"), "{why}");
    assert!(of(&tasks[1]).1, "an own node from `market.ownNodes` is served: {d:?}");
    assert!(of(&tasks[2]).1, "an own node from `keys import --own` is served: {d:?}");
    let audit = prov.read("audit.jsonl");
    let declined: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "market.declined" && e["task_id"] == tasks[0].as_str())
        .collect();
    assert!(
        declined
            .iter()
            .any(|e| e["reason"].as_str().unwrap_or_default().contains("subscription")),
        "the decline is audited with its reason: {declined:?}"
    );
    // The same node on an API key serves the stranger.
    prov.run(&["config", "--set", "credentials.source=api-key-env"]).code(0);
    let out = advertise(("ANTHROPIC_API_KEY", "sk-ant-api03-not-a-real-key"));
    out.code(0);
    let d = decisions(&out);
    assert!(
        d.iter().any(|x| x.0 == tasks[0] && x.1),
        "an API key serves anyone the rules allow: {d:?}"
    );
    // compliance-check and terms say it plainly.
    prov.run(&["config", "--set", "credentials.source=auto"]).code(0);
    let v = prov
        .cmd(&["--json", "compliance-check"])
        .env(oauth.0, oauth.1)
        .run()
        .json();
    let r = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "credential-kind-market")
        .unwrap()
        .clone();
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("serves only your own nodes") && msg.contains("2 listed"),
        "{msg}"
    );
    prov.run(&["terms"])
        .code(0)
        .stdout_has("Subscription logins serve only your own nodes");
    server.verify();
}

/// Rejecting costs the requester: each rejection re-offers the task to
/// another provider (none of the escrow moves until the last attempt), is
/// kept by hash and size only, counts in the requester's standing that
/// providers are offered, and past half of at least five verdicts the
/// requester may not post at all.
#[test]
fn rejections_reoffer_the_task_count_against_the_requester_and_suspend_its_posting() {
    let server = Server::start(&[]);
    rt().block_on(async {
        let (r, p1, p2) = (Node::new(), Node::new(), Node::new());
        let rc = r.connect(&server).await;
        let mut c1 = p1.connect(&server).await;
        let mut c2 = p2.connect(&server).await;
        c1.request(&offer(5)).await.unwrap();
        let reason = "the acceptance command `make test` exited 2\nFAIL: test_add";
        let reason_sha = hash(reason);
        let deliver = |tid: &str, attempt: u32| Request::Deliver {
            task_id: tid.into(),
            attempt,
            data: "eQ==".into(),
        };
        let reject = |tid: &str, attempt: u32| Request::Reject {
            task_id: tid.into(),
            attempt,
            reason_sha256: Some(reason_sha.clone()),
            reason_bytes: Some(reason.len() as u64),
            data: Some("c2VhbGVk".into()),
        };
        let payload = |tid: &str, attempt: u32| Request::Payload {
            task_id: tid.into(),
            attempt,
            data: "cA==".into(),
            part: None,
            parts: None,
        };
        // Attempt 1 on p1, rejected: the task is open again, escrow still locked.
        let tid = task_id(
            &rc.request(&post_with(20, |p| {
                if let Request::Post { max_attempts, .. } = p {
                    *max_attempts = Some(2);
                }
            }))
            .await
            .unwrap(),
        );
        c1.request(&accept(&tid, 1)).await.unwrap();
        rc.request(&payload(&tid, 1)).await.unwrap();
        c1.request(&deliver(&tid, 1)).await.unwrap();
        c2.request(&offer(5)).await.unwrap();
        let v = rc.request(&reject(&tid, 1)).await.unwrap();
        assert_eq!(
            (v["state"].as_str(), v["paid"].as_i64(), v["refunded"].as_i64()),
            (Some("open"), Some(0), Some(0)),
            "{v}"
        );
        let ev = expect_event(&mut c1, 5, "rejected", |e| matches!(e, Event::Rejected { .. })).await;
        let Event::Rejected {
            state,
            reason_sha256,
            data,
            ..
        } = ev
        else {
            unreachable!()
        };
        assert_eq!(
            (state.as_str(), reason_sha256.as_deref(), data.as_deref()),
            ("open", Some(reason_sha.as_str()), Some("c2VhbGVk"))
        );
        // Offered to p2 with the requester's standing; p1 may not take it again.
        let ev = expect_event(
            &mut c2,
            5,
            "re-offer",
            |e| matches!(e, Event::TaskOffered { task } if task.task_id == tid),
        )
        .await;
        let Event::TaskOffered { task } = ev else {
            unreachable!()
        };
        assert_eq!(task.attempt, 2);
        let standing = task.requester_standing.expect("standing in the offer");
        assert_eq!((standing.settled, standing.rejected), (0, 1));
        assert!((standing.score - 1.0 / 3.0).abs() < 1e-9, "{standing:?}");
        assert_eq!(reason_of(c1.request(&accept(&tid, 2)).await), Reason::AlreadyAttempted);
        let st = rc.request(&Request::Status {}).await.unwrap();
        assert_eq!(
            (st["balance"].as_i64(), st["escrow"].as_i64()),
            (Some(980), Some(20)),
            "{st}"
        );
        // Attempt 2 rejected too: the last attempt, so refunded in full.
        c2.request(&accept(&tid, 2)).await.unwrap();
        rc.request(&payload(&tid, 2)).await.unwrap();
        c2.request(&deliver(&tid, 2)).await.unwrap();
        let v = rc.request(&reject(&tid, 2)).await.unwrap();
        assert_eq!(
            (v["state"].as_str(), v["refunded"].as_i64()),
            (Some("refunded"), Some(20)),
            "{v}"
        );
        let st = rc.request(&Request::Status {}).await.unwrap();
        assert_eq!(
            (st["balance"].as_i64(), st["escrow"].as_i64()),
            (Some(1000), Some(0)),
            "{st}"
        );
        // Three more rejected deliveries: 5 verdicts, all rejections.
        for _ in 0..3 {
            let tid = task_id(&rc.request(&post(20)).await.unwrap());
            c2.request(&accept(&tid, 1)).await.unwrap();
            rc.request(&payload(&tid, 1)).await.unwrap();
            c2.request(&deliver(&tid, 1)).await.unwrap();
            rc.request(&reject(&tid, 1)).await.unwrap();
        }
        let rep = c1.request(&Request::Reputation { node_id: r.node_id() }).await.unwrap();
        assert_eq!(rep["as_requester"]["rejected"], 5, "{rep}");
        let refused = rc.request(&post(20)).await;
        assert_eq!(reason_of(refused), Reason::Suspended);
        let st = c1.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["reputation"]["failures"], 1, "{st}");
        assert!(st["cooldown_until"].is_null(), "a verdict benches nobody: {st}");
    });
    // The coordinator keeps each reason's hash and size (its text went
    // only sealed to the provider).
    if !server.on_postgres() {
        let db = rusqlite::Connection::open_with_flags(&server.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let kept: Vec<(String, i64)> = db
            .prepare("SELECT reason_sha256, reason_bytes FROM rejections")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let reason = "the acceptance command `make test` exited 2\nFAIL: test_add";
        assert_eq!(kept, vec![(hash(reason), reason.len() as i64); 5]);
    }
    server.verify();
}
