//! Nodes fail over between coordinator replicas: an endpoint list is tried
//! in order, a dead replica is passed over at once, and a provider's offer
//! and held leases, and a requester's `bid --wait`, carry on on the next
//! replica when theirs is killed. The replicas are `market serve` processes
//! on one SQLite database file, the second started once the first is gone
//! (its standby); the providers run the fake-`claude` test image on the
//! real Docker engine.

mod common;
#[path = "common/docker.rs"]
mod docker;
// The coordinator harness links the library: only market tests include it.
#[path = "common/market.rs"]
mod market;

use common::{docker_available, Cmm, Spawned};
use docker::market_image;
use market::{node_id_of, Server};
use serde_json::Value;

/// `advertise --auto-accept --json` on `endpoints`, running the fake image.
struct Provider {
    home: Cmm,
    node_id: String,
    child: Spawned,
    /// The offer registered on the first session.
    first_offer: String,
}

impl Provider {
    fn new(endpoints: &str, image: &str) -> Provider {
        // Serving other people's tasks needs an API key.
        let home = Cmm::opted_in().env("ANTHROPIC_API_KEY", "sk-ant-api03-market-provider-not-a-secret");
        home.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
        home.run(&["config", "--set", "limits.maxTokensPerTask=40000"]).code(0);
        let node_id = node_id_of(&home);
        let child = home
            .cmd(&[
                "--json",
                "advertise",
                "--slots",
                "1",
                "--price",
                "5",
                "--auto-accept",
                "--image",
                image,
                "--endpoint",
                endpoints,
            ])
            .spawn();
        let offer = child.expect_json(30, "offer", |v| v["event"] == "offer");
        let first_offer = offer["offer"]["offer_id"].as_str().expect("an offer id").to_string();
        Provider {
            home,
            node_id,
            child,
            first_offer,
        }
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
}

fn status(home: &Cmm, endpoint: &str) -> Value {
    let out = home.run(&["--json", "market", "status", "--endpoint", endpoint]);
    out.code(0);
    out.json()["status"].clone()
}

/// `bid --wait --json` of `prompt` at 20 RUV on `endpoints`, in the background.
fn spawn_bid(requester: &Cmm, endpoints: &str, prompt: &str) -> Spawned {
    requester
        .cmd(&[
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
            endpoints,
        ])
        .spawn()
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

/// How many tasks the coordinator's store holds, SQLite file or
/// PostgreSQL database.
fn tasks_in(server: &Server) -> i64 {
    if server.on_postgres() {
        let url = server.store.clone();
        return market::postgres::off_runtime(move || {
            let mut c = market::postgres::connect(&url).expect("connect to the market database");
            c.query_one("SELECT COUNT(*) FROM tasks", &[])
                .expect("count tasks")
                .get(0)
        });
    }
    let c = rusqlite::Connection::open(&server.db).expect("open the market database");
    c.query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get(0)).unwrap()
}

#[test]
fn status_and_bid_go_through_the_second_endpoint_when_the_first_is_dead() {
    let server = Server::start(&[]);
    let dead = format!("ws://{}", Server::free_addr());
    let list = format!("{dead} , {}", server.endpoint);
    let node = Cmm::new();
    let out = node.run(&["--json", "market", "status", "--endpoint", &list]);
    out.code(0);
    let v = out.json();
    assert_eq!(
        v["endpoint"],
        server.endpoint.as_str(),
        "the live replica answered: {v:#}"
    );
    assert_eq!(v["status"]["balance"], 1000);

    // A post goes through the live one, once.
    let out = node.run(&[
        "--json",
        "bid",
        "--prompt",
        "hello",
        "--max-price",
        "7",
        "--endpoint",
        &list,
    ]);
    out.code(0);
    let task_id = out.json()["task_id"].as_str().expect("a task id").to_string();
    assert_eq!(tasks_in(&server), 1);
    assert_eq!(status(&node, &server.endpoint)["escrow"], 7);

    // `market.endpoint` takes the same list, and `market result` uses it.
    node.run(&["config", "--set", &format!("market.endpoint={list}")])
        .code(0);
    let out = node.run(&["--json", "market", "status"]);
    out.code(0);
    assert_eq!(out.json()["endpoint"], server.endpoint.as_str());
    let out = node.run(&["--json", "market", "result", &task_id, "--no-wait"]);
    assert_eq!(out.json()["state"], "open", "{}", out.stderr);

    // With every replica dead, the error names each.
    let dead2 = format!("ws://{}", Server::free_addr());
    let out = node.run(&["market", "status", "--endpoint", &format!("{dead},{dead2}")]);
    out.code(4);
    assert!(
        out.stderr.contains(&dead) && out.stderr.contains(&dead2),
        "both replicas are named:\n{}",
        out.stderr
    );
}

#[test]
fn a_bad_endpoint_list_item_is_named_with_the_usage_exit_code() {
    let node = Cmm::opted_in();
    node.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    let cases = [
        (
            "ws://127.0.0.1:9,http://127.0.0.1:10",
            "`http://127.0.0.1:10` is not a ws:// or wss:// URL",
        ),
        ("ws://127.0.0.1:9, ,ws://127.0.0.1:10", "has an empty item (item 2)"),
        ("ws://127.0.0.1:9,", "has an empty item (item 2)"),
        ("127.0.0.1:9", "`127.0.0.1:9` is not a ws:// or wss:// URL"),
    ];
    for (list, says) in cases {
        for args in [
            vec!["market", "status", "--endpoint", list],
            vec!["bid", "--prompt", "x", "--max-price", "1", "--endpoint", list],
            vec!["advertise", "--slots", "1", "--endpoint", list],
            vec!["market", "result", "t-1", "--endpoint", list],
            vec!["audit", "anchor", "--endpoint", list],
        ] {
            let out = node.run(&args);
            out.code(2);
            assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
            assert!(
                out.stderr.contains("market.endpoint"),
                "the hint says how to set it: {}",
                out.stderr
            );
        }
        let out = node.run(&["config", "--set", &format!("market.endpoint={list}")]);
        out.code(2);
        assert!(out.stderr.contains(says), "config --set: {}", out.stderr);
    }
    // The config kept its value; the same list from the environment is refused at use.
    let out = node
        .cmd(&["market", "status"])
        .env("CMM_MARKET_ENDPOINT", "ws://127.0.0.1:9,,")
        .run();
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("empty item"), "{}", out.stderr);
}

#[test]
fn a_provider_keeps_its_lease_and_offer_across_a_replica_kill() {
    if !docker_available("a_provider_keeps_its_lease_and_offer_across_a_replica_kill") {
        return;
    }
    let img = market_image();
    let mut a = Server::start(&["--lease-ms", "10000"]);
    let b_addr = Server::free_addr();
    let list = format!("{},ws://{b_addr}", a.endpoint);
    let provider = Provider::new(&list, &img);
    let requester = Cmm::new();
    let bid = spawn_bid(&requester, &list, "scenario:slowecho across the kill");
    let task_id = posted_task_id(&bid);
    provider.wait(30, "the job running", |v| {
        v["event"] == "running" && v["task_id"] == task_id.as_str()
    });

    // A goes away mid-job; B takes over the same database.
    a.kill9();
    let b = a.standby(&b_addr);
    let moved = provider.wait(60, "the failover", |v| v["event"] == "failover");
    assert_eq!(moved["endpoint"], b.endpoint.as_str());
    assert_eq!(moved["from"], a.endpoint.as_str());
    provider.wait(30, "the session on B", |v| {
        v["event"] == "connected" && v["endpoint"] == b.endpoint.as_str()
    });
    let again = provider.wait(30, "the offer on B", |v| {
        v["event"] == "offer" && v["offer"]["offer_id"] != provider.first_offer.as_str()
    });
    assert!(again["offer"]["offer_id"].is_string());

    // The job started before the kill delivers after it, under attempt 1.
    let delivered = provider.wait(60, "the delivery", |v| v["event"] == "delivered");
    assert_eq!(delivered["task_id"], task_id.as_str());
    assert_eq!(delivered["attempt"], 1);
    let out = bid.wait_within(std::time::Duration::from_secs(90), "bid --wait settles");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("one JSON answer");
    assert_eq!(v["task_id"], task_id.as_str());
    assert_eq!(v["attempt"], 1, "the lease held across the kill was kept");
    assert_eq!(v["provider"], provider.node_id.as_str());
    assert_eq!(v["settlement"]["paid"], 5);
    assert_eq!(v["settlement"]["refunded"], 15);
    assert!(provider.events("abandoned").is_empty(), "nothing was given back");
    assert!(provider.events("lease_lost").is_empty(), "the lease was never lost");

    // The offer is live on B: a task posted through B alone is served by it.
    let second = Cmm::new();
    let out = second.run(&[
        "--json",
        "bid",
        "--prompt",
        "scenario:echo on the standby",
        "--max-price",
        "20",
        "--max-tokens",
        "20000",
        "--wait",
        "--endpoint",
        &b.endpoint,
    ]);
    out.code(0);
    let v = out.json();
    assert_eq!(v["provider"], provider.node_id.as_str());
    assert_eq!(v["settlement"]["paid"], 5);

    // Exact balances, on the database both replicas used.
    assert_eq!(status(&requester, &b.endpoint)["balance"], 995);
    assert_eq!(status(&second, &b.endpoint)["balance"], 995);
    let ps = status(&provider.home, &b.endpoint);
    assert_eq!(ps["balance"], 1010, "{ps:#}");
    assert_eq!(ps["reputation"]["successes"], 2);
    assert_eq!(ps["server"]["ledger"]["escrow"], 0);
    assert_eq!(tasks_in(&b), 2);
    b.verify();
    provider.home.run(&["audit", "verify"]).code(0);
    requester.run(&["audit", "verify"]).code(0);
}

#[test]
fn bid_wait_carries_on_across_a_replica_kill_and_posts_once() {
    if !docker_available("bid_wait_carries_on_across_a_replica_kill_and_posts_once") {
        return;
    }
    let img = market_image();
    let mut a = Server::start(&["--lease-ms", "10000"]);
    let b_addr = Server::free_addr();
    let list = format!("{},ws://{b_addr}", a.endpoint);
    let requester = Cmm::new();
    // Posted on A with no provider yet: it waits there, open.
    let bid = spawn_bid(&requester, &list, "scenario:echo posted before the kill");
    let task_id = posted_task_id(&bid);
    a.kill9();
    let b = a.standby(&b_addr);
    let moved = bid.expect_stderr(60, "the failover", |l| l.contains("now using"));
    assert!(moved.contains(&b.endpoint), "{moved}");
    // A provider that knows only B serves the task the requester is following there.
    let provider = Provider::new(&b.endpoint, &img);
    let out = bid.wait_within(std::time::Duration::from_secs(90), "bid --wait settles");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("one JSON answer");
    assert_eq!(v["task_id"], task_id.as_str(), "the same task");
    assert_eq!(v["provider"], provider.node_id.as_str());
    assert_eq!(v["settlement"]["paid"], 5);
    assert_eq!(v["settlement"]["refunded"], 15);
    assert_eq!(tasks_in(&b), 1, "posted once");
    assert_eq!(
        out.stderr.matches("posted ").count(),
        1,
        "one post reported:\n{}",
        out.stderr
    );
    let rs = status(&requester, &b.endpoint);
    assert_eq!(rs["balance"], 995);
    assert_eq!(rs["escrow"], 0);
    assert_eq!(status(&provider.home, &b.endpoint)["balance"], 1005);
    b.verify();
    requester.run(&["audit", "verify"]).code(0);
}
